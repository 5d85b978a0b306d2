//! Many VMs through one update: `vms` VMs of `vcpus` vCPUs each, every VM with an in-kernel
//! irqchip and an SMP guest (`vmm::guest::SmpGuest`: each vCPU writes its own region of the
//! VM's guest_memfd, then loops on a shared counter, the clock and the TSC).
//!
//! Stage 1 (cold boot) builds and runs the VMs, preserves each VM's files in a session of its
//! own (`fleet-vm-N`: the VM, its guest_memfd, its low memory and every vCPU, whose state the
//! kernel saves at freeze), pauses every vCPU and kexecs. Stage 2 retrieves the VMs on one
//! worker thread per CPU, each VM resumed as soon as its vCPUs are back, and measures each VM's
//! own blackout (from its pause to its resume, and as its guest saw it). After `cycles`
//! updates in a row the guests verify their data, and the shared counter of each VM must equal
//! the sum of its vCPUs' loop counts.
//!
//! Files of one concern each: `options` (parsing, limits, the state handed over), `machine`
//! (one VM, its vCPU threads and ports), `outgoing` (preserve, pause, kexec), `incoming`
//! (retrieve, resume, measure, verify).

use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

use crate::host::Host;
use crate::init::InitOutcome;
use crate::uapi::Errno;
use crate::vmm::rfc::lock;

mod incoming;
mod machine;
mod options;
mod outgoing;

pub use options::{Options, MAX_VMS};

/// Name of this init program (`handover boot --init fleet`).
pub const PROGRAM: &str = "fleet";
/// What `--init list` says of it.
pub const ABOUT: &str = "N VMs x M vCPUs with irqchips through one or more updates (vms=N vcpus=M guest-mem=SIZE data=SIZE[,SIZE..] cycles=N workers=N irqchip=0|1 order=vm-first|vcpus-first)";

/// The session holding the fleet's own state memfd.
const STATE: &str = "fleet-state";
/// Token of the state memfd in [`STATE`].
const STATE_TOKEN: u64 = 1;
/// Size of the state memfd.
const STATE_BYTES: u64 = 256 << 10;
/// Tokens in a VM's session.
const VM_TOKEN: u64 = 1;
const GMEM_TOKEN: u64 = 2;
const LOW_TOKEN: u64 = 3;
/// vCPU `k`'s token is `VCPU_TOKEN + k`.
const VCPU_TOKEN: u64 = 0x100;
/// Where each VM's guest_memfd is bound.
const GMEM_GPA: u64 = 4 << 30;
/// Largest guest_memfd per VM (inside the guest's 64 GiB identity map, above 4 GiB).
pub const MAX_GUEST_MEM: u64 = 32 << 30;

/// The session of VM `i`.
fn session_name(i: u32) -> String {
    format!("fleet-vm-{i}")
}

fn scenario(shared: &Arc<Mutex<Host>>) -> Result<Value, String> {
    crate::vmm::rfc::rollback_on_error(shared, scenario_inner(shared))
}

fn scenario_inner(shared: &Arc<Mutex<Host>>) -> Result<Value, String> {
    let (pid, dev, state) = crate::vmm::rfc::open_state(shared, STATE)?;
    match state {
        Err(Errno::ENOENT) => {
            let o = {
                let h = lock(shared);
                let o = Options::parse(&h.params.init_args)?;
                o.validate(h.mm.ram.size())?;
                o
            };
            outgoing::stage1(shared, pid, dev, &o)
        }
        Ok(st) => incoming::stage2(shared, pid, dev, st),
        Err(err) => Err(format!("retrieve state session: {err}")),
    }
}

/// The init program: stage 1 on a cold boot, stage 2 after each kexec.
pub fn run(host: Host) -> (Host, InitOutcome) {
    let shared = Arc::new(Mutex::new(host));
    let r = scenario(&shared);
    let host = crate::vmm::rfc::take_back(shared);
    match r {
        Ok(v) => {
            host.report("fleet-done", v);
            (host, InitOutcome::Halt(0))
        }
        Err(msg) => {
            tracing::error!("{PROGRAM}: {msg}");
            host.report("fleet-failed", json!({ "error": msg }));
            (host, InitOutcome::Halt(1))
        }
    }
}
