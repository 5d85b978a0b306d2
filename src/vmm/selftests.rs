//! Upstream's LUO kexec selftests (`luo_kexec_simple`, `luo_multi_session`,
//! `luo_stress_sessions`, `luo_stress_files`) as init programs of the host image, plus a
//! freeze-failure scenario. Each finds its stage like upstream's `luo_test()`: RETRIEVE_SESSION
//! of its state session fails with ENOENT in stage 1.

use serde_json::json;

use crate::host::Host;
use crate::init::InitOutcome;
use crate::mm::PAGE_SIZE;
use crate::uapi::{Errno, Pid};

use super::libluo::*;

type Stage = fn(&mut Host, Pid, i32) -> Result<serde_json::Value, String>;

fn e(what: &str) -> impl Fn(Errno) -> String + '_ {
    move |err| format!("{what}: {err}")
}

/// A page-sized memfd holding `text`, preserved under `token`.
fn create_and_preserve_memfd(
    h: &mut Host,
    pid: Pid,
    session: i32,
    token: u64,
    text: &str,
) -> Result<(), String> {
    let m = memfd_with(h, pid, text.as_bytes()).map_err(e("memfd"))?;
    preserve_fd(h, pid, session, m, token).map_err(e("preserve"))?;
    Ok(())
}

/// Retrieve `token` and check all of its page: `text` then zeros.
fn restore_and_verify_memfd(
    h: &mut Host,
    pid: Pid,
    session: i32,
    token: u64,
    text: &str,
) -> Result<(), String> {
    let m = retrieve_fd(h, pid, session, token).map_err(e("retrieve fd"))?;
    let got = read_all(h, pid, m, PAGE_SIZE as usize).map_err(e("read"))?;
    let mut want = vec![0u8; PAGE_SIZE as usize];
    want[..text.len()].copy_from_slice(text.as_bytes());
    if got != want {
        return Err(format!("token {token:#x}: contents differ from {text:?}"));
    }
    Ok(())
}

fn run_stages(h: &mut Host, state: &str, state_token: u64, s1: Stage, s2: Stage) -> InitOutcome {
    let pid = h.spawn();
    let r = (|| -> Result<(bool, serde_json::Value), String> {
        let dev = h
            .open(pid, "/dev/liveupdate", 0)
            .map_err(e("open /dev/liveupdate"))?;
        match retrieve_session(h, pid, dev, state) {
            Err(Errno::ENOENT) => {
                let st = create_session(h, pid, dev, state).map_err(e("create state session"))?;
                create_and_preserve_memfd(h, pid, st, state_token, "2")?;
                Ok((true, s1(h, pid, dev)?))
            }
            Ok(st) => {
                restore_and_verify_memfd(h, pid, st, state_token, "2")?;
                let v = s2(h, pid, dev)?;
                finish(h, pid, st).map_err(e("finish state session"))?;
                Ok((false, v))
            }
            Err(err) => Err(format!("retrieve state session: {err}")),
        }
    })();
    match r {
        Ok((true, v)) => {
            h.report("stage1-done", json!({ "detail": v, "status": h.status() }));
            InitOutcome::Kexec
        }
        Ok((false, v)) => {
            h.report(
                "stage2-ok",
                json!({ "detail": v, "status": h.status(), "luo": h.luo.counts() }),
            );
            h.exit(pid);
            h.report(
                "stage2-exited",
                json!({ "status": h.status(), "luo": h.luo.counts() }),
            );
            InitOutcome::Halt(0)
        }
        Err(msg) => {
            tracing::error!("{msg}");
            h.report("stage-failed", json!({ "error": msg }));
            InitOutcome::Halt(1)
        }
    }
}

fn simple_1(h: &mut Host, pid: Pid, dev: i32) -> Result<serde_json::Value, String> {
    let s = create_session(h, pid, dev, "test-session").map_err(e("create"))?;
    create_and_preserve_memfd(h, pid, s, 0x1A, "hello kexec world")?;
    Ok(json!({}))
}

