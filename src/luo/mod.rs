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

pub type SessionId = u64;

/// A preserved (outgoing) or handed-over (incoming) file of a session.
pub struct LuoFile<C: ?Sized> {
    pub token: u64,
    pub handler: Arc<dyn FileHandler<C>>,
    /// Identity for the "preserved once" rule (outgoing only).
    pub id: Option<u64>,
    pub args: FileArgs,
    /// The args are lent to a handler callback right now.
    pub busy: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionKind {
    Outgoing,
    /// Handed over by the previous image; `retrieved` once user space holds it.
    Incoming {
        retrieved: bool,
    },
}

pub struct Session<C: ?Sized> {
    pub name: String,
    pub kind: SessionKind,
    pub files: Vec<LuoFile<C>>,
}

/// LUO state of one image; `C` is the context of its file handlers (the host).
pub struct Luo<C: ?Sized> {
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

    pub fn handler(&self, compatible: &str) -> Option<Arc<dyn FileHandler<C>>> {
        self.handlers
            .iter()
            .find(|h| h.compatible() == compatible)
            .cloned()
    }

    pub fn session(&self, id: SessionId) -> Option<&Session<C>> {
        self.sessions.get(&id)
    }

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
