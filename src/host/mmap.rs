//! mmap of files into a process, on the host (see [`crate::uapi::mmap`]).

use crate::fs::FileId;
use crate::host::files::FileKind;
use crate::host::Host;
use crate::mm::{VaWindow, PAGE_SIZE};
use crate::uapi::mmap::*;
use crate::uapi::{Errno, Pid, SysResult, KERNEL_PID};
use std::sync::Arc;

impl Host {
    /// `mmap(fd, len, prot, flags, off)`, `MAP_SHARED` of a memfd or guest_memfd only. EINVAL
    /// for `len` 0, an unaligned `off` or a private mapping; ENODEV for other files or a
    /// guest_memfd without `GUEST_MEMFD_FLAG_MMAP`; EPERM for a writable map of a write-sealed
    /// memfd. The file's present pages are mapped at once; the mapping holds a file reference.
    pub fn mmap(
        &mut self,
        pid: Pid,
        fd: i32,
        len: u64,
        prot: i32,
        flags: i32,
        off: u64,
    ) -> SysResult<UserMapping> {
        let file = self.fd_file(pid, fd)?;
        if len == 0 || off % PAGE_SIZE != 0 {
            return Err(Errno::EINVAL);
        }
        let writable = prot & libc::PROT_WRITE != 0;
        match self.files.kind_mut(file) {
            Some(FileKind::GuestMemfd(g)) => {
                if g.flags & crate::abi::kvm::GUEST_MEMFD_FLAG_MMAP == 0 {
                    return Err(Errno::ENODEV);
                }
                if flags & libc::MAP_SHARED == 0 {
                    return Err(Errno::EINVAL);
                }
            }
            Some(FileKind::Memfd(m)) => {
                if flags & libc::MAP_SHARED == 0 {
                    return Err(Errno::EINVAL);
                }
                if writable
                    && m.seals
                        & (crate::fs::memfd::F_SEAL_WRITE | crate::fs::memfd::F_SEAL_FUTURE_WRITE)
                        != 0
                {
                    return Err(Errno::EPERM);
                }
            }
            Some(_) => return Err(Errno::ENODEV),
            None => return Err(Errno::EBADF),
        }
        // Linux: a length that cannot be rounded up to pages is ENOMEM.
        let len = crate::mm::page_round_up(len).ok_or(Errno::ENOMEM)?;
        let id = self.map_file(pid, file, off / PAGE_SIZE, len, writable)?;
        let addr = self.maps.get(&id).map_or(0, |m| m.window.base() as usize);
        Ok(UserMapping { id, addr, len })
    }

    /// Map `len` bytes (whole pages) of `file` from page `pgoff` into a new window of `pid`,
    /// its present pages at once; the mapping holds a file reference and counts as a writer
    /// if `writable`.
    pub(crate) fn map_file(
        &mut self,
        pid: Pid,
        file: FileId,
        pgoff: u64,
        len: u64,
        writable: bool,
    ) -> SysResult<MapId> {
        let window = Arc::new(VaWindow::reserve(len).map_err(Errno::from)?);
        // Counted only once the mapping exists, so a failed mmap leaves no writer behind.
        if writable {
            if let Some(FileKind::Memfd(m)) = self.files.kind_mut(file) {
                m.writable_maps += 1;
            }
        }
        self.fget(file);
        self.next_map += 1;
        let id = self.next_map;
        self.maps.insert(
            id,
            Mapping {
                pid,
                file,
                pgoff,
                writable,
                window,
            },
        );
        if let Some(p) = self.procs.get_mut(&pid) {
            p.maps.push(id);
        }
        self.map_present(id);
        Ok(id)
    }

    /// `munmap` of a whole mapping of `pid` (EINVAL if `pid` has no such mapping); drops the
    /// mapping's file reference.
    pub fn munmap(&mut self, pid: Pid, m: UserMapping) -> SysResult<()> {
        let p = self.procs.get_mut(&pid).ok_or(Errno::EINVAL)?;
        let i = p
            .maps
            .iter()
            .position(|&x| x == m.id)
            .ok_or(Errno::EINVAL)?;
        p.maps.remove(i);
        self.unmap_id(m.id);
        Ok(())
    }

