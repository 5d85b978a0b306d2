//! Process and fd hygiene of the kexec path (review findings #6 and #8): the reaper is known
//! only by a pidfd of our own child, so no other process is ever signalled; `--ram-fd` and
//! `--reaper-fd` are checked before this process owns them, and a refused number is never
//! closed; `SIGCHLD` is not ignored, so `std::process::Command` works after a KHO boot.

mod common;

use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd, RawFd};
use std::process::{Command, Stdio};

use handover::host::Host;
use handover::kexec::boot::BootError;
use handover::kexec::reaper::Reaper;
use handover::kexec::BootParams;
use rustix::process::{pidfd_open, Pid, PidfdFlags, WaitId, WaitIdOptions};

fn is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only reads the fd table.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}

fn cloexec(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only reads the fd table.
    unsafe { libc::fcntl(fd, libc::F_GETFD) & libc::FD_CLOEXEC != 0 }
}

fn pidfd_of(pid: u32) -> OwnedFd {
    pidfd_open(Pid::from_raw(pid as i32).expect("pid"), PidfdFlags::empty()).expect("pidfd_open")
}

/// The process behind `pidfd` has not exited (its pidfd is not readable yet).
fn alive(pidfd: &OwnedFd) -> bool {
    let mut p = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no timeout.
    unsafe { libc::poll(&mut p, 1, 0) == 0 }
}

/// Reaped: `pid` is no longer a child of this process.
fn reaped(pid: u32) -> bool {
    let pid = Pid::from_raw(pid as i32).expect("pid");
    let opts = WaitIdOptions::EXITED | WaitIdOptions::NOHANG | WaitIdOptions::NOWAIT;
    matches!(
        rustix::process::waitid(WaitId::Pid(pid), opts),
        Err(rustix::io::Errno::CHILD)
    )
}

