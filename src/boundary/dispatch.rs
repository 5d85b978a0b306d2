//! One request from a program, served on the host: the syscall it names, with the host's own
//! errno rules (`Host::open`, `Host::ioctl`, …). Everything in a request is checked before use;
//! a bad one gets an errno and changes nothing.

use zerocopy::{FromBytes, IntoBytes};

use crate::abi::boundary::{
    Decoded, MmapArgs, Op, PageRun, Reply, F_EXEC, F_POSITIONAL, F_WRITE_FAULT, MAX_PAYLOAD,
};
use crate::host::files::FileKind;
use crate::host::Host;
use crate::uapi::{Errno, Pid, SysResult};

/// `LINUX_REBOOT_CMD_KEXEC`.
pub const LINUX_REBOOT_CMD_KEXEC: u64 = 0x4558_4543;

/// Most page runs one reply carries (the program maps the rest on later faults).
const MAX_RUNS: usize = MAX_PAYLOAD / std::mem::size_of::<PageRun>();

/// What serving a request asks of the serve loop, beyond the reply.
#[derive(Debug, PartialEq, Eq)]
pub enum Effect {
    /// Nothing more.
    None,
    /// Pass the host's RAM memfd with the reply.
    PassRam,
    /// Make a socket for the new child process `Pid` (forked from this one) and pass the
    /// program's end with the reply.
    Fork(Pid),
    /// Drop the child process prepared by a fork that failed.
    ForkAbort(Pid),
    /// The program asked for a live update (`reboot(LINUX_REBOOT_CMD_KEXEC)`).
    Kexec,
    /// The call created the vCPU file `FileId`: start its thread and pass the program its fds.
    Vcpu(crate::fs::FileId),
    /// Kick the vCPU file `FileId` out of `KVM_RUN`.
    Kick(crate::fs::FileId),
}

/// The answer to one request.
pub struct Answer {
    /// The reply header.
    pub reply: Reply,
    /// Its payload.
    pub payload: Vec<u8>,
    /// What the serve loop must do with it.
    pub effect: Effect,
}

impl Answer {
    fn ret(r: SysResult<i64>) -> Answer {
        Answer {
            reply: Reply {
                ret: r.unwrap_or_else(|e| -(e.0 as i64)),
                b: [0; 3],
            },
            payload: Vec::new(),
            effect: Effect::None,
        }
    }

    /// A bare errno.
    pub fn err(e: Errno) -> Answer {
        Answer::ret(Err(e))
    }

    fn with(mut self, payload: Vec<u8>) -> Answer {
        self.payload = payload;
        self
    }
}

fn runs_payload(runs: Vec<PageRun>) -> Vec<u8> {
    runs[..runs.len().min(MAX_RUNS)].as_bytes().to_vec()
}

fn pos(v: u64) -> SysResult<u64> {
    // off_t is signed: a negative position is EINVAL.
    i64::try_from(v).map(|_| v).map_err(|_| Errno::EINVAL)
}

fn fd_arg(v: i32) -> SysResult<i32> {
    if v < 0 {
        Err(Errno::EBADF)
    } else {
        Ok(v)
    }
}

/// Run `f` with the program's placeholder `fd2` reserved for any file the call installs;
/// returns the call's result and the fd installed with its close-on-exec flag, if one was.
fn with_reserved<T>(
    host: &mut Host,
    pid: Pid,
    fd2: i32,
    f: impl FnOnce(&mut Host) -> SysResult<T>,
) -> (SysResult<T>, Option<(i32, bool)>) {
    if let Err(e) = host.reserve_fd(pid, fd2) {
        return (Err(e), None);
    }
    let r = f(host);
    host.unreserve_fd(pid);
    let installed = host
        .proc_ref(pid)
        .ok()
        .and_then(|p| p.fds.get(&fd2))
        .map(|e| (fd2, e.cloexec));
    (r, installed)
}

