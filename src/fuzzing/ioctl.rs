//! The in-process LUO ioctl path on a live host, with incoming sessions from in-process kexecs.

use zerocopy::IntoBytes;

use crate::abi::luo::*;
use crate::host::Host;
use crate::uapi::{Errno, Pid};

use super::image::Cursor;

/// A booted host kept across inputs, with incoming sessions from an in-process kexec.
pub struct IoctlFuzzer {
    host: Option<Host>,
    /// In-process kexecs so far; each refills the incoming sessions.
    kexecs: u64,
}

const IN_SESSIONS: usize = 6;
const NAMES: [&str; 4] = ["in-0", "in-1", "out-a", "out-b"];

impl Default for IoctlFuzzer {
    fn default() -> Self {
        Self::new()
    }
}

impl IoctlFuzzer {
    /// Boot a 64 MiB host and preserve a few sessions through an in-process kexec, so inputs find
    /// incoming sessions to retrieve.
    pub fn new() -> Self {
        let h = crate::fuzzing::small_host(64 << 20, "ioctl");
        let mut f = Self {
            host: Some(h),
            kexecs: 0,
        };
        f.refill();
        f
    }

    fn incoming_left(h: &Host) -> usize {
        h.luo
            .sessions
            .values()
            .filter(|s| s.kind == crate::luo::SessionKind::Incoming { retrieved: false })
            .count()
    }

    /// Preserve a few sessions (memfds, a test file) and kexec in process, so the next inputs
    /// find incoming sessions to retrieve, read and finish.
    fn refill(&mut self) {
        let mut h = self.host.take().expect("host");
        let pid = h.spawn();
        let dev = h
            .open(pid, "/dev/liveupdate", 0)
            .expect("open /dev/liveupdate");
        for i in 0..IN_SESSIONS {
            let name = format!("in-{i}");
            let s = crate::vmm::libluo::create_session(&mut h, pid, dev, &name).expect("session");
            let m = crate::vmm::libluo::memfd_with(&mut h, pid, b"ioctl fuzz").expect("memfd");
            crate::vmm::libluo::preserve_fd(&mut h, pid, s, m, 1).expect("preserve");
            let m = crate::vmm::libluo::memfd_with(&mut h, pid, b"second").expect("memfd");
            crate::vmm::libluo::preserve_fd(&mut h, pid, s, m, 2).expect("preserve");
            if let Ok(t) = h.open(pid, "/dev/liveupdate-test", 0) {
                let _ = crate::vmm::libluo::preserve_fd(&mut h, pid, s, t, 3);
            }
        }
        let h = match h.kexec_in_process() {
            Ok(h) => h,
            Err(_) => panic!("in-process kexec of the ioctl host failed"),
        };
        self.kexecs += 1;
        self.host = Some(h);
    }

    /// In-process kexecs done so far (each refills the incoming sessions).
    pub fn kexecs(&self) -> u64 {
        self.kexecs
    }

    /// Run one input: a new process opens `/dev/liveupdate` and issues a sequence of ioctls
    /// (raw or built from the upstream structs with fuzzed sizes, names, fds and tokens) on the
    /// device, on session fds and on other fds, interleaved with closes and memfd creation;
    /// then it exits, which closes everything it opened.
    pub fn run(&mut self, data: &[u8]) {
        if Self::incoming_left(self.host.as_ref().expect("host")) < 2 {
            self.refill();
        }
        let h = self.host.as_mut().expect("host");
        let pid = h.spawn();
        let mut fds: Vec<i32> = Vec::new();
        let dev = h.open(pid, "/dev/liveupdate", 0);
        if let Ok(d) = dev {
            fds.push(d);
        } else {
            // Deserialization failure is sticky (EIO) and must be reported, not crash.
            assert_eq!(dev, Err(Errno::EIO), "open /dev/liveupdate");
        }
        let mut c = Cursor::new(data);
        let mut n = 0;
        while !c.done() && n < 32 {
            n += 1;
            one_op(h, pid, &mut fds, &mut c);
        }
        h.exit(pid);
    }
}

fn pick_fd(fds: &[i32], c: &mut Cursor) -> i32 {
    let b = c.u8();
    if b >= 0xf0 {
        return b as i32 - 0xf8; // -8..7: bad and low fds
    }
    fds.get(b as usize % fds.len().max(1))
        .copied()
        .unwrap_or(-1)
}

/// The argument buffer: a struct's bytes with a fuzzed `size` and length.
pub(super) fn arg_buf(c: &mut Cursor, body: &[u8]) -> Vec<u8> {
    let mode = c.u8();
    let mut b = body.to_vec();
    match mode % 8 {
        0..=3 => {}
        4 => b.truncate(c.u8() as usize % (body.len() + 1)),
        5 => {
            let extra = c.u8() as usize % 32;
            b.resize(body.len() + extra, 0);
            let nz = c.u8();
            if nz != 0 && extra > 0 {
                let i = body.len() + nz as usize % extra;
                b[i] = nz;
            }
        }
        6 => {
            let n = c.u8() as usize;
            b = c.take(n).to_vec();
        }
        _ => {}
    }
    if mode & 0x38 != 0 && b.len() >= 4 {
        let size = match (mode >> 3) % 8 {
            1 => b.len() as u32,
            2 => c.u8() as u32,
            3 => u32::MAX,
            4 => 0,
            5 => body.len() as u32 + 8,
            _ => c.u32(),
        };
        b[..4].copy_from_slice(&size.to_ne_bytes());
    }
    b
}

