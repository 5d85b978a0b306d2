//! A small user-space library over `/dev/liveupdate` (like the selftests' `libliveupdate`):
//! builds the upstream argument structs byte for byte and issues the ioctls.

use zerocopy::{FromBytes, IntoBytes};

use crate::abi::luo::*;
use crate::host::Host;
use crate::uapi::{Errno, Pid, SysResult};

fn name64(name: &str) -> [u8; 64] {
    let mut n = [0u8; 64];
    let b = name.as_bytes();
    let len = b.len().min(64);
    n[..len].copy_from_slice(&b[..len]);
    n
}

/// `LIVEUPDATE_IOCTL_CREATE_SESSION` on the device fd `dev`: the new session's fd. `name` is
/// copied as is (cut at 64 bytes), so an empty or 64-byte name gets the host's EINVAL.
pub fn create_session(h: &mut Host, pid: Pid, dev: i32, name: &str) -> SysResult<i32> {
    session_call(h, pid, dev, LIVEUPDATE_IOCTL_CREATE_SESSION, name)
}

/// `LIVEUPDATE_IOCTL_RETRIEVE_SESSION` on `dev`: the incoming session's fd (ENOENT if there
/// is none of that name, EINVAL if it was retrieved already).
pub fn retrieve_session(h: &mut Host, pid: Pid, dev: i32, name: &str) -> SysResult<i32> {
    session_call(h, pid, dev, LIVEUPDATE_IOCTL_RETRIEVE_SESSION, name)
}

fn session_call(h: &mut Host, pid: Pid, dev: i32, cmd: u64, name: &str) -> SysResult<i32> {
    let mut a = CreateSession {
        size: 72,
        fd: -1,
        name: name64(name),
    };
    let buf = a.as_mut_bytes();
    h.ioctl(pid, dev, cmd, buf)?;
    Ok(CreateSession::read_from_bytes(buf)
        .map_err(|_| Errno::EFAULT)?
        .fd)
}

/// `LIVEUPDATE_SESSION_PRESERVE_FD`: preserve the file `fd` in `session` under `token`.
pub fn preserve_fd(h: &mut Host, pid: Pid, session: i32, fd: i32, token: u64) -> SysResult<()> {
    let mut a = PreserveFd {
        size: 16,
        fd,
        token,
    };
    h.ioctl(
        pid,
        session,
        LIVEUPDATE_SESSION_PRESERVE_FD,
        a.as_mut_bytes(),
    )?;
    Ok(())
}

/// `LIVEUPDATE_SESSION_RETRIEVE_FD`: a new fd for the file preserved under `token` in the
/// incoming `session`.
pub fn retrieve_fd(h: &mut Host, pid: Pid, session: i32, token: u64) -> SysResult<i32> {
    let mut a = PreserveFd {
        size: 16,
        fd: -1,
        token,
    };
    h.ioctl(
        pid,
        session,
        LIVEUPDATE_SESSION_RETRIEVE_FD,
        a.as_mut_bytes(),
    )?;
    Ok(a.fd)
}

/// `LIVEUPDATE_SESSION_FINISH` on an incoming session (EBUSY if a file cannot finish yet).
pub fn finish(h: &mut Host, pid: Pid, session: i32) -> SysResult<()> {
    let mut a = SessionFinish {
        size: 8,
        reserved: 0,
    };
    h.ioctl(pid, session, LIVEUPDATE_SESSION_FINISH, a.as_mut_bytes())?;
    Ok(())
}

/// `LIVEUPDATE_SESSION_GET_NAME`: the session's full name.
pub fn get_name(h: &mut Host, pid: Pid, session: i32) -> SysResult<String> {
    let mut a = SessionGetName {
        size: 72,
        reserved: 0,
        name: [0; 64],
    };
    h.ioctl(pid, session, LIVEUPDATE_SESSION_GET_NAME, a.as_mut_bytes())?;
    crate::abi::cstr_field(&a.name).ok_or(Errno::EINVAL)
}

/// A one-page memfd holding `text` (the selftests' `create_and_preserve_memfd`, without the
/// preserve).
pub fn memfd_with(h: &mut Host, pid: Pid, text: &[u8]) -> SysResult<i32> {
    let fd = h.memfd_create(pid, "test", 0)?;
    h.ftruncate(pid, fd, crate::mm::PAGE_SIZE)?;
    h.pwrite(pid, fd, text, 0)?;
    Ok(fd)
}

/// Read `len` bytes of a memfd from offset 0.
pub fn read_all(h: &mut Host, pid: Pid, fd: i32, len: usize) -> SysResult<Vec<u8>> {
    let mut b = vec![0u8; len];
    let n = h.pread(pid, fd, &mut b, 0)?;
    b.truncate(n);
    Ok(b)
}
