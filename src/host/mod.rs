//! The host image: everything a running "kernel" owns. All of it dies at kexec except RAM.
//!
//! The composition root: the subsystems below (`mm`, `kho`, `luo`, `fs`, `kvm`, `uapi` types)
//! know nothing of [`Host`]; the glue that serves them on a host lives here.

mod boot;
pub mod files;
pub use kvm::passthrough::vcpu_ioctl;
pub use kvm::run::VcpuRun;
#[cfg(test)]
mod hugepool_tests;
mod kexec;
#[cfg(test)]
mod kho_tests;
mod kvm;
mod luo;
mod mmap;
mod remote;
mod uapi;

use std::io::Write;
use std::path::PathBuf;

use std::collections::BTreeMap;

use crate::host::files::FileTable;
use crate::kexec::{BootInfo, BootParams};
use crate::kho::Kho;
use crate::luo::Luo;
use crate::mm::{FrameStats, HugePool, HugePoolStats, Mm};
use crate::uapi::{MapId, Mapping, Pid, Process};

/// One host image (the "kernel"): RAM and its allocator, KHO, LUO, the open-file table, user
/// processes and their mappings, the KVM state, and the boot parameters. Made by
/// [`Host::boot`]; a kexec replaces it with a new image that keeps only RAM.
pub struct Host {
    pub(crate) mm: Mm,
    pub(crate) kho: Kho,
    pub(crate) luo: Luo<Host>,
    pub(crate) files: FileTable,
    pub(crate) procs: BTreeMap<Pid, Process>,
    pub(crate) maps: BTreeMap<MapId, Mapping>,
    pub(crate) next_pid: Pid,
    pub(crate) next_map: MapId,
    pub(crate) luo_incoming: Option<crate::luo::serialize::IncomingHeader>,
    /// The machine's /dev/kvm, opened on first use.
    pub(crate) kvm: Option<std::sync::Arc<kvm_ioctls::Kvm>>,
    /// Empty VMs made ahead for the VM files of an update (see `kvm::vm_pool`).
    pub(crate) vm_pool: kvm::vm_pool::VmPool,
    /// vCPU states read for the freeze in progress, by file (see `kvm::vcpu_snapshot`).
    pub(crate) vcpu_snapshots:
        std::collections::HashMap<crate::fs::FileId, kvm::vcpu_snapshot::Snapshot>,
    pub(crate) next_vm_id: u64,
    /// Sequence for the names of retrieved VMs.
    pub(crate) restored_vms: u64,
    /// The previous image's reaper, by pidfd, until it is reaped.
    pub(crate) reaper: Option<crate::kexec::reaper::Reaper>,
    /// The thread that reaps it once released without waiting, until someone waits for it.
    pub(crate) reaping: Option<std::thread::JoinHandle<()>>,
    /// Guest faults on guest_memfd holes (userfaultfd and its service thread), set up when the
    /// first guest_memfd is bound to a memslot; see `kvm::run`.
    pub(crate) guest_faults: Option<crate::kvm::run::FaultService>,
    /// The huge-page pool reserved at boot (`--hugepages`, `mm::hugetlb`).
    pub(crate) hugepool: HugePool,
    pub(crate) params: BootParams,
    pub(crate) info: BootInfo,
    /// Test hook: damage the handover this way right before the next kexec.
    #[cfg(feature = "test-hooks")]
    pub(crate) corrupt_handover: Option<String>,
}

/// Frame accounting as a status call reports it.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct HostStatus {
    /// Frame allocator counts of the image's RAM, in 4 KiB frames.
    pub frames: FrameStats,
    /// Pages the outgoing tracker marks preserved.
    pub preserved: u64,
    /// Pages handed over by the previous image and not restored yet.
    pub incoming_outstanding: u64,
    /// RAM used by the outgoing tracker's nodes.
    pub tracker_bytes: u64,
    /// The huge-page pool per size (its frames count as used in `frames`).
    pub hugepages: HugePoolStats,
}

impl Host {
    /// The image's memory (RAM and its frame allocator).
    pub fn mm(&self) -> &crate::mm::Mm {
        &self.mm
    }

    /// KHO: what this image preserves and what it was handed.
    pub fn kho(&self) -> &Kho {
        &self.kho
    }

    /// LUO: sessions and their files.
    pub fn luo(&self) -> &Luo<Host> {
        &self.luo
    }

    /// LUO, to change (tests set `liveupdate_num`).
    pub fn luo_mut(&mut self) -> &mut Luo<Host> {
        &mut self.luo
    }

    /// The open-file table.
    pub fn files(&self) -> &FileTable {
        &self.files
    }

    /// The boot parameters of this image.
    pub fn params(&self) -> &BootParams {
        &self.params
    }

    /// The boot parameters, to change before the next kexec (tests set `rollback`).
    pub fn params_mut(&mut self) -> &mut BootParams {
        &mut self.params
    }

    /// What this boot found.
    pub fn info(&self) -> &BootInfo {
        &self.info
    }

    /// The huge-page pool (`--hugepages`).
    pub fn hugepool(&self) -> &HugePool {
        &self.hugepool
    }

    /// Fill the huge-page pool up to its target from free RAM (after an update, once it is
    /// committed: the blackout is over and what the handover held is free); the folios taken.
    pub fn refill_hugepages(&mut self) -> u64 {
        let n = self.hugepool.refill(&mut self.mm);
        if n > 0 {
            tracing::info!("hugepages: {n} folios taken into the pool after the update");
        }
        n
    }

    /// The huge-page pool and the memory it gives folios back to, borrowed together
    /// ([`HugePool::free`] and [`HugePool::adopt`] take both).
    pub fn hugepool_mm(&mut self) -> (&mut HugePool, &mut crate::mm::Mm) {
        (&mut self.hugepool, &mut self.mm)
    }

    /// KHO and the memory it preserves from, borrowed together (most KHO calls take both).
    pub fn kho_mm(&mut self) -> (&mut Kho, &mut crate::mm::Mm) {
        (&mut self.kho, &mut self.mm)
    }

    /// Frame and KHO tracker accounting now.
    pub fn status(&self) -> HostStatus {
        HostStatus {
            frames: self.mm.stats(),
            preserved: self.kho.tracker().preserved_pages(),
            incoming_outstanding: self.kho.incoming().map_or(0, |i| i.tracker.outstanding().1),
            tracker_bytes: self.kho.tracker().node_bytes(),
            hugepages: self.hugepool.stats(),
        }
    }

    /// Append one JSON object to the report file, if the command line named one.
    pub fn report(&self, event: &str, mut fields: serde_json::Value) {
        let Some(path) = &self.params.report else {
            return;
        };
        if let Some(o) = fields.as_object_mut() {
            o.insert("event".into(), event.into());
            o.insert("kexec_count".into(), self.info.kexec_count.into());
            o.insert("pid".into(), std::process::id().into());
        }
        if let Err(e) = append_line(path, &fields.to_string()) {
            tracing::warn!("cannot write report {}: {e}", path.display());
        }
    }
}

fn append_line(path: &PathBuf, line: &str) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    writeln!(f, "{line}")
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("info", &self.info)
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}
