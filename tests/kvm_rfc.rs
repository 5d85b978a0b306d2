//! The RFC's guest_memfd preservation rules on the machine's real /dev/kvm, without running a
//! guest: which files are refused, and what a frozen guest_memfd does. (The guest scenarios
//! through a real kexec are in tests/kvm_kexec.rs.)

use handover::abi::kvm::*;
use handover::host::Host;
use handover::kexec::BootParams;
use handover::uapi::{Errno, Pid};
use handover::vmm::libkvm::*;
use handover::vmm::libluo::*;

const MIB: u64 = 1 << 20;
const BOTH: u64 = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;

fn setup() -> (Host, Pid, i32, i32) {
    let mut h = Host::boot(BootParams {
        ram_size: 256 << 20,
        ..Default::default()
    })
    .unwrap();
    let pid = h.spawn();
    let kvm = open_kvm(&mut h, pid).unwrap();
    let vm = create_vm(&mut h, pid, kvm, 0).unwrap();
    let dev = h.open(pid, "/dev/liveupdate", 0).unwrap();
    (h, pid, vm, dev)
}

#[test]
fn guest_memfd_creation_is_validated_like_6_18() {
    if !kvm_available("guest_memfd_creation_is_validated_like_6_18") {
        return;
    }
    let (mut h, pid, vm, _) = setup();
    assert_eq!(
        check_extension(&mut h, pid, vm, KVM_CAP_GUEST_MEMFD_FLAGS).unwrap() as u64,
        BOTH
    );
    assert_eq!(
        create_guest_memfd(&mut h, pid, vm, MIB, 1 << 5),
        Err(Errno::EINVAL)
    );
    assert_eq!(
        create_guest_memfd(&mut h, pid, vm, 0, BOTH),
        Err(Errno::EINVAL)
    );
    assert_eq!(
        create_guest_memfd(&mut h, pid, vm, 4097, BOTH),
        Err(Errno::EINVAL)
    );
    let g = create_guest_memfd(&mut h, pid, vm, MIB, 0).unwrap();
    assert_eq!(
        h.mmap(pid, g, 4096, libc::PROT_READ, libc::MAP_SHARED, 0),
        Err(Errno::ENODEV)
    );
    let g = create_guest_memfd(&mut h, pid, vm, MIB, GUEST_MEMFD_FLAG_MMAP).unwrap();
    assert_eq!(
        h.mmap(pid, g, 4096, libc::PROT_READ, libc::MAP_PRIVATE, 0),
        Err(Errno::EINVAL)
    );
    let m = h
        .mmap(pid, g, 4096, libc::PROT_READ, libc::MAP_SHARED, 0)
        .unwrap();
    let mut b = [0u8; 1];
    assert_eq!(
        h.user_read(pid, m.addr, &mut b),
        Err(Errno::EFAULT),
        "no INIT_SHARED: host fault is SIGBUS"
    );
    let g = create_guest_memfd(&mut h, pid, vm, MIB, BOTH).unwrap();
    let m = h
        .mmap(
            pid,
            g,
            2 * MIB,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            0,
        )
        .unwrap();
    h.user_write(pid, m.addr, b"shared").unwrap();
    assert_eq!(
        h.user_read(pid, m.addr + MIB as usize, &mut b),
        Err(Errno::EFAULT),
        "beyond size: SIGBUS"
    );
    assert_eq!(
        h.pread(pid, g, &mut b, 0),
        Err(Errno::EINVAL),
        "read() is not supported"
    );
    let keep = libc::FALLOC_FL_KEEP_SIZE;
    assert_eq!(
        h.fallocate(pid, g, 0, 0, 4096),
        Err(Errno::EOPNOTSUPP),
        "KEEP_SIZE required"
    );
    assert_eq!(h.fallocate(pid, g, keep, 1, 4096), Err(Errno::EINVAL));
    assert_eq!(
        h.fallocate(pid, g, keep, 0, 2 * MIB),
        Err(Errno::EINVAL),
        "beyond size"
    );
    h.fallocate(pid, g, keep, 0, 8192).unwrap();
}

