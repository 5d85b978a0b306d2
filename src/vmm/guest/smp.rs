//! The SMP mode: one program on several vCPUs of one VM, sharing its memory.
//!
//! Each vCPU `k` has its own mailbox at [`smp_mailbox_gpa`]`(k)` (the first [`MAILBOX_LEN`]
//! bytes as in the other modes, then the fields below), its own stack and its own data region,
//! and enters the program at [`SMP_ENTRY`] with `r15` pointing at its mailbox
//! ([`smp_regs`]). It fills its region, reports `STATUS_WRITTEN`, then loops:
//!
//! 1. `lock incq` of the shared counter at [`COUNTER_GPA`], then its own loop count
//!    ([`MB_LOOPS`](super::MB_LOOPS)), so that at any instruction boundary the counter equals
//!    the sum of the counts, or that sum plus one per vCPU caught between the two;
//! 2. a clock read, keeping the largest gap in the mailbox ([`MB_MAX_GAP_US`](super::MB_MAX_GAP_US)): the
//!    blackout as the guest saw it, in host microseconds;
//! 3. an `RDTSC` just before that clock read and one just after: with the largest gap it keeps
//!    the TSC elapsed between the two clock reads, at least ([`MB_TSC_MAX_STEP`]: the TSC
//!    before this read less the TSC after the last one, so that time spent between an `RDTSC`
//!    and its clock read, a vCPU thread preempted or an interrupt taken, is never counted in
//!    the TSC's step and not the clock's), and counts backward steps ([`MB_TSC_BACKWARDS`]): the
//!    guest's own clock across the update;
//! 4. a proceed read; after the first non-zero answer, one more pass, then verify its region
//!    and report.
//!
//! When every vCPU has reported, the counter must equal the sum of the loop counts exactly:
//! each vCPU resumed at the instruction it was paused at, with its registers, and the shared
//! page survived ([`check_smp`]).

use kvm_bindings::kvm_regs;

use super::cpu::INITIAL_RFLAGS;
use super::error::GuestError;
use super::image::build_image;
use super::layout::{CODE_GPA, MAILBOX_GPA, PAGE_SIZE, STACK_TOP};
use super::mailbox::*;

/// Guest physical address of the shared counter: the last 8 bytes of the mailbox page.
pub const COUNTER_GPA: u64 = MAILBOX_GPA + PAGE_SIZE - 8;
/// Where an SMP vCPU starts: just after the program's load of the first mailbox's address.
pub const SMP_ENTRY: u64 = CODE_GPA + 6;
/// Distance between two vCPUs' mailboxes.
pub const SMP_MAILBOX_STRIDE: u64 = 0x80;
/// Bytes of an SMP mailbox that carry fields.
pub const SMP_MAILBOX_LEN: usize = 0x60;
/// Stack bytes per vCPU (the program nests two calls at most).
pub const SMP_STACK_STRIDE: u64 = 0x200;
/// Most vCPUs one image holds: mailboxes below the counter, stacks inside `0x4000..0x6000`.
pub const MAX_SMP_VCPUS: u32 = 16;

/// The vector the guest takes interrupts on (its IDT has this one gate).
pub const IRQ_VECTOR: u8 = 0x40;
/// Guest physical address of the interrupts-taken counter (before the shared counter).
pub const IRQ_COUNT_GPA: u64 = COUNTER_GPA - 8;
/// Guest physical address of the IDT (free space between the TSS's I/O map and the PML4).
pub const IDT_GPA: u64 = 0x8100;
/// IDT limit: gates `0..=IRQ_VECTOR`, only the last present.
pub const IDT_LIMIT: u16 = (IRQ_VECTOR as u16 + 1) * 16 - 1;
/// Guest physical address of the interrupt handler (after the program).
pub const IRQ_HANDLER_GPA: u64 = CODE_GPA + 0x400;
/// The CPL0 stack an interrupt switches to (the TSS's RSP0; it grows down towards the IDT).
/// One for all vCPUs, as the TSS is shared: only one vCPU may take an interrupt at a time.
pub const IRQ_STACK_TOP: u64 = 0x8f00;
/// The interrupt handler, at CPL0 in 64-bit mode: count the interrupt, EOI to the xAPIC, return.
#[rustfmt::skip]
pub const IRQ_HANDLER: [u8; 0x18] = [
    0x50, // 0x00: push %rax
    0xf0, 0x48, 0xff, 0x04, 0x25, 0xf0, 0x1f, 0x00, 0x00, // 0x01: lock incq 0x1ff0 (IRQ_COUNT_GPA)
    0xb8, 0xb0, 0x00, 0xe0, 0xfe, // 0x0a: mov $0xfee000b0,%eax (the LAPIC's EOI register)
    0xc7, 0x00, 0x00, 0x00, 0x00, 0x00, // 0x0f: movl $0x0,(%rax)
    0x58, // 0x15: pop %rax
    0x48, 0xcf, // 0x16: iretq
];

