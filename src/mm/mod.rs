//! Memory management of the host image: RAM (the direct map), the buddy frame allocator and the
//! scratch zone used during early boot after a KHO kexec.

pub mod buddy;
pub mod file_blocks;
pub mod fragment;
pub mod hugetlb;
pub mod mapping;
pub mod page_cache;
pub mod ram;
pub mod ranges;
pub mod uffd;

pub use buddy::{FrameAllocator, FrameStats, Zone};
pub use hugetlb::{HugePageRequest, HugePool, HugePoolStats};
pub use mapping::VaWindow;
pub use page_cache::PageCache;
pub use ram::{page_round_up, PhysRead, Ram};
pub use ranges::Ranges;

/// log2 of [`PAGE_SIZE`].
pub const PAGE_SHIFT: u32 = 12;
/// Size of one frame (and of a page-cache page) in bytes: 4 KiB.
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
/// Largest buddy order: 2^10 pages = 4 MiB blocks.
pub const MAX_ORDER: u32 = 10;

/// Physical address (byte offset in the RAM memfd) of frame `pfn`.
pub fn pfn_to_pa(pfn: u64) -> u64 {
    pfn << PAGE_SHIFT
}

/// Frame number containing physical address `pa`.
pub fn pa_to_pfn(pa: u64) -> u64 {
    pa >> PAGE_SHIFT
}

/// A folio: 2^order physically contiguous, naturally aligned frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Folio {
    /// First frame; a multiple of `2^order`.
    pub pfn: u64,
    /// log2 of the number of frames (0..=[`MAX_ORDER`] when allocated here).
    pub order: u32,
}

impl Folio {
    /// Physical address of the first frame.
    pub fn pa(&self) -> u64 {
        pfn_to_pa(self.pfn)
    }
    /// Number of frames: `2^order`.
    pub fn nr_pages(&self) -> u64 {
        1 << self.order
    }
    /// Size in bytes: `PAGE_SIZE << order`.
    pub fn size(&self) -> u64 {
        PAGE_SIZE << self.order
    }
}

