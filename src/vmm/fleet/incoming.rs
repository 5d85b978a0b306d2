//! The incoming side, in the new image: retrieve every VM on worker threads (one per CPU),
//! resume each as soon as its vCPUs are back, measure each VM's blackout, then commit; go
//! round again, or let the guests verify.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use crate::host::Host;
use crate::kvm::RunExit;
use crate::time::monotonic_ns;
use crate::uapi::Pid;
use crate::vmm::guest;
use crate::vmm::libluo::*;
use crate::vmm::rfc::{e, lock};

use super::machine::{
    bind_low, gmem_slots, prepare, reports, smp_guest, start, wait_for, FleetVm, Running, VmIo,
};
use super::options::{read_stage_state, Options, StageState};
use super::outgoing::update;
use super::{session_name, GMEM_TOKEN, LOW_TOKEN, STATE_BYTES, STATE_TOKEN, VCPU_TOKEN, VM_TOKEN};

/// One VM back and running, and when each step of its restore ended (CLOCK_MONOTONIC ns).
struct Restored {
    vm: FleetVm,
    session: i32,
    running: Running,
    /// A worker took it, had retrieved its VM, guest_memfd and low memory, had bound its
    /// memslots, had its vCPUs, and resumed it.
    start: u64,
    retrieved: u64,
    bound: u64,
    vcpus: u64,
    resume: u64,
}

/// Shared by the workers: the next VM to take, and whether the update was given up (before
/// any VM resumed) or accepted (some VM resumed). Both are decided under the host lock.
struct Gate {
    next: AtomicU32,
    abandoned: AtomicBool,
    /// The guests' TSC frequency, from the state.
    tsc_khz: u32,
}

