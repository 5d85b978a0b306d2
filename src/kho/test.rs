//! An in-kernel KHO client for tests, in the spirit of upstream `lib/test_kho.c`: allocate
//! folios of mixed orders, fill them with a known pattern, preserve them with a folio list in a
//! preserved array, and after kexec restore and check every byte. It can carry the same
//! memory forward through any number of kexecs.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::abi::kho::KhoArraySer;
use crate::abi::{cstr_field, put_cstr};
use crate::mm::{Folio, Mm, PhysRead, PAGE_SIZE};

use super::{Kho, KhoError};

/// Name of the test client's KHO subtree.
pub const SUBTREE: &str = "kho-test";
/// Compatible string in [`KhoTestSer::compatible`].
pub const COMPATIBLE: &str = "kho-test-v1";
const ORDERS: [u32; 12] = [0, 3, 1, 10, 2, 5, 0, 7, 4, 9, 6, 8];

/// The `kho-test` blob (56 bytes).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct KhoTestSer {
    /// [`COMPATIBLE`], NUL-padded.
    pub compatible: [u8; 16],
    /// Handovers the memory has been through, this one included.
    pub generation: u64,
    /// Seed of the folios' fill pattern.
    pub seed: u64,
    /// Number of 16-byte `{pa, order}` entries in `folios`.
    pub nr_folios: u64,
    /// Preserved array of the folio list.
    pub folios: KhoArraySer,
}

#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
struct FolioEntry {
    pa: u64,
    order: u64,
}

/// The test memory of the running image.
pub struct KhoTest {
    /// The test folios, in pattern order.
    pub folios: Vec<Folio>,
    /// Seed of their fill pattern.
    pub seed: u64,
    /// Handovers they have been through (0 when created).
    pub generation: u64,
}

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn folio_pattern(seed: u64, idx: usize, f: Folio) -> Vec<u8> {
    let base = mix(seed ^ ((idx as u64) << 32));
    let mut v = Vec::with_capacity(f.size() as usize);
    for w in 0..f.size() / 8 {
        v.extend_from_slice(&(base ^ w.wrapping_mul(0x0100_0000_01b3)).to_ne_bytes());
    }
    v
}

impl KhoTest {
    /// Allocate `bytes` of folios of mixed orders and fill them.
    pub fn create(mm: &mut Mm, bytes: u64, seed: u64) -> Result<Self, KhoError> {
        let mut folios = Vec::new();
        let mut left = bytes / PAGE_SIZE;
        let mut i = 0;
        while left > 0 {
            let mut order = ORDERS[i % ORDERS.len()];
            while (1u64 << order) > left {
                order -= 1;
            }
            let f = mm.alloc_zeroed(order)?;
            mm.ram
                .write_phys(f.pa(), &folio_pattern(seed, folios.len(), f))?;
            folios.push(f);
            left -= 1 << order;
            i += 1;
        }
        Ok(Self {
            folios,
            seed,
            generation: 0,
        })
    }

    /// Bytes of test memory.
    pub fn bytes(&self) -> u64 {
        self.folios.iter().map(|f| f.size()).sum()
    }

    /// Preserve every folio and publish the `kho-test` subtree. Returns the array's chunk pages
    /// so a test can corrupt them.
    pub fn preserve(&self, kho: &mut Kho, mm: &mut Mm) -> Result<KhoTestSer, KhoError> {
        for f in &self.folios {
            kho.preserve_folio(mm, *f)?;
        }
        let list: Vec<u8> = self
            .folios
            .iter()
            .flat_map(|f| {
                FolioEntry {
                    pa: f.pa(),
                    order: f.order as u64,
                }
                .as_bytes()
                .to_vec()
            })
            .collect();
        let arr = kho.preserve_array(mm, &list)?;
        let ser = KhoTestSer {
            compatible: put_cstr(COMPATIBLE).unwrap_or_default(),
            generation: self.generation + 1,
            seed: self.seed,
            nr_folios: self.folios.len() as u64,
            folios: arr.ser,
        };
        let blob = kho.alloc_preserve(mm, PAGE_SIZE)?;
        mm.ram.write_phys(blob.pa(), ser.as_bytes())?;
        kho.label(blob.pa(), "kho-test");
        kho.add_subtree(SUBTREE, blob.pa(), std::mem::size_of::<KhoTestSer>() as u64)?;
        Ok(ser)
    }

