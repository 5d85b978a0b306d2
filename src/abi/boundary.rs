//! The process boundary's wire format: how a program running under `handover run` asks the host
//! image for a system call on a host object (see `docs/userspace.md`).
//!
//! One `SOCK_SEQPACKET` socketpair per user process; every request is one message: a
//! [`Request`] header followed by its payload (a path, a name, an ioctl argument, data to
//! write), and every request gets exactly one reply: a [`Reply`] header followed by its payload
//! (an ioctl argument after the call, data read, page runs to map), with at most one fd passed
//! by `SCM_RIGHTS`. The host reads the sender's pid from `SCM_CREDENTIALS` on every message.
//! The C side of this format is `preload/handover_preload.c`; both sides are native-endian
//! (they run on one machine).

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Largest payload of one request or reply (the socket's message size bounds it too). Reads and
/// writes larger than this are split by the preload library.
pub const MAX_PAYLOAD: usize = 128 << 10;

/// A request header (48 bytes). The meaning of `fd`, `fd2` and `a` is per [`Op`].
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct Request {
    /// The [`Op`] number.
    pub op: u32,
    /// Per-op flags ([`F_POSITIONAL`], [`F_WRITE_FAULT`], [`F_EXEC`]).
    pub flags: u32,
    /// The fd the call is about (the program's fd number; host fds share the program's numbers).
    pub fd: i32,
    /// A second fd: where a new host file goes (a placeholder the program reserved), or -1.
    pub fd2: i32,
    /// Integer arguments.
    pub a: [u64; 4],
}

/// A reply header (32 bytes).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct Reply {
    /// The syscall's return value, or `-errno`.
    pub ret: i64,
    /// Per-op results (for example the fd a call installed and its close-on-exec flag).
    pub b: [u64; 3],
}

/// A run of a file's pages to map: `npages` pages from file page `index`, at RAM frame `pfn`.
/// Replies to [`Op::Mmap`] and [`Op::Fault`] carry an array of them.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct PageRun {
    /// File page index of the first page.
    pub index: u64,
    /// RAM frame of the first page (byte offset in the RAM memfd / 4096).
    pub pfn: u64,
    /// Pages in the run.
    pub npages: u64,
}

/// What [`Op::Fstat`] returns (the fields of `struct stat` a host file has).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct Stat {
    /// `st_mode`: type and permission bits.
    pub mode: u32,
    /// `st_nlink`.
    pub nlink: u32,
    /// `st_size` in bytes.
    pub size: u64,
    /// `st_blocks` (512-byte units).
    pub blocks: u64,
    /// `st_ino`.
    pub ino: u64,
    /// `st_rdev` (character devices).
    pub rdev: u64,
}

/// `Request::flags`: read or write at `a[1]`/`a[0]` without moving the file position.
pub const F_POSITIONAL: u32 = 1;
/// `Request::flags` of [`Op::Fault`]: the access was a write.
pub const F_WRITE_FAULT: u32 = 1;
/// `Request::flags` of [`Op::Hello`]: the process has just called `execve` (its mappings are
/// gone; the reply lists its host fds so that it can report the ones close-on-exec closed).
pub const F_EXEC: u32 = 1;

