//! `handover bench --vmm external`: an external VMM beside the in-process one, on the same
//! guest and the same scenario, runs interleaved.
//!
//! - **Blackout**: the RFC scenario with the guest kept running across the update (16 MiB
//!   guest_memfd, 5 MiB written, the guest measuring the largest gap between two reads of its
//!   clock port). In process: `handover boot --init gmem-rfc`. External: the C VMM of
//!   `tests/vmm` (`rfc_vmm --live`), a separate process under `handover run --kexecs 1`, which
//!   preserves its VM, guest_memfd, low memory and vCPU state through `/dev/liveupdate` and
//!   updates with `reboot(LINUX_REBOOT_CMD_KEXEC)`; its next run restores them.
//! - **Exit round trip**: the same guest's port-I/O exits (`rfc_vmm --bench-exits`), each
//!   `KVM_RUN` timed by the VMM from the call to its return with the exit, under `handover run`
//!   and on the machine's own /dev/kvm (the VMM in the process that owns the vCPU, as an
//!   in-process VMM is).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;
use serde_json::{json, Value};

use super::blackout::{run_one, Fill, Kind, Plan, Spec};
use super::syscall::{percentile, Target};

/// The blackout target: external within this factor of in-process (p50).
pub const TARGET_BLACKOUT_RATIO: f64 = 1.5;
/// The exit target: external round trip within this factor of the native one (p50).
pub const TARGET_EXIT_RATIO: f64 = 2.0;

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Runs of each VMM (interleaved).
    pub runs: usize,
    /// Timed exits per exit measurement.
    pub exits: usize,
    /// Exit measurements of each kind (interleaved).
    pub exit_runs: usize,
    /// The C VMM binary; built from `tests/vmm/*.c` of the source tree when `None`.
    pub vmm: Option<PathBuf>,
}

/// p50, p99 and max of a sample, and the sample.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Dist {
    /// Median.
    pub p50: f64,
    /// 99th percentile (interpolated).
    pub p99: f64,
    /// Largest.
    pub max: f64,
    /// Every value, in run order.
    pub values: Vec<f64>,
}

impl Dist {
    fn of(v: Vec<f64>) -> Dist {
        let mut s = v.clone();
        s.sort_by(|a, b| a.total_cmp(b));
        Dist {
            p50: percentile(&s, 50.0),
            p99: percentile(&s, 99.0),
            max: s.last().copied().unwrap_or(0.0),
            values: v,
        }
    }
}

/// The whole result.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Guest-visible blackout, in-process VMM, µs.
    pub inproc_blackout_us: Dist,
    /// Guest-visible blackout, external VMM, µs.
    pub external_blackout_us: Dist,
    /// The external runs' phases (µs, medians): the VMM's own and the host's.
    pub external_phases_us: Value,
    /// The in-process runs' phases (µs, medians).
    pub inproc_phases_us: Value,
    /// Each external run's phases (µs), in run order: where an outlier's time went.
    pub external_runs_phases_us: Vec<Value>,
    /// Exit round trip, VMM on the machine's /dev/kvm: p50 of each measurement, µs.
    pub native_exit_p50_us: Dist,
    /// Exit round trip, VMM under `handover run`: p50 of each measurement, µs.
    pub external_exit_p50_us: Dist,
    /// p99 of the exit round trip, worst measurement of each kind, µs.
    pub exit_p99_us: (f64, f64),
    /// Runs that failed, with why.
    pub failures: Vec<String>,
    /// The verdicts.
    pub targets: Vec<Target>,
}

/// Build the C VMM (`tests/vmm/*.c` of the source tree) into `dir/rfc_vmm` with `cc FLAGS`
/// (the benchmark: `-O2 -Wall`; the tests add `-Werror`).
pub fn build_vmm(dir: &Path, flags: &[&str]) -> Result<PathBuf, String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vmm");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&src)
        .map_err(|e| format!("{}: {e} (give --vmm-program)", src.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "c"))
        .collect();
    files.sort();
    let out = dir.join("rfc_vmm");
    let r = Command::new("cc")
        .args(flags)
        .arg("-o")
        .arg(&out)
        .args(&files)
        .output()
        .map_err(|e| format!("cannot run cc: {e} (install gcc or give --vmm-program)"))?;
    if !r.status.success() {
        return Err(format!(
            "cc tests/vmm/*.c failed:\n{}",
            String::from_utf8_lossy(&r.stderr)
        ));
    }
    Ok(out)
}

