//! The test guest of handover's `src/vmm/guest/`: a long-mode program that runs at CPL3. Its
//! low-memory image (page tables, GDT, TSS with an I/O bitmap, code, mailbox) comes from
//! `handover guest-image`; this module knows the layout facts a VMM needs to start it and to
//! talk to it, and runs it on a kvm-ioctls vCPU.

use std::fmt;
use std::time::Instant;

use kvm_bindings::{kvm_segment, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

use crate::mem::Mapping;

/// Slot 0 at GPA 0.
pub const LOW_MEM_SIZE: usize = 2 << 20;
/// The image: up to the last page directory.
pub const LOW_IMAGE_SIZE: usize = 0x4b000;
const MAILBOX_GPA: usize = 0x1000;
const GDT_GPA: u64 = 0x2000;
/// 8 descriptors + the 16-byte TSS descriptor - 1.
const GDT_LIMIT: u16 = 0x4f;
const CODE_GPA: u64 = 0x3000;
const STACK_TOP: u64 = 0x6000;
const TSS_GPA: u64 = 0x6000;
/// 0x68 + 8 KiB I/O bitmap.
const TSS_LIMIT: u32 = 0x2068;
const PML4_GPA: u64 = 0x9000;
const USER_DS: u16 = 0x2b;
const USER_CS: u16 = 0x33;
const TSS_SEL: u16 = 0x40;

pub const PORT_STATUS: u16 = 0x0e80;
pub const PORT_CLOCK: u16 = 0x0e84;
pub const PORT_PROCEED: u16 = 0x0e88;

const MB_MAGIC: usize = 0x00;
const MB_DATA_GPA: usize = 0x08;
const MB_DATA_LEN: usize = 0x10;
const MB_MODE: usize = 0x18;
const MB_STATUS: usize = 0x20;
pub const MB_FIRST_BAD: usize = 0x28;
/// "HOVGUES1", little-endian.
const GUEST_MAGIC: u64 = u64::from_le_bytes(*b"HOVGUES1");

pub const MODE_WRITE: u64 = 1;
pub const MODE_VERIFY: u64 = 2;
pub const STATUS_WRITTEN: u64 = 1;
pub const STATUS_VERIFY_OK: u64 = 2;

/// Bit 1, IOPL 3.
const INITIAL_RFLAGS: u64 = 0x3002;
/// PE MP ET NE WP PG.
const INITIAL_CR0: u64 = 0x8005_0033;
/// PAE.
const INITIAL_CR4: u64 = 0x20;
/// LME LMA.
const INITIAL_EFER: u64 = 0x500;

/// The data region the images are built for: 5 MiB at 4 GiB.
pub const DATA_GPA: u64 = 4 << 30;
pub const DATA_LEN: usize = 5 << 20;

/// The pattern the guest writes: `byte[i] = i ^ 0x5a` (low byte).
pub fn pattern_byte(i: usize) -> u8 {
    (i ^ 0x5a) as u8
}

/// Milliseconds since `t0`.
fn ms_since(t0: Instant) -> f64 {
    t0.elapsed().as_secs_f64() * 1e3
}

/// An error with what the VMM was doing.
#[derive(Debug)]
pub struct Error(pub String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<E: std::error::Error> From<(&str, E)> for Error {
    fn from((what, e): (&str, E)) -> Error {
        Error(format!("{what}: {e}"))
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// `Err` with a message.
pub fn fail<T>(msg: String) -> Result<T> {
    Err(Error(msg))
}

/// Load the image at `path` (from `handover guest-image`) into `low` and check its mailbox:
/// the data region and the mode the scenario expects. Read into a buffer, then copied in.
pub fn load_image(path: &str, low: &Mapping, want_mode: u64) -> Result<()> {
    let img = std::fs::read(path).map_err(|e| Error(format!("{path}: {e}")))?;
    if img.len() != LOW_IMAGE_SIZE {
        return fail(format!(
            "{path}: {} bytes, want {LOW_IMAGE_SIZE} (the guest's low-memory image)",
            img.len()
        ));
    }
    low.write(0, &img);
    let mb = |off| low.read_u64(MAILBOX_GPA + off);
    if mb(MB_MAGIC) != GUEST_MAGIC {
        return fail(format!("{path}: no guest magic in the mailbox"));
    }
    if mb(MB_DATA_GPA) != DATA_GPA || mb(MB_DATA_LEN) != DATA_LEN as u64 {
        return fail(format!(
            "{path}: data {:#x}+{:#x}, want {DATA_GPA:#x}+{DATA_LEN:#x}",
            mb(MB_DATA_GPA),
            mb(MB_DATA_LEN)
        ));
    }
    if mb(MB_MODE) != want_mode {
        return fail(format!("{path}: mode {}, want {want_mode}", mb(MB_MODE)));
    }
    Ok(())
}

/// A mailbox field of the guest in `low`.
pub fn mailbox(low: &Mapping, off: usize) -> u64 {
    low.read_u64(MAILBOX_GPA + off)
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
        ..Default::default()
    }
}

/// vCPU `id` of `vm`, with the supported CPUID and the guest's starting state: 64-bit mode at
/// CPL3, paging on, the TSS with its I/O bitmap, RIP at the code.
pub fn create_vcpu(kvm: &Kvm, vm: &VmFd, id: u64) -> Result<VcpuFd> {
    let vcpu = vm.create_vcpu(id).map_err(|e| ("KVM_CREATE_VCPU", e))?;
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| ("KVM_GET_SUPPORTED_CPUID", e))?;
    vcpu.set_cpuid2(&cpuid).map_err(|e| ("KVM_SET_CPUID2", e))?;
    // Start from the vCPU's own state (apic_base and the like).
    let mut s = vcpu.get_sregs().map_err(|e| ("KVM_GET_SREGS", e))?;
    s.cs = user_segment(USER_CS, 0xb, 1, 0);
    s.ds = user_segment(USER_DS, 0x3, 0, 1);
    s.es = s.ds;
    s.fs = s.ds;
    s.gs = s.ds;
    s.ss = s.ds;
    s.tr = kvm_segment {
        base: TSS_GPA,
        limit: TSS_LIMIT,
        selector: TSS_SEL,
        type_: 0xb, // busy 64-bit TSS
        present: 1,
        ..Default::default()
    };
    s.ldt = kvm_segment {
        type_: 0x2,
        unusable: 1,
        ..Default::default()
    };
    s.gdt.base = GDT_GPA;
    s.gdt.limit = GDT_LIMIT;
    s.idt.base = 0; // no IDT: an exception is a triple fault
    s.idt.limit = 0;
    s.cr0 = INITIAL_CR0;
    s.cr2 = 0;
    s.cr3 = PML4_GPA;
    s.cr4 = INITIAL_CR4;
    s.cr8 = 0;
    s.efer = INITIAL_EFER;
    s.interrupt_bitmap = [0; 4];
    vcpu.set_sregs(&s).map_err(|e| ("KVM_SET_SREGS", e))?;
    let r = kvm_bindings::kvm_regs {
        rip: CODE_GPA,
        rsp: STACK_TOP,
        rflags: INITIAL_RFLAGS,
        ..Default::default()
    };
    vcpu.set_regs(&r).map_err(|e| ("KVM_SET_REGS", e))?;
    Ok(vcpu)
}

/// What one exit asks of the run loop, decided while `kvm_run` is borrowed.
enum Step {
    Again,
    Status(u64),
    Stop(String),
    Dump(String),
}

/// Run the guest until it reports a final status (an OUT to [`PORT_STATUS`]); the status. The
/// guest then repeats its OUT forever, so not running the vCPU again leaves it stopped.
pub fn run(vcpu: &mut VcpuFd, low: &Mapping, what: &str) -> Result<u64> {
    let t0 = Instant::now();
    for exits in 1..=100_000u64 {
        let step = match vcpu.run() {
            Ok(VcpuExit::IoOut(PORT_STATUS, data)) if data.len() == 4 => Step::Status(u64::from(
                u32::from_le_bytes(data.try_into().expect("4 bytes")),
            )),
            Ok(VcpuExit::IoIn(PORT_CLOCK, data)) if data.len() == 4 => {
                let us = t0.elapsed().as_micros() as u32;
                data.copy_from_slice(&us.to_le_bytes());
                Step::Again
            }
            Ok(VcpuExit::IoIn(PORT_PROCEED, data)) if data.len() == 4 => {
                data.copy_from_slice(&1u32.to_le_bytes());
                Step::Again
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                Step::Stop(format!("IN of {} bytes from port {port:#x}", data.len()))
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                Step::Stop(format!("OUT of {} bytes to port {port:#x}", data.len()))
            }
            Ok(VcpuExit::Intr) => Step::Again,
            Ok(VcpuExit::MmioRead(a, _)) | Ok(VcpuExit::MmioWrite(a, _)) => {
                Step::Stop(format!("MMIO at {a:#x} (no memslot there)"))
            }
            Ok(VcpuExit::Shutdown) => Step::Dump("guest shut down (triple fault)".into()),
            Ok(other) => Step::Dump(format!("unexpected exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Step::Again,
            Err(e) => Step::Dump(format!("KVM_RUN: {e}")),
        };
        match step {
            Step::Again => {}
            Step::Status(st) => {
                let mb = mailbox(low, MB_STATUS);
                if mb != st {
                    return fail(format!("{what}: OUT status {st} but the mailbox says {mb}"));
                }
                println!(
                    "kvm-vmm: {what}: status {st} at exit {exits}, {:.2} ms",
                    ms_since(t0)
                );
                return Ok(st);
            }
            Step::Stop(msg) => return fail(format!("{what}: {msg}")),
            Step::Dump(msg) => {
                let regs = vcpu
                    .get_regs()
                    .map(|r| {
                        format!(
                            "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rcx={:#x} rdi={:#x}",
                            r.rip, r.rsp, r.rflags, r.rax, r.rcx, r.rdi
                        )
                    })
                    .unwrap_or_else(|e| format!("KVM_GET_REGS: {e}"));
                return fail(format!("{what}: {msg} ({regs})"));
            }
        }
    }
    fail(format!("{what}: no status after 100000 exits"))
}

/// Check the guest_memfd through its mapping: the pattern in the data and, with `check_tail`,
/// zeros in the rest of the file.
pub fn check_gmem(map: &Mapping, check_tail: bool, when: &str) -> Result<()> {
    let t0 = Instant::now();
    if let Some(i) = (0..DATA_LEN).find(|&i| map.read_u8(i) != pattern_byte(i)) {
        return fail(format!(
            "{when}: guest_memfd byte {i:#x} is {:#x}, want {:#x}",
            map.read_u8(i),
            pattern_byte(i)
        ));
    }
    if check_tail {
        if let Some(i) = map.first_nonzero(DATA_LEN) {
            return fail(format!(
                "{when}: guest_memfd byte {i:#x} past the data is {:#x}, want 0",
                map.read_u8(i)
            ));
        }
    }
    println!(
        "kvm-vmm: {when}: guest_memfd mmap holds the {DATA_LEN}-byte pattern{} ({:.2} ms)",
        if check_tail { ", the rest is zero" } else { "" },
        ms_since(t0)
    );
    Ok(())
}
