//! The RFC's guest_memfd handler, for fully shared, PAGE_SIZE guest_memfds, in two formats:
//!
//! * "guest_memfd_luo_v1" — the RFC's: one `{pfn, index, flags}` entry per present folio, each
//!   folio preserved on its own;
//! * "guest_memfd_luo_v2" — ours: one `{index, pfn, pages}` entry per run of consecutive
//!   indexes backed by consecutive frames, each run preserved as a page range; the default,
//!   since its cost (preserve, handover, retrieve) grows with the number of runs, not pages.
//!
//! Both: preserve freezes the file first, then records size, flags and what is present (holes
//! stay holes); freeze finds the owning VM's token in the same session (or refuses the kexec);
//! retrieve finds the VM through the cross-file API, so the retrieval order is free; finish
//! discards a never-retrieved file's memory.

use zerocopy::{FromBytes, IntoBytes};

use crate::abi::errno::{Errno, SysResult};
use crate::abi::kvm::*;
use crate::fs::FileId;
use crate::kho::array::PreservedArray;
use crate::luo::{FileArgs, FileHandler};
use crate::mm::{Folio, PhysRead, PAGE_SIZE};

use super::guest_memfd::{GuestMemfd, MAX_SIZE};
use super::vm_luo::VmLuoCtx;

/// The blob format of a [`GuestMemfdHandler`]; one handler is registered per format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `guest_memfd_luo_v1` (the RFC's): one entry per present folio.
    V1,
    /// `guest_memfd_luo_v2` (ours, the default): one entry per run of consecutive pages.
    V2,
}

/// The LUO file handler for guest_memfds, in one [`Format`]; both are listed in
/// [`crate::registry::file_handlers`].
pub struct GuestMemfdHandler {
    /// Which blob this handler writes and reads (its compatible string follows from it).
    pub format: Format,
}

/// What the guest_memfd handler needs of its context besides [`VmLuoCtx`]: the guest_memfds
/// of the file table, a new one on retrieve, and the command line's choice of format.
pub trait GuestMemfdLuoCtx: VmLuoCtx {
    /// The guest_memfd `file`, if it is one.
    fn guest_memfd(&self, file: FileId) -> Option<&GuestMemfd>;
    /// The guest_memfd `file`, if it is one, to change (preserve sets and clears its freeze).
    fn guest_memfd_mut(&mut self, file: FileId) -> Option<&mut GuestMemfd>;
    /// `KVM_CREATE_GUEST_MEMFD` on the VM file `vm`.
    fn create_guest_memfd(&mut self, vm: FileId, size: u64, flags: u64) -> SysResult<FileId>;
    /// A huge folio a retrieved HugeTLB file holds: the pool counts it as its own, in use.
    fn adopt_huge_folio(&mut self, folio: Folio) -> SysResult<()>;
    /// The same with a folio order (`GUEST_MEMFD_FLAG_HUGETLB`'s `page_order`).
    fn create_guest_memfd_order(
        &mut self,
        vm: FileId,
        size: u64,
        flags: u64,
        page_order: u32,
    ) -> SysResult<FileId>;
    /// `--gmem-luo v1`: new preservations use the v1 format.
    fn gmem_luo_v1(&self) -> bool;
}

/// What a preserved file holds on to, to undo the preservation.
enum Preserved {
    V1 {
        ser: Folio,
        arr: PreservedArray,
        folios: Vec<Folio>,
    },
    V2 {
        ser: Folio,
        arr: PreservedArray,
        runs: Vec<(u64, u64)>,
    },
}

/// Internal guest_memfd flags to the ABI's (deliberately separate bit spaces upstream).
pub(super) fn to_abi(flags: u64) -> u64 {
    let mut f = 0;
    if flags & GUEST_MEMFD_FLAG_MMAP != 0 {
        f |= GUEST_MEMFD_LUO_FLAG_MMAP;
    }
    if flags & GUEST_MEMFD_FLAG_INIT_SHARED != 0 {
        f |= GUEST_MEMFD_LUO_FLAG_INIT_SHARED;
    }
    f
}

