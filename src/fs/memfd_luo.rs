//! The memfd LUO handler, upstream's "memfd-v2": preserve freezes the size (no grow, shrink or
//! hole punching while preserved), fills holes, and records position, size, seals and every
//! folio; freeze refreshes the position; retrieve rebuilds the file with its seals; finish
//! discards the folios of a file never retrieved.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::abi::errno::{Errno, SysResult};
use crate::abi::kho::KhoArraySer;
use crate::fs::memfd::{ALL_SEALS, MAX_SIZE};
use crate::fs::{FileId, Memfd};
use crate::host::files::FileKind;
use crate::host::Host;
use crate::kho::array::PreservedArray;
use crate::luo::{FileArgs, FileHandler};
use crate::mm::{Folio, PhysRead, PAGE_SIZE};

pub const COMPATIBLE: &str = "memfd-v2";
pub const FOLIO_DIRTY: u64 = 1 << 0;
pub const FOLIO_UPTODATE: u64 = 1 << 1;

/// `struct memfd_luo_ser` (v2), 48 bytes.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct MemfdLuoSer {
    pub pos: u64,
    pub size: u64,
    pub seals: u32,
    pub flags: u32,
    pub nr_folios: u64,
    pub folios: KhoArraySer,
}

/// `struct memfd_luo_folio_ser`: the same layout as guest_memfd's folio entry (pfn in bits
/// 0..52, flags above, then the index), so one type serves both.
pub use crate::abi::kvm::GuestMemfdFolioSer as FolioSer;

struct Preserved {
    ser: Folio,
    arr: PreservedArray,
    folios: Vec<Folio>,
}

pub struct MemfdHandler;

fn memfd(host: &mut Host, f: Option<FileId>) -> SysResult<&mut Memfd> {
    match f.and_then(|f| host.files.kind_mut(f)) {
        Some(FileKind::Memfd(m)) => Ok(m),
        _ => Err(Errno::EINVAL),
    }
}

/// Read and check a handed-over `memfd_luo_ser`.
fn read_ser(host: &Host, pa: u64) -> SysResult<MemfdLuoSer> {
    if !host.kho.is_restorable(pa) {
        return Err(Errno::EINVAL);
    }
    let mut b = [0u8; 48];
    host.mm.ram.read_phys(pa, &mut b)?;
    let s = MemfdLuoSer::read_from_bytes(&b).map_err(|_| Errno::EINVAL)?;
    if s.flags != 0 || s.seals & !ALL_SEALS != 0 {
        return Err(Errno::EOPNOTSUPP);
    }
    if s.size > MAX_SIZE || s.nr_folios > s.size.div_ceil(PAGE_SIZE) {
        return Err(Errno::EINVAL);
    }
    Ok(s)
}

fn undo(host: &mut Host, file: Option<FileId>, folios: &[Folio]) {
    for f in folios {
        let _ = host.kho.unpreserve_folio(&mut host.mm, *f);
    }
    if let Ok(m) = memfd(host, file) {
        m.frozen = false;
    }
}

