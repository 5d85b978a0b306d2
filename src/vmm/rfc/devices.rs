//! The guest's port-I/O devices: a clock port (CLOCK_MONOTONIC in microseconds, which survives
//! the kexec: the guest measures the blackout as the largest gap between two reads), a proceed
//! port (the VMM lets the guest go on to verify) and a status port (the guest's progress);
//! MMIO exits go to the lazily bound memslots.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::host::Host;
use crate::kvm::{IoAction, IoEvent};
use crate::time::monotonic_ns;
use crate::vmm::guest::{self, GuestMode};
use crate::vmm::slots::GuestMemSlots;

/// Shared between the VMM thread and the vCPU thread.
#[derive(Default)]
pub(crate) struct GuestIo {
    /// Read by the guest on the proceed port: it goes on to verify its data once this is set.
    pub(crate) proceed: AtomicBool,
    /// The guest's last status (`guest::STATUS_*`).
    pub(crate) status: AtomicU64,
    /// Clock reads answered: a pause only shows in the guest's gap once it has read the clock.
    pub(crate) clock_reads: AtomicU64,
    /// When the last clock read was answered (CLOCK_MONOTONIC ns).
    pub(crate) last_clock_ns: AtomicU64,
    /// The guest's read pass over its data before it reported WRITTEN (from the clock read
    /// that starts it to the status), ns; 0 until then.
    pub(crate) touch_before_ns: AtomicU64,
}

impl GuestIo {
    /// Nanoseconds since the last clock read (the guest's pass over its data after its final
    /// clock read, when called at its final status).
    pub(crate) fn since_last_clock_ns(&self) -> u64 {
        monotonic_ns().saturating_sub(self.last_clock_ns.load(Ordering::SeqCst))
    }
}

/// The memslots whose MMIO exits bind the chunk the guest touched (`None`: all are bound).
pub(super) type SlotsRef<'a> = Option<(&'a Mutex<Host>, &'a GuestMemSlots)>;

/// The exit handler of the vCPU thread: the ports above, and MMIO through `slots`.
pub(crate) fn io_handler<'a>(
    io: &'a GuestIo,
    mode: GuestMode,
    slots: SlotsRef<'a>,
) -> impl FnMut(IoEvent<'_>) -> IoAction + 'a {
    move |ev| match ev {
        IoEvent::MmioRead { addr, data } => slots
            .and_then(|(h, s)| s.mmio(h, addr, Some(data), None))
            .unwrap_or(IoAction::Stop),
        IoEvent::MmioWrite { addr, data } => slots
            .and_then(|(h, s)| s.mmio(h, addr, None, Some(data)))
            .unwrap_or(IoAction::Stop),
        IoEvent::In {
            port: guest::PORT_CLOCK,
            data,
        } => {
            let now = monotonic_ns();
            let v = ((now / 1000) as u32).to_le_bytes();
            let n = data.len().min(4);
            data[..n].copy_from_slice(&v[..n]);
            io.last_clock_ns.store(now, Ordering::SeqCst);
            io.clock_reads.fetch_add(1, Ordering::SeqCst);
            IoAction::Continue
        }
        IoEvent::In {
            port: guest::PORT_PROCEED,
            data,
        } => {
            let v = (io.proceed.load(Ordering::SeqCst) as u32).to_le_bytes();
            let n = data.len().min(4);
            data[..n].copy_from_slice(&v[..n]);
            IoAction::Continue
        }
        IoEvent::Out {
            port: guest::PORT_STATUS,
            data,
        } => {
            let st = status_of(data);
            if st == guest::STATUS_WRITTEN && io.touch_before_ns.load(Ordering::SeqCst) == 0 {
                io.touch_before_ns
                    .store(io.since_last_clock_ns().max(1), Ordering::SeqCst);
            }
            io.status.store(st, Ordering::SeqCst);
            if guest::is_final_status(mode, st) {
                IoAction::Stop
            } else {
                IoAction::Continue
            }
        }
        IoEvent::In { data, .. } => {
            data.fill(0);
            IoAction::Continue
        }
        IoEvent::Out { .. } => IoAction::Continue,
    }
}

/// The status the guest wrote to its status port (32 bits, little-endian; fewer bytes are
/// zero-extended).
pub(crate) fn status_of(data: &[u8]) -> u64 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u64::from(u32::from_le_bytes(b))
}
