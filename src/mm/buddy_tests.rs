//! Tests of the buddy allocator (`mm::buddy`).

use super::*;

fn alloc_with_scratch() -> FrameAllocator {
    let mut a = FrameAllocator::new(8192, 0..1024).unwrap();
    a.online_normal(&[(1024, 8192)]);
    a
}

#[test]
fn early_boot_uses_scratch_only() {
    let mut a = FrameAllocator::new(8192, 1024..2048).unwrap();
    let f = a.alloc(3).unwrap();
    assert_eq!(a.zone_of(f.pfn), Zone::Scratch);
    assert_eq!(a.stats().free, 1024 - 8);
}

#[test]
fn alloc_free_coalesces() {
    let mut a = alloc_with_scratch();
    let before = a.stats();
    let fs: Vec<_> = (0..100).map(|i| a.alloc(i % 4).unwrap()).collect();
    assert!(fs.iter().all(|f| a.zone_of(f.pfn) == Zone::Normal));
    for f in fs {
        a.free(f).unwrap();
    }
    assert_eq!(a.stats(), before);
    // Everything coalesced back into MAX_ORDER blocks.
    assert_eq!(a.normal.big_blocks(), 7);
}

#[test]
fn online_keeps_extents_and_carves_lazily() {
    // 4 TiB of frames: onlining costs per free range, not per 4 MiB block.
    let n = 1u64 << 30;
    let mut a = FrameAllocator::new(n, 0..1024).unwrap();
    a.online_normal(&[(1024, 5000), (5003, n)]);
    assert_eq!(a.stats().used, 3);
    assert!(a.normal.big.len() <= 2);
    assert!(!a.is_free(5001) && a.is_free(5003) && a.is_free(n - 1));
    assert!(a.any_free(n - 1, 1) && !a.any_free(5000, 3));
    let f = a.alloc(MAX_ORDER).unwrap();
    assert_eq!(f.pfn, 1024, "the lowest free block");
    assert!(!a.is_free(1024) && !a.is_free(2047) && a.is_free(2048));
    a.take_range(1 << 20, 3 << 20).unwrap();
    assert!(!a.is_free((1 << 20) + 5) && a.is_free((1 << 20) - 1) && a.is_free(4 << 20));
    assert_eq!(
        a.highest_free_range(Zone::Normal, 18, n),
        Some(n - (1 << 18))
    );
    a.free(f).unwrap();
    for (p, o) in super::super::split_blocks(1 << 20, 3 << 20, MAX_ORDER) {
        a.free(Folio { pfn: p, order: o }).unwrap();
    }
    assert_eq!(a.stats().used, 3);
    assert!(
        a.normal.big.len() <= 2,
        "merged again: {:?}",
        a.normal.big.len()
    );
}

#[test]
fn reserved_frames_stay_used() {
    let mut a = FrameAllocator::new(8192, 0..1024).unwrap();
    a.online_normal(&[(1024, 2000), (2010, 5000), (5001, 8192)]);
    assert_eq!(a.stats().used, 11);
    assert!(!a.is_free(2005) && a.is_free(2010) && !a.is_free(5000));
    a.free(Folio {
        pfn: 5000,
        order: 0,
    })
    .unwrap();
    assert_eq!(a.stats().used, 10);
}

#[test]
fn misuse_is_an_error() {
    let mut a = alloc_with_scratch();
    let f = a.alloc(2).unwrap();
    a.free(f).unwrap();
    assert!(matches!(a.free(f), Err(MmError::DoubleFree { .. })));
    assert!(a.free(Folio { pfn: 3, order: 2 }).is_err());
    assert!(a
        .free(Folio {
            pfn: 8192,
            order: 0
        })
        .is_err());
    assert!(a.alloc(MAX_ORDER + 1).is_err());
    assert!(FrameAllocator::new(8192, 100..1024).is_err());
}

fn free_map(a: &FrameAllocator) -> Vec<bool> {
    (0..a.nr_frames()).map(|p| a.is_free(p)).collect()
}

#[test]
fn take_range_exact_block() {
    let mut a = alloc_with_scratch();
    let before = a.stats();
    a.take_range(2048, 1024).unwrap();
    assert_eq!(a.stats().free, before.free - 1024);
    assert!(!a.is_free(2048) && !a.is_free(3071));
    assert!(a.is_free(2047) && a.is_free(3072));
    // Given back as a block, it is as before.
    a.free(Folio {
        pfn: 2048,
        order: MAX_ORDER,
    })
    .unwrap();
    assert_eq!(a.stats(), before);
}

#[test]
fn take_range_splits_blocks_and_gives_back() {
    let mut a = alloc_with_scratch();
    let before = a.stats();
    // Inside one 4 MiB block, and across two of them.
    a.take_range(1030, 5).unwrap();
    a.take_range(3000, 200).unwrap();
    assert_eq!(a.stats().free, before.free - 205);
    let map = free_map(&a);
    for p in 1024..8192u64 {
        let taken = (1030..1035).contains(&p) || (3000..3200).contains(&p);
        assert_eq!(map[p as usize], !taken, "frame {p}");
    }
    // Everything else can still be allocated, and none of it from the taken ranges.
    let mut got = 0;
    while let Ok(f) = a.alloc(0) {
        assert!(!(1030..1035).contains(&f.pfn) && !(3000..3200).contains(&f.pfn));
        got += 1;
    }
    assert_eq!(
        got,
        before.free - 1024 - 205,
        "scratch is not served once online"
    );
    let mut b = FrameAllocator::new(8192, 0..1024).unwrap();
    b.online_normal(&[(1024, 8192)]);
    b.take_range(1030, 5).unwrap();
    b.take_range(3000, 200).unwrap();
    for (p, o) in super::super::split_blocks(1030, 5, MAX_ORDER)
        .chain(super::super::split_blocks(3000, 200, MAX_ORDER))
    {
        b.free(Folio { pfn: p, order: o }).unwrap();
    }
    assert_eq!(b.stats(), before);
    assert_eq!(b.normal.big_blocks(), 7, "coalesced again");
}

