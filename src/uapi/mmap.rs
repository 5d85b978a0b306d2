//! mmap of files into a process. A mapping is a [`VaWindow`] whose present pages map the file's
//! RAM frames; user accesses through [`Host::user_read`]/[`Host::user_write`] fault missing pages
//! in (or fail with EFAULT, our SIGBUS), and raw pointers into the window are valid for pages
//! that are present (KVM memslots use them).

use std::sync::Arc;

use crate::fs::FileId;
use crate::mm::VaWindow;

use super::Pid;

pub type MapId = u64;

pub struct Mapping {
    pub pid: Pid,
    pub file: FileId,
    /// File page index of the window's first page.
    pub pgoff: u64,
    pub writable: bool,
    /// Shared with the memslots that point into it (see [`Host::unmap_id`]).
    pub window: Arc<VaWindow>,
}

/// What mmap returns to user space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserMapping {
    pub id: MapId,
    pub addr: usize,
    pub len: u64,
}

impl UserMapping {
    pub fn ptr(&self) -> *mut u8 {
        self.addr as *mut u8
    }
}
