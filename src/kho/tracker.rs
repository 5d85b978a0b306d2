//! The preserved-memory tracker: a radix tree of one-page nodes in RAM whose leaves are bitmaps
//! with one bit per preserved block of a given order (upstream's "kho-v4" layout). Because the
//! tree lives in RAM and nodes link by physical address, the next image reads it in place: no
//! finalize pass over all pages is needed at reboot.
//!
//! Cost: one bit per preserved 4 KiB page, i.e. a 4 KiB leaf covers 128 MiB and the tracker
//! needs 32 KiB per GiB of order-0 pages plus a few interior nodes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;
use std::sync::atomic::Ordering;

use crate::abi::kho::{
    radix_index, radix_key, radix_key_decode, KHO_BITMAP_SIZE_LOG2, KHO_MAX_PRESERVE_ORDER,
    KHO_TABLE_LEVELS,
};
use crate::mm::{Folio, Mm, PhysRead, Ranges, PAGE_SHIFT, PAGE_SIZE};

use super::KhoError;

const LEAF_BITS: u64 = 1 << KHO_BITMAP_SIZE_LOG2;

/// The outgoing tracker of the running image.
pub struct Tracker {
    root: u64,
    nodes: Vec<Folio>,
    /// (key >> 15, leaf pa) of the last leaf touched: consecutive PFNs share a leaf.
    cache: Option<(u64, u64)>,
    preserved_pages: u64,
    preserved_blocks: u64,
}

impl Tracker {
    /// An empty tracker: one zeroed root table page allocated from `mm`.
    pub fn new(mm: &mut Mm) -> Result<Self, KhoError> {
        let root = mm.alloc_zeroed(0)?;
        Ok(Self {
            root: root.pa(),
            nodes: vec![root],
            cache: None,
            preserved_pages: 0,
            preserved_blocks: 0,
        })
    }

    /// Physical address of the root table: the handover tree's `preserved-memory-map`.
    pub fn root(&self) -> u64 {
        self.root
    }

    /// RAM used by the tracker's own nodes.
    pub fn node_bytes(&self) -> u64 {
        self.nodes.len() as u64 * PAGE_SIZE
    }

    /// Pages currently marked preserved (sum of `2^order` over the blocks).
    pub fn preserved_pages(&self) -> u64 {
        self.preserved_pages
    }

    /// Blocks currently marked preserved.
    pub fn preserved_blocks(&self) -> u64 {
        self.preserved_blocks
    }

    fn leaf(&mut self, mm: &mut Mm, key: u64, create: bool) -> Result<Option<u64>, KhoError> {
        let prefix = key >> KHO_BITMAP_SIZE_LOG2;
        if let Some((p, leaf)) = self.cache {
            if p == prefix {
                return Ok(Some(leaf));
            }
        }
        let mut table = self.root;
        for level in (1..=KHO_TABLE_LEVELS).rev() {
            let slot = table + radix_index(key, level) as u64 * 8;
            let mut child = mm.ram.read_u64(slot)?;
            if child == 0 {
                if !create {
                    return Ok(None);
                }
                let node = mm.alloc_zeroed(0)?;
                self.nodes.push(node);
                child = node.pa();
                mm.ram.write_u64(slot, child)?;
            }
            table = child;
        }
        self.cache = Some((prefix, table));
        Ok(Some(table))
    }

    fn word(key: u64) -> (u64, u64) {
        let bit = key & (LEAF_BITS - 1);
        ((bit / 64) * 8, 1u64 << (bit % 64))
    }

    /// Mark `(pfn, order)` preserved. Returns false if it already was.
    pub fn set(&mut self, mm: &mut Mm, pfn: u64, order: u32) -> Result<bool, KhoError> {
        let key = radix_key(pfn, order);
        let leaf = self
            .leaf(mm, key, true)?
            .ok_or(KhoError::Corrupt("tracker leaf"))?;
        let (off, mask) = Self::word(key);
        // One atomic read-modify-write: the bitmap word lives in RAM, which is shared memory.
        let old = mm
            .ram
            .atomic_u64(leaf + off)?
            .fetch_or(mask, Ordering::Relaxed);
        if old & mask != 0 {
            return Ok(false);
        }
        self.preserved_pages += 1 << order;
        self.preserved_blocks += 1;
        Ok(true)
    }

