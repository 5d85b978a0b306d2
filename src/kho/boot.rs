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
    /// Physical address of the handover tree (FDT).
    pub fdt_pa: u64,
    /// Size of the handover tree in bytes (at most `MAX_FDT_SIZE`).
    pub fdt_size: u64,
    /// Physical address of the scratch zone the new image allocates from during early boot.
    pub scratch_pa: u64,
    /// Size of the scratch zone in bytes.
    pub scratch_size: u64,
    /// CRC-32 of the handover tree, checked before it is parsed.
    pub fdt_crc: Option<u32>,
}

impl KhoBootArgs {
    /// The scratch zone as a PFN range.
    pub fn scratch_pfns(&self) -> Range<u64> {
        pa_to_pfn(self.scratch_pa)..pa_to_pfn(self.scratch_pa.saturating_add(self.scratch_size))
    }
}

/// The handover received at boot.
pub struct Incoming {
    /// The boot arguments it was found with.
    pub args: KhoBootArgs,
    /// The parsed handover tree.
    pub tree: HandoverTree,
    /// The previous image's preserved blocks, which restore calls take one by one.
    pub tracker: IncomingTracker,
    /// The decoded `kexec-metadata` subtree, if the handover has one.
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
    if let Some(want) = args.fdt_crc {
        let got = crc32fast::hash(&fdt_bytes);
        if got != want {
            return Err(KhoError::BadHandover(format!(
                "handover tree checksum mismatch (crc32 {got:#010x}, expected {want:#010x})"
            )));
        }
    }
    let tree = fdt::parse(&fdt_bytes)?;
    let listed = verify_integrity(mem, &tree)?;

