//! Upstream's LUO kexec selftests through a real kexec (`execve`) of the host image, plus a
//! freeze failure that refuses the kexec. Every stage 2 checks every byte of every memfd page,
//! finishes every session, and exits; afterwards only the new tracker root is in use.

mod common;

use common::boot;

fn two_stages(program: &str) -> common::Run {
    let r = boot(program, "512M", program, &[], &[]);
    assert_eq!(r.code, 0, "{program}: stderr:\n{}", r.stderr);
    let s1 = r.one("stage1-done");
    assert_eq!(s1["kexec_count"], 0);
    let s2 = r.one("stage2-ok");
    assert_eq!(s2["kexec_count"], 1);
    assert!(r.stderr.contains("exec from: handover"), "{}", r.stderr);
    let done = r.one("stage2-exited");
    assert_eq!(done["luo"], serde_json::json!([0, 0, 0]), "no session left");
    assert_eq!(
        done["status"]["incoming_outstanding"], 0,
        "every handed-over page was claimed"
    );
    assert_eq!(
        done["status"]["frames"]["used"], 1,
        "no leaked frames: only the tracker root is in use"
    );
    r
}

#[test]
fn luo_kexec_simple() {
    let r = two_stages("luo-kexec-simple");
    assert_eq!(r.one("stage2-ok")["detail"]["verified_files"], 1);
}

#[test]
fn luo_multi_session() {
    let r = two_stages("luo-multi-session");
    let d = &r.one("stage2-ok")["detail"];
    assert_eq!(d["verified_files"], 3);
    assert_eq!(d["sessions"], 4);
}

#[test]
fn luo_stress_sessions() {
    let r = two_stages("luo-stress-sessions");
    assert_eq!(r.one("stage2-ok")["detail"]["sessions"], 2000);
}

#[test]
fn luo_stress_files() {
    let r = two_stages("luo-stress-files");
    assert_eq!(r.one("stage2-ok")["detail"]["verified_files"], 500);
}

#[test]
fn failing_freeze_refuses_the_kexec_and_a_second_kexec_succeeds() {
    let r = two_stages("luo-freeze-fail");
    let d = &r.one("stage1-done")["detail"];
    assert_eq!(d["errno"], libc::EAGAIN);
    assert!(
        d["refused"]
            .as_str()
            .unwrap()
            .contains("freeze of token 0x2 in session \"bad\""),
        "{d}"
    );
    assert_eq!(r.one("stage2-ok")["detail"]["verified_files"], 1);
}

/// `--hugepages` reaches the next image through the real kexec's command line: both images
/// report the same pool (the second fills it once the update is committed), and the frames it
/// holds are all that stays in use beside the tracker root.
#[test]
fn hugepages_are_kept_across_a_real_kexec() {
    let r = boot(
        "hugepages",
        "512M",
        "luo-kexec-simple",
        &[],
        &["--hugepages", "2M:4"],
    );
    assert_eq!(r.code, 0, "stderr:\n{}", r.stderr);
    let pool = serde_json::json!({
        "2M": { "requested": 4, "total": 4, "free": 4, "in_use": 0 },
        "1G": { "requested": 0, "total": 0, "free": 0, "in_use": 0 },
    });
    assert_eq!(r.one("stage1-done")["status"]["hugepages"], pool);
    let done = r.one("stage2-exited");
    assert_eq!(done["kexec_count"], 1);
    assert_eq!(done["status"]["hugepages"], pool);
    assert_eq!(done["status"]["frames"]["used"], 1 + 4 * 512);
    // Cold boot: reserved at boot. After the kexec: filled when the update is committed, not
    // in the blackout.
    assert_eq!(
        r.stderr.matches("hugepages: 4 × 2M reserved").count(),
        1,
        "{}",
        r.stderr
    );
    assert_eq!(
        r.stderr
            .matches("hugepages: 4 folios taken into the pool after the update")
            .count(),
        1,
        "{}",
        r.stderr
    );
}
