//! Subcommands of the `handover` binary.

pub mod bench;
pub mod bench_fleet;
mod bench_sweep;
pub mod boot;
pub mod demo;
pub mod guest_image;
pub mod inspect;
pub mod live_snapshot;
pub mod run;
pub mod soak;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "handover",
    version,
    about = "Live update of a KVM host with guest memory preserved"
)]
/// The `handover` command line.
pub struct Cli {
    /// More log output (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// The subcommand to run.
    #[command(subcommand)]
    pub cmd: Command,
}

/// `handover boot ...` alone: the command line every host image of a live update is started
/// with. Parsing it builds only this subcommand's parser, not the whole tree (~0.2 ms less
/// inside the guests' blackout); it accepts exactly what `handover boot` accepts.
#[derive(Parser, Debug)]
#[command(
    name = "handover",
    version,
    about = "Live update of a KVM host with guest memory preserved"
)]
pub struct BootCli {
    /// As [`Cli::verbose`].
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// The one subcommand.
    #[command(subcommand)]
    pub cmd: BootOnly,
}

/// The one subcommand of [`BootCli`].
#[derive(Subcommand, Debug)]
pub enum BootOnly {
    /// Boot a host image (cold, or from a KHO handover when the previous image passes one) and
    /// run an init program.
    Boot(Box<boot::BootArgs>),
}

impl Cli {
    /// Parse this process's command line: `boot` by its own parser (see [`BootCli`]), anything
    /// else by the full one.
    pub fn parse_args() -> Cli {
        if std::env::args_os().nth(1).is_some_and(|a| a == "boot") {
            let BootCli { verbose, cmd } = BootCli::parse();
            let BootOnly::Boot(a) = cmd;
            return Cli {
                verbose,
                cmd: Command::Boot(a),
            };
        }
        Cli::parse()
    }
}

/// The subcommands of `handover`.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// The main job: run a live update end to end and say what happened.
    Demo(demo::DemoArgs),
    /// Boot a host image (cold, or from a KHO handover when the previous image passes one) and
    /// run an init program.
    Boot(Box<boot::BootArgs>),
    /// Decode a handover dump into readable text.
    Inspect(inspect::InspectArgs),
    /// Benchmarks.
    Bench(Box<bench::BenchArgs>),
    /// Boot a host image and run an ordinary Linux program as its user space (LD_PRELOAD
    /// boundary): `handover run [--kexecs N] -- PROGRAM [ARGS]`.
    Run(run::RunCmd),
    /// One guest through many live updates in a row: failures, leaked frames, memory use.
    Soak(soak::SoakArgs),
    /// Write the test guest's low-memory image to a file (for VMMs outside this crate).
    #[command(hide = true)]
    GuestImage(guest_image::GuestImageArgs),
}

/// Log to stderr through `tracing` at the level `-v` asks for (info, debug, trace), unless
/// `RUST_LOG` is set. A second call does nothing.
pub fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => tracing::Level::INFO,
        1 => tracing::Level::DEBUG,
        _ => tracing::Level::TRACE,
    };
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    // Without RUST_LOG a plain level filter: an `EnvFilter` costs ~0.1 ms to build, and every
    // host image of a live update starts inside the guests' blackout.
    let filter = match std::env::var_os("RUST_LOG") {
        Some(_) => tracing_subscriber::EnvFilter::try_from_default_env().ok(),
        None => None,
    };
    let b = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .without_time()
        .with_ansi(ansi)
        .with_target(false);
    let _ = match filter {
        Some(f) => b.with_env_filter(f).try_init(),
        None => b.with_max_level(level).try_init(),
    };
}

/// Run the subcommand; `Err` is the one-line message the binary prints.
pub fn run(cli: Cli) -> Result<ExitCode, String> {
    match cli.cmd {
        Command::Demo(a) => demo::run(a),
        Command::Boot(a) => boot::run(*a),
        Command::Inspect(a) => inspect::run(a),
        Command::Bench(a) => bench::run(*a),
        Command::Soak(a) => soak::run(a),
        Command::Run(a) => run::run(a),
        Command::GuestImage(a) => guest_image::run(a),
    }
}
