//! The handover tree: a flattened device tree with the root compatible string, the tracker
//! root and one subnode per client (`preserved-data`, `blob-size`). Written with `vm-fdt`, read
//! with `flat_device_tree`; every value read back is validated before use.

use std::collections::BTreeMap;

use crate::abi::kho::{
    KHO_FDT_COMPATIBLE, PROP_BLOB_CRC, PROP_BLOB_SIZE, PROP_PRESERVED_DATA,
    PROP_PRESERVED_MEMORY_MAP, PROP_TRACKER_CRC,
};

use super::KhoError;

/// A client's blob: where it is and how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Subtree {
    /// Physical address of the blob (`preserved-data`).
    pub pa: u64,
    /// Its size in bytes (`blob-size`).
    pub size: u64,
    /// CRC-32 of the blob, written at finalize (`blob-crc32`).
    pub crc: Option<u32>,
}

/// The decoded handover tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandoverTree {
    /// The root compatible string ([`KHO_FDT_COMPATIBLE`] once validated).
    pub compatible: String,
    /// Physical address of the tracker's radix tree root (`preserved-memory-map`).
    pub tracker_root: u64,
    /// CRC-32 over the tracker's node pages in address order (our extension).
    pub tracker_crc: Option<u32>,
    /// The clients' blobs, by subnode name.
    pub subtrees: BTreeMap<String, Subtree>,
}

fn fdt_err(e: vm_fdt::Error) -> KhoError {
    KhoError::BadHandover(format!("cannot build the handover tree: {e}"))
}

/// Serialize a handover tree: the root compatible, the tracker root and checksum, and one
/// subnode per entry of `subtrees`.
pub fn build(
    tracker_root: u64,
    tracker_crc: u32,
    subtrees: &BTreeMap<String, Subtree>,
) -> Result<Vec<u8>, KhoError> {
    let mut w = vm_fdt::FdtWriter::new().map_err(fdt_err)?;
    let root = w.begin_node("").map_err(fdt_err)?;
    w.property_string("compatible", KHO_FDT_COMPATIBLE)
        .map_err(fdt_err)?;
    w.property(PROP_PRESERVED_MEMORY_MAP, &tracker_root.to_ne_bytes())
        .map_err(fdt_err)?;
    w.property(PROP_TRACKER_CRC, &tracker_crc.to_ne_bytes())
        .map_err(fdt_err)?;
    for (name, s) in subtrees {
        let n = w.begin_node(name).map_err(fdt_err)?;
        w.property(PROP_PRESERVED_DATA, &s.pa.to_ne_bytes())
            .map_err(fdt_err)?;
        w.property(PROP_BLOB_SIZE, &s.size.to_ne_bytes())
            .map_err(fdt_err)?;
        if let Some(c) = s.crc {
            w.property(PROP_BLOB_CRC, &c.to_ne_bytes())
                .map_err(fdt_err)?;
        }
        w.end_node(n).map_err(fdt_err)?;
    }
    w.end_node(root).map_err(fdt_err)?;
    w.finish().map_err(fdt_err)
}

fn u64_prop(v: &[u8], what: &str) -> Result<u64, KhoError> {
    let b: [u8; 8] = v.try_into().map_err(|_| {
        KhoError::BadHandover(format!("property {what} is {} bytes, not 8", v.len()))
    })?;
    Ok(u64::from_ne_bytes(b))
}

/// Parse and validate a handover tree. Refuses an unknown compatible string by name.
pub fn parse(bytes: &[u8]) -> Result<HandoverTree, KhoError> {
    let fdt = flat_device_tree::Fdt::new(bytes)
        .map_err(|e| KhoError::BadHandover(format!("handover tree is not a valid FDT: {e:?}")))?;
    let root = fdt
        .find_node("/")
        .ok_or_else(|| KhoError::BadHandover("handover tree has no root node".into()))?;
    let compat = root
        .property("compatible")
        .and_then(|p| p.as_str())
        .ok_or_else(|| KhoError::BadHandover("handover tree has no compatible string".into()))?;
    if compat != KHO_FDT_COMPATIBLE {
        return Err(KhoError::Incompatible {
            what: "KHO handover tree",
            found: compat.to_string(),
            supported: KHO_FDT_COMPATIBLE,
        });
    }
    let tracker_root = u64_prop(
        root.property(PROP_PRESERVED_MEMORY_MAP)
            .ok_or_else(|| {
                KhoError::BadHandover("handover tree has no preserved-memory-map".into())
            })?
            .value,
        PROP_PRESERVED_MEMORY_MAP,
    )?;
    let mut subtrees = BTreeMap::new();
    for child in root.children() {
        let get = |p: &str| -> Result<u64, KhoError> {
            let v = child.property(p).ok_or_else(|| {
                KhoError::BadHandover(format!("subtree {:?} has no {p}", child.name))
            })?;
            u64_prop(v.value, p)
        };
        let crc = match child.property(PROP_BLOB_CRC) {
            Some(p) => Some(u32::from_ne_bytes(p.value.try_into().map_err(|_| {
                KhoError::BadHandover(format!(
                    "subtree {:?}: {PROP_BLOB_CRC} is not 4 bytes",
                    child.name
                ))
            })?)),
            None => None,
        };
        let s = Subtree {
            pa: get(PROP_PRESERVED_DATA)?,
            size: get(PROP_BLOB_SIZE)?,
            crc,
        };
        if subtrees.insert(child.name.to_string(), s).is_some() {
            return Err(KhoError::BadHandover(format!(
                "subtree {:?} appears twice",
                child.name
            )));
        }
    }
    let tracker_crc = match root.property(PROP_TRACKER_CRC) {
        Some(p) => Some(u32::from_ne_bytes(p.value.try_into().map_err(|_| {
            KhoError::BadHandover(format!("{PROP_TRACKER_CRC} is not 4 bytes"))
        })?)),
        None => None,
    };
    Ok(HandoverTree {
        compatible: compat.to_string(),
        tracker_root,
        tracker_crc,
        subtrees,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut s = BTreeMap::new();
        s.insert(
            "LUO".to_string(),
            Subtree {
                pa: 0x1000,
                size: 32,
                crc: Some(7),
            },
        );
        s.insert(
            "kexec-metadata".to_string(),
            Subtree {
                pa: 0x2000,
                size: 73,
                crc: None,
            },
        );
        let b = build(0x3000, 0, &s).unwrap();
        let t = parse(&b).unwrap();
        assert_eq!(t.tracker_root, 0x3000);
        assert_eq!(t.subtrees, s);
    }

    #[test]
    fn refuses_garbage_without_panicking() {
        let b = build(0x3000, 0, &BTreeMap::new()).unwrap();
        assert!(parse(&b[..b.len() / 2]).is_err());
        assert!(parse(&[]).is_err());
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 0xff;
            let _ = parse(&c);
        }
    }
}