pub(super) fn from_abi(flags: u64) -> u64 {
    let mut f = 0;
    if flags & GUEST_MEMFD_LUO_FLAG_MMAP != 0 {
        f |= GUEST_MEMFD_FLAG_MMAP;
    }
    if flags & GUEST_MEMFD_LUO_FLAG_INIT_SHARED != 0 {
        f |= GUEST_MEMFD_FLAG_INIT_SHARED;
    }
    f
}

pub(super) fn set_frozen<C: GuestMemfdLuoCtx + ?Sized>(
    host: &mut C,
    file: Option<FileId>,
    frozen: bool,
) {
    if let Some(g) = file.and_then(|f| host.guest_memfd_mut(f)) {
        g.frozen = frozen;
    }
}

/// The common header of both blob versions, validated.
#[derive(Debug, Clone, Copy)]
pub struct Header {
    /// File size in bytes.
    pub size: u64,
    /// `GUEST_MEMFD_LUO_FLAG_*` bits of the blob (not the `GUEST_MEMFD_FLAG_*` ones).
    pub flags: u64,
    /// Present pages in the file.
    pub nr_folios: u64,
    /// LUO token of the owning VM file in the same session, as `freeze` wrote it.
    pub vm_token: u64,
    /// KHO array of the entries: folios (v1, 16 bytes each) or runs (v2, 24 bytes each).
    pub list: crate::abi::kho::KhoArraySer,
    /// v2: number of runs.
    pub nr_runs: u64,
}

/// Read and validate a handed-over blob of `format`.
pub fn read_header(mem: &dyn PhysRead, pa: u64, format: Format) -> SysResult<Header> {
    let mut b = [0u8; 56];
    let n = if format == Format::V1 { 48 } else { 56 };
    mem.read_phys(pa, &mut b[..n])?;
    let h = match format {
        Format::V1 => {
            let s = GuestMemfdLuoSer::read_from_bytes(&b[..48]).map_err(|_| Errno::EINVAL)?;
            Header {
                size: s.size,
                flags: s.flags,
                nr_folios: s.nr_folios,
                vm_token: s.vm_token,
                list: s.folios,
                nr_runs: s.nr_folios,
            }
        }
        Format::V2 => {
            let s = GuestMemfdLuoSerV2::read_from_bytes(&b).map_err(|_| Errno::EINVAL)?;
            Header {
                size: s.size,
                flags: s.flags,
                nr_folios: s.nr_folios,
                vm_token: s.vm_token,
                list: s.runs,
                nr_runs: s.nr_runs,
            }
        }
    };
    if h.size == 0
        || h.size % PAGE_SIZE != 0
        || h.size > MAX_SIZE
        || h.nr_folios > h.size / PAGE_SIZE
        || h.nr_runs > h.nr_folios
    {
        return Err(Errno::EINVAL);
    }
    if h.flags & !GUEST_MEMFD_LUO_SUPPORTED_FLAGS != 0 {
        return Err(Errno::EOPNOTSUPP);
    }
    Ok(h)
}

/// The runs `(index, pfn, pages)` a restored list describes, whatever the format.
fn decode_runs(list: &[u8], h: &Header, format: Format) -> SysResult<Vec<(u64, u64, u64)>> {
    let (size, n) = match format {
        Format::V1 => (16, h.nr_folios),
        Format::V2 => (24, h.nr_runs),
    };
    let n = usize::try_from(n).map_err(|_| Errno::EINVAL)?;
    if list.len() < n.saturating_mul(size) {
        return Err(Errno::EINVAL);
    }
    let mut out = Vec::with_capacity(n);
    let mut total = 0u64;
    for e in list.chunks_exact(size).take(n) {
        let r = match format {
            Format::V1 => {
                let f = GuestMemfdFolioSer::read_from_bytes(e).map_err(|_| Errno::EINVAL)?;
                (f.index, f.pfn(), 1)
            }
            Format::V2 => {
                let f = GuestMemfdRunSer::read_from_bytes(e).map_err(|_| Errno::EINVAL)?;
                (f.index, f.pfn_flags & ((1 << 52) - 1), f.nr_pages)
            }
        };
        if r.2 == 0
            || r.0
                .checked_add(r.2)
                .is_none_or(|end| end > h.size / PAGE_SIZE)
        {
            return Err(Errno::EINVAL);
        }
        total += r.2;
        out.push(r);
    }
    if total != h.nr_folios {
        return Err(Errno::EINVAL);
    }
    Ok(out)
}

