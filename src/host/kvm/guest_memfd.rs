//! guest_memfd files on the host.

use crate::abi::errno::{Errno, SysResult};
use crate::abi::kvm::*;
use crate::fs::FileId;
use crate::host::files::FileKind;
use crate::host::Host;
use crate::kvm::gmem_attrs::PageAttrs;
use crate::kvm::guest_memfd::*;
use crate::kvm::vm::has_private_memory;
use crate::mm::{PageCache, VaWindow, PAGE_SIZE};
use crate::uapi::{MapId, Mapping, KERNEL_PID};
use std::sync::Arc;

impl Host {
    /// The `GUEST_MEMFD_FLAG_*` bits `KVM_CREATE_GUEST_MEMFD` accepts here: MMAP and
    /// INIT_SHARED everywhere (in-place conversion is on), HUGETLB on a VM type with private
    /// memory (such a file starts private) when this image has a huge-page pool.
    pub fn gmem_supported_flags(&self, vm_type: Option<u64>) -> u64 {
        let mut f = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;
        if vm_type.is_none_or(has_private_memory) && self.hugetlb_orders().next().is_some() {
            f |= GUEST_MEMFD_FLAG_HUGETLB;
        }
        f
    }

    /// `KVM_CREATE_GUEST_MEMFD` on `vm` with 4 KiB folios.
    pub fn gmem_create(&mut self, vm: FileId, size: u64, flags: u64) -> SysResult<FileId> {
        self.gmem_create_order(vm, size, flags, 0)
    }

    /// `KVM_CREATE_GUEST_MEMFD` on `vm`: EINVAL for an unsupported flag, a size that is zero,
    /// unaligned (to the folio size) or too big, a `page_order` without HUGETLB or one the pool
    /// has no folios of, and HUGETLB with INIT_SHARED (a huge file starts private). A file of
    /// a private-memory VM without INIT_SHARED starts private.
    pub fn gmem_create_order(
        &mut self,
        vm: FileId,
        size: u64,
        flags: u64,
        page_order: u32,
    ) -> SysResult<FileId> {
        let inner = self.vm_inner(vm)?;
        if flags & !self.gmem_supported_flags(Some(inner.vm_type)) != 0 {
            return Err(Errno::EINVAL);
        }
        let huge = flags & GUEST_MEMFD_FLAG_HUGETLB != 0;
        if huge != (page_order != 0)
            || (huge && flags & GUEST_MEMFD_FLAG_INIT_SHARED != 0)
            || (huge && !self.hugetlb_orders().any(|o| o == page_order))
        {
            return Err(Errno::EINVAL);
        }
        let folio = PAGE_SIZE << page_order;
        if size == 0 || size % folio != 0 || size > MAX_SIZE {
            return Err(Errno::EINVAL);
        }
        let nr = size / PAGE_SIZE;
        let attrs =
            if has_private_memory(inner.vm_type) && flags & GUEST_MEMFD_FLAG_INIT_SHARED == 0 {
                PageAttrs::all_private(nr)
            } else {
                PageAttrs::all_shared()
            };
        Ok(self.files.install(FileKind::GuestMemfd(GuestMemfd {
            vm: inner,
            vm_file: vm,
            size,
            flags,
            pages: PageCache::with_pages(nr),
            frozen: false,
            kernel_map: None,
            kernel_mapped: PageAttrs::all_shared(),
            attrs,
            page_order,
            split: PageAttrs::all_shared(),
        })))
    }

