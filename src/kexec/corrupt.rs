//! Test hooks that damage a handover on purpose, so tests can show that the next image refuses
//! it cleanly: the `kho-test` init program's `corrupt=KIND` argument, and `HANDOVER_CORRUPT`
//! (the kinds below and `flip:<blob kind>`) for any kexec of a first image. Only in builds with
//! the `test-hooks` feature.

use zerocopy::{FromBytes, IntoBytes};

use crate::abi::kho::{radix_index, KHO_FDT_COMPATIBLE};
use crate::kho::test::{KhoTestSer, SUBTREE};
use crate::kho::{Kho, KhoBootArgs, KhoError};
use crate::mm::{PhysRead, Ram, PAGE_SIZE};

/// Kinds applied to a client blob before the handover is finalized.
pub const CLIENT_KINDS: &[&str] = &["chain-cycle", "chain-overlong"];
/// Kinds applied to the finalized handover right before `execve`.
pub const HANDOVER_KINDS: &[&str] = &[
    "fdt-truncate",
    "fdt-bitflip",
    "root-bitflip",
    "compat",
    "fdt-outside",
    "tracker-outside",
    "tracker-cycle",
    "blob-outside",
];

fn test_ser(kho: &Kho, ram: &Ram) -> Result<(u64, KhoTestSer), KhoError> {
    let st = kho
        .subtrees()
        .get(SUBTREE)
        .copied()
        .ok_or_else(|| KhoError::NoSubtree(SUBTREE.into()))?;
    let mut b = [0u8; std::mem::size_of::<KhoTestSer>()];
    ram.read_phys(st.pa, &mut b)?;
    let ser = KhoTestSer::read_from_bytes(&b).map_err(|_| KhoError::Corrupt("kho-test blob"))?;
    Ok((st.pa, ser))
}

/// Apply `kind` for the `kho-test` program: damage its blob now (a [`CLIENT_KINDS`] entry), or,
/// for a kind that damages the finalized handover, return it: the caller applies it with
/// [`handover`] right before the next `execve`. `BadHandover` for an unknown kind.
pub fn client(kho: &Kho, ram: &Ram, kind: &str) -> Result<Option<String>, KhoError> {
    match kind {
        "chain-cycle" => {
            let (_, ser) = test_ser(kho, ram)?;
            ram.write_u64(ser.folios.first, ser.folios.first)?;
        }
        "chain-overlong" => {
            let (pa, mut ser) = test_ser(kho, ram)?;
            ser.folios.total_pages = ser
                .folios
                .total_pages
                .checked_sub(1)
                .ok_or(KhoError::Corrupt("kho-test blob: no pages to drop"))?;
            ram.write_phys(pa, ser.as_bytes())?;
        }
        k if HANDOVER_KINDS.contains(&k) || k.starts_with("flip:") => {
            return Ok(Some(k.to_string()));
        }
        _ => {
            return Err(KhoError::BadHandover(format!(
                "unknown corruption {kind:?}"
            )))
        }
    }
    Ok(None)
}

/// Damage the finalized handover (RAM and `args`) in the way `kind` names, right before the
/// `execve`; `BadHandover` for an unknown kind.
pub fn handover(kho: &Kho, ram: &Ram, args: &mut KhoBootArgs, kind: &str) -> Result<(), KhoError> {
    let mut fdt = vec![0u8; args.fdt_size as usize];
    ram.read_phys(args.fdt_pa, &mut fdt)?;
    match kind {
        "fdt-truncate" => args.fdt_size /= 2,
        "fdt-bitflip" => ram.write_phys(args.fdt_pa, &[fdt[0] ^ 0x01])?,
        "compat" => {
            let at = find(&fdt, KHO_FDT_COMPATIBLE.as_bytes()).ok_or(KhoError::Corrupt("fdt"))?;
            ram.write_phys(args.fdt_pa + at as u64 + 5, b"9")?;
            // As an image of another version would write it: checksum and all.
            let mut now = fdt.clone();
            now[at + 5] = b'9';
            args.fdt_crc = Some(crc32fast::hash(&now));
        }
        "root-bitflip" => {
            // The same tree with one bit of the tracker root flipped (same length).
            let t = crate::kho::fdt::parse(&fdt)?;
            let b = crate::kho::fdt::build(
                t.tracker_root ^ (1 << 13),
                t.tracker_crc.unwrap_or(0),
                &t.subtrees,
            )?;
            ram.write_phys(args.fdt_pa, &b)?;
            // A well-formed tree that points at the wrong place: its checksum matches.
            args.fdt_crc = Some(crc32fast::hash(&b));
        }
        "fdt-outside" => args.fdt_pa = ram.size() + PAGE_SIZE,
        "blob-outside" => {
            // A well-formed tree (checksum and all) whose kho-test blob points outside RAM.
            let mut t = crate::kho::fdt::parse(&fdt)?;
            if let Some(s) = t.subtrees.get_mut(SUBTREE) {
                s.pa = ram.size() * 2;
            }
            let b =
                crate::kho::fdt::build(t.tracker_root, t.tracker_crc.unwrap_or(0), &t.subtrees)?;
            ram.write_phys(args.fdt_pa, &b)?;
            args.fdt_crc = Some(crc32fast::hash(&b));
        }
        "tracker-outside" | "tracker-cycle" => {
            let root = kho.tracker().root();
            // Root-level index of the lowest keys of order 0 (where kho-test folios live).
            let used = radix_index(1 << 52, 5) as u64;
            let child = ram.read_u64(root + used * 8)?;
            if kind == "tracker-outside" {
                ram.write_u64(root + used * 8, ram.size() * 4)?;
            } else {
                // A free slot in the child points back at the root.
                let free = (0..512u64)
                    .find(|i| ram.read_u64(child + i * 8).is_ok_and(|v| v == 0))
                    .ok_or(KhoError::Corrupt("tracker"))?;
                ram.write_u64(child + free * 8, root)?;
            }
        }
        k if k.starts_with("flip:") => {
            let what = &k[5..];
            let target = if what == "tracker" {
                let mut n: Vec<u64> = kho.tracker().node_folios().iter().map(|f| f.pa()).collect();
                n.sort_unstable();
                n.last().map(|&pa| (pa, PAGE_SIZE))
            } else {
                kho.labelled(what).first().copied()
            };
            let (pa, len) = target.ok_or_else(|| {
                KhoError::BadHandover(format!("no handover blob of kind {what:?}"))
            })?;
            // One bit in the middle of the blob's first 64 bytes.
            let at = pa + (len.min(64) / 2);
            let mut b = [0u8; 1];
            ram.read_phys(at, &mut b)?;
            ram.write_phys(at, &[b[0] ^ 0x04])?;
            tracing::warn!("test hook: flipped a bit of the {what} blob at {at:#x}");
        }
        _ => {
            return Err(KhoError::BadHandover(format!(
                "unknown corruption {kind:?}"
            )))
        }
    }
    Ok(())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
