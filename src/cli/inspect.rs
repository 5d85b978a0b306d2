//! `handover inspect`: decode a handover dump.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::kho::dump::Dump;
use crate::kho::inspect::{decoders, inspect};

#[derive(Args, Debug)]
/// Arguments of `handover inspect`.
pub struct InspectArgs {
    /// A dump written by `handover boot --dump-handover FILE` (or `handover demo --dump FILE`).
    pub dump: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Write the raw handover tree (FDT) here, e.g. for `dtc -I dtb -O dts`.
    #[arg(long)]
    pub fdt_out: Option<PathBuf>,
}

/// `handover inspect`: decode the dump and print the report; `Err` if it cannot be read.
pub fn run(a: InspectArgs) -> Result<ExitCode, String> {
    let bytes =
        std::fs::read(&a.dump).map_err(|e| format!("cannot read {}: {e}", a.dump.display()))?;
    let dump = Dump::parse(&bytes).map_err(|e| e.to_string())?;
    let args = dump.args.ok_or("dump has no handover arguments")?;
    if let Some(out) = &a.fdt_out {
        let mut fdt = vec![0u8; args.fdt_size.min(crate::abi::kho::MAX_FDT_SIZE) as usize];
        crate::mm::PhysRead::read_phys(&dump, args.fdt_pa, &mut fdt).map_err(|e| e.to_string())?;
        std::fs::write(out, &fdt).map_err(|e| format!("cannot write {}: {e}", out.display()))?;
    }
    let r = inspect(&dump, args, &decoders()).map_err(|e| e.to_string())?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&r).map_err(|e| e.to_string())?
        );
    } else {
        print!("{r}");
    }
    Ok(ExitCode::SUCCESS)
}
