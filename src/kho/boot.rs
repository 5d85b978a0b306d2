//! The next image's side of KHO: find the handover, validate all of it, and say which frames to
//! reserve before the allocator hands anything out. Nothing here writes RAM, so a refused
//! handover leaves the caller free to boot clean.

use std::ops::Range;

use crate::abi::kho::{KEXEC_METADATA_NAME, MAX_FDT_SIZE};
use crate::mm::{pa_to_pfn, PhysRead, Ranges, PAGE_SIZE};

use super::fdt::{self, HandoverTree};
use super::metadata::{self, KexecInfo};
use super::tracker::{IncomingTracker, WalkLimits};
use super::KhoError;

/// What the previous image passes on the new image's command line (upstream: the x86
/// `setup_data` KHO entry or the DT `/chosen` properties).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct KhoBootArgs {
    pub fdt_pa: u64,
    pub fdt_size: u64,
    pub scratch_pa: u64,
    pub scratch_size: u64,
}

impl KhoBootArgs {
    pub fn scratch_pfns(&self) -> Range<u64> {
        pa_to_pfn(self.scratch_pa)..pa_to_pfn(self.scratch_pa.saturating_add(self.scratch_size))
    }
}

/// The handover received at boot.
pub struct Incoming {
    pub args: KhoBootArgs,
    pub tree: HandoverTree,
    pub tracker: IncomingTracker,
    pub metadata: Option<KexecInfo>,
    /// Raw FDT bytes (kept for `handover inspect` and dumps).
    pub fdt: Vec<u8>,
}

/// Validate the handover described by `args` and compute the frames to reserve.
pub fn discover(mem: &dyn PhysRead, args: KhoBootArgs) -> Result<(Incoming, Ranges), KhoError> {
    let nr_frames = mem.phys_size() / PAGE_SIZE;
    let scratch = args.scratch_pfns();
    let in_ram = |pa: u64, len: u64| pa.checked_add(len).is_some_and(|e| e <= mem.phys_size());
    if args.fdt_size == 0 || args.fdt_size > MAX_FDT_SIZE || !in_ram(args.fdt_pa, args.fdt_size) {
        return Err(KhoError::BadHandover(format!(
            "handover tree at {:#x}+{:#x} lies outside RAM or has a bad size",
            args.fdt_pa, args.fdt_size
        )));
    }
    let mut fdt_bytes = vec![0u8; args.fdt_size as usize];
    mem.read_phys(args.fdt_pa, &mut fdt_bytes)?;
    let tree = fdt::parse(&fdt_bytes)?;

    let limits = WalkLimits {
        nr_frames,
        scratch: scratch.clone(),
    };
    let (tracker, reserved) = IncomingTracker::walk(mem, tree.tracker_root, &limits)?;

    let covered = |pa: u64, len: u64| -> bool {
        let (s, e) = (pa_to_pfn(pa), pa_to_pfn(pa + len + PAGE_SIZE - 1));
        reserved.covers(s, e) && (e <= scratch.start || s >= scratch.end)
    };
    if tracker.order_of(pa_to_pfn(args.fdt_pa)).is_none() || !covered(args.fdt_pa, args.fdt_size) {
        return Err(KhoError::BadHandover(format!(
            "handover tree at {:#x} is not in preserved memory",
            args.fdt_pa
        )));
    }
    for (name, s) in &tree.subtrees {
        if s.size == 0 || !in_ram(s.pa, s.size) || !covered(s.pa, s.size) {
            return Err(KhoError::BadHandover(format!(
                "subtree {name:?} blob {:#x}+{:#x} is outside RAM or not preserved",
                s.pa, s.size
            )));
        }
    }
    let metadata = match tree.subtrees.get(KEXEC_METADATA_NAME) {
        Some(s) => {
            let mut b = vec![0u8; s.size.min(PAGE_SIZE) as usize];
            mem.read_phys(s.pa, &mut b)?;
            Some(metadata::decode(&b)?)
        }
        None => None,
    };
    Ok((
        Incoming {
            args,
            tree,
            tracker,
            metadata,
            fdt: fdt_bytes,
        },
        reserved,
    ))
}
