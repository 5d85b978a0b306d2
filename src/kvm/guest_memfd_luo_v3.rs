//! "guest_memfd_luo_v3": the guest_memfds v1 and v2 cannot carry, those of a private-memory VM
//! (`KVM_X86_SW_PROTECTED_VM`), with their shared/private map and their folio order.
//!
//! The blob ([`GuestMemfdLuoSerV3`]) is v2's header plus a list of private page ranges, the
//! file's folio order and a CRC32 over the blob and both lists, so a damaged handover is
//! refused at retrieve instead of restoring wrong attributes. Each run entry carries its folio
//! order: runs of huge folios are preserved as KHO folios of that order, the others as page
//! ranges. Preserve freezes the file as v1/v2 do, and a frozen file refuses conversions too
//! (EPERM), so the map written is the map handed over.

use zerocopy::{FromBytes, IntoBytes};

use crate::abi::errno::{Errno, SysResult};
use crate::abi::kvm::*;
use crate::kho::array::PreservedArray;
use crate::luo::{FileArgs, FileHandler};
use crate::mm::{Folio, PhysRead, PAGE_SIZE};

use super::gmem_attrs::PageAttrs;
use super::guest_memfd::MAX_SIZE;
use super::guest_memfd_luo::{from_abi, set_frozen, to_abi, GuestMemfdLuoCtx};
use super::vm::has_private_memory;

/// Largest folio order a v3 run may carry (1 GiB folios).
pub const MAX_RUN_ORDER: u32 = 18;

/// The LUO file handler for private-memory VMs' guest_memfds (listed after v2 and v1 in
/// [`crate::registry::file_handlers`], which take every file they can).
pub struct GuestMemfdV3Handler;

/// What a preserved file holds on to, to undo the preservation.
struct Preserved {
    ser: Folio,
    runs_arr: PreservedArray,
    private_arr: PreservedArray,
    /// `(pfn, pages, order)` of every preserved run.
    runs: Vec<(u64, u64, u32)>,
}

/// A validated v3 header.
#[derive(Debug, Clone, Copy)]
pub struct HeaderV3 {
    /// The blob as read.
    pub ser: GuestMemfdLuoSerV3,
}

/// The CRC the blob must carry: over the blob with `vm_token` and `checksum` zero, then the
/// run list, then the private list.
pub fn checksum(ser: &GuestMemfdLuoSerV3, runs: &[u8], private: &[u8]) -> u64 {
    let mut h = crc32fast::Hasher::new();
    let mut s = *ser;
    s.vm_token = 0;
    s.checksum = 0;
    h.update(s.as_bytes());
    h.update(runs);
    h.update(private);
    u64::from(h.finalize())
}

/// Read and validate the blob's header at `pa` (the lists are checked by [`decode`]).
pub fn read_header(mem: &dyn PhysRead, pa: u64) -> SysResult<HeaderV3> {
    let mut b = [0u8; 96];
    mem.read_phys(pa, &mut b)?;
    let s = GuestMemfdLuoSerV3::read_from_bytes(&b).map_err(|_| Errno::EINVAL)?;
    let order = u32::try_from(s.page_order).map_err(|_| Errno::EINVAL)?;
    let folio = PAGE_SIZE.checked_shl(order).ok_or(Errno::EINVAL)?;
    if order > MAX_RUN_ORDER
        || s.size == 0
        || s.size % folio != 0
        || s.size > MAX_SIZE
        || s.nr_folios > s.size / PAGE_SIZE
        || s.nr_runs > s.nr_folios
        || s.nr_private > s.size / PAGE_SIZE
    {
        return Err(Errno::EINVAL);
    }
    if s.flags & !(GUEST_MEMFD_LUO_SUPPORTED_FLAGS | GUEST_MEMFD_LUO_FLAG_HUGETLB) != 0 {
        return Err(Errno::EOPNOTSUPP);
    }
    Ok(HeaderV3 { ser: s })
}

