//! The process boundary's request path on a live host: messages as programs under
//! `handover run` send them (raw bytes, a fuzzed header, or a request built from a template
//! with plausible fds, paths, names, LUO ioctls and mappings at fake addresses), decoded by
//! [`decode`] and served by [`serve`]. Where `/dev/kvm` opens, inputs may also create VMs and
//! guest_memfds, map guest_memfds in the program and set memslots on program mappings (the
//! host then maps the range itself: a shadow mapping). The serve loop's part is modelled here: a socket is
//! bound by its first `Hello` (a forked child's socket refuses anything else), `ForkPrepare`
//! makes a child process, `ForkAbort` drops a child not bound yet, a process's socket closing
//! is `Host::exit`.
//!
//! After every request: the reply fits one message, no fd reservation is left behind, every fd
//! and mapping refers to an open file, every memfd counts exactly the writable mappings that
//! exist (the program's and the host's), and an fd a call says it installed is there. After
//! every input (all its processes exited): the open files, the outgoing sessions, the preserved
//! pages, the host's mappings and the frames in use are what they were before it.

use std::collections::HashMap;

use zerocopy::{FromBytes, IntoBytes};

use crate::abi::boundary::{
    decode, encode, MmapArgs, Op, Reply, Request, F_EXEC, F_POSITIONAL, F_WRITE_FAULT, MAX_PAYLOAD,
};
use crate::abi::kvm::{
    CreateGuestMemfd, UserMemoryRegion2, GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP,
    KVM_CREATE_GUEST_MEMFD, KVM_CREATE_VM, KVM_MEM_GUEST_MEMFD, KVM_SET_USER_MEMORY_REGION,
    KVM_SET_USER_MEMORY_REGION2,
};
use crate::abi::luo::*;
use crate::boundary::dispatch::{serve, Answer, Effect, LINUX_REBOOT_CMD_KEXEC};
use crate::host::files::FileKind;
use crate::host::Host;
use crate::mm::PAGE_SIZE;
use crate::uapi::{Pid, NOFILE};

use super::image::Cursor;

mod check;
mod template;

use check::*;
use template::*;

/// Where the fuzzer's mappings go. Remote mappings are records on the host: nothing is ever
/// mapped at these addresses.
const MAP_BASE: u64 = 0x7f00_0000_0000;
/// Most messages one input sends.
const MAX_MSGS: usize = 64;

/// A process of the input, as the serve loop knows it.
struct Proc {
    pid: Pid,
    /// The process whose `ForkPrepare` made it (None: the program the host started).
    parent: Option<Pid>,
    /// Its socket was bound by a `Hello`.
    bound: bool,
}

/// A booted 64 MiB host kept across inputs; each input runs processes on it and ends them.
pub struct BoundaryFuzzer {
    host: Host,
    inputs: u64,
    requests: u64,
}

impl Default for BoundaryFuzzer {
    fn default() -> Self {
        Self::new()
    }
}

impl BoundaryFuzzer {
    /// Boot the host.
    pub fn new() -> Self {
        let host = crate::fuzzing::small_host(64 << 20, "boundary");
        Self {
            host,
            inputs: 0,
            requests: 0,
        }
    }

    /// Inputs run so far.
    pub fn inputs(&self) -> u64 {
        self.inputs
    }

    /// Requests served so far (messages that decoded and passed the binding rule).
    pub fn requests(&self) -> u64 {
        self.requests
    }

    /// Run one input: a program process (and the children it forks) sends up to 64 messages;
    /// then every process exits and nothing may be left behind. Panics on a broken invariant.
    pub fn run(&mut self, data: &[u8]) {
        let (before, mut procs) = self.begin();
        let mut c = Cursor::new(data);
        self.prelude(&mut procs, c.u8());
        let mut n = 0;
        while !c.done() && n < MAX_MSGS {
            n += 1;
            let sel = c.u8();
            let i = usize::from(sel & 0x0f) % procs.len();
            let pid = procs[i].pid;
            let msg = match sel >> 4 {
                0 => raw_message(&mut c),
                1 => raw_header(&mut c),
                15 => {
                    // The process exits (its socket closes). The program itself stays, so
                    // that the input keeps a sender.
                    if i > 0 {
                        self.host.exit(pid);
                        procs.remove(i);
                        check_procs(&self.host, &procs);
                    }
                    continue;
                }
                _ => template(&self.host, &procs, pid, &mut c),
            };
            let Some((op, reply)) = self.deliver(&mut procs, i, &msg) else {
                continue;
            };
            // What the preload library does after a punch or shrink of pages it maps: unmap
            // them, then tell the host (unless the input says the process dies first).
            if matches!(op, Op::Ftruncate | Op::Fallocate) && reply.b[0] != 0 && c.u8() & 1 == 0 {
                let rel = encode(&request(Op::Release, -1, -1, [0; 4]), &[]);
                self.deliver(&mut procs, i, &rel);
            }
        }
        self.finish(before, procs);
    }

