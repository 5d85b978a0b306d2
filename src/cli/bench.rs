//! `handover bench`: the blackout sweep (default), the KHO micro-benchmark and the cost of the
//! process boundary (`bench syscall`).

use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde_json::{json, Value};

use crate::bench::blackout::{self, human, Kind, Plan, Point};
use crate::kexec::params::parse_size;

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
/// Arguments of `handover bench`.
pub struct BenchArgs {
    /// A benchmark other than the blackout sweep.
    #[command(subcommand)]
    pub what: Option<BenchWhat>,
    /// Options of the blackout sweep (the default).
    #[command(flatten)]
    pub blackout: BlackoutArgs,
}

#[derive(Args, Debug, Clone)]
/// Options of the blackout sweep.
pub struct BlackoutArgs {
    /// A small sweep (16 and 64 MiB, 2 runs) that finishes in well under two minutes.
    #[arg(long)]
    pub quick: bool,
    /// Runs per point (default 5; 2 with --quick).
    #[arg(long)]
    pub runs: Option<usize>,
    /// Guest sizes, comma separated (default 16M,256M,1G,4G,16G).
    #[arg(long, value_delimiter = ',', value_parser = parse_size)]
    pub sizes: Option<Vec<u64>>,
    /// Metadata-only sizes (guest sees the first 16 GiB), default 64G,256G,1T; 0 for none.
    #[arg(long, value_delimiter = ',', value_parser = parse_size)]
    pub metadata_only: Option<Vec<u64>>,
    /// Largest size for the snapshot baseline (it writes the whole guest to a file).
    #[arg(long, value_parser = parse_size)]
    pub baseline_max: Option<u64>,
    /// Guest sizes also measured with 2 MiB and 1 GiB HugeTLB folios on a software-protected
    /// VM (guest_memfd_luo_v3), comma separated; none by default.
    #[arg(long, value_delimiter = ',', value_parser = parse_size)]
    pub huge_sizes: Option<Vec<u64>>,
    /// Metadata-only sizes with 1 GiB folios (guest sees the first 16 GiB); none by default.
    #[arg(long, value_delimiter = ',', value_parser = parse_size)]
    pub huge_metadata_only: Option<Vec<u64>>,
    /// Largest size for the RFC's per-folio v1 format.
    #[arg(long, value_parser = parse_size)]
    pub v1_max: Option<u64>,
    /// Directory for the baseline's snapshot files.
    #[arg(long, default_value = "/var/tmp")]
    pub snapshot_dir: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Print CSV (one line per point).
    #[arg(long)]
    pub csv: bool,
    /// Write blackout.svg (and blackout.png where rsvg-convert or ImageMagick exists) here.
    #[arg(long)]
    pub plot: Option<std::path::PathBuf>,
    /// Do not measure: plot the points of an earlier `--json` output (with --plot).
    #[arg(long)]
    pub replot: Option<std::path::PathBuf>,
    /// `external`: instead of the sweep, an external VMM (the C VMM of tests/vmm, a separate
    /// process under `handover run`) beside the in-process one: the guest-visible blackout of
    /// the RFC scenario and the port-I/O exit round trip (default 20 runs; 3 with --quick).
    #[arg(long, value_enum)]
    pub vmm: Option<VmmKind>,
    /// Timed exits per exit measurement (--vmm external).
    #[arg(long, default_value_t = 20_000)]
    pub exits: usize,
    /// The C VMM binary (--vmm external); default: built from tests/vmm/*.c with cc.
    #[arg(long)]
    pub vmm_program: Option<std::path::PathBuf>,
}

/// Which VMM `handover bench --vmm` measures.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmmKind {
    /// The VMM inside the host image (the sweep).
    InProcess,
    /// An external VMM process beside the in-process one.
    External,
}

