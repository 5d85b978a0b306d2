//! The huge-page pool: naturally aligned folios of 2 MiB (order 9) and 1 GiB (order 18) set
//! aside from RAM at boot (`--hugepages 2M:N,1G:M`), like `hugepages=` on Linux's command
//! line. A folio of the pool is allocated from the pool and freed to the pool, never to the
//! buddy allocator, so the pool keeps its size however fragmented the rest of RAM gets.
//!
//! **Where the folios come from.** [`HugePool::reserve`] takes each folio out of the buddy's
//! normal zone with [`FrameAllocator::take_range`] (the buddy's largest block is 4 MiB, so a
//! 1 GiB folio is taken as an exact range). It takes the *highest* naturally aligned range that
//! is entirely free ([`FrameAllocator::highest_free_range`]), 1 GiB folios before 2 MiB ones
//! (so small folios do not break up the large ranges): the buddy serves the lowest addresses
//! first and the scratch zone sits at the bottom, so the top of RAM is where whole ranges
//! are. The scheme is deterministic: the same RAM and the same free frames give the same folios.
//! The pool never takes the last [`MIN_FREE_FRAMES`] (4 MiB) of the normal zone: the host
//! needs some memory of its own to boot.
//!
//! **Accounting.** Per order the pool is exact: `total = free + in_use`, and `total` frames of
//! `2^order` each are counted as used by the frame allocator. `requested` is the target the
//! boot parameter asked for. Free folios of the pool read as zeros (a freed folio is
//! hole-punched, as every free frame of [`Mm`] is), so [`HugePool::alloc`] never clears memory
//! and a free folio costs no host memory.
//!
//! **After a kexec.** The request travels on the command line to every image, and it is the
//! target each one keeps per order. The boot cannot know how many of the previous image's
//! huge folios the files it will retrieve hold (KHO hands over blocks, not who allocated
//! them), and the frames the previous image preserved are not free, so the pool cannot take
//! them. The rule:
//!
//! 1. At boot, once the normal zone is online, the pool reserves the full request from free
//!    RAM (the previous image's pool folios that were free, and not preserved, are free RAM
//!    again by then).
//! 2. A folio handed over by the previous image and retrieved by a file is
//!    [`HugePool::adopt`]ed: it counts in the pool, in use. If that brings the order's total
//!    above the request and the pool has a free folio of that order, one free folio goes
//!    back to the buddy at once. So once every file is retrieved the pool looks as it did
//!    before the update: `total = max(requested, adopted)`, `in_use = adopted`.
//! 3. A folio freed while the order's total is above the request goes back to the buddy, not
//!    to the pool.
//!
//! **When RAM cannot hold the request.** A cold boot fails with
//! [`MmError::HugePagesShort`] (the command line asked for something the machine does not
//! have). A boot after a kexec (or a rollback) never fails for it: it reserves what fits and
//! logs a warning; the adoptions of step 2 usually make up for it, since what is missing is
//! most often the previous image's folios still in use, and [`HugePool::refill`] takes more
//! once memory is free.

use std::collections::BTreeSet;

#[cfg(doc)]
use super::FrameAllocator;
use super::{Folio, Mm, MmError, Zone, MAX_ORDER, PAGE_SIZE};

/// Order of a 2 MiB huge folio.
pub const ORDER_2M: u32 = 9;
/// Order of a 1 GiB huge folio.
pub const ORDER_1G: u32 = 18;
/// The orders the pool serves, largest first (the order they are reserved in).
pub const HUGE_ORDERS: [u32; 2] = [ORDER_1G, ORDER_2M];
/// Frames of the normal zone the pool always leaves free for the host itself (KHO's tracker,
/// LUO, files): one block of the buddy's largest order, 4 MiB.
pub const MIN_FREE_FRAMES: u64 = 1 << MAX_ORDER;

/// The name of a huge-page order on the command line: `2M`, `1G` (`?` for other orders).
pub fn size_name(order: u32) -> &'static str {
    match order {
        ORDER_2M => "2M",
        ORDER_1G => "1G",
        _ => "?",
    }
}

