//! The cost of the process boundary (`handover bench syscall`).
//!
//! A program under `handover run` reaches host objects through the preload library, which
//! forwards its calls over a socket (`crate::boundary`). This benchmark measures what that costs
//! against the same work without the boundary:
//!
//! - **ioctl round trip**: `LIVEUPDATE_SESSION_GET_NAME` on a session fd from a program under
//!   `handover run`, beside the same call made in process through `Host::ioctl` and a real-kernel
//!   `ioctl(FIONREAD)` on a pipe (from this process, and from the program under the preload).
//! - **writing through a mapping**: `memfd_create` + `ftruncate` + `mmap(MAP_SHARED)`, a volatile
//!   store to every 8-byte word, `munmap` + `close`, for a host memfd (its pages are frames of the
//!   host's RAM memfd, holes faulted in through the host) and, run by run interleaved, for a real
//!   kernel memfd (`memfd_create` issued as a raw syscall, which the preload does not see).
//! - **write()**: the same size in fixed blocks (64 KiB) into a host memfd and a real memfd.
//!
//! The forwarded half runs in a client: this binary as `handover bench syscall-client` started
//! by `handover run`, so its `libc` calls go through the preload. The client prints one JSON
//! object ([`ClientReport`]); the parent adds the in-process numbers ([`SyscallBench`]).

use std::ffi::CStr;
use std::process::{Command, Stdio};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use zerocopy::IntoBytes;

use crate::abi::luo::{CreateSession, SessionGetName, LIVEUPDATE_SESSION_GET_NAME};

mod client;
pub use client::client;

/// The ioctl round-trip target: forwarded GET_NAME p50, µs.
pub const TARGET_IOCTL_P50_US: f64 = 15.0;
/// The mapping target: host memfd time / real memfd time (p50 over runs).
pub const TARGET_MMAP_RATIO: f64 = 1.2;
/// The write() target: GB/s (10^9 bytes per second), p50 over runs.
pub const TARGET_WRITE_GB_S: f64 = 1.0;

/// The session name the ioctl benchmark creates and reads back.
const SESSION: &str = "bench-syscall";

/// What to run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Options {
    /// Timed ioctl calls per measurement.
    pub iters: usize,
    /// Runs of each memfd measurement (host and real, interleaved).
    pub runs: usize,
    /// Bytes written per memfd run.
    pub size: u64,
    /// Block size of the write() runs.
    pub block: u64,
}

/// Latency of single calls, each timed on its own, µs.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Latency {
    /// Calls timed (after the untimed warm-up).
    pub calls: usize,
    /// Untimed calls made first.
    pub warmup: usize,
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// Slowest call.
    pub max_us: f64,
    /// Fastest call.
    pub min_us: f64,
    /// Mean.
    pub mean_us: f64,
}

/// The `p`th percentile (0..=100) of sorted `v`, interpolated linearly between the two nearest
/// ranks (so the p50 of an even count is the mean of the middle two); 0 for an empty sample.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    match sorted.len() {
        0 => 0.0,
        1 => sorted[0],
        n => {
            let x = p.clamp(0.0, 100.0) / 100.0 * (n - 1) as f64;
            let (lo, frac) = (x.floor() as usize, x - x.floor());
            let hi = (lo + 1).min(n - 1);
            sorted[lo] + (sorted[hi] - sorted[lo]) * frac
        }
    }
}

fn sorted(v: &[f64]) -> Vec<f64> {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s
}

impl Latency {
    /// The distribution of `ns`, one sample per call.
    pub fn of_ns(ns: &[u64], warmup: usize) -> Latency {
        let us: Vec<f64> = ns.iter().map(|&n| n as f64 / 1e3).collect();
        let s = sorted(&us);
        Latency {
            calls: s.len(),
            warmup,
            p50_us: percentile(&s, 50.0),
            p99_us: percentile(&s, 99.0),
            max_us: s.last().copied().unwrap_or(0.0),
            min_us: s.first().copied().unwrap_or(0.0),
            mean_us: if s.is_empty() {
                0.0
            } else {
                s.iter().sum::<f64>() / s.len() as f64
            },
        }
    }
}

