//! `handover run`'s init program: start the user's program as a process of this host image,
//! serve its calls on host objects, and update the host when it exits with status 0 (or when
//! any process calls `reboot(LINUX_REBOOT_CMD_KEXEC)`), up to `kexecs` times.
//!
//! Its arguments come as `--init-arg`s, kept on the command line across kexecs:
//! `argv=WORD` (repeated, in order), `then=COMMAND` (whitespace-separated words, run instead of
//! `argv` after an update) and `kexecs=N`.

use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};

use rustix::event::{poll, PollFd, PollFlags};
use serde_json::json;

use crate::abi::boundary::{decode, DecodeError, Op, Reply};
use crate::host::Host;
use crate::init::InitOutcome;
use crate::kexec::KexecRequest;
use crate::uapi::Errno;

use super::conn::{Conn, Expect, Recv};
use super::dispatch::{serve, Answer, Effect};
use super::{cgroup, spawn};

/// How long the serve loop waits, spinning, for a process's next request (ns).
const SPIN_NS: u64 = 50_000;

/// Its name (`--init run`).
pub const NAME: &str = "run";

/// Its line in `--init list`.
pub const ABOUT: &str = "run a Linux program as a process of the host (argv=WORD..., then=COMMAND, kexecs=N); `handover run` sets it up";

/// What `--init-arg`s say.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RunArgs {
    /// The program and its arguments.
    pub argv: Vec<String>,
    /// The program for the images after an update, if not `argv`.
    pub then: Option<Vec<String>>,
    /// Updates to perform when the program exits with status 0.
    pub kexecs: u32,
    /// The programs' cgroups, found by the previous image (saves looking for the cgroup
    /// hierarchy again in the blackout); checked before use.
    pub cgroup: Option<std::path::PathBuf>,
}

impl RunArgs {
    /// Parse the init program's arguments.
    pub fn parse(args: &[String]) -> Result<RunArgs, String> {
        let mut r = RunArgs::default();
        for a in args {
            match a.split_once('=') {
                Some(("argv", v)) => r.argv.push(v.to_string()),
                Some(("then", v)) => {
                    let words: Vec<String> = v.split_whitespace().map(str::to_string).collect();
                    if words.is_empty() {
                        return Err("then= names no program".into());
                    }
                    r.then = Some(words);
                }
                Some(("cgroup", v)) => r.cgroup = Some(v.into()),
                Some(("kexecs", v)) => {
                    r.kexecs = v
                        .parse()
                        .map_err(|_| format!("kexecs={v:?} is not a count"))?
                }
                _ => return Err(format!("run: unknown argument {a:?}")),
            }
        }
        if r.argv.is_empty() {
            return Err("run: no program (argv=...)".into());
        }
        Ok(r)
    }

    /// The command line, as `--init-arg`s.
    pub fn to_init_args(&self) -> Vec<String> {
        let mut v: Vec<String> = self.argv.iter().map(|a| format!("argv={a}")).collect();
        if let Some(t) = &self.then {
            v.push(format!("then={}", t.join(" ")));
        }
        v.push(format!("kexecs={}", self.kexecs));
        if let Some(c) = &self.cgroup {
            v.push(format!("cgroup={}", c.display()));
        }
        v
    }
}

/// The program: see the module documentation. The host goes into a mutex for the time the
/// programs run: the guest fault service (guest_memfd holes touched by a program's guest)
/// locks it between requests.
pub fn run_owned(host: Host) -> (Host, InitOutcome) {
    let host = Arc::new(Mutex::new(host));
    if let Err(e) = Host::start_fault_service(&host) {
        tracing::warn!("run: no guest fault service: {e}");
    }
    let outcome = run(&host);
    match Arc::try_unwrap(host) {
        Ok(m) => (m.into_inner().unwrap_or_else(|e| e.into_inner()), outcome),
        Err(_) => {
            // Something still holds the host (it cannot: the fault service keeps a weak
            // reference): end here with the outcome rather than lose it.
            tracing::error!("run: the host is still shared at the end");
            let code = match outcome {
                InitOutcome::Halt(c) => c,
                InitOutcome::Kexec => 1,
            };
            std::process::exit(code)
        }
    }
}