    /// What the program did before the input's messages, by the bits of its first byte (the
    /// usual start of a live update's preparation), so that most inputs begin with host files
    /// and a mapping to work on: bit 0 opens `/dev/liveupdate`, bit 1 makes a memfd with three
    /// pages written, bit 2 creates session `out-a` on the device, bit 3 maps four pages of the
    /// memfd at `MAP_BASE`, bit 4 preserves the memfd in the session; bit 5 opens `/dev/kvm`
    /// and creates a VM, bit 6 creates a guest_memfd of the VM (mmap-able, shared) and maps it,
    /// bit 7 sets memslot 0 of the VM on the memfd's mapping.
    fn prelude(&mut self, procs: &mut Vec<Proc>, bits: u8) {
        let mut send = |f: &mut Self, q: Request, payload: &[u8]| {
            f.deliver(procs, 0, &encode(&q, payload))
                .map_or(-1, |(_, r)| r.ret)
        };
        let (mut dev, mut mfd, mut session) = (-1, -1, -1);
        if bits & 1 != 0 {
            dev = send(self, request(Op::Open, -1, 3, [0; 4]), b"/dev/liveupdate") as i32;
        }
        if bits & 2 != 0 {
            mfd = send(self, request(Op::MemfdCreate, -1, 4, [0; 4]), b"pre") as i32;
            send(
                self,
                request(Op::Write, mfd, -1, [0; 4]),
                &[0x5a; 3 * PAGE_SIZE as usize],
            );
        }
        if bits & 4 != 0 && dev >= 0 {
            let mut name = [0u8; 64];
            name[..5].copy_from_slice(b"out-a");
            let cs = CreateSession {
                size: 72,
                fd: -1,
                name,
            };
            let q = request(
                Op::Ioctl,
                dev,
                5,
                [LIVEUPDATE_IOCTL_CREATE_SESSION, 0, 0, 0],
            );
            if send(self, q, cs.as_bytes()) == 0 {
                session = 5;
            }
        }
        if bits & 8 != 0 && mfd >= 0 {
            let a = MmapArgs {
                addr: MAP_BASE,
                len: 4 * PAGE_SIZE,
                prot: (libc::PROT_READ | libc::PROT_WRITE) as u32,
                flags: libc::MAP_SHARED as u32,
                off: 0,
            };
            send(self, request(Op::Mmap, mfd, -1, [0; 4]), a.as_bytes());
        }
        if bits & 16 != 0 && session >= 0 && mfd >= 0 {
            let pf = PreserveFd {
                size: 16,
                fd: mfd,
                token: 1,
            };
            let q = request(
                Op::Ioctl,
                session,
                -1,
                [LIVEUPDATE_SESSION_PRESERVE_FD, 0, 0, 0],
            );
            send(self, q, pf.as_bytes());
        }
        let mut vm = -1;
        if bits & 32 != 0 && send(self, request(Op::Open, -1, 6, [0; 4]), b"/dev/kvm") == 6 {
            let q = request(Op::Ioctl, 6, 7, [KVM_CREATE_VM, 0, 0, 0]);
            if send(self, q, &0u64.to_ne_bytes()) >= 0 {
                vm = 7;
            }
        }
        if bits & 64 != 0 && vm >= 0 {
            let g = CreateGuestMemfd {
                size: 8 * PAGE_SIZE,
                flags: GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
                page_order: 0,
                pad: [0; 7],
                reserved: [0; 5],
            };
            let q = request(Op::Ioctl, vm, 8, [KVM_CREATE_GUEST_MEMFD, 0, 0, 0]);
            if send(self, q, g.as_bytes()) >= 0 {
                let a = MmapArgs {
                    addr: MAP_BASE + 128 * PAGE_SIZE,
                    len: 8 * PAGE_SIZE,
                    prot: (libc::PROT_READ | libc::PROT_WRITE) as u32,
                    flags: libc::MAP_SHARED as u32,
                    off: 0,
                };
                send(self, request(Op::Mmap, 8, -1, [0; 4]), a.as_bytes());
            }
        }
        if bits & 128 != 0 && vm >= 0 {
            let q = request(Op::Ioctl, vm, -1, [KVM_SET_USER_MEMORY_REGION, 0, 0, 0]);
            send(self, q, &memslot_v1(0, 0, 0, 4 * PAGE_SIZE, MAP_BASE));
        }
    }

