//! Errors of the guest-image builder and vCPU setup.

/// Errors of the guest-image builder.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// The low-memory buffer is smaller than the image.
    #[error("low memory image needs {need} bytes, buffer has {got}")]
    LowMemTooSmall {
        /// Bytes the image needs (`LOW_IMAGE_SIZE`).
        need: usize,
        /// Bytes the buffer has.
        got: usize,
    },
    /// A mailbox buffer shorter than [`MAILBOX_LEN`](super::MAILBOX_LEN).
    #[error("mailbox buffer needs {need} bytes, got {got}")]
    MailboxTooSmall {
        /// Bytes the mailbox needs.
        need: usize,
        /// Bytes the buffer has.
        got: usize,
    },
    /// The data region overlaps the image, leaves the identity map, or wraps.
    #[error("data region {gpa:#x}+{len:#x} must lie in [{min:#x}, {max:#x})")]
    DataRange {
        /// Guest physical start of the data region.
        gpa: u64,
        /// Its length in bytes.
        len: u64,
        /// Lowest allowed address: the end of the low-memory image.
        min: u64,
        /// End of the identity map (exclusive).
        max: u64,
    },
    /// An SMP guest with no vCPU or more than the image holds.
    #[error("an SMP guest has 1..=16 vCPUs, not {0}")]
    SmpVcpus(u32),
    /// A mode value that is not one of the `MODE_*` constants.
    #[error("unknown guest mode {0}")]
    BadMode(u64),
    /// A KVM ioctl failed while configuring the vCPU.
    #[error("{op}: {source}")]
    Kvm {
        /// The ioctl, e.g. `KVM_SET_SREGS`.
        op: &'static str,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
}
