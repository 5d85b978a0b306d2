//! The test guest: a tiny long-mode program that runs entirely at CPL3 on the real `/dev/kvm`.
//!
//! On this machine's KVM (`kvm_pvm`, a paravirtual nested KVM) privileged guest code is emulated
//! and slow, while user-mode code runs natively. So the guest is started *directly* in 64-bit
//! mode at CPL3 — CS = 64-bit user code (DPL 3), SS/DS = user data, every page-table entry with
//! U/S = 1 — and never needs CPL0: no IDT, no interrupts, no exceptions (a guest bug shows up as
//! `KVM_EXIT_SHUTDOWN`). See `docs/kvm-probe.md` for the measurements behind these choices.
//!
//! Port I/O at CPL3: `kvm_pvm` forces the guest's RFLAGS.IOPL to 0 while in user mode, so
//! IOPL = 3 alone does not work here (the `out` raises #GP). The image therefore carries a TSS
//! whose I/O permission bitmap grants exactly the guest's ports; `kvm_pvm` honours it and turns
//! the access into a normal `KVM_EXIT_IO`. IOPL = 3 is still set, for hardware-assisted KVM.
//!
//! # Low-memory image (guest physical = guest virtual, identity mapped)
//!
//! | GPA | contents |
//! |---|---|
//! | `0x0000` | unused (left zero) |
//! | [`MAILBOX_GPA`] `0x1000` | parameter/result mailbox, see the `MB_*` offsets |
//! | [`GDT_GPA`] `0x2000` | GDT: Linux-style selectors, user CS `0x33`, user DS `0x2b`, TSS `0x40` |
//! | [`CODE_GPA`] `0x3000` | the program ([`GUEST_CODE`]) |
//! | `0x4000..`[`STACK_TOP`] `0x6000` | user stack (used by `call`/`ret` only) |
//! | [`TSS_GPA`] `0x6000` | 64-bit TSS + 8 KiB I/O permission bitmap (+ the closing `0xff`) |
//! | [`PML4_GPA`] `0x9000`, [`PDPT_GPA`] `0xa000`, [`PD_GPA`] `0xb000..` | page tables: 2 MiB pages, `0..`[`IDENTITY_MAP_SIZE`] |
//!
//! The image needs [`LOW_IMAGE_SIZE`] bytes of guest memory at GPA 0; give the guest a slot of
//! [`LOW_MEM_SIZE`] (2 MiB) there. The data region (where the pattern lives, e.g. 5 MiB at 4 GiB)
//! must lie inside the identity map and must not overlap the image.
//!
//! # Protocol
//!
//! The VMM writes [`GuestParams`] into the mailbox (data GPA, data length, mode), sets the
//! registers ([`initial_regs`], [`initial_sregs`], or [`configure_vcpu`]) and runs the vCPU.
//! The pattern is `byte[i] = (i ^ 0x5A) as u8` where `i` is the offset inside the data region
//! ([`pattern_byte`]).
//!
//! - [`MODE_WRITE`]: fill the data with the pattern, then report [`STATUS_WRITTEN`].
//! - [`MODE_VERIFY`]: check every byte; report [`STATUS_VERIFY_OK`] or [`STATUS_VERIFY_FAILED`]
//!   with the first bad offset in the mailbox.
//! - [`MODE_RUN_UPDATE`]: fill, `OUT` [`STATUS_WRITTEN`], then loop: `IN` [`PORT_CLOCK`] (the VMM
//!   answers host monotonic microseconds, low 32 bits), track the largest gap between consecutive
//!   clock reads, `IN` [`PORT_PROCEED`]; after the first non-zero proceed read the clock once
//!   more (so a pause anywhere in the loop falls between two clock reads and is measured), then
//!   verify and report as in VERIFY. Max gap and loop count (= clock reads after the first) are
//!   stored in the mailbox on every iteration. The gap includes the VMM's own time to answer two
//!   I/O exits (tens of µs here); the pause is the outlier.
//! - Anything else: report [`STATUS_BAD_MODE`].
//!
//! "Report" = store the status in the mailbox, then `OUT` it (32-bit) to [`PORT_STATUS`], forever:
//! after a final status every further `KVM_RUN` exits with the same `OUT` again, so the VMM just
//! stops running the vCPU.
//!
//! While the guest runs, the mailbox belongs to it: read it (e.g. with [`read_report`] on a copy)
//! after a status exit or while the vCPU is paused.

use kvm_bindings::{kvm_dtable, kvm_regs, kvm_segment, kvm_sregs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd};

