//! Session fds: PRESERVE_FD, RETRIEVE_FD, FINISH, GET_NAME, and what closing one means.

use crate::abi::errno::{Errno, SysResult};
use crate::abi::luo::{
    PreserveFd, SessionFinish, SessionGetName, LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_SESSION_FINISH,
    LIVEUPDATE_SESSION_GET_NAME, LIVEUPDATE_SESSION_PRESERVE_FD, LIVEUPDATE_SESSION_RETRIEVE_FD,
};
use crate::host::Host;
use crate::uapi::Pid;

use crate::luo::{ucmd, SessionId, SessionKind};

impl Host {
    pub(crate) fn luo_session_ioctl(
        &mut self,
        pid: Pid,
        sid: SessionId,
        cmd: u64,
        arg: &mut [u8],
    ) -> SysResult<i64> {
        let (ty, nr, clean) = ucmd::decode(cmd);
        if ty != LIVEUPDATE_IOCTL_TYPE || !clean {
            return Err(Errno::ENOTTY);
        }
        if !(0x40..=0x43).contains(&nr) {
            return Err(Errno::EINVAL);
        }
        let kind = self.luo.session(sid).map(|s| s.kind).ok_or(Errno::EINVAL)?;
        let outgoing = kind == SessionKind::Outgoing;
        match cmd {
            LIVEUPDATE_SESSION_PRESERVE_FD => {
                if !outgoing {
                    return Err(Errno::EINVAL);
                }
                let a: PreserveFd = ucmd::read(arg, 16)?;
                self.luo_preserve_fd(pid, sid, a.fd, a.token)?;
                Ok(0)
            }
            LIVEUPDATE_SESSION_RETRIEVE_FD => {
                if outgoing {
                    return Err(Errno::EINVAL);
                }
                let mut a: PreserveFd = ucmd::read(arg, 16)?;
                let file = self.luo_retrieve_file(sid, a.token)?;
                let fd = self.fd_install(pid, file, true)?;
                a.fd = fd;
                ucmd::respond(arg, &a)?;
                Ok(0)
            }
            LIVEUPDATE_SESSION_FINISH => {
                if outgoing {
                    return Err(Errno::EINVAL);
                }
                let a: SessionFinish = ucmd::read(arg, 8)?;
                if a.reserved != 0 {
                    return Err(Errno::EINVAL);
                }
                self.luo_finish_session(sid)?;
                Ok(0)
            }
            LIVEUPDATE_SESSION_GET_NAME => {
                let mut a: SessionGetName = ucmd::read(arg, 8)?;
                if a.reserved != 0 {
                    return Err(Errno::EINVAL);
                }
                let name = self
                    .luo
                    .session(sid)
                    .map(|s| s.name.clone())
                    .ok_or(Errno::EINVAL)?;
                a.name = crate::abi::put_cstr(&name).ok_or(Errno::EINVAL)?;
                ucmd::respond(arg, &a)?;
                Ok(0)
            }
            _ => Err(Errno::ENOTTY),
        }
    }

    /// The last reference to a session fd went away. Outgoing: every file is unpreserved (the
    /// session is gone). Retrieved incoming: an implicit FINISH; if a handler refuses, the
    /// session goes back to "not retrieved" so it can be retrieved and finished later.
    pub(crate) fn luo_session_release(&mut self, sid: SessionId) {
        let Some(kind) = self.luo.session(sid).map(|s| s.kind) else {
            return;
        };
        match kind {
            SessionKind::Outgoing => {
                self.luo_unpreserve_all(sid);
                self.luo.outgoing.retain(|&x| x != sid);
                self.luo.sessions.remove(&sid);
            }
            SessionKind::Incoming { .. } => match self.luo_finish_session(sid) {
                Ok(()) => {
                    self.luo.sessions.remove(&sid);
                    self.luo_maybe_commit();
                }
                Err(e) => {
                    tracing::warn!("liveupdate: implicit finish of a closed session failed: {e}");
                    if let Some(s) = self.luo.session_mut(sid) {
                        s.kind = SessionKind::Incoming { retrieved: false };
                    }
                }
            },
        }
    }
}
