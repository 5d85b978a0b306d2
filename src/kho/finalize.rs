//! The outgoing side at reboot: write `kexec-metadata`, the integrity table and the handover
//! tree into preserved memory. The tracker is already in RAM, so this costs the same for any
//! amount of preserved memory; the checksums cost one pass over the metadata (not the data).

use zerocopy::IntoBytes;

use crate::abi::kho::{
    IntegrityEntry, IntegrityHeader, INTEGRITY_COMPATIBLE, INTEGRITY_NAME, KEXEC_METADATA_NAME,
};
use crate::mm::{Folio, Mm, PAGE_SIZE};

use super::array::PreservedArray;
use super::{fdt, metadata, Kho, KhoBootArgs, KhoError};

/// A finalized handover: the arguments for the next image, and what to undo if the kexec is
/// abandoned.
#[derive(Debug)]
pub struct Handover {
    /// What to pass to the next image.
    pub args: KhoBootArgs,
    fdt: Folio,
    meta: Folio,
    integrity: Option<(Folio, PreservedArray)>,
}

impl Kho {
    /// CRC-32 of every preserved metadata allocation and tracker node, as a table the next image
    /// checks before it trusts any of them.
    fn write_integrity(&mut self, mm: &mut Mm) -> Result<(Folio, PreservedArray), KhoError> {
        let ranges: Vec<(u64, u64)> = self.meta.iter().map(|(&pa, &len)| (pa, len)).collect();
        let mut entries = Vec::with_capacity(ranges.len() * 24);
        for (pa, len) in ranges {
            let crc = mm.ram.crc32(pa, len)?;
            entries.extend_from_slice(
                IntegrityEntry {
                    pa,
                    len,
                    crc,
                    _pad: 0,
                }
                .as_bytes(),
            );
        }
        let nr_entries = (entries.len() / 24) as u64;
        let arr = self.preserve_array(mm, &entries)?;
        let mut compatible = [0u8; 24];
        compatible[..INTEGRITY_COMPATIBLE.len()].copy_from_slice(INTEGRITY_COMPATIBLE.as_bytes());
        let hdr = IntegrityHeader {
            compatible,
            nr_entries,
            entries: arr.ser,
            entries_crc: crc32fast::hash(&entries),
            _pad: 0,
        };
        let f = match self.alloc_preserve(mm, std::mem::size_of::<IntegrityHeader>() as u64) {
            Ok(f) => f,
            Err(e) => {
                self.unpreserve_array(mm, arr);
                return Err(e);
            }
        };
        mm.ram.write_phys(f.pa(), hdr.as_bytes())?;
        self.label(f.pa(), "integrity");
        for pa in arr.page_addrs() {
            self.label(pa, "integrity-entries");
        }
        self.remove_subtree(INTEGRITY_NAME);
        self.add_subtree(
            INTEGRITY_NAME,
            f.pa(),
            std::mem::size_of::<IntegrityHeader>() as u64,
        )?;
        Ok((f, arr))
    }

    /// CRC-32 over the tracker's node pages in address order.
    fn tracker_crc(&self, mm: &Mm) -> Result<u32, KhoError> {
        let mut nodes: Vec<u64> = self
            .tracker()
            .node_folios()
            .iter()
            .map(|f| f.pa())
            .collect();
        nodes.sort_unstable();
        let mut h = crc32fast::Hasher::new();
        let mut page = vec![0u8; PAGE_SIZE as usize];
        for pa in nodes {
            crate::mm::PhysRead::read_phys(&mm.ram, pa, &mut page)?;
            h.update(&page);
        }
        Ok(h.finalize())
    }

    /// Write the outgoing handover: `kexec-metadata` (`release`, `kexec_count` and this
    /// executable's path), the integrity table, then the handover tree with the checksums. All
    /// or nothing: on error everything written is unpreserved again.
    pub fn finalize(
        &mut self,
        mm: &mut Mm,
        release: &str,
        kexec_count: u32,
    ) -> Result<Handover, KhoError> {
        if crate::fault::hit("kho.finalize") {
            return Err(KhoError::BadHandover(
                "injected fault at kho.finalize".into(),
            ));
        }
        let image = std::env::current_exe()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let blob = metadata::encode(release, kexec_count, &image);
        let meta = self.alloc_preserve(mm, blob.len() as u64)?;
        mm.ram.write_phys(meta.pa(), &blob)?;
        self.label(meta.pa(), "kexec-metadata");
        self.remove_subtree(KEXEC_METADATA_NAME);
        self.add_subtree(KEXEC_METADATA_NAME, meta.pa(), blob.len() as u64)?;
        let integrity = match self.write_integrity(mm) {
            Ok(v) => v,
            Err(e) => {
                self.remove_subtree(KEXEC_METADATA_NAME);
                let _ = self.unpreserve_free(mm, meta);
                return Err(e);
            }
        };
        let built = (|| {
            // Allocate the tree first (its size does not depend on the checksums): after this
            // the tracker no longer changes, so its checksum can be taken.
            let mut subtrees = self.subtrees().clone();
            for s in subtrees.values_mut() {
                s.crc = Some(0);
            }
            let size = fdt::build(self.tracker().root(), 0, &subtrees)?.len() as u64;
            let f = self.alloc_preserve(mm, size)?;
            self.label(f.pa(), "fdt");
            for s in subtrees.values_mut() {
                s.crc = Some(mm.ram.crc32(s.pa, s.size)?);
            }
            let tracker_crc = self.tracker_crc(mm)?;
            let b = fdt::build(self.tracker().root(), tracker_crc, &subtrees)?;
            mm.ram.write_phys(f.pa(), &b)?;
            Ok::<_, KhoError>((f, b.len() as u64, crc32fast::hash(&b)))
        })();
        let (fdt, fdt_size, fdt_crc) = match built {
            Ok(v) => v,
            Err(e) => {
                self.remove_subtree(KEXEC_METADATA_NAME);
                self.remove_subtree(INTEGRITY_NAME);
                let _ = self.unpreserve_free(mm, meta);
                let _ = self.unpreserve_free(mm, integrity.0);
                self.unpreserve_array(mm, integrity.1);
                return Err(e);
            }
        };
        let s = self.scratch();
        Ok(Handover {
            args: KhoBootArgs {
                fdt_pa: fdt.pa(),
                fdt_size,
                scratch_pa: s.start * PAGE_SIZE,
                scratch_size: (s.end - s.start) * PAGE_SIZE,
                fdt_crc: Some(fdt_crc),
            },
            fdt,
            meta,
            integrity: Some(integrity),
        })
    }

    /// Undo [`Kho::finalize`] after a failed kexec; the running image carries on.
    pub fn abandon(&mut self, mm: &mut Mm, h: Handover) {
        self.remove_subtree(KEXEC_METADATA_NAME);
        self.remove_subtree(INTEGRITY_NAME);
        let _ = self.unpreserve_free(mm, h.fdt);
        let _ = self.unpreserve_free(mm, h.meta);
        if let Some((f, arr)) = h.integrity {
            let _ = self.unpreserve_free(mm, f);
            self.unpreserve_array(mm, arr);
        }
    }
}
