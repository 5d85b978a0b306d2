//! A user process: its fd table and its mappings.

use std::collections::BTreeMap;

use crate::fs::FileId;

/// A process id; user processes count from 1 ([`KERNEL_PID`] is the host's own).
pub type Pid = u32;

/// The owner of the host's own mappings (guest_memfd windows for memslots); user processes
/// get pids from 1.
pub const KERNEL_PID: Pid = 0;

/// Highest fd number + 1 (RLIMIT_NOFILE).
pub const NOFILE: i32 = 1 << 20;

/// One fd table entry: a file reference and the fd's close-on-exec flag.
#[derive(Debug, Clone, Copy)]
pub struct FdEntry {
    /// The open file; the entry holds one reference.
    pub file: FileId,
    /// Close-on-exec (`O_CLOEXEC`, `MFD_CLOEXEC`); recorded only, as processes here never exec.
    pub cloexec: bool,
}

/// A user process of the host (a VMM, `init`, a test): its fd table and its mappings.
#[derive(Debug, Default)]
pub struct Process {
    /// Its pid.
    pub pid: Pid,
    /// Open fds, by number.
    pub fds: BTreeMap<i32, FdEntry>,
    /// Its mappings; they go at exit.
    pub maps: Vec<super::MapId>,
    /// Mappings in the address space of a real process (a program under `handover run`),
    /// each holding a file reference; they go at munmap, execve and exit.
    pub remote: Vec<super::mmap::RemoteMapping>,
    /// Where the next file installed for this process goes: the placeholder fd the program
    /// reserved for a call that may create one (taken by the first install).
    pub pending_fd: Option<i32>,
    /// Pages a punch or shrink took from a file this process maps itself: freed once it has
    /// unmapped them (or at exit).
    pub pending_free: Vec<crate::fs::memfd::Dropped>,
    /// The file and page range of the last such call, for the reply that tells the process.
    pub deferred: Option<(FileId, u64, u64)>,
}

impl Process {
    /// Lowest free fd number.
    pub fn alloc_fd(&self) -> Option<i32> {
        let mut want = 0;
        for &fd in self.fds.keys() {
            if fd != want {
                break;
            }
            want += 1;
        }
        (want < NOFILE).then_some(want)
    }
}
