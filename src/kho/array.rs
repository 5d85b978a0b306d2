//! Large arrays (folio lists of millions of entries) preserved as data pages plus a chain of
//! one-page chunks listing their physical addresses (upstream `kho_vmalloc`), never as one huge
//! contiguous allocation.

use std::collections::HashSet;

use crate::abi::kho::{KhoArraySer, KHO_ARRAY_CHUNK_ENTRIES};
use crate::mm::{Folio, Mm, PhysRead, PAGE_SIZE};

use super::{Kho, KhoError};

/// A preserved array in the running image (its pages, to undo the preservation).
#[derive(Debug, Default)]
pub struct PreservedArray {
    /// The descriptor to hand over (stored by the owner in its blob).
    pub ser: KhoArraySer,
    pages: Vec<Folio>,
}

impl PreservedArray {
    /// Physical addresses of its pages (data and chunks).
    pub fn page_addrs(&self) -> Vec<u64> {
        self.pages.iter().map(|f| f.pa()).collect()
    }

    /// RAM the array occupies (data and chunk pages).
    pub fn bytes(&self) -> u64 {
        self.pages.len() as u64 * PAGE_SIZE
    }
}

impl Kho {
    /// Copy `data` into freshly allocated pages, preserve them and the chunk chain that lists
    /// them. All or nothing.
    pub fn preserve_array(&mut self, mm: &mut Mm, data: &[u8]) -> Result<PreservedArray, KhoError> {
        let mut arr = PreservedArray::default();
        if data.is_empty() {
            return Ok(arr);
        }
        let res = self.build_array(mm, data, &mut arr);
        if let Err(e) = res {
            self.drop_pages(mm, &mut arr.pages, true);
            return Err(e);
        }
        Ok(arr)
    }

    fn alloc_preserved_page(
        &mut self,
        mm: &mut Mm,
        pages: &mut Vec<Folio>,
    ) -> Result<Folio, KhoError> {
        let f = mm.alloc_zeroed(0)?;
        if let Err(e) = self.preserve_folio(mm, f) {
            let _ = mm.free(f);
            return Err(e);
        }
        pages.push(f);
        self.meta.insert(f.pa(), f.size());
        Ok(f)
    }

    fn build_array(
        &mut self,
        mm: &mut Mm,
        data: &[u8],
        arr: &mut PreservedArray,
    ) -> Result<(), KhoError> {
        let nr = data.len().div_ceil(PAGE_SIZE as usize);
        let total_pages = u32::try_from(nr).map_err(|_| KhoError::TooLarge(data.len() as u64))?;
        let mut data_pas = Vec::with_capacity(nr);
        for chunk in data.chunks(PAGE_SIZE as usize) {
            let f = self.alloc_preserved_page(mm, &mut arr.pages)?;
            mm.ram.write_phys(f.pa(), chunk)?;
            data_pas.push(f.pa());
        }
        // Chunks are written last to first so each knows its successor.
        let mut next = 0u64;
        for group in data_pas.chunks(KHO_ARRAY_CHUNK_ENTRIES).rev() {
            let c = self.alloc_preserved_page(mm, &mut arr.pages)?;
            let mut page = Vec::with_capacity(PAGE_SIZE as usize);
            page.extend_from_slice(&next.to_ne_bytes());
            for pa in group {
                page.extend_from_slice(&pa.to_ne_bytes());
            }
            mm.ram.write_phys(c.pa(), &page)?;
            next = c.pa();
        }
        arr.ser = KhoArraySer {
            first: next,
            total_pages,
            flags: 0,
            order: 0,
        };
        Ok(())
    }

    fn drop_pages(&mut self, mm: &mut Mm, pages: &mut Vec<Folio>, preserved: bool) {
        for f in pages.drain(..) {
            if preserved {
                let _ = self.unpreserve_folio(mm, f);
            }
            self.meta.remove(&f.pa());
            let _ = mm.free(f);
        }
    }

    /// Undo [`Kho::preserve_array`] and free its pages.
    pub fn unpreserve_array(&mut self, mm: &mut Mm, mut arr: PreservedArray) {
        self.drop_pages(mm, &mut arr.pages, true);
    }

    /// Read a preserved array back in the next image, restoring and freeing its pages. Returns
    /// `total_pages * PAGE_SIZE` bytes. The whole chain is validated before any page is taken,
    /// so a bad descriptor changes nothing.
    pub fn restore_array(&mut self, mm: &mut Mm, ser: &KhoArraySer) -> Result<Vec<u8>, KhoError> {
        let (chunks, data_pas) = self.walk_array(&mm.ram, ser)?;
        let mut out = vec![0u8; data_pas.len() * PAGE_SIZE as usize];
        for (pa, dst) in data_pas.iter().zip(out.chunks_mut(PAGE_SIZE as usize)) {
            mm.ram.read_phys(*pa, dst)?;
        }
        let mut folios = Vec::with_capacity(chunks.len() + data_pas.len());
        for pa in chunks.iter().chain(&data_pas) {
            folios.push(self.restore_folio(*pa)?);
        }
        self.release_many(mm, &mut folios)?;
        Ok(out)
    }

