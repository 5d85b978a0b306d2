//! Errors as user space sees them: an errno value. A leaf: the subsystems' error types convert
//! into it where they are defined (`From<KhoError>` in `kho`, `From<MmError>` in `mm`).

use std::fmt;

/// A Linux errno value (positive, as in `errno`), the error of every user-API call the host
/// serves.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Errno(pub i32);

macro_rules! errnos {
    ($($name:ident),* $(,)?) => {
        impl Errno {
            $(
                #[doc = concat!("`", stringify!($name), "`, with the value of `libc::", stringify!($name), "`.")]
                pub const $name: Errno = Errno(libc::$name);
            )*
            /// The symbolic name (`"EINVAL"`), or `"E?"` for a value outside this table.
            pub fn name(self) -> &'static str {
                match self.0 {
                    $(libc::$name => stringify!($name),)*
                    _ => "E?",
                }
            }
        }
    };
}

errnos!(
    EPERM, ENOENT, EIO, E2BIG, EBADF, EAGAIN, ENOMEM, EFAULT, EBUSY, EEXIST, ENODEV, EINVAL,
    ENFILE, EMFILE, ENOTTY, EFBIG, ENOSPC, ESPIPE, EROFS, ERANGE, ENOSYS, EOPNOTSUPP, EOVERFLOW,
    EACCES, EHWPOISON, EINTR
);

impl Errno {
    /// Wrap a raw (positive) errno value, unchecked; one outside the table prints as `E?`.
    pub fn from_raw(v: i32) -> Errno {
        Errno(v)
    }
}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.name())
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({})",
            self.name(),
            std::io::Error::from_raw_os_error(self.0)
        )
    }
}

impl std::error::Error for Errno {}

/// The result of a system call: a value or an errno.
pub type SysResult<T> = Result<T, Errno>;
