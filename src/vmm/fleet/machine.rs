//! One VM of the fleet: low memory in a memfd at GPA 0 with the SMP guest image, a guest_memfd
//! at 4 GiB bound as chunk memslots, `vcpus` vCPUs each on a thread of its own; the ports its
//! vCPUs use; pausing it; reading what its vCPUs reported.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::abi::kvm::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};
use crate::host::Host;
use crate::host::VcpuRun;
use crate::kvm::vcpu::VcpuKicker;
use crate::kvm::{IoAction, IoEvent, RunExit};
use crate::time::monotonic_ns;
use crate::uapi::{Pid, UserMapping};
use crate::vmm::guest::{self, SmpGuest, SmpReport};
use crate::vmm::libkvm::{self, Region};
use crate::vmm::rfc::e;
use crate::vmm::slots::GuestMemSlots;

use super::options::Options;
use super::GMEM_GPA;

/// A VM's fds in the VMM's process, and its low memory mapped there.
pub(super) struct FleetVm {
    pub(super) index: u32,
    pub(super) vm: i32,
    pub(super) gmem: i32,
    pub(super) low: i32,
    pub(super) low_map: UserMapping,
    pub(super) vcpus: Vec<i32>,
    /// Its guest_memfd's memslot, bound at once or later (`bind=lazy`).
    pub(super) slots: Arc<GuestMemSlots>,
    /// The TSC frequency of its vCPUs (kHz; asked at build, carried across updates).
    pub(super) tsc_khz: u32,
}

/// The SMP guest of VM `i`.
pub(super) fn smp_guest(o: &Options, i: u32) -> SmpGuest {
    SmpGuest {
        vcpus: o.vcpus,
        data_gpa: GMEM_GPA,
        data_len: o.data_of(i),
    }
}

/// Map the low memory and bind it as slot 0. Before any vCPU: a VM whose irqchip is created
/// later pays no irqchip penalty for it.
pub(super) fn bind_low(h: &mut Host, pid: Pid, vm: i32, low: i32) -> Result<UserMapping, String> {
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    let len = guest::LOW_MEM_SIZE as u64;
    let low_map = h
        .mmap(pid, low, len, rw, libc::MAP_SHARED, 0)
        .map_err(e("mmap low memory"))?;
    let r = Region {
        slot: 0,
        gpa: 0,
        size: len,
        uaddr: low_map.addr as u64,
        gmem: None,
    };
    libkvm::set_memory_region2(h, pid, vm, r).map_err(e("memslot 0"))?;
    Ok(low_map)
}

/// The whole guest_memfd as one memslot, not bound yet: one slot costs less than the chunks
/// of the RFC VMM (per VM at 1 GiB: 1.7 ms as 16 chunks of 64 MiB). KVM's cost for it is
/// about 0.5 ms of CPU per GiB; after the first memslot change past the irqchip's creation it
/// also waits 6–10 ms, without using a CPU (docs/kvm-probe.md).
pub(super) fn gmem_slots(pid: Pid, vm: i32, gmem: i32, o: &Options) -> Arc<GuestMemSlots> {
    GuestMemSlots::new(pid, vm, gmem, GMEM_GPA, o.guest_mem, o.guest_mem)
}

