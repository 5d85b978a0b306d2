//! Reliability: every failure point, injected (`HANDOVER_FAIL`), leaves either the old host
//! with its guest running (before the exec) or rolls back into the previous image with the guest
//! intact (after it); every kind of handover blob is checksummed; released memory is zeroed.

mod common;

use handover::vmm::libkvm::kvm_available;

fn rfc_with_env(tag: &str, env: (&str, &str)) -> common::Run {
    rfc_with(tag, env, &[])
}

fn rfc_with(tag: &str, env: (&str, &str), more: &[&str]) -> common::Run {
    let mut args = vec!["guest-mem=16M", "data=5M", "prefault=1"];
    args.extend_from_slice(more);
    common::boot_env(tag, "1G", handover::vmm::rfc::PROGRAM, &args, &[], &[env])
}

/// Before the exec: the update is refused or aborted, the old host keeps running, nothing
/// stays preserved, and the same guest resumes and verifies all its data.
fn refused_before_exec(point: &str) {
    refused_before_exec_with(point, &[]);
}

/// [`refused_before_exec`] with the vCPU preserved as a file (`vcpu=kernel`): the kernel reads
/// its state in the freeze.
fn refused_before_exec_kernel_vcpu(point: &str) {
    refused_before_exec_with(point, &["vcpu=kernel"]);
}

fn refused_before_exec_with(point: &str, more: &[&str]) {
    let r = rfc_with(point, ("HANDOVER_FAIL", &format!("{point}@0")), more);
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!(
            "fault injected at {}",
            point.split('#').next().unwrap()
        )),
        "{point}: fault not reached:\n{}",
        r.stderr
    );
    assert_eq!(r.code, 0, "{point}: {}", r.stderr);
    let a = r.one("rfc-aborted");
    assert_eq!(a["guest_status"], "verify-ok", "{point}: {a}");
    assert_eq!(a["verified_bytes"], 5 << 20);
    assert_eq!(a["kexec_count"], 0, "no kexec happened");
    assert_eq!(
        a["status_after"]["preserved"], 0,
        "{point}: everything unpreserved: {a}"
    );
    assert!(r.events("rfc-stage2").is_empty());
}

/// After the exec: the new image rolls back into the previous one, which still has the whole
/// handover, and the guest resumes there and verifies every byte.
fn rolled_back(point: &str) {
    let r = rfc_with_env(point, ("HANDOVER_FAIL", &format!("{point}@1")));
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    assert!(
        r.stderr.contains("fault injected"),
        "{point}: fault not reached:\n{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("rollback"),
        "{point}: no rollback:\n{}",
        r.stderr
    );
    assert_eq!(r.code, 0, "{point}: {}", r.stderr);
    let s2 = r.one("rfc-stage2");
    assert_eq!(s2["ok"], true, "{point}: {s2}");
    assert_eq!(s2["verified_bytes"], 5 << 20);
    assert!(
        s2["rollback"].as_str().is_some_and(|w| !w.is_empty()),
        "{point}: the surviving image says it was rolled back to: {s2}"
    );
}

macro_rules! fault_tests {
    ($($name:ident: $f:ident($point:expr);)*) => {$(
        #[test]
        fn $name() {
            if !kvm_available(stringify!($name)) {
                return;
            }
            $f($point);
        }
    )*};
}

