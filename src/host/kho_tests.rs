//! Unit tests of KHO on a booted host (they need the composition root to boot one).

use crate::host::Host;
use crate::kexec::BootParams;
use crate::kho::*;
use crate::mm::{Folio, PhysRead, PAGE_SIZE};

fn host() -> Host {
    // LUO off: these tests account for KHO's own memory only.
    Host::boot(BootParams {
        ram_size: 256 << 20,
        liveupdate: false,
        ..Default::default()
    })
    .unwrap()
}

fn kexec(h: Host) -> Host {
    h.kexec_in_process().unwrap()
}

#[test]
fn preserve_misuse_is_an_error() {
    let mut h = host();
    let s = h.kho.scratch();
    let in_scratch = Folio {
        pfn: s.start,
        order: 0,
    };
    assert!(matches!(
        h.kho.preserve_folio(&mut h.mm, in_scratch),
        Err(KhoError::Scratch { .. })
    ));
    assert_eq!(
        h.kho
            .preserve_folio(&mut h.mm, in_scratch)
            .unwrap_err()
            .errno(),
        libc::EINVAL
    );
    let f = h.mm.alloc_zeroed(2).unwrap();
    h.kho.preserve_folio(&mut h.mm, f).unwrap();
    assert!(matches!(
        h.kho.preserve_folio(&mut h.mm, f),
        Err(KhoError::AlreadyPreserved { .. })
    ));
    let wrong = Folio {
        pfn: f.pfn,
        order: 1,
    };
    assert!(matches!(
        h.kho.unpreserve_folio(&mut h.mm, wrong),
        Err(KhoError::NotPreserved { .. })
    ));
    h.kho.unpreserve_folio(&mut h.mm, f).unwrap();
    assert!(h.kho.unpreserve_folio(&mut h.mm, f).is_err());
    let mis = Folio {
        pfn: f.pfn + 1,
        order: 1,
    };
    assert!(h.kho.preserve_folio(&mut h.mm, mis).is_err());
    assert_eq!(h.status().preserved, 0);
}

#[test]
fn restore_misuse_is_an_error() {
    let mut h = host();
    let a = h.mm.alloc_zeroed(3).unwrap();
    let b = h.mm.alloc_zeroed(0).unwrap();
    h.mm.ram.write_u64(a.pa(), 0xfeed).unwrap();
    h.kho.preserve_folio(&mut h.mm, a).unwrap();
    let pages = h.mm.alloc_zeroed(4).unwrap();
    h.kho.preserve_pages(&mut h.mm, pages.pfn + 1, 13).unwrap();
    let mut h = kexec(h);
    // Not preserved, misaligned (a tail page), then a double restore.
    assert!(matches!(
        h.kho.restore_folio(b.pa()),
        Err(KhoError::NotRestorable { .. })
    ));
    assert!(h.kho.restore_folio(a.pa() + PAGE_SIZE).is_err());
    assert!(h.kho.restore_folio(a.pa() + 1).is_err());
    let r = h.kho.restore_folio(a.pa()).unwrap();
    assert_eq!(r, a);
    assert_eq!(h.mm.ram.read_u64(a.pa()).unwrap(), 0xfeed);
    assert!(h.kho.restore_folio(a.pa()).is_err());
    // Pages come back only as they were preserved.
    assert!(h
        .kho
        .restore_pages((pages.pfn + 1) * PAGE_SIZE, 12)
        .is_err());
    h.kho
        .restore_pages((pages.pfn + 1) * PAGE_SIZE, 13)
        .unwrap();
    assert!(h
        .kho
        .restore_pages((pages.pfn + 1) * PAGE_SIZE, 13)
        .is_err());
    // Frames never preserved were freed (and zeroed) at boot (the new tracker root may
    // have been allocated there since).
    assert!(h.mm.frames().is_free(b.pfn) || h.kho.tracker().root() == b.pa());
    assert_eq!(h.status().incoming_outstanding, 0);
}

