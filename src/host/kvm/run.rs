//! Running a vCPU on the host: see [`crate::kvm::run`] for the design of guest faults.

use crate::abi::errno::{Errno, SysResult};
use crate::fs::FileId;
use crate::host::files::FileKind;
use crate::host::Host;
use crate::kvm::run::*;
use crate::kvm::vcpu::{run_kickable, this_thread_kicked, VcpuKicker};
use crate::mm::uffd::{EventFd, PageFault, Uffd};
use crate::mm::PAGE_SIZE;
use crate::uapi::Pid;
use kvm_ioctls::VcpuExit;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// A vCPU run prepared under the host lock ([`Host::vcpu_run_prepare`]).
pub struct VcpuRun {
    vcpu: Arc<Mutex<kvm_ioctls::VcpuFd>>,
    pending: crate::kvm::vm::PendingState,
    vm: FileId,
    faults: Option<Arc<FaultShared>>,
}

impl Host {
    /// The userfaultfd for a new kernel mapping of a guest_memfd (created on first use), or
    /// `None` where userfaultfd is not available.
    pub(crate) fn gmem_uffd(&mut self) -> Option<Arc<Uffd>> {
        self.guest_faults
            .get_or_insert_with(FaultService::new)
            .uffd
            .as_ref()
            .ok()
            .cloned()
    }

    /// The fault service's runner table, if the service runs: a vCPU thread registers there so
    /// that the service can nudge it out of `KVM_RUN` and hand back the faults it refuses.
    pub(crate) fn fault_shared(&self) -> Option<Arc<FaultShared>> {
        let svc = self.guest_faults.as_ref()?;
        svc.thread.as_ref()?;
        Some(svc.shared.clone())
    }