/// p50, min and max of a handful of runs.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct RunStats {
    /// Median (the mean of the middle two for an even count).
    pub p50: f64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
}

impl RunStats {
    /// Of the values `v`.
    pub fn of(v: &[f64]) -> RunStats {
        let s = sorted(v);
        RunStats {
            p50: percentile(&s, 50.0),
            min: s.first().copied().unwrap_or(0.0),
            max: s.last().copied().unwrap_or(0.0),
        }
    }
}

/// Whose memfd a run used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemfdKind {
    /// A host memfd: `memfd_create` forwarded to the host by the preload library.
    Host,
    /// A real kernel memfd (raw `memfd_create` syscall).
    Real,
}

/// One run of the mapping benchmark.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MmapRun {
    /// Host or real memfd.
    pub kind: MemfdKind,
    /// Run number (host and real run `i` ran back to back).
    pub run: usize,
    /// `memfd_create` + `ftruncate` + `mmap`, ms.
    pub setup_ms: f64,
    /// The volatile store to every word (page faults included), ms.
    pub touch_ms: f64,
    /// `munmap` + `close` (the file's pages are freed), ms.
    pub teardown_ms: f64,
    /// The three together (the checks between touch and teardown are not timed), ms.
    pub total_ms: f64,
    /// Bytes written / `total_ms`, GB/s (10^9).
    pub gb_per_s: f64,
    /// Minor page faults of the client during the touch (`getrusage`).
    pub minor_faults: u64,
}

/// One run of the write() benchmark.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WriteRun {
    /// Host or real memfd.
    pub kind: MemfdKind,
    /// Run number.
    pub run: usize,
    /// The write() calls, ms (`memfd_create` and `close` are not timed).
    pub ms: f64,
    /// Bytes / `ms`, GB/s (10^9).
    pub gb_per_s: f64,
}

/// What the client under `handover run` measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClientReport {
    /// What it was asked to run.
    pub options: Options,
    /// GET_NAME on a host session fd, forwarded to the host.
    pub forwarded_ioctl: Latency,
    /// FIONREAD on a real pipe from the same program: the preload's `ioctl` wrapper passes it to
    /// the kernel.
    pub preload_kernel_ioctl: Latency,
    /// Every mapping run, in the order they ran.
    pub mmap_runs: Vec<MmapRun>,
    /// Total ms of the host memfd mapping runs.
    pub mmap_host_ms: RunStats,
    /// Total ms of the real memfd mapping runs.
    pub mmap_real_ms: RunStats,
    /// Touch-only ms of the host memfd mapping runs.
    pub mmap_host_touch_ms: RunStats,
    /// Touch-only ms of the real memfd mapping runs.
    pub mmap_real_touch_ms: RunStats,
    /// `mmap_host_ms.p50 / mmap_real_ms.p50`.
    pub mmap_ratio_p50: f64,
    /// Every write() run, in the order they ran.
    pub write_runs: Vec<WriteRun>,
    /// GB/s of the host memfd write() runs.
    pub write_host_gb_s: RunStats,
    /// GB/s of the real memfd write() runs.
    pub write_real_gb_s: RunStats,
}

/// One target and whether it was met.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Target {
    /// What was asked.
    pub target: String,
    /// The measured value it is judged by.
    pub value: f64,
    /// Whether the value meets it.
    pub met: bool,
}

/// The whole benchmark: the client's report and the in-process references.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SyscallBench {
    /// CPUs and kernel release of this machine.
    pub machine: serde_json::Value,
    /// The command line of the forwarded half.
    pub client_command: Vec<String>,
    /// GET_NAME through `Host::ioctl` in this process (no boundary).
    pub in_process_ioctl: Latency,
    /// FIONREAD on a real pipe from this process.
    pub kernel_ioctl: Latency,
    /// Two clock reads back to back: the cost of timing one call.
    pub timer_overhead: Latency,
    /// The forwarded half.
    pub client: ClientReport,
    /// The targets.
    pub targets: Vec<Target>,
}

fn warmup_of(iters: usize) -> usize {
    (iters / 10).min(1000)
}

