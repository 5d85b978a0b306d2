//! Physical RAM of the host image: one memfd, mapped once as the direct map.
//!
//! A physical address (`pa`) is a byte offset into the memfd; a PFN is `pa >> PAGE_SHIFT`. The memfd
//! is the only thing that survives a kexec (`execve`), exactly like DRAM across a real kexec.
//!
//! RAM is memory that others change behind the compiler's back: guests write it through KVM,
//! user windows map the same frames, and `fallocate(PUNCH_HOLE)` zeroes it (rustix issues that
//! syscall, like `ftruncate` and `pwrite`, as read-only inline asm, so the compiler believes
//! nothing changed). So the direct map is a rust-vmm `vm-memory` [`MmapRegion`] and every access
//! is volatile: single bytes and aligned 64-bit words through its volatile references and arrays
//! (`VolatileRef`, `VolatileArrayRef`, element by element with `read_volatile`/`write_volatile`),
//! read-modify-write through atomics. `VolatileSlice::copy_to`/`copy_from` are not used for
//! RAM: for more than 8 bytes vm-memory 0.18 copies them with a plain `memcpy`. No Rust
//! reference into RAM is ever formed, and no load or store to it can be cached, merged or
//! dropped.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rustix::fs::{fallocate, fstat, ftruncate, FallocateFlags};
use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, VolatileMemory, VolatileSlice};

use super::{MmError, PAGE_SIZE};

/// Read access to physical memory. Implemented by live [`Ram`] and by handover dump files, so the
/// same decoders serve boot, `handover inspect` and the fuzzers.
pub trait PhysRead {
    /// Bytes of physical address space this source covers.
    fn phys_size(&self) -> u64;
    /// Copy `buf.len()` bytes starting at `pa`. Fails if any byte lies outside the source.
    fn read_phys(&self, pa: u64, buf: &mut [u8]) -> Result<(), MmError>;

    /// The native-endian u64 at `pa` (any alignment).
    fn read_u64(&self, pa: u64) -> Result<u64, MmError> {
        let mut b = [0u8; 8];
        self.read_phys(pa, &mut b)?;
        Ok(u64::from_ne_bytes(b))
    }
}

/// The host image's RAM.
pub struct Ram {
    /// The memfd (also held by the region's `FileOffset`).
    file: Arc<File>,
    /// The whole memfd, MAP_SHARED.
    region: MmapRegion<()>,
    size: u64,
}

impl Ram {
    /// Cold boot: a new sparse memfd of `size` bytes (rounded up to a page).
    pub fn create(size: u64) -> Result<Self, MmError> {
        let size = page_round_up(size).ok_or(MmError::BadRamSize(size))?;
        if size == 0 {
            return Err(MmError::BadRamSize(size));
        }
        let fd = rustix::fs::memfd_create("handover-ram", rustix::fs::MemfdFlags::CLOEXEC)
            .map_err(MmError::Sys)?;
        ftruncate(&fd, size).map_err(MmError::Sys)?;
        Self::map(fd, size)
    }

    /// KHO boot: adopt the RAM memfd inherited from the previous image.
    pub fn adopt(fd: OwnedFd, size: u64) -> Result<Self, MmError> {
        let st = fstat(&fd).map_err(MmError::Sys)?;
        if size == 0 || size % PAGE_SIZE != 0 || st.st_size as u64 != size {
            return Err(MmError::BadRamSize(size));
        }
        Self::map(fd, size)
    }

    fn map(fd: OwnedFd, size: u64) -> Result<Self, MmError> {
        let len = usize::try_from(size).map_err(|_| MmError::BadRamSize(size))?;
        let file = Arc::new(File::from(fd));
        let region = MmapRegion::from_file(FileOffset::from_arc(file.clone(), 0), len)
            .map_err(|e| MmError::Sys(rustix::io::Errno::from_raw_os_error(map_errno(&e))))?;
        Ok(Self { file, region, size })
    }

