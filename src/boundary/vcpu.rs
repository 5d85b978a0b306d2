//! A program's vCPU, run by the host. This KVM serves vCPU ioctls only to the process that
//! created the VM, so the host owns every real vCPU and performs its ioctls. Each vCPU a
//! program creates gets a host thread and a socket of its own: the program's thread that calls
//! `KVM_RUN` talks to that thread only, so vCPUs run concurrently and a long `KVM_RUN` blocks
//! nothing else. `kvm_run` itself is the real page: the program maps the real vCPU fd it was
//! passed, and reads and writes exit data in place.
//!
//! A signal to the program's thread while it waits for `KVM_RUN` makes the library send
//! [`crate::abi::boundary::Op::Kick`] on the process socket; the serve loop kicks this thread
//! ([`VcpuKicker`]), whose `KVM_RUN` returns EINTR, which the program's `ioctl` returns.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use kvm_ioctls::VcpuFd;

use crate::abi::boundary::{decode, Op, Reply};
use crate::abi::kvm::KVM_RUN;
use crate::kvm::run::{FaultShared, Registration, Runner};
use crate::kvm::vcpu::{kicks_received, run_kickable, VcpuKicker};
use crate::uapi::Errno;

use super::conn::{Conn, Expect, Recv};

/// Start the thread that serves vCPU `vcpu` to the program whose real pid is `owner`, on the
/// host end `sock` of the vCPU's socket. It ends when the program's end is closed.
pub(crate) fn spawn(
    vcpu: Arc<Mutex<VcpuFd>>,
    sock: OwnedFd,
    owner: i32,
    kicker: Arc<VcpuKicker>,
    faults: Option<(Arc<FaultShared>, crate::fs::FileId)>,
) -> std::io::Result<()> {
    let mut conn = Conn::new(sock, 0, Expect::Pid(owner))?;
    conn.real = Some(owner);
    std::thread::Builder::new()
        .name("boundary-vcpu".into())
        .spawn(move || serve(&vcpu, &conn, &kicker, faults))?;
    Ok(())
}

fn serve(
    vcpu: &Mutex<VcpuFd>,
    conn: &Conn,
    kicker: &VcpuKicker,
    faults: Option<(Arc<FaultShared>, crate::fs::FileId)>,
) {
    let _target = match kicker.register_current_thread() {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!("boundary: vCPU thread cannot be kicked: {e}");
            return;
        }
    };
    // Registered with the guest fault service, as the in-process vCPU threads are: while the
    // host is busy (a memslot change waiting for this vCPU to leave KVM_RUN), the service
    // nudges this thread out of a fault it cannot serve yet, and faults it refuses come back.
    let runner = faults.as_ref().map(|(_, vm)| {
        Arc::new(Runner {
            vm: *vm,
            kicker: VcpuKicker::new(),
            fault: Mutex::new(None),
        })
    });
    let _runner_target = match runner.as_ref().map(|r| r.kicker.register_current_thread()) {
        Some(Err(e)) => {
            tracing::warn!("boundary: vCPU thread cannot be nudged: {e}");
            None
        }
        Some(Ok(t)) => Some(t),
        None => None,
    };
    let _registration = faults
        .map(|(s, _)| s)
        .zip(runner.clone())
        .map(|(s, r)| Registration::new(s, r));
    let mut buf = Vec::new();
    let mut spin_until = 0;
    loop {
        // After an exit the program usually answers within microseconds (port I/O): wait for
        // its next call spinning, yielding the CPU, before sleeping, as the serve loop does.
        let (n, who) = match conn.recv(&mut buf) {
            Recv::Closed => return,
            Recv::Empty => {
                if crate::time::monotonic_ns() < spin_until {
                    std::thread::yield_now();
                } else {
                    conn.wait_readable();
                }
                continue;
            }
            Recv::Truncated(_) => {
                conn.send(&err(Errno::EINVAL), &[], None);
                continue;
            }
            Recv::Msg(n, who) => (n, who),
        };
        // As KVM: a vCPU serves only the process that created its VM.
        if who != conn.real {
            conn.send(&err(Errno::EIO), &[], None);
            continue;
        }
        let d = match decode(&buf[..n]) {
            Ok(d) if d.op == Op::Ioctl => d,
            _ => {
                conn.send(&err(Errno::EINVAL), &[], None);
                continue;
            }
        };
        let cmd = d.req.a[0];
        let mut arg = d.payload.to_vec();
        let r = if cmd == KVM_RUN {
            run(vcpu, kicker, runner.as_deref())
        } else {
            crate::host::vcpu_ioctl(vcpu, cmd, &mut arg)
        };
        let reply = Reply {
            ret: r.unwrap_or_else(|e| -(e.0 as i64)),
            b: [0; 3],
        };
        conn.send(&reply, &arg, None);
        spin_until = crate::time::monotonic_ns() + SPIN_NS;
    }
}