#[test]
fn rfc_test_1_no_init_shared_is_refused() {
    if !kvm_available("rfc_test_1_no_init_shared_is_refused") {
        return;
    }
    let (mut h, pid, vm, dev) = setup();
    let s = create_session(&mut h, pid, dev, "no-init-shared").unwrap();
    let g = create_guest_memfd(&mut h, pid, vm, 16 * MIB, 0).unwrap();
    assert_eq!(preserve_fd(&mut h, pid, s, g, 0x9001), Err(Errno::ENOENT));
}

#[test]
fn rfc_test_2_mmap_only_is_refused() {
    if !kvm_available("rfc_test_2_mmap_only_is_refused") {
        return;
    }
    let (mut h, pid, vm, dev) = setup();
    let s = create_session(&mut h, pid, dev, "mmap-only").unwrap();
    let g = create_guest_memfd(&mut h, pid, vm, 16 * MIB, GUEST_MEMFD_FLAG_MMAP).unwrap();
    assert_eq!(preserve_fd(&mut h, pid, s, g, 0x9002), Err(Errno::ENOENT));
}

#[test]
fn rfc_test_3_non_guest_memfd_is_refused() {
    if !kvm_available("rfc_test_3_non_guest_memfd_is_refused") {
        return;
    }
    let (mut h, pid, _vm, dev) = setup();
    let s = create_session(&mut h, pid, dev, "non-gmem").unwrap();
    let null = h.open(pid, "/dev/null", 0).unwrap();
    assert_eq!(
        preserve_fd(&mut h, pid, s, null, 0x9003),
        Err(Errno::ENOENT)
    );
    // A memfd goes to the memfd handler, not the guest_memfd one.
    let mfd = h.memfd_create(pid, "m", 0).unwrap();
    let file = h.fd_file(pid, mfd).unwrap();
    assert!(!handover::luo::FileHandler::can_preserve(
        &handover::kvm::guest_memfd_luo::GuestMemfdHandler {
            format: handover::kvm::guest_memfd_luo::Format::V2
        },
        &h,
        file
    ));
}

#[test]
fn rfc_test_4_frozen_guest_memfd() {
    if !kvm_available("rfc_test_4_frozen_guest_memfd") {
        return;
    }
    let (mut h, pid, vm, dev) = setup();
    let s = create_session(&mut h, pid, dev, "session_frozen_ops").unwrap();
    let g = create_guest_memfd(&mut h, pid, vm, 16 * MIB, BOTH).unwrap();
    let m = h
        .mmap(
            pid,
            g,
            16 * MIB,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            0,
        )
        .unwrap();
    h.user_write(pid, m.addr, &[0x5a]).unwrap();
    preserve_fd(&mut h, pid, s, g, 0x8888).unwrap();
    let keep = libc::FALLOC_FL_KEEP_SIZE;
    assert_eq!(
        h.fallocate(pid, g, keep, 5 * MIB, 4096),
        Err(Errno::EPERM),
        "allocate while frozen"
    );
    assert_eq!(
        h.fallocate(pid, g, keep | libc::FALLOC_FL_PUNCH_HOLE, 0, 4096),
        Err(Errno::EPERM),
        "punch while frozen"
    );
    h.munmap(pid, m).unwrap();
    let m = h
        .mmap(
            pid,
            g,
            16 * MIB,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            0,
        )
        .unwrap();
    let mut b = [0u8; 1];
    h.user_read(pid, m.addr, &mut b).unwrap();
    assert_eq!(b[0], 0x5a, "present data intact");
    h.user_write(pid, m.addr, &[0x77]).unwrap();
    assert_eq!(
        h.user_read(pid, m.addr + 5 * MIB as usize, &mut b),
        Err(Errno::EFAULT),
        "never-faulted page: SIGBUS"
    );
    assert_eq!(
        finish(&mut h, pid, s),
        Err(Errno::EINVAL),
        "FINISH on an outgoing session"
    );
    // Closing the session unpreserves and unfreezes.
    h.close(pid, s).unwrap();
    h.fallocate(pid, g, keep, 5 * MIB, 4096).unwrap();
    h.user_read(pid, m.addr + 5 * MIB as usize, &mut b).unwrap();
    assert_eq!(b[0], 0);
    h.fallocate(pid, g, keep | libc::FALLOC_FL_PUNCH_HOLE, 0, 4096)
        .unwrap();
    assert_eq!(h.status().preserved, 0);
}

