//! KVM user API numbers and structs we serve, and the RFC's KVM / guest_memfd serialization
//! ABI (`include/linux/kho/abi/kvm.h`).

use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout};

use super::kho::KhoArraySer;

const KVMIO: u64 = 0xAE;

const fn io(nr: u64) -> u64 {
    (KVMIO << 8) | nr
}
const fn iow(nr: u64, size: u64) -> u64 {
    (1 << 30) | (size << 16) | (KVMIO << 8) | nr
}
const fn iowr(nr: u64, size: u64) -> u64 {
    (3 << 30) | (size << 16) | (KVMIO << 8) | nr
}

/// On `/dev/kvm`, no argument; returns the KVM API version (12).
pub const KVM_GET_API_VERSION: u64 = io(0x00);
/// Argument: the VM type, as 8 native-endian bytes.
pub const KVM_CREATE_VM: u64 = io(0x01);
/// Argument: the capability number, as 8 bytes; returns its value.
pub const KVM_CHECK_EXTENSION: u64 = io(0x03);
/// Argument: the vCPU id, as 8 bytes; returns a vCPU fd.
pub const KVM_CREATE_VCPU: u64 = io(0x41);
/// VM ioctl that creates, moves or deletes a memslot; argument [`UserMemoryRegion2`]
/// (`struct kvm_userspace_memory_region2`, 160 bytes).
pub const KVM_SET_USER_MEMORY_REGION2: u64 = iow(0x49, 160);
/// VM ioctl that creates a guest_memfd and returns its fd; argument [`CreateGuestMemfd`]
/// (`struct kvm_create_guest_memfd`, 64 bytes).
pub const KVM_CREATE_GUEST_MEMFD: u64 = iowr(0xd4, 64);

/// Capability number: non-zero when `KVM_CREATE_GUEST_MEMFD` is available.
pub const KVM_CAP_GUEST_MEMFD: u64 = 234;
/// Not in kvm-bindings yet: the supported guest_memfd flags.
pub const KVM_CAP_GUEST_MEMFD_FLAGS: u64 = 244;
/// guest_memfd creation flag: the file may be `mmap`ed (`MAP_SHARED` only; ENODEV without it).
pub const GUEST_MEMFD_FLAG_MMAP: u64 = 1 << 0;
/// guest_memfd creation flag: memory starts shared with the host, so host faults succeed.
pub const GUEST_MEMFD_FLAG_INIT_SHARED: u64 = 1 << 1;
/// Memslot flag of [`UserMemoryRegion2::flags`]: the slot is backed by `guest_memfd`.
pub const KVM_MEM_GUEST_MEMFD: u32 = 1 << 2;

/// `struct kvm_create_guest_memfd` (64 bytes).
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct CreateGuestMemfd {
    /// File size in bytes: non-zero and page-aligned (EINVAL otherwise).
    pub size: u64,
    /// `GUEST_MEMFD_FLAG_*` bits; an unsupported bit is EINVAL.
    pub flags: u64,
    /// Must be zero (EINVAL otherwise).
    pub reserved: [u64; 6],
}

/// `struct kvm_userspace_memory_region2` (160 bytes).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct UserMemoryRegion2 {
    /// Slot number, the key of later changes to the slot.
    pub slot: u32,
    /// `KVM_MEM_*` flags; we accept only [`KVM_MEM_GUEST_MEMFD`] (EINVAL otherwise).
    pub flags: u32,
    /// First guest physical address of the slot.
    pub guest_phys_addr: u64,
    /// Size of the slot in bytes; 0 deletes the slot.
    pub memory_size: u64,
    /// Address of the slot's memory in the caller's address space.
    pub userspace_addr: u64,
    /// Byte offset into the guest_memfd where the slot starts (with `KVM_MEM_GUEST_MEMFD`).
    pub guest_memfd_offset: u64,
    /// The guest_memfd's fd (with `KVM_MEM_GUEST_MEMFD`).
    pub guest_memfd: u32,
    /// Must be zero (EINVAL otherwise).
    pub pad1: u32,
    /// Must be zero (EINVAL otherwise).
    pub pad2: [u64; 14],
}

impl Default for UserMemoryRegion2 {
    fn default() -> Self {
        Self::new_zeroed()
    }
}

// ---- serialization (the RFC) ----

/// Compatible string of the KVM VM file handler; its blob is [`KvmLuoSer`].
pub const KVM_LUO_FH_COMPATIBLE: &str = "kvm_vm_luo_v1";
/// Compatible string of the RFC's guest_memfd file handler; its blob is [`GuestMemfdLuoSer`].
pub const GUEST_MEMFD_LUO_FH_COMPATIBLE: &str = "guest_memfd_luo_v1";

/// `struct kvm_luo_ser`.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct KvmLuoSer {
    /// The VM type passed to `KVM_CREATE_VM`; retrieve creates an empty VM of this type.
    pub vm_type: u64,
}