    /// Make sure the fault service runs for the host behind `host`; its runner table, or
    /// `None` when there is nothing to serve (no guest_memfd bound yet, or no userfaultfd).
    fn ensure_fault_service(&mut self, host: &Arc<Mutex<Host>>) -> Option<Arc<FaultShared>> {
        let svc = self.guest_faults.as_mut()?;
        let uffd = svc.uffd.as_ref().ok()?.clone();
        if let Some(t) = &svc.thread {
            if std::ptr::addr_eq(Weak::as_ptr(&t.host), Arc::as_ptr(host))
                && !t.ctl.exited.load(Ordering::SeqCst)
            {
                return Some(svc.shared.clone());
            }
            // The host moved to another Arc (or the thread ended): replace it.
            t.ctl.stop();
        }
        let wake = match EventFd::new() {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!("guest fault service: eventfd: {e}");
                return None;
            }
        };
        let ctl = Arc::new(ThreadCtl {
            stop: AtomicBool::new(false),
            wake,
            exited: AtomicBool::new(false),
        });
        let (weak, shared, c) = (Arc::downgrade(host), svc.shared.clone(), ctl.clone());
        let spawned = std::thread::Builder::new()
            .name("gmem-faults".into())
            .spawn(move || {
                serve(&weak, &uffd, &shared, &c);
                c.exited.store(true, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            tracing::warn!("guest fault service: cannot start its thread: {e}");
            svc.thread = None;
            return None;
        }
        svc.thread = Some(ServiceThread {
            host: Arc::downgrade(host) as Weak<dyn std::any::Any + Send + Sync>,
            ctl,
        });
        Some(svc.shared.clone())
    }

    /// Start the guest fault service (see the module docs) unless it runs already.
    /// [`Host::vcpu_run`] does this itself once a guest_memfd is bound to a memslot; a VMM that
    /// calls `KVM_RUN` on its own must call this (before or after binding guest_memfd slots).
    /// Returns whether the service runs (`false`: no userfaultfd on this machine, holes stay
    /// PROT_NONE and a guest access to one fails with EFAULT).
    pub fn start_fault_service(host: &Arc<Mutex<Host>>) -> SysResult<bool> {
        let mut h = host.lock().map_err(|_| Errno::EIO)?;
        if h.gmem_uffd().is_none() {
            return Ok(false);
        }
        Ok(h.ensure_fault_service(host).is_some())
    }

    /// Serve one uffd fault at `addr` (host is locked). `true`: wake the page now; `false`:
    /// refused (recorded and kicked, or parked).
    fn serve_guest_fault(&mut self, shared: &FaultShared, f: &PageFault) -> bool {
        let page = f.address & !(PAGE_SIZE - 1);
        let Some((id, file, index)) = self
            .maps
            .iter()
            .find(|(_, m)| m.window.is_faultable() && m.window.contains(page))
            .map(|(&id, m)| {
                let off = page - m.window.base() as u64;
                (id, m.file, m.pgoff + off / PAGE_SIZE)
            })
        else {
            // The mapping went away meanwhile: let the thread retry whatever is there now.
            return true;
        };
        let present = self.file_page(file, index).is_some();
        let r = self.gmem_fault(file, index, false).and_then(|pa| {
            if !present {
                return Ok(());
            }
            // Present already (mapped meanwhile, or an earlier map failed): map it again in
            // this window, which is idempotent, so the retry cannot fault again.
            let m = self.maps.get(&id).ok_or(Errno::EFAULT)?;
            let off = page - m.window.base() as u64;
            m.window
                .map(&self.mm.ram, off, pa, PAGE_SIZE, m.writable)
                .map_err(Errno::from)
        });
        match r {
            Ok(()) => true,
            Err(errno) => {
                self.refuse_guest_fault(shared, f.tid, file, index, errno);
                false
            }
        }
    }

    /// Tell the vCPU thread `tid` that its access to page `index` of `file` failed with
    /// `errno`, and kick it out of `KVM_RUN`.
    fn refuse_guest_fault(
        &self,
        shared: &FaultShared,
        tid: Option<i32>,
        file: FileId,
        index: u64,
        errno: Errno,
    ) {
        let runners = shared.runners.lock().unwrap_or_else(|p| p.into_inner());
        let Some(r) = tid.and_then(|t| runners.get(&t)) else {
            return;
        };
        let Some(gpa) = self.gmem_gpa(r.vm, file, index.saturating_mul(PAGE_SIZE)) else {
            return;
        };
        {
            let mut f = r.fault.lock().unwrap_or_else(|p| p.into_inner());
            if f.is_none() {
                *f = Some((gpa, errno));
            }
        }
        if let Err(e) = r.kicker.kick() {
            tracing::warn!("guest fault service: cannot kick the vCPU: {e}");
        }
    }

    /// The guest physical address at which `vm` (or else the file's own VM) sees byte `off` of
    /// guest_memfd `file`.
    fn gmem_gpa(&self, vm: FileId, file: FileId, off: u64) -> Option<u64> {
        let in_vm = |vm: FileId| match self.files.kind(vm) {
            Some(FileKind::Vm(v)) => v.slots.values().find_map(|s| {
                let (f, o) = s.gmem?;
                (f == file && off >= o && off - o < s.size).then(|| s.gpa + (off - o))
            }),
            _ => None,
        };
        in_vm(vm).or_else(|| match self.files.kind(file) {
            Some(FileKind::GuestMemfd(g)) => in_vm(g.vm_file),
            _ => None,
        })
    }

    /// Run the vCPU behind `fd` until the guest does something the VMM must see. Starts the
    /// guest fault service if needed (see the module docs).
    pub fn vcpu_run(
        host: &Arc<Mutex<Host>>,
        pid: Pid,
        fd: i32,
        io: &mut dyn FnMut(IoEvent<'_>) -> IoAction,
    ) -> SysResult<RunExit> {
        let run = host
            .lock()
            .map_err(|_| Errno::EIO)?
            .vcpu_run_prepare(host, pid, fd)?;
        Self::vcpu_run_prepared(host, run, io)
    }

    /// The part of [`Host::vcpu_run`] that needs the host lock: find the vCPU behind `fd` and
    /// start the fault service. A VMM that holds the lock already (one restoring many VMs)
    /// prepares its vCPU threads' runs with it, so that a new thread never waits for the lock
    /// before its guest runs.
    pub fn vcpu_run_prepare(
        &mut self,
        host: &Arc<Mutex<Host>>,
        pid: Pid,
        fd: i32,
    ) -> SysResult<VcpuRun> {
        let ((vcpu, pending), vm) = match self.files.kind(self.fd_file(pid, fd)?) {
            Some(FileKind::Vcpu(v)) => (v.parts(), v.vm),
            _ => return Err(Errno::EINVAL),
        };
        Ok(VcpuRun {
            vcpu,
            pending,
            vm,
            faults: self.ensure_fault_service(host),
        })
    }

    /// [`Host::vcpu_run`] of a prepared run; the host lock is taken only to serve a guest
    /// fault.
    pub fn vcpu_run_prepared(
        host: &Arc<Mutex<Host>>,
        run: VcpuRun,
        io: &mut dyn FnMut(IoEvent<'_>) -> IoAction,
    ) -> SysResult<RunExit> {
        let VcpuRun {
            vcpu,
            pending,
            vm,
            faults,
        } = run;
        // A retrieved vCPU's state, loaded here, on the thread that runs it.
        crate::kvm::vm::load_pending(&vcpu, &pending)?;
        let mut v = vcpu.lock().map_err(|_| Errno::EIO)?;
        // With a fault service, this thread is registered so that the service can send back
        // the faults it refuses.
        let runner = faults.as_ref().map(|_| {
            Arc::new(Runner {
                vm,
                kicker: VcpuKicker::new(),
                fault: Mutex::new(None),
            })
        });
        let _target = match &runner {
            Some(r) => Some(r.kicker.register_current_thread().map_err(vcpu_errno)?),
            None => None,
        };
        let _registration = faults
            .zip(runner.clone())
            .map(|(s, r)| Registration::new(s, r));
        // After EINTR: the refused fault, or `Interrupted` if a kicker this thread is registered
        // with (the VMM's, or a test's watchdog) asked for it; `None` for a stray signal (e.g. a
        // runner kick that arrived after its run ended): run again.
        let interrupted = |v: &mut kvm_ioctls::VcpuFd, again: bool| {
            v.set_kvm_immediate_exit(0);
            let refused = runner.as_ref().and_then(|r| {
                let f = r.fault.lock().unwrap_or_else(|p| p.into_inner()).take();
                if f.is_some() {
                    r.kicker.take_kick();
                }
                f
            });
            match refused {
                Some((gpa, errno)) => Some(RunExit::MemoryFault {
                    gpa,
                    size: PAGE_SIZE,
                    errno,
                }),
                None if again || this_thread_kicked() => Some(RunExit::Interrupted),
                None => None,
            }
        };
        loop {
            let fault = match run_kickable(&mut v) {
                Ok(VcpuExit::IoIn(port, data)) => {
                    if io(IoEvent::In { port, data }) == IoAction::Stop {
                        return Ok(RunExit::Stopped);
                    }
                    continue;
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    if io(IoEvent::Out { port, data }) == IoAction::Stop {
                        return Ok(RunExit::Stopped);
                    }
                    continue;
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if io(IoEvent::MmioRead { addr, data }) == IoAction::Stop {
                        return Ok(RunExit::Stopped);
                    }
                    continue;
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    if io(IoEvent::MmioWrite { addr, data }) == IoAction::Stop {
                        return Ok(RunExit::Stopped);
                    }
                    continue;
                }
                Ok(VcpuExit::MemoryFault { gpa, size, .. }) => (gpa, size),
                Ok(VcpuExit::Hlt) => return Ok(RunExit::Hlt),
                Ok(VcpuExit::Shutdown) => return Ok(RunExit::Shutdown),
                Ok(VcpuExit::Intr) => match interrupted(&mut v, false) {
                    Some(exit) => return Ok(exit),
                    None => continue,
                },
                Ok(other) => return Ok(RunExit::Other(format!("{other:?}"))),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    match interrupted(&mut v, e.errno() == libc::EAGAIN) {
                        Some(exit) => return Ok(exit),
                        None => continue,
                    }
                }
                Err(e) => return Err(Errno(e.errno())),
            };
            let (gpa, size) = fault;
            let r = host
                .lock()
                .map_err(|_| Errno::EIO)?
                .gmem_guest_fault(vm, gpa);
            if let Err(errno) = r {
                return Ok(RunExit::MemoryFault { gpa, size, errno });
            }
        }
    }
}

/// How long the fault service waits for the host lock before it nudges the faulting vCPUs.
const NUDGE_AFTER: Duration = Duration::from_millis(2);

/// The host lock, for serving `faults`. Whoever holds it may be waiting for KVM itself: a
/// memslot change (`KVM_SET_USER_MEMORY_REGION`) waits until every vCPU that was inside KVM's
/// memory access has left it, and a vCPU blocked on one of these faults never leaves while the
/// fault waits for this lock. So while the lock does not come, every `NUDGE_AFTER` the faulting
/// threads get a signal without a kick ([`VcpuKicker::nudge`]): their `KVM_RUN` returns, the
/// memslot change completes, and [`Host::vcpu_run`] runs again and faults again (the fault is
/// served once the lock is free). A thread that runs `KVM_RUN` outside `vcpu_run` is not
/// registered and cannot be nudged.
fn lock_nudging<'a>(
    host: &'a Mutex<Host>,
    shared: &FaultShared,
    faults: &[PageFault],
) -> std::sync::MutexGuard<'a, Host> {
    let start = Instant::now();
    let mut nudge_at = NUDGE_AFTER;
    loop {
        match host.try_lock() {
            Ok(h) => return h,
            Err(std::sync::TryLockError::Poisoned(p)) => return p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {}
        }
        if start.elapsed() >= nudge_at {
            let runners = shared.runners.lock().unwrap_or_else(|p| p.into_inner());
            for r in faults
                .iter()
                .filter_map(|f| f.tid.and_then(|t| runners.get(&t)))
            {
                if let Err(e) = r.kicker.nudge() {
                    tracing::debug!("guest fault service: cannot nudge a vCPU: {e}");
                }
            }
            nudge_at = start.elapsed() + NUDGE_AFTER;
        }
        std::thread::sleep(Duration::from_micros(20));
    }
}

