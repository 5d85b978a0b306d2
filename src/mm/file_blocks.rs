//! Per-file frame blocks: a guest_memfd's allocation hint (like a per-inode preallocation or a
//! folio pool), so that its frames form long physical runs whatever order its pages are
//! faulted in.
//!
//! The first fault of a page in a [`BLOCK_ORDER`] aligned range of file offsets reserves a
//! whole naturally aligned buddy block of that size for the file; the page gets the frame at
//! the same offset in the block, and so do the range's later faults. Frames of a block not
//! handed out yet stay reserved for the file and read as zeros (they came from the buddy free
//! and are discarded again when a page comes back). A block is forgotten once every frame is
//! handed out (its frames are then ordinary allocated frames), and goes back to the buddy
//! whole once every handed-out frame has come back (punch, close). When the buddy has no
//! block of that size, the page gets a single frame; when an allocation finds no memory at
//! all, every reservation's unused frames go back to the buddy first ([`super::Mm`] does both).
//!
//! The table holds only blocks partly handed out, so it is empty on a host whose files were
//! allocated in one go, and frees of frames outside any block cost one hash lookup per block.

use std::collections::{BTreeMap, HashMap};

/// Order of a file block: 2^9 frames = 2 MiB, the size of a PMD mapping.
pub const BLOCK_ORDER: u32 = 9;
/// Frames in a file block.
pub const BLOCK_PAGES: u64 = 1 << BLOCK_ORDER;
const WORDS: usize = (BLOCK_PAGES / 64) as usize;

#[derive(Debug)]
struct Block {
    owner: u64,
    fblock: u64,
    used: [u64; WORDS],
    nr_used: u64,
}

impl Block {
    fn is_used(&self, off: u64) -> bool {
        self.used[(off / 64) as usize] & (1 << (off % 64)) != 0
    }
    fn set(&mut self, off: u64, v: bool) {
        let w = &mut self.used[(off / 64) as usize];
        if v {
            *w |= 1 << (off % 64);
        } else {
            *w &= !(1 << (off % 64));
        }
    }
}

/// What a frame handed back to [`FileBlocks::put`] became.
#[derive(Debug, PartialEq, Eq)]
pub enum Put {
    /// The frame is not in a reserved block: it goes to the buddy.
    NotReserved,
    /// Back in its block, which other frames of the file still use.
    Kept,
    /// Back in its block, which is now unused: the whole block (first frame) goes to the buddy.
    BlockFree(u64),
    /// The frame was not handed out (a double free).
    NotInUse,
}

/// The partly handed-out file blocks of every file (see the module documentation).
#[derive(Debug, Default)]
pub struct FileBlocks {
    /// First frame >> BLOCK_ORDER -> block.
    by_pfn: HashMap<u64, Block>,
    /// (owner, file offset >> BLOCK_ORDER) -> first frame >> BLOCK_ORDER.
    by_file: BTreeMap<(u64, u64), u64>,
    /// Frames reserved in blocks and not handed out.
    reserved: u64,
}

impl FileBlocks {
    /// No block is reserved.
    pub fn is_empty(&self) -> bool {
        self.by_pfn.is_empty()
    }

    /// Frames reserved for files and not handed out (free for every purpose but accounting:
    /// they are given back as soon as an allocation would fail).
    pub fn reserved(&self) -> u64 {
        self.reserved
    }

    /// Number of blocks partly handed out.
    pub fn nr_blocks(&self) -> usize {
        self.by_pfn.len()
    }

    /// True if `owner` has a block for page `index`'s range.
    pub fn has_block(&self, owner: u64, index: u64) -> bool {
        self.by_file.contains_key(&(owner, index >> BLOCK_ORDER))
    }

    /// The frame for page `index` of `owner` from its block, marked handed out, if the file has
    /// a block there and that frame is unused.
    pub fn take(&mut self, owner: u64, index: u64) -> Option<u64> {
        let key = (owner, index >> BLOCK_ORDER);
        let bp = *self.by_file.get(&key)?;
        let b = self.by_pfn.get_mut(&bp)?;
        let off = index % BLOCK_PAGES;
        if b.is_used(off) {
            return None;
        }
        b.set(off, true);
        b.nr_used += 1;
        self.reserved -= 1;
        if b.nr_used == BLOCK_PAGES {
            // All handed out: ordinary allocated frames from now on.
            self.by_pfn.remove(&bp);
            self.by_file.remove(&key);
        }
        Some((bp << BLOCK_ORDER) + off)
    }

