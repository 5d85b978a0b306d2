//! vCPU files preserved by the kernel (`kvm_vcpu_luo_v1`): the handler saves the vCPU's state
//! at freeze and retrieve gives a vCPU of the retrieved VM with it loaded, in any order with
//! the VM; a running vCPU refuses the freeze; a damaged blob is refused by checksum. Needs
//! `/dev/kvm` (skips loudly without it; `.ci/run` makes it fail instead).

mod common;

use handover::host::Host;
use handover::kexec::BootParams;
use handover::uapi::Pid;
use handover::vmm::libkvm::*;
use handover::vmm::libluo::*;

const VM_TOKEN: u64 = 0x1001;
const VCPU_TOKEN: u64 = 0x1004;

fn setup() -> (Host, Pid, i32, i32, i32) {
    let mut h = Host::boot(BootParams {
        ram_size: 256 << 20,
        ..Default::default()
    })
    .unwrap();
    let pid = h.spawn();
    let kvm = open_kvm(&mut h, pid).unwrap();
    let vm = create_vm(&mut h, pid, kvm, 0).unwrap();
    let vcpu = create_vcpu(&mut h, pid, vm, 3).unwrap();
    let dev = h.open(pid, "/dev/liveupdate", 0).unwrap();
    (h, pid, vm, vcpu, dev)
}

/// The vCPU's TSC (`IA32_TSC`) and its frequency in kHz.
fn tsc(h: &mut Host, pid: Pid, vcpu: i32) -> (u64, u64) {
    let v = h.vcpu(pid, vcpu).unwrap();
    let v = v.lock().unwrap();
    let mut m = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
        index: 0x10,
        ..Default::default()
    }])
    .unwrap();
    assert_eq!(v.get_msrs(&mut m).unwrap(), 1);
    (m.as_slice()[0].data, u64::from(v.get_tsc_khz().unwrap()))
}

fn regs(h: &mut Host, pid: Pid, vcpu: i32) -> kvm_bindings::kvm_regs {
    let v = h.vcpu(pid, vcpu).unwrap();
    let v = v.lock().unwrap();
    v.get_regs().unwrap()
}

/// Registers, a segment and an MSR set on the vCPU before the kexec come back on the retrieved
/// vCPU (same id, on the retrieved VM), whether the vCPU or the VM is retrieved first.
#[test]
fn vcpu_state_round_trip_in_either_order() {
    if !kvm_available("vcpu_state_round_trip_in_either_order") {
        return;
    }
    for vcpu_first in [false, true] {
        let (mut h, pid, vm, vcpu, dev) = setup();
        {
            let v = h.vcpu(pid, vcpu).unwrap();
            let v = v.lock().unwrap();
            let mut r = v.get_regs().unwrap();
            r.rax = 0x1122_3344_5566_7788;
            r.r15 = 0xfeed_f00d;
            r.rip = 0x4000;
            r.rflags = 0x2 | 0x40;
            v.set_regs(&r).unwrap();
            let mut s = v.get_sregs().unwrap();
            s.ds.base = 0x12_3000;
            s.ds.selector = 0x18;
            v.set_sregs(&s).unwrap();
        }
        let before = regs(&mut h, pid, vcpu);
        let (tsc_before, khz) = tsc(&mut h, pid, vcpu);
        let t = std::time::Instant::now();
        let s = create_session(&mut h, pid, dev, "vcpu").unwrap();
        preserve_fd(&mut h, pid, s, vm, VM_TOKEN).unwrap();
        preserve_fd(&mut h, pid, s, vcpu, VCPU_TOKEN).unwrap();
        let mut h = h.kexec_in_process().unwrap();
        let pid = h.spawn();
        let dev = h.open(pid, "/dev/liveupdate", 0).unwrap();
        let s = retrieve_session(&mut h, pid, dev, "vcpu").unwrap();
        let (vm, vcpu) = if vcpu_first {
            let c = retrieve_fd(&mut h, pid, s, VCPU_TOKEN).unwrap();
            (retrieve_fd(&mut h, pid, s, VM_TOKEN).unwrap(), c)
        } else {
            let m = retrieve_fd(&mut h, pid, s, VM_TOKEN).unwrap();
            (m, retrieve_fd(&mut h, pid, s, VCPU_TOKEN).unwrap())
        };
        let (tsc_after, _) = tsc(&mut h, pid, vcpu);
        let elapsed_ns = t.elapsed().as_nanos() as u64;
        assert!(tsc_after >= tsc_before, "the TSC never goes back");
        assert!(
            (tsc_after - tsc_before) * 1_000_000 / khz <= elapsed_ns + 1_000_000,
            "TSC advanced {} ticks at {khz} kHz in {elapsed_ns} ns",
            tsc_after - tsc_before
        );
        let after = regs(&mut h, pid, vcpu);
        assert_eq!(after.rax, before.rax, "vcpu_first={vcpu_first}");
        assert_eq!(after.r15, before.r15);
        assert_eq!(after.rip, before.rip);
        assert_eq!(after.rflags, before.rflags);
        {
            let v = h.vcpu(pid, vcpu).unwrap();
            let v = v.lock().unwrap();
            let sr = v.get_sregs().unwrap();
            assert_eq!((sr.ds.base, sr.ds.selector), (0x12_3000, 0x18));
        }
        let vf = h.fd_file(pid, vcpu).unwrap();
        let vm_file = h.fd_file(pid, vm).unwrap();
        match h.files().kind(vf) {
            Some(handover::host::files::FileKind::Vcpu(v)) => {
                assert_eq!(v.id, 3, "same vCPU id");
                assert_eq!(v.vm, vm_file, "a vCPU of the retrieved VM");
            }
            _ => panic!("not a vCPU file"),
        }
        finish(&mut h, pid, s).unwrap();
    }
}