/// Stage 1: build VM `i` with its vCPUs set to start the SMP program (not running yet).
pub(super) fn build(
    h: &mut Host,
    pid: Pid,
    kvm: i32,
    o: &Options,
    i: u32,
) -> Result<FleetVm, String> {
    let vm = libkvm::create_vm(h, pid, kvm, 0).map_err(e("KVM_CREATE_VM"))?;
    if o.irqchip {
        libkvm::create_irqchip(h, pid, vm, crate::vmm::rfc::TSS_ADDR).map_err(e("irqchip"))?;
    }
    let flags = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;
    let gmem = libkvm::create_guest_memfd(h, pid, vm, o.guest_mem, flags)
        .map_err(e("KVM_CREATE_GUEST_MEMFD"))?;
    // The guest's data in folios now: the vCPUs then write without a fault per page.
    h.fallocate(pid, gmem, libc::FALLOC_FL_KEEP_SIZE, 0, o.data_of(i))
        .map_err(e("fallocate"))?;
    let low = h.memfd_create(pid, "guest-low", 0).map_err(e("memfd"))?;
    let mut img = vec![0u8; guest::LOW_MEM_SIZE];
    guest::build_smp_image(&mut img, &smp_guest(o, i)).map_err(e("guest image"))?;
    h.pwrite(pid, low, &img, 0)
        .map_err(e("write guest image"))?;
    let low_map = bind_low(h, pid, vm, low)?;
    let slots = gmem_slots(pid, vm, gmem, o);
    slots.bind_all(h)?;
    let kvm_sys = h.real_kvm().map_err(e("kvm"))?;
    crate::kvm::vcpu::init_xsave_size(&kvm_sys);
    let mut vcpus = Vec::new();
    let mut tsc_khz = 0;
    for k in 0..o.vcpus {
        let fd = libkvm::create_vcpu(h, pid, vm, u64::from(k)).map_err(e("create vCPU"))?;
        let v = h.vcpu(pid, fd).map_err(e("vcpu"))?;
        let v = v.lock().map_err(|_| "vcpu lock".to_string())?;
        guest::configure_vcpu(&kvm_sys, &v).map_err(e("configure vCPU"))?;
        let base = v.get_sregs().map_err(e("get sregs"))?;
        v.set_sregs(&guest::smp_sregs(base))
            .map_err(e("set sregs"))?;
        v.set_regs(&guest::smp_regs(k)).map_err(e("set regs"))?;
        if o.irqchip {
            guest::enable_lapic(&v).map_err(e("enable the LAPIC"))?;
        }
        // With an in-kernel LAPIC every vCPU but the first waits for INIT/SIPI; ours start at
        // once, in long mode.
        let runnable = kvm_bindings::kvm_mp_state {
            mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
        };
        v.set_mp_state(runnable).map_err(e("KVM_SET_MP_STATE"))?;
        tsc_khz = v.get_tsc_khz().map_err(e("KVM_GET_TSC_KHZ"))?;
        vcpus.push(fd);
    }
    Ok(FleetVm {
        index: i,
        vm,
        gmem,
        low,
        low_map,
        vcpus,
        slots,
        tsc_khz,
    })
}

/// Send a VM's first vCPU one interrupt on the guest's vector while the vCPUs are paused: it
/// waits in the LAPIC (checked: its bit is set in the IRR), goes across the update with the
/// vCPU's state, and the guest takes it when it runs again.
pub(super) fn send_pending_irq(h: &mut Host, pid: Pid, vm: &FleetVm) -> Result<(), String> {
    match libkvm::signal_msi(h, pid, vm.vm, 0, guest::IRQ_VECTOR) {
        Ok(1) => {}
        Ok(n) => return Err(format!("KVM_SIGNAL_MSI: not delivered to the LAPIC ({n})")),
        Err(err) => return Err(format!("KVM_SIGNAL_MSI: {err}")),
    }
    let fd = *vm.vcpus.first().ok_or("a VM without vCPUs")?;
    let v = h.vcpu(pid, fd).map_err(e("vcpu"))?;
    let v = v.lock().map_err(|_| "vcpu lock".to_string())?;
    let la = v.get_lapic().map_err(e("KVM_GET_LAPIC"))?;
    // The IRR: eight 32-bit registers 16 bytes apart from 0x200.
    let vec = usize::from(guest::IRQ_VECTOR);
    let byte = 0x200 + (vec / 32) * 0x10 + (vec % 32) / 8;
    if la.regs[byte] as u8 & (1 << (vec % 8)) == 0 {
        return Err("the interrupt is not pending in the LAPIC's IRR".into());
    }
    Ok(())
}

