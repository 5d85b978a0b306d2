//! Virtual address windows onto RAM frames: how a file's pages appear contiguous to user space
//! and to KVM memslots although its folios are scattered in RAM. A window is reserved
//! PROT_NONE; each present page is mapped `MAP_FIXED|MAP_SHARED` from the RAM memfd at its
//! frame's offset. Physically contiguous runs at consecutive indexes merge into one VMA.
//!
//! A *faultable* window ([`VaWindow::reserve_faultable`], used for the host's own mapping of a
//! guest_memfd that KVM memslots point at) has its holes as anonymous read/write memory
//! registered with a [`Uffd`] in MISSING mode instead of PROT_NONE: a KVM access to a hole then
//! blocks and is reported with its address, where a PROT_NONE hole only makes `KVM_RUN` fail
//! with EFAULT (see docs/kvm-probe.md, section b). Present pages are the same `MAP_FIXED`
//! mappings of the RAM memfd; mapping one over a registered hole drops the registration for
//! that page. Nothing in the host touches a faultable window's holes itself (it would block).

use std::ptr::NonNull;
use std::sync::Arc;

use rustix::mm::{
    madvise, mmap, mmap_anonymous, mprotect, munmap, Advice, MapFlags, MprotectFlags, ProtFlags,
};

use super::uffd::Uffd;
use super::{MmError, Ram, PAGE_SIZE};

/// A reserved range of the host image's address space whose pages are mapped from RAM frames
/// (or left as holes); unmapped as a whole when dropped.
pub struct VaWindow {
    base: NonNull<u8>,
    len: u64,
    /// Faultable window: the descriptor its holes are registered with.
    uffd: Option<Arc<Uffd>>,
}

// SAFETY: the window is a private address range owned by this object; it is only remapped
// through `&self` methods that use MAP_FIXED inside the range, and all data access goes through
// raw pointers.
unsafe impl Send for VaWindow {}
// SAFETY: see `Send`.
unsafe impl Sync for VaWindow {}

impl VaWindow {
    /// A window of `len` bytes (non-zero, page-aligned; `OutOfRam` otherwise), all PROT_NONE
    /// holes.
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
        Ok(Self {
            base,
            len,
            uffd: None,
        })
    }

    /// A faultable window: the whole range starts as one hole registered with `uffd`.
    pub fn reserve_faultable(len: u64, uffd: Arc<Uffd>) -> Result<Self, MmError> {
        let mut w = Self::reserve(len)?;
        w.uffd = Some(uffd);
        // On error `w` is dropped, which unmaps the reservation.
        w.make_holes(0, len)?;
        Ok(w)
    }

    /// Whether holes are registered with a userfaultfd (see the module docs).
    pub fn is_faultable(&self) -> bool {
        self.uffd.is_some()
    }

    /// The descriptor a faultable window's holes are registered with.
    pub fn uffd(&self) -> Option<&Arc<Uffd>> {
        self.uffd.as_ref()
    }

    /// Whether `addr` lies inside the window.
    pub fn contains(&self, addr: u64) -> bool {
        let b = self.base.as_ptr() as u64;
        addr >= b && addr - b < self.len
    }

    /// Start address of the window in this process.
    pub fn base(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    /// Length of the window in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false: a window has a non-zero length.
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

    /// Return `off..off+len` of the window to a hole: PROT_NONE (a later access faults), or in
    /// a faultable window a registered hole (a later access is reported to the uffd).
    ///
    /// In a faultable window the page never becomes inaccessible on the way, so a guest
    /// running concurrently (KVM memslots point here) never sees EFAULT: the range is replaced
    /// by fresh read/write anonymous memory, registered, and then emptied once more with
    /// `MADV_DONTNEED`, which drops whatever a racing access put there before the registration
    /// (such an access raced with the hole punch; like on Linux it may see zeros or be lost).
    /// If the registration fails the range ends PROT_NONE, an ordinary hole.
    pub fn unmap(&self, off: u64, len: u64) -> Result<(), MmError> {
        self.check(off, len)?;
        let Some(uffd) = &self.uffd else {
            return self.protect_none(off, len);
        };
        // SAFETY: the range is inside our reservation (checked); it becomes private anonymous
        // memory that no Rust object refers to.
        let p = unsafe {
            let at = self.base.as_ptr().add(off as usize).cast();
            mmap_anonymous(
                at,
                len as usize,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE | MapFlags::FIXED | MapFlags::NORESERVE,
            )
        }
        .map_err(MmError::Sys)?;
        if let Err(e) = uffd.register_missing(p as u64, len) {
            self.protect_none(off, len)?;
            return Err(MmError::Sys(e));
        }
        // SAFETY: as above; dropping pages of our own anonymous range.
        unsafe { madvise(p, len as usize, Advice::LinuxDontNeed) }.map_err(MmError::Sys)?;
        Ok(())
    }

    /// Take every page out of the window for good: the whole range becomes PROT_NONE, holes
    /// included (no userfaultfd registration is left). Used when the window leaves the host's
    /// mapping table while KVM memslots still point at it: from then on no file page is
    /// reachable through it (a guest access fails with EFAULT, as after `munmap` on Linux), but
    /// the address range stays reserved until the last memslot is gone, so nothing else can be
    /// mapped there.
    pub fn retire(&self) -> Result<(), MmError> {
        self.protect_none(0, self.len)
    }

    /// Replace `off..off+len` with fresh anonymous PROT_NONE memory.
    fn protect_none(&self, off: u64, len: u64) -> Result<(), MmError> {
        // SAFETY: as in `map`, the range is inside our reservation (callers check).
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

    /// Turn `off..off+len`, fresh PROT_NONE anonymous memory, into registered holes: register
    /// first, then allow access, so no access can ever land in unregistered anonymous memory
    /// (it would silently get a private zero page instead of the file's page). If either step
    /// fails the range stays PROT_NONE, i.e. an ordinary hole.
    fn make_holes(&self, off: u64, len: u64) -> Result<(), MmError> {
        let Some(uffd) = &self.uffd else {
            return Ok(());
        };
        let addr = self.base.as_ptr() as u64 + off;
        uffd.register_missing(addr, len).map_err(MmError::Sys)?;
        // SAFETY: the range is inside our reservation and holds no page (it is a registered,
        // empty anonymous range), so no Rust object is affected.
        unsafe {
            mprotect(
                self.base.as_ptr().add(off as usize).cast(),
                len as usize,
                MprotectFlags::READ | MprotectFlags::WRITE,
            )
        }
        .map_err(MmError::Sys)?;
        Ok(())
    }
}

impl Drop for VaWindow {
    fn drop(&mut self) {
        // SAFETY: we own the whole reservation. Windows that KVM memslots use are shared
        // (`Arc`) with the VM's slot table, which drops its reference only after KVM has deleted
        // the slot (`kvm::vm`), so no memslot points here any more; the host never forms Rust
        // references into a window.
        let _ = unsafe { munmap(self.base.as_ptr().cast(), self.len as usize) };
    }
}

impl std::fmt::Debug for VaWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VaWindow({:p}+{:#x}", self.base, self.len)?;
        if self.uffd.is_some() {
            write!(f, ", faultable")?;
        }
        write!(f, ")")
    }
}