/// A vCPU inside KVM_RUN (its lock held, as `Host::vcpu_run` holds it) cannot be frozen: the
/// kexec is refused with EBUSY and nothing changes; once it is paused the kexec goes through.
#[test]
fn running_vcpu_refuses_the_freeze() {
    if !kvm_available("running_vcpu_refuses_the_freeze") {
        return;
    }
    let (mut h, pid, vm, vcpu, dev) = setup();
    let s = create_session(&mut h, pid, dev, "busy").unwrap();
    preserve_fd(&mut h, pid, s, vm, VM_TOKEN).unwrap();
    preserve_fd(&mut h, pid, s, vcpu, VCPU_TOKEN).unwrap();
    let v = h.vcpu(pid, vcpu).unwrap();
    let running = v.lock().unwrap();
    let before = format!("{:?}", h.status());
    let h = match h.kexec_in_process() {
        Err(handover::kexec::reboot::InProcessKexecError::Refused(h, e)) => {
            assert!(e.to_string().contains("EBUSY"), "{e}");
            assert_eq!(format!("{:?}", h.status()), before, "nothing changed");
            h
        }
        other => panic!("kexec must be refused: {other:?}"),
    };
    drop(running);
    let mut h = h
        .kexec_in_process()
        .expect("paused: the kexec goes through");
    let pid = h.spawn();
    let dev = h.open(pid, "/dev/liveupdate", 0).unwrap();
    let s = retrieve_session(&mut h, pid, dev, "busy").unwrap();
    retrieve_fd(&mut h, pid, s, VCPU_TOKEN).unwrap();
}

