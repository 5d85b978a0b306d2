//! memfd: an anonymous shmem file with seals. Pages are order-0 folios in RAM, allocated on
//! first write or fault; holes read as zeros.

use crate::abi::errno::{Errno, SysResult};
use crate::mm::{Folio, Mm, PageCache, PhysRead, PAGE_SIZE};

/// `F_SEAL_SEAL`: no further seals may be added ([`Memfd::add_seals`] fails with EPERM).
pub const F_SEAL_SEAL: u32 = 0x0001;
/// `F_SEAL_SHRINK`: the size may not decrease (truncate fails with EPERM).
pub const F_SEAL_SHRINK: u32 = 0x0002;
/// `F_SEAL_GROW`: the size may not increase (truncate, write past the end, fallocate: EPERM).
pub const F_SEAL_GROW: u32 = 0x0004;
/// `F_SEAL_WRITE`: no writes, hole punches or writable mappings (EPERM); cannot be added
/// while a writable shared mapping exists (EBUSY).
pub const F_SEAL_WRITE: u32 = 0x0008;
/// `F_SEAL_FUTURE_WRITE`: like `F_SEAL_WRITE` for writes, punches and new writable mappings,
/// but may be added while writable mappings exist.
pub const F_SEAL_FUTURE_WRITE: u32 = 0x0010;
/// `F_SEAL_EXEC`: the file's exec bits may not change; recorded and handed over only (this
/// crate has no file modes).
pub const F_SEAL_EXEC: u32 = 0x0020;
/// Every seal bit this memfd knows; other bits are EINVAL in [`Memfd::add_seals`] and make a
/// handed-over `memfd_luo_ser` unrestorable (EOPNOTSUPP).
pub const ALL_SEALS: u32 =
    F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_FUTURE_WRITE | F_SEAL_EXEC;

/// `memfd_create` flag `MFD_CLOEXEC`: the new fd is close-on-exec.
pub const MFD_CLOEXEC: u32 = 0x0001;
/// `memfd_create` flag `MFD_ALLOW_SEALING`: seals may be added; without it the file starts
/// with `F_SEAL_SEAL`.
pub const MFD_ALLOW_SEALING: u32 = 0x0002;
/// `memfd_create` flag `MFD_HUGETLB`: accepted and recorded in [`Memfd::hugetlb`]; pages stay
/// order 0, and the memfd LUO handler refuses such a file.
pub const MFD_HUGETLB: u32 = 0x0004;

/// Largest memfd we allow (the page cache is dense): 1 TiB.
pub const MAX_SIZE: u64 = 1 << 40;

/// What fallocate changed: newly allocated page indexes, and the pages a punch took out.
pub type FallocateResult = (Vec<u64>, Option<Dropped>);

/// Pages taken out of a file (truncate, punch hole) and not freed yet: the caller unmaps the
/// index range from every window first, then frees the folios ([`Dropped::free`]), as Linux's
/// `truncate_pagecache_range` unmaps before it frees.
#[derive(Debug)]
#[must_use = "dropped pages must be unmapped, then freed"]
pub struct Dropped {
    /// File page indexes `start..end` that left the file.
    pub range: (u64, u64),
    /// The folios removed from those indexes, still allocated.
    pub folios: Vec<Folio>,
}

impl Dropped {
    /// Free the dropped folios to `mm`; call only after the range is unmapped everywhere.
    pub fn free(mut self, mm: &mut Mm) -> SysResult<()> {
        mm.free_many(&mut self.folios)?;
        Ok(())
    }
}

