//! VM files preserved with their state (`kvm_vm_luo_v2`): the in-kernel PIC/IOAPIC, the PIT,
//! the GSI routing, the TSS address and the clock come back on the retrieved VM; the RFC's
//! v1 (the type only) is still written with `--vm-luo v1` and read. Needs `/dev/kvm` (skips
//! loudly without it; `.ci/run` makes it fail instead).

mod common;

use handover::host::Host;
use handover::kexec::BootParams;
use handover::uapi::Pid;
use handover::vmm::libkvm::*;
use handover::vmm::libluo::*;
use zerocopy::IntoBytes;

const VM_TOKEN: u64 = 0x1001;
const VCPU_TOKEN: u64 = 0x1004;
const TSS: u64 = 0xfffb_d000;
/// `KVM_GET_IRQCHIP` / `KVM_SET_IRQCHIP` and the clock ioctls, as a VMM issues them.
const KVM_GET_IRQCHIP: u64 = 0xc208_ae62;
const KVM_SET_IRQCHIP: u64 = 0x8208_ae63;
const KVM_GET_CLOCK: u64 = 0x8030_ae7c;
const KVM_SET_CLOCK: u64 = 0x4030_ae7b;

fn setup(vm_luo_v1: bool) -> (Host, Pid, i32, i32) {
    let mut h = Host::boot(BootParams {
        ram_size: 256 << 20,
        vm_luo_v1,
        ..Default::default()
    })
    .unwrap();
    let pid = h.spawn();
    let kvm = open_kvm(&mut h, pid).unwrap();
    let vm = create_vm(&mut h, pid, kvm, 0).unwrap();
    let dev = h.open(pid, "/dev/liveupdate", 0).unwrap();
    (h, pid, vm, dev)
}

fn ioapic(h: &mut Host, pid: Pid, vm: i32) -> kvm_bindings::kvm_irqchip {
    let mut c = kvm_bindings::kvm_irqchip {
        chip_id: kvm_bindings::KVM_IRQCHIP_IOAPIC,
        ..Default::default()
    };
    h.ioctl(pid, vm, KVM_GET_IRQCHIP, c.as_mut_bytes()).unwrap();
    c
}

fn clock(h: &mut Host, pid: Pid, vm: i32) -> u64 {
    let mut c = kvm_bindings::kvm_clock_data::default();
    h.ioctl(pid, vm, KVM_GET_CLOCK, c.as_mut_bytes()).unwrap();
    c.clock
}

fn vm_file(h: &Host, pid: Pid, vm: i32) -> std::sync::Arc<handover::kvm::vm::VmInner> {
    h.vm_inner(h.fd_file(pid, vm).unwrap()).unwrap()
}

/// A VM with an irqchip, a PIT, a routing table, a TSS address, an IOAPIC redirection entry
/// and its clock set: after the kexec the retrieved VM has all of it (the routing and the TSS
/// address as recorded by the host, the rest as KVM reports it), its clock no earlier than
/// before and no further on than the time that passed; a vCPU retrieved with it has its LAPIC.
#[test]
fn vm_state_round_trip_with_irqchip_pit_routing_and_clock() {
    if !kvm_available("vm_state_round_trip_with_irqchip_pit_routing_and_clock") {
        return;
    }
    let (mut h, pid, vm, dev) = setup(false);
    create_irqchip(&mut h, pid, vm, TSS).unwrap();
    let mut io = ioapic(&mut h, pid, vm);
    // SAFETY: `kvm_irqchip.chip` is a plain-data union, and KVM filled its IOAPIC view.
    let mut state = unsafe { io.chip.ioapic };
    state.redirtbl[5] = kvm_bindings::kvm_ioapic_state__bindgen_ty_1 {
        bits: 0x0001_0000_0000_00a5,
    };
    io.chip = kvm_bindings::kvm_irqchip__bindgen_ty_1 { ioapic: state };
    h.ioctl(pid, vm, KVM_SET_IRQCHIP, io.as_mut_bytes())
        .unwrap();
    let mut c = kvm_bindings::kvm_clock_data {
        clock: 5_000_000_000,
        ..Default::default()
    };
    h.ioctl(pid, vm, KVM_SET_CLOCK, c.as_mut_bytes()).unwrap();
    let vcpu = create_vcpu(&mut h, pid, vm, 0).unwrap();
    let before_io = ioapic(&mut h, pid, vm);
    let before_clock = clock(&mut h, pid, vm);
    let routes = vm_file(&h, pid, vm).config().routes.clone().unwrap();
    assert_eq!(routes.len(), 39, "15 PIC pins and 24 IOAPIC pins recorded");

    let s = create_session(&mut h, pid, dev, "vm").unwrap();
    preserve_fd(&mut h, pid, s, vm, VM_TOKEN).unwrap();
    preserve_fd(&mut h, pid, s, vcpu, VCPU_TOKEN).unwrap();
    let t = std::time::Instant::now();
    let mut h = h.kexec_in_process().unwrap();
    let pid = h.spawn();
    let dev = h.open(pid, "/dev/liveupdate", 0).unwrap();
    let s = retrieve_session(&mut h, pid, dev, "vm").unwrap();
    let vm = retrieve_fd(&mut h, pid, s, VM_TOKEN).unwrap();
    let after_clock = clock(&mut h, pid, vm);
    let elapsed = t.elapsed().as_nanos() as u64;
    let vcpu = retrieve_fd(&mut h, pid, s, VCPU_TOKEN).unwrap();

    let after_io = ioapic(&mut h, pid, vm);
    assert_eq!(after_io.as_bytes(), before_io.as_bytes(), "IOAPIC state");
    // SAFETY: as above.
    assert_eq!(
        unsafe { after_io.chip.ioapic.redirtbl[5].bits },
        0x0001_0000_0000_00a5
    );
    assert!(after_clock >= before_clock, "the clock never goes back");
    assert!(
        after_clock <= before_clock + elapsed + 1_000_000,
        "the clock advanced {} ns in {elapsed} ns",
        after_clock - before_clock
    );
    let inner = vm_file(&h, pid, vm);
    let cfg = inner.config().clone();
    assert!(cfg.irqchip);
    assert_eq!(cfg.pit_flags, Some(kvm_bindings::KVM_PIT_SPEAKER_DUMMY));
    assert_eq!(cfg.tss_addr, Some(TSS));
    assert_eq!(
        cfg.routes.unwrap().as_bytes(),
        routes.as_bytes(),
        "routing table"
    );
    let v = h.vcpu(pid, vcpu).unwrap();
    let v = v.lock().unwrap();
    v.get_lapic().expect("the vCPU has its in-kernel LAPIC");
}

