//! KHO wire formats: the handover tree (FDT) names, the preserved-memory radix tree, large
//! arrays (chunk chains), serialization blocks and kexec metadata.
//!
//! Layouts follow upstream's latest KHO ABI where it defines one ("kho-v4" radix tree,
//! `kho_vmalloc`, `kho_block`, `kho_kexec_metadata`); properties are native-endian u64s.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Root compatible string of the handover FDT.
pub const KHO_FDT_COMPATIBLE: &str = "kho-v4";
/// Root property: physical address of the radix tree root.
pub const PROP_PRESERVED_MEMORY_MAP: &str = "preserved-memory-map";
/// Subtree property: physical address of the client's blob.
pub const PROP_PRESERVED_DATA: &str = "preserved-data";
/// Subtree property: size of the client's blob in bytes.
pub const PROP_BLOB_SIZE: &str = "blob-size";
/// Root property (our extension): CRC-32 over the tracker's node pages in address order.
pub const PROP_TRACKER_CRC: &str = "tracker-crc32";
/// Subtree property (our extension): CRC-32 of the blob, u32 native endian.
pub const PROP_BLOB_CRC: &str = "blob-crc32";
/// The subtree listing a CRC-32 for every page of handover metadata (our extension).
pub const INTEGRITY_NAME: &str = "kho-integrity";
/// Compatible string in [`IntegrityHeader::compatible`]; the next image refuses any other.
pub const INTEGRITY_COMPATIBLE: &str = "kho-integrity-v1";

/// Header of the integrity table; the entries are a preserved array.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct IntegrityHeader {
    /// [`INTEGRITY_COMPATIBLE`], NUL-padded.
    pub compatible: [u8; 24],
    /// Number of [`IntegrityEntry`] records (24 bytes each) in `entries`.
    pub nr_entries: u64,
    /// The preserved array holding the entries.
    pub entries: KhoArraySer,
    /// CRC-32 of the entries' bytes.
    pub entries_crc: u32,
    /// Padding to a multiple of 8 bytes; written as zero.
    pub _pad: u32,
}

/// One checksummed range of metadata.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct IntegrityEntry {
    /// Physical address of one metadata allocation (page-aligned).
    pub pa: u64,
    /// Its length in bytes.
    pub len: u64,
    /// CRC-32 of those `len` bytes at finalize time.
    pub crc: u32,
    /// Padding to 24 bytes; written as zero.
    pub _pad: u32,
}
/// The subtree KHO itself writes.
pub const KEXEC_METADATA_NAME: &str = "kexec-metadata";
/// Largest handover FDT we accept.
pub const MAX_FDT_SIZE: u64 = 1 << 20;

// Radix tree geometry for 4 KiB pages (upstream KHO_* constants).
/// Bit position of the order marker in a radix key for order 0 (64 minus the 12 page-offset
/// bits); an order-`n` key has its marker at `52 - n`.
pub const KHO_ORDER_0_LOG2: u32 = 52;
/// log2 of the entries in one table node: 512 eight-byte physical addresses fill a page.
pub const KHO_TABLE_SIZE_LOG2: u32 = 9;
/// log2 of the bits in one leaf bitmap: 32768 bits fill a page.
pub const KHO_BITMAP_SIZE_LOG2: u32 = 15;
/// Table levels above the leaf bitmaps (levels 5..=1); the leaf is level 0.
pub const KHO_TABLE_LEVELS: u32 = 5;
/// Levels of the radix tree counting the leaf level.
pub const KHO_TREE_MAX_DEPTH: u32 = KHO_TABLE_LEVELS + 1;
/// Largest folio order the tracker accepts from a handover (1 TiB blocks).
pub const KHO_MAX_PRESERVE_ORDER: u32 = 28;

/// The radix key of a preserved block: a marker bit for the order above the PFN bits.
pub fn radix_key(pfn: u64, order: u32) -> u64 {
    (1u64 << (KHO_ORDER_0_LOG2 - order)) | (pfn >> order)
}

