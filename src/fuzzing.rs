//! Fuzzing entry points (used by the cargo-fuzz targets under `fuzz/`).
//!
//! Every `pub fn` here takes arbitrary bytes and, by contract, never panics: it drives the
//! project's real decoders (handover tree, tracker walk, dumps, block and array chains, the
//! whole boot-time discovery, handler blobs, ioctl argument rules and the in-process ioctl
//! path) and checks a few properties of what they return. A panic is a bug in a decoder (or a
//! property that does not hold), never an expected outcome.
//!
//! Synthetic handovers are assembled as a handful of 4 KiB pages of a small RAM, turned into a
//! real dump byte stream and read back with [`Dump::parse`], so every decoder reads memory
//! through the same [`PhysRead`] implementation `handover inspect` uses.

use std::collections::{BTreeMap, HashSet};

use zerocopy::{FromBytes, IntoBytes};

use crate::abi::kho::{
    radix_index, radix_key, IntegrityHeader, KhoArraySer, INTEGRITY_NAME, KHO_TABLE_LEVELS,
    MAX_FDT_SIZE, PROP_BLOB_CRC, PROP_TRACKER_CRC,
};
use crate::abi::luo::*;
use crate::host::Host;
use crate::kho::dump::Dump;
use crate::kho::fdt::HandoverTree;
use crate::kho::tracker::{IncomingTracker, WalkLimits};
use crate::kho::{Incoming, KhoBootArgs};
use crate::mm::{MmError, PhysRead, PAGE_SIZE};
use crate::uapi::{Errno, Pid};

const PAGE: usize = PAGE_SIZE as usize;

// ---------------------------------------------------------------------------------------------
// Input cursor and a small writable RAM image.

/// Reads the fuzz input front to back; past the end it yields zeros.
struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(b: &'a [u8]) -> Self {
        Self { b, pos: 0 }
    }
    fn done(&self) -> bool {
        self.pos >= self.b.len()
    }
    fn u8(&mut self) -> u8 {
        let v = self.b.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        v
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn u64(&mut self) -> u64 {
        (self.u32() as u64) | ((self.u32() as u64) << 32)
    }
    fn take(&mut self, n: usize) -> &'a [u8] {
        let s = self.pos.min(self.b.len());
        let e = self.pos.saturating_add(n).min(self.b.len());
        self.pos = self.pos.saturating_add(n);
        &self.b[s..e]
    }
    fn rest(&mut self) -> &'a [u8] {
        let s = self.pos.min(self.b.len());
        self.pos = self.b.len();
        &self.b[s..]
    }
}

/// Sparse RAM built by the harness: whole pages at page-aligned addresses.
#[derive(Clone, Default)]
struct Image {
    ram_size: u64,
    pages: BTreeMap<u64, Box<[u8; PAGE]>>,
}

