//! The outgoing side, in the old image: build and run the VMs (stage 1), then for each update
//! preserve every VM's files while the guests run, pause every vCPU and kexec. A failure
//! before the kexec aborts the update: the sessions are closed and the guests verify.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::host::Host;
use crate::kvm::RunExit;
use crate::time::monotonic_ns;
use crate::uapi::Pid;
use crate::vmm::guest;
use crate::vmm::libluo::*;
use crate::vmm::rfc::{e, lock};

use super::machine::{
    build, prepare, reports, reset_gaps, send_pending_irq, start, wait_for, FleetVm, Running, VmIo,
};
use super::options::{Options, Paused, StageState};
use super::{
    session_name, GMEM_TOKEN, LOW_TOKEN, STATE, STATE_BYTES, STATE_TOKEN, VCPU_TOKEN, VM_TOKEN,
};

/// Stage 1, on a cold boot: build every VM, run its guest until every vCPU has written its
/// region, then update the host under them.
pub(super) fn stage1(
    shared: &Arc<Mutex<Host>>,
    pid: Pid,
    dev: i32,
    o: &Options,
) -> Result<Value, String> {
    let t = Instant::now();
    let vms = {
        let mut h = lock(shared);
        let kvm = crate::vmm::libkvm::open_kvm(&mut h, pid).map_err(e("open /dev/kvm"))?;
        (0..o.vms)
            .map(|i| build(&mut h, pid, kvm, o, i))
            .collect::<Result<Vec<_>, _>>()?
    };
    let build_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let idle = Duration::from_micros(o.idle_us);
    let runs = {
        let mut h = lock(shared);
        vms.iter()
            .map(|vm| prepare(&mut h, shared, pid, vm))
            .collect::<Result<Vec<_>, _>>()?
    };
    let running: Vec<Running> = runs
        .into_iter()
        .zip(&vms)
        .map(|(r, vm)| start(shared, vm, r, VmIo::new(o.vcpus, false), idle))
        .collect::<Result<_, _>>()?;
    wait_for(
        "the guests to write their data",
        Duration::from_secs(600),
        || {
            if running.iter().any(Running::any_ended) {
                return Err("a vCPU stopped before it wrote its data".into());
            }
            Ok(running
                .iter()
                .all(|r| r.all_reported(guest::STATUS_WRITTEN)))
        },
    )?;
    let write_ms = t.elapsed().as_secs_f64() * 1e3;
    lock(shared).report(
        "fleet-stage1",
        json!({ "vms": o.vms, "vcpus": o.vcpus, "build_ms": build_ms, "write_ms": write_ms,
                "data_bytes": (0..o.vms).map(|i| o.data_of(i)).sum::<u64>() }),
    );
    update(shared, pid, dev, o, vms, running)
}

/// Let the guests loop a little, then preserve, pause and kexec. Returns only if the update
/// did not happen (after the guests verified), as an error.
pub(super) fn update(
    shared: &Arc<Mutex<Host>>,
    pid: Pid,
    dev: i32,
    o: &Options,
    vms: Vec<FleetVm>,
    running: Vec<Running>,
) -> Result<Value, String> {
    // Every vCPU in its loop, a few passes in: a pause then falls between two clock reads.
    wait_for("the guests to loop", Duration::from_secs(60), || {
        let mut h = lock(shared);
        for vm in &vms {
            let (r, _, _) = reports(&mut h, pid, vm)?;
            if r.iter().any(|r| r.base.loops < 3) {
                return Ok(false);
            }
        }
        Ok(true)
    })?;
    let mut sessions = Vec::new();
    let err = match preserve_pause_kexec(shared, pid, dev, o, &vms, running, &mut sessions) {
        Ok(never) => match never {},
        Err(err) => err,
    };
    // Still here: no update. Close the sessions (unpreserving everything), let every guest
    // verify, and say what happened.
    let mut h = lock(shared);
    for s in sessions.into_iter().rev() {
        let _ = h.close(pid, s);
    }
    drop(h);
    let idle = Duration::from_micros(o.idle_us);
    let mut verified = 0;
    for vm in &vms {
        let runs = prepare(&mut lock(shared), shared, pid, vm)?;
        let r = start(shared, vm, runs, VmIo::new(o.vcpus, true), idle)?;
        r.join(RunExit::Stopped)?;
        let (reps, counter, _) = reports(&mut lock(shared), pid, vm)?;
        guest::check_smp(&reps, counter).map_err(|m| format!("VM {}: {m}", vm.index))?;
        verified += 1;
    }
    Err(format!(
        "the update did not happen ({err}); all {verified} VMs verified their data in the old image"
    ))
}