/// Time `iters` calls of `f` one by one after `warmup_of(iters)` untimed ones; the first error
/// stops it.
fn time_calls(iters: usize, mut f: impl FnMut() -> Result<(), String>) -> Result<Latency, String> {
    let warm = warmup_of(iters);
    for _ in 0..warm {
        f()?;
    }
    let mut ns = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        f()?;
        ns.push(t.elapsed().as_nanos() as u64);
    }
    Ok(Latency::of_ns(&ns, warm))
}

fn os_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

/// `ioctl(FIONREAD)` on an empty real pipe, `iters` times (through the `libc` crate: in a
/// program under `handover run` this goes through the preload's wrapper to the kernel).
pub fn kernel_ioctl(iters: usize) -> Result<Latency, String> {
    let mut p = [0i32; 2];
    // SAFETY: pipe2 writes two fds into `p`.
    if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(os_err("pipe2"));
    }
    let r = time_calls(iters, || {
        let mut n: libc::c_int = -1;
        // SAFETY: FIONREAD writes one int to `n`.
        let r = unsafe { libc::ioctl(p[0], libc::FIONREAD, &mut n as *mut libc::c_int) };
        if r != 0 || std::hint::black_box(n) != 0 {
            return Err(os_err("ioctl(FIONREAD)"));
        }
        Ok(())
    });
    for fd in p {
        // SAFETY: closing the pipe this function made.
        unsafe { libc::close(fd) };
    }
    r
}

/// Two `Instant::now()` back to back, `iters` times: what timing one call adds.
pub fn timer_overhead(iters: usize) -> Latency {
    let mut ns = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        ns.push(std::hint::black_box(t).elapsed().as_nanos() as u64);
    }
    Latency::of_ns(&ns, 0)
}

fn get_name_arg() -> SessionGetName {
    SessionGetName {
        size: std::mem::size_of::<SessionGetName>() as u32,
        reserved: 0,
        name: [0; 64],
    }
}

fn name_is(a: &SessionGetName) -> bool {
    crate::abi::cstr_field(&a.name).as_deref() == Some(SESSION)
}

/// GET_NAME through `Host::ioctl` in this process: a host booted here (256 MiB), a process, a
/// session; `iters` calls.
pub fn in_process_ioctl(iters: usize) -> Result<Latency, String> {
    let mut h = crate::host::Host::boot(crate::kexec::BootParams {
        ram_size: 256 << 20,
        ..Default::default()
    })
    .map_err(|e| format!("boot: {e:?}"))?;
    let pid = h.spawn();
    let dev = h
        .open(pid, "/dev/liveupdate", libc::O_RDWR as u32)
        .map_err(|e| format!("open /dev/liveupdate: {e}"))?;
    let s = crate::vmm::libluo::create_session(&mut h, pid, dev, SESSION)
        .map_err(|e| format!("create session: {e}"))?;
    let r = time_calls(iters, || {
        let mut a = get_name_arg();
        h.ioctl(pid, s, LIVEUPDATE_SESSION_GET_NAME, a.as_mut_bytes())
            .map_err(|e| format!("GET_NAME: {e}"))?;
        if !name_is(std::hint::black_box(&a)) {
            return Err("GET_NAME: wrong name".into());
        }
        Ok(())
    });
    h.exit(pid);
    r
}

// ---- the parent ----

/// The host RAM the client's host image gets: room for a memfd of `size` twice over, at least
/// 4 GiB (RAM is a sparse memfd: only what is written costs memory).
pub fn client_ram(size: u64) -> u64 {
    (4u64 << 30).max(size.saturating_mul(2).saturating_add(512 << 20))
}

/// The command line of the forwarded half: `handover run` of this binary's client.
pub fn client_command(exe: &str, o: &Options) -> Vec<String> {
    [
        exe,
        "run",
        "--ram",
        &client_ram(o.size).to_string(),
        "--",
        exe,
        "bench",
        "syscall-client",
        "--iters",
        &o.iters.to_string(),
        "--runs",
        &o.runs.to_string(),
        "--size",
        &o.size.to_string(),
        "--block",
        &o.block.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Run the client under `handover run` and read its report.
fn forwarded(cmd: &[String]) -> Result<ClientReport, String> {
    let out = Command::new(&cmd[0])
        .args(&cmd[1..])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot start {}: {e}", cmd[0]))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "the client under handover run failed ({}); its output: {}",
            out.status,
            text.trim()
        ));
    }
    serde_json::from_str(text.trim()).map_err(|e| format!("the client's report: {e}: {text}"))
}

