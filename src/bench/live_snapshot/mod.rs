//! The strongest alternative to live update without KHO, as a benchmark baseline (issue 14):
//! a **live snapshot**, done by a VMM on plain Linux with `kvm-ioctls` straight on `/dev/kvm`
//! (no handover host).
//!
//! One run is one VMM process (`handover bench live-snapshot-vmm`, hidden) that
//!
//! 1. creates a VM with the test guest (`vmm::guest`): 2 MiB of low memory at GPA 0 and SIZE
//!    bytes of anonymous memory at [`DATA_GPA`] (4 GiB, as the RFC scenario); the guest runs
//!    `MODE_RUN_UPDATE` over all of it, so every page holds data it wrote at native speed;
//! 2. once the guest reports `STATUS_WRITTEN`, pre-copies its memory to a snapshot file while it
//!    runs: dirty logging on both memslots, round 1 writes everything, each further round the
//!    pages dirtied meanwhile, until a round finds at most `threshold` pages or after
//!    `max_rounds` rounds; then `fdatasync` (still outside the blackout);
//! 3. pauses the vCPU (kick: `immediate_exit` + a signal), writes the pages dirtied since the last
//!    round and the vCPU state, `fdatasync`s again;
//! 4. "updates the host" as our live update models it: a reaper child keeps the old VM and
//!    address space (`kexec::reaper`), and the process `execve`s this binary;
//! 5. the new process maps the snapshot file `MAP_PRIVATE` as guest memory (the 2 MiB of low
//!    memory populated at once, the guest's memory lazily),
//!    creates a VM and vCPU with the saved state, lets the guest proceed and kills the reaper.
//!    The guest reads its clock once more (the gap is the blackout it saw) and verifies every
//!    byte; each page faults in from the file's page cache on first access. From the resume to
//!    the guest's final status is the **brownout**.
//!
//! The snapshot file is: low memory at 0, guest memory at
//! [`LOW_MEM_SIZE`](crate::vmm::guest::LOW_MEM_SIZE), the encoded vCPU
//! state after it. [`run_point`] runs one such VMM and returns its [`LiveSnapshotRun`].
//!
//! What the guest sees is measured exactly as for live update: the largest gap between two of
//! its clock reads. The guest writes nothing but its mailbox and stack while it loops, so the
//! pre-copy converges after round 2 here; a guest dirtying memory faster would need more
//! rounds or never converge (then the final copy grows).

mod incoming;
pub(in crate::bench) mod mem;
mod outgoing;
mod vcpu;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

pub use incoming::restore;
pub use mem::dirty_ranges;
pub use outgoing::snapshot_and_exec;

use crate::vmm::guest::IDENTITY_MAP_SIZE;

/// Guest physical address of the guest's data memory (as `vmm::rfc::GMEM_GPA`).
pub const DATA_GPA: u64 = crate::vmm::rfc::GMEM_GPA;
/// Largest guest memory: the data region must end inside the guest's identity map.
pub const MAX_SIZE: u64 = IDENTITY_MAP_SIZE - DATA_GPA;
/// Default: pre-copy stops once a round finds at most this many dirty pages.
pub const DEFAULT_THRESHOLD_PAGES: u64 = 256;
/// Default: at most this many pre-copy rounds (the first one copies everything).
pub const DEFAULT_MAX_ROUNDS: u32 = 8;

/// Options of one live-snapshot VMM.
#[derive(Clone, Debug)]
pub struct VmmOptions {
    /// Bytes of guest memory (besides the 2 MiB of low memory).
    pub size: u64,
    /// The snapshot file (created; must not exist).
    pub snapshot: PathBuf,
    /// Where the final process writes its JSON result (stdout if `None`).
    pub report: Option<PathBuf>,
    /// Pre-copy stops once a round finds at most this many dirty pages.
    pub threshold_pages: u64,
    /// At most this many pre-copy rounds.
    pub max_rounds: u32,
    /// Drop the file's page cache after the pre-copy, so the restore faults pages in from disk
    /// (a real kexec loses the page cache; our exec keeps it).
    pub cold_cache: bool,
}

