//! The process-facing API ([`crate::uapi`]) served by the host: processes, fds, files.

use crate::fs::{FileId, Memfd};
use crate::host::files::FileKind;
use crate::host::Host;
use crate::mm::PAGE_SIZE;
use crate::uapi::*;
pub use errno::{Errno, SysResult};
pub use process::{FdEntry, Pid, Process};

impl Host {
    /// Start a new user process with an empty fd table.
    pub fn spawn(&mut self) -> Pid {
        self.next_pid += 1;
        let pid = self.next_pid;
        self.procs.insert(
            pid,
            Process {
                pid,
                ..Default::default()
            },
        );
        pid
    }

    /// Process exit: every mapping goes and every fd closes, with the LUO consequences.
    pub fn exit(&mut self, pid: Pid) {
        let Some(p) = self.procs.remove(&pid) else {
            return;
        };
        for m in p.maps {
            self.unmap_id(m);
        }
        for m in p.remote {
            self.drop_remote(pid, m);
        }
        for d in p.pending_free {
            if let Err(e) = d.free(&mut self.mm) {
                tracing::warn!("exit: cannot free punched pages: {e}");
            }
        }
        for (_, e) in p.fds.into_iter().rev() {
            self.fput(e.file);
        }
    }

    /// The process `pid`; EINVAL if there is none.
    pub fn proc_ref(&self, pid: Pid) -> SysResult<&Process> {
        self.procs.get(&pid).ok_or(Errno::EINVAL)
    }

    /// The file behind `fd`.
    pub fn fd_file(&self, pid: Pid, fd: i32) -> SysResult<FileId> {
        self.procs
            .get(&pid)
            .ok_or(Errno::EINVAL)?
            .fds
            .get(&fd)
            .map(|e| e.file)
            .ok_or(Errno::EBADF)
    }

    /// Install a file reference (consumed) at the lowest free fd, or at the fd the program
    /// reserved for this call ([`Host::reserve_fd`]).
    pub fn fd_install(&mut self, pid: Pid, file: FileId, cloexec: bool) -> SysResult<i32> {
        let p = match self.procs.get_mut(&pid) {
            Some(p) => p,
            None => {
                self.fput(file);
                return Err(Errno::EINVAL);
            }
        };
        let fd = match p.pending_fd.take() {
            Some(fd) if !p.fds.contains_key(&fd) => Some(fd),
            Some(_) => None,
            None => p.alloc_fd(),
        };
        let Some(fd) = fd else {
            self.fput(file);
            return Err(Errno::EMFILE);
        };
        p.fds.insert(fd, FdEntry { file, cloexec });
        Ok(fd)
    }

    /// Take another reference on `file` (upstream `get_file`); nothing if it is not open.
    pub fn fget(&mut self, file: FileId) {
        self.files.get_ref(file);
    }

    /// Drop a file reference; on the last one, release the file.
    pub fn fput(&mut self, file: FileId) {
        let Some(f) = self.files.put(file) else {
            return;
        };
        match f.kind {
            FileKind::Liveupdate => self.luo_dev_release(),
            FileKind::Session(sid) => self.luo_session_release(sid),
            FileKind::Memfd(mut m) => {
                if let Err(e) = m.pages.release(&mut self.mm) {
                    tracing::warn!("memfd release: {e}");
                }
            }
            FileKind::Vm(v) => self.kvm_vm_release(v),
            FileKind::GuestMemfd(g) => self.gmem_release(g),
            FileKind::Null | FileKind::Test(_) | FileKind::Kvm | FileKind::Vcpu(_) => {}
        }
    }

    /// `open(path, flags)` of a device: `/dev/null`, `/dev/liveupdate` (its own errors pass
    /// through), `/dev/kvm` (ENOENT without a usable real KVM) and, with `test-hooks`,
    /// `/dev/liveupdate-test`; any other path is ENOENT. Only `O_CLOEXEC` of `flags` is looked at.
    pub fn open(&mut self, pid: Pid, path: &str, flags: u32) -> SysResult<i32> {
        self.proc_ref(pid)?;
        let file = match path {
            "/dev/null" => self.files.install(FileKind::Null),
            "/dev/liveupdate" => self.luo_open()?,
            "/dev/kvm" => {
                self.real_kvm().map_err(|_| Errno::ENOENT)?;
                self.files.install(FileKind::Kvm)
            }
            // Test hook: files for the LUO core tests.
            #[cfg(feature = "test-hooks")]
            "/dev/liveupdate-test" if self.luo.enabled => {
                self.files.install(FileKind::Test(Default::default()))
            }
            _ => return Err(Errno::ENOENT),
        };
        self.fd_install(pid, file, flags & O_CLOEXEC != 0)
    }