/// A session name field: a known incoming or outgoing name, a long one, or raw bytes.
pub(super) fn name_field(c: &mut Cursor) -> [u8; 64] {
    let mut f = [0u8; 64];
    let sel = c.u8();
    if (sel as usize % 8) < NAMES.len() + 2 {
        let s = match sel as usize % 8 {
            i if i < NAMES.len() => NAMES[i].to_string(),
            4 => format!("in-{}", c.u8() % 8),
            _ => "x".repeat(63),
        };
        f[..s.len()].copy_from_slice(s.as_bytes());
    } else {
        let n = c.u8() as usize % 65;
        let raw = c.take(n);
        f[..raw.len()].copy_from_slice(raw);
    }
    f
}

fn one_op(h: &mut Host, pid: Pid, fds: &mut Vec<i32>, c: &mut Cursor) {
    let op = c.u8();
    let (cmd, body): (u64, Vec<u8>) = match op % 12 {
        0 => (
            LIVEUPDATE_IOCTL_CREATE_SESSION,
            CreateSession {
                size: 72,
                fd: c.u8() as i32 - 1,
                name: name_field(c),
            }
            .as_bytes()
            .to_vec(),
        ),
        1 => (
            LIVEUPDATE_IOCTL_RETRIEVE_SESSION,
            CreateSession {
                size: 72,
                fd: -1,
                name: name_field(c),
            }
            .as_bytes()
            .to_vec(),
        ),
        2 | 3 => {
            let fd = pick_fd(fds, c);
            let token = if c.u8() & 1 == 0 {
                c.u8() as u64 % 4
            } else {
                c.u64()
            };
            let cmd = if op % 12 == 2 {
                LIVEUPDATE_SESSION_PRESERVE_FD
            } else {
                LIVEUPDATE_SESSION_RETRIEVE_FD
            };
            (
                cmd,
                PreserveFd {
                    size: 16,
                    fd,
                    token,
                }
                .as_bytes()
                .to_vec(),
            )
        }
        4 => (
            LIVEUPDATE_SESSION_FINISH,
            SessionFinish {
                size: 8,
                reserved: if c.u8() == 0xff { 1 } else { 0 },
            }
            .as_bytes()
            .to_vec(),
        ),
        5 => (
            LIVEUPDATE_SESSION_GET_NAME,
            SessionGetName {
                size: 72,
                reserved: 0,
                name: [0; 64],
            }
            .as_bytes()
            .to_vec(),
        ),
        6 => {
            // Close an fd.
            let fd = pick_fd(fds, c);
            let _ = h.close(pid, fd);
            fds.retain(|&x| x != fd);
            return;
        }
        7 => {
            // A file to preserve: a memfd or a test-handler file.
            let r = if c.u8() & 1 == 0 {
                crate::vmm::libluo::memfd_with(h, pid, b"fuzz")
            } else {
                h.open(pid, "/dev/liveupdate-test", 0)
            };
            if let Ok(m) = r {
                fds.push(m);
            }
            return;
        }
        8 => {
            // Re-open the device (EBUSY while it is open).
            if let Ok(d) = h.open(pid, "/dev/liveupdate", 0) {
                fds.push(d);
            }
            return;
        }
        9 => {
            let _ = h.dup(pid, pick_fd(fds, c)).map(|d| fds.push(d));
            return;
        }
        _ => {
            // Raw command and bytes.
            let cmd = match c.u8() % 4 {
                0 => (LIVEUPDATE_IOCTL_TYPE << 8) | c.u8() as u64,
                1 => c.u64(),
                _ => (LIVEUPDATE_IOCTL_TYPE << 8) | (0x40 + c.u8() as u64 % 8),
            };
            let n = c.u8() as usize;
            (cmd, c.take(n).to_vec())
        }
    };
    let fd = pick_fd(fds, c);
    let mut buf = arg_buf(c, &body);
    let before = buf.len();
    let r = h.ioctl(pid, fd, cmd, &mut buf);
    assert_eq!(buf.len(), before);
    if r.is_ok() {
        // A new fd comes back in CREATE/RETRIEVE_SESSION and RETRIEVE_FD.
        let new_fd = match cmd {
            LIVEUPDATE_IOCTL_CREATE_SESSION
            | LIVEUPDATE_IOCTL_RETRIEVE_SESSION
            | LIVEUPDATE_SESSION_RETRIEVE_FD
                if buf.len() >= 8 =>
            {
                Some(i32::from_ne_bytes(buf[4..8].try_into().unwrap_or_default()))
            }
            _ => None,
        };
        if let Some(nfd) = new_fd {
            let size = u32::from_ne_bytes(buf[..4].try_into().unwrap_or_default());
            if size >= 8 {
                assert!(
                    h.fd_file(pid, nfd).is_ok(),
                    "ioctl returned fd {nfd} that is not open"
                );
                fds.push(nfd);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_fuzzer_runs_sequences() {
        let mut f = IoctlFuzzer::new();
        f.run(&[]);
        // RETRIEVE_SESSION "in-0", then RETRIEVE_FD token 1 on it, FINISH, CREATE_SESSION.
        f.run(&[1, 0, 0, 0, 1, 1, 0, 1, 0, 0, 4, 0, 1, 0, 0, 0, 0]);
        for i in 0..200u8 {
            f.run(&[i, i.wrapping_mul(7), 3, i, 0, 1]);
        }
        assert!(f.kexecs() >= 1);
    }
}