    // The integrity table lists metadata allocations, not tracker nodes (their bits change
    // after the table is written, so they have their own checksum): a tracker node can never
    // be a listed page. `listed` is the allow-list only for trackers that are in the table.
    let limits = WalkLimits {
        nr_frames,
        scratch: scratch.clone(),
        listed: None,
    };
    // Check the tracker's checksum over its node pages first, and only then copy its leaves
    // (the walk costs a 4 KiB copy per leaf and a range per preserved block).
    let want = tree
        .tracker_crc
        .ok_or_else(|| KhoError::BadHandover("the handover tree has no tracker checksum".into()))?;
    let mut nodes = IncomingTracker::node_pages_of(mem, tree.tracker_root, &limits)?;
    nodes.sort_unstable();
    let mut h = crc32fast::Hasher::new();
    let mut page = vec![0u8; PAGE_SIZE as usize];
    for &pa in &nodes {
        if listed.contains(&pa) {
            return Err(KhoError::BadHandover(format!(
                "tracker node {pa:#x} is also a listed metadata page"
            )));
        }
        mem.read_phys(pa, &mut page)?;
        h.update(&page);
    }
    if h.finalize() != want {
        return Err(KhoError::BadHandover(
            "tracker checksum mismatch: a tracker node was modified".into(),
        ));
    }
    let (tracker, reserved) = IncomingTracker::walk(mem, tree.tracker_root, &limits)?;
    let mut walked = tracker.node_pages().to_vec();
    walked.sort_unstable();
    if walked != nodes {
        return Err(KhoError::BadHandover(
            "the tracker changed while it was read".into(),
        ));
    }

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

/// The largest metadata allocation an image makes (`Kho::alloc_preserve`: one folio of at most
/// `MAX_ORDER`); an integrity entry covers exactly one.
pub const MAX_ENTRY_BYTES: u64 = PAGE_SIZE << crate::mm::MAX_ORDER;

/// Check every checksum of a handover before anything in it is trusted: each subtree blob
/// against its `blob-crc32`, the integrity table against its own CRC, and every metadata range
/// the table lists. Returns the page addresses the table covers (metadata allocations; tracker
/// nodes are covered by the tracker checksum instead).
///
/// Each entry is one metadata allocation: at most [`MAX_ENTRY_BYTES`], page aligned, and no
/// page is listed twice, so checking the whole table costs at most one pass over RAM however
/// many entries it has.
pub fn verify_integrity(
    mem: &dyn PhysRead,
    tree: &HandoverTree,
) -> Result<std::collections::HashSet<u64>, KhoError> {
    use crate::abi::kho::{IntegrityEntry, IntegrityHeader, INTEGRITY_COMPATIBLE, INTEGRITY_NAME};
    use zerocopy::FromBytes;
    let in_ram = |pa: u64, len: u64| pa.checked_add(len).is_some_and(|e| e <= mem.phys_size());
    for (name, s) in &tree.subtrees {
        let Some(want) = s.crc else {
            return Err(KhoError::BadHandover(format!(
                "subtree {name:?} has no checksum"
            )));
        };
        if s.size > MAX_FDT_SIZE * 64 || !in_ram(s.pa, s.size) {
            return Err(KhoError::BadHandover(format!(
                "subtree {name:?} blob {:#x}+{:#x} is outside RAM",
                s.pa, s.size
            )));
        }
        let got = crate::mm::ram::crc32_of(mem, s.pa, s.size)?;
        if got != want {
            return Err(KhoError::BadHandover(format!(
                "subtree {name:?} checksum mismatch: its blob was modified"
            )));
        }
    }
    let st = tree
        .subtrees
        .get(INTEGRITY_NAME)
        .ok_or_else(|| KhoError::BadHandover("the handover has no integrity table".into()))?;
    let mut b = vec![0u8; std::mem::size_of::<IntegrityHeader>()];
    if st.size < b.len() as u64 {
        return Err(KhoError::BadHandover(
            "integrity table header is too short".into(),
        ));
    }
    mem.read_phys(st.pa, &mut b)?;
    let hdr =
        IntegrityHeader::read_from_bytes(&b).map_err(|_| KhoError::Corrupt("integrity header"))?;
    let compat = crate::abi::cstr_field(&hdr.compatible).unwrap_or_default();
    if compat != INTEGRITY_COMPATIBLE {
        return Err(KhoError::Incompatible {
            what: "integrity table",
            found: compat,
            supported: INTEGRITY_COMPATIBLE,
        });
    }
    let entries = super::array::read_chain(mem, &hdr.entries)?;
    let n = usize::try_from(hdr.nr_entries).map_err(|_| KhoError::Corrupt("integrity count"))?;
    let bytes = entries
        .get(
            ..n.checked_mul(24)
                .ok_or(KhoError::Corrupt("integrity count"))?,
        )
        .ok_or_else(|| KhoError::BadHandover("integrity table is shorter than its count".into()))?;
    if crc32fast::hash(bytes) != hdr.entries_crc {
        return Err(KhoError::BadHandover(
            "integrity table checksum mismatch".into(),
        ));
    }
    let mut listed = std::collections::HashSet::new();
    for e in bytes.chunks_exact(24) {
        let e =
            IntegrityEntry::read_from_bytes(e).map_err(|_| KhoError::Corrupt("integrity entry"))?;
        if !in_ram(e.pa, e.len) {
            return Err(KhoError::BadHandover(format!(
                "integrity entry {:#x}+{:#x} lies outside RAM",
                e.pa, e.len
            )));
        }
        if e.len > MAX_ENTRY_BYTES || e.pa % PAGE_SIZE != 0 {
            return Err(KhoError::BadHandover(format!(
                "integrity entry {:#x}+{:#x} is not one metadata allocation",
                e.pa, e.len
            )));
        }
        let mut p = e.pa;
        while p < e.pa + e.len {
            if !listed.insert(p) {
                return Err(KhoError::BadHandover(format!(
                    "integrity entries overlap at {p:#x}"
                )));
            }
            p += PAGE_SIZE;
        }
        if crate::mm::ram::crc32_of(mem, e.pa, e.len)? != e.crc {
            return Err(KhoError::BadHandover(format!(
                "metadata checksum mismatch at {:#x}+{:#x}: the handover was modified",
                e.pa, e.len
            )));
        }
    }
    Ok(listed)
}
