//! The syscalls only a real process needs (a program under `handover run`, served through the
//! process boundary in `crate::boundary`): fds at the numbers the program reserved, `dup2`,
//! `fork`, `fstat`, and mappings that live in the program's own address space.

use crate::abi::boundary::{MmapArgs, PageRun, Stat};
use crate::fs::FileId;
use crate::host::files::FileKind;
use crate::host::Host;
use crate::mm::PAGE_SIZE;
use crate::uapi::mmap::RemoteMapping;
use crate::uapi::{Errno, FdEntry, Pid, Process, SysResult, NOFILE};

/// Largest fault-around block, in pages (2 MiB, as a shmem huge page).
pub const FAULT_AROUND_MAX: u64 = 512;

impl Host {
    /// The next file installed for `pid` goes at `fd` (a placeholder the program holds), not
    /// at the lowest free number. EBADF if `fd` is out of range or already a host fd.
    pub fn reserve_fd(&mut self, pid: Pid, fd: i32) -> SysResult<()> {
        let p = self.procs.get_mut(&pid).ok_or(Errno::EINVAL)?;
        if !(0..NOFILE).contains(&fd) || p.fds.contains_key(&fd) {
            return Err(Errno::EBADF);
        }
        p.pending_fd = Some(fd);
        Ok(())
    }

    /// Forget a reservation the call did not use.
    pub fn unreserve_fd(&mut self, pid: Pid) {
        if let Some(p) = self.procs.get_mut(&pid) {
            p.pending_fd = None;
        }
    }

    /// `dup2(old, new)` on host fds: `new` refers to `old`'s file (whatever it held is closed
    /// first). EBADF if `old` is not a host fd or `new` is out of range.
    pub fn dup_to(&mut self, pid: Pid, old: i32, new: i32) -> SysResult<i32> {
        let f = self.fd_file(pid, old)?;
        if !(0..NOFILE).contains(&new) {
            return Err(Errno::EBADF);
        }
        if old == new {
            return Ok(new);
        }
        if self.fd_file(pid, new).is_ok() {
            self.close(pid, new)?;
        }
        self.fget(f);
        let p = self.procs.get_mut(&pid).ok_or(Errno::EINVAL)?;
        p.fds.insert(
            new,
            FdEntry {
                file: f,
                cloexec: false,
            },
        );
        Ok(new)
    }

    /// `fork()`: a new process with the same host fds and mappings, each holding its own
    /// reference, as Linux copies the fd table and the address space.
    pub fn fork(&mut self, pid: Pid) -> SysResult<Pid> {
        let (fds, mut remote) = {
            let p = self.proc_ref(pid)?;
            (p.fds.clone(), p.remote.clone())
        };
        // The host's shadow mappings (for memslots) stay the parent's.
        for m in &mut remote {
            m.shadow = None;
        }
        for e in fds.values() {
            self.fget(e.file);
        }
        for m in &remote {
            self.fget(m.file);
            if m.writable {
                if let Some(FileKind::Memfd(f)) = self.files.kind_mut(m.file) {
                    f.writable_maps += 1;
                }
            }
        }
        self.next_pid += 1;
        let child = self.next_pid;
        self.procs.insert(
            child,
            Process {
                pid: child,
                fds,
                remote,
                ..Default::default()
            },
        );
        Ok(child)
    }

    /// `fstat` of a host fd.
    pub fn fstat(&self, pid: Pid, fd: i32) -> SysResult<Stat> {
        let f = self.fd_file(pid, fd)?;
        let kind = self.files.kind(f).ok_or(Errno::EBADF)?;
        // Like anon inodes and shmem: an inode number per open file.
        let mut st = Stat {
            nlink: 1,
            ino: f,
            ..Default::default()
        };
        match kind {
            FileKind::Memfd(m) => {
                st.mode = libc::S_IFREG | 0o777;
                st.size = m.size;
                st.blocks = m.pages.nr_present() * (PAGE_SIZE / 512);
            }
            FileKind::GuestMemfd(g) => {
                st.mode = libc::S_IFREG | 0o600;
                st.size = g.size;
                st.blocks = g.pages.nr_present() * (PAGE_SIZE / 512);
            }
            // misc devices: major 10.
            FileKind::Liveupdate | FileKind::Kvm | FileKind::Null => {
                st.mode = libc::S_IFCHR | 0o600;
                st.rdev = 10 << 8;
            }
            // anon inodes: no type bits, mode 0600.
            _ => st.mode = 0o600,
        }
        Ok(st)
    }

