//! A VMM written in C, outside this crate: `tests/vmm/rfc_vmm.c` runs the RFC's guest_memfd
//! preservation scenario with plain ioctls on `/dev/kvm` and `/dev/liveupdate`. It runs the
//! test guest of `vmm::guest`, whose low-memory images `handover guest-image` writes.
//!
//! - `--print-sregs` of the C VMM and of `handover guest-image` must agree (no KVM needed).
//! - `--native` runs on the machine's real `/dev/kvm` without LUO. The guest writes 5 MiB into a
//!   guest_memfd, the VMM checks them through the mmap, and a second vCPU verifies them after
//!   the guest_memfd is bound again. Then the same with a flipped byte, which the guest must
//!   find. These tests print `SKIP:` without `/dev/kvm`, and fail instead with
//!   `HANDOVER_REQUIRE_KVM=1`.
//! - Under `handover run` the VMM's `/dev/kvm` is the host's (the host owns the VM and vCPU
//!   and performs their ioctls; the VMM maps the real `kvm_run`), and stage 2 runs after a real
//!   live update, with low memory from a host memfd or from `malloc`, in both retrieval orders.
//!
//! Each run has a deadline: a hang kills the run's process group and fails the test. Outputs,
//! binaries and reports go to a directory of their own (kept when a test fails).

mod vmm_common;

use vmm_common::{
    compile, handover, handover_run, images, kvm_or_skip, path_str, rfc_vmm, run_with_deadline,
    test_dir, under_handover as rfc_vmm_under_handover,
};

/// The number of LUO negative-case lines stage 1 prints (`ok N - ...`).
const NEGATIVE_CASES: usize = 8;

