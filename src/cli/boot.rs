//! `handover boot`: the host image's entry point, cold or after a kexec.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::host::Host;
use crate::init::{self, InitOutcome};
use crate::kexec::params::{parse_range, parse_size};
use crate::kexec::{BootParams, KexecRequest};
use crate::kho::KhoBootArgs;

#[derive(Args, Debug)]
pub struct BootArgs {
    /// RAM size (sparse memfd), e.g. 4G.
    #[arg(long, default_value = "4G", value_parser = parse_size)]
    pub ram: u64,
    /// Init program to run after boot (see `--init list`; `kho-test` and `luo-freeze-fail` need
    /// a build with the `test-hooks` feature).
    #[arg(long)]
    pub init: Option<String>,
    /// Argument for the init program, KEY=VALUE (repeatable).
    #[arg(long = "init-arg")]
    pub init_args: Vec<String>,
    /// Append JSON-lines events of every boot to this file.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Image to kexec into (default: this binary).
    #[arg(long)]
    pub next_image: Option<PathBuf>,
    /// liveupdate=on|off.
    #[arg(long, default_value = "on")]
    pub liveupdate: String,
    /// guest_memfd preservation format: v2 (runs, default) or v1 (the RFC's per-folio list).
    #[arg(long, default_value = "v2")]
    pub gmem_luo: String,
    /// Write a dump of the outgoing handover here at each kexec (for `handover inspect`).
    #[arg(long)]
    pub dump_handover: Option<PathBuf>,
    // Set by the previous image on a KHO boot.
    #[arg(long, hide = true)]
    pub ram_fd: Option<i32>,
    #[arg(long, hide = true, value_parser = parse_range)]
    pub kho_fdt: Option<(u64, u64)>,
    #[arg(long, hide = true, value_parser = parse_range)]
    pub kho_scratch: Option<(u64, u64)>,
    #[arg(long, hide = true)]
    pub kho_fdt_crc: Option<u32>,
    #[arg(long, hide = true)]
    pub kexec_start_ns: Option<u64>,
    #[arg(long, hide = true)]
    pub exec_ns: Option<u64>,
    #[arg(long, hide = true)]
    pub handover_bytes: Option<u64>,
    /// pidfd of the previous image's reaper (checked before use).
    #[arg(long, hide = true)]
    pub reaper_fd: Option<i32>,
    /// Passed by images older than `--reaper-fd`: accepted so that they can still kexec into
    /// this one, and never used (a pid can be reused; nothing is ever signalled by pid).
    #[arg(long, hide = true)]
    pub reaper_pid: Option<String>,
    #[arg(long, hide = true)]
    pub prev_image: Option<PathBuf>,
    #[arg(long, hide = true)]
    pub rollback: Option<String>,
}

pub fn params(a: BootArgs) -> Result<BootParams, String> {
    let kho = match (a.kho_fdt, a.kho_scratch) {
        (Some((fdt_pa, fdt_size)), Some((scratch_pa, scratch_size))) => Some(KhoBootArgs {
            fdt_pa,
            fdt_size,
            scratch_pa,
            scratch_size,
            fdt_crc: a.kho_fdt_crc,
        }),
        (None, None) => None,
        _ => return Err("--kho-fdt and --kho-scratch go together".into()),
    };
    let liveupdate = match a.liveupdate.as_str() {
        "on" | "1" | "y" | "yes" | "true" => true,
        "off" | "0" | "n" | "no" | "false" => false,
        other => return Err(format!("liveupdate={other:?} is not a boolean")),
    };
    Ok(BootParams {
        ram_size: a.ram,
        ram_fd: a.ram_fd,
        kho,
        liveupdate,
        init: a.init,
        init_args: a.init_args,
        report: a.report,
        next_image: a.next_image,
        kexec_start_ns: a.kexec_start_ns,
        exec_ns: a.exec_ns,
        gmem_luo_v1: match a.gmem_luo.as_str() {
            "v1" => true,
            "v2" => false,
            other => return Err(format!("--gmem-luo {other:?}: expected v1 or v2")),
        },
        prev_handover_bytes: a.handover_bytes,
        reaper_fd: a.reaper_fd,
        prev_image: a.prev_image,
        rollback: a.rollback,
        dump_handover: a.dump_handover,
    })
}

pub fn run(a: BootArgs) -> Result<ExitCode, String> {
    if a.init.as_deref() == Some("list") {
        // First line: whether this build has the test hooks (HANDOVER_FAIL, HANDOVER_CORRUPT,
        // /dev/liveupdate-test and the programs that need them). Production builds do not.
        let hooks = if cfg!(feature = "test-hooks") {
            "on"
        } else {
            "off"
        };
        println!("# test-hooks: {hooks}");
        let rfc = [(crate::vmm::rfc::PROGRAM, "the RFC scenario with a live guest (guest-mem=16M data=5M order=vm-first|gmem-first no-vm=1 finish-early=1 prefault=1)")];
        for (name, what) in init::PROGRAMS
            .iter()
            .chain(crate::vmm::selftests::PROGRAMS)
            .chain(rfc.iter())
            .chain(init::TEST_PROGRAMS)
            .chain(crate::vmm::selftests::TEST_PROGRAMS)
        {
            println!("{name:20} {what}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let p = params(a)?;
    let host = Host::boot(p).map_err(|e| e.to_string())?;
    let (mut host, outcome) = init::run(host);
    match outcome {
        InitOutcome::Halt(code) => {
            host.release_previous_image(true);
            Ok(ExitCode::from(code.clamp(0, 255) as u8))
        }
        InitOutcome::Kexec => {
            let Err(e) = host.kexec(KexecRequest::default());
            tracing::error!("{e}");
            host.report(
                "kexec-failed",
                serde_json::json!({ "error": e.to_string() }),
            );
            Ok(ExitCode::from(1))
        }
    }
}