    /// `mmap` of host file `fd` into the program's range `a.addr..+a.len` (already reserved by
    /// the program): the checks of [`Host::mmap`], then a record that holds the file; returns
    /// the runs of pages present now, for the program to map from the RAM memfd. Memfds only
    /// (ENODEV for other files).
    pub fn remote_mmap(&mut self, pid: Pid, fd: i32, a: &MmapArgs) -> SysResult<Vec<PageRun>> {
        let file = self.fd_file(pid, fd)?;
        let len = crate::mm::page_round_up(a.len).ok_or(Errno::ENOMEM)?;
        if len == 0 || a.off % PAGE_SIZE != 0 || a.addr % PAGE_SIZE != 0 {
            return Err(Errno::EINVAL);
        }
        a.addr.checked_add(len).ok_or(Errno::ENOMEM)?;
        let writable = a.prot as i32 & libc::PROT_WRITE != 0;
        match self.files.kind_mut(file) {
            Some(FileKind::Memfd(m)) => {
                if a.flags as i32 & libc::MAP_SHARED == 0 {
                    return Err(Errno::EINVAL);
                }
                use crate::fs::memfd::{F_SEAL_FUTURE_WRITE, F_SEAL_WRITE};
                if writable && m.seals & (F_SEAL_WRITE | F_SEAL_FUTURE_WRITE) != 0 {
                    return Err(Errno::EPERM);
                }
                if writable {
                    m.writable_maps += 1;
                }
            }
            Some(FileKind::GuestMemfd(g)) => {
                if g.flags & crate::abi::kvm::GUEST_MEMFD_FLAG_MMAP == 0 {
                    return Err(Errno::ENODEV);
                }
                if a.flags as i32 & libc::MAP_SHARED == 0 {
                    return Err(Errno::EINVAL);
                }
            }
            Some(_) => return Err(Errno::ENODEV),
            None => return Err(Errno::EBADF),
        }
        self.fget(file);
        let m = RemoteMapping {
            addr: a.addr,
            len,
            file,
            pgoff: a.off / PAGE_SIZE,
            writable,
            ra_next: u64::MAX,
            ra_pages: 0,
            shadow: None,
        };
        let runs = self.present_runs(file, m.pgoff, m.pgoff + m.npages());
        match self.procs.get_mut(&pid) {
            Some(p) => p.remote.push(m),
            None => {
                self.drop_remote(pid, m);
                return Err(Errno::EINVAL);
            }
        }
        Ok(runs)
    }

    /// `munmap(addr, len)` in the program: forget the parts of its host mappings in the range
    /// (a mapping cut in the middle becomes two); a mapping wholly gone drops its file.
    pub fn remote_munmap(&mut self, pid: Pid, addr: u64, len: u64) -> SysResult<()> {
        let end = addr
            .checked_add(crate::mm::page_round_up(len).ok_or(Errno::EINVAL)?)
            .ok_or(Errno::EINVAL)?;
        if addr % PAGE_SIZE != 0 || len == 0 {
            return Err(Errno::EINVAL);
        }
        let p = self.procs.get_mut(&pid).ok_or(Errno::EINVAL)?;
        let old = std::mem::take(&mut p.remote);
        let mut keep = Vec::with_capacity(old.len());
        let mut gone = Vec::new();
        for m in old {
            let (ms, me) = (m.addr, m.addr + m.len);
            if me <= addr || end <= ms {
                keep.push(m);
                continue;
            }
            let mut pieces = 0;
            if ms < addr {
                keep.push(RemoteMapping {
                    len: addr - ms,
                    ..m
                });
                pieces += 1;
            }
            if end < me {
                keep.push(RemoteMapping {
                    addr: end,
                    len: me - end,
                    pgoff: m.pgoff + (end - ms) / PAGE_SIZE,
                    ..m
                });
                pieces += 1;
            }
            // Each piece holds its own reference, as each VMA does.
            match pieces {
                0 => gone.push(m),
                1 => {}
                _ => {
                    self.files.get_ref(m.file);
                    if m.writable {
                        if let Some(FileKind::Memfd(f)) = self.files.kind_mut(m.file) {
                            f.writable_maps += 1;
                        }
                    }
                }
            }
        }
        if let Some(p) = self.procs.get_mut(&pid) {
            p.remote = keep;
        }
        for m in gone {
            self.drop_remote(pid, m);
        }
        Ok(())
    }

    /// All of the program's mappings went (`execve` or exit).
    pub fn remote_unmap_all(&mut self, pid: Pid) {
        let Some(p) = self.procs.get_mut(&pid) else {
            return;
        };
        for m in std::mem::take(&mut p.remote) {
            self.drop_remote(pid, m);
        }
    }

