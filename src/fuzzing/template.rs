//! A real handover as a template: made once by a booted host, patched by the input, with every
//! checksum repaired (integrity entries, blob CRCs, tracker CRC, tree CRC) unless the input says
//! not to.

use std::collections::HashSet;

use zerocopy::{FromBytes, IntoBytes};

use crate::abi::kho::{
    IntegrityHeader, INTEGRITY_NAME, MAX_FDT_SIZE, PROP_BLOB_CRC, PROP_TRACKER_CRC,
};
use crate::kho::tracker::{IncomingTracker, WalkLimits};
use crate::kho::KhoBootArgs;
use crate::mm::{PhysRead, PAGE_SIZE};

use super::decoders::decode_handover;
use super::image::{Cursor, Image, PAGE};

/// A real handover, made once per process: a 64 MiB host with a `kho-test` client and two LUO
/// sessions (memfds and a test-handler file) finalizes (the reboot path up to `execve`) and dumps what it would hand over.
pub fn handover_template() -> HandoverTemplate {
    // Unique per call: tests build templates on several threads at once.
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("handover-fuzz-{}-{n}.dump", std::process::id()));
    let mut h = crate::fuzzing::small_host(64 << 20, "template");
    let (kho, mm) = h.kho_mm();
    let t = crate::kho::test::KhoTest::create(mm, 64 << 10, 7).expect("kho-test");
    t.preserve(kho, mm).expect("kho-test preserve");
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::luo::LUO_KHO_ENTRY_NAME;

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
        let _ = crate::kho::inspect::inspect(&d, args, &crate::kho::inspect::decoders());
    }

    #[test]
    fn template_dump_decodes() {
        super::super::decoders::dump(&handover_template().dump_bytes());
    }
}