impl GuestMemfdHandler {
    fn undo<C: GuestMemfdLuoCtx + ?Sized>(
        &self,
        host: &mut C,
        file: Option<FileId>,
        p: Option<&Preserved>,
    ) {
        match p {
            Some(Preserved::V1 { folios, .. }) => {
                let (kho, mm) = host.kho_mm();
                for f in folios {
                    let _ = kho.unpreserve_folio(mm, *f);
                }
            }
            Some(Preserved::V2 { runs, .. }) => {
                let (kho, mm) = host.kho_mm();
                for &(pfn, n) in runs {
                    let _ = kho.unpreserve_pages(mm, pfn, n);
                }
            }
            None => {}
        }
        set_frozen(host, file, false);
    }

    /// Preserve the memory and build the list; on error, everything preserved here is undone.
    fn preserve_memory<C: GuestMemfdLuoCtx + ?Sized>(
        &self,
        host: &mut C,
        runs: &[(u64, u64, u64)],
    ) -> SysResult<(Vec<u8>, Preserved)> {
        let mut list = Vec::new();
        match self.format {
            Format::V1 => {
                let mut folios = Vec::new();
                for &(idx, pfn, n) in runs {
                    for k in 0..n {
                        let f = Folio {
                            pfn: pfn + k,
                            order: 0,
                        };
                        let (kho, mm) = host.kho_mm();
                        if let Err(e) = kho.preserve_folio(mm, f) {
                            self.undo(
                                host,
                                None,
                                Some(&Preserved::V1 {
                                    ser: f,
                                    arr: Default::default(),
                                    folios,
                                }),
                            );
                            return Err(e.into());
                        }
                        folios.push(f);
                        list.extend_from_slice(
                            GuestMemfdFolioSer::new(
                                pfn + k,
                                GUEST_MEMFD_LUO_FOLIO_UPTODATE,
                                idx + k,
                            )
                            .as_bytes(),
                        );
                    }
                }
                Ok((
                    list,
                    Preserved::V1 {
                        ser: Folio { pfn: 0, order: 0 },
                        arr: Default::default(),
                        folios,
                    },
                ))
            }
            Format::V2 => {
                let mut done = Vec::new();
                for &(idx, pfn, n) in runs {
                    let (kho, mm) = host.kho_mm();
                    if let Err(e) = kho.preserve_pages(mm, pfn, n) {
                        self.undo(
                            host,
                            None,
                            Some(&Preserved::V2 {
                                ser: Folio { pfn: 0, order: 0 },
                                arr: Default::default(),
                                runs: done,
                            }),
                        );
                        return Err(e.into());
                    }
                    done.push((pfn, n));
                    let r = GuestMemfdRunSer {
                        index: idx,
                        pfn_flags: pfn | (GUEST_MEMFD_LUO_FOLIO_UPTODATE << 52),
                        nr_pages: n,
                    };
                    list.extend_from_slice(r.as_bytes());
                }
                Ok((
                    list,
                    Preserved::V2 {
                        ser: Folio { pfn: 0, order: 0 },
                        arr: Default::default(),
                        runs: done,
                    },
                ))
            }
        }
    }
}

