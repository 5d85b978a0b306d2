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

// ---- private memory and in-place conversion (the in-flight upstream series, see
// docs/private-memory.md for the version followed) ----

/// Capability number: bit `1 << type` for each VM type `KVM_CREATE_VM` accepts.
pub const KVM_CAP_VM_TYPES: u64 = 235;
/// The default x86 VM type (no private memory).
pub const KVM_X86_DEFAULT_VM: u64 = 0;
/// The software-protected x86 VM type: private memory without hardware protection.
pub const KVM_X86_SW_PROTECTED_VM: u64 = 1;
/// Capability number ("guest_memfd: In-place conversion support" v6-v8): the memory
/// attributes `KVM_SET_MEMORY_ATTRIBUTES2` on a guest_memfd accepts (PRIVATE), 0 if none.
pub const KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES: u64 = 250;
/// Memory attribute: the pages are private to the guest.
pub const KVM_MEMORY_ATTRIBUTE_PRIVATE: u64 = 1 << 3;
/// guest_memfd ioctl: set the attributes of a byte range of the file in place; argument
/// [`MemoryAttributes2`] (`struct kvm_memory_attributes2`, 128 bytes, read and written).
pub const KVM_SET_MEMORY_ATTRIBUTES2: u64 = iowr(0xd2, 128);
/// guest_memfd creation flag (ours: the upstream HugeTLB series has not fixed its bit):
/// folios of `2^page_order` pages from the host's huge-page pool; the file starts private.
pub const GUEST_MEMFD_FLAG_HUGETLB: u64 = 1 << 2;

/// `struct kvm_memory_attributes2` (128 bytes).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct MemoryAttributes2 {
    /// Byte offset into the guest_memfd (page-aligned).
    pub offset: u64,
    /// Bytes (page-aligned, non-zero).
    pub size: u64,
    /// 0 (shared) or [`KVM_MEMORY_ATTRIBUTE_PRIVATE`].
    pub attributes: u64,
    /// Must be 0.
    pub flags: u64,
    /// Out, on EAGAIN: byte offset of the first page that could not be converted.
    pub error_offset: u64,
    /// Must be 0.
    pub reserved: [u64; 11],
}

/// `struct kvm_create_guest_memfd` (64 bytes), with the HugeTLB series' `page_order` taken
/// out of the reserved space.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct CreateGuestMemfd {
    /// File size in bytes: non-zero and page-aligned (EINVAL otherwise).
    pub size: u64,
    /// `GUEST_MEMFD_FLAG_*` bits; an unsupported bit is EINVAL.
    pub flags: u64,
    /// With [`GUEST_MEMFD_FLAG_HUGETLB`]: log2 of the folio size in pages (9: 2 MiB, 18:
    /// 1 GiB); must be 0 without it (EINVAL).
    pub page_order: u8,
    /// Must be zero (EINVAL otherwise).
    pub pad: [u8; 7],
    /// Must be zero (EINVAL otherwise).
    pub reserved: [u64; 5],
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

/// Compatible string of our VM file handler that carries the VM's state (irqchip, PIT, routing,
/// clock, real-mode addresses); its blob is [`KvmVmLuoSerV2`]. v1 stays readable.
pub const KVM_VM_LUO_V2_FH_COMPATIBLE: &str = "kvm_vm_luo_v2";

/// `kvm_vm_luo_v2` blob (32 bytes): the VM type (written at preserve) and where the VM's
/// saved state is (a `crate::abi::vm_state` encoding, written at freeze).
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct KvmVmLuoSerV2 {
    /// The VM type passed to `KVM_CREATE_VM` (as v1).
    pub vm_type: u64,
    /// Physical address of the preserved state; 0 until freeze.
    pub state_pa: u64,
    /// Its length in bytes.
    pub state_len: u64,
    /// Zero.
    pub reserved: u64,
}

/// Largest VM state blob a retrieve accepts (a full routing table is 256 KiB).
pub const KVM_VM_LUO_MAX_STATE: u64 = 1 << 20;

/// Compatible string of the vCPU file handler (after the "Orphaned Virtual Machines" RFC's
/// `kvm_vcpu_luo_v1`); its blob is [`KvmVcpuLuoSer`].
pub const KVM_VCPU_LUO_FH_COMPATIBLE: &str = "kvm_vcpu_luo_v1";

