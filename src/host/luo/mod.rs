//! LUO on the host: the device, sessions, files, and the kexec path.

mod core;
mod ctx;
mod file;
mod serialize;
mod session;