#[test]
fn c_vmm_sets_the_vcpu_state_of_the_guest_module() {
    let dir = test_dir("sregs");
    let bin = compile(&dir);
    let r = rfc_vmm(&dir, "sregs", &bin, &["--print-sregs"]);
    r.assert_success("rfc_vmm --print-sregs");
    let want = handover(&["guest-image", "--print-sregs"]);
    assert!(
        want.contains("cs selector=0x33 ") && want.contains("rip=0x3000 "),
        "handover guest-image --print-sregs printed no state:\n{want}"
    );
    assert_eq!(
        r.stdout, want,
        "the C VMM's sregs/regs differ from vmm::guest's initial_sregs/initial_regs"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn c_vmm_native_writes_and_verifies_through_guest_memfd() {
    if !kvm_or_skip("c_vmm_native_writes_and_verifies_through_guest_memfd") {
        return;
    }
    let dir = test_dir("native");
    let bin = compile(&dir);
    let (w, v) = images(&dir);
    for low in ["memfd", "malloc"] {
        let tag = format!("native-{low}");
        let r = rfc_vmm(
            &dir,
            &tag,
            &bin,
            &[path_str(&w), path_str(&v), "--low", low, "--native"],
        );
        r.assert_success(&tag);
        assert_eq!(r.lines_eq("rfc_vmm: native ok"), 1, "{tag}\n{}", r.dump());
        assert_eq!(
            r.lines_starting("rfc_vmm: native verify: the guest verified 5242880 bytes"),
            1,
            "{tag}\n{}",
            r.dump()
        );
        assert_eq!(r.lines_starting("not ok"), 0, "{tag}\n{}", r.dump());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn c_vmm_native_guest_finds_a_flipped_byte() {
    if !kvm_or_skip("c_vmm_native_guest_finds_a_flipped_byte") {
        return;
    }
    let dir = test_dir("corrupt");
    let bin = compile(&dir);
    let (w, v) = images(&dir);
    let r = rfc_vmm(
        &dir,
        "corrupt",
        &bin,
        &[
            path_str(&w),
            path_str(&v),
            "--native",
            "--corrupt",
            "3000001",
        ],
    );
    r.assert_success("rfc_vmm --corrupt");
    assert_eq!(
        r.lines_eq("rfc_vmm: native verify: the guest found the flipped byte at 0x2dc6c1"),
        1,
        "{}",
        r.dump()
    );
    assert_eq!(r.lines_eq("rfc_vmm: native corrupt ok"), 1, "{}", r.dump());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The whole scenario under `handover run`: stage 1 (negative cases, guest writes, preserve,
/// `reboot`), a live update, stage 2 (retrieve, check, guest verifies, finish).
fn under_handover(low: &str, order: &str) {
    let test = format!("c_vmm_under_handover_run ({low}, {order})");
    if !kvm_or_skip(&test) {
        return;
    }
    let dir = test_dir(&format!("run-{low}-{order}"));
    let bin = compile(&dir);
    let (w, v) = images(&dir);
    let r = rfc_vmm_under_handover(
        &dir,
        "run",
        &bin,
        &[path_str(&w), path_str(&v), "--low", low, "--order", order],
    );
    assert_eq!(
        r.lines_starting("not ok"),
        0,
        "{test}: a negative case failed\n{}",
        r.dump()
    );
    r.assert_success(&test);
    assert_eq!(
        r.lines_starting("ok "),
        NEGATIVE_CASES,
        "{test}: a negative case reported nothing\n{}",
        r.dump()
    );
    assert_eq!(
        r.lines_eq("rfc_vmm: stage 1"),
        1,
        "{test}: stage 1 must run once\n{}",
        r.dump()
    );
    assert_eq!(
        r.lines_eq("rfc_vmm: stage 2 ok"),
        1,
        "{test}: stage 2 did not pass\n{}",
        r.dump()
    );
    // Two programs (stage 1, stage 2), two update attempts (the refused one of the negative
    // case, and the real one), one update done.
    assert_eq!(r.events("run-start").len(), 2, "{test}\n{}", r.dump());
    assert_eq!(r.events("run-kexec").len(), 2, "{test}\n{}", r.dump());
    assert_eq!(r.run_halt()["kexec_count"], 1, "{test}\n{}", r.dump());
    r.assert_clean_halt();
    let _ = std::fs::remove_dir_all(&dir);
}

// The next four run the VMM under `handover run`: its `/dev/kvm` is the host's.

#[test]
fn c_vmm_under_handover_run_memfd_vm_first() {
    under_handover("memfd", "vm-first");
}

#[test]
fn c_vmm_under_handover_run_memfd_gmem_first() {
    under_handover("memfd", "gmem-first");
}

#[test]
fn c_vmm_under_handover_run_malloc_vm_first() {
    under_handover("malloc", "vm-first");
}

#[test]
fn c_vmm_under_handover_run_malloc_gmem_first() {
    under_handover("malloc", "gmem-first");
}

/// Memslot changes while a program's vCPU faults its guest_memfd pages in: the main thread of
/// the VMM adds and deletes a slot in a loop while the guest writes 5 MiB (1,280 faults the
/// host serves). Each change waits for the vCPU to leave KVM_RUN, and a vCPU in a fault waits
/// for the host's fault service; without the service nudging the boundary's vCPU thread this
/// hung (3 of 3 runs, measured). It must finish, with the data right.
#[test]
fn c_vmm_under_handover_run_memslot_churn_while_the_guest_faults() {
    let test = "c_vmm_under_handover_run_memslot_churn_while_the_guest_faults";
    if !kvm_or_skip(test) {
        return;
    }
    let dir = test_dir("run-slot-churn");
    let bin = compile(&dir);
    let (w, v) = images(&dir);
    let r = rfc_vmm_under_handover(
        &dir,
        "churn",
        &bin,
        &[path_str(&w), path_str(&v), "--slot-churn"],
    );
    r.assert_success(test);
    assert_eq!(
        r.lines_starting("rfc_vmm: slot churn ok"),
        1,
        "{test}: the guest did not finish\n{}",
        r.dump()
    );
    r.assert_clean_halt();
    let _ = std::fs::remove_dir_all(&dir);
}

/// `rfc_vmm --live`: the guest keeps running across the update. Its vCPU is paused from
/// another thread (`immediate_exit` and a signal), its state saved into a preserved memfd, and
/// after the update a new vCPU on the retrieved VM goes on from there: the guest reads its
/// clock once more, verifies the 5 MiB and reports the largest gap between two clock reads.
/// With `no_cgroup` the host finds the programs in `/proc` instead of freezing their cgroup.
fn live(order: &str, no_cgroup: bool) {
    let test = format!("c_vmm_live ({order}, no cgroup {no_cgroup})");
    if !kvm_or_skip(&test) {
        return;
    }
    let dir = test_dir(&format!("live-{order}-{no_cgroup}"));
    let bin = compile(&dir);
    let (w, v) = images(&dir);
    let (mut cmd, report) = handover_run(
        &dir,
        "live",
        &bin,
        &[path_str(&w), path_str(&v), "--live", "--order", order],
    );
    if no_cgroup {
        cmd.env("HANDOVER_RUN_NO_CGROUP", "1");
    }
    let r = run_with_deadline(&dir, "live", cmd, Some(&report));
    r.assert_success(&test);
    assert_eq!(r.lines_eq("rfc_vmm: live ok"), 1, "{test}\n{}", r.dump());
    let line = r.line_starting("rfc_vmm: live {");
    let j: serde_json::Value =
        serde_json::from_str(line.trim_start_matches("rfc_vmm: live ")).expect("live JSON");
    let gap = j["blackout_us"].as_u64().expect("blackout_us");
    let pause_to_resume = j["pause_to_resume_us"]
        .as_u64()
        .expect("pause_to_resume_us");
    let pause = j["pause_us"].as_u64().expect("pause_us");
    // The guest saw the update as one gap between two clock reads. The vCPU had stopped by
    // the end of the pause (its thread joined) and ran again only after the restore, so the
    // gap is at least that long; the guest may still have read its clock during the pause.
    let stopped = pause_to_resume.saturating_sub(pause);
    assert!(
        gap >= stopped && gap < 30_000_000,
        "{test}: guest gap {gap} us, vCPU stopped for at least {stopped} us\n{}",
        r.dump()
    );
    assert!(
        j["loops"].as_u64().unwrap_or(0) >= 3,
        "{test}\n{}",
        r.dump()
    );
    assert_eq!(r.events("run-start").len(), 2, "{test}\n{}", r.dump());
    assert_eq!(r.run_halt()["kexec_count"], 1, "{test}\n{}", r.dump());
    r.assert_clean_halt();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn c_vmm_live_update_keeps_the_guest_running_vm_first() {
    live("vm-first", false);
}

#[test]
fn c_vmm_live_update_keeps_the_guest_running_gmem_first() {
    live("gmem-first", false);
}

#[test]
fn c_vmm_live_update_without_cgroups_finds_the_programs_in_proc() {
    live("vm-first", true);
}
