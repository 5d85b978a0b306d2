//! `handover demo`: the main job. Boots a host image, runs a scenario through a real kexec
//! (`execve` of the host image with RAM inherited) and tells what happened.

use std::process::ExitCode;

use clap::Args;
use serde_json::{json, Value};

use crate::bench::harness::run_host;
use crate::kexec::params::parse_size;
use crate::mm::HugePageRequest;

#[derive(Args, Debug)]
/// Arguments of `handover demo`.
pub struct DemoArgs {
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Size of the guest_memfd that holds the guest's memory.
    #[arg(long, default_value = "16M", value_parser = parse_size)]
    pub guest_mem: u64,
    /// How much of it the guest writes and verifies.
    #[arg(long, default_value = "5M", value_parser = parse_size)]
    pub data: u64,
    /// RAM of the host image (sparse).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub ram: u64,
    /// Retrieve the guest_memfd before the VM after the update.
    #[arg(long)]
    pub gmem_first: bool,
    /// Also write a dump of the handover here (decode it with `handover inspect`).
    #[arg(long)]
    pub dump: Option<std::path::PathBuf>,
    /// A software-protected VM whose guest writes private memory; the VMM converts the first
    /// MiB to shared and checks it through mmap, and is refused the private rest, before and
    /// after the update (docs/private-memory.md).
    #[arg(long)]
    pub private: bool,
    /// Huge-page pool of the host image (`2M:N,1G:M`), reserved at boot and kept across the
    /// update.
    #[arg(long, value_parser = HugePageRequest::parse)]
    pub hugepages: Option<HugePageRequest>,
    /// Run this many VMs through the update instead of the RFC scenario's one (each with an
    /// in-kernel irqchip and an SMP guest; `--guest-mem` each, `--data` and twice it in
    /// turn).
    #[arg(long, default_value_t = 1)]
    pub vms: u32,
    /// vCPUs per VM (more than 1 also runs the many-VM scenario).
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
}

fn find<'a>(events: &'a [Value], name: &str) -> Option<&'a Value> {
    events.iter().find(|e| e["event"] == name)
}