    /// A program mapping is gone: its file reference goes, and the host's shadow mapping of it
    /// once no piece of it is left (a memslot still using the shadow keeps it reserved, with
    /// no page in it, as after munmap on Linux).
    pub(crate) fn drop_remote(&mut self, pid: Pid, m: RemoteMapping) {
        if m.writable {
            if let Some(FileKind::Memfd(f)) = self.files.kind_mut(m.file) {
                f.writable_maps = f.writable_maps.saturating_sub(1);
            }
        }
        if let Some(shadow) = m.shadow {
            let used = self
                .procs
                .get(&pid)
                .is_some_and(|p| p.remote.iter().any(|r| r.shadow == Some(shadow)));
            if !used {
                if let Some(p) = self.procs.get_mut(&pid) {
                    p.maps.retain(|&x| x != shadow);
                }
                self.unmap_id(shadow);
            }
        }
        self.fput(m.file);
    }

    /// The host window behind `addr..addr+len` of a program's host mapping, for a memslot:
    /// the host's shadow mapping of the same file range (made on first use), and the offset of
    /// `addr` in it. The file's pages in the range are allocated now, as a memslot pins them
    /// (KVM cannot fault a hole of an ordinary mapping in). EFAULT if the range is not inside
    /// one host mapping of the program.
    pub(crate) fn remote_window(
        &mut self,
        pid: Pid,
        addr: u64,
        len: u64,
    ) -> SysResult<(crate::uapi::MapId, std::sync::Arc<crate::mm::VaWindow>, u64)> {
        let end = addr.checked_add(len).ok_or(Errno::EFAULT)?;
        let p = self.procs.get(&pid).ok_or(Errno::EINVAL)?;
        let i = p
            .remote
            .iter()
            .position(|m| addr >= m.addr && end <= m.addr + m.len)
            .ok_or(Errno::EFAULT)?;
        let m = p.remote[i];
        let off = addr - m.addr;
        let (a, b) = (m.pgoff + off / PAGE_SIZE, m.pgoff + (off + len) / PAGE_SIZE);
        let filled = match self.files.kind_mut(m.file) {
            Some(FileKind::Memfd(f)) => {
                let b = b.min(f.size.div_ceil(PAGE_SIZE));
                f.pages.fill(&mut self.mm, a, b).map_err(Errno::from)?
            }
            _ => Vec::new(),
        };
        for (i, n) in filled {
            self.map_file_range(m.file, i, i + n);
        }
        let shadow = match m.shadow.filter(|s| self.maps.contains_key(s)) {
            Some(s) => s,
            None => {
                let s = self.map_file(pid, m.file, m.pgoff, m.len, m.writable)?;
                // Every piece of the program mapping shares it.
                if let Some(p) = self.procs.get_mut(&pid) {
                    for r in p
                        .remote
                        .iter_mut()
                        .filter(|r| r.addr == m.addr && r.file == m.file)
                    {
                        r.shadow = Some(s);
                    }
                }
                s
            }
        };
        let w = self
            .maps
            .get(&shadow)
            .map(|x| x.window.clone())
            .ok_or(Errno::EFAULT)?;
        Ok((shadow, w, off))
    }

    /// A page fault at `addr` in one of the program's host mappings: allocate the holes of a
    /// fault-around block (one page, doubling on sequential faults up to
    /// `FAULT_AROUND_MAX`) and return the runs to map. EFAULT outside any host mapping or
    /// past the end of the file (the program raises SIGBUS), EACCES for a write to a read-only
    /// mapping (SIGSEGV).
    pub fn remote_fault(&mut self, pid: Pid, addr: u64, write: bool) -> SysResult<Vec<PageRun>> {
        let p = self.procs.get_mut(&pid).ok_or(Errno::EINVAL)?;
        let m = p
            .remote
            .iter_mut()
            .find(|m| addr >= m.addr && addr - m.addr < m.len)
            .ok_or(Errno::EFAULT)?;
        if write && !m.writable {
            return Err(Errno::EACCES);
        }
        let idx = m.pgoff + (addr - m.addr) / PAGE_SIZE;
        let block = if idx == m.ra_next {
            (m.ra_pages * 2).min(FAULT_AROUND_MAX)
        } else {
            1
        };
        let end = (idx + block).min(m.pgoff + m.npages());
        m.ra_next = end;
        m.ra_pages = block;
        let file = m.file;
        let mut end = end;
        // A HugeTLB guest_memfd allocates whole folios from the pool: through its own fault.
        let huge =
            matches!(self.files.kind(file), Some(FileKind::GuestMemfd(g)) if g.page_order > 0);
        if huge {
            self.gmem_fault(file, idx, true)?;
        }
        let (pages, size_pages, can_alloc) = match self.files.kind_mut(file) {
            Some(FileKind::Memfd(f)) => (&mut f.pages, f.size.div_ceil(PAGE_SIZE), true),
            // Host access to a guest_memfd needs INIT_SHARED or a private-memory VM, and a
            // shared page (a private one is SIGBUS); a frozen one allocates nothing.
            Some(FileKind::GuestMemfd(g))
                if g.init_shared() || crate::kvm::vm::has_private_memory(g.vm.vm_type) =>
            {
                if !g.host_may_access(idx) {
                    return Err(Errno::EFAULT);
                }
                // Fault around only up to the next private page.
                if let Some(p) = g.attrs.first_private(idx, end) {
                    end = p;
                }
                (&mut g.pages, g.size / PAGE_SIZE, !g.frozen && !huge)
            }
            _ => return Err(Errno::EFAULT),
        };
        if idx >= size_pages || (!can_alloc && pages.get(idx).is_none()) {
            return Err(Errno::EFAULT);
        }
        let filled = if can_alloc {
            pages
                .fill(&mut self.mm, idx, end.min(size_pages))
                .map_err(Errno::from)?
        } else {
            Vec::new()
        };
        for (i, n) in filled {
            self.map_file_range(file, i, i + n);
        }
        Ok(self.present_runs(file, idx, end))
    }

