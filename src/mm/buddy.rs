//! Buddy frame allocator over RAM, orders 0..=MAX_ORDER, with two zones.
//!
//! * **Scratch** — a MAX_ORDER-aligned range where early boot of a KHO image allocates before the
//!   preserved frames are known. Preserved memory is never placed there: the normal zone serves
//!   everything that can be preserved, the scratch zone serves only kernel-internal metadata that
//!   dies at kexec (like upstream's CMA-backed scratch).
//! * **Normal** — the rest of RAM. It stays offline until [`FrameAllocator::online_normal`] is told
//!   which frames the previous image preserved; only then does it hand anything out.
//!
//! Free blocks are kept per order in ordered sets, lowest address first, so a run of
//! allocations of one order tends to be physically contiguous (which keeps guest mappings few).

use std::collections::BTreeSet;
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
}

struct ZoneState {
    range: Range<u64>,
    free: Vec<BTreeSet<u64>>,
    nr_free: u64,
}

impl ZoneState {
    fn new(range: Range<u64>) -> Self {
        Self {
            range,
            free: (0..=MAX_ORDER).map(|_| BTreeSet::new()).collect(),
            nr_free: 0,
        }
    }

    /// Add the free run `start..end` as maximal naturally aligned blocks.
    fn add_run(&mut self, mut start: u64, end: u64) {
        while start < end {
            let align = if start == 0 {
                MAX_ORDER
            } else {
                start.trailing_zeros().min(MAX_ORDER)
            };
            let fit = 63 - (end - start).leading_zeros();
            let order = align.min(fit);
            self.free[order as usize].insert(start);
            self.nr_free += 1 << order;
            start += 1 << order;
        }
    }

    fn alloc(&mut self, order: u32) -> Option<u64> {
        let from = (order..=MAX_ORDER).find(|&o| !self.free[o as usize].is_empty())?;
        let pfn = self.free[from as usize].pop_first()?;
        for o in (order..from).rev() {
            self.free[o as usize].insert(pfn + (1 << o));
        }
        self.nr_free -= 1 << order;
        Some(pfn)
    }

    /// True if `pfn` lies inside a free block of any order.
    fn is_free(&self, pfn: u64) -> bool {
        (0..=MAX_ORDER).any(|o| self.free[o as usize].contains(&(pfn & !((1u64 << o) - 1))))
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
        self.free[order as usize].insert(pfn);
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
        }
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
        assert_eq!(a.normal.free[MAX_ORDER as usize].len(), 7);
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
}
