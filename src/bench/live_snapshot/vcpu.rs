//! The vCPU thread of the live-snapshot VMM: answers the guest's clock and proceed ports like
//! the RFC VMM (`vmm::rfc::devices`), before the update until it is kicked, after it until
//! the guest's final status.

use std::sync::mpsc::Sender;
use std::sync::Arc;

use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::kvm::vcpu::{describe_exit, run_kickable, VcpuKicker, VcpuState};
use crate::time::monotonic_ns;
use crate::vmm::guest::{
    is_final_status, status_name, GuestMode, PORT_CLOCK, PORT_PROCEED, PORT_STATUS, STATUS_WRITTEN,
};

fn put32(data: &mut [u8], v: u32) {
    let b = v.to_le_bytes();
    let n = data.len().min(4);
    data[..n].copy_from_slice(&b[..n]);
}

fn get32(data: &[u8]) -> u64 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u64::from(u32::from_le_bytes(b))
}

/// The vCPU after the outgoing thread was kicked: its state, and when it stopped.
pub struct Paused {
    /// The vCPU, kept open until the exec (its teardown belongs to the reaper).
    pub vcpu: VcpuFd,
    /// Its state, saved right after it stopped.
    pub state: VcpuState,
    /// When `KVM_RUN` returned for the kick.
    pub paused_ns: u64,
    /// When the state was saved.
    pub saved_ns: u64,
}

/// Run the guest before the update: answer the clock with host µs and proceed with 0; send
/// `(fill, read pass)` on `written` at `STATUS_WRITTEN`: first `KVM_RUN` to the status, and
/// the guest's read pass over its memory (from the clock read that starts it to the status),
/// ns; stop when `kicker` kicks and save the vCPU's state.
pub fn run_before(
    mut vcpu: VcpuFd,
    kicker: Arc<VcpuKicker>,
    written: Sender<(u64, u64)>,
) -> Result<Paused, String> {
    let _target = kicker
        .register_current_thread()
        .map_err(|e| format!("register vCPU thread: {e}"))?;
    let t0 = monotonic_ns();
    let mut last_clock = t0;
    let mut sent = false;
    loop {
        match run_kickable(&mut vcpu) {
            Ok(VcpuExit::IoIn(PORT_CLOCK, d)) => {
                last_clock = monotonic_ns();
                put32(d, (last_clock / 1000) as u32)
            }
            Ok(VcpuExit::IoIn(PORT_PROCEED, d)) => put32(d, 0),
            Ok(VcpuExit::IoOut(PORT_STATUS, d)) => {
                let st = get32(d);
                if st == STATUS_WRITTEN && !sent {
                    // The receiver may be gone after an error of its own; nothing to do then.
                    let now = monotonic_ns();
                    let _ = written.send((now - t0, now - last_clock));
                    sent = true;
                } else if is_final_status(GuestMode::RunUpdate, st) {
                    return Err(format!(
                        "guest reported {} before the update",
                        status_name(st)
                    ));
                }
            }
            Ok(exit) => return Err(format!("unexpected exit {}", describe_exit(&exit))),
            Err(e) if e.errno() == libc::EINTR => {
                if kicker.take_kick() {
                    break;
                }
            }
            Err(e) => return Err(format!("KVM_RUN: {e}")),
        }
    }
    let paused_ns = monotonic_ns();
    let state = VcpuState::save(&vcpu).map_err(|e| format!("save vCPU state: {e}"))?;
    let saved_ns = monotonic_ns();
    Ok(Paused {
        vcpu,
        state,
        paused_ns,
        saved_ns,
    })
}

/// What the guest did after the restore.
pub struct Resumed {
    /// Its final status.
    pub status: u64,
    /// The first `KVM_RUN` after the restore.
    pub resume_ns: u64,
    /// The final status exit.
    pub final_ns: u64,
    /// The last clock read before it: the guest's read pass over its memory ran from there.
    pub last_clock_ns: u64,
}

/// Run the restored guest: clock as before, proceed non-zero, until its final status.
pub fn run_after(mut vcpu: VcpuFd) -> Result<Resumed, String> {
    let resume_ns = monotonic_ns();
    let mut last_clock_ns = resume_ns;
    loop {
        match vcpu.run() {
            Ok(VcpuExit::IoIn(PORT_CLOCK, d)) => {
                last_clock_ns = monotonic_ns();
                put32(d, (last_clock_ns / 1000) as u32)
            }
            Ok(VcpuExit::IoIn(PORT_PROCEED, d)) => put32(d, 1),
            Ok(VcpuExit::IoOut(PORT_STATUS, d)) => {
                let st = get32(d);
                if is_final_status(GuestMode::RunUpdate, st) {
                    return Ok(Resumed {
                        status: st,
                        resume_ns,
                        final_ns: monotonic_ns(),
                        last_clock_ns,
                    });
                }
            }
            Ok(exit) => return Err(format!("unexpected exit {}", describe_exit(&exit))),
            Err(e) if e.errno() == libc::EINTR => {}
            Err(e) => return Err(format!("KVM_RUN: {e}")),
        }
    }
}
