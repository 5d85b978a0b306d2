//! Model-based property test of LUO through the user API. Random sequences of session, memfd
//! and kexec operations run against a host image and against a small model of what DESIGN.md §4
//! and upstream (shared/reference/upstream-linux.md §1.5–1.7) say must happen. Checked after
//! every step: no panic; every call's result (Ok or the exact errno) is the model's prediction;
//! LUO's session and file counts; "pages preserved" is zero exactly when no outgoing session
//! holds a file; "incoming pages not restored" is zero exactly when nothing handed over is still
//! waiting (not deserialized yet, or a file neither retrieved nor finished). After each kexec the
//! frame accounting adds up. Every retrieved memfd has exactly the size, bytes and position it had
//! at the kexec, and a second retrieve gives the same open file. At the end of a case everything
//! is closed (incoming sessions retrieved and finished), the process exits, and the only RAM in
//! use is the outgoing tracker's nodes (which are never freed); then one more kexec, the device
//! opened (which frees the incoming LUO blob), everything closed again, and the same holds.
//!
//! The rules the model follows:
//! * `/dev/liveupdate` is exclusive (EBUSY); closing it does not touch sessions.
//! * CREATE_SESSION: EEXIST only against *outgoing* sessions (an incoming session may share a
//!   name with an outgoing one).
//! * PRESERVE_FD: EINVAL on an incoming session, then EEXIST for a token in use in the session,
//!   then EBUSY for a file LUO already manages: preserved in an outgoing session, *or retrieved
//!   from an incoming session that has not finished* (upstream `luo_retrieve_file` inserts the
//!   file into `luo_preserved_files`; `luo_file_finish` erases it). A preserved memfd cannot grow.
//! * Closing an outgoing session unpreserves its files; only sessions still open at the kexec are
//!   handed over. Closing a retrieved incoming session is an implicit FINISH and the session is
//!   gone (RETRIEVE_SESSION then says ENOENT). Incoming sessions never retrieved, and all of them
//!   if `/dev/liveupdate` was never opened in that image, are dropped at the next kexec.
//! * RETRIEVE_SESSION: ENOENT if no such incoming session, EINVAL if already retrieved.
//! * RETRIEVE_FD: EINVAL on an outgoing session, ENOENT for an unknown (or finished) token; a
//!   second retrieve returns the same open file.
//! * FINISH: EINVAL on an outgoing session; afterwards the session has no files, and the files
//!   it had retrieved may be preserved again.

use std::collections::BTreeMap;

use handover::fs::FileId;
use handover::host::Host;
use handover::kexec::BootParams;
use handover::mm::PAGE_SIZE;
use handover::uapi::{Errno, Pid, SysResult};
use handover::vmm::libluo::*;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

const RAM: u64 = 64 << 20;
const NAMES: [&str; 3] = ["alpha", "beta", "gamma"];
const TOKENS: [u64; 4] = [0, 1, 0xfeed, u64::MAX];
/// `Aim::Pool` range for session fds (picked modulo the number of open sessions).
const SESSION_POOL: usize = 8;

/// What an operation aims at. `Pool(i)` is entry `i` of the fixed pool of names or tokens (for a
/// session: any open session fd), so misses and wrong kinds happen. `Live(k)` picks among what
/// the model says exists (outgoing sessions to preserve into, incoming sessions to retrieve,
/// the session's tokens), creating or retrieving a session first if there is none, so that
/// sequences get deep enough to carry files across kexecs.
#[derive(Clone, Copy, Debug)]
enum Aim {
    Pool(usize),
    Live(u16),
}

#[derive(Clone, Debug)]
enum Op {
    OpenDev,
    CloseDev,
    CreateSession(usize),
    /// memfd_create, then write `len` bytes of a pattern at offset 0.
    MemfdCreate {
        len: usize,
        seed: u8,
    },
    /// The brief's compound operation: memfd_create + write + PRESERVE_FD (into a session if
    /// there is one), then maybe close the memfd (the session keeps the file).
    NewPreserved {
        session: Aim,
        token: usize,
        len: usize,
        seed: u8,
        keep_fd: bool,
    },
    /// pwrite at offset 0 into an open memfd (grows it unless it is preserved).
    Write {
        memfd: u16,
        len: usize,
        seed: u8,
    },
    /// lseek(SEEK_SET) of an open memfd: the position is handed over too.
    Seek {
        memfd: u16,
        pos: u16,
    },
    Preserve {
        session: Aim,
        memfd: u16,
        token: usize,
    },
    CloseSession(u16),
    CloseMemfd(u16),
    Kexec {
        reopen: bool,
    },
    RetrieveSession(Aim),
    RetrieveFd {
        session: Aim,
        token: Aim,
    },
    Finish(Aim),
    GetName(u16),
}

