//! Clocks shared by the layers.

/// CLOCK_MONOTONIC in nanoseconds. It survives the kexec (the host image stays one process),
/// so timestamps taken by one image compare with those of the next.
pub fn monotonic_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}
