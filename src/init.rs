//! Init programs: what a host image runs after boot (like `init` and the selftest binaries
//! upstream runs in each stage). Each program finds its stage from what the handover holds, so
//! the same command line is reused across kexecs (`kexec --reuse-cmdline`).

use std::collections::BTreeMap;

#[cfg(feature = "test-hooks")]
use serde_json::json;

use crate::host::Host;
#[cfg(feature = "test-hooks")]
use crate::kexec::params::parse_size;
#[cfg(feature = "test-hooks")]
use crate::kho::test::{release_unclaimed, KhoTest};

/// What to do once an init program returns.
#[derive(Debug, PartialEq, Eq)]
pub enum InitOutcome {
    /// Power off with this exit status.
    Halt(i32),
    /// Kexec into the next image (same command line).
    Kexec,
}

/// `--init-arg key=value` pairs.
pub fn parse_args(args: &[String]) -> BTreeMap<String, String> {
    args.iter()
        .map(|a| match a.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (a.clone(), String::new()),
        })
        .collect()
}

/// Init programs of every build.
pub const PROGRAMS: &[(&str, &str)] = &[];

/// Init programs that need the `test-hooks` feature (listed only in such builds).
#[cfg(feature = "test-hooks")]
pub const TEST_PROGRAMS: &[(&str, &str)] = &[(
    "kho-test",
    "preserve folios of mixed orders (size=64M), carry them through kexecs=N kexecs, check every byte, corrupt=KIND damages the handover (test-hooks builds only)",
)];
/// Init programs that need the `test-hooks` feature: none in this build.
#[cfg(not(feature = "test-hooks"))]
pub const TEST_PROGRAMS: &[(&str, &str)] = &[];

/// Run the init program named on the command line. Programs that run guests share the host
/// with their vCPU threads, so the host is passed by value and handed back.
pub fn run(mut host: Host) -> (Host, InitOutcome) {
    let Some(name) = host.params.init.clone() else {
        return (host, InitOutcome::Halt(0));
    };
    if name == crate::vmm::rfc::PROGRAM {
        return crate::vmm::rfc::run(host);
    }
    let o = run_local(&mut host, &name);
    (host, o)
}

fn run_local(host: &mut Host, name: &str) -> InitOutcome {
    if let Some(o) = crate::vmm::selftests::run(host, name) {
        return o;
    }
    match name {
        #[cfg(feature = "test-hooks")]
        "kho-test" => kho_test(host, &parse_args(&host.params.init_args)),
        other => {
            tracing::error!("unknown init program {other:?}");
            InitOutcome::Halt(2)
        }
    }
}

#[cfg(feature = "test-hooks")]
fn kho_test(host: &mut Host, args: &BTreeMap<String, String>) -> InitOutcome {
    let size = args.get("size").map_or(Ok(64 << 20), |s| parse_size(s));
    let kexecs: u32 = args.get("kexecs").and_then(|s| s.parse().ok()).unwrap_or(1);
    let Ok(size) = size else {
        tracing::error!("kho-test: bad size");
        return InitOutcome::Halt(2);
    };
    let t = match KhoTest::restore(host) {
        Ok(Some(t)) => {
            let st = host.status();
            // Everything in use now: the restored folios and the new tracker's nodes.
            let expected =
                t.bytes() / crate::mm::PAGE_SIZE + st.tracker_bytes / crate::mm::PAGE_SIZE;
            host.report(
                "kho-test-restored",
                json!({
                    "verified_bytes": t.bytes(), "folios": t.folios.len(),
                    "generation": t.generation, "status": st, "expected_used": expected,
                    "boot": host.info,
                }),
            );
            t
        }
        Ok(None) => {
            if host.info.kho_boot || host.info.refused.is_some() {
                host.report(
                    "kho-test-missing",
                    json!({ "status": host.status(), "boot": host.info }),
                );
                return InitOutcome::Halt(1);
            }
            match KhoTest::create(host, size, 0x5eed) {
                Ok(t) => t,
                Err(e) => {
                    tracing::error!("kho-test: {e}");
                    return InitOutcome::Halt(1);
                }
            }
        }
        Err(e) => {
            tracing::error!("kho-test: refusing the handover: {e}");
            let released = release_unclaimed(host);
            host.report(
                "kho-test-refused",
                json!({ "error": e.to_string(), "released_pages": released, "status": host.status(), "boot": host.info }),
            );
            return InitOutcome::Halt(1);
        }
    };
    if host.info.kexec_count >= kexecs {
        host.report("kho-test-done", json!({ "status": host.status() }));
        return InitOutcome::Halt(0);
    }
    let mut t = t;
    t.generation = t.generation.max(host.info.kexec_count as u64);
    if let Err(e) = t.preserve(host) {
        tracing::error!("kho-test: preserve failed: {e}");
        return InitOutcome::Halt(1);
    }
    if let Some(kind) = args.get("corrupt") {
        if let Err(e) = crate::kexec::corrupt::client(host, kind) {
            tracing::error!("kho-test: cannot corrupt: {e}");
        }
    }
    host.report(
        "kho-test-preserved",
        json!({ "bytes": t.bytes(), "status": host.status() }),
    );
    InitOutcome::Kexec
}
