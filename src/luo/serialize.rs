//! LUO across a kexec. Reboot: freeze every file of every outgoing session in order (undoing on
//! the first failure), then write sessions and files as KHO block chains under the "LUO"
//! subtree. Boot: read the header early (liveupdate number, compatible), and the sessions at the
//! first open of `/dev/liveupdate`.

use zerocopy::{FromBytes, IntoBytes};

use crate::abi::luo::{LuoFileSer, LuoSer, LuoSessionSer, LUO_ABI_COMPATIBLE, LUO_KHO_ENTRY_NAME};
use crate::abi::{cstr_field, put_cstr};
use crate::host::Host;
use crate::kho::block::BlockChain;
use crate::kho::KhoError;
use crate::mm::{Folio, PhysRead};

use super::{FileArgs, LuoFile, Session, SessionId, SessionKind};

/// What the reboot path wrote, to undo if the kexec does not happen.
pub struct LuoHandover {
    chains: Vec<BlockChain>,
    blob: Folio,
    frozen: Vec<(SessionId, u64)>,
}

#[derive(Debug, thiserror::Error)]
pub enum LuoError {
    #[error("freeze of token {token:#x} in session {session:?} ({handler}) failed: {errno}")]
    Freeze {
        session: String,
        token: u64,
        handler: &'static str,
        errno: crate::abi::errno::Errno,
    },
    #[error(transparent)]
    Kho(#[from] KhoError),
    #[error("{0}")]
    Bad(String),
}

/// The incoming LUO header, read at boot.
#[derive(Debug, Clone, Copy)]
pub struct IncomingHeader {
    pub blob_pa: u64,
    pub ser: LuoSer,
}

impl Host {
    fn luo_files_in_order(&self) -> Vec<(SessionId, u64)> {
        self.luo
            .outgoing
            .iter()
            .flat_map(|&sid| {
                self.luo
                    .session(sid)
                    .map(|s| s.files.iter().map(|f| (sid, f.token)).collect::<Vec<_>>())
                    .unwrap_or_default()
            })
            .collect()
    }

    fn luo_call(
        &mut self,
        sid: SessionId,
        token: u64,
        freeze: bool,
    ) -> crate::abi::errno::SysResult<()> {
        let Some(idx) = self
            .luo
            .session(sid)
            .and_then(|s| s.files.iter().position(|f| f.token == token))
        else {
            return Ok(());
        };
        let Some(f) = self.luo.session_mut(sid).and_then(|s| s.files.get_mut(idx)) else {
            return Ok(());
        };
        f.busy = true;
        let (h, mut args) = (f.handler.clone(), std::mem::take(&mut f.args));
        let r = if freeze {
            if crate::fault::hit(&format!("luo.freeze:{}", h.compatible())) {
                Err(crate::abi::errno::Errno::EIO)
            } else {
                h.freeze(self, &mut args)
            }
        } else {
            h.unfreeze(self, &mut args);
            Ok(())
        };
        if let Some(f) = self.luo.session_mut(sid).and_then(|s| s.files.get_mut(idx)) {
            f.args = args;
            f.busy = false;
        }
        r
    }

    fn luo_unfreeze(&mut self, frozen: &[(SessionId, u64)]) {
        for &(sid, token) in frozen.iter().rev() {
            let _ = self.luo_call(sid, token, false);
        }
    }

    /// Reboot path: freeze and serialize. On error nothing is left frozen or written.
    pub fn luo_serialize(&mut self) -> Result<Option<LuoHandover>, LuoError> {
        if !self.luo.enabled {
            return Ok(None);
        }
        let order = self.luo_files_in_order();
        let mut frozen = Vec::new();
        for &(sid, token) in &order {
            if let Err(errno) = self.luo_call(sid, token, true) {
                self.luo_unfreeze(&frozen);
                let s = self.luo.session(sid);
                let handler = s
                    .and_then(|s| s.files.iter().find(|f| f.token == token))
                    .map_or("?", |f| f.handler.compatible());
                return Err(LuoError::Freeze {
                    session: s.map(|s| s.name.clone()).unwrap_or_default(),
                    token,
                    handler,
                    errno,
                });
            }
            frozen.push((sid, token));
        }
        match self.luo_write() {
            Ok((chains, blob)) => Ok(Some(LuoHandover {
                chains,
                blob,
                frozen,
            })),
            Err(e) => {
                self.luo_unfreeze(&frozen);
                Err(e)
            }
        }
    }

