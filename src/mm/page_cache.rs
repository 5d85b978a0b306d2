//! The page cache of one file: which RAM frame backs each page index. Folios are order 0
//! (PAGE_SIZE), as shmem small folios and the RFC's guest_memfd use, but the map is kept as
//! extents — runs of consecutive indexes backed by consecutive frames — so a file allocated in
//! one go costs a few entries whatever its size, and whole-file operations (map, preserve,
//! restore, release) cost per run, not per page.

use std::collections::BTreeMap;

use super::{Folio, Mm, MmError};

/// Page index → frame map of one file (memfd or guest_memfd), kept as extents.
#[derive(Debug, Default)]
pub struct PageCache {
    nr: u64,
    /// start index -> (first pfn, pages); disjoint, and merged whenever both sides continue.
    ext: BTreeMap<u64, (u64, u64)>,
    present: u64,
}

impl PageCache {
    /// An empty cache (all holes) for a file of `nr` pages.
    pub fn with_pages(nr: u64) -> Self {
        Self {
            nr,
            ..Default::default()
        }
    }

    /// The file's size in pages: valid indexes are `0..nr_slots`.
    pub fn nr_slots(&self) -> u64 {
        self.nr
    }

    /// Pages present (not holes).
    pub fn nr_present(&self) -> u64 {
        self.present
    }

    /// Number of extents (runs).
    pub fn nr_runs(&self) -> usize {
        self.ext.len()
    }

    fn extent_at(&self, index: u64) -> Option<(u64, u64, u64)> {
        let (&s, &(pfn, len)) = self.ext.range(..=index).next_back()?;
        (index < s + len).then_some((s, pfn, len))
    }

    /// Frame number of page `index`, if present.
    pub fn get(&self, index: u64) -> Option<u64> {
        self.extent_at(index).map(|(s, pfn, _)| pfn + (index - s))
    }

    /// Physical address of page `index`, if present.
    pub fn pa(&self, index: u64) -> Option<u64> {
        self.get(index).map(super::pfn_to_pa)
    }

    /// Put `pfn` at `index` (which must be a hole within the size).
    pub fn insert(&mut self, index: u64, pfn: u64) -> bool {
        self.insert_run(index, pfn, 1)
    }

    /// Put `len` consecutive frames from `pfn` at `index..index+len`, all holes within the
    /// size.
    pub fn insert_run(&mut self, index: u64, pfn: u64, len: u64) -> bool {
        let Some(end) = index.checked_add(len) else {
            return false;
        };
        if len == 0
            || end > self.nr
            || self.ext.range(index..end).next().is_some()
            || self.extent_at(index).is_some()
        {
            return false;
        }
        let (mut s, mut p, mut l) = (index, pfn, len);
        if let Some((ps, (ppfn, plen))) = self.ext.range(..index).next_back().map(|(a, b)| (*a, *b))
        {
            if ps + plen == index && ppfn + plen == pfn {
                self.ext.remove(&ps);
                (s, p, l) = (ps, ppfn, plen + l);
            }
        }
        if let Some(&(npfn, nlen)) = self.ext.get(&end) {
            if p + l == npfn {
                self.ext.remove(&end);
                l += nlen;
            }
        }
        self.ext.insert(s, (p, l));
        self.present += len;
        true
    }

    /// Allocate a zeroed frame for hole `index`; returns its pfn.
    pub fn fault_in(&mut self, mm: &mut Mm, index: u64) -> Result<u64, MmError> {
        if let Some(p) = self.get(index) {
            return Ok(p);
        }
        if index >= self.nr {
            return Err(MmError::OutOfRam { pa: index, len: 0 });
        }
        let f = mm.alloc_zeroed(0)?;
        self.insert(index, f.pfn);
        Ok(f.pfn)
    }

