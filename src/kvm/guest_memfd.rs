//! guest_memfd as the 6.18 kernel has it (shared, PAGE_SIZE folios), plus the RFC's freeze:
//! while frozen, every fallocate fails with EPERM and any fault that would allocate fails;
//! folios already present stay readable and writable.

use std::sync::Arc;

use crate::abi::kvm::GUEST_MEMFD_FLAG_INIT_SHARED;
use crate::fs::FileId;
use crate::mm::PageCache;
use crate::uapi::MapId;

use super::vm::VmInner;

/// Largest guest_memfd (the page cache is dense: 8 bytes per page).
pub const MAX_SIZE: u64 = 1 << 40;

pub struct GuestMemfd {
    /// The VM it was created on (a reference, as guest_memfd holds `struct kvm`).
    pub vm: Arc<VmInner>,
    /// The VM's file, if still open (upstream's weak `kvm->vm_file`).
    pub vm_file: FileId,
    pub size: u64,
    pub flags: u64,
    pub pages: PageCache,
    pub frozen: bool,
    /// Our mapping of the whole file, which memslots point at.
    pub kernel_map: Option<MapId>,
}

impl GuestMemfd {
    pub fn init_shared(&self) -> bool {
        self.flags & GUEST_MEMFD_FLAG_INIT_SHARED != 0
    }
}