/// Errors of the guest-image builder.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// The low-memory buffer is smaller than the image.
    #[error("low memory image needs {need} bytes, buffer has {got}")]
    LowMemTooSmall { need: usize, got: usize },
    /// A mailbox buffer shorter than [`MAILBOX_LEN`].
    #[error("mailbox buffer needs {need} bytes, got {got}")]
    MailboxTooSmall { need: usize, got: usize },
    /// The data region overlaps the image, leaves the identity map, or wraps.
    #[error("data region {gpa:#x}+{len:#x} must lie in [{min:#x}, {max:#x})")]
    DataRange {
        gpa: u64,
        len: u64,
        min: u64,
        max: u64,
    },
    /// A mode value that is not one of the `MODE_*` constants.
    #[error("unknown guest mode {0}")]
    BadMode(u64),
    /// A KVM ioctl failed while configuring the vCPU.
    #[error("{op}: {source}")]
    Kvm {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
}

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
/// Bytes at GPA 0 that [`build_image`] writes; the low memory slot must cover at least this.
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

/// Mode: write the pattern.
pub const MODE_WRITE: u64 = 1;
/// Mode: verify the pattern.
pub const MODE_VERIFY: u64 = 2;
/// Mode: write, report, loop on the clock until told to proceed, verify.
pub const MODE_RUN_UPDATE: u64 = 3;

/// Status: nothing reported yet (the value [`write_params`] leaves in the mailbox).
pub const STATUS_NONE: u64 = 0;
/// Status: the pattern is written (final in WRITE mode; a phase in RUN_UPDATE mode).
pub const STATUS_WRITTEN: u64 = 1;
/// Status (final): every byte matched.
pub const STATUS_VERIFY_OK: u64 = 2;
/// Status (final): a byte did not match; see [`MB_FIRST_BAD`].
pub const STATUS_VERIFY_FAILED: u64 = 3;
/// Status (final): the mode in the mailbox was not understood.
pub const STATUS_BAD_MODE: u64 = 4;

/// Mailbox magic, written by the builder (the guest does not check it; it helps `inspect`).
pub const GUEST_MAGIC: u64 = u64::from_le_bytes(*b"HOVGUES1");
/// Value of [`MB_FIRST_BAD`] when no bad byte was found (or verification has not run).
pub const NO_BAD_OFFSET: u64 = u64::MAX;

/// Mailbox offset of [`GUEST_MAGIC`]. All mailbox fields are little-endian `u64`; the next three
/// are written by the VMM, the last four by the guest.
pub const MB_MAGIC: usize = 0x00;
/// Data region guest physical address.
pub const MB_DATA_GPA: usize = 0x08;
/// Data region length in bytes.
pub const MB_DATA_LEN: usize = 0x10;
/// One of the `MODE_*` values.
pub const MB_MODE: usize = 0x18;
/// Guest → VMM: last reported `STATUS_*`.
pub const MB_STATUS: usize = 0x20;
/// Guest → VMM: first bad data offset, or [`NO_BAD_OFFSET`].
pub const MB_FIRST_BAD: usize = 0x28;
/// Guest → VMM: largest gap between consecutive clock reads, in µs (RUN_UPDATE).
pub const MB_MAX_GAP_US: usize = 0x30;
/// Guest → VMM: clock-loop iterations so far (RUN_UPDATE).
pub const MB_LOOPS: usize = 0x38;

/// Initial RFLAGS: bit 1 (reserved, 1) and IOPL = 3; IF = 0.
pub const INITIAL_RFLAGS: u64 = 0x3002;
/// CR0: PE | MP | ET | NE | WP | PG.
pub const INITIAL_CR0: u64 = 0x8005_0033;
/// CR4: PAE.
pub const INITIAL_CR4: u64 = 0x20;
/// EFER: LME | LMA.
pub const INITIAL_EFER: u64 = 0x500;

/// The guest's modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestMode {
    /// [`MODE_WRITE`]
    Write,
    /// [`MODE_VERIFY`]
    Verify,
    /// [`MODE_RUN_UPDATE`]
    RunUpdate,
}

impl GuestMode {
    /// The mailbox value of this mode.
    pub const fn code(self) -> u64 {
        match self {
            GuestMode::Write => MODE_WRITE,
            GuestMode::Verify => MODE_VERIFY,
            GuestMode::RunUpdate => MODE_RUN_UPDATE,
        }
    }

    /// The mode of a mailbox value.
    pub fn from_code(code: u64) -> Result<Self, GuestError> {
        match code {
            MODE_WRITE => Ok(GuestMode::Write),
            MODE_VERIFY => Ok(GuestMode::Verify),
            MODE_RUN_UPDATE => Ok(GuestMode::RunUpdate),
            other => Err(GuestError::BadMode(other)),
        }
    }
}

/// What the VMM tells the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestParams {
    /// Guest physical address of the data region.
    pub data_gpa: u64,
    /// Length of the data region in bytes (any length, not only multiples of 8).
    pub data_len: u64,
    /// What to do.
    pub mode: GuestMode,
}

/// What the guest reported, decoded from a copy of the mailbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestReport {
    /// Last `STATUS_*` stored by the guest.
    pub status: u64,
    /// First bad data offset, if verification failed.
    pub first_bad: Option<u64>,
    /// Largest gap between two consecutive clock reads, µs (RUN_UPDATE).
    pub max_gap_us: u64,
    /// Clock-loop iterations (RUN_UPDATE).
    pub loops: u64,
}