/// What a VM's vCPU threads share with the VMM.
#[derive(Default)]
pub(super) struct VmIo {
    /// The answer of the proceed port: the guests verify once it is set.
    pub(super) proceed: AtomicBool,
    /// Set when the VMM wants the vCPUs back: an idle wait ends at once.
    pub(super) waking: AtomicBool,
    idle: Mutex<()>,
    wake: Condvar,
    /// Each vCPU's last status.
    pub(super) status: Vec<AtomicU64>,
    /// Each vCPU's thread is in its idle wait (outside `KVM_RUN`): a kick needs no signal.
    idling: Vec<AtomicBool>,
    /// When each vCPU first read the clock on these threads (CLOCK_MONOTONIC ns; 0: not yet).
    pub(super) first_clock: Vec<AtomicU64>,
}

impl VmIo {
    pub(super) fn new(vcpus: u32, proceed: bool) -> Arc<Self> {
        Arc::new(VmIo {
            proceed: AtomicBool::new(proceed),
            status: (0..vcpus).map(|_| AtomicU64::new(0)).collect(),
            idling: (0..vcpus).map(|_| AtomicBool::new(false)).collect(),
            first_clock: (0..vcpus).map(|_| AtomicU64::new(0)).collect(),
            ..Default::default()
        })
    }

    /// End every idle wait now (the threads then see their kick, or the proceed).
    pub(super) fn wake_all(&self) {
        self.waking.store(true, Ordering::SeqCst);
        let _g = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        self.wake.notify_all();
    }
}