/// Serve a decoded request from host process `pid` (already bound to its sender).
pub fn serve(host: &mut Host, pid: Pid, d: &Decoded<'_>) -> Answer {
    let q = &d.req;
    match d.op {
        // Hello on a bound socket: the program called execve. Its mappings are gone; the
        // reply lists its host fds so that it reports those close-on-exec closed.
        Op::Hello => {
            if q.flags & F_EXEC != 0 {
                host.remote_unmap_all(pid);
            }
            let fds: Vec<i32> = host
                .proc_ref(pid)
                .map(|p| p.fds.keys().copied().take(MAX_PAYLOAD / 4).collect())
                .unwrap_or_default();
            Answer::ret(Ok(0)).with(fds.as_bytes().to_vec())
        }
        Op::Open => {
            let Ok(path) = std::str::from_utf8(d.payload) else {
                return Answer::err(Errno::ENOENT);
            };
            let (r, _) = with_reserved(host, pid, q.fd2, |h| h.open(pid, path, q.a[0] as u32));
            Answer::ret(r.map(i64::from))
        }
        Op::Close => Answer::ret(host.close(pid, q.fd).map(|()| 0)),
        Op::Dup => Answer::ret(
            fd_arg(q.fd2)
                .and_then(|n| host.dup_to(pid, q.fd, n))
                .map(i64::from),
        ),
        Op::Ioctl => {
            let mut arg = d.payload.to_vec();
            let (r, installed) = if q.fd2 >= 0 {
                with_reserved(host, pid, q.fd2, |h| h.ioctl(pid, q.fd, q.a[0], &mut arg))
            } else {
                (host.ioctl(pid, q.fd, q.a[0], &mut arg), None)
            };
            let mut a = Answer::ret(r).with(arg);
            a.reply.b = match installed {
                Some((fd, cloexec)) => [fd as u64, cloexec as u64, 0],
                None => [u64::MAX, 0, 0],
            };
            if let Some((fd, _)) = installed {
                if let Ok(f) = host.fd_file(pid, fd) {
                    if matches!(host.files().kind(f), Some(FileKind::Vcpu(_))) {
                        a.effect = Effect::Vcpu(f);
                    }
                }
            }
            a
        }
        Op::MemfdCreate => {
            // The program sends at least one byte; a lone NUL is the empty name.
            let name = d.payload.strip_suffix(&[0]).unwrap_or(d.payload);
            let Ok(name) = std::str::from_utf8(name) else {
                return Answer::err(Errno::EINVAL);
            };
            if name.contains('\0') {
                return Answer::err(Errno::EINVAL);
            }
            let (r, _) = with_reserved(host, pid, q.fd2, |h| {
                h.memfd_create(pid, name, q.a[0] as u32)
            });
            Answer::ret(r.map(i64::from))
        }
        Op::Read => {
            let mut buf = vec![0u8; (q.a[0] as usize).min(MAX_PAYLOAD)];
            let r = if q.flags & F_POSITIONAL != 0 {
                pos(q.a[1]).and_then(|p| host.pread(pid, q.fd, &mut buf, p))
            } else {
                host.read(pid, q.fd, &mut buf)
            };
            match r {
                Ok(n) => {
                    buf.truncate(n);
                    Answer::ret(Ok(n as i64)).with(buf)
                }
                Err(e) => Answer::err(e),
            }
        }
        Op::Write => {
            let r = if q.flags & F_POSITIONAL != 0 {
                pos(q.a[0]).and_then(|p| host.pwrite(pid, q.fd, d.payload, p))
            } else {
                host.write(pid, q.fd, d.payload)
            };
            Answer::ret(r.map(|n| n as i64))
        }
        Op::Lseek => {
            let whence = i32::try_from(q.a[1]).unwrap_or(-1);
            Answer::ret(
                host.lseek(pid, q.fd, q.a[0] as i64, whence)
                    .map(|p| p as i64),
            )
        }
        Op::Ftruncate | Op::Fallocate => {
            let r = if d.op == Op::Ftruncate {
                pos(q.a[0]).and_then(|n| host.ftruncate(pid, q.fd, n))
            } else {
                // The offset and length are checked as `loff_t` by `Host::fallocate`.
                host.fallocate(pid, q.fd, q.a[0] as i32, q.a[1], q.a[2])
            };
            let mut a = Answer::ret(r.map(|()| 0));
            if let Some((f, first, end)) = host.take_deferred(pid) {
                a.reply.b = [f, first, end];
            }
            a
        }
        Op::Release => Answer::ret(host.remote_release(pid).map(|()| 0)),
        Op::Fstat => match host.fstat(pid, q.fd) {
            Ok(st) => Answer::ret(Ok(0)).with(st.as_bytes().to_vec()),
            Err(e) => Answer::err(e),
        },
        Op::Seals => {
            let r = match q.a[0] as i32 {
                libc::F_ADD_SEALS => u32::try_from(q.a[1])
                    .map_err(|_| Errno::EINVAL)
                    .and_then(|s| host.add_seals(pid, q.fd, s))
                    .map(|()| 0),
                libc::F_GET_SEALS => host.get_seals(pid, q.fd).map(i64::from),
                _ => Err(Errno::EINVAL),
            };
            Answer::ret(r)
        }
        Op::Mmap => {
            let Ok(a) = MmapArgs::read_from_bytes(d.payload) else {
                return Answer::err(Errno::EINVAL);
            };
            match host.remote_mmap(pid, q.fd, &a) {
                Ok(runs) => {
                    let mut a = Answer::ret(Ok(0)).with(runs_payload(runs));
                    a.reply.b[0] = host.fd_file(pid, q.fd).unwrap_or(0);
                    a
                }
                Err(e) => Answer::err(e),
            }
        }
        Op::Munmap => Answer::ret(host.remote_munmap(pid, q.a[0], q.a[1]).map(|()| 0)),
        Op::Fault => match host.remote_fault(pid, q.a[0], q.flags & F_WRITE_FAULT != 0) {
            Ok(runs) => Answer::ret(Ok(0)).with(runs_payload(runs)),
            Err(e) => Answer::err(e),
        },
        Op::ForkPrepare => match host.fork(pid) {
            Ok(child) => {
                let mut a = Answer::ret(Ok(i64::from(child)));
                a.effect = Effect::Fork(child);
                a
            }
            Err(e) => Answer::err(e),
        },
        Op::ForkAbort => match Pid::try_from(q.a[0]) {
            Ok(child) => {
                let mut a = Answer::ret(Ok(0));
                a.effect = Effect::ForkAbort(child);
                a
            }
            Err(_) => Answer::err(Errno::EINVAL),
        },
        Op::Reboot => {
            if q.a[0] != LINUX_REBOOT_CMD_KEXEC {
                return Answer::err(Errno::EINVAL);
            }
            let mut a = Answer::ret(Ok(0));
            a.effect = Effect::Kexec;
            a
        }
        Op::Kick => match host.fd_file(pid, q.fd) {
            Ok(f) => {
                let mut a = Answer::ret(Ok(0));
                a.effect = Effect::Kick(f);
                a
            }
            Err(e) => Answer::err(e),
        },
        Op::RamFd => {
            let mut a = Answer::ret(Ok(0));
            a.effect = Effect::PassRam;
            a
        }
    }
}
