//! Many VMs through live updates: a host image running the `fleet` init program with `vms`
//! VMs of `vcpus` vCPUs, taken through `updates` updates in a row. Every update gives one
//! blackout per VM; the point is the spread of all of them (host-measured, from the VM's pause
//! to its resume, and as the guest saw it between two clock reads), the guest's TSC step
//! across the update beside its clock gap, and the medians of the phases.

use serde::Serialize;
use serde_json::Value;

use super::harness::run_host;
use super::Spread;

/// What one point runs.
#[derive(Debug, Clone, Serialize)]
pub struct Spec {
    /// VMs.
    pub vms: u32,
    /// vCPUs per VM.
    pub vcpus: u32,
    /// guest_memfd size per VM.
    pub guest_mem: u64,
    /// Bytes written per VM, by VM index modulo the list (mixed sizes).
    pub data: Vec<u64>,
    /// Updates in a row (each one a sample per VM).
    pub updates: u32,
    /// Restore workers (0: one per CPU).
    pub workers: u32,
    /// The guests' idle wait per loop pass (µs).
    pub idle_us: u64,
    /// RAM of the host image.
    pub ram: u64,
}

/// What one point measured.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    /// What ran.
    pub spec: Spec,
    /// Every VM verified its data and its shared counter after the last update.
    pub ok: bool,
    /// Why not, if not.
    pub error: Option<String>,
    /// Per-VM blackout (µs), over every VM of every update: from the VMM's kick of its vCPUs
    /// to the first clock read of the last of them after the update (every vCPU runs guest
    /// code again).
    pub blackout_us: Spread,
    /// Per-VM blackout as the guest saw it: its largest gap between two clock reads (µs).
    pub guest_gap_us: Spread,
    /// The guest's largest TSC step across the update, in µs of its TSC frequency.
    pub guest_tsc_step_us: Spread,
    /// Samples whose TSC step exceeded the clock gap by more than 1 ms, and TSC reads that
    /// went backwards (both must be 0).
    pub tsc_over_gap: usize,
    /// TSC reads lower than the one before, summed over every vCPU.
    pub tsc_backwards: u64,
    /// Medians over updates of the phases common to all VMs (µs).
    pub phases_us: serde_json::Map<String, Value>,
    /// Medians over VMs and updates of each VM's own phases (µs).
    pub vm_phases_us: serde_json::Map<String, Value>,
    /// CPU time the new image used (every thread) from stage 2's start to the last resume,
    /// per update (µs): against the `restore_all` phase, how busy the restore kept the CPUs.
    pub restore_cpu_us: Spread,
    /// Time to bind the guest_memfd memslots left for after the resume (`bind=lazy`), per
    /// update (µs); outside every blackout.
    pub bind_after_resume_us: Spread,
    /// Time the guests took to write their data at the start (ms).
    pub write_ms: f64,
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

fn medians<'a>(objs: impl Iterator<Item = &'a Value>) -> serde_json::Map<String, Value> {
    let mut cols: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
    for o in objs {
        if let Some(m) = o.as_object() {
            for (k, v) in m {
                cols.entry(k.clone()).or_default().push(f(v));
            }
        }
    }
    cols.into_iter()
        .map(|(k, v)| (k, Value::from(Spread::of(&v).median)))
        .collect()
}

/// Run one point.
pub fn run(spec: &Spec) -> Result<Point, String> {
    let data: Vec<String> = spec.data.iter().map(u64::to_string).collect();
    let mut args = vec![
        "--ram".to_string(),
        spec.ram.to_string(),
        "--init".into(),
        crate::vmm::fleet::PROGRAM.into(),
    ];
    for a in [
        format!("vms={}", spec.vms),
        format!("vcpus={}", spec.vcpus),
        format!("guest-mem={}", spec.guest_mem),
        format!("data={}", data.join(",")),
        format!("cycles={}", spec.updates),
        format!("workers={}", spec.workers),
        format!("idle-us={}", spec.idle_us),
    ] {
        args.extend(["--init-arg".to_string(), a]);
    }
    let (code, events, stderr) = run_host(&args)?;
    let updates: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "fleet-update")
        .collect();
    let done = events.iter().find(|e| e["event"] == "fleet-done");
    let failed = events.iter().find(|e| e["event"] == "fleet-failed");
    let ok = code == 0 && done.is_some_and(|d| d["ok"] == true);
    let vms: Vec<&Value> = updates
        .iter()
        .flat_map(|u| u["vms"].as_array().into_iter().flatten())
        .collect();
    let col = |k: &str| vms.iter().map(|v| f(&v[k])).collect::<Vec<f64>>();
    let (gap, tsc) = (col("guest_gap_us"), col("guest_tsc_step_us"));
    let error = failed
        .map(|e| e["error"].as_str().unwrap_or("").to_string())
        .or_else(|| (!ok).then(|| format!("host image exited with {code}: {stderr}")));
    Ok(Point {
        spec: spec.clone(),
        ok,
        error,
        blackout_us: Spread::of(&col("blackout_us")),
        guest_gap_us: Spread::of(&gap),
        guest_tsc_step_us: Spread::of(&tsc),
        tsc_over_gap: gap
            .iter()
            .zip(&tsc)
            .filter(|(g, t)| **t > **g + 1000.0)
            .count(),
        tsc_backwards: vms
            .iter()
            .map(|v| v["tsc_backwards"].as_u64().unwrap_or(0))
            .sum(),
        phases_us: medians(updates.iter().map(|u| &u["phases_us"])),
        vm_phases_us: medians(vms.iter().map(|v| &v["phases_us"])),
        restore_cpu_us: Spread::of(
            &updates
                .iter()
                .map(|u| f(&u["restore_cpu_us"]))
                .collect::<Vec<_>>(),
        ),
        bind_after_resume_us: Spread::of(
            &updates
                .iter()
                .map(|u| f(&u["bind_after_resume_us"]))
                .collect::<Vec<_>>(),
        ),
        write_ms: events
            .iter()
            .find(|e| e["event"] == "fleet-stage1")
            .map_or(0.0, |e| f(&e["write_ms"])),
    })
}