/// Preserve every VM (guests running), pause them all, write the state and kexec. Returns
/// only on failure; the vCPU threads are stopped by then.
fn preserve_pause_kexec(
    shared: &Arc<Mutex<Host>>,
    pid: Pid,
    dev: i32,
    o: &Options,
    vms: &[FleetVm],
    running: Vec<Running>,
    sessions: &mut Vec<i32>,
) -> Result<std::convert::Infallible, String> {
    let t = Instant::now();
    let preserved = preserve(&mut lock(shared), pid, dev, vms, sessions);
    let preserve_us = t.elapsed().as_secs_f64() * 1e6;
    // Pause: every vCPU of every VM kicked, then each VM's threads joined.
    let t_pause = monotonic_ns();
    let mut pause_ns = Vec::with_capacity(running.len());
    for r in &running {
        pause_ns.push(monotonic_ns());
        r.kick()?;
    }
    let mut paused = Vec::with_capacity(running.len());
    let mut first_err = None;
    // Waited for, not joined: the threads stay parked until the `execve` ends them (or, if
    // the update does not happen, until `running` is dropped).
    for (r, &at) in running.iter().zip(&pause_ns) {
        if let Err(m) = r.wait(RunExit::Interrupted) {
            first_err = first_err.or(Some(m));
        }
        paused.push((at, monotonic_ns()));
    }
    let pause_all_us = (monotonic_ns() - t_pause) as f64 / 1e3;
    if let Some(m) = first_err {
        return Err(format!("pause: {m}"));
    }
    let m = preserved?;
    let mut h = lock(shared);
    let mut records = Vec::with_capacity(vms.len());
    for (vm, (pause_ns, paused_at_ns)) in vms.iter().zip(paused) {
        let (reps, _, _) = reports(&mut h, pid, vm)?;
        reset_gaps(&mut h, pid, vm)?;
        if o.irqchip && o.pending_irq {
            send_pending_irq(&mut h, pid, vm)?;
        }
        records.push(Paused {
            pause_ns,
            paused_at_ns,
            loops: reps.iter().map(|r| r.base.loops).collect(),
        });
    }
    let ss = StageState {
        opts: o.clone(),
        vms: records,
        pause_all_us,
        preserve_us,
        tsc_khz: vms.first().map_or(0, |v| v.tsc_khz),
    };
    let text = serde_json::to_vec(&ss).map_err(e("state"))?;
    h.pwrite(pid, m, &text, 0).map_err(e("write state"))?;
    h.report(
        "fleet-kexec",
        json!({ "preserve_us": preserve_us, "pause_all_us": pause_all_us }),
    );
    let Err(err) = h.kexec(crate::kexec::KexecRequest::default());
    Err(err.to_string())
}

/// One session per VM with its VM, guest_memfd, low memory and vCPUs, and the state session
/// with a memfd sized for the state. Returns that memfd.
fn preserve(
    h: &mut Host,
    pid: Pid,
    dev: i32,
    vms: &[FleetVm],
    sessions: &mut Vec<i32>,
) -> Result<i32, String> {
    for vm in vms {
        let s =
            create_session(h, pid, dev, &session_name(vm.index)).map_err(e("create session"))?;
        sessions.push(s);
        preserve_fd(h, pid, s, vm.vm, VM_TOKEN).map_err(e("preserve VM"))?;
        preserve_fd(h, pid, s, vm.gmem, GMEM_TOKEN).map_err(e("preserve guest_memfd"))?;
        preserve_fd(h, pid, s, vm.low, LOW_TOKEN).map_err(e("preserve low memory"))?;
        for (k, &fd) in vm.vcpus.iter().enumerate() {
            preserve_fd(h, pid, s, fd, VCPU_TOKEN + k as u64).map_err(e("preserve vCPU"))?;
        }
    }
    let s = create_session(h, pid, dev, STATE).map_err(e("create state session"))?;
    sessions.push(s);
    let m = h.memfd_create(pid, "fleet-state", 0).map_err(e("memfd"))?;
    h.ftruncate(pid, m, STATE_BYTES).map_err(e("size state"))?;
    preserve_fd(h, pid, s, m, STATE_TOKEN).map_err(e("preserve state"))?;
    Ok(m)
}
