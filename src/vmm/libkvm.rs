//! User-space helpers for the KVM ioctls the host serves (what a VMM's KVM layer does):
//! argument structs byte for byte, errno results.

use zerocopy::IntoBytes;

use crate::abi::kvm::*;
use crate::host::Host;
use crate::uapi::{Pid, SysResult};

/// Open `/dev/kvm` (close-on-exec) in process `pid`.
pub fn open_kvm(h: &mut Host, pid: Pid) -> SysResult<i32> {
    h.open(pid, "/dev/kvm", crate::uapi::O_CLOEXEC)
}

/// `KVM_CREATE_VM` of `vm_type` on the `/dev/kvm` fd: the VM fd.
pub fn create_vm(h: &mut Host, pid: Pid, kvm: i32, vm_type: u64) -> SysResult<i32> {
    let mut a = vm_type.to_ne_bytes();
    Ok(h.ioctl(pid, kvm, KVM_CREATE_VM, &mut a)? as i32)
}

/// `KVM_CHECK_EXTENSION` of `cap` on a `/dev/kvm` or VM fd: the capability's value (0 if
/// absent).
pub fn check_extension(h: &mut Host, pid: Pid, fd: i32, cap: u64) -> SysResult<i64> {
    let mut a = cap.to_ne_bytes();
    h.ioctl(pid, fd, KVM_CHECK_EXTENSION, &mut a)
}

/// `KVM_CREATE_GUEST_MEMFD` on a VM fd: a guest_memfd of `size` bytes with
/// `GUEST_MEMFD_FLAG_*` `flags` (EINVAL for a bad size or flag); the fd is not close-on-exec.
pub fn create_guest_memfd(
    h: &mut Host,
    pid: Pid,
    vm: i32,
    size: u64,
    flags: u64,
) -> SysResult<i32> {
    create_guest_memfd_order(h, pid, vm, size, flags, 0)
}

/// `KVM_CREATE_GUEST_MEMFD` with a `page_order` (for `GUEST_MEMFD_FLAG_HUGETLB`).
pub fn create_guest_memfd_order(
    h: &mut Host,
    pid: Pid,
    vm: i32,
    size: u64,
    flags: u64,
    page_order: u8,
) -> SysResult<i32> {
    let mut a = CreateGuestMemfd {
        size,
        flags,
        page_order,
        ..Default::default()
    };
    Ok(h.ioctl(pid, vm, KVM_CREATE_GUEST_MEMFD, a.as_mut_bytes())? as i32)
}

/// `KVM_SET_MEMORY_ATTRIBUTES2` on the guest_memfd `gmem`: bytes `offset..offset+size` become
/// private (`private`) or shared. On EAGAIN, the error's offset is returned with it.
pub fn set_memory_attributes(
    h: &mut Host,
    pid: Pid,
    gmem: i32,
    offset: u64,
    size: u64,
    private: bool,
) -> Result<(), (crate::uapi::Errno, u64)> {
    let mut a = MemoryAttributes2 {
        offset,
        size,
        attributes: if private {
            KVM_MEMORY_ATTRIBUTE_PRIVATE
        } else {
            0
        },
        flags: 0,
        error_offset: 0,
        reserved: [0; 11],
    };
    match h.ioctl(pid, gmem, KVM_SET_MEMORY_ATTRIBUTES2, a.as_mut_bytes()) {
        Ok(_) => Ok(()),
        Err(e) => Err((e, a.error_offset)),
    }
}

/// A memslot: `size` bytes at `gpa`, backed by a guest_memfd range (`KVM_MEM_GUEST_MEMFD`)
/// or by `uaddr` in the caller's mappings.
#[derive(Debug, Clone, Copy)]
pub struct Region {
    /// Slot number.
    pub slot: u32,
    /// First guest physical address.
    pub gpa: u64,
    /// Size in bytes; 0 deletes the slot.
    pub size: u64,
    /// Address of the memory in the caller's mappings (unused with `gmem`).
    pub uaddr: u64,
    /// (guest_memfd fd, offset in it)
    pub gmem: Option<(i32, u64)>,
}

/// `KVM_SET_USER_MEMORY_REGION2` on a VM fd for `r`.
pub fn set_memory_region2(h: &mut Host, pid: Pid, vm: i32, r: Region) -> SysResult<()> {
    let mut r = UserMemoryRegion2 {
        slot: r.slot,
        flags: if r.gmem.is_some() {
            KVM_MEM_GUEST_MEMFD
        } else {
            0
        },
        guest_phys_addr: r.gpa,
        memory_size: r.size,
        userspace_addr: r.uaddr,
        guest_memfd_offset: r.gmem.map_or(0, |g| g.1),
        guest_memfd: r.gmem.map_or(0, |g| g.0 as u32),
        ..Default::default()
    };
    h.ioctl(pid, vm, KVM_SET_USER_MEMORY_REGION2, r.as_mut_bytes())?;
    Ok(())
}

/// `KVM_CREATE_VCPU` with vCPU `id` on a VM fd: the vCPU fd.
pub fn create_vcpu(h: &mut Host, pid: Pid, vm: i32, id: u64) -> SysResult<i32> {
    let mut a = id.to_ne_bytes();
    Ok(h.ioctl(pid, vm, KVM_CREATE_VCPU, &mut a)? as i32)
}