    /// `close(fd)`: EINVAL for an unknown process, EBADF for a free fd; drops the fd's reference.
    pub fn close(&mut self, pid: Pid, fd: i32) -> SysResult<()> {
        let e = self
            .procs
            .get_mut(&pid)
            .ok_or(Errno::EINVAL)?
            .fds
            .remove(&fd)
            .ok_or(Errno::EBADF)?;
        self.fput(e.file);
        Ok(())
    }

    /// `dup(fd)`: the same file at the lowest free fd, without close-on-exec (EBADF, EMFILE).
    pub fn dup(&mut self, pid: Pid, fd: i32) -> SysResult<i32> {
        let f = self.fd_file(pid, fd)?;
        self.fget(f);
        self.fd_install(pid, f, false)
    }

    /// ioctl with the user's argument buffer.
    pub fn ioctl(&mut self, pid: Pid, fd: i32, cmd: u64, arg: &mut [u8]) -> SysResult<i64> {
        let f = self.fd_file(pid, fd)?;
        match self.files.kind(f) {
            Some(FileKind::Liveupdate) => self.luo_dev_ioctl(pid, cmd, arg),
            Some(FileKind::Session(sid)) => {
                let sid = *sid;
                self.luo_session_ioctl(pid, sid, cmd, arg)
            }
            Some(FileKind::Kvm) => self.kvm_dev_ioctl(pid, cmd, arg),
            Some(FileKind::Vm(_)) => self.kvm_vm_ioctl(pid, f, cmd, arg),
            Some(FileKind::Vcpu(v)) => {
                let vcpu = v.handle()?;
                crate::host::kvm::passthrough::vcpu_ioctl(&vcpu, cmd, arg)
            }
            Some(FileKind::GuestMemfd(_)) if cmd == crate::abi::kvm::KVM_SET_MEMORY_ATTRIBUTES2 => {
                use zerocopy::{FromBytes, IntoBytes};
                let buf = arg.get_mut(..128).ok_or(Errno::EFAULT)?;
                let mut a = crate::abi::kvm::MemoryAttributes2::read_from_bytes(buf)
                    .map_err(|_| Errno::EFAULT)?;
                let r = self.gmem_set_attributes(f, &mut a);
                if r == Err(Errno::EAGAIN) {
                    // As upstream: on failure the struct goes back with its error_offset.
                    buf.copy_from_slice(a.as_bytes());
                }
                r.map(|()| 0)
            }
            Some(_) => Err(Errno::ENOTTY),
            None => Err(Errno::EBADF),
        }
    }

    /// `memfd_create(name, flags)`: EINVAL for a flag other than `MFD_CLOEXEC`,
    /// `MFD_ALLOW_SEALING`, `MFD_HUGETLB` or a name over 249 bytes; returns the new fd.
    pub fn memfd_create(&mut self, pid: Pid, name: &str, flags: u32) -> SysResult<i32> {
        use crate::fs::memfd::{MFD_ALLOW_SEALING, MFD_CLOEXEC, MFD_HUGETLB};
        if flags & !(MFD_CLOEXEC | MFD_ALLOW_SEALING | MFD_HUGETLB) != 0 || name.len() > 249 {
            return Err(Errno::EINVAL);
        }
        self.proc_ref(pid)?;
        let file = self.files.install(FileKind::Memfd(Memfd::new(name, flags)));
        self.fd_install(pid, file, flags & MFD_CLOEXEC != 0)
    }

    fn memfd_of(&mut self, pid: Pid, fd: i32) -> SysResult<(FileId, &mut Memfd)> {
        let f = self.fd_file(pid, fd)?;
        match self.files.kind_mut(f) {
            Some(FileKind::Memfd(m)) => Ok((f, m)),
            _ => Err(Errno::EINVAL),
        }
    }