/// Mailbox offset (VMM → guest): guest physical address of the shared counter.
pub const MB_COUNTER_GPA: usize = 0x40;
/// Mailbox offset (guest → VMM): the TSC elapsed, at least, across the largest clock gap
/// ([`MB_MAX_GAP_US`](super::MB_MAX_GAP_US)).
pub const MB_TSC_MAX_STEP: usize = 0x48;
/// Mailbox offset (guest → VMM): the last TSC read.
pub const MB_TSC_LAST: usize = 0x50;
/// Mailbox offset (guest → VMM): TSC reads lower than the one before.
pub const MB_TSC_BACKWARDS: usize = 0x58;

const _: () = assert!(
    MAILBOX_GPA + MAX_SMP_VCPUS as u64 * SMP_MAILBOX_STRIDE <= COUNTER_GPA
        && SMP_MAILBOX_LEN as u64 <= SMP_MAILBOX_STRIDE
        && MAX_SMP_VCPUS as u64 * SMP_STACK_STRIDE <= 0x2000
        && IRQ_HANDLER_GPA >= CODE_GPA + super::program::GUEST_CODE.len() as u64
        && IRQ_HANDLER_GPA + IRQ_HANDLER.len() as u64 <= STACK_TOP - 0x2000
        && IDT_GPA > super::layout::TSS_GPA + super::layout::TSS_LIMIT as u64
        && IDT_GPA + IDT_LIMIT as u64 + 0x100 < IRQ_STACK_TOP
        && IRQ_STACK_TOP <= super::layout::PML4_GPA
);

/// Guest physical address of vCPU `k`'s mailbox.
pub fn smp_mailbox_gpa(k: u32) -> u64 {
    MAILBOX_GPA + u64::from(k) * SMP_MAILBOX_STRIDE
}

/// The registers vCPU `k` starts with: at [`SMP_ENTRY`], its own stack and mailbox, and
/// interrupts enabled (IF): only what the VMM sends arrives (every other source is masked).
pub fn smp_regs(k: u32) -> kvm_regs {
    kvm_regs {
        rip: SMP_ENTRY,
        rsp: STACK_TOP - u64::from(k) * SMP_STACK_STRIDE,
        r15: smp_mailbox_gpa(k),
        rflags: INITIAL_RFLAGS | 0x200,
        ..Default::default()
    }
}

/// The special registers of an SMP vCPU: [`initial_sregs`](super::initial_sregs) with the IDT.
pub fn smp_sregs(base: kvm_bindings::kvm_sregs) -> kvm_bindings::kvm_sregs {
    let mut s = super::cpu::initial_sregs(base);
    s.idt = kvm_bindings::kvm_dtable {
        base: IDT_GPA,
        limit: IDT_LIMIT,
        padding: [0; 3],
    };
    s
}

/// An SMP guest: `vcpus` vCPUs share `data_len` bytes at `data_gpa`, each its own slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SmpGuest {
    /// vCPUs, `1..=MAX_SMP_VCPUS`.
    pub vcpus: u32,
    /// Guest physical address of the data.
    pub data_gpa: u64,
    /// Bytes of data, at least one page per vCPU.
    pub data_len: u64,
}

impl SmpGuest {
    /// vCPU `k`'s region: an equal share of the data, whole pages (so that each starts at a
    /// multiple of the pattern's 256-byte period).
    pub fn region(&self, k: u32) -> (u64, u64) {
        let share = self.data_len / u64::from(self.vcpus.max(1)) / PAGE_SIZE * PAGE_SIZE;
        (self.data_gpa + u64::from(k) * share, share)
    }

    fn check(&self) -> Result<(), GuestError> {
        if !(1..=MAX_SMP_VCPUS).contains(&self.vcpus) {
            return Err(GuestError::SmpVcpus(self.vcpus));
        }
        let (_, share) = self.region(0);
        check_params(&GuestParams {
            data_gpa: self.data_gpa,
            data_len: self.data_len,
            mode: GuestMode::Smp,
        })?;
        if share == 0 {
            return Err(GuestError::DataRange {
                gpa: self.data_gpa,
                len: self.data_len,
                min: self.data_gpa,
                max: self.data_gpa + u64::from(self.vcpus) * PAGE_SIZE,
            });
        }
        Ok(())
    }
}

