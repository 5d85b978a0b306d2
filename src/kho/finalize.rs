//! The outgoing side at reboot: write `kexec-metadata` and the handover tree into preserved
//! memory. The tracker is already in RAM, so this costs the same for any amount of preserved
//! memory.

use crate::abi::kho::KEXEC_METADATA_NAME;
use crate::mm::{Folio, Mm, PAGE_SIZE};

use super::{fdt, metadata, Kho, KhoBootArgs, KhoError};

/// A finalized handover: the arguments for the next image, and what to undo if the kexec is
/// abandoned.
#[derive(Debug)]
pub struct Handover {
    pub args: KhoBootArgs,
    fdt: Folio,
    meta: Folio,
}

impl Kho {
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
        self.remove_subtree(KEXEC_METADATA_NAME);
        self.add_subtree(KEXEC_METADATA_NAME, meta.pa(), blob.len() as u64)?;
        let built = fdt::build(self.tracker().root(), self.subtrees()).and_then(|b| {
            let f = self.alloc_preserve(mm, b.len() as u64)?;
            mm.ram.write_phys(f.pa(), &b)?;
            Ok((f, b.len() as u64))
        });
        let (fdt, fdt_size) = match built {
            Ok(v) => v,
            Err(e) => {
                self.remove_subtree(KEXEC_METADATA_NAME);
                let _ = self.unpreserve_free(mm, meta);
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
            },
            fdt,
            meta,
        })
    }

    /// Undo [`Kho::finalize`] after a failed kexec; the running image carries on.
    pub fn abandon(&mut self, mm: &mut Mm, h: Handover) {
        self.remove_subtree(KEXEC_METADATA_NAME);
        let _ = self.unpreserve_free(mm, h.fdt);
        let _ = self.unpreserve_free(mm, h.meta);
    }
}