/// Decode a radix key into `(pfn, order)`; `None` for a key with no marker bit or an order
/// beyond the tracker's range.
pub fn radix_key_decode(key: u64) -> Option<(u64, u32)> {
    if key == 0 {
        return None;
    }
    let fls = 64 - key.leading_zeros();
    let order = (KHO_ORDER_0_LOG2 + 1).checked_sub(fls)?;
    let pfn_high = key & !(1u64 << (KHO_ORDER_0_LOG2 - order));
    Some((pfn_high << order, order))
}

/// Index into the table at `level` (1..=5) for `key`.
pub fn radix_index(key: u64, level: u32) -> usize {
    ((key >> ((level - 1) * KHO_TABLE_SIZE_LOG2 + KHO_BITMAP_SIZE_LOG2)) & 511) as usize
}

/// One page holding up to 511 physical addresses of a large array, zero-terminated, plus the
/// address of the next chunk (upstream `kho_vmalloc_chunk`).
pub const KHO_ARRAY_CHUNK_ENTRIES: usize = 511;

/// Descriptor of a preserved large array (upstream `struct kho_vmalloc`, 16 bytes).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct KhoArraySer {
    /// Physical address of the first chunk page (0: empty array).
    pub first: u64,
    /// Number of data pages.
    pub total_pages: u32,
    /// Upstream `KHO_VMALLOC_*` flags; we write 0 and refuse anything else on restore.
    pub flags: u16,
    /// Order of each data block (we use 0).
    pub order: u16,
}

/// Header of a serialization block (upstream `kho_block_header_ser`); entries follow.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct KhoBlockHeader {
    /// Physical address of the next block of the chain (0: last block).
    pub next: u64,
    /// Number of entries used in this block (1 up to the per-block capacity).
    pub count: u64,
}

/// Size of [`KhoBlockHeader`] in bytes; entries start at this offset in the block page.
pub const KHO_BLOCK_HEADER_SIZE: usize = 16;
/// Longest block chain accepted (upstream KHO_MAX_BLOCKS).
pub const KHO_MAX_BLOCKS: usize = 10_000;

/// Version of the `kexec-metadata` blob we write. Version 2 is our extension: the 73 bytes of
/// [`KexecMetadata`] followed by the path of the image that wrote it (where a failed update
/// rolls back to), NUL-padded to [`IMAGE_PATH_LEN`] bytes.
pub const KEXEC_METADATA_VERSION: u32 = 2;
/// Upstream's version: the 73 bytes alone, no image path. Still accepted on boot.
pub const KEXEC_METADATA_V1: u32 = 1;
/// Bytes of the image path that follows a version-2 blob.
pub const IMAGE_PATH_LEN: usize = 256;
/// Size of the release string field (upstream `__NEW_UTS_LEN + 1`).
pub const RELEASE_LEN: usize = 65;
/// `kexec-metadata` blob (upstream `struct kho_kexec_metadata`, packed, 73 bytes).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C, packed)]
pub struct KexecMetadata {
    /// [`KEXEC_METADATA_VERSION`] or [`KEXEC_METADATA_V1`].
    pub version: u32,
    /// Version string of the image that wrote the blob, NUL-terminated.
    pub previous_release: [u8; RELEASE_LEN],
    /// kexecs since the last cold boot, counting the one this blob describes.
    pub kexec_count: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_match_upstream() {
        assert_eq!(std::mem::size_of::<KhoArraySer>(), 16);
        assert_eq!(std::mem::size_of::<KhoBlockHeader>(), KHO_BLOCK_HEADER_SIZE);
        assert_eq!(std::mem::size_of::<KexecMetadata>(), 73);
    }

    #[test]
    fn key_round_trip() {
        for (pfn, order) in [
            (0, 0),
            (1, 0),
            (4096, 10),
            (1 << 30, 18),
            ((1 << 40) - 1, 0),
        ] {
            let k = radix_key(pfn, order);
            assert_eq!(radix_key_decode(k), Some((pfn, order)));
            assert!(k < 1 << 53);
        }
        assert_eq!(radix_key_decode(0), None);
    }
}
