//! The live-snapshot baseline (`bench::live_snapshot`) end to end on the real `/dev/kvm`: one
//! VMM process pre-copies a 64 MiB guest, pauses, execs and restores it lazily from the file.
//!
//! Skips with a loud `SKIP:` line when `/dev/kvm` cannot be opened, unless
//! `HANDOVER_REQUIRE_KVM=1`, in which case it fails.

use std::path::Path;

use handover::bench::live_snapshot::{dirty_ranges, run_point_opts, run_point_with, DATA_GPA};
use handover::vmm::guest::*;
use handover::vmm::libkvm::kvm_available;
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{MmapRegion, VolatileMemory};

#[test]
fn live_snapshot_restores_lazily_and_verifies() {
    if !kvm_available("live_snapshot_restores_lazily_and_verifies") {
        return;
    }
    const SIZE: u64 = 64 << 20;
    let dir = std::env::temp_dir().join(format!(
        "handover-live-snapshot-test-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let exe = Path::new(env!("CARGO_BIN_EXE_handover"));
    let r = run_point_with(exe, SIZE, &dir);
    let leftovers: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    let _ = std::fs::remove_dir_all(&dir);
    let r = r.unwrap();
    assert!(r.ok, "{r:?}");
    assert_eq!(r.guest_status, "verify-ok");
    assert_eq!(
        r.verified_bytes, SIZE,
        "the guest verified all of its memory"
    );
    assert!(r.blackout_us > 0, "{r:?}");
    assert!(
        (r.blackout_us as f64) < r.total_update_us,
        "blackout {} µs not below the total {} µs",
        r.blackout_us,
        r.total_update_us
    );
    assert!(!r.precopy.is_empty(), "at least one pre-copy round");
    assert_eq!(r.rounds as usize, r.precopy.len() + 1, "plus the final one");
    // Round 1 copies every page of both memslots.
    assert!(r.precopy[0].pages * 4096 >= SIZE + (2 << 20));
    assert!(r.bytes_written >= SIZE, "{r:?}");
    assert!(r.snapshot_file_bytes >= SIZE + (2 << 20));
    assert!(r.extra_memory_bytes >= r.disk_bytes);
    assert!(r.phases_us.brownout > 0.0);
    assert!(r.reaper, "the new process adopted the reaper");
    assert!(r.snapshot_removed, "the VMM removed its snapshot file");
    assert!(!Path::new(&r.snapshot_path).exists());
    assert!(leftovers.is_empty(), "files left behind: {leftovers:?}");
}

/// With the file's page cache dropped before the pause, the restore faults the guest in from
/// disk and still verifies.
#[test]
fn cold_cache_restore_verifies() {
    if !kvm_available("cold_cache_restore_verifies") {
        return;
    }
    const SIZE: u64 = 16 << 20;
    let dir = std::env::temp_dir();
    let exe = Path::new(env!("CARGO_BIN_EXE_handover"));
    let r = run_point_opts(exe, SIZE, &dir, true).unwrap();
    assert!(r.ok && r.cold_cache, "{r:?}");
    assert_eq!(r.verified_bytes, SIZE);
    assert!(r.snapshot_removed && !Path::new(&r.snapshot_path).exists());
}

#[test]
fn bad_sizes_are_refused() {
    let exe = Path::new(env!("CARGO_BIN_EXE_handover"));
    let dir = std::env::temp_dir();
    for size in [0, 4095, 64 << 30] {
        let e = run_point_with(exe, size, &dir).unwrap_err();
        assert!(e.contains("guest size"), "{e}");
    }
    assert!(run_point_with(exe, 1 << 20, Path::new("/nonexistent/dir")).is_err());
}

/// Run the guest until it reports a status (in WRITE mode it makes no other exit).
fn run_to_status(vcpu: &mut VcpuFd) -> u64 {
    match vcpu.run() {
        Ok(VcpuExit::IoOut(PORT_STATUS, d)) => u64::from(u32::from_le_bytes(d.try_into().unwrap())),
        Ok(exit) => panic!("unexpected exit {exit:?}"),
        Err(e) => panic!("KVM_RUN: {e}"),
    }
}

/// What the pre-copy relies on, on this machine's KVM: with `KVM_MEM_LOG_DIRTY_PAGES` every
/// page the guest writes is in the next `KVM_GET_DIRTY_LOG`, and fetching the log re-arms it
/// (the same pages written again are reported again; nothing else is).
#[test]
fn dirty_log_reports_every_guest_write_each_round() {
    if !kvm_available("dirty_log_reports_every_guest_write_each_round") {
        return;
    }
    const LEN: usize = 4 << 20;
    const WRITTEN: u64 = (3 << 20) + 100; // the last page partly
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    let low = MmapRegion::<()>::new(LOW_MEM_SIZE).unwrap();
    let data = MmapRegion::<()>::new(LEN).unwrap();
    let params = GuestParams {
        data_gpa: DATA_GPA,
        data_len: WRITTEN,
        mode: GuestMode::Write,
    };
    let mut image = vec![0u8; LOW_MEM_SIZE];
    build_image(&mut image, &params).unwrap();
    low.get_slice(0, LOW_MEM_SIZE)
        .unwrap()
        .copy_from(&image[..]);
    for (slot, gpa, map, flags) in [
        (0, 0, &low, 0),
        (1, DATA_GPA, &data, KVM_MEM_LOG_DIRTY_PAGES),
    ] {
        let r = kvm_userspace_memory_region {
            slot,
            flags,
            guest_phys_addr: gpa,
            memory_size: map.size() as u64,
            userspace_addr: map.as_ptr() as u64,
        };
        // SAFETY: both mappings outlive the VM (declared before it is dropped at the end).
        unsafe { vm.set_user_memory_region(r) }.unwrap();
    }
    let mut vcpu = vm.create_vcpu(0).unwrap();
    configure_vcpu(&kvm, &vcpu).unwrap();
    let pages = WRITTEN.div_ceil(4096);
    for round in 0..3 {
        assert_eq!(run_to_status(&mut vcpu), STATUS_WRITTEN, "round {round}");
        let log = vm.get_dirty_log(1, LEN).unwrap();
        assert_eq!(
            dirty_ranges(&log, (LEN / 4096) as u64),
            vec![(0, pages)],
            "round {round}: exactly the pages the guest wrote"
        );
        // Nothing written since the log was fetched: nothing reported.
        assert!(dirty_ranges(&vm.get_dirty_log(1, LEN).unwrap(), (LEN / 4096) as u64).is_empty());
        // Once more from the start (the mailbox still holds the parameters).
        vcpu.set_regs(&initial_regs()).unwrap();
    }
}