fn lock(host: &Mutex<Host>) -> std::sync::MutexGuard<'_, Host> {
    host.lock().unwrap_or_else(|e| e.into_inner())
}

fn run(shared: &Mutex<Host>) -> InitOutcome {
    let run_ns = crate::time::monotonic_ns();
    let mut guard = lock(shared);
    let host: &mut Host = &mut guard;
    let args = match RunArgs::parse(&host.params().init_args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("handover run: {e}");
            return InitOutcome::Halt(2);
        }
    };
    // The previous image's objects go, and so does every process of the previous image:
    // stopped at the update, they end in this image, as at a kexec. Nothing waits for them:
    // their teardown (the previous VMs with it) took 5 ms here, inside the programs'
    // blackout. In a cgroup they stay frozen until the new program has had time to start
    // (`OLD_IMAGE_GRACE_NS`), and so does the previous image's reaper with the old VMs; found
    // in /proc they are killed now, before anything new runs.
    let image = host.info().kexec_count;
    let groups = args
        .cgroup
        .as_deref()
        .and_then(cgroup::Groups::reopen)
        .or_else(cgroup::Groups::open);
    match &groups {
        Some(g) => g.start_image(image),
        None => {
            host.release_previous_image(false);
            spawn::kill_stopped();
        }
    }
    let argv = match (&args.then, host.info().kexec_count) {
        (Some(t), n) if n > 0 => t.clone(),
        _ => args.argv.clone(),
    };
    if let Err(e) = spawn::check_program(&argv[0]) {
        eprintln!("handover run: {e}");
        return InitOutcome::Halt(126);
    }
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let mut s = match Server::start(host, &argv, groups, image) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("handover run: cannot start {}: {e}", argv[0]);
            return InitOutcome::Halt(127);
        }
    };
    // CLOCK_MONOTONIC ns of each step since the update began (it runs on across the kexec),
    // for a breakdown of the programs' blackout.
    let (p, i) = (host.params(), host.info());
    let times = json!({
        "kexec_start": p.kexec_start_ns,
        "exec": p.exec_ns,
        "boot_start": i.boot_start_ns,
        "boot_us": i.boot_us,
        "run": run_ns,
        "spawned": crate::time::monotonic_ns(),
    });
    host.report(
        "run-start",
        json!({ "argv": argv, "kexecs": args.kexecs, "pid": s.main_pid, "times_ns": times }),
    );
    drop(guard);
    loop {
        let code = s.serve_until_event(shared);
        let mut guard = lock(shared);
        let host: &mut Host = &mut guard;
        match code {
            Event::MainExited(status) => {
                host.report("run-exit", json!({ "status": status }));
                if status == 0 && host.info().kexec_count < args.kexecs {
                    let e = s.update(host);
                    eprintln!("handover run: the live update failed: {e}");
                    return s.halt(host, 1);
                }
                return s.halt(host, status);
            }
            Event::Reboot(conn) => {
                // Returns only if the update failed. As upstream, reboot() then returns the
                // error and user space carries on.
                let e = s.update(host);
                tracing::warn!("run: live update refused: {e}");
                let r = Reply {
                    ret: -(e.errno() as i64),
                    b: [0; 3],
                };
                if let Some(c) = s.conns.iter().find(|c| c.pid == conn) {
                    c.send(&r, &[], None);
                }
            }
        }
    }
}

/// What serving one message came to.
enum Served {
    /// A request was served (or refused).
    Done,
    /// Nothing to read.
    Empty,
    /// The socket is closed.
    Closed,
    /// `reboot(KEXEC)` from this host pid: the update is to start (its reply is owed).
    Reboot(crate::uapi::Pid),
}

