//! The live-snapshot VMM before the update: run the guest, pre-copy its memory, pause, write
//! the rest, exec.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::process::Command;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{Kvm, VmFd};
use serde::{Deserialize, Serialize};

use super::mem::{dirty_ranges, GuestMap, PAGE};
use super::vcpu::{run_before, Paused};
use super::{check_size, Phases, Round, VmmOptions, DATA_GPA};
use crate::kexec::exec::exec_keeping;
use crate::kexec::reaper::spawn_reaper;
use crate::kvm::vcpu::{init_xsave_size, VcpuKicker};
use crate::time::monotonic_ns;
use crate::vmm::guest::{
    build_image, configure_vcpu, read_report, GuestMode, GuestParams, LOW_MEM_SIZE, MAILBOX_GPA,
    MAILBOX_LEN,
};

/// How long the guest may take to fill its memory before the VMM gives up.
const FILL_TIMEOUT: Duration = Duration::from_secs(600);

/// What the outgoing process hands to the new one on its command line (`--resume JSON`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(super) struct Carry {
    /// Offset of the encoded vCPU state in the snapshot file.
    pub state_off: u64,
    /// Its length.
    pub state_len: u64,
    /// Pre-copy start (dirty logging turned on), monotonic ns.
    pub start_ns: u64,
    /// The kick, monotonic ns.
    pub pause_ns: u64,
    /// Right before the reaper clone and the exec, monotonic ns.
    pub exec_ns: u64,
    /// Pre-copy rounds.
    pub precopy: Vec<Round>,
    /// The copy while paused.
    pub final_round: Round,
    /// Phases measured so far.
    pub phases: Phases,
    /// Bytes written to the file.
    pub bytes_written: u64,
    /// The guest's largest clock gap so far, read from its mailbox right before the kick.
    pub max_gap_before_pause_us: u64,
    /// The same right before dirty logging was turned on.
    pub max_gap_before_precopy_us: u64,
    /// The same right after dirty logging was turned on.
    pub max_gap_after_enable_us: u64,
}

/// The guest's largest clock gap so far (its mailbox, read while it runs).
fn max_gap_us(low: &GuestMap) -> Result<u64, String> {
    let mut mb = [0u8; MAILBOX_LEN];
    low.read_volatile(MAILBOX_GPA as usize, &mut mb)?;
    Ok(read_report(&mb)
        .map_err(|e| format!("guest mailbox: {e}"))?
        .max_gap_us)
}

fn us(a: u64, b: u64) -> f64 {
    b.saturating_sub(a) as f64 / 1e3
}

/// Bind `map` at `gpa` as `slot` with `flags`.
fn set_slot(vm: &VmFd, slot: u32, gpa: u64, map: &GuestMap, flags: u32) -> Result<(), String> {
    let region = kvm_userspace_memory_region {
        slot,
        flags,
        guest_phys_addr: gpa,
        memory_size: map.len() as u64,
        userspace_addr: map.addr(),
    };
    // SAFETY: `map` is a live mapping of `len` bytes that the caller keeps until the VM is gone
    // (or, across the exec, the reaper keeps the address space holding it).
    unsafe { vm.set_user_memory_region(region) }
        .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION slot {slot}: {e}"))
}

/// The guest's memory slots: (slot, GPA, mapping, file offset).
type Slots<'a> = [(u32, u64, &'a GuestMap, u64); 2];

/// One round: fetch each slot's dirty log and write its dirty pages to the file.
fn copy_dirty(vm: &VmFd, file: &File, slots: &Slots<'_>) -> Result<(Round, u64), String> {
    let t0 = monotonic_ns();
    let mut logs = Vec::with_capacity(slots.len());
    for &(slot, _, map, _) in slots {
        let log = vm
            .get_dirty_log(slot, map.len())
            .map_err(|e| format!("KVM_GET_DIRTY_LOG slot {slot}: {e}"))?;
        logs.push(log);
    }
    let t1 = monotonic_ns();
    let (mut pages, mut runs, mut bytes) = (0, 0, 0);
    for (&(_, _, map, file_off), log) in slots.iter().zip(&logs) {
        for (first, n) in dirty_ranges(log, map.len() as u64 / PAGE) {
            bytes += map.pwrite_to(file, first * PAGE, n * PAGE, file_off + first * PAGE)?;
            pages += n;
            runs += 1;
        }
    }
    let t2 = monotonic_ns();
    Ok((
        Round {
            pages,
            runs,
            dirty_log_us: us(t0, t1),
            us: us(t0, t2),
            guest_max_gap_us: 0,
        },
        bytes,
    ))
}

