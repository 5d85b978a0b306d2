//! Errors as user space sees them: an errno value (defined with the wire formats, in
//! [`crate::abi::errno`]).

pub use crate::abi::errno::{Errno, SysResult};
