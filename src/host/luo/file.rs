//! Files in sessions: preserve (with the "preserved once" rule), retrieve (any order, cached,
//! sticky failures), finish, unpreserve, and the cross-file internal API handlers use to find
//! each other.

use crate::abi::errno::{Errno, SysResult};
use crate::fs::FileId;
use crate::host::Host;
use crate::uapi::Pid;

use crate::luo::{FileArgs, LuoFile, SessionId};

impl Host {
    /// Lend a file's args to a handler callback: `(handler, args)`; give them back with
    /// [`Host::luo_put_args`].
    fn luo_take_args(
        &mut self,
        sid: SessionId,
        idx: usize,
    ) -> Option<(std::sync::Arc<dyn crate::luo::FileHandler<Host>>, FileArgs)> {
        let f = self.luo.session_mut(sid)?.files.get_mut(idx)?;
        f.busy = true;
        Some((f.handler.clone(), std::mem::take(&mut f.args)))
    }

    fn luo_put_args(&mut self, sid: SessionId, token: u64, args: FileArgs) {
        if let Some(f) = self
            .luo
            .session_mut(sid)
            .and_then(|s| s.files.iter_mut().find(|f| f.busy && f.token == token))
        {
            f.args = args;
            f.busy = false;
        }
    }

    fn luo_index(&self, sid: SessionId, token: u64) -> Option<usize> {
        self.luo
            .session(sid)?
            .files
            .iter()
            .position(|f| f.token == token)
    }

    pub(crate) fn luo_preserve_fd(
        &mut self,
        pid: Pid,
        sid: SessionId,
        fd: i32,
        token: u64,
    ) -> SysResult<()> {
        if self.luo_index(sid, token).is_some() {
            return Err(Errno::EEXIST);
        }
        let file = self.fd_file(pid, fd)?;
        let handler = self
            .luo
            .handlers
            .clone()
            .into_iter()
            .find(|h| h.can_preserve(self, file))
            .ok_or(Errno::ENOENT)?;
        let id = handler.get_id(self, file);
        if self.luo.preserved_ids.contains_key(&id) {
            return Err(Errno::EBUSY);
        }
        self.fget(file);
        let mut args = FileArgs {
            session: sid,
            token,
            file: Some(file),
            ..Default::default()
        };
        let r = if crate::fault::hit(&format!("luo.preserve:{}", handler.compatible())) {
            Err(Errno::ENOMEM)
        } else {
            handler.preserve(self, &mut args)
        };
        if let Err(e) = r {
            self.fput(file);
            return Err(e);
        }
        self.luo.preserved_ids.insert(id, sid);
        let s = self.luo.session_mut(sid).ok_or(Errno::EINVAL)?;
        s.files.push(LuoFile {
            token,
            handler,
            id: Some(id),
            args,
            busy: false,
        });
        Ok(())
    }

    /// Unpreserve every file of an outgoing session, last first.
    pub(crate) fn luo_unpreserve_all(&mut self, sid: SessionId) {
        self.luo_drain_files(sid, |h, host, args| h.unpreserve(host, args));
    }

    /// Take the files out of session `sid`, last first: `op` runs the handler's callback on
    /// each, then the file leaves the session, its "preserved once" id is released and the
    /// session's reference on it is dropped.
    fn luo_drain_files(
        &mut self,
        sid: SessionId,
        op: impl Fn(&dyn crate::luo::FileHandler<Host>, &mut Host, &mut FileArgs),
    ) {
        while let Some(n) = self
            .luo
            .session(sid)
            .map(|s| s.files.len())
            .filter(|&n| n > 0)
        {
            let Some((h, mut args)) = self.luo_take_args(sid, n - 1) else {
                break;
            };
            op(h.as_ref(), self, &mut args);
            if let Some(f) = self.luo.session_mut(sid).and_then(|s| s.files.pop()) {
                if let Some(id) = f.id {
                    self.luo.preserved_ids.remove(&id);
                }
            }
            if let Some(file) = args.file {
                self.fput(file);
            }
        }
    }

    /// Retrieve the incoming file under `token`; the caller gets its own reference. A second
    /// retrieve returns the same file; a failed one fails the same way every time.
    pub fn luo_retrieve_file(&mut self, sid: SessionId, token: u64) -> SysResult<FileId> {
        let idx = self.luo_index(sid, token).ok_or(Errno::ENOENT)?;
        let f = &self.luo.session(sid).ok_or(Errno::ENOENT)?.files[idx];
        if f.busy {
            return Err(Errno::EBUSY);
        }
        match f.args.retrieve_status {
            s if s > 0 => {
                let file = f.args.file.ok_or(Errno::EIO)?;
                self.fget(file);
                return Ok(file);
            }
            s if s < 0 => return Err(Errno(-s)),
            _ => {}
        }
        let (h, mut args) = self.luo_take_args(sid, idx).ok_or(Errno::ENOENT)?;
        let r = if crate::fault::hit(&format!("luo.retrieve:{}", h.compatible())) {
            Err(Errno::EIO)
        } else {
            h.retrieve(self, &mut args)
        };
        let out = match (r, args.file) {
            (Ok(()), Some(file)) => {
                args.retrieve_status = 1;
                self.fget(file);
                // Until its session finishes, a retrieved file is still "in" that session: it
                // cannot be preserved anywhere else (upstream adds it to the preserved set).
                let id = h.get_id(self, file);
                self.luo.preserved_ids.insert(id, sid);
                if let Some(f) = self
                    .luo
                    .session_mut(sid)
                    .and_then(|s| s.files.iter_mut().find(|f| f.busy && f.token == token))
                {
                    f.id = Some(id);
                }
                Ok(file)
            }
            (Ok(()), None) => {
                args.retrieve_status = -libc::EIO;
                Err(Errno::EIO)
            }
            (Err(e), _) => {
                args.retrieve_status = -e.0;
                Err(e)
            }
        };
        self.luo_put_args(sid, token, args);
        out
    }

    /// FINISH: every handler must agree (`can_finish`), then `finish` runs last to first and
    /// the files leave the session.
    pub(crate) fn luo_finish_session(&mut self, sid: SessionId) -> SysResult<()> {
        let s = self.luo.session(sid).ok_or(Errno::EINVAL)?;
        if s.files.iter().any(|f| {
            f.busy
                || !f.handler.can_finish(self, &f.args)
                || crate::fault::hit(&format!("luo.can_finish:{}", f.handler.compatible()))
        }) {
            return Err(Errno::EBUSY);
        }
        // FINISH accepts the update: nothing rolls back after it.
        self.kho
            .commit(&mut self.mm)
            .map_err(crate::abi::errno::Errno::from)?;
        self.luo_drain_files(sid, |h, host, args| h.finish(host, args));
        Ok(())
    }

    /// Cross-file API, for `freeze`: the token under which `file` is preserved in the same
    /// outgoing session (ENOENT if it is not).
    pub fn luo_get_token_outgoing(&self, sid: SessionId, file: FileId) -> SysResult<u64> {
        self.luo.find_file(sid, file).ok_or(Errno::ENOENT)
    }

    /// Cross-file API, for `retrieve`: the incoming file preserved under `token` in the same
    /// session, retrieved first if needed. The caller gets its own reference.
    pub fn luo_get_file_incoming(&mut self, sid: SessionId, token: u64) -> SysResult<FileId> {
        self.luo_retrieve_file(sid, token)
    }
}