    /// The RAM memfd: handed to the next image at kexec, mapped by user windows and memslots.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// RAM size in bytes (page-aligned).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// RAM size in frames.
    pub fn nr_frames(&self) -> u64 {
        self.size / PAGE_SIZE
    }

    /// Whether `pa..pa+len` lies inside RAM (without overflow).
    pub fn contains(&self, pa: u64, len: u64) -> bool {
        pa.checked_add(len).is_some_and(|end| end <= self.size)
    }

    /// The bytes `pa..pa+len` of the direct map as a volatile slice, after a bounds check.
    pub fn slice(&self, pa: u64, len: u64) -> Result<VolatileSlice<'_>, MmError> {
        if !self.contains(pa, len) {
            return Err(MmError::OutOfRam { pa, len });
        }
        self.region
            .get_slice(pa as usize, len as usize)
            .map_err(|_| MmError::OutOfRam { pa, len })
    }

    /// The aligned 64-bit word at `pa`, for read-modify-write (KHO tracker bitmaps and node
    /// pointers): other images and tools may read the same word.
    pub fn atomic_u64(&self, pa: u64) -> Result<&AtomicU64, MmError> {
        if pa % 8 != 0 || !self.contains(pa, 8) {
            return Err(MmError::OutOfRam { pa, len: 8 });
        }
        self.region
            .get_atomic_ref::<AtomicU64>(pa as usize)
            .map_err(|_| MmError::OutOfRam { pa, len: 8 })
    }

    /// Copy `data` to `pa` with volatile stores (aligned words in the middle); `OutOfRam` if any
    /// byte lies outside RAM, in which case nothing is written.
    pub fn write_phys(&self, pa: u64, data: &[u8]) -> Result<(), MmError> {
        let s = self.slice(pa, data.len() as u64)?;
        let oob = || MmError::OutOfRam {
            pa,
            len: data.len() as u64,
        };
        let (head, body, tail) = split_aligned(pa, data.len());
        for (i, &b) in data[..head].iter().enumerate() {
            s.get_ref::<u8>(i).map_err(|_| oob())?.store(b);
        }
        let mut words = [0u64; WORDS];
        let mut off = head;
        while off < head + body {
            let n = ((head + body - off) / 8).min(WORDS);
            for (w, c) in words[..n]
                .iter_mut()
                .zip(data[off..off + 8 * n].chunks_exact(8))
            {
                *w = u64::from_ne_bytes(c.try_into().unwrap_or_default());
            }
            s.get_array_ref::<u64>(off, n)
                .map_err(|_| oob())?
                .copy_from(&words[..n]);
            off += 8 * n;
        }
        let at = head + body;
        for (i, &b) in data[at..at + tail].iter().enumerate() {
            s.get_ref::<u8>(at + i).map_err(|_| oob())?.store(b);
        }
        Ok(())
    }

    /// Copy `data` into RAM at `pa` with `pwrite` on the RAM memfd: the kernel copies into
    /// the same page cache the direct map shows, without a page fault (and the zeroing that
    /// comes with it) per new page. For bulk writes (a memfd `write`); falls back to
    /// [`Ram::write_phys`] if the call fails.
    pub fn write_bulk(&self, pa: u64, data: &[u8]) -> Result<(), MmError> {
        if !self.contains(pa, data.len() as u64) {
            return Err(MmError::OutOfRam {
                pa,
                len: data.len() as u64,
            });
        }
        let mut done = 0usize;
        while done < data.len() {
            let rest = &data[done..];
            // libc, not rustix: rustix issues pwrite as read-only asm.
            // SAFETY: `rest` is a valid buffer of `rest.len()` bytes; the fd is RAM's.
            let n = unsafe {
                libc::pwrite(
                    self.file.as_raw_fd(),
                    rest.as_ptr().cast(),
                    rest.len(),
                    (pa + done as u64) as libc::off_t,
                )
            };
            if n <= 0 {
                return self.write_phys(pa + done as u64, rest);
            }
            done += n as usize;
        }
        Ok(())
    }

    /// Store the native-endian u64 `v` at `pa`; atomically (relaxed) when `pa` is 8-aligned.
    pub fn write_u64(&self, pa: u64, v: u64) -> Result<(), MmError> {
        if pa % 8 == 0 {
            self.atomic_u64(pa)?.store(v, Ordering::Relaxed);
            return Ok(());
        }
        self.write_phys(pa, &v.to_ne_bytes())
    }

    /// Set `len` bytes at `pa` to `byte` (this allocates the memfd's pages; [`Ram::discard`]
    /// zeroes without allocating).
    pub fn fill(&self, pa: u64, len: u64, byte: u8) -> Result<(), MmError> {
        self.slice(pa, len)?;
        let chunk = [byte; 8 * WORDS];
        let mut off = 0u64;
        while off < len {
            let n = (len - off).min(chunk.len() as u64);
            self.write_phys(pa + off, &chunk[..n as usize])?;
            off += n;
        }
        Ok(())
    }

    /// CRC-32 of `len` bytes at `pa` (read through a bounce buffer: other mappings may write
    /// RAM concurrently).
    pub fn crc32(&self, pa: u64, len: u64) -> Result<u32, MmError> {
        if !self.contains(pa, len) {
            return Err(MmError::OutOfRam { pa, len });
        }
        crc32_of(self, pa, len)
    }

    /// Zero a page-aligned range and give its backing store back to the machine (the memfd
    /// stays sparse): `fallocate(PUNCH_HOLE)` reads back as zeros. Every later access goes
    /// through a volatile slice, so it sees the zeros whatever the compiler assumes about the
    /// syscall.
    pub fn discard(&self, pa: u64, len: u64) -> Result<(), MmError> {
        if pa % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 || !self.contains(pa, len) {
            return Err(MmError::OutOfRam { pa, len });
        }
        fallocate(
            self.fd(),
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            pa,
            len,
        )
        .map_err(MmError::Sys)
    }
}

