//! KHO through real kexecs (execve of the host image): preserved folios survive, accounting
//! balances, bad handovers are refused cleanly, and the handover tree is a valid FDT.

mod common;

/// KHO alone: LUO off, so the only handed-over memory is the test client's.
fn boot(tag: &str, ram: &str, init: &str, init_args: &[&str], extra: &[&str]) -> common::Run {
    let extra: Vec<&str> = [&["--liveupdate", "off"], extra].concat();
    common::boot(tag, ram, init, init_args, &extra)
}

fn check_accounting(ev: &serde_json::Value) {
    let st = &ev["status"];
    let f = &st["frames"];
    let (total, free, used) = (
        f["total"].as_u64().unwrap(),
        f["free"].as_u64().unwrap(),
        f["used"].as_u64().unwrap(),
    );
    assert_eq!(free + used, total, "frames must balance: {st}");
    assert_eq!(
        used,
        ev["expected_used"].as_u64().unwrap(),
        "only restored folios and the tracker root are in use: {st}"
    );
    assert_eq!(
        st["incoming_outstanding"], 0,
        "every preserved page was restored: {st}"
    );
}

#[test]
fn preserve_64mib_mixed_orders_across_kexec() {
    let r = boot("kho64", "512M", "kho-test", &["size=64M", "kexecs=1"], &[]);
    assert_eq!(r.code, 0, "stderr:\n{}", r.stderr);
    let pre = r.one("kho-test-preserved");
    assert_eq!(pre["bytes"], 64 << 20);
    let ev = r.one("kho-test-restored");
    assert_eq!(ev["verified_bytes"], 64 << 20);
    assert!(ev["folios"].as_u64().unwrap() > 11, "mixed orders");
    assert_eq!(ev["boot"]["kho_boot"], true);
    assert_eq!(ev["kexec_count"], 1);
    check_accounting(ev);
    assert!(r.stderr.contains("exec from: handover"), "{}", r.stderr);
}

#[test]
fn ten_kexecs_in_a_row_carry_memory_forward() {
    let r = boot("kho10", "256M", "kho-test", &["size=8M", "kexecs=10"], &[]);
    assert_eq!(r.code, 0, "stderr:\n{}", r.stderr);
    let restored = r.events("kho-test-restored");
    let counts: Vec<u64> = restored
        .iter()
        .map(|e| e["kexec_count"].as_u64().unwrap())
        .collect();
    assert_eq!(counts, (1..=10).collect::<Vec<_>>());
    for e in &restored {
        assert_eq!(e["verified_bytes"], 8 << 20);
        check_accounting(e);
    }
    for n in 1..=10 {
        assert!(
            r.stderr.contains(&format!("(count {n})")),
            "missing count {n}: {}",
            r.stderr
        );
    }
}

/// A damaged handover: the next image says what is wrong in one line, does not panic, and
/// ends with all of RAM free except its own tracker root.
fn refused(kind: &str, expect: &str) {
    let r = boot(
        kind,
        "256M",
        "kho-test",
        &["size=4M", "kexecs=1", &format!("corrupt={kind}")],
        &[],
    );
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    assert_eq!(r.code, 1, "stderr:\n{}", r.stderr);
    let ev = r
        .events
        .iter()
        .find(|e| e["event"] == "kho-test-refused" || e["event"] == "kho-test-missing")
        .unwrap_or_else(|| panic!("no refusal event; stderr:\n{}", r.stderr));
    let why = ev["error"]
        .as_str()
        .map(str::to_owned)
        .or_else(|| ev["boot"]["refused"].as_str().map(str::to_owned))
        .unwrap_or_default();
    assert!(
        why.contains(expect),
        "{kind}: reason {why:?} should mention {expect:?}"
    );
    let line = r.stderr.lines().filter(|l| l.contains("refusing")).count();
    assert_eq!(line, 1, "one clear line: {}", r.stderr);
    let f = &ev["status"]["frames"];
    assert_eq!(
        f["used"], 1,
        "{kind}: only the new tracker root is in use: {}",
        ev["status"]
    );
    assert_eq!(ev["status"]["incoming_outstanding"], 0);
}

#[test]
fn refuses_truncated_tree() {
    refused("fdt-truncate", "checksum mismatch");
}

#[test]
fn refuses_bit_flipped_tree() {
    refused("fdt-bitflip", "checksum mismatch");
}

#[test]
fn refuses_bit_flipped_tracker_root() {
    refused("root-bitflip", "bad handover");
}

#[test]
fn refuses_unknown_compatible() {
    refused("compat", "unsupported compatible string \"kho-v9\"");
}

#[test]
fn refuses_tree_outside_ram() {
    refused("fdt-outside", "outside RAM");
}

#[test]
fn refuses_tracker_node_outside_ram() {
    refused("tracker-outside", "outside RAM");
}

#[test]
fn refuses_cyclic_tracker() {
    refused("tracker-cycle", "referenced twice");
}

#[test]
fn refuses_blob_outside_ram() {
    refused("blob-outside", "outside RAM");
}

#[test]
fn refuses_cyclic_chunk_chain() {
    refused("chain-cycle", "loops");
}

#[test]
fn refuses_overlong_chunk_chain() {
    refused("chain-overlong", "more than");
}

#[test]
fn handover_tree_decodes_with_dtc() {
    let r = boot(
        "dtc",
        "128M",
        "kho-test",
        &["size=1M", "kexecs=1"],
        &["--dump-handover", "h.dump"],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let inspect = std::process::Command::new(env!("CARGO_BIN_EXE_handover"))
        .args(["inspect", "h.dump", "--fdt-out", "tree.dtb"])
        .current_dir(&r.dir)
        .output()
        .unwrap();
    assert!(
        inspect.status.success(),
        "{}",
        String::from_utf8_lossy(&inspect.stderr)
    );
    let text = String::from_utf8_lossy(&inspect.stdout);
    assert!(
        text.contains("kho-test") && text.contains("kexec-metadata") && text.contains("order"),
        "{text}"
    );
    let json = std::process::Command::new(env!("CARGO_BIN_EXE_handover"))
        .args(["inspect", "h.dump", "--json"])
        .current_dir(&r.dir)
        .output()
        .unwrap();
    let v: serde_json::Value =
        serde_json::from_slice(&json.stdout).expect("inspect --json is JSON");
    assert_eq!(v["compatible"], "kho-v4");
    assert!(v["preserved_pages"].as_u64().unwrap() >= 256);

    let dtc = std::process::Command::new("dtc")
        .args(["-I", "dtb", "-O", "dts", "tree.dtb"])
        .current_dir(&r.dir)
        .output();
    match dtc {
        Ok(o) => {
            assert!(
                o.status.success(),
                "dtc failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            let dts = String::from_utf8_lossy(&o.stdout);
            assert!(
                dts.contains("compatible = \"kho-v4\"")
                    && dts.contains("kho-test {")
                    && dts.contains("preserved-memory-map"),
                "{dts}"
            );
        }
        Err(_) if std::env::var("HANDOVER_REQUIRE_DTC").as_deref() != Ok("1") => {
            eprintln!(
                "SKIP: dtc (device-tree-compiler) is not installed; the FDT check did not run"
            );
        }
        Err(e) => panic!("dtc is required (HANDOVER_REQUIRE_DTC=1) but cannot run: {e}"),
    }
}