    /// `ftruncate` of a memfd (EINVAL for any other file; see [`Memfd::truncate`] for EPERM and
    /// EFBIG). A shrink unmaps the dropped pages from every mapping, then frees them.
    pub fn ftruncate(&mut self, pid: Pid, fd: i32, size: u64) -> SysResult<()> {
        let f = self.fd_file(pid, fd)?;
        if let Some(FileKind::Memfd(m)) = self.files.kind(f) {
            let (new, old) = (size.div_ceil(PAGE_SIZE), m.size.div_ceil(PAGE_SIZE));
            if self.remote_busy(f, new, old, pid) {
                return Err(Errno::EBUSY);
            }
        }
        let dropped = match self.files.kind_mut(f) {
            Some(FileKind::Memfd(m)) => m.truncate(&mut self.mm, size)?,
            _ => return Err(Errno::EINVAL),
        };
        if let Some(d) = dropped {
            self.release_dropped(pid, f, d)?;
        }
        Ok(())
    }

    /// `pread` at `pos`, leaving the file position alone: memfd contents (holes read as zeros),
    /// nothing from `/dev/null`; EINVAL for other files.
    pub fn pread(&mut self, pid: Pid, fd: i32, buf: &mut [u8], pos: u64) -> SysResult<usize> {
        let f = self.fd_file(pid, fd)?;
        match self.files.kind(f) {
            Some(FileKind::Memfd(m)) => m.read_at(&self.mm, pos, buf),
            Some(FileKind::Null) => Ok(0),
            _ => Err(Errno::EINVAL),
        }
    }

    /// `pwrite` at `pos`, leaving the file position alone: into a memfd (see [`Memfd::write_at`]
    /// for EPERM and EFBIG; new pages are mapped into its mappings), swallowed by `/dev/null`;
    /// EINVAL for other files. Returns `data.len()`.
    pub fn pwrite(&mut self, pid: Pid, fd: i32, data: &[u8], pos: u64) -> SysResult<usize> {
        let f = self.fd_file(pid, fd)?;
        let new = match self.files.kind_mut(f) {
            Some(FileKind::Memfd(m)) => m.write_at(&mut self.mm, pos, data)?,
            Some(FileKind::Null) => return Ok(data.len()),
            _ => return Err(Errno::EINVAL),
        };
        self.map_file_pages(f, &new);
        Ok(data.len())
    }

    /// `read` at the file position, which advances by the bytes read; see [`Host::pread`].
    pub fn read(&mut self, pid: Pid, fd: i32, buf: &mut [u8]) -> SysResult<usize> {
        let f = self.fd_file(pid, fd)?;
        let pos = self.files.get(f).map_or(0, |x| x.pos);
        let n = self.pread(pid, fd, buf, pos)?;
        if let Some(x) = self.files.get_mut(f) {
            x.pos = pos + n as u64;
        }
        Ok(n)
    }

    /// `write` at the file position, which advances by the bytes written; see [`Host::pwrite`].
    pub fn write(&mut self, pid: Pid, fd: i32, data: &[u8]) -> SysResult<usize> {
        let f = self.fd_file(pid, fd)?;
        let pos = self.files.get(f).map_or(0, |x| x.pos);
        let n = self.pwrite(pid, fd, data, pos)?;
        if let Some(x) = self.files.get_mut(f) {
            x.pos = pos + n as u64;
        }
        Ok(n)
    }

    /// lseek with SEEK_SET / SEEK_CUR / SEEK_END.
    pub fn lseek(&mut self, pid: Pid, fd: i32, off: i64, whence: i32) -> SysResult<u64> {
        let f = self.fd_file(pid, fd)?;
        let size = match self.files.kind(f) {
            Some(FileKind::Memfd(m)) => m.size,
            _ => return Err(Errno::ESPIPE),
        };
        let x = self.files.get_mut(f).ok_or(Errno::EBADF)?;
        let base = match whence {
            libc::SEEK_SET => 0,
            libc::SEEK_CUR => x.pos as i64,
            libc::SEEK_END => size as i64,
            _ => return Err(Errno::EINVAL),
        };
        let p = base
            .checked_add(off)
            .filter(|p| *p >= 0)
            .ok_or(Errno::EINVAL)?;
        x.pos = p as u64;
        Ok(x.pos)
    }

    /// `fcntl(F_ADD_SEALS)`: EINVAL if `fd` is not a memfd, else [`Memfd::add_seals`].
    pub fn add_seals(&mut self, pid: Pid, fd: i32, seals: u32) -> SysResult<()> {
        self.memfd_of(pid, fd)?.1.add_seals(seals)
    }

    /// `fcntl(F_GET_SEALS)`: the memfd's `F_SEAL_*` bits; EINVAL if `fd` is not a memfd.
    pub fn get_seals(&mut self, pid: Pid, fd: i32) -> SysResult<u32> {
        Ok(self.memfd_of(pid, fd)?.1.seals)
    }

