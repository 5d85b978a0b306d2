//! `handover bench live-snapshot` and its hidden VMM process (`bench live-snapshot-vmm`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;

use crate::bench::blackout::human;
use crate::bench::live_snapshot::{
    self, LiveSnapshotRun, VmmOptions, DEFAULT_MAX_ROUNDS, DEFAULT_THRESHOLD_PAGES,
};
use crate::kexec::params::parse_size;

#[derive(Args, Debug, Clone)]
/// Arguments of one live-snapshot VMM process.
pub struct VmmArgs {
    /// Bytes of guest memory.
    #[arg(long, value_parser = parse_size)]
    pub size: u64,
    /// The snapshot file (must not exist; removed at the end).
    #[arg(long)]
    pub snapshot: PathBuf,
    /// Write the JSON result here instead of stdout.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Pre-copy stops once a round finds at most this many dirty pages.
    #[arg(long, default_value_t = DEFAULT_THRESHOLD_PAGES)]
    pub threshold_pages: u64,
    /// At most this many pre-copy rounds.
    #[arg(long, default_value_t = DEFAULT_MAX_ROUNDS)]
    pub max_rounds: u32,
    /// Drop the snapshot file's page cache after the pre-copy (a real kexec loses it).
    #[arg(long)]
    pub cold_cache: bool,
    /// Set by the outgoing process on the exec: restore, with what it hands over (JSON).
    #[arg(long)]
    pub resume: Option<String>,
    /// Set by the outgoing process on the exec: its reaper's pidfd.
    #[arg(long)]
    pub reaper_fd: Option<i32>,
}

/// The VMM process: snapshot and exec, or (with `--resume`) restore and report.
pub fn vmm(a: &VmmArgs) -> Result<ExitCode, String> {
    let o = VmmOptions {
        size: a.size,
        snapshot: a.snapshot.clone(),
        report: a.report.clone(),
        threshold_pages: a.threshold_pages,
        max_rounds: a.max_rounds,
        cold_cache: a.cold_cache,
    };
    let Some(carry) = &a.resume else {
        // Returns only on failure.
        return Err(live_snapshot::snapshot_and_exec(&o));
    };
    let run = live_snapshot::restore(&o, carry, a.reaper_fd)?;
    let text = serde_json::to_string(&run).map_err(|e| e.to_string())?;
    match &a.report {
        Some(p) => std::fs::write(p, text + "\n")
            .map_err(|e| format!("cannot write {}: {e}", p.display()))?,
        None => println!("{text}"),
    }
    Ok(if run.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `handover bench live-snapshot`.
pub fn bench(
    size: u64,
    runs: usize,
    dir: &Path,
    cold_cache: bool,
    json: bool,
) -> Result<ExitCode, String> {
    let s = live_snapshot::sweep(size, runs, dir, cold_cache)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&s).map_err(|e| e.to_string())?
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "live snapshot of {}{} ({} runs, snapshot files in {}); µs, p50 / p99 / max (nearest rank)",
        human(size),
        if cold_cache {
            ", page cache dropped"
        } else {
            ""
        },
        s.runs.len(),
        dir.display()
    );
    let line = |n: &str, t: live_snapshot::Tail| {
        println!("  {n:26} {:12.0} {:12.0} {:12.0}", t.p50, t.p99, t.max)
    };
    line("blackout (guest)", s.blackout_us);
    line("pause to resume (host)", s.host_pause_to_resume_us);
    line("total (pre-copy..resume)", s.total_update_us);
    line("brownout (lazy verify)", s.brownout_us);
    let col = |f: &dyn Fn(&LiveSnapshotRun) -> f64| {
        live_snapshot::Tail::of(&s.runs.iter().map(f).collect::<Vec<_>>())
    };
    line(
        "max gap before pre-copy",
        col(&|r| r.max_gap_before_precopy_us as f64),
    );
    line(
        "max gap before pause",
        col(&|r| r.max_gap_before_pause_us as f64),
    );
    line(
        "first touch before",
        col(&|r| r.phases_us.first_touch_before),
    );
    line("enable dirty log", col(&|r| r.phases_us.enable_dirty_log));
    line("pre-copy", col(&|r| r.phases_us.precopy));
    line("pre-copy fsync", col(&|r| r.phases_us.precopy_fsync));
    if cold_cache {
        line(
            "drop cache (not in total)",
            col(&|r| r.phases_us.drop_cache),
        );
    }
    line("pause", col(&|r| r.phases_us.pause));
    line("final copy", col(&|r| r.phases_us.final_copy));
    line("fsync (in blackout)", col(&|r| r.phases_us.fsync));
    line("exec", col(&|r| r.phases_us.exec));
    line("restore setup", col(&|r| r.phases_us.restore_setup));
    if let Some(r) = s.runs.first() {
        let rounds: Vec<String> = r
            .precopy
            .iter()
            .map(|x| format!("{} pages {:.0} µs", x.pages, x.us))
            .collect();
        println!(
            "  run 1: rounds [{}], final {} pages {:.0} µs; {} written, file {}, extra memory {} \
             (disk {} + page cache {})",
            rounds.join(", "),
            r.final_round.pages,
            r.final_round.us,
            human(r.bytes_written),
            human(r.snapshot_file_bytes),
            human(r.extra_memory_bytes),
            human(r.disk_bytes),
            human(r.page_cache_bytes)
        );
    }
    Ok(ExitCode::SUCCESS)
}
