//! reboot(KEXEC): finalize the handover and `execve` the next image with only the RAM memfd
//! inherited. If anything fails before the `execve` takes effect, everything is undone and the
//! running image carries on.

use std::convert::Infallible;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;

use crate::host::Host;
use crate::kho::finalize::Handover;
use crate::kho::KhoError;
use crate::luo::serialize::LuoHandover;

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
fn spawn_reaper() -> Option<i32> {
    // SAFETY: fork in a possibly multi-threaded process: the child calls only async-signal-safe
    // functions (close, nanosleep, _exit) and touches no Rust state.
    unsafe {
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
        (pid > 0).then_some(pid)
    }
}

impl Host {
    /// Let the previous image's objects go (see [`spawn_reaper`]): call once the guests run
    /// again. With `wait`, return only when they are gone.
    pub fn release_previous_image(&mut self, wait: bool) {
        if let Some(pid) = self.params.reaper_pid.take() {
            // SAFETY: signalling and waiting for our own child process.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                if wait {
                    libc::waitpid(pid, std::ptr::null_mut(), 0);
                }
            }
            self.reaped = Some(pid);
        } else if let (true, Some(pid)) = (wait, self.reaped.take()) {
            // SAFETY: waiting for our own child process.
            unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
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
        let err = super::boot::rollback_exec(&self.params, args, &image, why);
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
    fn next_cmdline(&self, h: &Handover, start_ns: u64) -> Vec<String> {
        let p = &self.params;
        let a = h.args;
        let mut v = vec![
            "boot".to_string(),
            "--ram".into(),
            self.mm.ram.size().to_string(),
            "--ram-fd".into(),
            self.mm.ram.fd().as_raw_fd().to_string(),
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
        let mut h = h;
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
        let mut args = self.next_cmdline(&h, start_ns);
        args.push("--prev-image".into());
        args.push(me.display().to_string());
        let ram_fd = self.mm.ram.fd().as_raw_fd();
        tracing::debug!("kexec into {} {}", image.display(), args.join(" "));
        let mut cmd = Command::new(&image);
        cmd.args(&args);
        // SAFETY: the closure runs right before execve in this (single-purpose) process and
        // only makes async-signal-safe fcntl/close_range calls on fd numbers.
        unsafe {
            cmd.pre_exec(move || {
                // Every fd but stdio and RAM closes at exec, like a kexec leaves nothing open.
                libc::syscall(
                    libc::SYS_close_range,
                    3u32,
                    u32::MAX,
                    libc::CLOSE_RANGE_CLOEXEC,
                );
                if libc::fcntl(ram_fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        // `HANDOVER_NO_REAPER=1` leaves the teardown in the exec (to measure the difference).
        let mut reaper = None;
        if std::env::var_os("HANDOVER_NO_REAPER").is_none() {
            reaper = spawn_reaper();
            if let Some(pid) = reaper {
                cmd.arg("--reaper-pid").arg(pid.to_string());
            }
        }
        let err = cmd.exec();
        if let Some(pid) = reaper {
            // SAFETY: signalling and reaping our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
        }
        // Still here: the exec failed. Put the RAM fd back to close-on-exec and undo.
        // SAFETY: plain fcntl on an fd this process owns.
        unsafe { libc::fcntl(ram_fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        self.abandon_handover(luo, h);
        Err(KexecError::Exec {
            path: image.display().to_string(),
            err,
        })
    }
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