    /// Validate an array descriptor against the incoming tracker: (chunk pages, data pages).
    pub fn walk_array(
        &self,
        mem: &dyn PhysRead,
        ser: &KhoArraySer,
    ) -> Result<(Vec<u64>, Vec<u64>), KhoError> {
        let bad = |why: String| KhoError::BadHandover(format!("preserved array: {why}"));
        if ser.order != 0 || ser.flags != 0 {
            return Err(bad(format!(
                "unsupported order {} / flags {:#x}",
                ser.order, ser.flags
            )));
        }
        let total = ser.total_pages as u64;
        if ser.first == 0 {
            return if total == 0 {
                Ok((vec![], vec![]))
            } else {
                Err(bad("no chunk for a non-empty array".into()))
            };
        }
        if total > mem.phys_size() / PAGE_SIZE {
            return Err(bad(format!("{total} pages is more than RAM holds")));
        }
        let mut seen = HashSet::new();
        let (mut chunks, mut data) = (Vec::new(), Vec::new());
        let mut next = ser.first;
        while next != 0 {
            if !self.is_restorable(next) || !seen.insert(next) {
                return Err(bad(format!(
                    "chunk {next:#x} is not preserved, or the chain loops"
                )));
            }
            chunks.push(next);
            let mut page = vec![0u8; PAGE_SIZE as usize];
            mem.read_phys(next, &mut page)?;
            let words: Vec<u64> = page
                .chunks_exact(8)
                .map(|c| u64::from_ne_bytes(c.try_into().unwrap_or_default()))
                .collect();
            for &pa in words[1..].iter().take_while(|&&pa| pa != 0) {
                if data.len() as u64 >= total {
                    return Err(bad(format!("chain lists more than {total} pages")));
                }
                if !self.is_restorable(pa) || !seen.insert(pa) {
                    return Err(bad(format!(
                        "data page {pa:#x} is not preserved or listed twice"
                    )));
                }
                data.push(pa);
            }
            next = words[0];
        }
        if data.len() as u64 != total {
            return Err(bad(format!(
                "chain lists {} pages, descriptor says {total}",
                data.len()
            )));
        }
        Ok((chunks, data))
    }
}

/// Read a preserved array's contents straight from memory, without consulting the tracker (for
/// the integrity table, which is checked before the tracker is trusted): bounded, loop-free,
/// `total_pages * PAGE_SIZE` bytes.
pub fn read_chain(mem: &dyn PhysRead, ser: &KhoArraySer) -> Result<Vec<u8>, KhoError> {
    let bad = |why: String| KhoError::BadHandover(format!("preserved array: {why}"));
    let total = ser.total_pages as u64;
    if ser.first == 0 {
        return if total == 0 {
            Ok(Vec::new())
        } else {
            Err(bad("no chunk for a non-empty array".into()))
        };
    }
    // Only the integrity table is read this way; 256 MiB of it covers ~10 million ranges.
    if total > mem.phys_size() / PAGE_SIZE || total > 1 << 16 || ser.order != 0 {
        return Err(bad(format!(
            "{total} pages of order {} do not fit",
            ser.order
        )));
    }
    let mut seen = HashSet::new();
    // Grow as pages are read: `total_pages` is not trusted yet.
    let mut out = Vec::with_capacity((total.min(256) * PAGE_SIZE) as usize);
    let mut next = ser.first;
    let mut pages = 0u64;
    while next != 0 {
        if next % PAGE_SIZE != 0 || !seen.insert(next) {
            return Err(bad(format!(
                "chunk {next:#x} is misaligned, or the chain loops"
            )));
        }
        let mut page = vec![0u8; PAGE_SIZE as usize];
        mem.read_phys(next, &mut page)?;
        let words: Vec<u64> = page
            .chunks_exact(8)
            .map(|c| u64::from_ne_bytes(c.try_into().unwrap_or_default()))
            .collect();
        for &pa in words[1..].iter().take_while(|&&pa| pa != 0) {
            pages += 1;
            if pages > total || pa % PAGE_SIZE != 0 || !seen.insert(pa) {
                return Err(bad(format!(
                    "data page {pa:#x} is misaligned, repeated, or beyond {total} pages"
                )));
            }
            let mut d = vec![0u8; PAGE_SIZE as usize];
            mem.read_phys(pa, &mut d)?;
            out.extend_from_slice(&d);
        }
        next = words[0];
    }
    if pages != total {
        return Err(bad(format!(
            "chain lists {pages} pages, descriptor says {total}"
        )));
    }
    Ok(out)
}