/// The targets, judged on `c` (no rounding).
pub fn targets(c: &ClientReport) -> Vec<Target> {
    let mut t = vec![
        Target {
            target: format!(
                "forwarded ioctl round trip p50 <= {TARGET_IOCTL_P50_US} us (value: p50 us)"
            ),
            value: c.forwarded_ioctl.p50_us,
            met: c.forwarded_ioctl.p50_us <= TARGET_IOCTL_P50_US,
        },
        Target {
            target: format!(
                "writing a mapped host memfd within {TARGET_MMAP_RATIO}x of a real memfd \
                 (value: p50 host / p50 real)"
            ),
            value: c.mmap_ratio_p50,
            met: c.mmap_ratio_p50 <= TARGET_MMAP_RATIO,
        },
    ];
    t.push(Target {
        target: format!(
            "write() of {} KiB blocks into a host memfd >= {TARGET_WRITE_GB_S} GB/s (value: p50 GB/s)",
            c.options.block >> 10
        ),
        value: c.write_host_gb_s.p50,
        met: c.write_host_gb_s.p50 >= TARGET_WRITE_GB_S,
    });
    t
}

/// The whole benchmark: in-process references first, then the client under `handover run`.
pub fn run(o: &Options) -> Result<SyscallBench, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
    let cmd = client_command(&exe.to_string_lossy(), o);
    let timer = timer_overhead(o.iters);
    let in_process = in_process_ioctl(o.iters)?;
    let kernel = kernel_ioctl(o.iters)?;
    let client = forwarded(&cmd)?;
    Ok(SyscallBench {
        machine: serde_json::json!({
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
        }),
        client_command: cmd,
        in_process_ioctl: in_process,
        kernel_ioctl: kernel,
        timer_overhead: timer,
        targets: targets(&client),
        client,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate() {
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 5.5);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&v, 100.0), 10.0);
        assert!((percentile(&v, 99.0) - 9.91).abs() < 1e-9);
        assert_eq!(percentile(&[], 50.0), 0.0);
        assert_eq!(percentile(&[3.0], 99.0), 3.0);
        let r = RunStats::of(&[3.0, 1.0, 2.0]);
        assert_eq!((r.p50, r.min, r.max), (2.0, 1.0, 3.0));
        let l = Latency::of_ns(&[1000, 3000, 2000], 0);
        assert_eq!(
            (l.p50_us, l.max_us, l.min_us, l.mean_us),
            (2.0, 3.0, 1.0, 2.0)
        );
    }

    #[test]
    fn client_command_runs_this_binary_under_handover_run() {
        let o = Options {
            iters: 5,
            runs: 2,
            size: 1 << 30,
            block: 64 << 10,
        };
        let c = client_command("/x/handover", &o);
        assert_eq!(c[..4], ["/x/handover", "run", "--ram", "4294967296"]);
        assert_eq!(c[4..8], ["--", "/x/handover", "bench", "syscall-client"]);
        assert_eq!(client_ram(4 << 30), (8 << 30) + (512 << 20));
    }

    #[test]
    fn the_client_refuses_to_run_outside_handover_run() {
        if std::env::var_os("HANDOVER_SOCK").is_some() {
            return;
        }
        let o = Options {
            iters: 1,
            runs: 1,
            size: 4096,
            block: 4096,
        };
        assert!(client(&o).unwrap_err().contains("handover run"));
    }

    #[test]
    fn in_process_references_run() {
        let l = in_process_ioctl(50).unwrap();
        assert_eq!((l.calls, l.warmup), (50, 5));
        assert!(l.p50_us > 0.0 && l.p50_us <= l.p99_us && l.p99_us <= l.max_us);
        assert_eq!(kernel_ioctl(20).unwrap().calls, 20);
    }
}
