//! The RFC scenario as a VMM would run it, with the VM kept running across the update: a real
//! guest on /dev/kvm writes `byte[i] = (i ^ 0x5A)` over 5 MiB of a 16 MiB guest_memfd bound at
//! 4 GiB; the VMM preserves the VM, the guest_memfd and its low memory while the guest runs,
//! pauses the vCPU, saves its state in a memfd, and the host kexecs; the new image's VMM
//! retrieves everything (in either order), builds a new VM and vCPU, restores the state and
//! the same guest program carries on and checks all 5 MiB.
//!
//! The guest measures the blackout itself: it keeps reading a clock port (the VMM answers with
//! CLOCK_MONOTONIC, which survives the kexec) and reports the largest gap between two reads.
//!
//! The VMM in files of one concern each: `options` (parsing and limits), `devices` (the
//! guest's ports), `machine` (building and running the VM), `outgoing` (preserve, pause, save,
//! kexec), `incoming` (retrieve, bind, restore, resume, verify) and `report` (the JSON it
//! reports). Instead of a live update, the benchmark's snapshot/restore baseline
//! (`bench::snapshot`) can take the paused guest over through the `Baseline` trait: this module
//! does not know it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use crate::host::Host;
use crate::init::InitOutcome;
use crate::uapi::Errno;

use super::libluo::*;

mod devices;
mod fragment;
mod incoming;
mod machine;
mod options;
mod outgoing;
mod private;
mod report;

pub(crate) use devices::{io_handler, status_of};
pub(crate) use machine::{bind, read_mailbox, Vm, TSS_ADDR};
pub use options::{auto_chunk, Options, MAX_CHUNKS, MAX_GUEST_MEM};
pub(crate) use outgoing::{Baseline, Paused};

/// Name of this init program (`handover boot --init gmem-rfc`).
pub const PROGRAM: &str = "gmem-rfc";

/// LUO session holding the VM, its guest_memfd, low memory and vCPU state (the RFC selftest's
/// session name).
pub const SESSION: &str = "gmem_vm_preservation_session";
/// LUO session holding the VMM's own state memfd (options and progress, JSON).
pub const STATE: &str = "gmem_preservation_state";
/// Token of the VM file in [`SESSION`].
pub const VM_TOKEN: u64 = 0x1001;
/// Token of the guest_memfd in [`SESSION`].
pub const GMEM_TOKEN: u64 = 0x1002;
/// Token of the low-memory memfd (guest image at GPA 0) in [`SESSION`].
pub const LOW_TOKEN: u64 = 0x1003;
/// Token of the memfd with the saved vCPU state in [`SESSION`].
pub const VCPU_TOKEN: u64 = 0x1004;
/// Token of the VMM state memfd in [`STATE`].
pub const STATE_TOKEN: u64 = 0x999;
/// Size of the memfds holding the vCPU state (length-prefixed) and the VMM's state (JSON).
const STATE_BYTES: u64 = 64 << 10;
/// Guest physical address where the guest_memfd is bound (4 GiB, above the low image).
pub const GMEM_GPA: u64 = 4 << 30;

/// Context for an error: `what: err`.
pub(crate) fn e<T>(what: &'static str) -> impl Fn(T) -> String
where
    T: std::fmt::Display,
{
    move |err| format!("{what}: {err}")
}

/// Lock the host shared with the vCPU threads, poisoned or not.
pub(crate) fn lock(shared: &Mutex<Host>) -> std::sync::MutexGuard<'_, Host> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

fn scenario(shared: &Arc<Mutex<Host>>, baseline: Option<&dyn Baseline>) -> Result<Value, String> {
    rollback_on_error(shared, scenario_inner(shared, baseline))
}

/// A failure before the guests resumed in this image: go back to the previous image, which
/// still has everything (`r` is returned as it is otherwise).
pub(crate) fn rollback_on_error(
    shared: &Mutex<Host>,
    r: Result<Value, String>,
) -> Result<Value, String> {
    if let Err(why) = &r {
        let mut h = lock(shared);
        if h.info.kho_boot && !h.kho.committed() {
            let err = h.rollback(why);
            return Err(format!("{why}; rollback failed: {err}"));
        }
    }
    r
}

/// A VMM's first steps in an image: refuse to start over after a refused handover, spawn the
/// VMM's process, open `/dev/liveupdate` and look for the VMM's own state session `state`
/// (ENOENT on a cold boot). Returns the process, the device fd and that lookup.
pub(crate) fn open_state(
    shared: &Mutex<Host>,
    state: &str,
) -> Result<(crate::uapi::Pid, i32, Result<i32, Errno>), String> {
    let mut h = lock(shared);
    if let Some(why) = h.info.refused.clone() {
        // Booted clean after refusing a handover (and, if it could, after a rollback that
        // refused it too): the VMs are lost; say so rather than start over.
        return Err(format!("the handover was refused: {why}"));
    }
    let pid = h.spawn();
    let dev = h
        .open(pid, "/dev/liveupdate", 0)
        .map_err(e("open /dev/liveupdate"))?;
    let st = retrieve_session(&mut h, pid, dev, state);
    Ok((pid, dev, st))
}

fn scenario_inner(
    shared: &Arc<Mutex<Host>>,
    baseline: Option<&dyn Baseline>,
) -> Result<Value, String> {
    let (pid, dev, state) = open_state(shared, STATE)?;
    match state {
        Err(Errno::ENOENT) => {
            let o = {
                let h = lock(shared);
                let o = Options::parse(&h.params.init_args)?;
                o.validate(h.mm.ram.size())?;
                o
            };
            outgoing::stage1(shared, pid, dev, &o, baseline)
        }
        Ok(st) => incoming::stage2(shared, pid, dev, st, baseline),
        Err(err) => Err(format!("retrieve state session: {err}")),
    }
}

/// The init program: stage 1 on a cold boot, stage 2 after the kexec. Without a baseline
/// (`run_with`), `snapshot-dir` is refused.
pub fn run(host: Host) -> (Host, InitOutcome) {
    run_with(host, None)
}

/// [`run`], with `baseline` taking the paused guest over when `snapshot-dir` is set.
pub(crate) fn run_with(host: Host, baseline: Option<&dyn Baseline>) -> (Host, InitOutcome) {
    let kho_boot = host.info.kho_boot;
    let shared = Arc::new(Mutex::new(host));
    let r = scenario(&shared, baseline);
    let host = take_back(shared);
    match r {
        Ok(v) => {
            let event = if kho_boot {
                "rfc-stage2"
            } else if v.get("snapshot").is_some() {
                "rfc-snapshot"
            } else {
                "rfc-aborted"
            };
            host.report(event, v);
            (host, InitOutcome::Halt(0))
        }
        Err(msg) => {
            tracing::error!("{PROGRAM}: {msg}");
            host.report("rfc-failed", json!({ "error": msg }));
            (host, InitOutcome::Halt(1))
        }
    }
}

/// The host back from its `Arc` once every vCPU thread is gone.
pub(crate) fn take_back(mut shared: Arc<Mutex<Host>>) -> Host {
    loop {
        match Arc::try_unwrap(shared) {
            Ok(m) => return m.into_inner().unwrap_or_else(|p| p.into_inner()),
            Err(s) => {
                shared = s;
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}