impl FileHandler<Host> for MemfdHandler {
    fn compatible(&self) -> &'static str {
        COMPATIBLE
    }

    fn can_preserve(&self, host: &Host, file: FileId) -> bool {
        matches!(host.files.kind(file), Some(FileKind::Memfd(m)) if !m.hugetlb)
    }

    fn preserve(&self, host: &mut Host, a: &mut FileArgs) -> SysResult<()> {
        let file = a.file;
        let pos = file.and_then(|f| host.files.get(f)).map_or(0, |f| f.pos);
        let (size, seals, new) = {
            let Host { mm, files, .. } = host;
            let m = match file.and_then(|f| files.kind_mut(f)) {
                Some(FileKind::Memfd(m)) => m,
                _ => return Err(Errno::EINVAL),
            };
            if m.size.div_ceil(PAGE_SIZE) > u32::MAX as u64 {
                return Err(Errno::EFBIG);
            }
            m.frozen = true;
            // Fill holes: every page of the file is preserved.
            let mut new = Vec::new();
            for idx in 0..m.size.div_ceil(PAGE_SIZE) {
                if m.pages.get(idx).is_none() {
                    if let Err(e) = m.pages.fault_in(mm, idx) {
                        m.frozen = false;
                        return Err(e.into());
                    }
                    new.push(idx);
                }
            }
            (m.size, m.seals, new)
        };
        if let Some(f) = file {
            host.map_file_pages(f, &new);
        }
        let pages: Vec<(u64, u64)> = memfd(host, file)?.pages.iter().collect();
        let mut folios = Vec::with_capacity(pages.len());
        let mut list = Vec::with_capacity(pages.len() * 16);
        for &(idx, pfn) in &pages {
            let f = Folio { pfn, order: 0 };
            if let Err(e) = host.kho.preserve_folio(&mut host.mm, f) {
                undo(host, file, &folios);
                return Err(e.into());
            }
            folios.push(f);
            list.extend_from_slice(
                FolioSer::new(pfn, FOLIO_DIRTY | FOLIO_UPTODATE, idx).as_bytes(),
            );
        }
        let arr = match host.kho.preserve_array(&mut host.mm, &list) {
            Ok(a) => a,
            Err(e) => {
                undo(host, file, &folios);
                return Err(e.into());
            }
        };
        let ser = MemfdLuoSer {
            pos,
            size,
            seals,
            flags: 0,
            nr_folios: folios.len() as u64,
            folios: arr.ser,
        };
        let sf = match host.kho.alloc_preserve(&mut host.mm, 48) {
            Ok(f) => f,
            Err(e) => {
                host.kho.unpreserve_array(&mut host.mm, arr);
                undo(host, file, &folios);
                return Err(e.into());
            }
        };
        host.mm.ram.write_phys(sf.pa(), ser.as_bytes())?;
        host.kho.label(sf.pa(), "memfd");
        for pa in arr.page_addrs() {
            host.kho.label(pa, "memfd-folios");
        }
        a.serialized = sf.pa();
        a.private = Some(Box::new(Preserved {
            ser: sf,
            arr,
            folios,
        }));
        Ok(())
    }

    fn unpreserve(&self, host: &mut Host, a: &mut FileArgs) {
        let Some(p) = a
            .private
            .take()
            .and_then(|p| p.downcast::<Preserved>().ok())
        else {
            return;
        };
        let _ = host.kho.unpreserve_free(&mut host.mm, p.ser);
        host.kho.unpreserve_array(&mut host.mm, p.arr);
        undo(host, a.file, &p.folios);
    }

    fn freeze(&self, host: &mut Host, a: &mut FileArgs) -> SysResult<()> {
        let pos = a.file.and_then(|f| host.files.get(f)).map_or(0, |f| f.pos);
        host.mm.ram.write_u64(a.serialized, pos)?;
        Ok(())
    }

    fn retrieve(&self, host: &mut Host, a: &mut FileArgs) -> SysResult<()> {
        let ser = read_ser(host, a.serialized)?;
        let list = host
            .kho
            .restore_array(&mut host.mm, &ser.folios)
            .map_err(|_| Errno::EIO)?;
        host.kho
            .restore_free(&mut host.mm, a.serialized)
            .map_err(|_| Errno::EIO)?;
        let mut m = Memfd::new("", crate::fs::memfd::MFD_ALLOW_SEALING);
        m.pages = crate::mm::PageCache::with_pages(ser.size.div_ceil(PAGE_SIZE));
        m.size = ser.size;
        m.seals = ser.seals;
        let mut bad = None;
        for e in list.chunks_exact(16).take(ser.nr_folios as usize) {
            let Ok(fs) = FolioSer::read_from_bytes(e) else {
                continue;
            };
            if fs.pfn() == 0 {
                continue;
            }
            match host.kho.restore_folio(fs.pfn() * PAGE_SIZE) {
                Ok(f) if f.order == 0 && m.pages.insert(fs.index, f.pfn) => {}
                Ok(f) => {
                    let _ = host.mm.free(f);
                    bad.get_or_insert(Errno::EINVAL);
                }
                Err(_) => {
                    bad.get_or_insert(Errno::EIO);
                }
            }
        }
        if let Some(e) = bad {
            let _ = m.pages.release(&mut host.mm);
            return Err(e);
        }
        let file = host.files.install(FileKind::Memfd(m));
        if let Some(f) = host.files.get_mut(file) {
            f.pos = ser.pos;
        }
        a.file = Some(file);
        Ok(())
    }

    fn finish(&self, host: &mut Host, a: &mut FileArgs) {
        if a.retrieve_status != 0 {
            return;
        }
        let Ok(ser) = read_ser(host, a.serialized) else {
            return;
        };
        if let Ok(list) = host.kho.restore_array(&mut host.mm, &ser.folios) {
            let mut folios: Vec<Folio> = list
                .chunks_exact(16)
                .take(ser.nr_folios as usize)
                .filter_map(|e| FolioSer::read_from_bytes(e).ok())
                .filter_map(|fs| host.kho.restore_folio(fs.pfn() * PAGE_SIZE).ok())
                .collect();
            let _ = host.mm.free_many(&mut folios);
        }
        let _ = host.kho.restore_free(&mut host.mm, a.serialized);
    }
}