    /// Record the block at `pfn` (BLOCK_ORDER aligned, just taken from the buddy) as `owner`'s
    /// for page `index`'s range, and hand out the frame for `index`. False (nothing recorded) if
    /// `pfn` is not aligned, is already a block, or the file has a block for that range.
    pub fn insert(&mut self, owner: u64, index: u64, pfn: u64) -> bool {
        let key = (owner, index >> BLOCK_ORDER);
        let bp = pfn >> BLOCK_ORDER;
        if pfn % BLOCK_PAGES != 0
            || self.by_pfn.contains_key(&bp)
            || self.by_file.contains_key(&key)
        {
            return false;
        }
        self.by_pfn.insert(
            bp,
            Block {
                owner,
                fblock: key.1,
                used: [0; WORDS],
                nr_used: 0,
            },
        );
        self.by_file.insert(key, bp);
        self.reserved += BLOCK_PAGES;
        self.take(owner, index).is_some()
    }

    /// A frame comes back (its page was punched or its file released).
    pub fn put(&mut self, pfn: u64) -> Put {
        let bp = pfn >> BLOCK_ORDER;
        let Some(b) = self.by_pfn.get_mut(&bp) else {
            return Put::NotReserved;
        };
        let off = pfn % BLOCK_PAGES;
        if !b.is_used(off) {
            return Put::NotInUse;
        }
        b.set(off, false);
        b.nr_used -= 1;
        self.reserved += 1;
        if b.nr_used > 0 {
            return Put::Kept;
        }
        let key = (b.owner, b.fblock);
        self.by_pfn.remove(&bp);
        self.by_file.remove(&key);
        self.reserved -= BLOCK_PAGES;
        Put::BlockFree(bp << BLOCK_ORDER)
    }

    /// True if some frame of `pfn..pfn+nr` lies in a reserved block (one lookup per block).
    pub fn any_in(&self, pfn: u64, nr: u64) -> bool {
        if self.by_pfn.is_empty() || nr == 0 {
            return false;
        }
        let last = pfn.saturating_add(nr - 1) >> BLOCK_ORDER;
        (pfn >> BLOCK_ORDER..=last).any(|b| self.by_pfn.contains_key(&b))
    }

    /// Forget every block; their unused frames as runs `(pfn, pages)` for the buddy.
    pub fn drain_unused(&mut self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        for (bp, b) in self.by_pfn.drain() {
            let base = bp << BLOCK_ORDER;
            let mut off = 0;
            while off < BLOCK_PAGES {
                if b.is_used(off) {
                    off += 1;
                    continue;
                }
                let start = off;
                while off < BLOCK_PAGES && !b.is_used(off) {
                    off += 1;
                }
                out.push((base + start, off - start));
            }
        }
        self.by_file.clear();
        self.reserved = 0;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_lifecycle() {
        let mut fb = FileBlocks::default();
        assert!(fb.insert(7, 515, 1024));
        assert_eq!(fb.reserved(), 511);
        assert_eq!(fb.take(7, 516), Some(1024 + 4));
        assert_eq!(fb.take(7, 516), None, "already handed out");
        assert_eq!(fb.take(8, 516), None, "another file");
        assert!(!fb.insert(7, 600, 2048), "the file has a block there");
        assert!(!fb.insert(8, 0, 1024), "the frames are a block already");
        assert!(fb.any_in(1500, 10) && !fb.any_in(0, 1024));
        assert_eq!(fb.put(1024 + 4), Put::Kept);
        assert_eq!(fb.put(1024 + 4), Put::NotInUse);
        assert_eq!(fb.put(5), Put::NotReserved);
        assert_eq!(fb.put(1024 + 3), Put::BlockFree(1024));
        assert!(fb.is_empty() && fb.reserved() == 0);
        // Fully handed out: forgotten.
        assert!(fb.insert(1, 0, 0));
        for i in 1..BLOCK_PAGES {
            assert_eq!(fb.take(1, i), Some(i));
        }
        assert!(fb.is_empty() && fb.reserved() == 0);
        assert_eq!(fb.put(3), Put::NotReserved);
        // Draining gives back exactly the unused frames.
        assert!(fb.insert(2, 0, 512));
        fb.take(2, 10);
        let runs = fb.drain_unused();
        assert_eq!(runs, vec![(513, 9), (523, 501)]);
        assert!(fb.is_empty() && fb.reserved() == 0);
    }
}

#[cfg(test)]
mod mm_tests {
    use super::*;
    use crate::mm::fragment::{FragmentSpec, RunStats, Schedule, Step};
    use crate::mm::{FrameAllocator, Mm, PageCache, Ram, Ranges, PAGE_SIZE};