#[derive(Subcommand, Debug)]
/// The benchmarks besides the blackout sweep.
pub enum BenchWhat {
    /// Preserve, hand over and restore SIZE of 4 KiB folios; ns per page and tracker size.
    Kho {
        /// Bytes of 4 KiB folios per run (RAM is sparse: only the metadata costs memory).
        #[arg(long, default_value = "16G", value_parser = parse_size)]
        size: u64,
        /// Runs; the summary is median [min..max] over them.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The process boundary: forwarded ioctl and host memfd writes beside in-process and real
    /// ones.
    ///
    /// A forwarded ioctl round trip beside the same call in process and a real-kernel ioctl;
    /// writing a host memfd through a mapping and with write() beside a real memfd. Runs this
    /// binary as a client under `handover run`.
    Syscall {
        /// What to run.
        #[command(flatten)]
        opts: SyscallOpts,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The forwarded half of `bench syscall`: run by it under `handover run`; prints JSON.
    #[command(hide = true)]
    SyscallClient {
        /// What to run.
        #[command(flatten)]
        opts: SyscallOpts,
    },
    /// The live-snapshot baseline on plain KVM: pre-copy with dirty logging, pause, exec,
    /// lazy restore from a MAP_PRIVATE file mapping; p50/p99/max of blackout, total, brownout.
    LiveSnapshot {
        /// Guest memory per run.
        #[arg(long, default_value = "1G", value_parser = parse_size)]
        size: u64,
        /// Runs (one at a time).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Directory for the snapshot files.
        #[arg(long, default_value = "/var/tmp")]
        dir: std::path::PathBuf,
        /// Drop the snapshot file's page cache after the pre-copy, so the restore faults the
        /// guest in from disk (a real kexec loses the page cache; our exec keeps it).
        #[arg(long)]
        cold_cache: bool,
        /// Print JSON (every run).
        #[arg(long)]
        json: bool,
    },
    /// One live-snapshot VMM process (run by `bench live-snapshot`); writes its JSON result.
    #[command(hide = true)]
    LiveSnapshotVmm(Box<super::live_snapshot::VmmArgs>),
}

#[derive(Args, Debug, Clone)]
/// What `bench syscall` runs.
pub struct SyscallOpts {
    /// Timed ioctl calls per measurement (after an untimed tenth, at most 1000).
    #[arg(long, default_value_t = 20_000)]
    pub iters: usize,
    /// Runs of each memfd measurement, host and real memfd interleaved.
    #[arg(long, default_value_t = 10)]
    pub runs: usize,
    /// Bytes written per memfd run.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub size: u64,
    /// Block size of the write() runs.
    #[arg(long, default_value = "64K", value_parser = parse_size)]
    pub block: u64,
}

impl SyscallOpts {
    fn options(&self) -> Result<crate::bench::syscall::Options, String> {
        if self.size == 0 || self.size % 4096 != 0 {
            return Err("--size must be a non-zero multiple of 4 KiB".into());
        }
        if self.block == 0 || self.block > 1 << 30 {
            return Err("--block must be between 1 byte and 1 GiB".into());
        }
        Ok(crate::bench::syscall::Options {
            iters: self.iters.max(1),
            runs: self.runs.max(1),
            size: self.size,
            block: self.block,
        })
    }
}

/// `handover bench`: exit 1 if a point of the sweep had a failed run.
pub fn run(a: BenchArgs) -> Result<ExitCode, String> {
    match a.what {
        Some(BenchWhat::Kho { size, runs, json }) => kho(size, runs, json),
        Some(BenchWhat::Syscall { opts, json }) => syscall(&opts.options()?, json),
        Some(BenchWhat::SyscallClient { opts }) => {
            let r = crate::bench::syscall::client(&opts.options()?)?;
            println!("{}", serde_json::to_string(&r).map_err(|e| e.to_string())?);
            Ok(ExitCode::SUCCESS)
        }
        Some(BenchWhat::LiveSnapshot {
            size,
            runs,
            dir,
            cold_cache,
            json,
        }) => super::live_snapshot::bench(size, runs, &dir, cold_cache, json),
        Some(BenchWhat::LiveSnapshotVmm(a)) => super::live_snapshot::vmm(&a),
        None => sweep(a.blackout),
    }
}

fn kho(size: u64, runs: usize, json: bool) -> Result<ExitCode, String> {
    let r = crate::bench::kho::run(size, runs).map_err(|e| e.to_string())?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&r).map_err(|e| e.to_string())?
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "KHO: {} of 4 KiB folios ({} pages), {} runs, ns per page (median [min..max])",
        human(size),
        r.runs[0].pages,
        r.runs.len()
    );
    let line = |n: &str, s: crate::bench::Spread| {
        println!("  {n:10} {:7.1} [{:.1}..{:.1}]", s.median, s.min, s.max)
    };
    line("preserve", r.preserve_ns_per_page);
    line("handover", r.handover_ns_per_page);
    line("restore", r.restore_ns_per_page);
    println!(
        "  tracker    {:.0} bytes per GiB",
        r.tracker_bytes_per_gib.median
    );
    for (i, x) in r.runs.iter().enumerate() {
        println!(
            "  run {i}: preserve {:.1} list {:.1} handover {:.1} ({:.1} ms) restore {:.1} ns/page",
            x.preserve_ns_per_page,
            x.list_ns_per_page,
            x.handover_ns_per_page,
            x.handover_total_ms,
            x.restore_ns_per_page
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn syscall(o: &crate::bench::syscall::Options, json: bool) -> Result<ExitCode, String> {
    use crate::bench::syscall::{Latency, MemfdKind, RunStats};
    let r = crate::bench::syscall::run(o)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&r).map_err(|e| e.to_string())?
        );
        return Ok(ExitCode::SUCCESS);
    }
    let c = &r.client;
    println!(
        "process boundary: {} timed ioctls per line, {} runs of {} per memfd kind ({} CPUs, Linux {})",
        o.iters,
        o.runs,
        human(o.size),
        r.machine["cpus"],
        r.machine["kernel"].as_str().unwrap_or("?"),
    );
    println!("ioctl round trip, us              p50      p99      max");
    let lat = |n: &str, l: &Latency| {
        println!(
            "  {n:30} {:7.2}  {:7.2}  {:7.1}",
            l.p50_us, l.p99_us, l.max_us
        )
    };
    lat("GET_NAME forwarded (run)", &c.forwarded_ioctl);
    lat("GET_NAME in process", &r.in_process_ioctl);
    lat("FIONREAD real kernel", &r.kernel_ioctl);
    lat("FIONREAD real, under preload", &c.preload_kernel_ioctl);
    lat("(timer: two clock reads)", &r.timer_overhead);
    let ms = |s: &RunStats| format!("{:8.1} [{:.1}..{:.1}]", s.p50, s.min, s.max);
    println!(
        "mmap + store every word of {}, ms p50 [min..max] (touch alone)",
        human(o.size)
    );
    println!(
        "  host memfd  {}  ({})",
        ms(&c.mmap_host_ms),
        ms(&c.mmap_host_touch_ms)
    );
    println!(
        "  real memfd  {}  ({})",
        ms(&c.mmap_real_ms),
        ms(&c.mmap_real_touch_ms)
    );
    println!("  host / real p50: {:.3}", c.mmap_ratio_p50);
    let runs = |k: MemfdKind| {
        c.mmap_runs
            .iter()
            .filter(|x| x.kind == k)
            .map(|x| format!("{:.0}", x.total_ms))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!("  runs host ms: {}", runs(MemfdKind::Host));
    println!("  runs real ms: {}", runs(MemfdKind::Real));
    let gb = |s: &RunStats| format!("{:.2} [{:.2}..{:.2}]", s.p50, s.min, s.max);
    println!(
        "write() of {} in {} KiB blocks, GB/s (10^9) p50 [min..max]",
        human(o.size),
        o.block >> 10
    );
    println!("  host memfd  {}", gb(&c.write_host_gb_s));
    println!("  real memfd  {}", gb(&c.write_real_gb_s));
    for t in &r.targets {
        println!(
            "target: {} -> {} ({:.3})",
            t.target,
            if t.met { "met" } else { "NOT met" },
            t.value
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn plan(a: &BlackoutArgs) -> Plan {
    let mut p = if a.quick { Plan::quick() } else { Plan::full() };
    if let Some(r) = a.runs {
        p.runs = r.max(1);
    }
    if let Some(s) = &a.sizes {
        p.sizes = s.clone();
    }
    if let Some(s) = &a.metadata_only {
        p.metadata_only = s.iter().copied().filter(|&x| x > 0).collect();
    }
    if let Some(m) = a.baseline_max {
        p.baseline_max = m;
    }
    if let Some(m) = a.v1_max {
        p.v1_max = m;
    }
    if let Some(s) = &a.huge_sizes {
        p.huge_sizes = s.clone();
    }
    if let Some(s) = &a.huge_metadata_only {
        p.huge_metadata_only = s.clone();
    }
    p.snapshot_dir = a.snapshot_dir.clone();
    p
}

fn baseline_for(points: &[Point], size: u64) -> Option<f64> {
    points
        .iter()
        .find(|p| p.kind == Kind::Snapshot && p.guest_bytes == size && p.blackout_us.median > 0.0)
        .map(|p| p.blackout_us.median)
}

fn targets(points: &[Point]) -> Vec<Value> {
    let live = |s: u64| {
        points.iter().find(|p| {
            p.kind == Kind::LiveV2
                && p.guest_bytes == s
                && p.slot_bytes == s
                && p.blackout_us.median > 0.0
        })
    };
    let gib = 1u64 << 30;
    let mut t = Vec::new();
    if let Some(p) = live(16 * gib) {
        t.push(json!({"target": "blackout <= 10 ms at 16 GiB", "value_ms": p.blackout_us.median / 1e3, "met": p.blackout_us.median <= 10_000.0}));
        if let Some(q) = live(16 << 20) {
            let r = p.blackout_us.median / q.blackout_us.median;
            t.push(json!({"target": "blackout at 16 GiB within 2x of 16 MiB", "ratio": r, "met": r <= 2.0}));
        }
        let gibs = (16 * gib) as f64 / (1u64 << 30) as f64 / (p.preserve_us.median / 1e6);
        t.push(json!({"target": "preserve >= 200 GiB/s", "value_gib_per_s": gibs, "met": gibs >= 200.0}));
        let kib = p.handover_bytes.median / 1024.0 / 16.0;
        t.push(json!({"target": "handover metadata <= 64 KiB per GiB", "value_kib_per_gib": kib, "met": kib <= 64.0}));
        if let Some(b) = baseline_for(points, 16 * gib) {
            let r = b / p.blackout_us.median;
            t.push(json!({"target": ">= 100x shorter blackout than snapshot at 16 GiB", "ratio": r, "met": r >= 100.0}));
        }
    }
    t
}

fn write_plot(dir: &std::path::Path, points: &[Point]) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let svg = dir.join("blackout.svg");
    std::fs::write(&svg, blackout::svg(points))
        .map_err(|e| format!("cannot write {}: {e}", svg.display()))?;
    let png = dir.join("blackout.png");
    let made = std::process::Command::new("rsvg-convert")
        .arg("-o")
        .arg(&png)
        .arg(&svg)
        .status()
        .is_ok_and(|s| s.success())
        || std::process::Command::new("convert")
            .arg(&svg)
            .arg(&png)
            .status()
            .is_ok_and(|s| s.success());
    eprintln!(
        "plot: {}{}",
        svg.display(),
        if made {
            format!(" and {}", png.display())
        } else {
            " (no rsvg-convert/convert for PNG)".into()
        }
    );
    Ok(())
}

fn sweep(a: BlackoutArgs) -> Result<ExitCode, String> {
    if a.vmm == Some(VmmKind::External) {
        return external(&a);
    }
    if let Some(j) = &a.replot {
        let text =
            std::fs::read_to_string(j).map_err(|e| format!("cannot read {}: {e}", j.display()))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", j.display()))?;
        let points: Vec<Point> = serde_json::from_value(v["points"].clone())
            .map_err(|e| format!("{}: points: {e}", j.display()))?;
        let dir = a.plot.clone().ok_or("--replot needs --plot DIR")?;
        write_plot(&dir, &points)?;
        return Ok(ExitCode::SUCCESS);
    }
    if !crate::vmm::libkvm::kvm_available("handover bench") {
        return Err("the blackout benchmark needs /dev/kvm".into());
    }
    let plan = plan(&a);
    let pts = plan.points();
    let bar = indicatif::ProgressBar::new((pts.len() * plan.runs) as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let mut points = Vec::new();
    for (kind, size, slot) in pts {
        let mut runs = Vec::new();
        for i in 0..plan.runs {
            bar.set_message(format!("{} {} run {}", kind.name(), human(size), i + 1));
            let r = blackout::run_one(kind, size, slot, &plan);
            if let Some(e) = &r.error {
                bar.println(format!(
                    "{} {}: run {} failed: {e}",
                    kind.name(),
                    human(size),
                    i + 1
                ));
            }
            runs.push(r);
            bar.inc(1);
        }
        points.push(blackout::summarize(kind, size, slot, runs));
    }
    bar.finish_and_clear();

    let sizes: Vec<Value> = points
        .iter()
        .filter(|p| p.kind == Kind::LiveV2)
        .map(|p| {
            let base = baseline_for(&points, p.guest_bytes);
            json!({
                "guest_bytes": p.guest_bytes,
                "metadata_only": p.slot_bytes < p.guest_bytes,
                "blackout_us": p.blackout_us.median,
                "baseline_blackout_us": base,
                "ratio": base.map(|b| b / p.blackout_us.median),
                "handover_bytes": p.handover_bytes.median,
                "preserve_us": p.preserve_us.median,
                "retrieve_us": p.retrieve_us.median,
            })
        })
        .collect();
    let out = json!({
        "machine": { "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0), "kernel": kernel_release() },
        "runs_per_point": plan.runs,
        "sizes": sizes,
        "targets": targets(&points),
        "points": points,
    });
    if let Some(dir) = &a.plot {
        write_plot(dir, &points)?;
    }
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&out).map_err(|e| e.to_string())?
        );
    } else if a.csv {
        println!("kind,guest_bytes,slot_bytes,runs_ok,blackout_median_us,blackout_min_us,blackout_max_us,preserve_median_us,retrieve_median_us,handover_bytes,baseline_blackout_us,ratio");
        for p in &points {
            let base = baseline_for(&points, p.guest_bytes).filter(|_| p.kind != Kind::Snapshot);
            println!(
                "{},{},{},{},{:.0},{:.0},{:.0},{:.1},{:.1},{:.0},{},{}",
                p.kind.name(),
                p.guest_bytes,
                p.slot_bytes,
                p.runs.iter().filter(|r| r.ok).count(),
                p.blackout_us.median,
                p.blackout_us.min,
                p.blackout_us.max,
                p.preserve_us.median,
                p.retrieve_us.median,
                p.handover_bytes.median,
                base.map_or(String::new(), |b| format!("{b:.0}")),
                base.map_or(String::new(), |b| format!(
                    "{:.1}",
                    b / p.blackout_us.median
                ))
            );
        }
    } else {
        print_table(&points, &targets(&points), plan.runs);
    }
    let all_ok = points.iter().all(|p| p.runs.iter().all(|r| r.ok));
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn print_table(points: &[Point], targets: &[Value], runs: usize) {
    println!("blackout sweep, {runs} runs per point; times are median [min..max]");
    println!(
        "{:9} {:>8} {:>24} {:>16} {:>12} {:>11} {:>10}  phases inside the blackout (median us)",
        "kind", "guest", "blackout ms", "preserve ms", "handover", "retrieve ms", "vs snap"
    );
    for p in points {
        let base = baseline_for(points, p.guest_bytes).filter(|_| p.kind != Kind::Snapshot);
        let ok = p.runs.iter().filter(|r| r.ok).count();
        let size = if p.slot_bytes < p.guest_bytes {
            format!("{}*", human(p.guest_bytes))
        } else {
            human(p.guest_bytes)
        };
        let phases = match &p.phases_median_us {
            Value::Object(m) => [
                "pause",
                "save_state",
                "freeze_and_finalize",
                "exec",
                "boot",
                "retrieve",
                "resume",
                "save",
                "load",
            ]
            .iter()
            .filter_map(|k| {
                m.get(*k)
                    .map(|v| format!("{k} {:.0}", v.as_f64().unwrap_or(0.0)))
            })
            .collect::<Vec<_>>()
            .join(", "),
            _ => String::new(),
        };
        println!(
            "{:9} {:>8} {:>24} {:>16} {:>12} {:>11} {:>10}  {}{}",
            p.kind.name(),
            size,
            format!(
                "{:.2} [{:.2}..{:.2}]",
                p.blackout_us.median / 1e3,
                p.blackout_us.min / 1e3,
                p.blackout_us.max / 1e3
            ),
            if p.kind == Kind::Snapshot {
                "-".into()
            } else {
                format!("{:.2}", p.preserve_us.median / 1e3)
            },
            if p.kind == Kind::Snapshot {
                "-".into()
            } else {
                format!("{:.0} KiB", p.handover_bytes.median / 1024.0)
            },
            if p.kind == Kind::Snapshot {
                "-".into()
            } else {
                format!("{:.2}", p.retrieve_us.median / 1e3)
            },
            base.map_or("-".into(), |b| format!("{:.0}x", b / p.blackout_us.median)),
            phases,
            if ok < p.runs.len() {
                format!("  ({} of {} runs failed)", p.runs.len() - ok, p.runs.len())
            } else {
                String::new()
            }
        );
    }
    if points.iter().any(|p| p.slot_bytes < p.guest_bytes) {
        println!("* metadata-only: the whole guest_memfd is populated, preserved and handed over; the guest's memslot covers the first 16 GiB");
    }
    for t in targets {
        println!(
            "target: {} -> {}",
            t["target"].as_str().unwrap_or(""),
            if t["met"] == true { "met" } else { "NOT met" }
        );
    }
}

/// `handover bench --vmm external`.
fn external(a: &BlackoutArgs) -> Result<ExitCode, String> {
    use crate::bench::external::{run, Options};
    if !crate::vmm::libkvm::kvm_available("handover bench --vmm external") {
        return Err("the external VMM benchmark needs /dev/kvm".into());
    }
    let o = Options {
        runs: a.runs.unwrap_or(if a.quick { 3 } else { 20 }).max(1),
        exits: if a.quick { 5_000 } else { a.exits.max(10) },
        exit_runs: if a.quick { 2 } else { 5 },
        vmm: a.vmm_program.clone(),
    };
    let r = run(&o)?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&r).map_err(|e| e.to_string())?
        );
    } else {
        let row = |name: &str, d: &crate::bench::external::Dist, unit: f64, u: &str| {
            println!(
                "{name:<36} {:>9.2} {u} {:>9.2} {u} {:>9.2} {u}   ({} runs)",
                d.p50 / unit,
                d.p99 / unit,
                d.max / unit,
                d.values.len()
            )
        };
        println!("external VMM beside the in-process VMM: the same guest, 16 MiB guest_memfd, 5 MiB written");
        println!("{:<36} {:>12} {:>12} {:>12}", "", "p50", "p99", "max");
        row("blackout, in-process VMM", &r.inproc_blackout_us, 1e3, "ms");
        row("blackout, external VMM", &r.external_blackout_us, 1e3, "ms");
        row(
            "exit round trip, VMM on /dev/kvm",
            &r.native_exit_p50_us,
            1.0,
            "us",
        );
        row(
            "exit round trip, under handover",
            &r.external_exit_p50_us,
            1.0,
            "us",
        );
        println!(
            "  (exit rows: the p50 of each measurement of {} exits; worst p99: {:.1} us on /dev/kvm, {:.1} us under handover)",
            o.exits, r.exit_p99_us.0, r.exit_p99_us.1
        );
        println!("phases, in-process (median us): {}", r.inproc_phases_us);
        println!("phases, external (median us):   {}", r.external_phases_us);
        for f in &r.failures {
            println!("FAILED: {f}");
        }
        for t in &r.targets {
            println!(
                "target {}: {} ({:.2})",
                t.target,
                if t.met { "met" } else { "MISSED" },
                t.value
            );
        }
    }
    Ok(if r.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