enum Event {
    MainExited(i32),
    /// `reboot(KEXEC)` from the process with this host pid (its reply is still owed).
    Reboot(crate::uapi::Pid),
}

struct Server {
    conns: Vec<Conn>,
    /// The kickers of the programs' vCPU threads, by vCPU file.
    kickers:
        std::collections::HashMap<crate::fs::FileId, std::sync::Arc<crate::kvm::vcpu::VcpuKicker>>,
    buf: Vec<u8>,
    main_pid: i32,
    main_status: Option<i32>,
    /// The programs' cgroups, where there are (else processes are found in `/proc`).
    groups: Option<cgroup::Groups>,
    /// This image's number (the host's kexec count): which cgroup slot is its.
    image: u32,
    /// When the previous image's processes, frozen in their cgroup, are to be killed
    /// (CLOCK_MONOTONIC ns); `None` once done (or without cgroups: killed at the start).
    end_previous_at: Option<u64>,
}

/// How long the previous image's frozen processes are left alone after the program started.
const OLD_IMAGE_GRACE_NS: u64 = 200_000_000;

impl Server {
    fn start(
        host: &mut Host,
        argv: &[String],
        groups: Option<cgroup::Groups>,
        image: u32,
    ) -> std::io::Result<Server> {
        let preload = spawn::write_preload()?;
        let (mine, theirs) = spawn::process_socket()?;
        // SO_PASSCRED before the program can send anything: a message sent earlier would
        // carry no credentials.
        let pid = host.spawn();
        let mut conn = Conn::new(mine, pid, Expect::Pid(0))?;
        let slot = groups.as_ref().map(|g| g.slot(image));
        let main_pid = match spawn::spawn(argv, &preload, &theirs, slot.as_deref()) {
            Ok(c) => c,
            Err(e) => {
                host.exit(pid);
                return Err(e);
            }
        };
        drop(theirs);
        conn.expect = Expect::Pid(main_pid);
        Ok(Server {
            conns: vec![conn],
            kickers: Default::default(),
            buf: Vec::new(),
            main_pid,
            main_status: None,
            end_previous_at: groups
                .as_ref()
                .filter(|_| image > 0)
                .map(|_| crate::time::monotonic_ns() + OLD_IMAGE_GRACE_NS),
            groups,
            image,
        })
    }

    fn serve_until_event(&mut self, host: &Mutex<Host>) -> Event {
        loop {
            if let Some(st) = self.main_status {
                return Event::MainExited(st);
            }
            if self
                .end_previous_at
                .is_some_and(|t| crate::time::monotonic_ns() >= t)
            {
                self.end_previous(&mut lock(host));
            }
            let revents = self.poll(50_000_000);
            let hup = PollFlags::HUP | PollFlags::ERR | PollFlags::NVAL;
            // Processes that are gone first: a request of another process may depend on
            // their end (a parent waits for its child, then reuses what the child held).
            if revents.iter().any(|r| r.intersects(hup)) {
                let gone: Vec<usize> = (0..revents.len())
                    .filter(|&i| revents[i].intersects(hup))
                    .collect();
                let mut reboot = None;
                for &i in &gone {
                    while let Some(r) = self.serve_one(host, i) {
                        match r {
                            Served::Reboot(p) => reboot = Some(p),
                            Served::Closed | Served::Empty => break,
                            Served::Done => {}
                        }
                    }
                }
                let pids: Vec<_> = gone.iter().map(|&i| self.conns[i].pid).collect();
                self.close(host, &pids);
                if let Some(p) = reboot {
                    return Event::Reboot(p);
                }
                continue;
            }
            let mut closed = Vec::new();
            // Set when another process ended while one was served: its end goes first.
            let mut ended = false;
            for i in 0..self.conns.len() {
                if ended {
                    break;
                }
                if revents.get(i).is_none_or(|r| r.is_empty()) {
                    continue;
                }
                // After a request, the same process often sends the next one at once: wait
                // for it a little (spinning) rather than sleeping in poll, which would cost a
                // wakeup on each side.
                let mut spin_until = crate::time::monotonic_ns() + SPIN_NS;
                loop {
                    match self.serve_one(host, i) {
                        Some(Served::Done) => {
                            spin_until = crate::time::monotonic_ns() + SPIN_NS;
                        }
                        Some(Served::Empty) if crate::time::monotonic_ns() < spin_until => {
                            // Let the program run if it shares this CPU.
                            std::thread::yield_now();
                        }
                        Some(Served::Reboot(p)) => {
                            self.close(host, &closed);
                            return Event::Reboot(p);
                        }
                        Some(Served::Closed) => {
                            closed.push(self.conns[i].pid);
                            break;
                        }
                        Some(Served::Empty) | None => break,
                    }
                    // Another process ended meanwhile: serve its end before this process's
                    // next request, which may depend on it (a parent that waited for its
                    // child reuses what the child held), and before any other process's.
                    if self.conns.len() > 1 && self.poll(0).iter().any(|r| r.intersects(hup)) {
                        ended = true;
                        break;
                    }
                }
            }
            self.close(host, &closed);
        }
    }

