//! Where the image lives in guest physical memory: addresses and sizes, GDT selectors and the
//! guest's I/O ports.

/// Size of a guest page.
pub const PAGE_SIZE: u64 = 0x1000;
/// Guest physical address of the parameter/result mailbox page.
pub const MAILBOX_GPA: u64 = 0x1000;
/// Bytes of the mailbox that carry fields (the rest of the page is zero).
pub const MAILBOX_LEN: usize = 0x40;
/// Guest physical address of the GDT.
pub const GDT_GPA: u64 = 0x2000;
/// Guest physical address of the program; the initial RIP.
pub const CODE_GPA: u64 = 0x3000;
/// Initial RSP (the stack grows down into `0x4000..0x6000`).
pub const STACK_TOP: u64 = 0x6000;
/// Guest physical address of the 64-bit TSS (with its I/O permission bitmap).
pub const TSS_GPA: u64 = 0x6000;
/// Offset of the I/O permission bitmap inside the TSS (just after the 104-byte TSS proper).
pub const TSS_IOMAP_OFFSET: u64 = 0x68;
/// TSS limit: TSS proper + 65536 bits of bitmap + the mandatory trailing `0xff` byte.
pub const TSS_LIMIT: u32 = (TSS_IOMAP_OFFSET + 0x2000) as u32;
/// Guest physical address of the PML4 (the initial CR3).
pub const PML4_GPA: u64 = 0x9000;
/// Guest physical address of the single PDPT.
pub const PDPT_GPA: u64 = 0xa000;
/// Guest physical address of the first page directory; one per GiB of identity map follow.
pub const PD_GPA: u64 = 0xb000;
/// GiB of guest physical space identity mapped with 2 MiB pages (user, writable).
pub const IDENTITY_MAP_GIB: u64 = 64;
/// Bytes of guest physical space identity mapped: `0..IDENTITY_MAP_SIZE`.
pub const IDENTITY_MAP_SIZE: u64 = IDENTITY_MAP_GIB << 30;
/// Bytes at GPA 0 that [`build_image`](super::build_image) writes; the low memory slot must
/// cover at least this.
pub const LOW_IMAGE_SIZE: usize = (PD_GPA + IDENTITY_MAP_GIB * PAGE_SIZE) as usize;
/// Recommended size of the low memory slot at GPA 0 (one 2 MiB guest page).
pub const LOW_MEM_SIZE: usize = 2 << 20;

/// GDT selector of the 64-bit kernel code segment (unused by the guest; present for completeness).
pub const KERNEL_CS: u16 = 0x10;
/// GDT selector of the kernel data segment (unused by the guest).
pub const KERNEL_DS: u16 = 0x18;
/// Selector of the user data segment (RPL 3): SS, DS, ES, FS, GS.
pub const USER_DS: u16 = 0x2b;
/// Selector of the 64-bit user code segment (RPL 3): CS.
pub const USER_CS: u16 = 0x33;
/// Selector of the TSS (TR).
pub const TSS_SEL: u16 = 0x40;

/// `OUT` (32-bit): the guest reports a `STATUS_*` value here.
pub const PORT_STATUS: u16 = 0x0e80;
/// `IN` (32-bit): the VMM answers host monotonic time in microseconds, low 32 bits.
pub const PORT_CLOCK: u16 = 0x0e84;
/// `IN` (32-bit): the VMM answers 0 to keep the guest looping, non-zero to make it verify.
pub const PORT_PROCEED: u16 = 0x0e88;
