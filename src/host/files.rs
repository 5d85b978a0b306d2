//! The open-file table. A file is reference counted like `struct file`: fd table entries,
//! mappings and LUO each hold a reference; the last `put` releases it. The kinds of file are
//! known here, at the composition root, above the subsystems that define them.

use std::collections::HashMap;

use crate::fs::memfd::Memfd;
use crate::luo::{FileId, TestFile};

/// What a file is. Per-kind state lives here.
pub enum FileKind {
    /// `/dev/null`.
    Null,
    /// `/dev/liveupdate`.
    Liveupdate,
    /// A LUO session fd.
    Session(crate::luo::SessionId),
    /// A memfd, with its pages and seals.
    Memfd(Memfd),
    /// `/dev/kvm`.
    Kvm,
    /// A KVM VM.
    Vm(crate::kvm::VmFile),
    /// A KVM vCPU.
    Vcpu(crate::kvm::VcpuFile),
    /// A guest_memfd.
    GuestMemfd(crate::kvm::GuestMemfd),
    /// A file kind for tests of the LUO core (its handler can be told to fail).
    Test(TestFile),
}

impl FileKind {
    /// A short name for the kind of file, for diagnostics (`"memfd"`, `"[kvm-gmem]"`, …).
    pub fn name(&self) -> &'static str {
        match self {
            FileKind::Null => "null",
            FileKind::Liveupdate => "liveupdate",
            FileKind::Session(_) => "[luo_session]",
            FileKind::Memfd(_) => "memfd",
            FileKind::Kvm => "kvm",
            FileKind::Vm(_) => "kvm-vm",
            FileKind::Vcpu(_) => "kvm-vcpu",
            FileKind::GuestMemfd(_) => "[kvm-gmem]",
            FileKind::Test(_) => "test",
        }
    }
}

/// An open file (upstream `struct file`): its kind with the per-kind state, its position and
/// its reference count.
pub struct File {
    /// What the file is, with that kind's state.
    pub kind: FileKind,
    /// File position for read/write.
    pub pos: u64,
    refs: u32,
}

/// The host's open files by [`FileId`]. Ids come from a sequence starting at 1 and are never
/// reused within one image.
#[derive(Default)]
pub struct FileTable {
    files: HashMap<FileId, File>,
    next: FileId,
}

impl FileTable {
    /// A new file with one reference.
    pub fn install(&mut self, kind: FileKind) -> FileId {
        self.next += 1;
        self.files.insert(
            self.next,
            File {
                kind,
                pos: 0,
                refs: 1,
            },
        );
        self.next
    }

    /// The open file `id`, if it exists.
    pub fn get(&self, id: FileId) -> Option<&File> {
        self.files.get(&id)
    }

    /// The open file `id`, to change (its kind's state or its position).
    pub fn get_mut(&mut self, id: FileId) -> Option<&mut File> {
        self.files.get_mut(&id)
    }

    /// The kind of the open file `id`, if it exists.
    pub fn kind(&self, id: FileId) -> Option<&FileKind> {
        self.files.get(&id).map(|f| &f.kind)
    }

    /// The kind of the open file `id`, to change its state.
    pub fn kind_mut(&mut self, id: FileId) -> Option<&mut FileKind> {
        self.files.get_mut(&id).map(|f| &mut f.kind)
    }

    /// Take another reference.
    pub fn get_ref(&mut self, id: FileId) {
        if let Some(f) = self.files.get_mut(&id) {
            f.refs += 1;
        }
    }

    /// Drop a reference; the file when it was the last one (the caller releases it).
    pub fn put(&mut self, id: FileId) -> Option<File> {
        let f = self.files.get_mut(&id)?;
        f.refs -= 1;
        if f.refs == 0 {
            self.files.remove(&id)
        } else {
            None
        }
    }

    /// Reference count of `id`; 0 if it is not open.
    pub fn refs(&self, id: FileId) -> u32 {
        self.files.get(&id).map_or(0, |f| f.refs)
    }

    /// Number of open files.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// Whether no file is open.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Ids of every open file, in no particular order.
    pub fn ids(&self) -> Vec<FileId> {
        self.files.keys().copied().collect()
    }
}
