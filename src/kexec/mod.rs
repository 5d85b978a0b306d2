//! kexec of the host image: the boot parameters one image passes to the next and their
//! command line, the boot path that adopts RAM and the handover (or rolls back), and the reboot
//! path that finalizes and `execve`s.
//!
//! Inside, dependencies run one way: `reboot` → `boot` → `exec`, `reaper` → `cmdline` →
//! `params`. The LUO file handlers an image registers are not chosen here: the composition root
//! passes them in (`crate::registry`).

pub mod boot;
mod cmdline;
/// Handover corruption (test hook).
#[cfg(feature = "test-hooks")]
pub mod corrupt;
pub(crate) mod exec;
pub mod params;
pub(crate) mod priority;
pub mod reaper;
pub mod reboot;

pub use params::{BootInfo, BootParams};
pub use reboot::{KexecError, KexecRequest};

/// The release string this image writes into `kexec-metadata`.
pub fn release() -> String {
    format!("handover {}", env!("CARGO_PKG_VERSION"))
}
