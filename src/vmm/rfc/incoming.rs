//! The incoming side of the update, in the new image: retrieve the VMM's state, the VM, the
//! guest_memfd (in either order), low memory and the vCPU state; bind the memslots, restore the
//! vCPU, resume the guest and let it verify its data; then commit, and for a soak go round again.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use serde_json::Value;

use crate::host::Host;
use crate::kvm::vcpu::VcpuState;
use crate::kvm::RunExit;
use crate::time::monotonic_ns;
use crate::uapi::Pid;
use crate::vmm::guest::{self, GuestMode};
use crate::vmm::libkvm;
use crate::vmm::libluo::*;

use super::devices::{io_handler, GuestIo};
use super::machine::{bind, read_mailbox, restart_guest, Vm};
use super::options::read_stage_state;
use super::outgoing::{run_and_update, Baseline};
use super::report::{self, Stage2Report, Stage2Times};
use super::{
    e, lock, GMEM_TOKEN, LOW_TOKEN, SESSION, STATE_BYTES, STATE_TOKEN, VCPU_TOKEN, VM_TOKEN,
};

/// Stage 2, after the kexec: take the VM back and resume the guest (`state_session` is the
/// VMM's own session, retrieved already).
pub(super) fn stage2(
    shared: &Arc<Mutex<Host>>,
    pid: Pid,
    dev: i32,
    state_session: i32,
    baseline: Option<&dyn Baseline>,
) -> Result<Value, String> {
    let t_stage2 = monotonic_ns();
    let mut h = lock(shared);
    let m = retrieve_fd(&mut h, pid, state_session, STATE_TOKEN).map_err(e("retrieve state"))?;
    let text = read_all(&mut h, pid, m, 1 << 16).map_err(e("read state"))?;
    let ss = read_stage_state(&text, h.mm.ram.size())?;
    let o = ss.opts.clone();
    let s = retrieve_session(&mut h, pid, dev, SESSION).map_err(e("retrieve session"))?;
    if o.finish_early {
        // Retrieve the guest_memfd only (the VM comes along inside LUO), then FINISH.
        let g = retrieve_fd(&mut h, pid, s, GMEM_TOKEN).map_err(e("retrieve guest_memfd"))?;
        finish(&mut h, pid, s).map_err(e("finish"))?;
        let vm_after = retrieve_fd(&mut h, pid, s, VM_TOKEN);
        let map = h
            .mmap(pid, g, o.guest_mem, libc::PROT_READ, libc::MAP_SHARED, 0)
            .map_err(e("mmap"))?;
        // In pieces: `data` may be as large as RAM.
        let mut buf = vec![0u8; (1usize << 20).min(o.data as usize)];
        let mut bad = None;
        let mut off = 0u64;
        while off < o.data && bad.is_none() {
            let n = buf.len().min((o.data - off) as usize);
            h.user_read(pid, map.addr + off as usize, &mut buf[..n])
                .map_err(e("read guest_memfd"))?;
            bad = guest::find_mismatch(&buf[..n], off);
            off += n as u64;
        }
        return Ok(report::finish_early(vm_after.err(), o.data, bad));
    }
    // `order=vcpu-first`: the vCPU before anything else; its handler retrieves the VM.
    let mut vcpu = None;
    if o.vcpu_first {
        vcpu = Some(retrieve_fd(&mut h, pid, s, VCPU_TOKEN).map_err(e("retrieve vCPU"))?);
    }
    let (vm, gmem) = if o.gmem_first {
        let g = retrieve_fd(&mut h, pid, s, GMEM_TOKEN).map_err(e("retrieve guest_memfd"))?;
        (
            retrieve_fd(&mut h, pid, s, VM_TOKEN).map_err(e("retrieve VM"))?,
            g,
        )
    } else {
        let v = retrieve_fd(&mut h, pid, s, VM_TOKEN).map_err(e("retrieve VM"))?;
        (
            v,
            retrieve_fd(&mut h, pid, s, GMEM_TOKEN).map_err(e("retrieve guest_memfd"))?,
        )
    };
    let low = retrieve_fd(&mut h, pid, s, LOW_TOKEN).map_err(e("retrieve low memory"))?;
    // The VMM-saved vCPU state (`vcpu=vmm`, the RFC's flow), read now; the vCPU comes after
    // the memslots in every order but `vcpu-first`: a retrieved VM's irqchip is created with
    // its first vCPU, and memslots bound before it cost no irqchip penalty.
    let saved = if o.vcpu_luo {
        None
    } else {
        Some(retrieve_vmm_saved_state(&mut h, pid, s)?)
    };
    let t_retrieved = monotonic_ns();
    let state = saved
        .map(|(fd, bytes)| VcpuState::from_bytes(&bytes).map(|st| (fd, st)))
        .transpose()
        .map_err(e("vCPU state"))?;
    let (low_map, slots) = bind(&mut h, pid, vm, gmem, low, &o, !o.lazy_slots)?;
    let t_bound = monotonic_ns();
    let vcpu = match vcpu {
        Some(v) => v,
        None if o.vcpu_luo => {
            retrieve_fd(&mut h, pid, s, VCPU_TOKEN).map_err(e("retrieve vCPU"))?
        }
        None => libkvm::create_vcpu(&mut h, pid, vm, 0).map_err(e("create vCPU"))?,
    };
    let mut state_fd = None;
    if let Some((fd, state)) = state {
        state_fd = Some(fd);
        // The XSAVE size through the host's open /dev/kvm (one ioctl, not an open).
        let kvm_sys = h.real_kvm().map_err(e("kvm"))?;
        crate::kvm::vcpu::init_xsave_size(&kvm_sys);
        let v = h.vcpu(pid, vcpu).map_err(e("vcpu"))?;
        let v = v.lock().map_err(|_| "vcpu lock".to_string())?;
        state.restore(&v).map_err(e("restore vCPU"))?;
    }
    let vmh = Vm {
        pid,
        vm,
        gmem,
        low,
        low_map,
        vcpu,
    };
    let vm_name = h
        .vm_inner(h.fd_file(pid, vm).map_err(e("vm"))?)
        .map(|i| i.name.clone())
        .unwrap_or_default();
    let boot = h.info.clone();
    let params = h.params.clone();
    let handover_bytes = params.prev_handover_bytes.unwrap_or(0);
    drop(h);
    // Resuming the guest accepts the update: from here on there is no rollback.
    lock(shared).kho.mark_committed();
    let t_resume = monotonic_ns();
    // Resumed: bind the other chunks of guest memory off the blackout.
    let bg =
        (o.lazy_slots && o.background_slots).then(|| slots.bind_rest_in_background(shared.clone()));
    let io = GuestIo::default();
    io.proceed.store(true, Ordering::SeqCst);
    let mut handler = io_handler(
        &io,
        GuestMode::RunUpdate,
        Some((shared.as_ref(), slots.as_ref())),
    );
    let exit = Host::vcpu_run(shared, pid, vcpu, &mut handler).map_err(e("KVM_RUN"))?;
    let t_done = monotonic_ns();
    let touch_after_us = io.since_last_clock_ns() as f64 / 1e3;
    // The guest runs again: the previous image's VMs can go now, and what was read of the
    // handover.
    {
        let mut h = lock(shared);
        h.release_previous_image(false);
        let Host { kho, mm, .. } = &mut *h;
        kho.commit(mm).map_err(e("commit"))?;
        h.refill_hugepages();
    }
    if o.private {
        let mut h = lock(shared);
        let v = super::private::check(&mut h, pid, gmem, &o, 2)?;
        h.report("rfc-private", v);
    }
    let bg_us = match bg.map(|t| t.join()) {
        Some(Ok(r)) => Some(r?),
        Some(Err(_)) => return Err("slot binding thread panicked".into()),
        None => None,
    };
    let slots_bound = slots.nr_bound();
    let mut h = lock(shared);
    let rep = read_mailbox(&mut h, &vmh)?;
    finish(&mut h, pid, s).map_err(e("finish session"))?;
    let ok = rep.status == guest::STATUS_VERIFY_OK && exit == RunExit::Stopped;
    let start = params.kexec_start_ns.unwrap_or(ss.paused_at_ns);
    let times = Stage2Times {
        kexec_start: start,
        exec: params.exec_ns.unwrap_or(start),
        main: crate::time::main_ns(),
        boot_start: boot.boot_start_ns,
        boot_us: boot.boot_us,
        stage2: t_stage2,
        retrieved: t_retrieved,
        bound: t_bound,
        resume: t_resume,
        done: t_done,
    };
    let result = Stage2Report {
        ok,
        guest: &rep,
        state: &ss,
        handover_bytes,
        vm_name,
        chunks: slots.nr(),
        bound_at_end: slots_bound,
        background_bind_us: bg_us,
        touch_after_us,
        times,
    }
    .to_json();
    // Close what this cycle read (they would otherwise pile up over a soak).
    for fd in std::iter::once(m).chain(state_fd) {
        let _ = h.close(pid, fd);
    }
    let cycle = h.info.kexec_count;
    if ok && cycle < o.cycles {
        let frames_used = h.mm.stats().used;
        h.report(
            "rfc-cycle",
            report::cycle(cycle, ok, rep.max_gap_us, frames_used, result),
        );
        drop(h);
        let vm = restart_guest(shared, vmh, &o)?;
        return run_and_update(shared, pid, dev, &o, vm, baseline);
    }
    drop(h);
    let mut result = result;
    if let Some(obj) = result.as_object_mut() {
        obj.insert("cycle".into(), cycle.into());
        obj.insert("rollback".into(), lock(shared).info.rollback.clone().into());
    }
    Ok(result)
}

/// The vCPU state the VMM saved in its preserved memfd (`vcpu=vmm`): the fd and the encoded
/// state, checked for length (the encoding's own checks come with its decoding).
fn retrieve_vmm_saved_state(h: &mut Host, pid: Pid, s: i32) -> Result<(i32, Vec<u8>), String> {
    let st = retrieve_fd(h, pid, s, VCPU_TOKEN).map_err(e("retrieve vCPU state"))?;
    let mut bytes = read_all(h, pid, st, STATE_BYTES as usize).map_err(e("read vCPU state"))?;
    let len = bytes
        .get(..8)
        .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or_default())) as usize;
    if bytes.len() < 8 || len > bytes.len() - 8 {
        return Err("vCPU state: bad length".into());
    }
    bytes.truncate(8 + len);
    bytes.drain(..8);
    Ok((st, bytes))
}