/// The calls the boundary carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Op {
    /// First message of a process (or of a new program after `execve`): binds the socket to
    /// the sender's pid. Reply payload: the process's host fds (`i32`s).
    Hello = 1,
    /// `open(path, a[0] = flags)` into placeholder `fd2`; payload: the path.
    Open = 2,
    /// `close(fd)`.
    Close = 3,
    /// `dup2(fd, fd2)`: host file `fd` also at `fd2` (whatever was at `fd2` is closed).
    Dup = 4,
    /// `ioctl(fd, a[0] = cmd, arg)`; payload: the argument bytes (an integer argument as 8
    /// bytes). A file the call creates goes to placeholder `fd2`. Reply: the argument bytes
    /// after the call; `b[0]` the fd installed (or `u64::MAX`), `b[1]` its close-on-exec flag,
    /// `b[2]` 1 if it is a vCPU: then two fds come with the reply, the real vCPU fd (to mmap
    /// `kvm_run` from) and the vCPU's own socket, where its ioctls go (`crate::boundary::vcpu`).
    Ioctl = 5,
    /// `memfd_create(name, a[0] = flags)` into placeholder `fd2`; payload: the name.
    MemfdCreate = 6,
    /// `read`/`pread(fd, a[0] = len, a[1] = pos)`. Reply payload: the data.
    Read = 7,
    /// `write`/`pwrite(fd, data, a[0] = pos)`; payload: the data.
    Write = 8,
    /// `lseek(fd, a[0] = offset (i64), a[1] = whence)`.
    Lseek = 9,
    /// `ftruncate(fd, a[0] = length)`. If pages the program maps itself were dropped, `b` is
    /// (file id, first page, end page) and the program must unmap them, then send
    /// [`Op::Release`].
    Ftruncate = 10,
    /// `fallocate(fd, a[0] = mode, a[1] = offset, a[2] = length)`; `b` as for
    /// [`Op::Ftruncate`].
    Fallocate = 11,
    /// `fstat(fd)`. Reply payload: a [`Stat`].
    Fstat = 12,
    /// `fcntl(fd, a[0] = F_ADD_SEALS | F_GET_SEALS, a[1] = seals)`.
    Seals = 13,
    /// `mmap` of host file `fd` at the range the program reserved; payload: [`MmapArgs`].
    /// Reply: the runs of present pages ([`PageRun`]s); `b[0]` the file's id (to match the
    /// file named by a later punch or shrink).
    Mmap = 14,
    /// `munmap(a[0] = addr, a[1] = len)`.
    Munmap = 15,
    /// A page fault at `a[0]` in a host mapping (flag [`F_WRITE_FAULT`]). Reply: runs to map.
    Fault = 16,
    /// `fork()`, first half: the host makes the child's process (a copy of the fd table and the
    /// mappings) and passes the child's socket. Reply `ret`: the child's host pid.
    ForkPrepare = 17,
    /// `fork()` failed: drop the child process `a[0]` prepared by [`Op::ForkPrepare`].
    ForkAbort = 18,
    /// `reboot(a[0] = cmd)`: `LINUX_REBOOT_CMD_KEXEC` starts a live update.
    Reboot = 19,
    /// The host's RAM memfd, passed by `SCM_RIGHTS`, for mapping host files in place.
    RamFd = 20,
    /// The program has unmapped the pages its last punch or shrink dropped (the reply to
    /// [`Op::Ftruncate`] or [`Op::Fallocate`] named them in `b`: file, first page, end page):
    /// the host may free them now.
    Release = 21,
    /// Kick the vCPU behind `fd` out of `KVM_RUN` (a signal reached the program's thread that
    /// waits for it): that `KVM_RUN` returns EINTR.
    Kick = 22,
}

impl Op {
    /// The op with number `n`, if there is one.
    pub fn from_u32(n: u32) -> Option<Op> {
        use Op::*;
        Some(match n {
            1 => Hello,
            2 => Open,
            3 => Close,
            4 => Dup,
            5 => Ioctl,
            6 => MemfdCreate,
            7 => Read,
            8 => Write,
            9 => Lseek,
            10 => Ftruncate,
            11 => Fallocate,
            12 => Fstat,
            13 => Seals,
            14 => Mmap,
            15 => Munmap,
            16 => Fault,
            17 => ForkPrepare,
            18 => ForkAbort,
            19 => Reboot,
            20 => RamFd,
            21 => Release,
            22 => Kick,
            _ => return None,
        })
    }
}

/// The payload of [`Op::Mmap`].
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct MmapArgs {
    /// Where the program reserved the mapping (page aligned).
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// `PROT_*`.
    pub prot: u32,
    /// `MAP_*`.
    pub flags: u32,
    /// File offset in bytes (page aligned).
    pub off: u64,
}

