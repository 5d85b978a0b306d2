//! Messages as a program sends them: raw bytes, a fuzzed header, or a request built from a
//! template with plausible fds, paths, names, ioctls and mappings.

use super::*;
use crate::fuzzing::ioctl::{arg_buf, name_field};

pub(super) fn request(op: Op, fd: i32, fd2: i32, a: [u64; 4]) -> Request {
    Request {
        op: op as u32,
        flags: 0,
        fd,
        fd2,
        a,
    }
}

/// The argument of `KVM_SET_USER_MEMORY_REGION` (`struct kvm_userspace_memory_region`).
pub(super) fn memslot_v1(slot: u32, flags: u32, gpa: u64, size: u64, uaddr: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(32);
    b.extend_from_slice(&slot.to_ne_bytes());
    b.extend_from_slice(&flags.to_ne_bytes());
    for w in [gpa, size, uaddr] {
        b.extend_from_slice(&w.to_ne_bytes());
    }
    b
}

/// Any bytes: a length, then that many (a length of 255 asks for a long message, up to 256 KiB,
/// past the largest request).
pub(super) fn raw_message(c: &mut Cursor) -> Vec<u8> {
    let n = match c.u8() {
        255 => usize::from(c.u16()) * 4,
        n => usize::from(n),
    };
    let mut m = c.take(n).to_vec();
    if m.len() < n && n > 255 {
        m.resize(n, 0xa5);
    }
    m
}

/// A header of fuzzed bytes (op number kept near the real ones), then a short raw payload.
pub(super) fn raw_header(c: &mut Cursor) -> Vec<u8> {
    let mut h = [0u8; 48];
    let b = c.take(48);
    h[..b.len()].copy_from_slice(b);
    let mut req = Request::read_from_bytes(&h).unwrap_or_default();
    req.op %= 24;
    let n = usize::from(c.u8());
    encode(&req, c.take(n))
}

/// Host fd numbers of `pid`, in order.
pub(super) fn fds_of(h: &Host, pid: Pid) -> Vec<i32> {
    h.proc_ref(pid)
        .map(|p| p.fds.keys().copied().collect())
        .unwrap_or_default()
}

/// An fd the call is about: mostly one the process has, sometimes a low, negative, large or
/// out-of-range number.
pub(super) fn pick_fd(h: &Host, pid: Pid, c: &mut Cursor) -> i32 {
    let b = c.u8();
    match b {
        0xf0.. => i32::from(b) - 0xf8,
        0xe8.. => [77, 500, 1023, NOFILE - 1, NOFILE, i32::MAX, i32::MIN, 3][usize::from(b - 0xe8)],
        _ => {
            let fds = fds_of(h, pid);
            fds.get(usize::from(b) % fds.len().max(1))
                .copied()
                .unwrap_or(3)
        }
    }
}

/// Where a new file goes (`fd2`): mostly the lowest number the process has free from 3 up, as
/// a placeholder would be; sometimes -1, a number in use, or anything.
pub(super) fn new_fd(h: &Host, pid: Pid, c: &mut Cursor) -> i32 {
    let b = c.u8();
    match b % 8 {
        0 => -1,
        1 => pick_fd(h, pid, c),
        2 => i32::from(b >> 3),
        3 => c.u32() as i32,
        _ => {
            let fds = fds_of(h, pid);
            (3..).find(|n| !fds.contains(n)).unwrap_or(3)
        }
    }
}

/// A file size or offset: whole pages, small, unaligned, or anything.
pub(super) fn size(c: &mut Cursor) -> u64 {
    match c.u8() % 4 {
        0 => u64::from(c.u8() % 64) * PAGE_SIZE,
        1 => u64::from(c.u16()),
        2 => c.u64(),
        _ => u64::from(c.u8() % 64) * PAGE_SIZE + u64::from(c.u8()),
    }
}

/// A file position for read and write.
pub(super) fn position(c: &mut Cursor) -> u64 {
    match c.u8() % 4 {
        0 => 0,
        1 => u64::from(c.u8()) * 64,
        2 => c.u64(),
        _ => u64::from(c.u16()) << 12,
    }
}