/// Pick an element of a list of `len` (> 0) by a generated number; shrinks to the first.
fn pick(k: u16, len: usize) -> usize {
    k as usize % len
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i % 251) as u8).wrapping_mul(3) | 1)
        .collect()
}

fn aim(pool: usize) -> impl Strategy<Value = Aim> {
    prop_oneof![
        1 => (0..pool).prop_map(Aim::Pool),
        3 => any::<u16>().prop_map(Aim::Live),
    ]
}

/// Empty, within one page, just over one page, just over two pages.
fn len_strategy() -> impl Strategy<Value = usize> {
    prop_oneof![0usize..64, 4000usize..4200, 8190usize..8200]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let name = 0..NAMES.len();
    let token = 0..TOKENS.len();
    prop_oneof![
        1 => Just(Op::OpenDev),
        1 => Just(Op::CloseDev),
        8 => name.prop_map(Op::CreateSession),
        2 => (len_strategy(), any::<u8>()).prop_map(|(len, seed)| Op::MemfdCreate { len, seed }),
        10 => (aim(SESSION_POOL), token.clone(), len_strategy(), any::<u8>(), any::<bool>())
            .prop_map(|(session, token, len, seed, keep_fd)| Op::NewPreserved {
                session, token, len, seed, keep_fd
            }),
        2 => (any::<u16>(), len_strategy(), any::<u8>())
            .prop_map(|(memfd, len, seed)| Op::Write { memfd, len, seed }),
        1 => (any::<u16>(), any::<u16>()).prop_map(|(memfd, pos)| Op::Seek { memfd, pos }),
        3 => (aim(SESSION_POOL), any::<u16>(), token)
            .prop_map(|(session, memfd, token)| Op::Preserve { session, memfd, token }),
        1 => any::<u16>().prop_map(Op::CloseSession),
        1 => any::<u16>().prop_map(Op::CloseMemfd),
        1 => prop::bool::weighted(0.85).prop_map(|reopen| Op::Kexec { reopen }),
        6 => aim(NAMES.len()).prop_map(Op::RetrieveSession),
        8 => (aim(SESSION_POOL), aim(TOKENS.len()))
            .prop_map(|(session, token)| Op::RetrieveFd { session, token }),
        1 => aim(SESSION_POOL).prop_map(Op::Finish),
        1 => any::<u16>().prop_map(Op::GetName),
    ]
}

/// A case: up to four epochs of 1 to 11 operations with a kexec between epochs (so most cases
/// carry sessions across at least one kexec), at most 47 operations in all.
fn case_strategy() -> impl Strategy<Value = Vec<Op>> {
    let epoch = (
        prop::collection::vec(op_strategy(), 1..12),
        prop::bool::weighted(0.85),
    );
    prop::collection::vec(epoch, 1..5).prop_map(|epochs| {
        let mut ops = Vec::new();
        for (i, (e, reopen)) in epochs.into_iter().enumerate() {
            if i > 0 {
                ops.push(Op::Kexec { reopen });
            }
            ops.extend(e);
        }
        ops
    })
}

/// Which session, if any, LUO manages a file for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Holder {
    Nobody,
    /// Preserved in an open outgoing session (its size is frozen).
    Outgoing,
    /// Retrieved from this incoming session, which has not finished.
    Incoming(&'static str),
}

/// A memfd file of the current image.
struct FileM {
    content: Vec<u8>,
    pos: u64,
    host: FileId,
    holder: Holder,
}

/// An open memfd fd and the model file behind it.
struct MemfdFd {
    fd: i32,
    file: usize,
}

enum SessKind {
    /// Outgoing: (token, model file) in preservation order.
    Out(Vec<(u64, usize)>),
    /// A retrieved incoming session (its state is in `Model::incoming` under the name).
    In,
}