/// A decoded request: its header, op and payload.
#[derive(Debug, PartialEq, Eq)]
pub struct Decoded<'a> {
    /// The header.
    pub req: Request,
    /// The op named by `req.op`.
    pub op: Op,
    /// What follows the header.
    pub payload: &'a [u8],
}

/// Why a message is not a request (answered with EINVAL, or EBADMSG for an unknown op).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Shorter than a [`Request`] header.
    #[error("message of {0} bytes is shorter than a request header")]
    Short(usize),
    /// Longer than a header plus [`MAX_PAYLOAD`].
    #[error("message of {0} bytes is longer than allowed")]
    Long(usize),
    /// No such op.
    #[error("unknown op {0}")]
    UnknownOp(u32),
    /// The op's payload has the wrong size.
    #[error("op {0:?}: payload of {1} bytes")]
    Payload(Op, usize),
}

/// Decode one message as a request. Checks sizes and the op; what the arguments mean is checked
/// by the call itself, as the kernel does.
pub fn decode(msg: &[u8]) -> Result<Decoded<'_>, DecodeError> {
    let h = std::mem::size_of::<Request>();
    if msg.len() < h {
        return Err(DecodeError::Short(msg.len()));
    }
    if msg.len() > h + MAX_PAYLOAD {
        return Err(DecodeError::Long(msg.len()));
    }
    let (req, payload) =
        Request::read_from_prefix(msg).map_err(|_| DecodeError::Short(msg.len()))?;
    let op = Op::from_u32(req.op).ok_or(DecodeError::UnknownOp(req.op))?;
    let ok = match op {
        Op::Open | Op::MemfdCreate => !payload.is_empty() && payload.len() <= 4096,
        Op::Mmap => payload.len() == std::mem::size_of::<MmapArgs>(),
        Op::Ioctl | Op::Write => true,
        _ => payload.is_empty(),
    };
    if !ok {
        return Err(DecodeError::Payload(op, payload.len()));
    }
    Ok(Decoded { req, op, payload })
}

/// A request message: `req` then `payload` (the preload library's encoder, for tests and
/// benchmarks written in Rust).
pub fn encode(req: &Request, payload: &[u8]) -> Vec<u8> {
    let mut v = req.as_bytes().to_vec();
    v.extend_from_slice(payload);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_match_the_c_side() {
        assert_eq!(std::mem::size_of::<Request>(), 48);
        assert_eq!(std::mem::size_of::<Reply>(), 32);
        assert_eq!(std::mem::size_of::<PageRun>(), 24);
        assert_eq!(std::mem::size_of::<Stat>(), 40);
        assert_eq!(std::mem::size_of::<MmapArgs>(), 32);
    }

    #[test]
    fn decode_checks_size_op_and_payload() {
        assert_eq!(decode(&[0; 47]), Err(DecodeError::Short(47)));
        let mut r = Request {
            op: 99,
            ..Default::default()
        };
        assert_eq!(decode(&encode(&r, &[])), Err(DecodeError::UnknownOp(99)));
        r.op = Op::Close as u32;
        assert!(decode(&encode(&r, &[])).is_ok());
        assert_eq!(
            decode(&encode(&r, &[1])),
            Err(DecodeError::Payload(Op::Close, 1))
        );
        r.op = Op::Open as u32;
        assert_eq!(
            decode(&encode(&r, &[])),
            Err(DecodeError::Payload(Op::Open, 0))
        );
        let m = encode(&r, b"/dev/liveupdate");
        let d = decode(&m).unwrap();
        assert_eq!((d.op, d.payload), (Op::Open, &b"/dev/liveupdate"[..]));
        let big = vec![0u8; 48 + MAX_PAYLOAD + 1];
        assert_eq!(decode(&big), Err(DecodeError::Long(big.len())));
        for n in 1..=22 {
            assert_eq!(Op::from_u32(n).map(|o| o as u32), Some(n));
        }
    }
}
