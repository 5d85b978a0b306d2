//! The VM as the VMM builds it: low memory in a memfd at GPA 0 holding the guest program, the
//! guest_memfd at 4 GiB bound as chunked memslots, one vCPU; running it on a thread, reading
//! its mailbox, pointing it back at the start of its program.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::abi::kvm::{
    GUEST_MEMFD_FLAG_HUGETLB, GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP,
    KVM_X86_SW_PROTECTED_VM,
};
use crate::host::Host;
use crate::kvm::vcpu::VcpuKicker;
use crate::kvm::RunExit;
use crate::uapi::{Pid, UserMapping};
use crate::vmm::guest::{self, GuestMode, GuestParams};
use crate::vmm::libkvm::{self, Region};
use crate::vmm::slots::GuestMemSlots;

use super::devices::{io_handler, GuestIo};
use super::options::Options;
use super::{e, lock, GMEM_GPA};

/// The VM as the VMM sets it up: low memory in a memfd at GPA 0, the guest_memfd at 4 GiB.
pub(crate) struct Vm {
    /// The VMM's process.
    pub(crate) pid: Pid,
    /// Its fds: the VM, the guest_memfd, the low-memory memfd, the vCPU.
    pub(crate) vm: i32,
    pub(crate) gmem: i32,
    pub(crate) low: i32,
    /// Low memory mapped into the VMM (slot 0 points at it).
    pub(crate) low_map: UserMapping,
    pub(crate) vcpu: i32,
}

/// Bind low memory (slot 0) and the guest_memfd (chunked slots, all of them if `eager`, else
/// only the first). The vCPU is the caller's: created after this, a VM with a pending irqchip
/// (`kvm_vm_luo_v2`) gets it only then, and the memslots bound before it cost no irqchip
/// penalty (docs/kvm-probe.md).
pub(crate) fn bind(
    h: &mut Host,
    pid: Pid,
    vm: i32,
    gmem: i32,
    low: i32,
    o: &Options,
    eager: bool,
) -> Result<(UserMapping, Arc<GuestMemSlots>), String> {
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    let low_map = h
        .mmap(
            pid,
            low,
            guest::LOW_MEM_SIZE as u64,
            rw,
            libc::MAP_SHARED,
            0,
        )
        .map_err(e("mmap low memory"))?;
    let r = Region {
        slot: 0,
        gpa: 0,
        size: guest::LOW_MEM_SIZE as u64,
        uaddr: low_map.addr as u64,
        gmem: None,
    };
    libkvm::set_memory_region2(h, pid, vm, r).map_err(e("memslot 0"))?;
    let slots = GuestMemSlots::new(pid, vm, gmem, GMEM_GPA, o.slot_size(), o.slot_chunk);
    if eager {
        slots.bind_all(h)?;
    } else {
        slots.bind(h, 0)?;
    }
    Ok((low_map, slots))
}

/// Where KVM's real-mode TSS goes (three pages): just below 4 GiB, where QEMU puts it, clear of
/// the guest's low memory and of its guest_memfd at `GMEM_GPA` (4 GiB).
pub(crate) const TSS_ADDR: u64 = 0xfffb_d000;

pub(super) fn setup(h: &mut Host, pid: Pid, o: &Options) -> Result<Vm, String> {
    let kvm = libkvm::open_kvm(h, pid).map_err(e("open /dev/kvm"))?;
    // `private`: a software-protected VM, its guest_memfd private from the start.
    // `huge`: HugeTLB folios from the host's pool (such a file starts private too).
    let (vm_type, flags) = if o.private {
        let huge = if o.huge > 0 {
            GUEST_MEMFD_FLAG_HUGETLB
        } else {
            0
        };
        (KVM_X86_SW_PROTECTED_VM, GUEST_MEMFD_FLAG_MMAP | huge)
    } else {
        (0, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED)
    };
    let vm = libkvm::create_vm(h, pid, kvm, vm_type).map_err(e("KVM_CREATE_VM"))?;
    if o.irqchip {
        libkvm::create_irqchip(h, pid, vm, TSS_ADDR).map_err(e("irqchip"))?;
    }
    let gmem = libkvm::create_guest_memfd_order(h, pid, vm, o.guest_mem, flags, o.huge as u8)
        .map_err(e("KVM_CREATE_GUEST_MEMFD"))?;
    if let Some(seed) = o.fragment {
        let v = super::fragment::populate(h, pid, vm, gmem, o, seed)?;
        h.report("rfc-fragment", v);
    } else if o.populate {
        h.fallocate(pid, gmem, libc::FALLOC_FL_KEEP_SIZE, 0, o.guest_mem)
            .map_err(e("fallocate"))?;
    } else if o.prefault {
        h.fallocate(
            pid,
            gmem,
            libc::FALLOC_FL_KEEP_SIZE,
            0,
            o.data.div_ceil(4096 << o.huge) * (4096 << o.huge),
        )
        .map_err(e("fallocate"))?;
    }
    if o.populate_write {
        write_pattern(h, pid, gmem, o.guest_mem)?;
    }
    let low = h.memfd_create(pid, "guest-low", 0).map_err(e("memfd"))?;
    let mut img = vec![0u8; guest::LOW_MEM_SIZE];
    let params = GuestParams {
        data_gpa: GMEM_GPA,
        data_len: o.data,
        mode: o.guest_mode(),
    };
    guest::build_image(&mut img, &params).map_err(e("guest image"))?;
    h.pwrite(pid, low, &img, 0)
        .map_err(e("write guest image"))?;
    let (low_map, _slots) = bind(h, pid, vm, gmem, low, o, true)?;
    let vcpu = libkvm::create_vcpu(h, pid, vm, 0).map_err(e("create vCPU"))?;
    let kvm_sys = h.real_kvm().map_err(e("kvm"))?;
    // Ask the XSAVE size now, not in the first save inside the blackout.
    crate::kvm::vcpu::init_xsave_size(&kvm_sys);
    let v = h.vcpu(pid, vcpu).map_err(e("vcpu"))?;
    let v = v.lock().map_err(|_| "vcpu lock".to_string())?;
    guest::configure_vcpu(&kvm_sys, &v).map_err(e("configure vCPU"))?;
    Ok(Vm {
        pid,
        vm,
        gmem,
        low,
        low_map,
        vcpu,
    })
}