    /// Whether a program other than `caller` maps any of `file`'s pages `a..b`: their frames
    /// cannot be freed, since the host cannot unmap them from another address space (the
    /// punch or shrink is EBUSY; docs/userspace.md).
    pub(crate) fn remote_busy(&self, file: FileId, a: u64, b: u64, caller: Pid) -> bool {
        a < b
            && self
                .procs
                .iter()
                .filter(|(pid, _)| **pid != caller)
                .flat_map(|(_, p)| p.remote.iter())
                .any(|m| m.file == file && m.covers(a, b))
    }

    /// Pages a punch or shrink took out of `file`: unmap them from the host's windows, then
    /// free them; but if the calling program maps them itself, keep them until it has
    /// unmapped them too ([`Host::remote_release`]): `Process::deferred` tells it which.
    pub(crate) fn release_dropped(
        &mut self,
        pid: Pid,
        file: FileId,
        d: crate::fs::memfd::Dropped,
    ) -> SysResult<()> {
        let (a, b) = d.range;
        self.unmap_file_pages(file, a, b);
        let mapped = self
            .procs
            .get(&pid)
            .is_some_and(|p| p.remote.iter().any(|m| m.file == file && m.covers(a, b)));
        match self.procs.get_mut(&pid) {
            Some(p) if mapped => {
                p.pending_free.push(d);
                p.deferred = Some((file, a, b));
                Ok(())
            }
            _ => d.free(&mut self.mm),
        }
    }

    /// The program has unmapped the pages of its last punch or shrink: free them.
    pub fn remote_release(&mut self, pid: Pid) -> SysResult<()> {
        let p = self.procs.get_mut(&pid).ok_or(Errno::EINVAL)?;
        let pending = std::mem::take(&mut p.pending_free);
        for d in pending {
            d.free(&mut self.mm)?;
        }
        Ok(())
    }

    /// What the last call left for the program to unmap (`(file, first page, end page)`),
    /// taken.
    pub fn take_deferred(&mut self, pid: Pid) -> Option<(FileId, u64, u64)> {
        self.procs.get_mut(&pid)?.deferred.take()
    }

    /// The runs of present pages of `file` in `a..b` a program may map: a guest_memfd's
    /// private pages are left out (they stay holes, and a touch is SIGBUS).
    fn present_runs(&self, file: FileId, a: u64, b: u64) -> Vec<PageRun> {
        let parts = match self.files.kind(file) {
            Some(FileKind::GuestMemfd(g)) => g.attrs.shared_parts(a, b),
            _ => vec![(a, b)],
        };
        let Some(c) = self.file_cache(file) else {
            return Vec::new();
        };
        parts
            .into_iter()
            .flat_map(|(lo, hi)| c.runs_in(lo, hi))
            .map(|(index, pfn, npages)| PageRun { index, pfn, npages })
            .collect()
    }

    /// The first page of `file` in `a..b` that a program maps (its frames cannot be taken out
    /// of another address space: a conversion to private is EAGAIN there).
    pub(crate) fn remote_mapped_page(&self, file: FileId, a: u64, b: u64) -> Option<u64> {
        self.procs
            .values()
            .flat_map(|p| p.remote.iter())
            .filter(|m| m.file == file && m.covers(a, b))
            .map(|m| a.max(m.pgoff))
            .min()
    }
}