/// Stage 2, after a kexec (`state_session` is the fleet's own session, retrieved already).
pub(super) fn stage2(
    shared: &Arc<Mutex<Host>>,
    pid: Pid,
    dev: i32,
    state_session: i32,
) -> Result<Value, String> {
    let t_stage2 = monotonic_ns();
    let cpu0 = crate::time::process_cpu_ns();
    let (ss, m) = {
        let mut h = lock(shared);
        let m =
            retrieve_fd(&mut h, pid, state_session, STATE_TOKEN).map_err(e("retrieve state"))?;
        let text = read_all(&mut h, pid, m, STATE_BYTES as usize).map_err(e("read state"))?;
        (read_stage_state(&text, h.mm.ram.size())?, m)
    };
    let o = ss.opts.clone();
    let gate = Arc::new(Gate {
        next: AtomicU32::new(0),
        abandoned: AtomicBool::new(false),
        tsc_khz: ss.tsc_khz,
    });
    let workers: Vec<_> = (0..o.nr_workers())
        .map(|_| {
            let (shared, gate, o) = (shared.clone(), gate.clone(), o.clone());
            std::thread::Builder::new()
                .name("fleet-restore".into())
                .spawn(move || worker(&shared, pid, dev, &o, &gate))
        })
        // A worker that cannot start leaves its VMs to the others.
        .filter_map(Result::ok)
        .collect();
    if workers.is_empty() {
        return Err("no restore worker could start".into());
    }
    let mut restored: Vec<Restored> = Vec::new();
    let mut errors = Vec::new();
    for w in workers {
        match w.join() {
            Ok((r, err)) => {
                restored.extend(r);
                errors.extend(err);
            }
            Err(_) => errors.push("a restore worker panicked".to_string()),
        }
    }
    if let Some(first) = errors.first() {
        // Before any VM resumed: nothing ran in this image, the rollback goes back. After:
        // the VMs that did resume are let verify, and the run fails.
        if gate.abandoned.load(Ordering::SeqCst) {
            return Err(first.clone());
        }
        for r in restored {
            r.running.io.proceed.store(true, Ordering::SeqCst);
            r.running.io.wake_all();
            let _ = r.running.join(RunExit::Stopped);
        }
        return Err(format!(
            "{} VMs lost after the resume: {errors:?}",
            errors.len()
        ));
    }
    restored.sort_by_key(|r| r.vm.index);
    let t_all = monotonic_ns();
    let restore_cpu_us = (crate::time::process_cpu_ns() - cpu0) as f64 / 1e3;
    // Every guest runs again: the previous image's VMs go, and what was read of the handover.
    {
        let mut h = lock(shared);
        h.release_previous_image(false);
        let Host { kho, mm, .. } = &mut *h;
        kho.commit(mm).map_err(e("commit"))?;
        h.refill_hugepages();
        for r in &restored {
            finish(&mut h, pid, r.session).map_err(e("finish session"))?;
        }
        finish(&mut h, pid, state_session).map_err(e("finish state session"))?;
        let _ = h.close(pid, m);
    }
    // Every guest runs: now the guest_memfd memslots left for later (`bind=lazy`), each under
    // the host lock, from a thread of their own.
    let binder = {
        let shared = shared.clone();
        let slots: Vec<_> = restored.iter().map(|r| r.vm.slots.clone()).collect();
        std::thread::Builder::new()
            .name("fleet-bind".into())
            .spawn(move || {
                let t = monotonic_ns();
                let mut n = 0;
                for s in &slots {
                    n += s.nr() - s.nr_bound();
                    s.bind_all(&mut lock(&shared))?;
                }
                Ok::<_, String>((n, monotonic_ns() - t))
            })
            .map_err(e("start the memslot binder"))?
    };
    let measured = measure(shared, pid, &ss, &restored, t_stage2, t_all);
    let bound = binder
        .join()
        .map_err(|_| "the memslot binder panicked".to_string())?;
    let mut report = measured?;
    let (slots_late, bind_ns) = bound?;
    report["slots_bound_after_resume"] = json!(slots_late);
    report["bind_after_resume_us"] = json!(bind_ns as f64 / 1e3);
    // CPU used by the whole image (every thread) from stage 2's start to the last resume:
    // against `restore_all`, how busy the restore kept the CPUs.
    report["restore_cpu_us"] = json!(restore_cpu_us);
    let cycle = lock(shared).info.kexec_count;
    lock(shared).report("fleet-update", report.clone());
    let (vms, running): (Vec<FleetVm>, Vec<Running>) =
        restored.into_iter().map(|r| (r.vm, r.running)).unzip();
    if cycle < o.cycles {
        std::thread::sleep(Duration::from_millis(o.run_ms));
        // The previous image gone before the next update (see
        // `Host::take_previous_image_reaping`).
        let reaping = lock(shared).take_previous_image_reaping();
        if let Some(t) = reaping {
            let _ = t.join();
        }
        return update(shared, pid, dev, &o, vms, running);
    }
    verify(shared, pid, &o, &vms, running, report)
}

/// A worker: take VMs in index order until none is left; each is retrieved and resumed.
fn worker(
    shared: &Arc<Mutex<Host>>,
    pid: Pid,
    dev: i32,
    o: &Options,
    gate: &Gate,
) -> (Vec<Restored>, Option<String>) {
    let mut done = Vec::new();
    loop {
        let i = gate.next.fetch_add(1, Ordering::SeqCst);
        if i >= o.vms || gate.abandoned.load(Ordering::SeqCst) {
            return (done, None);
        }
        match restore(shared, pid, dev, o, i, gate) {
            Ok(r) => done.push(r),
            Err(m) => {
                let h = lock(shared);
                if !h.kho.committed() {
                    gate.abandoned.store(true, Ordering::SeqCst);
                }
                return (done, Some(format!("VM {i}: {m}")));
            }
        }
    }
}

