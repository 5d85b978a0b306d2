//! Helpers for scenario tests that run real host images (`handover boot`) through kexecs.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

pub struct Run {
    pub code: i32,
    pub events: Vec<Value>,
    pub stderr: String,
    pub dir: PathBuf,
}

impl Run {
    pub fn events(&self, name: &str) -> Vec<&Value> {
        self.events.iter().filter(|e| e["event"] == name).collect()
    }
    pub fn one(&self, name: &str) -> &Value {
        let v = self.events(name);
        assert_eq!(
            v.len(),
            1,
            "expected one {name} event, got {v:?}\nstderr:\n{}",
            self.stderr
        );
        v[0]
    }
}

pub fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "handover-test-{tag}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// Run `handover boot --init NAME` with init args, collecting the JSON-lines report.
pub fn boot(tag: &str, ram: &str, init: &str, init_args: &[&str], extra: &[&str]) -> Run {
    let dir = tempdir(tag);
    let report = dir.join("report.jsonl");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_handover"));
    cmd.args(["boot", "--ram", ram, "--init", init, "--report"])
        .arg(&report);
    for a in init_args {
        cmd.args(["--init-arg", a]);
    }
    cmd.args(extra);
    cmd.current_dir(&dir);
    let out = cmd.output().expect("run handover");
    let text = std::fs::read_to_string(&report).unwrap_or_default();
    let events = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("report line is JSON"))
        .collect();
    Run {
        code: out.status.code().unwrap_or(-1),
        events,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        dir,
    }
}
