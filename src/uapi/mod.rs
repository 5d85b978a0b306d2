//! The process-facing API: what user space (VMMs, `init`, tests) can do to the host, and
//! nothing more — open a device, ioctl with the upstream argument structs, mmap, fallocate,
//! close, exit. Everything returns an errno like the syscall would. The argument of `ioctl`
//! is the user's buffer, byte for byte, so a second transport (a Unix socket serving the same
//! calls to VMM processes in other languages) only has to move bytes.

pub mod errno;
pub mod mmap;
pub mod process;

pub use errno::{Errno, SysResult};
pub use mmap::{MapId, Mapping, UserMapping};
pub use process::{FdEntry, Pid, Process, KERNEL_PID, NOFILE};

/// `O_CLOEXEC` for [`Host::open`](crate::host::Host::open)'s `flags`: the fd is close-on-exec.
pub const O_CLOEXEC: u32 = libc::O_CLOEXEC as u32;