#[test]
fn large_array_round_trip() {
    let mut h = host();
    // A million 16-byte entries: 16 MiB, a chain of 8 chunks.
    let data: Vec<u8> = (0..1_000_000u64)
        .flat_map(|i| [i.to_ne_bytes(), (!i).to_ne_bytes()].concat())
        .collect();
    let arr = h.kho.preserve_array(&mut h.mm, &data).unwrap();
    assert_eq!(arr.ser.total_pages as usize, data.len().div_ceil(4096));
    let ser = arr.ser;
    let blob = h.kho.alloc_preserve(&mut h.mm, 16).unwrap();
    h.mm.ram
        .write_phys(blob.pa(), zerocopy::IntoBytes::as_bytes(&ser))
        .unwrap();
    h.kho.add_subtree("array-test", blob.pa(), 16).unwrap();
    let used_before = h.mm.stats().used;
    let mut h = kexec(h);
    let st = h.kho.retrieve_subtree("array-test").unwrap();
    let mut b = [0u8; 16];
    h.mm.ram.read_phys(st.pa, &mut b).unwrap();
    let ser: crate::abi::kho::KhoArraySer = zerocopy::FromBytes::read_from_bytes(&b).unwrap();
    let back = h.kho.restore_array(&mut h.mm, &ser).unwrap();
    assert_eq!(&back[..data.len()], &data[..]);
    assert!(
        h.kho.restore_array(&mut h.mm, &ser).is_err(),
        "second restore"
    );
    h.kho.restore_free(&mut h.mm, st.pa).unwrap();
    assert!(h.mm.stats().used < used_before);
    assert_eq!(h.mm.stats().used, 1, "only the new tracker root");
}

#[test]
fn block_chain_round_trip_and_loop_refused() {
    let mut h = host();
    let entries: Vec<Vec<u8>> = (0..1000u32)
        .map(|i| {
            let mut e = vec![0u8; 80];
            e[..4].copy_from_slice(&i.to_ne_bytes());
            e
        })
        .collect();
    let c = h.kho.preserve_blocks(&mut h.mm, 80, &entries).unwrap();
    assert_eq!(
        c.bytes(),
        20 * PAGE_SIZE,
        "51 entries of 80 bytes per block"
    );
    let c2 = h
        .kho
        .preserve_blocks(&mut h.mm, 80, &entries[..100])
        .unwrap();
    // Make the second chain loop back on itself.
    let second = h.mm.ram.read_u64(c2.head).unwrap();
    h.mm.ram.write_u64(second, c2.head).unwrap();
    let heads = [c.head, c2.head];
    let mut h = kexec(h);
    assert_eq!(
        h.kho.restore_blocks(&mut h.mm, heads[0], 80).unwrap(),
        entries
    );
    let e = h.kho.restore_blocks(&mut h.mm, heads[1], 80).unwrap_err();
    assert!(e.to_string().contains("loops"), "{e}");
    assert!(
        h.kho.restore_blocks(&mut h.mm, heads[0], 80).is_err(),
        "blocks restore once"
    );
}

#[test]
fn split_is_maximal_and_aligned() {
    let v: Vec<_> = split_range(3, 13).collect();
    assert_eq!(v, vec![(3, 0), (4, 2), (8, 3)]);
    let total: u64 = split_range(1000, 123_456).map(|(_, o)| 1u64 << o).sum();
    assert_eq!(total, 123_456);
    assert!(split_range(1000, 123_456).all(|(p, o)| p % (1 << o) == 0));
}

#[test]
fn frees_wait_for_commit_after_mark_committed() {
    let mut h = host();
    for name in ["hold-test", "hold-test-2"] {
        let blob = h.kho.alloc_preserve(&mut h.mm, 4096).unwrap();
        h.kho.add_subtree(name, blob.pa(), 4096).unwrap();
    }
    let mut h = kexec(h);
    let st = h.kho.retrieve_subtree("hold-test").unwrap();
    let st2 = h.kho.retrieve_subtree("hold-test-2").unwrap();
    // Accepted for good, but what is read is only queued: no punch inside a restore.
    h.kho.mark_committed();
    assert!(h.kho.committed());
    let used = h.mm.stats().used;
    h.kho.restore_free(&mut h.mm, st.pa).unwrap();
    assert_eq!(h.mm.stats().used, used, "freed before the commit");
    h.kho.commit(&mut h.mm).unwrap();
    assert_eq!(h.mm.stats().used, used - 1, "not freed at the commit");
    // After the commit, frees happen at once again.
    h.kho.restore_free(&mut h.mm, st2.pa).unwrap();
    assert_eq!(h.mm.stats().used, used - 2);
}