/// The runs `(index, pfn, pages, order)` and private ranges a blob's lists describe, checked
/// against the header and the checksum.
#[allow(clippy::type_complexity)]
pub fn decode(
    h: &HeaderV3,
    runs: &[u8],
    private: &[u8],
) -> SysResult<(Vec<(u64, u64, u64, u32)>, PageAttrs)> {
    let s = &h.ser;
    let nr_pages = s.size / PAGE_SIZE;
    let (nr, np) = (
        usize::try_from(s.nr_runs).map_err(|_| Errno::EINVAL)?,
        usize::try_from(s.nr_private).map_err(|_| Errno::EINVAL)?,
    );
    let (runs, private) = (
        runs.get(..nr.checked_mul(24).ok_or(Errno::EINVAL)?)
            .ok_or(Errno::EINVAL)?,
        private
            .get(..np.checked_mul(16).ok_or(Errno::EINVAL)?)
            .ok_or(Errno::EINVAL)?,
    );
    if checksum(s, runs, private) != s.checksum {
        tracing::warn!("guest_memfd v3: checksum mismatch: the handover is damaged");
        return Err(Errno::EINVAL);
    }
    let mut out = Vec::with_capacity(nr);
    let mut total = 0u64;
    // A HugeTLB file holds whole folios only, split or not.
    let file_align = 1u64 << s.page_order.min(63);
    for e in runs.chunks_exact(24) {
        let r = GuestMemfdRunSer::read_from_bytes(e).map_err(|_| Errno::EINVAL)?;
        let pfn = r.pfn_flags & ((1 << 52) - 1);
        let order = ((r.pfn_flags >> 52) >> GUEST_MEMFD_LUO_RUN_ORDER_SHIFT) & 0x3f;
        let order = order as u32;
        let align = 1u64 << order.min(63);
        if order > MAX_RUN_ORDER
            || r.nr_pages == 0
            || r.index % align != 0
            || pfn % align != 0
            || r.nr_pages % align != 0
            || r.index % file_align != 0
            || pfn % file_align != 0
            || r.nr_pages % file_align != 0
            || r.index.checked_add(r.nr_pages).is_none_or(|e| e > nr_pages)
        {
            return Err(Errno::EINVAL);
        }
        total += r.nr_pages;
        out.push((r.index, pfn, r.nr_pages, order));
    }
    if total != s.nr_folios {
        return Err(Errno::EINVAL);
    }
    let mut attrs = PageAttrs::all_shared();
    for e in private.chunks_exact(16) {
        let r = GuestMemfdRangeSer::read_from_bytes(e).map_err(|_| Errno::EINVAL)?;
        let end = r.index.checked_add(r.nr_pages).ok_or(Errno::EINVAL)?;
        if r.nr_pages == 0 || end > nr_pages {
            return Err(Errno::EINVAL);
        }
        attrs.set(r.index, end, true);
    }
    Ok((out, attrs))
}

/// The folios of order `order` that make up `n` pages from `pfn` (aligned, checked by
/// `decode` and by construction at preserve).
fn folios(pfn: u64, n: u64, order: u32) -> impl Iterator<Item = Folio> {
    (0..n).step_by(1usize << order).map(move |k| Folio {
        pfn: pfn + k,
        order,
    })
}

fn preserve_run<C: GuestMemfdLuoCtx + ?Sized>(
    host: &mut C,
    pfn: u64,
    n: u64,
    order: u32,
) -> SysResult<()> {
    let (kho, mm) = host.kho_mm();
    if order == 0 {
        return kho.preserve_pages(mm, pfn, n).map_err(Into::into);
    }
    for (i, f) in folios(pfn, n, order).enumerate() {
        if let Err(e) = kho.preserve_folio(mm, f) {
            for g in folios(pfn, n, order).take(i) {
                let _ = kho.unpreserve_folio(mm, g);
            }
            return Err(e.into());
        }
    }
    Ok(())
}

fn unpreserve_runs<C: GuestMemfdLuoCtx + ?Sized>(host: &mut C, runs: &[(u64, u64, u32)]) {
    let (kho, mm) = host.kho_mm();
    for &(pfn, n, order) in runs {
        if order == 0 {
            let _ = kho.unpreserve_pages(mm, pfn, n);
        } else {
            for f in folios(pfn, n, order) {
                let _ = kho.unpreserve_folio(mm, f);
            }
        }
    }
}

