//! What the tests of external VMMs share (`vmm_external.rs`, `vmm_kill.rs`,
//! `vmm_rust_example.rs`): the C VMM's build, the guest images from `handover guest-image`, the
//! KVM skip rule, and runs of `handover run` with a deadline, captured output and the report.
#![allow(dead_code)]

use std::fs::File;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

#[path = "../common/mod.rs"]
mod common;

/// The longest one run may take before it counts as hung.
pub const DEADLINE: Duration = Duration::from_secs(120);

/// The frame size of the host's RAM.
pub const FRAME: u64 = 4096;

pub fn sources() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vmm")
}

/// A fresh directory for one test (see `common::test_dir`).
pub fn test_dir(test: &str) -> PathBuf {
    common::test_dir("vmm", test)
}

/// Compile the C VMM (`tests/vmm/*.c`, main in `rfc_vmm.c`) into `dir/rfc_vmm` with
/// `cc -O1 -Wall -Werror` (the benchmark's own build, `bench::external::build_vmm`).
pub fn compile(dir: &Path) -> PathBuf {
    handover::bench::external::build_vmm(dir, &["-O1", "-Wall", "-Werror"])
        .unwrap_or_else(|e| panic!("{e}"))
}

/// `handover ARGS`, which must succeed; its stdout.
pub fn handover(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_handover"))
        .args(args)
        .output()
        .expect("run handover");
    assert!(
        out.status.success(),
        "handover {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// The guest's two images in `dir`: (write, verify), for 5 MiB at 4 GiB.
pub fn images(dir: &Path) -> (PathBuf, PathBuf) {
    let w = dir.join("write.img");
    let v = dir.join("verify.img");
    for (path, mode) in [(&w, "write"), (&v, "verify")] {
        let p = path.to_str().expect("UTF-8 path");
        handover(&[
            "guest-image",
            "--out",
            p,
            "--mode",
            mode,
            "--data-gpa",
            "0x100000000",
            "--data-len",
            "5M",
        ]);
    }
    (w, v)
}

/// Whether `/dev/kvm` can be used; a loud skip when not, a failure with HANDOVER_REQUIRE_KVM=1.
pub fn kvm_or_skip(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            if std::env::var("HANDOVER_REQUIRE_KVM").as_deref() == Ok("1") {
                panic!("{test}: /dev/kvm is required (HANDOVER_REQUIRE_KVM=1) but cannot be opened: {e}");
            }
            // Straight to fd 2: libtest captures `eprintln!` of passing tests, and a skip must
            // be seen.
            let _ = writeln!(
                std::io::stderr().lock(),
                "SKIP: /dev/kvm not available ({e}); {test} did not run (set HANDOVER_REQUIRE_KVM=1 to fail instead)"
            );
            false
        }
    }
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// What one run did.
pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub report: Vec<Value>,
}

