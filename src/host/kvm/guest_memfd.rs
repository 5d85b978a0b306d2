//! guest_memfd files on the host.

use crate::abi::errno::{Errno, SysResult};
use crate::abi::kvm::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};
use crate::fs::FileId;
use crate::host::files::FileKind;
use crate::host::Host;
use crate::kvm::guest_memfd::*;
use crate::mm::{PageCache, VaWindow, PAGE_SIZE};
use crate::uapi::{MapId, Mapping, KERNEL_PID};
use std::sync::Arc;

impl Host {
    /// The `GUEST_MEMFD_FLAG_*` bits `KVM_CREATE_GUEST_MEMFD` accepts here: MMAP and INIT_SHARED.
    pub fn gmem_supported_flags(&self) -> u64 {
        GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED
    }

    /// `KVM_CREATE_GUEST_MEMFD` on `vm`.
    pub fn gmem_create(&mut self, vm: FileId, size: u64, flags: u64) -> SysResult<FileId> {
        let inner = self.vm_inner(vm)?;
        if flags & !self.gmem_supported_flags() != 0 {
            return Err(Errno::EINVAL);
        }
        if size == 0 || size % PAGE_SIZE != 0 || size > MAX_SIZE {
            return Err(Errno::EINVAL);
        }
        Ok(self.files.install(FileKind::GuestMemfd(GuestMemfd {
            vm: inner,
            vm_file: vm,
            size,
            flags,
            pages: PageCache::with_pages(size / PAGE_SIZE),
            frozen: false,
            kernel_map: None,
        })))
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
        self.gmem(file)?.kernel_map = Some(id);
        self.map_present(id);
        Ok(id)
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
            if off % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 || len == 0 {
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
            // Unmap, then free (as truncate_pagecache_range): once the pages are out of every
            // window, no guest or user access can reach a frame that is back on the free list.
            // The host lock is held throughout, so the fault service cannot map them again.
            self.unmap_file_pages(file, a, b);
            let Host { mm, files, .. } = self;
            let Some(FileKind::GuestMemfd(g)) = files.kind_mut(file) else {
                return Err(Errno::EINVAL);
            };
            let mut gone = g.pages.take_range(a, b);
            mm.free_many(&mut gone)?;
            return Ok(());
        }
        let new = {
            let Host { mm, files, .. } = self;
            let Some(FileKind::GuestMemfd(g)) = files.kind_mut(file) else {
                return Err(Errno::EINVAL);
            };
            // Whole runs at a time: a guest_memfd allocated in one go is a few extents.
            g.pages.fill(mm, off / PAGE_SIZE, end / PAGE_SIZE)?
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
            if index >= g.size / PAGE_SIZE || (host_access && !g.init_shared()) {
                return Err(Errno::EFAULT);
            }
            if let Some(p) = g.pages.get(index) {
                return Ok(p * PAGE_SIZE);
            }
            if g.frozen {
                return Err(Errno::EPERM);
            }
            g.pages.fault_in(mm, index).map_err(|_| Errno::ENOMEM)?
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
        if let Err(e) = g.pages.release(&mut self.mm) {
            tracing::warn!("guest_memfd release: {e}");
        }
    }
}