/// 64-bit words moved per volatile block copy (a 4 KiB bounce buffer on the stack).
const WORDS: usize = 512;

/// `len` bytes at `pa` as (unaligned head, whole 64-bit words, tail) byte counts.
fn split_aligned(pa: u64, len: usize) -> (usize, usize, usize) {
    let head = ((8 - (pa % 8) as usize) % 8).min(len);
    let body = (len - head) / 8 * 8;
    (head, body, len - head - body)
}

/// `n` rounded up to a whole number of pages, or `None` if that overflows.
pub fn page_round_up(n: u64) -> Option<u64> {
    n.checked_add(PAGE_SIZE - 1).map(|x| x & !(PAGE_SIZE - 1))
}

fn map_errno(e: &vm_memory::mmap::MmapRegionError) -> i32 {
    match e {
        vm_memory::mmap::MmapRegionError::Mmap(io) => io.raw_os_error().unwrap_or(libc::EINVAL),
        _ => libc::EINVAL,
    }
}

/// CRC-32 of `len` bytes at `pa` of any physical memory source.
pub fn crc32_of(mem: &dyn PhysRead, pa: u64, len: u64) -> Result<u32, MmError> {
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; (len.min(1 << 16)) as usize];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        mem.read_phys(pa + done, &mut buf[..n])?;
        h.update(&buf[..n]);
        done += n as u64;
    }
    Ok(h.finalize())
}

impl PhysRead for Ram {
    fn phys_size(&self) -> u64 {
        self.size
    }

