//! The input cursor, a small writable RAM image that reads like a dump, and the builders of
//! synthetic handovers (fuzzed slot pages, a harness-built tracker).

use std::collections::BTreeMap;

use crate::abi::kho::{radix_index, radix_key, KHO_TABLE_LEVELS};
use crate::kho::dump::Dump;
use crate::kho::tracker::WalkLimits;
use crate::kho::KhoBootArgs;
use crate::mm::{MmError, PhysRead, PAGE_SIZE};

pub(super) const PAGE: usize = PAGE_SIZE as usize;

/// Reads the fuzz input front to back; past the end it yields zeros.
pub(super) struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    pub(super) fn new(b: &'a [u8]) -> Self {
        Self { b, pos: 0 }
    }
    pub(super) fn done(&self) -> bool {
        self.pos >= self.b.len()
    }
    pub(super) fn u8(&mut self) -> u8 {
        let v = self.b.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        v
    }
    pub(super) fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    pub(super) fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    pub(super) fn u64(&mut self) -> u64 {
        (self.u32() as u64) | ((self.u32() as u64) << 32)
    }
    pub(super) fn take(&mut self, n: usize) -> &'a [u8] {
        let s = self.pos.min(self.b.len());
        let e = self.pos.saturating_add(n).min(self.b.len());
        self.pos = self.pos.saturating_add(n);
        &self.b[s..e]
    }
    pub(super) fn rest(&mut self) -> &'a [u8] {
        let s = self.pos.min(self.b.len());
        self.pos = self.b.len();
        &self.b[s..]
    }
}

/// Sparse RAM built by the harness: whole pages at page-aligned addresses.
#[derive(Clone, Default)]
pub(super) struct Image {
    pub(super) ram_size: u64,
    pub(super) pages: BTreeMap<u64, Box<[u8; PAGE]>>,
}

impl Image {
    pub(super) fn new(ram_size: u64) -> Self {
        Self {
            ram_size,
            pages: BTreeMap::new(),
        }
    }
    pub(super) fn page_mut(&mut self, pa: u64) -> &mut [u8; PAGE] {
        self.pages
            .entry(pa / PAGE_SIZE * PAGE_SIZE)
            .or_insert_with(|| Box::new([0u8; PAGE]))
    }
    /// Write bytes at `pa` into pages that exist (or are created); no bound by `ram_size`.
    pub(super) fn write(&mut self, pa: u64, data: &[u8]) {
        let mut done = 0usize;
        while done < data.len() {
            let Some(p) = pa.checked_add(done as u64) else {
                return;
            };
            let off = (p % PAGE_SIZE) as usize;
            let n = (PAGE - off).min(data.len() - done);
            self.page_mut(p)[off..off + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
    }
    pub(super) fn write_u64(&mut self, pa: u64, v: u64) {
        self.write(pa, &v.to_ne_bytes());
    }
    /// The dump byte stream (`Dump::write`'s format) of this image.
    pub(super) fn dump_bytes(&self, args: &KhoBootArgs) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.pages.len() * (PAGE + 16));
        out.extend_from_slice(b"HOVRDUMP");
        out.extend_from_slice(&1u32.to_ne_bytes());
        out.extend_from_slice(&(self.pages.len() as u32).to_ne_bytes());
        out.extend_from_slice(&self.ram_size.to_ne_bytes());
        for v in [
            args.fdt_pa,
            args.fdt_size,
            args.scratch_pa,
            args.scratch_size,
        ] {
            out.extend_from_slice(&v.to_ne_bytes());
        }
        for (pa, b) in &self.pages {
            out.extend_from_slice(&pa.to_ne_bytes());
            out.extend_from_slice(&PAGE_SIZE.to_ne_bytes());
            out.extend_from_slice(&b[..]);
        }
        out
    }
    /// Round-trip through the real dump parser: the memory every decoder below reads.
    pub(super) fn to_dump(&self, args: &KhoBootArgs) -> Dump {
        match Dump::parse(&self.dump_bytes(args)) {
            Ok(d) => d,
            Err(e) => panic!("Dump::parse refused a well-formed dump: {e}"),
        }
    }
    pub(super) fn from_dump_bytes(b: &[u8]) -> Option<(Self, KhoBootArgs)> {
        let d = Dump::parse(b).ok()?;
        let args = d.args?;
        let mut img = Image::new(d.ram_size);
        let mut r = Cursor::new(b);
        r.take(8 + 4);
        let n = r.u32() as usize;
        r.take(8 + 32);
        for _ in 0..n {
            let pa = u64::from_ne_bytes(r.take(8).try_into().ok()?);
            r.take(8);
            let data = r.take(PAGE);
            img.write(pa, data);
        }
        Some((img, args))
    }
}

