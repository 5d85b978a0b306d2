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
//! 3. an `RDTSC`, keeping the largest forward step ([`MB_TSC_MAX_STEP`]) and counting backward
//!    steps ([`MB_TSC_BACKWARDS`]): the guest's own clock across the update;
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

/// Mailbox offset (VMM → guest): guest physical address of the shared counter.
pub const MB_COUNTER_GPA: usize = 0x40;
/// Mailbox offset (guest → VMM): largest forward step between two consecutive TSC reads.
pub const MB_TSC_MAX_STEP: usize = 0x48;
/// Mailbox offset (guest → VMM): the last TSC read.
pub const MB_TSC_LAST: usize = 0x50;
/// Mailbox offset (guest → VMM): TSC reads lower than the one before.
pub const MB_TSC_BACKWARDS: usize = 0x58;

const _: () = assert!(
    MAILBOX_GPA + MAX_SMP_VCPUS as u64 * SMP_MAILBOX_STRIDE <= COUNTER_GPA
        && SMP_MAILBOX_LEN as u64 <= SMP_MAILBOX_STRIDE
        && MAX_SMP_VCPUS as u64 * SMP_STACK_STRIDE <= 0x2000
);

/// Guest physical address of vCPU `k`'s mailbox.
pub fn smp_mailbox_gpa(k: u32) -> u64 {
    MAILBOX_GPA + u64::from(k) * SMP_MAILBOX_STRIDE
}

/// The registers vCPU `k` starts with: at [`SMP_ENTRY`], its own stack and mailbox.
pub fn smp_regs(k: u32) -> kvm_regs {
    kvm_regs {
        rip: SMP_ENTRY,
        rsp: STACK_TOP - u64::from(k) * SMP_STACK_STRIDE,
        r15: smp_mailbox_gpa(k),
        rflags: INITIAL_RFLAGS,
        ..Default::default()
    }
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
    /// Largest forward TSC step between two loop passes.
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