/// `kvm_vcpu_luo_v1` blob (32 bytes): which vCPU of which VM, and where its saved state is.
/// Written at preserve (`vcpu_id`) and completed at freeze (the rest).
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct KvmVcpuLuoSer {
    /// LUO token of the vCPU's VM file in the same session; 0 until freeze.
    pub vm_token: u64,
    /// The id given to `KVM_CREATE_VCPU`; retrieve creates the vCPU with the same id.
    pub vcpu_id: u64,
    /// Physical address of the preserved state: a `crate::abi::vcpu_state` encoding (magic,
    /// version, tagged sections, CRC-32); 0 until freeze.
    pub state_pa: u64,
    /// Its length in bytes.
    pub state_len: u64,
}

/// Largest vCPU state blob a retrieve accepts (the encoding of a vCPU with the largest XSAVE
/// area, every MSR and every CPUID entry is well below).
pub const KVM_VCPU_LUO_MAX_STATE: u64 = 4 << 20;

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

/// Offset of `vm_token` in every blob version.
pub const GUEST_MEMFD_LUO_VM_TOKEN_OFFSET: u64 = 24;

/// Our successor of v2 for what v1 and v2 cannot carry: files of a private-memory VM, with
/// their shared/private map, and folio orders above 0 (HugeTLB). v1 and v2 stay readable.
pub const GUEST_MEMFD_LUO_V3_FH_COMPATIBLE: &str = "guest_memfd_luo_v3";
/// File flag in the blob (v3): the file had `GUEST_MEMFD_FLAG_HUGETLB`.
pub const GUEST_MEMFD_LUO_FLAG_HUGETLB: u64 = 1 << 2;
/// Run flags (v3): the run's folio order, in bits 4..10 of the flags above the pfn.
pub const GUEST_MEMFD_LUO_RUN_ORDER_SHIFT: u64 = 4;

/// `guest_memfd_luo_v3` blob (96 bytes): the v2 header (`vm_token` at the same offset), the
/// private ranges, the file's folio order and a CRC32 of the blob and both lists.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct GuestMemfdLuoSerV3 {
    /// File size in bytes (a non-zero multiple of the folio size).
    pub size: u64,
    /// `GUEST_MEMFD_LUO_FLAG_*` bits.
    pub flags: u64,
    /// Pages present (sum of the runs).
    pub nr_folios: u64,
    /// LUO token of the owning VM file in the same session; 0 until `freeze` fills it in.
    pub vm_token: u64,
    /// Preserved array of [`GuestMemfdRunSer`] entries (with the run's order in its flags).
    pub runs: KhoArraySer,
    /// Number of entries in `runs`.
    pub nr_runs: u64,
    /// Preserved array of [`GuestMemfdRangeSer`] entries: the private page ranges.
    pub private: KhoArraySer,
    /// Number of entries in `private`.
    pub nr_private: u64,
    /// The file's folio order (0, or the HugeTLB `page_order`).
    pub page_order: u64,
    /// CRC32 (IEEE) of this blob with `vm_token` and `checksum` zero, then the bytes of the
    /// run list, then those of the private list.
    pub checksum: u64,
}

/// A page range `index..index + nr_pages` (16 bytes).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct GuestMemfdRangeSer {
    /// First page index.
    pub index: u64,
    /// Pages (at least 1).
    pub nr_pages: u64,
}

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
        assert_eq!(std::mem::size_of::<KvmVcpuLuoSer>(), 32);
        assert_eq!(std::mem::size_of::<KvmVmLuoSerV2>(), 32);
        assert_eq!(std::mem::size_of::<GuestMemfdLuoSerV2>(), 56);
        assert_eq!(std::mem::size_of::<GuestMemfdLuoSerV3>(), 96);
        assert_eq!(std::mem::offset_of!(GuestMemfdLuoSerV3, vm_token), 24);
        assert_eq!(std::mem::size_of::<MemoryAttributes2>(), 128);
        assert_eq!(std::mem::size_of::<CreateGuestMemfd>(), 64);
        assert_eq!(std::mem::offset_of!(CreateGuestMemfd, page_order), 16);
        assert_eq!(KVM_SET_MEMORY_ATTRIBUTES2, 0xc080_aed2);
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

const fn ior(nr: u64, size: u64) -> u64 {
    (2 << 30) | (size << 16) | (KVMIO << 8) | nr
}

