//! Sorted, disjoint frame ranges: what a KHO boot reserves. Built as the tracker is walked
//! (adjacent blocks merge on the fly), so its size follows the number of contiguous runs of
//! preserved memory, not the size of RAM.

/// A list of frame ranges `start..end` (PFNs); sorted and disjoint after [`Ranges::finish`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ranges {
    v: Vec<(u64, u64)>,
}

/// Two ranges overlap: `(first, second)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overlap(pub (u64, u64), pub (u64, u64));

impl Ranges {
    /// An empty list.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add `start..end`; merges with the last range when it continues it.
    pub fn push(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        if let Some(last) = self.v.last_mut() {
            if last.1 == start {
                last.1 = end;
                return;
            }
        }
        self.v.push((start, end));
    }

    /// Sort, refuse overlaps, merge touching ranges.
    pub fn finish(mut self) -> Result<Ranges, Overlap> {
        self.v.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::with_capacity(self.v.len());
        for r in self.v {
            match out.last_mut() {
                Some(last) if r.0 < last.1 => return Err(Overlap(*last, r)),
                Some(last) if r.0 == last.1 => last.1 = r.1,
                _ => out.push(r),
            }
        }
        Ok(Ranges { v: out })
    }

    /// True if every frame of `start..end` is in a range (after `finish`).
    pub fn covers(&self, start: u64, end: u64) -> bool {
        let i = self.v.partition_point(|r| r.1 <= start);
        self.v.get(i).is_some_and(|r| r.0 <= start && end <= r.1)
    }

    /// Total frames in all ranges.
    pub fn frames(&self) -> u64 {
        self.v.iter().map(|r| r.1 - r.0).sum()
    }

    /// Number of ranges.
    pub fn len(&self) -> usize {
        self.v.len()
    }

    /// True if there is no range.
    pub fn is_empty(&self) -> bool {
        self.v.is_empty()
    }

    /// The gaps between the ranges within `lo..hi` (after `finish`).
    pub fn gaps(&self, lo: u64, hi: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut at = lo;
        for &(s, e) in &self.v {
            if e <= at {
                continue;
            }
            if s >= hi {
                break;
            }
            if s > at {
                out.push((at, s.min(hi)));
            }
            at = e;
        }
        if at < hi {
            out.push((at, hi));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_overlap_gaps_cover() {
        let mut r = Ranges::new();
        r.push(10, 11);
        r.push(11, 12);
        r.push(40, 50);
        r.push(12, 20);
        let r = r.finish().unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r.frames(), 20);
        assert!(r.covers(10, 20) && r.covers(45, 50) && !r.covers(19, 21) && !r.covers(0, 1));
        assert_eq!(r.gaps(0, 100), vec![(0, 10), (20, 40), (50, 100)]);
        assert_eq!(r.gaps(15, 45), vec![(20, 40)]);
        let mut bad = Ranges::new();
        bad.push(0, 10);
        bad.push(20, 30);
        bad.push(5, 6);
        assert_eq!(bad.finish(), Err(Overlap((0, 10), (5, 6))));
    }
}
