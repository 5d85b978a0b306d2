//! The MSRs saved with a vCPU's state, and reading and writing them through KVM.

use kvm_bindings::{kvm_msr_entry, Msrs, KVM_MAX_MSR_ENTRIES};
use kvm_ioctls::VcpuFd;

use super::error::{kvm_err, VcpuError};

/// MSRs saved by [`VcpuState::save`]: the architectural state a long-mode guest can change,
/// plus KVM's paravirtual per-vCPU MSRs. MSRs a vCPU cannot read are skipped.
///
/// [`VcpuState::save`]: crate::abi::vcpu_state::VcpuState::save
pub const DEFAULT_MSRS: &[u32] = &[
    0x0000_0010, // IA32_TSC (first: KVM derives the new VM's TSC offset from it)
    0x0000_003b, // IA32_TSC_ADJUST
    0x0000_0174, // IA32_SYSENTER_CS
    0x0000_0175, // IA32_SYSENTER_ESP
    0x0000_0176, // IA32_SYSENTER_EIP
    0x0000_01a0, // IA32_MISC_ENABLE
    0x0000_0277, // IA32_PAT
    0x0000_06e0, // IA32_TSC_DEADLINE
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
    0x4b56_4d01, // MSR_KVM_SYSTEM_TIME_NEW (kvmclock)
    0x4b56_4d02, // MSR_KVM_ASYNC_PF_EN
    0x4b56_4d03, // MSR_KVM_STEAL_TIME
    0x4b56_4d04, // MSR_KVM_PV_EOI_EN
    0x4b56_4d05, // MSR_KVM_POLL_CONTROL
    0x4b56_4d06, // MSR_KVM_ASYNC_PF_INT
];

/// `KVM_GET_MSRS` of `indices`, in order; MSRs the vCPU cannot read are skipped.
pub(super) fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, VcpuError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::TooMany {
            what: "MSRs",
            count: rest.len(),
            max: KVM_MAX_MSR_ENTRIES,
        })?;
        let n = vcpu
            .get_msrs(&mut msrs)
            .map_err(kvm_err("KVM_GET_MSRS"))?
            .min(rest.len());
        out.extend_from_slice(&msrs.as_slice()[..n]);
        // Entry `n` could not be read: skip it and go on with the rest.
        rest = rest.get(n + 1..).unwrap_or(&[]);
    }
    Ok(out)
}

/// `KVM_SET_MSRS` with all of `entries`. KVM refuses some writes of a value the fresh vCPU
/// already has (e.g. `MSR_KVM_ASYNC_PF_INT` = 0 without an in-kernel LAPIC): a refused MSR whose
/// current value already equals the saved one is skipped; any other refusal is an error.
pub(super) fn write_msrs(vcpu: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<(), VcpuError> {
    let mut rest = entries;
    while !rest.is_empty() {
        let msrs = Msrs::from_entries(rest).map_err(|_| VcpuError::TooMany {
            what: "MSRs",
            count: rest.len(),
            max: KVM_MAX_MSR_ENTRIES,
        })?;
        let done = vcpu.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
        let Some(refused) = rest.get(done) else {
            return Ok(());
        };
        let current = read_msrs(vcpu, &[refused.index])?;
        if current.first().map(|m| m.data) != Some(refused.data) {
            return Err(VcpuError::MsrRefused {
                done: entries.len() - rest.len() + done,
                total: entries.len(),
                index: refused.index,
            });
        }
        rest = &rest[done + 1..];
    }
    Ok(())
}
