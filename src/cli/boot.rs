//! `handover boot`: the host image's entry point, cold or after a kexec.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::bench::snapshot::SnapshotRestore;
use crate::host::Host;
use crate::init::{Entry, InitOutcome, InitPrograms, Program};
use crate::kexec::params::{default_scratch_size, parse_range, parse_size};
use crate::kexec::{BootParams, KexecRequest};
use crate::kho::KhoBootArgs;
use crate::mm::{HugePageRequest, PAGE_SIZE};
use crate::vmm::{rfc, selftests};

#[derive(Args, Debug)]
/// Arguments of `handover boot`; the hidden ones are written by the previous image
/// (`BootParams::to_args`).
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
    /// VM file preservation format: v2 (irqchip, PIT, routing, clock; default) or v1 (the
    /// RFC's: the VM type only).
    #[arg(long, default_value = "v2")]
    pub vm_luo: String,
    /// Write a dump of the outgoing handover here at each kexec (for `handover inspect`).
    #[arg(long)]
    pub dump_handover: Option<PathBuf>,
    /// Huge-page pool reserved at boot and kept by every image after a kexec: `2M:N,1G:M`
    /// (2 MiB and 1 GiB pages; either part may be left out). A cold boot fails if RAM cannot
    /// hold it.
    #[arg(long, value_parser = HugePageRequest::parse)]
    pub hugepages: Option<HugePageRequest>,
    // Set by the previous image on a KHO boot.
    /// Number of the inherited RAM memfd.
    #[arg(long, hide = true)]
    pub ram_fd: Option<i32>,
    /// Handover tree, `PA:SIZE`.
    #[arg(long, hide = true, value_parser = parse_range)]
    pub kho_fdt: Option<(u64, u64)>,
    /// Scratch zone, `PA:SIZE`.
    #[arg(long, hide = true, value_parser = parse_range)]
    pub kho_scratch: Option<(u64, u64)>,
    /// CRC-32 of the handover tree.
    #[arg(long, hide = true)]
    pub kho_fdt_crc: Option<u32>,
    /// CLOCK_MONOTONIC ns at which the previous image started its reboot path.
    #[arg(long, hide = true)]
    pub kexec_start_ns: Option<u64>,
    /// CLOCK_MONOTONIC ns right before the previous image's `execve`.
    #[arg(long, hide = true)]
    pub exec_ns: Option<u64>,
    /// Handover metadata bytes the previous image wrote.
    #[arg(long, hide = true)]
    pub handover_bytes: Option<u64>,
    /// pidfd of the previous image's reaper (checked before use).
    #[arg(long, hide = true)]
    pub reaper_fd: Option<i32>,
    /// Passed by images older than `--reaper-fd`: accepted so that they can still kexec into
    /// this one, and never used (a pid can be reused; nothing is ever signalled by pid).
    #[arg(long, hide = true)]
    pub reaper_pid: Option<String>,
    /// The image that booted this one (where a rollback goes).
    #[arg(long, hide = true)]
    pub prev_image: Option<PathBuf>,
    /// This boot is a rollback: why the next image refused the handover.
    #[arg(long, hide = true)]
    pub rollback: Option<String>,
}

impl BootArgs {
    /// A cold boot with `ram` bytes of RAM and every other argument at its default.
    pub fn cold(ram: u64) -> BootArgs {
        BootArgs {
            ram,
            init: None,
            init_args: Vec::new(),
            report: None,
            next_image: None,
            liveupdate: "on".into(),
            gmem_luo: "v2".into(),
            vm_luo: "v2".into(),
            dump_handover: None,
            hugepages: None,
            ram_fd: None,
            kho_fdt: None,
            kho_scratch: None,
            kho_fdt_crc: None,
            kexec_start_ns: None,
            exec_ns: None,
            handover_bytes: None,
            reaper_fd: None,
            reaper_pid: None,
            prev_image: None,
            rollback: None,
        }
    }
}

