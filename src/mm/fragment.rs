//! Fragmented allocation schedules: how a host that has run for a while allocates guest memory.
//!
//! Benchmark guests are normally populated in one `fallocate`, the best case for any format
//! that describes memory by physically contiguous runs. A host that has run for a while has
//! seen allocation churn (files of mixed sizes allocated and partly freed, leaving the buddy's
//! free lists in pieces) and runs several guests that fault their pages in turn, each in its
//! own random order. [`Schedule`] produces that sequence of events, pure and seeded (no I/O),
//! for whoever applies it (the `gmem-rfc` scenario's `fragment=` option, tests);
//! [`RunStats`] describes the result: the run-length distribution of a file's frames.
//!
//! The schedule is produced lazily: a guest's fault order is a seeded permutation of its page
//! indexes (a Feistel network over the index space with cycle walking), so a schedule of
//! millions of faults needs no memory beyond a few words per guest.

/// A small seedable PRNG (splitmix64): deterministic, no dependency, good enough to shuffle.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }

    /// A number in `0..n` (0 when `n` is 0); the bias is negligible for the `n` used here.
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            ((self.next_u64() as u128 * n as u128) >> 64) as u64
        }
    }
}

/// splitmix64's finalizer: a bijective mix of 64 bits.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A seeded permutation of `0..n` computed one element at a time: a 4-round Feistel network
/// over the smallest even number of bits that holds `n`, with cycle walking for values at or
/// above `n` (fewer than 4 steps on average).
#[derive(Clone, Debug)]
pub struct Permutation {
    n: u64,
    half: u32,
    keys: [u64; 4],
}

impl Permutation {
    /// The permutation of `0..n` for `seed`.
    pub fn new(n: u64, seed: u64) -> Self {
        let bits = (64 - n.saturating_sub(1).leading_zeros()).max(2);
        let half = bits.div_ceil(2);
        let mut r = SplitMix64::new(seed);
        Self {
            n,
            half,
            keys: [r.next_u64(), r.next_u64(), r.next_u64(), r.next_u64()],
        }
    }

    fn round(&self, x: u64) -> u64 {
        let mask = (1u64 << self.half) - 1;
        let (mut l, mut r) = (x >> self.half, x & mask);
        for k in self.keys {
            let f = mix(r ^ k) & mask;
            (l, r) = (r, l ^ f);
        }
        (l << self.half) | r
    }

    /// The element at position `i` (`i < n`; other values are returned unchanged).
    pub fn at(&self, i: u64) -> u64 {
        if i >= self.n {
            return i;
        }
        let mut y = self.round(i);
        while y >= self.n {
            y = self.round(y);
        }
        y
    }
}

/// What a fragmented host does before and while its guests fault their memory in.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FragmentSpec {
    /// Seed of every random choice: the same spec gives the same schedule.
    pub seed: u64,
    /// Pages of each guest, the benchmark's first (guest 0); every page is faulted once.
    pub guest_pages: Vec<u64>,
    /// Pages the churn phase allocates in objects of mixed orders (about half stay allocated).
    pub churn_pages: u64,
    /// Largest order of a churn object.
    pub churn_max_order: u32,
}

/// One event of a [`Schedule`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Churn: allocate object `id`, 2^`order` pages (ids count up from 0).
    ChurnAlloc {
        /// The object's number.
        id: u64,
        /// log2 of its pages.
        order: u32,
    },
    /// Churn: free object `id` (allocated earlier; each is freed at most once).
    ChurnFree {
        /// The object's number.
        id: u64,
    },
    /// Guest `guest` faults its page `index` (each page of each guest exactly once).
    Fault {
        /// The guest's number (0: the benchmark's).
        guest: usize,
        /// The page index in its memory.
        index: u64,
    },
}

/// The events of a fragmented host, in order: the churn (allocations of mixed orders, then
/// about half of them freed in random order), then every guest's faults, each guest in its
/// own random page order, the guests interleaved at random (at every step a guest is picked
/// with a probability proportional to the pages it has left). An iterator of [`Step`]s.
#[derive(Clone, Debug)]
pub struct Schedule {
    rng: SplitMix64,
    phase: Phase,
    churn_orders: Vec<u32>,
    churn_free: Option<Permutation>,
    churn_pos: u64,
    perms: Vec<Permutation>,
    done: Vec<u64>,
    left: u64,
    pages: Vec<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    ChurnAlloc,
    ChurnFree,
    Faults,
}

/// The order of a churn object: mostly small, a few large (like a host's mix of page-cache
/// pages, slabs, THPs and buffers).
fn churn_order(rng: &mut SplitMix64, max: u32) -> u32 {
    let r = rng.below(100);
    let o = match r {
        0..40 => 0,
        40..60 => 1 + rng.below(3) as u32,
        60..85 => 4 + rng.below(3) as u32,
        85..97 => 7 + rng.below(3) as u32,
        _ => 10,
    };
    o.min(max)
}

