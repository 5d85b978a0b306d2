//! Helpers for scenario tests that run real host images (`handover boot`) through kexecs.
#![allow(dead_code)]

use std::io::ErrorKind;
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

/// A fresh directory for one test, named after its file's `group` and the test (kept when the
/// test fails; the test removes it when it passes).
pub fn test_dir(group: &str, test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("handover-{group}-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the test directory");
    dir
}

/// `cc ARGS`; panics loudly if there is no `cc` (`what` says which tests need it).
pub fn cc(args: &[&std::ffi::OsStr], what: &str) -> std::process::Output {
    match Command::new("cc").args(args).output() {
        Ok(out) => out,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            panic!("cc not found: {what} compile C programs with cc (install gcc)")
        }
        Err(e) => panic!("cannot run cc: {e}"),
    }
}

/// Run `handover boot --init NAME` with init args, collecting the JSON-lines report.
pub fn boot(tag: &str, ram: &str, init: &str, init_args: &[&str], extra: &[&str]) -> Run {
    boot_env(tag, ram, init, init_args, extra, &[])
}

/// [`boot`] with environment variables for the host image (`HANDOVER_FAIL`, `HANDOVER_CORRUPT`).
pub fn boot_env(
    tag: &str,
    ram: &str,
    init: &str,
    init_args: &[&str],
    extra: &[&str],
    env: &[(&str, &str)],
) -> Run {
    let dir = tempdir(tag);
    let report = dir.join("report.jsonl");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_handover"));
    cmd.args(["boot", "--ram", ram, "--init", init, "--report"])
        .arg(&report);
    for a in init_args {
        cmd.args(["--init-arg", a]);
    }
    cmd.args(extra);
    cmd.envs(env.iter().copied());
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

/// A run whose handover had a bit flipped in one kind of blob (`HANDOVER_CORRUPT=flip:KIND`):
/// the flip happened, nothing panicked, the next image refused the handover by checksum (or,
/// for the tracker, by its walk's own checks) and rolled back.
pub fn assert_refused_by_checksum(r: &Run, kind: &str) {
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    assert!(
        r.stderr.contains("flipped a bit"),
        "{kind}: not flipped:\n{}",
        r.stderr
    );
    let f = r.one("rfc-failed");
    let why = f["error"].as_str().unwrap_or("");
    let walk = kind == "tracker" && (why.contains("tracker") || why.contains("preserved block"));
    assert!(why.contains("checksum") || walk, "{kind}: {why}");
    assert!(r.stderr.contains("rollback"), "{kind}: {}", r.stderr);
}