impl PhysRead for Image {
    fn phys_size(&self) -> u64 {
        self.ram_size
    }
    fn read_phys(&self, pa: u64, buf: &mut [u8]) -> Result<(), MmError> {
        let len = buf.len() as u64;
        if pa.checked_add(len).is_none_or(|e| e > self.ram_size) {
            return Err(MmError::OutOfRam { pa, len });
        }
        let mut done = 0usize;
        while done < buf.len() {
            let p = pa + done as u64;
            let page = p / PAGE_SIZE * PAGE_SIZE;
            let seg = self
                .pages
                .get(&page)
                .ok_or(MmError::OutOfRam { pa: p, len: 1 })?;
            let off = (p - page) as usize;
            let n = (PAGE - off).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&seg[off..off + n]);
            done += n;
        }
        Ok(())
    }
}

/// Synthetic images: 64 MiB of RAM, scratch in the first 16 MiB, 16 fuzzed "slot" pages at
/// 32 MiB and (where needed) a harness-built tracker at 48 MiB.
pub(super) const SYN_RAM: u64 = 64 << 20;
pub(super) const SYN_SCRATCH: u64 = 16 << 20;
const SLOT_BASE: u64 = 32 << 20;
pub(super) const SLOTS: u64 = 16;
const TRACKER_BASE: u64 = 48 << 20;

pub(super) fn slot_pa(i: u64) -> u64 {
    SLOT_BASE + (i % SLOTS) * PAGE_SIZE
}

pub(super) fn syn_args() -> KhoBootArgs {
    KhoBootArgs {
        fdt_pa: 0,
        fdt_size: 0,
        scratch_pa: 0,
        scratch_size: SYN_SCRATCH,
        fdt_crc: None,
    }
}

/// A u64 the fuzzer can aim: a slot address (plus a small offset), or raw bits.
pub(super) fn aimed_u64(c: &mut Cursor) -> u64 {
    match c.u8() % 4 {
        0 => slot_pa(c.u8() as u64),
        1 => slot_pa(c.u8() as u64).wrapping_add(c.u16() as u64 % (2 * PAGE_SIZE)),
        2 => c.u8() as u64,
        _ => c.u64(),
    }
}

/// Fill the slot pages from a list of records: `[slot, word, aimed value]`, or a raw run of
/// bytes. All 16 slots exist (zero-filled) so pointers to them resolve.
pub(super) fn fill_slots(img: &mut Image, c: &mut Cursor) {
    for i in 0..SLOTS {
        img.page_mut(slot_pa(i));
    }
    let mut n = 0;
    while !c.done() && n < 256 {
        n += 1;
        let op = c.u8();
        let slot = (op >> 4) as u64;
        if op & 1 == 0 {
            let word = c.u16() as u64 % 512;
            let v = aimed_u64(c);
            img.write_u64(slot_pa(slot) + word * 8, v);
        } else {
            let off = c.u16() as u64 % PAGE_SIZE;
            let len = c.u8() as usize % 64;
            let data = c.take(len).to_vec();
            let room = (PAGE_SIZE - off) as usize;
            img.write(slot_pa(slot) + off, &data[..data.len().min(room)]);
        }
    }
}

/// Write a valid tracker at `TRACKER_BASE` with one order-0 bit per pfn in `pfns` (all below
/// 2^15 pages, so one leaf). Returns its root.
pub(super) fn build_tracker(img: &mut Image, pfns: &[u64]) -> u64 {
    let node = |level: u32| TRACKER_BASE + (KHO_TABLE_LEVELS - level) as u64 * PAGE_SIZE;
    let root = node(KHO_TABLE_LEVELS);
    img.page_mut(root);
    for &pfn in pfns {
        let key = radix_key(pfn, 0);
        for level in (1..=KHO_TABLE_LEVELS).rev() {
            img.write_u64(
                node(level) + radix_index(key, level) as u64 * 8,
                node(level - 1),
            );
        }
        let bit = key & ((1 << 15) - 1);
        let leaf = node(0) + (bit / 64) * 8;
        let mut w = [0u8; 8];
        let _ = img.read_phys(leaf, &mut w);
        img.write_u64(leaf, u64::from_ne_bytes(w) | (1 << (bit % 64)));
    }
    root
}

pub(super) fn syn_limits() -> WalkLimits {
    WalkLimits {
        nr_frames: SYN_RAM / PAGE_SIZE,
        scratch: syn_args().scratch_pfns(),
        listed: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kho::tracker::IncomingTracker;

    #[test]
    fn harness_tracker_marks_the_preserved_slots() {
        let mut img = Image::new(SYN_RAM);
        let pfns = [slot_pa(0) / PAGE_SIZE, slot_pa(5) / PAGE_SIZE];
        let root = build_tracker(&mut img, &pfns);
        let d = img.to_dump(&syn_args());
        let (t, _) = IncomingTracker::walk(&d, root, &syn_limits()).expect("walk");
        assert_eq!(t.blocks(), vec![(pfns[0], 0), (pfns[1], 0)]);
    }
}
