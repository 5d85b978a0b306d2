//! The kexec path's claim on the CPU. A real kexec owns the machine from the freeze to the new
//! kernel's boot: nothing else runs. Our kexec is a process among others, and on a 2-CPU host
//! any other runnable task can delay it by a whole scheduler slice: traced with
//! `perf record -e sched:*`, the exec'ing thread, woken from `de_thread` onto a CPU busy with
//! an unrelated process, waited 4.2 ms there while the other CPU sat idle (one run in 15 of
//! `handover demo`; `exec_to_main` 4.8 ms instead of 0.7).
//!
//! So the thread that runs the kexec takes a real-time policy ([`boost`]) from the start of
//! the kexec and keeps it across the `execve` (a policy survives exec), and the new image
//! drops it ([`relax`]) once it has booted, before any program of its user space runs.
//! `SCHED_RESET_ON_FORK` makes every thread and child created meanwhile (the reaper, the new
//! image's service threads) an ordinary one. Without the privilege (`CAP_SYS_NICE`, or an
//! `RLIMIT_RTPRIO`) the kexec simply runs at its normal priority. `HANDOVER_NO_BOOST=1` turns
//! it off, to measure the difference.

/// The real-time priority of the kexec path: above every ordinary task, below the kernel's own
/// per-CPU threads (`migration/N` at 99).
const KEXEC_RT_PRIORITY: i32 = 10;

/// The boost of the calling thread: while it lives, the thread has `SCHED_FIFO`. Dropping it
/// (the kexec failed and the image carries on) gives the ordinary policy back; a successful
/// `execve` never drops it, and the next image relaxes instead.
pub(crate) struct Boost(());

impl Drop for Boost {
    fn drop(&mut self) {
        relax();
    }
}

/// Give the calling thread `SCHED_FIFO` at [`KEXEC_RT_PRIORITY`], reset on fork; `None` if
/// that is turned off or not allowed.
pub(crate) fn boost() -> Option<Boost> {
    if std::env::var_os("HANDOVER_NO_BOOST").is_some() {
        return None;
    }
    if set_policy(
        libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK,
        KEXEC_RT_PRIORITY,
    ) {
        return Some(Boost(()));
    }
    tracing::debug!(
        "kexec runs at normal priority: {}",
        std::io::Error::last_os_error()
    );
    None
}

/// Give the calling thread the ordinary policy back, if it had a real-time one (a no-op
/// otherwise, so an image calls it whether or not its predecessor boosted the kexec).
pub(crate) fn relax() {
    // SAFETY: sched_getscheduler only reads the calling thread's policy.
    let policy = unsafe { libc::sched_getscheduler(0) };
    if policy >= 0 && policy & !libc::SCHED_RESET_ON_FORK != libc::SCHED_OTHER {
        let _ = set_policy(libc::SCHED_OTHER, 0);
    }
}

fn set_policy(policy: i32, priority: i32) -> bool {
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param for the call.
    unsafe { libc::sched_setscheduler(0, policy, &param) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> i32 {
        // SAFETY: reads the calling thread's policy.
        unsafe { libc::sched_getscheduler(0) }
    }

    /// A boosted thread is SCHED_FIFO with reset-on-fork, a thread it spawns is ordinary, and
    /// relax gives the ordinary policy back. Where the process may not take a real-time policy,
    /// boost reports it and changes nothing.
    #[test]
    fn boost_then_relax() {
        std::thread::spawn(|| {
            let Some(b) = boost() else {
                assert_eq!(policy(), libc::SCHED_OTHER);
                eprintln!("SKIP boost_then_relax: no real-time policy allowed here");
                return;
            };
            assert_eq!(policy(), libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK);
            let child = std::thread::spawn(policy).join().unwrap();
            assert_eq!(
                child,
                libc::SCHED_OTHER,
                "threads created meanwhile are ordinary"
            );
            drop(b);
            assert_eq!(policy(), libc::SCHED_OTHER);
            let _b = boost().expect("allowed once, allowed again");
            relax();
            assert_eq!(policy(), libc::SCHED_OTHER, "what the next image does");
            relax();
            assert_eq!(policy(), libc::SCHED_OTHER);
        })
        .join()
        .unwrap();
    }
}