/// VM ioctl of the original memslot call; argument `struct kvm_userspace_memory_region`
/// (32 bytes: slot, flags, guest_phys_addr, memory_size, userspace_addr).
pub const KVM_SET_USER_MEMORY_REGION: u64 = iow(0x46, 32);
/// vCPU ioctl that runs the guest until an exit; no argument.
pub const KVM_RUN: u64 = io(0x80);

/// Which file an ioctl is issued on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// `/dev/kvm`.
    System,
    /// A VM fd.
    Vm,
    /// A vCPU fd.
    Vcpu,
}

/// How an ioctl's argument reaches the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArgKind {
    /// No argument.
    None,
    /// An integer passed by value (sent as 8 native-endian bytes).
    Int,
    /// A struct of this many bytes, in place.
    Fixed(usize),
    /// A header of `header` bytes whose leading u32 counts entries of `entry` bytes that
    /// follow it (`kvm_cpuid2`, `kvm_msrs`, `kvm_msr_list`).
    Counted {
        /// Header bytes, the count at offset 0.
        header: usize,
        /// Bytes per entry.
        entry: usize,
    },
}

impl ArgKind {
    /// Bytes of `arg` the kernel may read or write for this kind; `None` if `arg` is too short
    /// for the header or the count it names overflows.
    pub fn len(self, arg: &[u8]) -> Option<usize> {
        match self {
            ArgKind::None => Some(0),
            ArgKind::Int => Some(8),
            ArgKind::Fixed(n) => Some(n),
            ArgKind::Counted { header, entry } => {
                let n = u32::from_ne_bytes(arg.get(..4)?.try_into().ok()?) as usize;
                header.checked_add(n.checked_mul(entry)?)
            }
        }
    }
}

const CPUID2: ArgKind = ArgKind::Counted {
    header: 8,
    entry: 40,
};
const MSRS: ArgKind = ArgKind::Counted {
    header: 8,
    entry: 16,
};
const MSR_LIST: ArgKind = ArgKind::Counted {
    header: 4,
    entry: 4,
};
/// `struct kvm_irq_routing`: nr, flags, then `kvm_irq_routing_entry`s of 48 bytes.
const ROUTING: ArgKind = ArgKind::Counted {
    header: 8,
    entry: 48,
};

/// VM ioctls the host records as well as passing them on: what KVM cannot be asked for later
/// and `kvm_vm_luo_v2` carries (see `kvm::vm_state::VmConfig`).
pub const KVM_SET_TSS_ADDR: u64 = io(0x47);
/// See [`KVM_SET_TSS_ADDR`]; argument a u64 address.
pub const KVM_SET_IDENTITY_MAP_ADDR: u64 = iow(0x48, 8);
/// See [`KVM_SET_TSS_ADDR`]; no argument.
pub const KVM_CREATE_IRQCHIP: u64 = io(0x60);
/// See [`KVM_SET_TSS_ADDR`]; argument `struct kvm_pit_config` (flags first).
pub const KVM_CREATE_PIT2: u64 = iow(0x77, 64);
/// See [`KVM_SET_TSS_ADDR`]; argument `struct kvm_irq_routing`.
pub const KVM_SET_GSI_ROUTING: u64 = iow(0x6a, 8);
/// `KVM_SIGNAL_MSI`: a message-signalled interrupt into the VM's in-kernel irqchip; argument
/// `struct kvm_msi` (address lo/hi, data, flags, devid, padding: 32 bytes, no pointer).
pub const KVM_SIGNAL_MSI: u64 = iow(0xa5, 32);

