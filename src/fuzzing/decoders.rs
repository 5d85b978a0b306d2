//! Decoders on synthetic input: the handover tree, dumps (with the boot path and `inspect` on
//! them), the tracker walk, block and array chains, and handler and KHO client blobs.

use std::collections::{BTreeMap, HashSet};

use zerocopy::FromBytes;

use crate::abi::kho::{radix_key, IntegrityHeader, KhoArraySer};
use crate::abi::luo::*;
use crate::kho::dump::Dump;
use crate::kho::fdt::HandoverTree;
use crate::kho::tracker::{IncomingTracker, WalkLimits};
use crate::kho::{Incoming, KhoBootArgs};
use crate::mm::{PhysRead, PAGE_SIZE};

use super::image::{
    aimed_u64, build_tracker, fill_slots, slot_pa, syn_args, syn_limits, Cursor, Image, PAGE,
    SLOTS, SYN_RAM, SYN_SCRATCH,
};

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

pub(super) fn decode_handover(d: &Dump, args: KhoBootArgs) {
    if let Ok(r) = crate::kho::inspect::inspect(d, args, &crate::kho::inspect::decoders()) {
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
        crate::abi::kvm::GUEST_MEMFD_LUO_V3_FH_COMPATIBLE => gmem_v3(mem, pa),
        _ => {}
    }
}

/// A v3 blob: its header, both lists, and what `decode` makes of them (every run inside the
/// file and aligned to its order, every private range inside the file).
fn gmem_v3(mem: &dyn PhysRead, pa: u64) {
    use crate::kvm::guest_memfd_luo_v3::{decode, read_header, MAX_RUN_ORDER};
    let Ok(h) = read_header(mem, pa) else {
        return;
    };
    let s = h.ser;
    assert!(s.size != 0 && s.page_order <= u64::from(MAX_RUN_ORDER));
    let (Ok(runs), Ok(private)) = (
        crate::kho::array::read_chain(mem, &s.runs),
        crate::kho::array::read_chain(mem, &s.private),
    ) else {
        return;
    };
    if let Ok((r, attrs)) = decode(&h, &runs, &private) {
        let pages = s.size / PAGE_SIZE;
        for (idx, pfn, n, order) in r {
            assert!(idx + n <= pages && n > 0);
            assert!(order <= MAX_RUN_ORDER && idx % (1 << order) == 0 && pfn % (1 << order) == 0);
        }
        assert!(attrs.ranges().all(|(a, b)| a < b && b <= pages));
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
// blobs

/// Handler and KHO client blobs: `kexec-metadata`, the guest_memfd header (v1 and v2), the
/// memfd ser and its folio list, the `kho-test` blob, the VM and vCPU saved states and the LUO
/// records.
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
        w @ (1 | 2) if rest.first().is_some_and(|b| b & 2 == 2) => {
            // v3 half of the time: its header, lists and decode.
            let mut img = Image::new(SYN_RAM);
            let (blob, pages) = rest.split_at(rest.len().min(96));
            let mut cc = Cursor::new(pages);
            fill_slots(&mut img, &mut cc);
            img.page_mut(slot_pa(0));
            img.write(slot_pa(0), blob);
            let _ = w;
            let d = img.to_dump(&syn_args());
            gmem_v3(&d, slot_pa(0));
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
            // The saved-state blobs of the VM and vCPU handlers: whatever decodes encodes
            // again to bytes that decode to the same encoding.
            if let Ok(st) = crate::abi::vm_state::VmState::from_bytes(rest) {
                let b = st.to_bytes();
                let again = crate::abi::vm_state::VmState::from_bytes(&b).expect("VM state");
                assert_eq!(again.to_bytes(), b, "VM state round trip");
            }
            if let Ok(st) = crate::abi::vcpu_state::VcpuState::from_bytes(rest) {
                let b = st.to_bytes();
                let again = crate::abi::vcpu_state::VcpuState::from_bytes(&b).expect("vCPU state");
                assert_eq!(again.to_bytes(), b, "vCPU state round trip");
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_points_take_garbage() {
        let inputs: [&[u8]; 4] = [&[], &[0xff; 300], &[0; 5000], b"HOVRDUMP\x01\0\0\0"];
        for i in inputs {
            fdt(i);
            dump(i);
            tracker(i);
            chain(i);
            blobs(i);
        }
    }
}
