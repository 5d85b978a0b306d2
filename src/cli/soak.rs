//! `handover soak --cycles N`: one guest through N live updates in a row. Each cycle the guest
//! writes its data, the host updates under it, and the guest checks every byte; the host
//! image's frame accounting must be identical after every cycle and its memory use must not
//! grow.

use std::process::ExitCode;

use clap::Args;
use serde_json::{json, Value};

use crate::kexec::params::parse_size;

#[derive(Args, Debug)]
/// Arguments of `handover soak`.
pub struct SoakArgs {
    /// Live updates in a row.
    #[arg(long, default_value_t = 20)]
    pub cycles: u32,
    /// Size of the guest_memfd.
    #[arg(long, default_value = "16M", value_parser = parse_size)]
    pub guest_mem: u64,
    /// Data the guest writes and checks each cycle.
    #[arg(long, default_value = "1M", value_parser = parse_size)]
    pub data: u64,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// `handover soak`: run the cycles in one chain of host images; exit 1 on any failure.
pub fn run(a: SoakArgs) -> Result<ExitCode, String> {
    if a.cycles == 0 {
        return Err("--cycles must be at least 1".into());
    }
    let args: Vec<String> = vec![
        "--ram".into(),
        "1G".into(),
        "--init".into(),
        crate::vmm::rfc::PROGRAM.into(),
        "--init-arg".into(),
        format!("guest-mem={}", a.guest_mem),
        "--init-arg".into(),
        format!("data={}", a.data),
        "--init-arg".into(),
        format!("cycles={}", a.cycles),
    ];
    let (code, events, stderr) = crate::bench::harness::run_host(&args)?;
    let cycles: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "rfc-cycle")
        .collect();
    let last = events.iter().find(|e| e["event"] == "rfc-stage2");
    let failed = events
        .iter()
        .find(|e| e["event"] == "rfc-failed" || e["event"] == "rfc-aborted");
    let mut per: Vec<Value> = cycles
        .iter()
        .map(|c| json!({ "cycle": c["cycle"], "ok": c["ok"], "blackout_us": c["blackout_us"], "frames_used": c["frames_used"], "rss_kib": c["rss_kib"] }))
        .collect();
    if let Some(l) = last {
        per.push(json!({ "cycle": l["cycle"], "ok": l["ok"], "blackout_us": l["blackout_us"], "frames_used": Value::Null, "rss_kib": Value::Null }));
    }
    let completed = per.iter().filter(|c| c["ok"] == true).count() as u32;
    let frames: Vec<u64> = cycles
        .iter()
        .filter_map(|c| c["frames_used"].as_u64())
        .collect();
    let leaked = match (frames.iter().min(), frames.iter().max()) {
        (Some(lo), Some(hi)) => hi - lo,
        _ => 0,
    };
    let rss: Vec<u64> = cycles
        .iter()
        .filter_map(|c| c["rss_kib"].as_u64())
        .collect();
    let blackouts: Vec<f64> = per
        .iter()
        .filter_map(|c| c["blackout_us"].as_f64())
        .collect();
    let b = crate::bench::Spread::of(&blackouts);
    let failures = a.cycles - completed;
    let ok = code == 0 && failures == 0 && leaked == 0;
    let out = json!({
        "ok": ok,
        "cycles": a.cycles,
        "completed": completed,
        "failures": failures,
        "leaked_frames": leaked,
        "frames_used_each_cycle": frames,
        "rss_kib_first": rss.first(),
        "rss_kib_last": rss.last(),
        "rss_kib_max": rss.iter().max(),
        "blackout_us": b,
        "error": failed.map(|f| f["error"].clone().to_string()),
        "per_cycle": per,
    });
    if a.json {
        println!("{out}");
    } else {
        println!(
            "soak: {} live updates of one running guest ({} of {} written and checked each cycle)",
            a.cycles,
            crate::bench::blackout::human(a.data),
            crate::bench::blackout::human(a.guest_mem)
        );
        println!(
            "  completed  {completed} of {}, failures {failures}",
            a.cycles
        );
        println!(
            "  frames     {} used after every cycle; leaked {leaked}",
            frames.first().map_or("-".into(), |f| f.to_string())
        );
        println!(
            "  host RSS   {} KiB first, {} KiB last, {} KiB max",
            out["rss_kib_first"], out["rss_kib_last"], out["rss_kib_max"]
        );
        println!(
            "  blackout   median {:.2} ms [{:.2}..{:.2}]",
            b.median / 1e3,
            b.min / 1e3,
            b.max / 1e3
        );
        if !ok {
            println!("  FAILED: exit {code}; {}", out["error"]);
            if let Some(l) = stderr.lines().rev().find(|l| l.contains("ERROR")) {
                println!("  {l}");
            }
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
