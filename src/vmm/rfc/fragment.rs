//! `fragment=SEED`: populate the guest_memfd the way a host that has run for a while would,
//! through the user API only. The schedule (`mm::fragment::Schedule`) is applied as: churn
//! objects are ranges of one memfd, allocated with `fallocate` and freed with a punch (about
//! half of them stay); the other guests are guest_memfds of the same VM that stay allocated;
//! a fault is a one-page `fallocate` of the guest's file at the page's offset (what a VMM
//! prefaulting page by page, or the guest's first touches, ask of the host).

use std::time::Instant;

use serde_json::{json, Value};

use crate::abi::kvm::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};
use crate::host::files::FileKind;
use crate::host::Host;
use crate::mm::fragment::{FragmentSpec, RunStats, Schedule, Step};
use crate::mm::{MAX_ORDER, PAGE_SIZE};
use crate::uapi::Pid;
use crate::vmm::libkvm;

use super::e;
use super::options::Options;

/// Bytes between two churn objects in the churn memfd (the largest object).
const CHURN_STRIDE: u64 = PAGE_SIZE << MAX_ORDER;

/// Run the churn and fault every page of `gmem` (the VM `vm`'s guest_memfd) in `seed`'s random
/// order, interleaved with the other guests' faults. What was done, for the report.
pub(super) fn populate(
    h: &mut Host,
    pid: Pid,
    vm: i32,
    gmem: i32,
    o: &Options,
    seed: u64,
) -> Result<Value, String> {
    let t = Instant::now();
    let others = o.fragment_guests.saturating_sub(1) as u64;
    let other_pages = (o.fragment_other / PAGE_SIZE)
        .checked_div(others)
        .unwrap_or(0);
    let mut guest_pages = vec![o.guest_mem / PAGE_SIZE];
    let mut fds = vec![gmem];
    for _ in 0..others {
        if other_pages == 0 {
            break;
        }
        let fd = libkvm::create_guest_memfd(
            h,
            pid,
            vm,
            other_pages * PAGE_SIZE,
            GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
        )
        .map_err(e("fragment: other guest_memfd"))?;
        guest_pages.push(other_pages);
        fds.push(fd);
    }
    let spec = FragmentSpec {
        seed,
        guest_pages,
        churn_pages: o.fragment_churn / PAGE_SIZE,
        churn_max_order: MAX_ORDER,
    };
    let sched = Schedule::new(&spec);
    let churn = h
        .memfd_create(pid, "fragment-churn", 0)
        .map_err(e("fragment: memfd"))?;
    let churn_size = sched
        .churn_objects()
        .checked_mul(CHURN_STRIDE)
        .filter(|&s| s <= crate::fs::memfd::MAX_SIZE)
        .ok_or("fragment: churn too large")?;
    if churn_size > 0 {
        h.ftruncate(pid, churn, churn_size)
            .map_err(e("fragment: size churn memfd"))?;
    }
    let keep = libc::FALLOC_FL_KEEP_SIZE;
    let punch = keep | libc::FALLOC_FL_PUNCH_HOLE;
    let mut orders = Vec::new();
    let (mut faults, mut allocs, mut frees) = (0u64, 0u64, 0u64);
    for st in sched {
        match st {
            Step::ChurnAlloc { id, order } => {
                orders.push(order);
                h.fallocate(pid, churn, keep, id * CHURN_STRIDE, PAGE_SIZE << order)
                    .map_err(e("fragment: churn fallocate"))?;
                allocs += 1;
            }
            Step::ChurnFree { id } => {
                let order = orders.get(id as usize).copied().unwrap_or(0);
                h.fallocate(pid, churn, punch, id * CHURN_STRIDE, PAGE_SIZE << order)
                    .map_err(e("fragment: churn punch"))?;
                frees += 1;
            }
            Step::Fault { guest, index } => {
                let fd = fds.get(guest).copied().ok_or("fragment: guest")?;
                h.fallocate(pid, fd, keep, index * PAGE_SIZE, PAGE_SIZE)
                    .map_err(e("fragment: fault"))?;
                faults += 1;
            }
        }
    }
    Ok(json!({
        "seed": seed,
        "guests": spec.guest_pages.len(),
        "guest_pages": spec.guest_pages,
        "churn_pages": spec.churn_pages,
        "churn_allocs": allocs,
        "churn_frees": frees,
        "faults": faults,
        "populate_ms": t.elapsed().as_secs_f64() * 1e3,
        "gmem_runs": gmem_run_stats(h, pid, gmem),
        "frames": h.mm().stats(),
    }))
}

/// The run-length distribution of the guest_memfd behind `fd` (None if it is not one).
pub(super) fn gmem_run_stats(h: &Host, pid: Pid, fd: i32) -> Option<RunStats> {
    let f = h.fd_file(pid, fd).ok()?;
    match h.files.kind(f) {
        Some(FileKind::GuestMemfd(g)) => Some(RunStats::of(g.pages.runs().map(|r| r.2).collect())),
        _ => None,
    }
}