impl GuestReport {
    /// `true` for a status after which the guest only repeats its report.
    pub fn is_final(&self, mode: GuestMode) -> bool {
        is_final_status(mode, self.status)
    }
}

/// `true` if `status` ends the program in `mode` (only [`STATUS_WRITTEN`] in RUN_UPDATE mode is
/// not final).
pub fn is_final_status(mode: GuestMode, status: u64) -> bool {
    match status {
        STATUS_NONE => false,
        STATUS_WRITTEN => mode != GuestMode::RunUpdate,
        _ => true,
    }
}

/// A short name for a status value, for messages.
pub fn status_name(status: u64) -> &'static str {
    match status {
        STATUS_NONE => "none",
        STATUS_WRITTEN => "written",
        STATUS_VERIFY_OK => "verify-ok",
        STATUS_VERIFY_FAILED => "verify-failed",
        STATUS_BAD_MODE => "bad-mode",
        _ => "unknown",
    }
}

/// The pattern: the byte at offset `i` of the data region.
#[inline]
pub fn pattern_byte(i: u64) -> u8 {
    (i ^ 0x5a) as u8
}

/// The pattern word (little-endian) for the 8 bytes at data offset `i`, `i` a multiple of 8.
/// The guest computes the same `((i & 0xff) * 0x0101..01 + 0x0706..00) ^ 0x5a5a..5a`.
#[inline]
pub fn pattern_word(i: u64) -> u64 {
    ((i & 0xff).wrapping_mul(0x0101_0101_0101_0101) + 0x0706_0504_0302_0100) ^ 0x5a5a_5a5a_5a5a_5a5a
}

/// Host side: fill `buf` with the pattern, `buf[0]` being data offset `offset`.
pub fn fill_pattern(buf: &mut [u8], offset: u64) {
    for (k, b) in buf.iter_mut().enumerate() {
        *b = pattern_byte(offset.wrapping_add(k as u64));
    }
}

/// Host side: the first data offset in `buf` (whose `buf[0]` is data offset `offset`) that does
/// not hold the pattern.
pub fn find_mismatch(buf: &[u8], offset: u64) -> Option<u64> {
    buf.iter()
        .enumerate()
        .find(|&(k, &b)| b != pattern_byte(offset.wrapping_add(k as u64)))
        .map(|(k, _)| offset.wrapping_add(k as u64))
}