impl Run {
    /// Everything a failed assertion should show.
    pub fn dump(&self) -> String {
        format!(
            "status: {:?}\n--- stdout:\n{}\n--- stderr:\n{}\n--- report:\n{}",
            self.status,
            self.stdout,
            self.stderr,
            self.report
                .iter()
                .map(|v| v.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        )
    }

    pub fn assert_success(&self, what: &str) {
        assert_eq!(
            self.status.code(),
            Some(0),
            "{what} did not exit 0\n{}",
            self.dump()
        );
    }

    /// How many lines of stdout are exactly `line`.
    pub fn lines_eq(&self, line: &str) -> usize {
        self.stdout.lines().filter(|l| *l == line).count()
    }

    /// How many lines of stdout start with `prefix`.
    pub fn lines_starting(&self, prefix: &str) -> usize {
        self.stdout
            .lines()
            .filter(|l| l.starts_with(prefix))
            .count()
    }

    /// The one line of stdout that starts with `prefix`.
    pub fn line_starting(&self, prefix: &str) -> &str {
        let v: Vec<&str> = self
            .stdout
            .lines()
            .filter(|l| l.starts_with(prefix))
            .collect();
        assert_eq!(v.len(), 1, "want one line {prefix:?}...\n{}", self.dump());
        v[0]
    }

    /// The report's events called `name`.
    pub fn events(&self, name: &str) -> Vec<&Value> {
        self.report.iter().filter(|v| v["event"] == name).collect()
    }

    /// The one `run-halt` line, which the host writes after every process has exited.
    pub fn run_halt(&self) -> &Value {
        let halts = self.events("run-halt");
        assert_eq!(halts.len(), 1, "want one run-halt line\n{}", self.dump());
        halts[0]
    }

    /// Nothing leaked: no host file is still open and no outgoing session is left.
    pub fn assert_clean_halt(&self) {
        let halt = self.run_halt();
        assert_eq!(
            halt["open_files"],
            0,
            "host files left open at run-halt: {halt}\n{}",
            self.dump()
        );
        assert_eq!(
            halt["outgoing_sessions"],
            0,
            "outgoing sessions left at run-halt: {halt}\n{}",
            self.dump()
        );
    }

    /// A `u64` of the run-halt line's `status` (e.g. `["frames", "used"]`).
    pub fn halt_status(&self, path: &[&str]) -> u64 {
        let mut v = &self.run_halt()["status"];
        for p in path {
            v = &v[*p];
        }
        v.as_u64()
            .unwrap_or_else(|| panic!("run-halt status.{path:?} is not a number\n{}", self.dump()))
    }
}

/// A run under way: its process group, where its output goes, since when it runs.
pub struct Running {
    child: Child,
    pgid: i32,
    start: Instant,
    cmd: String,
    out_path: PathBuf,
    err_path: PathBuf,
    report: Option<PathBuf>,
}

impl Running {
    /// Start `cmd` in `dir` in its own process group, stdout and stderr captured to files named
    /// after `tag`; `report` is the JSON-lines file it writes, if any.
    pub fn start(dir: &Path, tag: &str, mut cmd: Command, report: Option<&Path>) -> Running {
        let out_path = dir.join(format!("{tag}.stdout"));
        let err_path = dir.join(format!("{tag}.stderr"));
        cmd.current_dir(dir)
            .stdin(Stdio::null())
            .stdout(File::create(&out_path).expect("stdout file"))
            .stderr(File::create(&err_path).expect("stderr file"))
            // Its own process group, so a hang can be ended whole.
            .process_group(0);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        Running {
            pgid: child.id() as i32,
            child,
            start: Instant::now(),
            cmd: format!("{cmd:?}"),
            out_path,
            err_path,
            report: report.map(Path::to_path_buf),
        }
    }

    /// The run's process group (its leader's pid): `handover run` and every program it starts.
    pub fn pgid(&self) -> i32 {
        self.pgid
    }

    fn output(&self) -> (String, String) {
        (
            std::fs::read_to_string(&self.out_path).unwrap_or_default(),
            std::fs::read_to_string(&self.err_path).unwrap_or_default(),
        )
    }

    /// Kill the whole run and fail with its output so far.
    fn hung(&mut self, what: &str) -> ! {
        // SAFETY: kill(2) touches no memory; the leader is not reaped yet, so the group id is
        // still the one this test created.
        unsafe { libc::kill(-self.pgid, libc::SIGKILL) };
        let _ = self.child.wait();
        let (out, err) = self.output();
        panic!(
            "{}: {what}: killed after {:?}\n--- stdout:\n{out}\n--- stderr:\n{err}",
            self.cmd,
            self.start.elapsed()
        );
    }

