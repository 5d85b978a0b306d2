//! The vCPU's initial state: registers, segments and control registers for CPL3 long mode.

use kvm_bindings::{kvm_dtable, kvm_regs, kvm_segment, kvm_sregs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd};

use super::error::GuestError;
use super::image::GDT_LIMIT;
use super::layout::{
    CODE_GPA, GDT_GPA, PML4_GPA, STACK_TOP, TSS_GPA, TSS_LIMIT, TSS_SEL, USER_CS, USER_DS,
};

/// Initial RFLAGS: bit 1 (reserved, 1) and IOPL = 3; IF = 0.
pub const INITIAL_RFLAGS: u64 = 0x3002;
/// CR0: PE | MP | ET | NE | WP | PG.
pub const INITIAL_CR0: u64 = 0x8005_0033;
/// CR4: PAE.
pub const INITIAL_CR4: u64 = 0x20;
/// EFER: LME | LMA.
pub const INITIAL_EFER: u64 = 0x500;

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

/// Set an in-kernel LAPIC's software-enable bit (in the spurious-vector register), as a guest
/// that takes interrupts needs.
pub fn enable_lapic(v: &VcpuFd) -> Result<(), GuestError> {
    const SVR: usize = 0xf0;
    let kvm_err = |op| move |source| GuestError::Kvm { op, source };
    let mut la = v.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
    let old = u32::from_le_bytes(std::array::from_fn(|i| la.regs[SVR + i] as u8));
    for (i, b) in (old | 0x1ff).to_le_bytes().into_iter().enumerate() {
        la.regs[SVR + i] = b as i8;
    }
    v.set_lapic(&la).map_err(kvm_err("KVM_SET_LAPIC"))
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