impl<C: GuestMemfdLuoCtx + ?Sized> FileHandler<C> for GuestMemfdHandler {
    fn compatible(&self) -> &'static str {
        match self.format {
            Format::V1 => GUEST_MEMFD_LUO_FH_COMPATIBLE,
            Format::V2 => GUEST_MEMFD_LUO_V2_FH_COMPATIBLE,
        }
    }

    /// A guest_memfd with INIT_SHARED, on a VM without private memory (the default x86 VM
    /// type), with PAGE_SIZE folios (the only kind we have). `--gmem-luo v1` on the command
    /// line makes v1 the format new preservations use.
    fn can_preserve(&self, host: &C, file: FileId) -> bool {
        let wanted = match self.format {
            Format::V1 => true,
            Format::V2 => !host.gmem_luo_v1(),
        };
        wanted
            && host
                .guest_memfd(file)
                .is_some_and(|g| g.init_shared() && g.vm.vm_type == 0)
    }

    fn preserve(&self, host: &mut C, a: &mut FileArgs) -> SysResult<()> {
        let file = a.file;
        // Freeze first: from here on nothing can allocate or punch.
        let (size, flags, runs) = match file.and_then(|f| host.guest_memfd_mut(f)) {
            Some(g) => {
                g.frozen = true;
                (g.size, g.flags, g.pages.runs().collect::<Vec<_>>())
            }
            None => return Err(Errno::EINVAL),
        };
        if size == 0 || size % PAGE_SIZE != 0 {
            set_frozen(host, file, false);
            return Err(Errno::EINVAL);
        }
        if flags & !(GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED) != 0 {
            set_frozen(host, file, false);
            return Err(Errno::EOPNOTSUPP);
        }
        let nr_folios: u64 = runs.iter().map(|r| r.2).sum();
        let (list, mut p) = match self.preserve_memory(host, &runs) {
            Ok(v) => v,
            Err(e) => {
                set_frozen(host, file, false);
                return Err(e);
            }
        };
        let (kho, mm) = host.kho_mm();
        let arr = match kho.preserve_array(mm, &list) {
            Ok(x) => x,
            Err(e) => {
                self.undo(host, file, Some(&p));
                return Err(e.into());
            }
        };
        let blob = match self.format {
            Format::V1 => GuestMemfdLuoSer {
                size,
                flags: to_abi(flags),
                nr_folios,
                vm_token: 0,
                folios: arr.ser,
            }
            .as_bytes()
            .to_vec(),
            Format::V2 => GuestMemfdLuoSerV2 {
                size,
                flags: to_abi(flags),
                nr_folios,
                vm_token: 0,
                runs: arr.ser,
                nr_runs: runs.len() as u64,
            }
            .as_bytes()
            .to_vec(),
        };
        let (kho, mm) = host.kho_mm();
        let sf = match kho.alloc_preserve(mm, blob.len() as u64) {
            Ok(f) => f,
            Err(e) => {
                kho.unpreserve_array(mm, arr);
                self.undo(host, file, Some(&p));
                return Err(e.into());
            }
        };
        mm.ram.write_phys(sf.pa(), &blob)?;
        kho.label(sf.pa(), "gmem");
        for pa in arr.page_addrs() {
            kho.label(pa, "gmem-folios");
        }
        match &mut p {
            Preserved::V1 { ser, arr: a, .. } | Preserved::V2 { ser, arr: a, .. } => {
                *ser = sf;
                *a = arr;
            }
        }
        a.serialized = sf.pa();
        a.private = Some(Box::new(p));
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
        self.undo(host, a.file, Some(&p));
        let (Preserved::V1 { ser, arr, .. } | Preserved::V2 { ser, arr, .. }) = *p;
        let (kho, mm) = host.kho_mm();
        let _ = kho.unpreserve_free(mm, ser);
        kho.unpreserve_array(mm, arr);
    }

    /// The owning VM must be preserved in the same session: record its token.
    fn freeze(&self, host: &mut C, a: &mut FileArgs) -> SysResult<()> {
        record_vm_token(host, a)
    }

    fn retrieve(&self, host: &mut C, a: &mut FileArgs) -> SysResult<()> {
        if !host.kho().is_restorable(a.serialized) {
            return Err(Errno::EINVAL);
        }
        let h = read_header(&host.mm().ram, a.serialized, self.format)?;
        let vm = host
            .luo_get_file_incoming(a.session, h.vm_token)
            .inspect_err(|_| {
                tracing::warn!(
                    "guest_memfd: provided VM FD token {:#x} is incorrect",
                    h.vm_token
                );
            })?;
        let r = (|| -> SysResult<FileId> {
            if host.vm_file(vm).is_none() {
                return Err(Errno::EINVAL);
            }
            let (kho, mm) = host.kho_mm();
            let list = kho.restore_array(mm, &h.list).map_err(|_| Errno::EIO)?;
            let runs = decode_runs(&list, &h, self.format)?;
            let file = host.create_guest_memfd(vm, h.size, from_abi(h.flags))?;
            let mut bad = None;
            for (idx, pfn, n) in runs {
                let kho = host.kho_mut();
                let restored = match self.format {
                    Format::V1 => kho.restore_folio(pfn * PAGE_SIZE).map(|f| f.order == 0),
                    Format::V2 => kho.restore_pages(pfn * PAGE_SIZE, n).map(|_| true),
                };
                match restored {
                    Ok(true)
                        if host
                            .guest_memfd_mut(file)
                            .is_some_and(|g| g.pages.insert_run(idx, pfn, n)) => {}
                    Ok(_) => {
                        let _ = host.mm_mut().free_runs(&[(pfn, n)]);
                        bad.get_or_insert(Errno::EINVAL);
                    }
                    Err(_) => {
                        bad.get_or_insert(Errno::EIO);
                    }
                }
            }
            if let Some(e) = bad {
                host.fput(file);
                return Err(e);
            }
            Ok(file)
        })();
        complete_retrieve(host, vm, r, a)
    }

    fn finish(&self, host: &mut C, a: &mut FileArgs) {
        if a.retrieve_status != 0 {
            return;
        }
        let Ok(h) = read_header(&host.mm().ram, a.serialized, self.format) else {
            return;
        };
        let (kho, mm) = host.kho_mm();
        if let Ok(list) = kho.restore_array(mm, &h.list) {
            if let Ok(runs) = decode_runs(&list, &h, self.format) {
                let mut back = Vec::new();
                for (_, pfn, n) in runs {
                    let ok = match self.format {
                        Format::V1 => kho.restore_folio(pfn * PAGE_SIZE).is_ok(),
                        Format::V2 => kho.restore_pages(pfn * PAGE_SIZE, n).is_ok(),
                    };
                    if ok {
                        back.push((pfn, n));
                    }
                }
                let _ = mm.free_runs(&back);
            }
        }
        let _ = kho.restore_free(mm, a.serialized);
    }
}

