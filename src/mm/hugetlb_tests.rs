//! Tests of the huge-page pool (`mm::hugetlb`).
use super::*;
use crate::mm::{FrameAllocator, PhysRead, Ram, Ranges};

const G: u64 = 1 << ORDER_1G;
const M2: u64 = 1 << ORDER_2M;

/// Memory of `frames` frames, scratch the first 4 MiB, the normal zone online with
/// `reserved` (PFN ranges) held back as a previous image's preserved frames.
fn mm_with(frames: u64, reserved: &[(u64, u64)]) -> Mm {
    let ram = Ram::create(frames * PAGE_SIZE).unwrap();
    let fa = FrameAllocator::new(frames, 0..1024).unwrap();
    let mut mm = Mm::new(ram, fa);
    let mut r = Ranges::new();
    for &(a, b) in reserved {
        r.push(a, b);
    }
    mm.online_normal(&r.finish().unwrap()).unwrap();
    mm
}

fn check(pool: &HugePool, mm: &Mm, base_used: u64) {
    let st = pool.stats();
    for s in [st.huge_2m, st.huge_1g] {
        assert_eq!(s.total, s.free + s.in_use, "{st:?}");
    }
    assert_eq!(mm.stats().used, base_used + st.frames(), "{st:?}");
}

#[test]
fn request_parse_and_display() {
    let r = HugePageRequest::parse("2M:4,1G:1").unwrap();
    assert_eq!(
        r,
        HugePageRequest {
            count_2m: 4,
            count_1g: 1
        }
    );
    assert_eq!(r.to_string(), "2M:4,1G:1");
    assert_eq!(
        HugePageRequest::parse(" 1g:2 , 2m:0").unwrap().to_string(),
        "1G:2"
    );
    assert_eq!(HugePageRequest::parse("2M:7").unwrap().count(ORDER_2M), 7);
    assert_eq!(HugePageRequest::parse("1G:3").unwrap().count(ORDER_1G), 3);
    let empty = HugePageRequest::default();
    assert!(empty.is_empty());
    assert_eq!(HugePageRequest::parse(&empty.to_string()).unwrap(), empty);
    for (bad, says) in [
        ("", "empty"),
        ("4M:1", "not supported"),
        ("2048K:1", "not supported"),
        ("2M", "expected SIZE:COUNT"),
        ("2M:x", "not a count"),
        ("2M:-1", "not a count"),
        ("2M:1,2M:2", "twice"),
        ("2M:1,", "expected"),
        ("1G:18446744073709551615", "overflows"),
    ] {
        let e = HugePageRequest::parse(bad).unwrap_err();
        assert!(e.contains(says), "{bad:?}: {e}");
    }
}

#[test]
fn request_must_fit_ram() {
    // 4 GiB, 64 MiB of scratch at the bottom: three whole 1 GiB ranges.
    let (frames, scratch) = (4 * G, 0..16384);
    let r = |m, g| HugePageRequest {
        count_2m: m,
        count_1g: g,
    };
    assert!(r(0, 3).check_fits(frames, scratch.clone()).is_ok());
    let e = r(0, 4).check_fits(frames, scratch.clone()).unwrap_err();
    assert!(e.contains("room for 3 1 GiB"), "{e}");
    // 2048 2 MiB ranges, 32 of them in scratch, 2 left for the host.
    assert!(r(2014, 0).check_fits(frames, scratch.clone()).is_ok());
    let e = r(2015, 0).check_fits(frames, scratch.clone()).unwrap_err();
    assert!(e.contains("room for 2014 2 MiB"), "{e}");
    assert!(r(478, 3).check_fits(frames, scratch.clone()).is_ok());
    let e = r(479, 3).check_fits(frames, scratch.clone()).unwrap_err();
    assert!(
        e.contains("beside the 1 GiB pages: it has room for 478 2 MiB"),
        "{e}"
    );
    // Exactly 1 GiB of normal zone: no room for a 1 GiB page beside the host's 4 MiB.
    let e = r(0, 1).check_fits(G + 1024, 0..1024).unwrap_err();
    assert!(e.contains("room for 0 1 GiB"), "{e}");
    assert!(r(0, 1).check_fits(2 * G, 0..1024).is_ok());
    assert!(r(0, 0).check_fits(0, 0..0).is_ok());
    assert!(r(1, 1).check_fits(100, 50..200).is_err());
    assert!(r(1, 1)
        .check_fits(
            u64::MAX,
            std::ops::Range {
                start: 200,
                end: 50
            }
        )
        .is_ok());
}