/// The guest's report from its mailbox in low memory.
pub(crate) fn read_mailbox(h: &mut Host, vm: &Vm) -> Result<guest::GuestReport, String> {
    let mut mb = [0u8; guest::MAILBOX_LEN];
    h.user_read(
        vm.pid,
        vm.low_map.addr + guest::MAILBOX_GPA as usize,
        &mut mb,
    )
    .map_err(e("read mailbox"))?;
    guest::read_report(&mb).map_err(e("mailbox"))
}

/// Run the guest on its own thread until `stop` says so; returns how the run ended.
pub(super) fn spawn_guest(
    shared: &Arc<Mutex<Host>>,
    vm: &Vm,
    io: Arc<GuestIo>,
    kicker: Arc<VcpuKicker>,
) -> std::thread::JoinHandle<Result<RunExit, String>> {
    let (shared, pid, fd) = (shared.clone(), vm.pid, vm.vcpu);
    std::thread::spawn(move || {
        let _target = kicker.register_current_thread().map_err(e("kicker"))?;
        let mut handler = io_handler(&io, GuestMode::RunUpdate, None);
        Host::vcpu_run(&shared, pid, fd, &mut handler).map_err(e("KVM_RUN"))
    })
}

/// Poll `cond` until it holds, or fail after `timeout`.
pub(super) fn wait_for(
    what: &str,
    timeout: Duration,
    mut cond: impl FnMut() -> bool,
) -> Result<(), String> {
    let t = Instant::now();
    while !cond() {
        if t.elapsed() > timeout {
            return Err(format!("timed out waiting for {what}"));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    Ok(())
}

/// Point the guest back at the start of its program (write, then wait for the next update).
pub(super) fn restart_guest(shared: &Arc<Mutex<Host>>, vm: Vm, o: &Options) -> Result<Vm, String> {
    let mut h = lock(shared);
    let mut mb = [0u8; guest::MAILBOX_LEN];
    let params = GuestParams {
        data_gpa: GMEM_GPA,
        data_len: o.data,
        mode: o.guest_mode(),
    };
    guest::write_params(&mut mb, &params).map_err(e("guest params"))?;
    h.user_write(vm.pid, vm.low_map.addr + guest::MAILBOX_GPA as usize, &mb)
        .map_err(e("mailbox"))?;
    // Registers back to the start (CPUID stays: KVM refuses to change it once a vCPU ran).
    let v = h.vcpu(vm.pid, vm.vcpu).map_err(e("vcpu"))?;
    let v = v.lock().map_err(|_| "vcpu lock".to_string())?;
    let base = v.get_sregs().map_err(e("get sregs"))?;
    v.set_sregs(&guest::initial_sregs(base))
        .map_err(e("set sregs"))?;
    v.set_regs(&guest::initial_regs()).map_err(e("set regs"))?;
    drop(v);
    Ok(vm)
}

/// `populate=write`: the guest's pattern in all `len` bytes of `gmem`, written by the host
/// through a mapping of the file in 1 MiB copies (the pattern repeats every 256 bytes, so one
/// buffer serves every chunk).
fn write_pattern(h: &mut Host, pid: Pid, gmem: i32, len: u64) -> Result<(), String> {
    const CHUNK: u64 = 1 << 20;
    let mut buf = vec![0u8; CHUNK as usize];
    guest::fill_pattern(&mut buf, 0);
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    let map = h
        .mmap(pid, gmem, len, rw, libc::MAP_SHARED, 0)
        .map_err(e("mmap guest_memfd"))?;
    let mut off = 0;
    while off < len {
        let n = (len - off).min(CHUNK) as usize;
        h.user_write(pid, map.addr + off as usize, &buf[..n])
            .map_err(e("write the pattern"))?;
        off += n as u64;
    }
    h.munmap(pid, map).map_err(e("munmap"))?;
    Ok(())
}
