//! Running a vCPU: KVM_RUN on the real vCPU with the host unlocked, guest_memfd faults
//! resolved by the host (allocate, map, re-enter), port I/O handed to the VMM's callback.
//!
//! # Guest faults on guest_memfd holes
//!
//! A memslot of a guest_memfd points at the host's own mapping of the file
//! ([`Host::kernel_map`](crate::host::Host)), a *faultable* [`VaWindow`](crate::mm::VaWindow):
//! present pages map RAM frames, holes are anonymous memory registered with the host's
//! userfaultfd ([`Uffd`]). This KVM never reports `KVM_EXIT_MEMORY_FAULT` for such slots (a
//! PROT_NONE hole only makes `KVM_RUN` fail with EFAULT, docs/kvm-probe.md section b), so:
//!
//! 1. A guest access to a hole blocks inside `KVM_RUN`, and the uffd queues the host address
//!    and the faulting thread's id.
//! 2. The *fault service*, one thread per host, reads it, locks the host, finds the mapping
//!    and page index, and calls [`Host::gmem_fault`]: allocate the folio and map it into every
//!    mapping of the file (the kernel one included, which drops the uffd registration of that
//!    page), then `UFFDIO_WAKE`: the guest retries the access and continues. A fault for a
//!    page that was mapped meanwhile is just mapped again (idempotent) and woken.
//! 3. If the fault cannot be served (EPERM while the file is frozen for preservation), the
//!    service records `(gpa, errno)` for the thread that runs the vCPU in
//!    [`Host::vcpu_run`] and kicks it ([`VcpuKicker`]: a signal whose handler, on the vCPU
//!    thread, sets `immediate_exit`); the
//!    signal interrupts the blocked fault, `KVM_RUN` returns EINTR and `vcpu_run` returns
//!    [`RunExit::MemoryFault`]. Nothing stays blocked: the next `KVM_RUN` retries the access
//!    (and faults again while the file is still frozen). A refused fault of a thread the
//!    service cannot kick (one that is not inside `vcpu_run`) is woken again every
//!    [`PARK_RETRY`], so it retries and is served once the file is unfrozen.
//!
//! The service starts the first time [`Host::vcpu_run`] runs a vCPU after a guest_memfd was
//! bound to a memslot (that is why `vcpu_run` takes the `Arc`); a VMM that calls `KVM_RUN`
//! itself (through [`Host::vcpu`]) must call [`Host::start_fault_service`] first, or its vCPU
//! blocks forever on the first hole. The service holds only a `Weak` reference to the host and
//! stops when the host is dropped (or taken out of its `Arc` and put in another one, where the
//! next `vcpu_run` starts a new service). `execve` (the real kexec) ends it like every thread.
//!
//! Lock order: a vCPU mutex, then the host, then the service's runner table. The service never
//! takes a vCPU mutex, so while a vCPU is blocked on a fault, no one may wait for that vCPU's
//! mutex with the host locked (the service needs the host to resolve the fault).

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuExit;

use crate::abi::errno::{Errno, SysResult};
use crate::fs::{FileId, FileKind};
use crate::host::Host;
use crate::kvm::vcpu::{run_kickable, this_thread_kicked, VcpuError, VcpuKicker};
use crate::mm::uffd::{EventFd, PageFault, Uffd};
use crate::mm::PAGE_SIZE;
use crate::uapi::Pid;

/// A port access by the guest.
#[derive(Debug)]
pub enum IoEvent<'a> {
    In {
        port: u16,
        data: &'a mut [u8],
    },
    Out {
        port: u16,
        data: &'a [u8],
    },
    /// An access to a guest physical address with no memslot: the VMM supplies the data.
    MmioRead {
        addr: u64,
        data: &'a mut [u8],
    },
    MmioWrite {
        addr: u64,
        data: &'a [u8],
    },
}

/// What the VMM wants after handling an I/O exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoAction {
    Continue,
    Stop,
}

/// Why [`Host::vcpu_run`] returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunExit {
    /// The I/O callback asked to stop.
    Stopped,
    /// Kicked out of KVM_RUN by a [`VcpuKicker`] the calling thread is registered with: the
    /// vCPU is paused. (Any other signal only makes `vcpu_run` run the vCPU again.)
    Interrupted,
    Hlt,
    Shutdown,
    /// A guest access the host could not satisfy: EPERM while the guest_memfd is frozen,
    /// EFAULT outside any guest_memfd. `gpa` is page aligned for guest_memfd holes, and the
    /// access is retried by the next run.
    MemoryFault {
        gpa: u64,
        size: u64,
        errno: Errno,
    },
    Other(String),
}

/// How often refused faults of threads that cannot be kicked are woken to retry.
pub const PARK_RETRY: Duration = Duration::from_millis(20);

