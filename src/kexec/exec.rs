//! The `execve` that plays kexec: the next image's command line ([`BootParams::to_args`]) with
//! only stdio, the RAM memfd and the reaper's pidfd inherited.

use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use super::params::BootParams;

/// `execve` `image` booting with `params`, keeping the fds they name (`ram_fd`, `reaper_fd`)
/// open and nothing else (see [`exec_keeping`]). Returns only if the exec failed.
pub(crate) fn exec_image(image: &Path, params: &BootParams) -> std::io::Error {
    let args = params.to_args();
    tracing::debug!(
        "kexec into {} {}",
        image.display(),
        args.iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let mut cmd = Command::new(image);
    cmd.args(&args);
    let keep: Vec<RawFd> = params.ram_fd.into_iter().chain(params.reaper_fd).collect();
    exec_keeping(&mut cmd, &keep)
}

/// `execve` `cmd` with only stdio and `keep` inherited, as a kexec leaves nothing else open.
/// Returns only if the exec failed.
///
/// Every fd from 3 up is made close-on-exec right before the exec (`close_range` with
/// `CLOSE_RANGE_CLOEXEC`, in this process: `Command::exec` does not fork), and `keep` is made
/// inheritable. This process has other threads (vCPUs, the guest fault service, slot binders);
/// they run on until the exec replaces the process. If the exec fails, `keep` gets its old
/// flags back. Not restored: any other fd that was inheritable stays close-on-exec. The host
/// opens all of its own fds close-on-exec, so only fds inherited from whoever started the image
/// can be affected, and the host execs nothing but the next image. (Listing the inheritable fds
/// beforehand to restore them costs 90–170 µs of `/proc/self/fd` and `fcntl` calls here, inside
/// the guest's blackout; measured with 13 open fds.)
pub(crate) fn exec_keeping(cmd: &mut Command, keep: &[RawFd]) -> std::io::Error {
    // SAFETY: F_GETFD only reads this process's fd table.
    let getfd = |fd: RawFd| unsafe { libc::fcntl(fd, libc::F_GETFD) };
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
    err
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    fn getfd(fd: RawFd) -> i32 {
        // SAFETY: F_GETFD only reads the fd table.
        unsafe { libc::fcntl(fd, libc::F_GETFD) }
    }

    /// Review 2.3: after a failed exec the kept fd (cleared for the exec) is close-on-exec
    /// again and a close-on-exec fd stays so; an fd that was inheritable is left close-on-exec,
    /// as `exec_keeping` documents.
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
        assert_eq!(getfd(inheritable.as_raw_fd()), libc::FD_CLOEXEC);
    }
}