fn simple_2(h: &mut Host, pid: Pid, dev: i32) -> Result<serde_json::Value, String> {
    let s = retrieve_session(h, pid, dev, "test-session").map_err(e("retrieve"))?;
    restore_and_verify_memfd(h, pid, s, 0x1A, "hello kexec world")?;
    finish(h, pid, s).map_err(e("finish"))?;
    Ok(json!({ "verified_files": 1 }))
}

const MULTI: [(&str, &[(u64, &str)]); 4] = [
    ("multi-test-empty-1", &[]),
    ("multi-test-empty-2", &[]),
    ("multi-test-files-1", &[(0x1001, "session-1-file-1")]),
    (
        "multi-test-files-2",
        &[(0x2002, "session-2-file-1"), (0x3003, "session-2-file-2")],
    ),
];

fn multi_1(h: &mut Host, pid: Pid, dev: i32) -> Result<serde_json::Value, String> {
    for (name, files) in MULTI {
        let s = create_session(h, pid, dev, name).map_err(e("create"))?;
        for (t, text) in files {
            create_and_preserve_memfd(h, pid, s, *t, text)?;
        }
    }
    Ok(json!({}))
}

fn multi_2(h: &mut Host, pid: Pid, dev: i32) -> Result<serde_json::Value, String> {
    let mut n = 0;
    for (name, files) in MULTI {
        let s = retrieve_session(h, pid, dev, name).map_err(e("retrieve"))?;
        for (t, text) in files {
            restore_and_verify_memfd(h, pid, s, *t, text)?;
            n += 1;
        }
        finish(h, pid, s).map_err(e("finish"))?;
    }
    Ok(json!({ "verified_files": n, "sessions": MULTI.len() }))
}

fn stress_sessions_1(h: &mut Host, pid: Pid, dev: i32) -> Result<serde_json::Value, String> {
    for i in 0..2000 {
        create_session(h, pid, dev, &format!("many-test-{i}")).map_err(e("create"))?;
    }
    Ok(json!({}))
}

fn stress_sessions_2(h: &mut Host, pid: Pid, dev: i32) -> Result<serde_json::Value, String> {
    for i in 0..2000 {
        let s = retrieve_session(h, pid, dev, &format!("many-test-{i}")).map_err(e("retrieve"))?;
        finish(h, pid, s).map_err(e("finish"))?;
    }
    Ok(json!({ "sessions": 2000 }))
}

fn stress_files_1(h: &mut Host, pid: Pid, dev: i32) -> Result<serde_json::Value, String> {
    let s = create_session(h, pid, dev, "many_files_session").map_err(e("create"))?;
    for i in 0..500u64 {
        create_and_preserve_memfd(h, pid, s, i, &format!("file-data-{i}"))?;
    }
    Ok(json!({}))
}

fn stress_files_2(h: &mut Host, pid: Pid, dev: i32) -> Result<serde_json::Value, String> {
    let s = retrieve_session(h, pid, dev, "many_files_session").map_err(e("retrieve"))?;
    for i in 0..500u64 {
        restore_and_verify_memfd(h, pid, s, i, &format!("file-data-{i}"))?;
    }
    finish(h, pid, s).map_err(e("finish"))?;
    Ok(json!({ "verified_files": 500 }))
}