/// Retrieve VM `i`'s session and files, bind its memory, retrieve its vCPUs (the kernel loads
/// their state), and resume it. The first resume accepts the update.
fn restore(
    shared: &Arc<Mutex<Host>>,
    pid: Pid,
    dev: i32,
    o: &Options,
    i: u32,
    gate: &Gate,
) -> Result<Restored, String> {
    let start_ns = monotonic_ns();
    let mut h = lock(shared);
    let s = retrieve_session(&mut h, pid, dev, &session_name(i)).map_err(e("retrieve session"))?;
    // `order=vcpus-first`: every vCPU, the last first, before anything else of its VM.
    let mut early = Vec::new();
    if o.vcpus_first {
        for k in (0..u64::from(o.vcpus)).rev() {
            early.push(retrieve_fd(&mut h, pid, s, VCPU_TOKEN + k).map_err(e("retrieve vCPU"))?);
        }
        early.reverse();
    }
    let vm = retrieve_fd(&mut h, pid, s, VM_TOKEN).map_err(e("retrieve VM"))?;
    let gmem = retrieve_fd(&mut h, pid, s, GMEM_TOKEN).map_err(e("retrieve guest_memfd"))?;
    let low = retrieve_fd(&mut h, pid, s, LOW_TOKEN).map_err(e("retrieve low memory"))?;
    let retrieved = monotonic_ns();
    let low_map = bind_low(&mut h, pid, vm, low)?;
    let slots = gmem_slots(pid, vm, gmem, o);
    if !o.lazy_bind {
        slots.bind_all(&mut h)?;
    }
    let bound = monotonic_ns();
    // The VM's interrupt controllers, without the host lock (after its memory: see
    // `Host::vm_materialize`).
    drop(h);
    Host::vm_materialize_unlocked(shared, pid, vm).map_err(e("irqchip"))?;
    let mut h = lock(shared);
    let vcpus = if o.vcpus_first {
        early
    } else {
        (0..u64::from(o.vcpus))
            .map(|k| retrieve_fd(&mut h, pid, s, VCPU_TOKEN + k).map_err(e("retrieve vCPU")))
            .collect::<Result<Vec<_>, _>>()?
    };
    let vcpus_ns = monotonic_ns();
    if gate.abandoned.load(Ordering::SeqCst) {
        return Err("another VM failed before any resumed".into());
    }
    let vm = FleetVm {
        index: i,
        vm,
        gmem,
        low,
        low_map,
        vcpus,
        slots,
        tsc_khz: gate.tsc_khz,
    };
    let runs = prepare(&mut h, shared, pid, &vm)?;
    h.kho.mark_committed();
    drop(h);
    let resume = monotonic_ns();
    let running = start(
        shared,
        &vm,
        runs,
        VmIo::new(o.vcpus, false),
        Duration::from_micros(o.idle_us),
    )?;
    Ok(Restored {
        vm,
        session: s,
        running,
        start: start_ns,
        retrieved,
        bound,
        vcpus: vcpus_ns,
        resume,
    })
}

fn us(a: u64, b: u64) -> f64 {
    b.saturating_sub(a) as f64 / 1e3
}