/// The program, loaded at [`CODE_GPA`]. Hand-assembled; each line gives the offset and the
/// instruction (AT&T syntax). Register use: r15 = mailbox, rdi = data GPA, rsi = data length,
/// r8/r9/r10 = pattern-word constants, r12 = previous clock, r13 = max gap, r14 = loop count,
/// rbx = last proceed value.
/// Port numbers, the mailbox address and the mailbox offsets are immediates; the unit tests
/// check them against the constants above.
#[rustfmt::skip]
pub const GUEST_CODE: [u8; 0x149] = [
    // start:
    0x41, 0xbf, 0x00, 0x10, 0x00, 0x00, // 0x000: mov $0x1000,%r15d
    0x49, 0x8b, 0x7f, 0x08, // 0x006: mov 0x8(%r15),%rdi
    0x49, 0x8b, 0x77, 0x10, // 0x00a: mov 0x10(%r15),%rsi
    0x49, 0x8b, 0x47, 0x18, // 0x00e: mov 0x18(%r15),%rax
    0x49, 0xb8, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, // 0x012: movabs $0x101010101010101,%r8
    0x49, 0xb9, 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, // 0x01c: movabs $0x706050403020100,%r9
    0x49, 0xba, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, // 0x026: movabs $0x5a5a5a5a5a5a5a5a,%r10
    0x48, 0x83, 0xf8, 0x01, // 0x030: cmp $0x1,%rax
    0x74, 0x13, // 0x034: je 0x049
    0x48, 0x83, 0xf8, 0x02, // 0x036: cmp $0x2,%rax
    0x74, 0x19, // 0x03a: je 0x055
    0x48, 0x83, 0xf8, 0x03, // 0x03c: cmp $0x3,%rax
    0x74, 0x1a, // 0x040: je 0x05c
    0xb8, 0x04, 0x00, 0x00, 0x00, // 0x042: mov $0x4,%eax
    0xeb, 0x6b, // 0x047: jmp 0x0b4
    // mode_write:
    0xe8, 0x72, 0x00, 0x00, 0x00, // 0x049: call 0x0c0
    0xb8, 0x01, 0x00, 0x00, 0x00, // 0x04e: mov $0x1,%eax
    0xeb, 0x5f, // 0x053: jmp 0x0b4
    // mode_verify:
    0xe8, 0x9d, 0x00, 0x00, 0x00, // 0x055: call 0x0f7
    0xeb, 0x58, // 0x05a: jmp 0x0b4
    // mode_run_update:
    0xe8, 0x5f, 0x00, 0x00, 0x00, // 0x05c: call 0x0c0
    0xb8, 0x01, 0x00, 0x00, 0x00, // 0x061: mov $0x1,%eax
    0x49, 0x89, 0x47, 0x20, // 0x066: mov %rax,0x20(%r15)
    0xba, 0x80, 0x0e, 0x00, 0x00, // 0x06a: mov $0xe80,%edx
    0xef, // 0x06f: out %eax,(%dx)
    // read the first clock value
    0xba, 0x84, 0x0e, 0x00, 0x00, // 0x070: mov $0xe84,%edx
    0xed, // 0x075: in (%dx),%eax
    0x41, 0x89, 0xc4, // 0x076: mov %eax,%r12d
    0x45, 0x31, 0xed, // 0x079: xor %r13d,%r13d
    0x45, 0x31, 0xf6, // 0x07c: xor %r14d,%r14d
    0x31, 0xdb, // 0x07f: xor %ebx,%ebx
    // clock_loop:
    0xba, 0x84, 0x0e, 0x00, 0x00, // 0x081: mov $0xe84,%edx
    0xed, // 0x086: in (%dx),%eax
    0x89, 0xc1, // 0x087: mov %eax,%ecx
    0x44, 0x29, 0xe1, // 0x089: sub %r12d,%ecx
    0x41, 0x89, 0xc4, // 0x08c: mov %eax,%r12d
    0x4c, 0x39, 0xe9, // 0x08f: cmp %r13,%rcx
    0x4c, 0x0f, 0x47, 0xe9, // 0x092: cmova %rcx,%r13
    0x49, 0xff, 0xc6, // 0x096: inc %r14
    0x4d, 0x89, 0x6f, 0x30, // 0x099: mov %r13,0x30(%r15)
    0x4d, 0x89, 0x77, 0x38, // 0x09d: mov %r14,0x38(%r15)
    // one more clock read after a non-zero proceed, so a pause anywhere in the loop is measured
    0x85, 0xdb, // 0x0a1: test %ebx,%ebx
    0x75, 0x0a, // 0x0a3: jne 0x0af
    0xba, 0x88, 0x0e, 0x00, 0x00, // 0x0a5: mov $0xe88,%edx
    0xed, // 0x0aa: in (%dx),%eax
    0x89, 0xc3, // 0x0ab: mov %eax,%ebx
    0xeb, 0xd2, // 0x0ad: jmp 0x081
    // verify, then report
    0xe8, 0x43, 0x00, 0x00, 0x00, // 0x0af: call 0x0f7
    // finish:
    0x49, 0x89, 0x47, 0x20, // 0x0b4: mov %rax,0x20(%r15)
    // finish.report: OUT status forever; the VMM stops running the vCPU
    0xba, 0x80, 0x0e, 0x00, 0x00, // 0x0b8: mov $0xe80,%edx
    0xef, // 0x0bd: out %eax,(%dx)
    0xeb, 0xf8, // 0x0be: jmp 0x0b8
    // fill:
    0x48, 0x89, 0xf2, // 0x0c0: mov %rsi,%rdx
    0x48, 0x83, 0xe2, 0xf8, // 0x0c3: and $0xfffffffffffffff8,%rdx
    0x31, 0xc9, // 0x0c7: xor %ecx,%ecx
    0xeb, 0x15, // 0x0c9: jmp 0x0e0
    // fill.words: 8-byte stores of the pattern word for offset rcx
    0x0f, 0xb6, 0xc1, // 0x0cb: movzbl %cl,%eax
    0x49, 0x0f, 0xaf, 0xc0, // 0x0ce: imul %r8,%rax
    0x4c, 0x01, 0xc8, // 0x0d2: add %r9,%rax
    0x4c, 0x31, 0xd0, // 0x0d5: xor %r10,%rax
    0x48, 0x89, 0x04, 0x0f, // 0x0d8: mov %rax,(%rdi,%rcx,1)
    0x48, 0x83, 0xc1, 0x08, // 0x0dc: add $0x8,%rcx
    0x48, 0x39, 0xd1, // 0x0e0: cmp %rdx,%rcx
    0x72, 0xe6, // 0x0e3: jb 0x0cb
    0xeb, 0x0a, // 0x0e5: jmp 0x0f1
    // fill.tail: the last len % 8 bytes one at a time
    0x89, 0xc8, // 0x0e7: mov %ecx,%eax
    0x34, 0x5a, // 0x0e9: xor $0x5a,%al
    0x88, 0x04, 0x0f, // 0x0eb: mov %al,(%rdi,%rcx,1)
    0x48, 0xff, 0xc1, // 0x0ee: inc %rcx
    0x48, 0x39, 0xf1, // 0x0f1: cmp %rsi,%rcx
    0x72, 0xf1, // 0x0f4: jb 0x0e7
    0xc3, // 0x0f6: ret
    // verify:
    0x48, 0x89, 0xf2, // 0x0f7: mov %rsi,%rdx
    0x48, 0x83, 0xe2, 0xf8, // 0x0fa: and $0xfffffffffffffff8,%rdx
    0x31, 0xc9, // 0x0fe: xor %ecx,%ecx
    0xeb, 0x17, // 0x100: jmp 0x119
    // verify.words: compare 8 bytes at a time; on mismatch fall into the byte scan at rcx
    0x0f, 0xb6, 0xc1, // 0x102: movzbl %cl,%eax
    0x49, 0x0f, 0xaf, 0xc0, // 0x105: imul %r8,%rax
    0x4c, 0x01, 0xc8, // 0x109: add %r9,%rax
    0x4c, 0x31, 0xd0, // 0x10c: xor %r10,%rax
    0x48, 0x39, 0x04, 0x0f, // 0x10f: cmp %rax,(%rdi,%rcx,1)
    0x75, 0x17, // 0x113: jne 0x12c
    0x48, 0x83, 0xc1, 0x08, // 0x115: add $0x8,%rcx
    0x48, 0x39, 0xd1, // 0x119: cmp %rdx,%rcx
    0x72, 0xe4, // 0x11c: jb 0x102
    0xeb, 0x0c, // 0x11e: jmp 0x12c
    // verify.bytes: byte scan (tail, or the word that mismatched)
    0x89, 0xc8, // 0x120: mov %ecx,%eax
    0x34, 0x5a, // 0x122: xor $0x5a,%al
    0x38, 0x04, 0x0f, // 0x124: cmp %al,(%rdi,%rcx,1)
    0x75, 0x16, // 0x127: jne 0x13f
    0x48, 0xff, 0xc1, // 0x129: inc %rcx
    0x48, 0x39, 0xf1, // 0x12c: cmp %rsi,%rcx
    0x72, 0xef, // 0x12f: jb 0x120
    // verify.ok
    0x49, 0xc7, 0x47, 0x28, 0xff, 0xff, 0xff, 0xff, // 0x131: movq $0xffffffffffffffff,0x28(%r15)
    0xb8, 0x02, 0x00, 0x00, 0x00, // 0x139: mov $0x2,%eax
    0xc3, // 0x13e: ret
    // verify.bad: rcx = first bad offset
    0x49, 0x89, 0x4f, 0x28, // 0x13f: mov %rcx,0x28(%r15)
    0xb8, 0x03, 0x00, 0x00, 0x00, // 0x143: mov $0x3,%eax
    0xc3, // 0x148: ret
];

