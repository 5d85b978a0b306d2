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
mod tests {
    use super::*;

    fn alloc_with_scratch() -> FrameAllocator {
        let mut a = FrameAllocator::new(8192, 0..1024).unwrap();
        a.online_normal(&[(1024, 8192)]);
        a
    }

    #[test]
    fn early_boot_uses_scratch_only() {
        let mut a = FrameAllocator::new(8192, 1024..2048).unwrap();
        let f = a.alloc(3).unwrap();
        assert_eq!(a.zone_of(f.pfn), Zone::Scratch);
        assert_eq!(a.stats().free, 1024 - 8);
    }

    #[test]
    fn alloc_free_coalesces() {
        let mut a = alloc_with_scratch();
        let before = a.stats();
        let fs: Vec<_> = (0..100).map(|i| a.alloc(i % 4).unwrap()).collect();
        assert!(fs.iter().all(|f| a.zone_of(f.pfn) == Zone::Normal));
        for f in fs {
            a.free(f).unwrap();
        }
        assert_eq!(a.stats(), before);
        // Everything coalesced back into MAX_ORDER blocks.
        assert_eq!(a.normal.big_blocks(), 7);
    }

    #[test]
    fn online_keeps_extents_and_carves_lazily() {
        // 4 TiB of frames: onlining costs per free range, not per 4 MiB block.
        let n = 1u64 << 30;
        let mut a = FrameAllocator::new(n, 0..1024).unwrap();
        a.online_normal(&[(1024, 5000), (5003, n)]);
        assert_eq!(a.stats().used, 3);
        assert!(a.normal.big.len() <= 2);
        assert!(!a.is_free(5001) && a.is_free(5003) && a.is_free(n - 1));
        assert!(a.any_free(n - 1, 1) && !a.any_free(5000, 3));
        let f = a.alloc(MAX_ORDER).unwrap();
        assert_eq!(f.pfn, 1024, "the lowest free block");
        assert!(!a.is_free(1024) && !a.is_free(2047) && a.is_free(2048));
        a.take_range(1 << 20, 3 << 20).unwrap();
        assert!(!a.is_free((1 << 20) + 5) && a.is_free((1 << 20) - 1) && a.is_free(4 << 20));
        assert_eq!(
            a.highest_free_range(Zone::Normal, 18, n),
            Some(n - (1 << 18))
        );
        a.free(f).unwrap();
        for (p, o) in super::super::split_blocks(1 << 20, 3 << 20, MAX_ORDER) {
            a.free(Folio { pfn: p, order: o }).unwrap();
        }
        assert_eq!(a.stats().used, 3);
        assert!(
            a.normal.big.len() <= 2,
            "merged again: {:?}",
            a.normal.big.len()
        );
    }

    #[test]
    fn reserved_frames_stay_used() {
        let mut a = FrameAllocator::new(8192, 0..1024).unwrap();
        a.online_normal(&[(1024, 2000), (2010, 5000), (5001, 8192)]);
        assert_eq!(a.stats().used, 11);
        assert!(!a.is_free(2005) && a.is_free(2010) && !a.is_free(5000));
        a.free(Folio {
            pfn: 5000,
            order: 0,
        })
        .unwrap();
        assert_eq!(a.stats().used, 10);
    }

    #[test]
    fn misuse_is_an_error() {
        let mut a = alloc_with_scratch();
        let f = a.alloc(2).unwrap();
        a.free(f).unwrap();
        assert!(matches!(a.free(f), Err(MmError::DoubleFree { .. })));
        assert!(a.free(Folio { pfn: 3, order: 2 }).is_err());
        assert!(a
            .free(Folio {
                pfn: 8192,
                order: 0
            })
            .is_err());
        assert!(a.alloc(MAX_ORDER + 1).is_err());
        assert!(FrameAllocator::new(8192, 100..1024).is_err());
    }

    fn free_map(a: &FrameAllocator) -> Vec<bool> {
        (0..a.nr_frames()).map(|p| a.is_free(p)).collect()
    }

    #[test]
    fn take_range_exact_block() {
        let mut a = alloc_with_scratch();
        let before = a.stats();
        a.take_range(2048, 1024).unwrap();
        assert_eq!(a.stats().free, before.free - 1024);
        assert!(!a.is_free(2048) && !a.is_free(3071));
        assert!(a.is_free(2047) && a.is_free(3072));
        // Given back as a block, it is as before.
        a.free(Folio {
            pfn: 2048,
            order: MAX_ORDER,
        })
        .unwrap();
        assert_eq!(a.stats(), before);
    }

    #[test]
    fn take_range_splits_blocks_and_gives_back() {
        let mut a = alloc_with_scratch();
        let before = a.stats();
        // Inside one 4 MiB block, and across two of them.
        a.take_range(1030, 5).unwrap();
        a.take_range(3000, 200).unwrap();
        assert_eq!(a.stats().free, before.free - 205);
        let map = free_map(&a);
        for p in 1024..8192u64 {
            let taken = (1030..1035).contains(&p) || (3000..3200).contains(&p);
            assert_eq!(map[p as usize], !taken, "frame {p}");
        }
        // Everything else can still be allocated, and none of it from the taken ranges.
        let mut got = 0;
        while let Ok(f) = a.alloc(0) {
            assert!(!(1030..1035).contains(&f.pfn) && !(3000..3200).contains(&f.pfn));
            got += 1;
        }
        assert_eq!(
            got,
            before.free - 1024 - 205,
            "scratch is not served once online"
        );
        let mut b = FrameAllocator::new(8192, 0..1024).unwrap();
        b.online_normal(&[(1024, 8192)]);
        b.take_range(1030, 5).unwrap();
        b.take_range(3000, 200).unwrap();
        for (p, o) in super::super::split_blocks(1030, 5, MAX_ORDER)
            .chain(super::super::split_blocks(3000, 200, MAX_ORDER))
        {
            b.free(Folio { pfn: p, order: o }).unwrap();
        }
        assert_eq!(b.stats(), before);
        assert_eq!(b.normal.big_blocks(), 7, "coalesced again");
    }

