//! LUO across a kexec. Reboot: freeze every file of every outgoing session in order (undoing on
//! the first failure), then write sessions and files as KHO block chains under the "LUO"
//! subtree. Boot: read the header early (liveupdate number, compatible), and the sessions at the
//! first open of `/dev/liveupdate`.

use zerocopy::FromBytes;

use crate::abi::cstr_field;
use crate::abi::luo::{LuoFileSer, LuoSer, LuoSessionSer, LUO_ABI_COMPATIBLE, LUO_KHO_ENTRY_NAME};
use crate::kho::block::BlockChain;
use crate::kho::KhoError;
use crate::mm::{Folio, PhysRead};

use super::SessionId;

/// What the reboot path wrote, to undo if the kexec does not happen.
pub struct LuoHandover {
    pub(crate) chains: Vec<BlockChain>,
    pub(crate) blob: Folio,
    pub(crate) frozen: Vec<(SessionId, u64)>,
}

/// Why the LUO handover could not be written at reboot or read at boot.
#[derive(Debug, thiserror::Error)]
pub enum LuoError {
    /// A handler's `freeze` failed; the kexec is refused and the files frozen so far are thawed.
    #[error("freeze of token {token:#x} in session {session:?} ({handler}) failed: {errno}")]
    Freeze {
        /// Name of the session of the file.
        session: String,
        /// The file's token.
        token: u64,
        /// The handler's compatible string.
        handler: &'static str,
        /// What `freeze` returned.
        errno: crate::abi::errno::Errno,
    },
    /// KHO could not preserve or restore the LUO blocks.
    #[error(transparent)]
    Kho(#[from] KhoError),
    /// A malformed handover (bad entry, name, count or compatible string) or an injected fault.
    #[error("{0}")]
    Bad(String),
}

/// The incoming LUO header, read at boot.
#[derive(Debug, Clone, Copy)]
pub struct IncomingHeader {
    /// Physical address of the LUO subtree's blob (the [`LuoSer`] header).
    pub blob_pa: u64,
    /// The header as read: liveupdate number and the head of the session chain.
    pub ser: LuoSer,
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
    use crate::abi::put_cstr;
    use zerocopy::IntoBytes;

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
