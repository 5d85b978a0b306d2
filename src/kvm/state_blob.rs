//! The second allocation of the VM and vCPU handlers: the saved state they write at freeze
//! (an `abi::sections` encoding with its own CRC-32, besides the handover's integrity table),
//! and read back, bounded and checked for preservation, at retrieve.

use crate::abi::errno::{Errno, SysResult};
use crate::kho::Kho;
use crate::luo::LuoCtx;
use crate::mm::{Folio, Mm, PhysRead};

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
