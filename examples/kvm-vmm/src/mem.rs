//! Memory the VMM maps: anonymous low memory and the guest_memfd's mapping. Guest memory is
//! shared with the guest (and, under `handover run`, with the host), so it is touched through
//! raw pointers with volatile access only, never through a Rust reference.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// One `mmap`, unmapped on drop.
pub struct Mapping {
    addr: *mut u8,
    len: usize,
}

impl Mapping {
    fn map(len: usize, flags: libc::c_int, fd: libc::c_int) -> io::Result<Mapping> {
        // SAFETY: a new mapping at an address the kernel picks; nothing existing is replaced.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping {
            addr: p.cast(),
            len,
        })
    }

    /// `len` bytes of anonymous private memory (zeroed). Under `handover run`, binding it to a
    /// memslot moves it into a host memfd mapped at the same address.
    pub fn anonymous(len: usize) -> io::Result<Mapping> {
        Mapping::map(len, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1)
    }

    /// `MAP_SHARED` of the first `len` bytes of `fd`.
    pub fn shared(fd: BorrowedFd<'_>, len: usize) -> io::Result<Mapping> {
        Mapping::map(len, libc::MAP_SHARED, fd.as_raw_fd())
    }

    /// The address, as memslots take it.
    pub fn addr(&self) -> u64 {
        self.addr as u64
    }

    pub fn len(&self) -> usize {
        self.len
    }

    fn check(&self, off: usize, n: usize) {
        assert!(
            off.checked_add(n).is_some_and(|e| e <= self.len),
            "access {off:#x}+{n} outside a {:#x}-byte mapping",
            self.len
        );
    }

    pub fn read_u8(&self, off: usize) -> u8 {
        self.check(off, 1);
        // SAFETY: in bounds (checked); volatile, as the memory is shared with the guest.
        unsafe { self.addr.add(off).read_volatile() }
    }

    pub fn read_u64(&self, off: usize) -> u64 {
        self.check(off, 8);
        let mut b = [0u8; 8];
        for (i, v) in b.iter_mut().enumerate() {
            *v = self.read_u8(off + i);
        }
        u64::from_le_bytes(b)
    }

    pub fn write(&self, off: usize, data: &[u8]) {
        self.check(off, data.len());
        for (i, &v) in data.iter().enumerate() {
            // SAFETY: in bounds (checked); volatile, as the memory is shared with the guest.
            unsafe { self.addr.add(off + i).write_volatile(v) };
        }
    }

    /// The offset of the first non-zero byte in `off..self.len`, if any.
    pub fn first_nonzero(&self, off: usize) -> Option<usize> {
        (off..self.len).find(|&i| self.read_u8(i) != 0)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: this mapping is ours and no reference into it exists.
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}