/// `handover demo`: run the RFC scenario in a host image and report; exit 1 if it failed.
pub fn run(a: DemoArgs) -> Result<ExitCode, String> {
    if a.vms > 1 || a.vcpus > 1 {
        return fleet(&a);
    }
    let mut args = vec![
        "--ram".to_string(),
        a.ram.to_string(),
        "--init".into(),
        crate::vmm::rfc::PROGRAM.into(),
        "--init-arg".into(),
        format!("guest-mem={}", a.guest_mem),
        "--init-arg".into(),
        format!("data={}", a.data),
    ];
    if a.gmem_first {
        args.extend(["--init-arg".into(), "order=gmem-first".into()]);
    }
    // `--hugepages` backs the guest with huge folios, which needs a private-memory VM.
    let huge = a.hugepages.map_or(0, |h| {
        if h.count(9) > 0 {
            9
        } else if h.count(18) > 0 {
            18
        } else {
            0
        }
    });
    if a.private || huge > 0 {
        args.extend(["--init-arg".into(), "private=1".into()]);
    }
    if huge > 0 {
        args.extend(["--init-arg".into(), format!("huge={huge}")]);
    }
    if let Some(d) = &a.dump {
        args.push("--dump-handover".into());
        args.push(d.display().to_string());
    }
    if let Some(h) = a.hugepages {
        args.push(format!("--hugepages={h}"));
    }
    let (code, events, stderr) = run_host(&args)?;
    let s1 = find(&events, "rfc-stage1");
    let s2 = find(&events, "rfc-stage2");
    let failed = find(&events, "rfc-failed");
    let private: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "rfc-private")
        .collect();
    let ok = code == 0
        && s2.is_some_and(|v| v["ok"] == true)
        && ((!a.private && huge == 0) || private.len() == 2);
    let g = |v: Option<&Value>, k: &str| v.map_or(Value::Null, |v| v[k].clone());
    let summary = json!({
        "ok": ok,
        "verified_bytes": g(s2, "verified_bytes").as_u64().unwrap_or(0),
        "blackout_us": g(s2, "blackout_us"),
        "handover_bytes": g(s2, "handover_bytes"),
        "guest_mem_bytes": a.guest_mem,
        "data_bytes": a.data,
        "preserved_folios": g(s2, "preserved_folios"),
        "guest_write_ms": g(s1, "write_ms"),
        "phases_us": g(s2, "phases_us"),
        "vm_name": g(s2, "vm_name"),
        "order": g(s2, "order"),
        "error": failed.map(|f| f["error"].clone()),
        "private_checks": private,
    });
    if a.json {
        println!("{summary}");
    } else if ok {
        let p = &summary["phases_us"];
        let f = |k: &str| p[k].as_f64().unwrap_or(0.0);
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        println!(
            "handover demo: live update of the host under a running KVM guest (real /dev/kvm)"
        );
        println!(
            "  guest      wrote {:.1} MiB at 4 GiB into a {:.0} MiB guest_memfd ({} folios), in {:.1} ms",
            mib(a.data),
            mib(a.guest_mem),
            summary["preserved_folios"],
            summary["guest_write_ms"].as_f64().unwrap_or(0.0)
        );
        println!(
            "  preserve   VM, guest_memfd and low memory while the guest ran: {:.0} us",
            f("preserve_while_running")
        );
        println!("  kexec      execve of the host image; {} KiB of handover metadata, no guest page copied", summary["handover_bytes"].as_u64().unwrap_or(0) >> 10);
        println!(
            "  verified   {} bytes, checked by the same guest after the update ({})",
            summary["verified_bytes"],
            summary["vm_name"].as_str().unwrap_or("")
        );
        println!(
            "  blackout   {:.2} ms, the largest gap the guest saw between two clock reads",
            summary["blackout_us"].as_f64().unwrap_or(0.0) / 1e3
        );
        for c in &private {
            println!(
                "  private    stage {}: the first {} KiB converted to shared read back through mmap, the {} private pages refused to the host",
                c["stage"], c["shared_bytes_checked"].as_u64().unwrap_or(0) >> 10, c["private_pages"]
            );
            if huge > 0 {
                println!(
                    "  hugepages  stage {}: {} pages in whole order-{huge} folios, {} in folios split to 4 KiB; pool {}",
                    c["stage"], c["huge_folio_pages"], c["split_pages"], c["hugepages"]
                );
            }
        }
        println!(
            "  phases     pause {:.0} us, save vCPU {:.0} us, freeze+finalize {:.0} us, exec {:.0} us, boot {:.0} us, retrieve {:.0} us, resume {:.0} us",
            f("pause"), f("save_state"), f("freeze_and_finalize"), f("exec"), f("boot"), f("retrieve"), f("resume")
        );
    } else {
        let why = failed.map_or_else(
            || format!("host image exited with {code}"),
            |f| f["error"].as_str().unwrap_or("").to_string(),
        );
        println!("handover demo FAILED: {why}");
        if !stderr.is_empty() {
            println!("host image log:\n{stderr}");
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `handover demo --vms N --vcpus M`: N VMs of M vCPUs through one update.
fn fleet(a: &DemoArgs) -> Result<ExitCode, String> {
    let data = vec![a.data, (a.data * 2).min(a.guest_mem)];
    let total: u64 = (0..a.vms).map(|i| data[i as usize % 2]).sum();
    let spec = crate::bench::fleet::Spec {
        vms: a.vms,
        vcpus: a.vcpus,
        guest_mem: a.guest_mem,
        data,
        updates: 1,
        workers: 0,
        idle_us: 1000,
        ram: a.ram.max(super::bench_fleet::ram_for(total)),
    };
    let p = crate::bench::fleet::run(&spec)?;
    if a.json {
        println!("{}", serde_json::to_string(&p).map_err(|e| e.to_string())?);
    } else {
        println!(
            "handover demo: live update of the host under {} running KVM guests of {} vCPUs each (real /dev/kvm, in-kernel irqchips)",
            a.vms, a.vcpus
        );
        super::bench_fleet::print(&p);
        if p.ok {
            println!(
                "  verified   every vCPU checked its own region after the update, and each VM's shared counter equals the sum of its vCPUs' counts"
            );
        }
    }
    Ok(if p.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