    /// Clear `(pfn, order)`. Returns false if it was not set. Nodes are never freed (as
    /// upstream): an emptied leaf costs a page until the next boot.
    pub fn clear(&mut self, mm: &mut Mm, pfn: u64, order: u32) -> Result<bool, KhoError> {
        let key = radix_key(pfn, order);
        let Some(leaf) = self.leaf(mm, key, false)? else {
            return Ok(false);
        };
        let (off, mask) = Self::word(key);
        let old = mm
            .ram
            .atomic_u64(leaf + off)?
            .fetch_and(!mask, Ordering::Relaxed);
        if old & mask == 0 {
            return Ok(false);
        }
        self.preserved_pages -= 1 << order;
        self.preserved_blocks -= 1;
        Ok(true)
    }

    /// Whether `(pfn, order)` is marked preserved (exactly this order).
    pub fn test(&mut self, mm: &mut Mm, pfn: u64, order: u32) -> Result<bool, KhoError> {
        let key = radix_key(pfn, order);
        let Some(leaf) = self.leaf(mm, key, false)? else {
            return Ok(false);
        };
        let (off, mask) = Self::word(key);
        Ok(mm.ram.atomic_u64(leaf + off)?.load(Ordering::Relaxed) & mask != 0)
    }

    /// The tracker's node pages (root, tables, leaf bitmaps): what its checksum and a
    /// handover dump cover.
    pub fn node_folios(&self) -> &[Folio] {
        &self.nodes
    }
}

/// Limits a handover tracker must respect.
pub struct WalkLimits {
    /// Frames of RAM: every node and preserved block must lie below.
    pub nr_frames: u64,
    /// The scratch zone (PFNs): no node or preserved block may overlap it.
    pub scratch: Range<u64>,
    /// If given, every tracker node must be one of these pages (the integrity table's).
    pub listed: Option<HashSet<u64>>,
}

/// State of one walk: the frames to reserve and the node pages seen.
struct Walk {
    reserved: Ranges,
    seen: HashSet<u64>,
}

/// Hasher of the incoming tracker's leaf map. Leaf keys are small dense integers: a
/// multiply-shift hash is enough and far cheaper than SipHash on the restore path (one lookup
/// per restored folio).
#[derive(Default, Clone, Copy)]
pub struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ b as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (v ^ self.0).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type LeafMap = HashMap<u64, Box<[u64; 512]>, std::hash::BuildHasherDefault<KeyHasher>>;

/// The tracker handed over by the previous image, copied out of RAM at boot. Restores consume
/// its bits, so a block can be restored at most once.
#[derive(Default)]
pub struct IncomingTracker {
    leaves: LeafMap,
    node_pages: Vec<u64>,
    blocks: u64,
    pages: u64,
}

impl IncomingTracker {
    /// Walk and validate the tree at `root` and return it with the frames to reserve: every
    /// node page and every preserved block, sorted and checked for overlaps. Nothing is written,
    /// so a failure leaves the caller free to discard the handover and boot clean.
    pub fn walk(
        mem: &dyn PhysRead,
        root: u64,
        limits: &WalkLimits,
    ) -> Result<(Self, Ranges), KhoError> {
        let mut t = IncomingTracker::default();
        let mut w = Walk {
            reserved: Ranges::new(),
            seen: HashSet::new(),
        };
        t.walk_table(mem, root, KHO_TABLE_LEVELS, 0, limits, &mut w)?;
        let reserved = w.reserved.finish().map_err(|o| {
            KhoError::BadHandover(format!(
                "preserved memory overlaps: frames {:#x}..{:#x} and {:#x}..{:#x}",
                (o.0).0,
                (o.0).1,
                (o.1).0,
                (o.1).1
            ))
        })?;
        Ok((t, reserved))
    }

