//! Files: memfd and its LUO handler. The open-file table and the kinds of file are at the
//! composition root ([`crate::host::files`]).

pub mod memfd;
pub mod memfd_luo;

pub use crate::luo::{FileId, TestFile};
pub use memfd::Memfd;