/// Build the image for an SMP guest into `low`: [`build_image`], then one mailbox per vCPU
/// with its region, and the counter at zero.
pub fn build_smp_image(low: &mut [u8], g: &SmpGuest) -> Result<(), GuestError> {
    g.check()?;
    let (gpa, len) = g.region(0);
    let params = GuestParams {
        data_gpa: gpa,
        data_len: len,
        mode: GuestMode::Smp,
    };
    build_image(low, &params)?;
    // The interrupt path: the handler, its IDT gate (64-bit interrupt gate, present, DPL 0,
    // kernel code), and the TSS's RSP0.
    let h = IRQ_HANDLER_GPA as usize;
    low[h..h + IRQ_HANDLER.len()].copy_from_slice(&IRQ_HANDLER);
    let gate = IDT_GPA as usize + usize::from(IRQ_VECTOR) * 16;
    let off = IRQ_HANDLER_GPA;
    let lo = (off & 0xffff)
        | (u64::from(super::layout::KERNEL_CS) << 16)
        | (0x8e << 40)
        | (((off >> 16) & 0xffff) << 48);
    put_u64(low, gate, lo);
    put_u64(low, gate + 8, off >> 32);
    put_u64(low, super::layout::TSS_GPA as usize + 4, IRQ_STACK_TOP);
    for k in 0..g.vcpus {
        let at = smp_mailbox_gpa(k) as usize;
        write_smp_mailbox(&mut low[at..at + SMP_MAILBOX_LEN], g, k)?;
    }
    Ok(())
}

/// Write vCPU `k`'s mailbox (at least [`SMP_MAILBOX_LEN`] bytes): its region, the SMP mode,
/// the counter's address, and every result field reset.
pub fn write_smp_mailbox(mb: &mut [u8], g: &SmpGuest, k: u32) -> Result<(), GuestError> {
    g.check()?;
    if mb.len() < SMP_MAILBOX_LEN {
        return Err(GuestError::MailboxTooSmall {
            need: SMP_MAILBOX_LEN,
            got: mb.len(),
        });
    }
    let (gpa, len) = g.region(k);
    write_params(
        mb,
        &GuestParams {
            data_gpa: gpa,
            data_len: len,
            mode: GuestMode::Smp,
        },
    )?;
    put_u64(mb, MB_COUNTER_GPA, COUNTER_GPA);
    put_u64(mb, MB_TSC_MAX_STEP, 0);
    put_u64(mb, MB_TSC_LAST, 0);
    put_u64(mb, MB_TSC_BACKWARDS, 0);
    Ok(())
}

/// What one vCPU of an SMP guest reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct SmpReport {
    /// Status, first bad offset, largest clock gap (µs) and loop count, as in every mode.
    #[serde(flatten)]
    pub base: GuestReport,
    /// The TSC elapsed (at least) across the largest clock gap.
    pub tsc_max_step: u64,
    /// The last TSC the vCPU read.
    pub tsc_last: u64,
    /// TSC reads lower than the previous one.
    pub tsc_backwards: u64,
}

/// Decode vCPU `k`'s report from a copy of the mailbox page (`page` starts at
/// [`MAILBOX_GPA`]).
pub fn read_smp_report(page: &[u8], k: u32) -> Result<SmpReport, GuestError> {
    let at = (smp_mailbox_gpa(k) - MAILBOX_GPA) as usize;
    let mb = page
        .get(at..at + SMP_MAILBOX_LEN)
        .ok_or(GuestError::MailboxTooSmall {
            need: at + SMP_MAILBOX_LEN,
            got: page.len(),
        })?;
    Ok(SmpReport {
        base: read_report(mb)?,
        tsc_max_step: get_u64(mb, MB_TSC_MAX_STEP),
        tsc_last: get_u64(mb, MB_TSC_LAST),
        tsc_backwards: get_u64(mb, MB_TSC_BACKWARDS),
    })
}

/// Interrupts the guest has taken, from a copy of the mailbox page.
pub fn read_irq_count(page: &[u8]) -> u64 {
    let at = (IRQ_COUNT_GPA - MAILBOX_GPA) as usize;
    page.get(at..at + 8).map_or(0, |b| get_u64(b, 0))
}

/// The shared counter, from a copy of the mailbox page.
pub fn read_counter(page: &[u8]) -> u64 {
    let at = (COUNTER_GPA - MAILBOX_GPA) as usize;
    page.get(at..at + 8).map_or(0, |b| get_u64(b, 0))
}

