//! The baseline the blackout benchmark compares live update with: what a user does without
//! it. The RFC scenario's VMM (`vmm::rfc`) runs the guest until it has written its data and
//! pauses it; with `snapshot-dir` set it hands the paused guest to [`SnapshotRestore`], which
//! saves all guest memory and the vCPU state to a file, tears the VM down, creates a new VM
//! and guest_memfd, loads everything back and resumes. The guest measures the blackout the
//! same way. (The VMM knows only its `Baseline` trait; `cli::boot` passes this one in.)

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

use crate::abi::kvm::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};
use crate::host::Host;
use crate::kvm::vcpu::VcpuState;
use crate::kvm::RunExit;
use crate::time::monotonic_ns;
use crate::vmm::guest::{self, GuestMode};
use crate::vmm::libkvm;
use crate::vmm::rfc::{bind, e, io_handler, lock, read_mailbox, Baseline, Options, Paused, Vm};

/// Bytes moved per read/write of the snapshot baseline.
const SNAPSHOT_CHUNK: usize = 1 << 20;

/// The snapshot/restore baseline, as the RFC VMM's `Baseline`.
pub struct SnapshotRestore;

impl Baseline for SnapshotRestore {
    fn run(
        &self,
        shared: &Arc<Mutex<Host>>,
        guest: Paused,
        o: &Options,
        dir: &str,
    ) -> Result<Value, String> {
        snapshot_restore(shared, guest, o, dir)
    }
}

