//! Pausing a vCPU from another thread ([`VcpuKicker`], [`run_kickable`]; the protocol is in the
//! [`crate::kvm::vcpu`] docs), and settling a vCPU stopped after an I/O exit
//! ([`complete_pending_io`]).

use std::cell::RefCell;
use std::marker::PhantomData;
use std::sync::atomic::{compiler_fence, AtomicBool, AtomicPtr, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::Killable;

use super::error::VcpuError;

/// Offset of the kick signal from `SIGRTMIN()`.
const KICK_SIGNAL_OFFSET: libc::c_int = 0;

/// The signal [`VcpuKicker::kick`] sends: `SIGRTMIN() + 0`. Its handler is installed by the first
/// [`VcpuKicker::register_current_thread`] of the process and replaces any other handler.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN() + KICK_SIGNAL_OFFSET
}

thread_local! {
    /// The `kvm_run` of the vCPU this thread is running in [`run_kickable`] (set around `KVM_RUN`
    /// only), or null. Written by this thread, read by [`kick_handler`] on this thread.
    static RUNNING: AtomicPtr<kvm_run> = const { AtomicPtr::new(std::ptr::null_mut()) };
    /// Kick signals this thread has received.
    static KICKS_RECEIVED: AtomicU64 = const { AtomicU64::new(0) };
    /// The kickers this thread is registered with, one entry per live [`KickTarget`].
    static REGISTERED: RefCell<Vec<Arc<KickState>>> = const { RefCell::new(Vec::new()) };
    /// This thread as a kick target; dropped (marked dead) when the thread ends.
    static THIS_THREAD: ThreadSlot = ThreadSlot::current();
}

/// The kick signal's handler. It runs on the thread that was signalled, interrupting it: if that
/// thread is inside [`run_kickable`], it sets that vCPU's `immediate_exit`, so that a `KVM_RUN`
/// that has not yet entered the guest returns `EINTR` at once (one that has is interrupted by the
/// signal itself). It only touches lock-free atomics in `const`-initialized thread-locals without
/// destructors and one byte of `kvm_run`, which is async-signal-safe.
extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let _ = KICKS_RECEIVED.try_with(|n| n.fetch_add(1, Ordering::Relaxed));
    let run = RUNNING
        .try_with(|r| r.load(Ordering::Relaxed))
        .unwrap_or(std::ptr::null_mut());
    if !run.is_null() {
        // SAFETY: `RUNNING` is non-null only inside `run_kickable`, which holds the `VcpuFd` (and
        // so its `kvm_run` mapping) mutably borrowed and clears it before returning; this handler
        // runs on that same thread. No reference is formed: one byte that KVM reads on entry is
        // stored through the raw pointer, volatile because the kernel reads it.
        unsafe { std::ptr::write_volatile(&raw mut (*run).immediate_exit, 1) };
    }
}

/// Install [`kick_handler`] once per process (`vmm_sys_util::signal::register_signal_handler`,
/// all signals blocked while it runs), with `SA_RESTART` added: other blocking system calls of a
/// kicked thread are restarted instead of failing with `EINTR`. `KVM_RUN` is never restarted (it
/// returns `EINTR` itself), so kicks still work.
fn install_kick_handler() -> Result<(), VcpuError> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    let r = INSTALLED.get_or_init(|| {
        let sig = kick_signal();
        vmm_sys_util::signal::register_signal_handler(sig, kick_handler).map_err(|e| e.errno())?;
        // vmm-sys-util sets `SA_SIGINFO` only.
        // SAFETY: sigaction on valid, zero-initialized structs that live across the calls; the
        // handler stays the one just installed, only its flags change.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut act) != 0 {
                return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
            }
            act.sa_flags |= libc::SA_RESTART;
            if libc::sigaction(sig, &act, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
            }
        }
        Ok(())
    });
    r.map_err(|errno| VcpuError::Sys {
        op: "sigaction",
        source: std::io::Error::from_raw_os_error(errno),
    })
}

/// A thread that kickers may signal: its `pthread_t` and whether it still runs.
#[derive(Debug)]
struct KickThread {
    handle: libc::pthread_t,
    /// `true` until the thread's thread-locals are destroyed, which happens before it ends and
    /// its `pthread_t` can be reused. Kicks signal while holding this lock.
    alive: Mutex<bool>,
}