    /// `fallocate` of a memfd ([`Memfd::fallocate`]) or a guest_memfd; ENODEV for other files.
    /// An offset or length that is negative as `loff_t`, or an end past the largest file
    /// offset, fails first ([`crate::fs::fallocate_range`]), as in `vfs_fallocate`.
    /// Punched memfd pages are unmapped from every mapping, then freed; new ones are mapped.
    pub fn fallocate(&mut self, pid: Pid, fd: i32, mode: i32, off: u64, len: u64) -> SysResult<()> {
        let f = self.fd_file(pid, fd)?;
        let end = crate::fs::fallocate_range(off, len)?;
        if mode & libc::FALLOC_FL_PUNCH_HOLE != 0 {
            let end = end / PAGE_SIZE;
            if self.remote_busy(f, off.div_ceil(PAGE_SIZE), end, pid) {
                return Err(Errno::EBUSY);
            }
        }
        let (new, punched) = match self.files.kind_mut(f) {
            Some(FileKind::Memfd(m)) => m.fallocate(&mut self.mm, mode, off, len)?,
            Some(FileKind::GuestMemfd(_)) => return self.gmem_fallocate(f, mode, off, len),
            _ => return Err(Errno::ENODEV),
        };
        if let Some(d) = punched {
            self.release_dropped(pid, f, d)?;
        }
        self.map_file_pages(f, &new);
        Ok(())
    }

    /// Set the behaviour of a `/dev/liveupdate-test` file (LUO core tests).
    #[cfg(feature = "test-hooks")]
    pub fn test_file_set(&mut self, pid: Pid, fd: i32, t: crate::fs::TestFile) -> SysResult<()> {
        let f = self.fd_file(pid, fd)?;
        match self.files.kind_mut(f) {
            Some(FileKind::Test(x)) => {
                *x = t;
                Ok(())
            }
            _ => Err(Errno::EINVAL),
        }
    }

    /// The state of the `/dev/liveupdate-test` file behind `fd` (EINVAL if it is not one).
    #[cfg(feature = "test-hooks")]
    pub fn test_file_get(&self, pid: Pid, fd: i32) -> SysResult<crate::fs::TestFile> {
        match self.files.kind(self.fd_file(pid, fd)?) {
            Some(FileKind::Test(x)) => Ok(x.clone()),
            _ => Err(Errno::EINVAL),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::host::Host;
    use crate::kexec::BootParams;
    use crate::uapi::Errno;

    /// `fallocate` ranges that are negative as `loff_t`, or end past the largest file offset,
    /// fail as in `vfs_fallocate` in every mode, with no arithmetic overflow (the kvm_ioctl
    /// fuzzer punched at an offset near `u64::MAX`), and leave the file as it was; a punch past
    /// the end of the file, still in range, succeeds and changes nothing.
    #[test]
    fn fallocate_out_of_range_fails_cleanly_in_every_mode() {
        let mut h = Host::boot(BootParams {
            ram_size: 64 << 20,
            ..Default::default()
        })
        .unwrap();
        let pid = h.spawn();
        let fd = h.memfd_create(pid, "m", 0).unwrap();
        h.pwrite(pid, fd, b"kept", 4096).unwrap();
        let frames = h.status().frames;
        let keep = libc::FALLOC_FL_KEEP_SIZE;
        let punch = keep | libc::FALLOC_FL_PUNCH_HOLE;
        let max = i64::MAX as u64;
        for mode in [0, keep, punch] {
            for (off, len, want) in [
                (u64::MAX - 4094, 4096, Errno::EINVAL),
                (0xffff_ffff_ffff_f000, 4096, Errno::EINVAL),
                (max + 1, 1, Errno::EINVAL),
                (0, u64::MAX, Errno::EINVAL),
                (0, 0, Errno::EINVAL),
                (max, 1, Errno::EFBIG),
                (max - 4095, 8192, Errno::EFBIG),
            ] {
                assert_eq!(
                    h.fallocate(pid, fd, mode, off, len),
                    Err(want),
                    "mode {mode:#x} off {off:#x} len {len:#x}"
                );
            }
        }
        h.fallocate(pid, fd, punch, max - 8192, 8192).unwrap();
        h.fallocate(pid, fd, punch, 1 << 41, 4096).unwrap();
        let mut b = [0u8; 4];
        assert_eq!(h.pread(pid, fd, &mut b, 4096), Ok(4));
        assert_eq!(&b, b"kept");
        assert_eq!(h.status().frames, frames, "no frame allocated or freed");
    }
}