    fn read_phys(&self, pa: u64, buf: &mut [u8]) -> Result<(), MmError> {
        let s = self.slice(pa, buf.len() as u64)?;
        let oob = |len: usize| MmError::OutOfRam {
            pa,
            len: len as u64,
        };
        let len = buf.len();
        let (head, body, tail) = split_aligned(pa, len);
        for (i, b) in buf[..head].iter_mut().enumerate() {
            *b = s.get_ref::<u8>(i).map_err(|_| oob(len))?.load();
        }
        let mut words = [0u64; WORDS];
        let mut off = head;
        while off < head + body {
            let n = ((head + body - off) / 8).min(WORDS);
            s.get_array_ref::<u64>(off, n)
                .map_err(|_| oob(len))?
                .copy_to(&mut words[..n]);
            for (c, w) in buf[off..off + 8 * n].chunks_exact_mut(8).zip(&words[..n]) {
                c.copy_from_slice(&w.to_ne_bytes());
            }
            off += 8 * n;
        }
        let at = head + body;
        for (i, b) in buf[at..at + tail].iter_mut().enumerate() {
            *b = s.get_ref::<u8>(at + i).map_err(|_| oob(len))?.load();
        }
        Ok(())
    }

    fn read_u64(&self, pa: u64) -> Result<u64, MmError> {
        if pa % 8 == 0 {
            return Ok(self.atomic_u64(pa)?.load(Ordering::Relaxed));
        }
        let mut b = [0u8; 8];
        self.read_phys(pa, &mut b)?;
        Ok(u64::from_ne_bytes(b))
    }
}

impl std::fmt::Debug for Ram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ram").field("size", &self.size).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The defect this module exists for: a store, a hole punch (a syscall the compiler thinks
    /// writes no memory), a load. Must read zero in release builds too.
    #[test]
    fn read_write_and_bounds() {
        let ram = Ram::create(1 << 20).unwrap();
        ram.write_u64(4096, 0xdead_beef).unwrap();
        assert_eq!(ram.read_u64(4096).unwrap(), 0xdead_beef);
        assert!(ram.read_u64((1 << 20) - 4).is_err());
        assert!(ram.write_u64(u64::MAX - 3, 1).is_err());
        ram.discard(4096, 4096).unwrap();
        assert_eq!(ram.read_u64(4096).unwrap(), 0);
    }

    #[test]
    fn discard_is_seen_by_byte_copies_and_unaligned_words() {
        let ram = Ram::create(1 << 20).unwrap();
        for round in 0..64u8 {
            let pat = [round | 1; 100];
            ram.write_phys(8192 + 3, &pat).unwrap();
            ram.write_u64(8192 + 200 + 1, u64::MAX).unwrap();
            let mut b = [0u8; 100];
            ram.read_phys(8192 + 3, &mut b).unwrap();
            assert_eq!(b, pat);
            ram.discard(8192, 4096).unwrap();
            ram.read_phys(8192 + 3, &mut b).unwrap();
            assert_eq!(b, [0u8; 100], "round {round}");
            assert_eq!(ram.read_u64(8192 + 200 + 1).unwrap(), 0);
        }
    }

    #[test]
    fn fill_crosses_chunks_and_stays_in_bounds() {
        let ram = Ram::create(1 << 20).unwrap();
        ram.fill(4096 + 5, 3 * 4096, 0xab).unwrap();
        let mut b = [0u8; 1];
        ram.read_phys(4096 + 4, &mut b).unwrap();
        assert_eq!(b[0], 0);
        ram.read_phys(4096 + 5 + 3 * 4096 - 1, &mut b).unwrap();
        assert_eq!(b[0], 0xab);
        ram.read_phys(4096 + 5 + 3 * 4096, &mut b).unwrap();
        assert_eq!(b[0], 0);
        assert!(ram.fill((1 << 20) - 4096, 4097, 0).is_err());
    }

    #[test]
    fn sizes_that_overflow_are_refused() {
        assert!(Ram::create(u64::MAX).is_err());
        assert!(Ram::create(0).is_err());
        assert_eq!(page_round_up(u64::MAX - 10), None);
        assert_eq!(page_round_up(1), Some(PAGE_SIZE));
    }

    #[test]
    fn atomics_need_alignment() {
        let ram = Ram::create(1 << 20).unwrap();
        assert!(ram.atomic_u64(12).is_err());
        let w = ram.atomic_u64(16).unwrap();
        w.fetch_or(0b101, Ordering::Relaxed);
        assert_eq!(ram.read_u64(16).unwrap(), 0b101);
    }
}