/// Errors of RAM and the frame allocator. User-visible as ENOMEM (`NoMemory`), the syscall's
/// errno (`Sys`) or EINVAL (the rest).
#[derive(Debug, thiserror::Error)]
pub enum MmError {
    /// The RAM size (bytes) is zero, not page-aligned, or not the memfd's size.
    #[error("RAM size {0} is not usable (must be non-zero, page-aligned and match the memfd)")]
    BadRamSize(u64),
    /// A physical access reaches past the end of RAM.
    #[error("physical range {pa:#x}+{len:#x} lies outside RAM")]
    OutOfRam {
        /// Start of the access (physical address).
        pa: u64,
        /// Its length in bytes.
        len: u64,
    },
    /// No free block of the order in the zone.
    #[error("out of memory: no free block of order {order} in the {zone:?} zone")]
    NoMemory {
        /// The order asked for.
        order: u32,
        /// The zone asked.
        zone: Zone,
    },
    /// An order above [`MAX_ORDER`] (or a zero-page request).
    #[error("order {0} exceeds MAX_ORDER {MAX_ORDER}")]
    BadOrder(u32),
    /// A freed block is misaligned, outside RAM, straddles the scratch boundary, or lies in
    /// the normal zone before it is online.
    #[error("frame block pfn {pfn:#x} order {order} is misaligned or outside its zone")]
    BadBlock {
        /// First frame of the block.
        pfn: u64,
        /// Its order.
        order: u32,
    },
    /// A freed block overlaps a block that is already free.
    #[error("frame block pfn {pfn:#x} order {order} is already free")]
    DoubleFree {
        /// First frame of the block.
        pfn: u64,
        /// Its order.
        order: u32,
    },
    /// The scratch range handed to the allocator cannot be used.
    #[error("scratch range {start:#x}+{len:#x} is not usable: {why}")]
    BadScratch {
        /// Start of the range (physical address).
        start: u64,
        /// Its length in bytes.
        len: u64,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A frame range cannot be taken as asked (see [`FrameAllocator::take_range`]).
    #[error("frame range {pfn:#x}+{nr:#x} cannot be taken: {why}")]
    BadRange {
        /// First frame of the range.
        pfn: u64,
        /// Number of frames.
        nr: u64,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A frame of a range to take is not free.
    #[error("frame range {pfn:#x}+{nr:#x} is not free: frame {busy:#x} is in use")]
    NotFree {
        /// First frame of the range.
        pfn: u64,
        /// Number of frames.
        nr: u64,
        /// The first frame found in use.
        busy: u64,
    },
    /// The huge-page pool could not take as many folios as asked (`mm::hugetlb`).
    #[error(
        "huge-page pool: only {got} of {wanted} {} pages fit in free RAM (beside 4 MiB kept for the host)",
        hugetlb::size_name(*order)
    )]
    HugePagesShort {
        /// Order of the folios (9: 2 MiB, 18: 1 GiB).
        order: u32,
        /// Folios asked for.
        wanted: u64,
        /// Folios taken.
        got: u64,
    },
    /// A folio given to the huge-page pool is not one it can take (`mm::hugetlb`).
    #[error("huge-page pool: folio pfn {pfn:#x} order {order}: {why}")]
    NotInPool {
        /// First frame of the folio.
        pfn: u64,
        /// Its order.
        order: u32,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A system call on the RAM memfd or a mapping failed.
    #[error("system call failed: {0}")]
    Sys(rustix::io::Errno),
}

impl MmError {
    /// The errno user space sees for this error.
    pub fn errno(&self) -> i32 {
        match self {
            MmError::NoMemory { .. } | MmError::HugePagesShort { .. } => libc::ENOMEM,
            MmError::NotFree { .. } => libc::EBUSY,
            MmError::Sys(e) => e.raw_os_error(),
            _ => libc::EINVAL,
        }
    }
}

impl From<MmError> for crate::abi::errno::Errno {
    fn from(e: MmError) -> Self {
        crate::abi::errno::Errno(e.errno())
    }
}

/// RAM plus its frame allocator: what the rest of the host calls "memory".
///
/// Invariant: every free frame reads as zeros. Freed frames are discarded (hole-punched) before
/// they return to the allocator, and a KHO boot discards every frame it did not keep, so
/// allocation never needs to clear memory and a guest never sees another file's data.
pub struct Mm {
    /// The RAM memfd and its direct map.
    pub ram: Ram,
    frames: FrameAllocator,
    blocks: file_blocks::FileBlocks,
}

impl Mm {
    /// Memory over `ram`, allocating with `frames`.
    pub fn new(ram: Ram, frames: FrameAllocator) -> Self {
        Self {
            ram,
            frames,
            blocks: Default::default(),
        }
    }

    /// The frame allocator, read-only (zones, free checks).
    pub fn frames(&self) -> &FrameAllocator {
        &self.frames
    }

    /// Bring the normal zone online after reserving `reserved`; every other normal frame is
    /// discarded first so it reads as zeros.
    pub fn online_normal(&mut self, reserved: &Ranges) -> Result<(), MmError> {
        let nr = self.frames.nr_frames();
        let scratch = self.frames.scratch();
        let mut free = reserved.gaps(0, scratch.start);
        free.extend(reserved.gaps(scratch.end, nr));
        for &(a, b) in &free {
            self.ram.discard(pfn_to_pa(a), pfn_to_pa(b - a))?;
        }
        self.frames.online_normal(&free);
        Ok(())
    }

    /// A block of 2^order zeroed frames.
    pub fn alloc_zeroed(&mut self, order: u32) -> Result<Folio, MmError> {
        match self.frames.alloc(order) {
            Err(MmError::NoMemory { .. }) if self.reclaim_file_blocks() => self.frames.alloc(order),
            r => r,
        }
    }

    /// A block of 2^order zeroed frames from `zone` specifically.
    pub fn alloc_in(&mut self, zone: Zone, order: u32) -> Result<Folio, MmError> {
        match self.frames.alloc_in(zone, order) {
            Err(MmError::NoMemory { .. }) if self.reclaim_file_blocks() => {
                self.frames.alloc_in(zone, order)
            }
            r => r,
        }
    }

