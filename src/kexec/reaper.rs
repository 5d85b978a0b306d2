//! The previous image's reaper: a forked child that keeps the old image's kernel objects alive
//! across the exec, known by a pidfd that is passed to the next image like the RAM fd.

use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};

use rustix::process::{waitid, WaitId, WaitIdOptions};

/// A real kexec abandons the old kernel's objects; our `execve` would instead tear them down
/// (VMs with their memslot metadata above all) synchronously, inside the guests' blackout. A
/// forked reaper keeps them referenced until the new image, once its guests run again, releases
/// it (`Host::release_previous_image`); it gives up by itself after 10 s. If the fork fails, the
/// teardown simply happens in the exec.
///
/// The reaper is known by a pidfd, opened right after the fork while the child cannot have been
/// reaped yet (nothing in this process reaps children it does not know), and passed across the
/// exec like the RAM fd: every signal and wait goes to that very process, never to another one
/// that reuses its pid.
pub(crate) fn spawn_reaper() -> Option<Reaper> {
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

/// The previous image's reaper (see `spawn_reaper`), a child of this process, by pidfd.
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

    /// The reaper's pidfd, passed by number to the next image (`--reaper-fd`).
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
