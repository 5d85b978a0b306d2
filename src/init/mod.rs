//! Init programs: what a host image runs after boot (like `init` and the selftest binaries
//! upstream runs in each stage). Each program finds its stage from what the handover holds, so
//! the same command line is reused across kexecs (`kexec --reuse-cmdline`).
//!
//! This module is the interface only: [`InitProgram`], [`InitOutcome`], [`parse_args`] and the
//! [`InitPrograms`] registry. The programs live with what they exercise (`vmm::rfc`,
//! `vmm::selftests`, `kho` with test hooks) and the registry is assembled by the composition root
//! (`cli::boot`), so nothing here depends on them.

use std::collections::BTreeMap;

use crate::host::Host;

#[cfg(feature = "test-hooks")]
pub mod kho;

/// What to do once an init program returns.
#[derive(Debug, PartialEq, Eq)]
pub enum InitOutcome {
    /// Power off with this exit status.
    Halt(i32),
    /// Kexec into the next image (same command line).
    Kexec,
}

/// `--init-arg key=value` pairs.
pub fn parse_args(args: &[String]) -> BTreeMap<String, String> {
    args.iter()
        .map(|a| match a.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (a.clone(), String::new()),
        })
        .collect()
}

/// A program a host image can run after boot (`--init NAME`).
pub trait InitProgram {
    /// The name `--init` selects it by.
    fn name(&self) -> &str;
    /// Its line in `--init list`.
    fn about(&self) -> &str;
    /// Run it. Programs that run guests share the host with their vCPU threads, so the host is
    /// passed by value and handed back.
    fn run(&self, host: Host) -> (Host, InitOutcome);
}

/// How a [`Program`] is entered.
#[derive(Clone, Copy)]
pub enum Entry {
    /// Takes the host by value and hands it back.
    Owned(fn(Host) -> (Host, InitOutcome)),
    /// Runs on the host in place.
    InPlace(fn(&mut Host) -> InitOutcome),
    /// One entry point for a table of programs, given the name (`None`: not one of its names).
    Named(fn(&mut Host, &str) -> Option<InitOutcome>),
}

/// An init program made of a name, a line of help and a function.
#[derive(Clone, Copy)]
pub struct Program {
    /// See [`InitProgram::name`].
    pub name: &'static str,
    /// See [`InitProgram::about`].
    pub about: &'static str,
    /// The function.
    pub entry: Entry,
}

impl InitProgram for Program {
    fn name(&self) -> &str {
        self.name
    }

    fn about(&self) -> &str {
        self.about
    }

    fn run(&self, mut host: Host) -> (Host, InitOutcome) {
        let o = match self.entry {
            Entry::Owned(f) => return f(host),
            Entry::InPlace(f) => f(&mut host),
            Entry::Named(f) => f(&mut host, self.name).unwrap_or_else(|| unknown(self.name)),
        };
        (host, o)
    }
}

fn unknown(name: &str) -> InitOutcome {
    tracing::error!("unknown init program {name:?}");
    InitOutcome::Halt(2)
}

/// The init programs of an image, in `--init list` order.
#[derive(Default)]
pub struct InitPrograms {
    programs: Vec<Box<dyn InitProgram>>,
}

impl InitPrograms {
    /// Add a program (after those added before it).
    pub fn add(&mut self, p: impl InitProgram + 'static) -> &mut Self {
        self.programs.push(Box::new(p));
        self
    }

    /// The programs in the order they were added.
    pub fn iter(&self) -> impl Iterator<Item = &dyn InitProgram> {
        self.programs.iter().map(|p| p.as_ref())
    }

    /// The program called `name`.
    pub fn get(&self, name: &str) -> Option<&dyn InitProgram> {
        self.iter().find(|p| p.name() == name)
    }

    /// Run the init program named on the command line (`--init`); without one, halt with 0.
    pub fn run(&self, host: Host) -> (Host, InitOutcome) {
        let Some(name) = host.params.init.clone() else {
            return (host, InitOutcome::Halt(0));
        };
        match self.get(&name) {
            Some(p) => p.run(host),
            None => (host, unknown(&name)),
        }
    }
}