/// The end of `retrieve` of every version: drop the reference to the VM file taken for the
/// lookup (the VM file stays with LUO and the user; the guest_memfd holds the VM itself), and
/// on success give the blob back and hand the new file to LUO.
pub(super) fn complete_retrieve<C: GuestMemfdLuoCtx + ?Sized>(
    host: &mut C,
    vm: crate::fs::FileId,
    r: SysResult<crate::fs::FileId>,
    a: &mut FileArgs,
) -> SysResult<()> {
    host.fput(vm);
    let file = r?;
    let (kho, mm) = host.kho_mm();
    kho.restore_free(mm, a.serialized).map_err(|_| Errno::EIO)?;
    a.file = Some(file);
    Ok(())
}

/// `freeze` of every version: the owning VM must be preserved in the same session; its token
/// goes into the blob at [`GUEST_MEMFD_LUO_VM_TOKEN_OFFSET`].
pub(super) fn record_vm_token<C: GuestMemfdLuoCtx + ?Sized>(
    host: &mut C,
    a: &mut FileArgs,
) -> SysResult<()> {
    let (vm_file, inner) = match a.file.and_then(|f| host.guest_memfd(f)) {
        Some(g) => (g.vm_file, g.vm.clone()),
        None => return Err(Errno::EINVAL),
    };
    let alive = host
        .vm_file(vm_file)
        .is_some_and(|v| std::sync::Arc::ptr_eq(&v.inner, &inner));
    if !alive {
        return Err(Errno::ENOENT);
    }
    let token = host.luo_get_token_outgoing(a.session, vm_file)?;
    host.mm_mut()
        .ram
        .write_u64(a.serialized + GUEST_MEMFD_LUO_VM_TOKEN_OFFSET, token)?;
    Ok(())
}
