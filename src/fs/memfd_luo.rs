//! The memfd LUO handler, upstream's "memfd-v2": preserve freezes the size (no grow, shrink or
//! hole punching while preserved), fills holes, and records position, size, seals and every
//! folio; freeze refreshes the position; retrieve rebuilds the file with its seals; finish
//! discards the folios of a file never retrieved.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::abi::errno::{Errno, SysResult};
use crate::abi::kho::KhoArraySer;
use crate::fs::memfd::{ALL_SEALS, MAX_SIZE};
use crate::fs::{FileId, Memfd};
use crate::kho::array::PreservedArray;
use crate::luo::{FileArgs, FileHandler, LuoCtx};
use crate::mm::{Folio, Mm, PhysRead, PAGE_SIZE};

/// The handler's compatible string, upstream's `MEMFD_LUO_FH_COMPATIBLE` for v2.
pub const COMPATIBLE: &str = "memfd-v2";
/// `MEMFD_LUO_FOLIO_DIRTY`: folio flag in a [`FolioSer`] entry (set on every folio preserved).
pub const FOLIO_DIRTY: u64 = 1 << 0;
/// `MEMFD_LUO_FOLIO_UPTODATE`: folio flag in a [`FolioSer`] entry (set on every folio preserved).
pub const FOLIO_UPTODATE: u64 = 1 << 1;

/// `struct memfd_luo_ser` (v2), 48 bytes.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct MemfdLuoSer {
    /// File position at preserve, refreshed by freeze; the retrieved file starts there.
    pub pos: u64,
    /// File size in bytes.
    pub size: u64,
    /// The `F_SEAL_*` bits, restored as they were.
    pub seals: u32,
    /// Must be 0; anything else makes the blob unrestorable (EOPNOTSUPP).
    pub flags: u32,
    /// Number of entries in `folios` (every page of the file: preserve fills holes).
    pub nr_folios: u64,
    /// KHO array of [`FolioSer`] entries, 16 bytes each.
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

/// The LUO file handler for memfds ([`COMPATIBLE`]); listed in
/// [`crate::registry::file_handlers`].
pub struct MemfdHandler;

/// What the memfd handler needs of its context besides [`LuoCtx`]: the memfds of the file
/// table, their file position, and the mappings of their pages.
pub trait MemfdLuoCtx: LuoCtx {
    /// The memfd `file`, if it is one.
    fn memfd(&self, file: FileId) -> Option<&Memfd>;
    /// The memfd `file`, if it is one, with the memory it allocates from.
    fn memfd_mm(&mut self, file: FileId) -> Option<(&mut Memfd, &mut Mm)>;
    /// The file position of `file`.
    fn file_pos(&self, file: FileId) -> Option<u64>;
    /// Install a memfd at file position `pos`: a new file with one reference.
    fn install_memfd(&mut self, m: Memfd, pos: u64) -> FileId;
    /// Map pages `indexes` of `file`, just filled, into every mapping of the file.
    fn map_file_pages(&mut self, file: FileId, indexes: &[u64]);
}

fn memfd<C: MemfdLuoCtx + ?Sized>(host: &mut C, f: Option<FileId>) -> SysResult<&mut Memfd> {
    match f.and_then(|f| host.memfd_mm(f)) {
        Some((m, _)) => Ok(m),
        None => Err(Errno::EINVAL),
    }
}

/// Read and check a handed-over `memfd_luo_ser`.
fn read_ser<C: LuoCtx + ?Sized>(host: &C, pa: u64) -> SysResult<MemfdLuoSer> {
    if !host.kho().is_restorable(pa) {
        return Err(Errno::EINVAL);
    }
    let mut b = [0u8; 48];
    host.mm().ram.read_phys(pa, &mut b)?;
    let s = MemfdLuoSer::read_from_bytes(&b).map_err(|_| Errno::EINVAL)?;
    if s.flags != 0 || s.seals & !ALL_SEALS != 0 {
        return Err(Errno::EOPNOTSUPP);
    }
    if s.size > MAX_SIZE || s.nr_folios > s.size.div_ceil(PAGE_SIZE) {
        return Err(Errno::EINVAL);
    }
    Ok(s)
}

fn undo<C: MemfdLuoCtx + ?Sized>(host: &mut C, file: Option<FileId>, folios: &[Folio]) {
    let (kho, mm) = host.kho_mm();
    for f in folios {
        let _ = kho.unpreserve_folio(mm, *f);
    }
    if let Ok(m) = memfd(host, file) {
        m.frozen = false;
    }
}