/// The baseline: what a user does without live update. Save all guest memory and the vCPU
/// state to a file, tear the VM down, create a new VM and guest_memfd, load everything back and
/// resume. The guest measures the blackout the same way.
fn snapshot_restore(
    shared: &Arc<Mutex<Host>>,
    guest: Paused,
    o: &Options,
    dir: &str,
) -> Result<Value, String> {
    use std::io::{Read, Write};
    let Paused {
        vm,
        io,
        pause_ns,
        paused_at_ns,
    } = guest;
    let pid = vm.pid;
    let path =
        std::path::Path::new(dir).join(format!("handover-snapshot-{}.bin", std::process::id()));
    /// Removes the snapshot file however this function ends.
    struct Cleanup<'a>(&'a std::path::Path);
    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(self.0);
        }
    }
    let _cleanup = Cleanup(&path);
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    let t_save = monotonic_ns();
    {
        let mut h = lock(shared);
        let state = {
            let v = h.vcpu(pid, vm.vcpu).map_err(e("vcpu"))?;
            let v = v.lock().map_err(|_| "vcpu lock".to_string())?;
            VcpuState::save(&v).map_err(e("save vCPU"))?.to_bytes()
        };
        let gmap = h
            .mmap(
                pid,
                vm.gmem,
                o.guest_mem,
                libc::PROT_READ,
                libc::MAP_SHARED,
                0,
            )
            .map_err(e("mmap guest_memfd"))?;
        let mut f = std::fs::File::create(&path).map_err(e("create snapshot file"))?;
        f.write_all(&(state.len() as u64).to_le_bytes())
            .map_err(e("write"))?;
        f.write_all(&state).map_err(e("write"))?;
        // Guest memory is read through the process's mappings like any VMM reads it (a hole
        // reads as zeros), through a bounce buffer: no Rust reference into guest memory.
        let mut buf = vec![0u8; SNAPSHOT_CHUNK];
        for (map, len) in [
            (vm.low_map, guest::LOW_MEM_SIZE as u64),
            (gmap, o.guest_mem),
        ] {
            let mut off = 0u64;
            while off < len {
                let n = (len - off).min(SNAPSHOT_CHUNK as u64) as usize;
                h.user_read(pid, map.addr + off as usize, &mut buf[..n])
                    .map_err(e("read guest memory"))?;
                f.write_all(&buf[..n]).map_err(e("write guest memory"))?;
                off += n as u64;
            }
        }
        f.sync_all().map_err(e("sync snapshot"))?;
        h.munmap(pid, gmap).map_err(e("munmap"))?;
        // Tear the VM down: its memory goes back to the host.
        for fd in [vm.vcpu, vm.gmem, vm.vm] {
            h.close(pid, fd).map_err(e("close"))?;
        }
    }
    let t_saved = monotonic_ns();
    let (vcpu, low_map) = {
        let mut h = lock(shared);
        let kvm = libkvm::open_kvm(&mut h, pid).map_err(e("open /dev/kvm"))?;
        let nvm = libkvm::create_vm(&mut h, pid, kvm, 0).map_err(e("KVM_CREATE_VM"))?;
        let gmem = libkvm::create_guest_memfd(
            &mut h,
            pid,
            nvm,
            o.guest_mem,
            GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
        )
        .map_err(e("KVM_CREATE_GUEST_MEMFD"))?;
        h.fallocate(pid, gmem, libc::FALLOC_FL_KEEP_SIZE, 0, o.guest_mem)
            .map_err(e("fallocate"))?;
        let gmap = h
            .mmap(pid, gmem, o.guest_mem, rw, libc::MAP_SHARED, 0)
            .map_err(e("mmap guest_memfd"))?;
        let mut f = std::fs::File::open(&path).map_err(e("open snapshot"))?;
        let mut n = [0u8; 8];
        f.read_exact(&mut n).map_err(e("read"))?;
        let mut state = vec![0u8; u64::from_le_bytes(n).min(1 << 20) as usize];
        f.read_exact(&mut state).map_err(e("read"))?;
        let mut buf = vec![0u8; SNAPSHOT_CHUNK];
        for (map, len) in [
            (vm.low_map, guest::LOW_MEM_SIZE as u64),
            (gmap, o.guest_mem),
        ] {
            let mut off = 0u64;
            while off < len {
                let n = (len - off).min(SNAPSHOT_CHUNK as u64) as usize;
                f.read_exact(&mut buf[..n])
                    .map_err(e("read guest memory"))?;
                h.user_write(pid, map.addr + off as usize, &buf[..n])
                    .map_err(e("write guest memory"))?;
                off += n as u64;
            }
        }
        h.munmap(pid, gmap).map_err(e("munmap"))?;
        let (low_map, _slots) = bind(&mut h, pid, nvm, gmem, vm.low, o, true)?;
        let vcpu =
            crate::vmm::libkvm::create_vcpu(&mut h, pid, nvm, 0).map_err(e("create vCPU"))?;
        let state = VcpuState::from_bytes(&state).map_err(e("vCPU state"))?;
        let v = h.vcpu(pid, vcpu).map_err(e("vcpu"))?;
        let v = v.lock().map_err(|_| "vcpu lock".to_string())?;
        state.restore(&v).map_err(e("restore vCPU"))?;
        (vcpu, low_map)
    };
    let t_resume = monotonic_ns();
    io.proceed.store(true, Ordering::SeqCst);
    let mut handler = io_handler(&io, GuestMode::RunUpdate, None);
    let exit = Host::vcpu_run(shared, pid, vcpu, &mut handler).map_err(e("KVM_RUN"))?;
    let touch_after_us = io.since_last_clock_ns() as f64 / 1e3;
    let mut h = lock(shared);
    let vmh = Vm {
        pid,
        vm: -1,
        gmem: -1,
        low: vm.low,
        low_map,
        vcpu,
    };
    let rep = read_mailbox(&mut h, &vmh)?;
    let ok = rep.status == guest::STATUS_VERIFY_OK && exit == RunExit::Stopped;
    let us = |a: u64, b: u64| b.saturating_sub(a) as f64 / 1e3;
    Ok(json!({
        "ok": ok,
        "snapshot": true,
        "guest_status": guest::status_name(rep.status),
        "verified_bytes": if ok { o.data } else { 0 },
        "blackout_us": rep.max_gap_us,
        "snapshot_bytes": o.guest_mem + guest::LOW_MEM_SIZE as u64,
        "brownout": {
            "touch_before_us": io.touch_before_ns.load(Ordering::SeqCst) as f64 / 1e3,
            "touch_after_us": touch_after_us,
            "bytes": o.data,
        },
        "phases_us": {
            "pause": us(pause_ns, paused_at_ns),
            "save": us(t_save, t_saved),
            "load": us(t_saved, t_resume),
            "host_pause_to_resume": us(pause_ns, t_resume),
        },
        "opts": o,
    }))
}