/// The exit handler of vCPU `k`: the clock, the proceed port (answered after an idle wait of
/// `idle` unless woken), the status port; MMIO on the guest_memfd before its memslot is bound
/// binds it and performs the access (`GuestMemSlots::mmio`); any other MMIO stops the run.
fn handler<'a>(
    io: &'a VmIo,
    k: usize,
    idle: Duration,
    shared: &'a Mutex<Host>,
    slots: &'a GuestMemSlots,
) -> impl FnMut(IoEvent<'_>) -> IoAction + 'a {
    let answer = |data: &mut [u8], v: u32| {
        let n = data.len().min(4);
        data[..n].copy_from_slice(&v.to_le_bytes()[..n]);
    };
    move |ev| match ev {
        IoEvent::In {
            port: guest::PORT_CLOCK,
            data,
        } => {
            let now = monotonic_ns();
            let _ = io.first_clock[k].compare_exchange(0, now, Ordering::SeqCst, Ordering::SeqCst);
            answer(data, (now / 1000) as u32);
            IoAction::Continue
        }
        IoEvent::In {
            port: guest::PORT_PROCEED,
            data,
        } => {
            if !io.proceed.load(Ordering::SeqCst) && !io.waking.load(Ordering::SeqCst) {
                io.idling[k].store(true, Ordering::SeqCst);
                let g = io.idle.lock().unwrap_or_else(|p| p.into_inner());
                let _ = io.wake.wait_timeout_while(g, idle, |_| {
                    !io.waking.load(Ordering::SeqCst) && !io.proceed.load(Ordering::SeqCst)
                });
                // Cleared before this thread can enter KVM_RUN again, where it checks for a
                // kick request (see `Running::kick`).
                io.idling[k].store(false, Ordering::SeqCst);
            }
            answer(data, u32::from(io.proceed.load(Ordering::SeqCst)));
            IoAction::Continue
        }
        IoEvent::Out {
            port: guest::PORT_STATUS,
            data,
        } => {
            let st = crate::vmm::rfc::status_of(data);
            io.status[k].store(st, Ordering::SeqCst);
            if guest::is_final_status(guest::GuestMode::Smp, st) {
                IoAction::Stop
            } else {
                IoAction::Continue
            }
        }
        IoEvent::In { data, .. } => {
            data.fill(0);
            IoAction::Continue
        }
        IoEvent::Out { .. } => IoAction::Continue,
        IoEvent::MmioRead { addr, data } => slots
            .mmio(shared, addr, Some(data), None)
            .unwrap_or(IoAction::Stop),
        IoEvent::MmioWrite { addr, data } => slots
            .mmio(shared, addr, None, Some(data))
            .unwrap_or(IoAction::Stop),
    }
}

/// A VM's vCPUs running, one thread each.
pub(super) struct Running {
    pub(super) io: Arc<VmIo>,
    kickers: Vec<Arc<VcpuKicker>>,
    threads: Vec<JoinHandle<()>>,
    exits: Arc<Exits>,
}

/// How each vCPU's run ended. A vCPU thread reports here, then parks until it is released:
/// a thread paused for an update is left parked for the `execve`, which ends it inside the
/// kernel, instead of unwinding and exiting in the pause (about 50 µs each here, 3–4 ms of
/// every VM's blackout for 64 vCPUs).
#[derive(Default)]
struct Exits {
    state: Mutex<ExitState>,
    changed: Condvar,
}

#[derive(Default)]
struct ExitState {
    ended: Vec<Option<Result<RunExit, String>>>,
    release: bool,
}

impl Exits {
    fn lock(&self) -> std::sync::MutexGuard<'_, ExitState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// vCPU `k`'s run ended with `r`.
    fn put(&self, k: usize, r: Result<RunExit, String>) {
        let mut st = self.lock();
        if let Some(slot) = st.ended.get_mut(k) {
            *slot = Some(r);
        }
        drop(st);
        self.changed.notify_all();
    }

    /// Wait until the threads may end.
    fn park(&self) {
        let st = self.lock();
        let _st = self
            .changed
            .wait_while(st, |st| !st.release)
            .unwrap_or_else(|p| p.into_inner());
    }
}

/// Prepare the runs of every vCPU of `vm` (with the host lock the caller holds).
pub(super) fn prepare(
    h: &mut Host,
    shared: &Arc<Mutex<Host>>,
    pid: Pid,
    vm: &FleetVm,
) -> Result<Vec<VcpuRun>, String> {
    vm.vcpus
        .iter()
        .map(|&fd| h.vcpu_run_prepare(shared, pid, fd).map_err(e("vCPU run")))
        .collect()
}

/// Run every vCPU of a VM on a thread of its own, from runs [`prepare`]d under the host lock:
/// the threads do not wait for it before their guest runs.
pub(super) fn start(
    shared: &Arc<Mutex<Host>>,
    vm: &FleetVm,
    runs: Vec<VcpuRun>,
    io: Arc<VmIo>,
    idle: Duration,
) -> Result<Running, String> {
    let exits = Arc::new(Exits::default());
    exits.lock().ended = (0..runs.len()).map(|_| None).collect();
    let mut running = Running {
        io,
        kickers: Vec::new(),
        threads: Vec::new(),
        exits,
    };
    for (k, run) in runs.into_iter().enumerate() {
        let kicker = Arc::new(VcpuKicker::new());
        let (shared, io, kick) = (shared.clone(), running.io.clone(), kicker.clone());
        let (slots, exits) = (vm.slots.clone(), running.exits.clone());
        // On failure, `running` drops: the threads started so far are stopped and joined.
        let t = std::thread::Builder::new()
            .name(format!("vm{}-vcpu{k}", vm.index))
            .spawn(move || {
                let run = || {
                    let _target = kick.register_current_thread().map_err(e("kicker"))?;
                    let mut h = handler(&io, k, idle, &shared, &slots);
                    Host::vcpu_run_prepared(&shared, run, &mut h).map_err(e("KVM_RUN"))
                };
                // A panic still reports, so that nobody waits for this vCPU for ever.
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run))
                    .unwrap_or_else(|_| Err("vCPU thread panicked".into()));
                exits.put(k, r);
                exits.park();
            })
            .map_err(e("start a vCPU thread"))?;
        running.threads.push(t);
        running.kickers.push(kicker);
    }
    Ok(running)
}

impl Running {
    /// Ask every vCPU to stop (kick, then end its idle wait); [`Running::join`] waits. A
    /// thread in its idle wait gets the request without a signal (a signal costs 15–50 µs to
    /// send here, and most of a guest's time is idle): the request is stored before `idling`
    /// is read, and the thread clears `idling` before it checks for a request on its way into
    /// `KVM_RUN`, so either this sees it not idle and signals, or the thread sees the request.
    pub(super) fn kick(&self) -> Result<(), String> {
        for (k, kicker) in self.kickers.iter().enumerate() {
            kicker.request();
            if !self.io.idling[k].load(Ordering::SeqCst) {
                kicker.kick().map_err(e("kick"))?;
            }
        }
        self.io.wake_all();
        Ok(())
    }

