//! Handover dumps: the metadata of a handover (tree, tracker nodes, client blobs and the pages
//! they point to) copied out of RAM into a file, so `handover inspect` can decode it without
//! the RAM it came from. A dump is a [`PhysRead`]: decoders read it like RAM.
//!
//! Format (native endian): magic `HOVRDUMP`, u32 version, u32 segment count, u64 RAM size,
//! the four [`KhoBootArgs`] u64s, then per segment u64 pa, u64 len, `len` bytes.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use crate::mm::{MmError, PhysRead, PAGE_SIZE};

use super::{KhoBootArgs, KhoError};

const MAGIC: &[u8; 8] = b"HOVRDUMP";
const VERSION: u32 = 1;
const MAX_SEGMENTS: usize = 1 << 22;

/// A collection of physical memory segments.
#[derive(Debug, Default)]
pub struct Dump {
    /// RAM size of the image it was taken from: the physical address space it answers for.
    pub ram_size: u64,
    /// Where the handover tree and scratch are (`None` only for `Dump::default()`; the CRC is
    /// not stored in the file).
    pub args: Option<KhoBootArgs>,
    segs: BTreeMap<u64, Vec<u8>>,
}

impl Dump {
    /// An empty dump of a handover described by `args` in RAM of `ram_size` bytes.
    pub fn new(ram_size: u64, args: KhoBootArgs) -> Self {
        Self {
            ram_size,
            args: Some(args),
            segs: BTreeMap::new(),
        }
    }

    /// Copy `len` bytes at `pa` (rounded out to whole pages) from `mem`.
    pub fn add(&mut self, mem: &dyn PhysRead, pa: u64, len: u64) -> Result<(), KhoError> {
        let start = pa / PAGE_SIZE * PAGE_SIZE;
        let end = (pa + len).div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let mut p = start;
        while p < end {
            if let std::collections::btree_map::Entry::Vacant(e) = self.segs.entry(p) {
                let mut b = vec![0u8; PAGE_SIZE as usize];
                mem.read_phys(p, &mut b)?;
                e.insert(b);
            }
            p += PAGE_SIZE;
        }
        Ok(())
    }

    /// Number of 4 KiB pages it holds.
    pub fn pages(&self) -> usize {
        self.segs.len()
    }

    /// Write the dump file to `path` in the format above.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_ne_bytes());
        out.extend_from_slice(&(self.segs.len() as u32).to_ne_bytes());
        out.extend_from_slice(&self.ram_size.to_ne_bytes());
        let a = self.args.unwrap_or(KhoBootArgs {
            fdt_pa: 0,
            fdt_size: 0,
            scratch_pa: 0,
            scratch_size: 0,
            fdt_crc: None,
        });
        for v in [a.fdt_pa, a.fdt_size, a.scratch_pa, a.scratch_size] {
            out.extend_from_slice(&v.to_ne_bytes());
        }
        for (pa, b) in &self.segs {
            out.extend_from_slice(&pa.to_ne_bytes());
            out.extend_from_slice(&(b.len() as u64).to_ne_bytes());
            out.extend_from_slice(b);
        }
        let mut f = std::fs::File::create(path)?;
        f.write_all(&out)
    }

    /// Parse a dump; never panics on malformed input.
    pub fn parse(b: &[u8]) -> Result<Self, KhoError> {
        let bad = |w: &str| KhoError::BadHandover(format!("dump: {w}"));
        let mut r = Reader { b, pos: 0 };
        if r.take(8).ok_or_else(|| bad("truncated header"))? != MAGIC {
            return Err(bad("not a handover dump (bad magic)"));
        }
        let version = r.u32().ok_or_else(|| bad("truncated header"))?;
        if version != VERSION {
            return Err(bad(&format!(
                "version {version} is not supported (this reads {VERSION})"
            )));
        }
        let n = r.u32().ok_or_else(|| bad("truncated header"))? as usize;
        if n > MAX_SEGMENTS {
            return Err(bad("too many segments"));
        }
        let ram_size = r.u64().ok_or_else(|| bad("truncated header"))?;
        let mut v = [0u64; 4];
        for x in &mut v {
            *x = r.u64().ok_or_else(|| bad("truncated header"))?;
        }
        let mut segs = BTreeMap::new();
        for _ in 0..n {
            let pa = r.u64().ok_or_else(|| bad("truncated segment"))?;
            let len = r.u64().ok_or_else(|| bad("truncated segment"))?;
            if pa % PAGE_SIZE != 0 || len != PAGE_SIZE {
                return Err(bad("segment is not one aligned page"));
            }
            let data = r
                .take(len as usize)
                .ok_or_else(|| bad("truncated segment"))?;
            segs.insert(pa, data.to_vec());
        }
        Ok(Self {
            ram_size,
            args: Some(KhoBootArgs {
                fdt_pa: v[0],
                fdt_size: v[1],
                scratch_pa: v[2],
                scratch_size: v[3],
                fdt_crc: None,
            }),
            segs,
        })
    }
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.pos..self.pos.checked_add(n)?)?;
        self.pos += n;
        Some(s)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_ne_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_ne_bytes(self.take(8)?.try_into().ok()?))
    }
}

impl PhysRead for Dump {
    fn phys_size(&self) -> u64 {
        self.ram_size
    }

    fn read_phys(&self, pa: u64, buf: &mut [u8]) -> Result<(), MmError> {
        let len = buf.len() as u64;
        let oob = MmError::OutOfRam { pa, len };
        if pa.checked_add(len).is_none_or(|e| e > self.ram_size) {
            return Err(oob);
        }
        let mut done = 0usize;
        while done < buf.len() {
            let p = pa + done as u64;
            let page = p / PAGE_SIZE * PAGE_SIZE;
            let seg = self
                .segs
                .get(&page)
                .ok_or(MmError::OutOfRam { pa: p, len: 1 })?;
            let off = (p - page) as usize;
            let n = (PAGE_SIZE as usize - off).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&seg[off..off + n]);
            done += n;
        }
        Ok(())
    }
}
