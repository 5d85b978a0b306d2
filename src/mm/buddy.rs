//! Buddy frame allocator over RAM, orders 0..=MAX_ORDER, with two zones.
//!
//! * **Scratch** — a MAX_ORDER-aligned range where early boot of a KHO image allocates before the
//!   preserved frames are known. Preserved memory is never placed there: the normal zone serves
//!   everything that can be preserved, the scratch zone serves only kernel-internal metadata that
//!   dies at kexec (like upstream's CMA-backed scratch).
//! * **Normal** — the rest of RAM. It stays offline until [`FrameAllocator::online_normal`] is told
//!   which frames the previous image preserved; only then does it hand anything out.
//!
//! Free blocks below MAX_ORDER are kept per order in ordered sets, lowest address first, so a
//! run of allocations of one order tends to be physically contiguous (which keeps guest
//! mappings few). Free MAX_ORDER blocks are kept as extents: maximal ranges of consecutive free
//! MAX_ORDER-aligned blocks, carved one block at a time when allocated and merged again when
//! freed, so that bringing a zone online costs per free range, not per 4 MiB of RAM.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

use super::{Folio, MmError, MAX_ORDER};

/// The two zones of RAM (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Zone {
    /// The scratch range: early-boot allocations that never get preserved.
    Scratch,
    /// Everything else: online only after the preserved frames are reserved.
    Normal,
}

/// Frame accounting, in 4 KiB frames. `free + used == total` always holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct FrameStats {
    /// Frames of RAM.
    pub total: u64,
    /// Free frames in both zones (an offline normal zone counts as used).
    pub free: u64,
    /// `total - free`.
    pub used: u64,
    /// Frames in the scratch zone.
    pub scratch_total: u64,
    /// Free frames in the scratch zone.
    pub scratch_free: u64,
    /// Of `free`, frames reserved for files in file blocks and not handed out yet
    /// ([`super::file_blocks`]; always 0 from the buddy itself).
    pub file_reserved: u64,
}

struct ZoneState {
    range: Range<u64>,
    /// Free blocks of orders below MAX_ORDER, by first frame (the MAX_ORDER set stays empty).
    free: Vec<BTreeSet<u64>>,
    /// Free MAX_ORDER blocks as extents: start -> end, both MAX_ORDER aligned, disjoint, never
    /// touching (neighbours are merged).
    big: BTreeMap<u64, u64>,
    nr_free: u64,
}

const BIG: u64 = 1 << MAX_ORDER;

impl ZoneState {
    fn new(range: Range<u64>) -> Self {
        Self {
            range,
            free: (0..=MAX_ORDER).map(|_| BTreeSet::new()).collect(),
            big: BTreeMap::new(),
            nr_free: 0,
        }
    }

    /// Insert a block of `order` (free, not in any list yet) into its list.
    fn insert_block(&mut self, pfn: u64, order: u32) {
        if order >= MAX_ORDER {
            self.insert_big(pfn, pfn + (1u64 << order));
        } else {
            self.free[order as usize].insert(pfn);
        }
    }

    /// Add the aligned range `a..b` of MAX_ORDER blocks to the extents, merging neighbours.
    fn insert_big(&mut self, mut a: u64, mut b: u64) {
        if let Some((&ps, &pe)) = self.big.range(..=a).next_back() {
            if pe == a {
                self.big.remove(&ps);
                a = ps;
            }
        }
        if let Some(ne) = self.big.remove(&b) {
            b = ne;
        }
        self.big.insert(a, b);
    }

    /// The extent containing frame `pfn`, if any.
    fn big_containing(&self, pfn: u64) -> Option<(u64, u64)> {
        let (&a, &b) = self.big.range(..=pfn).next_back()?;
        (pfn < b).then_some((a, b))
    }

    /// Remove the MAX_ORDER block at `pfn` (inside an extent) from the extents.
    fn remove_big(&mut self, pfn: u64) -> bool {
        let Some((a, b)) = self.big_containing(pfn) else {
            return false;
        };
        self.big.remove(&a);
        if a < pfn {
            self.big.insert(a, pfn);
        }
        if pfn + BIG < b {
            self.big.insert(pfn + BIG, b);
        }
        true
    }

