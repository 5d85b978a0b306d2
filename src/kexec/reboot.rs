//! reboot(KEXEC): finalize the handover and `execve` the next image with only the RAM memfd
//! inherited. If anything fails before the `execve` takes effect, everything is undone and the
//! running image carries on.

use std::convert::Infallible;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;

use crate::host::Host;
use crate::kho::finalize::Handover;
use crate::kho::KhoError;
use crate::luo::serialize::LuoHandover;
use rustix::process::{waitid, WaitId, WaitIdOptions};

#[derive(Debug, Default, Clone)]
pub struct KexecRequest {
    /// Image to boot; default: the image named at boot, else this binary.
    pub next_image: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum KexecError {
    #[error("kexec refused: {0}")]
    Kho(#[from] KhoError),
    #[error("kexec refused: {0}")]
    Luo(#[from] crate::luo::serialize::LuoError),
    #[error("kexec failed: cannot execute {path}: {err}")]
    Exec { path: String, err: std::io::Error },
}

impl KexecError {
    pub fn errno(&self) -> i32 {
        match self {
            KexecError::Kho(e) => e.errno(),
            KexecError::Luo(crate::luo::serialize::LuoError::Freeze { errno, .. }) => errno.0,
            KexecError::Luo(_) => libc::EINVAL,
            KexecError::Exec { err, .. } => err.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

pub fn monotonic_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// A real kexec abandons the old kernel's objects; our `execve` would instead tear them down
/// (VMs with their memslot metadata above all) synchronously, inside the guests' blackout. A
/// forked reaper keeps them referenced until the new image, once its guests run again, releases
/// it ([`Host::release_previous_image`]); it gives up by itself after 10 s. If the fork fails, the
/// teardown simply happens in the exec.
///
/// The reaper is known by a pidfd, opened right after the fork while the child cannot have been
/// reaped yet (nothing in this process reaps children it does not know), and passed across the
/// exec like the RAM fd: every signal and wait goes to that very process, never to another one
/// that reuses its pid.
fn spawn_reaper() -> Option<Reaper> {
    // SAFETY: fork in a possibly multi-threaded process: the child calls only async-signal-safe
    // functions (close, nanosleep, _exit) and touches no Rust state.
    let pid = unsafe {
        let pid = libc::fork();
        if pid == 0 {
            // Let go of stdio at once: whoever waits for the host image's output must not wait
            // for the reaper.
            for fd in 0..3 {
                libc::close(fd);
            }
            let ts = libc::timespec {
                tv_sec: 10,
                tv_nsec: 0,
            };
            libc::nanosleep(&ts, std::ptr::null_mut());
            libc::_exit(0);
        }
        pid
    };
    let pid = rustix::process::Pid::from_raw(pid)?;
    let pidfd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())
        // Above stdio, so the next image can refuse 0..=2 outright.
        .and_then(|fd| rustix::io::fcntl_dupfd_cloexec(&fd, 3));
    match pidfd {
        Ok(pidfd) => Some(Reaper {
            pidfd,
            killed: false,
        }),
        Err(e) => {
            tracing::warn!("no pidfd for the reaper ({e}): teardown happens in the exec");
            // SAFETY: `pid` is our own child, not waited for yet, so the pid cannot have been
            // reused: signal and reap it.
            unsafe {
                libc::kill(pid.as_raw_nonzero().get(), libc::SIGKILL);
                libc::waitpid(pid.as_raw_nonzero().get(), std::ptr::null_mut(), 0);
            }
            None
        }
    }
}

/// The previous image's reaper (see [`spawn_reaper`]), a child of this process, by pidfd.
#[derive(Debug)]
pub struct Reaper {
    pidfd: OwnedFd,
    killed: bool,
}

impl Reaper {
    /// Adopt the pidfd the previous image passed as `--reaper-fd FD`. The number comes from the
    /// command line, so it is checked before this process takes ownership of it: it is open, not
    /// stdio, a pidfd, and names a child of this process (`waitid(P_PIDFD, WNOHANG | WNOWAIT)`
    /// fails with EBADF/EINVAL for anything but a pidfd and with ECHILD for a process that is
    /// not our child, or was already reaped). A refused number is left alone, not closed.
    pub fn adopt(fd: i32) -> Result<Reaper, String> {
        if fd < 3 {
            return Err("not a pidfd: stdio or negative".into());
        }
        // SAFETY: F_GETFD only reads this process's fd table; no memory is involved.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(format!("not open: {}", std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` is open (F_GETFD succeeded); the borrow ends before this function returns
        // and nothing closes the fd meanwhile.
        let b = unsafe { BorrowedFd::borrow_raw(fd) };
        let opts = WaitIdOptions::EXITED | WaitIdOptions::NOHANG | WaitIdOptions::NOWAIT;
        match waitid(WaitId::PidFd(b), opts) {
            Ok(_) => {}
            Err(rustix::io::Errno::CHILD) => {
                return Err("a pidfd, but not of a child of this process".into())
            }
            Err(e) => return Err(format!("not a pidfd: {e}")),
        }
        // SAFETY: checked above: an open pidfd of our own child, which the previous image (this
        // same process before the exec) passed to us; nothing else in this process owns it.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd) };
        // Ours now: no child of this image inherits it (the next kexec passes it explicitly).
        rustix::io::fcntl_setfd(&pidfd, rustix::io::FdFlags::CLOEXEC)
            .map_err(|e| format!("F_SETFD: {e}"))?;
        Ok(Reaper {
            pidfd,
            killed: false,
        })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    /// SIGKILL it (once). A reaper that already exited (a zombie until reaped) ignores it.
    pub fn kill(&mut self) {
        if !self.killed {
            let _ = rustix::process::pidfd_send_signal(&self.pidfd, rustix::process::Signal::KILL);
            self.killed = true;
        }
    }

    /// Reap it if it has exited: true once it is gone.
    pub fn try_reap(&self) -> bool {
        let opts = WaitIdOptions::EXITED | WaitIdOptions::NOHANG;
        !matches!(waitid(WaitId::PidFd(self.fd()), opts), Ok(None))
    }

    /// Wait until it has exited and reap it: false if it was no longer there to reap.
    pub fn reap(&self) -> bool {
        loop {
            match waitid(WaitId::PidFd(self.fd()), WaitIdOptions::EXITED) {
                Err(rustix::io::Errno::INTR) => continue,
                r => return r.is_ok(),
            }
        }
    }
}

impl Drop for Reaper {
    /// Never leave it behind as a zombie: kill and reap it (it holds only the previous image's
    /// objects, and its teardown is quick once the guests no longer need them).
    fn drop(&mut self) {
        self.kill();
        if self.reap() {
            tracing::info!("previous image's reaper reaped");
        }
    }
}

impl Host {
    /// Let the previous image's objects go (see [`spawn_reaper`]): call once the guests run
    /// again. With `wait`, return only when they are gone.
    pub fn release_previous_image(&mut self, wait: bool) {
        let Some(r) = self.reaper.as_mut() else {
            return;
        };
        r.kill();
        if wait || r.try_reap() {
            // Dropping it reaps it.
            self.reaper = None;
        }
    }

    /// Give up on the incoming update before committing it: kexec back into the image that
    /// made the handover, which is still intact in RAM. Returns only if that fails.
    pub fn rollback(&mut self, why: &str) -> KexecError {
        let fail = |m: &str| KexecError::Exec {
            path: "(rollback)".into(),
            err: std::io::Error::other(m.to_string()),
        };
        if self.kho.committed() {
            return fail("the update was committed; there is nothing to roll back to");
        }
        let Some(inc) = self.kho.incoming() else {
            return fail("not a KHO boot");
        };
        let image = inc
            .metadata
            .as_ref()
            .and_then(|m| m.previous_image.clone())
            .map(PathBuf::from)
            .or_else(|| self.params.prev_image.clone());
        let Some(image) = image else {
            return fail("the previous image is not known");
        };
        let args = inc.args;
        let reaper = self.reaper.as_ref().map(|r| r.fd());
        let err =
            super::boot::rollback_exec(&self.params, self.mm.ram.fd(), reaper, args, &image, why);
        KexecError::Exec {
            path: image.display().to_string(),
            err,
        }
    }

    /// Everything before the point of no return: LUO freezes and serializes its sessions, then
    /// KHO finalizes. On failure nothing stays frozen or written.
    pub fn prepare_handover(&mut self) -> Result<(Option<LuoHandover>, Handover), KexecError> {
        // A new update commits whatever was left of the previous one.
        self.kho.commit(&mut self.mm)?;
        let luo = self.luo_serialize()?;
        match self
            .kho
            .finalize(&mut self.mm, &super::release(), self.info.kexec_count + 1)
        {
            Ok(h) => Ok((luo, h)),
            Err(e) => {
                if let Some(l) = luo {
                    self.luo_abandon(l);
                }
                Err(e.into())
            }
        }
    }

    /// The kexec did not happen: undo [`Host::prepare_handover`].
    pub fn abandon_handover(&mut self, luo: Option<LuoHandover>, h: Handover) {
        self.kho.abandon(&mut self.mm, h);
        if let Some(l) = luo {
            self.luo_abandon(l);
        }
    }

    /// The command line of the next image: this image's parameters plus the handover.
    fn next_cmdline(&self, h: &Handover, ram_fd: RawFd, start_ns: u64) -> Vec<String> {
        let p = &self.params;
        let a = h.args;
        let mut v = vec![
            "boot".to_string(),
            "--ram".into(),
            self.mm.ram.size().to_string(),
            "--ram-fd".into(),
            ram_fd.to_string(),
            "--kho-fdt".into(),
            format!("{:#x}:{:#x}", a.fdt_pa, a.fdt_size),
            "--kho-scratch".into(),
            format!("{:#x}:{:#x}", a.scratch_pa, a.scratch_size),
            "--kexec-start-ns".into(),
            start_ns.to_string(),
            "--handover-bytes".into(),
            self.kho.handover_bytes().to_string(),
            // Last: the moment of the execve, as close to it as we can take it.
            "--exec-ns".into(),
            monotonic_ns().to_string(),
        ];
        if !p.liveupdate {
            v.push("--liveupdate=off".into());
        }
        if p.gmem_luo_v1 {
            v.push("--gmem-luo=v1".into());
        }
        if let Some(c) = a.fdt_crc {
            v.push(format!("--kho-fdt-crc={c}"));
        }
        if let Some(i) = &p.init {
            v.push("--init".into());
            v.push(i.clone());
        }
        for a in &p.init_args {
            v.push("--init-arg".into());
            v.push(a.clone());
        }
        if let Some(r) = &p.report {
            v.push("--report".into());
            v.push(r.display().to_string());
        }
        if let Some(n) = &p.next_image {
            v.push("--next-image".into());
            v.push(n.display().to_string());
        }
        v
    }

    /// Finalize the handover and replace this process with the next image. Returns only on
    /// failure, with the host intact.
    pub fn kexec(&mut self, req: KexecRequest) -> Result<Infallible, KexecError> {
        let start_ns = monotonic_ns();
        // Test hook: damage the handover (`HANDOVER_CORRUPT=flip:<kind>` and the kinds of
        // `kexec::corrupt`), only from a first image that was not itself rolled back to.
        #[cfg(feature = "test-hooks")]
        if let Ok(kind) = std::env::var("HANDOVER_CORRUPT") {
            if self.info.kexec_count == 0
                && self.params.rollback.is_none()
                && self.info.refused.is_none()
            {
                self.corrupt_handover = Some(kind);
            }
        }
        let (luo, h) = self.prepare_handover()?;
        let me = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"));
        let mut image = req
            .next_image
            .or_else(|| self.params.next_image.clone())
            .unwrap_or_else(|| me.clone());
        if crate::fault::hit("kexec.exec") {
            image = PathBuf::from("/nonexistent/handover-injected-fault");
        }
        #[cfg_attr(not(feature = "test-hooks"), allow(unused_mut))]
        let mut h = h;
        #[cfg(feature = "test-hooks")]
        if let Some(kind) = self.corrupt_handover.take() {
            super::corrupt::handover(self, &mut h.args, &kind)?;
        }
        if let Some(path) = self.params.dump_handover.clone() {
            match self.kho.dump(&self.mm, h.args) {
                Ok(d) => {
                    if let Err(e) = d.write(&path) {
                        tracing::warn!("cannot write handover dump {}: {e}", path.display());
                    }
                }
                Err(e) => tracing::warn!("cannot dump the handover: {e}"),
            }
        }
        // The previous image's reaper goes now if it has not yet: dropping it kills and reaps
        // it (its pidfd is not passed on).
        drop(self.reaper.take());
        // The RAM fd goes above stdio, where the next image looks for it.
        let ram_fd = self.mm.ram.fd();
        let ram_dup = match ram_fd.as_raw_fd() {
            0..=2 => match rustix::io::fcntl_dupfd_cloexec(ram_fd, 3) {
                Ok(fd) => Some(fd),
                Err(e) => {
                    self.abandon_handover(luo, h);
                    return Err(KexecError::Exec {
                        path: image.display().to_string(),
                        err: e.into(),
                    });
                }
            },
            _ => None,
        };
        let ram_fd = ram_dup
            .as_ref()
            .map_or(ram_fd.as_raw_fd(), |d| d.as_raw_fd());
        let mut args = self.next_cmdline(&h, ram_fd, start_ns);
        args.push("--prev-image".into());
        args.push(me.display().to_string());
        tracing::debug!("kexec into {} {}", image.display(), args.join(" "));
        let mut cmd = Command::new(&image);
        cmd.args(&args);
        let mut keep = vec![ram_fd];
        // `HANDOVER_NO_REAPER=1` leaves the teardown in the exec (to measure the difference).
        let mut reaper = None;
        if std::env::var_os("HANDOVER_NO_REAPER").is_none() {
            reaper = spawn_reaper();
            if let Some(r) = &reaper {
                let fd = r.fd().as_raw_fd();
                cmd.arg("--reaper-fd").arg(fd.to_string());
                keep.push(fd);
            }
        }
        let err = exec_keeping(&mut cmd, &keep);
        // Still here: the exec failed. The fds are as they were (see `exec_keeping`); the new
        // reaper is killed and reaped (dropping it does both); undo the handover.
        drop(reaper);
        drop(ram_dup);
        self.abandon_handover(luo, h);
        Err(KexecError::Exec {
            path: image.display().to_string(),
            err,
        })
    }
}

/// `execve` `cmd` with only stdio and `keep` inherited, as a kexec leaves nothing else open.
/// Returns only if the exec failed.
///
/// Every fd from 3 up is made close-on-exec right before the exec (`close_range` with
/// `CLOSE_RANGE_CLOEXEC`, in this process: `Command::exec` does not fork), and `keep` is made
/// inheritable. This process has other threads (vCPUs, the guest fault service, slot binders);
/// they run on until the exec replaces the process. If the exec fails, the flags are put back
/// as they were: `keep` to its old flags, and the fds that were inheritable beforehand (listed
/// from `/proc/self/fd` just before) inheritable again. Not restored: an fd another thread
/// opens without `O_CLOEXEC` between that listing and the exec stays close-on-exec; an fd
/// another thread closes in that window and whose number is reused gets the old fd's flag.
pub(crate) fn exec_keeping(cmd: &mut Command, keep: &[RawFd]) -> std::io::Error {
    // SAFETY: F_GETFD only reads this process's fd table.
    let getfd = |fd: RawFd| unsafe { libc::fcntl(fd, libc::F_GETFD) };
    let inheritable: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<RawFd>().ok())
                .filter(|&fd| fd >= 3 && !keep.contains(&fd))
                .filter(|&fd| getfd(fd) & libc::FD_CLOEXEC == 0)
                .collect()
        })
        .unwrap_or_default();
    let kept: Vec<(RawFd, i32)> = keep.iter().map(|&fd| (fd, getfd(fd))).collect();
    let keep_now = keep.to_vec();
    // SAFETY: the closure runs in this process right before execve (no fork) and only makes
    // fcntl/close_range calls on fd numbers; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            for &fd in &keep_now {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let err = cmd.exec();
    for (fd, flags) in kept {
        if flags >= 0 {
            // SAFETY: F_SETFD on an fd the caller owns (it asked to keep it).
            unsafe { libc::fcntl(fd, libc::F_SETFD, flags) };
        }
    }
    for fd in inheritable {
        // SAFETY: F_SETFD changes only the close-on-exec flag of an fd number this process
        // had open and inheritable before the exec attempt.
        unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
    }
    err
}

/// Outcome of a failed in-process kexec.
#[derive(Debug)]
pub enum InProcessKexecError {
    /// Refused before the old image was torn down: it is handed back intact.
    Refused(Box<Host>, KexecError),
    /// The new image failed to boot (the old one is gone, as after a real kexec).
    Boot(super::boot::BootError),
}

impl Host {
    /// Kexec without leaving the process: finalize, drop every piece of this image's state
    /// except the RAM memfd, and boot a new image from the handover. Used by tests that need
    /// many kexecs quickly (the proptest model); the new image can only know what KHO handed
    /// over, exactly as after `execve`.
    pub fn kexec_in_process(mut self) -> Result<Host, InProcessKexecError> {
        let start_ns = monotonic_ns();
        let (luo, h) = match self.prepare_handover() {
            Ok(v) => v,
            Err(e) => return Err(InProcessKexecError::Refused(Box::new(self), e)),
        };
        let fd = match rustix::io::fcntl_dupfd_cloexec(self.mm.ram.fd(), 3) {
            Ok(fd) => fd,
            Err(e) => {
                self.abandon_handover(luo, h);
                let err = KexecError::Exec {
                    path: "(in-process)".into(),
                    err: e.into(),
                };
                return Err(InProcessKexecError::Refused(Box::new(self), err));
            }
        };
        let mut params = self.params.clone();
        params.ram_size = self.mm.ram.size();
        params.ram_fd = Some(std::os::fd::IntoRawFd::into_raw_fd(fd));
        params.kho = Some(h.args);
        params.kexec_start_ns = Some(start_ns);
        drop(self);
        Host::boot(params).map_err(InProcessKexecError::Boot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn getfd(fd: RawFd) -> i32 {
        // SAFETY: F_GETFD only reads the fd table.
        unsafe { libc::fcntl(fd, libc::F_GETFD) }
    }

    /// Review 2.3: a failed exec leaves every fd's close-on-exec flag as it was: the kept fd
    /// (cleared for the exec) is close-on-exec again, an inheritable fd is inheritable again,
    /// and a close-on-exec fd stays so.
    #[test]
    fn failed_exec_restores_close_on_exec_flags() {
        let kept = rustix::fs::memfd_create("kept", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        let other = rustix::fs::memfd_create("other", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        let inheritable = rustix::fs::memfd_create("inh", rustix::fs::MemfdFlags::empty()).unwrap();
        let mut cmd = Command::new("/nonexistent/handover-test-exec");
        let err = exec_keeping(&mut cmd, &[kept.as_raw_fd()]);
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound, "{err}");
        assert_eq!(getfd(kept.as_raw_fd()), libc::FD_CLOEXEC);
        assert_eq!(getfd(other.as_raw_fd()), libc::FD_CLOEXEC);
        assert_eq!(getfd(inheritable.as_raw_fd()), 0);
    }
}