/// An address in one of the process's mappings (or just past one), or anywhere.
pub(super) fn addr_in_mapping(h: &Host, pid: Pid, c: &mut Cursor) -> (u64, u64) {
    let maps: Vec<(u64, u64)> = h
        .proc_ref(pid)
        .map(|p| p.remote.iter().map(|m| (m.addr, m.len)).collect())
        .unwrap_or_default();
    let b = c.u8();
    if maps.is_empty() || b % 4 == 0 {
        let addr = match b % 3 {
            0 => c.u64(),
            _ => MAP_BASE + u64::from(c.u8() % 32) * 16 * PAGE_SIZE,
        };
        return (addr, u64::from(c.u8() % 8) * PAGE_SIZE);
    }
    let (addr, len) = maps[usize::from(c.u8()) % maps.len()];
    let np = len / PAGE_SIZE;
    let page = u64::from(c.u8()) % (np + 1);
    (
        addr + page * PAGE_SIZE,
        (u64::from(c.u8()) % (np + 2)) * PAGE_SIZE,
    )
}

/// A request built like the preload library builds it, with fuzzed choices.
pub(super) fn template(h: &Host, procs: &[Proc], pid: Pid, c: &mut Cursor) -> Vec<u8> {
    let Some(op) = Op::from_u32(u32::from(c.u8() % 21) + 1) else {
        return Vec::new();
    };
    let mut q = request(op, -1, -1, [0; 4]);
    let mut payload: Vec<u8> = Vec::new();
    match op {
        Op::Hello => q.flags = if c.u8() & 1 == 1 { F_EXEC } else { 0 },
        Op::Open => {
            let path: &[u8] = match c.u8() % 9 {
                0..=2 => b"/dev/liveupdate",
                3 => b"/dev/null",
                4 => b"/dev/liveupdate-test",
                5 => b"/etc/passwd",
                6 => b"/dev/liveupdate\0",
                7 => b"/dev/kvm",
                _ => {
                    let n = usize::from(c.u8());
                    c.take(n)
                }
            };
            payload = path.to_vec();
            let f = c.u8();
            q.a[0] = if f & 0x80 != 0 {
                u64::from(c.u32())
            } else {
                (libc::O_RDWR | if f & 1 != 0 { libc::O_CLOEXEC } else { 0 }) as u64
            };
            q.fd2 = new_fd(h, pid, c);
        }
        Op::Close | Op::Fstat | Op::Kick => q.fd = pick_fd(h, pid, c),
        Op::Dup => {
            q.fd = pick_fd(h, pid, c);
            q.fd2 = if c.u8() & 1 == 0 {
                new_fd(h, pid, c)
            } else {
                pick_fd(h, pid, c)
            };
        }
        Op::Ioctl => {
            let sel = c.u8();
            let (cmd, body, creates): (u64, Vec<u8>, bool) = match sel % 11 {
                0 | 1 => (
                    if sel % 8 == 0 {
                        LIVEUPDATE_IOCTL_CREATE_SESSION
                    } else {
                        LIVEUPDATE_IOCTL_RETRIEVE_SESSION
                    },
                    CreateSession {
                        size: 72,
                        fd: -1,
                        name: name_field(c),
                    }
                    .as_bytes()
                    .to_vec(),
                    true,
                ),
                2 | 3 => {
                    let fd = if sel % 8 == 2 { pick_fd(h, pid, c) } else { -1 };
                    let token = u64::from(c.u8() % 4);
                    (
                        if sel % 8 == 2 {
                            LIVEUPDATE_SESSION_PRESERVE_FD
                        } else {
                            LIVEUPDATE_SESSION_RETRIEVE_FD
                        },
                        PreserveFd {
                            size: 16,
                            fd,
                            token,
                        }
                        .as_bytes()
                        .to_vec(),
                        sel % 8 == 3,
                    )
                }
                4 => (
                    LIVEUPDATE_SESSION_FINISH,
                    SessionFinish {
                        size: 8,
                        reserved: 0,
                    }
                    .as_bytes()
                    .to_vec(),
                    false,
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
                    false,
                ),
                6 => {
                    let cmd = (LIVEUPDATE_IOCTL_TYPE << 8) | u64::from(c.u8());
                    let n = usize::from(c.u8());
                    (cmd, c.take(n).to_vec(), true)
                }
                8 if sel & 0x40 != 0 => (
                    KVM_CREATE_VM,
                    u64::from(c.u8() % 3).to_ne_bytes().to_vec(),
                    true,
                ),
                8 => {
                    let g = CreateGuestMemfd {
                        size: match c.u8() % 4 {
                            0 => c.u64(),
                            _ => u64::from(c.u8() % 16 + 1) * PAGE_SIZE,
                        },
                        flags: match c.u8() % 4 {
                            0 => 0,
                            1 => GUEST_MEMFD_FLAG_MMAP,
                            2 => c.u64(),
                            _ => GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
                        },
                        page_order: 0,
                        pad: [0; 7],
                        reserved: [0; 5],
                    };
                    (KVM_CREATE_GUEST_MEMFD, g.as_bytes().to_vec(), true)
                }
                9 => {
                    let slot = u32::from(c.u8() % 4);
                    let (uaddr, size) = addr_in_mapping(h, pid, c);
                    let flags = if c.u8() & 7 == 0 {
                        u32::from(c.u8())
                    } else {
                        0
                    };
                    let gpa = u64::from(slot) << 30;
                    (
                        KVM_SET_USER_MEMORY_REGION,
                        memslot_v1(slot, flags, gpa, size, uaddr),
                        false,
                    )
                }
                10 => {
                    let slot = u32::from(c.u8() % 4);
                    let (uaddr, size) = addr_in_mapping(h, pid, c);
                    let mut r = UserMemoryRegion2 {
                        slot,
                        guest_phys_addr: u64::from(slot) << 30,
                        memory_size: size,
                        userspace_addr: uaddr,
                        ..Default::default()
                    };
                    if c.u8() & 1 == 0 {
                        r.flags = KVM_MEM_GUEST_MEMFD;
                        r.guest_memfd = pick_fd(h, pid, c) as u32;
                        r.guest_memfd_offset = u64::from(c.u8() % 8) * PAGE_SIZE;
                    }
                    (KVM_SET_USER_MEMORY_REGION2, r.as_bytes().to_vec(), false)
                }
                _ => {
                    let cmd = c.u64();
                    let n = usize::from(c.u8());
                    (cmd, c.take(n).to_vec(), false)
                }
            };
            q.a[0] = cmd;
            q.fd = pick_fd(h, pid, c);
            q.fd2 = if creates || sel & 0x80 != 0 {
                new_fd(h, pid, c)
            } else {
                -1
            };
            payload = arg_buf(c, &body);
        }
        Op::MemfdCreate => {
            payload = match c.u8() % 6 {
                0 | 1 => b"fuzz".to_vec(),
                2 => b"\0".to_vec(),
                3 => b"fu\0zz".to_vec(),
                4 => vec![b'x'; 250],
                _ => {
                    let n = usize::from(c.u8());
                    c.take(n).to_vec()
                }
            };
            q.a[0] = match c.u8() % 5 {
                0 => 0,
                1 => 1, // MFD_CLOEXEC
                2 => 2, // MFD_ALLOW_SEALING
                3 => 3,
                _ => u64::from(c.u32()),
            };
            q.fd2 = new_fd(h, pid, c);
        }
        Op::Read => {
            q.fd = pick_fd(h, pid, c);
            q.flags = u32::from(c.u8() & 1) * F_POSITIONAL;
            q.a[0] = match c.u8() % 4 {
                0 => u64::from(c.u8()) * 16,
                1 => PAGE_SIZE,
                2 => c.u64(),
                _ => u64::from(c.u16()),
            };
            q.a[1] = position(c);
        }
        Op::Write => {
            q.fd = pick_fd(h, pid, c);
            q.flags = u32::from(c.u8() & 1) * F_POSITIONAL;
            payload = match c.u8() % 4 {
                0 => {
                    let n = usize::from(c.u8());
                    c.take(n).to_vec()
                }
                1 => vec![c.u8(); usize::from(c.u8()) * 512],
                2 => Vec::new(),
                _ => {
                    let n = usize::from(c.u16() % 8192);
                    c.take(n).to_vec()
                }
            };
            q.a[0] = position(c);
        }
        Op::Lseek => {
            q.fd = pick_fd(h, pid, c);
            q.a[0] = if c.u8() & 1 == 0 {
                (i64::from(c.u8() as i8) * 512) as u64
            } else {
                c.u64()
            };
            q.a[1] = u64::from(c.u8() % 5);
        }
        Op::Ftruncate => {
            q.fd = pick_fd(h, pid, c);
            q.a[0] = size(c);
        }
        Op::Fallocate => {
            q.fd = pick_fd(h, pid, c);
            q.a[0] = match c.u8() % 5 {
                0 => 0,
                1 => libc::FALLOC_FL_KEEP_SIZE as u64,
                2 => (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE) as u64,
                3 => libc::FALLOC_FL_PUNCH_HOLE as u64,
                _ => u64::from(c.u32()),
            };
            q.a[1] = size(c);
            q.a[2] = size(c);
        }
        Op::Seals => {
            q.fd = pick_fd(h, pid, c);
            q.a[0] = match c.u8() % 3 {
                0 => libc::F_ADD_SEALS as u64,
                1 => libc::F_GET_SEALS as u64,
                _ => c.u64(),
            };
            q.a[1] = if c.u8() & 1 == 0 {
                u64::from(c.u8() & 0x1f)
            } else {
                c.u64()
            };
        }
        Op::Mmap => {
            q.fd = pick_fd(h, pid, c);
            let a = MmapArgs {
                addr: match c.u8() % 8 {
                    0 => c.u64(),
                    1 => MAP_BASE + 123,
                    _ => MAP_BASE + u64::from(c.u8() % 32) * 16 * PAGE_SIZE,
                },
                len: match c.u8() % 8 {
                    0 => c.u64(),
                    1 => 0,
                    _ => u64::from(c.u8() % 24 + 1) * PAGE_SIZE,
                },
                prot: match c.u8() % 4 {
                    0 => libc::PROT_READ as u32,
                    2 => c.u32(),
                    _ => (libc::PROT_READ | libc::PROT_WRITE) as u32,
                },
                flags: match c.u8() % 4 {
                    0 => libc::MAP_PRIVATE as u32,
                    1 => c.u32(),
                    _ => libc::MAP_SHARED as u32,
                },
                off: match c.u8() % 4 {
                    0 => c.u64(),
                    1 => 0,
                    _ => u64::from(c.u8() % 16) * PAGE_SIZE,
                },
            };
            payload = a.as_bytes().to_vec();
        }
        Op::Munmap => {
            let (addr, len) = addr_in_mapping(h, pid, c);
            q.a = [addr, len, 0, 0];
        }
        Op::Fault => {
            let (addr, _) = addr_in_mapping(h, pid, c);
            let w = c.u8();
            q.a[0] = addr.wrapping_add(u64::from(w >> 4) * 64);
            q.flags = u32::from(w & 1) * F_WRITE_FAULT;
        }
        Op::ForkAbort => {
            let b = c.u8();
            q.a[0] = match b % 4 {
                0 => c.u64(),
                _ => u64::from(procs[usize::from(b >> 2) % procs.len()].pid),
            };
        }
        Op::Reboot => {
            q.a[0] = if c.u8() & 1 == 0 {
                LINUX_REBOOT_CMD_KEXEC
            } else {
                c.u64()
            };
        }
        Op::ForkPrepare | Op::RamFd | Op::Release => {}
    }
    encode(&q, &payload)
}
