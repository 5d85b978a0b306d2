//! What the scenario reports, as JSON: the events of each stage and each outcome, with the
//! host-side phase timings of the blackout.

use serde::Serialize;
use serde_json::{json, Value};

use crate::kvm::RunExit;
use crate::uapi::Errno;
use crate::vmm::guest::{self, GuestReport};

use super::options::StageState;

/// Microseconds from `a` to `b` (CLOCK_MONOTONIC nanoseconds; 0 if `b` is earlier).
fn us(a: u64, b: u64) -> f64 {
    b.saturating_sub(a) as f64 / 1e3
}

/// The `rfc-stage1` event: the guest wrote its data and everything is preserved and saved.
pub(super) fn stage1(write_ms: f64, preserve_us: f64, folios: u64, ss: &StageState) -> Value {
    json!({ "write_ms": write_ms, "preserve_us": preserve_us, "preserved_folios": folios, "state": ss })
}

/// The update did not happen (`err`: what failed and its errno): how the guest carried on.
pub(super) fn aborted(
    err: &(String, i32),
    exit: &RunExit,
    rep: &GuestReport,
    write_ms: f64,
    data: u64,
    status_after: &impl Serialize,
) -> Value {
    json!({
            "update_aborted": err.0, "errno": err.1, "kexec_refused": err.0, "resumed": format!("{exit:?}"),
            "guest_status": guest::status_name(rep.status), "write_ms": write_ms,
            "verified_bytes": if rep.status == guest::STATUS_VERIFY_OK { data } else { 0 },
            "status_after": status_after,
    })
}

/// `finish-early`: the host verified `data` bytes of the guest_memfd itself (`bad`: the first
/// offset that did not match); `vm_after`: how retrieving the VM after FINISH failed.
pub(super) fn finish_early(vm_after: Option<Errno>, data: u64, bad: Option<u64>) -> Value {
    json!({
        "finish_early": true,
        "vm_after_finish": format!("{:?}", vm_after),
        "host_verified_bytes": if bad.is_none() { data } else { 0 },
        "first_bad": bad,
    })
}

/// Stage 2's view of the update in time (CLOCK_MONOTONIC ns unless named otherwise).
pub(super) struct Stage2Times {
    /// The previous image started the kexec (freeze, finalize) ...
    pub(super) kexec_start: u64,
    /// ... and called `execve`.
    pub(super) exec: u64,
    /// This image's `main` started (`time::mark_main`), if recorded.
    pub(super) main: Option<u64>,
    /// This image started to boot, and took this long (µs).
    pub(super) boot_start: u64,
    pub(super) boot_us: u64,
    /// Stage 2 started, had retrieved everything, had bound the memslots, resumed the guest,
    /// and saw it finish.
    pub(super) stage2: u64,
    pub(super) retrieved: u64,
    pub(super) bound: u64,
    pub(super) resume: u64,
    pub(super) done: u64,
}

/// What stage 2 found, for the `rfc-stage2` event.
pub(super) struct Stage2Report<'a> {
    /// The guest verified its data and stopped.
    pub(super) ok: bool,
    pub(super) guest: &'a GuestReport,
    /// What stage 1 handed over (its options and its own timings).
    pub(super) state: &'a StageState,
    pub(super) handover_bytes: u64,
    pub(super) vm_name: String,
    /// Memslots of the guest_memfd, those bound by the end, and how long the background
    /// binding took (µs), if there was one.
    pub(super) chunks: usize,
    pub(super) bound_at_end: usize,
    pub(super) background_bind_us: Option<u64>,
    /// The guest's read pass over all of its data right after the resume (from its last clock
    /// read to its final status), µs: the brownout, beside `touch_before_us` of stage 1.
    pub(super) touch_after_us: f64,
    pub(super) times: Stage2Times,
}

impl Stage2Report<'_> {
    /// The event's JSON, with each phase of the blackout in µs.
    pub(super) fn to_json(&self) -> Value {
        let (ss, o, t, rep) = (self.state, &self.state.opts, &self.times, self.guest);
        json!({
            "ok": self.ok,
            "guest_status": guest::status_name(rep.status),
            "first_bad": rep.first_bad,
            "verified_bytes": if self.ok { o.data } else { 0 },
            "blackout_us": rep.max_gap_us,
            "guest_loops": rep.loops,
            "handover_bytes": self.handover_bytes,
            "preserved_folios": ss.preserved_folios,
            "gmem_runs": ss.gmem_runs,
            "vm_name": self.vm_name,
            "memslots": { "chunks": self.chunks, "bound_at_end": self.bound_at_end, "background_bind_us": self.background_bind_us },
            "brownout": { "touch_before_us": ss.touch_before_us, "touch_after_us": self.touch_after_us, "bytes": o.data },
            "order": if o.vcpu_first { "vcpu-first" } else if o.gmem_first { "gmem-first" } else { "vm-first" },
            "vcpu_state_by": if o.vcpu_luo { "kvm_vcpu_luo_v1" } else { "vmm" },
            "phases_us": {
                "preserve_while_running": ss.preserve_us,
                "pause": ss.pause_us,
                "save_state": ss.save_us,
                "freeze_and_finalize": us(t.kexec_start, t.exec),
                "exec": us(t.exec, t.boot_start),
                "exec_to_main": us(t.exec, t.main.unwrap_or(t.boot_start)),
                "main_to_boot": us(t.main.unwrap_or(t.boot_start), t.boot_start),
                "boot": t.boot_us as f64,
                "retrieve": us(t.stage2, t.retrieved),
                "resume": us(t.retrieved, t.resume),
                "resume_bind_memslots": us(t.retrieved, t.bound),
                "resume_vcpu_state": us(t.bound, t.resume),
                "host_pause_to_resume": us(ss.pause_ns, t.resume),
                "verify_after_resume": us(t.resume, t.done),
            },
            "opts": o,
        })
    }
}

/// The `rfc-cycle` event of a soak: one update done (`result`: its stage-2 report), another
/// to come.
pub(super) fn cycle(
    cycle: u32,
    ok: bool,
    blackout_us: u64,
    frames_used: u64,
    result: Value,
) -> Value {
    json!({ "cycle": cycle, "ok": ok, "blackout_us": blackout_us, "frames_used": frames_used, "rss_kib": rss_kib(), "result": result })
}

/// Resident memory of this host image, KiB (VmRSS).
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}