struct SessFd {
    fd: i32,
    name: &'static str,
    kind: SessKind,
}

enum IncFile {
    /// Not retrieved yet: the bytes and position the file had at the kexec.
    Pending { content: Vec<u8>, pos: u64 },
    /// Retrieved into this model file.
    Retrieved(usize),
}

struct IncM {
    files: BTreeMap<u64, IncFile>,
    retrieved: bool,
}

#[derive(Default)]
struct Model {
    dev: Option<i32>,
    files: Vec<FileM>,
    memfds: Vec<MemfdFd>,
    sessions: Vec<SessFd>,
    /// Handed over by the previous image; becomes `incoming` at the first open of the device.
    latent: Option<BTreeMap<&'static str, IncM>>,
    incoming: BTreeMap<&'static str, IncM>,
}

impl Model {
    fn outgoing_files(&self) -> usize {
        self.sessions
            .iter()
            .map(|s| match &s.kind {
                SessKind::Out(f) => f.len(),
                SessKind::In => 0,
            })
            .sum()
    }

    /// The incoming session `name` finished (FINISH or close): its files leave it, and the
    /// ones it had retrieved are free to be preserved again.
    fn finished(&mut self, name: &'static str) {
        if let Some(i) = self.incoming.get_mut(name) {
            i.files.clear();
        }
        for f in &mut self.files {
            if f.holder == Holder::Incoming(name) {
                f.holder = Holder::Nobody;
            }
        }
    }
}

struct World {
    h: Option<Host>,
    pid: Pid,
    m: Model,
}

fn boot() -> World {
    let mut h = Host::boot(BootParams {
        ram_size: RAM,
        ..Default::default()
    })
    .expect("cold boot");
    let pid = h.spawn();
    World {
        h: Some(h),
        pid,
        m: Model::default(),
    }
}

fn read_back(h: &mut Host, pid: Pid, fd: i32, want: usize) -> SysResult<Vec<u8>> {
    // One byte more than expected: the file's size must match too.
    read_all(h, pid, fd, want + 1)
}

impl World {
    fn host(&mut self) -> &mut Host {
        self.h.as_mut().expect("host")
    }

    fn kexec(&mut self) -> Result<(), TestCaseError> {
        let h = self.h.take().expect("host");
        let mut h = match h.kexec_in_process() {
            Ok(h) => h,
            Err(e) => return Err(TestCaseError::fail(format!("kexec failed: {e:?}"))),
        };
        let st = h.status().frames;
        prop_assert_eq!(st.free + st.used, st.total, "frame accounting after kexec");
        prop_assert!(
            st.used >= h.status().tracker_bytes / PAGE_SIZE,
            "tracker nodes are in use"
        );
        self.pid = h.spawn();
        self.h = Some(h);
        // All process state is gone; the open outgoing sessions are handed over.
        let m = &mut self.m;
        let mut inc = BTreeMap::new();
        for s in m.sessions.drain(..) {
            if let SessKind::Out(files) = s.kind {
                let files = files
                    .into_iter()
                    .map(|(t, f)| {
                        let f = &m.files[f];
                        let (content, pos) = (f.content.clone(), f.pos);
                        (t, IncFile::Pending { content, pos })
                    })
                    .collect();
                inc.insert(
                    s.name,
                    IncM {
                        files,
                        retrieved: false,
                    },
                );
            }
        }
        *m = Model {
            latent: Some(inc),
            ..Default::default()
        };
        Ok(())
    }

    fn open_dev(&mut self) -> Result<(), TestCaseError> {
        let pid = self.pid;
        let r = self.host().open(pid, "/dev/liveupdate", 0);
        match self.m.dev {
            Some(_) => prop_assert_eq!(r, Err(Errno::EBUSY), "second open of /dev/liveupdate"),
            None => {
                prop_assert!(r.is_ok(), "open /dev/liveupdate: {:?}", r);
                self.m.dev = r.ok();
                if let Some(l) = self.m.latent.take() {
                    self.m.incoming = l;
                }
            }
        }
        Ok(())
    }

