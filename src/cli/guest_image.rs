//! `handover guest-image` (hidden): write the test guest's low-memory image to a file, for VMMs
//! written outside this crate (the C VMM in `tests/vmm/`), and print the vCPU state they must
//! set.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use kvm_bindings::{kvm_segment, kvm_sregs};

use crate::kexec::params::{parse_size, parse_u64};
use crate::vmm::guest::{self, GuestMode, GuestParams};

/// The guest's mode, as the image's mailbox carries it.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ImageMode {
    /// Fill the data region with the pattern, report `written` (1).
    Write,
    /// Check the data region, report `verify-ok` (2) or `verify-failed` (3).
    Verify,
}

/// Arguments of `handover guest-image`.
#[derive(Args, Debug)]
pub struct GuestImageArgs {
    /// Write the image here: the first LOW_IMAGE_SIZE bytes of guest memory, loaded at GPA 0.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// What the guest does.
    #[arg(long, value_enum, default_value = "write")]
    pub mode: ImageMode,
    /// Guest physical address of the data region (hex with 0x, or decimal).
    #[arg(long, default_value = "0x100000000", value_parser = parse_u64)]
    pub data_gpa: u64,
    /// Length of the data region, e.g. 5M.
    #[arg(long, default_value = "5M", value_parser = parse_size)]
    pub data_len: u64,
    /// Print the registers and special registers a VMM sets before the first KVM_RUN.
    #[arg(long)]
    pub print_sregs: bool,
}

/// `handover guest-image`.
pub fn run(a: GuestImageArgs) -> Result<ExitCode, String> {
    if a.out.is_none() && !a.print_sregs {
        return Err("guest-image: nothing to do (give --out FILE and/or --print-sregs)".into());
    }
    if let Some(out) = &a.out {
        let params = GuestParams {
            data_gpa: a.data_gpa,
            data_len: a.data_len,
            mode: match a.mode {
                ImageMode::Write => GuestMode::Write,
                ImageMode::Verify => GuestMode::Verify,
            },
        };
        let mut img = vec![0u8; guest::LOW_IMAGE_SIZE];
        guest::build_image(&mut img, &params).map_err(|e| format!("guest image: {e}"))?;
        std::fs::write(out, &img).map_err(|e| format!("cannot write {}: {e}", out.display()))?;
    }
    if a.print_sregs {
        print!("{}", vcpu_state_text());
    }
    Ok(ExitCode::SUCCESS)
}

fn segment_line(name: &str, s: &kvm_segment) -> String {
    format!(
        "{name} selector=0x{:x} base=0x{:x} limit=0x{:x} type=0x{:x} present={} dpl={} db={} s={} l={} g={} avl={} unusable={}\n",
        s.selector, s.base, s.limit, s.type_, s.present, s.dpl, s.db, s.s, s.l, s.g, s.avl, s.unusable
    )
}

/// The initial vCPU state as text, one register (or segment, or table) per line. `rfc_vmm
/// --print-sregs` prints the same lines for what it sets, so the two can be compared.
pub fn vcpu_state_text() -> String {
    let s = guest::initial_sregs(kvm_sregs::default());
    let r = guest::initial_regs();
    let mut t = String::new();
    for (name, seg) in [
        ("cs", &s.cs),
        ("ds", &s.ds),
        ("es", &s.es),
        ("fs", &s.fs),
        ("gs", &s.gs),
        ("ss", &s.ss),
        ("tr", &s.tr),
        ("ldt", &s.ldt),
    ] {
        t += &segment_line(name, seg);
    }
    t += &format!("gdt base=0x{:x} limit=0x{:x}\n", s.gdt.base, s.gdt.limit);
    t += &format!("idt base=0x{:x} limit=0x{:x}\n", s.idt.base, s.idt.limit);
    t += &format!(
        "cr0=0x{:x} cr2=0x{:x} cr3=0x{:x} cr4=0x{:x} cr8=0x{:x} efer=0x{:x}\n",
        s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer
    );
    t += &format!(
        "rip=0x{:x} rsp=0x{:x} rflags=0x{:x}\n",
        r.rip, r.rsp, r.rflags
    );
    t
}
