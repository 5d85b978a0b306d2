//! The file-handler interface (upstream `struct liveupdate_file_ops`), as a trait. Handlers
//! are stateless; per-file state lives in [`FileArgs`].

use std::any::Any;

use super::FileId;
use crate::abi::errno::SysResult;

use super::SessionId;

/// Arguments of every callback (upstream `struct liveupdate_file_op_args`).
#[derive(Default)]
pub struct FileArgs {
    /// The session the file belongs to.
    pub session: SessionId,
    /// The user's token for the file, unique within its session.
    pub token: u64,
    /// The file: input of preserve/freeze/unpreserve, output of retrieve.
    pub file: Option<FileId>,
    /// Physical address of the handler's serialized blob (the only thing that crosses kexec).
    pub serialized: u64,
    /// Runtime-only state set by `preserve`, dropped by `unpreserve`.
    pub private: Option<Box<dyn Any + Send>>,
    /// 0: never retrieved; > 0: retrieved; < 0: -errno of a failed retrieve (sticky).
    pub retrieve_status: i32,
}

/// `C` is the context the callbacks work in: the host that serves the files (the
/// composition root), which this module does not know.
pub trait FileHandler<C: ?Sized>: Send + Sync {
    /// Identifies the handler and its serialization format (≤ 47 bytes).
    fn compatible(&self) -> &'static str;
    /// Cheap check whether this handler takes the file.
    fn can_preserve(&self, host: &C, file: FileId) -> bool;
    /// Pin and preserve the file's memory while the workload runs; set `serialized`.
    fn preserve(&self, host: &mut C, a: &mut FileArgs) -> SysResult<()>;
    /// Undo `preserve` completely.
    fn unpreserve(&self, host: &mut C, a: &mut FileArgs);
    /// Last chance before kexec; may update the blob.
    fn freeze(&self, _host: &mut C, _a: &mut FileArgs) -> SysResult<()> {
        Ok(())
    }
    /// A later freeze failed: undo `freeze`.
    fn unfreeze(&self, _host: &mut C, _a: &mut FileArgs) {}
    /// Rebuild the file in the new image; set `file`.
    fn retrieve(&self, host: &mut C, a: &mut FileArgs) -> SysResult<()>;
    /// May the session finish now?
    fn can_finish(&self, _host: &C, _a: &FileArgs) -> bool {
        true
    }
    /// Session finished: drop handed-over state (discard memory of a never-retrieved file).
    fn finish(&self, host: &mut C, a: &mut FileArgs);
    /// Identity for the "preserved once" rule (default: the open file itself).
    fn get_id(&self, _host: &C, file: FileId) -> u64 {
        file
    }
}