#[test]
fn take_range_refuses_and_changes_nothing() {
    let mut a = alloc_with_scratch();
    let f = a.alloc(0).unwrap();
    let st = a.stats();
    let map = free_map(&a);
    assert!(matches!(
        a.take_range(f.pfn, 16),
        Err(MmError::NotFree { busy, .. }) if busy == f.pfn
    ));
    assert_eq!(a.take_range(f.pfn, 1).unwrap_err().errno(), libc::EBUSY);
    a.take_range(5000, 10).unwrap();
    assert!(matches!(
        a.take_range(5009, 2),
        Err(MmError::NotFree { busy: 5009, .. })
    ));
    a.free(Folio {
        pfn: 5000,
        order: 1,
    })
    .unwrap();
    for bad in [(2000, 0), (8000, 193), (u64::MAX, 2), (1000, 48)] {
        assert!(
            matches!(a.take_range(bad.0, bad.1), Err(MmError::BadRange { .. })),
            "{bad:?}"
        );
    }
    // The refusals left the free lists as they were (but for 5002..5010, still taken).
    assert_eq!(a.stats().free, st.free - 8);
    let now = free_map(&a);
    for p in 0..8192usize {
        assert_eq!(now[p], map[p] && !(5002..5010).contains(&p), "frame {p}");
    }
    // Scratch ranges can be taken too; the normal zone only once online.
    a.take_range(0, 3).unwrap();
    let mut off = FrameAllocator::new(8192, 0..1024).unwrap();
    assert!(matches!(
        off.take_range(2048, 1),
        Err(MmError::BadRange { .. })
    ));
    assert_eq!(off.highest_free_range(Zone::Normal, 0, 8192), None);
}

#[test]
fn take_range_1g_aligned() {
    const G: u64 = 1 << 18; // 1 GiB in frames
    let mut a = FrameAllocator::new(2 * G, 0..4096).unwrap();
    a.online_normal(&[(4096, 2 * G)]);
    let before = a.stats();
    // The first 1 GiB holds scratch: only the second one is a whole free 1 GiB range.
    assert_eq!(a.highest_free_range(Zone::Normal, 18, 2 * G), Some(G));
    assert_eq!(a.highest_free_range(Zone::Normal, 18, 2 * G - 1), None);
    a.take_range(G, G).unwrap();
    assert_eq!(a.stats().free, before.free - G);
    assert!(!a.is_free(G) && !a.is_free(2 * G - 1) && a.is_free(G - 1));
    assert_eq!(a.highest_free_range(Zone::Normal, 18, 2 * G), None);
    // 2 MiB ranges come from the top of what is left.
    assert_eq!(a.highest_free_range(Zone::Normal, 9, 2 * G), Some(G - 512));
    for (p, o) in super::super::split_blocks(G, G, MAX_ORDER) {
        a.free(Folio { pfn: p, order: o }).unwrap();
    }
    assert_eq!(a.stats(), before);

    // One busy frame anywhere in the top 1 GiB rules it out.
    let mut b = FrameAllocator::new(3 * G, 0..4096).unwrap();
    b.online_normal(&[(4096, 2 * G + 77), (2 * G + 78, 3 * G)]);
    assert_eq!(b.highest_free_range(Zone::Normal, 18, 3 * G), Some(G));
    assert!(matches!(
        b.take_range(2 * G, G),
        Err(MmError::NotFree { busy, .. }) if busy == 2 * G + 77
    ));
    assert_eq!(
        b.highest_free_range(Zone::Normal, 9, 3 * G),
        Some(3 * G - 512)
    );
    assert_eq!(
        b.highest_free_range(Zone::Normal, 9, 2 * G + 512),
        Some(2 * G - 512),
        "the 2 MiB range with the busy frame is skipped"
    );
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
    /// After any allocations, a taken range is exactly taken (or, if a frame was busy,
    /// nothing changes), and the highest free aligned range is free and the highest.
    #[test]
    fn take_range_is_exact(
        allocs in proptest::collection::vec(0u32..=4, 0..40),
        start in 1024u64..8192,
        len in 1u64..2048,
        order in 0u32..=12,
    ) {
        let mut a = alloc_with_scratch();
        for o in allocs {
            let _ = a.alloc(o);
        }
        let before = free_map(&a);
        let st = a.stats();
        let end = (start + len).min(8192);
        let all_free = (start..end).all(|p| before[p as usize]);
        let r = a.take_range(start, end - start);
        proptest::prop_assert_eq!(r.is_ok(), all_free);
        let after = free_map(&a);
        for p in 0..8192u64 {
            let taken = all_free && (start..end).contains(&p);
            proptest::prop_assert_eq!(after[p as usize], before[p as usize] && !taken);
        }
        let taken = if all_free { end - start } else { 0 };
        proptest::prop_assert_eq!(a.stats().free, st.free - taken);
        proptest::prop_assert_eq!(
            a.any_free(start, end - start),
            (start..end).any(|p| after[p as usize])
        );
        let n = 1u64 << order;
        let best = (1024 / n.min(1024)..8192 / n)
            .rev()
            .map(|i| i * n)
            .find(|&c| c >= 1024 && (c..c + n).all(|p| after[p as usize]));
        proptest::prop_assert_eq!(a.highest_free_range(Zone::Normal, order, 8192), best);
    }
}
