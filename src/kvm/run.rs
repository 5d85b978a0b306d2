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
//!    and page index, and calls `Host::gmem_fault`: allocate the folio and map it into every
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
//!
//! [`Host::vcpu_run`]: crate::host::Host::vcpu_run
//! [`Host::vcpu`]: crate::host::Host::vcpu
//! [`Host::start_fault_service`]: crate::host::Host::start_fault_service

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use crate::abi::errno::Errno;
use crate::fs::FileId;
use crate::kvm::vcpu::{VcpuError, VcpuKicker};
use crate::mm::uffd::{EventFd, Uffd};

/// A port access by the guest.
#[derive(Debug)]
pub enum IoEvent<'a> {
    /// `KVM_EXIT_IO` in: the VMM fills `data` with what the guest reads from `port`.
    In {
        /// I/O port number.
        port: u16,
        /// The bytes the guest reads (1, 2 or 4), written by the VMM.
        data: &'a mut [u8],
    },
    /// `KVM_EXIT_IO` out: the guest wrote `data` to `port`.
    Out {
        /// I/O port number.
        port: u16,
        /// The bytes the guest wrote (1, 2 or 4).
        data: &'a [u8],
    },
    /// An access to a guest physical address with no memslot: the VMM supplies the data.
    MmioRead {
        /// Guest physical address read.
        addr: u64,
        /// The bytes the guest reads, written by the VMM.
        data: &'a mut [u8],
    },
    /// `KVM_EXIT_MMIO` write: the guest wrote `data` to a guest physical address with no memslot.
    MmioWrite {
        /// Guest physical address written.
        addr: u64,
        /// The bytes the guest wrote.
        data: &'a [u8],
    },
}

/// What the VMM wants after handling an I/O exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoAction {
    /// Re-enter the guest.
    Continue,
    /// Return from [`Host::vcpu_run`](crate::host::Host::vcpu_run) with [`RunExit::Stopped`].
    Stop,
}

/// Why [`Host::vcpu_run`](crate::host::Host::vcpu_run) returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunExit {
    /// The I/O callback asked to stop.
    Stopped,
    /// Kicked out of KVM_RUN by a [`VcpuKicker`] the calling thread is registered with: the
    /// vCPU is paused. (Any other signal only makes `vcpu_run` run the vCPU again.)
    Interrupted,
    /// `KVM_EXIT_HLT`: the guest halted.
    Hlt,
    /// `KVM_EXIT_SHUTDOWN`: the guest shut down (e.g. a triple fault).
    Shutdown,
    /// A guest access the host could not satisfy: EPERM while the guest_memfd is frozen,
    /// EFAULT outside any guest_memfd. `gpa` is page aligned for guest_memfd holes, and the
    /// access is retried by the next run.
    MemoryFault {
        /// Guest physical address of the access.
        gpa: u64,
        /// Bytes from `gpa`: `PAGE_SIZE` for a refused guest_memfd fault, else as KVM reported.
        size: u64,
        /// Why: EPERM (guest_memfd frozen), EFAULT (no guest_memfd page behind `gpa`), ENOMEM
        /// (no free frame).
        errno: Errno,
    },
    /// Any other exit KVM reported, in its `Debug` form.
    Other(String),
}

/// How often refused faults of threads that cannot be kicked are woken to retry.
pub const PARK_RETRY: Duration = Duration::from_millis(20);

/// The host's guest-fault state: its userfaultfd, the threads running vCPUs, the service
/// thread. Created when the first guest_memfd is bound to a memslot.
pub struct FaultService {
    /// The descriptor, or why there is none (then kernel mappings keep PROT_NONE holes and a
    /// guest access to a hole makes `KVM_RUN` fail with EFAULT).
    pub(crate) uffd: Result<Arc<Uffd>, Errno>,
    pub(crate) shared: Arc<FaultShared>,
    pub(crate) thread: Option<ServiceThread>,
}

/// Threads inside [`Host::vcpu_run`](crate::host::Host::vcpu_run), by thread id.
#[derive(Default)]
pub(crate) struct FaultShared {
    pub(crate) runners: Mutex<HashMap<i32, Arc<Runner>>>,
}

/// A thread running a vCPU of `vm`.
pub(crate) struct Runner {
    pub(crate) vm: FileId,
    pub(crate) kicker: VcpuKicker,
    /// The first fault the service could not serve: (gpa, errno).
    pub(crate) fault: Mutex<Option<(u64, Errno)>>,
}

pub(crate) struct ServiceThread {
    /// The host it serves (only compared with, to know whether it is still this host's).
    pub(crate) host: Weak<dyn std::any::Any + Send + Sync>,
    pub(crate) ctl: Arc<ThreadCtl>,
}

pub(crate) struct ThreadCtl {
    pub(crate) stop: AtomicBool,
    pub(crate) wake: EventFd,
    pub(crate) exited: AtomicBool,
}

impl ThreadCtl {
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wake.signal();
    }
}

impl FaultService {
    pub(crate) fn new() -> FaultService {
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

pub(crate) fn vcpu_errno(e: VcpuError) -> Errno {
    match e {
        VcpuError::Sys { source, .. } => Errno(source.raw_os_error().unwrap_or(libc::EIO)),
        VcpuError::Kvm { source, .. } => Errno(source.errno()),
        _ => Errno::EINVAL,
    }
}

/// The calling thread's entry in the runner table; removed on drop.
pub(crate) struct Registration {
    pub(crate) shared: Arc<FaultShared>,
    pub(crate) tid: i32,
    pub(crate) runner: Arc<Runner>,
}

impl Registration {
    pub(crate) fn new(shared: Arc<FaultShared>, runner: Arc<Runner>) -> Registration {
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