/// The KVM ioctls served by passing them to the real KVM as they are, with their argument
/// layout: none of them carries a pointer (so the program cannot make the host's kernel touch
/// host memory it names), and every argument's length is known. Anything else is ENOTTY.
pub const PASSTHROUGH: &[(Scope, u64, ArgKind)] = &[
    (Scope::System, io(0x04), ArgKind::None), // KVM_GET_VCPU_MMAP_SIZE
    (Scope::System, iowr(0x05, 8), CPUID2),   // KVM_GET_SUPPORTED_CPUID
    (Scope::System, iowr(0x09, 8), CPUID2),   // KVM_GET_EMULATED_CPUID
    (Scope::System, iowr(0x02, 4), MSR_LIST), // KVM_GET_MSR_INDEX_LIST
    (Scope::System, iowr(0x0a, 4), MSR_LIST), // KVM_GET_MSR_FEATURE_INDEX_LIST
    (Scope::System, iowr(0x88, 8), MSRS),     // KVM_GET_MSRS (feature MSRs)
    (Scope::Vm, KVM_SET_TSS_ADDR, ArgKind::Int),
    (Scope::Vm, KVM_SET_IDENTITY_MAP_ADDR, ArgKind::Fixed(8)),
    (Scope::Vm, KVM_CREATE_IRQCHIP, ArgKind::None),
    (Scope::Vm, KVM_SET_GSI_ROUTING, ROUTING),
    (Scope::Vm, iow(0x61, 8), ArgKind::Fixed(8)), // KVM_IRQ_LINE
    (Scope::Vm, iowr(0x67, 8), ArgKind::Fixed(8)), // KVM_IRQ_LINE_STATUS
    (Scope::Vm, KVM_SIGNAL_MSI, ArgKind::Fixed(32)),
    (Scope::Vm, iowr(0x62, 520), ArgKind::Fixed(520)), // KVM_GET_IRQCHIP
    (Scope::Vm, ior(0x63, 520), ArgKind::Fixed(520)),  // KVM_SET_IRQCHIP
    (Scope::Vm, KVM_CREATE_PIT2, ArgKind::Fixed(64)),
    (Scope::Vm, ior(0x9f, 112), ArgKind::Fixed(112)), // KVM_GET_PIT2
    (Scope::Vm, iow(0xa0, 112), ArgKind::Fixed(112)), // KVM_SET_PIT2
    (Scope::Vm, iow(0x7b, 48), ArgKind::Fixed(48)),   // KVM_SET_CLOCK
    (Scope::Vm, ior(0x7c, 48), ArgKind::Fixed(48)),   // KVM_GET_CLOCK
    (Scope::Vcpu, ior(0x81, 144), ArgKind::Fixed(144)), // KVM_GET_REGS
    (Scope::Vcpu, iow(0x82, 144), ArgKind::Fixed(144)), // KVM_SET_REGS
    (Scope::Vcpu, ior(0x83, 312), ArgKind::Fixed(312)), // KVM_GET_SREGS
    (Scope::Vcpu, iow(0x84, 312), ArgKind::Fixed(312)), // KVM_SET_SREGS
    (Scope::Vcpu, iowr(0x85, 24), ArgKind::Fixed(24)), // KVM_TRANSLATE
    (Scope::Vcpu, iow(0x86, 4), ArgKind::Fixed(4)),   // KVM_INTERRUPT
    (Scope::Vcpu, iowr(0x88, 8), MSRS),               // KVM_GET_MSRS
    (Scope::Vcpu, iow(0x89, 8), MSRS),                // KVM_SET_MSRS
    (Scope::Vcpu, ior(0x8c, 416), ArgKind::Fixed(416)), // KVM_GET_FPU
    (Scope::Vcpu, iow(0x8d, 416), ArgKind::Fixed(416)), // KVM_SET_FPU
    (Scope::Vcpu, ior(0x8e, 1024), ArgKind::Fixed(1024)), // KVM_GET_LAPIC
    (Scope::Vcpu, iow(0x8f, 1024), ArgKind::Fixed(1024)), // KVM_SET_LAPIC
    (Scope::Vcpu, iow(0x90, 8), CPUID2),              // KVM_SET_CPUID2
    (Scope::Vcpu, iowr(0x91, 8), CPUID2),             // KVM_GET_CPUID2
    (Scope::Vcpu, ior(0x98, 4), ArgKind::Fixed(4)),   // KVM_GET_MP_STATE
    (Scope::Vcpu, iow(0x99, 4), ArgKind::Fixed(4)),   // KVM_SET_MP_STATE
    (Scope::Vcpu, io(0x9a), ArgKind::None),           // KVM_NMI
    (Scope::Vcpu, ior(0x9f, 64), ArgKind::Fixed(64)), // KVM_GET_VCPU_EVENTS
    (Scope::Vcpu, iow(0xa0, 64), ArgKind::Fixed(64)), // KVM_SET_VCPU_EVENTS
    (Scope::Vcpu, ior(0xa1, 128), ArgKind::Fixed(128)), // KVM_GET_DEBUGREGS
    (Scope::Vcpu, iow(0xa2, 128), ArgKind::Fixed(128)), // KVM_SET_DEBUGREGS
    (Scope::Vcpu, io(0xa2), ArgKind::Int),            // KVM_SET_TSC_KHZ
    (Scope::Vcpu, io(0xa3), ArgKind::None),           // KVM_GET_TSC_KHZ
    (Scope::Vcpu, ior(0xa4, 4096), ArgKind::Fixed(4096)), // KVM_GET_XSAVE
    (Scope::Vcpu, iow(0xa5, 4096), ArgKind::Fixed(4096)), // KVM_SET_XSAVE
    (Scope::Vcpu, ior(0xa6, 392), ArgKind::Fixed(392)), // KVM_GET_XCRS
    (Scope::Vcpu, iow(0xa7, 392), ArgKind::Fixed(392)), // KVM_SET_XCRS
    (Scope::Vcpu, io(0xad), ArgKind::None),           // KVM_KVMCLOCK_CTRL
];