/// Six vCPUs of one VM: each retrieved vCPU gets its own state. One of them held (as inside
/// `KVM_RUN`) refuses the freeze with EBUSY; after it is let go the kexec goes through with
/// every state as it is then, a change made after the refused attempt included.
#[test]
fn six_vcpus_each_get_their_own_state_back() {
    if !kvm_available("six_vcpus_each_get_their_own_state_back") {
        return;
    }
    let (mut h, pid, vm, _, dev) = setup();
    let vcpus: Vec<i32> = (10..16)
        .map(|id| create_vcpu(&mut h, pid, vm, id).unwrap())
        .collect();
    let set_rax = |h: &mut Host, k: usize, v: u64| {
        let c = h.vcpu(pid, vcpus[k]).unwrap();
        let c = c.lock().unwrap();
        let mut r = c.get_regs().unwrap();
        r.rax = v;
        c.set_regs(&r).unwrap();
    };
    for k in 0..vcpus.len() {
        set_rax(&mut h, k, 0xa000 + k as u64);
    }
    let s = create_session(&mut h, pid, dev, "six").unwrap();
    preserve_fd(&mut h, pid, s, vm, VM_TOKEN).unwrap();
    for (k, &c) in vcpus.iter().enumerate() {
        preserve_fd(&mut h, pid, s, c, VCPU_TOKEN + k as u64).unwrap();
    }
    // Held early in the freeze order: the states saved ahead for the later ones are unused.
    let held = h.vcpu(pid, vcpus[1]).unwrap();
    let running = held.lock().unwrap();
    let mut h = match h.kexec_in_process() {
        Err(handover::kexec::reboot::InProcessKexecError::Refused(h, e)) => {
            assert!(e.to_string().contains("EBUSY"), "{e}");
            h
        }
        other => panic!("kexec must be refused: {other:?}"),
    };
    drop(running);
    // Changed after the refused attempt: the kexec must save it again.
    set_rax(&mut h, 5, 0xb005);
    let mut h = h
        .kexec_in_process()
        .expect("all paused: the kexec goes through");
    let pid = h.spawn();
    let dev = h.open(pid, "/dev/liveupdate", 0).unwrap();
    let s = retrieve_session(&mut h, pid, dev, "six").unwrap();
    retrieve_fd(&mut h, pid, s, VM_TOKEN).unwrap();
    for k in 0..vcpus.len() {
        let c = retrieve_fd(&mut h, pid, s, VCPU_TOKEN + k as u64).unwrap();
        let want = if k == 5 { 0xb005 } else { 0xa000 + k as u64 };
        assert_eq!(regs(&mut h, pid, c).rax, want, "vCPU {k}");
    }
    finish(&mut h, pid, s).unwrap();
}

/// A vCPU whose VM is not in the session cannot be frozen (its blob would name no VM).
#[test]
fn vcpu_without_its_vm_refuses_the_kexec() {
    if !kvm_available("vcpu_without_its_vm_refuses_the_kexec") {
        return;
    }
    let (mut h, pid, _vm, vcpu, dev) = setup();
    let s = create_session(&mut h, pid, dev, "alone").unwrap();
    preserve_fd(&mut h, pid, s, vcpu, VCPU_TOKEN).unwrap();
    match h.kexec_in_process() {
        Err(handover::kexec::reboot::InProcessKexecError::Refused(_, e)) => {
            assert!(e.to_string().contains("kvm_vcpu_luo_v1"), "{e}");
        }
        other => panic!("kexec must be refused: {other:?}"),
    }
}

fn rfc(tag: &str, args: &[&str], env: &[(&str, &str)]) -> common::Run {
    let mut a = vec!["guest-mem=16M", "data=5M", "prefault=1", "vcpu=kernel"];
    a.extend_from_slice(args);
    common::boot_env(tag, "1G", handover::vmm::rfc::PROGRAM, &a, &[], env)
}

/// The RFC scenario through a real kexec with the vCPU preserved by the kernel, in every
/// retrieve order: the guest resumes where it was and verifies all its data.
#[test]
fn guest_resumes_from_kernel_saved_vcpu_in_every_order() {
    if !kvm_available("guest_resumes_from_kernel_saved_vcpu_in_every_order") {
        return;
    }
    for order in ["vm-first", "gmem-first", "vcpu-first"] {
        let arg = format!("order={order}");
        let r = rfc(order, &[&arg], &[]);
        assert_eq!(r.code, 0, "{order}: {}", r.stderr);
        let s2 = r.one("rfc-stage2");
        assert_eq!(s2["ok"], true, "{order}: {s2}");
        assert_eq!(s2["verified_bytes"], 5 << 20);
        assert_eq!(s2["order"], order);
        assert_eq!(s2["vcpu_state_by"], "kvm_vcpu_luo_v1");
    }
}

/// A bit flipped in the vCPU blob or in its state after they were written: the next image
/// refuses the handover by checksum and rolls back.
#[test]
fn flipped_vcpu_blobs_are_refused_by_checksum() {
    if !kvm_available("flipped_vcpu_blobs_are_refused_by_checksum") {
        return;
    }
    for kind in ["kvm-vcpu", "kvm-vcpu-state"] {
        let flip = format!("flip:{kind}");
        let r = rfc(kind, &[], &[("HANDOVER_CORRUPT", &flip)]);
        common::assert_refused_by_checksum(&r, kind);
    }
}
