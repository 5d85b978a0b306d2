//! `handover bench`: the blackout sweep (default), the KHO micro-benchmark and the cost of the
//! process boundary (`bench syscall`).

use std::process::ExitCode;

use clap::{Args, Subcommand};

use crate::bench::blackout::human;
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
    /// Runs per live-update point (default 20; 2 with --quick).
    #[arg(long)]
    pub runs: Option<usize>,
    /// Guest sizes with every page written, comma separated (default 16M,256M,1G,4G,16G).
    #[arg(long, value_delimiter = ',', value_parser = parse_size)]
    pub sizes: Option<Vec<u64>>,
    /// Sparse guest_memfds of these sizes, bound whole, holding only the 5 MiB the guest
    /// writes (default 64G,256G,1T; 0 for none).
    #[arg(long, value_delimiter = ',', value_parser = parse_size)]
    pub sparse: Option<Vec<u64>>,
    /// Sizes of written guests allocated fragmented (churn, several guests faulting in random
    /// order), default 1G,16G; 0 for none.
    #[arg(long, value_delimiter = ',', value_parser = parse_size)]
    pub fragmented: Option<Vec<u64>>,
    /// Metadata-only sizes: allocated whole, the guest sees the first 16 GiB (none by default).
    #[arg(long, value_delimiter = ',', value_parser = parse_size)]
    pub metadata_only: Option<Vec<u64>>,
    /// Largest size for the live-snapshot baseline (pre-copy with dirty logging, lazy restore).
    #[arg(long, value_parser = parse_size)]
    pub live_snapshot_max: Option<u64>,
    /// Runs per snapshot-baseline point, eager and live (default 5; 2 with --quick).
    #[arg(long)]
    pub baseline_runs: Option<usize>,
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
    /// Instead of the sweep, many VMs through live updates: one point per count, comma
    /// separated (e.g. 1,8,32); `--runs` updates in a row per point (default 10), every VM's
    /// blackout a sample.
    #[arg(long, value_delimiter = ',')]
    pub vms: Option<Vec<u32>>,
    /// vCPUs per VM (--vms).
    #[arg(long, default_value_t = 2)]
    pub vcpus: u32,
    /// guest_memfd size of each VM (--vms).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub vm_mem: u64,
    /// Bytes each VM's guest writes, by VM index modulo the list: mixed sizes (--vms).
    #[arg(long, value_delimiter = ',', value_parser = parse_size, default_value = "64M,128M,256M")]
    pub vm_data: Vec<u64>,
    /// Restore worker threads (--vms; 0: one per CPU).
    #[arg(long, default_value_t = 0)]
    pub workers: u32,
    /// How long an idle vCPU waits on its proceed port before its next loop pass, µs (--vms):
    /// the guests' tick. A kick ends the wait at once.
    #[arg(long, default_value_t = 1000)]
    pub idle_us: u64,
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
    /// The KVM-only floor of a many-VM update: VMs built as the fleet's, their state saved and
    /// new VMs set up from it with the handlers' own code, on threads, with no host image,
    /// exec or guest; what any update of that many VMs must spend on this KVM.
    KvmFloor {
        /// VMs.
        #[arg(long, default_value_t = 32)]
        vms: u32,
        /// vCPUs per VM.
        #[arg(long, default_value_t = 2)]
        vcpus: u32,
        /// Save-and-restore runs.
        #[arg(long, default_value_t = 20)]
        runs: u32,
        /// Threads (0: one per CPU, as the fleet's restore workers).
        #[arg(long, default_value_t = 0)]
        threads: u32,
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
        Some(BenchWhat::KvmFloor {
            vms,
            vcpus,
            runs,
            threads,
            json,
        }) => kvm_floor(vms, vcpus, runs, threads, json),
        None if a.blackout.vmm == Some(VmmKind::External) => external(&a.blackout),
        None if a.blackout.vms.is_some() => super::bench_fleet::bench(&a.blackout),
        None => super::bench_sweep::sweep(a.blackout),
    }
}

fn kvm_floor(
    vms: u32,
    vcpus: u32,
    runs: u32,
    threads: u32,
    json: bool,
) -> Result<ExitCode, String> {
    if !(1..=256).contains(&vms) || !(1..=64).contains(&vcpus) || !(1..=1000).contains(&runs) {
        return Err("--vms 1..=256, --vcpus 1..=64, --runs 1..=1000".into());
    }
    let threads = match threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        t => t.min(64),
    };
    let spec = crate::bench::kvm_floor::Spec {
        vms,
        vcpus,
        runs,
        threads,
    };
    let r = crate::bench::kvm_floor::run(&spec)?;
    if json {
        return print_json(&r);
    }
    println!(
        "KVM floor: {vms} VMs x {vcpus} vCPUs (irqchip, PIT, low memslot), {runs} runs on {threads} threads ({} CPUs)",
        r.cpus
    );
    let row = |what: &str, s: crate::bench::Spread| {
        println!(
            "  {what:26} p50 {:7.2}  p99 {:7.2}  max {:7.2} ms  (n={})",
            s.median, s.p99, s.max, s.n
        )
    };
    row("save, wall", r.save_ms);
    row("restore, wall", r.restore_ms);
    row("restore, CPU", r.restore_cpu_ms);
    row("VM ready after restore start", r.ready_ms);
    Ok(ExitCode::SUCCESS)
}

/// Print `r` as pretty JSON.
fn print_json<T: serde::Serialize>(r: &T) -> Result<ExitCode, String> {
    println!(
        "{}",
        serde_json::to_string_pretty(r).map_err(|e| e.to_string())?
    );
    Ok(ExitCode::SUCCESS)
}

fn kho(size: u64, runs: usize, json: bool) -> Result<ExitCode, String> {
    let r = crate::bench::kho::run(size, runs).map_err(|e| e.to_string())?;
    if json {
        return print_json(&r);
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
        return print_json(&r);
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
