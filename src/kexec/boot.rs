//! Boot of a host image: cold (new RAM) or KHO (RAM and handover inherited from the previous
//! image). The order matters and mirrors Linux: scratch first, then the handover is validated
//! and every preserved frame reserved, and only then does the normal zone hand anything out.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use crate::kho;
use crate::mm::MmError;

use super::exec::exec_image;
use super::params::BootParams;

/// Why a host image could not boot.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Creating, adopting or mapping RAM, or setting up the allocator, failed.
    #[error("cannot set up RAM: {0}")]
    Ram(#[from] MmError),
    /// KHO could not be set up (a refused handover is not an error: the image boots clean).
    #[error("cannot set up KHO: {0}")]
    Kho(#[from] kho::KhoError),
    /// A cold boot's RAM cannot hold the `--hugepages` request (after a kexec the pool takes
    /// what fits instead: see `mm::hugetlb`).
    #[error("cannot reserve the huge-page pool (--hugepages): {0}")]
    HugePages(MmError),
    /// The `--ram-fd` number is not the RAM memfd (see [`adopt_ram_fd`]).
    #[error("--ram-fd {fd} refused: {why}")]
    RamFd {
        /// The fd number from the command line.
        fd: i32,
        /// What check it failed.
        why: String,
    },
}

/// Take the RAM memfd the previous image passed by number (`--ram-fd`). The number comes from
/// the command line, so it is checked through a borrow before this process owns it: open, not
/// stdio, a memfd (it has seals and `/proc/self/fd` names it `/memfd:...`), of the size `--ram`
/// says. A refused number is not closed. The adopted fd is close-on-exec again (the previous
/// image cleared that for the exec): children of this image do not inherit RAM.
pub fn adopt_ram_fd(fd: i32, size: u64) -> Result<OwnedFd, BootError> {
    let bad = |why: String| BootError::RamFd { fd, why };
    if fd < 3 {
        return Err(bad("stdio or negative: not the RAM memfd".into()));
    }
    // SAFETY: F_GETFD only reads this process's fd table; no memory is involved.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(bad(format!(
            "not open: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: `fd` is open (F_GETFD succeeded) and nothing closes it while `b` is used: the
    // borrow ends in this function, in early boot.
    let b = unsafe { BorrowedFd::borrow_raw(fd) };
    rustix::fs::fcntl_get_seals(b).map_err(|e| bad(format!("not a memfd (F_GET_SEALS: {e})")))?;
    // Seals alone also admit tmpfs files; the link names a memfd. Without /proc (not mounted)
    // the seals are all there is to go by.
    if let Ok(link) = std::fs::read_link(format!("/proc/self/fd/{fd}")) {
        if !link.to_string_lossy().starts_with("/memfd:") {
            return Err(bad(format!("{} is not a memfd", link.display())));
        }
    }
    let st = rustix::fs::fstat(b).map_err(|e| bad(format!("fstat: {e}")))?;
    if st.st_size as u64 != size {
        return Err(bad(format!(
            "its size {} is not the RAM size {size}",
            st.st_size
        )));
    }
    // SAFETY: checked above: an open memfd of the RAM's size, which the previous image (this
    // same process before the exec) passed to us; nothing else in this process owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC)
        .map_err(|e| BootError::Ram(MmError::Sys(e)))?;
    Ok(owned)
}

/// Kexec back into `image` with the same handover, which this image did not touch, passing on
/// RAM (`ram`) and the reaper's pidfd.
pub(crate) fn rollback_exec(
    params: &BootParams,
    ram: BorrowedFd<'_>,
    reaper: Option<BorrowedFd<'_>>,
    a: crate::kho::KhoBootArgs,
    image: &std::path::Path,
    why: &str,
) -> std::io::Error {
    tracing::error!(
        "rollback: this image cannot take the handover ({why}); kexec back into {}",
        image.display()
    );
    // What the previous image passed on comes back as it was: its handover, its timings.
    let mut back = params.next(params.ram_size, ram.as_raw_fd(), a);
    back.kexec_start_ns = params.kexec_start_ns;
    back.exec_ns = params.exec_ns;
    back.prev_handover_bytes = params.prev_handover_bytes;
    back.reaper_fd = reaper.map(|fd| fd.as_raw_fd());
    back.rollback = Some(why.to_string());
    exec_image(image, &back)
}
