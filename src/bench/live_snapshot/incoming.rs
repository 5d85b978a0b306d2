//! The live-snapshot VMM after the update: map the snapshot file as guest memory, restore the
//! vCPU, let the guest verify, report.

use std::fs::File;
use std::os::unix::fs::MetadataExt;

use kvm_ioctls::Kvm;

use super::mem::{page_cache_bytes, GuestMap};
use super::outgoing::Carry;
use super::vcpu::run_after;
use super::{check_size, LiveSnapshotRun, VmmOptions, DATA_GPA};
use crate::kexec::reaper::Reaper;
use crate::kvm::vcpu::{init_xsave_size, VcpuState};
use crate::time::monotonic_ns;
use crate::vmm::guest::{
    read_report, status_name, LOW_MEM_SIZE, MAILBOX_GPA, MAILBOX_LEN, STATUS_VERIFY_OK,
};

/// Largest vCPU state accepted from the file.
const MAX_STATE: u64 = 1 << 20;

fn us(a: u64, b: u64) -> f64 {
    b.saturating_sub(a) as f64 / 1e3
}

/// Removes the snapshot file however the restore ends.
struct Remove<'a>(&'a std::path::Path);

impl Drop for Remove<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.0);
    }
}

/// The incoming VMM: `carry` is the outgoing process's `--resume` argument, `reaper_fd` its
/// reaper's pidfd. Restores the guest from `o.snapshot` (mapped `MAP_PRIVATE`, faulted in
/// lazily), runs it to its final status and returns the whole run's result; the snapshot file
/// is removed in every case.
pub fn restore(
    o: &VmmOptions,
    carry: &str,
    reaper_fd: Option<i32>,
) -> Result<LiveSnapshotRun, String> {
    let main_ns = monotonic_ns();
    let _remove = Remove(&o.snapshot);
    let carry: Carry =
        serde_json::from_str(carry).map_err(|e| format!("bad --resume argument: {e}"))?;
    check_size(o.size)?;
    let mut reaper = match reaper_fd.map(Reaper::adopt) {
        Some(Ok(r)) => Some(r),
        Some(Err(e)) => {
            tracing::warn!("previous process's reaper not adopted: {e}");
            None
        }
        None => None,
    };
    let file =
        File::open(&o.snapshot).map_err(|e| format!("open {}: {e}", o.snapshot.display()))?;
    let file_len = file
        .metadata()
        .map_err(|e| format!("stat snapshot: {e}"))?
        .len();
    let need = (LOW_MEM_SIZE as u64 + o.size)
        .checked_add(carry.state_len)
        .filter(|&n| carry.state_off == LOW_MEM_SIZE as u64 + o.size && n <= file_len);
    if need.is_none() || carry.state_len > MAX_STATE {
        return Err(format!(
            "snapshot of {file_len} bytes does not hold {} bytes of memory and a vCPU state of \
             {} bytes at {}",
            LOW_MEM_SIZE as u64 + o.size,
            carry.state_len,
            carry.state_off
        ));
    }
    let mut state = vec![0u8; carry.state_len as usize];
    let mut off = 0;
    while off < state.len() {
        let n = rustix::io::pread(&file, &mut state[off..], carry.state_off + off as u64)
            .map_err(|e| format!("read vCPU state: {e}"))?;
        if n == 0 {
            return Err("read vCPU state: unexpected end of file".into());
        }
        off += n;
    }
    let state = VcpuState::from_bytes(&state).map_err(|e| format!("vCPU state: {e}"))?;

    let t_vm = monotonic_ns();
    let kvm = Kvm::new().map_err(|e| format!("open /dev/kvm: {e}"))?;
    init_xsave_size(&kvm);
    let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
    let t_slots = monotonic_ns();
    // Low memory (page tables, code, GDT, TSS, mailbox: what the guest needs to run at all)
    // eagerly, 2 MiB read in one go (from disk when the page cache is cold: faulting it in page
    // by page after the resume costs the guest tens of ms then); guest memory lazily, as the
    // guest touches it.
    let low = GuestMap::file_private(&file, 0, LOW_MEM_SIZE, true)?;
    let data = GuestMap::file_private(&file, LOW_MEM_SIZE as u64, o.size as usize, false)?;
    for (slot, gpa, map) in [(0u32, 0u64, &low), (1, DATA_GPA, &data)] {
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: map.len() as u64,
            userspace_addr: map.addr(),
        };
        // SAFETY: `map` is a live mapping that outlives the VM (dropped after it below).
        unsafe { vm.set_user_memory_region(region) }
            .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION slot {slot}: {e}"))?;
    }
    let t_vcpu = monotonic_ns();
    let vcpu = vm
        .create_vcpu(0)
        .map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;
    state
        .restore(&vcpu)
        .map_err(|e| format!("restore vCPU state: {e}"))?;
    let ready_ns = monotonic_ns();
    let thread = std::thread::Builder::new()
        .name("vcpu0".into())
        .spawn(move || run_after(vcpu))
        .map_err(|e| format!("vCPU thread: {e}"))?;
    // The guest runs again: let the previous process's objects go (in the background).
    if let Some(r) = reaper.as_mut() {
        r.kill();
    }
    let resumed = thread
        .join()
        .map_err(|_| "the vCPU thread panicked".to_string())??;
    let mut mailbox = [0u8; MAILBOX_LEN];
    low.read_volatile(MAILBOX_GPA as usize, &mut mailbox)?;
    let rep = read_report(&mailbox).map_err(|e| format!("guest mailbox: {e}"))?;
    let had_reaper = reaper.is_some();
    drop(reaper);
    drop(vm);

    let page_cache = page_cache_bytes(&file, file_len)?;
    let disk = file
        .metadata()
        .map_err(|e| format!("stat snapshot: {e}"))?
        .blocks()
        * 512;
    let ok = resumed.status == STATUS_VERIFY_OK && rep.status == STATUS_VERIFY_OK;
    let mut phases = carry.phases;
    phases.exec = us(carry.exec_ns, main_ns);
    phases.restore_setup = us(main_ns, ready_ns);
    phases.restore_read_state = us(main_ns, t_vm);
    phases.restore_create_vm = us(t_vm, t_slots);
    phases.restore_memslots = us(t_slots, t_vcpu);
    phases.restore_vcpu = us(t_vcpu, ready_ns);
    phases.brownout = us(resumed.resume_ns, resumed.final_ns);
    phases.touch_after = us(resumed.last_clock_ns, resumed.final_ns);
    Ok(LiveSnapshotRun {
        ok,
        guest_status: status_name(resumed.status).to_string(),
        size: o.size,
        verified_bytes: if ok { o.size } else { 0 },
        blackout_us: rep.max_gap_us,
        max_gap_before_precopy_us: carry.max_gap_before_precopy_us,
        max_gap_before_pause_us: carry.max_gap_before_pause_us,
        max_gap_after_enable_us: carry.max_gap_after_enable_us,
        host_pause_to_resume_us: us(carry.pause_ns, resumed.resume_ns),
        total_update_us: us(carry.start_ns, resumed.resume_ns) - phases.drop_cache,
        cold_cache: o.cold_cache,
        rounds: carry.precopy.len() as u32 + 1,
        precopy: carry.precopy,
        final_round: carry.final_round,
        phases_us: phases,
        bytes_written: carry.bytes_written,
        snapshot_file_bytes: file_len,
        disk_bytes: disk,
        page_cache_bytes: page_cache,
        extra_memory_bytes: disk + page_cache,
        reaper: had_reaper,
        snapshot_removed: false,
        snapshot_path: o.snapshot.display().to_string(),
    })
}