impl<C: MemfdLuoCtx + ?Sized> FileHandler<C> for MemfdHandler {
    fn compatible(&self) -> &'static str {
        COMPATIBLE
    }

    fn can_preserve(&self, host: &C, file: FileId) -> bool {
        host.memfd(file).is_some_and(|m| !m.hugetlb)
    }

    fn preserve(&self, host: &mut C, a: &mut FileArgs) -> SysResult<()> {
        let file = a.file;
        let pos = file.and_then(|f| host.file_pos(f)).unwrap_or(0);
        let (size, seals, new) = {
            let (m, mm) = match file.and_then(|f| host.memfd_mm(f)) {
                Some(x) => x,
                None => return Err(Errno::EINVAL),
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
            let (kho, mm) = host.kho_mm();
            if let Err(e) = kho.preserve_folio(mm, f) {
                undo(host, file, &folios);
                return Err(e.into());
            }
            folios.push(f);
            list.extend_from_slice(
                FolioSer::new(pfn, FOLIO_DIRTY | FOLIO_UPTODATE, idx).as_bytes(),
            );
        }
        let (kho, mm) = host.kho_mm();
        let arr = match kho.preserve_array(mm, &list) {
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
        let (kho, mm) = host.kho_mm();
        let sf = match kho.alloc_preserve(mm, 48) {
            Ok(f) => f,
            Err(e) => {
                kho.unpreserve_array(mm, arr);
                undo(host, file, &folios);
                return Err(e.into());
            }
        };
        mm.ram.write_phys(sf.pa(), ser.as_bytes())?;
        kho.label(sf.pa(), "memfd");
        for pa in arr.page_addrs() {
            kho.label(pa, "memfd-folios");
        }
        a.serialized = sf.pa();
        a.private = Some(Box::new(Preserved {
            ser: sf,
            arr,
            folios,
        }));
        Ok(())
    }

    fn unpreserve(&self, host: &mut C, a: &mut FileArgs) {
        let Some(p) = a
            .private
            .take()
            .and_then(|p| p.downcast::<Preserved>().ok())
        else {
            return;
        };
        let (kho, mm) = host.kho_mm();
        let _ = kho.unpreserve_free(mm, p.ser);
        kho.unpreserve_array(mm, p.arr);
        undo(host, a.file, &p.folios);
    }

    fn freeze(&self, host: &mut C, a: &mut FileArgs) -> SysResult<()> {
        let pos = a.file.and_then(|f| host.file_pos(f)).unwrap_or(0);
        host.mm_mut().ram.write_u64(a.serialized, pos)?;
        Ok(())
    }

    fn retrieve(&self, host: &mut C, a: &mut FileArgs) -> SysResult<()> {
        let ser = read_ser(host, a.serialized)?;
        let (kho, mm) = host.kho_mm();
        let list = kho.restore_array(mm, &ser.folios).map_err(|_| Errno::EIO)?;
        kho.restore_free(mm, a.serialized).map_err(|_| Errno::EIO)?;
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
            match kho.restore_folio(fs.pfn() * PAGE_SIZE) {
                Ok(f) if f.order == 0 && m.pages.insert(fs.index, f.pfn) => {}
                Ok(f) => {
                    let _ = mm.free(f);
                    bad.get_or_insert(Errno::EINVAL);
                }
                Err(_) => {
                    bad.get_or_insert(Errno::EIO);
                }
            }
        }
        if let Some(e) = bad {
            let _ = m.pages.release(mm);
            return Err(e);
        }
        a.file = Some(host.install_memfd(m, ser.pos));
        Ok(())
    }

    fn finish(&self, host: &mut C, a: &mut FileArgs) {
        if a.retrieve_status != 0 {
            return;
        }
        let Ok(ser) = read_ser(host, a.serialized) else {
            return;
        };
        let (kho, mm) = host.kho_mm();
        if let Ok(list) = kho.restore_array(mm, &ser.folios) {
            let mut folios: Vec<Folio> = list
                .chunks_exact(16)
                .take(ser.nr_folios as usize)
                .filter_map(|e| FolioSer::read_from_bytes(e).ok())
                .filter_map(|fs| kho.restore_folio(fs.pfn() * PAGE_SIZE).ok())
                .collect();
            let _ = mm.free_many(&mut folios);
        }
        let _ = kho.restore_free(mm, a.serialized);
    }
}
