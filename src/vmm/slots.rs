//! Guest memory slots bound lazily. KVM's cost to create a memslot grows with its size (on this
//! machine's shadow-paging KVM, ~0.4 ms per GiB for the reverse-map arrays: 6–9 ms for 16 GiB),
//! and after a live update that cost would sit inside the guest's blackout. So the VMM binds a
//! guest_memfd as fixed-size chunks, one memslot each: the chunk the guest needs first before the
//! resume, the rest from a background thread after it. A guest access to a chunk not bound yet
//! exits to the VMM as MMIO; the VMM binds that chunk at once and performs the access on the
//! guest_memfd itself, so the guest sees ordinary memory either way.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::host::Host;
use crate::kvm::IoAction;
use crate::uapi::{Pid, UserMapping};

use super::libkvm::{self, Region};

/// First memslot id used for guest_memfd chunks (slot 0 is low memory).
pub const FIRST_SLOT: u32 = 1;

/// A guest_memfd bound as chunk memslots `FIRST_SLOT..`, each bound on demand (see the module
/// documentation).
pub struct GuestMemSlots {
    pid: Pid,
    vm: i32,
    gmem: i32,
    gpa: u64,
    size: u64,
    chunk: u64,
    bound: Vec<AtomicBool>,
    /// The VMM's own mapping of the guest_memfd, for accesses it performs for the guest.
    map: Mutex<Option<UserMapping>>,
}

impl GuestMemSlots {
    /// `size` bytes of guest_memfd `gmem` at guest physical `gpa`, in `chunk`-sized slots.
    pub fn new(pid: Pid, vm: i32, gmem: i32, gpa: u64, size: u64, chunk: u64) -> Arc<Self> {
        let chunk = chunk
            .max(crate::mm::PAGE_SIZE)
            .min(size.max(crate::mm::PAGE_SIZE));
        let n = size.div_ceil(chunk) as usize;
        Arc::new(Self {
            pid,
            vm,
            gmem,
            gpa,
            size,
            chunk,
            bound: (0..n).map(|_| AtomicBool::new(false)).collect(),
            map: Mutex::new(None),
        })
    }

    /// Number of chunks (memslots once all are bound).
    pub fn nr(&self) -> usize {
        self.bound.len()
    }

    /// Chunks bound so far.
    pub fn nr_bound(&self) -> usize {
        self.bound
            .iter()
            .filter(|b| b.load(Ordering::SeqCst))
            .count()
    }

    /// Bind chunk `i` (no-op if bound). The host lock is held by the caller.
    pub fn bind(&self, h: &mut Host, i: usize) -> Result<(), String> {
        if i >= self.nr() || self.bound[i].load(Ordering::SeqCst) {
            return Ok(());
        }
        let off = i as u64 * self.chunk;
        let r = Region {
            slot: FIRST_SLOT + i as u32,
            gpa: self.gpa + off,
            size: self.chunk.min(self.size - off),
            uaddr: 0,
            gmem: Some((self.gmem, off)),
        };
        libkvm::set_memory_region2(h, self.pid, self.vm, r)
            .map_err(|e| format!("memslot {}: {e}", r.slot))?;
        self.bound[i].store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Bind every chunk not bound yet, in order, in the caller's thread; stops at the first
    /// failure.
    pub fn bind_all(&self, h: &mut Host) -> Result<(), String> {
        (0..self.nr()).try_for_each(|i| self.bind(h, i))
    }

    /// Bind every chunk not bound yet, one host-lock hold per chunk, on a thread of its own.
    /// Returns the microseconds it took.
    pub fn bind_rest_in_background(
        self: &Arc<Self>,
        shared: Arc<Mutex<Host>>,
    ) -> JoinHandle<Result<u64, String>> {
        let me = self.clone();
        std::thread::spawn(move || {
            let t = std::time::Instant::now();
            for i in 0..me.nr() {
                let mut h = shared.lock().unwrap_or_else(|p| p.into_inner());
                me.bind(&mut h, i)?;
            }
            Ok(t.elapsed().as_micros() as u64)
        })
    }

    /// The chunk that holds `gpa`, if it is ours.
    pub fn chunk_of(&self, gpa: u64) -> Option<usize> {
        (gpa >= self.gpa && gpa - self.gpa < self.size)
            .then(|| ((gpa - self.gpa) / self.chunk) as usize)
    }

    /// Handle an MMIO exit at `addr`: if it falls in a chunk that is not bound, bind it and do
    /// the access on the guest_memfd. `None` if the address is not ours.
    pub fn mmio(
        &self,
        shared: &Mutex<Host>,
        addr: u64,
        read: Option<&mut [u8]>,
        write: Option<&[u8]>,
    ) -> Option<IoAction> {
        let i = self.chunk_of(addr)?;
        let mut h = shared.lock().unwrap_or_else(|p| p.into_inner());
        if self.bind(&mut h, i).is_err() {
            return Some(IoAction::Stop);
        }
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.is_none() {
            let rw = libc::PROT_READ | libc::PROT_WRITE;
            *map = h
                .mmap(self.pid, self.gmem, self.size, rw, libc::MAP_SHARED, 0)
                .ok();
        }
        let Some(m) = *map else {
            return Some(IoAction::Stop);
        };
        let at = m.addr + (addr - self.gpa) as usize;
        let r = match (read, write) {
            (Some(buf), _) => h.user_read(self.pid, at, buf),
            (None, Some(data)) => h.user_write(self.pid, at, data),
            (None, None) => Ok(()),
        };
        Some(if r.is_ok() {
            IoAction::Continue
        } else {
            IoAction::Stop
        })
    }
}
