//! The outgoing side of the update, in the old image: run the guest until it has written its
//! data, then preserve (while it runs), pause, save and kexec. A failure at any step aborts the
//! update and the guest carries on; `snapshot-dir` hands the paused guest to the `Baseline`
//! instead.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::host::Host;
use crate::kvm::vcpu::{VcpuKicker, VcpuState};
use crate::kvm::RunExit;
use crate::time::monotonic_ns;
use crate::uapi::{Errno, Pid};
use crate::vmm::guest::{self, GuestMode};
use crate::vmm::libluo::*;

use super::devices::{io_handler, GuestIo};
use super::machine::{read_mailbox, setup, spawn_guest, wait_for, Vm};
use super::options::{Options, StageState};
use super::{
    e, lock, report, GMEM_TOKEN, LOW_TOKEN, SESSION, STATE, STATE_BYTES, STATE_TOKEN, VCPU_TOKEN,
    VM_TOKEN,
};

/// What the VMM does instead of the live update when `snapshot-dir` is set: the benchmark's
/// baseline, supplied by whoever registers the program (`cli::boot` passes
/// `bench::snapshot::SnapshotRestore`), so that the VMM does not depend on the benchmark.
pub(crate) trait Baseline: Sync {
    /// Take over a guest that has written its data and is paused (its vCPU thread joined):
    /// snapshot it under `dir`, restore it, let it verify, and return the run's report.
    fn run(
        &self,
        shared: &Arc<Mutex<Host>>,
        guest: Paused,
        o: &Options,
        dir: &str,
    ) -> Result<Value, String>;
}

/// A guest paused for a [`Baseline`]: its VM, its devices' shared state, and when the pause
/// was asked for and took effect (CLOCK_MONOTONIC ns).
pub(crate) struct Paused {
    pub(crate) vm: Vm,
    pub(crate) io: Arc<GuestIo>,
    pub(crate) pause_ns: u64,
    pub(crate) paused_at_ns: u64,
}

/// Stage 1, on a cold boot: build the VM and update the host under it.
pub(super) fn stage1(
    shared: &Arc<Mutex<Host>>,
    pid: Pid,
    dev: i32,
    o: &Options,
    baseline: Option<&dyn Baseline>,
) -> Result<Value, String> {
    let vm = setup(&mut lock(shared), pid, o)?;
    run_and_update(shared, pid, dev, o, vm, baseline)
}