    /// Allocate a zeroed frame for hole `index` of the file `owner` from the file's block for
    /// that range of offsets ([`Mm::alloc_file_page`]); returns its pfn.
    pub fn fault_in_file(&mut self, mm: &mut Mm, owner: u64, index: u64) -> Result<u64, MmError> {
        if let Some(p) = self.get(index) {
            return Ok(p);
        }
        if index >= self.nr {
            return Err(MmError::OutOfRam { pa: index, len: 0 });
        }
        // A block is reserved only for a range of offsets with nothing present yet (a range
        // partly filled otherwise, e.g. restored after an update, gets single frames).
        use super::file_blocks::BLOCK_PAGES;
        let lo = index / BLOCK_PAGES * BLOCK_PAGES;
        let empty = self.extent_at(lo).is_none()
            && self
                .ext
                .range(lo..lo.saturating_add(BLOCK_PAGES))
                .next()
                .is_none();
        let pfn = if empty || mm.has_file_block(owner, index) {
            mm.alloc_file_page(owner, index)?
        } else {
            mm.alloc_zeroed(0)?.pfn
        };
        if !self.insert(index, pfn) {
            // Not reachable (a hole within the size): do not leak the frame.
            mm.free(Folio { pfn, order: 0 })?;
        }
        Ok(pfn)
    }

    /// [`PageCache::fill`] for the file `owner` that allocates with file blocks: whole aligned
    /// blocks of offsets without a reservation are filled in runs as large as the allocator
    /// has, the pages of a partly filled range one by one from its block
    /// ([`Mm::alloc_file_page`]), so that they continue its run.
    pub fn fill_file(
        &mut self,
        mm: &mut Mm,
        owner: u64,
        start: u64,
        end: u64,
    ) -> Result<Vec<(u64, u64)>, MmError> {
        use super::file_blocks::BLOCK_PAGES;
        let mut filled: Vec<(u64, u64)> = Vec::new();
        for (mut i, hole_end) in self.holes(start, end) {
            while i < hole_end {
                let whole_end = hole_end / BLOCK_PAGES * BLOCK_PAGES;
                if i % BLOCK_PAGES == 0
                    && i + BLOCK_PAGES <= whole_end
                    && !mm.has_file_block(owner, i)
                {
                    // Up to the next block with a reservation (or the hole's last whole block).
                    let mut stop = i + BLOCK_PAGES;
                    while stop < whole_end && !mm.has_file_block(owner, stop) {
                        stop += BLOCK_PAGES;
                    }
                    let (pfn, n) = mm.alloc_run(stop - i)?;
                    self.insert_run(i, pfn, n);
                    filled.push((i, n));
                    i += n;
                    continue;
                }
                let piece_end = ((i / BLOCK_PAGES + 1) * BLOCK_PAGES).min(hole_end);
                let first = i;
                while i < piece_end {
                    let pfn = mm.alloc_file_page(owner, i)?;
                    if !self.insert(i, pfn) {
                        mm.free(Folio { pfn, order: 0 })?;
                        return Err(MmError::BadBlock { pfn, order: 0 });
                    }
                    i += 1;
                }
                match filled.last_mut() {
                    Some(l) if l.0 + l.1 == first => l.1 += piece_end - first,
                    _ => filled.push((first, piece_end - first)),
                }
            }
        }
        Ok(filled)
    }

    /// Fill every hole in `start..end` with zeroed frames, in blocks as large as the allocator
    /// has; returns the indexes' runs that were filled.
    pub fn fill(&mut self, mm: &mut Mm, start: u64, end: u64) -> Result<Vec<(u64, u64)>, MmError> {
        let mut filled = Vec::new();
        for (mut i, hole_end) in self.holes(start, end) {
            while i < hole_end {
                let (pfn, n) = mm.alloc_run(hole_end - i)?;
                self.insert_run(i, pfn, n);
                filled.push((i, n));
                i += n;
            }
        }
        Ok(filled)
    }

    /// The holes (indexes without a frame) in `start..end`, as ranges `(from, to)`.
    fn holes(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let end = end.min(self.nr);
        let mut out = Vec::new();
        let mut i = start;
        while i < end {
            if let Some((s, _, len)) = self.extent_at(i) {
                i = s + len;
                continue;
            }
            let hole_end = self.ext.range(i..end).next().map_or(end, |(&s, _)| s);
            out.push((i, hole_end));
            i = hole_end;
        }
        out
    }