/// Check a guest memory size: whole pages, at least one, at most [`MAX_SIZE`].
pub fn check_size(size: u64) -> Result<(), String> {
    if size == 0 || size % mem::PAGE != 0 {
        return Err(format!(
            "guest size {size} must be a positive multiple of 4 KiB"
        ));
    }
    if size > MAX_SIZE {
        return Err(format!(
            "guest size {size:#x} too large: the data at {DATA_GPA:#x} must end inside the \
             guest's identity map ({IDENTITY_MAP_SIZE:#x}); at most {MAX_SIZE:#x}"
        ));
    }
    usize::try_from(size).map_err(|_| format!("guest size {size:#x} does not fit this host"))?;
    Ok(())
}

/// One pre-copy round (or the final copy while paused).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Round {
    /// Pages written in this round (round 1: all pages of both slots).
    pub pages: u64,
    /// Of those, runs of consecutive pages (one `pwrite` each).
    pub runs: u64,
    /// µs to fetch the dirty log (0 for round 1).
    pub dirty_log_us: f64,
    /// µs for the whole round: dirty log and writes.
    pub us: f64,
    /// The guest's largest clock gap so far, read from its mailbox after the round, µs (0 for
    /// the final copy): shows in which round a stall happened.
    pub guest_max_gap_us: u64,
}

/// Durations of the phases of one run, µs.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Phases {
    /// Before the update, the guest's fill pass: first `KVM_RUN` to `STATUS_WRITTEN` (every
    /// page touched for the first time, written). Compare with `brownout` (every page read
    /// once, faulted in from the file).
    pub first_touch_before: f64,
    /// Before the update, the guest's read pass over all of its memory (after the fill, KVM's
    /// mappings warm), as the live-update sweep measures it.
    #[serde(default)]
    pub touch_before: f64,
    /// After the restore, the same read pass (from the guest's last clock read to its final
    /// status), faulting every page in from the file: the brownout as the sweep measures it.
    #[serde(default)]
    pub touch_after: f64,
    /// Turning on dirty logging on both memslots.
    pub enable_dirty_log: f64,
    /// All pre-copy rounds (each is in [`LiveSnapshotRun::precopy`]).
    pub precopy: f64,
    /// `fdatasync` after the pre-copy, while the guest still runs.
    pub precopy_fsync: f64,
    /// With `cold_cache`: dropping the file's page cache after the pre-copy (modelling the
    /// page cache a real kexec loses), while the guest runs; left out of `total_update_us`.
    pub drop_cache: f64,
    /// Kick to the vCPU thread out of `KVM_RUN` (blackout starts at the kick).
    pub pause: f64,
    /// Saving the vCPU state (on the vCPU thread, right after it stopped).
    pub save_state: f64,
    /// Dirty log and pages dirtied since the last pre-copy round.
    pub final_copy: f64,
    /// Writing the vCPU state to the file.
    pub write_state: f64,
    /// `fdatasync` inside the blackout.
    pub fsync: f64,
    /// Reaper clone, exec, until the new process's `main` runs.
    pub exec: f64,
    /// Of `exec`: cloning the reaper.
    pub reaper_spawn: f64,
    /// In the new process: VM, file mappings, memslots, vCPU with its state (the sum of the
    /// four `restore_*` below).
    pub restore_setup: f64,
    /// Of `restore_setup`: adopting the reaper, opening the file, reading the vCPU state.
    pub restore_read_state: f64,
    /// Of `restore_setup`: opening `/dev/kvm`, `KVM_CREATE_VM`.
    pub restore_create_vm: f64,
    /// Of `restore_setup`: mapping the file, both memslots.
    pub restore_memslots: f64,
    /// Of `restore_setup`: `KVM_CREATE_VCPU`, restoring its state.
    pub restore_vcpu: f64,
    /// Resume to the guest's final status: one clock read and the verify pass over all
    /// memory, faulting it in from the file.
    pub brownout: f64,
}

