//! The page cache of one file: which RAM frame backs each page index. Folios are order 0
//! (PAGE_SIZE), as shmem small folios and the RFC's guest_memfd use. Dense: 8 bytes per page of
//! file size, holes are 0.

use super::{pfn_to_pa, Folio, Mm, MmError};

#[derive(Debug, Default)]
pub struct PageCache {
    /// pfn + 1 per index, 0 for a hole.
    slots: Vec<u64>,
    present: u64,
}

impl PageCache {
    pub fn with_pages(nr: u64) -> Self {
        Self {
            slots: vec![0; nr as usize],
            present: 0,
        }
    }

    pub fn nr_slots(&self) -> u64 {
        self.slots.len() as u64
    }

    pub fn nr_present(&self) -> u64 {
        self.present
    }

    pub fn get(&self, index: u64) -> Option<u64> {
        match self.slots.get(index as usize) {
            Some(&v) if v != 0 => Some(v - 1),
            _ => None,
        }
    }

    /// Physical address of page `index`, if present.
    pub fn pa(&self, index: u64) -> Option<u64> {
        self.get(index).map(pfn_to_pa)
    }

    /// Put `pfn` at `index` (which must be a hole within the size).
    pub fn insert(&mut self, index: u64, pfn: u64) -> bool {
        match self.slots.get_mut(index as usize) {
            Some(s) if *s == 0 => {
                *s = pfn + 1;
                self.present += 1;
                true
            }
            _ => false,
        }
    }

    /// Allocate a zeroed frame for hole `index`; returns its pfn.
    pub fn fault_in(&mut self, mm: &mut Mm, index: u64) -> Result<u64, MmError> {
        if let Some(p) = self.get(index) {
            return Ok(p);
        }
        if index >= self.nr_slots() {
            return Err(MmError::OutOfRam { pa: index, len: 0 });
        }
        let f = mm.alloc_zeroed(0)?;
        self.insert(index, f.pfn);
        Ok(f.pfn)
    }

    /// Remove and return the frames in `start..end`.
    pub fn take_range(&mut self, start: u64, end: u64) -> Vec<Folio> {
        let end = end.min(self.nr_slots());
        let mut out = Vec::new();
        for s in self
            .slots
            .iter_mut()
            .take(end as usize)
            .skip(start as usize)
        {
            if *s != 0 {
                out.push(Folio {
                    pfn: *s - 1,
                    order: 0,
                });
                *s = 0;
            }
        }
        self.present -= out.len() as u64;
        out
    }

    /// Grow or shrink to `nr` slots, returning frames dropped off the end.
    pub fn resize(&mut self, nr: u64) -> Vec<Folio> {
        let dropped = if nr < self.nr_slots() {
            self.take_range(nr, self.nr_slots())
        } else {
            Vec::new()
        };
        self.slots.resize(nr as usize, 0);
        dropped
    }

    /// Present pages as (index, pfn), in index order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, &v)| v != 0)
            .map(|(i, &v)| (i as u64, v - 1))
    }

    /// Free every frame.
    pub fn release(&mut self, mm: &mut Mm) -> Result<(), MmError> {
        let mut all = self.take_range(0, self.nr_slots());
        mm.free_many(&mut all)
    }
}