#[test]
fn reserve_alloc_free_exact() {
    let mut mm = mm_with(2 * G, &[]);
    let base = mm.stats().used;
    let mut pool = HugePool::new();
    pool.reserve(&mut mm, ORDER_1G, 1).unwrap();
    pool.reserve(&mut mm, ORDER_2M, 4).unwrap();
    check(&pool, &mm, base);
    let st = pool.stats();
    assert_eq!((st.huge_1g.total, st.huge_1g.free), (1, 1));
    assert_eq!((st.huge_2m.requested, st.huge_2m.free), (4, 4));
    // The top 1 GiB, then the top 2 MiB ranges under it.
    let g = pool.alloc(ORDER_1G).unwrap();
    assert_eq!(g, Folio { pfn: G, order: 18 });
    assert_eq!(pool.alloc(ORDER_1G), None);
    let a = pool.alloc(ORDER_2M).unwrap();
    assert_eq!(a.pfn, G - 4 * M2, "lowest of the four first");
    assert!(pool.owns(a) && pool.owns(g));
    check(&pool, &mm, base);
    // Freed to the pool, zeroed, never to the buddy.
    mm.ram.write_u64(a.pa() + 8, 0xabcd).unwrap();
    pool.free(&mut mm, a).unwrap();
    assert_eq!(mm.ram.read_u64(a.pa() + 8).unwrap(), 0);
    assert!(!mm.frames().is_free(a.pfn));
    assert!(matches!(
        pool.free(&mut mm, a),
        Err(MmError::NotInPool {
            why: "already free",
            ..
        })
    ));
    let other = mm.alloc_zeroed(9).unwrap();
    assert!(pool.free(&mut mm, other).is_err());
    assert!(pool.free(&mut mm, Folio { pfn: G, order: 9 }).is_err());
    assert!(matches!(
        pool.reserve(&mut mm, 10, 1),
        Err(MmError::BadOrder(10))
    ));
    assert_eq!(pool.alloc(12), None);
    mm.free(other).unwrap();
    pool.free(&mut mm, g).unwrap();
    check(&pool, &mm, base);
    assert_eq!(pool.stats().huge_1g.free, 1);
    // Everything goes back at the end.
    assert_eq!(pool.release_all(&mut mm).unwrap(), 5);
    assert_eq!(mm.stats().used, base);
    assert_eq!(pool.stats(), HugePoolStats::default());
}

#[test]
fn short_reservation_keeps_what_fits() {
    // 1 GiB of RAM with 4 MiB of scratch: no whole 1 GiB range, 510 2 MiB ranges of which
    // the pool leaves 4 MiB to the host.
    let mut mm = mm_with(G, &[]);
    let base = mm.stats().used;
    let mut pool = HugePool::new();
    let e = pool.reserve(&mut mm, ORDER_1G, 1).unwrap_err();
    assert!(matches!(
        e,
        MmError::HugePagesShort {
            order: ORDER_1G,
            wanted: 1,
            got: 0
        }
    ));
    assert_eq!(e.errno(), libc::ENOMEM);
    assert!(e.to_string().contains("0 of 1 1G"), "{e}");
    let e = pool.reserve(&mut mm, ORDER_2M, 600).unwrap_err();
    assert!(matches!(e, MmError::HugePagesShort { got: 508, .. }), "{e}");
    let st = pool.stats();
    assert_eq!((st.huge_2m.requested, st.huge_2m.total), (600, 508));
    assert_eq!(mm.stats().free - mm.stats().scratch_free, MIN_FREE_FRAMES);
    assert_eq!(st.huge_1g.requested, 1);
    check(&pool, &mm, base);
    assert_eq!(pool.refill(&mut mm), 0, "still no room");
}

/// The rule after a kexec: the full request at boot, adopted folios count in use and trim
/// free ones above the target; freed surplus goes to the buddy.
#[test]
fn adopt_after_kexec_keeps_the_target() {
    // The previous image had 4 × 2 MiB in the pool, 2 of them in use by a preserved file,
    // at the top of 64 MiB of RAM.
    let frames = 16384;
    let kept = [frames - 2 * M2, frames - M2];
    let mut mm = mm_with(frames, &[(kept[0], kept[0] + M2), (kept[1], frames)]);
    let base = mm.stats().used;
    let mut pool = HugePool::new();
    pool.reserve(&mut mm, ORDER_2M, 4).unwrap();
    check(&pool, &mm, base);
    assert!(
        pool.stats().huge_2m.free == 4
            && !pool.owns(Folio {
                pfn: kept[0],
                order: 9
            }),
        "preserved frames are not free: the pool did not take them"
    );
    let top_free = frames - 3 * M2;
    // The file is retrieved: its two folios are adopted.
    let f0 = Folio {
        pfn: kept[0],
        order: ORDER_2M,
    };
    let f1 = Folio {
        pfn: kept[1],
        order: ORDER_2M,
    };
    pool.adopt(&mut mm, f0).unwrap();
    let st = pool.stats().huge_2m;
    assert_eq!(
        (st.total, st.free, st.in_use),
        (4, 3, 1),
        "one spare went back"
    );
    assert!(
        mm.frames().is_free(top_free),
        "the highest free one went back"
    );
    pool.adopt(&mut mm, f1).unwrap();
    let st = pool.stats().huge_2m;
    assert_eq!((st.requested, st.total, st.free, st.in_use), (4, 4, 2, 2));
    // The frame allocator's used count is the pool plus what other owners hold (none).
    check(&pool, &mm, base - 2 * M2);
    // Adopting twice, an overlap, a free range, misaligned, scratch: refused, no change.
    for bad in [
        f0,
        Folio {
            pfn: kept[0] + 8,
            order: 0,
        },
        Folio {
            pfn: top_free,
            order: 9,
        },
        Folio {
            pfn: kept[0] + 1,
            order: 9,
        },
        Folio { pfn: 0, order: 9 },
        Folio {
            pfn: frames,
            order: 9,
        },
        Folio { pfn: 0, order: 18 },
    ] {
        assert!(pool.adopt(&mut mm, bad).is_err(), "{bad:?}");
    }
    assert_eq!(pool.stats().huge_2m.total, 4);
    // Free them: the pool is at its target, so they stay in it.
    pool.free(&mut mm, f0).unwrap();
    pool.free(&mut mm, f1).unwrap();
    let st = pool.stats().huge_2m;
    assert_eq!((st.total, st.free, st.in_use), (4, 4, 0));
    check(&pool, &mm, base - 2 * M2);
}

