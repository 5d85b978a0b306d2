//! The context a LUO file handler works in, as narrow as the handlers need: KHO and the memory
//! it preserves, and the cross-file API (upstream `liveupdate_get_token_outgoing` /
//! `liveupdate_get_file_incoming`). Each subsystem widens it by what its own handler needs
//! (`fs::memfd_luo::MemfdLuoCtx`, `kvm::vm_luo::VmLuoCtx`, ...); the host implements them all.

use super::FileId;
use crate::abi::errno::SysResult;
use crate::kho::Kho;
use crate::mm::Mm;

use super::SessionId;

/// What every file handler may use of the image it runs in.
pub trait LuoCtx {
    /// KHO: preservation of outgoing memory, restoration of incoming memory.
    fn kho(&self) -> &Kho;
    /// KHO, to change (preserve outgoing memory, restore incoming memory).
    fn kho_mut(&mut self) -> &mut Kho;
    /// The image's memory (RAM and its frame allocator).
    fn mm(&self) -> &Mm;
    /// The image's memory, to change (handlers write their serialized blobs into RAM).
    fn mm_mut(&mut self) -> &mut Mm;
    /// KHO and memory borrowed together, as most KHO calls take both.
    fn kho_mm(&mut self) -> (&mut Kho, &mut Mm);
    /// Cross-file API, for `freeze`: the token under which `file` is preserved in the same
    /// outgoing session (ENOENT if it is not).
    fn luo_get_token_outgoing(&self, sid: SessionId, file: FileId) -> SysResult<u64>;
    /// Cross-file API, for `retrieve`: the incoming file preserved under `token` in the same
    /// session, retrieved first if needed. The caller gets its own reference ([`Self::fput`]).
    fn luo_get_file_incoming(&mut self, sid: SessionId, token: u64) -> SysResult<FileId>;
    /// Drop a file reference.
    fn fput(&mut self, file: FileId);
}