/// The result of one live-snapshot run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LiveSnapshotRun {
    /// The guest verified every byte after the restore.
    pub ok: bool,
    /// The guest's final status.
    pub guest_status: String,
    /// Guest memory (data region), bytes.
    pub size: u64,
    /// Bytes the guest verified after the restore (`size` when `ok`, else 0).
    pub verified_bytes: u64,
    /// The blackout as the guest saw it: the largest gap between two clock reads, µs, over its
    /// whole clock loop (as for every baseline), so a stall during the pre-copy counts too.
    pub blackout_us: u64,
    /// The guest's largest clock gap before dirty logging was turned on, µs.
    pub max_gap_before_precopy_us: u64,
    /// The guest's largest clock gap right after dirty logging was turned on, µs.
    pub max_gap_after_enable_us: u64,
    /// The guest's largest clock gap right before the pause (so: during the pre-copy, unless
    /// equal to `max_gap_before_precopy_us`), µs. If `blackout_us` equals it, the largest
    /// stall was not the pause.
    pub max_gap_before_pause_us: u64,
    /// The blackout as the host saw it: kick to the first `KVM_RUN` after the restore, µs.
    pub host_pause_to_resume_us: f64,
    /// Start of the pre-copy (dirty logging on) to the resume, µs.
    pub total_update_us: f64,
    /// Pre-copy rounds while the guest ran.
    pub precopy: Vec<Round>,
    /// The copy of the last dirty pages while paused.
    pub final_round: Round,
    /// Pre-copy rounds plus the final one.
    pub rounds: u32,
    /// Phase durations.
    pub phases_us: Phases,
    /// Bytes written to the snapshot file, all rounds and the vCPU state.
    pub bytes_written: u64,
    /// Size of the snapshot file.
    pub snapshot_file_bytes: u64,
    /// Bytes of the file on disk (allocated blocks).
    pub disk_bytes: u64,
    /// Bytes of the file in the page cache after the guest verified (the restored guest's
    /// memory is these very pages until it writes them).
    pub page_cache_bytes: u64,
    /// What the baseline needs beside the guest's own memory: `disk_bytes +
    /// page_cache_bytes`. During the update the old guest's memory (held by the reaper until
    /// the guest resumed) and the file's page cache exist at once, so the page cache is extra
    /// memory at the peak, and the disk space is needed throughout.
    pub extra_memory_bytes: u64,
    /// The file's page cache was dropped before the pause (see [`VmmOptions::cold_cache`]).
    pub cold_cache: bool,
    /// The previous process's reaper was adopted by the new one.
    pub reaper: bool,
    /// The snapshot file was gone when the VMM process ended (the VMM removes it).
    pub snapshot_removed: bool,
    /// The snapshot file's path.
    pub snapshot_path: String,
}

/// Run one live-snapshot VMM of `size` bytes of guest memory as a child process of this
/// binary (which must be `handover`), with its snapshot file in `dir`.
pub fn run_point(size: u64, dir: &Path) -> Result<LiveSnapshotRun, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
    run_point_with(&exe, size, dir)
}

/// [`run_point`] with the `handover` binary given (for tests, whose own binary is not it).
pub fn run_point_with(exe: &Path, size: u64, dir: &Path) -> Result<LiveSnapshotRun, String> {
    run_point_opts(exe, size, dir, false)
}

/// [`run_point_with`], with the page cache of the snapshot file dropped before the pause when
/// `cold_cache` (see [`VmmOptions::cold_cache`]).
pub fn run_point_opts(
    exe: &Path,
    size: u64,
    dir: &Path,
    cold_cache: bool,
) -> Result<LiveSnapshotRun, String> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    check_size(size)?;
    if !dir.is_dir() {
        return Err(format!("{} is not a directory", dir.display()));
    }
    let tag = format!(
        "{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let snapshot = dir.join(format!("handover-live-snapshot-{tag}.bin"));
    let report = dir.join(format!("handover-live-snapshot-{tag}.json"));
    let mut cmd = Command::new(exe);
    cmd.args(["bench", "live-snapshot-vmm"]);
    if cold_cache {
        cmd.arg("--cold-cache");
    }
    let out = cmd
        .arg("--size")
        .arg(size.to_string())
        .arg("--snapshot")
        .arg(&snapshot)
        .arg("--report")
        .arg(&report)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
    let removed = !snapshot.exists();
    let _ = std::fs::remove_file(&snapshot);
    let text = std::fs::read_to_string(&report);
    let _ = std::fs::remove_file(&report);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(format!(
            "live-snapshot VMM failed ({}): {}",
            out.status,
            stderr.trim()
        ));
    }
    let text = text.map_err(|e| format!("no report from the live-snapshot VMM: {e}"))?;
    let mut run: LiveSnapshotRun = serde_json::from_str(&text)
        .map_err(|e| format!("bad report from the live-snapshot VMM: {e}: {text}"))?;
    run.snapshot_removed = removed;
    run.snapshot_path = snapshot.display().to_string();
    Ok(run)
}