#[test]
fn adopt_above_target_returns_surplus_when_freed() {
    // Nothing requested in this image; the previous one had a 2 MiB folio in use.
    let frames = 16384;
    let mut mm = mm_with(frames, &[(8192, 8192 + M2)]);
    let base = mm.stats().used;
    let mut pool = HugePool::new();
    let f = Folio {
        pfn: 8192,
        order: ORDER_2M,
    };
    pool.adopt(&mut mm, f).unwrap();
    let st = pool.stats().huge_2m;
    assert_eq!((st.requested, st.total, st.in_use), (0, 1, 1));
    mm.ram.write_u64(f.pa(), 7).unwrap();
    pool.free(&mut mm, f).unwrap();
    assert_eq!(pool.stats().huge_2m.total, 0);
    assert!(mm.frames().is_free(8192) && mm.frames().is_free(8192 + M2 - 1));
    assert_eq!(mm.ram.read_u64(f.pa()).unwrap(), 0);
    assert_eq!(mm.stats().used, base - M2);
}

#[test]
fn refill_after_memory_is_freed() {
    // 64 MiB; a previous image's file holds 4..56 MiB: 8 MiB are free, of which the pool
    // takes 2 × 2 MiB at the top (4 MiB stay for the host).
    let frames = 16384;
    let mut mm = mm_with(frames, &[(1024, 14336)]);
    let mut pool = HugePool::new();
    assert!(pool.reserve(&mut mm, ORDER_2M, 6).is_err());
    assert_eq!(pool.stats().huge_2m.total, 2, "60..64 MiB");
    // The file goes (as 4 KiB pages, not a pool folio): the pool can grow to its target.
    mm.free_runs(&[(1024, 13312)]).unwrap();
    assert_eq!(pool.refill(&mut mm), 4);
    let st = pool.stats().huge_2m;
    assert_eq!((st.requested, st.total, st.free), (6, 6, 6));
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(32))]
    /// Any sequence of reserve/alloc/free keeps each order exact and the frame allocator's
    /// count in step with the pool, and every folio stays naturally aligned and disjoint.
    #[test]
    fn pool_stays_exact(ops in proptest::collection::vec((0u8..4, 0u64..6), 1..60)) {
        let mut mm = mm_with(32768, &[]);
        let base = mm.stats().used;
        let mut pool = HugePool::new();
        let mut held: Vec<Folio> = Vec::new();
        for (op, n) in ops {
            match op {
                0 => { let _ = pool.reserve(&mut mm, ORDER_2M, n); }
                1 => {
                    if let Some(f) = pool.alloc(ORDER_2M) {
                        proptest::prop_assert_eq!(f.pfn % M2, 0);
                        proptest::prop_assert!(!held.contains(&f));
                        held.push(f);
                    }
                }
                2 if !held.is_empty() => {
                    let f = held.swap_remove((n as usize) % held.len());
                    pool.free(&mut mm, f).unwrap();
                    proptest::prop_assert!(pool.free(&mut mm, f).is_err());
                }
                _ => {
                    if let Ok(a) = mm.alloc_zeroed(n as u32) {
                        proptest::prop_assert!(pool.free(&mut mm, a).is_err());
                        mm.free(a).unwrap();
                    }
                }
            }
            let st = pool.stats().huge_2m;
            proptest::prop_assert_eq!(st.total, st.free + st.in_use);
            proptest::prop_assert_eq!(st.in_use, held.len() as u64);
            proptest::prop_assert_eq!(mm.stats().used, base + st.total * M2);
        }
    }
}
