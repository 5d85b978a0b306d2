//! Virtual address windows onto RAM frames: how a file's pages appear contiguous to user space
//! and to KVM memslots although its folios are scattered in RAM. A window is reserved
//! PROT_NONE; each present page is mapped `MAP_FIXED|MAP_SHARED` from the RAM memfd at its
//! frame's offset. Physically contiguous runs at consecutive indexes merge into one VMA.

use std::ptr::NonNull;

use rustix::mm::{mmap, mmap_anonymous, munmap, MapFlags, ProtFlags};

use super::{MmError, Ram, PAGE_SIZE};

pub struct VaWindow {
    base: NonNull<u8>,
    len: u64,
}

// SAFETY: the window is a private address range owned by this object; it is only remapped
// through `&self` methods that use MAP_FIXED inside the range, and all data access goes through
// raw pointers.
unsafe impl Send for VaWindow {}
// SAFETY: see `Send`.
unsafe impl Sync for VaWindow {}

impl VaWindow {
    pub fn reserve(len: u64) -> Result<Self, MmError> {
        if len == 0 || len % PAGE_SIZE != 0 {
            return Err(MmError::OutOfRam { pa: 0, len });
        }
        // SAFETY: a new anonymous PROT_NONE reservation at a kernel-chosen address.
        let p = unsafe {
            mmap_anonymous(
                std::ptr::null_mut(),
                len as usize,
                ProtFlags::empty(),
                MapFlags::PRIVATE | MapFlags::NORESERVE,
            )
        }
        .map_err(MmError::Sys)?;
        let base = NonNull::new(p.cast::<u8>()).ok_or(MmError::OutOfRam { pa: 0, len })?;
        Ok(Self { base, len })
    }

    pub fn base(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, off: u64, len: u64) -> Result<(), MmError> {
        if off % PAGE_SIZE != 0
            || len % PAGE_SIZE != 0
            || off.checked_add(len).is_none_or(|e| e > self.len)
        {
            return Err(MmError::OutOfRam { pa: off, len });
        }
        Ok(())
    }

    /// Map `len` bytes of RAM at `pa` into the window at `off`.
    pub fn map(
        &self,
        ram: &Ram,
        off: u64,
        pa: u64,
        len: u64,
        writable: bool,
    ) -> Result<(), MmError> {
        self.check(off, len)?;
        if !ram.contains(pa, len) {
            return Err(MmError::OutOfRam { pa, len });
        }
        let prot = if writable {
            ProtFlags::READ | ProtFlags::WRITE
        } else {
            ProtFlags::READ
        };
        // SAFETY: the target lies inside our reservation (checked), so MAP_FIXED replaces only
        // pages this window owns.
        unsafe {
            mmap(
                self.base.as_ptr().add(off as usize).cast(),
                len as usize,
                prot,
                MapFlags::SHARED | MapFlags::FIXED,
                ram.fd(),
                pa,
            )
        }
        .map_err(MmError::Sys)?;
        Ok(())
    }

    /// Return `off..off+len` of the window to PROT_NONE (a later access faults).
    pub fn unmap(&self, off: u64, len: u64) -> Result<(), MmError> {
        self.check(off, len)?;
        // SAFETY: as in `map`, the range is inside our reservation.
        unsafe {
            mmap_anonymous(
                self.base.as_ptr().add(off as usize).cast(),
                len as usize,
                ProtFlags::empty(),
                MapFlags::PRIVATE | MapFlags::FIXED | MapFlags::NORESERVE,
            )
        }
        .map_err(MmError::Sys)?;
        Ok(())
    }
}

impl Drop for VaWindow {
    fn drop(&mut self) {
        // SAFETY: we own the whole reservation and nothing refers to it after drop.
        let _ = unsafe { munmap(self.base.as_ptr().cast(), self.len as usize) };
    }
}

impl std::fmt::Debug for VaWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VaWindow({:p}+{:#x})", self.base, self.len)
    }
}