    /// Compare the implementation's bookkeeping with the model after a step.
    fn check_counts(&mut self, ctx: &str) -> Result<(), TestCaseError> {
        let m = &self.m;
        let out = m
            .sessions
            .iter()
            .filter(|s| matches!(s.kind, SessKind::Out(_)))
            .count();
        let inc_files: usize = m.incoming.values().map(|i| i.files.len()).sum();
        let counts = (out, m.incoming.len(), m.outgoing_files() + inc_files);
        let out_files = m.outgoing_files();
        let waiting = m.latent.is_some()
            || m.incoming.values().any(|i| {
                i.files
                    .values()
                    .any(|f| matches!(f, IncFile::Pending { .. }))
            });
        let st = self.host().status();
        prop_assert_eq!(
            self.host().luo().counts(),
            counts,
            "{}: LUO counts (outgoing, incoming, files)",
            ctx
        );
        prop_assert_eq!(
            st.preserved == 0,
            out_files == 0,
            "{}: {} pages preserved with {} outgoing files",
            ctx,
            st.preserved,
            out_files
        );
        prop_assert_eq!(
            st.incoming_outstanding > 0,
            waiting,
            "{}: {} incoming pages not restored",
            ctx,
            st.incoming_outstanding
        );
        Ok(())
    }

    /// CREATE_SESSION (the device is open).
    fn create_session(&mut self, name: &'static str) -> Result<(), TestCaseError> {
        let (pid, d) = (self.pid, self.m.dev.unwrap_or(-1));
        let r = create_session(self.host(), pid, d, name);
        let dup = self
            .m
            .sessions
            .iter()
            .any(|s| s.name == name && matches!(s.kind, SessKind::Out(_)));
        if dup {
            prop_assert_eq!(r, Err(Errno::EEXIST), "{} is outgoing already", name);
        } else {
            prop_assert!(r.is_ok(), "create {}: {:?}", name, r);
            self.m.sessions.push(SessFd {
                fd: r.unwrap_or(-1),
                name,
                kind: SessKind::Out(Vec::new()),
            });
        }
        Ok(())
    }