    /// Remove mapping `id`. A window that memslots still point at (its `Arc` is shared with a
    /// VM's slot table) is emptied first: it stays reserved until KVM has forgotten the slots,
    /// but shows no file page any more, so the file's frames can be freed behind it.
    pub(crate) fn unmap_id(&mut self, id: MapId) {
        let Some(m) = self.maps.remove(&id) else {
            return;
        };
        if Arc::strong_count(&m.window) > 1 {
            if let Err(e) = m.window.retire() {
                // The window would still show file pages that can be freed: keep the file (and
                // so its frames) alive for good rather than risk a guest seeing reused frames.
                tracing::error!("munmap: cannot empty a window under a memslot: {e}");
                std::mem::forget(m.window);
                return;
            }
        }
        match self.files.kind_mut(m.file) {
            Some(FileKind::Memfd(f)) if m.writable => {
                f.writable_maps = f.writable_maps.saturating_sub(1);
            }
            Some(FileKind::GuestMemfd(g)) if g.kernel_map == Some(id) => g.kernel_map = None,
            _ => {}
        }
        drop(m.window);
        self.fput(m.file);
    }

    /// The window of the caller's mapping that holds all of `addr..addr+len`, for a memslot,
    /// and the offset of `addr` in it: one of the host's mappings of the process, or else one
    /// of its mappings in a real process's address space (see `Host::remote_window`). EFAULT
    /// if the range is not inside one mapping of `pid`.
    pub(crate) fn user_window(
        &mut self,
        pid: Pid,
        addr: u64,
        len: u64,
    ) -> SysResult<(MapId, Arc<VaWindow>, u64)> {
        let end = addr.checked_add(len).ok_or(Errno::EFAULT)?;
        let p = self.procs.get(&pid).ok_or(Errno::EINVAL)?;
        let local = p
            .maps
            .iter()
            .filter_map(|id| self.maps.get(id).map(|m| (*id, m)))
            .find(|(_, m)| {
                let b = m.window.base() as u64;
                addr >= b && end <= b + m.window.len()
            })
            .map(|(id, m)| (id, m.window.clone(), addr - m.window.base() as u64));
        match local {
            Some(l) => Ok(l),
            None => self.remote_window(pid, addr, len),
        }
    }

    /// Physical address of page `index` of `file`, if present.
    pub(crate) fn file_page(&self, file: FileId, index: u64) -> Option<u64> {
        match self.files.kind(file)? {
            FileKind::Memfd(m) => m.pages.pa(index),
            FileKind::GuestMemfd(g) => g.pages.pa(index),
            _ => None,
        }
    }

    /// Map every present page of the file into mapping `id`, one mmap per contiguous run.
    pub(crate) fn map_present(&mut self, id: MapId) {
        let Some(m) = self.maps.get(&id) else { return };
        let n = m.window.len() / PAGE_SIZE;
        self.map_runs_into(m, m.pgoff, m.pgoff + n);
    }

    /// The page cache behind a file, for the kinds that have one.
    pub(crate) fn file_cache(&self, file: FileId) -> Option<&crate::mm::PageCache> {
        match self.files.kind(file)? {
            FileKind::Memfd(m) => Some(&m.pages),
            FileKind::GuestMemfd(g) => Some(&g.pages),
            _ => None,
        }
    }

    /// Map the present pages of file indexes `a..b` into mapping `m`, one mmap per run of
    /// physically contiguous pages.
    pub(crate) fn map_runs_into(&self, m: &Mapping, a: u64, b: u64) {
        let n = m.window.len() / PAGE_SIZE;
        let (a, b) = (a.max(m.pgoff), b.min(m.pgoff + n));
        if a >= b {
            return;
        }
        let Some(cache) = self.file_cache(m.file) else {
            return;
        };
        let parts = self.host_visible(m, a, b);
        for (idx, pfn, len) in parts.into_iter().flat_map(|(lo, hi)| cache.runs_in(lo, hi)) {
            let off = (idx - m.pgoff) * PAGE_SIZE;
            if let Err(e) = m.window.map(
                &self.mm.ram,
                off,
                pfn * PAGE_SIZE,
                len * PAGE_SIZE,
                m.writable,
            ) {
                tracing::warn!("mmap: cannot map pages: {e}");
            }
        }
    }

