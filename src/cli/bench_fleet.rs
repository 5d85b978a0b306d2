//! `handover bench --vms N,..`: many VMs through live updates, one point per VM count; and
//! `handover demo --vms N --vcpus M`, which runs one such point once and tells it.

use std::process::ExitCode;

use crate::bench::blackout::human;
use crate::bench::fleet::{run, Point, Spec};

use super::bench::BlackoutArgs;

/// RAM for a host image holding `data` bytes of guests: room for them (the fleet keeps its
/// data within 3/4 of RAM), at least 2 GiB, in whole GiB.
pub fn ram_for(data: u64) -> u64 {
    (data / 3 * 4 + (1 << 30)).max(2 << 30).div_ceil(1 << 30) << 30
}

/// The spec of `vms` VMs as `a` asks.
fn spec(a: &BlackoutArgs, vms: u32) -> Spec {
    let data: u64 = (0..vms)
        .map(|i| a.vm_data[i as usize % a.vm_data.len().max(1)])
        .sum();
    Spec {
        vms,
        vcpus: a.vcpus,
        guest_mem: a.vm_mem,
        data: a.vm_data.clone(),
        updates: a.runs.unwrap_or(10) as u32,
        workers: a.workers,
        idle_us: a.idle_us,
        ram: ram_for(data),
    }
}

fn ms(us: f64) -> f64 {
    us / 1e3
}

/// Print one point as text.
pub fn print(p: &Point) {
    let s = &p.spec;
    println!(
        "{} VMs x {} vCPUs, {} guest_memfd each, data {}, {} updates{}",
        s.vms,
        s.vcpus,
        human(s.guest_mem),
        s.data
            .iter()
            .map(|d| human(*d))
            .collect::<Vec<_>>()
            .join("/"),
        s.updates,
        if p.ok { "" } else { "  FAILED" }
    );
    let row = |what: &str, x: crate::bench::Spread| {
        println!(
            "  {what:28} p50 {:7.2}  p99 {:7.2}  max {:7.2} ms  (n={})",
            ms(x.median),
            ms(x.p99),
            ms(x.max),
            x.n
        )
    };
    row("blackout, kick to guest code", p.blackout_us);
    row("blackout the guest saw", p.guest_gap_us);
    row("guest TSC step", p.guest_tsc_step_us);
    row("restore CPU, all threads", p.restore_cpu_us);
    row("memory bound after resume", p.bind_after_resume_us);
    println!(
        "  TSC step above clock gap + 1 ms: {}; TSC reads backwards: {}",
        p.tsc_over_gap, p.tsc_backwards
    );
    let fmt = |m: &serde_json::Map<String, serde_json::Value>| {
        m.iter()
            .map(|(k, v)| format!("{k} {:.0}", v.as_f64().unwrap_or(0.0)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("  update phases (µs, p50): {}", fmt(&p.phases_us));
    println!("  per-VM phases (µs, p50): {}", fmt(&p.vm_phases_us));
    if let Some(e) = &p.error {
        println!("  error: {e}");
    }
}

/// `handover bench --vms ...`: exit 1 if a point failed.
pub fn bench(a: &BlackoutArgs) -> Result<ExitCode, String> {
    let counts = a.vms.clone().unwrap_or_default();
    let mut points = Vec::new();
    for &n in &counts {
        let p = run(&spec(a, n))?;
        if !a.json {
            print(&p);
        }
        points.push(p);
    }
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&points).map_err(|e| e.to_string())?
        );
    }
    Ok(if points.iter().all(|p| p.ok) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