    /// A new input: the totals to come back to, and its program's process.
    fn begin(&mut self) -> (Totals, Vec<Proc>) {
        self.inputs += 1;
        let before = Totals::of(&self.host);
        let root = self.host.spawn();
        let procs = vec![Proc {
            pid: root,
            parent: None,
            bound: true,
        }];
        (before, procs)
    }

    /// The end of an input: every process exits; the host must be back at `before`.
    fn finish(&mut self, before: Totals, procs: Vec<Proc>) {
        for p in procs.iter().rev() {
            self.host.exit(p.pid);
        }
        for p in &procs {
            assert!(
                self.host.proc_ref(p.pid).is_err(),
                "process {} still exists after exit",
                p.pid
            );
        }
        let after = Totals::of(&self.host);
        assert_eq!(
            after, before,
            "every process of the input exited, but the host did not come back to where it was"
        );
    }

    /// Serve one message from process `procs[i]` as the serve loop does; returns the op served
    /// and the reply, or None if the message was refused before `serve`.
    fn deliver(&mut self, procs: &mut Vec<Proc>, i: usize, msg: &[u8]) -> Option<(Op, Reply)> {
        let h = &mut self.host;
        // Not a request: answered with EINVAL or ENOSYS, nothing served.
        let d = decode(msg).ok()?;
        let sender = procs[i].pid;
        if !procs[i].bound {
            // A fork's socket binds with Hello; anything before it is EPERM.
            if d.op != Op::Hello {
                return None;
            }
            procs[i].bound = true;
        }
        self.requests += 1;
        let a = serve(h, sender, &d);
        check_answer(h, sender, &d.req, d.op, &a);
        match a.effect {
            Effect::Fork(child) => procs.push(Proc {
                pid: child,
                parent: Some(sender),
                bound: false,
            }),
            Effect::ForkAbort(child) => {
                if let Some(j) = procs
                    .iter()
                    .position(|p| p.pid == child && !p.bound && p.parent == Some(sender))
                {
                    h.exit(child);
                    procs.remove(j);
                }
            }
            // A vCPU's thread and a kick are the serve loop's, not the host's.
            Effect::None | Effect::PassRam | Effect::Kexec | Effect::Vcpu(_) | Effect::Kick(_) => {}
        }
        check_procs(h, procs);
        Some((d.op, a.reply))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::boundary::PageRun;

    /// Send `q` with `payload` from `procs[i]`; the reply, or None if refused before `serve`.
    fn send(
        f: &mut BoundaryFuzzer,
        procs: &mut Vec<Proc>,
        i: usize,
        q: Request,
        payload: &[u8],
    ) -> Option<Reply> {
        f.deliver(procs, i, &encode(&q, payload)).map(|(_, r)| r)
    }

    fn ret(r: Option<Reply>) -> i64 {
        r.expect("served").ret
    }

    #[test]
    fn a_session_a_mapping_and_a_fork_leave_nothing() {
        let mut f = BoundaryFuzzer::new();
        f.run(&[]);
        let (before, mut procs) = f.begin();
        let p = &mut procs;
        let e = |x: crate::uapi::Errno| -i64::from(x.0);
        assert_eq!(
            ret(send(
                &mut f,
                p,
                0,
                request(Op::Open, -1, 3, [0; 4]),
                b"/dev/liveupdate"
            )),
            3
        );
        let cs = CreateSession {
            size: 72,
            fd: -1,
            name: {
                let mut n = [0u8; 64];
                n[..13].copy_from_slice(b"boundary-test");
                n
            },
        };
        let q = request(Op::Ioctl, 3, 4, [LIVEUPDATE_IOCTL_CREATE_SESSION, 0, 0, 0]);
        let r = send(&mut f, p, 0, q, cs.as_bytes()).expect("served");
        assert_eq!((r.ret, r.b[0]), (0, 4));
        for fd in [5, 6] {
            let q = request(Op::MemfdCreate, -1, fd, [0; 4]);
            assert_eq!(ret(send(&mut f, p, 0, q, b"m")), i64::from(fd));
            let q = request(Op::Write, fd, -1, [0; 4]);
            assert_eq!(ret(send(&mut f, p, 0, q, &[7u8; 8192])), 8192);
        }
        // Four pages mapped from a two-page file: the two present pages come back as one run.
        let map = |f: &mut BoundaryFuzzer, p: &mut Vec<Proc>, fd: i32, addr: u64| {
            let a = MmapArgs {
                addr,
                len: 4 * PAGE_SIZE,
                prot: (libc::PROT_READ | libc::PROT_WRITE) as u32,
                flags: libc::MAP_SHARED as u32,
                off: 0,
            };
            send(f, p, 0, request(Op::Mmap, fd, -1, [0; 4]), a.as_bytes()).expect("served")
        };
        let r = map(&mut f, p, 5, MAP_BASE);
        assert_eq!(r.ret, 0);
        assert_ne!(r.b[0], 0, "the file id");
        assert_eq!(map(&mut f, p, 6, MAP_BASE + 16 * PAGE_SIZE).ret, 0);
        let fault = |f: &mut BoundaryFuzzer, p: &mut Vec<Proc>, i: usize, a: u64| {
            let mut q = request(Op::Fault, -1, -1, [a, 0, 0, 0]);
            q.flags = F_WRITE_FAULT;
            ret(send(f, p, i, q, &[]))
        };
        assert_eq!(fault(&mut f, p, 0, MAP_BASE + 5), 0);
        assert_eq!(
            fault(&mut f, p, 0, MAP_BASE + 3 * PAGE_SIZE),
            e(crate::uapi::Errno::EFAULT)
        );
        assert_eq!(
            fault(&mut f, p, 0, MAP_BASE + 4 * PAGE_SIZE),
            e(crate::uapi::Errno::EFAULT)
        );
        // A fork: the child's socket takes nothing before its Hello.
        let child = ret(send(
            &mut f,
            p,
            0,
            request(Op::ForkPrepare, -1, -1, [0; 4]),
            &[],
        ));
        assert!(child > 0);
        assert_eq!(p.len(), 2);
        assert!(send(&mut f, p, 1, request(Op::Close, 3, -1, [0; 4]), &[]).is_none());
        assert_eq!(
            ret(send(&mut f, p, 1, request(Op::Hello, -1, -1, [0; 4]), &[])),
            0
        );
        assert_eq!(fault(&mut f, p, 1, MAP_BASE + 16 * PAGE_SIZE), 0);
        // A bound child is not dropped by ForkAbort.
        let q = request(Op::ForkAbort, -1, -1, [child as u64, 0, 0, 0]);
        assert_eq!(ret(send(&mut f, p, 0, q, &[])), 0);
        assert_eq!(p.len(), 2);
        // Preserve memfd 5; shrink memfd 6, which both processes map: EBUSY.
        let pf = PreserveFd {
            size: 16,
            fd: 5,
            token: 1,
        };
        let q = request(Op::Ioctl, 4, -1, [LIVEUPDATE_SESSION_PRESERVE_FD, 0, 0, 0]);
        assert_eq!(ret(send(&mut f, p, 0, q, pf.as_bytes())), 0);
        let q = request(Op::Ftruncate, 6, -1, [0; 4]);
        assert_eq!(
            ret(send(&mut f, p, 0, q, &[])),
            e(crate::uapi::Errno::EBUSY)
        );
        // Once the child has exited, the shrink is deferred until the program releases.
        f.host.exit(child as Pid);
        p.remove(1);
        let r = send(&mut f, p, 0, q, &[]).expect("served");
        assert_eq!(r.ret, 0);
        assert_eq!(&r.b[1..], &[0, 2]);
        assert_eq!(
            ret(send(
                &mut f,
                p,
                0,
                request(Op::Release, -1, -1, [0; 4]),
                &[]
            )),
            0
        );
        // The reply to a fault carries page runs.
        let mut q = request(Op::Fault, -1, -1, [MAP_BASE + PAGE_SIZE, 0, 0, 0]);
        q.flags = 0;
        let d = encode(&q, &[]);
        let (_, r) = f.deliver(p, 0, &d).expect("served");
        assert_eq!(r.ret, 0);
        let pid = p[0].pid;
        let a = serve(&mut f.host, pid, &decode(&d).expect("decodes"));
        let runs = <[PageRun]>::ref_from_bytes(&a.payload).expect("runs");
        assert!(runs.iter().any(|r| r.index <= 1 && r.index + r.npages > 1));
        f.finish(before, procs);
        assert!(f.requests() >= 20, "{} requests served", f.requests());
    }

    #[test]
    fn pseudo_random_inputs_leave_nothing() {
        let mut f = BoundaryFuzzer::new();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..400 {
            let len = (next() % 700) as usize;
            let data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            f.run(&data);
        }
        assert_eq!(f.inputs(), 400);
        assert!(f.requests() > 1000, "only {} requests served", f.requests());
    }
}