impl Image {
    fn new(ram_size: u64) -> Self {
        Self {
            ram_size,
            pages: BTreeMap::new(),
        }
    }
    fn page_mut(&mut self, pa: u64) -> &mut [u8; PAGE] {
        self.pages
            .entry(pa / PAGE_SIZE * PAGE_SIZE)
            .or_insert_with(|| Box::new([0u8; PAGE]))
    }
    /// Write bytes at `pa` into pages that exist (or are created); no bound by `ram_size`.
    fn write(&mut self, pa: u64, data: &[u8]) {
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
    fn write_u64(&mut self, pa: u64, v: u64) {
        self.write(pa, &v.to_ne_bytes());
    }
    /// The dump byte stream (`Dump::write`'s format) of this image.
    fn dump_bytes(&self, args: &KhoBootArgs) -> Vec<u8> {
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
    fn to_dump(&self, args: &KhoBootArgs) -> Dump {
        match Dump::parse(&self.dump_bytes(args)) {
            Ok(d) => d,
            Err(e) => panic!("Dump::parse refused a well-formed dump: {e}"),
        }
    }
    fn from_dump_bytes(b: &[u8]) -> Option<(Self, KhoBootArgs)> {
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
const SYN_RAM: u64 = 64 << 20;
const SYN_SCRATCH: u64 = 16 << 20;
const SLOT_BASE: u64 = 32 << 20;
const SLOTS: u64 = 16;
const TRACKER_BASE: u64 = 48 << 20;

fn slot_pa(i: u64) -> u64 {
    SLOT_BASE + (i % SLOTS) * PAGE_SIZE
}

fn syn_args() -> KhoBootArgs {
    KhoBootArgs {
        fdt_pa: 0,
        fdt_size: 0,
        scratch_pa: 0,
        scratch_size: SYN_SCRATCH,
        fdt_crc: None,
    }
}

/// A u64 the fuzzer can aim: a slot address (plus a small offset), or raw bits.
fn aimed_u64(c: &mut Cursor) -> u64 {
    match c.u8() % 4 {
        0 => slot_pa(c.u8() as u64),
        1 => slot_pa(c.u8() as u64).wrapping_add(c.u16() as u64 % (2 * PAGE_SIZE)),
        2 => c.u8() as u64,
        _ => c.u64(),
    }
}

/// Fill the slot pages from a list of records: `[slot, word, aimed value]`, or a raw run of
/// bytes. All 16 slots exist (zero-filled) so pointers to them resolve.
fn fill_slots(img: &mut Image, c: &mut Cursor) {
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
fn build_tracker(img: &mut Image, pfns: &[u64]) -> u64 {
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

fn syn_limits() -> WalkLimits {
    WalkLimits {
        nr_frames: SYN_RAM / PAGE_SIZE,
        scratch: syn_args().scratch_pfns(),
        listed: None,
    }
}

// ---------------------------------------------------------------------------------------------
// fdt

/// `kho::fdt::parse` on raw bytes; a tree that parses and can be rebuilt must parse back the
/// same.
pub fn fdt(data: &[u8]) {
    let Ok(t) = crate::kho::fdt::parse(data) else {
        return;
    };
    let crc = t.tracker_crc.unwrap_or(0);
    if let Ok(b) = crate::kho::fdt::build(t.tracker_root, crc, &t.subtrees) {
        let Ok(back) = crate::kho::fdt::parse(&b) else {
            panic!("fdt::parse refuses what fdt::build wrote from a parsed tree");
        };
        assert_eq!(back.tracker_root, t.tracker_root, "tracker root changed");
        assert_eq!(
            back.subtrees, t.subtrees,
            "subtrees changed in a round trip"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// dump

/// `Dump::parse`, then what `handover inspect` does with a dump (inspect, its text and JSON
/// output), and the boot path (`discover` + LUO `validate`) on the same memory.
pub fn dump(data: &[u8]) {
    let Ok(d) = Dump::parse(data) else {
        return;
    };
    let Some(args) = d.args else {
        return;
    };
    decode_handover(&d, args);
}

fn decode_handover(d: &Dump, args: KhoBootArgs) {
    if let Ok(r) = crate::kho::inspect::inspect(d, args, &crate::cli::inspect::decoders()) {
        let _ = r.to_string();
        let _ = serde_json::to_string(&r);
    }
    if let Ok((inc, reserved)) = crate::kho::boot::discover(d, args) {
        check_incoming(d, &inc, &reserved);
        let supported = crate::registry::supported_compatibles();
        if crate::luo::serialize::validate(d, &inc, &supported).is_ok() {
            decode_luo_files(d, &inc);
        }
    }
}

/// Properties of an accepted handover: every preserved block and tracker node is in RAM, out
/// of scratch and reserved, and the tree is in preserved memory.
fn check_incoming(mem: &dyn PhysRead, inc: &Incoming, reserved: &crate::mm::Ranges) {
    let nr = mem.phys_size() / PAGE_SIZE;
    let s = inc.args.scratch_pfns();
    for (pfn, order) in inc.tracker.blocks().into_iter().take(4096) {
        let end = pfn + (1 << order);
        assert!(end <= nr, "accepted block {pfn:#x}/{order} outside RAM");
        assert!(
            end <= s.start || pfn >= s.end,
            "accepted block {pfn:#x}/{order} in scratch"
        );
        assert!(
            reserved.covers(pfn, end),
            "accepted block {pfn:#x}/{order} not reserved"
        );
    }
    for &pa in inc.tracker.node_pages() {
        let pfn = pa / PAGE_SIZE;
        assert!(
            reserved.covers(pfn, pfn + 1),
            "tracker node {pa:#x} not reserved"
        );
    }
    assert!(
        inc.tracker.order_of(inc.args.fdt_pa / PAGE_SIZE).is_some(),
        "accepted tree is not preserved"
    );
}

/// After `validate` accepted the LUO state: decode each file's handler blob as retrieve would
/// read it (memfd ser, guest_memfd header and their folio arrays).
fn decode_luo_files(mem: &dyn PhysRead, inc: &Incoming) {
    let Some(st) = inc.tree.subtrees.get(LUO_KHO_ENTRY_NAME) else {
        return;
    };
    let mut b = [0u8; 32];
    if mem.read_phys(st.pa, &mut b).is_err() {
        return;
    }
    let Ok(ser) = LuoSer::read_from_bytes(&b) else {
        return;
    };
    let ok = |pa: u64| pa % PAGE_SIZE == 0 && inc.tracker.order_of(pa / PAGE_SIZE).is_some();
    let Ok((_, sessions)) = crate::kho::block::walk_chain(mem, ser.sessions_pa, 80, &ok) else {
        panic!("validate accepted a session chain walk_chain refuses");
    };
    for e in sessions {
        let Ok(s) = LuoSessionSer::read_from_bytes(&e) else {
            continue;
        };
        let Ok((_, files)) = crate::kho::block::walk_chain(mem, s.files, 64, &ok) else {
            panic!("validate accepted a file chain walk_chain refuses");
        };
        for fe in files {
            let Ok(f) = LuoFileSer::read_from_bytes(&fe) else {
                continue;
            };
            let compat = crate::abi::cstr_field(&f.compatible).unwrap_or_default();
            decode_file_blob(mem, &compat, f.data);
        }
    }
}

fn decode_file_blob(mem: &dyn PhysRead, compat: &str, pa: u64) {
    use crate::kvm::guest_memfd_luo::{read_header, Format};
    match compat {
        crate::fs::memfd_luo::COMPATIBLE => {
            let mut b = [0u8; 48];
            if mem.read_phys(pa, &mut b).is_ok() {
                memfd_ser(&b, mem);
            }
        }
        crate::abi::kvm::GUEST_MEMFD_LUO_FH_COMPATIBLE => {
            if let Ok(h) = read_header(mem, pa, Format::V1) {
                check_gmem_header(&h);
                let _ = crate::kho::array::read_chain(mem, &h.list);
            }
        }
        crate::abi::kvm::GUEST_MEMFD_LUO_V2_FH_COMPATIBLE => {
            if let Ok(h) = read_header(mem, pa, Format::V2) {
                check_gmem_header(&h);
                let _ = crate::kho::array::read_chain(mem, &h.list);
            }
        }
        _ => {}
    }
}

fn check_gmem_header(h: &crate::kvm::guest_memfd_luo::Header) {
    assert!(
        h.size != 0 && h.size % PAGE_SIZE == 0,
        "gmem size {:#x}",
        h.size
    );
    assert!(h.nr_folios <= h.size / PAGE_SIZE && h.nr_runs <= h.nr_folios);
    assert_eq!(
        h.flags & !crate::abi::kvm::GUEST_MEMFD_LUO_SUPPORTED_FLAGS,
        0
    );
}

/// The memfd handler's blob, checked as its (private) `read_ser` does, and its folio list.
fn memfd_ser(b: &[u8], mem: &dyn PhysRead) {
    use crate::fs::memfd_luo::{FolioSer, MemfdLuoSer};
    let Ok((s, _)) = MemfdLuoSer::read_from_prefix(b) else {
        return;
    };
    if s.flags != 0 || s.seals & !crate::fs::memfd::ALL_SEALS != 0 {
        return;
    }
    if s.size > crate::fs::memfd::MAX_SIZE || s.nr_folios > s.size.div_ceil(PAGE_SIZE) {
        return;
    }
    if let Ok(list) = crate::kho::array::read_chain(mem, &s.folios) {
        for e in list.chunks_exact(16).take(s.nr_folios as usize) {
            if let Ok(f) = FolioSer::read_from_bytes(e) {
                let g = FolioSer::new(f.pfn(), f.flags(), f.index);
                assert_eq!(g.pfn_flags, f.pfn_flags, "FolioSer pfn/flags round trip");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// tracker

/// `IncomingTracker::walk` over 16 fuzzed pages (root: one of them, or a raw address), with
/// optional integrity listing; an accepted tracker's blocks are in RAM, out of scratch and
/// consumable exactly once.
pub fn tracker(data: &[u8]) {
    let mut c = Cursor::new(data);
    let flags = c.u8();
    let root = if flags & 1 == 0 {
        slot_pa(c.u8() as u64)
    } else {
        c.u64()
    };
    let listed = (flags & 2 != 0).then(|| {
        let mask = c.u16();
        (0..SLOTS)
            .filter(|i| mask & (1 << i) != 0)
            .map(slot_pa)
            .collect::<HashSet<u64>>()
    });
    let mut img = Image::new(SYN_RAM);
    fill_slots(&mut img, &mut c);
    let d = img.to_dump(&syn_args());
    let limits = WalkLimits {
        listed,
        ..syn_limits()
    };
    let Ok((mut t, reserved)) = IncomingTracker::walk(&d, root, &limits) else {
        return;
    };
    let blocks = t.blocks();
    let (nb, np) = t.outstanding();
    assert_eq!(nb, blocks.len() as u64, "outstanding blocks");
    let mut pages = 0;
    for &(pfn, order) in &blocks {
        let end = pfn + (1 << order);
        assert!(end <= limits.nr_frames, "block outside RAM");
        assert!(
            end <= limits.scratch.start || pfn >= limits.scratch.end,
            "block in scratch"
        );
        assert!(reserved.covers(pfn, end), "block not reserved");
        assert_eq!(
            t.order_of(pfn),
            Some(order),
            "order_of disagrees with blocks()"
        );
        pages += 1 << order;
    }
    assert_eq!(pages, np, "outstanding pages");
    for &pa in t.node_pages() {
        assert!(
            reserved.covers(pa / PAGE_SIZE, pa / PAGE_SIZE + 1),
            "node not reserved"
        );
    }
    let _ = t.pages_by_order();
    for &(pfn, order) in blocks.iter().take(64) {
        assert_eq!(
            t.take_any(pfn),
            Some(order),
            "take_any of an outstanding block"
        );
        assert!(!t.take(pfn, order), "a block was restored twice");
    }
}

// ---------------------------------------------------------------------------------------------
// chain

thread_local! {
    static CHAIN_MM: std::cell::RefCell<Option<crate::mm::Mm>> = const { std::cell::RefCell::new(None) };
}

/// Block chains (`kho::block::walk_chain`), array chains (`kho::array::read_chain`, and
/// `Kho::walk_array` against a real incoming tracker) over 16 fuzzed pages, some of them
/// marked preserved in a harness-built tracker.
pub fn chain(data: &[u8]) {
    let mut c = Cursor::new(data);
    let which = c.u8();
    let preserved_mask = c.u16();
    let head = aimed_u64(&mut c);
    let entry_size = match c.u8() % 12 {
        0 => 80,
        1 => 64,
        2 => 24,
        3 => 16,
        4 => 8,
        5 => 1,
        6 => 0,
        7 => 4080,
        8 => 4081,
        9 => 4096,
        10 => usize::MAX,
        _ => c.u16() as usize,
    };
    let ser = KhoArraySer {
        first: head,
        total_pages: match c.u8() % 4 {
            0 => c.u8() as u32 % 8,
            1 => c.u32(),
            _ => c.u8() as u32 % 32,
        },
        flags: if c.u8() % 8 == 0 { c.u16() } else { 0 },
        order: if c.u8() % 8 == 0 { c.u16() } else { 0 },
    };
    let mut img = Image::new(SYN_RAM);
    fill_slots(&mut img, &mut c);
    let pfns: Vec<u64> = (0..SLOTS)
        .filter(|i| preserved_mask & (1 << i) != 0)
        .map(|i| slot_pa(i) / PAGE_SIZE)
        .collect();
    let root = build_tracker(&mut img, &pfns);
    let d = img.to_dump(&syn_args());
    let Ok((tracker, _)) = IncomingTracker::walk(&d, root, &syn_limits()) else {
        panic!("the harness's tracker was refused");
    };
    match which % 3 {
        0 => {
            let ok = |pa: u64| pa % PAGE_SIZE == 0 && tracker.order_of(pa / PAGE_SIZE).is_some();
            if let Ok((blocks, entries)) = crate::kho::block::walk_chain(&d, head, entry_size, &ok)
            {
                assert!(blocks.len() <= crate::abi::kho::KHO_MAX_BLOCKS);
                assert!(
                    blocks.iter().all(|&b| ok(b)),
                    "walk_chain took an unpreserved block"
                );
                assert!(entries.iter().all(|e| e.len() == entry_size));
                assert_eq!(head == 0, blocks.is_empty());
            }
        }
        1 => {
            if let Ok(v) = crate::kho::array::read_chain(&d, &ser) {
                assert_eq!(v.len() as u64, ser.total_pages as u64 * PAGE_SIZE);
            }
        }
        _ => walk_array(&d, tracker, &ser),
    }
}

fn walk_array(d: &Dump, tracker: IncomingTracker, ser: &KhoArraySer) {
    let inc = Incoming {
        args: syn_args(),
        tree: HandoverTree {
            compatible: crate::abi::kho::KHO_FDT_COMPATIBLE.into(),
            tracker_root: 0,
            tracker_crc: None,
            subtrees: BTreeMap::new(),
        },
        tracker,
        metadata: None,
        fdt: Vec::new(),
    };
    CHAIN_MM.with(|m| {
        let mut m = m.borrow_mut();
        let mm = m.get_or_insert_with(|| {
            let ram = crate::mm::Ram::create(4 << 20).expect("RAM for the chain harness");
            let frames = crate::mm::FrameAllocator::new(1024, 0..1024).expect("frames");
            crate::mm::Mm::new(ram, frames)
        });
        let kho =
            crate::kho::Kho::new(mm, 0..SYN_SCRATCH / PAGE_SIZE, Some(inc)).expect("Kho::new");
        if let Ok((chunks, data)) = kho.walk_array(d, ser) {
            assert_eq!(data.len() as u64, ser.total_pages as u64);
            let mut all: Vec<u64> = chunks.iter().chain(&data).copied().collect();
            let n = all.len();
            all.sort_unstable();
            all.dedup();
            assert_eq!(all.len(), n, "walk_array listed a page twice");
            assert!(all.iter().all(|&p| kho.is_restorable(p)));
        }
        let nodes = kho.tracker().node_folios().to_vec();
        drop(kho);
        for f in nodes {
            mm.free(f).expect("free the harness tracker node");
        }
    });
}

// ---------------------------------------------------------------------------------------------
// handover: a whole image

/// A real handover, made once per process: a 64 MiB host with a `kho-test` client and two LUO
/// sessions (memfds and a test-handler file) finalizes (the reboot path up to `execve`) and dumps what it would hand over.
pub fn handover_template() -> HandoverTemplate {
    // Unique per call: tests build templates on several threads at once.
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("handover-fuzz-{}-{n}.dump", std::process::id()));
    let mut h = Host::boot(crate::kexec::BootParams {
        ram_size: 64 << 20,
        ..Default::default()
    })
    .expect("boot the template host");
    let t = crate::kho::test::KhoTest::create(&mut h, 64 << 10, 7).expect("kho-test");
    t.preserve(&mut h).expect("kho-test preserve");
    let pid = h.spawn();
    let dev = h
        .open(pid, "/dev/liveupdate", 0)
        .expect("open /dev/liveupdate");
    let s1 = crate::vmm::libluo::create_session(&mut h, pid, dev, "fuzz-a").expect("session");
    let s2 = crate::vmm::libluo::create_session(&mut h, pid, dev, "fuzz-b").expect("session");
    for (s, tok) in [(s1, 1u64), (s1, 2), (s2, 3)] {
        let m = crate::vmm::libluo::memfd_with(&mut h, pid, b"fuzz template").expect("memfd");
        crate::vmm::libluo::preserve_fd(&mut h, pid, s, m, tok).expect("preserve memfd");
    }
    if let Ok(t) = h.open(pid, "/dev/liveupdate-test", 0) {
        let _ = crate::vmm::libluo::preserve_fd(&mut h, pid, s2, t, 4);
    }
    let (luo, ho) = match h.prepare_handover() {
        Ok(v) => v,
        Err(e) => panic!("template finalize failed: {e}"),
    };
    let d = h
        .kho
        .dump(&h.mm, ho.args)
        .expect("dump the template handover");
    d.write(&path).expect("write the template dump");
    let ho_crc = ho.args.fdt_crc;
    h.abandon_handover(luo, ho);
    let b = std::fs::read(&path).expect("read the template dump");
    let _ = std::fs::remove_file(&path);
    let (img, mut args) = Image::from_dump_bytes(&b).expect("parse the template dump");
    // Dumps do not carry the tree CRC; the boot path gets it from the command line.
    args.fdt_crc = ho_crc;
    HandoverTemplate { img, args }
}

/// A real handover as pages of RAM plus its boot arguments (see [`handover_template`]).
pub struct HandoverTemplate {
    img: Image,
    args: KhoBootArgs,
}

impl HandoverTemplate {
    /// The template as a dump file (e.g. to seed the `dump` target).
    pub fn dump_bytes(&self) -> Vec<u8> {
        self.img.dump_bytes(&self.args)
    }
}

/// Patch a real handover (the template's dump bytes) as the input says, optionally repair
/// every checksum so the decoders get past them, then run the boot path (`discover`, LUO
/// `validate`, each file's blob) and `inspect` on it.
///
/// Input: `flags`, then records: `[op, page, ...]` — write bytes at an offset, set a word to
/// the address of another page of the image (plus a delta), set a raw word, flip a bit.
/// `flags`: bit 0 set = leave checksums as patched; bit 1 = drop the tree CRC from the
/// arguments; bit 2 = fuzz the arguments too; bit 3 = fuzz the RAM size.
pub fn handover(template: &HandoverTemplate, data: &[u8]) {
    let (img, args) = patch_template(template, data);
    let d = img.to_dump(&args);
    decode_handover(&d, args);
}

fn patch_template(template: &HandoverTemplate, data: &[u8]) -> (Image, KhoBootArgs) {
    let (mut img, mut args) = (template.img.clone(), template.args);
    let mut c = Cursor::new(data);
    let flags = c.u8();
    if flags & 4 != 0 {
        match c.u8() % 4 {
            0 => args.fdt_pa = c.u64(),
            1 => args.fdt_size = c.u16() as u64,
            2 => args.scratch_pa = c.u64(),
            _ => args.scratch_size = c.u64(),
        }
    }
    if flags & 8 != 0 {
        // The size of RAM the decoders are told (a dump says it; a boot knows it).
        img.ram_size = match c.u8() % 3 {
            0 => c.u64(),
            1 => 1u64 << (c.u8() % 64),
            _ => img.ram_size.wrapping_add(c.u16() as u64 * PAGE_SIZE),
        };
    }
    let addrs: Vec<u64> = img.pages.keys().copied().collect();
    let mut n = 0;
    while !c.done() && n < 64 && !addrs.is_empty() {
        n += 1;
        let op = c.u8();
        let pa = addrs[c.u8() as usize % addrs.len()];
        match op % 4 {
            0 => {
                let off = c.u16() as u64 % PAGE_SIZE;
                let len = c.u8() as usize % 32;
                let bytes = c.take(len).to_vec();
                let room = (PAGE_SIZE - off) as usize;
                img.write(pa + off, &bytes[..bytes.len().min(room)]);
            }
            1 => {
                let word = c.u16() as u64 % 512;
                let to = addrs[c.u8() as usize % addrs.len()];
                let delta = c.u8() as u64;
                img.write_u64(pa + word * 8, to + if delta < 200 { 0 } else { delta * 8 });
            }
            2 => {
                let word = c.u16() as u64 % 512;
                let v = c.u64();
                img.write_u64(pa + word * 8, v);
            }
            _ => {
                let bit = c.u16() as u64 % (PAGE_SIZE * 8);
                img.page_mut(pa)[(bit / 8) as usize] ^= 1 << (bit % 8);
            }
        }
    }
    if flags & 1 == 0 {
        fix_checksums(&mut img, &mut args);
    }
    if flags & 2 != 0 {
        args.fdt_crc = None;
    }
    (img, args)
}

/// The handover image the `handover` target decodes for `data`, as a dump file (what
/// `handover inspect` reads), to reproduce a finding outside the fuzzer.
pub fn handover_dump(template: &HandoverTemplate, data: &[u8]) -> Vec<u8> {
    let (img, args) = patch_template(template, data);
    img.dump_bytes(&args)
}

/// Recompute every checksum a handover carries, in dependency order: integrity entries and
/// their CRC, each subtree blob's CRC, the tracker CRC (all three in place in the tree), and
/// the tree's CRC in the boot arguments.
fn fix_checksums(img: &mut Image, args: &mut KhoBootArgs) {
    if args.fdt_size == 0 || args.fdt_size > MAX_FDT_SIZE {
        return;
    }
    let mut fdt = vec![0u8; args.fdt_size as usize];
    if img.read_phys(args.fdt_pa, &mut fdt).is_err() {
        return;
    }
    let Ok(tree) = crate::kho::fdt::parse(&fdt) else {
        args.fdt_crc = Some(crc32fast::hash(&fdt));
        return;
    };
    // Integrity table entries.
    if let Some(st) = tree.subtrees.get(INTEGRITY_NAME) {
        fix_integrity(img, st.pa);
    }
    // Property values to patch: (offset in the tree, new value).
    let mut patches: Vec<(usize, [u8; 4])> = Vec::new();
    let Ok(f) = flat_device_tree::Fdt::new(&fdt) else {
        return;
    };
    let off = |v: &[u8]| (v.as_ptr() as usize).wrapping_sub(fdt.as_ptr() as usize);
    if let Some(root) = f.find_node("/") {
        for child in root.children() {
            let Some(s) = tree.subtrees.get(child.name) else {
                continue;
            };
            if let Some(p) = child.property(PROP_BLOB_CRC) {
                if p.value.len() == 4 && s.size <= MAX_FDT_SIZE * 64 {
                    if let Ok(crc) = crate::mm::ram::crc32_of(img, s.pa, s.size) {
                        patches.push((off(p.value), crc.to_ne_bytes()));
                    }
                }
            }
        }
        if let Some(p) = root.property(PROP_TRACKER_CRC) {
            let limits = WalkLimits {
                nr_frames: img.ram_size / PAGE_SIZE,
                scratch: args.scratch_pfns(),
                listed: None,
            };
            if p.value.len() == 4 {
                if let Ok((t, _)) = IncomingTracker::walk(img, tree.tracker_root, &limits) {
                    let mut nodes = t.node_pages().to_vec();
                    nodes.sort_unstable();
                    let mut h = crc32fast::Hasher::new();
                    let mut page = vec![0u8; PAGE];
                    for pa in nodes {
                        if img.read_phys(pa, &mut page).is_ok() {
                            h.update(&page);
                        }
                    }
                    patches.push((off(p.value), h.finalize().to_ne_bytes()));
                }
            }
        }
    }
    for (o, v) in patches {
        if let Some(dst) = fdt.get_mut(o..o + 4) {
            dst.copy_from_slice(&v);
        }
    }
    img.write(args.fdt_pa, &fdt);
    args.fdt_crc = Some(crc32fast::hash(&fdt));
}

fn fix_integrity(img: &mut Image, pa: u64) {
    let mut b = vec![0u8; std::mem::size_of::<IntegrityHeader>()];
    if img.read_phys(pa, &mut b).is_err() {
        return;
    }
    let Ok(mut hdr) = IntegrityHeader::read_from_bytes(&b) else {
        return;
    };
    // Collect the data pages of the entries' array (bounded, loop-free).
    let mut data_pages = Vec::new();
    let mut seen = HashSet::new();
    let mut next = hdr.entries.first;
    while next != 0 && next % PAGE_SIZE == 0 && seen.insert(next) && seen.len() < 64 {
        let mut page = vec![0u8; PAGE];
        if img.read_phys(next, &mut page).is_err() {
            break;
        }
        let words: Vec<u64> = page
            .chunks_exact(8)
            .map(|c| u64::from_ne_bytes(c.try_into().unwrap_or_default()))
            .collect();
        for &p in words[1..].iter().take_while(|&&p| p != 0) {
            if data_pages.len() >= 64 {
                break;
            }
            data_pages.push(p);
        }
        next = words[0];
    }
    let mut bytes = Vec::new();
    for &p in &data_pages {
        let mut page = vec![0u8; PAGE];
        if p % PAGE_SIZE != 0 || img.read_phys(p, &mut page).is_err() {
            return;
        }
        bytes.extend_from_slice(&page);
    }
    let n = (hdr.nr_entries.min(bytes.len() as u64 / 24)) as usize;
    for i in 0..n {
        let e = &mut bytes[i * 24..i * 24 + 24];
        let epa = u64::from_ne_bytes(e[0..8].try_into().unwrap_or_default());
        let elen = u64::from_ne_bytes(e[8..16].try_into().unwrap_or_default());
        if elen <= 1 << 20 {
            if let Ok(crc) = crate::mm::ram::crc32_of(img, epa, elen) {
                e[16..20].copy_from_slice(&crc.to_ne_bytes());
            }
        }
    }
    for (i, &p) in data_pages.iter().enumerate() {
        img.write(p, &bytes[i * PAGE..(i + 1) * PAGE]);
    }
    if let Some(e) = bytes.get(..hdr.nr_entries.saturating_mul(24).min(bytes.len() as u64) as usize)
    {
        hdr.entries_crc = crc32fast::hash(e);
    }
    img.write(pa, hdr.as_bytes());
}

// ---------------------------------------------------------------------------------------------
// blobs

/// Handler and KHO client blobs: `kexec-metadata`, the guest_memfd header (v1 and v2), the
/// memfd ser and its folio list, the `kho-test` blob and the LUO records.
pub fn blobs(data: &[u8]) {
    let mut c = Cursor::new(data);
    let which = c.u8();
    let rest = c.rest();
    match which % 8 {
        0 => {
            if let Ok(m) = crate::kho::metadata::decode(rest) {
                let img = m.previous_image.clone().unwrap_or_default();
                if m.previous_release.len() < 65 && img.len() < 256 {
                    let back = crate::kho::metadata::decode(&crate::kho::metadata::encode(
                        &m.previous_release,
                        m.kexec_count,
                        &img,
                    ))
                    .expect("metadata round trip");
                    assert_eq!(back.previous_release, m.previous_release);
                    assert_eq!(back.kexec_count, m.kexec_count);
                    assert_eq!(back.previous_image, m.previous_image);
                }
            }
        }
        w @ (1 | 2) => {
            use crate::kvm::guest_memfd_luo::{read_header, Format};
            let mut img = Image::new(SYN_RAM);
            // The blob at the end of a page half the time, so reads can cross into a hole.
            let pa = if rest.first().is_some_and(|b| b & 1 == 1) {
                slot_pa(1) - 40
            } else {
                slot_pa(0)
            };
            img.page_mut(slot_pa(0));
            img.write(pa, &rest[..rest.len().min(PAGE)]);
            let d = img.to_dump(&syn_args());
            let f = if w == 1 { Format::V1 } else { Format::V2 };
            if let Ok(h) = read_header(&d, pa, f) {
                check_gmem_header(&h);
                let _ = crate::kho::array::read_chain(&d, &h.list);
            }
        }
        3 => {
            let mut img = Image::new(SYN_RAM);
            let (blob, pages) = rest.split_at(rest.len().min(48));
            let mut cc = Cursor::new(pages);
            fill_slots(&mut img, &mut cc);
            let d = img.to_dump(&syn_args());
            memfd_ser(blob, &d);
        }
        4 => {
            let img = Image::new(SYN_RAM);
            let _ = crate::kho::test::describe(&img, rest);
        }
        5 => {
            if let Ok((s, _)) = LuoSer::read_from_prefix(rest) {
                let _ = crate::abi::cstr_field(&s.compatible);
            }
            if let Ok((s, _)) = LuoSessionSer::read_from_prefix(rest) {
                if let Ok(n) = crate::luo::core::session_name(&s.name) {
                    assert!(!n.is_empty() && n.len() < 64 * 3);
                }
            }
            if let Ok((f, _)) = LuoFileSer::read_from_prefix(rest) {
                if let Some(s) = crate::abi::cstr_field(&f.compatible) {
                    assert!(s.len() < LIVEUPDATE_HNDL_COMPAT_LENGTH);
                }
            }
        }
        6 => {
            if let Ok((h, _)) = IntegrityHeader::read_from_prefix(rest) {
                let _ = crate::abi::cstr_field(&h.compatible);
            }
            let s = String::from_utf8_lossy(rest);
            if let Some(f) = crate::abi::put_cstr::<64>(&s) {
                assert_eq!(crate::abi::cstr_field(&f).as_deref(), Some(&*s));
            }
        }
        _ => {
            use crate::abi::kho::radix_key_decode;
            let mut cc = Cursor::new(rest);
            while !cc.done() {
                let key = cc.u64();
                if let Some((pfn, order)) = radix_key_decode(key) {
                    if order <= 52 && pfn % (1 << order) == 0 && pfn < 1 << 52 {
                        assert_eq!(radix_key(pfn, order), key, "radix key round trip");
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// ucmd

/// The reference rule for an ioctl argument (see `luo::ucmd`), to check `ucmd::read` against.
fn ucmd_model(arg: &[u8], k: usize, min: usize) -> Result<usize, Errno> {
    if arg.len() < 4 {
        return Err(Errno::EFAULT);
    }
    let size = u32::from_ne_bytes([arg[0], arg[1], arg[2], arg[3]]) as usize;
    if size > arg.len() {
        return Err(Errno::EFAULT);
    }
    if size < min {
        return Err(Errno::EINVAL);
    }
    if size > k && arg[k..size].iter().any(|&b| b != 0) {
        return Err(Errno::E2BIG);
    }
    Ok(size.min(k))
}

fn ucmd_one<T>(arg: &[u8], min: usize)
where
    T: FromBytes + IntoBytes + zerocopy::Immutable,
{
    let k = std::mem::size_of::<T>();
    let got = crate::luo::ucmd::read::<T>(arg, min);
    match (got, ucmd_model(arg, k, min)) {
        (Ok(v), Ok(n)) => {
            let b = v.as_bytes();
            assert_eq!(&b[..n], &arg[..n], "decoded bytes differ from the user's");
            assert!(
                b[n..].iter().all(|&x| x == 0),
                "bytes past size are not zero"
            );
            let mut out = arg.to_vec();
            crate::luo::ucmd::respond(&mut out, &v).expect("respond to a readable argument");
            assert_eq!(&out[..n], &b[..n], "respond did not copy min(size, sizeof)");
            assert_eq!(&out[n..], &arg[n..], "respond wrote past min(size, sizeof)");
        }
        (Err(a), Err(b)) => assert_eq!(a, b, "ucmd::read errno differs from the rule"),
        (a, b) => panic!(
            "ucmd::read gave {:?}, the rule says {:?}",
            a.map(|_| ()),
            b.map(|_| ())
        ),
    }
}

/// `luo::ucmd::read` / `respond` / `decode` for every LUO argument struct, with the minimum
/// size each command uses, checked against the documented rule.
pub fn ucmd(data: &[u8]) {
    let mut c = Cursor::new(data);
    let which = c.u8();
    let cmd = c.u64();
    let arg = c.rest();
    let (ty, nr, clean) = crate::luo::ucmd::decode(cmd);
    assert!(ty <= 0xff && nr <= 0xff);
    assert_eq!(clean, cmd >> 16 == 0);
    match which % 6 {
        0 => ucmd_one::<CreateSession>(arg, 72),
        1 => ucmd_one::<RetrieveSession>(arg, std::mem::size_of::<CreateSession>()),
        2 => ucmd_one::<PreserveFd>(arg, 16),
        3 => ucmd_one::<RetrieveFd>(arg, 16),
        4 => ucmd_one::<SessionFinish>(arg, 8),
        _ => ucmd_one::<SessionGetName>(arg, 8),
    }
}

// ---------------------------------------------------------------------------------------------
// ioctl: the in-process path on a live host

/// A booted host kept across inputs, with incoming sessions from an in-process kexec.
pub struct IoctlFuzzer {
    host: Option<Host>,
    /// Incoming sessions left to retrieve before a new kexec refills them.
    kexecs: u64,
}

const IN_SESSIONS: usize = 6;
const NAMES: [&str; 4] = ["in-0", "in-1", "out-a", "out-b"];

impl Default for IoctlFuzzer {
    fn default() -> Self {
        Self::new()
    }
}

impl IoctlFuzzer {
    pub fn new() -> Self {
        let h = Host::boot(crate::kexec::BootParams {
            ram_size: 64 << 20,
            ..Default::default()
        })
        .expect("boot the ioctl host");
        let mut f = Self {
            host: Some(h),
            kexecs: 0,
        };
        f.refill();
        f
    }

    fn incoming_left(h: &Host) -> usize {
        h.luo
            .sessions
            .values()
            .filter(|s| s.kind == crate::luo::SessionKind::Incoming { retrieved: false })
            .count()
    }

    /// Preserve a few sessions (memfds, a test file) and kexec in process, so the next inputs
    /// find incoming sessions to retrieve, read and finish.
    fn refill(&mut self) {
        let mut h = self.host.take().expect("host");
        let pid = h.spawn();
        let dev = h
            .open(pid, "/dev/liveupdate", 0)
            .expect("open /dev/liveupdate");
        for i in 0..IN_SESSIONS {
            let name = format!("in-{i}");
            let s = crate::vmm::libluo::create_session(&mut h, pid, dev, &name).expect("session");
            let m = crate::vmm::libluo::memfd_with(&mut h, pid, b"ioctl fuzz").expect("memfd");
            crate::vmm::libluo::preserve_fd(&mut h, pid, s, m, 1).expect("preserve");
            let m = crate::vmm::libluo::memfd_with(&mut h, pid, b"second").expect("memfd");
            crate::vmm::libluo::preserve_fd(&mut h, pid, s, m, 2).expect("preserve");
            if let Ok(t) = h.open(pid, "/dev/liveupdate-test", 0) {
                let _ = crate::vmm::libluo::preserve_fd(&mut h, pid, s, t, 3);
            }
        }
        let h = match h.kexec_in_process() {
            Ok(h) => h,
            Err(_) => panic!("in-process kexec of the ioctl host failed"),
        };
        self.kexecs += 1;
        self.host = Some(h);
    }

    pub fn kexecs(&self) -> u64 {
        self.kexecs
    }

    /// Run one input: a new process opens `/dev/liveupdate` and issues a sequence of ioctls
    /// (raw or built from the upstream structs with fuzzed sizes, names, fds and tokens) on the
    /// device, on session fds and on other fds, interleaved with closes and memfd creation;
    /// then it exits, which closes everything it opened.
    pub fn run(&mut self, data: &[u8]) {
        if Self::incoming_left(self.host.as_ref().expect("host")) < 2 {
            self.refill();
        }
        let h = self.host.as_mut().expect("host");
        let pid = h.spawn();
        let mut fds: Vec<i32> = Vec::new();
        let dev = h.open(pid, "/dev/liveupdate", 0);
        if let Ok(d) = dev {
            fds.push(d);
        } else {
            // Deserialization failure is sticky (EIO) and must be reported, not crash.
            assert_eq!(dev, Err(Errno::EIO), "open /dev/liveupdate");
        }
        let mut c = Cursor::new(data);
        let mut n = 0;
        while !c.done() && n < 32 {
            n += 1;
            one_op(h, pid, &mut fds, &mut c);
        }
        h.exit(pid);
    }
}

fn pick_fd(fds: &[i32], c: &mut Cursor) -> i32 {
    let b = c.u8();
    if b >= 0xf0 {
        return b as i32 - 0xf8; // -8..7: bad and low fds
    }
    fds.get(b as usize % fds.len().max(1))
        .copied()
        .unwrap_or(-1)
}

/// The argument buffer: a struct's bytes with a fuzzed `size` and length.
fn arg_buf(c: &mut Cursor, body: &[u8]) -> Vec<u8> {
    let mode = c.u8();
    let mut b = body.to_vec();
    match mode % 8 {
        0..=3 => {}
        4 => b.truncate(c.u8() as usize % (body.len() + 1)),
        5 => {
            let extra = c.u8() as usize % 32;
            b.resize(body.len() + extra, 0);
            let nz = c.u8();
            if nz != 0 && extra > 0 {
                let i = body.len() + nz as usize % extra;
                b[i] = nz;
            }
        }
        6 => {
            let n = c.u8() as usize;
            b = c.take(n).to_vec();
        }
        _ => {}
    }
    if mode & 0x38 != 0 && b.len() >= 4 {
        let size = match (mode >> 3) % 8 {
            1 => b.len() as u32,
            2 => c.u8() as u32,
            3 => u32::MAX,
            4 => 0,
            5 => body.len() as u32 + 8,
            _ => c.u32(),
        };
        b[..4].copy_from_slice(&size.to_ne_bytes());
    }
    b
}

fn name_field(c: &mut Cursor) -> [u8; 64] {
    let mut f = [0u8; 64];
    let sel = c.u8();
    if (sel as usize % 8) < NAMES.len() + 2 {
        let s = match sel as usize % 8 {
            i if i < NAMES.len() => NAMES[i].to_string(),
            4 => format!("in-{}", c.u8() % 8),
            _ => "x".repeat(63),
        };
        f[..s.len()].copy_from_slice(s.as_bytes());
    } else {
        let n = c.u8() as usize % 65;
        let raw = c.take(n);
        f[..raw.len()].copy_from_slice(raw);
    }
    f
}

fn one_op(h: &mut Host, pid: Pid, fds: &mut Vec<i32>, c: &mut Cursor) {
    let op = c.u8();
    let (cmd, body): (u64, Vec<u8>) = match op % 12 {
        0 => (
            LIVEUPDATE_IOCTL_CREATE_SESSION,
            CreateSession {
                size: 72,
                fd: c.u8() as i32 - 1,
                name: name_field(c),
            }
            .as_bytes()
            .to_vec(),
        ),
        1 => (
            LIVEUPDATE_IOCTL_RETRIEVE_SESSION,
            CreateSession {
                size: 72,
                fd: -1,
                name: name_field(c),
            }
            .as_bytes()
            .to_vec(),
        ),
        2 | 3 => {
            let fd = pick_fd(fds, c);
            let token = if c.u8() & 1 == 0 {
                c.u8() as u64 % 4
            } else {
                c.u64()
            };
            let cmd = if op % 12 == 2 {
                LIVEUPDATE_SESSION_PRESERVE_FD
            } else {
                LIVEUPDATE_SESSION_RETRIEVE_FD
            };
            (
                cmd,
                PreserveFd {
                    size: 16,
                    fd,
                    token,
                }
                .as_bytes()
                .to_vec(),
            )
        }
        4 => (
            LIVEUPDATE_SESSION_FINISH,
            SessionFinish {
                size: 8,
                reserved: if c.u8() == 0xff { 1 } else { 0 },
            }
            .as_bytes()
            .to_vec(),
        ),
        5 => (
            LIVEUPDATE_SESSION_GET_NAME,
            SessionGetName {
                size: 72,
                reserved: 0,
                name: [0; 64],
            }
            .as_bytes()
            .to_vec(),
        ),
        6 => {
            // Close an fd.
            let fd = pick_fd(fds, c);
            let _ = h.close(pid, fd);
            fds.retain(|&x| x != fd);
            return;
        }
        7 => {
            // A file to preserve: a memfd or a test-handler file.
            let r = if c.u8() & 1 == 0 {
                crate::vmm::libluo::memfd_with(h, pid, b"fuzz")
            } else {
                h.open(pid, "/dev/liveupdate-test", 0)
            };
            if let Ok(m) = r {
                fds.push(m);
            }
            return;
        }
        8 => {
            // Re-open the device (EBUSY while it is open).
            if let Ok(d) = h.open(pid, "/dev/liveupdate", 0) {
                fds.push(d);
            }
            return;
        }
        9 => {
            let _ = h.dup(pid, pick_fd(fds, c)).map(|d| fds.push(d));
            return;
        }
        _ => {
            // Raw command and bytes.
            let cmd = match c.u8() % 4 {
                0 => (LIVEUPDATE_IOCTL_TYPE << 8) | c.u8() as u64,
                1 => c.u64(),
                _ => (LIVEUPDATE_IOCTL_TYPE << 8) | (0x40 + c.u8() as u64 % 8),
            };
            let n = c.u8() as usize;
            (cmd, c.take(n).to_vec())
        }
    };
    let fd = pick_fd(fds, c);
    let mut buf = arg_buf(c, &body);
    let before = buf.len();
    let r = h.ioctl(pid, fd, cmd, &mut buf);
    assert_eq!(buf.len(), before);
    if r.is_ok() {
        // A new fd comes back in CREATE/RETRIEVE_SESSION and RETRIEVE_FD.
        let new_fd = match cmd {
            LIVEUPDATE_IOCTL_CREATE_SESSION
            | LIVEUPDATE_IOCTL_RETRIEVE_SESSION
            | LIVEUPDATE_SESSION_RETRIEVE_FD
                if buf.len() >= 8 =>
            {
                Some(i32::from_ne_bytes(buf[4..8].try_into().unwrap_or_default()))
            }
            _ => None,
        };
        if let Some(nfd) = new_fd {
            let size = u32::from_ne_bytes(buf[..4].try_into().unwrap_or_default());
            if size >= 8 {
                assert!(
                    h.fd_file(pid, nfd).is_ok(),
                    "ioctl returned fd {nfd} that is not open"
                );
                fds.push(nfd);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepted(img: &Image, args: KhoBootArgs) -> Result<(), String> {
        let d = img.to_dump(&args);
        let (inc, _) = crate::kho::boot::discover(&d, args).map_err(|e| e.to_string())?;
        crate::luo::serialize::validate(&d, &inc, &crate::registry::supported_compatibles())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn template_is_accepted_and_checksum_repair_is_exact() {
        let t = handover_template();
        accepted(&t.img, t.args).expect("the template handover");
        let (mut img, mut args) = (t.img.clone(), t.args);
        fix_checksums(&mut img, &mut args);
        assert_eq!(
            args.fdt_crc, t.args.fdt_crc,
            "repair changed an intact tree"
        );
        assert!(img.pages == t.img.pages, "repair changed an intact image");
        // Damage the LUO blob: refused as is, accepted once the checksums are repaired.
        let d = t.img.to_dump(&t.args);
        let (inc, _) = crate::kho::boot::discover(&d, t.args).expect("discover");
        let luo = inc.tree.subtrees[LUO_KHO_ENTRY_NAME];
        img.write_u64(luo.pa + 8, 41);
        assert!(
            accepted(&img, args).is_err(),
            "a modified blob was accepted"
        );
        fix_checksums(&mut img, &mut args);
        accepted(&img, args).expect("repaired handover");
        // The harness's own entry point on the untouched template and a few patches.
        handover(&t, &[]);
        handover(&t, &[1, 0, 3, 0, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8]);
        handover(&t, &[4, 1, 0x10, 0]);
    }

    #[test]
    fn entry_points_take_garbage() {
        let inputs: [&[u8]; 4] = [&[], &[0xff; 300], &[0; 5000], b"HOVRDUMP\x01\0\0\0"];
        for i in inputs {
            fdt(i);
            dump(i);
            tracker(i);
            chain(i);
            blobs(i);
            ucmd(i);
        }
        dump(&handover_template().dump_bytes());
    }

    #[test]
    fn harness_tracker_marks_the_preserved_slots() {
        let mut img = Image::new(SYN_RAM);
        let pfns = [slot_pa(0) / PAGE_SIZE, slot_pa(5) / PAGE_SIZE];
        let root = build_tracker(&mut img, &pfns);
        let d = img.to_dump(&syn_args());
        let (t, _) = IncomingTracker::walk(&d, root, &syn_limits()).expect("walk");
        assert_eq!(t.blocks(), vec![(pfns[0], 0), (pfns[1], 0)]);
    }

    #[test]
    fn ioctl_fuzzer_runs_sequences() {
        let mut f = IoctlFuzzer::new();
        f.run(&[]);
        // RETRIEVE_SESSION "in-0", then RETRIEVE_FD token 1 on it, FINISH, CREATE_SESSION.
        f.run(&[1, 0, 0, 0, 1, 1, 0, 1, 0, 0, 4, 0, 1, 0, 0, 0, 0]);
        for i in 0..200u8 {
            f.run(&[i, i.wrapping_mul(7), 3, i, 0, 1]);
        }
        assert!(f.kexecs() >= 1);
    }

    /// The first data page of the template's integrity entries, and how many there are.
    fn integrity_entries(t: &HandoverTemplate) -> (u64, u64) {
        let d = t.img.to_dump(&t.args);
        let (inc, _) = crate::kho::boot::discover(&d, t.args).expect("discover");
        let st = inc.tree.subtrees[INTEGRITY_NAME];
        let mut b = vec![0u8; std::mem::size_of::<IntegrityHeader>()];
        t.img.read_phys(st.pa, &mut b).expect("header");
        let hdr = IntegrityHeader::read_from_bytes(&b).expect("header");
        let data = t.img.read_u64(hdr.entries.first + 8).expect("chunk");
        (data, hdr.nr_entries)
    }

    /// Review 2.7: one integrity entry may not cover more than one metadata allocation (else
    /// each entry could cost a checksum over all of RAM).
    #[test]
    fn integrity_entry_larger_than_one_allocation_is_refused() {
        let t = handover_template();
        let (page, n) = integrity_entries(&t);
        assert!(n >= 2);
        let (mut img, mut args) = (t.img.clone(), t.args);
        img.write_u64(page, 0);
        img.write_u64(page + 8, 2 * crate::kho::boot::MAX_ENTRY_BYTES);
        fix_checksums(&mut img, &mut args);
        let e = accepted(&img, args).unwrap_err();
        assert!(e.contains("not one metadata allocation"), "{e}");
    }

    /// Review 2.7: entries may not overlap (each page is checked at most once).
    #[test]
    fn overlapping_integrity_entries_are_refused() {
        let t = handover_template();
        let (page, n) = integrity_entries(&t);
        assert!(n >= 2);
        let (mut img, mut args) = (t.img.clone(), t.args);
        let mut e0 = [0u8; 24];
        img.read_phys(page, &mut e0).expect("entry");
        img.write(page + 24, &e0);
        fix_checksums(&mut img, &mut args);
        let e = accepted(&img, args).unwrap_err();
        assert!(e.contains("overlap"), "{e}");
        // The template itself is accepted.
        accepted(&t.img, t.args).expect("template");
    }

    /// Review 2.7: a damaged tracker node is refused by its checksum before the walk copies
    /// the tree (the error names the checksum, not a walk check).
    #[test]
    fn damaged_tracker_leaf_is_refused_by_checksum_first() {
        let t = handover_template();
        let d = t.img.to_dump(&t.args);
        let (inc, _) = crate::kho::boot::discover(&d, t.args).expect("discover");
        // The walk visits nodes depth first: the last one is a leaf.
        let leaf = *inc.tracker.node_pages().last().expect("a leaf");
        let (mut img, args) = (t.img.clone(), t.args);
        // A set bit far outside RAM in the leaf's last word: the walk would refuse it as a bad
        // block; the checksum comes first.
        let w = leaf + PAGE_SIZE - 8;
        img.write_u64(w, img.read_u64(w).expect("leaf") | 1 << 63);
        let e = accepted(&img, args).unwrap_err();
        assert!(e.contains("tracker checksum"), "{e}");
    }

    /// Regression (found by the `handover` target): with a large RAM, the integrity table's
    /// `total_pages` made `read_chain` reserve `total_pages * 4 KiB` up front and abort the
    /// process (boot and `handover inspect`). With `HANDOVER_REPRO_DUMP=path` this also writes
    /// that dump.
    #[test]
    fn integrity_total_pages_with_large_ram_is_refused() {
        let t = handover_template();
        let d = t.img.to_dump(&t.args);
        let (inc, _) = crate::kho::boot::discover(&d, t.args).expect("discover");
        let st = inc.tree.subtrees[INTEGRITY_NAME];
        let page = st.pa / PAGE_SIZE * PAGE_SIZE;
        let idx = t.img.pages.keys().position(|&p| p == page).expect("page") as u8;
        let word = ((st.pa % PAGE_SIZE + 40) / 8) as u16;
        // One raw-word patch of the template (checksums repaired): total_pages = 2^24, order 0;
        // then 512 GiB of RAM.
        let mut patch = vec![0u8, 2, idx];
        patch.extend_from_slice(&word.to_le_bytes());
        patch.extend_from_slice(&(1u64 << 24).to_le_bytes());
        let (mut img, mut args) = patch_template(&t, &patch);
        img.ram_size = 1 << 39;
        fix_checksums(&mut img, &mut args);
        if let Ok(p) = std::env::var("HANDOVER_REPRO_DUMP") {
            std::fs::write(&p, img.dump_bytes(&args)).expect("write the dump");
            println!("dump: {p}");
        }
        let d = img.to_dump(&args);
        assert!(crate::kho::boot::discover(&d, args).is_err());
        let _ = crate::kho::inspect::inspect(&d, args, &crate::cli::inspect::decoders());
    }
}
