//! LUO — the Live Update Orchestrator: `/dev/liveupdate`, sessions of preserved files, file
//! handlers, and their (de)serialization through KHO.
//!
//! * [`handler`]: the file-handler trait (upstream `liveupdate_file_ops`) and registry.
//! * [`ctx`]: the narrow context handlers work in ([`LuoCtx`]).
//! * [`core`]: session names (the device itself is served by the host, `host::luo`).
//! * [`serialize`]: the handover's validation and header (the reboot and boot paths are
//!   served by the host).
//! * [`ucmd`]: the generic ioctl argument rules.

pub mod core;

pub mod ctx;
pub mod file;
pub mod handler;
pub mod serialize;

/// The `/dev/liveupdate-test` handler (test hook).
#[cfg(feature = "test-hooks")]
pub mod test_handler;
pub mod ucmd;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

pub use file::{FileId, TestFile};

pub use ctx::LuoCtx;
pub use handler::{FileArgs, FileHandler};

/// A session's key in [`Luo`]'s table: from a sequence, local to one image (not handed over).
pub type SessionId = u64;

/// A preserved (outgoing) or handed-over (incoming) file of a session.
pub struct LuoFile<C: ?Sized> {
    /// The user's token for the file (`LIVEUPDATE_SESSION_PRESERVE_FD`), unique within the
    /// session; `LIVEUPDATE_SESSION_RETRIEVE_FD` asks for it.
    pub token: u64,
    /// The handler that preserved the file, or for an incoming file the one named by the handover's
    /// compatible string.
    pub handler: Arc<dyn FileHandler<C>>,
    /// Identity for the "preserved once" rule (outgoing only).
    pub id: Option<u64>,
    /// The arguments every callback of `handler` gets for this file.
    pub args: FileArgs,
    /// The args are lent to a handler callback right now.
    pub busy: bool,
}

/// Which way a session goes across the kexec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionKind {
    /// Created in this image (`LIVEUPDATE_IOCTL_CREATE_SESSION`); serialized at the next kexec.
    Outgoing,
    /// Handed over by the previous image; `retrieved` once user space holds it.
    Incoming {
        /// Set by `LIVEUPDATE_IOCTL_RETRIEVE_SESSION`; a second retrieve of the session fails.
        retrieved: bool,
    },
}

/// A LUO session (upstream `struct luo_session`): a named set of preserved files.
pub struct Session<C: ?Sized> {
    /// The session's name, unique among sessions of its kind; crosses the kexec.
    pub name: String,
    /// Outgoing, or incoming and whether retrieved.
    pub kind: SessionKind,
    /// Its files, in preservation order (outgoing) or handover order (incoming).
    pub files: Vec<LuoFile<C>>,
}

/// LUO state of one image; `C` is the context of its file handlers (the host).
pub struct Luo<C: ?Sized> {
    /// The `liveupdate=` boot parameter: when off, opening `/dev/liveupdate` is ENOENT and
    /// handlers cannot register (EOPNOTSUPP).
    pub enabled: bool,
    pub(crate) handlers: Vec<Arc<dyn FileHandler<C>>>,
    pub(crate) dev_open: bool,
    /// Result of the first open's deserialization: `None` before it, then sticky.
    pub(crate) deserialized: Option<Result<(), i32>>,
    pub(crate) sessions: BTreeMap<SessionId, Session<C>>,
    /// Outgoing sessions in creation order.
    pub(crate) outgoing: Vec<SessionId>,
    pub(crate) next_session: SessionId,
    /// Global "a file is in at most one session": id -> session.
    pub(crate) preserved_ids: HashMap<u64, SessionId>,
    /// Number of live updates so far (0 on a cold boot).
    pub liveupdate_num: u64,
}

impl<C: ?Sized> Luo<C> {
    /// An empty LUO, on or off (`enabled`); handlers are registered after.
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled,
            handlers: Vec::new(),
            dev_open: false,
            deserialized: None,
            sessions: BTreeMap::new(),
            outgoing: Vec::new(),
            next_session: 0,
            preserved_ids: HashMap::new(),
            liveupdate_num: 0,
        }
    }

    /// Register a file handler. Refuses a duplicate compatible string (EEXIST), one longer than
    /// 47 bytes (EINVAL), and registration after the first open deserialized the incoming
    /// state (EBUSY: its files would have been refused already).
    pub fn register(&mut self, h: Arc<dyn FileHandler<C>>) -> crate::abi::errno::SysResult<()> {
        use crate::abi::errno::Errno;
        if !self.enabled {
            return Err(Errno::EOPNOTSUPP);
        }
        let c = h.compatible();
        if c.is_empty() || c.len() >= crate::abi::luo::LIVEUPDATE_HNDL_COMPAT_LENGTH {
            return Err(Errno::EINVAL);
        }
        if self.handlers.iter().any(|x| x.compatible() == c) {
            return Err(Errno::EEXIST);
        }
        if self.deserialized.is_some() {
            return Err(Errno::EBUSY);
        }
        self.handlers.push(h);
        Ok(())
    }

    /// The registered handler with this compatible string, if any.
    pub fn handler(&self, compatible: &str) -> Option<Arc<dyn FileHandler<C>>> {
        self.handlers
            .iter()
            .find(|h| h.compatible() == compatible)
            .cloned()
    }

    /// Session `id`, outgoing or incoming.
    pub fn session(&self, id: SessionId) -> Option<&Session<C>> {
        self.sessions.get(&id)
    }

    /// Session `id`, to change.
    pub fn session_mut(&mut self, id: SessionId) -> Option<&mut Session<C>> {
        self.sessions.get_mut(&id)
    }

    /// Counts for status and tests: (outgoing sessions, incoming sessions, preserved files).
    pub fn counts(&self) -> (usize, usize, usize) {
        let out = self.outgoing.len();
        let inc = self.sessions.len() - out;
        let files = self.sessions.values().map(|s| s.files.len()).sum();
        (out, inc, files)
    }

    pub(crate) fn find_file(&self, sid: SessionId, file: FileId) -> Option<u64> {
        self.sessions
            .get(&sid)?
            .files
            .iter()
            .find(|f| !f.busy && f.args.file == Some(file))
            .map(|f| f.token)
    }
}
