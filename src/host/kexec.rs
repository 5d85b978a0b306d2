//! reboot(KEXEC) on the host (the glue of `kexec::reboot`): finalize the handover and
//! `execve` the next image with only the RAM memfd inherited. If anything fails before the
//! `execve` takes effect, everything is undone and the running image carries on.

use std::convert::Infallible;
use std::os::fd::{AsRawFd, IntoRawFd, RawFd};
use std::path::PathBuf;

use crate::host::Host;
use crate::kexec::boot::rollback_exec;
use crate::kexec::exec::exec_image;
use crate::kexec::reaper::spawn_reaper;
use crate::kexec::reboot::{InProcessKexecError, KexecError, KexecRequest};
use crate::kexec::BootParams;
use crate::kho::finalize::Handover;
use crate::luo::serialize::LuoHandover;
use crate::time::monotonic_ns;

impl Host {
    /// Let the previous image's objects go (see `kexec::reaper`): call once the guests run
    /// again. With `wait`, return only when they are gone; without, a thread of this image
    /// waits for the reaper's exit and reaps it, so that neither this call nor the next kexec
    /// (which would otherwise reap it, inside the next blackout: 40 µs to 2.8 ms measured in
    /// `handover soak`) waits for the old VMs' teardown. If the next kexec comes before that
    /// thread is done, the killed reaper is left as a zombie of the process.
    pub fn release_previous_image(&mut self, wait: bool) {
        let Some(mut r) = self.reaper.take() else {
            return;
        };
        r.kill();
        if wait || r.try_reap() {
            // Dropping it reaps it.
            drop(r);
            return;
        }
        let spawned = std::thread::Builder::new()
            .name("reap-previous".into())
            .spawn(move || drop(r));
        match spawned {
            Ok(t) => self.reaping = Some(t),
            Err(e) => tracing::warn!("cannot start the reaping thread ({e}); reaped here instead"),
        }
    }

    /// The thread reaping the previous image after [`Host::release_previous_image`] without
    /// waiting, if any; joining it waits until that image is gone. The exit of its reaper tears
    /// down the old address space with every page of guest memory the old image had mapped:
    /// with 32 VMs holding 4.7 GiB, updates 100 ms apart, it took 193 of about 450 `perf`
    /// samples of both CPUs during the next update's restore. Waiting for it before the next
    /// update keeps that work out of the next update's restore. Join it without holding the
    /// host lock.
    pub fn take_previous_image_reaping(&mut self) -> Option<std::thread::JoinHandle<()>> {
        self.reaping.take()
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
        let err = rollback_exec(&self.params, self.mm.ram.fd(), reaper, args, &image, why);
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
        match self.kho.finalize(
            &mut self.mm,
            &crate::kexec::release(),
            self.info.kexec_count + 1,
        ) {
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

    /// The next image's parameters ([`BootParams::next`]): the handover in RAM, passed
    /// as `ram_fd`, and the timings of this kexec, taken last.
    fn next_params(&self, h: &Handover, ram_fd: RawFd, start_ns: u64) -> BootParams {
        let mut next = self.params.next(self.mm.ram.size(), ram_fd, h.args);
        next.kexec_start_ns = Some(start_ns);
        next.prev_handover_bytes = Some(self.kho.handover_bytes());
        // Last: the moment of the execve, as close to it as we can take it.
        next.exec_ns = Some(monotonic_ns());
        next
    }

    /// Finalize the handover and replace this process with the next image. Returns only on
    /// failure, with the host intact.
    pub fn kexec(&mut self, req: KexecRequest) -> Result<Infallible, KexecError> {
        let start_ns = monotonic_ns();
        // From here to the next image's boot the kexec owns a CPU, as a real one owns the
        // machine (`kexec::priority`); a failure below drops the boost.
        let _boost = crate::kexec::priority::boost();
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
            crate::kexec::corrupt::handover(&self.kho, &self.mm.ram, &mut h.args, &kind)?;
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
        let mut next = self.next_params(&h, ram_fd, start_ns);
        next.prev_image = Some(me);
        // `HANDOVER_NO_REAPER=1` leaves the teardown in the exec (to measure the difference).
        let mut reaper = None;
        if std::env::var_os("HANDOVER_NO_REAPER").is_none() {
            reaper = spawn_reaper();
            next.reaper_fd = reaper.as_ref().map(|r| r.fd().as_raw_fd());
        }
        let err = exec_image(&image, &next);
        // Still here: the exec failed. The fds are as they were (see `exec::exec_keeping`); the new
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

impl Host {
    /// Kexec without leaving the process: finalize, drop every piece of this image's state
    /// except the RAM memfd, and boot a new image from the handover. Used by tests that need
    /// many kexecs quickly (the proptest model); the new image can only know what KHO handed
    /// over, exactly as after `execve`.
    pub fn kexec_in_process(mut self) -> Result<Host, InProcessKexecError<Host>> {
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
        // Not a command line: this image's params as they are (tests set some on the host,
        // e.g. `rollback` to keep a refused handover from exec'ing the test binary), with the
        // handover. The new image has this one's file handlers.
        let mut params = self.params.clone();
        params.ram_size = self.mm.ram.size();
        params.ram_fd = Some(fd.into_raw_fd());
        params.kho = Some(h.args);
        params.kexec_start_ns = Some(start_ns);
        let handlers = self.luo.handlers.clone();
        drop(self);
        Host::boot_with(params, &handlers).map_err(InProcessKexecError::Boot)
    }
}

/// Test hook: the `kho-test` init program's `corrupt=KIND`.
#[cfg(feature = "test-hooks")]
impl Host {
    /// Damage the `kho-test` client blob now ([`crate::kexec::corrupt::client`]), or remember a
    /// kind that damages the handover for the next kexec.
    pub fn corrupt_client(&mut self, kind: &str) -> Result<(), crate::kho::KhoError> {
        if let Some(k) = crate::kexec::corrupt::client(&self.kho, &self.mm.ram, kind)? {
            self.corrupt_handover = Some(k);
        }
        Ok(())
    }
}