    /// The parts of `a..b` mapping `m` may show: all of it, but for a process's mapping of a
    /// guest_memfd only its shared pages (the kernel's mapping, which memslots use, shows
    /// private pages too: the guest reaches them).
    fn host_visible(&self, m: &Mapping, a: u64, b: u64) -> Vec<(u64, u64)> {
        match self.files.kind(m.file) {
            Some(FileKind::GuestMemfd(g)) if m.pid != KERNEL_PID => g.attrs.shared_parts(a, b),
            _ => vec![(a, b)],
        }
    }

    /// Take pages `a..b` of `file` out of every process's mapping of it (not the kernel's):
    /// they became private.
    pub(crate) fn unmap_user_pages(&mut self, file: FileId, a: u64, b: u64) {
        for m in self
            .maps
            .values()
            .filter(|m| m.file == file && m.pid != KERNEL_PID)
        {
            let n = m.window.len() / PAGE_SIZE;
            let (lo, hi) = (a.max(m.pgoff), b.min(m.pgoff + n));
            if lo < hi {
                let _ = m
                    .window
                    .unmap((lo - m.pgoff) * PAGE_SIZE, (hi - lo) * PAGE_SIZE);
            }
        }
    }

    /// Pages `a..b` of `file` became present: map them into every mapping of the file.
    pub(crate) fn map_file_range(&mut self, file: FileId, a: u64, b: u64) {
        for m in self.maps.values().filter(|m| m.file == file) {
            self.map_runs_into(m, a, b);
        }
    }

    /// New pages at `indexes` of `file` appear in every mapping of it.
    pub(crate) fn map_file_pages(&mut self, file: FileId, indexes: &[u64]) {
        if indexes.is_empty() {
            return;
        }
        for m in self.maps.values().filter(|m| m.file == file) {
            let n = m.window.len() / PAGE_SIZE;
            for &idx in indexes {
                if idx >= m.pgoff
                    && idx - m.pgoff < n
                    && !self.host_visible(m, idx, idx + 1).is_empty()
                {
                    if let Some(pa) = self.file_page(file, idx) {
                        let _ = m.window.map(
                            &self.mm.ram,
                            (idx - m.pgoff) * PAGE_SIZE,
                            pa,
                            PAGE_SIZE,
                            m.writable,
                        );
                    }
                }
            }
        }
    }

    /// Pages `a..b` of `file` left it: unmap them everywhere.
    pub(crate) fn unmap_file_pages(&mut self, file: FileId, a: u64, b: u64) {
        for m in self.maps.values().filter(|m| m.file == file) {
            let n = m.window.len() / PAGE_SIZE;
            let lo = a.max(m.pgoff);
            let hi = b.min(m.pgoff + n);
            if lo < hi {
                let _ = m
                    .window
                    .unmap((lo - m.pgoff) * PAGE_SIZE, (hi - lo) * PAGE_SIZE);
            }
        }
    }

    fn find_map(&self, pid: Pid, addr: usize) -> SysResult<MapId> {
        let p = self.procs.get(&pid).ok_or(Errno::EINVAL)?;
        p.maps
            .iter()
            .copied()
            .find(|id| {
                self.maps.get(id).is_some_and(|m| {
                    let b = m.window.base() as usize;
                    addr >= b && addr < b + m.window.len() as usize
                })
            })
            .ok_or(Errno::EFAULT)
    }

    /// A user access to page `index` of the file behind mapping `id`: the page's physical
    /// address, faulting it in if the file allows. EFAULT plays SIGBUS.
    fn fault(&mut self, id: MapId, index: u64, write: bool) -> SysResult<u64> {
        let (file, writable) = {
            let m = self.maps.get(&id).ok_or(Errno::EFAULT)?;
            (m.file, m.writable)
        };
        if write && !writable {
            return Err(Errno::EFAULT);
        }
        if let Some(FileKind::GuestMemfd(g)) = self.files.kind(file) {
            // A process touching a private page: SIGBUS on Linux, EFAULT here.
            if !g.host_may_access(index) {
                return Err(Errno::EFAULT);
            }
        }
        if let Some(pa) = self.file_page(file, index) {
            return Ok(pa);
        }
        let pa = match self.files.kind_mut(file) {
            Some(FileKind::GuestMemfd(_)) => {
                return self
                    .gmem_fault(file, index, true)
                    .map_err(|_| Errno::EFAULT)
            }
            Some(FileKind::Memfd(m)) => {
                if index >= m.size.div_ceil(PAGE_SIZE) {
                    return Err(Errno::EFAULT);
                }
                m.pages
                    .fault_in(&mut self.mm, index)
                    .map_err(|_| Errno::EFAULT)?
                    * PAGE_SIZE
            }
            _ => return Err(Errno::EFAULT),
        };
        self.map_file_pages(file, &[index]);
        Ok(pa)
    }

