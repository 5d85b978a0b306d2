//! `private=1`: the scenario on a software-protected VM (`KVM_X86_SW_PROTECTED_VM`) whose
//! guest_memfd starts private (no INIT_SHARED). The guest writes its data into private memory;
//! the VMM then converts the first `shared` bytes to shared in place
//! (`KVM_SET_MEMORY_ATTRIBUTES2`), finds the guest's bytes there through its own mapping and is
//! refused the page after them (SIGBUS on Linux, EFAULT here). After the update the same checks
//! run on the retrieved file, and the guest verifies all of its data, private and shared.

use serde_json::{json, Value};

use crate::host::Host;
use crate::uapi::{Errno, Pid};
use crate::vmm::guest;
use crate::vmm::libkvm::set_memory_attributes;

use super::e;
use super::options::Options;

/// Stage 1, the guest's data written: convert `0..shared` to shared, then [`check`].
pub(super) fn convert_and_check(
    h: &mut Host,
    pid: Pid,
    gmem: i32,
    o: &Options,
) -> Result<Value, String> {
    // Converting a range that is already shared, or back and forth, changes no byte.
    set_memory_attributes(h, pid, gmem, 0, o.shared, true)
        .map_err(|(err, off)| format!("convert to private: {err} at {off:#x}"))?;
    set_memory_attributes(h, pid, gmem, 0, o.shared, false)
        .map_err(|(err, off)| format!("convert to shared: {err} at {off:#x}"))?;
    check(h, pid, gmem, o, 1)
}

/// Through a mapping of the guest_memfd: the shared part holds the guest's pattern, the page
/// after it is refused, and the file's private pages are the rest of it.
pub(super) fn check(
    h: &mut Host,
    pid: Pid,
    gmem: i32,
    o: &Options,
    stage: u32,
) -> Result<Value, String> {
    let f = h.fd_file(pid, gmem).map_err(e("guest_memfd"))?;
    let (private_pages, ranges, runs, split) = match h.files().kind(f) {
        Some(crate::host::files::FileKind::GuestMemfd(g)) => (
            g.attrs.nr_private(),
            g.attrs.ranges().collect::<Vec<_>>(),
            g.folio_runs(),
            g.split.nr_private(),
        ),
        _ => return Err("not a guest_memfd".into()),
    };
    // Present pages in whole huge folios, and in folios split to 4 KiB (or 4 KiB files).
    let huge_pages: u64 = runs.iter().filter(|r| r.3 > 0).map(|r| r.2).sum();
    let small_pages: u64 = runs.iter().filter(|r| r.3 == 0).map(|r| r.2).sum();
    let pool = h.hugepool().stats();
    let want = vec![(o.shared / 4096, o.guest_mem / 4096)];
    if ranges != want {
        return Err(format!(
            "stage {stage}: private ranges {ranges:?}, want {want:?}"
        ));
    }
    let map = h
        .mmap(pid, gmem, o.guest_mem, libc::PROT_READ, libc::MAP_SHARED, 0)
        .map_err(e("mmap guest_memfd"))?;
    let mut buf = vec![0u8; o.shared as usize];
    let r = h.user_read(pid, map.addr, &mut buf);
    let bad = r.is_ok().then(|| guest::find_mismatch(&buf, 0)).flatten();
    let mut one = [0u8; 1];
    let refused = h.user_read(pid, map.addr + o.shared as usize, &mut one);
    h.munmap(pid, map).map_err(e("munmap"))?;
    r.map_err(e("read the shared part"))?;
    if let Some(b) = bad {
        return Err(format!("stage {stage}: shared part differs at byte {b}"));
    }
    if refused != Err(Errno::EFAULT) {
        return Err(format!(
            "stage {stage}: reading the first private page gave {refused:?}, want EFAULT (SIGBUS)"
        ));
    }
    Ok(json!({
        "stage": stage,
        "shared_bytes_checked": o.shared,
        "private_pages": private_pages,
        "private_access": "refused",
        "page_order": o.huge,
        "huge_folio_pages": huge_pages,
        "small_pages": small_pages,
        "split_pages": split,
        "hugepages": pool,
    }))
}
