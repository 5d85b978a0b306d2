//! Files: memfd and its LUO handler. The open-file table and the kinds of file are at the
//! composition root ([`crate::host::files`]).

pub mod file;
pub mod memfd;
pub mod memfd_luo;

pub use file::{FileId, TestFile};
pub use memfd::Memfd;

/// Compatibility path for `vmm::rfc` until its split lands (then it names
/// [`crate::host::files::FileKind`] and this goes).
#[doc(hidden)]
pub use crate::host::files::FileKind;
