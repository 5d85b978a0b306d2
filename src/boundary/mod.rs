//! The process boundary: ordinary Linux programs as the host image's user space.
//!
//! `handover run` starts a program as a process of the host image. A preload library
//! (`preload/handover_preload.c`, carried in the binary: [`spawn::PRELOAD`]) sends the calls
//! that touch host objects (`/dev/liveupdate`, host memfds, the fds made from them) over one
//! `SOCK_SEQPACKET` socketpair per process, in the format of [`crate::abi::boundary`]; the host
//! serves them with the same syscalls the in-process user API has ([`dispatch`]). Host files
//! get real fd numbers in the program (O_PATH placeholders of `/dev/null`), and `mmap` of a
//! host memfd maps the file's RAM frames from the RAM memfd itself: no copy, and what KHO
//! preserves is what the program wrote. See `docs/userspace.md`.
//!
//! - [`cgroup`]: the programs' processes frozen at an update and killed after it, as a group.
//! - [`clone_exec`]: a program started straight into its cgroup.
//! - [`conn`]: a process's socket, read with the sender's credentials.
//! - [`dispatch`]: one request served on the host.
//! - [`spawn`]: the preload library written out, static binaries refused, processes started,
//!   stopped and ended at an update.
//! - [`run`]: the init program that ties them together (`--init run`).

pub mod cgroup;
pub mod clone_exec;
pub mod conn;
pub mod dispatch;
pub mod run;
pub mod spawn;
pub mod vcpu;
