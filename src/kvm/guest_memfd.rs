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
    /// The page indexes whose present pages the kernel mapping has mapped (a set page is
    /// "mapped"; see `Host::kernel_map_range`): filled per memslot as memslots are bound, not
    /// all at once, so binding one chunk costs what that chunk holds.
    pub kernel_mapped: PageAttrs,
    /// Which pages are private (in-place conversion): the guest reaches them, the host's
    /// mappings do not (SIGBUS). Only a private-memory VM's files have any.
    pub attrs: PageAttrs,
    /// Folio order (0: 4 KiB pages; 9 or 18 with `GUEST_MEMFD_FLAG_HUGETLB`).
    pub page_order: u32,
    /// The pages of huge folios split to 4 KiB (HugeTLB files): a folio is split when any of
    /// its pages becomes shared, and merged again when all of them are private.
    pub split: PageAttrs,
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

    /// After a conversion of pages `a..b` of a HugeTLB file: split every huge folio there
    /// that now has a shared page, merge every one that is all private again.
    pub fn resplit(&mut self, a: u64, b: u64) {
        if self.page_order == 0 || a >= b {
            return;
        }
        let step = 1u64 << self.page_order;
        let mut f = a / step * step;
        while f < b {
            let whole = self.attrs.all_private_in(f, f + step);
            self.split.set(f, f + step, !whole);
            f += step;
        }
    }

    /// The present pages as runs `(index, pfn, pages, order)`: see [`folio_runs`].
    pub fn folio_runs(&self) -> Vec<(u64, u64, u64, u32)> {
        folio_runs(self.pages.runs(), self.page_order, &self.split)
    }
}

/// Runs of present pages `(index, pfn, pages)` cut by folio: whole, aligned folios of `order`
/// that are not `split` at that order, everything else at order 0; neighbours of the same
/// order merged.
pub fn folio_runs(
    runs: impl Iterator<Item = (u64, u64, u64)>,
    order: u32,
    split: &PageAttrs,
) -> Vec<(u64, u64, u64, u32)> {
    let mut out: Vec<(u64, u64, u64, u32)> = Vec::new();
    let mut push = |r: (u64, u64, u64, u32)| match out.last_mut() {
        Some(l) if l.3 == r.3 && l.0 + l.2 == r.0 && l.1 + l.2 == r.1 => l.2 += r.2,
        _ => out.push(r),
    };
    let step = 1u64 << order;
    for (idx, pfn, n) in runs {
        let mut k = 0;
        while k < n {
            let (i, p) = (idx + k, pfn + k);
            let whole = order > 0
                && i % step == 0
                && p % step == 0
                && n - k >= step
                && !split.any_private(i, i + step);
            if whole {
                push((i, p, step, order));
                k += step;
            } else {
                // Up to the next folio boundary (or the run's end) at order 0.
                let next = if order == 0 {
                    n
                } else {
                    ((i / step + 1) * step - idx).min(n)
                };
                push((i, p, next - k, 0));
                k = next;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_cut_into_whole_folios_and_split_pages() {
        let none = PageAttrs::all_shared();
        let one = |r: (u64, u64, u64)| std::iter::once(r);
        assert_eq!(
            folio_runs(one((0, 512, 1024)), 9, &none),
            vec![(0, 512, 1024, 9)]
        );
        assert_eq!(
            folio_runs(one((0, 512, 600)), 9, &none),
            vec![(0, 512, 512, 9), (512, 1024, 88, 0)]
        );
        // Frames not aligned to the folio: no whole folio.
        assert_eq!(folio_runs(one((0, 1, 512)), 9, &none), vec![(0, 1, 512, 0)]);
        assert_eq!(folio_runs(one((5, 5, 10)), 0, &none), vec![(5, 5, 10, 0)]);
        // The second folio split: its pages at order 0.
        let mut split = PageAttrs::all_shared();
        split.set(512, 1024, true);
        assert_eq!(
            folio_runs(one((0, 1024, 1536)), 9, &split),
            vec![(0, 1024, 512, 9), (512, 1536, 512, 0), (1024, 2048, 512, 9)]
        );
    }
}
