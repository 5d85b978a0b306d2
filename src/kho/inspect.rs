//! Decode a handover (from a dump or live RAM) into a report for people and machines.

use std::collections::BTreeMap;

use crate::abi::kho::KEXEC_METADATA_NAME;
use crate::mm::{PhysRead, PAGE_SIZE};

use super::fdt;
use super::metadata;
use super::tracker::{IncomingTracker, WalkLimits};
use super::{KhoBootArgs, KhoError};

/// Preserved blocks of one order in the handover's tracker.
#[derive(Debug, serde::Serialize)]
pub struct OrderSummary {
    /// The folio order.
    pub order: u32,
    /// Blocks of this order.
    pub blocks: u64,
    /// Pages in them (`blocks << order`).
    pub pages: u64,
    /// Bytes in them.
    pub bytes: u64,
    /// First few blocks as (physical address, bytes).
    pub ranges: Vec<(u64, u64)>,
}

/// One client subtree of the handover tree.
#[derive(Debug, serde::Serialize)]
pub struct SubtreeReport {
    /// Subnode name ("LUO", "kexec-metadata", …).
    pub name: String,
    /// Physical address of its blob.
    pub pa: u64,
    /// Blob size in bytes.
    pub size: u64,
    /// Compatible string or a one-line decode, where the blob is known.
    pub decoded: Option<String>,
}

/// What `handover inspect` prints (text via `Display`, or JSON).
#[derive(Debug, serde::Serialize)]
pub struct Report {
    /// Bytes of physical memory the source covers.
    pub ram_size: u64,
    /// The boot arguments the handover was found with.
    pub args: KhoBootArgs,
    /// The handover tree's root compatible string.
    pub compatible: String,
    /// Physical address of the tracker's radix root.
    pub tracker_root: u64,
    /// Tracker node pages (tables and leaf bitmaps).
    pub tracker_nodes: usize,
    /// Bytes of those node pages.
    pub tracker_bytes: u64,
    /// Pages the tracker marks preserved.
    pub preserved_pages: u64,
    /// The same in bytes.
    pub preserved_bytes: u64,
    /// Preserved blocks per order, lowest order first.
    pub orders: Vec<OrderSummary>,
    /// The client subtrees, by name.
    pub subtrees: Vec<SubtreeReport>,
    /// Result of checking every checksum of the handover.
    pub integrity: String,
}

/// Decoders for known subtrees, by name: `(name, fn(blob bytes) -> text)`.
pub type Decoder = fn(&dyn PhysRead, &[u8]) -> String;

/// Decoders for the subtrees this build knows.
pub fn decoders() -> BTreeMap<&'static str, Decoder> {
    #[allow(unused_mut)]
    let mut m: BTreeMap<&'static str, Decoder> = BTreeMap::new();
    #[cfg(feature = "test-hooks")]
    m.insert(super::test::SUBTREE, super::test::describe);
    m
}

/// Decode the handover `args` points at in `mem` (a dump or live RAM). Checksum failures are
/// reported in [`Report::integrity`]; only an unreadable tree or tracker is an error.
pub fn inspect(
    mem: &dyn PhysRead,
    args: KhoBootArgs,
    decoders: &BTreeMap<&str, Decoder>,
) -> Result<Report, KhoError> {
    if args.fdt_size == 0 || args.fdt_size > crate::abi::kho::MAX_FDT_SIZE {
        return Err(KhoError::BadHandover(format!(
            "handover tree size {} is not valid",
            args.fdt_size
        )));
    }
    let mut b = vec![0u8; args.fdt_size as usize];
    mem.read_phys(args.fdt_pa, &mut b)?;
    let tree = fdt::parse(&b)?;
    let nr_frames = mem.phys_size() / PAGE_SIZE;
    let integrity = match super::boot::verify_integrity(mem, &tree) {
        Ok(l) => format!("ok: {} pages of metadata checked", l.len()),
        Err(e) => format!("FAILED: {e}"),
    };
    let limits = WalkLimits {
        nr_frames,
        scratch: args.scratch_pfns(),
        listed: None,
    };
    let (t, _) = IncomingTracker::walk(mem, tree.tracker_root, &limits)?;
    let mut orders: BTreeMap<u32, OrderSummary> = BTreeMap::new();
    for (pfn, order) in t.blocks() {
        let o = orders.entry(order).or_insert(OrderSummary {
            order,
            blocks: 0,
            pages: 0,
            bytes: 0,
            ranges: vec![],
        });
        o.blocks += 1;
        o.pages += 1 << order;
        o.bytes += PAGE_SIZE << order;
        if o.ranges.len() < 4 {
            o.ranges.push((pfn * PAGE_SIZE, PAGE_SIZE << order));
        }
    }
    let (_, pages) = t.outstanding();
    let mut subtrees = Vec::new();
    for (name, s) in &tree.subtrees {
        let mut blob = vec![0u8; s.size.min(1 << 20) as usize];
        let decoded = match mem.read_phys(s.pa, &mut blob) {
            Err(e) => Some(format!("unreadable: {e}")),
            Ok(()) if name == KEXEC_METADATA_NAME => Some(match metadata::decode(&blob) {
                Ok(m) => format!(
                    "previous release {:?}, kexec count {}",
                    m.previous_release, m.kexec_count
                ),
                Err(e) => format!("invalid: {e}"),
            }),
            Ok(()) => decoders.get(name.as_str()).map(|d| d(mem, &blob)),
        };
        subtrees.push(SubtreeReport {
            name: name.clone(),
            pa: s.pa,
            size: s.size,
            decoded,
        });
    }
    Ok(Report {
        ram_size: mem.phys_size(),
        args,
        compatible: tree.compatible,
        tracker_root: tree.tracker_root,
        tracker_nodes: t.node_pages().len(),
        tracker_bytes: t.node_pages().len() as u64 * PAGE_SIZE,
        preserved_pages: pages,
        preserved_bytes: pages * PAGE_SIZE,
        orders: orders.into_values().collect(),
        subtrees,
        integrity,
    })
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "handover tree   {:#x} ({} bytes), compatible {:?}",
            self.args.fdt_pa, self.args.fdt_size, self.compatible
        )?;
        writeln!(
            f,
            "RAM             {} MiB, scratch {:#x}+{} MiB",
            self.ram_size >> 20,
            self.args.scratch_pa,
            self.args.scratch_size >> 20
        )?;
        writeln!(
            f,
            "tracker         root {:#x}, {} nodes ({} KiB)",
            self.tracker_root,
            self.tracker_nodes,
            self.tracker_bytes >> 10
        )?;
        writeln!(
            f,
            "preserved       {} pages ({} KiB)",
            self.preserved_pages,
            self.preserved_bytes >> 10
        )?;
        for o in &self.orders {
            let ranges: Vec<String> = o
                .ranges
                .iter()
                .map(|(pa, len)| format!("{pa:#x}+{len:#x}"))
                .collect();
            writeln!(
                f,
                "  order {:2}     {:8} blocks {:10} KiB  e.g. {}",
                o.order,
                o.blocks,
                o.bytes >> 10,
                ranges.join(" ")
            )?;
        }
        writeln!(f, "integrity       {}", self.integrity)?;
        writeln!(f, "subtrees        {}", self.subtrees.len())?;
        for s in &self.subtrees {
            writeln!(
                f,
                "  {:16} {:#x} ({} bytes){}",
                s.name,
                s.pa,
                s.size,
                s.decoded
                    .as_ref()
                    .map(|d| format!(": {d}"))
                    .unwrap_or_default()
            )?;
        }
        Ok(())
    }
}