/// A grandchild of this process (child of a shell that waits for it), its pid and pidfd.
fn grandchild() -> (std::process::Child, u32, OwnedFd) {
    let mut sh = Command::new("sh")
        .args(["-c", "sleep 30 & echo $!; wait"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("sh");
    let mut line = String::new();
    BufReader::new(sh.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("pid");
    let pid: u32 = line.trim().parse().expect("pid");
    (sh, pid, pidfd_of(pid))
}

#[test]
fn reaper_fd_that_is_not_a_pidfd_is_refused_and_left_open() {
    for fd in [-1, 0, 1, 2] {
        assert!(Reaper::adopt(fd).is_err(), "{fd} adopted");
    }
    for fd in 0..3 {
        assert!(is_open(fd), "stdio {fd} was closed");
    }
    let f = std::fs::File::open("/proc/self/status").expect("file");
    let e = Reaper::adopt(f.as_raw_fd()).expect_err("a file adopted");
    assert!(e.contains("not a pidfd"), "{e}");
    assert!(is_open(f.as_raw_fd()), "a refused fd was closed");
    let closed = std::fs::File::open("/proc/self/status")
        .expect("file")
        .into_raw_fd();
    // SAFETY: closing the fd this test just opened.
    unsafe { libc::close(closed) };
    assert!(Reaper::adopt(closed).is_err());
}

/// A pidfd of a process that is not our child (here a grandchild, standing for a recycled or
/// foreign pid) is refused, and that process is never signalled.
#[test]
fn reaper_pidfd_of_a_foreign_process_is_refused_and_not_signalled() {
    let (mut sh, pid, pidfd) = grandchild();
    let e = Reaper::adopt(pidfd.as_raw_fd()).expect_err("a foreign pidfd adopted");
    assert!(e.contains("not of a child"), "{e}");
    assert!(is_open(pidfd.as_raw_fd()));
    assert!(alive(&pidfd), "the foreign process {pid} was signalled");
    rustix::process::pidfd_send_signal(&pidfd, rustix::process::Signal::KILL).expect("kill");
    sh.wait().expect("sh");
}

/// Our own child, alive, exited but not reaped, or already reaped.
#[test]
// The children are reaped through their pidfds by `Reaper`, which is what is tested.
#[allow(clippy::zombie_processes)]
fn reaper_pidfd_of_our_child_is_killed_and_reaped_exactly_once() {
    // Alive: adopted, killed and reaped when dropped.
    let c = Command::new("sleep").arg("30").spawn().expect("sleep");
    let pidfd = pidfd_of(c.id());
    let watch = rustix::io::fcntl_dupfd_cloexec(&pidfd, 3).expect("dup");
    let r = Reaper::adopt(pidfd.into_raw_fd()).expect("adopt our child");
    assert!(
        cloexec(r.fd().as_raw_fd()),
        "adopted pidfd not close-on-exec"
    );
    assert!(alive(&watch));
    drop(r);
    assert!(!alive(&watch) && reaped(c.id()), "not killed and reaped");

    // Already exited (a zombie): adopted, and reaped without a wait.
    let c = Command::new("true").spawn().expect("true");
    let pidfd = pidfd_of(c.id());
    let mut p = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd; waits until the child has exited.
    assert_eq!(unsafe { libc::poll(&mut p, 1, 10_000) }, 1);
    let mut r = Reaper::adopt(pidfd.into_raw_fd()).expect("adopt an exited child");
    r.kill();
    assert!(r.try_reap(), "an exited child is reaped at once");
    assert!(reaped(c.id()));
    drop(r);

    // Exited and already reaped (its pid free for reuse): refused, nothing signalled.
    let mut c = Command::new("true").spawn().expect("true");
    let pidfd = pidfd_of(c.id());
    c.wait().expect("wait");
    let e = Reaper::adopt(pidfd.as_raw_fd()).expect_err("a reaped child adopted");
    assert!(e.contains("not of a child"), "{e}");
    assert!(is_open(pidfd.as_raw_fd()));
}

fn memfd(name: &str, size: u64) -> OwnedFd {
    let fd = rustix::fs::memfd_create(name, rustix::fs::MemfdFlags::ALLOW_SEALING).expect("memfd");
    rustix::fs::ftruncate(&fd, size).expect("ftruncate");
    fd
}

fn boot_with_ram_fd(fd: RawFd) -> Result<Host, BootError> {
    Host::boot(BootParams {
        ram_size: 64 << 20,
        ram_fd: Some(fd),
        ..Default::default()
    })
}

/// Review #8: `--ram-fd` is checked before it is owned; a bad one is refused and not closed.
#[test]
fn bad_ram_fd_is_refused_without_closing_it() {
    let file = std::fs::File::open("/proc/self/status").expect("file");
    let small = memfd("not-ram", 32 << 20);
    let mut bad: Vec<(String, RawFd)> = vec![
        ("stdin".into(), 0),
        ("stdout".into(), 1),
        ("stderr".into(), 2),
        ("negative".into(), -5),
        ("a regular file".into(), file.as_raw_fd()),
        ("a memfd of the wrong size".into(), small.as_raw_fd()),
    ];
    // A tmpfs file has seals too, but is no memfd.
    let shm =
        std::path::Path::new("/dev/shm").join(format!("handover-test-{}", std::process::id()));
    let tmpfs = std::fs::File::create(&shm).ok();
    if let Some(f) = &tmpfs {
        f.set_len(64 << 20).expect("set_len");
        bad.push(("a tmpfs file".into(), f.as_raw_fd()));
    }
    for (what, fd) in &bad {
        match boot_with_ram_fd(*fd) {
            Err(BootError::RamFd { fd: f, why }) => assert_eq!(f, *fd, "{what}: {why}"),
            Err(e) => panic!("{what}: refused for another reason: {e}"),
            Ok(_) => panic!("{what}: adopted as RAM"),
        }
        if *fd >= 0 {
            assert!(is_open(*fd), "{what}: fd {fd} was closed");
        }
    }
    let _ = std::fs::remove_file(&shm);
    let closed = memfd("closed", 64 << 20).into_raw_fd();
    // SAFETY: closing the fd this test just made.
    unsafe { libc::close(closed) };
    assert!(matches!(
        boot_with_ram_fd(closed),
        Err(BootError::RamFd { .. })
    ));

    // The real thing, inheritable as the previous image leaves it: adopted, close-on-exec again.
    let ram = memfd("handover-ram", 64 << 20);
    rustix::io::fcntl_setfd(&ram, rustix::io::FdFlags::empty()).expect("F_SETFD");
    let fd = ram.into_raw_fd();
    let h = boot_with_ram_fd(fd).expect("a good RAM fd refused");
    assert_eq!(h.mm().ram.fd().as_raw_fd(), fd);
    assert!(cloexec(fd), "adopted RAM fd is not close-on-exec");
}

/// Review 2.5: nothing ignores SIGCHLD any more, so child processes can be waited for after a
/// KHO boot.
#[test]
fn command_wait_works_after_a_kho_boot() {
    let h = Host::boot(BootParams {
        ram_size: 64 << 20,
        ..Default::default()
    })
    .expect("boot");
    let h = h.kexec_in_process().expect("kexec");
    assert!(h.info().kho_boot);
    let st = Command::new("true").status().expect("wait for a child");
    assert!(st.success());
    // SAFETY: reads the current disposition only.
    let old = unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGCHLD, std::ptr::null(), &mut old);
        old
    };
    assert_ne!(old.sa_sigaction, libc::SIG_IGN, "SIGCHLD is ignored");
}

/// Through real execs: the reaper's pidfd goes across the exec, is adopted by the next image,
/// and reaped there before it halts.
#[test]
fn kexec_passes_the_reaper_by_pidfd() {
    let r = common::boot("reaper", "256M", "luo-kexec-simple", &[], &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("reaper adopted"), "{}", r.stderr);
    assert!(r.stderr.contains("reaper reaped"), "{}", r.stderr);
    assert!(!r.stderr.contains("ignoring --reaper-fd"), "{}", r.stderr);
}

/// A `--reaper-fd` that is no pidfd, or a pidfd of a process that is not the image's child, and
/// an old image's `--reaper-pid`, are ignored: the image boots and signals nothing.
#[test]
fn boot_ignores_a_foreign_reaper() {
    let boot = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_handover"))
            .args(["boot", "--ram", "64M"])
            .args(extra)
            .output()
            .expect("run handover");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = boot(&["--reaper-fd", "1"]);
    assert!(e.contains("ignoring --reaper-fd 1"), "{e}");

    // A pidfd of our child: a sibling of the image, not its child.
    let mut c = Command::new("sleep").arg("30").spawn().expect("sleep");
    let pidfd = pidfd_of(c.id());
    rustix::io::fcntl_setfd(&pidfd, rustix::io::FdFlags::empty()).expect("F_SETFD");
    let n = pidfd.as_raw_fd().to_string();
    let pid = c.id().to_string();
    let e = boot(&["--reaper-fd", &n, "--reaper-pid", &pid]);
    assert!(e.contains("not of a child"), "{n}: {e}");
    assert!(alive(&pidfd), "the image signalled a process not its own");
    rustix::process::pidfd_send_signal(&pidfd, rustix::process::Signal::KILL).expect("kill");
    c.wait().expect("wait");
}

/// The binary the tests run is built with the test hooks (the self dev-dependency in
/// Cargo.toml): tests that inject faults or corrupt handovers really reach them. A production
/// build says `off` and lists no hook programs (checked by `.ci/run` on the release binary).
#[test]
fn test_binary_has_the_test_hooks() {
    let out = Command::new(env!("CARGO_BIN_EXE_handover"))
        .args(["boot", "--init", "list"])
        .output()
        .expect("run handover");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("# test-hooks: on\n"), "{text}");
    assert!(text.contains("\nkho-test "), "{text}");
    assert!(text.contains("\nluo-freeze-fail "), "{text}");
}