/// Run the guest until it has written its data, then live-update the host under it. Returns
/// only if the update did not happen (the guest then carries on and verifies its data), or for
/// the snapshot baseline.
pub(super) fn run_and_update(
    shared: &Arc<Mutex<Host>>,
    pid: Pid,
    dev: i32,
    o: &Options,
    vm: Vm,
    baseline: Option<&dyn Baseline>,
) -> Result<Value, String> {
    let kicker = Arc::new(VcpuKicker::new());
    let io = Arc::new(GuestIo::default());
    let t_run = Instant::now();
    let th = spawn_guest(shared, &vm, io.clone(), kicker.clone());
    wait_for(
        "the guest to write its data",
        Duration::from_secs(120),
        || io.status.load(Ordering::SeqCst) != guest::STATUS_NONE || th.is_finished(),
    )?;
    if io.status.load(Ordering::SeqCst) != guest::STATUS_WRITTEN {
        let r = th.join().map_err(|_| "vCPU thread panicked".to_string())?;
        return Err(format!(
            "guest did not write its data: status {}, run {r:?}",
            io.status.load(Ordering::SeqCst)
        ));
    }
    let write_ms = t_run.elapsed().as_secs_f64() * 1e3;
    let touch_before_us = io.touch_before_ns.load(Ordering::SeqCst) as f64 / 1e3;
    // The guest measures the blackout between two clock reads: let it take a few first.
    wait_for(
        "the guest to read its clock",
        Duration::from_secs(10),
        || io.clock_reads.load(Ordering::SeqCst) >= 3 || th.is_finished(),
    )?;

    if o.private {
        let mut h = lock(shared);
        let v = super::private::convert_and_check(&mut h, pid, vm.gmem, o)?;
        h.report("rfc-private", v);
    }

    // The baseline preserves nothing: pause, then hand the guest over.
    if let Some(dir) = &o.snapshot_dir {
        let baseline = baseline
            .ok_or_else(|| format!("snapshot-dir={dir}: this image has no snapshot baseline"))?;
        let pause_ns = monotonic_ns();
        kicker.kick().map_err(e("kick"))?;
        let exit = th
            .join()
            .map_err(|_| "vCPU thread panicked".to_string())??;
        if exit != RunExit::Interrupted {
            return Err(format!("vCPU did not pause: {exit:?}"));
        }
        let paused_at_ns = monotonic_ns();
        drop(kicker);
        let paused = Paused {
            vm,
            io,
            pause_ns,
            paused_at_ns,
        };
        return baseline.run(shared, paused, o, dir);
    }

    // From here on, any failure aborts the update: the sessions are closed (which unpreserves
    // and unfreezes everything) and the guest carries on where it is.
    let mut th = Some(th);
    let mut sessions: Vec<i32> = Vec::new();
    let r = update(
        shared,
        pid,
        dev,
        o,
        &vm,
        &kicker,
        &mut th,
        &mut sessions,
        (write_ms, touch_before_us),
    );
    let err = match r {
        Ok(never) => match never {},
        Err(err) => err,
    };
    // Still here: the update did not happen.
    drop(kicker);
    {
        let mut h = lock(shared);
        for s in sessions.into_iter().rev() {
            let _ = h.close(pid, s);
        }
    }
    io.proceed.store(true, Ordering::SeqCst);
    let exit = match th.take() {
        Some(t) => t.join().map_err(|_| "vCPU thread panicked".to_string())??,
        None => {
            let mut handler = io_handler(&io, GuestMode::RunUpdate, None);
            Host::vcpu_run(shared, pid, vm.vcpu, &mut handler).map_err(e("KVM_RUN"))?
        }
    };
    let rep = read_mailbox(&mut lock(shared), &vm)?;
    let status = lock(shared).status();
    Ok(report::aborted(
        &err, &exit, &rep, write_ms, o.data, &status,
    ))
}