/// The boot parameters the arguments say; `Err` for a bad `--liveupdate` or `--gmem-luo`
/// value, only one of `--kho-fdt`/`--kho-scratch`, or (cold boot) a `--hugepages` request
/// that RAM can never hold. After a kexec the request is not checked here: the boot reserves
/// what fits and never fails for it.
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
    let hugepages = a.hugepages.unwrap_or_default();
    if kho.is_none() {
        hugepages.check_fits(
            a.ram / PAGE_SIZE,
            0..default_scratch_size(a.ram) / PAGE_SIZE,
        )?;
    }
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
        vm_luo_v1: match a.vm_luo.as_str() {
            "v1" => true,
            "v2" => false,
            other => return Err(format!("--vm-luo {other:?}: expected v1 or v2")),
        },
        prev_handover_bytes: a.handover_bytes,
        reaper_fd: a.reaper_fd,
        prev_image: a.prev_image,
        rollback: a.rollback,
        dump_handover: a.dump_handover,
        hugepages,
    })
}

/// The init programs of this image, in `--init list` order: the composition root's registry
/// (the programs live in `vmm` and `init`, which do not know each other).
pub fn init_programs() -> InitPrograms {
    let mut p = InitPrograms::default();
    let table = |&(name, about): &(&'static str, &'static str)| Program {
        name,
        about,
        entry: Entry::Named(selftests::run),
    };
    for t in selftests::PROGRAMS {
        p.add(table(t));
    }
    p.add(Program {
        name: rfc::PROGRAM,
        about: "the RFC scenario with a live guest (guest-mem=16M data=5M order=vm-first|gmem-first no-vm=1 finish-early=1 prefault=1)",
        // With the benchmark's baseline for `snapshot-dir` (the VMM does not know `bench`).
        entry: Entry::Owned(|host| rfc::run_with(host, Some(&SnapshotRestore))),
    });
    p.add(Program {
        name: crate::vmm::fleet::PROGRAM,
        about: crate::vmm::fleet::ABOUT,
        entry: Entry::Owned(crate::vmm::fleet::run),
    });
    p.add(Program {
        name: crate::boundary::run::NAME,
        about: crate::boundary::run::ABOUT,
        entry: Entry::Owned(crate::boundary::run::run_owned),
    });
    #[cfg(feature = "test-hooks")]
    p.add(Program {
        name: crate::init::kho::NAME,
        about: crate::init::kho::ABOUT,
        entry: Entry::InPlace(crate::init::kho::run),
    });
    for t in selftests::TEST_PROGRAMS {
        p.add(table(t));
    }
    p
}