    /// Remove the frames in `start..end` and return them as runs `(pfn, pages)`.
    pub fn take_runs(&mut self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let end = end.min(self.nr);
        if start >= end {
            return Vec::new();
        }
        let mut out = Vec::new();
        let first = self.extent_at(start).map_or(start, |(s, _, _)| s);
        let keys: Vec<u64> = self.ext.range(first..end).map(|(k, _)| *k).collect();
        for s in keys {
            let Some((pfn, len)) = self.ext.remove(&s) else {
                continue;
            };
            let (a, b) = (s.max(start), (s + len).min(end));
            if s < a {
                self.ext.insert(s, (pfn, a - s));
            }
            if b < s + len {
                self.ext.insert(b, (pfn + (b - s), s + len - b));
            }
            out.push((pfn + (a - s), b - a));
            self.present -= b - a;
        }
        out
    }

    /// Remove and return the frames in `start..end` as order-0 folios.
    pub fn take_range(&mut self, start: u64, end: u64) -> Vec<Folio> {
        self.take_runs(start, end)
            .into_iter()
            .flat_map(|(pfn, n)| (pfn..pfn + n).map(|p| Folio { pfn: p, order: 0 }))
            .collect()
    }

    /// Grow or shrink to `nr` slots, returning frames dropped off the end.
    pub fn resize(&mut self, nr: u64) -> Vec<Folio> {
        let dropped = if nr < self.nr {
            self.take_range(nr, self.nr)
        } else {
            Vec::new()
        };
        self.nr = nr;
        dropped
    }

    /// Present pages as (index, pfn), in index order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ext
            .iter()
            .flat_map(|(&s, &(pfn, len))| (0..len).map(move |k| (s + k, pfn + k)))
    }

    /// Extents as (first index, first pfn, pages), in index order.
    pub fn runs(&self) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
        self.ext.iter().map(|(&s, &(pfn, len))| (s, pfn, len))
    }

    /// Extents overlapping `start..end`, clipped to it.
    pub fn runs_in(&self, start: u64, end: u64) -> Vec<(u64, u64, u64)> {
        let first = self.extent_at(start).map_or(start, |(s, _, _)| s);
        self.ext
            .range(first..end)
            .map(|(&s, &(pfn, len))| {
                let (a, b) = (s.max(start), (s + len).min(end));
                (a, pfn + (a - s), b - a)
            })
            .filter(|r| r.2 > 0)
            .collect()
    }

    /// Free every frame.
    pub fn release(&mut self, mm: &mut Mm) -> Result<(), MmError> {
        let runs = self.take_runs(0, self.nr);
        mm.free_runs(&runs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_merge_split_and_count() {
        let mut c = PageCache::with_pages(100);
        assert!(c.insert(10, 1000));
        assert!(c.insert(11, 1001));
        assert!(c.insert(9, 999));
        assert_eq!(c.nr_runs(), 1, "consecutive pages merge both ways");
        assert!(c.insert(13, 1003) && c.insert(12, 1002));
        assert_eq!(c.nr_runs(), 1);
        assert!(!c.insert(10, 5), "no double insert");
        assert!(!c.insert(100, 5), "beyond size");
        assert!(c.insert(20, 7));
        assert_eq!(c.nr_runs(), 2);
        assert_eq!(c.get(12), Some(1002));
        assert_eq!(c.get(14), None);
        assert_eq!(c.nr_present(), 6);
        let t = c.take_runs(10, 12);
        assert_eq!(t, vec![(1000, 2)]);
        assert_eq!(c.get(9), Some(999));
        assert_eq!(c.get(12), Some(1002));
        assert_eq!(c.nr_present(), 4);
        assert_eq!(
            c.iter().collect::<Vec<_>>(),
            vec![(9, 999), (12, 1002), (13, 1003), (20, 7)]
        );
        assert_eq!(c.runs_in(0, 13), vec![(9, 999, 1), (12, 1002, 1)]);
        let d = c.resize(13);
        assert_eq!(d.len(), 2);
        assert_eq!(c.nr_present(), 2);
        assert!(!c.insert_run(12, 50, 2), "overlaps");
    }
}