/// A memfd's state: size, page cache, seals and the LUO freeze. Lives in the open-file table
/// as `FileKind::Memfd`; the host's fd calls (`ftruncate`, `pwrite`, `fallocate`, …) land here.
#[derive(Debug, Default)]
pub struct Memfd {
    /// The name given to `memfd_create` (at most 249 bytes); empty for a memfd retrieved from LUO.
    pub name: String,
    /// File size in bytes (at most [`MAX_SIZE`]).
    pub size: u64,
    /// The file's pages: page index → frame, allocated on first write or fault.
    pub pages: PageCache,
    /// The `F_SEAL_*` bits in force.
    pub seals: u32,
    /// Created with `MFD_HUGETLB`; only recorded (pages are still order 0), and makes the file
    /// unpreservable by LUO.
    pub hugetlb: bool,
    /// Preserved by LUO: size is frozen and holes cannot be punched (upstream
    /// `SHMEM_F_MAPPING_FROZEN`: like GROW|SHRINK seals plus no punching, but removable).
    pub frozen: bool,
    /// Writable shared mappings (F_SEAL_WRITE cannot be added while any exist).
    pub writable_maps: u32,
}

fn npages(size: u64) -> u64 {
    size.div_ceil(PAGE_SIZE)
}

impl Memfd {
    /// A new empty memfd as `memfd_create(name, flags)` makes it: sealable only with
    /// `MFD_ALLOW_SEALING`, else born with `F_SEAL_SEAL`. Flags are checked by the caller.
    pub fn new(name: &str, flags: u32) -> Self {
        Self {
            name: name.to_string(),
            seals: if flags & MFD_ALLOW_SEALING != 0 {
                0
            } else {
                F_SEAL_SEAL
            },
            hugetlb: flags & MFD_HUGETLB != 0,
            ..Default::default()
        }
    }

    /// Change the size. Returns the pages dropped by a shrink, still to unmap and free.
    pub fn truncate(&mut self, mm: &mut Mm, size: u64) -> SysResult<Option<Dropped>> {
        if size > MAX_SIZE {
            return Err(Errno::EFBIG);
        }
        if self.frozen && size != self.size {
            return Err(Errno::EPERM);
        }
        if (size < self.size && self.seals & F_SEAL_SHRINK != 0)
            || (size > self.size && self.seals & F_SEAL_GROW != 0)
        {
            return Err(Errno::EPERM);
        }
        let old_pages = self.pages.nr_slots();
        // Zero the tail of a partial last page so a later grow reads zeros.
        if size < self.size && size % PAGE_SIZE != 0 {
            if let Some(pa) = self.pages.pa(size / PAGE_SIZE) {
                let off = size % PAGE_SIZE;
                mm.ram.fill(pa + off, PAGE_SIZE - off, 0)?;
            }
        }
        let folios = self.pages.resize(npages(size));
        self.size = size;
        let new_pages = npages(size);
        Ok((new_pages < old_pages).then_some(Dropped {
            range: (new_pages, old_pages),
            folios,
        }))
    }