/// `handover boot`: boot, run the init program, then halt with its exit code or kexec (exit 1
/// if the kexec fails). `--init list` prints the programs instead.
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
        for p in init_programs().iter() {
            println!("{:20} {}", p.name(), p.about());
        }
        return Ok(ExitCode::SUCCESS);
    }
    let p = params(a)?;
    let host = Host::boot(p).map_err(|e| e.to_string())?;
    let (mut host, outcome) = init_programs().run(host);
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

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    /// `BootParams::to_args`, parsed as the next image's command line, gives the same params.
    fn round_trip(p: &BootParams) -> BootParams {
        let argv = std::iter::once("handover".into()).chain(p.to_args());
        let cli = Cli::try_parse_from(argv).expect("the builder's command line parses");
        let Command::Boot(a) = cli.cmd else {
            panic!("not `boot`: {:?}", cli.cmd)
        };
        params(*a).expect("valid params")
    }

    #[test]
    fn cmdline_parses_back_into_the_same_params() {
        let every = BootParams {
            ram_size: 3 << 30,
            ram_fd: Some(7),
            kho: Some(KhoBootArgs {
                fdt_pa: 0x12_3000,
                fdt_size: 0x4000,
                scratch_pa: 0,
                scratch_size: 64 << 20,
                fdt_crc: Some(0xdead_beef),
            }),
            liveupdate: false,
            init: Some("gmem-rfc".into()),
            // Values that look like flags, contain `=`, or are empty stay values.
            init_args: vec![
                "guest-mem=16M".into(),
                "-x".into(),
                "--init=y".into(),
                "a=b=c".into(),
                String::new(),
            ],
            report: Some(PathBuf::from("/tmp/a dir/report.jsonl")),
            next_image: Some(PathBuf::from("/opt/next")),
            kexec_start_ns: Some(1),
            exec_ns: Some(u64::MAX),
            prev_handover_bytes: Some(4096),
            prev_image: Some(PathBuf::from("/opt/prev")),
            rollback: Some("--refused: bad \"compatible\"\nsecond line".into()),
            reaper_fd: Some(9),
            gmem_luo_v1: true,
            vm_luo_v1: true,
            dump_handover: Some(PathBuf::from("h.dump")),
            hugepages: HugePageRequest {
                count_2m: 512,
                count_1g: 1,
            },
        };
        assert_eq!(round_trip(&every), every);
        let cold = BootParams::default();
        assert_eq!(round_trip(&cold), cold);
    }

    /// The normal kexec and the rollback exec hand on the same chain-wide flags
    /// (`BootParams::next`), `--dump-handover` included.
    #[test]
    fn next_image_keeps_the_chain_wide_flags() {
        let me = BootParams {
            liveupdate: false,
            gmem_luo_v1: true,
            vm_luo_v1: true,
            init: Some("luo-kexec-simple".into()),
            init_args: vec!["k=v".into()],
            report: Some("r.jsonl".into()),
            next_image: Some("/opt/next".into()),
            dump_handover: Some("h.dump".into()),
            hugepages: HugePageRequest {
                count_2m: 0,
                count_1g: 2,
            },
            // Set by the previous image for this one only.
            exec_ns: Some(5),
            prev_image: Some("/opt/prev".into()),
            rollback: Some("refused".into()),
            ..BootParams::default()
        };
        let kho = KhoBootArgs {
            fdt_pa: 0x1000,
            fdt_size: 0x1000,
            scratch_pa: 0,
            scratch_size: 16 << 20,
            fdt_crc: None,
        };
        let next = me.next(1 << 30, 5, kho);
        assert_eq!(
            next,
            BootParams {
                ram_size: 1 << 30,
                ram_fd: Some(5),
                kho: Some(kho),
                exec_ns: None,
                prev_image: None,
                rollback: None,
                ..me.clone()
            }
        );
        assert_eq!(round_trip(&next), next);
    }

    fn boot_args(argv: &[&str]) -> Result<BootArgs, String> {
        let argv = ["handover", "boot"].iter().chain(argv).copied();
        match Cli::try_parse_from(argv).map_err(|e| e.to_string())?.cmd {
            Command::Boot(a) => Ok(*a),
            other => panic!("not `boot`: {other:?}"),
        }
    }

    /// `--hugepages` reaches the params; bad sizes and requests RAM cannot hold are refused
    /// with a message that says why, the latter only on a cold boot.
    #[test]
    fn hugepages_flag() {
        let p = params(boot_args(&["--ram", "1G", "--hugepages", "2M:4"]).unwrap()).unwrap();
        assert_eq!(
            p.hugepages,
            HugePageRequest {
                count_2m: 4,
                count_1g: 0
            }
        );
        assert!(p
            .to_args()
            .contains(&std::ffi::OsString::from("--hugepages=2M:4")));
        let p = params(boot_args(&["--ram", "4G", "--hugepages=1G:3,2M:478"]).unwrap()).unwrap();
        assert_eq!((p.hugepages.count_1g, p.hugepages.count_2m), (3, 478));
        let none = params(boot_args(&[]).unwrap()).unwrap();
        assert!(none.hugepages.is_empty());
        assert!(!none
            .to_args()
            .iter()
            .any(|a| a.to_string_lossy().contains("hugepages")));

        let e = boot_args(&["--hugepages", "4M:1"]).unwrap_err();
        assert!(e.contains("not supported (2M or 1G)"), "{e}");
        let e = boot_args(&["--hugepages", "2M"]).unwrap_err();
        assert!(e.contains("SIZE:COUNT"), "{e}");
        // 1 GiB of RAM holds no whole 1 GiB page beside scratch; 16 MiB of scratch and the
        // 4 MiB the pool leaves to the host leave 502 2 MiB pages.
        let e = params(boot_args(&["--ram", "1G", "--hugepages", "1G:1"]).unwrap()).unwrap_err();
        assert!(e.contains("room for 0 1 GiB"), "{e}");
        assert!(params(boot_args(&["--ram", "1G", "--hugepages", "2M:502"]).unwrap()).is_ok());
        let e = params(boot_args(&["--ram", "1G", "--hugepages", "2M:503"]).unwrap()).unwrap_err();
        assert!(e.contains("room for 502 2 MiB"), "{e}");
        // After a kexec the boot reserves what fits instead.
        let kexec = [
            "--ram",
            "1G",
            "--hugepages",
            "1G:1",
            "--kho-fdt",
            "0x1000:4096",
            "--kho-scratch",
            "0:0x1000000",
        ];
        assert!(params(boot_args(&kexec).unwrap()).is_ok());
    }
}