    /// Give every file block's unused frames back to the buddy (they are zero already); true
    /// if there were any. Called when an allocation finds no memory.
    pub fn reclaim_file_blocks(&mut self) -> bool {
        if self.blocks.is_empty() {
            return false;
        }
        for (pfn, n) in self.blocks.drain_unused() {
            for (p, order) in split_blocks(pfn, n, MAX_ORDER) {
                if let Err(e) = self.frames.free(Folio { pfn: p, order }) {
                    tracing::warn!("file blocks: frames {p:#x} order {order} not freed: {e}");
                }
            }
        }
        true
    }

    /// A zeroed frame for page `index` of the file `owner` (a guest_memfd), from the file's
    /// block for that range of offsets (see [`file_blocks`]): reserved on the first fault in
    /// the range when the buddy has a block of [`file_blocks::BLOCK_ORDER`], else a single
    /// frame. Its frame number.
    pub fn alloc_file_page(&mut self, owner: u64, index: u64) -> Result<u64, MmError> {
        if let Some(pfn) = self.blocks.take(owner, index) {
            return Ok(pfn);
        }
        if !self.blocks.has_block(owner, index) {
            if let Ok(f) = self.frames.alloc(file_blocks::BLOCK_ORDER) {
                let pfn = f.pfn + index % file_blocks::BLOCK_PAGES;
                if self.blocks.insert(owner, index, f.pfn) {
                    return Ok(pfn);
                }
                // Cannot happen (the block is fresh from the buddy): give it back.
                self.frames.free(f)?;
            }
        }
        Ok(self.alloc_zeroed(0)?.pfn)
    }

    /// True if file `owner` has a block reserved for page `index`'s range of offsets.
    pub fn has_file_block(&self, owner: u64, index: u64) -> bool {
        self.blocks.has_block(owner, index)
    }

    /// Frames reserved in file blocks and not handed out (counted as free in [`Mm::stats`]).
    pub fn file_blocks_reserved(&self) -> u64 {
        self.blocks.reserved()
    }

    /// Give frames `pfn..pfn+nr` (already discarded) back: those of file blocks to their
    /// block (a block all of whose frames are back goes to the buddy whole), the rest to the
    /// buddy in naturally aligned blocks.
    fn release_frames(&mut self, pfn: u64, nr: u64) -> Result<(), MmError> {
        if !self.blocks.any_in(pfn, nr) {
            for (p, order) in split_blocks(pfn, nr, MAX_ORDER) {
                self.frames.free(Folio { pfn: p, order })?;
            }
            return Ok(());
        }
        let end = pfn.saturating_add(nr);
        let mut p = pfn;
        while p < end {
            let block_end = ((p >> file_blocks::BLOCK_ORDER) + 1) << file_blocks::BLOCK_ORDER;
            let piece_end = block_end.min(end);
            if !self.blocks.any_in(p, 1) {
                for (q, order) in split_blocks(p, piece_end - p, MAX_ORDER) {
                    self.frames.free(Folio { pfn: q, order })?;
                }
            } else {
                for q in p..piece_end {
                    match self.blocks.put(q) {
                        file_blocks::Put::Kept => {}
                        file_blocks::Put::BlockFree(b) => self.frames.free(Folio {
                            pfn: b,
                            order: file_blocks::BLOCK_ORDER,
                        })?,
                        file_blocks::Put::NotInUse => {
                            return Err(MmError::DoubleFree { pfn: q, order: 0 })
                        }
                        file_blocks::Put::NotReserved => {
                            self.frames.free(Folio { pfn: q, order: 0 })?
                        }
                    }
                }
            }
            p = piece_end;
        }
        Ok(())
    }