    /// Incoming sessions not retrieved yet.
    fn unretrieved(&self) -> Vec<&'static str> {
        self.m
            .incoming
            .iter()
            .filter(|(_, i)| !i.retrieved)
            .map(|(n, _)| *n)
            .collect()
    }

    /// RETRIEVE_SESSION (the device is open).
    fn retrieve_session(&mut self, name: &'static str) -> Result<(), TestCaseError> {
        let (pid, d) = (self.pid, self.m.dev.unwrap_or(-1));
        let r = retrieve_session(self.host(), pid, d, name);
        match self.m.incoming.get_mut(name) {
            None => prop_assert_eq!(r, Err(Errno::ENOENT), "no incoming {}", name),
            Some(i) if i.retrieved => {
                prop_assert_eq!(r, Err(Errno::EINVAL), "{} already retrieved", name)
            }
            Some(i) => {
                prop_assert!(r.is_ok(), "retrieve session {}: {:?}", name, r);
                i.retrieved = true;
                self.m.sessions.push(SessFd {
                    fd: r.unwrap_or(-1),
                    name,
                    kind: SessKind::In,
                });
            }
        }
        Ok(())
    }

    /// The session fd an op works on. `Pool(i)` takes any open session fd. `Live(k)` takes one
    /// of the kind that makes the call succeed (outgoing for PRESERVE_FD, retrieved incoming
    /// otherwise), first creating or retrieving one if there is none and the device is open.
    fn pick_session(&mut self, a: Aim, outgoing: bool) -> Result<Option<usize>, TestCaseError> {
        if let Aim::Live(k) = a {
            let fit: Vec<usize> = (0..self.m.sessions.len())
                .filter(|&i| matches!(self.m.sessions[i].kind, SessKind::Out(_)) == outgoing)
                .collect();
            if !fit.is_empty() {
                return Ok(Some(fit[pick(k, fit.len())]));
            }
            if self.m.dev.is_some() {
                let n = self.m.sessions.len();
                if outgoing {
                    self.create_session(NAMES[pick(k, NAMES.len())])?;
                } else {
                    let live = self.unretrieved();
                    if !live.is_empty() {
                        self.retrieve_session(live[pick(k, live.len())])?;
                    }
                }
                if self.m.sessions.len() > n {
                    return Ok(Some(n));
                }
            }
        }
        let n = self.m.sessions.len();
        Ok((n > 0).then(|| match a {
            Aim::Live(k) => pick(k, n),
            Aim::Pool(i) => pick(i as u16, n),
        }))
    }

    /// memfd_create, then write `len` bytes of a pattern at offset 0.
    fn memfd_create(&mut self, len: usize, seed: u8) -> Result<(), TestCaseError> {
        let pid = self.pid;
        let data = pattern(len, seed);
        let h = self.host();
        let fd = h.memfd_create(pid, "prop", 0);
        prop_assert!(fd.is_ok(), "memfd_create: {:?}", fd);
        let fd = fd.unwrap_or(-1);
        prop_assert_eq!(h.pwrite(pid, fd, &data, 0), Ok(data.len()));
        let host = h.fd_file(pid, fd);
        prop_assert!(host.is_ok());
        self.m.files.push(FileM {
            content: data,
            pos: 0,
            host: host.unwrap_or(0),
            holder: Holder::Nobody,
        });
        let file = self.m.files.len() - 1;
        self.m.memfds.push(MemfdFd { fd, file });
        Ok(())
    }

    /// PRESERVE_FD of memfd fd `mi` into session fd `si`.
    fn preserve(&mut self, si: usize, mi: usize, token: u64) -> Result<(), TestCaseError> {
        let pid = self.pid;
        let MemfdFd { fd, file } = self.m.memfds[mi];
        let sfd = self.m.sessions[si].fd;
        let r = preserve_fd(self.host(), pid, sfd, fd, token);
        let holder = self.m.files[file].holder;
        match &mut self.m.sessions[si].kind {
            SessKind::In => prop_assert_eq!(r, Err(Errno::EINVAL), "incoming session"),
            SessKind::Out(files) if files.iter().any(|&(t, _)| t == token) => {
                prop_assert_eq!(r, Err(Errno::EEXIST), "token {:#x} in use", token)
            }
            SessKind::Out(_) if holder != Holder::Nobody => {
                prop_assert_eq!(
                    r,
                    Err(Errno::EBUSY),
                    "the file is in a session: {:?}",
                    holder
                )
            }
            SessKind::Out(files) => {
                prop_assert_eq!(r, Ok(()));
                files.push((token, file));
                self.m.files[file].holder = Holder::Outgoing;
            }
        }
        Ok(())
    }

    /// Close memfd fd `mi`; a session that holds the file keeps it.
    fn close_memfd(&mut self, mi: usize) -> Result<(), TestCaseError> {
        let pid = self.pid;
        let f = self.m.memfds.remove(mi);
        prop_assert_eq!(self.host().close(pid, f.fd), Ok(()));
        Ok(())
    }

    /// RETRIEVE_FD, checking the file against the model.
    fn retrieve_fd(&mut self, session: Aim, token: Aim) -> Result<(), TestCaseError> {
        let pid = self.pid;
        let Some(si) = self.pick_session(session, false)? else {
            return Ok(());
        };
        let s = &self.m.sessions[si];
        let (sfd, name, out) = (s.fd, s.name, matches!(s.kind, SessKind::Out(_)));
        let tokens: Vec<u64> = match self.m.incoming.get(name) {
            Some(i) if !out => i.files.keys().copied().collect(),
            _ => Vec::new(),
        };
        let token = match token {
            Aim::Live(k) if !tokens.is_empty() => tokens[pick(k, tokens.len())],
            Aim::Live(k) => TOKENS[pick(k, TOKENS.len())],
            Aim::Pool(i) => TOKENS[i],
        };
        let r = retrieve_fd(self.host(), pid, sfd, token);
        if out {
            prop_assert_eq!(r, Err(Errno::EINVAL), "RETRIEVE_FD on an outgoing session");
            return Ok(());
        }
        let inc = self.m.incoming.get(name);
        prop_assert!(inc.is_some(), "model: retrieved session {} exists", name);
        let expect = inc.and_then(|i| match i.files.get(&token) {
            None => None,
            Some(IncFile::Pending { content, pos }) => Some((content.clone(), *pos, None)),
            Some(IncFile::Retrieved(f)) => {
                let f0 = &self.m.files[*f];
                Some((f0.content.clone(), f0.pos, Some(*f)))
            }
        });
        let Some((content, pos, known)) = expect else {
            prop_assert_eq!(r, Err(Errno::ENOENT), "unknown token {:#x}", token);
            return Ok(());
        };
        prop_assert!(r.is_ok(), "retrieve token {:#x}: {:?}", token, r);
        let fd = r.unwrap_or(-1);
        let h = self.host();
        let got = read_back(h, pid, fd, content.len());
        prop_assert_eq!(
            got.as_deref(),
            Ok(&content[..]),
            "content of token {:#x} in {}",
            token,
            name
        );
        prop_assert_eq!(h.lseek(pid, fd, 0, libc::SEEK_CUR), Ok(pos), "position");
        let host = h.fd_file(pid, fd);
        prop_assert!(host.is_ok());
        let host = host.unwrap_or(0);
        let file = match known {
            Some(f) => {
                prop_assert_eq!(host, self.m.files[f].host, "second retrieve: same file");
                f
            }
            None => {
                self.m.files.push(FileM {
                    content,
                    pos,
                    host,
                    holder: Holder::Incoming(name),
                });
                let f = self.m.files.len() - 1;
                if let Some(i) = self.m.incoming.get_mut(name) {
                    i.files.insert(token, IncFile::Retrieved(f));
                }
                f
            }
        };
        self.m.memfds.push(MemfdFd { fd, file });
        Ok(())
    }

    fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let pid = self.pid;
        match op {
            Op::OpenDev => self.open_dev()?,
            Op::CloseDev => {
                if let Some(d) = self.m.dev.take() {
                    prop_assert_eq!(self.host().close(pid, d), Ok(()));
                }
            }
            Op::CreateSession(n) => {
                if self.m.dev.is_some() {
                    self.create_session(NAMES[*n])?;
                }
            }
            Op::MemfdCreate { len, seed } => self.memfd_create(*len, *seed)?,
            Op::NewPreserved {
                session,
                token,
                len,
                seed,
                keep_fd,
            } => {
                self.memfd_create(*len, *seed)?;
                let mi = self.m.memfds.len() - 1;
                if let Some(si) = self.pick_session(*session, true)? {
                    self.preserve(si, mi, TOKENS[*token])?;
                }
                if !keep_fd {
                    self.close_memfd(mi)?;
                }
            }
            Op::Write { memfd, len, seed } => {
                if self.m.memfds.is_empty() {
                    return Ok(());
                }
                let MemfdFd { fd, file } = self.m.memfds[pick(*memfd, self.m.memfds.len())];
                let data = pattern(*len, *seed);
                let r = self.host().pwrite(pid, fd, &data, 0);
                let f = &mut self.m.files[file];
                if f.holder == Holder::Outgoing && data.len() > f.content.len() {
                    prop_assert_eq!(r, Err(Errno::EPERM), "a preserved memfd cannot grow");
                } else {
                    prop_assert_eq!(r, Ok(data.len()));
                    if data.len() > f.content.len() {
                        f.content.resize(data.len(), 0);
                    }
                    f.content[..data.len()].copy_from_slice(&data);
                }
            }
            Op::Seek { memfd, pos } => {
                if self.m.memfds.is_empty() {
                    return Ok(());
                }
                let MemfdFd { fd, file } = self.m.memfds[pick(*memfd, self.m.memfds.len())];
                let pos = u64::from(*pos);
                let r = self.host().lseek(pid, fd, pos as i64, libc::SEEK_SET);
                prop_assert_eq!(r, Ok(pos));
                self.m.files[file].pos = pos;
            }
            Op::Preserve {
                session,
                memfd,
                token,
            } => {
                let Some(si) = self.pick_session(*session, true)? else {
                    return Ok(());
                };
                if self.m.memfds.is_empty() {
                    return Ok(());
                }
                let mi = pick(*memfd, self.m.memfds.len());
                self.preserve(si, mi, TOKENS[*token])?;
            }
            Op::CloseSession(i) => {
                if self.m.sessions.is_empty() {
                    return Ok(());
                }
                let s = self.m.sessions.remove(pick(*i, self.m.sessions.len()));
                prop_assert_eq!(self.host().close(pid, s.fd), Ok(()));
                match s.kind {
                    SessKind::Out(files) => {
                        for (_, f) in files {
                            self.m.files[f].holder = Holder::Nobody;
                        }
                    }
                    SessKind::In => {
                        self.m.finished(s.name);
                        self.m.incoming.remove(s.name);
                    }
                }
            }
            Op::CloseMemfd(i) => {
                if !self.m.memfds.is_empty() {
                    self.close_memfd(pick(*i, self.m.memfds.len()))?;
                }
            }
            Op::Kexec { reopen } => {
                self.kexec()?;
                if *reopen {
                    self.open_dev()?;
                }
            }
            Op::RetrieveSession(a) => {
                if self.m.dev.is_none() {
                    return Ok(());
                }
                let live = self.unretrieved();
                let name = match *a {
                    Aim::Live(k) if !live.is_empty() => live[pick(k, live.len())],
                    Aim::Live(k) => NAMES[pick(k, NAMES.len())],
                    Aim::Pool(i) => NAMES[i],
                };
                self.retrieve_session(name)?;
            }
            Op::RetrieveFd { session, token } => self.retrieve_fd(*session, *token)?,
            Op::Finish(a) => {
                let Some(si) = self.pick_session(*a, false)? else {
                    return Ok(());
                };
                let s = &self.m.sessions[si];
                let (sfd, name, out) = (s.fd, s.name, matches!(s.kind, SessKind::Out(_)));
                let r = finish(self.host(), pid, sfd);
                if out {
                    prop_assert_eq!(r, Err(Errno::EINVAL), "FINISH on an outgoing session");
                } else {
                    prop_assert_eq!(r, Ok(()));
                    self.m.finished(name);
                }
            }
            Op::GetName(i) => {
                if self.m.sessions.is_empty() {
                    return Ok(());
                }
                let s = &self.m.sessions[pick(*i, self.m.sessions.len())];
                let (sfd, name) = (s.fd, s.name);
                prop_assert_eq!(get_name(self.host(), pid, sfd), Ok(name.to_string()));
            }
        }
        Ok(())
    }

    /// Close everything this image holds: retrieve and finish every incoming session, close
    /// every session (outgoing ones unpreserve), every memfd and the device, and exit.
    fn close_all(&mut self) -> Result<(), TestCaseError> {
        if self.m.dev.is_none() {
            self.open_dev()?;
        }
        let pid = self.pid;
        let d = self.m.dev.unwrap_or(-1);
        for name in self.unretrieved() {
            self.retrieve_session(name)?;
        }
        for s in std::mem::take(&mut self.m.sessions) {
            if matches!(s.kind, SessKind::In) {
                prop_assert_eq!(finish(self.host(), pid, s.fd), Ok(()), "cleanup: finish");
            }
            prop_assert_eq!(self.host().close(pid, s.fd), Ok(()), "cleanup: close");
        }
        self.m.incoming.clear();
        for f in std::mem::take(&mut self.m.memfds) {
            prop_assert_eq!(self.host().close(pid, f.fd), Ok(()));
        }
        self.m.files.clear();
        prop_assert_eq!(self.host().close(pid, d), Ok(()));
        self.m.dev = None;
        self.host().exit(pid);
        Ok(())
    }

    /// Nothing but the outgoing tracker's nodes is in use, and no file is open.
    fn check_clean(&mut self, ctx: &str) -> Result<(), TestCaseError> {
        let h = self.host();
        let st = h.status();
        prop_assert_eq!(h.luo().counts(), (0, 0, 0), "{}: sessions left", ctx);
        prop_assert_eq!(h.files().len(), 0, "{}: files left open", ctx);
        prop_assert_eq!(st.preserved, 0, "{}: pages still preserved", ctx);
        prop_assert_eq!(
            st.incoming_outstanding,
            0,
            "{}: incoming pages never restored",
            ctx
        );
        prop_assert_eq!(
            st.frames.used,
            st.tracker_bytes / PAGE_SIZE,
            "{}: frames in use beyond the tracker nodes ({:?})",
            ctx,
            st
        );
        Ok(())
    }
}

