//! `handover demo`: the main job. Boots a host image, runs a scenario through a real kexec
//! (`execve` of the host image with RAM inherited) and tells what happened.

use std::process::{Command, ExitCode};

use clap::Args;
use serde_json::{json, Value};

use crate::kexec::params::parse_size;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// RAM of the host image (sparse).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub ram: u64,
    /// Preserved memory carried through the kexec.
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    pub data: u64,
    /// Also write a dump of the handover here (decode it with `handover inspect`).
    #[arg(long)]
    pub dump: Option<std::path::PathBuf>,
}

/// Run `handover boot` as a child host image and collect its JSON-lines report.
pub fn run_host(args: &[String]) -> Result<(i32, Vec<Value>, String), String> {
    let dir = std::env::temp_dir().join(format!("handover-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let report = dir.join("report.jsonl");
    let _ = std::fs::remove_file(&report);
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
    let out = Command::new(exe)
        .arg("boot")
        .args(args)
        .arg("--report")
        .arg(&report)
        .output()
        .map_err(|e| format!("cannot start the host image: {e}"))?;
    let text = std::fs::read_to_string(&report).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    let events = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    Ok((
        out.status.code().unwrap_or(-1),
        events,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

fn find<'a>(events: &'a [Value], name: &str) -> Option<&'a Value> {
    events.iter().find(|e| e["event"] == name)
}

pub fn run(a: DemoArgs) -> Result<ExitCode, String> {
    let mut args = vec![
        "--ram".to_string(),
        a.ram.to_string(),
        "--init".into(),
        "kho-test".into(),
        "--init-arg".into(),
        format!("size={}", a.data),
        "--init-arg".into(),
        "kexecs=1".into(),
        "--liveupdate".into(),
        "off".into(),
    ];
    if let Some(d) = &a.dump {
        args.push("--dump-handover".into());
        args.push(d.display().to_string());
    }
    let (code, events, stderr) = run_host(&args)?;
    let pre = find(&events, "kho-test-preserved");
    let post = find(&events, "kho-test-restored");
    let ok = code == 0 && post.is_some();
    let verified = post.map_or(0, |p| p["verified_bytes"].as_u64().unwrap_or(0));
    let summary = json!({
        "ok": ok,
        "verified_bytes": verified,
        "preserved_bytes": pre.map_or(0, |p| p["bytes"].as_u64().unwrap_or(0)),
        "handover_tracker_bytes": pre.map_or(0, |p| p["status"]["tracker_bytes"].as_u64().unwrap_or(0)),
        "boot_us": post.map_or(0, |p| p["boot"]["boot_us"].as_u64().unwrap_or(0)),
        "kexec_count": post.map_or(0, |p| p["kexec_count"].as_u64().unwrap_or(0)),
    });
    if a.json {
        println!("{summary}");
    } else {
        println!(
            "handover demo: KHO carries {} MiB of folios through a kexec of the host image",
            a.data >> 20
        );
        if ok {
            println!("  verified     {verified} bytes, every byte as written before the kexec");
            println!(
                "  next image   booted in {} us (tracker walked, preserved frames reserved)",
                summary["boot_us"]
            );
            println!(
                "  tracker      {} KiB of radix-tree nodes",
                summary["handover_tracker_bytes"].as_u64().unwrap_or(0) >> 10
            );
        } else {
            println!("  FAILED (exit {code}); host image log:\n{stderr}");
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
