//! KHO benchmark: preserve, hand over and restore N GiB of 4 KiB folios, per page.
//!
//! Runs in one process with the in-process kexec (the new image rebuilds everything from RAM,
//! as after `execve`); RAM is a sparse memfd, so 16 GiB of folios costs only the metadata.

use std::time::Instant;

use crate::host::Host;
use crate::kexec::BootParams;
use crate::mm::{Folio, PAGE_SIZE};

use super::Spread;

/// One run of the KHO benchmark (all per-page times are wall-clock ns divided by `pages`).
#[derive(Debug, serde::Serialize)]
pub struct KhoBenchRun {
    /// 4 KiB folios preserved, handed over and restored.
    pub pages: u64,
    /// Preserve every folio (tracker bit per page).
    pub preserve_ns_per_page: f64,
    /// Preserve the folio list (8 bytes per folio) as a chunked array.
    pub list_ns_per_page: f64,
    /// Finalize (tree + metadata) and boot the next image up to the allocator being online:
    /// tracker walk, reservation, freeing of everything else.
    pub handover_ns_per_page: f64,
    /// The same handover phase in total, ms.
    pub handover_total_ms: f64,
    /// Restore the list and every folio in the new image.
    pub restore_ns_per_page: f64,
    /// RAM of the tracker's nodes once every folio is preserved, bytes.
    pub tracker_bytes: u64,
    /// `tracker_bytes` per GiB of preserved folios.
    pub tracker_bytes_per_gib: f64,
}

/// The KHO benchmark's result: every run and the spread of the headline numbers.
#[derive(Debug, serde::Serialize)]
pub struct KhoBench {
    /// Bytes of folios per run.
    pub size_bytes: u64,
    /// Every run.
    pub runs: Vec<KhoBenchRun>,
    /// Spread of [`KhoBenchRun::preserve_ns_per_page`].
    pub preserve_ns_per_page: Spread,
    /// Spread of [`KhoBenchRun::handover_ns_per_page`].
    pub handover_ns_per_page: Spread,
    /// Spread of [`KhoBenchRun::restore_ns_per_page`].
    pub restore_ns_per_page: Spread,
    /// Spread of [`KhoBenchRun::tracker_bytes_per_gib`].
    pub tracker_bytes_per_gib: Spread,
}

/// A failed step of the KHO benchmark, with its message.
#[derive(Debug, thiserror::Error)]
#[error("kho bench: {0}")]
pub struct BenchError(String);

fn err(e: impl std::fmt::Display) -> BenchError {
    BenchError(e.to_string())
}

/// One run: boot a host (LUO off) with room for `size` bytes of order-0 folios, preserve them
/// and their list, kexec in process, restore them all.
pub fn run_once(size: u64) -> Result<KhoBenchRun, BenchError> {
    let pages = size / PAGE_SIZE;
    let mut h = Host::boot(BootParams {
        ram_size: size + size / 8 + (512 << 20),
        liveupdate: false,
        ..Default::default()
    })
    .map_err(err)?;
    let mut folios = Vec::with_capacity(pages as usize);
    for _ in 0..pages {
        folios.push(h.mm.alloc_zeroed(0).map_err(err)?);
    }
    let t = Instant::now();
    for f in &folios {
        h.kho.preserve_folio(&mut h.mm, *f).map_err(err)?;
    }
    let preserve = t.elapsed();
    let tracker_bytes = h.kho.tracker().node_bytes();

    let t = Instant::now();
    let list: Vec<u8> = folios.iter().flat_map(|f| f.pa().to_ne_bytes()).collect();
    let arr = h.kho.preserve_array(&mut h.mm, &list).map_err(err)?;
    let blob = h.kho.alloc_preserve(&mut h.mm, 16).map_err(err)?;
    h.mm.ram
        .write_phys(blob.pa(), zerocopy::IntoBytes::as_bytes(&arr.ser))
        .map_err(err)?;
    h.kho.add_subtree("bench", blob.pa(), 16).map_err(err)?;
    let list_t = t.elapsed();
    drop(folios);

    let t = Instant::now();
    let mut h = h.kexec_in_process().map_err(|e| err(format!("{e:?}")))?;
    let handover = t.elapsed();

    let t = Instant::now();
    let st = h.kho.retrieve_subtree("bench").map_err(err)?;
    let mut b = [0u8; 16];
    crate::mm::PhysRead::read_phys(&h.mm.ram, st.pa, &mut b).map_err(err)?;
    let ser: crate::abi::kho::KhoArraySer =
        zerocopy::FromBytes::read_from_bytes(&b).map_err(|_| err("bench blob"))?;
    let list = h.kho.restore_array(&mut h.mm, &ser).map_err(err)?;
    h.kho.restore_free(&mut h.mm, st.pa).map_err(err)?;
    let mut restored: Vec<Folio> = Vec::with_capacity(pages as usize);
    for c in list.chunks_exact(8).take(pages as usize) {
        let pa = u64::from_ne_bytes(c.try_into().map_err(|_| err("list"))?);
        restored.push(h.kho.restore_folio(pa).map_err(err)?);
    }
    let restore = t.elapsed();
    if restored.len() as u64 != pages || h.status().incoming_outstanding != 0 {
        return Err(err("not every page came back"));
    }
    let per = |d: std::time::Duration| d.as_nanos() as f64 / pages as f64;
    Ok(KhoBenchRun {
        pages,
        preserve_ns_per_page: per(preserve),
        list_ns_per_page: per(list_t),
        handover_ns_per_page: per(handover),
        handover_total_ms: handover.as_secs_f64() * 1e3,
        restore_ns_per_page: per(restore),
        tracker_bytes,
        tracker_bytes_per_gib: tracker_bytes as f64 / (size as f64 / (1u64 << 30) as f64),
    })
}

/// `runs` runs (at least one) of [`run_once`]; the first failure stops the benchmark.
pub fn run(size: u64, runs: usize) -> Result<KhoBench, BenchError> {
    let mut v = Vec::new();
    for _ in 0..runs.max(1) {
        v.push(run_once(size)?);
    }
    let sp = |f: fn(&KhoBenchRun) -> f64| Spread::of(&v.iter().map(f).collect::<Vec<_>>());
    Ok(KhoBench {
        size_bytes: size,
        preserve_ns_per_page: sp(|r| r.preserve_ns_per_page),
        handover_ns_per_page: sp(|r| r.handover_ns_per_page),
        restore_ns_per_page: sp(|r| r.restore_ns_per_page),
        tracker_bytes_per_gib: sp(|r| r.tracker_bytes_per_gib),
        runs: v,
    })
}
