//! The `handover` command line.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = handover::cli::Cli::parse();
    handover::cli::init_logging(cli.verbose);
    match handover::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("handover: {e}");
            ExitCode::from(1)
        }
    }
}