    /// Poll every socket (`timeout_ns` 0: just look); the events per connection.
    fn poll(&self, timeout_ns: i64) -> Vec<PollFlags> {
        let mut fds: Vec<PollFd<'_>> = self
            .conns
            .iter()
            .map(|c| PollFd::from_borrowed_fd(c.fd(), PollFlags::IN))
            .collect();
        let timeout = rustix::time::Timespec {
            tv_sec: 0,
            tv_nsec: timeout_ns,
        };
        let _ = poll(&mut fds, Some(&timeout));
        fds.iter().map(|f| f.revents()).collect()
    }

    /// Receive and serve one message on connection `i`.
    fn serve_one(&mut self, host: &Mutex<Host>, i: usize) -> Option<Served> {
        let mut buf = std::mem::take(&mut self.buf);
        let r = match self.conns.get(i)?.recv(&mut buf) {
            Recv::Empty => Served::Empty,
            Recv::Closed => Served::Closed,
            Recv::Truncated(who) => {
                if self.bound_to(i, who) {
                    self.conns[i].send(&Answer::err(Errno::EINVAL).reply, &[], None);
                }
                Served::Done
            }
            Recv::Msg(n, who) => match self.handle(&mut lock(host), i, &buf[..n], who) {
                Some(p) => Served::Reboot(p),
                None => Served::Done,
            },
        };
        self.buf = buf;
        Some(r)
    }

    /// The processes `pids` are gone (the last holder of each socket closed it): their fds
    /// close and their mappings go, with the LUO consequences; exited children are reaped.
    fn close(&mut self, host: &Mutex<Host>, pids: &[crate::uapi::Pid]) {
        if !pids.is_empty() {
            let mut h = lock(host);
            for &pid in pids {
                h.exit(pid);
            }
        }
        self.conns.retain(|c| !pids.contains(&c.pid));
        for (pid, st) in spawn::reap_children() {
            if pid == self.main_pid {
                self.main_status = Some(exit_code(st));
            }
        }
    }

    fn bound_to(&self, i: usize, who: Option<i32>) -> bool {
        who.is_some() && self.conns[i].real == who
    }

