//! `/dev/liveupdate` with raw `ioctl`s: the upstream request numbers and argument layouts (the
//! same facts as `tests/userspace/liveupdate.h`), declared here again because no crate has them.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// The device.
pub const DEV_PATH: &CStr = c"/dev/liveupdate";

/// `reboot(2)` command that starts the live update (`LINUX_REBOOT_CMD_KEXEC`, as `kexec -e`).
pub const LINUX_REBOOT_CMD_KEXEC: libc::c_int = 0x4558_4543;

// Every request is _IO(0xBA, nr): no size or direction bits, so the value is 0xBA00 | nr.
const CREATE_SESSION: u64 = 0xBA00;
const RETRIEVE_SESSION: u64 = 0xBA01;
const PRESERVE_FD: u64 = 0xBA40;
const RETRIEVE_FD: u64 = 0xBA41;
const FINISH: u64 = 0xBA42;

/// Session names are at most 63 bytes plus the terminating NUL.
const NAME_LEN: usize = 64;

/// `liveupdate_ioctl_create_session` and `liveupdate_ioctl_retrieve_session` (same layout):
/// name in, the session's fd out.
#[repr(C)]
struct SessionArg {
    size: u32,
    fd: i32,
    name: [u8; NAME_LEN],
}

/// `liveupdate_session_preserve_fd` (fd and token in) and `liveupdate_session_retrieve_fd`
/// (token in, fd out).
#[repr(C)]
struct FdArg {
    size: u32,
    fd: i32,
    token: u64,
}

/// `liveupdate_session_finish`: a reserved word that must be zero.
#[repr(C)]
struct FinishArg {
    size: u32,
    reserved: u32,
}

const _: () = assert!(std::mem::size_of::<SessionArg>() == 72);
const _: () = assert!(std::mem::size_of::<FdArg>() == 16);
const _: () = assert!(std::mem::size_of::<FinishArg>() == 8);

/// Each struct starts with its own size.
fn size_of<T>() -> u32 {
    std::mem::size_of::<T>() as u32
}

/// `ioctl(fd, req, arg)`: the return value, or the errno.
fn ioctl<T>(fd: RawFd, req: u64, arg: &mut T) -> io::Result<libc::c_int> {
    // SAFETY: `arg` is a live, exclusively borrowed `#[repr(C)]` struct of exactly the size its
    // leading `size` field announces; the kernel reads and writes only within it.
    let r = unsafe { libc::ioctl(fd, req as _, arg as *mut T) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Take ownership of an fd the kernel just returned.
fn owned(fd: i32) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::other(format!("the kernel returned fd {fd}")));
    }
    // SAFETY: the ioctl returned this new fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Open `/dev/liveupdate`.
pub fn open() -> io::Result<OwnedFd> {
    // SAFETY: a NUL-terminated path; open(2) touches nothing else.
    let fd = unsafe { libc::open(DEV_PATH.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    owned(fd)
}

fn session(dev: BorrowedFd<'_>, name: &str, req: u64) -> io::Result<OwnedFd> {
    let mut arg = SessionArg {
        size: size_of::<SessionArg>(),
        fd: -1,
        name: [0; NAME_LEN],
    };
    if name.len() >= NAME_LEN || name.contains('\0') {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    arg.name[..name.len()].copy_from_slice(name.as_bytes());
    ioctl(dev.as_raw_fd(), req, &mut arg)?;
    owned(arg.fd)
}

/// `LIVEUPDATE_IOCTL_CREATE_SESSION`: a new outgoing session.
pub fn create_session(dev: BorrowedFd<'_>, name: &str) -> io::Result<OwnedFd> {
    session(dev, name, CREATE_SESSION)
}

/// `LIVEUPDATE_IOCTL_RETRIEVE_SESSION`: an incoming session (ENOENT before the first update).
pub fn retrieve_session(dev: BorrowedFd<'_>, name: &str) -> io::Result<OwnedFd> {
    session(dev, name, RETRIEVE_SESSION)
}

/// `LIVEUPDATE_SESSION_PRESERVE_FD`: preserve `fd` under `token`.
pub fn preserve_fd(session: BorrowedFd<'_>, fd: RawFd, token: u64) -> io::Result<()> {
    let mut arg = FdArg {
        size: size_of::<FdArg>(),
        fd,
        token,
    };
    ioctl(session.as_raw_fd(), PRESERVE_FD, &mut arg).map(drop)
}

/// `LIVEUPDATE_SESSION_RETRIEVE_FD`: the file preserved under `token`.
pub fn retrieve_fd(session: BorrowedFd<'_>, token: u64) -> io::Result<OwnedFd> {
    let mut arg = FdArg {
        size: size_of::<FdArg>(),
        fd: -1,
        token,
    };
    ioctl(session.as_raw_fd(), RETRIEVE_FD, &mut arg)?;
    owned(arg.fd)
}

/// `LIVEUPDATE_SESSION_FINISH`: every file of the session is retrieved; release the rest.
pub fn finish(session: BorrowedFd<'_>) -> io::Result<()> {
    let mut arg = FinishArg {
        size: size_of::<FinishArg>(),
        reserved: 0,
    };
    ioctl(session.as_raw_fd(), FINISH, &mut arg).map(drop)
}

/// `reboot(LINUX_REBOOT_CMD_KEXEC)`: start the live update. Returns only if it was refused.
pub fn kexec() -> io::Error {
    // SAFETY: reboot(2) with a command and no pointer.
    unsafe { libc::reboot(LINUX_REBOOT_CMD_KEXEC) };
    io::Error::last_os_error()
}
