//! The RFC's guest_memfd handler, "guest_memfd_luo_v1", for fully shared, PAGE_SIZE
//! guest_memfds: preserve freezes the file first, then records size, flags and every present
//! folio (holes stay holes); freeze finds the owning VM's token in the same session (or refuses
//! the kexec); retrieve finds the VM through the cross-file API, so the retrieval order is
//! free; finish discards a never-retrieved file's folios.

use zerocopy::{FromBytes, IntoBytes};

use crate::abi::kvm::*;
use crate::fs::{FileId, FileKind};
use crate::host::Host;
use crate::kho::array::PreservedArray;
use crate::luo::{FileArgs, FileHandler};
use crate::mm::{Folio, PhysRead, PAGE_SIZE};
use crate::uapi::{Errno, SysResult};

use super::guest_memfd::MAX_SIZE;

pub struct GuestMemfdHandler;

struct Preserved {
    ser: Folio,
    arr: PreservedArray,
    folios: Vec<Folio>,
}

/// Internal guest_memfd flags to the ABI's (deliberately separate bit spaces upstream).
fn to_abi(flags: u64) -> u64 {
    let mut f = 0;
    if flags & GUEST_MEMFD_FLAG_MMAP != 0 {
        f |= GUEST_MEMFD_LUO_FLAG_MMAP;
    }
    if flags & GUEST_MEMFD_FLAG_INIT_SHARED != 0 {
        f |= GUEST_MEMFD_LUO_FLAG_INIT_SHARED;
    }
    f
}

fn from_abi(flags: u64) -> u64 {
    let mut f = 0;
    if flags & GUEST_MEMFD_LUO_FLAG_MMAP != 0 {
        f |= GUEST_MEMFD_FLAG_MMAP;
    }
    if flags & GUEST_MEMFD_LUO_FLAG_INIT_SHARED != 0 {
        f |= GUEST_MEMFD_FLAG_INIT_SHARED;
    }
    f
}

fn set_frozen(host: &mut Host, file: Option<FileId>, frozen: bool) {
    if let Some(FileKind::GuestMemfd(g)) = file.and_then(|f| host.files.kind_mut(f)) {
        g.frozen = frozen;
    }
}

fn undo(host: &mut Host, file: Option<FileId>, folios: &[Folio]) {
    for f in folios {
        let _ = host.kho.unpreserve_folio(&mut host.mm, *f);
    }
    set_frozen(host, file, false);
}

/// Read and validate a handed-over blob.
pub fn read_ser(mem: &dyn PhysRead, pa: u64) -> SysResult<GuestMemfdLuoSer> {
    let mut b = [0u8; 48];
    mem.read_phys(pa, &mut b)?;
    let s = GuestMemfdLuoSer::read_from_bytes(&b).map_err(|_| Errno::EINVAL)?;
    if s.size == 0
        || s.size % PAGE_SIZE != 0
        || s.size > MAX_SIZE
        || s.nr_folios > s.size / PAGE_SIZE
    {
        return Err(Errno::EINVAL);
    }
    if s.flags & !GUEST_MEMFD_LUO_SUPPORTED_FLAGS != 0 {
        return Err(Errno::EOPNOTSUPP);
    }
    Ok(s)
}