/// Check a finished SMP guest: every vCPU verified its region, its TSC never went back, and
/// the shared counter is the sum of the loop counts.
pub fn check_smp(reports: &[SmpReport], counter: u64) -> Result<(), String> {
    for (k, r) in reports.iter().enumerate() {
        if r.base.status != STATUS_VERIFY_OK {
            return Err(format!(
                "vCPU {k}: status {} (first bad offset {:?})",
                status_name(r.base.status),
                r.base.first_bad
            ));
        }
        if r.tsc_backwards != 0 {
            return Err(format!(
                "vCPU {k}: the TSC went backwards {} times",
                r.tsc_backwards
            ));
        }
    }
    let sum: u64 = reports.iter().map(|r| r.base.loops).sum();
    if sum != counter {
        return Err(format!(
            "shared counter {counter} but the vCPUs counted {sum} increments"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::guest::layout::{LOW_MEM_SIZE, PAGE_SIZE};

    #[test]
    fn smp_image_has_one_mailbox_per_vcpu() {
        let g = SmpGuest {
            vcpus: 4,
            data_gpa: 4 << 30,
            data_len: (16 << 20) + 100,
        };
        let mut low = vec![0u8; LOW_MEM_SIZE];
        build_smp_image(&mut low, &g).unwrap();
        let page = &low[MAILBOX_GPA as usize..(MAILBOX_GPA + PAGE_SIZE) as usize];
        for k in 0..4 {
            let at = (smp_mailbox_gpa(k) - MAILBOX_GPA) as usize;
            assert_eq!(get_u64(page, at + MB_MODE), MODE_SMP);
            assert_eq!(
                get_u64(page, at + MB_DATA_GPA),
                (4 << 30) + u64::from(k) * (4 << 20)
            );
            assert_eq!(get_u64(page, at + MB_DATA_LEN), 4 << 20);
            assert_eq!(get_u64(page, at + MB_COUNTER_GPA), COUNTER_GPA);
            let r = read_smp_report(page, k).unwrap();
            assert_eq!(r.base.status, STATUS_NONE);
            assert_eq!(smp_regs(k).r15, MAILBOX_GPA + u64::from(k) * 0x80);
        }
        assert_eq!(read_counter(page), 0);
        assert_eq!(read_irq_count(page), 0);
        // The handler's absolute operand is the count's address; the gate points at it.
        assert_eq!(
            u32::from_le_bytes(IRQ_HANDLER[6..10].try_into().unwrap()) as u64,
            IRQ_COUNT_GPA
        );
        let gate = IDT_GPA as usize + usize::from(IRQ_VECTOR) * 16;
        let lo = get_u64(&low, gate);
        assert_eq!((lo & 0xffff) | ((lo >> 32) & 0xffff_0000), IRQ_HANDLER_GPA);
        assert_eq!((lo >> 40) & 0xff, 0x8e);
        let h = IRQ_HANDLER_GPA as usize;
        assert_eq!(&low[h..h + IRQ_HANDLER.len()], &IRQ_HANDLER);
        assert_eq!(smp_regs(0).rflags & 0x200, 0x200);
        assert!(read_smp_report(&page[..0x100], 3).is_err());
    }

    #[test]
    fn bad_smp_guests_are_refused() {
        let mut low = vec![0u8; LOW_MEM_SIZE];
        for (vcpus, len) in [(0, 1 << 20), (17, 1 << 20), (4, 3 * 4096)] {
            let g = SmpGuest {
                vcpus,
                data_gpa: 4 << 30,
                data_len: len,
            };
            assert!(build_smp_image(&mut low, &g).is_err(), "{vcpus} {len}");
        }
    }

    #[test]
    fn the_check_finds_a_lost_increment_and_a_bad_vcpu() {
        let ok = SmpReport {
            base: GuestReport {
                status: STATUS_VERIFY_OK,
                first_bad: None,
                max_gap_us: 10,
                loops: 5,
            },
            tsc_max_step: 1,
            tsc_last: 2,
            tsc_backwards: 0,
        };
        assert_eq!(check_smp(&[ok, ok], 10), Ok(()));
        assert!(check_smp(&[ok, ok], 9).is_err());
        let back = SmpReport {
            tsc_backwards: 1,
            ..ok
        };
        assert!(check_smp(&[ok, back], 10).is_err());
        let mut bad = ok;
        bad.base.status = STATUS_VERIFY_FAILED;
        assert!(check_smp(&[bad, ok], 10).is_err());
    }
}
