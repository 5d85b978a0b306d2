//! KHO — Kexec HandOver: preserve memory across a kexec and describe it to the next image.
//!
//! * [`tracker`]: which (pfn, order) blocks are preserved, as a radix tree living in RAM.
//! * [`fdt`]: the handover tree the next image receives (root compatible, tracker root,
//!   one subtree per client).
//! * [`array`](mod@array): large arrays as chains of one-page chunks of physical addresses.
//! * [`block`]: chains of fixed-size entry blocks, for LUO's sessions and files.
//! * [`boot`]: the next image's side: validate, reserve, restore.

pub mod array;
pub mod block;
pub mod boot;
pub mod dump;
pub mod fdt;
pub mod finalize;
pub mod inspect;
pub mod metadata;
/// The `kho-test` client (test hook).
#[cfg(feature = "test-hooks")]
pub mod test;
pub mod tracker;

use std::collections::BTreeMap;
use std::ops::Range;

use crate::mm::{pa_to_pfn, Folio, Mm, MmError, MAX_ORDER, PAGE_SIZE};

pub use boot::{Incoming, KhoBootArgs};
pub use fdt::{HandoverTree, Subtree};
pub use tracker::{IncomingTracker, Tracker};

/// Errors of KHO: preservation misuse, restore misuse and bad handovers. [`KhoError::errno`]
/// gives the errno user space sees.
#[derive(Debug, thiserror::Error)]
pub enum KhoError {
    /// RAM or the frame allocator failed (its own errno).
    #[error(transparent)]
    Mm(#[from] MmError),
    /// The range overlaps the scratch zone, which is never preserved (EINVAL).
    #[error("range {pa:#x}+{len:#x} overlaps scratch memory and cannot be preserved")]
    Scratch {
        /// Start of the range (physical address).
        pa: u64,
        /// Its length in bytes.
        len: u64,
    },
    /// The block is preserved already (EEXIST).
    #[error("block at {pa:#x} order {order} is already preserved")]
    AlreadyPreserved {
        /// Physical address of the block.
        pa: u64,
        /// Its order.
        order: u32,
    },
    /// Unpreserve of a block that was not preserved with exactly this address and order
    /// (EINVAL).
    #[error("block at {pa:#x} order {order} is not preserved (unpreserve must match preserve)")]
    NotPreserved {
        /// Physical address of the block.
        pa: u64,
        /// Its order.
        order: u32,
    },
    /// Restore of an address the previous image did not preserve as a block start, or that
    /// was restored already (EIO).
    #[error("address {pa:#x} was not preserved, is misaligned, or was already restored")]
    NotRestorable {
        /// The address asked for.
        pa: u64,
    },
    /// A subtree of this name is registered already (EEXIST).
    #[error("subtree {0:?} already exists")]
    SubtreeExists(String),
    /// The incoming handover has no subtree of this name, or there is no handover (ENOENT).
    #[error("no subtree {0:?} in the handover")]
    NoSubtree(String),
    /// Too large to preserve (E2BIG): an allocation (bytes) above one MAX_ORDER block, an
    /// array (bytes) of 2^32 pages or more, or a block chain (entries) over `KHO_MAX_BLOCKS`.
    #[error("size {0} is too large to preserve in one allocation")]
    TooLarge(u64),
    /// A handed-over structure carries a compatible string this image does not read (EINVAL).
    #[error("{what}: unsupported compatible string {found:?} (this image supports {supported:?})")]
    Incompatible {
        /// Which structure (e.g. "integrity table").
        what: &'static str,
        /// The string found in the handover.
        found: String,
        /// The string this image supports.
        supported: &'static str,
    },
    /// The handover fails validation; the message says where (EINVAL).
    #[error("bad handover: {0}")]
    BadHandover(String),
    /// A handed-over structure could not be decoded; names which (EINVAL).
    #[error("corrupt {0}")]
    Corrupt(&'static str),
}

impl KhoError {
    /// The errno upstream returns for this failure.
    pub fn errno(&self) -> i32 {
        match self {
            KhoError::Mm(e) => e.errno(),
            KhoError::AlreadyPreserved { .. } | KhoError::SubtreeExists(_) => libc::EEXIST,
            KhoError::NoSubtree(_) => libc::ENOENT,
            KhoError::TooLarge(_) => libc::E2BIG,
            KhoError::NotRestorable { .. } => libc::EIO,
            _ => libc::EINVAL,
        }
    }
}

impl From<KhoError> for crate::abi::errno::Errno {
    fn from(e: KhoError) -> Self {
        crate::abi::errno::Errno(e.errno())
    }
}

/// KHO state of one running image.
pub struct Kho {
    tracker: Tracker,
    subtrees: BTreeMap<String, Subtree>,
    scratch: Range<u64>,
    incoming: Option<Incoming>,
    /// Preserved metadata allocations (pa -> bytes): blobs, arrays, blocks, the tree. Together
    /// with the tracker nodes this is the handover's size, and what a dump copies.
    meta: BTreeMap<u64, u64>,
    /// What each metadata allocation is (for tests that damage one kind, and for `inspect`).
    labels: BTreeMap<u64, &'static str>,
    /// The incoming handover has been accepted for good. Until then, memory of it that has
    /// been read is not freed (`deferred`), so a rollback finds the handover intact in RAM.
    committed: bool,
    /// Accepted with [`Kho::mark_committed`]: what is read is still only queued in `deferred`,
    /// until [`Kho::commit`].
    hold_frees: bool,
    deferred: Vec<Folio>,
    /// Boot is over: restores now come from clients (the `kho.restore` fault point).
    pub booted: bool,
}

/// Split `pfn..pfn+nr` into maximal naturally aligned power-of-two blocks.
pub fn split_range(pfn: u64, nr: u64) -> impl Iterator<Item = (u64, u32)> {
    crate::mm::split_blocks(pfn, nr, tracker_max_order())
}

const fn tracker_max_order() -> u32 {
    crate::abi::kho::KHO_MAX_PRESERVE_ORDER
}

impl Kho {
    /// KHO for this boot: an empty outgoing tracker and no subtrees; `scratch` (PFNs) is the
    /// range never preserved, `incoming` the validated handover of a KHO boot (`None` after a
    /// cold boot).
    pub fn new(
        mm: &mut Mm,
        scratch: Range<u64>,
        incoming: Option<Incoming>,
    ) -> Result<Self, KhoError> {
        Ok(Self {
            tracker: Tracker::new(mm)?,
            subtrees: BTreeMap::new(),
            scratch,
            committed: incoming.is_none(),
            hold_frees: false,
            incoming,
            meta: BTreeMap::new(),
            labels: BTreeMap::new(),
            deferred: Vec::new(),
            booted: false,
        })
    }

    /// The outgoing tracker (what this image has preserved).
    pub fn tracker(&self) -> &Tracker {
        &self.tracker
    }

    /// The handover this image booted with, if any.
    pub fn incoming(&self) -> Option<&Incoming> {
        self.incoming.as_ref()
    }

    /// The scratch zone, in PFNs.
    pub fn scratch(&self) -> Range<u64> {
        self.scratch.clone()
    }

    /// The subtrees registered for the next handover, by name.
    pub fn subtrees(&self) -> &BTreeMap<String, Subtree> {
        &self.subtrees
    }

    fn check_scratch(&self, pfn: u64, nr: u64) -> Result<(), KhoError> {
        if pfn < self.scratch.end && self.scratch.start < pfn + nr {
            return Err(KhoError::Scratch {
                pa: pfn * PAGE_SIZE,
                len: nr * PAGE_SIZE,
            });
        }
        Ok(())
    }

    /// Preserve a folio. Takes no reference: the caller keeps the folio allocated.
    pub fn preserve_folio(&mut self, mm: &mut Mm, f: Folio) -> Result<(), KhoError> {
        if crate::fault::hit("kho.preserve") {
            return Err(KhoError::Mm(MmError::NoMemory {
                order: f.order,
                zone: crate::mm::Zone::Normal,
            }));
        }
        if f.order > tracker_max_order()
            || f.pfn % f.nr_pages() != 0
            || !mm.ram.contains(f.pa(), f.size())
        {
            return Err(KhoError::Mm(MmError::BadBlock {
                pfn: f.pfn,
                order: f.order,
            }));
        }
        self.check_scratch(f.pfn, f.nr_pages())?;
        if !self.tracker.set(mm, f.pfn, f.order)? {
            return Err(KhoError::AlreadyPreserved {
                pa: f.pa(),
                order: f.order,
            });
        }
        Ok(())
    }

    /// Undo [`Kho::preserve_folio`]; must match it exactly.
    pub fn unpreserve_folio(&mut self, mm: &mut Mm, f: Folio) -> Result<(), KhoError> {
        if f.order > tracker_max_order() || !self.tracker.clear(mm, f.pfn, f.order)? {
            return Err(KhoError::NotPreserved {
                pa: f.pa(),
                order: f.order,
            });
        }
        Ok(())
    }

    /// Preserve `nr` pages from `pfn`, as naturally aligned blocks; all or nothing.
    pub fn preserve_pages(&mut self, mm: &mut Mm, pfn: u64, nr: u64) -> Result<(), KhoError> {
        self.check_scratch(pfn, nr)?;
        let mut done = Vec::new();
        for (p, order) in split_range(pfn, nr) {
            if let Err(e) = self.preserve_folio(mm, Folio { pfn: p, order }) {
                for f in done.into_iter().rev() {
                    let _ = self.unpreserve_folio(mm, f);
                }
                return Err(e);
            }
            done.push(Folio { pfn: p, order });
        }
        Ok(())
    }

    /// Undo [`Kho::preserve_pages`] with the same range. Checks every block first, so a
    /// mismatch (`NotPreserved`) changes nothing.
    pub fn unpreserve_pages(&mut self, mm: &mut Mm, pfn: u64, nr: u64) -> Result<(), KhoError> {
        let blocks: Vec<_> = split_range(pfn, nr).collect();
        if let Some(&(p, order)) = blocks
            .iter()
            .find(|&&(p, o)| !self.tracker.test(mm, p, o).unwrap_or(false))
        {
            return Err(KhoError::NotPreserved {
                pa: p * PAGE_SIZE,
                order,
            });
        }
        for (p, order) in blocks {
            self.unpreserve_folio(mm, Folio { pfn: p, order })?;
        }
        Ok(())
    }

    /// Allocate zeroed memory of at least `size` bytes and preserve it.
    pub fn alloc_preserve(&mut self, mm: &mut Mm, size: u64) -> Result<Folio, KhoError> {
        if crate::fault::hit("kho.alloc") {
            return Err(KhoError::Mm(MmError::NoMemory {
                order: 0,
                zone: crate::mm::Zone::Normal,
            }));
        }
        if size == 0 {
            return Err(KhoError::Mm(MmError::BadOrder(0)));
        }
        let pages = size.div_ceil(PAGE_SIZE);
        let order = pages.next_power_of_two().trailing_zeros();
        if order > MAX_ORDER {
            return Err(KhoError::TooLarge(size));
        }
        let f = mm.alloc_zeroed(order)?;
        if let Err(e) = self.preserve_folio(mm, f) {
            let _ = mm.free(f);
            return Err(e);
        }
        self.meta.insert(f.pa(), f.size());
        Ok(f)
    }

    /// Undo [`Kho::alloc_preserve`]: unpreserve the folio and free it.
    pub fn unpreserve_free(&mut self, mm: &mut Mm, f: Folio) -> Result<(), KhoError> {
        self.unpreserve_folio(mm, f)?;
        self.meta.remove(&f.pa());
        mm.free(f)?;
        Ok(())
    }

    /// Bytes of metadata the next image receives: tracker nodes plus every preserved metadata
    /// allocation (tree, blobs, arrays, blocks).
    pub fn handover_bytes(&self) -> u64 {
        self.tracker.node_bytes() + self.meta.values().sum::<u64>()
    }

    /// Copy the outgoing handover's metadata into a dump.
    pub fn dump(&self, mm: &Mm, args: KhoBootArgs) -> Result<dump::Dump, KhoError> {
        let mut d = dump::Dump::new(mm.ram.size(), args);
        d.add(&mm.ram, args.fdt_pa, args.fdt_size)?;
        for f in self.tracker.node_folios() {
            d.add(&mm.ram, f.pa(), f.size())?;
        }
        for (&pa, &len) in &self.meta {
            d.add(&mm.ram, pa, len)?;
        }
        Ok(d)
    }

    /// Register a client's blob under `name` in the next handover tree. The blob's memory must
    /// be preserved by the client.
    pub fn add_subtree(&mut self, name: &str, pa: u64, size: u64) -> Result<(), KhoError> {
        if self.subtrees.contains_key(name) {
            return Err(KhoError::SubtreeExists(name.to_string()));
        }
        self.subtrees.insert(
            name.to_string(),
            Subtree {
                pa,
                size,
                crc: None,
            },
        );
        Ok(())
    }

    /// Drop the subtree `name` from the next handover tree (the blob is the client's to free).
    pub fn remove_subtree(&mut self, name: &str) -> Option<Subtree> {
        self.subtrees.remove(name)
    }

    /// A subtree handed over by the previous image.
    pub fn retrieve_subtree(&self, name: &str) -> Result<Subtree, KhoError> {
        self.incoming
            .as_ref()
            .and_then(|i| i.tree.subtrees.get(name).copied())
            .ok_or_else(|| KhoError::NoSubtree(name.to_string()))
    }

    fn incoming_tracker(&mut self) -> Option<&mut IncomingTracker> {
        self.incoming.as_mut().map(|i| &mut i.tracker)
    }

    /// Take back a folio preserved by the previous image. Each preserved folio can be restored
    /// once; the caller owns it afterwards (free it with [`Mm::free`] or preserve it again).
    pub fn restore_folio(&mut self, pa: u64) -> Result<Folio, KhoError> {
        let bad = KhoError::NotRestorable { pa };
        if self.booted && crate::fault::hit("kho.restore") {
            return Err(bad);
        }
        if pa % PAGE_SIZE != 0 {
            return Err(bad);
        }
        let pfn = pa_to_pfn(pa);
        let t = self
            .incoming_tracker()
            .ok_or(KhoError::NotRestorable { pa })?;
        let order = t.order_of(pfn).ok_or(KhoError::NotRestorable { pa })?;
        if !t.take(pfn, order) {
            return Err(bad);
        }
        Ok(Folio { pfn, order })
    }

    /// Restore `nr` pages preserved with [`Kho::preserve_pages`]: all or nothing.
    pub fn restore_pages(&mut self, pa: u64, nr: u64) -> Result<(), KhoError> {
        if pa % PAGE_SIZE != 0 || (self.booted && crate::fault::hit("kho.restore")) {
            return Err(KhoError::NotRestorable { pa });
        }
        let blocks: Vec<_> = split_range(pa_to_pfn(pa), nr).collect();
        let t = self
            .incoming_tracker()
            .ok_or(KhoError::NotRestorable { pa })?;
        if let Some(&(p, _)) = blocks.iter().find(|&&(p, o)| !t.contains(p, o)) {
            return Err(KhoError::NotRestorable { pa: p * PAGE_SIZE });
        }
        for (p, o) in blocks {
            t.take(p, o);
        }
        Ok(())
    }

    /// Restore a folio and free it (for metadata that has been read; deferred until commit).
    pub fn restore_free(&mut self, mm: &mut Mm, pa: u64) -> Result<(), KhoError> {
        let f = self.restore_folio(pa)?;
        self.release_many(mm, &mut vec![f])
    }

    /// Free handed-over memory that has been consumed — now if the update is committed, at
    /// commit otherwise (or if it was accepted with [`Kho::mark_committed`]).
    pub fn release_many(&mut self, mm: &mut Mm, folios: &mut Vec<Folio>) -> Result<(), KhoError> {
        if self.committed && !self.hold_frees {
            mm.free_many(folios)?;
        } else {
            self.deferred.append(folios);
        }
        Ok(())
    }

    /// Accept the incoming handover for good: free what was read of it. No rollback after
    /// this.
    pub fn commit(&mut self, mm: &mut Mm) -> Result<(), KhoError> {
        self.committed = true;
        self.hold_frees = false;
        let mut d = std::mem::take(&mut self.deferred);
        mm.free_many(&mut d)?;
        Ok(())
    }

    /// Accept the incoming handover now (no rollback from here on) but free what was read of
    /// it later, with [`Kho::commit`] — for the moment guests resume, where time counts.
    pub fn mark_committed(&mut self) {
        self.committed = true;
        // Each free punches the page out of the RAM memfd, which unmaps it everywhere and
        // flushes TLBs, inside the restore of the VMs still to come: restoring 32 VMs on one
        // thread, a guest_memfd's retrieve took 60 µs (median) with the frees, 6 µs without.
        self.hold_frees = true;
    }

    /// Whether the incoming handover has been accepted (always true after a cold boot).
    pub fn committed(&self) -> bool {
        self.committed
    }

    /// Name the kind of a metadata allocation (or of each page of an array or block chain).
    pub fn label(&mut self, pa: u64, kind: &'static str) {
        if self.meta.contains_key(&pa) {
            self.labels.insert(pa, kind);
        }
    }

    /// Metadata allocations of `kind`, as (pa, size), in address order.
    pub fn labelled(&self, kind: &str) -> Vec<(u64, u64)> {
        self.labels
            .iter()
            .filter(|(pa, k)| **k == kind && self.meta.contains_key(pa))
            .map(|(pa, _)| (*pa, self.meta[pa]))
            .collect()
    }

    /// True if a block starting at `pa` is preserved by the previous image and not restored.
    pub fn is_restorable(&self, pa: u64) -> bool {
        pa % PAGE_SIZE == 0
            && self
                .incoming
                .as_ref()
                .is_some_and(|i| i.tracker.order_of(pa_to_pfn(pa)).is_some())
    }
}