    fn mm(frames: u64) -> Mm {
        let ram = Ram::create(frames * PAGE_SIZE).unwrap();
        let mut mm = Mm::new(ram, FrameAllocator::new(frames, 0..1024).unwrap());
        mm.online_normal(&Ranges::default()).unwrap();
        mm
    }

    /// Faults in random order, interleaved with other files: with file blocks each 2 MiB range
    /// of the file is one run; punching and releasing gives every frame back.
    #[test]
    fn random_faults_keep_runs_long_and_frames_come_back() {
        let frames = 1 << 16;
        let mut m = mm(frames);
        let before = m.stats();
        let spec = FragmentSpec {
            seed: 5,
            guest_pages: vec![8192, 700, 700],
            churn_pages: 2000,
            churn_max_order: 10,
        };
        let mut files: Vec<PageCache> = spec
            .guest_pages
            .iter()
            .map(|&n| PageCache::with_pages(n))
            .collect();
        let mut churn = std::collections::HashMap::new();
        for st in Schedule::new(&spec) {
            match st {
                Step::ChurnAlloc { id, order } => {
                    churn.insert(id, m.alloc_zeroed(order).unwrap());
                }
                Step::ChurnFree { id } => m.free(churn.remove(&id).unwrap()).unwrap(),
                Step::Fault { guest, index } => {
                    files[guest]
                        .fault_in_file(&mut m, guest as u64 + 100, index)
                        .unwrap();
                }
            }
        }
        let st = RunStats::of(files[0].runs().map(|r| r.2).collect());
        assert_eq!(st.pages, 8192);
        assert!(st.mean >= 512.0, "{st:?}");
        // Punch a few pages (their block was all handed out and forgotten: they go to the
        // buddy) and fault one again.
        let gone = files[0].take_runs(70, 80);
        m.free_runs(&gone).unwrap();
        assert!(files[0].fault_in_file(&mut m, 100, 77).is_ok());
        // A partly used block keeps punched frames and gives them out again.
        let mut g = PageCache::with_pages(1024);
        let p = g.fault_in_file(&mut m, 7, 600).unwrap();
        g.fault_in_file(&mut m, 7, 601).unwrap();
        m.free_runs(&g.take_runs(600, 601)).unwrap();
        assert_eq!(g.fault_in_file(&mut m, 7, 600).unwrap(), p);
        g.release(&mut m).unwrap();
        // Everything back.
        for f in &mut files {
            f.release(&mut m).unwrap();
        }
        for (_, f) in churn {
            m.free(f).unwrap();
        }
        assert_eq!(m.stats(), before);
        assert_eq!(m.file_blocks_reserved(), 0);
    }

    /// When memory runs short, reserved frames are given back and used.
    #[test]
    fn reservations_are_reclaimed_when_memory_is_short() {
        let frames = 4096;
        let mut m = mm(frames);
        let free = m.stats().free;
        let mut f = PageCache::with_pages(1 << 20);
        // One page in each of many 2 MiB ranges: the blocks reserve everything.
        for i in 0..6 {
            f.fault_in_file(&mut m, 1, i * BLOCK_PAGES).unwrap();
        }
        assert_eq!(m.stats().free, free - 6, "reserved frames count as free");
        assert!(m.file_blocks_reserved() > 0);
        // Allocating everything else still works: the reservations go back.
        let mut got = Vec::new();
        while let Ok(x) = m.alloc_zeroed(0) {
            got.push(x);
        }
        assert_eq!(got.len() as u64, free - 1024 - 6, "scratch is not served");
        assert_eq!(m.file_blocks_reserved(), 0);
        // And faults fall back to single frames once no block is left.
        m.free(got.pop().unwrap()).unwrap();
        assert!(f.fault_in_file(&mut m, 1, 3).is_ok());
        m.free_many(&mut got).unwrap();
        f.release(&mut m).unwrap();
        assert_eq!(m.stats().free, free);
    }
}
