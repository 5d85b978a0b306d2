//! Ordinary Linux programs on the host: `handover run` boots a host image and runs a
//! dynamically linked program as one of its processes, forwarding its calls on host objects
//! (`/dev/liveupdate`, memfds, their mappings, `fork`, `reboot`) to the host. These tests compile
//! the C programs in `tests/userspace/` with `cc` and run them, and the Python one with
//! `python3`, before, across and after live updates. They need no `/dev/kvm`.
//!
//! Each run has a deadline: a hang kills the run's process group and fails the test. Outputs,
//! binaries and reports go to a directory of their own (kept when a test fails).

use std::fs::File;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
use common::cc;

fn test_dir(test: &str) -> PathBuf {
    common::test_dir("userspace", test)
}

/// The longest a `handover run` may take before it counts as hung.
const DEADLINE: Duration = Duration::from_secs(120);

fn sources() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/userspace")
}

/// Compile `tests/userspace/<name>.c` into `dir/<name>` with `cc -O1 -Wall -Werror`.
fn compile(dir: &Path, name: &str) -> PathBuf {
    let out = dir.join(name);
    let src = sources().join(format!("{name}.c"));
    let r = cc(
        &[
            "-O1".as_ref(),
            "-Wall".as_ref(),
            "-Werror".as_ref(),
            "-o".as_ref(),
            out.as_os_str(),
            src.as_os_str(),
        ],
        "the userspace tests",
    );
    assert!(
        r.status.success(),
        "cc {name}.c failed:\n{}",
        String::from_utf8_lossy(&r.stderr)
    );
    out
}

/// What one `handover run` did.
struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    report: Vec<Value>,
}