    /// Add the free run `start..end` as maximal naturally aligned blocks: the MAX_ORDER
    /// aligned middle as one extent, the edges in the per-order sets.
    fn add_run(&mut self, mut start: u64, end: u64) {
        while start < end {
            let align = if start == 0 {
                MAX_ORDER
            } else {
                start.trailing_zeros().min(MAX_ORDER)
            };
            if align == MAX_ORDER && end - start >= BIG {
                let mid_end = end & !(BIG - 1);
                self.insert_big(start, mid_end);
                self.nr_free += mid_end - start;
                start = mid_end;
                continue;
            }
            let fit = 63 - (end - start).leading_zeros();
            let order = align.min(fit);
            self.insert_block(start, order);
            self.nr_free += 1 << order;
            start += 1 << order;
        }
    }

    fn alloc(&mut self, order: u32) -> Option<u64> {
        let (from, pfn) = match (order..MAX_ORDER).find(|&o| !self.free[o as usize].is_empty()) {
            Some(from) => (from, self.free[from as usize].pop_first()?),
            None => {
                let (&a, _) = self.big.iter().next()?;
                self.remove_big(a);
                (MAX_ORDER, a)
            }
        };
        for o in (order..from).rev() {
            self.free[o as usize].insert(pfn + (1 << o));
        }
        self.nr_free -= 1 << order;
        Some(pfn)
    }

    /// True if `pfn` lies inside a free block of any order.
    fn is_free(&self, pfn: u64) -> bool {
        self.block_containing(pfn).is_some()
    }

    /// The free block `(first pfn, order)` that contains `pfn`, if any.
    fn block_containing(&self, pfn: u64) -> Option<(u64, u32)> {
        (0..MAX_ORDER)
            .map(|o| (pfn & !((1u64 << o) - 1), o))
            .find(|(b, o)| self.free[*o as usize].contains(b))
            .or_else(|| {
                self.big_containing(pfn)
                    .map(|_| (pfn & !(BIG - 1), MAX_ORDER))
            })
    }

    /// The free blocks covering `start..end` in address order, or `Err(first frame that is not
    /// free)`. One lookup per block, not per frame.
    fn blocks_covering(&self, start: u64, end: u64) -> Result<Vec<(u64, u32)>, u64> {
        let mut out = Vec::new();
        let mut p = start;
        while p < end {
            let (b, o) = self.block_containing(p).ok_or(p)?;
            out.push((b, o));
            p = b + (1 << o);
        }
        Ok(out)
    }

    /// True if any frame of `start..end` lies in a free block.
    fn any_free_in(&self, start: u64, end: u64) -> bool {
        if start >= end {
            return false;
        }
        (0..MAX_ORDER).any(|o| {
            let from = (start + 1).saturating_sub(1 << o);
            self.free[o as usize].range(from..end).next().is_some()
        }) || self
            .big
            .range(..end)
            .next_back()
            .is_some_and(|(_, &b)| b > start)
    }

    /// One past the highest free frame below `below` (0 if none): the top of the highest free
    /// block that starts below it, clipped to it.
    fn highest_free_end(&self, below: u64) -> Option<u64> {
        let big = self
            .big
            .range(..below)
            .next_back()
            .map(|(_, &b)| b.min(below));
        (0..MAX_ORDER)
            .filter_map(|o| {
                let b = *self.free[o as usize].range(..below).next_back()?;
                Some((b + (1u64 << o)).min(below))
            })
            .chain(big)
            .max()
    }

    /// Remove exactly `start..end`, which `blocks` (from [`ZoneState::blocks_covering`])
    /// covers, from the free lists; the parts of those blocks outside the range stay free.
    fn take(&mut self, start: u64, end: u64, blocks: &[(u64, u32)]) {
        for &(b, o) in blocks {
            if o >= MAX_ORDER {
                self.remove_big(b);
            } else {
                self.free[o as usize].remove(&b);
            }
            self.nr_free -= 1 << o;
            let b_end = b + (1 << o);
            if b < start {
                self.add_run(b, start);
            }
            if end < b_end {
                self.add_run(end, b_end);
            }
        }
    }

    fn free(&mut self, mut pfn: u64, mut order: u32) -> Result<(), MmError> {
        let n = 1u64 << order;
        if self.is_free(pfn) || self.is_free(pfn + n - 1) {
            return Err(MmError::DoubleFree { pfn, order });
        }
        self.nr_free += n;
        while order < MAX_ORDER {
            let buddy = pfn ^ (1 << order);
            if buddy < self.range.start || buddy + (1 << order) > self.range.end {
                break;
            }
            if !self.free[order as usize].remove(&buddy) {
                break;
            }
            pfn = pfn.min(buddy);
            order += 1;
        }
        self.insert_block(pfn, order);
        Ok(())
    }
}