    /// The first stdout line that starts with `prefix`, waiting for it up to `timeout`; the run
    /// must not end before.
    pub fn wait_for_line(&mut self, prefix: &str, timeout: Duration) -> String {
        let until = Instant::now() + timeout;
        loop {
            let (out, _) = self.output();
            if let Some(l) = out.lines().find(|l| l.starts_with(prefix)) {
                // Only a whole line counts.
                if out.contains(&format!("{l}\n")) {
                    return l.to_string();
                }
            }
            if let Some(st) = self.child.try_wait().expect("wait for the run") {
                let (out, err) = self.output();
                panic!(
                    "{}: ended ({st}) before printing {prefix:?}\n--- stdout:\n{out}\n--- stderr:\n{err}",
                    self.cmd
                );
            }
            if Instant::now() > until {
                self.hung(&format!("no line {prefix:?} within {timeout:?}"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Wait for the run to end (within [`DEADLINE`] of its start) and collect what it did.
    pub fn wait(mut self) -> Run {
        let status = loop {
            if let Some(st) = self.child.try_wait().expect("wait for the run") {
                break st;
            }
            if self.start.elapsed() > DEADLINE {
                self.hung("hung");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let leftovers = group_outlives(self.pgid);
        let (stdout, stderr) = self.output();
        let run = Run {
            status,
            stdout,
            stderr,
            report: self
                .report
                .as_ref()
                .map(|r| std::fs::read_to_string(r).unwrap_or_default())
                .unwrap_or_default()
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| {
                    serde_json::from_str(l).unwrap_or_else(|e| panic!("report line {l:?}: {e}"))
                })
                .collect(),
        };
        assert!(
            !leftovers,
            "processes of the run were still alive 2 s after its leader exited (killed now)\n{}",
            run.dump()
        );
        run
    }
}

/// Run `cmd` in `dir` to its end, with a deadline (see [`Running::start`]).
pub fn run_with_deadline(dir: &Path, tag: &str, cmd: Command, report: Option<&Path>) -> Run {
    Running::start(dir, tag, cmd, report).wait()
}

/// Whether members of process group `pgid` were still alive 2 s after its leader exited;
/// if so they are killed. The group's id cannot be taken by another group while it has members.
fn group_outlives(pgid: i32) -> bool {
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        // SAFETY: signal 0 only asks whether the group has members.
        if unsafe { libc::kill(-pgid, 0) } != 0 {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill(2) touches no memory; the group still has members, so it is still ours.
    let killed = unsafe { libc::kill(-pgid, libc::SIGKILL) };
    killed == 0
}

/// `handover run --ram 1G --kexecs 0 --report DIR/TAG.report.jsonl -- PROGRAM ARGS`, and the
/// report's path.
pub fn handover_run(dir: &Path, tag: &str, program: &Path, args: &[&str]) -> (Command, PathBuf) {
    let report = dir.join(format!("{tag}.report.jsonl"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_handover"));
    cmd.args(["run", "--ram", "1G", "--kexecs", "0"])
        .arg("--report")
        .arg(&report)
        .arg("--")
        .arg(program)
        .args(args);
    (cmd, report)
}

/// `rfc_vmm ARGS` directly on this machine's kernel.
pub fn rfc_vmm(dir: &Path, tag: &str, bin: &Path, args: &[&str]) -> Run {
    let mut cmd = Command::new(bin);
    cmd.args(args);
    run_with_deadline(dir, tag, cmd, None)
}

/// `PROGRAM ARGS` under `handover run --ram 1G --kexecs 0`, to its end.
pub fn under_handover(dir: &Path, tag: &str, program: &Path, args: &[&str]) -> Run {
    let (cmd, report) = handover_run(dir, tag, program, args);
    run_with_deadline(dir, tag, cmd, Some(&report))
}

/// The host's frame counts at the end of a trivial run (`/bin/true`) with the same `--ram`:
/// (frames used, of which the KHO tracker's nodes).
pub fn baseline_frames(dir: &Path) -> (u64, u64) {
    let r = under_handover(dir, "baseline", Path::new("/bin/true"), &[]);
    r.assert_success("handover run -- /bin/true");
    r.assert_clean_halt();
    (
        r.halt_status(&["frames", "used"]),
        r.halt_status(&["tracker_bytes"]) / FRAME,
    )
}
