#![deny(missing_docs)]
//! handover: live update of a KVM host with guest memory preserved.
//!
//! The host kernel runs as a process (the *host image*); its RAM is a memfd that survives
//! `execve`, which plays kexec. See ARCHITECTURE.md for the flow of one live update.

pub mod abi;
pub mod bench;
pub mod boundary;
pub mod cli;
pub mod fault;
pub mod fs;
#[cfg(feature = "test-hooks")]
pub mod fuzzing;
pub mod host;
pub mod init;
pub mod kexec;
pub mod kho;
pub mod kvm;
pub mod luo;
pub mod mm;
pub mod par;
pub mod registry;
pub mod time;
pub mod uapi;
/// User space of the host: a small VMM, guest programs and the selftest scenarios, reaching
/// the host only through its user API.
pub mod vmm;