/// The host's guest-fault state: its userfaultfd, the threads running vCPUs, the service
/// thread. Created when the first guest_memfd is bound to a memslot.
pub struct FaultService {
    /// The descriptor, or why there is none (then kernel mappings keep PROT_NONE holes and a
    /// guest access to a hole makes `KVM_RUN` fail with EFAULT).
    uffd: Result<Arc<Uffd>, Errno>,
    shared: Arc<FaultShared>,
    thread: Option<ServiceThread>,
}

/// Threads inside [`Host::vcpu_run`], by thread id.
#[derive(Default)]
struct FaultShared {
    runners: Mutex<HashMap<i32, Arc<Runner>>>,
}

/// A thread running a vCPU of `vm`.
struct Runner {
    vm: FileId,
    kicker: VcpuKicker,
    /// The first fault the service could not serve: (gpa, errno).
    fault: Mutex<Option<(u64, Errno)>>,
}

struct ServiceThread {
    host: Weak<Mutex<Host>>,
    ctl: Arc<ThreadCtl>,
}

struct ThreadCtl {
    stop: AtomicBool,
    wake: EventFd,
    exited: AtomicBool,
}

impl ThreadCtl {
    fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wake.signal();
    }
}

impl FaultService {
    fn new() -> FaultService {
        let uffd = Uffd::new()
            .map(Arc::new)
            .map_err(|e| Errno(e.raw_os_error()));
        if let Err(e) = &uffd {
            tracing::warn!(
                "userfaultfd is not available ({e}): guest accesses to guest_memfd holes will fail with EFAULT"
            );
        } else if uffd.as_ref().is_ok_and(|u| !u.has_thread_id()) {
            tracing::warn!(
                "userfaultfd without UFFD_FEATURE_THREAD_ID: refused guest faults cannot be returned to the VMM"
            );
        }
        FaultService {
            uffd,
            shared: Arc::default(),
            thread: None,
        }
    }
}

impl Drop for FaultService {
    fn drop(&mut self) {
        if let Some(t) = &self.thread {
            t.ctl.stop();
        }
    }
}

impl std::fmt::Debug for FaultService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultService")
            .field("uffd", &self.uffd.as_ref().map(|_| ()))
            .field(
                "running",
                &self
                    .thread
                    .as_ref()
                    .is_some_and(|t| !t.ctl.exited.load(Ordering::SeqCst)),
            )
            .finish()
    }
}

fn vcpu_errno(e: VcpuError) -> Errno {
    match e {
        VcpuError::Sys { source, .. } => Errno(source.raw_os_error().unwrap_or(libc::EIO)),
        VcpuError::Kvm { source, .. } => Errno(source.errno()),
        _ => Errno::EINVAL,
    }
}

/// The calling thread's entry in the runner table; removed on drop.
struct Registration {
    shared: Arc<FaultShared>,
    tid: i32,
    runner: Arc<Runner>,
}

impl Registration {
    fn new(shared: Arc<FaultShared>, runner: Arc<Runner>) -> Registration {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        shared
            .runners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(tid, runner.clone());
        Registration {
            shared,
            tid,
            runner,
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut r = self
            .shared
            .runners
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if r.get(&self.tid)
            .is_some_and(|x| Arc::ptr_eq(x, &self.runner))
        {
            r.remove(&self.tid);
        }
        // A kick of this runner that came after the last KVM_RUN ends with it: the runner's
        // kicker is unregistered from the thread right after this (`vcpu_run`'s `_target`), and
        // a signal still in flight only makes one later KVM_RUN return EINTR, which
        // `vcpu_run` takes for a stray signal.
    }
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

    /// Make sure the fault service runs for the host behind `host`; its runner table, or
    /// `None` when there is nothing to serve (no guest_memfd bound yet, or no userfaultfd).
    fn ensure_fault_service(&mut self, host: &Arc<Mutex<Host>>) -> Option<Arc<FaultShared>> {
        let svc = self.guest_faults.as_mut()?;
        let uffd = svc.uffd.as_ref().ok()?.clone();
        if let Some(t) = &svc.thread {
            if Weak::as_ptr(&t.host) == Arc::as_ptr(host) && !t.ctl.exited.load(Ordering::SeqCst) {
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
            host: Arc::downgrade(host),
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
        let (vcpu, vm, faults) = {
            let mut h = host.lock().map_err(|_| Errno::EIO)?;
            let (vcpu, vm) = match h.files.kind(h.fd_file(pid, fd)?) {
                Some(FileKind::Vcpu(v)) => (v.vcpu.clone(), v.vm),
                _ => return Err(Errno::EINVAL),
            };
            (vcpu, vm, h.ensure_fault_service(host))
        };
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