#[test]
fn guest_memfd_without_its_vm_refuses_the_kexec() {
    if !kvm_available("guest_memfd_without_its_vm_refuses_the_kexec") {
        return;
    }
    let (mut h, pid, vm, dev) = setup();
    let s = create_session(&mut h, pid, dev, "no-vm").unwrap();
    let g = create_guest_memfd(&mut h, pid, vm, MIB, BOTH).unwrap();
    h.fallocate(pid, g, libc::FALLOC_FL_KEEP_SIZE, 0, MIB)
        .unwrap();
    preserve_fd(&mut h, pid, s, g, 2).unwrap();
    let before = h.status();
    match h.kexec_in_process() {
        Err(handover::kexec::reboot::InProcessKexecError::Refused(h, e)) => {
            assert!(e.to_string().contains("ENOENT"), "{e}");
            assert_eq!(
                format!("{:?}", h.status()),
                format!("{before:?}"),
                "nothing changed"
            );
        }
        other => panic!("kexec must be refused: {other:?}"),
    }
}

#[test]
fn preserve_and_retrieve_in_either_order_without_a_guest() {
    if !kvm_available("preserve_and_retrieve_in_either_order_without_a_guest") {
        return;
    }
    for gmem_first in [false, true] {
        let (mut h, pid, vm, dev) = setup();
        let s = create_session(&mut h, pid, dev, "pair").unwrap();
        let g = create_guest_memfd(&mut h, pid, vm, 4 * MIB, BOTH).unwrap();
        let m = h
            .mmap(
                pid,
                g,
                4 * MIB,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                0,
            )
            .unwrap();
        h.user_write(pid, m.addr + 12345, b"guest bytes").unwrap();
        h.user_write(pid, m.addr + 3 * MIB as usize, b"far")
            .unwrap();
        preserve_fd(&mut h, pid, s, g, 0x1002).unwrap();
        preserve_fd(&mut h, pid, s, vm, 0x1001).unwrap();
        let present = 2;
        let mut h = h.kexec_in_process().unwrap();
        let pid = h.spawn();
        let dev = h.open(pid, "/dev/liveupdate", 0).unwrap();
        let s = retrieve_session(&mut h, pid, dev, "pair").unwrap();
        let (g, vm) = if gmem_first {
            let g = retrieve_fd(&mut h, pid, s, 0x1002).unwrap();
            (g, retrieve_fd(&mut h, pid, s, 0x1001).unwrap())
        } else {
            let vm = retrieve_fd(&mut h, pid, s, 0x1001).unwrap();
            (retrieve_fd(&mut h, pid, s, 0x1002).unwrap(), vm)
        };
        let gf = h.fd_file(pid, g).unwrap();
        match h.files().kind(gf) {
            Some(handover::host::files::FileKind::GuestMemfd(x)) => {
                assert_eq!(x.pages.nr_present(), present, "holes stay holes");
                assert!(!x.frozen, "a retrieved guest_memfd is not frozen");
                assert!(x.vm.name.starts_with("restored-"));
                assert!(std::ptr::eq(
                    x.vm.as_ref(),
                    h.vm_inner(h.fd_file(pid, vm).unwrap()).unwrap().as_ref()
                ));
            }
            _ => panic!("not a guest_memfd"),
        }
        let m = h
            .mmap(
                pid,
                g,
                4 * MIB,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                0,
            )
            .unwrap();
        let mut b = [0u8; 11];
        h.user_read(pid, m.addr + 12345, &mut b).unwrap();
        assert_eq!(&b, b"guest bytes");
        h.fallocate(pid, g, libc::FALLOC_FL_KEEP_SIZE, 0, 4096)
            .unwrap();
        finish(&mut h, pid, s).unwrap();
    }
}