    fn user_access(
        &mut self,
        pid: Pid,
        addr: usize,
        len: usize,
        write: bool,
        mut f: impl FnMut(&Host, u64, usize, usize) -> SysResult<()>,
    ) -> SysResult<()> {
        let mut done = 0usize;
        while done < len {
            let a = addr + done;
            let id = self.find_map(pid, a)?;
            let (base, pgoff) = {
                let m = &self.maps[&id];
                (m.window.base() as usize, m.pgoff)
            };
            let off = (a - base) as u64;
            let pa = self.fault(id, pgoff + off / PAGE_SIZE, write)?;
            let in_page = (off % PAGE_SIZE) as usize;
            let n = (PAGE_SIZE as usize - in_page).min(len - done);
            f(self, pa + in_page as u64, done, n)?;
            done += n;
        }
        Ok(())
    }

    /// Read user memory at `addr` (an address inside one of the process's mappings).
    pub fn user_read(&mut self, pid: Pid, addr: usize, buf: &mut [u8]) -> SysResult<()> {
        let len = buf.len();
        self.user_access(pid, addr, len, false, |h, pa, at, n| {
            crate::mm::PhysRead::read_phys(&h.mm.ram, pa, &mut buf[at..at + n]).map_err(Errno::from)
        })
    }

    /// Write user memory at `addr`.
    pub fn user_write(&mut self, pid: Pid, addr: usize, data: &[u8]) -> SysResult<()> {
        self.user_access(pid, addr, data.len(), true, |h, pa, at, n| {
            h.mm.ram
                .write_phys(pa, &data[at..at + n])
                .map_err(Errno::from)
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::fs::memfd::{F_SEAL_WRITE, MFD_ALLOW_SEALING};
    use crate::host::Host;
    use crate::kexec::BootParams;
    use crate::uapi::Errno;

    fn host() -> Host {
        Host::boot(BootParams {
            ram_size: 64 << 20,
            ..Default::default()
        })
        .unwrap()
    }

    /// A length that cannot be rounded up to pages is ENOMEM (as Linux), not an overflow, and a
    /// failed writable mmap leaves no writer counted: F_SEAL_WRITE can still be added.
    #[test]
    fn huge_length_is_enomem_and_leaves_no_writer() {
        let mut h = host();
        let pid = h.spawn();
        let fd = h.memfd_create(pid, "m", MFD_ALLOW_SEALING).unwrap();
        h.ftruncate(pid, fd, 4096).unwrap();
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        for len in [u64::MAX, u64::MAX - 4094] {
            assert_eq!(
                h.mmap(pid, fd, len, rw, libc::MAP_SHARED, 0),
                Err(Errno::ENOMEM)
            );
        }
        // Larger than the address space: the reservation fails.
        assert!(h.mmap(pid, fd, 1 << 62, rw, libc::MAP_SHARED, 0).is_err());
        h.add_seals(pid, fd, F_SEAL_WRITE).unwrap();
        assert!(h.maps.is_empty());
    }

    /// A window a memslot still holds is emptied at munmap; one nobody else holds just goes.
    #[test]
    fn munmap_without_a_memslot_releases_the_window() {
        let mut h = host();
        let pid = h.spawn();
        let fd = h.memfd_create(pid, "m", 0).unwrap();
        h.ftruncate(pid, fd, 8192).unwrap();
        let m = h
            .mmap(pid, fd, 8192, libc::PROT_READ, libc::MAP_SHARED, 0)
            .unwrap();
        let (_, w, _) = h.user_window(pid, m.addr as u64, 8192).unwrap();
        assert_eq!(
            h.user_window(pid, m.addr as u64, 8193).err(),
            Some(Errno::EFAULT)
        );
        assert_eq!(std::sync::Arc::strong_count(&w), 2);
        h.munmap(pid, m).unwrap();
        assert_eq!(std::sync::Arc::strong_count(&w), 1);
        assert_eq!(
            h.user_window(pid, m.addr as u64, 4096).err(),
            Some(Errno::EFAULT)
        );
    }
}