fault_tests! {
    fail_preserve_handler: refused_before_exec("luo.preserve:guest_memfd_luo_v2");
    fail_kho_alloc: refused_before_exec("kho.alloc");
    fail_kho_preserve: refused_before_exec("kho.preserve");
    fail_freeze_guest_memfd: refused_before_exec("luo.freeze:guest_memfd_luo_v2");
    fail_freeze_memfd: refused_before_exec("luo.freeze:memfd-v2");
    fail_serialize: refused_before_exec("luo.serialize");
    fail_finalize: refused_before_exec("kho.finalize");
    fail_exec: refused_before_exec("kexec.exec");
    fail_boot_refuse_rolls_back: rolled_back("boot.refuse");
    fail_deserialize_rolls_back: rolled_back("luo.deserialize");
    fail_retrieve_guest_memfd_rolls_back: rolled_back("luo.retrieve:guest_memfd_luo_v2");
    fail_retrieve_vm_rolls_back: rolled_back("luo.retrieve:kvm_vm_luo_v2");
    fail_freeze_vm: refused_before_exec("luo.freeze:kvm_vm_luo_v2");
    fail_freeze_vcpu: refused_before_exec_kernel_vcpu("luo.freeze:kvm_vcpu_luo_v1");
    fail_vcpu_snapshot: refused_before_exec_kernel_vcpu("kvm.vcpu_snapshot");
    fail_restore_rolls_back: rolled_back("kho.restore");
}

/// A bit flipped in one kind of handover blob after it was written: the next image refuses the
/// handover by checksum (and so does the previous one it rolls back to), never uses it.
fn bit_flip(kind: &str) {
    let r = rfc_with_env(kind, ("HANDOVER_CORRUPT", &format!("flip:{kind}")));
    common::assert_refused_by_checksum(&r, kind);
}

macro_rules! flip_tests {
    ($($name:ident: $kind:expr;)*) => {$(
        #[test]
        fn $name() {
            if !kvm_available(stringify!($name)) {
                return;
            }
            bit_flip($kind);
        }
    )*};
}

flip_tests! {
    flip_fdt: "fdt";
    flip_tracker: "tracker";
    flip_kexec_metadata: "kexec-metadata";
    flip_integrity_table: "integrity";
    flip_integrity_entries: "integrity-entries";
    flip_luo_blob: "luo";
    flip_luo_sessions: "luo-sessions";
    flip_luo_files: "luo-files";
    flip_memfd_blob: "memfd";
    flip_memfd_folios: "memfd-folios";
    flip_guest_memfd_blob: "gmem";
    flip_guest_memfd_runs: "gmem-folios";
    flip_vm_blob: "kvm-vm-v2";
    flip_vm_state: "kvm-vm-state";
}

#[test]
fn memory_released_by_one_file_reads_as_zeros_in_another() {
    use handover::host::Host;
    use handover::kexec::BootParams;
    let mut h = Host::boot(BootParams {
        ram_size: 64 << 20,
        ..Default::default()
    })
    .unwrap();
    let pid = h.spawn();
    let a = h.memfd_create(pid, "a", 0).unwrap();
    h.pwrite(pid, a, &vec![0xa5u8; 1 << 20], 0).unwrap();
    let fa = h.fd_file(pid, a).unwrap();
    let frames_a: Vec<u64> = match h.files().kind(fa) {
        Some(handover::host::files::FileKind::Memfd(m)) => {
            m.pages.iter().map(|(_, pfn)| pfn).collect()
        }
        _ => unreachable!(),
    };
    h.close(pid, a).unwrap();
    let b = h.memfd_create(pid, "b", 0).unwrap();
    h.ftruncate(pid, b, 1 << 20).unwrap();
    h.fallocate(pid, b, 0, 0, 1 << 20).unwrap();
    let fb = h.fd_file(pid, b).unwrap();
    let frames_b: Vec<u64> = match h.files().kind(fb) {
        Some(handover::host::files::FileKind::Memfd(m)) => {
            m.pages.iter().map(|(_, pfn)| pfn).collect()
        }
        _ => unreachable!(),
    };
    assert!(
        frames_b.iter().any(|p| frames_a.contains(p)),
        "the second file reuses the first one's frames"
    );
    let mut buf = vec![1u8; 1 << 20];
    h.pread(pid, b, &mut buf, 0).unwrap();
    assert!(
        buf.iter().all(|&x| x == 0),
        "released memory is zeroed before reuse"
    );
}
