//! guest_memfd as the 6.18 kernel has it (shared, PAGE_SIZE folios), plus the RFC's freeze:
//! while frozen, every fallocate fails with EPERM and any fault that would allocate fails;
//! folios already present stay readable and writable.

use std::sync::Arc;

use crate::abi::kvm::GUEST_MEMFD_FLAG_INIT_SHARED;
use crate::fs::FileId;
use crate::mm::PageCache;
use crate::uapi::MapId;

use super::gmem_attrs::PageAttrs;
use super::vm::VmInner;

/// Largest guest_memfd (the page cache is dense: 8 bytes per page).
pub const MAX_SIZE: u64 = 1 << 40;

/// A guest_memfd file's state (upstream `struct kvm_gmem` and its inode): created by
/// `KVM_CREATE_GUEST_MEMFD` on a VM file, its pages served to the guest through memslots.
pub struct GuestMemfd {
    /// The VM it was created on (a reference, as guest_memfd holds `struct kvm`).
    pub vm: Arc<VmInner>,
    /// The VM's file, if still open (upstream's weak `kvm->vm_file`).
    pub vm_file: FileId,
    /// File size in bytes: a multiple of the page size, at most [`MAX_SIZE`].
    pub size: u64,
    /// The `GUEST_MEMFD_FLAG_*` bits it was created with (MMAP, INIT_SHARED).
    pub flags: u64,
    /// The file's pages: page index → frame, allocated on first fault or fallocate.
    pub pages: PageCache,
    /// Set by the LUO handler's preserve (the RFC's freeze): no fallocate, no allocating fault
    /// (EPERM); cleared again by unpreserve or a failed preserve.
    pub frozen: bool,
    /// Our mapping of the whole file, which memslots point at.
    pub kernel_map: Option<MapId>,
    /// Which pages are private (in-place conversion): the guest reaches them, the host's
    /// mappings do not (SIGBUS). Only a private-memory VM's files have any.
    pub attrs: PageAttrs,
    /// Folio order (0: 4 KiB pages; 9 or 18 with `GUEST_MEMFD_FLAG_HUGETLB`).
    pub page_order: u32,
}

impl GuestMemfd {
    /// Created with `GUEST_MEMFD_FLAG_INIT_SHARED`: the host may fault pages in through mmap; LUO
    /// preserves only such files.
    pub fn init_shared(&self) -> bool {
        self.flags & GUEST_MEMFD_FLAG_INIT_SHARED != 0
    }

    /// Whether the host may touch page `index` through a mapping: not when it is private.
    pub fn host_may_access(&self, index: u64) -> bool {
        !self.attrs.is_private(index)
    }
}
