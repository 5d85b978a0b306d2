//! `handover bench` without a subcommand: the blackout sweep, its verdicts, table, CSV and plot.

use std::process::ExitCode;

use serde_json::{json, Value};

use super::bench::BlackoutArgs;
use crate::bench::blackout::{self, human, Fill, Kind, Plan, Point};

/// The plan the options ask for.
pub(super) fn plan(a: &BlackoutArgs) -> Plan {
    let mut p = if a.quick { Plan::quick() } else { Plan::full() };
    if let Some(r) = a.runs {
        p.runs = r.max(1);
    }
    if let Some(r) = a.baseline_runs {
        p.baseline_runs = r.max(1);
    }
    if let Some(s) = &a.sizes {
        p.sizes = s.iter().copied().filter(|&x| x > 0).collect();
    }
    if let Some(s) = &a.sparse {
        p.sparse = s.iter().copied().filter(|&x| x > 0).collect();
    }
    if let Some(s) = &a.fragmented {
        p.fragmented = s.iter().copied().filter(|&x| x > 0).collect();
    }
    if let Some(s) = &a.metadata_only {
        p.metadata_only = s.iter().copied().filter(|&x| x > 0).collect();
    }
    if let Some(m) = a.baseline_max {
        p.baseline_max = m;
    }
    if let Some(m) = a.live_snapshot_max {
        p.live_snapshot_max = m;
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

/// The p50 blackout of a baseline of `kind` at `size`, if measured.
fn baseline_for(points: &[Point], kind: Kind, size: u64) -> Option<f64> {
    points
        .iter()
        .find(|p| p.kind == kind && p.guest_bytes == size && p.blackout_us.median > 0.0)
        .map(|p| p.blackout_us.median)
}

/// One verdict: the target, the figure it was judged on, and met or not.
fn verdict(target: &str, value: f64, unit: &str, met: bool) -> Value {
    json!({ "target": target, "value": value, "unit": unit, "met": met })
}

/// The targets, judged on the points measured (a target whose points are missing is
/// not judged).
pub(super) fn targets(points: &[Point]) -> Vec<Value> {
    let ok = |p: &&Point| p.blackout_us.n > 0;
    let live = |fill: Fill| {
        points
            .iter()
            .filter(move |p| {
                p.kind == Kind::LiveV2 && p.fill == fill && p.slot_bytes == p.guest_bytes
            })
            .filter(ok)
    };
    let at = |fill: Fill, s: u64| live(fill).find(|p| p.guest_bytes == s);
    let gib = 1u64 << 30;
    let mut t = Vec::new();
    // p99 <= 10 ms at every written size up to 16 GiB and every sparse size up to 1 TiB.
    for (fill, max) in [(Fill::Written, 16 * gib), (Fill::Sparse, 1 << 40)] {
        let pts: Vec<&Point> = live(fill).filter(|p| p.guest_bytes <= max).collect();
        if let Some(worst) = pts
            .iter()
            .max_by(|a, b| a.blackout_us.p99.total_cmp(&b.blackout_us.p99))
        {
            t.push(verdict(
                &format!(
                    "blackout p99 <= 10 ms at every {} size up to {} (worst: {})",
                    fill.name(),
                    human(max),
                    human(worst.guest_bytes)
                ),
                worst.blackout_us.p99 / 1e3,
                "ms",
                worst.blackout_us.p99 <= 10_000.0,
            ));
        }
    }
    if let Some(small) = at(Fill::Written, 16 << 20) {
        let worst = points
            .iter()
            .filter(|p| matches!(p.kind, Kind::LiveV2) && p.slot_bytes == p.guest_bytes)
            .filter(ok)
            .map(|p| p.blackout_us.p99)
            .fold(0.0, f64::max);
        let r = worst / small.blackout_us.median;
        t.push(verdict(
            "blackout p99 at any size <= 2x p50 at 16 MiB",
            r,
            "x",
            r <= 2.0,
        ));
    }
    if let Some(p) = at(Fill::Written, 16 * gib) {
        t.push(verdict(
            "blackout p50 <= 2 ms at 16 GiB written",
            p.blackout_us.median / 1e3,
            "ms",
            p.blackout_us.median <= 2_000.0,
        ));
        let gibs = 16.0 / (p.preserve_us.median / 1e6);
        t.push(verdict(
            "preserve >= 200 GiB/s at 16 GiB",
            gibs,
            "GiB/s",
            gibs >= 200.0,
        ));
        let kib = p.handover_bytes.median / 1024.0 / 16.0;
        t.push(verdict(
            "handover metadata <= 64 KiB per GiB at 16 GiB",
            kib,
            "KiB/GiB",
            kib <= 64.0,
        ));
        if let Some(fr) = at(Fill::Fragmented, 16 * gib) {
            let kib = fr.handover_bytes.median / 1024.0 / 16.0;
            t.push(verdict(
                "handover metadata <= 64 KiB per GiB at 16 GiB fragmented",
                kib,
                "KiB/GiB",
                kib <= 64.0,
            ));
            let r = fr.blackout_us.median / p.blackout_us.median;
            t.push(verdict(
                "blackout p50 at 16 GiB fragmented within 2x of contiguous",
                r,
                "x",
                r <= 2.0,
            ));
        }
    }
    // Against each baseline, at the largest written size both measured (reported: the ratio
    // of p50s; met when live update's blackout is the shorter).
    for kind in [Kind::LiveSnapshot, Kind::Snapshot] {
        let best = live(Fill::Written)
            .filter_map(|p| baseline_for(points, kind, p.guest_bytes).map(|b| (p, b)))
            .max_by_key(|(p, _)| p.guest_bytes);
        if let Some((p, b)) = best {
            let r = b / p.blackout_us.median;
            t.push(verdict(
                &format!(
                    "blackout p50 of {} / live update at {} (reported)",
                    kind.name(),
                    human(p.guest_bytes)
                ),
                r,
                "x",
                r >= 1.0,
            ));
        }
    }
    t
}

/// Write blackout.svg (and a PNG where a converter exists) into `dir`.
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

/// `handover bench`: the sweep; exit 1 if a point had a failed run.
pub(super) fn sweep(a: BlackoutArgs) -> Result<ExitCode, String> {
    if let Some(j) = &a.replot {
        let text =
            std::fs::read_to_string(j).map_err(|e| format!("cannot read {}: {e}", j.display()))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", j.display()))?;
        let points: Vec<Point> = serde_json::from_value(v["points"].clone())
            .map_err(|e| format!("{}: points: {e}", j.display()))?;
        // The verdicts again, from the saved points (a fix of a target applies to old runs).
        let targets = targets(&points);
        if a.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&targets).map_err(|e| e.to_string())?
            );
        } else {
            let plan = Plan {
                runs: v["runs_per_point"].as_u64().unwrap_or(0) as usize,
                baseline_runs: v["runs_per_baseline_point"].as_u64().unwrap_or(0) as usize,
                ..Plan::full()
            };
            print_table(&points, &targets, &plan);
        }
        if let Some(dir) = &a.plot {
            write_plot(dir, &points)?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    if !crate::vmm::libkvm::kvm_available("handover bench") {
        return Err("the blackout benchmark needs /dev/kvm".into());
    }
    let plan = plan(&a);
    let pts = plan.points();
    let total: usize = pts.iter().map(|p| plan.runs_of(p.kind)).sum();
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let mut points = Vec::new();
    for spec in pts {
        let mut runs = Vec::new();
        let label = format!(
            "{} {} {}",
            spec.kind.name(),
            human(spec.size),
            spec.fill.name()
        );
        for i in 0..plan.runs_of(spec.kind) {
            bar.set_message(format!("{label} run {}", i + 1));
            let r = blackout::run_one_seeded(spec, &plan, i as u64 + 1);
            if let Some(e) = &r.error {
                bar.println(format!("{label}: run {} failed: {e}", i + 1));
            }
            runs.push(r);
            bar.inc(1);
        }
        points.push(blackout::summarize(spec, runs));
    }
    bar.finish_and_clear();

    let targets = targets(&points);
    let sizes: Vec<Value> = points
        .iter()
        .filter(|p| p.kind == Kind::LiveV2)
        .map(|p| {
            let base = baseline_for(&points, Kind::Snapshot, p.guest_bytes);
            let live_snap = baseline_for(&points, Kind::LiveSnapshot, p.guest_bytes);
            json!({
                "guest_bytes": p.guest_bytes,
                "fill": p.fill,
                "metadata_only": p.slot_bytes < p.guest_bytes,
                "blackout_us": p.blackout_us.median,
                "blackout_p99_us": p.blackout_us.p99,
                "blackout_max_us": p.blackout_us.max,
                "baseline_blackout_us": base,
                "ratio": base.map(|b| b / p.blackout_us.median),
                "live_snapshot_blackout_us": live_snap,
                "live_snapshot_ratio": live_snap.map(|b| b / p.blackout_us.median),
                "handover_bytes": p.handover_bytes.median,
                "preserve_us": p.preserve_us.median,
                "retrieve_us": p.retrieve_us.median,
                "touch_before_us": p.touch_before_us.median,
                "touch_after_us": p.touch_after_us.median,
            })
        })
        .collect();
    let out = json!({
        "machine": { "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0), "kernel": kernel_release() },
        "runs_per_point": plan.runs,
        "runs_per_baseline_point": plan.baseline_runs,
        "sizes": sizes,
        "targets": targets,
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
        print_csv(&points);
    } else {
        print_table(&points, &targets, &plan);
    }
    let all_ok = points.iter().all(|p| p.runs.iter().all(|r| r.ok));
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The machine's kernel release.
pub(super) fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn print_csv(points: &[Point]) {
    println!("kind,fill,guest_bytes,slot_bytes,runs_ok,blackout_p50_us,blackout_p99_us,blackout_min_us,blackout_max_us,preserve_p50_us,retrieve_p50_us,handover_bytes,touch_before_p50_us,touch_after_p50_us");
    for p in points {
        println!(
            "{},{},{},{},{},{:.0},{:.0},{:.0},{:.0},{:.1},{:.1},{:.0},{:.0},{:.0}",
            p.kind.name(),
            p.fill.name(),
            p.guest_bytes,
            p.slot_bytes,
            p.blackout_us.n,
            p.blackout_us.median,
            p.blackout_us.p99,
            p.blackout_us.min,
            p.blackout_us.max,
            p.preserve_us.median,
            p.retrieve_us.median,
            p.handover_bytes.median,
            p.touch_before_us.median,
            p.touch_after_us.median,
        );
    }
}

fn print_table(points: &[Point], targets: &[Value], plan: &Plan) {
    println!(
        "blackout sweep, {} runs per live point, {} per baseline point; times in ms",
        plan.runs, plan.baseline_runs
    );
    println!(
        "{:10} {:>9} {:9} {:>24} {:>10} {:>10} {:>19}  phases inside the blackout (p50 us)",
        "kind",
        "guest",
        "fill",
        "blackout p50/p99/max",
        "handover",
        "retrieve",
        "touch before/after"
    );
    for p in points {
        let ok = p.blackout_us.n;
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
        let b = &p.blackout_us;
        let live = !matches!(p.kind, Kind::Snapshot | Kind::LiveSnapshot);
        println!(
            "{:10} {:>9} {:9} {:>24} {:>10} {:>10} {:>19}  {}{}",
            p.kind.name(),
            size,
            p.fill.name(),
            format!(
                "{:.2} / {:.2} / {:.2}",
                b.median / 1e3,
                b.p99 / 1e3,
                b.max / 1e3
            ),
            if live {
                format!("{:.0} KiB", p.handover_bytes.median / 1024.0)
            } else {
                "-".into()
            },
            if live {
                format!("{:.2}", p.retrieve_us.median / 1e3)
            } else {
                "-".into()
            },
            format!(
                "{:.1} / {:.1}",
                p.touch_before_us.median / 1e3,
                p.touch_after_us.median / 1e3
            ),
            phases,
            if ok < p.runs.len() {
                format!("  ({} of {} runs failed)", p.runs.len() - ok, p.runs.len())
            } else {
                String::new()
            }
        );
    }
    if points.iter().any(|p| p.slot_bytes < p.guest_bytes) {
        println!("* metadata-only: the whole guest_memfd is allocated, preserved and handed over; the guest's memslots cover the first 16 GiB");
    }
    for t in targets {
        println!(
            "target: {}: {} ({:.2} {})",
            t["target"].as_str().unwrap_or(""),
            if t["met"] == true { "met" } else { "MISSED" },
            t["value"].as_f64().unwrap_or(0.0),
            t["unit"].as_str().unwrap_or(""),
        );
    }
}
