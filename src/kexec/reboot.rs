//! reboot(KEXEC): finalize the handover and `execve` the next image with only the RAM memfd
//! inherited. If anything fails before the `execve` takes effect, everything is undone and the
//! running image carries on.

use std::path::PathBuf;

use crate::kho::KhoError;

use super::boot::BootError;

/// Arguments of one reboot(KEXEC) ([`Host::kexec`](crate::host::Host::kexec)).
#[derive(Debug, Default, Clone)]
pub struct KexecRequest {
    /// Image to boot; default: the image named at boot, else this binary.
    pub next_image: Option<PathBuf>,
}

/// Why a kexec (or a rollback) did not happen; the running image carries on.
#[derive(Debug, thiserror::Error)]
pub enum KexecError {
    /// KHO could not commit the previous update or finalize the handover.
    #[error("kexec refused: {0}")]
    Kho(#[from] KhoError),
    /// LUO could not freeze or serialize its sessions (every frozen file is unfrozen again).
    #[error("kexec refused: {0}")]
    Luo(#[from] crate::luo::serialize::LuoError),
    /// The next image could not be executed.
    #[error("kexec failed: cannot execute {path}: {err}")]
    Exec {
        /// The image path (`(rollback)` when there was none to try).
        path: String,
        /// The `execve` (or preparation) error.
        err: std::io::Error,
    },
}

impl KexecError {
    /// The errno `reboot(KEXEC)` returns to user space: KHO's errno, the failing handler's
    /// freeze errno, EINVAL for other LUO failures, the exec's errno (EIO if it has none).
    pub fn errno(&self) -> i32 {
        match self {
            KexecError::Kho(e) => e.errno(),
            KexecError::Luo(crate::luo::serialize::LuoError::Freeze { errno, .. }) => errno.0,
            KexecError::Luo(_) => libc::EINVAL,
            KexecError::Exec { err, .. } => err.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

/// Outcome of a failed in-process kexec of an image `H` (the host).
#[derive(Debug)]
pub enum InProcessKexecError<H> {
    /// Refused before the old image was torn down: it is handed back intact.
    Refused(Box<H>, KexecError),
    /// The new image failed to boot (the old one is gone, as after a real kexec).
    Boot(BootError),
}
