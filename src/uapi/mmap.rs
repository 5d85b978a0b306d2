//! mmap of files into a process. A mapping is a [`VaWindow`] whose present pages map the file's
//! RAM frames; user accesses through [`Host::user_read`]/[`Host::user_write`] fault missing pages
//! in (or fail with EFAULT, our SIGBUS), and raw pointers into the window are valid for pages
//! that are present (KVM memslots use them).
//!
//! [`Host::user_read`]: crate::host::Host::user_read
//! [`Host::user_write`]: crate::host::Host::user_write

use std::sync::Arc;

use crate::fs::FileId;
use crate::mm::VaWindow;

use super::Pid;

/// A mapping's id in the host's table of mappings, from a sequence.
pub type MapId = u64;

/// A mapping of a file (memfd or guest_memfd) into a process, or into the host itself
/// ([`KERNEL_PID`](super::KERNEL_PID)) for a guest_memfd's memslot window.
pub struct Mapping {
    /// The process that owns it.
    pub pid: Pid,
    /// The mapped file (the mapping holds a reference).
    pub file: FileId,
    /// File page index of the window's first page.
    pub pgoff: u64,
    /// Mapped with `PROT_WRITE` (counts towards a memfd's writable mappings).
    pub writable: bool,
    /// Shared with the memslots that point into it (see `Host::unmap_id`).
    pub window: Arc<VaWindow>,
}

/// What mmap returns to user space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserMapping {
    /// Id of the mapping, for `munmap`.
    pub id: MapId,
    /// Start address of the mapping in this process's address space.
    pub addr: usize,
    /// Length in bytes, rounded up to whole pages.
    pub len: u64,
}

impl UserMapping {
    /// `addr` as a raw pointer, valid for the pages present in the mapping.
    pub fn ptr(&self) -> *mut u8 {
        self.addr as *mut u8
    }
}

/// A mapping of a host file in a real process's address space (a program under
/// `handover run`): the program maps the file's RAM frames itself, from the RAM memfd, and asks
/// the host to allocate the holes it touches. The host keeps the record to hold a file
/// reference, to resolve faults, and to refuse freeing frames the program still maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteMapping {
    /// Start address in the program (page aligned).
    pub addr: u64,
    /// Length in bytes (whole pages).
    pub len: u64,
    /// The mapped file (the mapping holds a reference).
    pub file: FileId,
    /// File page index of the first page.
    pub pgoff: u64,
    /// Mapped with `PROT_WRITE`.
    pub writable: bool,
    /// Fault-around: the page after the last block faulted in, and that block's size. A fault
    /// at `ra_next` doubles the block (sequential access), any other fault starts at one page.
    pub ra_next: u64,
    /// Pages in the last fault-around block.
    pub ra_pages: u64,
    /// The host's own mapping of the same file range ([`Mapping`], owned by the same process),
    /// made when a memslot is set on this range: KVM needs an address in the host.
    pub shadow: Option<MapId>,
}

impl RemoteMapping {
    /// Pages in the mapping.
    pub fn npages(&self) -> u64 {
        self.len / crate::mm::PAGE_SIZE
    }

    /// Whether file pages `a..b` are (partly) mapped.
    pub fn covers(&self, a: u64, b: u64) -> bool {
        a < self.pgoff + self.npages() && self.pgoff < b
    }
}
