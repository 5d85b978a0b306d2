//! Small helpers over `kvm-ioctls` for one x86 vCPU: save its state so that it can continue in a
//! *new* VM ([`VcpuState`]), and pause it from another thread ([`VcpuKicker`], [`run_kickable`]).
//!
//! What is saved was decided by probing this machine's `/dev/kvm` (`kvm_pvm`, see
//! `docs/kvm-probe.md`): regs, sregs, FPU, XSAVE, XCRs, debug registers, vCPU events, MP state,
//! the vCPU's CPUID and a fixed list of MSRs are all readable and accepted by a fresh vCPU of a
//! new VM. The local APIC is saved only when the VM has an in-kernel irqchip (our VMs do not;
//! `KVM_GET_LAPIC` then fails with `EINVAL`). Nested state and TSC scaling are not supported by
//! this host and are not saved.
//!
//! # Pausing a vCPU
//!
//! The vCPU thread registers itself with a [`VcpuKicker`] and runs the vCPU with
//! [`run_kickable`]. Another thread calls [`VcpuKicker::kick`]: it records the request and sends
//! [`kick_signal`] to the registered thread with `pthread_kill`. That thread's own signal handler
//! sets `immediate_exit` in the `kvm_run` of the vCPU it is running, so `KVM_RUN` returns `EINTR`
//! whether the thread is inside the guest, blocked on a fault or about to enter; a kick that
//! comes between two runs is seen by the next [`run_kickable`], which then returns `EINTR` at
//! once. `kvm_run` is only ever written on the vCPU thread (the rust-vmm/Firecracker pattern);
//! there is no second mapping of it. On `EINTR` the vCPU thread calls
//! [`VcpuKicker::take_kick`]: if it returns `true` the vCPU is paused, any I/O the guest was
//! waiting for has been completed by that last `KVM_RUN`, and [`VcpuState::save`] captures a
//! consistent state.
//!
//! ```no_run
//! # use handover::kvm::vcpu::{run_kickable, VcpuKicker, VcpuState};
//! # fn f(kvm_vcpu: &mut kvm_ioctls::VcpuFd, kicker: &VcpuKicker) -> Result<VcpuState, Box<dyn std::error::Error>> {
//! let _target = kicker.register_current_thread()?;
//! loop {
//!     match run_kickable(kvm_vcpu) {
//!         Ok(_exit) => { /* handle I/O */ }
//!         Err(e) if e.errno() == libc::EINTR => {
//!             if kicker.take_kick() {
//!                 break;
//!             }
//!         }
//!         Err(e) => return Err(e.into()),
//!     }
//! }
//! Ok(VcpuState::save(kvm_vcpu)?)
//! # }
//! ```
//!
//! # Where things are
//!
//! * `error.rs`: [`VcpuError`], the errors of all three.
//! * `state.rs`: [`VcpuState::save`] and [`VcpuState::restore`] against KVM, and the XSAVE
//!   buffer size ([`xsave_size`]). [`VcpuState`] itself and its encoding, the bytes that cross a
//!   kexec, are [`crate::abi::vcpu_state`]'s.
//! * `msrs.rs`: the MSRs that are saved ([`DEFAULT_MSRS`]), read and written.
//! * `kick.rs`: pausing the vCPU thread ([`VcpuKicker`], [`run_kickable`]) and settling a pending
//!   I/O exit ([`complete_pending_io`]).

mod error;
mod kick;
mod msrs;
mod state;

pub use crate::abi::vcpu_state::{VcpuState, VcpuStateError, STATE_MAGIC, STATE_VERSION};
pub use error::VcpuError;
pub use kick::{
    complete_pending_io, describe_exit, kick_signal, kicks_received, run_kickable,
    this_thread_kicked, KickTarget, VcpuKicker,
};
pub use msrs::DEFAULT_MSRS;
pub use state::{init_xsave_size, xsave_size};