    /// The node pages of the tree at `root`, found without copying any leaf, with the same
    /// node checks as [`IncomingTracker::walk`] (aligned, in RAM, out of scratch, listed if a
    /// list is given, each page once). This is what the tracker checksum covers: the boot path
    /// checks it with these pages before the walk copies leaves and collects blocks, so a damaged
    /// tracker is refused at the cost of 8 bytes per node rather than a 4 KiB leaf.
    pub fn node_pages_of(
        mem: &dyn PhysRead,
        root: u64,
        limits: &WalkLimits,
    ) -> Result<Vec<u64>, KhoError> {
        fn visit(
            t: &mut IncomingTracker,
            mem: &dyn PhysRead,
            pa: u64,
            level: u32,
            limits: &WalkLimits,
            w: &mut Walk,
        ) -> Result<(), KhoError> {
            t.claim_node(pa, limits, w)?;
            if level == 0 {
                return Ok(());
            }
            let mut page = [0u8; PAGE_SIZE as usize];
            mem.read_phys(pa, &mut page)?;
            for c in page.chunks_exact(8) {
                let child = u64::from_ne_bytes(c.try_into().unwrap_or_default());
                if child != 0 {
                    visit(t, mem, child, level - 1, limits, w)?;
                }
            }
            Ok(())
        }
        let mut t = IncomingTracker::default();
        let mut w = Walk {
            reserved: Ranges::new(),
            seen: HashSet::new(),
        };
        visit(&mut t, mem, root, KHO_TABLE_LEVELS, limits, &mut w)?;
        Ok(t.node_pages)
    }

    fn claim_node(&mut self, pa: u64, limits: &WalkLimits, w: &mut Walk) -> Result<(), KhoError> {
        let pfn = pa >> PAGE_SHIFT;
        if pa % PAGE_SIZE != 0 || pfn >= limits.nr_frames {
            return Err(KhoError::BadHandover(format!(
                "tracker node {pa:#x} is misaligned or outside RAM"
            )));
        }
        if limits.scratch.contains(&pfn) {
            return Err(KhoError::BadHandover(format!(
                "tracker node {pa:#x} lies in scratch"
            )));
        }
        if limits.listed.as_ref().is_some_and(|l| !l.contains(&pa)) {
            return Err(KhoError::BadHandover(format!(
                "tracker node {pa:#x} is not covered by the integrity table"
            )));
        }
        if !w.seen.insert(pfn) {
            return Err(KhoError::BadHandover(format!(
                "tracker node {pa:#x} is referenced twice"
            )));
        }
        w.reserved.push(pfn, pfn + 1);
        self.node_pages.push(pa);
        Ok(())
    }

    fn walk_table(
        &mut self,
        mem: &dyn PhysRead,
        pa: u64,
        level: u32,
        prefix: u64,
        limits: &WalkLimits,
        w: &mut Walk,
    ) -> Result<(), KhoError> {
        self.claim_node(pa, limits, w)?;
        let mut page = [0u8; PAGE_SIZE as usize];
        mem.read_phys(pa, &mut page)?;
        let words: Vec<u64> = page
            .chunks_exact(8)
            .map(|c| u64::from_ne_bytes(c.try_into().unwrap_or_default()))
            .collect();
        if level == 0 {
            return self.take_leaf(prefix, &words, limits, w);
        }
        for (idx, &child) in words.iter().enumerate() {
            if child != 0 {
                let p = (prefix << 9) | idx as u64;
                self.walk_table(mem, child, level - 1, p, limits, w)?;
            }
        }
        Ok(())
    }

    fn take_leaf(
        &mut self,
        prefix: u64,
        words: &[u64],
        limits: &WalkLimits,
        w: &mut Walk,
    ) -> Result<(), KhoError> {
        let mut leaf = Box::new([0u64; 512]);
        for (wi, &word) in words.iter().enumerate() {
            leaf[wi] = word;
            let mut bits = word;
            while bits != 0 {
                let b = bits.trailing_zeros() as u64;
                bits &= bits - 1;
                let key = (prefix << KHO_BITMAP_SIZE_LOG2) | (wi as u64 * 64 + b);
                let Some((pfn, order)) = radix_key_decode(key) else {
                    return Err(KhoError::BadHandover(format!(
                        "tracker key {key:#x} is invalid"
                    )));
                };
                if order > KHO_MAX_PRESERVE_ORDER {
                    return Err(KhoError::BadHandover(format!(
                        "tracker holds a block of order {order}, above the limit {KHO_MAX_PRESERVE_ORDER}"
                    )));
                }
                let end = pfn + (1u64 << order);
                if end > limits.nr_frames {
                    return Err(KhoError::BadHandover(format!(
                        "preserved block pfn {pfn:#x} order {order} lies outside RAM"
                    )));
                }
                if pfn < limits.scratch.end && limits.scratch.start < end {
                    return Err(KhoError::BadHandover(format!(
                        "preserved block pfn {pfn:#x} order {order} overlaps scratch"
                    )));
                }
                w.reserved.push(pfn, end);
                self.blocks += 1;
                self.pages += 1 << order;
            }
        }
        if self.leaves.insert(prefix, leaf).is_some() {
            return Err(KhoError::BadHandover("tracker leaf appears twice".into()));
        }
        Ok(())
    }

