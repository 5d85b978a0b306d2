//! Clocks shared by the layers.

/// CLOCK_MONOTONIC in nanoseconds. It survives the kexec (the host image stays one process),
/// so timestamps taken by one image compare with those of the next.
pub fn monotonic_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// CPU time used so far by every thread of this process, in nanoseconds
/// (CLOCK_PROCESS_CPUTIME_ID).
pub fn process_cpu_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

static MAIN_NS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Record that `main` of this program image starts now (called first thing by the binary), so
/// a new host image can tell the exec itself (kernel, loader, runtime start) from its own
/// start-up work.
pub fn mark_main() {
    MAIN_NS.store(monotonic_ns(), std::sync::atomic::Ordering::Relaxed);
}

/// When `main` started ([`mark_main`]), if it was recorded.
pub fn main_ns() -> Option<u64> {
    match MAIN_NS.load(std::sync::atomic::Ordering::Relaxed) {
        0 => None,
        t => Some(t),
    }
}