/// Bytes reserved for the vCPU state after guest memory (a larger state still works: the
/// file grows in the blackout then).
const STATE_AREA: usize = 64 << 10;

/// `pwrite` all of `buf` at `off`.
fn pwrite_all(file: &File, buf: &[u8], off: u64) -> Result<(), String> {
    let mut done = 0;
    while done < buf.len() {
        let n =
            rustix::io::pwrite(file, &buf[done..], off + done as u64).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("wrote nothing".into());
        }
        done += n;
    }
    Ok(())
}

fn fdatasync(file: &File) -> Result<(), String> {
    file.sync_data()
        .map_err(|e| format!("fdatasync snapshot: {e}"))
}

/// Removes the snapshot file unless disarmed (before the exec, which hands it on).
struct RemoveOnError<'a>(Option<&'a std::path::Path>);

impl Drop for RemoveOnError<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The outgoing VMM: run the guest, live-snapshot it into `o.snapshot`, exec this binary to
/// restore it. Returns only on failure, with the error (the snapshot file is removed then).
pub fn snapshot_and_exec(o: &VmmOptions) -> String {
    match snapshot_then_exec(o) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

fn snapshot_then_exec(o: &VmmOptions) -> Result<std::convert::Infallible, String> {
    check_size(o.size)?;
    if o.max_rounds == 0 {
        return Err("--max-rounds must be at least 1".into());
    }
    let size = o.size as usize;
    let kvm = Kvm::new().map_err(|e| format!("open /dev/kvm: {e}"))?;
    init_xsave_size(&kvm);
    let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
    let low = GuestMap::anonymous(LOW_MEM_SIZE)?;
    let data = GuestMap::anonymous(size)?;
    let params = GuestParams {
        data_gpa: DATA_GPA,
        data_len: o.size,
        mode: GuestMode::RunUpdate,
    };
    let mut image = vec![0u8; LOW_MEM_SIZE];
    build_image(&mut image, &params).map_err(|e| format!("guest image: {e}"))?;
    low.write(0, &image)?;
    let slots: Slots<'_> = [(0, 0, &low, 0), (1, DATA_GPA, &data, LOW_MEM_SIZE as u64)];
    for &(slot, gpa, map, _) in &slots {
        set_slot(&vm, slot, gpa, map, 0)?;
    }
    let vcpu = vm
        .create_vcpu(0)
        .map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;
    configure_vcpu(&kvm, &vcpu).map_err(|e| format!("configure vCPU: {e}"))?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(&o.snapshot)
        .map_err(|e| format!("create {}: {e}", o.snapshot.display()))?;
    let mut cleanup = RemoveOnError(Some(&o.snapshot));

    let kicker = Arc::new(VcpuKicker::new());
    let (tx, rx) = mpsc::channel();
    let k = kicker.clone();
    let thread = std::thread::Builder::new()
        .name("vcpu0".into())
        .spawn(move || run_before(vcpu, k, tx))
        .map_err(|e| format!("vCPU thread: {e}"))?;
    let (first_touch_ns, touch_ns) = match rx.recv_timeout(FILL_TIMEOUT) {
        Ok(ns) => ns,
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            return Err(match thread.join() {
                Ok(Err(e)) => e,
                _ => "the vCPU thread ended before the guest wrote its memory".into(),
            });
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            // The vCPU thread still runs; the process exits with the error.
            return Err("the guest did not write its memory in time".into());
        }
    };
    let mut ph = Phases {
        first_touch_before: first_touch_ns as f64 / 1e3,
        touch_before: touch_ns as f64 / 1e3,
        ..Phases::default()
    };

    // Pre-copy while the guest runs.
    let max_gap_before_precopy_us = max_gap_us(&low)?;
    let start_ns = monotonic_ns();
    for &(slot, gpa, map, _) in &slots {
        set_slot(&vm, slot, gpa, map, KVM_MEM_LOG_DIRTY_PAGES)?;
    }
    let logging_ns = monotonic_ns();
    ph.enable_dirty_log = us(start_ns, logging_ns);
    let max_gap_after_enable_us = max_gap_us(&low)?;
    let mut bytes_written = 0;
    let mut precopy = Vec::new();
    {
        let t0 = monotonic_ns();
        let mut pages = 0;
        for &(_, _, map, file_off) in &slots {
            bytes_written += map.pwrite_to(&file, 0, map.len() as u64, file_off)?;
            pages += map.len() as u64 / PAGE;
        }
        precopy.push(Round {
            pages,
            runs: slots.len() as u64,
            dirty_log_us: 0.0,
            us: us(t0, monotonic_ns()),
            guest_max_gap_us: max_gap_us(&low)?,
        });
    }
    while precopy.len() < o.max_rounds as usize {
        let (mut round, bytes) = copy_dirty(&vm, &file, &slots)?;
        round.guest_max_gap_us = max_gap_us(&low)?;
        bytes_written += bytes;
        let done = round.pages <= o.threshold_pages;
        precopy.push(round);
        if done {
            break;
        }
    }
    // Allocate and write the state area now, so that the fdatasync in the blackout finds only
    // overwritten data blocks and no size or extent change to commit.
    let state_off = LOW_MEM_SIZE as u64 + o.size;
    pwrite_all(&file, &[0u8; STATE_AREA], state_off)
        .map_err(|e| format!("reserve the vCPU state area: {e}"))?;
    bytes_written += STATE_AREA as u64;
    let precopied_ns = monotonic_ns();
    ph.precopy = us(logging_ns, precopied_ns);
    fdatasync(&file)?;
    let synced_ns = monotonic_ns();
    ph.precopy_fsync = us(precopied_ns, synced_ns);
    if o.cold_cache {
        // Model a real kexec, which loses the page cache: drop the file's (clean) pages, so the
        // restore faults them in from disk. Left out of the total (see `Phases::drop_cache`).
        rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed)
            .map_err(|e| format!("fadvise DONTNEED: {e}"))?;
        ph.drop_cache = us(synced_ns, monotonic_ns());
    }

    // Pause: the blackout starts here.
    let max_gap_before_pause_us = max_gap_us(&low)?;
    let pause_ns = monotonic_ns();
    kicker.kick().map_err(|e| format!("kick vCPU: {e}"))?;
    let Paused {
        vcpu,
        state,
        paused_ns,
        saved_ns,
    } = thread
        .join()
        .map_err(|_| "the vCPU thread panicked".to_string())??;
    ph.pause = us(pause_ns, paused_ns);
    ph.save_state = us(paused_ns, saved_ns);
    let t_final = monotonic_ns();
    let (final_round, bytes) = copy_dirty(&vm, &file, &slots)?;
    bytes_written += bytes;
    let t_state = monotonic_ns();
    ph.final_copy = us(t_final, t_state);
    let state = state.to_bytes();
    pwrite_all(&file, &state, state_off).map_err(|e| format!("write vCPU state: {e}"))?;
    bytes_written += state.len() as u64;
    let t_sync = monotonic_ns();
    ph.write_state = us(t_state, t_sync);
    fdatasync(&file)?;
    let exec_ns = monotonic_ns();
    ph.fsync = us(t_sync, exec_ns);

    // The host update: a reaper keeps the old VM and address space, then exec.
    let reaper = spawn_reaper();
    ph.reaper_spawn = us(exec_ns, monotonic_ns());
    let carry = Carry {
        state_off,
        state_len: state.len() as u64,
        start_ns,
        pause_ns,
        exec_ns,
        precopy,
        final_round,
        phases: ph,
        bytes_written,
        max_gap_before_pause_us,
        max_gap_before_precopy_us,
        max_gap_after_enable_us,
    };
    let carry = serde_json::to_string(&carry).map_err(|e| format!("encode carry: {e}"))?;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
    let mut cmd = Command::new(exe);
    cmd.args(["bench", "live-snapshot-vmm", "--size"])
        .arg(o.size.to_string())
        .arg("--snapshot")
        .arg(&o.snapshot)
        .arg("--resume")
        .arg(&carry);
    if let Some(r) = &o.report {
        cmd.arg("--report").arg(r);
    }
    if o.cold_cache {
        cmd.arg("--cold-cache");
    }
    let mut keep = Vec::new();
    if let Some(r) = &reaper {
        let fd = r.fd().as_raw_fd();
        cmd.arg("--reaper-fd").arg(fd.to_string());
        keep.push(fd);
    }
    cleanup.0 = None;
    let err = exec_keeping(&mut cmd, &keep);
    // Still here: the exec failed. Keep the VM alive until this point, then clean up.
    drop((vcpu, vm, low, data, file, reaper));
    let _ = std::fs::remove_file(&o.snapshot);
    Err(format!("exec: {err}"))
}