    #[test]
    fn take_range_refuses_and_changes_nothing() {
        let mut a = alloc_with_scratch();
        let f = a.alloc(0).unwrap();
        let st = a.stats();
        let map = free_map(&a);
        assert!(matches!(
            a.take_range(f.pfn, 16),
            Err(MmError::NotFree { busy, .. }) if busy == f.pfn
        ));
        assert_eq!(a.take_range(f.pfn, 1).unwrap_err().errno(), libc::EBUSY);
        a.take_range(5000, 10).unwrap();
        assert!(matches!(
            a.take_range(5009, 2),
            Err(MmError::NotFree { busy: 5009, .. })
        ));
        a.free(Folio {
            pfn: 5000,
            order: 1,
        })
        .unwrap();
        for bad in [(2000, 0), (8000, 193), (u64::MAX, 2), (1000, 48)] {
            assert!(
                matches!(a.take_range(bad.0, bad.1), Err(MmError::BadRange { .. })),
                "{bad:?}"
            );
        }
        // The refusals left the free lists as they were (but for 5002..5010, still taken).
        assert_eq!(a.stats().free, st.free - 8);
        let now = free_map(&a);
        for p in 0..8192usize {
            assert_eq!(now[p], map[p] && !(5002..5010).contains(&p), "frame {p}");
        }
        // Scratch ranges can be taken too; the normal zone only once online.
        a.take_range(0, 3).unwrap();
        let mut off = FrameAllocator::new(8192, 0..1024).unwrap();
        assert!(matches!(
            off.take_range(2048, 1),
            Err(MmError::BadRange { .. })
        ));
        assert_eq!(off.highest_free_range(Zone::Normal, 0, 8192), None);
    }

    #[test]
    fn take_range_1g_aligned() {
        const G: u64 = 1 << 18; // 1 GiB in frames
        let mut a = FrameAllocator::new(2 * G, 0..4096).unwrap();
        a.online_normal(&[(4096, 2 * G)]);
        let before = a.stats();
        // The first 1 GiB holds scratch: only the second one is a whole free 1 GiB range.
        assert_eq!(a.highest_free_range(Zone::Normal, 18, 2 * G), Some(G));
        assert_eq!(a.highest_free_range(Zone::Normal, 18, 2 * G - 1), None);
        a.take_range(G, G).unwrap();
        assert_eq!(a.stats().free, before.free - G);
        assert!(!a.is_free(G) && !a.is_free(2 * G - 1) && a.is_free(G - 1));
        assert_eq!(a.highest_free_range(Zone::Normal, 18, 2 * G), None);
        // 2 MiB ranges come from the top of what is left.
        assert_eq!(a.highest_free_range(Zone::Normal, 9, 2 * G), Some(G - 512));
        for (p, o) in super::super::split_blocks(G, G, MAX_ORDER) {
            a.free(Folio { pfn: p, order: o }).unwrap();
        }
        assert_eq!(a.stats(), before);

        // One busy frame anywhere in the top 1 GiB rules it out.
        let mut b = FrameAllocator::new(3 * G, 0..4096).unwrap();
        b.online_normal(&[(4096, 2 * G + 77), (2 * G + 78, 3 * G)]);
        assert_eq!(b.highest_free_range(Zone::Normal, 18, 3 * G), Some(G));
        assert!(matches!(
            b.take_range(2 * G, G),
            Err(MmError::NotFree { busy, .. }) if busy == 2 * G + 77
        ));
        assert_eq!(
            b.highest_free_range(Zone::Normal, 9, 3 * G),
            Some(3 * G - 512)
        );
        assert_eq!(
            b.highest_free_range(Zone::Normal, 9, 2 * G + 512),
            Some(2 * G - 512),
            "the 2 MiB range with the busy frame is skipped"
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
        /// After any allocations, a taken range is exactly taken (or, if a frame was busy,
        /// nothing changes), and the highest free aligned range is free and the highest.
        #[test]
        fn take_range_is_exact(
            allocs in proptest::collection::vec(0u32..=4, 0..40),
            start in 1024u64..8192,
            len in 1u64..2048,
            order in 0u32..=12,
        ) {
            let mut a = alloc_with_scratch();
            for o in allocs {
                let _ = a.alloc(o);
            }
            let before = free_map(&a);
            let st = a.stats();
            let end = (start + len).min(8192);
            let all_free = (start..end).all(|p| before[p as usize]);
            let r = a.take_range(start, end - start);
            proptest::prop_assert_eq!(r.is_ok(), all_free);
            let after = free_map(&a);
            for p in 0..8192u64 {
                let taken = all_free && (start..end).contains(&p);
                proptest::prop_assert_eq!(after[p as usize], before[p as usize] && !taken);
            }
            let taken = if all_free { end - start } else { 0 };
            proptest::prop_assert_eq!(a.stats().free, st.free - taken);
            proptest::prop_assert_eq!(
                a.any_free(start, end - start),
                (start..end).any(|p| after[p as usize])
            );
            let n = 1u64 << order;
            let best = (1024 / n.min(1024)..8192 / n)
                .rev()
                .map(|i| i * n)
                .find(|&c| c >= 1024 && (c..c + n).all(|p| after[p as usize]));
            proptest::prop_assert_eq!(a.highest_free_range(Zone::Normal, order, 8192), best);
        }
    }
}