fn put_u64(buf: &mut [u8], off: usize, v: u64) {
    buf[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

fn get_u64(buf: &[u8], off: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[off..off + 8]);
    u64::from_le_bytes(b)
}

/// Check that the data region lies inside the identity map and does not overlap the image.
pub fn check_params(params: &GuestParams) -> Result<(), GuestError> {
    let min = LOW_IMAGE_SIZE as u64;
    let max = IDENTITY_MAP_SIZE;
    let end = params.data_gpa.checked_add(params.data_len);
    match end {
        Some(end) if params.data_gpa >= min && end <= max => Ok(()),
        _ => Err(GuestError::DataRange {
            gpa: params.data_gpa,
            len: params.data_len,
            min,
            max,
        }),
    }
}

/// Write `params` into a mailbox buffer (at least [`MAILBOX_LEN`] bytes; the caller copies it to
/// [`MAILBOX_GPA`]) and reset the result fields.
pub fn write_params(mailbox: &mut [u8], params: &GuestParams) -> Result<(), GuestError> {
    if mailbox.len() < MAILBOX_LEN {
        return Err(GuestError::MailboxTooSmall {
            need: MAILBOX_LEN,
            got: mailbox.len(),
        });
    }
    check_params(params)?;
    put_u64(mailbox, MB_MAGIC, GUEST_MAGIC);
    put_u64(mailbox, MB_DATA_GPA, params.data_gpa);
    put_u64(mailbox, MB_DATA_LEN, params.data_len);
    put_u64(mailbox, MB_MODE, params.mode.code());
    put_u64(mailbox, MB_STATUS, STATUS_NONE);
    put_u64(mailbox, MB_FIRST_BAD, NO_BAD_OFFSET);
    put_u64(mailbox, MB_MAX_GAP_US, 0);
    put_u64(mailbox, MB_LOOPS, 0);
    Ok(())
}

/// Decode the guest's report from a copy of the mailbox (at least [`MAILBOX_LEN`] bytes).
pub fn read_report(mailbox: &[u8]) -> Result<GuestReport, GuestError> {
    if mailbox.len() < MAILBOX_LEN {
        return Err(GuestError::MailboxTooSmall {
            need: MAILBOX_LEN,
            got: mailbox.len(),
        });
    }
    let first_bad = get_u64(mailbox, MB_FIRST_BAD);
    Ok(GuestReport {
        status: get_u64(mailbox, MB_STATUS),
        first_bad: (first_bad != NO_BAD_OFFSET).then_some(first_bad),
        max_gap_us: get_u64(mailbox, MB_MAX_GAP_US),
        loops: get_u64(mailbox, MB_LOOPS),
    })
}

/// A GDT descriptor word for a flat 4 GiB segment: `access` byte and `flags` nibble (G, D/B, L).
const fn flat_desc(access: u64, flags: u64) -> u64 {
    0xffff | (access << 40) | (0xf << 48) | (flags << 52)
}

/// The GDT, indexed by selector / 8. Index 8..9 (selector 0x40) is the 16-byte TSS descriptor,
/// filled in by [`build_image`].
const GDT: [u64; 8] = [
    0,                    // 0x00 null
    flat_desc(0x9b, 0xc), // 0x08 kernel code 32
    flat_desc(0x9b, 0xa), // 0x10 kernel code 64 (L)
    flat_desc(0x93, 0xc), // 0x18 kernel data
    flat_desc(0xfb, 0xc), // 0x20 user code 32
    flat_desc(0xf3, 0xc), // 0x28 user data (DPL 3)
    flat_desc(0xfb, 0xa), // 0x30 user code 64 (DPL 3, L)
    0,                    // 0x38 unused
];
/// GDT limit: 8 descriptors + the 16-byte TSS descriptor, minus one.
pub const GDT_LIMIT: u16 = (GDT.len() * 8 + 16 - 1) as u16;

/// Build the low-memory image into `low` (the bytes of guest physical `0..low.len()`):
/// zero the first [`LOW_IMAGE_SIZE`] bytes, then write the mailbox (with `params`), GDT, code,
/// TSS with I/O bitmap and page tables. Bytes past [`LOW_IMAGE_SIZE`] are left alone.
pub fn build_image(low: &mut [u8], params: &GuestParams) -> Result<(), GuestError> {
    if low.len() < LOW_IMAGE_SIZE {
        return Err(GuestError::LowMemTooSmall {
            need: LOW_IMAGE_SIZE,
            got: low.len(),
        });
    }
    check_params(params)?;
    low[..LOW_IMAGE_SIZE].fill(0);

    let mb = MAILBOX_GPA as usize;
    write_params(&mut low[mb..mb + PAGE_SIZE as usize], params)?;

    let gdt = GDT_GPA as usize;
    for (i, d) in GDT.iter().enumerate() {
        put_u64(low, gdt + i * 8, *d);
    }
    // 64-bit TSS descriptor: limit, base, type 0xb (busy 64-bit TSS), present.
    let (base, limit) = (TSS_GPA, u64::from(TSS_LIMIT));
    let tss_lo = (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (0x8b << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56);
    put_u64(low, gdt + usize::from(TSS_SEL), tss_lo);
    put_u64(low, gdt + usize::from(TSS_SEL) + 8, base >> 32);

    let code = CODE_GPA as usize;
    low[code..code + GUEST_CODE.len()].copy_from_slice(&GUEST_CODE);

    // TSS: only the I/O map base matters (RSP0/IST are never used: the guest never enters CPL0).
    let tss = TSS_GPA as usize;
    low[tss + 0x66..tss + 0x68].copy_from_slice(&(TSS_IOMAP_OFFSET as u16).to_le_bytes());
    let iomap = tss + TSS_IOMAP_OFFSET as usize;
    // Deny every port, then allow the guest's three 32-bit ports; the byte after the bitmap must
    // be 0xff.
    low[iomap..iomap + 0x2001].fill(0xff);
    for port in [PORT_STATUS, PORT_CLOCK, PORT_PROCEED] {
        for p in port..port + 4 {
            low[iomap + usize::from(p / 8)] &= !(1u8 << (p % 8));
        }
    }

    // Page tables: PML4[0] -> PDPT; PDPT[g] -> PD g; PD g[i] -> 2 MiB page (g GiB + i * 2 MiB).
    // Present | writable | user on every level; PS on the PDEs.
    const PTE_PWU: u64 = 0x7;
    const PDE_PS: u64 = 0x80;
    put_u64(low, PML4_GPA as usize, PDPT_GPA | PTE_PWU);
    for g in 0..IDENTITY_MAP_GIB {
        let pd = PD_GPA + g * PAGE_SIZE;
        put_u64(low, (PDPT_GPA + g * 8) as usize, pd | PTE_PWU);
        for i in 0..512u64 {
            let page = (g << 30) | (i << 21);
            put_u64(low, (pd + i * 8) as usize, page | PDE_PS | PTE_PWU);
        }
    }
    Ok(())
}

/// Initial general-purpose registers: RIP at the program, RSP at the stack, RFLAGS IOPL = 3.
pub fn initial_regs() -> kvm_regs {
    kvm_regs {
        rip: CODE_GPA,
        rsp: STACK_TOP,
        rflags: INITIAL_RFLAGS,
        ..Default::default()
    }
}

fn user_segment(selector: u16, type_: u8, l: u8, db: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 3,
        db,
        s: 1,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Initial special registers, starting from `base` (the vCPU's reset state from
/// `get_sregs`, which supplies e.g. `apic_base`): long mode, paging, CPL3 segments, the TSS.
pub fn initial_sregs(base: kvm_sregs) -> kvm_sregs {
    let mut s = base;
    s.cs = user_segment(USER_CS, 0xb, 1, 0); // execute/read, accessed, 64-bit
    let data = user_segment(USER_DS, 0x3, 0, 1); // read/write, accessed
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.tr = kvm_segment {
        base: TSS_GPA,
        limit: TSS_LIMIT,
        selector: TSS_SEL,
        type_: 0xb, // busy 64-bit TSS
        present: 1,
        dpl: 0,
        db: 0,
        s: 0,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    s.ldt = kvm_segment {
        type_: 0x2,
        unusable: 1,
        ..Default::default()
    };
    s.gdt = kvm_dtable {
        base: GDT_GPA,
        limit: GDT_LIMIT,
        padding: [0; 3],
    };
    // No IDT: any exception escalates to a triple fault (KVM_EXIT_SHUTDOWN).
    s.idt = kvm_dtable::default();
    s.cr0 = INITIAL_CR0;
    s.cr2 = 0;
    s.cr3 = PML4_GPA;
    s.cr4 = INITIAL_CR4;
    s.cr8 = 0;
    s.efer = INITIAL_EFER;
    s.interrupt_bitmap = [0; 4];
    s
}

/// Set up a fresh vCPU to start the program: the host's supported CPUID, [`initial_sregs`] and
/// [`initial_regs`].
pub fn configure_vcpu(kvm: &Kvm, vcpu: &VcpuFd) -> Result<(), GuestError> {
    let kvm_err = |op| move |source| GuestError::Kvm { op, source };
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
    let sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    vcpu.set_sregs(&initial_sregs(sregs))
        .map_err(kvm_err("KVM_SET_SREGS"))?;
    vcpu.set_regs(&initial_regs())
        .map_err(kvm_err("KVM_SET_REGS"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn imm32_at(off: usize) -> u32 {
        u32::from_le_bytes(GUEST_CODE[off..off + 4].try_into().unwrap())
    }

    #[test]
    fn code_immediates_match_constants() {
        // mov $MAILBOX_GPA, %r15d
        assert_eq!(&GUEST_CODE[0..2], &[0x41, 0xbf]);
        assert_eq!(u64::from(imm32_at(2)), MAILBOX_GPA);
        // mailbox loads: disp8 of mov 0x..(%r15)
        assert_eq!(usize::from(GUEST_CODE[0x09]), MB_DATA_GPA);
        assert_eq!(usize::from(GUEST_CODE[0x0d]), MB_DATA_LEN);
        assert_eq!(usize::from(GUEST_CODE[0x11]), MB_MODE);
        // mode compares
        assert_eq!(u64::from(GUEST_CODE[0x33]), MODE_WRITE);
        assert_eq!(u64::from(GUEST_CODE[0x39]), MODE_VERIFY);
        assert_eq!(u64::from(GUEST_CODE[0x3f]), MODE_RUN_UPDATE);
        assert_eq!(u64::from(imm32_at(0x43)), STATUS_BAD_MODE);
        assert_eq!(u64::from(imm32_at(0x4f)), STATUS_WRITTEN);
        assert_eq!(u64::from(imm32_at(0x62)), STATUS_WRITTEN);
        assert_eq!(usize::from(GUEST_CODE[0x69]), MB_STATUS);
        // ports: mov $port, %edx
        for (off, port) in [
            (0x6a, PORT_STATUS),
            (0x70, PORT_CLOCK),
            (0x81, PORT_CLOCK),
            (0xa5, PORT_PROCEED),
            (0xb8, PORT_STATUS),
        ] {
            assert_eq!(GUEST_CODE[off], 0xba, "mov imm32, %edx at {off:#x}");
            assert_eq!(imm32_at(off + 1), u32::from(port), "port at {off:#x}");
        }
        assert_eq!(usize::from(GUEST_CODE[0x9c]), MB_MAX_GAP_US);
        assert_eq!(usize::from(GUEST_CODE[0xa0]), MB_LOOPS);
        assert_eq!(usize::from(GUEST_CODE[0xb7]), MB_STATUS);
        assert_eq!(usize::from(GUEST_CODE[0x134]), MB_FIRST_BAD);
        assert_eq!(u64::from(imm32_at(0x13a)), STATUS_VERIFY_OK);
        assert_eq!(usize::from(GUEST_CODE[0x142]), MB_FIRST_BAD);
        assert_eq!(u64::from(imm32_at(0x144)), STATUS_VERIFY_FAILED);
        // pattern constants
        let c = |off: usize| u64::from_le_bytes(GUEST_CODE[off..off + 8].try_into().unwrap());
        assert_eq!(c(0x14), 0x0101_0101_0101_0101);
        assert_eq!(c(0x1e), 0x0706_0504_0302_0100);
        assert_eq!(c(0x28), 0x5a5a_5a5a_5a5a_5a5a);
        assert!(CODE_GPA as usize + GUEST_CODE.len() <= STACK_TOP as usize - 0x2000);
    }

    #[test]
    fn pattern_word_matches_bytes() {
        for i in (0..4096u64).step_by(8) {
            let mut bytes = [0u8; 8];
            fill_pattern(&mut bytes, i);
            assert_eq!(u64::from_le_bytes(bytes), pattern_word(i), "offset {i}");
        }
        assert_eq!(pattern_byte(0), 0x5a);
        assert_eq!(pattern_byte(0x5a), 0);
        assert_eq!(pattern_byte(0x1ff), 0xa5);
    }

    #[test]
    fn find_mismatch_reports_first_bad() {
        let mut buf = vec![0u8; 4099];
        fill_pattern(&mut buf, 12);
        assert_eq!(find_mismatch(&buf, 12), None);
        buf[4000] ^= 1;
        buf[4010] ^= 1;
        assert_eq!(find_mismatch(&buf, 12), Some(4012));
    }

    #[test]
    fn image_layout() {
        let params = GuestParams {
            data_gpa: 4 << 30,
            data_len: 5 << 20,
            mode: GuestMode::RunUpdate,
        };
        let mut low = vec![0xccu8; LOW_MEM_SIZE];
        build_image(&mut low, &params).unwrap();
        const { assert!(LOW_IMAGE_SIZE <= LOW_MEM_SIZE) };
        assert_eq!(low[0], 0);
        assert_eq!(
            low[LOW_IMAGE_SIZE], 0xcc,
            "bytes past the image are untouched"
        );
        let mb = MAILBOX_GPA as usize;
        assert_eq!(get_u64(&low, mb + MB_MAGIC), GUEST_MAGIC);
        assert_eq!(get_u64(&low, mb + MB_DATA_GPA), 4 << 30);
        assert_eq!(get_u64(&low, mb + MB_DATA_LEN), 5 << 20);
        assert_eq!(get_u64(&low, mb + MB_MODE), MODE_RUN_UPDATE);
        let r = read_report(&low[mb..mb + MAILBOX_LEN]).unwrap();
        assert_eq!(
            r,
            GuestReport {
                status: STATUS_NONE,
                first_bad: None,
                max_gap_us: 0,
                loops: 0
            }
        );
        // 4 GiB + 2 MiB is mapped by PD 4, entry 1.
        let pde = get_u64(&low, (PD_GPA + 4 * PAGE_SIZE + 8) as usize);
        assert_eq!(pde, (4 << 30) | (2 << 20) | 0x87);
        // Ports allowed in the I/O bitmap, neighbours denied.
        let iomap = (TSS_GPA + TSS_IOMAP_OFFSET) as usize;
        let allowed = |p: u16| low[iomap + usize::from(p / 8)] & (1 << (p % 8)) == 0;
        assert!(allowed(PORT_STATUS) && allowed(PORT_CLOCK + 3) && allowed(PORT_PROCEED + 3));
        assert!(!allowed(PORT_STATUS - 1) && !allowed(PORT_PROCEED + 4) && !allowed(0x80));
        assert_eq!(low[iomap + 0x2000], 0xff);
        // User code segment descriptor: DPL 3, L.
        let cs = get_u64(&low, GDT_GPA as usize + usize::from(USER_CS & !7));
        assert_eq!((cs >> 45) & 3, 3);
        assert_eq!((cs >> 53) & 1, 1);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let ok = GuestParams {
            data_gpa: 4 << 30,
            data_len: 5 << 20,
            mode: GuestMode::Write,
        };
        let mut small = vec![0u8; LOW_IMAGE_SIZE - 1];
        assert!(matches!(
            build_image(&mut small, &ok),
            Err(GuestError::LowMemTooSmall { .. })
        ));
        let mut low = vec![0u8; LOW_MEM_SIZE];
        for bad in [
            GuestParams {
                data_gpa: 0x1000,
                ..ok
            },
            GuestParams {
                data_gpa: IDENTITY_MAP_SIZE - 4,
                data_len: 8,
                ..ok
            },
            GuestParams {
                data_gpa: u64::MAX - 2,
                data_len: 8,
                ..ok
            },
        ] {
            assert!(matches!(
                build_image(&mut low, &bad),
                Err(GuestError::DataRange { .. })
            ));
        }
        assert!(matches!(
            read_report(&[0u8; 8]),
            Err(GuestError::MailboxTooSmall { .. })
        ));
        assert!(matches!(
            GuestMode::from_code(9),
            Err(GuestError::BadMode(9))
        ));
        assert_eq!(
            GuestMode::from_code(MODE_VERIFY).unwrap(),
            GuestMode::Verify
        );
        assert!(!is_final_status(GuestMode::RunUpdate, STATUS_WRITTEN));
        assert!(is_final_status(GuestMode::Write, STATUS_WRITTEN));
    }

    #[test]
    fn sregs_are_cpl3_long_mode() {
        let s = initial_sregs(kvm_sregs::default());
        assert_eq!(s.cs.dpl, 3);
        assert_eq!(s.cs.l, 1);
        assert_eq!(s.cs.selector & 3, 3);
        assert_eq!(s.ss.dpl, 3);
        assert_eq!(s.efer & 0x500, 0x500);
        assert_eq!(s.cr3, PML4_GPA);
        assert_eq!(initial_regs().rflags & 0x3000, 0x3000);
    }
}