    /// Read up to `buf.len()` bytes at `pos`, stopping at the file size; holes read as zeros.
    /// Returns the byte count (0 at or past the end).
    pub fn read_at(&self, mm: &Mm, pos: u64, buf: &mut [u8]) -> SysResult<usize> {
        if pos >= self.size {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(self.size - pos) as usize;
        let mut done = 0;
        while done < n {
            let p = pos + done as u64;
            let (idx, off) = (p / PAGE_SIZE, p % PAGE_SIZE);
            let len = ((PAGE_SIZE - off) as usize).min(n - done);
            match self.pages.pa(idx) {
                Some(pa) => mm.ram.read_phys(pa + off, &mut buf[done..done + len])?,
                None => buf[done..done + len].fill(0),
            }
            done += len;
        }
        Ok(n)
    }

    /// Write at `pos`, growing the file if needed. Returns the indexes of newly allocated pages
    /// (to map into existing mappings).
    pub fn write_at(&mut self, mm: &mut Mm, pos: u64, data: &[u8]) -> SysResult<Vec<u64>> {
        if self.seals & (F_SEAL_WRITE | F_SEAL_FUTURE_WRITE) != 0 {
            return Err(Errno::EPERM);
        }
        let end = pos.checked_add(data.len() as u64).ok_or(Errno::EFBIG)?;
        if end > self.size {
            if self.frozen || self.seals & F_SEAL_GROW != 0 {
                return Err(Errno::EPERM);
            }
            self.truncate(mm, end)?;
        }
        // Every page the write touches gets a frame: allocate the holes in runs first.
        let mut new = Vec::new();
        if !data.is_empty() {
            for (i, n) in self
                .pages
                .fill(mm, pos / PAGE_SIZE, end.div_ceil(PAGE_SIZE))?
            {
                new.extend(i..i + n);
            }
        }
        // Then copy, one physically contiguous run at a time.
        let mut done = 0u64;
        for (idx, pfn, n) in self.pages.runs_in(pos / PAGE_SIZE, end.div_ceil(PAGE_SIZE)) {
            let run = idx * PAGE_SIZE;
            let (a, b) = (run.max(pos), ((idx + n) * PAGE_SIZE).min(end));
            if a < b {
                let bytes = &data[(a - pos) as usize..(b - pos) as usize];
                mm.ram.write_bulk(pfn * PAGE_SIZE + (a - run), bytes)?;
                done += b - a;
            }
        }
        if done != data.len() as u64 {
            return Err(Errno::EIO);
        }
        Ok(new)
    }

    /// `F_ADD_SEALS`: EINVAL for an unknown bit, EPERM once `F_SEAL_SEAL` is set, EBUSY for
    /// `F_SEAL_WRITE` while writable shared mappings exist.
    pub fn add_seals(&mut self, seals: u32) -> SysResult<()> {
        if seals & !ALL_SEALS != 0 {
            return Err(Errno::EINVAL);
        }
        if self.seals & F_SEAL_SEAL != 0 {
            return Err(Errno::EPERM);
        }
        if seals & F_SEAL_WRITE != 0 && self.writable_maps > 0 {
            return Err(Errno::EBUSY);
        }
        self.seals |= seals;
        Ok(())
    }

    /// fallocate: allocate (possibly growing) or punch a hole. Returns (newly allocated page
    /// indexes, punched index range).
    pub fn fallocate(
        &mut self,
        mm: &mut Mm,
        mode: i32,
        off: u64,
        len: u64,
    ) -> SysResult<FallocateResult> {
        let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let punch = mode & libc::FALLOC_FL_PUNCH_HOLE != 0;
        if mode & !(libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE) != 0 {
            return Err(Errno::EOPNOTSUPP);
        }
        // From here on `off + len` and every page index times the page size fit in a u64.
        let end = super::fallocate_range(off, len)?;
        if punch {
            if !keep {
                return Err(Errno::EOPNOTSUPP);
            }
            if self.frozen || self.seals & (F_SEAL_WRITE | F_SEAL_FUTURE_WRITE) != 0 {
                return Err(Errno::EPERM);
            }
            // Whole pages go; partial pages at the edges are zeroed.
            let first = off.div_ceil(PAGE_SIZE);
            let last = (end / PAGE_SIZE).min(self.pages.nr_slots());
            for (a, b) in [
                (off, (first * PAGE_SIZE).min(end)),
                ((last * PAGE_SIZE).max(off), end.min(self.size)),
            ] {
                if a < b {
                    if let Some(pa) = self.pages.pa(a / PAGE_SIZE) {
                        mm.ram.fill(pa + a % PAGE_SIZE, b - a, 0)?;
                    }
                }
            }
            let folios = self.pages.take_range(first, last);
            return Ok((
                vec![],
                (first < last).then_some(Dropped {
                    range: (first, last),
                    folios,
                }),
            ));
        }
        if !keep && end > self.size {
            if self.frozen || self.seals & F_SEAL_GROW != 0 {
                return Err(Errno::EPERM);
            }
            self.truncate(mm, end)?;
        }
        let mut new = Vec::new();
        for idx in off / PAGE_SIZE..npages(end).min(self.pages.nr_slots()) {
            if self.pages.get(idx).is_none() {
                self.pages.fault_in(mm, idx)?;
                new.push(idx);
            }
        }
        Ok((new, None))
    }
}
