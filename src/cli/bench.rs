//! `handover bench`: benchmarks.

use std::process::ExitCode;

use clap::{Args, Subcommand};

use crate::kexec::params::parse_size;

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchWhat,
}

#[derive(Subcommand, Debug)]
pub enum BenchWhat {
    /// Preserve, hand over and restore SIZE of 4 KiB folios; ns per page and tracker size.
    Kho {
        #[arg(long, default_value = "16G", value_parser = parse_size)]
        size: u64,
        #[arg(long, default_value_t = 3)]
        runs: usize,
        #[arg(long)]
        json: bool,
    },
}

pub fn run(a: BenchArgs) -> Result<ExitCode, String> {
    match a.what {
        BenchWhat::Kho { size, runs, json } => {
            let r = crate::bench::kho::run(size, runs).map_err(|e| e.to_string())?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&r).map_err(|e| e.to_string())?
                );
            } else {
                println!("KHO: {} GiB of 4 KiB folios ({} pages), {} runs, ns per page (median [min..max])", size >> 30, r.runs[0].pages, r.runs.len());
                let line = |n: &str, s: crate::bench::Spread| {
                    println!("  {n:10} {:7.1} [{:.1}..{:.1}]", s.median, s.min, s.max)
                };
                line("preserve", r.preserve_ns_per_page);
                line("handover", r.handover_ns_per_page);
                line("restore", r.restore_ns_per_page);
                println!(
                    "  tracker    {:.0} bytes per GiB",
                    r.tracker_bytes_per_gib.median
                );
                for (i, x) in r.runs.iter().enumerate() {
                    println!("  run {i}: preserve {:.1} list {:.1} handover {:.1} ({:.1} ms) restore {:.1} ns/page", x.preserve_ns_per_page, x.list_ns_per_page, x.handover_ns_per_page, x.handover_total_ms, x.restore_ns_per_page);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
