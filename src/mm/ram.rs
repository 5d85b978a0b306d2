//! Physical RAM of the host image: one memfd, mapped once as the direct map.
//!
//! A physical address (`pa`) is a byte offset into the memfd; a PFN is `pa >> PAGE_SHIFT`. The memfd
//! is the only thing that survives a kexec (`execve`), exactly like DRAM across a real kexec.
//! All accesses go through raw-pointer copies: guests and other mappings may write the same
//! frames concurrently, so no Rust reference into RAM is ever handed out.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;

use rustix::fs::{fallocate, fstat, ftruncate, FallocateFlags};
use rustix::mm::{mmap, munmap, MapFlags, ProtFlags};

use super::{MmError, PAGE_SIZE};

/// Read access to physical memory. Implemented by live [`Ram`] and by handover dump files, so the
/// same decoders serve boot, `handover inspect` and the fuzzers.
pub trait PhysRead {
    /// Bytes of physical address space this source covers.
    fn phys_size(&self) -> u64;
    /// Copy `buf.len()` bytes starting at `pa`. Fails if any byte lies outside the source.
    fn read_phys(&self, pa: u64, buf: &mut [u8]) -> Result<(), MmError>;

    fn read_u64(&self, pa: u64) -> Result<u64, MmError> {
        let mut b = [0u8; 8];
        self.read_phys(pa, &mut b)?;
        Ok(u64::from_ne_bytes(b))
    }
}

/// The host image's RAM.
pub struct Ram {
    fd: OwnedFd,
    size: u64,
    base: NonNull<u8>,
}

// SAFETY: `base` points to a MAP_SHARED mapping that lives as long as `Ram`; all accesses are
// bounds-checked raw copies, which are sound from any thread (concurrent writers only race on
// the bytes themselves, as DRAM does).
unsafe impl Send for Ram {}
// SAFETY: see `Send`; `Ram` has no interior state besides the mapping.
unsafe impl Sync for Ram {}

impl Ram {
    /// Cold boot: a new sparse memfd of `size` bytes (rounded up to a page).
    pub fn create(size: u64) -> Result<Self, MmError> {
        if size == 0 {
            return Err(MmError::BadRamSize(size));
        }
        let size = size.div_ceil(PAGE_SIZE) * PAGE_SIZE;
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
        // SAFETY: a fresh MAP_SHARED mapping of the whole memfd at an address the kernel picks;
        // it does not alias any Rust object.
        let p = unsafe {
            mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED | MapFlags::NORESERVE,
                &fd,
                0,
            )
        }
        .map_err(MmError::Sys)?;
        let base = NonNull::new(p.cast::<u8>()).ok_or(MmError::BadRamSize(size))?;
        Ok(Self { fd, size, base })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn nr_frames(&self) -> u64 {
        self.size / PAGE_SIZE
    }

    pub fn contains(&self, pa: u64, len: u64) -> bool {
        pa.checked_add(len).is_some_and(|end| end <= self.size)
    }

    /// Raw pointer to `len` bytes at `pa` in the direct map, after a bounds check.
    pub fn ptr(&self, pa: u64, len: u64) -> Result<*mut u8, MmError> {
        if !self.contains(pa, len) {
            return Err(MmError::OutOfRam { pa, len });
        }
        // SAFETY: pa + len <= size, so the offset stays inside the mapping.
        Ok(unsafe { self.base.as_ptr().add(pa as usize) })
    }

    pub fn write_phys(&self, pa: u64, data: &[u8]) -> Result<(), MmError> {
        let p = self.ptr(pa, data.len() as u64)?;
        // SAFETY: `p` is valid for data.len() bytes (checked by `ptr`); `data` is a Rust slice
        // outside the RAM mapping or, if inside, copy semantics are still byte-wise defined.
        unsafe { std::ptr::copy(data.as_ptr(), p, data.len()) };
        Ok(())
    }

    pub fn write_u64(&self, pa: u64, v: u64) -> Result<(), MmError> {
        self.write_phys(pa, &v.to_ne_bytes())
    }

    pub fn fill(&self, pa: u64, len: u64, byte: u8) -> Result<(), MmError> {
        let p = self.ptr(pa, len)?;
        // SAFETY: `p` is valid for `len` bytes (checked by `ptr`).
        unsafe { std::ptr::write_bytes(p, byte, len as usize) };
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
    /// stays sparse): `fallocate(PUNCH_HOLE)` reads back as zeros.
    pub fn discard(&self, pa: u64, len: u64) -> Result<(), MmError> {
        if pa % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 || !self.contains(pa, len) {
            return Err(MmError::OutOfRam { pa, len });
        }
        fallocate(
            &self.fd,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            pa,
            len,
        )
        .map_err(MmError::Sys)
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
        let p = self.ptr(pa, buf.len() as u64)?;
        // SAFETY: `p` is valid for buf.len() bytes (checked by `ptr`) and `buf` is a distinct
        // Rust buffer.
        unsafe { std::ptr::copy(p, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }
}

impl Drop for Ram {
    fn drop(&mut self) {
        // SAFETY: the mapping was created in `map` with exactly this base and length and no
        // pointer into it outlives `Ram` by the contract of `ptr`'s callers.
        let _ = unsafe { munmap(self.base.as_ptr().cast(), self.size as usize) };
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
}