pub use super::nearest_rank as percentile;

/// p50, p99 (nearest rank, see [`percentile`]) and max of a sample.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Tail {
    /// Median (nearest rank).
    pub p50: f64,
    /// 99th percentile (nearest rank: the max for fewer than 100 values).
    pub p99: f64,
    /// Largest value.
    pub max: f64,
}

impl Tail {
    /// The tail of `v`; zeros for an empty sample.
    pub fn of(v: &[f64]) -> Tail {
        Tail {
            p50: percentile(v, 50.0).unwrap_or(0.0),
            p99: percentile(v, 99.0).unwrap_or(0.0),
            max: percentile(v, 100.0).unwrap_or(0.0),
        }
    }
}

/// `handover bench live-snapshot`: `runs` runs of `size`, one at a time.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Summary {
    /// Guest memory, bytes.
    pub size: u64,
    /// Guest-measured blackout, µs.
    pub blackout_us: Tail,
    /// Start of pre-copy to resume, µs.
    pub total_update_us: Tail,
    /// Resume to final status, µs.
    pub brownout_us: Tail,
    /// Host-measured pause to resume, µs.
    pub host_pause_to_resume_us: Tail,
    /// Every run.
    pub runs: Vec<LiveSnapshotRun>,
}

/// Run `runs` points of `size` in `dir` (with `cold_cache`, see [`VmmOptions::cold_cache`])
/// and summarize them; fails on the first failed run or a run whose guest did not verify.
pub fn sweep(size: u64, runs: usize, dir: &Path, cold_cache: bool) -> Result<Summary, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
    check_size(size)?;
    if runs == 0 {
        return Err("--runs must be at least 1".into());
    }
    let mut all = Vec::with_capacity(runs);
    for i in 0..runs {
        let r = run_point_opts(&exe, size, dir, cold_cache)
            .map_err(|e| format!("run {}: {e}", i + 1))?;
        if !r.ok {
            return Err(format!(
                "run {}: the guest did not verify after the restore ({})",
                i + 1,
                r.guest_status
            ));
        }
        all.push(r);
    }
    let col =
        |f: &dyn Fn(&LiveSnapshotRun) -> f64| Tail::of(&all.iter().map(f).collect::<Vec<_>>());
    Ok(Summary {
        size,
        blackout_us: col(&|r| r.blackout_us as f64),
        total_update_us: col(&|r| r.total_update_us),
        brownout_us: col(&|r| r.phases_us.brownout),
        host_pause_to_resume_us: col(&|r| r.host_pause_to_resume_us),
        runs: all,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[1.0], 101.0), None);
        assert_eq!(percentile(&[1.0], f64::NAN), None);
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 0.0), Some(1.0));
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 50.0), Some(2.0));
        assert_eq!(percentile(&[4.0, 3.0, 1.0, 2.0], 50.0), Some(2.0));
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 100.0), Some(3.0));
        let v: Vec<f64> = (1..=200).map(f64::from).collect();
        assert_eq!(percentile(&v, 99.0), Some(198.0));
        assert_eq!(percentile(&v[..20], 99.0), Some(20.0));
        let t = Tail::of(&v);
        assert_eq!((t.p50, t.p99, t.max), (100.0, 198.0, 200.0));
    }

    #[test]
    fn sizes_are_validated() {
        assert!(check_size(0).is_err());
        assert!(check_size(4095).is_err());
        assert!(check_size(4096).is_ok());
        assert!(check_size(MAX_SIZE).is_ok());
        assert!(check_size(MAX_SIZE + 4096).is_err());
        assert!(check_size(!4095).is_err());
    }
}
