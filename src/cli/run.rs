//! `handover run`: boot a host image and run an ordinary Linux program as its user space.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::boundary::run::RunArgs;
use crate::kexec::params::parse_size;
use crate::mm::HugePageRequest;

/// Arguments of `handover run`.
#[derive(Args, Debug)]
pub struct RunCmd {
    /// RAM of the host image (sparse memfd), e.g. 4G.
    #[arg(long, default_value = "4G", value_parser = parse_size)]
    pub ram: u64,
    /// Live updates to perform: each time the program exits with status 0, the host updates
    /// (kexec) and runs it again, up to this many times.
    #[arg(long, default_value_t = 0)]
    pub kexecs: u32,
    /// Run this command instead of PROGRAM after an update (words separated by spaces).
    #[arg(long)]
    pub then: Option<String>,
    /// Append JSON-lines events of every image to this file.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Huge-page pool of the host image (`2M:N,1G:M`), reserved at boot and kept across
    /// updates.
    #[arg(long, value_parser = HugePageRequest::parse)]
    pub hugepages: Option<HugePageRequest>,
    /// The program and its arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    pub program: Vec<String>,
}

/// Boot with the `run` init program; the exit status is the last program's.
pub fn run(a: RunCmd) -> Result<ExitCode, String> {
    let then = match a.then.as_deref() {
        None => None,
        Some(t) => Some(t.split_whitespace().map(str::to_string).collect::<Vec<_>>())
            .filter(|w| !w.is_empty())
            .map(Some)
            .ok_or("--then names no program")?,
    };
    let args = RunArgs {
        argv: a.program,
        then,
        kexecs: a.kexecs,
        cgroup: None,
    };
    crate::boundary::spawn::check_program(&args.argv[0])?;
    let boot = crate::cli::boot::BootArgs {
        init: Some(crate::boundary::run::NAME.into()),
        init_args: args.to_init_args(),
        report: a.report,
        hugepages: a.hugepages,
        ..crate::cli::boot::BootArgs::cold(a.ram)
    };
    crate::cli::boot::run(boot)
}
