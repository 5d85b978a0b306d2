//! A VMM in Rust on the rust-vmm crates, outside this crate: `examples/kvm-vmm` (its own
//! package and workspace, depending on kvm-ioctls, kvm-bindings and libc only, never on
//! handover) runs the RFC's guest_memfd scenario with `Kvm`, `VmFd::create_guest_memfd`,
//! `set_user_memory_region(2)`, `VcpuFd::run` and raw `/dev/liveupdate` ioctls. Under
//! `handover run` its `/dev/kvm` and `/dev/liveupdate` are the host's: stage 1 lets the guest
//! write 5 MiB into a guest_memfd (low memory is an anonymous mapping, which the boundary moves
//! into host RAM), preserves the VM and the guest_memfd and calls `reboot(KEXEC)`; stage 2, after
//! the live update, wraps the retrieved VM fd in a `VmFd` and has a new vCPU verify the data.
//!
//! The test builds the example with `cargo build --release` into `target/kvm-vmm` (kept between
//! runs, so only the first build costs; the dependencies are handover's own, already in the
//! cargo registry, and the example's `Cargo.lock` pins them), retrying with `--offline` if the
//! plain build fails. It prints `SKIP:` without `/dev/kvm`, and fails instead with
//! `HANDOVER_REQUIRE_KVM=1`.

mod vmm_common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use vmm_common::{images, kvm_or_skip, path_str, test_dir, under_handover};

/// `cargo build --release` of `examples/kvm-vmm` into `target/kvm-vmm`; the binary.
fn build_example() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest = root.join("examples/kvm-vmm/Cargo.toml");
    let target = root.join("target/kvm-vmm");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let build = |offline: bool| {
        let mut cmd = Command::new(&cargo);
        cmd.args(["build", "--release", "--quiet", "--manifest-path"])
            .arg(&manifest)
            .arg("--target-dir")
            .arg(&target);
        if offline {
            cmd.arg("--offline");
        }
        cmd.output()
            .unwrap_or_else(|e| panic!("cannot run {cargo:?}: {e}"))
    };
    let t0 = Instant::now();
    let mut out = build(false);
    if !out.status.success() {
        let first = String::from_utf8_lossy(&out.stderr).into_owned();
        out = build(true);
        assert!(
            out.status.success(),
            "cargo build of examples/kvm-vmm failed\n--- plain:\n{first}\n--- --offline:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    eprintln!(
        "examples/kvm-vmm built in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let bin = target.join("release/kvm-vmm");
    assert!(bin.exists(), "no {}", bin.display());
    bin
}

#[test]
fn rust_vmm_on_kvm_ioctls_under_handover_run() {
    let test = "rust_vmm_on_kvm_ioctls_under_handover_run";
    if !kvm_or_skip(test) {
        return;
    }
    let dir = test_dir("rust-example");
    let bin = build_example();
    let (w, v) = images(&dir);
    let r = under_handover(&dir, "run", &bin, &[path_str(&w), path_str(&v)]);
    r.assert_success(test);
    assert_eq!(r.lines_eq("kvm-vmm: stage 1"), 1, "{test}\n{}", r.dump());
    assert_eq!(
        r.lines_eq("kvm-vmm: stage 1: VM and guest_memfd preserved, updating"),
        1,
        "{test}\n{}",
        r.dump()
    );
    assert_eq!(
        r.lines_eq("kvm-vmm: stage 2 verify: the guest verified 5242880 bytes"),
        1,
        "{test}\n{}",
        r.dump()
    );
    assert_eq!(r.lines_eq("kvm-vmm: stage 2 ok"), 1, "{test}\n{}", r.dump());
    assert_eq!(r.events("run-start").len(), 2, "{test}\n{}", r.dump());
    assert_eq!(r.run_halt()["kexec_count"], 1, "{test}\n{}", r.dump());
    r.assert_clean_halt();
    let _ = std::fs::remove_dir_all(&dir);
}