fn run(ops: &[Op]) -> Result<(), TestCaseError> {
    let mut w = boot();
    w.open_dev()?;
    for (i, op) in ops.iter().enumerate() {
        w.step(op)
            .map_err(|e| TestCaseError::fail(format!("step {i} {op:?}: {e}")))?;
        w.check_counts(&format!("after step {i} {op:?}"))?;
    }
    w.close_all()?;
    w.check_clean("after closing everything")?;
    w.kexec()?;
    w.open_dev()?;
    w.check_counts("after the final kexec")?;
    w.close_all()?;
    w.check_clean("after the final kexec")?;
    Ok(())
}

/// 256 cases (well under a second at opt-level 1) unless PROPTEST_CASES says otherwise;
/// failures are not persisted to a file (the shrunk case is in the failure message).
fn config() -> ProptestConfig {
    let mut c = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = 256;
    }
    c.failure_persistence = None;
    c
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn luo_matches_the_model(ops in case_strategy()) {
        run(&ops)?;
    }
}

fn pre(session: usize, memfd: u16, token: usize) -> Op {
    Op::Preserve {
        session: Aim::Pool(session),
        memfd,
        token,
    }
}

fn get(session: usize, token: usize) -> Op {
    Op::RetrieveFd {
        session: Aim::Pool(session),
        token: Aim::Pool(token),
    }
}