    /// The folio orders this image's huge-page pool has or is to have folios of
    /// (`--hugepages`; after an update the pool fills up only once the update is committed).
    pub fn hugetlb_orders(&self) -> impl Iterator<Item = u32> + '_ {
        let st = self.hugepool().stats();
        crate::mm::hugetlb::HUGE_ORDERS
            .into_iter()
            .filter(move |&o| st.order(o).is_some_and(|s| s.total > 0 || s.requested > 0))
    }

    /// Allocate the huge folios of a HugeTLB file that cover pages `a..b` and are not there
    /// yet, from the pool (ENOMEM when it runs out); the new folios' `(index, pages)`.
    fn gmem_fill_huge(&mut self, file: FileId, a: u64, b: u64) -> SysResult<Vec<(u64, u64)>> {
        let order = self.gmem(file)?.page_order;
        let step = 1u64 << order;
        let mut new = Vec::new();
        let mut f = a / step * step;
        while f < b {
            if self.gmem(file)?.pages.get(f).is_none() {
                let folio = self.hugepool.alloc(order).ok_or(Errno::ENOMEM)?;
                let g = self.gmem(file)?;
                if !g.pages.insert_run(f, folio.pfn, step) {
                    let (pool, mm) = self.hugepool_mm();
                    let _ = pool.free(mm, folio);
                    return Err(Errno::EINVAL);
                }
                new.push((f, step));
            }
            f += step;
        }
        Ok(new)
    }

    /// Give the frames of a HugeTLB file's pages back to the pool, folio by folio (the runs
    /// are whole folios: such files allocate nothing else).
    fn gmem_free_huge(&mut self, order: u32, runs: &[(u64, u64)]) {
        let step = 1u64 << order;
        let (pool, mm) = self.hugepool_mm();
        for &(pfn, n) in runs {
            let mut k = 0;
            while k < n {
                if let Err(e) = pool.free(
                    mm,
                    crate::mm::Folio {
                        pfn: pfn + k,
                        order,
                    },
                ) {
                    tracing::warn!("guest_memfd: huge folio {:#x} not freed: {e}", pfn + k);
                }
                k += step;
            }
        }
    }

    /// `KVM_SET_MEMORY_ATTRIBUTES2` on the guest_memfd `file` (`a` is read, and on EAGAIN its
    /// `error_offset` written). The checks and errnos of the upstream series: EINVAL for
    /// non-zero flags or reserved words, a VM type without private memory, an unknown
    /// attribute, a zero, unaligned, overflowing or out-of-file range; then EPERM while the
    /// file is frozen for preservation. Converting to private takes the pages out of this
    /// image's own mappings of the file first; a page another process maps cannot be taken
    /// from it (EAGAIN, `error_offset` at the first one). Contents stay in place.
    pub fn gmem_set_attributes(
        &mut self,
        file: FileId,
        a: &mut crate::abi::kvm::MemoryAttributes2,
    ) -> SysResult<()> {
        let (vm_type, size, frozen) = {
            let g = self.gmem(file)?;
            (g.vm.vm_type, g.size, g.frozen)
        };
        if a.flags != 0 || a.reserved.iter().any(|&r| r != 0) || !has_private_memory(vm_type) {
            return Err(Errno::EINVAL);
        }
        if a.attributes & !KVM_MEMORY_ATTRIBUTE_PRIVATE != 0 {
            return Err(Errno::EINVAL);
        }
        let end = a.offset.checked_add(a.size).ok_or(Errno::EINVAL)?;
        if a.size == 0 || a.offset % PAGE_SIZE != 0 || a.size % PAGE_SIZE != 0 || end > size {
            return Err(Errno::EINVAL);
        }
        if frozen {
            return Err(Errno::EPERM);
        }
        let (lo, hi) = (a.offset / PAGE_SIZE, end / PAGE_SIZE);
        let private = a.attributes & KVM_MEMORY_ATTRIBUTE_PRIVATE != 0;
        if private {
            if let Some(busy) = self.remote_mapped_page(file, lo, hi) {
                a.error_offset = busy * PAGE_SIZE;
                return Err(Errno::EAGAIN);
            }
            self.unmap_user_pages(file, lo, hi);
        }
        let g = self.gmem(file)?;
        g.attrs.set(lo, hi, private);
        g.resplit(lo, hi);
        if !private {
            // Shared again: present pages reappear in the host's mappings.
            self.map_file_range(file, lo, hi);
        }
        Ok(())
    }

    pub(crate) fn gmem(&mut self, file: FileId) -> SysResult<&mut GuestMemfd> {
        match self.files.kind_mut(file) {
            Some(FileKind::GuestMemfd(g)) => Ok(g),
            _ => Err(Errno::EINVAL),
        }
    }

    /// The mapping of the whole guest_memfd that memslots use (created once, holds a file
    /// reference like a memslot binding does). It is faultable: its holes are served by the
    /// guest fault service (see `kvm::run`).
    pub(crate) fn kernel_map(&mut self, file: FileId) -> SysResult<MapId> {
        let size = {
            let g = self.gmem(file)?;
            if let Some(m) = g.kernel_map {
                return Ok(m);
            }
            g.size
        };
        // Holes are registered with the host's userfaultfd, so a guest access to one reaches
        // the fault service (kvm::run) instead of failing with EFAULT.
        let window = match self.gmem_uffd() {
            Some(uffd) => VaWindow::reserve_faultable(size, uffd).or_else(|e| {
                tracing::warn!("guest_memfd: no faultable mapping ({e}); holes are PROT_NONE");
                VaWindow::reserve(size)
            }),
            None => VaWindow::reserve(size),
        }
        .map_err(Errno::from)?;
        self.fget(file);
        self.next_map += 1;
        let id = self.next_map;
        self.maps.insert(
            id,
            Mapping {
                pid: KERNEL_PID,
                file,
                pgoff: 0,
                writable: true,
                window: Arc::new(window),
            },
        );
        let g = self.gmem(file)?;
        g.kernel_map = Some(id);
        g.kernel_mapped = PageAttrs::all_shared();
        Ok(id)
    }

    /// Map the present pages of page indexes `a..b` of `file` into its kernel mapping `map`,
    /// where not mapped yet (a memslot over that range is about to be bound). Pages allocated
    /// later are mapped into every mapping of the file as they come, this one included.
    pub(crate) fn kernel_map_range(&mut self, file: FileId, map: MapId, a: u64, b: u64) {
        let Ok(g) = self.gmem(file) else { return };
        let gaps = g.kernel_mapped.shared_parts(a, b);
        g.kernel_mapped.set(a, b, true);
        if let Some(m) = self.maps.get(&map) {
            for (lo, hi) in gaps {
                self.map_runs_into(m, lo, hi);
            }
        }
    }

    /// fallocate on a guest_memfd: KEEP_SIZE allocate or PUNCH_HOLE, page aligned, in range.
    pub(crate) fn gmem_fallocate(
        &mut self,
        file: FileId,
        mode: i32,
        off: u64,
        len: u64,
    ) -> SysResult<()> {
        let (punch, end, nr_slots) = {
            let g = self.gmem(file)?;
            if g.frozen {
                return Err(Errno::EPERM);
            }
            let punch = mode & libc::FALLOC_FL_PUNCH_HOLE != 0;
            if mode & libc::FALLOC_FL_KEEP_SIZE == 0
                || mode & !(libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE) != 0
            {
                return Err(Errno::EOPNOTSUPP);
            }
            // A HugeTLB file allocates and punches whole folios only.
            let unit = PAGE_SIZE << g.page_order;
            if off % unit != 0 || len % unit != 0 || len == 0 {
                return Err(Errno::EINVAL);
            }
            let end = off.checked_add(len).ok_or(Errno::EINVAL)?;
            if !punch && end > g.size {
                return Err(Errno::EINVAL);
            }
            (punch, end, g.pages.nr_slots())
        };
        if punch {
            let (a, b) = (off / PAGE_SIZE, (end / PAGE_SIZE).min(nr_slots));
            if a >= b {
                return Ok(());
            }
            // A program under `handover run` that maps the pages keeps them mapped in its own
            // address space, which the host cannot reach: freeing them would hand it frames
            // that go to other files. As for memfds, the punch is EBUSY then.
            if self.remote_mapped_page(file, a, b).is_some() {
                return Err(Errno::EBUSY);
            }
            // Unmap, then free (as truncate_pagecache_range): once the pages are out of every
            // window, no guest or user access can reach a frame that is back on the free list.
            // The host lock is held throughout, so the fault service cannot map them again.
            self.unmap_file_pages(file, a, b);
            let order = self.gmem(file)?.page_order;
            if order > 0 {
                let runs = self.gmem(file)?.pages.take_runs(a, b);
                self.gmem_free_huge(order, &runs);
                return Ok(());
            }
            let Host { mm, files, .. } = self;
            let Some(FileKind::GuestMemfd(g)) = files.kind_mut(file) else {
                return Err(Errno::EINVAL);
            };
            let mut gone = g.pages.take_range(a, b);
            mm.free_many(&mut gone)?;
            return Ok(());
        }
        if self.gmem(file)?.page_order > 0 {
            for (idx, n) in self.gmem_fill_huge(file, off / PAGE_SIZE, end / PAGE_SIZE)? {
                self.map_file_range(file, idx, idx + n);
            }
            return Ok(());
        }
        let new = {
            let Host { mm, files, .. } = self;
            let Some(FileKind::GuestMemfd(g)) = files.kind_mut(file) else {
                return Err(Errno::EINVAL);
            };
            // Whole runs at a time: a guest_memfd allocated in one go is a few extents; pages
            // of a partly allocated 2 MiB range come from the file's block there.
            g.pages
                .fill_file(mm, file, off / PAGE_SIZE, end / PAGE_SIZE)?
        };
        for (idx, n) in new {
            self.map_file_range(file, idx, idx + n);
        }
        Ok(())
    }

    /// A fault on page `index`: its physical address, allocating it unless frozen. `host`
    /// faults (mmap) also need INIT_SHARED; guest faults do not.
    pub(crate) fn gmem_fault(
        &mut self,
        file: FileId,
        index: u64,
        host_access: bool,
    ) -> SysResult<u64> {
        let pfn = {
            let Host { mm, files, .. } = self;
            let g = match files.kind_mut(file) {
                Some(FileKind::GuestMemfd(g)) => g,
                _ => return Err(Errno::EFAULT),
            };
            if index >= g.size / PAGE_SIZE
                || (host_access && (!g.host_may_access(index) || !shared_file(g)))
            {
                return Err(Errno::EFAULT);
            }
            if let Some(p) = g.pages.get(index) {
                return Ok(p * PAGE_SIZE);
            }
            if g.frozen {
                return Err(Errno::EPERM);
            }
            if g.page_order == 0 {
                // From the file's block for the page's 2 MiB range of offsets, so the file's
                // frames stay in long runs whatever order the guest touches them in.
                Some(
                    g.pages
                        .fault_in_file(mm, file, index)
                        .map_err(|_| Errno::ENOMEM)?,
                )
            } else {
                None
            }
        };
        let Some(pfn) = pfn else {
            // A HugeTLB file: the whole folio around the page, from the pool.
            for (idx, n) in self.gmem_fill_huge(file, index, index + 1)? {
                self.map_file_range(file, idx, idx + n);
            }
            return self.gmem(file)?.pages.pa(index).ok_or(Errno::ENOMEM);
        };
        self.map_file_pages(file, &[index]);
        Ok(pfn * PAGE_SIZE)
    }

    /// A guest access to `gpa` of the VM behind `vm` faulted: allocate and map the page, or
    /// say why not (EPERM while frozen).
    pub fn gmem_guest_fault(&mut self, vm: FileId, gpa: u64) -> SysResult<()> {
        let slot = match self.files.kind(vm) {
            Some(FileKind::Vm(v)) => v
                .slots
                .values()
                .find(|s| gpa >= s.gpa && gpa - s.gpa < s.size)
                .copied(),
            _ => None,
        }
        .ok_or(Errno::EFAULT)?;
        let (file, off) = slot.gmem.ok_or(Errno::EFAULT)?;
        self.gmem_fault(file, (gpa - slot.gpa + off) / PAGE_SIZE, false)?;
        Ok(())
    }

    pub(crate) fn gmem_release(&mut self, mut g: GuestMemfd) {
        if g.page_order > 0 {
            let runs = g.pages.take_runs(0, g.pages.nr_slots());
            self.gmem_free_huge(g.page_order, &runs);
            return;
        }
        if let Err(e) = g.pages.release(&mut self.mm) {
            tracing::warn!("guest_memfd release: {e}");
        }
    }
}

/// Whether the host may fault pages of `g` in at all: INIT_SHARED files, and every file of a
/// private-memory VM (whose pages the host reaches while they are shared).
fn shared_file(g: &GuestMemfd) -> bool {
    g.init_shared() || has_private_memory(g.vm.vm_type)
}
