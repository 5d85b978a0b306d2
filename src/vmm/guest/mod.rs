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
//! - [`MODE_RUN_UPDATE`]: fill, `IN` [`PORT_CLOCK`] once, verify once (a read pass over the whole
//!   data region that the VMM times between that clock read and the next status; its result is
//!   not reported), `OUT` [`STATUS_WRITTEN`], then loop: `IN` [`PORT_CLOCK`] (the VMM
//!   answers host monotonic microseconds, low 32 bits), track the largest gap between consecutive
//!   clock reads, `IN` [`PORT_PROCEED`]; after the first non-zero proceed read the clock once
//!   more (so a pause anywhere in the loop falls between two clock reads and is measured), then
//!   verify and report as in VERIFY. Max gap and loop count (= clock reads after the first) are
//!   stored in the mailbox on every iteration. The gap includes the VMM's own time to answer two
//!   I/O exits (tens of µs here); the pause is the outlier.
//! - [`MODE_RUN_UPDATE_PREFILLED`]: as RUN_UPDATE without the fill (the host wrote the pattern):
//!   twice `IN` [`PORT_CLOCK`] and verify (the first pass faults every page into the VM's
//!   mappings, the second is the warm pass the VMM times), `OUT` [`STATUS_WRITTEN`], loop,
//!   verify.
//! - [`MODE_SMP`]: one vCPU of several sharing the VM, each with its own mailbox, stack and
//!   region and a shared counter; see [`SmpGuest`].
//! - Anything else: report [`STATUS_BAD_MODE`].
//!
//! "Report" = store the status in the mailbox, then `OUT` it (32-bit) to [`PORT_STATUS`], forever:
//! after a final status every further `KVM_RUN` exits with the same `OUT` again, so the VMM just
//! stops running the vCPU.
//!
//! While the guest runs, the mailbox belongs to it: read it (e.g. with [`read_report`] on a copy)
//! after a status exit or while the vCPU is paused.

mod cpu;
mod error;
mod image;
mod layout;
mod mailbox;
mod pattern;
mod program;
mod smp;

pub use cpu::*;
pub use error::*;
pub use image::*;
pub use layout::*;
pub use mailbox::*;
pub use pattern::*;
pub use program::*;
pub use smp::*;