/// Each VM's blackout, from its pause to the first clock read of its last vCPU back, and as
/// its guest saw it (the largest gap between two clock reads, and the largest TSC step in µs),
/// once every vCPU has looped twice past the resume; and the phases of the update common to
/// all.
fn measure(
    shared: &Arc<Mutex<Host>>,
    pid: Pid,
    ss: &StageState,
    restored: &[Restored],
    t_stage2: u64,
    t_all: u64,
) -> Result<Value, String> {
    wait_for(
        "every vCPU to loop after the resume",
        Duration::from_secs(60),
        || {
            let mut h = lock(shared);
            for (r, p) in restored.iter().zip(&ss.vms) {
                let (reps, _, _) = reports(&mut h, pid, &r.vm)?;
                if reps
                    .iter()
                    .zip(&p.loops)
                    .any(|(x, &l)| x.base.loops < l + 2)
                {
                    return Ok(false);
                }
            }
            Ok(true)
        },
    )?;
    let mut h = lock(shared);
    let tsc_khz = ss.tsc_khz;
    let mut vms = Vec::new();
    for (r, p) in restored.iter().zip(&ss.vms) {
        let (reps, _, irqs) = reports(&mut h, pid, &r.vm)?;
        let gap = reps.iter().map(|x| x.base.max_gap_us).max().unwrap_or(0);
        let step = reps.iter().map(|x| x.tsc_max_step).max().unwrap_or(0);
        let back: u64 = reps.iter().map(|x| x.tsc_backwards).sum();
        // The VM is back when every vCPU runs guest code again: its first clock read after
        // the resume (the state load and first entry happen on the vCPU's thread, after
        // `resume`).
        let running_again = r
            .running
            .io
            .first_clock
            .iter()
            .map(|c| c.load(Ordering::SeqCst))
            .max()
            .unwrap_or(0);
        vms.push(json!({
            "vm": r.vm.index,
            "blackout_us": us(p.pause_ns, running_again),
            "guest_gap_us": gap,
            "guest_tsc_step_us": if tsc_khz > 0 { step as f64 * 1e3 / f64::from(tsc_khz) } else { 0.0 },
            "tsc_backwards": back,
            "irqs_taken": irqs,
            "phases_us": {
                "pause": us(p.pause_ns, p.paused_at_ns),
                "wait_for_worker": us(t_stage2, r.start),
                "retrieve": us(r.start, r.retrieved),
                "bind_memslots": us(r.retrieved, r.bound),
                "retrieve_vcpus": us(r.bound, r.vcpus),
                "resume": us(r.vcpus, r.resume),
                "first_clock_read": us(r.resume, running_again),
            },
        }));
    }
    let params = h.params.clone();
    let boot = h.info.clone();
    let first_pause = ss.vms.iter().map(|p| p.pause_ns).min().unwrap_or(0);
    let kexec_start = params.kexec_start_ns.unwrap_or(first_pause);
    let exec = params.exec_ns.unwrap_or(kexec_start);
    let main = crate::time::main_ns().unwrap_or(boot.boot_start_ns);
    Ok(json!({
        "cycle": boot.kexec_count,
        "vms": vms,
        "vcpus_per_vm": ss.opts.vcpus,
        "workers": ss.opts.nr_workers(),
        "tsc_khz": tsc_khz,
        "phases_us": {
            "preserve_while_running": ss.preserve_us,
            "pause_all": ss.pause_all_us,
            "pause_to_kexec": us(first_pause, kexec_start),
            "freeze_and_finalize": us(kexec_start, exec),
            "exec_to_main": us(exec, main),
            "main_to_boot": us(main, boot.boot_start_ns),
            "boot": boot.boot_us as f64,
            "boot_to_stage2": us(boot.boot_start_ns + boot.boot_us * 1000, t_stage2),
            "restore_all": us(t_stage2, t_all),
        },
    }))
}

/// The last update: let every guest verify; check each VM's data and shared counter, and that
/// each vCPU went on from its count at the last pause.
fn verify(
    shared: &Arc<Mutex<Host>>,
    pid: Pid,
    o: &Options,
    vms: &[FleetVm],
    running: Vec<Running>,
    last: Value,
) -> Result<Value, String> {
    for r in &running {
        r.io.proceed.store(true, Ordering::SeqCst);
        r.io.wake_all();
    }
    let mut checks = Vec::new();
    let mut ok = true;
    for (vm, r) in vms.iter().zip(running) {
        let joined = r.join(RunExit::Stopped);
        let (reps, counter, irqs) = reports(&mut lock(shared), pid, vm)?;
        // One interrupt sent at each update's pause, taken after it.
        let want_irqs = if o.irqchip && o.pending_irq {
            u64::from(o.cycles)
        } else {
            0
        };
        let check = joined
            .and_then(|()| guest::check_smp(&reps, counter))
            .and_then(|()| {
                (irqs == want_irqs).then_some(()).ok_or_else(|| {
                    format!("the guest took {irqs} interrupts, {want_irqs} were sent")
                })
            });
        ok &= check.is_ok();
        checks.push(json!({
            "vm": vm.index,
            "ok": check.is_ok(),
            "error": check.err(),
            "counter": counter,
            "irqs": irqs,
            "loops": reps.iter().map(|x| x.base.loops).collect::<Vec<_>>(),
            "verified_bytes": reps.iter().enumerate()
                .filter(|(_, x)| x.base.status == guest::STATUS_VERIFY_OK)
                .map(|(k, _)| smp_guest(o, vm.index).region(k as u32).1)
                .sum::<u64>(),
        }));
    }
    if !ok {
        return Err(format!("a VM failed its check: {checks:?}"));
    }
    Ok(json!({ "ok": ok, "vms": checks, "last_update": last }))
}