/// A fixed sequence through the rules, so the model itself is exercised deterministically.
#[test]
fn model_walkthrough() {
    use Op::*;
    let write = |memfd, len, seed| Write { memfd, len, seed };
    let ops = vec![
        CloseDev,
        OpenDev,
        OpenDev, // EBUSY
        CreateSession(0),
        CreateSession(0), // EEXIST
        CreateSession(1),
        MemfdCreate { len: 5000, seed: 7 },
        MemfdCreate { len: 0, seed: 0 },
        pre(0, 0, 1),
        pre(0, 1, 1), // EEXIST: token in use
        pre(1, 0, 2), // EBUSY: preserved in the other session
        pre(1, 1, 2),
        write(0, 9000, 1), // EPERM: preserved, cannot grow
        write(0, 10, 2),
        Seek { memfd: 0, pos: 123 },
        get(0, 1),            // EINVAL: outgoing
        Finish(Aim::Pool(0)), // EINVAL: outgoing
        GetName(1),
        CloseMemfd(0),    // the session keeps the file
        CloseSession(1),  // unpreserves the empty memfd
        write(0, 100, 3), // which can grow again
        Kexec { reopen: true },
        RetrieveSession(Aim::Pool(2)), // ENOENT
        RetrieveSession(Aim::Pool(0)),
        RetrieveSession(Aim::Pool(0)), // EINVAL: already retrieved
        get(0, 1),
        get(0, 1),        // the same file again
        get(0, 0),        // ENOENT
        pre(0, 0, 3),     // EINVAL: incoming
        CreateSession(0), // an outgoing session may share an incoming one's name
        Finish(Aim::Pool(0)),
        get(0, 1),    // ENOENT: finished
        pre(1, 1, 3), // the retrieved file, now that its session finished
        pre(1, 0, 2), // EBUSY: the same file through its other fd
        CloseSession(0),
        RetrieveSession(Aim::Pool(0)), // ENOENT: closed
        CloseDev,
        Kexec { reopen: false },
        RetrieveSession(Aim::Pool(0)), // no device: skipped
        OpenDev,
        RetrieveSession(Aim::Pool(0)),
        get(0, 3),
        CreateSession(1),
        MemfdCreate { len: 4097, seed: 9 },
        pre(1, 1, 0),
        Kexec { reopen: false },
        Kexec { reopen: true },
        RetrieveSession(Aim::Pool(1)), // ENOENT: never deserialized, dropped
        RetrieveSession(Aim::Pool(0)), // ENOENT: never retrieved, dropped
    ];
    run(&ops).unwrap();
}

/// Upstream `luo_retrieve_file` enters a retrieved file in `luo_preserved_files` and
/// `luo_file_finish` takes it out: until its incoming session finishes, the file is still in a
/// session, and PRESERVE_FD of it into an outgoing session is EBUSY ("a file is in at most one
/// session").
#[test]
fn retrieved_file_is_busy_until_its_session_finishes() {
    use Op::*;
    let ops = vec![
        CreateSession(0),
        MemfdCreate { len: 10, seed: 1 },
        pre(0, 0, 1),
        Kexec { reopen: true },
        RetrieveSession(Aim::Pool(0)),
        get(0, 1),
        CreateSession(1),
        pre(1, 0, 1), // EBUSY: still in incoming session "alpha"
        Finish(Aim::Pool(0)),
        pre(1, 0, 1), // now it can be preserved
    ];
    run(&ops).unwrap();
}
