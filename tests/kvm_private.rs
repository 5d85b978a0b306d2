//! Private guest memory on a software-protected VM and in-place conversion
//! (`KVM_SET_MEMORY_ATTRIBUTES2` on the guest_memfd), on the machine's real /dev/kvm: the uAPI
//! rules and errnos, host access refused to private pages, contents kept in place across
//! conversions, conversions refused while frozen for preservation, and a private guest kept
//! running through a real kexec (the `gmem-rfc` scenario with `private=1`) in both retrieval
//! orders, its shared/private map handed over in `guest_memfd_luo_v3`.

mod common;

use handover::abi::kvm::*;
use handover::host::Host;
use handover::kexec::BootParams;
use handover::uapi::{Errno, Pid};
use handover::vmm::libkvm::*;
use handover::vmm::libluo::*;
use zerocopy::IntoBytes;

const MIB: u64 = 1 << 20;
const RW: i32 = libc::PROT_READ | libc::PROT_WRITE;

fn setup() -> (Host, Pid, i32, i32) {
    let mut h = Host::boot(BootParams {
        ram_size: 256 << 20,
        ..Default::default()
    })
    .unwrap();
    let pid = h.spawn();
    let kvm = open_kvm(&mut h, pid).unwrap();
    let vm = create_vm(&mut h, pid, kvm, KVM_X86_SW_PROTECTED_VM).unwrap();
    (h, pid, kvm, vm)
}

/// `KVM_SET_MEMORY_ATTRIBUTES2` with every field given.
fn attrs2(h: &mut Host, pid: Pid, gmem: i32, a: &mut MemoryAttributes2) -> Result<i64, Errno> {
    h.ioctl(pid, gmem, KVM_SET_MEMORY_ATTRIBUTES2, a.as_mut_bytes())
}

fn req(offset: u64, size: u64, attributes: u64) -> MemoryAttributes2 {
    MemoryAttributes2 {
        offset,
        size,
        attributes,
        flags: 0,
        error_offset: 0,
        reserved: [0; 11],
    }
}

#[test]
fn capabilities_and_vm_types() {
    if !kvm_available("capabilities_and_vm_types") {
        return;
    }
    let (mut h, pid, kvm, vm) = setup();
    let types = check_extension(&mut h, pid, kvm, KVM_CAP_VM_TYPES).unwrap() as u64;
    assert_eq!(
        types & 0b11,
        0b11,
        "default and software-protected VMs: {types:#x}"
    );
    let cap = KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES;
    assert_eq!(
        check_extension(&mut h, pid, kvm, cap).unwrap() as u64,
        KVM_MEMORY_ATTRIBUTE_PRIVATE
    );
    assert_eq!(
        check_extension(&mut h, pid, vm, cap).unwrap() as u64,
        KVM_MEMORY_ATTRIBUTE_PRIVATE
    );
    let plain = create_vm(&mut h, pid, kvm, 0).unwrap();
    assert_eq!(check_extension(&mut h, pid, plain, cap).unwrap(), 0);
    let flags = check_extension(&mut h, pid, vm, KVM_CAP_GUEST_MEMFD_FLAGS).unwrap() as u64;
    assert_eq!(
        flags & (GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED),
        GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED
    );
    // A VM type nobody has.
    assert!(create_vm(&mut h, pid, kvm, 7).is_err());
}