/// `--vm-luo v1` writes the RFC's blob (the type only); it is read back as before, and the
/// retrieved VM has none of the irqchip the old one had.
#[test]
fn vm_file_v1_still_written_and_read() {
    if !kvm_available("vm_file_v1_still_written_and_read") {
        return;
    }
    let (mut h, pid, vm, dev) = setup(true);
    create_irqchip(&mut h, pid, vm, TSS).unwrap();
    let s = create_session(&mut h, pid, dev, "v1").unwrap();
    preserve_fd(&mut h, pid, s, vm, VM_TOKEN).unwrap();
    assert_eq!(h.kho().labelled("kvm-vm").len(), 1, "a v1 blob");
    assert!(h.kho().labelled("kvm-vm-v2").is_empty(), "no v2 blob");
    let mut h = h.kexec_in_process().unwrap();
    assert!(h.params().vm_luo_v1, "the next image keeps writing v1");
    let pid = h.spawn();
    let dev = h.open(pid, "/dev/liveupdate", 0).unwrap();
    let s = retrieve_session(&mut h, pid, dev, "v1").unwrap();
    let vm = retrieve_fd(&mut h, pid, s, VM_TOKEN).unwrap();
    let cfg = vm_file(&h, pid, vm).config().clone();
    assert!(!cfg.irqchip && cfg.routes.is_none() && cfg.tss_addr.is_none());
    let mut c = kvm_bindings::kvm_irqchip::default();
    assert!(
        h.ioctl(pid, vm, KVM_GET_IRQCHIP, c.as_mut_bytes()).is_err(),
        "no irqchip on a VM retrieved from v1"
    );
}

fn rfc(tag: &str, args: &[&str], env: &[(&str, &str)]) -> common::Run {
    let mut a = vec!["guest-mem=16M", "data=5M", "prefault=1", "irqchip=1"];
    a.extend_from_slice(args);
    common::boot_env(tag, "1G", handover::vmm::rfc::PROGRAM, &a, &[], env)
}

/// The RFC scenario through a real kexec with an in-kernel irqchip, the vCPU state saved by
/// the VMM and by the kernel: the guest resumes and verifies all its data.
#[test]
fn guest_with_irqchip_resumes_after_kexec() {
    if !kvm_available("guest_with_irqchip_resumes_after_kexec") {
        return;
    }
    for vcpu in ["vcpu=vmm", "vcpu=kernel"] {
        let r = rfc(vcpu, &[vcpu], &[]);
        assert_eq!(r.code, 0, "{vcpu}: {}", r.stderr);
        let s2 = r.one("rfc-stage2");
        assert_eq!(s2["ok"], true, "{vcpu}: {s2}");
        assert_eq!(s2["verified_bytes"], 5 << 20);
        assert_eq!(s2["opts"]["irqchip"], true);
        eprintln!(
            "{vcpu}: blackout {} us, memslots {} us",
            s2["blackout_us"], s2["phases_us"]["resume_bind_memslots"]
        );
    }
}

/// A bit flipped in the VM blob or its state: refused by checksum, rolled back.
#[test]
fn flipped_vm_state_is_refused_by_checksum() {
    if !kvm_available("flipped_vm_state_is_refused_by_checksum") {
        return;
    }
    for kind in ["kvm-vm-v2", "kvm-vm-state"] {
        let flip = format!("flip:{kind}");
        let r = rfc(kind, &[], &[("HANDOVER_CORRUPT", &flip)]);
        common::assert_refused_by_checksum(&r, kind);
    }
}