    fn luo_write(&mut self) -> Result<(Vec<BlockChain>, Folio), LuoError> {
        let mut chains = Vec::new();
        let r = self.luo_write_inner(&mut chains);
        match r {
            Ok(blob) => Ok((chains, blob)),
            Err(e) => {
                for c in chains {
                    self.kho.unpreserve_blocks(&mut self.mm, c);
                }
                Err(e)
            }
        }
    }

    fn luo_write_inner(&mut self, chains: &mut Vec<BlockChain>) -> Result<Folio, LuoError> {
        if crate::fault::hit("luo.serialize") {
            return Err(LuoError::Bad("injected fault at luo.serialize".into()));
        }
        let mut sessions = Vec::new();
        for &sid in &self.luo.outgoing.clone() {
            let s = self
                .luo
                .session(sid)
                .ok_or_else(|| LuoError::Bad("session vanished".into()))?;
            let name =
                put_cstr::<64>(&s.name).ok_or_else(|| LuoError::Bad("session name".into()))?;
            let files: Vec<Vec<u8>> = s
                .files
                .iter()
                .map(|f| {
                    LuoFileSer {
                        compatible: put_cstr(f.handler.compatible()).unwrap_or([0; 48]),
                        data: f.args.serialized,
                        token: f.token,
                    }
                    .as_bytes()
                    .to_vec()
                })
                .collect();
            let count = files.len() as u64;
            let c = self.kho.preserve_blocks(&mut self.mm, 64, &files)?;
            for pa in c.page_addrs() {
                self.kho.label(pa, "luo-files");
            }
            let head = c.head;
            chains.push(c);
            sessions.push(
                LuoSessionSer {
                    name,
                    files: head,
                    count,
                }
                .as_bytes()
                .to_vec(),
            );
        }
        let c = self.kho.preserve_blocks(&mut self.mm, 80, &sessions)?;
        for pa in c.page_addrs() {
            self.kho.label(pa, "luo-sessions");
        }
        let sessions_pa = c.head;
        chains.push(c);
        let ser = LuoSer {
            compatible: put_cstr(LUO_ABI_COMPATIBLE).unwrap_or_default(),
            liveupdate_num: self.luo.liveupdate_num,
            sessions_pa,
            flbs_pa: 0,
        };
        let blob = self.kho.alloc_preserve(&mut self.mm, 32)?;
        self.kho.label(blob.pa(), "luo");
        self.mm
            .ram
            .write_phys(blob.pa(), ser.as_bytes())
            .map_err(KhoError::from)?;
        self.kho.remove_subtree(LUO_KHO_ENTRY_NAME);
        if let Err(e) = self.kho.add_subtree(LUO_KHO_ENTRY_NAME, blob.pa(), 32) {
            let _ = self.kho.unpreserve_free(&mut self.mm, blob);
            return Err(e.into());
        }
        Ok(blob)
    }

    /// Once no incoming session is left, the update is accepted: free what was read of it.
    pub(crate) fn luo_maybe_commit(&mut self) {
        let incoming = self.luo.sessions.len() - self.luo.outgoing.len();
        if incoming == 0 && self.luo_incoming.is_none() {
            if let Err(e) = self.kho.commit(&mut self.mm) {
                tracing::warn!("KHO commit: {e}");
            }
        }
    }

    /// The kexec did not happen: drop what was written and unfreeze.
    pub fn luo_abandon(&mut self, h: LuoHandover) {
        self.kho.remove_subtree(LUO_KHO_ENTRY_NAME);
        let _ = self.kho.unpreserve_free(&mut self.mm, h.blob);
        for c in h.chains {
            self.kho.unpreserve_blocks(&mut self.mm, c);
        }
        self.luo_unfreeze(&h.frozen);
    }