#[test]
fn conversion_rules_and_errnos() {
    if !kvm_available("conversion_rules_and_errnos") {
        return;
    }
    let (mut h, pid, kvm, vm) = setup();
    let g = create_guest_memfd(&mut h, pid, vm, 4 * MIB, GUEST_MEMFD_FLAG_MMAP).unwrap();
    let p = KVM_MEMORY_ATTRIBUTE_PRIVATE;
    let cases: Vec<(&str, MemoryAttributes2)> = vec![
        ("zero size", req(0, 0, 0)),
        ("unaligned offset", req(1, 4096, 0)),
        ("unaligned size", req(0, 4097, 0)),
        ("past the end", req(4 * MIB - 4096, 8192, 0)),
        ("overflow", req(u64::MAX - 4095, 8192, 0)),
        ("unknown attribute", req(0, 4096, 1 << 4)),
        (
            "flags",
            MemoryAttributes2 {
                flags: 1,
                ..req(0, 4096, 0)
            },
        ),
        (
            "reserved",
            MemoryAttributes2 {
                reserved: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                ..req(0, 4096, p)
            },
        ),
    ];
    for (what, mut a) in cases {
        assert_eq!(attrs2(&mut h, pid, g, &mut a), Err(Errno::EINVAL), "{what}");
    }
    assert_eq!(attrs2(&mut h, pid, g, &mut req(0, 4096, 0)), Ok(0));
    assert_eq!(attrs2(&mut h, pid, g, &mut req(0, 4 * MIB, p)), Ok(0));
    // A default VM has no private memory: its guest_memfd takes no conversion.
    let plain = create_vm(&mut h, pid, kvm, 0).unwrap();
    let pg = create_guest_memfd(
        &mut h,
        pid,
        plain,
        MIB,
        GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
    )
    .unwrap();
    assert_eq!(
        attrs2(&mut h, pid, pg, &mut req(0, 4096, p)),
        Err(Errno::EINVAL)
    );
    // On any other fd the ioctl does not exist.
    assert_eq!(
        attrs2(&mut h, pid, vm, &mut req(0, 4096, p)),
        Err(Errno::ENOTTY)
    );
}

#[test]
fn private_pages_are_refused_to_the_host_and_keep_their_contents() {
    if !kvm_available("private_pages_are_refused_to_the_host_and_keep_their_contents") {
        return;
    }
    let (mut h, pid, _, vm) = setup();
    // No INIT_SHARED on a private-memory VM: every page starts private.
    let g = create_guest_memfd(&mut h, pid, vm, MIB, GUEST_MEMFD_FLAG_MMAP).unwrap();
    let m = h.mmap(pid, g, MIB, RW, libc::MAP_SHARED, 0).unwrap();
    let mut b = [0u8; 3];
    assert_eq!(h.user_read(pid, m.addr, &mut b), Err(Errno::EFAULT));
    assert_eq!(h.user_write(pid, m.addr, b"abc"), Err(Errno::EFAULT));
    set_memory_attributes(&mut h, pid, g, 0, 8192, false).unwrap();
    h.user_write(pid, m.addr + 4096, b"abc").unwrap();
    // Private again: refused, and not zeroed ...
    set_memory_attributes(&mut h, pid, g, 0, 8192, true).unwrap();
    assert_eq!(h.user_read(pid, m.addr + 4096, &mut b), Err(Errno::EFAULT));
    // ... as shared again shows.
    set_memory_attributes(&mut h, pid, g, 4096, 4096, false).unwrap();
    h.user_read(pid, m.addr + 4096, &mut b).unwrap();
    assert_eq!(&b, b"abc");
    assert_eq!(
        h.user_read(pid, m.addr, &mut b),
        Err(Errno::EFAULT),
        "page 0 still private"
    );
    // INIT_SHARED on the same VM type: every page starts shared.
    let s = create_guest_memfd(
        &mut h,
        pid,
        vm,
        MIB,
        GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
    )
    .unwrap();
    let sm = h.mmap(pid, s, MIB, RW, libc::MAP_SHARED, 0).unwrap();
    h.user_write(pid, sm.addr, b"xyz").unwrap();
}