/// A file whose freeze fails refuses the kexec; everything stays usable; once its session is
/// closed, the kexec goes through and the other session arrives intact. Needs the
/// `/dev/liveupdate-test` device (`test-hooks`).
#[cfg(feature = "test-hooks")]
fn freeze_fail_1(h: &mut Host, pid: Pid, dev: i32) -> Result<serde_json::Value, String> {
    let keep = create_session(h, pid, dev, "keep").map_err(e("create"))?;
    let m = memfd_with(h, pid, b"survivor").map_err(e("memfd"))?;
    preserve_fd(h, pid, keep, m, 1).map_err(e("preserve"))?;
    let bad = create_session(h, pid, dev, "bad").map_err(e("create"))?;
    let t = h
        .open(pid, "/dev/liveupdate-test", 0)
        .map_err(e("open test file"))?;
    h.test_file_set(
        pid,
        t,
        crate::fs::TestFile {
            value: 7,
            fail_freeze: Some(libc::EAGAIN),
            ..Default::default()
        },
    )
    .map_err(e("test file"))?;
    preserve_fd(h, pid, bad, t, 2).map_err(e("preserve test file"))?;
    let before = (h.status(), h.luo.counts());
    let Err(err) = h.kexec(crate::kexec::KexecRequest::default());
    let after = (h.status(), h.luo.counts());
    if format!("{before:?}") != format!("{after:?}") {
        return Err(format!(
            "a refused kexec changed state: {before:?} -> {after:?}"
        ));
    }
    // The host runs on: the preserved memfd is still frozen and readable; the sessions are
    // intact; the test file kept its state.
    let got = read_all(h, pid, m, 8).map_err(e("read"))?;
    if got != b"survivor" || h.test_file_get(pid, t).map_err(e("test file"))?.value != 7 {
        return Err("files changed after the refused kexec".into());
    }
    if h.ftruncate(pid, m, 2 * PAGE_SIZE) != Err(Errno::EPERM) {
        return Err("memfd no longer frozen after the refused kexec".into());
    }
    h.close(pid, bad).map_err(e("close bad session"))?;
    Ok(json!({ "refused": err.to_string(), "errno": err.errno() }))
}

#[cfg(feature = "test-hooks")]
fn freeze_fail_2(h: &mut Host, pid: Pid, dev: i32) -> Result<serde_json::Value, String> {
    let s = retrieve_session(h, pid, dev, "keep").map_err(e("retrieve"))?;
    restore_and_verify_memfd(h, pid, s, 1, "survivor")?;
    finish(h, pid, s).map_err(e("finish"))?;
    if retrieve_session(h, pid, dev, "bad") != Err(Errno::ENOENT) {
        return Err("the closed session came through".into());
    }
    Ok(json!({ "verified_files": 1 }))
}

/// The init programs ported from upstream's two-stage LUO kexec selftests, as
/// `(name, --init list description)`.
pub const PROGRAMS: &[(&str, &str)] = &[
    (
        "luo-kexec-simple",
        "upstream luo_kexec_simple: one session, one memfd",
    ),
    (
        "luo-multi-session",
        "upstream luo_multi_session: four sessions, two empty, three memfds",
    ),
    (
        "luo-stress-sessions",
        "upstream luo_stress_sessions: 2000 sessions",
    ),
    (
        "luo-stress-files",
        "upstream luo_stress_files: 500 memfds in one session",
    ),
];

/// Programs that need the `test-hooks` feature (the `/dev/liveupdate-test` device).
#[cfg(feature = "test-hooks")]
pub const TEST_PROGRAMS: &[(&str, &str)] = &[(
    "luo-freeze-fail",
    "a failing freeze refuses the kexec; a second kexec without it succeeds (test-hooks builds only)",
)];
/// Programs that need the `test-hooks` feature: none in this build.
#[cfg(not(feature = "test-hooks"))]
pub const TEST_PROGRAMS: &[(&str, &str)] = &[];

/// Run the selftest `name` on this boot: stage 1 (no state session yet) ends in a kexec,
/// stage 2 verifies and halts with 0; a failure halts with 1. `None` if `name` is not one.
pub fn run(h: &mut Host, name: &str) -> Option<InitOutcome> {
    let (state, token, s1, s2): (&str, u64, Stage, Stage) = match name {
        "luo-kexec-simple" => ("kexec_simple_state", 999, simple_1, simple_2),
        "luo-multi-session" => ("kexec_multi_state", 998, multi_1, multi_2),
        "luo-stress-sessions" => (
            "kexec_many_state",
            999,
            stress_sessions_1,
            stress_sessions_2,
        ),
        "luo-stress-files" => (
            "kexec_many_files_state",
            9999,
            stress_files_1,
            stress_files_2,
        ),
        #[cfg(feature = "test-hooks")]
        "luo-freeze-fail" => ("freeze_fail_state", 997, freeze_fail_1, freeze_fail_2),
        _ => return None,
    };
    Some(run_stages(h, state, token, s1, s2))
}