/// The fault service thread: wait for faults, serve them under the host lock, wake.
fn serve(weak: &Weak<Mutex<Host>>, uffd: &Uffd, shared: &FaultShared, ctl: &ThreadCtl) {
    let mut faults: Vec<PageFault> = Vec::new();
    let mut wakes: Vec<u64> = Vec::new();
    // Refused faults, woken every PARK_RETRY (a kicked thread has left already; any other
    // retries and faults again).
    let mut parked: BTreeSet<u64> = BTreeSet::new();
    let wake_all = |pages: &mut dyn Iterator<Item = u64>| {
        for p in pages {
            if let Err(e) = uffd.wake(p, PAGE_SIZE) {
                tracing::debug!("guest fault service: UFFDIO_WAKE {p:#x}: {e}");
            }
        }
    };
    loop {
        if ctl.stop.load(Ordering::SeqCst) {
            break;
        }
        let timeout = (!parked.is_empty()).then_some(PARK_RETRY);
        let (ready, stopped) = match uffd.wait(&ctl.wake, timeout) {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("guest fault service: poll: {e}");
                std::thread::sleep(PARK_RETRY);
                (true, false)
            }
        };
        if stopped || ctl.stop.load(Ordering::SeqCst) {
            break;
        }
        if !ready {
            wake_all(&mut std::mem::take(&mut parked).into_iter());
            continue;
        }
        faults.clear();
        if let Err(e) = uffd.read_faults(&mut faults) {
            tracing::warn!("guest fault service: read: {e}");
        }
        if faults.is_empty() {
            continue;
        }
        let Some(host) = weak.upgrade() else {
            // The host is gone (or moved): let the faulting threads retry; a new service, if
            // any, gets the faults again.
            wake_all(&mut faults.iter().map(|f| f.address & !(PAGE_SIZE - 1)));
            break;
        };
        {
            let mut h = lock_nudging(&host, shared, &faults);
            for f in &faults {
                let page = f.address & !(PAGE_SIZE - 1);
                if h.serve_guest_fault(shared, f) {
                    wakes.push(page);
                } else {
                    parked.insert(page);
                }
            }
        }
        drop(host);
        wake_all(&mut wakes.drain(..));
    }
    wake_all(&mut std::mem::take(&mut parked).into_iter());
}