    /// Wait until every vCPU's run has ended, each as `want`; the threads stay parked (see
    /// [`Exits`]) until this is dropped.
    pub(super) fn wait(&self, want: RunExit) -> Result<(), String> {
        let st = self.exits.lock();
        let st = self
            .exits
            .changed
            .wait_while(st, |st| st.ended.iter().any(Option::is_none))
            .unwrap_or_else(|p| p.into_inner());
        let mut err = None;
        for (k, r) in st.ended.iter().enumerate() {
            match r {
                Some(Ok(x)) if *x == want => {}
                Some(Ok(x)) => err = err.or(Some(format!("vCPU {k}: {x:?}, not {want:?}"))),
                Some(Err(m)) => err = err.or(Some(format!("vCPU {k}: {m}"))),
                None => {}
            }
        }
        err.map_or(Ok(()), Err)
    }

    /// [`Running::wait`], then let the threads end and join them.
    pub(super) fn join(self, want: RunExit) -> Result<(), String> {
        self.wait(want)
    }

    /// Every vCPU has reported at least `status`.
    pub(super) fn all_reported(&self, status: u64) -> bool {
        self.io
            .status
            .iter()
            .all(|s| s.load(Ordering::SeqCst) >= status)
    }

    /// Some vCPU's run has ended (the guest stopped or failed).
    pub(super) fn any_ended(&self) -> bool {
        self.exits.lock().ended.iter().any(Option::is_some)
    }
}

/// A VM dropped: its vCPUs are stopped if they still run, released and their threads joined,
/// so that none is left running with the host.
impl Drop for Running {
    fn drop(&mut self) {
        if self.exits.lock().ended.iter().any(Option::is_none) {
            let _ = self.kick();
        }
        self.exits.lock().release = true;
        self.exits.changed.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The mailbox page of `vm`, copied.
pub(super) fn mailbox_page(h: &mut Host, pid: Pid, vm: &FleetVm) -> Result<Vec<u8>, String> {
    let mut page = vec![0u8; guest::PAGE_SIZE as usize];
    h.user_read(
        pid,
        vm.low_map.addr + guest::MAILBOX_GPA as usize,
        &mut page,
    )
    .map_err(e("read mailboxes"))?;
    Ok(page)
}

/// Every vCPU's report, the shared counter and the interrupts taken.
pub(super) fn reports(
    h: &mut Host,
    pid: Pid,
    vm: &FleetVm,
) -> Result<(Vec<SmpReport>, u64, u64), String> {
    let page = mailbox_page(h, pid, vm)?;
    let r = (0..vm.vcpus.len() as u32)
        .map(|k| guest::read_smp_report(&page, k).map_err(e("mailbox")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((r, guest::read_counter(&page), guest::read_irq_count(&page)))
}

/// Reset the largest clock gap and TSC step of every vCPU (all paused), so that the next
/// values the guest keeps are this update's.
pub(super) fn reset_gaps(h: &mut Host, pid: Pid, vm: &FleetVm) -> Result<(), String> {
    for k in 0..vm.vcpus.len() as u32 {
        let mb = vm.low_map.addr + guest::smp_mailbox_gpa(k) as usize;
        for off in [guest::MB_MAX_GAP_US, guest::MB_TSC_MAX_STEP] {
            h.user_write(pid, mb + off, &[0u8; 8])
                .map_err(e("reset a gap"))?;
        }
    }
    Ok(())
}

/// Poll `cond` until it holds, or fail after `timeout`.
pub(super) fn wait_for(
    what: &str,
    timeout: Duration,
    mut cond: impl FnMut() -> Result<bool, String>,
) -> Result<(), String> {
    let t = std::time::Instant::now();
    while !cond()? {
        if t.elapsed() > timeout {
            return Err(format!("timed out waiting for {what}"));
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    Ok(())
}