/// The buddy allocator of RAM's frames: a scratch zone and a normal zone.
pub struct FrameAllocator {
    nr_frames: u64,
    scratch: ZoneState,
    normal: ZoneState,
    normal_online: bool,
}

impl FrameAllocator {
    /// An allocator over `nr_frames` frames whose scratch zone (`scratch`, in PFNs, MAX_ORDER
    /// aligned) is free at once and whose normal zone is offline until `online_normal`.
    pub fn new(nr_frames: u64, scratch: Range<u64>) -> Result<Self, MmError> {
        let block = 1u64 << MAX_ORDER;
        let bad = |why| MmError::BadScratch {
            start: scratch.start << super::PAGE_SHIFT,
            len: (scratch.end.saturating_sub(scratch.start)) << super::PAGE_SHIFT,
            why,
        };
        if scratch.start % block != 0 || scratch.end % block != 0 {
            return Err(bad("not aligned to the largest block size (4 MiB)"));
        }
        if scratch.start >= scratch.end || scratch.end > nr_frames {
            return Err(bad("empty or outside RAM"));
        }
        let mut s = ZoneState::new(scratch.clone());
        s.add_run(scratch.start, scratch.end);
        Ok(Self {
            nr_frames,
            scratch: s,
            normal: ZoneState::new(0..nr_frames),
            normal_online: false,
        })
    }

    /// Frames of RAM (RAM size / [`super::PAGE_SIZE`]).
    pub fn nr_frames(&self) -> u64 {
        self.nr_frames
    }

    /// The scratch zone, in PFNs.
    pub fn scratch(&self) -> Range<u64> {
        self.scratch.range.clone()
    }

    /// True once [`FrameAllocator::online_normal`] has run this boot.
    pub fn normal_online(&self) -> bool {
        self.normal_online
    }

    /// The zone frame `pfn` belongs to.
    pub fn zone_of(&self, pfn: u64) -> Zone {
        if self.scratch.range.contains(&pfn) {
            Zone::Scratch
        } else {
            Zone::Normal
        }
    }

    /// Bring the normal zone online with exactly the `free` runs of frames free (outside
    /// scratch); every other normal frame stays allocated (its owner restores it). Once per boot.
    pub fn online_normal(&mut self, free: &[(u64, u64)]) {
        if self.normal_online {
            return;
        }
        let (s, e) = (self.scratch.range.start, self.scratch.range.end);
        for &(a, b) in free {
            let b = b.min(self.nr_frames);
            // Never let a run cross into scratch.
            for (lo, hi) in [(a, b.min(s)), (a.max(e), b)] {
                if lo < hi {
                    self.normal.add_run(lo, hi);
                }
            }
        }
        self.normal_online = true;
    }

    /// Allocate a block of 2^order frames: from the normal zone once it is online, from scratch
    /// during early boot.
    pub fn alloc(&mut self, order: u32) -> Result<Folio, MmError> {
        let zone = if self.normal_online {
            Zone::Normal
        } else {
            Zone::Scratch
        };
        self.alloc_in(zone, order)
    }

    /// Allocate a block of 2^order frames from `zone`, lowest address first; `BadOrder` above
    /// MAX_ORDER, `NoMemory` when the zone has no such block (always, for an offline normal zone).
    pub fn alloc_in(&mut self, zone: Zone, order: u32) -> Result<Folio, MmError> {
        if order > MAX_ORDER {
            return Err(MmError::BadOrder(order));
        }
        let z = match zone {
            Zone::Scratch => &mut self.scratch,
            Zone::Normal => &mut self.normal,
        };
        z.alloc(order)
            .map(|pfn| Folio { pfn, order })
            .ok_or(MmError::NoMemory { order, zone })
    }

    /// Return a block and merge it with its free buddies. Fails with `BadOrder`, `BadBlock`
    /// (misaligned, outside RAM, across the scratch boundary, normal zone offline) or
    /// `DoubleFree`. Does not zero the frames: [`super::Mm::free`] does.
    pub fn free(&mut self, folio: Folio) -> Result<(), MmError> {
        let Folio { pfn, order } = folio;
        if order > MAX_ORDER {
            return Err(MmError::BadOrder(order));
        }
        let n = 1u64 << order;
        if pfn % n != 0 || pfn.checked_add(n).is_none_or(|e| e > self.nr_frames) {
            return Err(MmError::BadBlock { pfn, order });
        }
        let zone = self.zone_of(pfn);
        if zone != self.zone_of(pfn + n - 1) {
            return Err(MmError::BadBlock { pfn, order });
        }
        match zone {
            Zone::Scratch => self.scratch.free(pfn, order),
            Zone::Normal if self.normal_online => self.normal.free(pfn, order),
            Zone::Normal => Err(MmError::BadBlock { pfn, order }),
        }
    }