/// The value of [`THIS_THREAD`]: marks the thread dead when the thread ends. Because it is a
/// thread-local destructor and not a guard, `mem::forget` of a [`KickTarget`] cannot leave a
/// kicker pointing at a thread that has ended.
struct ThreadSlot(Arc<KickThread>);

impl ThreadSlot {
    fn current() -> ThreadSlot {
        ThreadSlot(Arc::new(KickThread {
            // SAFETY: pthread_self has no preconditions.
            handle: unsafe { libc::pthread_self() },
            alive: Mutex::new(true),
        }))
    }
}

impl Drop for ThreadSlot {
    fn drop(&mut self) {
        *self.0.alive.lock().unwrap_or_else(|e| e.into_inner()) = false;
    }
}

/// A [`KickThread`] known to be alive for as long as this value exists (it holds the lock).
struct LiveThread<'a> {
    handle: libc::pthread_t,
    _alive: std::sync::MutexGuard<'a, bool>,
}

// SAFETY: a `LiveThread` exists only while the thread's `alive` flag is `true` and locked, so the
// thread's thread-local destructors have not finished, it has not ended, and `handle` (its own
// `pthread_self()`) is valid for at least as long as this value.
unsafe impl Killable for LiveThread<'_> {
    fn pthread_handle(&self) -> libc::pthread_t {
        self.handle
    }
}

/// What a [`VcpuKicker`] shares with the threads registered with it.
#[derive(Debug, Default)]
struct KickState {
    pending: AtomicBool,
    target: Mutex<Option<Arc<KickThread>>>,
}

/// Pauses a vCPU that runs in another thread. See the [`crate::kvm::vcpu`] docs for the protocol.
///
/// The kicker does not touch the vCPU: it records the request and signals the registered thread,
/// whose own signal handler sets `immediate_exit` (only ever written on the vCPU thread).
/// Share it between threads with an `Arc`.
#[derive(Debug, Default)]
pub struct VcpuKicker {
    state: Arc<KickState>,
}

/// The vCPU thread's registration with a [`VcpuKicker`]; unregisters on drop. It stays on the
/// thread that registered (not `Send`). Forgetting it leaks the registration until the thread
/// ends, never longer: a kick then still signals nothing but that live thread.
#[derive(Debug)]
pub struct KickTarget {
    state: Arc<KickState>,
    thread: Arc<KickThread>,
    _not_send: PhantomData<*const ()>,
}

impl Drop for KickTarget {
    fn drop(&mut self) {
        let still_registered = REGISTERED
            .try_with(|r| {
                let mut r = r.borrow_mut();
                if let Some(i) = r.iter().rposition(|s| Arc::ptr_eq(s, &self.state)) {
                    r.swap_remove(i);
                }
                r.iter().any(|s| Arc::ptr_eq(s, &self.state))
            })
            .unwrap_or(false);
        if still_registered {
            return;
        }
        let mut target = self.state.target.lock().unwrap_or_else(|e| e.into_inner());
        if target
            .as_ref()
            .is_some_and(|t| Arc::ptr_eq(t, &self.thread))
        {
            *target = None;
        }
    }
}

/// Whether a kicker the calling thread is registered with has a kick pending.
pub fn this_thread_kicked() -> bool {
    REGISTERED
        .try_with(|r| r.borrow().iter().any(|s| s.pending.load(Ordering::SeqCst)))
        .unwrap_or(false)
}

/// Kick signals the calling thread has received so far.
pub fn kicks_received() -> u64 {
    KICKS_RECEIVED
        .try_with(|n| n.load(Ordering::Relaxed))
        .unwrap_or(0)
}

/// [`RUNNING`] set for the duration of one `KVM_RUN`.
struct Running(*mut kvm_run);

impl Running {
    fn enter(run: *mut kvm_run) -> Running {
        let prev = RUNNING.with(|r| r.swap(run, Ordering::Relaxed));
        // The handler (same thread) must see the pointer before the kick check that follows.
        compiler_fence(Ordering::SeqCst);
        Running(prev)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        compiler_fence(Ordering::SeqCst);
        RUNNING.with(|r| r.store(self.0, Ordering::Relaxed));
    }
}

