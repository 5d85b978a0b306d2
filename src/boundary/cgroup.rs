//! The programs' processes as a cgroup (v2), so that an update stops them all with one write
//! (`cgroup.freeze`) and the next image ends them all with one more (`cgroup.kill`), whatever
//! they forked and however they detached. Finding them in `/proc` instead (`spawn::stop_all`,
//! the fallback where no writable cgroup v2 hierarchy exists) reads every process's `stat`:
//! about 1 ms a scan on the development machine, twice inside the blackout.
//!
//! The host makes `handover-PID/a` and `handover-PID/b` beside its own cgroup: image `n` puts
//! its programs in slot `n % 2`, so the previous image's processes are in the other slot, which
//! the new image kills (a little after its program started, so that their teardown does not
//! compete with it, and without waiting for them) and thaws for the image after it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The two slots under `handover-PID`.
pub struct Groups {
    root: PathBuf,
}

impl Groups {
    /// Make (or, after a kexec, find again: the pid is the same) the two slots; `None` where
    /// there is no cgroup v2 hierarchy with a freezer, or it is not writable.
    /// `HANDOVER_RUN_NO_CGROUP=1` forces the `/proc` fallback (for its tests).
    pub fn open() -> Option<Groups> {
        if std::env::var_os("HANDOVER_RUN_NO_CGROUP").is_some_and(|v| v == "1") {
            return None;
        }
        let mount = cgroup2_mount()?;
        let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let own = own.lines().find_map(|l| l.strip_prefix("0::"))?;
        let root = mount
            .join(own.trim_start_matches('/'))
            .join(format!("handover-{}", std::process::id()));
        // After a kexec they are there already (one stat instead of three mkdirs).
        let made = [root.join("a"), root.join("b")]
            .iter()
            .all(|d| d.join("cgroup.freeze").exists());
        for d in [root.clone(), root.join("a"), root.join("b")] {
            if made {
                break;
            }
            match std::fs::create_dir(&d) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    tracing::info!("run: no cgroup for the programs ({}: {e})", d.display());
                    let _ = std::fs::remove_dir(&d);
                    return None;
                }
            }
        }
        let g = Groups { root };
        if !g.slot(0).join("cgroup.freeze").exists() || !g.slot(0).join("cgroup.kill").exists() {
            g.remove();
            return None;
        }
        Some(g)
    }

    /// The cgroups a previous image of this host made, at `root`: only this process's own
    /// (`handover-PID`, with both slots), whatever the path says.
    pub fn reopen(root: &Path) -> Option<Groups> {
        let ours = format!("handover-{}", std::process::id());
        if root.file_name()? != ours.as_str() || !root.is_absolute() {
            return None;
        }
        let g = Groups {
            root: root.to_path_buf(),
        };
        [g.slot(0), g.slot(1)]
            .iter()
            .all(|s| s.join("cgroup.freeze").exists())
            .then_some(g)
    }

    /// Where the two slots are.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The cgroup directory of image `image`'s programs.
    pub fn slot(&self, image: u32) -> PathBuf {
        self.root.join(if image % 2 == 0 { "a" } else { "b" })
    }

    /// At the start of image `image`: make sure its slot is not frozen (it last held the
    /// processes of image `image - 2`, killed and thawed by image `image - 1`).
    pub fn start_image(&self, image: u32) {
        let _ = write(&self.slot(image).join("cgroup.freeze"), "0");
    }

    /// Kill what the previous image left in the other slot (frozen since the update) and thaw
    /// the slot for the next image. Waits for nothing.
    pub fn end_previous(&self, image: u32) {
        let old = self.slot(image + 1);
        if let Err(e) = kill_members(&old) {
            tracing::warn!("run: cannot kill the previous image's processes: {e}");
        }
        let _ = write(&old.join("cgroup.freeze"), "0");
    }

    /// Freeze image `image`'s processes and wait until every one is frozen; after `timeout`,
    /// kill them instead. False if the freezer could not be used at all.
    pub fn freeze(&self, image: u32, timeout: Duration) -> bool {
        let slot = self.slot(image);
        if write(&slot.join("cgroup.freeze"), "1").is_err() {
            return false;
        }
        let deadline = Instant::now() + timeout;
        loop {
            match std::fs::read_to_string(slot.join("cgroup.events")) {
                Ok(ev) if ev.lines().any(|l| l == "frozen 1") => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
            if Instant::now() > deadline {
                tracing::warn!("run: the programs would not freeze; killed");
                let _ = kill_members(&slot);
                return true;
            }
            std::thread::sleep(Duration::from_micros(20));
        }
    }

    /// Let image `image`'s processes run again (the update did not happen).
    pub fn thaw(&self, image: u32) {
        let _ = write(&self.slot(image).join("cgroup.freeze"), "0");
    }

    /// At the end: kill what is left in both slots, wait (up to 2 s) until they are empty, and
    /// remove the cgroups.
    pub fn remove(&self) {
        let deadline = Instant::now() + Duration::from_secs(2);
        for s in [self.slot(0), self.slot(1)] {
            let _ = write(&s.join("cgroup.kill"), "1");
            while std::fs::read_to_string(s.join("cgroup.events"))
                .is_ok_and(|ev| ev.lines().any(|l| l == "populated 1"))
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_micros(200));
            }
            let _ = std::fs::remove_dir(&s);
        }
        if let Err(e) = std::fs::remove_dir(&self.root) {
            tracing::warn!("run: cgroup {} left behind: {e}", self.root.display());
        }
    }
}

/// SIGKILL every process in the cgroup `dir` (listed in its `cgroup.procs`).
///
/// Not `cgroup.kill`: on the development machine's kernel (6.18), a child later created into a
/// cgroup that was once killed that way (`clone3` with `CLONE_INTO_CGROUP`) is killed at once,
/// as if the kill were still going on; the slots are used again after the next update.
fn kill_members(dir: &Path) -> std::io::Result<()> {
    for pid in std::fs::read_to_string(dir.join("cgroup.procs"))?.lines() {
        if let Ok(pid) = pid.trim().parse::<i32>() {
            // SAFETY: kill has no memory effects; the pid is a member of our own cgroup, a
            // process of ours that no one else reaps.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    Ok(())
}

fn write(path: &Path, what: &str) -> std::io::Result<()> {
    std::fs::write(path, what)
}

/// Where the cgroup v2 hierarchy is mounted (`/proc/self/mountinfo`: the mount point is the
/// fifth field, the file system type follows the ` - ` separator).
fn cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        Some(PathBuf::from(left.split_whitespace().nth(4)?))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reopen_takes_only_this_processes_own_cgroups() {
        // Another cgroup, a relative path, another pid: refused before anything is looked at,
        // so an argument can never make the host kill the members of someone else's cgroup.
        for p in [
            "/sys/fs/cgroup/system.slice",
            "handover-1",
            "/sys/fs/cgroup/handover-1",
        ] {
            assert!(Groups::reopen(Path::new(p)).is_none(), "{p}");
        }
        let ours = format!("/nonexistent/handover-{}", std::process::id());
        assert!(Groups::reopen(Path::new(&ours)).is_none(), "no slots there");
    }
}