/// Take a run's memory back from KHO in the new image: a run of huge folios folio by folio
/// (each must come back whole, of its order), the others as a page range.
fn restore_run<C: GuestMemfdLuoCtx + ?Sized>(
    host: &mut C,
    pfn: u64,
    n: u64,
    order: u32,
) -> SysResult<()> {
    let kho = host.kho_mut();
    if order == 0 {
        return kho
            .restore_pages(pfn * PAGE_SIZE, n)
            .map_err(|_| Errno::EIO);
    }
    for f in folios(pfn, n, order) {
        let got = kho.restore_folio(f.pa()).map_err(|_| Errno::EIO)?;
        if got.order != order {
            return Err(Errno::EINVAL);
        }
    }
    Ok(())
}

impl<C: GuestMemfdLuoCtx + ?Sized> FileHandler<C> for GuestMemfdV3Handler {
    fn compatible(&self) -> &'static str {
        GUEST_MEMFD_LUO_V3_FH_COMPATIBLE
    }

    /// A guest_memfd of a private-memory VM (shared, private or mixed; any folio order).
    fn can_preserve(&self, host: &C, file: crate::fs::FileId) -> bool {
        host.guest_memfd(file)
            .is_some_and(|g| has_private_memory(g.vm.vm_type))
    }

    fn preserve(&self, host: &mut C, a: &mut FileArgs) -> SysResult<()> {
        let file = a.file;
        // Freeze first: from here on nothing allocates, punches or converts.
        let (size, flags, order, runs, private) = match file.and_then(|f| host.guest_memfd_mut(f)) {
            Some(g) => {
                g.frozen = true;
                let runs = g.folio_runs();
                let private: Vec<(u64, u64)> = g.attrs.ranges().collect();
                (g.size, g.flags, g.page_order, runs, private)
            }
            None => return Err(Errno::EINVAL),
        };
        let r = (|| -> SysResult<(u64, Preserved)> {
            let mut list = Vec::new();
            let mut done = Vec::new();
            for &(idx, pfn, n, o) in &runs {
                if let Err(e) = preserve_run(host, pfn, n, o) {
                    unpreserve_runs(host, &done);
                    return Err(e);
                }
                done.push((pfn, n, o));
                let flags = GUEST_MEMFD_LUO_FOLIO_UPTODATE
                    | (u64::from(o) << GUEST_MEMFD_LUO_RUN_ORDER_SHIFT);
                let e = GuestMemfdRunSer {
                    index: idx,
                    pfn_flags: pfn | (flags << 52),
                    nr_pages: n,
                };
                list.extend_from_slice(e.as_bytes());
            }
            let mut plist = Vec::new();
            for &(s, e) in &private {
                plist.extend_from_slice(
                    GuestMemfdRangeSer {
                        index: s,
                        nr_pages: e - s,
                    }
                    .as_bytes(),
                );
            }
            let (kho, mm) = host.kho_mm();
            let runs_arr = match kho.preserve_array(mm, &list) {
                Ok(x) => x,
                Err(e) => {
                    unpreserve_runs(host, &done);
                    return Err(e.into());
                }
            };
            let (kho, mm) = host.kho_mm();
            let private_arr = match kho.preserve_array(mm, &plist) {
                Ok(x) => x,
                Err(e) => {
                    kho.unpreserve_array(mm, runs_arr);
                    unpreserve_runs(host, &done);
                    return Err(e.into());
                }
            };
            let mut huge_flag = 0;
            if flags & GUEST_MEMFD_FLAG_HUGETLB != 0 {
                huge_flag = GUEST_MEMFD_LUO_FLAG_HUGETLB;
            }
            let mut ser = GuestMemfdLuoSerV3 {
                size,
                flags: to_abi(flags) | huge_flag,
                nr_folios: runs.iter().map(|r| r.2).sum(),
                vm_token: 0,
                runs: runs_arr.ser,
                nr_runs: runs.len() as u64,
                private: private_arr.ser,
                nr_private: private.len() as u64,
                page_order: u64::from(order),
                checksum: 0,
            };
            ser.checksum = checksum(&ser, &list, &plist);
            let (kho, mm) = host.kho_mm();
            let sf = match kho.alloc_preserve(mm, 96) {
                Ok(f) => f,
                Err(e) => {
                    kho.unpreserve_array(mm, runs_arr);
                    kho.unpreserve_array(mm, private_arr);
                    unpreserve_runs(host, &done);
                    return Err(e.into());
                }
            };
            mm.ram.write_phys(sf.pa(), ser.as_bytes())?;
            kho.label(sf.pa(), "gmem-v3");
            for pa in runs_arr
                .page_addrs()
                .into_iter()
                .chain(private_arr.page_addrs())
            {
                kho.label(pa, "gmem-v3-lists");
            }
            Ok((
                sf.pa(),
                Preserved {
                    ser: sf,
                    runs_arr,
                    private_arr,
                    runs: done,
                },
            ))
        })();
        match r {
            Ok((pa, p)) => {
                a.serialized = pa;
                a.private = Some(Box::new(p));
                Ok(())
            }
            Err(e) => {
                set_frozen(host, file, false);
                Err(e)
            }
        }
    }

    fn unpreserve(&self, host: &mut C, a: &mut FileArgs) {
        let Some(p) = a
            .private
            .take()
            .and_then(|p| p.downcast::<Preserved>().ok())
        else {
            return;
        };
        unpreserve_runs(host, &p.runs);
        set_frozen(host, a.file, false);
        let p = *p;
        let (kho, mm) = host.kho_mm();
        let _ = kho.unpreserve_free(mm, p.ser);
        kho.unpreserve_array(mm, p.runs_arr);
        kho.unpreserve_array(mm, p.private_arr);
    }

    /// The owning VM must be preserved in the same session: record its token (as v1/v2).
    fn freeze(&self, host: &mut C, a: &mut FileArgs) -> SysResult<()> {
        super::guest_memfd_luo::record_vm_token(host, a)
    }

    fn retrieve(&self, host: &mut C, a: &mut FileArgs) -> SysResult<()> {
        if !host.kho().is_restorable(a.serialized) {
            return Err(Errno::EINVAL);
        }
        let h = read_header(&host.mm().ram, a.serialized)?;
        let vm = host
            .luo_get_file_incoming(a.session, h.ser.vm_token)
            .inspect_err(|_| {
                tracing::warn!(
                    "guest_memfd v3: provided VM FD token {:#x} is incorrect",
                    h.ser.vm_token
                );
            })?;
        let r = (|| -> SysResult<crate::fs::FileId> {
            if host
                .vm_file(vm)
                .is_none_or(|v| !has_private_memory(v.inner.vm_type))
            {
                return Err(Errno::EINVAL);
            }
            let (kho, mm) = host.kho_mm();
            let list = kho.restore_array(mm, &h.ser.runs).map_err(|_| Errno::EIO)?;
            let plist = kho
                .restore_array(mm, &h.ser.private)
                .map_err(|_| Errno::EIO)?;
            let (runs, attrs) = decode(&h, &list, &plist)?;
            let mut flags = from_abi(h.ser.flags);
            if h.ser.flags & GUEST_MEMFD_LUO_FLAG_HUGETLB != 0 {
                flags |= GUEST_MEMFD_FLAG_HUGETLB;
            }
            let file =
                host.create_guest_memfd_order(vm, h.ser.size, flags, h.ser.page_order as u32)?;
            if let Some(g) = host.guest_memfd_mut(file) {
                g.attrs = attrs;
                // Huge folios handed over at order 0 were split.
                if g.page_order > 0 {
                    let step = 1u64 << g.page_order;
                    for &(idx, _, n, o) in &runs {
                        if o == 0 {
                            g.split
                                .set(idx / step * step, (idx + n).div_ceil(step) * step, true);
                        }
                    }
                }
            }
            let mut bad = None;
            let file_order = h.ser.page_order as u32;
            for (idx, pfn, n, order) in runs {
                match restore_run(host, pfn, n, order) {
                    Ok(())
                        if host
                            .guest_memfd_mut(file)
                            .is_some_and(|g| g.pages.insert_run(idx, pfn, n)) =>
                    {
                        // The file's folios belong to this image's pool from now on.
                        if file_order > 0 {
                            for f in folios(pfn, n, file_order) {
                                if let Err(e) = host.adopt_huge_folio(f) {
                                    bad.get_or_insert(e);
                                }
                            }
                        }
                    }
                    Ok(()) => {
                        let _ = host.mm_mut().free_runs(&[(pfn, n)]);
                        bad.get_or_insert(Errno::EINVAL);
                    }
                    Err(e) => {
                        bad.get_or_insert(e);
                    }
                }
            }
            if let Some(e) = bad {
                host.fput(file);
                return Err(e);
            }
            Ok(file)
        })();
        super::guest_memfd_luo::complete_retrieve(host, vm, r, a)
    }

    fn finish(&self, host: &mut C, a: &mut FileArgs) {
        if a.retrieve_status != 0 {
            return;
        }
        let Ok(h) = read_header(&host.mm().ram, a.serialized) else {
            return;
        };
        let (kho, mm) = host.kho_mm();
        let lists = (
            kho.restore_array(mm, &h.ser.runs),
            kho.restore_array(mm, &h.ser.private),
        );
        if let (Ok(list), Ok(plist)) = lists {
            if let Ok((runs, _)) = decode(&h, &list, &plist) {
                let mut back = Vec::new();
                for (_, pfn, n, order) in runs {
                    if restore_run(host, pfn, n, order).is_ok() {
                        back.push((pfn, n));
                    }
                }
                let _ = host.mm_mut().free_runs(&back);
            }
        }
        let (kho, mm) = host.kho_mm();
        let _ = kho.restore_free(mm, a.serialized);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_covers_header_and_lists_but_not_the_vm_token() {
        let s = GuestMemfdLuoSerV3 {
            size: 1 << 21,
            page_order: 9,
            ..Default::default()
        };
        let c = checksum(&s, b"runs", b"private");
        let mut t = s;
        t.vm_token = 77;
        t.checksum = 5;
        assert_eq!(checksum(&t, b"runs", b"private"), c);
        t.size += PAGE_SIZE;
        assert_ne!(checksum(&t, b"runs", b"private"), c);
        assert_ne!(checksum(&s, b"runs", b"privatf"), c);
    }

    #[test]
    fn decode_checks_the_lists_against_the_checksum() {
        let run = GuestMemfdRunSer {
            index: 0,
            pfn_flags: 512
                | ((GUEST_MEMFD_LUO_FOLIO_UPTODATE | (9 << GUEST_MEMFD_LUO_RUN_ORDER_SHIFT)) << 52),
            nr_pages: 512,
        };
        let range = GuestMemfdRangeSer {
            index: 0,
            nr_pages: 512,
        };
        let mut ser = GuestMemfdLuoSerV3 {
            size: 2 << 20,
            nr_folios: 512,
            nr_runs: 1,
            nr_private: 1,
            page_order: 9,
            ..Default::default()
        };
        let (runs, private) = (run.as_bytes().to_vec(), range.as_bytes().to_vec());
        ser.checksum = checksum(&ser, &runs, &private);
        let h = HeaderV3 { ser };
        let (r, attrs) = decode(&h, &runs, &private).unwrap();
        assert_eq!(r, vec![(0, 512, 512, 9)]);
        assert_eq!(attrs.ranges().collect::<Vec<_>>(), vec![(0, 512)]);
        for i in 0..runs.len() {
            let mut bad = runs.clone();
            bad[i] ^= 1;
            assert_eq!(
                decode(&h, &bad, &private).err(),
                Some(Errno::EINVAL),
                "byte {i}"
            );
        }
        let mut bad = private.clone();
        bad[8] ^= 0x80;
        assert_eq!(decode(&h, &runs, &bad).err(), Some(Errno::EINVAL));
    }
}
