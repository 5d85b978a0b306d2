//! A user process: its fd table and its mappings.

use std::collections::BTreeMap;

use crate::fs::FileId;

pub type Pid = u32;

/// The owner of the host's own mappings (guest_memfd windows for memslots); user processes
/// get pids from 1.
pub const KERNEL_PID: Pid = 0;

/// Highest fd number + 1 (RLIMIT_NOFILE).
pub const NOFILE: i32 = 1 << 20;

#[derive(Debug, Clone, Copy)]
pub struct FdEntry {
    pub file: FileId,
    pub cloexec: bool,
}

#[derive(Debug, Default)]
pub struct Process {
    pub pid: Pid,
    pub fds: BTreeMap<i32, FdEntry>,
    pub maps: Vec<super::MapId>,
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
