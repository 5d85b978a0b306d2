//! Starting programs as host processes: the preload library written out, the refusal of
//! programs it cannot enter (static binaries), the socket each process gets, and the end of
//! every user process at an update.

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use rustix::net::{socketpair, AddressFamily, SocketFlags, SocketType};

/// The preload library, built from `preload/handover_preload.c` by `build.rs`.
pub const PRELOAD: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/libhandover_preload.so"));

/// Write the preload library to the temporary directory (once per content: the name carries a
/// hash, and it is written under a temporary name then renamed, so concurrent runs agree).
pub fn write_preload() -> std::io::Result<PathBuf> {
    let dir = std::env::temp_dir();
    let path = dir.join(format!(
        "handover-preload-{:08x}-{}.so",
        crc32fast::hash(PRELOAD),
        PRELOAD.len()
    ));
    if std::fs::read(&path).is_ok_and(|b| b == PRELOAD) {
        return Ok(path);
    }
    let tmp = dir.join(format!("handover-preload-{}.tmp", std::process::id()));
    std::fs::write(&tmp, PRELOAD)?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// `PROGRAM` as `execvp` would find it.
pub fn resolve(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        return Some(PathBuf::from(program));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// Refuse what the preload library cannot enter: a statically linked ELF binary (no
/// `PT_INTERP`: there is no dynamic loader to honour `LD_PRELOAD`), directly or as a script's
/// interpreter. Anything else (a missing file, a non-ELF) is left for `execve` to judge.
pub fn check_program(program: &str) -> Result<(), String> {
    let Some(path) = resolve(program) else {
        return Ok(());
    };
    check_path(&path, 0)
}

fn check_path(path: &Path, depth: u32) -> Result<(), String> {
    let mut head = Vec::with_capacity(4096);
    let Ok(f) = std::fs::File::open(path) else {
        return Ok(());
    };
    if f.take(256 << 10).read_to_end(&mut head).is_err() {
        return Ok(());
    }
    if let Some(rest) = head.strip_prefix(b"#!") {
        let line = rest.split(|&b| b == b'\n').next().unwrap_or_default();
        let line = String::from_utf8_lossy(line);
        let interp = line.split_whitespace().next().unwrap_or_default();
        return if interp.is_empty() || depth > 4 {
            Ok(())
        } else {
            check_path(Path::new(interp), depth + 1)
        };
    }
    match elf_has_interp(&head) {
        Some(false) => Err(format!(
            "{} is statically linked: it has no dynamic loader (no PT_INTERP), so the preload \
             library that connects a program to the host image cannot be loaded into it; \
             build it dynamically linked",
            path.display()
        )),
        _ => Ok(()),
    }
}

/// For a 64-bit little-endian ELF whose program headers lie in `head`: whether it has a
/// `PT_INTERP`. `None` if `head` is not such an ELF.
pub fn elf_has_interp(head: &[u8]) -> Option<bool> {
    if head.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let at = |o: usize, n: usize| head.get(o..o.checked_add(n)?);
    let u16_at = |o: usize| Some(u16::from_le_bytes(at(o, 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(at(o, 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(at(o, 8)?.try_into().ok()?));
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    if phentsize < 4 {
        return None;
    }
    for i in 0..phnum {
        let o = phoff.checked_add(i.checked_mul(phentsize)?)?;
        if u32_at(o)? == 3 {
            return Some(true);
        }
    }
    Some(false)
}

/// A socketpair for one process: `(host end, program end)`, both close-on-exec (the program's
/// end is made inheritable only in the child that gets it).
pub fn process_socket() -> std::io::Result<(OwnedFd, OwnedFd)> {
    Ok(socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

/// Start `argv` with the preload library and its end of the socket (`HANDOVER_SOCK`); its
/// pid. With `cgroup` (a cgroup directory), the child is created in that cgroup by `clone3`
/// (`CLONE_INTO_CGROUP`), so that nothing it runs is outside; moving it there after the fork
/// would cost a migration (15 ms here, inside the blackout).
pub fn spawn(
    argv: &[String],
    preload: &Path,
    sock: &OwnedFd,
    cgroup: Option<&Path>,
) -> std::io::Result<i32> {
    let (prog, args) = argv
        .split_first()
        .ok_or_else(|| std::io::Error::other("no program to run"))?;
    let mut preloads = preload.display().to_string();
    if let Some(old) = std::env::var_os("LD_PRELOAD") {
        preloads = format!("{preloads}:{}", old.to_string_lossy());
    }
    // The program's end goes high (below the usual 1024 soft limit), out of the way of the
    // fd numbers the program uses; it is the one fd the program inherits from the host.
    let raw = sock.as_raw_fd();
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(1024)
        .min(1024);
    let target = i32::try_from(limit).unwrap_or(1024).max(64) - 1;
    if let Some(dir) = cgroup {
        let path = resolve(prog).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, format!("{prog}: not found"))
        })?;
        let mut env: Vec<(std::ffi::OsString, std::ffi::OsString)> = std::env::vars_os()
            .filter(|(k, _)| k != "LD_PRELOAD" && k != "HANDOVER_SOCK" && k != "HANDOVER_PID")
            .collect();
        env.push(("LD_PRELOAD".into(), preloads.into()));
        env.push(("HANDOVER_SOCK".into(), target.to_string().into()));
        return super::clone_exec::spawn_in_cgroup(&path, argv, &env, (raw, target), dir);
    }
    let mut cmd = Command::new(prog);
    cmd.args(args)
        .env("LD_PRELOAD", preloads)
        .env("HANDOVER_SOCK", target.to_string())
        .env_remove("HANDOVER_PID");
    // SAFETY: between fork and exec only dup2 or fcntl, which are async-signal-safe, runs.
    unsafe {
        cmd.pre_exec(move || {
            let r = if raw == target {
                libc::fcntl(raw, libc::F_SETFD, 0)
            } else {
                libc::dup2(raw, target)
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // The child is reaped by `reap_children`, by pid, not through `Child`.
    cmd.spawn().map(|c| c.id() as i32)
}

/// The parent pid of `pid`, from `/proc/PID/stat`.
pub fn parent_of(pid: i32) -> Option<i32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain anything; fields follow the last ')'.
    let rest = &s[s.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// A task's state letter from its `stat` file in `/proc` (`R`, `S`, `T`, `Z`, …).
fn state_of(stat: &Path) -> Option<char> {
    let s = std::fs::read_to_string(stat).ok()?;
    s[s.rfind(')')? + 1..]
        .split_whitespace()
        .next()?
        .chars()
        .next()
}

/// Every descendant of this process, from `/proc`. With this process a child subreaper,
/// orphans of the programs come back to it and stay descendants.
pub fn descendants() -> Vec<i32> {
    let me = std::process::id() as i32;
    let mut children = std::collections::HashMap::<i32, Vec<i32>>::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if let Some(pp) = parent_of(pid) {
                children.entry(pp).or_default().push(pid);
            }
        }
    }
    let mut out = Vec::new();
    let mut todo = vec![me];
    while let Some(p) = todo.pop() {
        for &c in children.get(&p).map(Vec::as_slice).unwrap_or_default() {
            out.push(c);
            todo.push(c);
        }
    }
    out
}

fn signal_all(pids: &[i32], sig: i32) {
    for &p in pids {
        // SAFETY: kill has no memory effects. `p` was a descendant a moment ago; a pid of a
        // child cannot be reused before this process reaps it.
        unsafe { libc::kill(p, sig) };
    }
}

/// SIGKILL every descendant once, without waiting for them to go: for the previous image's
/// processes, stopped at the update (a stopped process forks nothing, and once killed runs no
/// more user code). Their teardown (and that of the VMs their vCPU mappings kept alive) goes on
/// beside the new image; they are reaped with the next children that end.
pub fn kill_stopped() {
    signal_all(&descendants(), libc::SIGKILL);
}

/// End every user process: SIGKILL to every descendant until none is left, reaping the
/// children. Nothing of theirs is released on the host here (the caller decides).
pub fn kill_all() {
    for _ in 0..2000 {
        let d = descendants();
        if d.is_empty() {
            return;
        }
        signal_all(&d, libc::SIGKILL);
        reap_children();
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    tracing::warn!("run: some user processes would not die");
}

/// Stop every user process (SIGSTOP) and wait until each is stopped or dead, so that none
/// touches host memory while the update freezes and serializes it. After 2 s, stragglers are
/// killed.
pub fn stop_all() {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    let mut pids = descendants();
    signal_all(&pids, libc::SIGSTOP);
    loop {
        let running: Vec<i32> = pids.iter().copied().filter(|&p| !stopped(p)).collect();
        if running.is_empty() {
            // A process forked before its parent stopped is not in the list yet: look again,
            // and stop the newcomers too.
            let new: Vec<i32> = descendants()
                .into_iter()
                .filter(|p| !pids.contains(p))
                .collect();
            if new.is_empty() {
                return;
            }
            signal_all(&new, libc::SIGSTOP);
            pids.extend(new);
            continue;
        }
        if std::time::Instant::now() > deadline {
            tracing::warn!("run: {running:?} would not stop; killed");
            signal_all(&running, libc::SIGKILL);
        }
        std::thread::sleep(std::time::Duration::from_micros(20));
    }
}

/// Whether every thread of `pid` is stopped (or it is dead or gone): a group stop ends one
/// thread at a time, and a thread still running could still write host memory.
fn stopped(pid: i32) -> bool {
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return true;
    };
    rd.flatten().all(|t| {
        matches!(
            state_of(&t.path().join("stat")),
            Some('T' | 't' | 'Z' | 'X') | None
        )
    })
}

/// Let the stopped processes run again (the update did not happen).
pub fn cont_all() {
    signal_all(&descendants(), libc::SIGCONT);
}

/// Reap every exited child; returns `(pid, wait status)` of each.
pub fn reap_children() -> Vec<(i32, i32)> {
    let mut out = Vec::new();
    loop {
        let mut st = 0;
        // SAFETY: waitpid writes `st`.
        let pid = unsafe { libc::waitpid(-1, &mut st, libc::WNOHANG) };
        if pid <= 0 {
            return out;
        }
        out.push((pid, st));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dynamically linked program has an interpreter: this test binary and the system's
    /// shell.
    #[test]
    fn elf_interp_is_found_in_a_dynamic_binary() {
        let sh = std::fs::read("/bin/sh").unwrap();
        assert_eq!(elf_has_interp(&sh), Some(true));
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert_eq!(elf_has_interp(&me), Some(true));
        assert_eq!(elf_has_interp(b"#!/bin/sh"), None);
        let mut bad = me[..64].to_vec();
        // Program headers past the end: not judged.
        bad[0x20..0x28].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(elf_has_interp(&bad), None);
    }
}