/// The in-kernel interrupt controllers and timer on a VM fd, before its first vCPU: the TSS
/// address KVM needs for real mode on Intel (`KVM_SET_TSS_ADDR` at `tss_addr`, three pages),
/// `KVM_CREATE_IRQCHIP` (PIC and IOAPIC; every vCPU then gets an in-kernel LAPIC),
/// `KVM_CREATE_PIT2` (flags `KVM_PIT_SPEAKER_DUMMY`) and a GSI routing table of the 24 IOAPIC
/// pins plus the 16 PIC ones (`KVM_SET_GSI_ROUTING`).
pub fn create_irqchip(h: &mut Host, pid: Pid, vm: i32, tss_addr: u64) -> SysResult<()> {
    let mut a = tss_addr.to_ne_bytes();
    h.ioctl(pid, vm, KVM_SET_TSS_ADDR, &mut a)?;
    h.ioctl(pid, vm, KVM_CREATE_IRQCHIP, &mut [])?;
    let mut pit = [0u8; 64];
    pit[..4].copy_from_slice(&kvm_bindings::KVM_PIT_SPEAKER_DUMMY.to_ne_bytes());
    h.ioctl(pid, vm, KVM_CREATE_PIT2, &mut pit)?;
    // nr, flags, then 48-byte entries: gsi, type (1 = irqchip), flags, pad, irqchip, pin.
    let mut routes: Vec<(u32, u32, u32)> = (0..16u32)
        .filter(|&g| g != 2)
        .map(|g| (g, g / 8, g % 8))
        .collect();
    routes.extend((0..24u32).map(|g| (g, 2, if g == 0 { 2 } else { g })));
    let mut arg = Vec::with_capacity(8 + routes.len() * 48);
    arg.extend_from_slice(&(routes.len() as u32).to_ne_bytes());
    arg.extend_from_slice(&0u32.to_ne_bytes());
    for (gsi, chip, pin) in routes {
        let mut e = [0u8; 48];
        e[0..4].copy_from_slice(&gsi.to_ne_bytes());
        e[4..8].copy_from_slice(&kvm_bindings::KVM_IRQ_ROUTING_IRQCHIP.to_ne_bytes());
        e[16..20].copy_from_slice(&chip.to_ne_bytes());
        e[20..24].copy_from_slice(&pin.to_ne_bytes());
        arg.extend_from_slice(&e);
    }
    h.ioctl(pid, vm, KVM_SET_GSI_ROUTING, &mut arg)?;
    Ok(())
}

/// `KVM_SIGNAL_MSI` on a VM fd with an in-kernel irqchip: a fixed, edge-triggered interrupt of
/// `vector` to the LAPIC with id `apic_id` (physical destination). KVM's answer: 1 delivered to
/// the LAPIC, 0 blocked (e.g. the LAPIC is software-disabled).
pub fn signal_msi(h: &mut Host, pid: Pid, vm: i32, apic_id: u8, vector: u8) -> SysResult<i64> {
    let mut a = [0u8; 32];
    let addr = 0xfee0_0000u32 | (u32::from(apic_id) << 12);
    a[0..4].copy_from_slice(&addr.to_ne_bytes());
    a[8..12].copy_from_slice(&u32::from(vector).to_ne_bytes());
    h.ioctl(pid, vm, KVM_SIGNAL_MSI, &mut a)
}

/// True if this machine has a usable /dev/kvm. Where it has none, tests skip loudly, unless
/// `HANDOVER_REQUIRE_KVM=1` (set by CI where /dev/kvm exists), which makes them fail.
pub fn kvm_available(test: &str) -> bool {
    match kvm_ioctls::Kvm::new() {
        Ok(_) => true,
        Err(e) => {
            if std::env::var("HANDOVER_REQUIRE_KVM").as_deref() == Ok("1") {
                panic!("{test}: /dev/kvm is required (HANDOVER_REQUIRE_KVM=1) but cannot be opened: {e}");
            }
            eprintln!(
                "SKIP: {test}: /dev/kvm is not available here ({e}); this KVM test did not run"
            );
            false
        }
    }
}

/// An I/O callback for [`Host::vcpu_run`] that runs the test guest until it reports: an `OUT`
/// to [`PORT_STATUS`](crate::vmm::guest::PORT_STATUS) stores the 32-bit status in `status` and
/// stops the run; other `IN`s read zeros, other `OUT`s are ignored, and any MMIO access stops
/// the run (with `status` still `None`).
pub fn status_io(
    status: &mut Option<u64>,
) -> impl FnMut(crate::kvm::IoEvent<'_>) -> crate::kvm::IoAction + '_ {
    use crate::kvm::{IoAction, IoEvent};
    move |ev| match ev {
        IoEvent::Out {
            port: crate::vmm::guest::PORT_STATUS,
            data,
        } => {
            let mut b = [0u8; 4];
            let n = data.len().min(4);
            b[..n].copy_from_slice(&data[..n]);
            *status = Some(u64::from(u32::from_le_bytes(b)));
            IoAction::Stop
        }
        IoEvent::In { data, .. } => {
            data.fill(0);
            IoAction::Continue
        }
        IoEvent::Out { .. } => IoAction::Continue,
        IoEvent::MmioRead { .. } | IoEvent::MmioWrite { .. } => IoAction::Stop,
    }
}