impl Schedule {
    /// The schedule of `spec`.
    pub fn new(spec: &FragmentSpec) -> Self {
        let mut rng = SplitMix64::new(spec.seed);
        let mut churn_orders = Vec::new();
        let mut churned = 0u64;
        while churned < spec.churn_pages {
            let o = churn_order(&mut rng, spec.churn_max_order.min(super::MAX_ORDER));
            churn_orders.push(o);
            churned += 1 << o;
        }
        let perms = spec
            .guest_pages
            .iter()
            .map(|&n| Permutation::new(n, rng.next_u64()))
            .collect();
        let churn_free = Permutation::new(churn_orders.len() as u64, rng.next_u64());
        Self {
            phase: Phase::ChurnAlloc,
            churn_free: Some(churn_free),
            churn_orders,
            churn_pos: 0,
            perms,
            done: vec![0; spec.guest_pages.len()],
            left: spec
                .guest_pages
                .iter()
                .fold(0u64, |a, &b| a.saturating_add(b)),
            pages: spec.guest_pages.clone(),
            rng,
        }
    }

    /// Number of churn objects the schedule allocates.
    pub fn churn_objects(&self) -> u64 {
        self.churn_orders.len() as u64
    }
}

impl Iterator for Schedule {
    type Item = Step;

    fn next(&mut self) -> Option<Step> {
        loop {
            match self.phase {
                Phase::ChurnAlloc => {
                    let i = self.churn_pos;
                    if let Some(&order) = self.churn_orders.get(i as usize) {
                        self.churn_pos += 1;
                        return Some(Step::ChurnAlloc { id: i, order });
                    }
                    self.phase = Phase::ChurnFree;
                    self.churn_pos = 0;
                }
                Phase::ChurnFree => {
                    let n = self.churn_orders.len() as u64;
                    let perm = self.churn_free.as_ref()?;
                    while self.churn_pos < n {
                        let id = perm.at(self.churn_pos);
                        self.churn_pos += 1;
                        // About half the objects go; the others stay allocated.
                        if self.rng.next_u64() & 1 == 0 {
                            return Some(Step::ChurnFree { id });
                        }
                    }
                    self.phase = Phase::Faults;
                }
                Phase::Faults => {
                    if self.left == 0 {
                        return None;
                    }
                    let mut r = self.rng.below(self.left);
                    let mut g = 0;
                    while g < self.pages.len() {
                        let rest = self.pages[g] - self.done[g];
                        if r < rest {
                            break;
                        }
                        r -= rest;
                        g += 1;
                    }
                    let g = g.min(self.pages.len() - 1);
                    let index = self.perms[g].at(self.done[g]);
                    self.done[g] += 1;
                    self.left -= 1;
                    return Some(Step::Fault { guest: g, index });
                }
            }
        }
    }
}

/// The run-length distribution of a file's frames: runs of consecutive page indexes backed by
/// consecutive frames (what a run-list format such as guest_memfd_luo_v2 stores one entry per).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RunStats {
    /// Number of runs.
    pub runs: u64,
    /// Pages in all runs.
    pub pages: u64,
    /// Mean run length, pages.
    pub mean: f64,
    /// Median run length, pages (of the runs, not weighted by pages).
    pub median: u64,
    /// Longest run, pages.
    pub max: u64,
    /// Runs by length: `[lo, count]` for lengths `lo..2*lo` (powers of two; empty buckets left
    /// out).
    pub histogram: Vec<[u64; 2]>,
}

