//! The previous image's reaper: a forked child that keeps the old image's kernel objects alive
//! across the exec, known by a pidfd that is passed to the next image like the RAM fd.

use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};

use rustix::process::{waitid, WaitId, WaitIdOptions};

/// A real kexec abandons the old kernel's objects; our `execve` would instead tear them down
/// (VMs with their memslot metadata above all, and the old address space with its page tables)
/// synchronously, inside the guests' blackout. A reaper child keeps them referenced until the
/// new image, once its guests run again, releases it (`Host::release_previous_image`); it gives
/// up by itself after 10 s. If the clone fails, the teardown simply happens in the exec.
///
/// The reaper is a `clone(CLONE_VM)` child, not a fork: it shares this image's address space,
/// so creating it copies no page tables (a fork's `copy_page_range` also made KVM zap every gfn
/// of the VMs' memslots through the MMU notifier: a cost proportional to guest memory, inside
/// the blackout), and the exec then merely lets go of the old address space instead of tearing
/// it down; the reaper's exit does that later. It has its own copy of the fd table, which keeps
/// the old VMs and files open. It runs only `reaper_main` on a stack of its own, with every
/// signal blocked, making raw system calls only (no libc state, no errno, no Rust state).
///
/// The reaper is known by a pidfd, opened right after the clone while the child cannot have
/// been reaped yet (nothing in this process reaps children it does not know), and passed across
/// the exec like the RAM fd: every signal and wait goes to that very process, never to another
/// one that reuses its pid.
pub(crate) fn spawn_reaper() -> Option<Reaper> {
    let stack = ReaperStack::new()?;
    let pid = {
        // Every signal blocked in the child from its first instruction (it inherits the mask):
        // a handler of this image run on the reaper would share our memory.
        let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
        let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: plain libc calls on local sigsets; the thread's mask is restored below.
        unsafe {
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        }
        // SAFETY: the child runs `reaper_main` on `stack` (ours, mapped until the reaper is
        // gone: see `ReaperStack`), which makes only raw system calls and touches no memory
        // but its own stack frame. SIGCHLD as the exit signal makes it an ordinary child that
        // pidfd and waitid see.
        let pid = unsafe {
            libc::clone(
                reaper_main,
                stack.top(),
                libc::CLONE_VM | libc::SIGCHLD,
                std::ptr::null_mut(),
            )
        };
        // SAFETY: restores the mask saved above.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
        pid
    };
    let Some(pid) = rustix::process::Pid::from_raw(pid) else {
        tracing::warn!(
            "cannot clone the reaper ({}): teardown happens in the exec",
            std::io::Error::last_os_error()
        );
        return None;
    };
    let pidfd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())
        // Above stdio, so the next image can refuse 0..=2 outright.
        .and_then(|fd| rustix::io::fcntl_dupfd_cloexec(&fd, 3));
    match pidfd {
        Ok(pidfd) => Some(Reaper {
            pidfd,
            killed: false,
            stack: Some(stack),
        }),
        Err(e) => {
            tracing::warn!("no pidfd for the reaper ({e}): teardown happens in the exec");
            // SAFETY: `pid` is our own child, not waited for yet, so the pid cannot have been
            // reused: signal and reap it. Its stack is unmapped after that, when `stack` drops.
            unsafe {
                libc::kill(pid.as_raw_nonzero().get(), libc::SIGKILL);
                libc::waitpid(
                    pid.as_raw_nonzero().get(),
                    std::ptr::null_mut(),
                    libc::__WALL,
                );
            }
            None
        }
    }
}

/// The reaper's body: let go of stdio (whoever waits for the host image's output must not wait
/// for the reaper), sleep 10 s, exit (glibc's clone exits with the return value by a raw
/// `exit`). Raw system calls only: this runs in our address space with our thread pointer, so
/// libc's errno would be the spawning thread's.
extern "C" fn reaper_main(_: *mut libc::c_void) -> libc::c_int {
    for fd in 0..3 {
        // SAFETY: closes the child's own copy of stdio; no memory is involved.
        unsafe { raw_syscall3(libc::SYS_close, fd, 0, 0) };
    }
    let ts = libc::timespec {
        tv_sec: 10,
        tv_nsec: 0,
    };
    // SAFETY: nanosleep reads `ts` on this stack frame; no output pointer.
    unsafe { raw_syscall3(libc::SYS_nanosleep, &ts as *const _ as i64, 0, 0) };
    0
}

/// A system call with up to three arguments, by the `syscall` instruction: no libc, no errno.
///
/// # Safety
/// The arguments must be valid for `nr` (pointers to memory the call may access).
#[cfg(target_arch = "x86_64")]
unsafe fn raw_syscall3(nr: i64, a: i64, b: i64, c: i64) -> i64 {
    let ret: i64;
    // SAFETY: the x86-64 Linux system call convention; rcx and r11 are clobbered by `syscall`.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") nr => ret,
            in("rdi") a,
            in("rsi") b,
            in("rdx") c,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack)
        );
    }
    ret
}

/// The reaper's stack: an anonymous mapping in the shared address space. After a successful
/// exec it lives on in the old address space, which the reaper owns; in this image it is
/// unmapped only once the reaper has been reaped.
#[derive(Debug)]
struct ReaperStack {
    base: *mut libc::c_void,
}

// SAFETY: the mapping is only a raw address range; nothing in this image reads or writes it.
unsafe impl Send for ReaperStack {}
// SAFETY: see Send.
unsafe impl Sync for ReaperStack {}

/// Bytes of the reaper's stack.
const REAPER_STACK: usize = 64 << 10;

impl ReaperStack {
    fn new() -> Option<ReaperStack> {
        // SAFETY: a new private anonymous mapping at a kernel-chosen address.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                REAPER_STACK,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            tracing::warn!("no stack for the reaper: teardown happens in the exec");
            return None;
        }
        Some(ReaperStack { base })
    }

    /// The initial stack pointer (the stack grows down), 16-byte aligned.
    fn top(&self) -> *mut libc::c_void {
        // SAFETY: one past the end of our own mapping.
        unsafe { self.base.cast::<u8>().add(REAPER_STACK).cast() }
    }
}

impl Drop for ReaperStack {
    fn drop(&mut self) {
        // SAFETY: our own mapping; dropped only after the reaper that ran on it was reaped.
        unsafe { libc::munmap(self.base, REAPER_STACK) };
    }
}

/// The previous image's reaper (see `spawn_reaper`), a child of this process, by pidfd.
#[derive(Debug)]
pub struct Reaper {
    pidfd: OwnedFd,
    killed: bool,
    /// The stack it runs on, when this image cloned it (not when adopted after an exec); held
    /// only to be unmapped after the reaper is reaped (fields drop after `Drop::drop`).
    #[allow(dead_code)]
    stack: Option<ReaperStack>,
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
            stack: None,
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