    /// Pages of the tracker's own nodes; the boot path frees them once the tree is copied.
    pub fn node_pages(&self) -> &[u64] {
        &self.node_pages
    }

    /// Blocks and pages still waiting to be restored.
    pub fn outstanding(&self) -> (u64, u64) {
        (self.blocks, self.pages)
    }

    /// Whether `(pfn, order)` is preserved and not yet restored.
    pub fn contains(&self, pfn: u64, order: u32) -> bool {
        let key = radix_key(pfn, order);
        let bit = key & (LEAF_BITS - 1);
        self.leaves
            .get(&(key >> KHO_BITMAP_SIZE_LOG2))
            .is_some_and(|l| l[(bit / 64) as usize] & (1 << (bit % 64)) != 0)
    }

    /// The order `pfn` was preserved with, if it starts a preserved block.
    pub fn order_of(&self, pfn: u64) -> Option<u32> {
        (0..=KHO_MAX_PRESERVE_ORDER)
            .take_while(|o| pfn % (1u64 << o) == 0)
            .find(|&o| self.contains(pfn, o))
    }

    /// Consume the block starting at `pfn`, whatever its order: the order, if it was preserved
    /// and not yet restored.
    pub fn take_any(&mut self, pfn: u64) -> Option<u32> {
        for order in 0..=KHO_MAX_PRESERVE_ORDER {
            if pfn % (1u64 << order) != 0 {
                return None;
            }
            if self.take(pfn, order) {
                return Some(order);
            }
        }
        None
    }

    /// Consume the bit of `(pfn, order)`: true if it was preserved and not yet restored.
    pub fn take(&mut self, pfn: u64, order: u32) -> bool {
        let key = radix_key(pfn, order);
        let bit = key & (LEAF_BITS - 1);
        let Some(l) = self.leaves.get_mut(&(key >> KHO_BITMAP_SIZE_LOG2)) else {
            return false;
        };
        let w = &mut l[(bit / 64) as usize];
        let mask = 1u64 << (bit % 64);
        if *w & mask == 0 {
            return false;
        }
        *w &= !mask;
        self.blocks -= 1;
        self.pages -= 1 << order;
        true
    }

    /// Every outstanding block, as (pfn, order), in key order.
    pub fn blocks(&self) -> Vec<(u64, u32)> {
        let mut keys: Vec<_> = self.leaves.keys().copied().collect();
        keys.sort_unstable();
        let mut out = Vec::new();
        for prefix in keys {
            for (wi, &w) in self.leaves[&prefix].iter().enumerate() {
                let mut bits = w;
                while bits != 0 {
                    let b = bits.trailing_zeros() as u64;
                    bits &= bits - 1;
                    let key = (prefix << KHO_BITMAP_SIZE_LOG2) | (wi as u64 * 64 + b);
                    if let Some(d) = radix_key_decode(key) {
                        out.push(d);
                    }
                }
            }
        }
        out
    }

    /// Outstanding pages per order.
    pub fn pages_by_order(&self) -> BTreeMap<u32, (u64, u64)> {
        let mut m: BTreeMap<u32, (u64, u64)> = BTreeMap::new();
        for (_, order) in self.blocks() {
            let e = m.entry(order).or_default();
            e.0 += 1;
            e.1 += 1 << order;
        }
        m
    }
}