impl Run {
    fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Everything a failed assertion should show.
    fn dump(&self) -> String {
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

    fn assert_success(&self, what: &str) {
        assert_eq!(
            self.code(),
            Some(0),
            "{what} did not exit 0\n{}",
            self.dump()
        );
    }

    /// The one `run-halt` line, which the host writes after every process has exited.
    fn run_halt(&self) -> &Value {
        let halts: Vec<&Value> = self
            .report
            .iter()
            .filter(|v| v["event"] == "run-halt")
            .collect();
        assert_eq!(halts.len(), 1, "want one run-halt line\n{}", self.dump());
        halts[0]
    }

    /// Nothing leaked: no host file is still open and no outgoing session is left.
    fn assert_clean_halt(&self) {
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

    /// How many lines of stdout are exactly `line`.
    fn lines_eq(&self, line: &str) -> usize {
        self.stdout.lines().filter(|l| *l == line).count()
    }
}

/// `handover run --ram 512M --kexecs N --report F -- PROGRAM ARGS` in `dir`, with stdout and
/// stderr captured to files (a daemon holding a pipe cannot stall the test) and a deadline.
fn handover_run(dir: &Path, tag: &str, kexecs: u32, program: &Path, args: &[&str]) -> Run {
    let report = dir.join(format!("{tag}.report.jsonl"));
    let out_path = dir.join(format!("{tag}.stdout"));
    let err_path = dir.join(format!("{tag}.stderr"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_handover"));
    cmd.args(["run", "--ram", "512M", "--kexecs", &kexecs.to_string()])
        .arg("--report")
        .arg(&report)
        .arg("--")
        .arg(program)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).expect("stdout file"))
        .stderr(File::create(&err_path).expect("stderr file"))
        // Its own process group, so a hang can be ended whole.
        .process_group(0);
    let mut child = cmd.spawn().expect("spawn handover run");
    let pgid = child.id() as i32;
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for handover run") {
            break st;
        }
        if start.elapsed() > DEADLINE {
            // SAFETY: kill(2) touches no memory; the leader is not reaped yet, so the group
            // id is still the one this test created.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            let _ = child.wait();
            panic!(
                "handover run -- {} {args:?} hung: killed after {DEADLINE:?}\n--- stdout:\n{}\n--- stderr:\n{}",
                program.display(),
                std::fs::read_to_string(&out_path).unwrap_or_default(),
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let leftovers = group_outlives(pgid);
    let run = Run {
        status,
        stdout: std::fs::read_to_string(&out_path).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err_path).unwrap_or_default(),
        report: std::fs::read_to_string(&report)
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("report line {l:?}: {e}")))
            .collect(),
    };
    assert!(
        !leftovers,
        "processes of the run were still alive 2 s after handover exited (killed now)\n{}",
        run.dump()
    );
    run
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

#[test]
fn luo_api_cases_pass() {
    let dir = test_dir("luo_api");
    let bin = compile(&dir, "luo_api");
    let r = handover_run(&dir, "luo_api", 0, &bin, &[]);
    assert!(
        !r.stdout.lines().any(|l| l.starts_with("not ok")),
        "luo_api: a case failed\n{}",
        r.dump()
    );
    r.assert_success("luo_api");
    let plan: usize = r
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("1.."))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("luo_api printed no plan\n{}", r.dump()));
    let oks = r.stdout.lines().filter(|l| l.starts_with("ok ")).count();
    assert_eq!(oks, plan, "luo_api: a case reported nothing\n{}", r.dump());
    for skipped in r.stdout.lines().filter(|l| l.contains("# SKIP")) {
        eprintln!("luo_api: {skipped}");
    }
    r.assert_clean_halt();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn luo_two_stage_carries_every_memfd_shape() {
    let dir = test_dir("luo_two_stage");
    let bin = compile(&dir, "luo_two_stage");
    let r = handover_run(&dir, "luo_two_stage", 1, &bin, &[]);
    r.assert_success("luo_two_stage");
    assert_eq!(
        r.lines_eq("two-stage: stage 1 done, the daemon holds the sessions"),
        1,
        "stage 1 must run once\n{}",
        r.dump()
    );
    assert_eq!(
        r.lines_eq("two-stage: stage 2 ok"),
        1,
        "stage 2 did not pass\n{}",
        r.dump()
    );
    r.assert_clean_halt();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn luo_kill_leaves_nothing_and_reboot_updates() {
    let dir = test_dir("luo_kill");
    let bin = compile(&dir, "luo_kill");
    let r = handover_run(&dir, "luo_kill", 1, &bin, &["6"]);
    r.assert_success("luo_kill 6");
    let killed = r
        .stdout
        .lines()
        .filter(|l| l.starts_with("kill: child ") && l.ends_with("nothing left behind"))
        .count();
    assert_eq!(killed, 6, "six children killed in stage 1\n{}", r.dump());
    assert_eq!(
        r.lines_eq("kill: stage 2 ok"),
        1,
        "stage 2 did not pass\n{}",
        r.dump()
    );
    r.assert_clean_halt();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The Python interpreter's own path (not a wrapper script such as a pyenv shim), or `None`
/// with a loud skip; `HANDOVER_REQUIRE_PYTHON=1` turns the skip into a failure.
fn python() -> Option<PathBuf> {
    let required = std::env::var("HANDOVER_REQUIRE_PYTHON").is_ok_and(|v| v == "1");
    let found = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output();
    match found {
        Ok(out) if out.status.success() => {
            let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if path.is_file() {
                return Some(path);
            }
            assert!(!required, "python3 reports no usable sys.executable");
            eprintln!("SKIP: python3 reports no usable sys.executable");
            None
        }
        _ => {
            assert!(
                !required,
                "python3 is missing and HANDOVER_REQUIRE_PYTHON=1"
            );
            eprintln!("SKIP: python3 is missing: the Python live-update test did not run");
            None
        }
    }
}

fn python_two_stage(mode: &str) {
    let Some(py) = python() else { return };
    let dir = test_dir(&format!("python_{mode}"));
    let script = sources().join("two_stage.py");
    let script = script.to_str().expect("UTF-8 path");
    let r = handover_run(&dir, "two_stage_py", 1, &py, &[script, mode]);
    r.assert_success("two_stage.py");
    assert_eq!(
        r.lines_eq("python two-stage ok"),
        1,
        "stage 2 did not pass\n{}",
        r.dump()
    );
    r.assert_clean_halt();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn python_two_stage_with_a_daemon() {
    python_two_stage("daemon");
}

#[test]
fn python_two_stage_with_reboot() {
    python_two_stage("reboot");
}

#[test]
fn statically_linked_program_is_refused() {
    let dir = test_dir("static");
    let src = dir.join("static.c");
    std::fs::write(&src, "int main(void) { return 0; }\n").expect("write static.c");
    let bin = dir.join("static_prog");
    let r = cc(
        &[
            "-static".as_ref(),
            "-o".as_ref(),
            bin.as_os_str(),
            src.as_os_str(),
        ],
        "the userspace tests",
    );
    if !r.status.success() {
        eprintln!(
            "SKIP: cc -static failed (no static libc?); the refusal of static programs was not tested:\n{}",
            String::from_utf8_lossy(&r.stderr)
        );
        return;
    }
    let r = handover_run(&dir, "static", 0, &bin, &[]);
    assert!(
        r.code() != Some(0),
        "a statically linked program was run\n{}",
        r.dump()
    );
    assert!(
        r.status.signal().is_none(),
        "handover died of a signal\n{}",
        r.dump()
    );
    assert!(
        r.stderr.contains("statically linked"),
        "stderr does not say why\n{}",
        r.dump()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A TAP program's run: it passed, every check it planned reported `ok`, and the host was
/// left clean. Its `#` lines go to the test's output.
fn assert_tap(r: &Run, name: &str) {
    assert!(
        !r.stdout.lines().any(|l| l.starts_with("not ok")),
        "{name}: a check failed\n{}",
        r.dump()
    );
    r.assert_success(name);
    let plan: usize = r
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("1.."))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{name} printed no plan\n{}", r.dump()));
    let oks = r.stdout.lines().filter(|l| l.starts_with("ok ")).count();
    assert_eq!(oks, plan, "{name}: a check reported nothing\n{}", r.dump());
    for note in r.stdout.lines().filter(|l| l.starts_with('#')) {
        eprintln!("{name}: {note}");
    }
    r.assert_clean_halt();
}

#[test]
fn boundary_abuse_is_refused_and_leaves_nothing() {
    let dir = test_dir("boundary_abuse");
    let bin = compile(&dir, "boundary_abuse");
    let r = handover_run(&dir, "boundary_abuse", 0, &bin, &[]);
    assert_tap(&r, "boundary_abuse");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A software-protected VM's private guest_memfd from a C program with plain ioctls
/// (`tests/userspace/gmem_private.c`): a private page through mmap is SIGBUS, pages convert in
/// place with `KVM_SET_MEMORY_ATTRIBUTES2`, converting a page the program maps to private is
/// EAGAIN with `error_offset`, and bytes written while shared survive private and back.
#[test]
fn private_guest_memfd_from_a_program() {
    if !handover::vmm::libkvm::kvm_available("private_guest_memfd_from_a_program") {
        return;
    }
    let dir = test_dir("gmem_private");
    let bin = compile(&dir, "gmem_private");
    let r = handover_run(&dir, "gmem_private", 0, &bin, &[]);
    assert_tap(&r, "gmem_private");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `handover bench syscall`'s client is itself a program under `handover run` (this binary):
/// a small run of it measures every case, verifies what it wrote, and leaves no host file or
/// session behind.
#[test]
fn bench_syscall_client_runs_under_handover_run() {
    use handover::bench::syscall::{ClientReport, MemfdKind};
    let dir = test_dir("bench_syscall");
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_handover"));
    let args = [
        "bench",
        "syscall-client",
        "--iters",
        "200",
        "--runs",
        "2",
        "--size",
        "8M",
        "--block",
        "64K",
    ];
    let r = handover_run(&dir, "bench_syscall", 0, &bin, &args);
    r.assert_success("bench syscall-client");
    let c: ClientReport = serde_json::from_str(r.stdout.trim())
        .unwrap_or_else(|e| panic!("the client's JSON: {e}\n{}", r.dump()));
    assert_eq!(c.forwarded_ioctl.calls, 200);
    assert_eq!(c.preload_kernel_ioctl.calls, 200);
    assert!(c.forwarded_ioctl.p50_us > 0.0 && c.forwarded_ioctl.p50_us <= c.forwarded_ioctl.max_us);
    for k in [MemfdKind::Host, MemfdKind::Real] {
        let m: Vec<_> = c.mmap_runs.iter().filter(|x| x.kind == k).collect();
        assert_eq!(m.len(), 2, "{k:?} mapping runs\n{}", r.dump());
        // Every page was really written: one minor fault per 4 KiB page at least.
        assert!(m.iter().all(|x| x.minor_faults >= 2048), "{m:?}");
        assert_eq!(c.write_runs.iter().filter(|x| x.kind == k).count(), 2);
    }
    assert!(c.mmap_ratio_p50 > 0.0 && c.write_host_gb_s.p50 > 0.0);
    r.assert_clean_halt();
    let _ = std::fs::remove_dir_all(&dir);
}

/// `handover bench syscall --json` end to end, small: the in-process references, the client,
/// the three targets.
#[test]
fn bench_syscall_prints_its_report() {
    let dir = test_dir("bench_syscall_json");
    let out_path = dir.join("out.json");
    let mut child = Command::new(env!("CARGO_BIN_EXE_handover"))
        .args(["bench", "syscall", "--iters", "100", "--runs", "1"])
        .args(["--size", "4M", "--json"])
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).expect("stdout file"))
        .process_group(0)
        .spawn()
        .expect("spawn handover bench syscall");
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if start.elapsed() > DEADLINE {
            // SAFETY: kill(2) of the group this test made; its leader is not reaped yet.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            panic!("handover bench syscall hung: killed after {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = std::fs::read_to_string(&out_path).unwrap_or_default();
    assert!(status.success(), "bench syscall: {status:?}\n{text}");
    let b: handover::bench::syscall::SyscallBench =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(b.in_process_ioctl.calls, 100);
    assert_eq!(b.kernel_ioctl.calls, 100);
    assert_eq!(b.client.forwarded_ioctl.calls, 100);
    assert_eq!(b.targets.len(), 3);
    assert_eq!(b.client_command[1], "run");
    let _ = std::fs::remove_dir_all(&dir);
}
