//! The huge-page pool on a booted host: reserved at boot, shown by `status()`, kept across an
//! in-process kexec, and a preserved pool folio adopted by the next image (`mm::hugetlb`).

use crate::host::Host;
use crate::kexec::boot::BootError;
use crate::kexec::BootParams;
use crate::mm::hugetlb::{HugeOrderStats, ORDER_1G, ORDER_2M};
use crate::mm::{HugePageRequest, MmError, PhysRead};

fn host(ram: u64, count_2m: u64, count_1g: u64) -> Result<Host, BootError> {
    // LUO off: frame accounting covers KHO's own memory and the pool only.
    Host::boot(BootParams {
        ram_size: ram,
        liveupdate: false,
        hugepages: HugePageRequest { count_2m, count_1g },
        ..Default::default()
    })
}

fn counts(s: &HugeOrderStats) -> (u64, u64, u64, u64) {
    (s.requested, s.total, s.free, s.in_use)
}

#[test]
fn boot_reserves_the_pool_and_status_shows_it() {
    let plain = host(256 << 20, 0, 0).unwrap();
    let h = host(256 << 20, 4, 0).unwrap();
    let st = h.status();
    assert_eq!(counts(&st.hugepages.huge_2m), (4, 4, 4, 0));
    assert_eq!(counts(&st.hugepages.huge_1g), (0, 0, 0, 0));
    // The 8 MiB are taken from the frame allocator, from the top of RAM.
    assert_eq!(st.frames.used, plain.status().frames.used + 2048);
    assert_eq!(st.frames.free, plain.status().frames.free - 2048);
    let top = h.mm().frames().nr_frames();
    assert!((top - 2048..top).all(|p| !h.mm().frames().is_free(p)));
    assert!(h.mm().frames().is_free(top - 2049));
    let j = serde_json::to_value(st).unwrap();
    assert_eq!(j["hugepages"]["2M"]["total"], 4);
    assert_eq!(j["hugepages"]["2M"]["free"], 4);
    assert_eq!(j["hugepages"]["1G"]["requested"], 0);
}

#[test]
fn cold_boot_fails_when_ram_cannot_hold_the_pool() {
    // 256 MiB with 16 MiB of scratch, 4 MiB left to the host: 118 × 2 MiB at most, no 1 GiB.
    let e = host(256 << 20, 0, 1).unwrap_err();
    assert!(
        matches!(e, BootError::HugePages(MmError::HugePagesShort { .. })),
        "{e}"
    );
    assert!(e.to_string().contains("--hugepages"), "{e}");
    assert!(host(256 << 20, 119, 0).is_err());
    let h = host(256 << 20, 118, 0).unwrap();
    assert_eq!(h.status().hugepages.huge_2m.total, 118);
}

#[test]
fn kexec_keeps_the_pool_and_never_fails_for_it() {
    let mut h = host(256 << 20, 4, 0).unwrap();
    let used = h.status().frames.used;
    let h2 = h.kexec_in_process().unwrap();
    assert_eq!(counts(&h2.status().hugepages.huge_2m), (4, 4, 4, 0));
    assert_eq!(h2.status().frames.used, used);
    // A request RAM cannot hold after a kexec: the image boots with what fits.
    h = h2;
    h.params_mut().hugepages.count_1g = 1;
    let h3 = h.kexec_in_process().unwrap();
    assert_eq!(counts(&h3.status().hugepages.huge_1g), (1, 0, 0, 0));
    assert_eq!(counts(&h3.status().hugepages.huge_2m), (4, 4, 4, 0));
}

/// A pool folio preserved by one image is adopted by the next: the data is there, the pool
/// counts it in use, and the pool keeps its requested total.
#[test]
fn preserved_2m_folio_is_adopted_after_kexec() {
    let mut h = host(256 << 20, 4, 0).unwrap();
    let f = h.hugepool.alloc(ORDER_2M).unwrap();
    h.mm.ram.write_u64(f.pa() + 4096, 0x5eed).unwrap();
    h.kho.preserve_folio(&mut h.mm, f).unwrap();
    let mut h = h.kexec_in_process().unwrap();
    // Boot reserved the full request around the preserved folio.
    assert_eq!(counts(&h.status().hugepages.huge_2m), (4, 4, 4, 0));
    let used = h.status().frames.used;
    let back = h.kho.restore_folio(f.pa()).unwrap();
    assert_eq!(back, f);
    let (pool, mm) = h.hugepool_mm();
    pool.adopt(mm, back).unwrap();
    assert_eq!(h.mm.ram.read_u64(f.pa() + 4096).unwrap(), 0x5eed);
    // One spare went back: total is the request again.
    assert_eq!(counts(&h.status().hugepages.huge_2m), (4, 4, 3, 1));
    assert_eq!(h.status().frames.used, used - 512);
    let (pool, mm) = h.hugepool_mm();
    pool.free(mm, back).unwrap();
    assert_eq!(counts(&h.status().hugepages.huge_2m), (4, 4, 4, 0));
    assert_eq!(
        h.mm.ram.read_u64(f.pa() + 4096).unwrap(),
        0,
        "freed folios are zero"
    );
}

/// 1 GiB: the next image cannot reserve a fresh one (the only whole 1 GiB range is the
/// preserved folio), boots anyway, and adopting the folio brings the pool to its request.
#[test]
fn preserved_1g_folio_makes_up_the_pool_after_kexec() {
    let mut h = host(2 << 30, 0, 1).unwrap();
    let f = h.hugepool.alloc(ORDER_1G).unwrap();
    assert_eq!(f.pfn, 1 << 18, "the top 1 GiB");
    h.mm.ram.write_u64(f.pa() + (1 << 29), 42).unwrap();
    h.kho.preserve_folio(&mut h.mm, f).unwrap();
    let mut h = h.kexec_in_process().unwrap();
    assert_eq!(counts(&h.status().hugepages.huge_1g), (1, 0, 0, 0));
    let back = h.kho.restore_folio(f.pa()).unwrap();
    let (pool, mm) = h.hugepool_mm();
    pool.adopt(mm, back).unwrap();
    assert_eq!(counts(&h.status().hugepages.huge_1g), (1, 1, 0, 1));
    assert_eq!(h.mm.ram.read_u64(f.pa() + (1 << 29)).unwrap(), 42);
    let (pool, mm) = h.hugepool_mm();
    pool.free(mm, back).unwrap();
    assert_eq!(counts(&h.status().hugepages.huge_1g), (1, 1, 1, 0));
    // The next image finds the whole range free again and reserves it.
    let h = h.kexec_in_process().unwrap();
    assert_eq!(counts(&h.status().hugepages.huge_1g), (1, 1, 1, 0));
}