    /// Early boot: read the LUO header if the previous image left one. A bad header makes
    /// every open of `/dev/liveupdate` fail with EIO.
    pub(crate) fn luo_early_init(&mut self) {
        let st = match self.kho.retrieve_subtree(LUO_KHO_ENTRY_NAME) {
            Ok(s) => s,
            Err(_) => return,
        };
        let r = read_luo_header(&self.mm.ram, st.pa, st.size).map(|ser| IncomingHeader {
            blob_pa: st.pa,
            ser,
        });
        let r = r.and_then(|h| match h.ser.liveupdate_num.checked_add(1) {
            Some(n) => Ok((h, n)),
            None => Err(LuoError::Bad("LUO: liveupdate_num overflows".into())),
        });
        match r {
            Ok((h, n)) => {
                self.luo.liveupdate_num = n;
                self.luo_incoming = Some(h);
            }
            Err(e) => {
                tracing::error!("liveupdate: refusing the handed-over sessions: {e}");
                self.luo.deserialized = Some(Err(libc::EIO));
            }
        }
    }

    /// First open: rebuild the incoming sessions. Any failure is sticky (EIO).
    pub(crate) fn luo_deserialize(&mut self) -> Result<(), LuoError> {
        if crate::fault::hit("luo.deserialize") {
            return Err(LuoError::Bad("injected fault at luo.deserialize".into()));
        }
        let Some(h) = self.luo_incoming.take() else {
            return Ok(());
        };
        let entries = self
            .kho
            .restore_blocks(&mut self.mm, h.ser.sessions_pa, 80)?;
        let mut built: Vec<Session> = Vec::new();
        for e in entries {
            let s = LuoSessionSer::read_from_bytes(&e)
                .map_err(|_| LuoError::Bad("session entry".into()))?;
            let name = super::core::session_name(&s.name)
                .map_err(|_| LuoError::Bad("session name is not valid".into()))?;
            if built.iter().any(|b| b.name == name) {
                return Err(LuoError::Bad(format!("session {name:?} appears twice")));
            }
            let files = self.kho.restore_blocks(&mut self.mm, s.files, 64)?;
            if files.len() as u64 != s.count {
                return Err(LuoError::Bad(format!(
                    "session {name:?}: {} files, header says {}",
                    files.len(),
                    s.count
                )));
            }
            let mut out = Vec::new();
            for fe in files {
                let f = LuoFileSer::read_from_bytes(&fe)
                    .map_err(|_| LuoError::Bad("file entry".into()))?;
                let compat = cstr_field(&f.compatible)
                    .ok_or_else(|| LuoError::Bad("file compatible string".into()))?;
                let handler = self.luo.handler(&compat).ok_or_else(|| {
                    LuoError::Bad(format!(
                        "no handler for {compat:?} (session {name:?}, token {:#x})",
                        f.token
                    ))
                })?;
                if out.iter().any(|x: &LuoFile| x.token == f.token) {
                    return Err(LuoError::Bad(format!(
                        "session {name:?}: token {:#x} appears twice",
                        f.token
                    )));
                }
                out.push(LuoFile {
                    token: f.token,
                    handler,
                    id: None,
                    args: FileArgs {
                        token: f.token,
                        serialized: f.data,
                        ..Default::default()
                    },
                    busy: false,
                });
            }
            built.push(Session {
                name,
                kind: SessionKind::Incoming { retrieved: false },
                files: out,
            });
        }
        self.kho.restore_free(&mut self.mm, h.blob_pa)?;
        let none = built.is_empty();
        for mut s in built {
            self.luo.next_session += 1;
            let sid = self.luo.next_session;
            for f in &mut s.files {
                f.args.session = sid;
            }
            self.luo.sessions.insert(sid, s);
        }
        if none {
            self.luo_maybe_commit();
        }
        Ok(())
    }
}

/// Boot-time check of the incoming LUO state, before anything of the handover is touched:
/// header and compatible string, every session and file block, and a handler in this image for
/// every file. A failure here makes the image roll back instead of booting without the sessions.
pub fn validate(
    mem: &dyn PhysRead,
    inc: &crate::kho::Incoming,
    supported: &[&str],
) -> Result<(), LuoError> {
    let Some(st) = inc.tree.subtrees.get(LUO_KHO_ENTRY_NAME) else {
        return Ok(());
    };
    let ser = read_luo_header(mem, st.pa, st.size)?;
    let restorable = |pa: u64| {
        pa % crate::mm::PAGE_SIZE == 0 && inc.tracker.order_of(pa / crate::mm::PAGE_SIZE).is_some()
    };
    let (_, sessions) = crate::kho::block::walk_chain(mem, ser.sessions_pa, 80, &restorable)?;
    for e in sessions {
        let s = LuoSessionSer::read_from_bytes(&e)
            .map_err(|_| LuoError::Bad("session entry".into()))?;
        let name = super::core::session_name(&s.name)
            .map_err(|_| LuoError::Bad("session name is not valid".into()))?;
        let (_, files) = crate::kho::block::walk_chain(mem, s.files, 64, &restorable)?;
        if files.len() as u64 != s.count {
            return Err(LuoError::Bad(format!(
                "session {name:?}: {} files, header says {}",
                files.len(),
                s.count
            )));
        }
        for fe in files {
            let f =
                LuoFileSer::read_from_bytes(&fe).map_err(|_| LuoError::Bad("file entry".into()))?;
            let compat = cstr_field(&f.compatible)
                .ok_or_else(|| LuoError::Bad("file compatible string".into()))?;
            if !supported.contains(&compat.as_str()) {
                return Err(LuoError::Bad(format!(
                    "no handler for {compat:?} in this image (session {name:?}, token {:#x})",
                    f.token
                )));
            }
            if !restorable(f.data) {
                return Err(LuoError::Bad(format!(
                    "session {name:?}, token {:#x}: its data is not preserved memory",
                    f.token
                )));
            }
        }
    }
    Ok(())
}

/// Read and check the root LUO blob: size, layout and compatible string.
pub fn read_luo_header(mem: &dyn PhysRead, pa: u64, size: u64) -> Result<LuoSer, LuoError> {
    if size < 32 {
        return Err(LuoError::Bad(format!("LUO blob is {size} bytes, need 32")));
    }
    let mut b = [0u8; 32];
    mem.read_phys(pa, &mut b).map_err(KhoError::from)?;
    let ser = LuoSer::read_from_bytes(&b).map_err(|_| LuoError::Bad("LUO blob".into()))?;
    let c = cstr_field(&ser.compatible)
        .unwrap_or_else(|| String::from_utf8_lossy(&ser.compatible).into_owned());
    if c != LUO_ABI_COMPATIBLE {
        return Err(LuoError::Bad(format!(
            "LUO: unsupported compatible string {c:?} (this image supports {LUO_ABI_COMPATIBLE:?})"
        )));
    }
    // The next image numbers its update `liveupdate_num + 1`: a count that cannot go on is a
    // bad handover, not a wrap to 0.
    if ser.liveupdate_num.checked_add(1).is_none() {
        return Err(LuoError::Bad(format!(
            "LUO: liveupdate_num {} cannot be incremented",
            ser.liveupdate_num
        )));
    }
    Ok(ser)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_with_liveupdate_num_at_max_is_refused() {
        let ram = crate::mm::Ram::create(1 << 20).expect("ram");
        let mut ser = LuoSer {
            compatible: put_cstr(LUO_ABI_COMPATIBLE).expect("compatible"),
            liveupdate_num: u64::MAX,
            sessions_pa: 0,
            flbs_pa: 0,
        };
        ram.write_phys(4096, ser.as_bytes()).expect("write");
        let r = read_luo_header(&ram, 4096, 32);
        assert!(
            matches!(&r, Err(LuoError::Bad(m)) if m.contains("liveupdate_num")),
            "{r:?}"
        );
        ser.liveupdate_num = u64::MAX - 1;
        ram.write_phys(4096, ser.as_bytes()).expect("write");
        assert!(read_luo_header(&ram, 4096, 32).is_ok());
    }
}