    /// Serve one message on connection `i`; returns the host pid of a process that asked for
    /// the update.
    fn handle(
        &mut self,
        host: &mut Host,
        i: usize,
        m: &[u8],
        who: Option<i32>,
    ) -> Option<crate::uapi::Pid> {
        let Some(who) = who else {
            self.conns[i].send(&Answer::err(Errno::EPERM).reply, &[], None);
            return None;
        };
        let d = match decode(m) {
            Ok(d) => d,
            Err(e) => {
                if self.conns[i].real == Some(who) {
                    let errno = match e {
                        DecodeError::UnknownOp(_) => Errno::ENOSYS,
                        _ => Errno::EINVAL,
                    };
                    self.conns[i].send(&Answer::err(errno).reply, &[], None);
                }
                return None;
            }
        };
        let c = &mut self.conns[i];
        match c.real {
            Some(r) if r == who => {}
            Some(_) => {
                // Not the process this socket belongs to (one that inherited it without the
                // boundary's fork): refused.
                c.send(&Answer::err(Errno::EPERM).reply, &[], None);
                return None;
            }
            None => {
                let ok = d.op == Op::Hello
                    && match c.expect {
                        Expect::Pid(p) => p == who,
                        Expect::ChildOf(pp) => spawn::parent_of(who) == Some(pp),
                    };
                if !ok {
                    c.send(&Answer::err(Errno::EPERM).reply, &[], None);
                    return None;
                }
                c.real = Some(who);
            }
        }
        let pid = c.pid;
        let a = serve(host, pid, &d);
        match a.effect {
            Effect::None => self.conns[i].send(&a.reply, &a.payload, None),
            Effect::PassRam => self.conns[i].send(&a.reply, &a.payload, Some(host.mm().ram.fd())),
            Effect::Fork(child) => match spawn::process_socket().and_then(|(mine, theirs)| {
                Ok((Conn::new(mine, child, Expect::ChildOf(who))?, theirs))
            }) {
                Ok((conn, theirs)) => {
                    self.conns[i].send(&a.reply, &a.payload, Some(theirs.as_fd()));
                    self.conns.push(conn);
                }
                Err(e) => {
                    tracing::warn!("run: no socket for a forked process: {e}");
                    host.exit(child);
                    let r = Answer::err(Errno::ENOMEM);
                    self.conns[i].send(&r.reply, &[], None);
                }
            },
            Effect::ForkAbort(child) => {
                if let Some(j) = self.conns.iter().position(|c| {
                    c.pid == child && c.real.is_none() && c.expect == Expect::ChildOf(who)
                }) {
                    host.exit(child);
                    self.conns.remove(j);
                }
                // The sender, wherever the removal moved it.
                if let Some(c) = self.conns.iter().find(|c| c.pid == pid) {
                    c.send(&a.reply, &[], None);
                }
            }
            Effect::Kexec => return Some(pid),
            Effect::Kick(f) => {
                if let Some(k) = self.kickers.get(&f) {
                    if let Err(e) = k.kick() {
                        tracing::warn!("run: cannot kick a vCPU: {e}");
                    }
                }
                self.conns[i].send(&a.reply, &a.payload, None);
            }
            Effect::Vcpu(f) => self.start_vcpu(host, i, f, who, a),
        }
        None
    }

    /// The program's call created vCPU file `f`: its thread and socket, then the reply with
    /// the real vCPU fd and the program's end of that socket. Without them the call fails
    /// (ENOMEM) and the vCPU file is closed again.
    fn start_vcpu(
        &mut self,
        host: &mut Host,
        i: usize,
        f: crate::fs::FileId,
        who: i32,
        mut a: Answer,
    ) {
        let vcpu = match host.files().kind(f) {
            Some(crate::host::files::FileKind::Vcpu(v)) => match v.handle() {
                Ok(h) => h,
                Err(_) => return self.conns[i].send(&a.reply, &a.payload, None),
            },
            _ => return self.conns[i].send(&a.reply, &a.payload, None),
        };
        let kicker = std::sync::Arc::new(crate::kvm::vcpu::VcpuKicker::new());
        let vm = match host.files().kind(f) {
            Some(crate::host::files::FileKind::Vcpu(v)) => v.vm,
            _ => f,
        };
        let faults = host.fault_shared().map(|s| (s, vm));
        let started = spawn::process_socket().and_then(|(mine, theirs)| {
            super::vcpu::spawn(vcpu.clone(), mine, who, kicker.clone(), faults).map(|()| theirs)
        });
        match started {
            Ok(theirs) => {
                self.kickers.insert(f, kicker);
                a.reply.b[2] = 1;
                let v = vcpu.lock().unwrap_or_else(|e| e.into_inner());
                // SAFETY: the vCPU fd stays open while the guard is held (the VcpuFd owns it).
                let real = unsafe {
                    std::os::fd::BorrowedFd::borrow_raw(std::os::fd::AsRawFd::as_raw_fd(&*v))
                };
                self.conns[i].send_fds(&a.reply, &a.payload, &[real, theirs.as_fd()]);
            }
            Err(e) => {
                tracing::warn!("run: cannot start a vCPU thread: {e}");
                let fd = a.reply.b[0] as i32;
                let _ = host.close(self.conns[i].pid, fd);
                self.conns[i].send(&Answer::err(Errno::ENOMEM).reply, &[], None);
            }
        }
    }

