//! Serialization blocks: a chain of one-page blocks, each a `{next, count}` header followed by
//! `count` fixed-size entries (upstream `kho_block`). LUO stores sessions and files this way,
//! so there is no fixed cap on either.

use std::collections::HashSet;

use crate::abi::kho::{KhoBlockHeader, KHO_BLOCK_HEADER_SIZE, KHO_MAX_BLOCKS};
use crate::mm::{Folio, Mm, PhysRead, PAGE_SIZE};

use super::{Kho, KhoError};

/// Entries that fit in one block.
pub fn per_block(entry_size: usize) -> usize {
    (PAGE_SIZE as usize - KHO_BLOCK_HEADER_SIZE) / entry_size.max(1)
}

/// A written chain in the running image.
#[derive(Debug, Default)]
pub struct BlockChain {
    /// Physical address of the first block (0 for an empty chain): what the owner records.
    pub head: u64,
    /// Number of entries in the chain.
    pub count: u64,
    pages: Vec<Folio>,
}

impl BlockChain {
    /// Physical addresses of its blocks.
    pub fn page_addrs(&self) -> Vec<u64> {
        self.pages.iter().map(|f| f.pa()).collect()
    }

    /// RAM the chain occupies (one page per block).
    pub fn bytes(&self) -> u64 {
        self.pages.len() as u64 * PAGE_SIZE
    }
}

impl Kho {
    /// Write `entries` (each exactly `entry_size` bytes) into a new preserved chain. An empty
    /// list gives head 0.
    pub fn preserve_blocks(
        &mut self,
        mm: &mut Mm,
        entry_size: usize,
        entries: &[Vec<u8>],
    ) -> Result<BlockChain, KhoError> {
        let mut chain = BlockChain {
            count: entries.len() as u64,
            ..Default::default()
        };
        let per = per_block(entry_size);
        if per == 0 || entries.iter().any(|e| e.len() != entry_size) {
            return Err(KhoError::Corrupt("block entry size"));
        }
        if entries.len().div_ceil(per) > KHO_MAX_BLOCKS {
            return Err(KhoError::TooLarge(entries.len() as u64));
        }
        let mut next = 0u64;
        for group in entries.chunks(per).rev() {
            let f = match self.alloc_preserve(mm, PAGE_SIZE) {
                Ok(f) => f,
                Err(e) => {
                    self.unpreserve_blocks(mm, chain);
                    return Err(e);
                }
            };
            chain.pages.push(f);
            let mut page = Vec::with_capacity(PAGE_SIZE as usize);
            page.extend_from_slice(&next.to_ne_bytes());
            page.extend_from_slice(&(group.len() as u64).to_ne_bytes());
            for e in group {
                page.extend_from_slice(e);
            }
            mm.ram.write_phys(f.pa(), &page)?;
            next = f.pa();
        }
        chain.head = next;
        Ok(chain)
    }

    /// Undo [`Kho::preserve_blocks`]: unpreserve and free every block of the chain.
    pub fn unpreserve_blocks(&mut self, mm: &mut Mm, chain: BlockChain) {
        for f in chain.pages {
            let _ = self.unpreserve_free(mm, f);
        }
    }

    /// Validate a chain against the incoming tracker and return its block addresses and
    /// entries. Refuses loops, empty or over-full blocks and chains longer than the limit.
    pub fn walk_blocks(
        &self,
        mem: &dyn PhysRead,
        head: u64,
        entry_size: usize,
    ) -> Result<(Vec<u64>, Vec<Vec<u8>>), KhoError> {
        walk_chain(mem, head, entry_size, &|pa| self.is_restorable(pa))
    }

    /// Read a chain in the next image and free its blocks.
    pub fn restore_blocks(
        &mut self,
        mm: &mut Mm,
        head: u64,
        entry_size: usize,
    ) -> Result<Vec<Vec<u8>>, KhoError> {
        let (blocks, entries) = self.walk_blocks(&mm.ram, head, entry_size)?;
        for pa in blocks {
            self.restore_free(mm, pa)?;
        }
        Ok(entries)
    }
}

/// Walk a block chain: its block addresses and entries. `restorable` says whether a block
/// address is preserved memory handed over by the previous image.
pub fn walk_chain(
    mem: &dyn PhysRead,
    head: u64,
    entry_size: usize,
    restorable: &dyn Fn(u64) -> bool,
) -> Result<(Vec<u64>, Vec<Vec<u8>>), KhoError> {
    let per = per_block(entry_size) as u64;
    let mut seen = HashSet::new();
    let (mut blocks, mut entries) = (Vec::new(), Vec::new());
    let mut next = head;
    while next != 0 {
        if blocks.len() >= KHO_MAX_BLOCKS {
            return Err(KhoError::BadHandover(format!(
                "block chain is longer than {KHO_MAX_BLOCKS} blocks"
            )));
        }
        if !seen.insert(next) {
            return Err(KhoError::BadHandover(format!(
                "block chain loops at {next:#x}"
            )));
        }
        if !restorable(next) {
            return Err(KhoError::BadHandover(format!(
                "block {next:#x} is not preserved"
            )));
        }
        let mut page = vec![0u8; PAGE_SIZE as usize];
        mem.read_phys(next, &mut page)?;
        let hdr: KhoBlockHeader = zerocopy::FromBytes::read_from_prefix(&page)
            .map_err(|_| KhoError::Corrupt("block header"))?
            .0;
        if hdr.count == 0 || hdr.count > per {
            return Err(KhoError::BadHandover(format!(
                "block {next:#x} holds {} entries (1..={per} allowed)",
                hdr.count
            )));
        }
        for i in 0..hdr.count as usize {
            let off = KHO_BLOCK_HEADER_SIZE + i * entry_size;
            entries.push(page[off..off + entry_size].to_vec());
        }
        blocks.push(next);
        next = hdr.next;
    }
    Ok((blocks, entries))
}
