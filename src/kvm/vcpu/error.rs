//! The errors of the vCPU helpers.

/// Errors of the vCPU helpers. Decoding a saved state has its own,
/// [`VcpuStateError`](crate::abi::vcpu_state::VcpuStateError).
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM ioctl failed.
    #[error("{op}: {source}")]
    Kvm {
        /// The ioctl.
        op: &'static str,
        /// Its error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// `KVM_SET_MSRS` stopped before the end of the list.
    #[error("KVM_SET_MSRS accepted {done} of {total} MSRs; MSR {index:#x} was refused")]
    MsrRefused {
        /// MSRs written.
        done: usize,
        /// MSRs to write.
        total: usize,
        /// The refused MSR.
        index: u32,
    },
    /// More entries than KVM accepts in one call.
    #[error("too many {what}: {count} (at most {max})")]
    TooMany {
        /// What was counted.
        what: &'static str,
        /// How many there are.
        count: usize,
        /// How many KVM accepts.
        max: usize,
    },
    /// [`complete_pending_io`](super::complete_pending_io) got an exit instead of `EINTR`.
    #[error("KVM_RUN with immediate_exit returned an exit ({0}) instead of EINTR")]
    NotSettled(String),
    /// A system call of the kicker failed.
    #[error("{op}: {source}")]
    Sys {
        /// The system call.
        op: &'static str,
        /// Its error.
        #[source]
        source: std::io::Error,
    },
}

pub(super) fn kvm_err(op: &'static str) -> impl Fn(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Kvm { op, source }
}

/// `true` for the errnos with which KVM says "this vCPU/VM does not have that state".
pub(super) fn is_unsupported(e: &kvm_ioctls::Error) -> bool {
    matches!(
        e.errno(),
        libc::EINVAL | libc::ENOTTY | libc::ENXIO | libc::EOPNOTSUPP
    )
}