/// `KVM_RUN` once, such that the [`VcpuKicker`]s the calling thread is registered with can stop
/// it. A kick requested before this call makes it return `EINTR` without entering the guest; one
/// that comes during the call makes `KVM_RUN` return `EINTR` whether the vCPU is in the guest,
/// blocked on a fault, or about to enter. `immediate_exit` is cleared on entry (kicks that
/// arrived meanwhile are still pending and set it again), so a stray signal costs at most one
/// extra `EINTR`. [`complete_pending_io`] is unaffected.
pub fn run_kickable(vcpu: &mut VcpuFd) -> Result<VcpuExit<'_>, kvm_ioctls::Error> {
    vcpu.set_kvm_immediate_exit(0);
    // The raw pointer is taken once, here, and never turned back into a reference; it is
    // published only for the duration of this call.
    let run: *mut kvm_run = std::ptr::from_mut(vcpu.get_kvm_run());
    let _running = Running::enter(run);
    // A kick whose signal came before `Running::enter` is seen here; one that comes after it
    // finds `RUNNING` set (or is still pending when KVM_RUN starts).
    if this_thread_kicked() {
        vcpu.set_kvm_immediate_exit(1);
    }
    vcpu.run()
}

impl VcpuKicker {
    /// A kicker with no thread registered and no kick pending.
    pub fn new() -> Self {
        Self::default()
    }

    /// Register the calling thread as the vCPU thread: install the process-wide handler of
    /// [`kick_signal`] (first time) and unblock it in this thread. Keep the returned guard alive
    /// while the thread runs the vCPU with [`run_kickable`]. A kick made before this call is
    /// still pending and stops the thread's next run.
    pub fn register_current_thread(&self) -> Result<KickTarget, VcpuError> {
        install_kick_handler()?;
        vmm_sys_util::signal::unblock_signal(kick_signal()).map_err(|e| VcpuError::Sys {
            op: "pthread_sigmask",
            source: std::io::Error::other(e.to_string()),
        })?;
        let thread = THIS_THREAD
            .try_with(|t| t.0.clone())
            .map_err(|_| VcpuError::Sys {
                op: "register a thread that is ending",
                source: std::io::Error::from_raw_os_error(libc::ESRCH),
            })?;
        REGISTERED.with(|r| r.borrow_mut().push(self.state.clone()));
        *self.state.target.lock().unwrap_or_else(|e| e.into_inner()) = Some(thread.clone());
        Ok(KickTarget {
            state: self.state.clone(),
            thread,
            _not_send: PhantomData,
        })
    }

    /// Ask the vCPU to stop: the registered thread's current or next [`run_kickable`] returns
    /// `EINTR`. Returns at once; the vCPU thread sees the request through
    /// [`VcpuKicker::take_kick`]. With no thread registered (or one that has ended) nothing is
    /// signalled and the kick waits for the next registration.
    pub fn kick(&self) -> Result<(), VcpuError> {
        self.request();
        self.signal()
    }

    /// Ask the vCPU to stop without a signal: its thread's next [`run_kickable`] returns
    /// `EINTR` at once. Enough for a thread known to be outside `KVM_RUN` (for instance
    /// waiting in its exit handler): a thread that then enters `KVM_RUN` checks for the
    /// request after it has marked itself running. To stop a thread that may be inside
    /// `KVM_RUN` now, use [`VcpuKicker::kick`] (this request, then the signal).
    pub fn request(&self) {
        self.state.pending.store(true, Ordering::SeqCst);
    }

    /// Send [`kick_signal`] to the registered thread, if it is alive.
    fn signal(&self) -> Result<(), VcpuError> {
        let target = self.state.target.lock().unwrap_or_else(|e| e.into_inner());
        let Some(t) = target.as_ref() else {
            return Ok(());
        };
        let alive = t.alive.lock().unwrap_or_else(|e| e.into_inner());
        if !*alive {
            return Ok(());
        }
        let live = LiveThread {
            handle: t.handle,
            _alive: alive,
        };
        live.kill(kick_signal()).map_err(|e| VcpuError::Sys {
            op: "pthread_kill",
            source: std::io::Error::from_raw_os_error(e.errno()),
        })
    }

    /// Make the registered thread's current `KVM_RUN` return without asking it to stop: the
    /// signal alone, no kick recorded, so [`Host::vcpu_run`](crate::host::Host) takes it for a
    /// stray signal and runs again. The guest fault service uses it to get a vCPU that is
    /// blocked on a fault out of KVM while another thread waits for KVM (see `kvm::run`).
    pub fn nudge(&self) -> Result<(), VcpuError> {
        self.signal()
    }