/// How long the vCPU thread waits, spinning, for the program's next call (ns).
const SPIN_NS: u64 = 50_000;

/// `KVM_RUN`, kickable; a kick makes it return EINTR (and is consumed). The program maps the
/// same `kvm_run`: if it set `immediate_exit` itself, KVM sees it as it is and returns EINTR
/// at once; the kick machinery's own use of the byte is cleared after a run during which a
/// kick signal came, so a byte found set on entry is the program's (set before the call, or
/// during the previous run, as a VMM that pauses its vCPU from another thread does). A fault the fault service refused ends the run with
/// EFAULT (as KVM reports a guest_memfd fault it cannot serve); a nudge of the fault service
/// alone is invisible: the run goes on.
fn run(vcpu: &Mutex<VcpuFd>, kicker: &VcpuKicker, runner: Option<&Runner>) -> Result<i64, Errno> {
    let mut v = vcpu.lock().unwrap_or_else(|e| e.into_inner());
    let run: *mut kvm_bindings::kvm_run = std::ptr::from_mut(v.get_kvm_run());
    // SAFETY: `run` points into the vCPU's kvm_run mapping, alive while the lock is held; the
    // byte is shared with the program and KVM, so it is read and written with volatile access
    // and no reference to it is kept.
    let preset = unsafe { std::ptr::read_volatile(&raw const (*run).immediate_exit) } != 0;
    if preset {
        return v.run().map(|_| 0).map_err(|e| Errno(e.errno()));
    }
    loop {
        let kicks = kicks_received();
        let r = run_kickable(&mut v)
            .map(|_| 0)
            .map_err(|e| Errno(e.errno()));
        // The kick machinery sets the byte on entry when a kick is pending (still pending now:
        // only `take_kick` below consumes it) and in the handler of a kick signal (counted):
        // clear it then. Otherwise a set byte is the program's (set while the run went on, to
        // stop the next one, as KVM reads it on entry) and stays.
        let machinery = kicker.is_pending() || runner.is_some_and(|rn| rn.kicker.is_pending());
        if machinery || kicks_received() != kicks {
            // SAFETY: as above.
            unsafe { std::ptr::write_volatile(&raw mut (*run).immediate_exit, 0) };
        }
        if r != Err(Errno::EINTR) {
            // A kick that arrived after the exit stays pending: the next run returns EINTR at
            // once, as a signal pending at KVM_RUN makes it.
            return r;
        }
        if kicker.take_kick() {
            return r;
        }
        if let Some(rn) = runner {
            let refused = rn.fault.lock().unwrap_or_else(|p| p.into_inner()).take();
            rn.kicker.take_kick();
            if refused.is_some() {
                return Err(Errno::EFAULT);
            }
            // Nudged by the fault service: run again.
            continue;
        }
        return r;
    }
}

fn err(e: Errno) -> Reply {
    Reply {
        ret: -(e.0 as i64),
        b: [0; 3],
    }
}
