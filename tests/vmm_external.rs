//! A VMM written in C, outside this crate: `tests/vmm/rfc_vmm.c` runs the RFC's guest_memfd
//! preservation scenario with plain ioctls on `/dev/kvm` and `/dev/liveupdate`. It runs the
//! test guest of `vmm::guest`, whose low-memory images `handover guest-image` writes.
//!
//! - `--print-sregs` of the C VMM and of `handover guest-image` must agree (no KVM needed).
//! - `--native` runs on the machine's real `/dev/kvm` without LUO. The guest writes 5 MiB into a
//!   guest_memfd, the VMM checks them through the mmap, and a second vCPU verifies them after
//!   the guest_memfd is bound again. Then the same with a flipped byte, which the guest must
//!   find. These tests print `SKIP:` without `/dev/kvm`, and fail instead with
//!   `HANDOVER_REQUIRE_KVM=1`.
//! - Under `handover run` the VMM's `/dev/kvm` is the host's (the host owns the VM and vCPU
//!   and performs their ioctls; the VMM maps the real `kvm_run`), and stage 2 runs after a real
//!   live update, with low memory from a host memfd or from `malloc`, in both retrieval orders.
//!
//! Each run has a deadline: a hang kills the run's process group and fails the test. Outputs,
//! binaries and reports go to a directory of their own (kept when a test fails).

use std::fs::File;
use std::io::{ErrorKind, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The longest one run may take before it counts as hung.
const DEADLINE: Duration = Duration::from_secs(120);

/// The number of LUO negative-case lines stage 1 prints (`ok N - ...`).
const NEGATIVE_CASES: usize = 8;

fn sources() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vmm")
}

/// A fresh directory for one test: the temp dir, this process's id and the test name.
fn test_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("handover-vmm-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the test directory");
    dir
}

/// `cc ARGS`; panics loudly if there is no `cc`.
fn cc(args: &[&std::ffi::OsStr]) -> std::process::Output {
    match Command::new("cc").args(args).output() {
        Ok(out) => out,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            panic!("cc not found: the external VMM tests compile a C program with cc (install gcc)")
        }
        Err(e) => panic!("cannot run cc: {e}"),
    }
}

/// Compile `tests/vmm/rfc_vmm.c` into `dir/rfc_vmm` with `cc -O1 -Wall -Werror`.
fn compile(dir: &Path) -> PathBuf {
    let out = dir.join("rfc_vmm");
    let src = sources().join("rfc_vmm.c");
    let r = cc(&[
        "-O1".as_ref(),
        "-Wall".as_ref(),
        "-Werror".as_ref(),
        "-o".as_ref(),
        out.as_os_str(),
        src.as_os_str(),
    ]);
    assert!(
        r.status.success(),
        "cc rfc_vmm.c failed:\n{}",
        String::from_utf8_lossy(&r.stderr)
    );
    out
}

