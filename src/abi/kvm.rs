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

pub const KVM_GET_API_VERSION: u64 = io(0x00);
/// Argument: the VM type, as 8 native-endian bytes.
pub const KVM_CREATE_VM: u64 = io(0x01);
/// Argument: the capability number, as 8 bytes; returns its value.
pub const KVM_CHECK_EXTENSION: u64 = io(0x03);
/// Argument: the vCPU id, as 8 bytes; returns a vCPU fd.
pub const KVM_CREATE_VCPU: u64 = io(0x41);
pub const KVM_SET_USER_MEMORY_REGION2: u64 = iow(0x49, 160);
pub const KVM_CREATE_GUEST_MEMFD: u64 = iowr(0xd4, 64);

pub const KVM_CAP_GUEST_MEMFD: u64 = 234;
/// Not in kvm-bindings yet: the supported guest_memfd flags.
pub const KVM_CAP_GUEST_MEMFD_FLAGS: u64 = 244;
pub const GUEST_MEMFD_FLAG_MMAP: u64 = 1 << 0;
pub const GUEST_MEMFD_FLAG_INIT_SHARED: u64 = 1 << 1;
pub const KVM_MEM_GUEST_MEMFD: u32 = 1 << 2;

/// `struct kvm_create_guest_memfd` (64 bytes).
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct CreateGuestMemfd {
    pub size: u64,
    pub flags: u64,
    pub reserved: [u64; 6],
}

/// `struct kvm_userspace_memory_region2` (160 bytes).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct UserMemoryRegion2 {
    pub slot: u32,
    pub flags: u32,
    pub guest_phys_addr: u64,
    pub memory_size: u64,
    pub userspace_addr: u64,
    pub guest_memfd_offset: u64,
    pub guest_memfd: u32,
    pub pad1: u32,
    pub pad2: [u64; 14],
}

impl Default for UserMemoryRegion2 {
    fn default() -> Self {
        Self::new_zeroed()
    }
}

// ---- serialization (the RFC) ----

pub const KVM_LUO_FH_COMPATIBLE: &str = "kvm_vm_luo_v1";
pub const GUEST_MEMFD_LUO_FH_COMPATIBLE: &str = "guest_memfd_luo_v1";

/// `struct kvm_luo_ser`.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct KvmLuoSer {
    pub vm_type: u64,
}

pub const GUEST_MEMFD_LUO_FOLIO_UPTODATE: u64 = 1 << 0;
pub const GUEST_MEMFD_LUO_FLAG_MMAP: u64 = 1 << 0;
pub const GUEST_MEMFD_LUO_FLAG_INIT_SHARED: u64 = 1 << 1;
pub const GUEST_MEMFD_LUO_SUPPORTED_FLAGS: u64 =
    GUEST_MEMFD_LUO_FLAG_MMAP | GUEST_MEMFD_LUO_FLAG_INIT_SHARED;

/// `struct guest_memfd_luo_ser` (48 bytes).
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct GuestMemfdLuoSer {
    pub size: u64,
    pub flags: u64,
    pub nr_folios: u64,
    pub vm_token: u64,
    pub folios: KhoArraySer,
}

/// `struct guest_memfd_luo_folio_ser`: pfn in bits 0..52, flags above; then the index.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct GuestMemfdFolioSer {
    pub pfn_flags: u64,
    pub index: u64,
}

impl GuestMemfdFolioSer {
    pub fn new(pfn: u64, flags: u64, index: u64) -> Self {
        Self {
            pfn_flags: (pfn & ((1 << 52) - 1)) | (flags << 52),
            index,
        }
    }
    pub fn pfn(&self) -> u64 {
        self.pfn_flags & ((1 << 52) - 1)
    }
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
    pub size: u64,
    pub flags: u64,
    /// Pages present (sum of the runs).
    pub nr_folios: u64,
    pub vm_token: u64,
    pub runs: KhoArraySer,
    pub nr_runs: u64,
}

/// One run: `nr_pages` folios at `index..`, backed by frames `pfn..` (24 bytes).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct GuestMemfdRunSer {
    pub index: u64,
    /// pfn in bits 0..52, folio flags above (as v1).
    pub pfn_flags: u64,
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
