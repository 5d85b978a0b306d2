//! `/dev/liveupdate` on the host: exclusive open, first-open deserialization (sticky EIO on
//! failure), CREATE_SESSION and RETRIEVE_SESSION.

use crate::abi::errno::{Errno, SysResult};
use crate::abi::luo::{
    CreateSession, LIVEUPDATE_IOCTL_CREATE_SESSION, LIVEUPDATE_IOCTL_RETRIEVE_SESSION,
    LIVEUPDATE_IOCTL_TYPE,
};
use crate::fs::FileId;
use crate::host::files::FileKind;
use crate::host::Host;
use crate::luo::core::*;
use crate::luo::{ucmd, Session, SessionKind};
use crate::uapi::Pid;

impl Host {
    pub(crate) fn luo_open(&mut self) -> SysResult<FileId> {
        if !self.luo.enabled {
            return Err(Errno::ENOENT);
        }
        if self.luo.dev_open {
            return Err(Errno::EBUSY);
        }
        if self.luo.deserialized.is_none() {
            let r = self.luo_deserialize().map_err(|e| {
                tracing::error!("liveupdate: cannot restore the handed-over sessions: {e}");
                libc::EIO
            });
            self.luo.deserialized = Some(r);
        }
        if let Some(Err(e)) = self.luo.deserialized {
            return Err(Errno(e));
        }
        self.luo.dev_open = true;
        Ok(self.files.install(FileKind::Liveupdate))
    }

    /// Closing the device does not touch sessions.
    pub(crate) fn luo_dev_release(&mut self) {
        self.luo.dev_open = false;
    }

    pub(crate) fn luo_dev_ioctl(&mut self, pid: Pid, cmd: u64, arg: &mut [u8]) -> SysResult<i64> {
        let (ty, nr, clean) = ucmd::decode(cmd);
        if ty != LIVEUPDATE_IOCTL_TYPE || !clean {
            return Err(Errno::ENOTTY);
        }
        if nr > 0x01 {
            return Err(Errno::EINVAL);
        }
        match cmd {
            LIVEUPDATE_IOCTL_CREATE_SESSION => self.luo_create_session(pid, arg),
            LIVEUPDATE_IOCTL_RETRIEVE_SESSION => self.luo_retrieve_session(pid, arg),
            _ => Err(Errno::ENOTTY),
        }
    }

    fn luo_create_session(&mut self, pid: Pid, arg: &mut [u8]) -> SysResult<i64> {
        let mut a: CreateSession = ucmd::read(arg, std::mem::size_of::<CreateSession>())?;
        let name = session_name(&a.name)?;
        if self
            .luo
            .outgoing
            .iter()
            .any(|id| self.luo.sessions.get(id).is_some_and(|s| s.name == name))
        {
            return Err(Errno::EEXIST);
        }
        self.proc_ref(pid)?;
        self.luo.next_session += 1;
        let sid = self.luo.next_session;
        self.luo.sessions.insert(
            sid,
            Session {
                name,
                kind: SessionKind::Outgoing,
                files: Vec::new(),
            },
        );
        self.luo.outgoing.push(sid);
        let file = self.files.install(FileKind::Session(sid));
        let fd = self.fd_install(pid, file, true)?;
        a.fd = fd;
        ucmd::respond(arg, &a)?;
        Ok(0)
    }

    fn luo_retrieve_session(&mut self, pid: Pid, arg: &mut [u8]) -> SysResult<i64> {
        let mut a: CreateSession = ucmd::read(arg, std::mem::size_of::<CreateSession>())?;
        let name = session_name(&a.name)?;
        let sid = self
            .luo
            .sessions
            .iter()
            .find(|(_, s)| s.name == name && matches!(s.kind, SessionKind::Incoming { .. }))
            .map(|(id, _)| *id)
            .ok_or(Errno::ENOENT)?;
        self.proc_ref(pid)?;
        let s = self.luo.sessions.get_mut(&sid).ok_or(Errno::ENOENT)?;
        if s.kind == (SessionKind::Incoming { retrieved: true }) {
            return Err(Errno::EINVAL);
        }
        s.kind = SessionKind::Incoming { retrieved: true };
        let file = self.files.install(FileKind::Session(sid));
        let fd = self.fd_install(pid, file, true)?;
        a.fd = fd;
        ucmd::respond(arg, &a)?;
        Ok(0)
    }
}