/// Preserve, pause, save and kexec. Returns only on failure: `(what failed, errno)`.
#[allow(clippy::too_many_arguments)]
fn update(
    shared: &Arc<Mutex<Host>>,
    pid: Pid,
    dev: i32,
    o: &Options,
    vm: &Vm,
    kicker: &VcpuKicker,
    th: &mut Option<std::thread::JoinHandle<Result<RunExit, String>>>,
    sessions: &mut Vec<i32>,
    (write_ms, touch_before_us): (f64, f64),
) -> Result<std::convert::Infallible, (String, i32)> {
    let fail = |what: &'static str| move |err: Errno| (format!("{what}: {err}"), err.0);
    let gmem_runs = super::fragment::gmem_run_stats(&lock(shared), pid, vm.gmem);
    // Preserve while the guest keeps running: the guest_memfd freezes here.
    let t = Instant::now();
    let (st, m, folios) = {
        let mut h = lock(shared);
        let s = create_session(&mut h, pid, dev, SESSION).map_err(fail("create session"))?;
        sessions.push(s);
        preserve_fd(&mut h, pid, s, vm.gmem, GMEM_TOKEN).map_err(fail("preserve guest_memfd"))?;
        if !o.no_vm {
            preserve_fd(&mut h, pid, s, vm.vm, VM_TOKEN).map_err(fail("preserve VM"))?;
        }
        preserve_fd(&mut h, pid, s, vm.low, LOW_TOKEN).map_err(fail("preserve low memory"))?;
        // The memfds the vCPU state and the VMM's own state go into are sized and preserved
        // now, so that after the pause only their bytes are written (a preserved memfd keeps
        // its size but stays writable).
        // The vCPU: its fd, whose state the kernel saves at freeze (`vcpu=kernel`), or a
        // memfd the VMM writes the state into once the vCPU is paused (the RFC's flow).
        let st = if o.vcpu_luo {
            preserve_fd(&mut h, pid, s, vm.vcpu, VCPU_TOKEN).map_err(fail("preserve vCPU"))?;
            None
        } else {
            let st = h
                .memfd_create(pid, "vcpu-state", 0)
                .map_err(fail("memfd"))?;
            h.ftruncate(pid, st, STATE_BYTES)
                .map_err(fail("size vCPU state"))?;
            preserve_fd(&mut h, pid, s, st, VCPU_TOKEN).map_err(fail("preserve vCPU state"))?;
            Some(st)
        };
        let state_s =
            create_session(&mut h, pid, dev, STATE).map_err(fail("create state session"))?;
        sessions.push(state_s);
        let m = h.memfd_create(pid, "state", 0).map_err(fail("memfd"))?;
        h.ftruncate(pid, m, STATE_BYTES)
            .map_err(fail("size state"))?;
        preserve_fd(&mut h, pid, state_s, m, STATE_TOKEN).map_err(fail("preserve state"))?;
        let f = h
            .fd_file(pid, vm.gmem)
            .ok()
            .and_then(|f| match h.files.kind(f) {
                Some(crate::host::files::FileKind::GuestMemfd(g)) => Some(g.pages.nr_present()),
                _ => None,
            });
        (st, m, f.unwrap_or(0))
    };
    let preserve_us = t.elapsed().as_secs_f64() * 1e6;

    // Pause: from here to the resume in the next image is the guest's blackout.
    let pause_ns = monotonic_ns();
    kicker
        .kick()
        .map_err(|err| (format!("kick: {err}"), libc::EIO))?;
    let exit = match th.take() {
        Some(t) => t
            .join()
            .map_err(|_| ("vCPU thread panicked".to_string(), libc::EIO))?,
        None => Err("no vCPU thread".into()),
    };
    match exit {
        Ok(RunExit::Interrupted) => {}
        other => return Err((format!("vCPU did not pause: {other:?}"), libc::EIO)),
    }
    let paused_at_ns = monotonic_ns();
    let t = Instant::now();
    let mut h = lock(shared);
    if let Some(st) = st {
        let state = {
            let v = h.vcpu(pid, vm.vcpu).map_err(fail("vcpu"))?;
            let v = v.lock().map_err(|_| ("vcpu lock".to_string(), libc::EIO))?;
            VcpuState::save(&v)
                .map_err(|err| (format!("save vCPU: {err}"), libc::EIO))?
                .to_bytes()
        };
        let mut framed = (state.len() as u64).to_le_bytes().to_vec();
        framed.extend_from_slice(&state);
        h.pwrite(pid, st, &framed, 0)
            .map_err(fail("write vCPU state"))?;
    }
    let save_us = t.elapsed().as_secs_f64() * 1e6;

    let ss = StageState {
        opts: o.clone(),
        pause_ns,
        paused_at_ns,
        preserve_us,
        pause_us: (paused_at_ns - pause_ns) as f64 / 1e3,
        save_us,
        preserved_folios: folios,
        touch_before_us,
        gmem_runs,
    };
    let text = serde_json::to_vec(&ss).map_err(|err| (format!("state: {err}"), libc::EINVAL))?;
    h.pwrite(pid, m, &text, 0).map_err(fail("write state"))?;
    h.report(
        "rfc-stage1",
        report::stage1(write_ms, preserve_us, folios, &ss),
    );
    // The kexec: returns only if it was refused.
    let Err(err) = h.kexec(crate::kexec::KexecRequest::default());
    Err((err.to_string(), err.errno()))
}