    /// Restore the test memory handed over by the previous image and check every byte.
    /// `Ok(None)` when there is none.
    pub fn restore(kho: &mut Kho, mm: &mut Mm) -> Result<Option<Self>, KhoError> {
        let st = match kho.retrieve_subtree(SUBTREE) {
            Ok(s) => s,
            Err(KhoError::NoSubtree(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut b = [0u8; std::mem::size_of::<KhoTestSer>()];
        if st.size < b.len() as u64 {
            return Err(KhoError::BadHandover("kho-test blob too small".into()));
        }
        mm.ram.read_phys(st.pa, &mut b)?;
        let ser =
            KhoTestSer::read_from_bytes(&b).map_err(|_| KhoError::Corrupt("kho-test blob"))?;
        let compat = cstr_field(&ser.compatible).unwrap_or_default();
        if compat != COMPATIBLE {
            return Err(KhoError::Incompatible {
                what: "kho-test blob",
                found: compat,
                supported: COMPATIBLE,
            });
        }
        let list = kho.restore_array(mm, &ser.folios)?;
        kho.restore_free(mm, st.pa)?;
        let n = usize::try_from(ser.nr_folios).map_err(|_| KhoError::Corrupt("kho-test count"))?;
        if n > list.len() / 16 {
            return Err(KhoError::BadHandover(
                "kho-test folio count exceeds its list".into(),
            ));
        }
        let mut folios = Vec::with_capacity(n);
        for (idx, e) in list.chunks_exact(16).take(n).enumerate() {
            let e =
                FolioEntry::read_from_bytes(e).map_err(|_| KhoError::Corrupt("kho-test entry"))?;
            let f = kho.restore_folio(e.pa)?;
            if f.order as u64 != e.order {
                return Err(KhoError::BadHandover(format!(
                    "folio {:#x} restored with order {}, list says {}",
                    e.pa, f.order, e.order
                )));
            }
            let mut got = vec![0u8; f.size() as usize];
            mm.ram.read_phys(f.pa(), &mut got)?;
            if got != folio_pattern(ser.seed, idx, f) {
                return Err(KhoError::BadHandover(format!(
                    "folio {idx} at {:#x} does not hold its pattern",
                    f.pa()
                )));
            }
            folios.push(f);
        }
        Ok(Some(Self {
            folios,
            seed: ser.seed,
            generation: ser.generation,
        }))
    }
}

/// Restore and free everything the previous image handed over that nobody claimed: used
/// when a client refuses its part of the handover, so the memory is not lost.
pub fn release_unclaimed(kho: &mut Kho, mm: &mut Mm) -> u64 {
    let blocks = kho
        .incoming()
        .map(|i| i.tracker.blocks())
        .unwrap_or_default();
    let mut pages = 0;
    let mut folios = Vec::with_capacity(blocks.len());
    for (pfn, _) in blocks {
        if let Ok(f) = kho.restore_folio(pfn * PAGE_SIZE) {
            pages += f.nr_pages();
            folios.push(f);
        }
    }
    let _ = mm.free_many(&mut folios);
    pages
}

/// One-line decode of a `kho-test` blob for `handover inspect`.
pub fn describe(_mem: &dyn PhysRead, blob: &[u8]) -> String {
    match KhoTestSer::read_from_prefix(blob) {
        Ok((s, _)) => format!(
            "{:?}, generation {}, {} folios, list of {} pages at {:#x}",
            cstr_field(&s.compatible).unwrap_or_default(),
            s.generation,
            s.nr_folios,
            { s.folios.total_pages },
            { s.folios.first }
        ),
        Err(_) => "truncated".into(),
    }
}