    /// Kill the previous image's processes and its reaper if that is still to be done.
    fn end_previous(&mut self, host: &mut Host) {
        if self.end_previous_at.take().is_some() {
            if let Some(g) = &self.groups {
                g.end_previous(self.image);
            }
            host.release_previous_image(false);
        }
    }

    /// Stop every user process, then kexec. Returns only if the update failed; the processes
    /// run again then.
    fn update(&mut self, host: &mut Host) -> crate::kexec::reboot::KexecError {
        let asked = crate::time::monotonic_ns();
        self.end_previous(host);
        let frozen = self
            .groups
            .as_ref()
            .is_some_and(|g| g.freeze(self.image, std::time::Duration::from_secs(2)));
        if !frozen {
            spawn::stop_all();
        }
        // vCPUs the programs left running stop too (KVM_RUN returns EINTR to nobody).
        for k in self.kickers.values() {
            let _ = k.kick();
        }
        let times = json!({ "asked": asked, "stopped": crate::time::monotonic_ns() });
        // The next image finds the cgroups through its arguments.
        if let Some(g) = &self.groups {
            let root = format!("cgroup={}", g.root().display());
            let a = &mut host.params_mut().init_args;
            a.retain(|x| !x.starts_with("cgroup="));
            a.push(root);
        }
        host.report(
            "run-kexec",
            json!({ "processes": self.conns.len(), "times_ns": times }),
        );
        let Err(e) = host.kexec(KexecRequest::default());
        match &self.groups {
            Some(g) if frozen => g.thaw(self.image),
            _ => spawn::cont_all(),
        }
        e
    }

    /// End every process, release what they held, report, halt with `code`.
    fn halt(&mut self, host: &mut Host, code: i32) -> InitOutcome {
        self.end_previous(host);
        spawn::kill_all();
        if let Some(g) = self.groups.take() {
            g.remove();
        }
        for c in std::mem::take(&mut self.conns) {
            host.exit(c.pid);
        }
        host.report(
            "run-halt",
            json!({
                "code": code,
                "open_files": host.files().len(),
                "outgoing_sessions": host.luo().outgoing.len(),
                "status": host.status(),
            }),
        );
        InitOutcome::Halt(code)
    }
}

/// A wait status as a shell reports it: the exit code, or 128 + the signal.
fn exit_code(st: i32) -> i32 {
    if libc::WIFEXITED(st) {
        libc::WEXITSTATUS(st)
    } else if libc::WIFSIGNALED(st) {
        128 + libc::WTERMSIG(st)
    } else {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_round_trip() {
        let a = RunArgs {
            argv: vec!["prog".into(), "a=b".into(), "".into()],
            then: Some(vec!["other".into(), "-x".into()]),
            kexecs: 2,
            cgroup: Some("/sys/fs/cgroup/handover-1".into()),
        };
        assert_eq!(RunArgs::parse(&a.to_init_args()).unwrap(), a);
        assert!(RunArgs::parse(&["kexecs=1".into()]).is_err());
        assert!(RunArgs::parse(&["argv=x".into(), "bogus".into()]).is_err());
    }
}