impl FileHandler for GuestMemfdHandler {
    fn compatible(&self) -> &'static str {
        GUEST_MEMFD_LUO_FH_COMPATIBLE
    }

    /// A guest_memfd with INIT_SHARED, on a VM without private memory (the default x86 VM
    /// type), with PAGE_SIZE folios (the only kind we have).
    fn can_preserve(&self, host: &Host, file: FileId) -> bool {
        matches!(host.files.kind(file), Some(FileKind::GuestMemfd(g)) if g.init_shared() && g.vm.vm_type == 0)
    }

    fn preserve(&self, host: &mut Host, a: &mut FileArgs) -> SysResult<()> {
        let file = a.file;
        // Freeze first: from here on nothing can allocate or punch.
        let (size, flags, pages) = match file.and_then(|f| host.files.kind_mut(f)) {
            Some(FileKind::GuestMemfd(g)) => {
                g.frozen = true;
                (g.size, g.flags, g.pages.iter().collect::<Vec<_>>())
            }
            _ => return Err(Errno::EINVAL),
        };
        if size == 0 || size % PAGE_SIZE != 0 {
            set_frozen(host, file, false);
            return Err(Errno::EINVAL);
        }
        if flags & !(GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED) != 0 {
            set_frozen(host, file, false);
            return Err(Errno::EOPNOTSUPP);
        }
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
                GuestMemfdFolioSer::new(pfn, GUEST_MEMFD_LUO_FOLIO_UPTODATE, idx).as_bytes(),
            );
        }
        let arr = match host.kho.preserve_array(&mut host.mm, &list) {
            Ok(x) => x,
            Err(e) => {
                undo(host, file, &folios);
                return Err(e.into());
            }
        };
        let ser = GuestMemfdLuoSer {
            size,
            flags: to_abi(flags),
            nr_folios: folios.len() as u64,
            vm_token: 0,
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

    /// The owning VM must be preserved in the same session: record its token.
    fn freeze(&self, host: &mut Host, a: &mut FileArgs) -> SysResult<()> {
        let (vm_file, inner) = match a.file.and_then(|f| host.files.kind(f)) {
            Some(FileKind::GuestMemfd(g)) => (g.vm_file, g.vm.clone()),
            _ => return Err(Errno::EINVAL),
        };
        let alive = matches!(host.files.kind(vm_file), Some(FileKind::Vm(v)) if std::sync::Arc::ptr_eq(&v.inner, &inner));
        if !alive {
            return Err(Errno::ENOENT);
        }
        let token = host.luo_get_token_outgoing(a.session, vm_file)?;
        host.mm.ram.write_u64(a.serialized + 24, token)?;
        Ok(())
    }

    fn retrieve(&self, host: &mut Host, a: &mut FileArgs) -> SysResult<()> {
        if !host.kho.is_restorable(a.serialized) {
            return Err(Errno::EINVAL);
        }
        let ser = read_ser(&host.mm.ram, a.serialized)?;
        let vm = host
            .luo_get_file_incoming(a.session, ser.vm_token)
            .inspect_err(|_| {
                tracing::warn!(
                    "guest_memfd: provided VM FD token {:#x} is incorrect",
                    ser.vm_token
                );
            })?;
        let r = (|| -> SysResult<FileId> {
            if !matches!(host.files.kind(vm), Some(FileKind::Vm(_))) {
                return Err(Errno::EINVAL);
            }
            let list = host
                .kho
                .restore_array(&mut host.mm, &ser.folios)
                .map_err(|_| Errno::EIO)?;
            let file = host.gmem_create(vm, ser.size, from_abi(ser.flags))?;
            let mut bad = None;
            for e in list.chunks_exact(16).take(ser.nr_folios as usize) {
                let Ok(fs) = GuestMemfdFolioSer::read_from_bytes(e) else {
                    continue;
                };
                match host.kho.restore_folio(fs.pfn() * PAGE_SIZE) {
                    Ok(f) => {
                        let ok = f.order == 0
                            && host
                                .gmem(file)
                                .is_ok_and(|g| g.pages.insert(fs.index, f.pfn));
                        if !ok {
                            let _ = host.mm.free(f);
                            bad.get_or_insert(Errno::EINVAL);
                        }
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
        // The VM file stays with LUO (and the user); the guest_memfd holds the VM itself.
        host.fput(vm);
        let file = r?;
        host.kho
            .restore_free(&mut host.mm, a.serialized)
            .map_err(|_| Errno::EIO)?;
        a.file = Some(file);
        Ok(())
    }

    fn finish(&self, host: &mut Host, a: &mut FileArgs) {
        if a.retrieve_status != 0 {
            return;
        }
        let Ok(ser) = read_ser(&host.mm.ram, a.serialized) else {
            return;
        };
        if let Ok(list) = host.kho.restore_array(&mut host.mm, &ser.folios) {
            let mut folios: Vec<Folio> = list
                .chunks_exact(16)
                .take(ser.nr_folios as usize)
                .filter_map(|e| GuestMemfdFolioSer::read_from_bytes(e).ok())
                .filter_map(|fs| host.kho.restore_folio(fs.pfn() * PAGE_SIZE).ok())
                .collect();
            let _ = host.mm.free_many(&mut folios);
        }
        let _ = host.kho.restore_free(&mut host.mm, a.serialized);
    }
}