/// The order of a huge-page size name, `2M` or `1G` (either case).
pub fn order_of_size(name: &str) -> Option<u32> {
    match name {
        "2M" | "2m" => Some(ORDER_2M),
        "1G" | "1g" => Some(ORDER_1G),
        _ => None,
    }
}

/// What `--hugepages` asks for: a number of folios per huge-page size. The default asks for
/// none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HugePageRequest {
    /// 2 MiB folios.
    pub count_2m: u64,
    /// 1 GiB folios.
    pub count_1g: u64,
}

impl HugePageRequest {
    /// Parse `2M:N,1G:M` (either part may be left out, in any order, each at most once; sizes
    /// `2M` and `1G` only; counts in decimal). The request's size in bytes must fit in a u64.
    pub fn parse(s: &str) -> Result<HugePageRequest, String> {
        let usage = "expected SIZE:COUNT[,SIZE:COUNT] with SIZE 2M or 1G, e.g. 2M:512,1G:2";
        let mut r = HugePageRequest::default();
        let mut seen = [false; 2];
        if s.trim().is_empty() {
            return Err(format!("--hugepages is empty: {usage}"));
        }
        for part in s.split(',') {
            let part = part.trim();
            let (size, count) = part
                .split_once(':')
                .ok_or_else(|| format!("--hugepages {part:?}: {usage}"))?;
            let order = order_of_size(size.trim()).ok_or_else(|| {
                format!(
                    "--hugepages: huge-page size {:?} is not supported (2M or 1G)",
                    size.trim()
                )
            })?;
            let count: u64 = count
                .trim()
                .parse()
                .map_err(|_| format!("--hugepages {part:?}: {:?} is not a count", count.trim()))?;
            let i = usize::from(order == ORDER_1G);
            if std::mem::replace(&mut seen[i], true) {
                return Err(format!("--hugepages: {} is given twice", size_name(order)));
            }
            if i == 1 {
                r.count_1g = count;
            } else {
                r.count_2m = count;
            }
        }
        if r.bytes().is_none() {
            return Err(format!("--hugepages {s:?}: the request overflows"));
        }
        Ok(r)
    }

    /// Folios asked for of `order` (0 for an order the pool does not serve).
    pub fn count(&self, order: u32) -> u64 {
        match order {
            ORDER_2M => self.count_2m,
            ORDER_1G => self.count_1g,
            _ => 0,
        }
    }

    /// True if no folio is asked for.
    pub fn is_empty(&self) -> bool {
        self.count_2m == 0 && self.count_1g == 0
    }

    /// Bytes asked for, `None` if that overflows.
    pub fn bytes(&self) -> Option<u64> {
        let g = self.count_1g.checked_mul(PAGE_SIZE << ORDER_1G)?;
        let m = self.count_2m.checked_mul(PAGE_SIZE << ORDER_2M)?;
        g.checked_add(m)
    }

    /// Check that RAM of `nr_frames` frames with the scratch zone at `scratch` (PFNs) can hold
    /// the request when nothing else is allocated: enough naturally aligned ranges outside
    /// scratch for the 1 GiB folios, then for the 2 MiB ones in what is left, with
    /// [`MIN_FREE_FRAMES`] left over. This catches the requests that can never fit, with a
    /// message that says how many would.
    pub fn check_fits(&self, nr_frames: u64, scratch: std::ops::Range<u64>) -> Result<(), String> {
        let slots = |order: u32| {
            let n = 1u64 << order;
            // Aligned ranges in RAM minus those that touch scratch.
            let all = nr_frames / n;
            let in_scratch = if scratch.is_empty() {
                0
            } else {
                (scratch.end.div_ceil(n)).min(all) - (scratch.start / n).min(all)
            };
            all - in_scratch
        };
        let per_1g = 1u64 << (ORDER_1G - ORDER_2M);
        let s_end = scratch.end.min(nr_frames);
        let normal = nr_frames - (s_end - scratch.start.min(s_end));
        // Frames the pool may have at most.
        let room = normal.saturating_sub(MIN_FREE_FRAMES);
        let g = slots(ORDER_1G).min(room >> ORDER_1G);
        if self.count_1g > g {
            return Err(format!(
                "--hugepages 1G:{} does not fit in RAM: it has room for {g} 1 GiB pages",
                self.count_1g
            ));
        }
        let m = (slots(ORDER_2M) - self.count_1g * per_1g)
            .min((room - (self.count_1g << ORDER_1G)) >> ORDER_2M);
        if self.count_2m > m {
            return Err(format!(
                "--hugepages 2M:{} does not fit in RAM{}: it has room for {m} 2 MiB pages",
                self.count_2m,
                if self.count_1g > 0 {
                    " beside the 1 GiB pages"
                } else {
                    ""
                }
            ));
        }
        Ok(())
    }
}