#[test]
fn a_frozen_guest_memfd_refuses_conversions() {
    if !kvm_available("a_frozen_guest_memfd_refuses_conversions") {
        return;
    }
    let (mut h, pid, _, vm) = setup();
    let g = create_guest_memfd(&mut h, pid, vm, MIB, GUEST_MEMFD_FLAG_MMAP).unwrap();
    let dev = h.open(pid, "/dev/liveupdate", 0).unwrap();
    let s = create_session(&mut h, pid, dev, "private").unwrap();
    preserve_fd(&mut h, pid, s, vm, 1).unwrap();
    preserve_fd(&mut h, pid, s, g, 2).unwrap();
    for private in [false, true] {
        assert_eq!(
            set_memory_attributes(&mut h, pid, g, 0, 4096, private),
            Err((Errno::EPERM, 0)),
            "frozen (private {private})"
        );
    }
    // Still EINVAL first for a bad argument, as the checks come before the freeze.
    assert_eq!(
        attrs2(&mut h, pid, g, &mut req(0, 0, 0)),
        Err(Errno::EINVAL)
    );
    // Closing the session unpreserves and unfreezes.
    h.close(pid, s).unwrap();
    set_memory_attributes(&mut h, pid, g, 0, 4096, false).unwrap();
}

/// The `gmem-rfc` scenario with `private=1` through a real kexec: it fails unless the guest
/// verified all 5 MiB after the update and both `rfc-private` checks passed (the shared part
/// read back through mmap, the private page after it refused, the map unchanged).
fn private_through_kexec(order: &str, shared: &str) {
    let tag = format!("private-{order}");
    let mut args = vec!["guest-mem=16M", "data=5M", "private=1"];
    let o = format!("order={order}");
    args.push(&o);
    let sh = format!("shared={shared}");
    args.push(&sh);
    let r = common::boot(&tag, "1G", handover::vmm::rfc::PROGRAM, &args, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let s2 = r.one("rfc-stage2");
    assert_eq!(s2["ok"], true, "{s2}");
    assert_eq!(s2["verified_bytes"], 5 << 20, "{s2}");
    let checks = r.events("rfc-private");
    assert_eq!(checks.len(), 2, "{checks:?}\n{}", r.stderr);
    let want_private =
        (16 << 20) / 4096 - handover::kexec::params::parse_size(shared).unwrap() / 4096;
    for (c, stage) in checks.iter().zip([1, 2]) {
        assert_eq!(c["stage"], stage, "{c}");
        assert_eq!(c["private_pages"], want_private, "{c}");
        assert_eq!(c["private_access"], "refused", "{c}");
    }
}

/// A bit flipped in the v3 blob or in its lists after they were written: the next image
/// refuses the handover by checksum and rolls back; the guest's data is never used wrong.
fn flipped(kind: &str) {
    let flip = format!("flip:{kind}");
    let r = common::boot_env(
        kind,
        "1G",
        handover::vmm::rfc::PROGRAM,
        &["data=5M", "private=1"],
        &[],
        &[("HANDOVER_CORRUPT", &flip)],
    );
    common::assert_refused_by_checksum(&r, kind);
}

// ---- HugeTLB guest_memfd: folios from the host's huge-page pool ----

const TWO_MIB: u64 = 2 << 20;

fn setup_huge(pool: &str) -> (Host, Pid, i32, i32) {
    let mut h = Host::boot(BootParams {
        ram_size: 256 << 20,
        hugepages: handover::mm::HugePageRequest::parse(pool).unwrap(),
        ..Default::default()
    })
    .unwrap();
    let pid = h.spawn();
    let kvm = open_kvm(&mut h, pid).unwrap();
    let vm = create_vm(&mut h, pid, kvm, KVM_X86_SW_PROTECTED_VM).unwrap();
    (h, pid, kvm, vm)
}

fn pool_2m(h: &Host) -> (u64, u64) {
    let s = h.hugepool().stats();
    let o = s.order(9).unwrap();
    (o.free, o.in_use)
}

const HUGE: u64 = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_HUGETLB;

#[test]
fn hugetlb_creation_rules() {
    if !kvm_available("hugetlb_creation_rules") {
        return;
    }
    // No pool: the flag is not offered and not taken.
    let (mut h, pid, _, vm) = setup();
    let flags = check_extension(&mut h, pid, vm, KVM_CAP_GUEST_MEMFD_FLAGS).unwrap() as u64;
    assert_eq!(flags & GUEST_MEMFD_FLAG_HUGETLB, 0);
    assert_eq!(
        create_guest_memfd_order(&mut h, pid, vm, TWO_MIB, HUGE, 9),
        Err(Errno::EINVAL)
    );
    let (mut h, pid, kvm, vm) = setup_huge("2M:4");
    let flags = check_extension(&mut h, pid, vm, KVM_CAP_GUEST_MEMFD_FLAGS).unwrap() as u64;
    assert_ne!(flags & GUEST_MEMFD_FLAG_HUGETLB, 0);
    for (what, size, flags, order) in [
        (
            "with INIT_SHARED",
            TWO_MIB,
            HUGE | GUEST_MEMFD_FLAG_INIT_SHARED,
            9,
        ),
        ("order without the flag", TWO_MIB, GUEST_MEMFD_FLAG_MMAP, 9),
        ("flag without an order", TWO_MIB, HUGE, 0),
        ("an order the pool has none of", 1 << 30, HUGE, 18),
        ("an unsupported order", TWO_MIB, HUGE, 10),
        ("size not a multiple of the folio", TWO_MIB + 4096, HUGE, 9),
    ] {
        assert_eq!(
            create_guest_memfd_order(&mut h, pid, vm, size, flags, order),
            Err(Errno::EINVAL),
            "{what}"
        );
    }
    // A default VM has no HugeTLB guest_memfd.
    let plain = create_vm(&mut h, pid, kvm, 0).unwrap();
    assert_eq!(
        create_guest_memfd_order(&mut h, pid, plain, TWO_MIB, HUGE, 9),
        Err(Errno::EINVAL)
    );
}

#[test]
fn hugetlb_folios_come_from_the_pool_and_go_back() {
    if !kvm_available("hugetlb_folios_come_from_the_pool_and_go_back") {
        return;
    }
    let (mut h, pid, _, vm) = setup_huge("2M:4");
    assert_eq!(pool_2m(&h), (4, 0));
    let g = create_guest_memfd_order(&mut h, pid, vm, 8 * MIB, HUGE, 9).unwrap();
    let keep = libc::FALLOC_FL_KEEP_SIZE;
    let punch = keep | libc::FALLOC_FL_PUNCH_HOLE;
    assert_eq!(h.fallocate(pid, g, keep, 4096, TWO_MIB), Err(Errno::EINVAL));
    assert_eq!(h.fallocate(pid, g, keep, 0, MIB), Err(Errno::EINVAL));
    h.fallocate(pid, g, keep, 0, 2 * TWO_MIB).unwrap();
    assert_eq!(pool_2m(&h), (2, 2));
    assert_eq!(h.fallocate(pid, g, punch, 0, MIB), Err(Errno::EINVAL));
    h.fallocate(pid, g, punch, 0, TWO_MIB).unwrap();
    assert_eq!(pool_2m(&h), (3, 1));
    // More than the pool holds: ENOMEM once it is empty.
    let g2 = create_guest_memfd_order(&mut h, pid, vm, 8 * MIB, HUGE, 9).unwrap();
    assert_eq!(h.fallocate(pid, g2, keep, 0, 8 * MIB), Err(Errno::ENOMEM));
    // Closing the files gives every folio back.
    h.close(pid, g).unwrap();
    h.close(pid, g2).unwrap();
    assert_eq!(pool_2m(&h), (4, 0));
}

#[test]
fn converting_part_of_a_huge_folio_splits_it_and_all_private_merges_it() {
    if !kvm_available("converting_part_of_a_huge_folio_splits_it_and_all_private_merges_it") {
        return;
    }
    let (mut h, pid, _, vm) = setup_huge("2M:4");
    let g = create_guest_memfd_order(&mut h, pid, vm, 4 * MIB, HUGE, 9).unwrap();
    h.fallocate(pid, g, libc::FALLOC_FL_KEEP_SIZE, 0, 4 * MIB)
        .unwrap();
    let file = h.fd_file(pid, g).unwrap();
    let split = |h: &Host| match h.files().kind(file) {
        Some(handover::host::files::FileKind::GuestMemfd(g)) => (
            g.split.ranges().collect::<Vec<_>>(),
            g.folio_runs()
                .iter()
                .map(|r| (r.2, r.3))
                .collect::<Vec<_>>(),
        ),
        _ => panic!("not a guest_memfd"),
    };
    assert_eq!(split(&h), (vec![], vec![(1024, 9)]));
    // One page of the second folio shared: that folio goes to 4 KiB pages.
    set_memory_attributes(&mut h, pid, g, 3 * MIB, 4096, false).unwrap();
    assert_eq!(split(&h), (vec![(512, 1024)], vec![(512, 9), (512, 0)]));
    let m = h.mmap(pid, g, 4 * MIB, RW, libc::MAP_SHARED, 0).unwrap();
    h.user_write(pid, m.addr + 3 * MIB as usize, b"huge")
        .unwrap();
    // Private again, the whole folio: merged back.
    set_memory_attributes(&mut h, pid, g, 3 * MIB, 4096, true).unwrap();
    assert_eq!(split(&h), (vec![], vec![(1024, 9)]));
    let mut b = [0u8; 4];
    assert_eq!(
        h.user_read(pid, m.addr + 3 * MIB as usize, &mut b),
        Err(Errno::EFAULT)
    );
}

/// A private guest backed by 2 MiB folios through a real kexec: the folios the guest wrote
/// come back whole (order 9), the one with a shared part split, the pool accounts for them in
/// the new image as in the old one, and the guest verifies its data.
fn huge_through_kexec(order: &str) {
    let tag = format!("huge-{order}");
    let o = format!("order={order}");
    let args = [
        "guest-mem=16M",
        "data=5M",
        "private=1",
        "huge=9",
        "shared=1M",
        &o,
    ];
    let r = common::boot(
        &tag,
        "1G",
        handover::vmm::rfc::PROGRAM,
        &args,
        &["--hugepages", "2M:16"],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.one("rfc-stage2")["ok"], true);
    let checks = r.events("rfc-private");
    assert_eq!(checks.len(), 2, "{}", r.stderr);
    for c in checks {
        // 5 MiB of data touches three 2 MiB folios; the first holds the shared MiB.
        assert_eq!(c["huge_folio_pages"], 1024, "{c}");
        assert_eq!(c["split_pages"], 512, "{c}");
        assert_eq!(c["small_pages"], 512, "{c}");
        assert_eq!(c["hugepages"]["2M"]["in_use"], 3, "{c}");
        assert_eq!(c["hugepages"]["2M"]["total"], 16, "{c}");
    }
}

/// The scenarios through a real kexec, each skipped loudly without /dev/kvm.
macro_rules! kvm_scenarios {
    ($($name:ident: $call:expr;)*) => {$(
        #[test]
        fn $name() {
            if !kvm_available(stringify!($name)) {
                return;
            }
            $call;
        }
    )*};
}

kvm_scenarios! {
    private_guest_through_kexec_vm_first: private_through_kexec("vm-first", "1M");
    private_guest_through_kexec_gmem_first: private_through_kexec("gmem-first", "12K");
    flip_guest_memfd_v3_blob: flipped("gmem-v3");
    flip_guest_memfd_v3_lists: flipped("gmem-v3-lists");
    huge_private_guest_through_kexec_vm_first: huge_through_kexec("vm-first");
    huge_private_guest_through_kexec_gmem_first: huge_through_kexec("gmem-first");
}