    /// On the vCPU thread, after `KVM_RUN` returned `EINTR`: report whether a kick was requested
    /// (and consume it). `false` means a stray signal: run again.
    pub fn take_kick(&self) -> bool {
        self.state.pending.swap(false, Ordering::SeqCst)
    }

    /// Whether a kick is requested and not yet taken.
    pub fn is_pending(&self) -> bool {
        self.state.pending.load(Ordering::SeqCst)
    }
}

/// Complete whatever the last exit left pending (the `IN` data or `OUT` the VMM just handled)
/// without running guest code: `KVM_RUN` with `immediate_exit` set, which must return `EINTR`.
/// Call it on the thread that owns the vCPU before [`VcpuState::save`] when the vCPU was stopped
/// right after an I/O exit rather than by a kick.
///
/// [`VcpuState::save`]: crate::abi::vcpu_state::VcpuState::save
pub fn complete_pending_io(vcpu: &mut VcpuFd) -> Result<(), VcpuError> {
    vcpu.set_kvm_immediate_exit(1);
    let r = match vcpu.run() {
        Err(e) if e.errno() == libc::EINTR => Ok(()),
        Err(source) => Err(VcpuError::Kvm {
            op: "KVM_RUN",
            source,
        }),
        Ok(exit) => Err(VcpuError::NotSettled(describe_exit(&exit))),
    };
    vcpu.set_kvm_immediate_exit(0);
    r
}

/// One-line description of an exit, for error messages.
pub fn describe_exit(exit: &VcpuExit<'_>) -> String {
    match exit {
        VcpuExit::IoIn(port, data) => format!("IoIn(port {port:#x}, {} bytes)", data.len()),
        VcpuExit::IoOut(port, data) => format!("IoOut(port {port:#x}, {data:02x?})"),
        VcpuExit::MmioRead(addr, data) => format!("MmioRead({addr:#x}, {} bytes)", data.len()),
        VcpuExit::MmioWrite(addr, data) => format!("MmioWrite({addr:#x}, {data:02x?})"),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn immediate_exit_offset() {
        // The byte `kick_handler` stores, as the uAPI places it.
        assert_eq!(std::mem::offset_of!(kvm_run, immediate_exit), 1);
    }

    #[test]
    fn kick_signals_only_the_live_registered_thread() {
        // Registered: a kick from the thread itself is delivered before `kick` returns.
        let k = VcpuKicker::new();
        std::thread::scope(|s| {
            s.spawn(|| {
                let before = kicks_received();
                let target = k.register_current_thread().unwrap();
                assert!(!this_thread_kicked());
                k.kick().unwrap();
                assert_eq!(kicks_received(), before + 1);
                assert!(this_thread_kicked());
                assert!(k.take_kick());
                assert!(!this_thread_kicked());
                // Unregistered: the kick is recorded, nothing is signalled.
                drop(target);
                k.kick().unwrap();
                assert_eq!(kicks_received(), before + 1);
                assert!(!this_thread_kicked(), "no longer registered");
                assert!(k.take_kick());
            });
        });

        // A thread that forgot its registration and ended: its kicker keeps the target, but the
        // target is dead, so a kick signals nothing, even when a new thread got the same
        // `pthread_t` (glibc reuses a joined thread's descriptor and stack).
        let k = Arc::new(VcpuKicker::new());
        let old = std::thread::spawn({
            let k = k.clone();
            move || {
                std::mem::forget(k.register_current_thread().unwrap());
                // SAFETY: pthread_self has no preconditions.
                unsafe { libc::pthread_self() }
            }
        })
        .join()
        .unwrap();
        let target_alive = |k: &VcpuKicker| {
            let t = k.state.target.lock().unwrap();
            t.as_ref().map(|t| *t.alive.lock().unwrap())
        };
        assert_eq!(target_alive(&k), Some(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let newer = std::thread::spawn(move || {
            // SAFETY: pthread_self has no preconditions.
            ready_tx.send(unsafe { libc::pthread_self() }).unwrap();
            go_rx.recv().unwrap();
            kicks_received()
        });
        let reused = ready_rx.recv().unwrap() == old;
        k.kick().unwrap();
        assert!(k.is_pending());
        go_tx.send(()).unwrap();
        assert_eq!(
            newer.join().unwrap(),
            0,
            "a thread that never registered got a kick (pthread_t reused: {reused})"
        );
    }
}