impl std::fmt::Display for HugePageRequest {
    /// The command-line form [`HugePageRequest::parse`] reads back: the sizes asked for, `2M`
    /// first (`2M:0` for an empty request).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.count_2m, self.count_1g) {
            (m, 0) => write!(f, "2M:{m}"),
            (0, g) => write!(f, "1G:{g}"),
            (m, g) => write!(f, "2M:{m},1G:{g}"),
        }
    }
}

/// The pool's counts for one order, in folios. `total == free + in_use` always.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct HugeOrderStats {
    /// The target: what the boot parameter asked for.
    pub requested: u64,
    /// Folios the pool holds.
    pub total: u64,
    /// Folios ready to allocate.
    pub free: u64,
    /// Folios allocated from the pool or adopted.
    pub in_use: u64,
}

/// The pool's counts per order (serialized as `{"2M": {..}, "1G": {..}}`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct HugePoolStats {
    /// 2 MiB folios.
    #[serde(rename = "2M")]
    pub huge_2m: HugeOrderStats,
    /// 1 GiB folios.
    #[serde(rename = "1G")]
    pub huge_1g: HugeOrderStats,
}

impl HugePoolStats {
    /// The counts of `order`, if the pool serves it.
    pub fn order(&self, order: u32) -> Option<&HugeOrderStats> {
        match order {
            ORDER_2M => Some(&self.huge_2m),
            ORDER_1G => Some(&self.huge_1g),
            _ => None,
        }
    }

    /// 4 KiB frames the pool holds (free and in use): what it takes from the frame allocator.
    pub fn frames(&self) -> u64 {
        (self.huge_2m.total << ORDER_2M) + (self.huge_1g.total << ORDER_1G)
    }
}

#[derive(Debug, Default)]
struct OrderPool {
    requested: u64,
    /// First frames of the free folios.
    free: BTreeSet<u64>,
    /// First frames of the folios in use.
    in_use: BTreeSet<u64>,
}

impl OrderPool {
    fn total(&self) -> u64 {
        (self.free.len() + self.in_use.len()) as u64
    }

    fn stats(&self) -> HugeOrderStats {
        HugeOrderStats {
            requested: self.requested,
            total: self.total(),
            free: self.free.len() as u64,
            in_use: self.in_use.len() as u64,
        }
    }

    /// True if a folio of this pool (of `order`) overlaps frames `start..end`.
    fn overlaps(&self, order: u32, start: u64, end: u64) -> bool {
        let from = (start + 1).saturating_sub(1 << order);
        self.free.range(from..end).next().is_some() || self.in_use.range(from..end).next().is_some()
    }
}

/// The huge-page pool of one host image (see the module documentation).
#[derive(Debug, Default)]
pub struct HugePool {
    /// Indexed by [`slot`]: 2 MiB, 1 GiB.
    orders: [OrderPool; 2],
}

/// Index of `order` in [`HugePool::orders`]; `BadOrder` for an order the pool does not serve.
fn slot(order: u32) -> Result<usize, MmError> {
    match order {
        ORDER_2M => Ok(0),
        ORDER_1G => Ok(1),
        _ => Err(MmError::BadOrder(order)),
    }
}