/// The argument layout of pass-through ioctl `cmd` on a file of `scope`, if it is one.
pub fn passthrough(scope: Scope, cmd: u64) -> Option<ArgKind> {
    PASSTHROUGH
        .iter()
        .find(|(s, c, _)| *s == scope && *c == cmd)
        .map(|(_, _, k)| *k)
}

#[cfg(test)]
mod passthrough_tests {
    use super::*;
    use kvm_bindings::*;

    /// The fixed sizes are the kernel's struct sizes (kvm-bindings' x86-64 layouts), and the
    /// size bits of each command agree with them.
    #[test]
    fn sizes_match_the_uapi_structs() {
        let fixed = |cmd: u64| match PASSTHROUGH.iter().find(|(_, c, _)| *c == cmd) {
            Some((_, _, ArgKind::Fixed(n))) => *n,
            other => panic!("{cmd:#x}: {other:?}"),
        };
        assert_eq!(fixed(ior(0x81, 144)), std::mem::size_of::<kvm_regs>());
        assert_eq!(fixed(ior(0x83, 312)), std::mem::size_of::<kvm_sregs>());
        assert_eq!(fixed(ior(0x8c, 416)), std::mem::size_of::<kvm_fpu>());
        assert_eq!(
            fixed(ior(0x8e, 1024)),
            std::mem::size_of::<kvm_lapic_state>()
        );
        assert_eq!(fixed(ior(0x9f, 64)), std::mem::size_of::<kvm_vcpu_events>());
        assert_eq!(fixed(ior(0xa1, 128)), std::mem::size_of::<kvm_debugregs>());
        assert_eq!(fixed(ior(0xa4, 4096)), std::mem::size_of::<kvm_xsave>());
        assert_eq!(fixed(ior(0xa6, 392)), std::mem::size_of::<kvm_xcrs>());
        assert_eq!(fixed(ior(0x7c, 48)), std::mem::size_of::<kvm_clock_data>());
        assert_eq!(fixed(iowr(0x62, 520)), std::mem::size_of::<kvm_irqchip>());
        assert_eq!(fixed(ior(0x9f, 112)), std::mem::size_of::<kvm_pit_state2>());
        assert_eq!(fixed(iow(0x77, 64)), std::mem::size_of::<kvm_pit_config>());
        assert_eq!(std::mem::size_of::<kvm_cpuid_entry2>(), 40);
        assert_eq!(std::mem::size_of::<kvm_msr_entry>(), 16);
        assert_eq!(std::mem::size_of::<kvm_irq_routing_entry>(), 48);
        assert_eq!(std::mem::size_of::<kvm_irq_routing>(), 8);
        for (_, cmd, kind) in PASSTHROUGH {
            let bits = ((cmd >> 16) & 0x3fff) as usize;
            match kind {
                ArgKind::Fixed(n) => assert_eq!(bits, *n, "{cmd:#x}"),
                ArgKind::Counted { header, .. } => assert_eq!(bits, *header, "{cmd:#x}"),
                ArgKind::None | ArgKind::Int => assert_eq!(bits, 0, "{cmd:#x}"),
            }
        }
        let mut a = [0u8; 8];
        a[..4].copy_from_slice(&3u32.to_ne_bytes());
        assert_eq!(CPUID2.len(&a), Some(8 + 3 * 40));
        assert_eq!(CPUID2.len(&[1, 2]), None);
    }
}
