//! The shared/private state of a guest_memfd's pages (in-place conversion): the private
//! page ranges of the file, everything else shared. Upstream keeps this in a maple tree of
//! attributes per file; here a sorted map of disjoint, non-adjacent `start..end` page ranges.

use std::collections::BTreeMap;

/// The private pages of one guest_memfd, as disjoint ranges of page indexes; every other page
/// is shared.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PageAttrs {
    /// start → end (exclusive); ranges never overlap or touch.
    private: BTreeMap<u64, u64>,
}

impl PageAttrs {
    /// All pages shared.
    pub fn all_shared() -> Self {
        Self::default()
    }

    /// Pages `0..nr` private (a private-memory VM's guest_memfd without INIT_SHARED).
    pub fn all_private(nr: u64) -> Self {
        let mut a = Self::default();
        a.set(0, nr, true);
        a
    }

    /// Whether page `index` is private.
    pub fn is_private(&self, index: u64) -> bool {
        self.private
            .range(..=index)
            .next_back()
            .is_some_and(|(_, &end)| index < end)
    }

    /// Whether any page of `a..b` is private.
    pub fn any_private(&self, a: u64, b: u64) -> bool {
        self.first_private(a, b).is_some()
    }

    /// The first private page in `a..b`.
    pub fn first_private(&self, a: u64, b: u64) -> Option<u64> {
        if a >= b {
            return None;
        }
        if let Some((_, &end)) = self.private.range(..=a).next_back() {
            if a < end {
                return Some(a);
            }
        }
        self.private.range(a..b).next().map(|(&s, _)| s)
    }

    /// Whether every page of `a..b` is private (true for an empty range).
    pub fn all_private_in(&self, a: u64, b: u64) -> bool {
        a >= b
            || self
                .private
                .range(..=a)
                .next_back()
                .is_some_and(|(_, &end)| end >= b)
    }

    /// Make pages `a..b` private (`true`) or shared (`false`).
    pub fn set(&mut self, a: u64, b: u64, private: bool) {
        if a >= b {
            return;
        }
        // Cut every range that overlaps or touches a..b out, keeping the parts outside.
        let (mut lo, mut hi) = (a, b);
        let touching: Vec<(u64, u64)> = self
            .private
            .range(..=b)
            .rev()
            .take_while(|(_, &e)| e >= a)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in touching {
            self.private.remove(&s);
            if private {
                lo = lo.min(s);
                hi = hi.max(e);
            } else {
                if s < a {
                    self.private.insert(s, a);
                }
                if e > b {
                    self.private.insert(b, e);
                }
            }
        }
        if private {
            self.private.insert(lo, hi);
        }
    }

    /// The private ranges `(start, end)`, in order.
    pub fn ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.private.iter().map(|(&s, &e)| (s, e))
    }

    /// Number of private ranges.
    pub fn nr_ranges(&self) -> usize {
        self.private.len()
    }

    /// Number of private pages.
    pub fn nr_private(&self) -> u64 {
        self.private.iter().map(|(s, e)| e - s).sum()
    }

    /// The shared parts of `a..b`, in order.
    pub fn shared_parts(&self, a: u64, b: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut at = a;
        let start = self.private.range(..=a).next_back().map_or(a, |(&s, _)| s);
        for (&s, &e) in self.private.range(start..b) {
            if e <= at {
                continue;
            }
            if s > at {
                out.push((at, s.min(b)));
            }
            at = e;
            if at >= b {
                break;
            }
        }
        if at < b {
            out.push((at, b));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn set_merges_splits_and_queries() {
        let mut a = PageAttrs::all_private(100);
        assert!(a.is_private(0) && a.is_private(99) && !a.is_private(100));
        a.set(10, 20, false);
        assert_eq!(a.ranges().collect::<Vec<_>>(), vec![(0, 10), (20, 100)]);
        assert_eq!(a.shared_parts(0, 120), vec![(10, 20), (100, 120)]);
        assert_eq!(a.first_private(10, 30), Some(20));
        assert!(!a.any_private(10, 20));
        a.set(10, 20, true);
        assert_eq!(a.ranges().collect::<Vec<_>>(), vec![(0, 100)]);
        assert!(a.all_private_in(5, 100) && !a.all_private_in(5, 101));
        assert_eq!(a.nr_private(), 100);
    }

    proptest! {
        /// Against a plain bitmap: any sequence of conversions gives the same pages, and the
        /// ranges stay disjoint, sorted and never adjacent.
        #[test]
        fn matches_a_bitmap(ops in proptest::collection::vec((0u64..64, 0u64..64, any::<bool>()), 0..40)) {
            let mut a = PageAttrs::all_shared();
            let mut bits = [false; 70];
            for (x, y, p) in ops {
                let (lo, hi) = (x.min(y), x.max(y));
                a.set(lo, hi, p);
                for b in &mut bits[lo as usize..hi as usize] {
                    *b = p;
                }
            }
            for (i, &b) in bits.iter().enumerate() {
                prop_assert_eq!(a.is_private(i as u64), b);
            }
            let r: Vec<_> = a.ranges().collect();
            for w in r.windows(2) {
                prop_assert!(w[0].1 < w[1].0);
            }
            let shared: u64 = a.shared_parts(0, 70).iter().map(|(s, e)| e - s).sum();
            prop_assert_eq!(shared + a.nr_private(), 70);
            for lo in 0..70u64 {
                let first = (lo..70).find(|&i| bits[i as usize]);
                prop_assert_eq!(a.first_private(lo, 70), first);
            }
        }
    }
}