/// The write and verify images of the test guest (5 MiB at 4 GiB), as `handover guest-image`.
fn images(dir: &Path) -> Result<(PathBuf, PathBuf), String> {
    use crate::vmm::guest::{build_image, GuestMode, GuestParams, LOW_IMAGE_SIZE};
    let mut out = Vec::new();
    for (name, mode) in [
        ("write.img", GuestMode::Write),
        ("verify.img", GuestMode::Verify),
    ] {
        let mut img = vec![0u8; LOW_IMAGE_SIZE];
        let p = GuestParams {
            data_gpa: crate::vmm::rfc::GMEM_GPA,
            data_len: 5 << 20,
            mode,
        };
        build_image(&mut img, &p).map_err(|e| format!("guest image: {e}"))?;
        let path = dir.join(name);
        std::fs::write(&path, &img).map_err(|e| format!("{}: {e}", path.display()))?;
        out.push(path);
    }
    Ok((out[0].clone(), out[1].clone()))
}

/// The JSON after `prefix` on a line of `out`.
fn json_line(out: &str, prefix: &str) -> Option<Value> {
    out.lines().find_map(|l| {
        l.strip_prefix(prefix)
            .and_then(|j| serde_json::from_str(j.trim()).ok())
    })
}

fn us_between(a: &Value, b: &Value) -> f64 {
    match (a.as_f64(), b.as_f64()) {
        (Some(a), Some(b)) => (b - a) / 1e3,
        _ => 0.0,
    }
}

/// One external run: the guest's blackout and the phases, from the VMM's line and the host's
/// report (CLOCK_MONOTONIC on both sides).
fn external_run(dir: &Path, vmm: &Path, w: &Path, v: &Path) -> Result<(f64, Value), String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
    let report = dir.join("run.jsonl");
    let _ = std::fs::remove_file(&report);
    let out = Command::new(exe)
        .args(["run", "--ram", "1G", "--kexecs", "1", "--report"])
        .arg(&report)
        .arg("--")
        .arg(vmm)
        .args([w, v])
        .arg("--live")
        .output()
        .map_err(|e| format!("cannot start handover run: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let live = json_line(&stdout, "rfc_vmm: live ").filter(|_| out.status.success());
    let Some(live) = live else {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!(
            "external run failed ({}): {}",
            out.status,
            err.lines().last().unwrap_or("")
        ));
    };
    let events: Vec<Value> = std::fs::read_to_string(&report)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let last = |name: &str| {
        events
            .iter()
            .rev()
            .find(|e| e["event"] == name)
            .map(|e| e["times_ns"].clone())
            .unwrap_or(Value::Null)
    };
    let (k, s) = (last("run-kexec"), last("run-start"));
    let us_f = |x: &Value| x.as_f64().map(|u| u * 1e3).map_or(Value::Null, Value::from);
    let phases = json!({
        "guest_blackout": live["blackout_us"],
        "pause": live["pause_us"],
        "save_state": live["save_us"],
        "stop_programs": us_between(&k["asked"], &k["stopped"]),
        "freeze_and_finalize": us_between(&s["kexec_start"], &s["exec"]),
        "exec": us_between(&s["exec"], &s["boot_start"]),
        "boot": s["boot_us"],
        "start_program": us_between(&s["run"], &s["spawned"]),
        "program_to_main": us_between(&s["spawned"], &us_f(&live["t_main_us"])),
        "retrieve": live["retrieve_us"],
        "restore": live["restore_us"],
    });
    Ok((live["blackout_us"].as_f64().unwrap_or(0.0), phases))
}

/// p50 and p99 of one exit measurement (µs), from `rfc_vmm: exits {...}`.
fn exit_run(vmm: &Path, w: &Path, v: &Path, n: usize, native: bool) -> Result<(f64, f64), String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
    let mut cmd = if native {
        Command::new(vmm)
    } else {
        let mut c = Command::new(exe);
        c.args(["run", "--ram", "1G", "--"]).arg(vmm);
        c
    };
    cmd.args([w, v]).args(["--bench-exits", &n.to_string()]);
    if native {
        cmd.arg("--native");
    }
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run the VMM: {e}"))?;
    let j = json_line(&String::from_utf8_lossy(&out.stdout), "rfc_vmm: exits ")
        .filter(|_| out.status.success())
        .ok_or_else(|| format!("exit benchmark failed ({})", out.status))?;
    let us = |k: &str| j[k].as_f64().unwrap_or(0.0) / 1e3;
    Ok((us("p50_ns"), us("p99_ns")))
}