impl HugePool {
    /// An empty pool (nothing requested).
    pub fn new() -> HugePool {
        HugePool::default()
    }

    /// Raise the target of `order` (9 or 18) by `count` and take `count` fresh folios of it
    /// from free RAM, highest address first, leaving [`MIN_FREE_FRAMES`] of the normal zone
    /// free. If RAM runs out, the folios taken so far stay
    /// in the pool and the error is `HugePagesShort` (how many were wanted and got); the
    /// target is raised by `count` either way. `BadOrder` for another order.
    pub fn reserve(&mut self, mm: &mut Mm, order: u32, count: u64) -> Result<(), MmError> {
        let i = slot(order)?;
        self.orders[i].requested = self.orders[i].requested.saturating_add(count);
        let got = self.take_fresh(mm, order, count);
        if got < count {
            return Err(MmError::HugePagesShort {
                order,
                wanted: count,
                got,
            });
        }
        Ok(())
    }

    /// Set `order`'s target to `count` more folios without taking any now (after a kexec: the
    /// folios the previous image's files hold come back by [`HugePool::adopt`], and
    /// [`HugePool::refill`] takes the rest once the update is committed, outside the
    /// blackout).
    pub fn defer(&mut self, order: u32, count: u64) -> Result<(), MmError> {
        let i = slot(order)?;
        self.orders[i].requested = self.orders[i].requested.saturating_add(count);
        Ok(())
    }

    /// Take fresh folios of every order from free RAM until each order's total reaches its
    /// target (after a boot that came up short, once memory has been freed). Returns the
    /// number of folios taken.
    pub fn refill(&mut self, mm: &mut Mm) -> u64 {
        let mut got = 0;
        for order in HUGE_ORDERS {
            let p = &self.orders[usize::from(order == ORDER_1G)];
            let missing = p.requested.saturating_sub(p.total());
            got += self.take_fresh(mm, order, missing);
        }
        got
    }

    /// Take up to `count` free, naturally aligned ranges of `2^order` frames out of the
    /// normal zone, highest first, as free folios of the pool, leaving at least
    /// [`MIN_FREE_FRAMES`] of it free; returns how many.
    fn take_fresh(&mut self, mm: &mut Mm, order: u32, count: u64) -> u64 {
        let i = usize::from(order == ORDER_1G);
        let nr = 1u64 << order;
        let mut got = 0;
        let mut below = mm.frames().nr_frames();
        let normal_free = |mm: &Mm| {
            let s = mm.stats();
            s.free - s.scratch_free
        };
        while got < count && normal_free(mm) >= nr + MIN_FREE_FRAMES {
            let Some(pfn) = mm.frames().highest_free_range(Zone::Normal, order, below) else {
                break;
            };
            // Free a moment ago, so the take cannot fail; if it did, look lower.
            if mm.take_range(pfn, nr).is_ok() {
                self.orders[i].free.insert(pfn);
                got += 1;
            }
            below = pfn;
        }
        got
    }

    /// A free folio of `order` (9 or 18), lowest address first; its frames read as zeros.
    /// `None` if the pool has none free (or does not serve the order).
    pub fn alloc(&mut self, order: u32) -> Option<Folio> {
        let p = &mut self.orders[slot(order).ok()?];
        let pfn = p.free.pop_first()?;
        p.in_use.insert(pfn);
        Some(Folio { pfn, order })
    }

    /// Give back a folio allocated from the pool (or adopted): it is zeroed (hole-punched) and
    /// becomes free in the pool, or goes back to the buddy allocator if the order's total is
    /// above its target (see the module documentation). `NotInPool` if the folio is not in use
    /// in the pool (never allocated, already freed, wrong order).
    pub fn free(&mut self, mm: &mut Mm, folio: Folio) -> Result<(), MmError> {
        let i = slot(folio.order)?;
        let not_ours = |why| MmError::NotInPool {
            pfn: folio.pfn,
            order: folio.order,
            why,
        };
        if !self.orders[i].in_use.contains(&folio.pfn) {
            return Err(if self.orders[i].free.contains(&folio.pfn) {
                not_ours("already free")
            } else {
                not_ours("not a folio of the pool in use")
            });
        }
        let p = &mut self.orders[i];
        if p.total() > p.requested {
            mm.free_runs(&[(folio.pfn, folio.nr_pages())])?;
            p.in_use.remove(&folio.pfn);
        } else {
            mm.ram.discard(folio.pa(), folio.size())?;
            p.in_use.remove(&folio.pfn);
            p.free.insert(folio.pfn);
        }
        Ok(())
    }

