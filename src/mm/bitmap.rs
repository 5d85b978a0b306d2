//! A plain bit array with fast run scanning, used for frame reservation at boot.

#[derive(Clone, Debug, Default)]
pub struct Bitmap {
    words: Vec<u64>,
    len: u64,
}

impl Bitmap {
    pub fn new(len: u64) -> Self {
        Self {
            words: vec![0; len.div_ceil(64) as usize],
            len,
        }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get(&self, i: u64) -> bool {
        i < self.len && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Set bit `i`; returns its previous value. Out-of-range indexes are ignored (false).
    pub fn set(&mut self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        let w = &mut self.words[(i / 64) as usize];
        let old = *w & (1 << (i % 64)) != 0;
        *w |= 1 << (i % 64);
        old
    }

    /// Set bits `start..end` (clamped to the length).
    pub fn set_range(&mut self, start: u64, end: u64) {
        let end = end.min(self.len);
        if end.saturating_sub(start) == 1 {
            self.set(start);
            return;
        }
        let mut i = start;
        while i < end {
            if i % 64 == 0 && end - i >= 64 {
                self.words[(i / 64) as usize] = u64::MAX;
                i += 64;
            } else {
                self.set(i);
                i += 1;
            }
        }
    }

    /// True if any bit in `start..end` is set.
    pub fn any_in(&self, start: u64, end: u64) -> bool {
        let end = end.min(self.len);
        start < end && self.next_with(start, end, true) < end
    }

    pub fn count_ones(&self) -> u64 {
        self.words.iter().map(|w| w.count_ones() as u64).sum()
    }

    /// Iterate maximal runs of clear bits within `start..end` as `(first, end)` pairs.
    pub fn clear_runs(&self, start: u64, end: u64) -> ClearRuns<'_> {
        ClearRuns {
            bm: self,
            pos: start,
            end: end.min(self.len),
        }
    }

    fn next_with(&self, from: u64, end: u64, want_set: bool) -> u64 {
        let mut i = from;
        while i < end {
            let w = self.words[(i / 64) as usize];
            let w = if want_set { w } else { !w };
            let masked = w >> (i % 64);
            if masked != 0 {
                return (i + masked.trailing_zeros() as u64).min(end);
            }
            i = (i / 64 + 1) * 64;
        }
        end
    }
}

pub struct ClearRuns<'a> {
    bm: &'a Bitmap,
    pos: u64,
    end: u64,
}

impl Iterator for ClearRuns<'_> {
    type Item = (u64, u64);
    fn next(&mut self) -> Option<(u64, u64)> {
        let start = self.bm.next_with(self.pos, self.end, false);
        if start >= self.end {
            return None;
        }
        let stop = self.bm.next_with(start, self.end, true);
        self.pos = stop;
        Some((start, stop))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs() {
        let mut b = Bitmap::new(300);
        b.set(3);
        b.set_range(64, 200);
        let runs: Vec<_> = b.clear_runs(0, 300).collect();
        assert_eq!(runs, vec![(0, 3), (4, 64), (200, 300)]);
        assert_eq!(b.count_ones(), 137);
        assert!(b.any_in(60, 65));
        assert!(!b.any_in(4, 64));
    }
}
