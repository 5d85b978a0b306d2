//! The `handover` command line.

use std::process::ExitCode;

fn main() -> ExitCode {
    handover::time::mark_main();
    let cli = handover::cli::Cli::parse_args();
    handover::cli::init_logging(cli.verbose);
    match handover::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("handover: {e}");
            ExitCode::from(1)
        }
    }
}