    /// Count in the pool, in use, a huge folio the previous image handed over and a file has
    /// retrieved (restored from KHO). It must be of order 9 or 18, naturally aligned, in RAM
    /// outside scratch, not free in the frame allocator and not overlap a folio of the pool
    /// (`NotInPool` or `BadOrder` otherwise, and nothing changes). If the order's total is now
    /// above its target, one free folio of that order goes back to the buddy allocator (see
    /// the module documentation).
    pub fn adopt(&mut self, mm: &mut Mm, folio: Folio) -> Result<(), MmError> {
        let i = slot(folio.order)?;
        let bad = |why| MmError::NotInPool {
            pfn: folio.pfn,
            order: folio.order,
            why,
        };
        let (start, nr) = (folio.pfn, folio.nr_pages());
        if start % nr != 0 {
            return Err(bad("not naturally aligned"));
        }
        let Some(end) = start
            .checked_add(nr)
            .filter(|&e| e <= mm.frames().nr_frames())
        else {
            return Err(bad("outside RAM"));
        };
        let s = mm.frames().scratch();
        if start < s.end && s.start < end {
            return Err(bad("in the scratch zone"));
        }
        if mm.frames().any_free(start, nr) {
            return Err(bad("its frames are free in the frame allocator"));
        }
        if self
            .orders
            .iter()
            .zip([ORDER_2M, ORDER_1G])
            .any(|(p, o)| p.overlaps(o, start, end))
        {
            return Err(bad("overlaps a folio of the pool"));
        }
        let p = &mut self.orders[i];
        p.in_use.insert(start);
        if p.total() > p.requested {
            if let Some(spare) = p.free.pop_last() {
                // A free folio of the pool is zero already; the buddy zeroes it once more.
                if let Err(e) = mm.free_runs(&[(spare, nr)]) {
                    tracing::warn!(
                        "huge-page pool: cannot give a spare {} folio back: {e}",
                        size_name(folio.order)
                    );
                    p.free.insert(spare);
                }
            }
        }
        Ok(())
    }

    /// True if `folio` is a folio of the pool in use (allocated from it or adopted): whoever
    /// holds it frees it with [`HugePool::free`].
    pub fn owns(&self, folio: Folio) -> bool {
        slot(folio.order).is_ok_and(|i| self.orders[i].in_use.contains(&folio.pfn))
    }

    /// Give every free folio back to the frame allocator and drop the targets to zero, so
    /// folios still in use go back to the buddy when they are freed. Returns the number of
    /// folios given back. Not needed at kexec: the pool's free folios are not preserved, so
    /// the next image finds them free.
    pub fn release_all(&mut self, mm: &mut Mm) -> Result<u64, MmError> {
        let mut n = 0;
        for (p, order) in self.orders.iter_mut().zip([ORDER_2M, ORDER_1G]) {
            p.requested = 0;
            while let Some(pfn) = p.free.pop_first() {
                if let Err(e) = mm.free_runs(&[(pfn, 1 << order)]) {
                    p.free.insert(pfn);
                    return Err(e);
                }
                n += 1;
            }
        }
        Ok(n)
    }

    /// The pool's counts per order.
    pub fn stats(&self) -> HugePoolStats {
        HugePoolStats {
            huge_2m: self.orders[0].stats(),
            huge_1g: self.orders[1].stats(),
        }
    }
}

#[cfg(test)]
#[path = "hugetlb_tests.rs"]
mod tests;