    /// Take the exact free frame range `pfn..pfn+nr` out of the allocator (any size, see
    /// [`FrameAllocator::take_range`]); its frames read as zeros. Give it back with
    /// [`Mm::free_runs`].
    pub fn take_range(&mut self, pfn: u64, nr: u64) -> Result<(), MmError> {
        match self.frames.take_range(pfn, nr) {
            Err(MmError::NotFree { .. }) if self.blocks.any_in(pfn, nr) => {
                self.reclaim_file_blocks();
                self.frames.take_range(pfn, nr)
            }
            r => r,
        }
    }

    /// Zero and free one block.
    pub fn free(&mut self, folio: Folio) -> Result<(), MmError> {
        if folio.order > MAX_ORDER {
            return Err(MmError::BadOrder(folio.order));
        }
        self.ram.discard(folio.pa(), folio.size())?;
        if self.blocks.any_in(folio.pfn, folio.nr_pages()) {
            return self.release_frames(folio.pfn, folio.nr_pages());
        }
        self.frames.free(folio)
    }

    /// Zero and free many blocks, discarding physically contiguous runs with one call each.
    pub fn free_many(&mut self, folios: &mut [Folio]) -> Result<(), MmError> {
        folios.sort_unstable_by_key(|f| f.pfn);
        let mut i = 0;
        while i < folios.len() {
            let start = folios[i].pfn;
            let mut end = start + folios[i].nr_pages();
            let mut j = i + 1;
            while j < folios.len() && folios[j].pfn == end {
                end += folios[j].nr_pages();
                j += 1;
            }
            self.ram.discard(pfn_to_pa(start), pfn_to_pa(end - start))?;
            if self.blocks.any_in(start, end - start) {
                for f in &folios[i..j] {
                    self.release_frames(f.pfn, f.nr_pages())?;
                }
            } else {
                for f in &folios[i..j] {
                    self.frames.free(*f)?;
                }
            }
            i = j;
        }
        Ok(())
    }

    /// Zero and free runs of frames `(pfn, pages)` (one discard per run; the buddy gets the
    /// run as naturally aligned blocks).
    pub fn free_runs(&mut self, runs: &[(u64, u64)]) -> Result<(), MmError> {
        for &(pfn, n) in runs {
            self.ram.discard(pfn_to_pa(pfn), pfn_to_pa(n))?;
            self.release_frames(pfn, n)?;
        }
        Ok(())
    }

    /// Allocate up to `max_pages` physically contiguous zeroed frames in one block (the largest
    /// the allocator has, at most MAX_ORDER): `(pfn, pages)`.
    pub fn alloc_run(&mut self, max_pages: u64) -> Result<(u64, u64), MmError> {
        if max_pages == 0 {
            return Err(MmError::BadOrder(0));
        }
        let top = (63 - max_pages.leading_zeros()).min(MAX_ORDER);
        let mut last = None;
        for order in (0..=top).rev() {
            match self.frames.alloc(order) {
                Ok(f) => return Ok((f.pfn, f.nr_pages())),
                Err(e) => last = Some(e),
            }
        }
        if self.reclaim_file_blocks() {
            return self.alloc_run(max_pages);
        }
        Err(last.unwrap_or(MmError::BadOrder(0)))
    }

    /// Frame accounting of the allocator. Frames reserved in file blocks and not handed out
    /// count as free (any allocation gets them back): `file_reserved` says how many.
    pub fn stats(&self) -> FrameStats {
        let mut s = self.frames.stats();
        let r = self.blocks.reserved();
        s.free += r;
        s.used -= r.min(s.used);
        s.file_reserved = r;
        s
    }
}

/// Split `pfn..pfn+nr` into maximal naturally aligned blocks of at most `max_order`.
pub fn split_blocks(mut pfn: u64, nr: u64, max_order: u32) -> impl Iterator<Item = (u64, u32)> {
    let end = pfn.saturating_add(nr);
    std::iter::from_fn(move || {
        if pfn >= end {
            return None;
        }
        let align = if pfn == 0 { 63 } else { pfn.trailing_zeros() };
        let fit = 63 - (end - pfn).leading_zeros();
        let order = align.min(fit).min(max_order);
        let b = (pfn, order);
        pfn += 1 << order;
        Some(b)
    })
}
