//! The two allocations of the VM (v2) and vCPU handlers: a blob written at preserve, and the
//! saved state written at freeze (an `abi::sections` encoding with its own CRC-32, besides the
//! handover's integrity table), read back, bounded and checked for preservation, at retrieve.
//! [`Kept`] is what such a handler keeps between its calls.

use crate::abi::errno::{Errno, SysResult};
use crate::kho::Kho;
use crate::luo::LuoCtx;
use crate::mm::{Folio, Mm, PhysRead};

/// The [`Kept`] a handler left in its file's private data, if it is there.
pub fn kept(a: &mut crate::luo::FileArgs) -> Option<&mut Kept> {
    a.private.as_mut().and_then(|p| p.downcast_mut::<Kept>())
}

/// A handler's allocations between preserve and the kexec: its blob (`header` as written at
/// preserve, which unfreeze writes back) and, once frozen, its state.
pub struct Kept {
    blob: Folio,
    header: Vec<u8>,
    state: Option<Folio>,
}

impl Kept {
    /// Preserve a one-page blob holding `header`, labelled `label`.
    pub fn preserve(
        kho: &mut Kho,
        mm: &mut Mm,
        header: &[u8],
        label: &'static str,
    ) -> SysResult<Kept> {
        let blob = write(kho, mm, header, label)?;
        Ok(Kept {
            blob,
            header: header.to_vec(),
            state: None,
        })
    }

    /// Physical address of the blob (the handler's `serialized`).
    pub fn pa(&self) -> u64 {
        self.blob.pa()
    }

    /// At freeze: preserve `state` (labelled `label`), then make the blob `header(state_pa,
    /// state_len)`. On error nothing is left preserved.
    pub fn freeze(
        &mut self,
        kho: &mut Kho,
        mm: &mut Mm,
        state: &[u8],
        label: &'static str,
        header: impl FnOnce(u64, u64) -> Vec<u8>,
    ) -> SysResult<()> {
        let f = write(kho, mm, state, label)?;
        if let Err(e) = mm
            .ram
            .write_phys(self.blob.pa(), &header(f.pa(), state.len() as u64))
        {
            let _ = kho.unpreserve_free(mm, f);
            return Err(e.into());
        }
        self.state = Some(f);
        Ok(())
    }

    /// Undo [`Kept::freeze`]: the state goes, the blob is as preserve wrote it.
    pub fn unfreeze(&mut self, kho: &mut Kho, mm: &mut Mm) {
        if let Some(s) = self.state.take() {
            let _ = kho.unpreserve_free(mm, s);
        }
        let _ = mm.ram.write_phys(self.blob.pa(), &self.header);
    }

    /// Undo [`Kept::preserve`] (and a freeze).
    pub fn unpreserve(self, kho: &mut Kho, mm: &mut Mm) {
        if let Some(s) = self.state {
            let _ = kho.unpreserve_free(mm, s);
        }
        let _ = kho.unpreserve_free(mm, self.blob);
    }
}

/// Preserve `bytes` in a new allocation labelled `label` (for `HANDOVER_CORRUPT=flip:LABEL`
/// and `inspect`); its folio.
pub fn write(kho: &mut Kho, mm: &mut Mm, bytes: &[u8], label: &'static str) -> SysResult<Folio> {
    let f = kho.alloc_preserve(mm, bytes.len() as u64)?;
    if let Err(e) = mm.ram.write_phys(f.pa(), bytes) {
        let _ = kho.unpreserve_free(mm, f);
        return Err(e.into());
    }
    kho.label(f.pa(), label);
    Ok(f)
}

/// The `len` bytes at `pa` of the handover: `EINVAL` unless `len` is 1..=`max` and `pa` is
/// memory the previous image preserved.
pub fn read<C: LuoCtx + ?Sized>(host: &C, pa: u64, len: u64, max: u64) -> SysResult<Vec<u8>> {
    if len == 0 || len > max || !host.kho().is_restorable(pa) {
        return Err(Errno::EINVAL);
    }
    let mut bytes = vec![0u8; len as usize];
    host.mm()
        .ram
        .read_phys(pa, &mut bytes)
        .map_err(|_| Errno::EINVAL)?;
    Ok(bytes)
}

/// At finish of a file never retrieved: give back its state allocation at `pa` (if it is one
/// the previous image preserved) and its blob at `serialized`.
pub fn release_unretrieved<C: LuoCtx + ?Sized>(host: &mut C, pa: Option<u64>, serialized: u64) {
    let (kho, mm) = host.kho_mm();
    if let Some(pa) = pa.filter(|&pa| kho.is_restorable(pa)) {
        let _ = kho.restore_free(mm, pa);
    }
    let _ = kho.restore_free(mm, serialized);
}