impl RunStats {
    /// The distribution of run lengths `lens` (pages; zero lengths are ignored).
    pub fn of(mut lens: Vec<u64>) -> Self {
        lens.retain(|&n| n > 0);
        let mut buckets = [0u64; 64];
        let runs = lens.len() as u64;
        let mut pages = 0u64;
        let mut max = 0;
        for &n in &lens {
            pages = pages.saturating_add(n);
            max = max.max(n);
            buckets[63 - n.leading_zeros() as usize] += 1;
        }
        let median = if lens.is_empty() {
            0
        } else {
            let mid = (lens.len() - 1) / 2;
            *lens.select_nth_unstable(mid).1
        };
        Self {
            runs,
            pages,
            mean: if runs == 0 {
                0.0
            } else {
                pages as f64 / runs as f64
            },
            median,
            max,
            histogram: buckets
                .iter()
                .enumerate()
                .filter(|(_, &c)| c > 0)
                .map(|(b, &c)| [1u64 << b, c])
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{buddy::FrameAllocator, Folio, MAX_ORDER};
    use super::*;
    use std::collections::{BTreeMap, HashMap};

    fn spec(seed: u64, pages: u64) -> FragmentSpec {
        FragmentSpec {
            seed,
            guest_pages: vec![pages, pages / 8, pages / 8, pages / 8],
            churn_pages: pages / 4,
            churn_max_order: MAX_ORDER,
        }
    }

    #[test]
    fn permutation_is_a_permutation() {
        for n in [0u64, 1, 2, 3, 5, 64, 1000, 4097] {
            let p = Permutation::new(n, n * 7 + 1);
            let mut v: Vec<u64> = (0..n).map(|i| p.at(i)).collect();
            v.sort_unstable();
            assert_eq!(v, (0..n).collect::<Vec<_>>(), "n={n}");
        }
    }

    #[test]
    fn every_page_faulted_once_and_churn_consistent() {
        let s = spec(3, 4096);
        let mut seen: Vec<Vec<bool>> = s
            .guest_pages
            .iter()
            .map(|&n| vec![false; n as usize])
            .collect();
        let mut live = HashMap::new();
        let mut faults = 0;
        for st in Schedule::new(&s) {
            match st {
                Step::ChurnAlloc { id, order } => assert!(live.insert(id, order).is_none()),
                Step::ChurnFree { id } => {
                    assert!(live.remove(&id).is_some());
                    assert_eq!(faults, 0, "churn comes first");
                }
                Step::Fault { guest, index } => {
                    assert!(!std::mem::replace(&mut seen[guest][index as usize], true));
                    faults += 1;
                }
            }
        }
        assert!(seen.iter().all(|g| g.iter().all(|&b| b)));
        assert!(!live.is_empty());
    }

    #[test]
    fn same_seed_same_schedule_other_seed_differs() {
        let a: Vec<Step> = Schedule::new(&spec(42, 2048)).collect();
        let b: Vec<Step> = Schedule::new(&spec(42, 2048)).collect();
        let c: Vec<Step> = Schedule::new(&spec(43, 2048)).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    /// Applies a schedule to a plain buddy allocator (order-0 faults, as the page cache does)
    /// and returns guest 0's run lengths, checking nothing is double-allocated.
    fn apply(s: &FragmentSpec, frames: u64) -> (FrameAllocator, Vec<u64>, u64) {
        let mut a = FrameAllocator::new(frames, 0..1024).unwrap();
        a.online_normal(&[(1024, frames)]);
        let mut churn = HashMap::new();
        let mut owner: HashMap<u64, ()> = HashMap::new();
        let mut g0: BTreeMap<u64, u64> = BTreeMap::new();
        let mut held = Vec::new();
        for st in Schedule::new(s) {
            match st {
                Step::ChurnAlloc { id, order } => {
                    let f = a.alloc(order).unwrap();
                    for p in f.pfn..f.pfn + f.nr_pages() {
                        assert!(owner.insert(p, ()).is_none(), "frame {p} twice");
                    }
                    churn.insert(id, f);
                }
                Step::ChurnFree { id } => {
                    let f = churn.remove(&id).unwrap();
                    for p in f.pfn..f.pfn + f.nr_pages() {
                        owner.remove(&p);
                    }
                    a.free(f).unwrap();
                }
                Step::Fault { guest, index } => {
                    let f = a.alloc(0).unwrap();
                    assert!(owner.insert(f.pfn, ()).is_none(), "frame {} twice", f.pfn);
                    if guest == 0 {
                        g0.insert(index, f.pfn);
                    } else {
                        held.push(f);
                    }
                }
            }
        }
        let mut lens = Vec::new();
        let mut prev: Option<(u64, u64)> = None;
        for (&i, &p) in &g0 {
            match prev {
                Some((pi, pp)) if pi + 1 == i && pp + 1 == p => *lens.last_mut().unwrap() += 1,
                _ => lens.push(1),
            }
            prev = Some((i, p));
        }
        // Everything goes back.
        let used = owner.len() as u64;
        for (_, f) in churn {
            a.free(f).unwrap();
        }
        for f in held {
            a.free(f).unwrap();
        }
        for (_, p) in g0 {
            a.free(Folio { pfn: p, order: 0 }).unwrap();
        }
        (a, lens, used)
    }

    #[test]
    fn fragmenting_gives_short_runs() {
        let s = spec(7, 16384);
        let (a, lens, _) = apply(&s, 65536);
        let st = RunStats::of(lens);
        assert_eq!(st.pages, 16384);
        assert!(st.mean <= 2.0, "{st:?}");
        assert!(st.runs > 16384 / 2, "{st:?}");
        assert_eq!(a.stats().free, 65536, "all frames back");
        // Contiguous: one allocation of the whole guest in the largest blocks.
        let contiguous = RunStats::of(vec![16384]);
        assert!(st.runs > 1000 * contiguous.runs);
    }

    #[test]
    fn run_stats() {
        let s = RunStats::of(vec![1, 1, 1, 2, 3, 8, 0]);
        assert_eq!((s.runs, s.pages, s.max, s.median), (6, 16, 8, 1));
        assert_eq!(s.histogram, vec![[1, 3], [2, 2], [8, 1]]);
        assert_eq!(RunStats::of(vec![]).runs, 0);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
        /// Whatever the seed and sizes, applying the schedule allocates every frame once and
        /// gives every frame back.
        #[test]
        fn schedule_leaks_nothing(seed in 0u64..1000, pages in 1u64..3000, churn in 0u64..3000) {
            let s = FragmentSpec {
                seed,
                guest_pages: vec![pages, pages / 3 + 1],
                churn_pages: churn,
                churn_max_order: MAX_ORDER,
            };
            let (a, lens, _) = apply(&s, 16384);
            proptest::prop_assert_eq!(lens.iter().sum::<u64>(), pages);
            proptest::prop_assert_eq!(a.stats().free, 16384);
        }
    }
}
