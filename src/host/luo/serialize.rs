//! LUO across a kexec, on the host: freeze and write at reboot, read at boot and first open.

use crate::abi::luo::{LuoFileSer, LuoSer, LuoSessionSer, LUO_ABI_COMPATIBLE, LUO_KHO_ENTRY_NAME};
use crate::abi::{cstr_field, put_cstr};
use crate::host::Host;
use crate::kho::block::BlockChain;
use crate::kho::KhoError;
use crate::luo::serialize::*;
use crate::luo::{FileArgs, LuoFile, Session, SessionId, SessionKind};
use crate::mm::Folio;
use zerocopy::{FromBytes, IntoBytes};

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
        // Every preserved vCPU held and read at once, on every CPU (`kvm::vcpu_snapshot`).
        let files = self
            .luo
            .outgoing
            .iter()
            .filter_map(|&sid| self.luo.session(sid))
            .flat_map(|s| s.files.iter().filter_map(|f| f.args.file));
        let vcpus = self.vcpu_handles(files);
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let (held, snapshots) = vcpus.hold_and_read(cpus);
        self.vcpu_snapshots = snapshots;
        let r = self.luo_freeze_and_write(&order);
        self.vcpu_snapshots.clear();
        drop(held);
        r
    }

    fn luo_freeze_and_write(
        &mut self,
        order: &[(SessionId, u64)],
    ) -> Result<Option<LuoHandover>, LuoError> {
        let mut frozen = Vec::new();
        for &(sid, token) in order {
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
            self.refill_hugepages();
            let left = self.vm_pool.drain();
            if left > 0 {
                tracing::debug!("vm pool: {left} empty VMs not used");
            }
        }
    }

    /// Start making one empty VM per incoming VM file (`kvm::vm_pool`), if this machine has
    /// KVM.
    fn prefill_vms(&mut self, sessions: &[Session<Host>]) {
        let vm_file = |c: &str| {
            c == crate::abi::kvm::KVM_LUO_FH_COMPATIBLE
                || c == crate::abi::kvm::KVM_VM_LUO_V2_FH_COMPATIBLE
        };
        let n = sessions
            .iter()
            .flat_map(|s| &s.files)
            .filter(|f| vm_file(f.handler.compatible()))
            .count();
        if n == 0 {
            return;
        }
        match self.real_kvm() {
            Ok(kvm) => self.vm_pool.fill(kvm, n),
            Err(e) => tracing::debug!("vm pool: no KVM ({e})"),
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
        let mut built: Vec<Session<Host>> = Vec::new();
        for e in entries {
            let s = LuoSessionSer::read_from_bytes(&e)
                .map_err(|_| LuoError::Bad("session entry".into()))?;
            let name = crate::luo::core::session_name(&s.name)
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
                if out.iter().any(|x: &LuoFile<Host>| x.token == f.token) {
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
        self.prefill_vms(&built);
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