    /// Take the exact frame range `pfn..pfn+nr` out of the free lists, splitting the free blocks
    /// it starts or ends in (their other parts stay free): for allocations above MAX_ORDER or at
    /// a chosen place, such as the huge-page pool's 1 GiB folios (`mm::hugetlb`). All or
    /// nothing: `NotFree` (naming the first busy frame) if any frame of the range is not free,
    /// `BadRange` if it is empty, leaves RAM, straddles the scratch boundary or lies in the
    /// normal zone before it is online. The caller owns the frames afterwards and gives them
    /// back with [`FrameAllocator::free`] in naturally aligned blocks of at most MAX_ORDER (as
    /// [`super::Mm::free_runs`] does).
    pub fn take_range(&mut self, pfn: u64, nr: u64) -> Result<(), MmError> {
        let bad = |why| MmError::BadRange { pfn, nr, why };
        if nr == 0 {
            return Err(bad("empty"));
        }
        let end = match pfn.checked_add(nr) {
            Some(e) if e <= self.nr_frames => e,
            _ => return Err(bad("outside RAM")),
        };
        let zone = self.zone_of(pfn);
        if zone != self.zone_of(end - 1)
            || (zone == Zone::Normal
                && pfn < self.scratch.range.end
                && self.scratch.range.start < end)
        {
            return Err(bad("straddles the scratch zone"));
        }
        let z = match zone {
            Zone::Scratch => &mut self.scratch,
            Zone::Normal if self.normal_online => &mut self.normal,
            Zone::Normal => return Err(bad("the normal zone is not online")),
        };
        let blocks = z
            .blocks_covering(pfn, end)
            .map_err(|busy| MmError::NotFree { pfn, nr, busy })?;
        z.take(pfn, end, &blocks);
        Ok(())
    }

    /// The highest naturally aligned range of 2^order frames of `zone` that is entirely free
    /// and ends at or below frame `below`: its first frame. Walks down from the highest free
    /// frame, skipping candidates by what the free lists say, so the cost follows the number
    /// of free blocks looked at, not the size of RAM. `None` if there is none (always for an
    /// offline normal zone).
    pub fn highest_free_range(&self, zone: Zone, order: u32, mut below: u64) -> Option<u64> {
        if order >= 63 {
            return None;
        }
        let n = 1u64 << order;
        let z = match zone {
            Zone::Scratch => &self.scratch,
            Zone::Normal if self.normal_online => &self.normal,
            Zone::Normal => return None,
        };
        loop {
            let top = z.highest_free_end(below)?;
            if top < n {
                return None;
            }
            let a = (top - n) & !(n - 1);
            match z.blocks_covering(a, a + n) {
                Ok(_) => return Some(a),
                // Every candidate above `a` failed or did not fit under `top`.
                Err(_) => below = a,
            }
        }
    }

    /// True if any frame of `pfn..pfn+nr` lies inside a free block (of either zone); a few
    /// lookups per order, whatever `nr`.
    pub fn any_free(&self, pfn: u64, nr: u64) -> bool {
        let end = pfn.saturating_add(nr);
        self.scratch.any_free_in(pfn, end) || self.normal.any_free_in(pfn, end)
    }

    /// True if frame `pfn` lies inside a free block.
    pub fn is_free(&self, pfn: u64) -> bool {
        match self.zone_of(pfn) {
            Zone::Scratch => self.scratch.is_free(pfn),
            Zone::Normal => self.normal.is_free(pfn),
        }
    }

    /// Current frame accounting.
    pub fn stats(&self) -> FrameStats {
        let free = self.scratch.nr_free + self.normal.nr_free;
        FrameStats {
            total: self.nr_frames,
            free,
            used: self.nr_frames - free,
            scratch_total: self.scratch.range.end - self.scratch.range.start,
            scratch_free: self.scratch.nr_free,
            file_reserved: 0,
        }
    }
}

#[cfg(test)]
impl ZoneState {
    /// Free MAX_ORDER blocks in the extents.
    fn big_blocks(&self) -> u64 {
        self.big.iter().map(|(a, b)| (b - a) / BIG).sum()
    }
}

#[cfg(test)]
#[path = "buddy_tests.rs"]
mod tests;
