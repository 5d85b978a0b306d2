//! Many VMs and SMP guests through real kexecs (`--init fleet`): a 4-vCPU guest, 8 VMs x 2
//! vCPUs through two updates in a row, vCPUs retrieved before their VM; every guest checks its
//! data, its shared counter and its clock itself, and takes the interrupt that was left
//! pending in its LAPIC across each update.

mod common;

use handover::vmm::libkvm::kvm_available;
use serde_json::Value;

fn fleet(tag: &str, ram: &str, args: &[&str]) -> common::Run {
    common::boot(tag, ram, handover::vmm::fleet::PROGRAM, args, &[])
}

/// What every update and the end must show: each VM resumed, its guest saw the pause between
/// two clock reads, its TSC never went back and stepped by no more than that gap plus 1 ms;
/// after the last update each vCPU verified its region and each counter equals the sum of the
/// vCPUs' loop counts (checked by the VMM from the guests' mailboxes).
fn check(r: &common::Run, vms: usize, vcpus: usize, updates: usize) {
    check_irqs(r, vms, vcpus, updates, true)
}

/// [`check`]; with `irqchip`, also: the interrupt sent to each VM's first vCPU while it was
/// paused for an update was taken by its guest after that update (one per update).
fn check_irqs(r: &common::Run, vms: usize, vcpus: usize, updates: usize, irqchip: bool) {
    assert_eq!(r.code, 0, "{}", r.stderr);
    let ups = r.events("fleet-update");
    assert_eq!(ups.len(), updates, "{}", r.stderr);
    for (n, u) in ups.iter().enumerate() {
        assert_eq!(u["cycle"], (n + 1) as u64);
        let list = u["vms"].as_array().expect("vms");
        assert_eq!(list.len(), vms);
        for v in list {
            let gap = v["guest_gap_us"].as_f64().unwrap();
            let tsc = v["guest_tsc_step_us"].as_f64().unwrap();
            let blackout = v["blackout_us"].as_f64().unwrap();
            assert!(gap > 0.0 && blackout > 0.0, "{v}");
            let want = if irqchip { n as u64 + 1 } else { 0 };
            assert_eq!(
                v["irqs_taken"],
                want,
                "interrupts taken after update {}: {v}",
                n + 1
            );
            assert_eq!(v["tsc_backwards"], 0, "{v}");
            assert!(
                tsc <= gap + 1000.0,
                "TSC step {tsc} us above gap {gap} us + 1 ms: {v}"
            );
            // The guest's gap holds the blackout, less the clock reads it made between the
            // VMM's pause and the kick landing (the clock port answers whole µs).
            let pause = v["phases_us"]["pause"].as_f64().unwrap();
            assert!(
                gap + pause + 2.0 >= blackout,
                "gap {gap} us, blackout {blackout} us: {v}"
            );
        }
    }
    let done = r.one("fleet-done");
    assert_eq!(done["ok"], true, "{done}");
    let checks = done["vms"].as_array().expect("vms");
    assert_eq!(checks.len(), vms);
    for c in checks {
        assert_eq!(c["ok"], true, "{c}");
        assert_eq!(c["irqs"], if irqchip { updates as u64 } else { 0 }, "{c}");
        let loops: Vec<u64> = c["loops"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect();
        assert_eq!(loops.len(), vcpus);
        assert!(loops.iter().all(|&l| l > 3), "every vCPU looped: {c}");
        assert_eq!(
            c["counter"].as_u64().unwrap(),
            loops.iter().sum::<u64>(),
            "{c}"
        );
        assert!(c["verified_bytes"].as_u64().unwrap() > 0, "{c}");
    }
}

/// One VM with 4 vCPUs and an irqchip: every vCPU resumes where it was.
#[test]
fn four_vcpu_guest_resumes_after_kexec() {
    if !kvm_available("four_vcpu_guest_resumes_after_kexec") {
        return;
    }
    let r = fleet(
        "fleet4",
        "1G",
        &["vms=1", "vcpus=4", "guest-mem=64M", "data=16M"],
    );
    check(&r, 1, 4, 1);
    let d = r.one("fleet-done");
    assert_eq!(d["vms"][0]["verified_bytes"], 16 << 20);
}

/// 8 VMs x 2 vCPUs of mixed sizes through two updates in a row: the guests run between them
/// and verify only after the second.
#[test]
fn eight_vms_two_vcpus_through_two_updates() {
    if !kvm_available("eight_vms_two_vcpus_through_two_updates") {
        return;
    }
    let r = fleet(
        "fleet8",
        "2G",
        &[
            "vms=8",
            "vcpus=2",
            "guest-mem=32M",
            "data=4M,8M,16M",
            "cycles=2",
        ],
    );
    check(&r, 8, 2, 2);
    for u in r.events("fleet-update") {
        // `bind=lazy` (the default): every guest_memfd memslot bound once all VMs ran again.
        assert_eq!(u["slots_bound_after_resume"], 8, "{u}");
        assert!(u["restore_cpu_us"].as_f64().unwrap() > 0.0, "{u}");
    }
    let sizes: Vec<u64> = r.one("fleet-done")["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["verified_bytes"].as_u64().unwrap())
        .collect();
    assert_eq!(sizes, [4, 8, 16, 4, 8, 16, 4, 8].map(|m: u64| m << 20));
}

/// Each VM's vCPUs retrieved before the VM (the last vCPU first), without an irqchip and with
/// one: the vCPU handler finds its VM through the cross-file API.
#[test]
fn vcpus_retrieved_before_their_vm() {
    if !kvm_available("vcpus_retrieved_before_their_vm") {
        return;
    }
    // With the irqchip, the memory is bound before the resume (`bind=eager`).
    for (irq, bind, on) in [
        ("irqchip=0", "bind=lazy", false),
        ("irqchip=1", "bind=eager", true),
    ] {
        let r = fleet(
            "fleet-order",
            "1G",
            &[
                "vms=2",
                "vcpus=3",
                "guest-mem=16M",
                "data=6M",
                "order=vcpus-first",
                irq,
                bind,
            ],
        );
        check_irqs(&r, 2, 3, 1, on);
        let late = if on { 0 } else { 2 };
        assert_eq!(r.one("fleet-update")["slots_bound_after_resume"], late);
    }
}

/// Bad options are refused before anything runs, with a clear error.
#[test]
fn bad_fleet_options_are_refused() {
    for bad in [
        "vms=0",
        "vcpus=17",
        "data=1",
        "order=sideways",
        "bind=sometimes",
    ] {
        let r = fleet("fleet-bad", "1G", &[bad]);
        assert_ne!(r.code, 0, "{bad}");
        let f: &Value = r.one("fleet-failed");
        assert!(
            f["error"]
                .as_str()
                .unwrap_or("")
                .contains(bad.split('=').next().unwrap()),
            "{bad}: {f}"
        );
    }
}