/// `handover guest-ARGS`, which must succeed; its stdout.
fn handover(args: &[&str]) -> String {
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
fn images(dir: &Path) -> (PathBuf, PathBuf) {
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
fn kvm_or_skip(test: &str) -> bool {
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

/// What one run did.
struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    report: Vec<Value>,
}

impl Run {
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
            self.status.code(),
            Some(0),
            "{what} did not exit 0\n{}",
            self.dump()
        );
    }

    /// How many lines of stdout are exactly `line`.
    fn lines_eq(&self, line: &str) -> usize {
        self.stdout.lines().filter(|l| *l == line).count()
    }

    /// How many lines of stdout start with `prefix`.
    fn lines_starting(&self, prefix: &str) -> usize {
        self.stdout
            .lines()
            .filter(|l| l.starts_with(prefix))
            .count()
    }

    /// The report's events called `name`.
    fn events(&self, name: &str) -> Vec<&Value> {
        self.report.iter().filter(|v| v["event"] == name).collect()
    }

    /// The one `run-halt` line, which the host writes after every process has exited.
    fn run_halt(&self) -> &Value {
        let halts = self.events("run-halt");
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
}

/// Run `cmd` in `dir` in its own process group, stdout and stderr captured to files named after
/// `tag`, with a deadline; `report` is the JSON-lines file it writes, if any.
fn run_with_deadline(dir: &Path, tag: &str, mut cmd: Command, report: Option<&Path>) -> Run {
    let out_path = dir.join(format!("{tag}.stdout"));
    let err_path = dir.join(format!("{tag}.stderr"));
    cmd.current_dir(dir)
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).expect("stdout file"))
        .stderr(File::create(&err_path).expect("stderr file"))
        // Its own process group, so a hang can be ended whole.
        .process_group(0);
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let pgid = child.id() as i32;
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for the run") {
            break st;
        }
        if start.elapsed() > DEADLINE {
            // SAFETY: kill(2) touches no memory; the leader is not reaped yet, so the group
            // id is still the one this test created.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            let _ = child.wait();
            panic!(
                "{cmd:?} hung: killed after {DEADLINE:?}\n--- stdout:\n{}\n--- stderr:\n{}",
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
        report: report
            .map(|r| std::fs::read_to_string(r).unwrap_or_default())
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("report line {l:?}: {e}")))
            .collect(),
    };
    assert!(
        !leftovers,
        "processes of the run were still alive 2 s after its leader exited (killed now)\n{}",
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

/// `rfc_vmm ARGS` directly on this machine's kernel.
fn rfc_vmm(dir: &Path, tag: &str, bin: &Path, args: &[&str]) -> Run {
    let mut cmd = Command::new(bin);
    cmd.args(args);
    run_with_deadline(dir, tag, cmd, None)
}

/// `handover run --ram 1G --kexecs 0 --report F -- rfc_vmm ARGS`.
fn rfc_vmm_under_handover(dir: &Path, tag: &str, bin: &Path, args: &[&str]) -> Run {
    let report = dir.join(format!("{tag}.report.jsonl"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_handover"));
    cmd.args(["run", "--ram", "1G", "--kexecs", "0"])
        .arg("--report")
        .arg(&report)
        .arg("--")
        .arg(bin)
        .args(args);
    run_with_deadline(dir, tag, cmd, Some(&report))
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

#[test]
fn c_vmm_sets_the_vcpu_state_of_the_guest_module() {
    let dir = test_dir("sregs");
    let bin = compile(&dir);
    let r = rfc_vmm(&dir, "sregs", &bin, &["--print-sregs"]);
    r.assert_success("rfc_vmm --print-sregs");
    let want = handover(&["guest-image", "--print-sregs"]);
    assert!(
        want.contains("cs selector=0x33 ") && want.contains("rip=0x3000 "),
        "handover guest-image --print-sregs printed no state:\n{want}"
    );
    assert_eq!(
        r.stdout, want,
        "the C VMM's sregs/regs differ from vmm::guest's initial_sregs/initial_regs"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn c_vmm_native_writes_and_verifies_through_guest_memfd() {
    if !kvm_or_skip("c_vmm_native_writes_and_verifies_through_guest_memfd") {
        return;
    }
    let dir = test_dir("native");
    let bin = compile(&dir);
    let (w, v) = images(&dir);
    for low in ["memfd", "malloc"] {
        let tag = format!("native-{low}");
        let r = rfc_vmm(
            &dir,
            &tag,
            &bin,
            &[path_str(&w), path_str(&v), "--low", low, "--native"],
        );
        r.assert_success(&tag);
        assert_eq!(r.lines_eq("rfc_vmm: native ok"), 1, "{tag}\n{}", r.dump());
        assert_eq!(
            r.lines_starting("rfc_vmm: native verify: the guest verified 5242880 bytes"),
            1,
            "{tag}\n{}",
            r.dump()
        );
        assert_eq!(r.lines_starting("not ok"), 0, "{tag}\n{}", r.dump());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn c_vmm_native_guest_finds_a_flipped_byte() {
    if !kvm_or_skip("c_vmm_native_guest_finds_a_flipped_byte") {
        return;
    }
    let dir = test_dir("corrupt");
    let bin = compile(&dir);
    let (w, v) = images(&dir);
    let r = rfc_vmm(
        &dir,
        "corrupt",
        &bin,
        &[
            path_str(&w),
            path_str(&v),
            "--native",
            "--corrupt",
            "3000001",
        ],
    );
    r.assert_success("rfc_vmm --corrupt");
    assert_eq!(
        r.lines_eq("rfc_vmm: native verify: the guest found the flipped byte at 0x2dc6c1"),
        1,
        "{}",
        r.dump()
    );
    assert_eq!(r.lines_eq("rfc_vmm: native corrupt ok"), 1, "{}", r.dump());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The whole scenario under `handover run`: stage 1 (negative cases, guest writes, preserve,
/// `reboot`), a live update, stage 2 (retrieve, check, guest verifies, finish).
fn under_handover(low: &str, order: &str) {
    let test = format!("c_vmm_under_handover_run ({low}, {order})");
    if !kvm_or_skip(&test) {
        return;
    }
    let dir = test_dir(&format!("run-{low}-{order}"));
    let bin = compile(&dir);
    let (w, v) = images(&dir);
    let r = rfc_vmm_under_handover(
        &dir,
        "run",
        &bin,
        &[path_str(&w), path_str(&v), "--low", low, "--order", order],
    );
    assert_eq!(
        r.lines_starting("not ok"),
        0,
        "{test}: a negative case failed\n{}",
        r.dump()
    );
    r.assert_success(&test);
    assert_eq!(
        r.lines_starting("ok "),
        NEGATIVE_CASES,
        "{test}: a negative case reported nothing\n{}",
        r.dump()
    );
    assert_eq!(
        r.lines_eq("rfc_vmm: stage 1"),
        1,
        "{test}: stage 1 must run once\n{}",
        r.dump()
    );
    assert_eq!(
        r.lines_eq("rfc_vmm: stage 2 ok"),
        1,
        "{test}: stage 2 did not pass\n{}",
        r.dump()
    );
    // Two programs (stage 1, stage 2), two update attempts (the refused one of the negative
    // case, and the real one), one update done.
    assert_eq!(r.events("run-start").len(), 2, "{test}\n{}", r.dump());
    assert_eq!(r.events("run-kexec").len(), 2, "{test}\n{}", r.dump());
    assert_eq!(r.run_halt()["kexec_count"], 1, "{test}\n{}", r.dump());
    r.assert_clean_halt();
    let _ = std::fs::remove_dir_all(&dir);
}

// The next four run the VMM under `handover run`: its `/dev/kvm` is the host's.

#[test]
fn c_vmm_under_handover_run_memfd_vm_first() {
    under_handover("memfd", "vm-first");
}

#[test]
fn c_vmm_under_handover_run_memfd_gmem_first() {
    under_handover("memfd", "gmem-first");
}

#[test]
fn c_vmm_under_handover_run_malloc_vm_first() {
    under_handover("malloc", "vm-first");
}

#[test]
fn c_vmm_under_handover_run_malloc_gmem_first() {
    under_handover("malloc", "gmem-first");
}