/// Median of each key over `runs`.
fn median_phases(runs: &[Value]) -> Value {
    let mut m = serde_json::Map::new();
    if let Some(Value::Object(first)) = runs.first() {
        for k in first.keys() {
            let v: Vec<f64> = runs.iter().filter_map(|r| r[k].as_f64()).collect();
            m.insert(k.clone(), Dist::of(v).p50.into());
        }
    }
    Value::Object(m)
}

/// Run it all. Progress goes to stderr.
pub fn run(o: &Options) -> Result<Report, String> {
    let dir = std::env::temp_dir().join(format!("handover-bench-vmm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let vmm = match &o.vmm {
        Some(p) => p.clone(),
        None => build_vmm(&dir, &["-O2", "-Wall"])?,
    };
    let (w, v) = images(&dir)?;
    let plan = Plan {
        data: 5 << 20,
        ..Plan::quick()
    };
    let (mut inproc, mut ext, mut inproc_ph, mut ext_ph, mut failures) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..o.runs {
        let spec = Spec {
            kind: Kind::LiveV2,
            size: 16 << 20,
            slot: 16 << 20,
            fill: Fill::Allocated,
        };
        let r = run_one(spec, &plan);
        match r.error {
            None => {
                inproc.push(r.blackout_us);
                inproc_ph.push(r.phases_us);
            }
            Some(e) => failures.push(format!("in-process run {i}: {e}")),
        }
        match external_run(&dir, &vmm, &w, &v) {
            Ok((b, ph)) => {
                ext.push(b);
                ext_ph.push(ph);
            }
            Err(e) => failures.push(format!("external run {i}: {e}")),
        }
        eprintln!("bench --vmm external: blackout run {}/{}", i + 1, o.runs);
    }
    let (mut nat, mut fwd, mut p99) = (Vec::new(), Vec::new(), (0.0f64, 0.0f64));
    for i in 0..o.exit_runs {
        for native in [true, false] {
            match exit_run(&vmm, &w, &v, o.exits, native) {
                Ok((p50, q)) if native => {
                    nat.push(p50);
                    p99.0 = p99.0.max(q);
                }
                Ok((p50, q)) => {
                    fwd.push(p50);
                    p99.1 = p99.1.max(q);
                }
                Err(e) => failures.push(format!("exit run {i} (native {native}): {e}")),
            }
        }
        eprintln!("bench --vmm external: exit run {}/{}", i + 1, o.exit_runs);
    }
    let _ = std::fs::remove_dir_all(&dir);
    let (ib, eb) = (Dist::of(inproc), Dist::of(ext));
    let (ne, fe) = (Dist::of(nat), Dist::of(fwd));
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::INFINITY };
    let br = ratio(eb.p50, ib.p50);
    let er = ratio(fe.p50, ne.p50);
    let targets = vec![
        Target {
            target: format!(
                "external VMM's guest-visible blackout within {TARGET_BLACKOUT_RATIO}x of the \
                 in-process VMM's (value: p50 external / p50 in-process)"
            ),
            value: br,
            met: br <= TARGET_BLACKOUT_RATIO && !eb.values.is_empty(),
        },
        Target {
            target: format!(
                "port-I/O exit round trip under handover within {TARGET_EXIT_RATIO}x of the VMM \
                 on the real /dev/kvm (value: p50 / p50)"
            ),
            value: er,
            met: er <= TARGET_EXIT_RATIO && !fe.values.is_empty(),
        },
    ];
    Ok(Report {
        inproc_blackout_us: ib,
        external_blackout_us: eb,
        external_phases_us: median_phases(&ext_ph),
        inproc_phases_us: median_phases(&inproc_ph),
        external_runs_phases_us: ext_ph,
        native_exit_p50_us: ne,
        external_exit_p50_us: fe,
        exit_p99_us: p99,
        failures,
        targets,
    })
}
