//! `kho-test`, the KHO client as an init program (test-hooks builds only): preserve folios of
//! mixed orders, carry them through kexecs and check every byte; optionally damage the handover.

use serde_json::json;

use crate::host::Host;
use crate::kexec::params::parse_size;
use crate::kho::test::{release_unclaimed, KhoTest};

use super::{parse_args, InitOutcome};

/// Its name (`--init kho-test`).
pub const NAME: &str = "kho-test";

/// Its line in `--init list`.
pub const ABOUT: &str = "preserve folios of mixed orders (size=64M), carry them through kexecs=N kexecs, check every byte, corrupt=KIND damages the handover (test-hooks builds only)";

/// The program: stage by `kexec_count`; `--init-arg`s `size`, `kexecs`, `corrupt`.
pub fn run(host: &mut Host) -> InitOutcome {
    let args = parse_args(&host.params.init_args);
    let size = args.get("size").map_or(Ok(64 << 20), |s| parse_size(s));
    let kexecs: u32 = args.get("kexecs").and_then(|s| s.parse().ok()).unwrap_or(1);
    let Ok(size) = size else {
        tracing::error!("kho-test: bad size");
        return InitOutcome::Halt(2);
    };
    let (kho, mm) = host.kho_mm();
    let t = match KhoTest::restore(kho, mm) {
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
            match KhoTest::create(host.kho_mm().1, size, 0x5eed) {
                Ok(t) => t,
                Err(e) => {
                    tracing::error!("kho-test: {e}");
                    return InitOutcome::Halt(1);
                }
            }
        }
        Err(e) => {
            tracing::error!("kho-test: refusing the handover: {e}");
            let (kho, mm) = host.kho_mm();
            let released = release_unclaimed(kho, mm);
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
    let (kho, mm) = host.kho_mm();
    if let Err(e) = t.preserve(kho, mm) {
        tracing::error!("kho-test: preserve failed: {e}");
        return InitOutcome::Halt(1);
    }
    if let Some(kind) = args.get("corrupt") {
        if let Err(e) = host.corrupt_client(kind) {
            tracing::error!("kho-test: cannot corrupt: {e}");
        }
    }
    host.report(
        "kho-test-preserved",
        json!({ "bytes": t.bytes(), "status": host.status() }),
    );
    InitOutcome::Kexec
}
