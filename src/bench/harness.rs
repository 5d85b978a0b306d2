//! Host images as child processes: what the benchmarks and the `demo` and `soak` commands run.

use std::process::Command;

use serde_json::Value;

/// Run `handover boot ARGS` as a child host image (this process's own binary, which must be
/// `handover`) and collect its exit status, its JSON-lines report and its stderr.
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
