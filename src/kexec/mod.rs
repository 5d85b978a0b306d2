//! kexec of the host image: the boot parameters one image passes to the next, the boot path
//! that adopts RAM and the handover, and the reboot path that finalizes and `execve`s.

pub mod boot;
/// Handover corruption (test hook).
#[cfg(feature = "test-hooks")]
pub mod corrupt;
pub mod params;
pub mod reboot;

pub use boot::BootInfo;
pub use params::BootParams;
pub use reboot::{KexecError, KexecRequest};

/// The release string this image writes into `kexec-metadata`.
pub fn release() -> String {
    format!("handover {}", env!("CARGO_PKG_VERSION"))
}
