//! Errors of the guest-image builder and vCPU setup.

/// Errors of the guest-image builder.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// The low-memory buffer is smaller than the image.
    #[error("low memory image needs {need} bytes, buffer has {got}")]
    LowMemTooSmall { need: usize, got: usize },
    /// A mailbox buffer shorter than [`MAILBOX_LEN`](super::MAILBOX_LEN).
    #[error("mailbox buffer needs {need} bytes, got {got}")]
    MailboxTooSmall { need: usize, got: usize },
    /// The data region overlaps the image, leaves the identity map, or wraps.
    #[error("data region {gpa:#x}+{len:#x} must lie in [{min:#x}, {max:#x})")]
    DataRange {
        gpa: u64,
        len: u64,
        min: u64,
        max: u64,
    },
    /// A mode value that is not one of the `MODE_*` constants.
    #[error("unknown guest mode {0}")]
    BadMode(u64),
    /// A KVM ioctl failed while configuring the vCPU.
    #[error("{op}: {source}")]
    Kvm {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
}
