//! Fuzzing entry points (used by the cargo-fuzz targets under `fuzz/`).
//!
//! Every `pub fn` here takes arbitrary bytes and, by contract, never panics: it drives the
//! project's real decoders (handover tree, tracker walk, dumps, block and array chains, the
//! whole boot-time discovery, handler blobs, ioctl argument rules and the in-process ioctl
//! path) and checks a few properties of what they return. A panic is a bug in a decoder (or a
//! property that does not hold), never an expected outcome.
//!
//! Synthetic handovers are assembled as a handful of 4 KiB pages of a small RAM, turned into a
//! real dump byte stream and read back with [`Dump::parse`], so every decoder reads memory
//! through the same [`PhysRead`] implementation `handover inspect` uses.
//!
//! [`Dump::parse`]: crate::kho::dump::Dump::parse
//! [`PhysRead`]: crate::mm::PhysRead
//!
//! The harnesses, one file per concern: `image.rs` (the input cursor, a sparse RAM image and the
//! synthetic-handover builders), `decoders.rs` (`fdt`, `dump`, `tracker`, `chain`, `blobs`),
//! `template.rs` (a real handover, patched, with its checksums repaired), `ucmd.rs` (ioctl
//! argument rules), `ioctl.rs` (the in-process LUO ioctl path), [`kvm`] (the KVM ioctl path) and `boundary/`
//! (the requests of programs under `handover run`: decode and dispatch).

mod boundary;
mod decoders;
mod image;
mod ioctl;
pub mod kvm;
mod template;
mod ucmd;

pub use boundary::BoundaryFuzzer;
pub use decoders::{blobs, chain, dump, fdt, tracker};
pub use ioctl::IoctlFuzzer;
pub use kvm::KvmIoctlFuzzer;
pub use template::{handover, handover_dump, handover_template, HandoverTemplate};
pub use ucmd::ucmd;

/// A cold-booted host of `ram` bytes for a harness (`what` names it in the panic message if
/// the boot fails, which is a harness bug, not a finding).
fn small_host(ram: u64, what: &str) -> crate::host::Host {
    crate::host::Host::boot(crate::kexec::BootParams {
        ram_size: ram,
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("boot the {what} host: {e}"))
}