/// Folio flag in a folio or run entry: the folio's contents are valid (it was initialised).
pub const GUEST_MEMFD_LUO_FOLIO_UPTODATE: u64 = 1 << 0;
/// File flag in the blob: the file had `GUEST_MEMFD_FLAG_MMAP`. ABI bits are kept apart from
/// the creation flags so they stay stable across kernels.
pub const GUEST_MEMFD_LUO_FLAG_MMAP: u64 = 1 << 0;
/// File flag in the blob: the file had `GUEST_MEMFD_FLAG_INIT_SHARED`.
pub const GUEST_MEMFD_LUO_FLAG_INIT_SHARED: u64 = 1 << 1;
/// Every file flag a blob may carry; retrieve refuses others with EOPNOTSUPP.
pub const GUEST_MEMFD_LUO_SUPPORTED_FLAGS: u64 =
    GUEST_MEMFD_LUO_FLAG_MMAP | GUEST_MEMFD_LUO_FLAG_INIT_SHARED;

/// `struct guest_memfd_luo_ser` (48 bytes).
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct GuestMemfdLuoSer {
    /// File size in bytes (page-aligned, non-zero).
    pub size: u64,
    /// `GUEST_MEMFD_LUO_FLAG_*` bits.
    pub flags: u64,
    /// Number of [`GuestMemfdFolioSer`] entries: the folios present at preserve time.
    pub nr_folios: u64,
    /// LUO token of the owning VM file in the same session; 0 until `freeze` fills it in.
    pub vm_token: u64,
    /// Preserved array of the folio entries.
    pub folios: KhoArraySer,
}

/// `struct guest_memfd_luo_folio_ser`: pfn in bits 0..52, flags above; then the index.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct GuestMemfdFolioSer {
    /// Frame number in bits 0..52, `GUEST_MEMFD_LUO_FOLIO_*` flags in bits 52..64.
    pub pfn_flags: u64,
    /// Page index of the folio in the file.
    pub index: u64,
}

impl GuestMemfdFolioSer {
    /// Pack an entry; `pfn` is cut to 52 bits and `flags` to 12.
    pub fn new(pfn: u64, flags: u64, index: u64) -> Self {
        Self {
            pfn_flags: (pfn & ((1 << 52) - 1)) | (flags << 52),
            index,
        }
    }
    /// The frame number (bits 0..52).
    pub fn pfn(&self) -> u64 {
        self.pfn_flags & ((1 << 52) - 1)
    }
    /// The folio flags (bits 52..64).
    pub fn flags(&self) -> u64 {
        self.pfn_flags >> 52
    }
}

/// Our compact successor of "guest_memfd_luo_v1": the folio list holds runs of consecutive
/// indexes backed by consecutive frames, so a guest_memfd allocated in one go costs a few
/// entries whatever its size. v1 stays readable.
pub const GUEST_MEMFD_LUO_V2_FH_COMPATIBLE: &str = "guest_memfd_luo_v2";

/// `guest_memfd_luo_v2` blob (56 bytes): the v1 header (`vm_token` at the same offset) with
/// the run list and its length.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct GuestMemfdLuoSerV2 {
    /// File size in bytes (page-aligned, non-zero).
    pub size: u64,
    /// `GUEST_MEMFD_LUO_FLAG_*` bits.
    pub flags: u64,
    /// Pages present (sum of the runs).
    pub nr_folios: u64,
    /// LUO token of the owning VM file in the same session; 0 until `freeze` fills it in.
    pub vm_token: u64,
    /// Preserved array of [`GuestMemfdRunSer`] entries.
    pub runs: KhoArraySer,
    /// Number of entries in `runs`.
    pub nr_runs: u64,
}

/// One run: `nr_pages` folios at `index..`, backed by frames `pfn..` (24 bytes).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct GuestMemfdRunSer {
    /// Page index in the file of the run's first folio.
    pub index: u64,
    /// pfn in bits 0..52, folio flags above (as v1).
    pub pfn_flags: u64,
    /// Length of the run in pages (at least 1).
    pub nr_pages: u64,
}

/// Offset of `vm_token` in both blob versions.
pub const GUEST_MEMFD_LUO_VM_TOKEN_OFFSET: u64 = 24;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_numbers() {
        assert_eq!(std::mem::size_of::<CreateGuestMemfd>(), 64);
        assert_eq!(std::mem::size_of::<UserMemoryRegion2>(), 160);
        assert_eq!(std::mem::size_of::<GuestMemfdLuoSer>(), 48);
        assert_eq!(std::mem::size_of::<GuestMemfdFolioSer>(), 16);
        assert_eq!(std::mem::size_of::<KvmLuoSer>(), 8);
        assert_eq!(std::mem::size_of::<GuestMemfdLuoSerV2>(), 56);
        assert_eq!(std::mem::size_of::<GuestMemfdRunSer>(), 24);
        assert_eq!(std::mem::offset_of!(GuestMemfdLuoSer, vm_token), 24);
        assert_eq!(std::mem::offset_of!(GuestMemfdLuoSerV2, vm_token), 24);
        assert_eq!(KVM_CREATE_GUEST_MEMFD, 0xc040_aed4);
        assert_eq!(KVM_SET_USER_MEMORY_REGION2, 0x40a0_ae49);
        assert_eq!(
            KVM_CAP_GUEST_MEMFD,
            kvm_bindings::KVM_CAP_GUEST_MEMFD as u64
        );
        assert_eq!(KVM_MEM_GUEST_MEMFD, kvm_bindings::KVM_MEM_GUEST_MEMFD);
    }
}
