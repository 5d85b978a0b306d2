//! The RFC scenario with real guests through a real kexec of the host image: the guest writes
//! 5 MiB into a guest_memfd, the VM, guest_memfd and vCPU state are preserved, the host image
//! execs, and the same guest verifies every byte afterwards. Plus the order and failure cases.

mod common;

use common::boot;
use handover::vmm::libkvm::kvm_available;

fn rfc(tag: &str, args: &[&str]) -> common::Run {
    rfc_with(tag, args, &[])
}

fn rfc_with(tag: &str, args: &[&str], boot_args: &[&str]) -> common::Run {
    let mut a = vec!["guest-mem=16M", "data=5M"];
    a.extend_from_slice(args);
    boot(tag, "1G", handover::vmm::rfc::PROGRAM, &a, boot_args)
}

fn check_stage2(r: &common::Run, order: &str) {
    assert_eq!(r.code, 0, "stderr:\n{}", r.stderr);
    let s1 = r.one("rfc-stage1");
    assert!(s1["preserved_folios"].as_u64().unwrap() >= 1280, "{s1}");
    let s2 = r.one("rfc-stage2");
    assert_eq!(s2["ok"], true, "{s2}");
    assert_eq!(s2["guest_status"], "verify-ok");
    assert_eq!(s2["verified_bytes"], 5 << 20);
    assert_eq!(s2["order"], order);
    assert_eq!(s2["kexec_count"], 1);
    assert!(s2["vm_name"].as_str().unwrap().starts_with("restored-"));
    let blackout = s2["blackout_us"].as_u64().unwrap();
    assert!(blackout > 0, "the guest saw the pause: {s2}");
    assert!(s2["handover_bytes"].as_u64().unwrap() > 0);
}

#[test]
fn rfc_stage1_kexec_stage2_vm_first() {
    if !kvm_available("rfc_stage1_kexec_stage2_vm_first") {
        return;
    }
    let r = rfc("rfc-vm-first", &[]);
    check_stage2(&r, "vm-first");
}

#[test]
fn rfc_stage1_kexec_stage2_guest_memfd_first() {
    if !kvm_available("rfc_stage1_kexec_stage2_guest_memfd_first") {
        return;
    }
    let r = rfc("rfc-gmem-first", &["order=gmem-first"]);
    check_stage2(&r, "gmem-first");
}

#[test]
fn rfc_scenario_in_the_rfc_per_folio_format_v1() {
    if !kvm_available("rfc_scenario_in_the_rfc_per_folio_format_v1") {
        return;
    }
    let r = rfc_with("rfc-v1", &["order=gmem-first"], &["--gmem-luo", "v1"]);
    check_stage2(&r, "gmem-first");
}

#[test]
fn vm_file_not_preserved_refuses_the_kexec_and_the_guest_runs_on() {
    if !kvm_available("vm_file_not_preserved_refuses_the_kexec_and_the_guest_runs_on") {
        return;
    }
    let r = rfc("rfc-no-vm", &["no-vm=1"]);
    assert_eq!(r.code, 0, "stderr:\n{}", r.stderr);
    let s1 = r.one("rfc-aborted");
    assert_eq!(s1["errno"], libc::ENOENT, "{s1}");
    assert!(
        s1["kexec_refused"]
            .as_str()
            .unwrap()
            .contains("guest_memfd_luo"),
        "{s1}"
    );
    assert_eq!(
        s1["guest_status"], "verify-ok",
        "the guest kept running and verified: {s1}"
    );
    assert_eq!(s1["verified_bytes"], 5 << 20);
    assert_eq!(s1["kexec_count"], 0, "no kexec happened");
    assert!(r.events("rfc-stage2").is_empty());
}

#[test]
fn finish_before_retrieving_the_vm_file() {
    if !kvm_available("finish_before_retrieving_the_vm_file") {
        return;
    }
    let r = rfc("rfc-finish-early", &["finish-early=1"]);
    assert_eq!(r.code, 0, "stderr:\n{}", r.stderr);
    let s2 = r.one("rfc-stage2");
    // The guest_memfd keeps its data (and its VM) after FINISH; the VM file token is gone.
    assert_eq!(s2["host_verified_bytes"], 5 << 20, "{s2}");
    assert_eq!(s2["vm_after_finish"], "Some(ENOENT)", "{s2}");
}

#[test]
fn demo_json_reports_the_verified_update() {
    if !kvm_available("demo_json_reports_the_verified_update") {
        return;
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_handover"))
        .args(["demo", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("demo --json prints JSON");
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["verified_bytes"], 5_242_880);
    assert!(v["blackout_us"].as_u64().unwrap() > 0);
    assert!(v["handover_bytes"].as_u64().unwrap() > 0);
}

#[test]
fn lazily_bound_memslots_fault_in_through_mmio_exits() {
    if !kvm_available("lazily_bound_memslots_fault_in_through_mmio_exits") {
        return;
    }
    // 1 MiB memslot chunks and no background binding: after the update only the first chunk is
    // bound; the guest's verify pass reaches the other four through MMIO exits, which bind them.
    let r = rfc("rfc-lazy", &["slot-chunk=1M", "background-slots=0"]);
    check_stage2(&r, "vm-first");
    let m = &r.one("rfc-stage2")["memslots"];
    assert_eq!(m["chunks"], 16, "{m}");
    assert_eq!(
        m["bound_at_end"], 5,
        "the first chunk plus the four the guest touched: {m}"
    );
}
