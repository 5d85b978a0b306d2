//! The vCPU file handler, `kvm_vcpu_luo_v1` (after the "Orphaned Virtual Machines" RFC): a VMM
//! preserves its vCPU fds beside the VM's; the kernel, not the VMM, saves each vCPU's whole
//! architectural state at freeze, and retrieve gives a vCPU of the retrieved VM with that state
//! loaded.
//!
//! - **preserve** (workload running): the file must be a live vCPU; a one-page blob
//!   ([`KvmVcpuLuoSer`]) records its id.
//! - **freeze** (in the kexec): the vCPU must not be in `KVM_RUN` (`EBUSY` otherwise, and the
//!   kexec is refused); its VM must be preserved in the same session (its token goes into the
//!   blob). The state ([`VcpuState::save`]: registers, segments, FPU/XSAVE, XCRs, debug
//!   registers, events, MP state, LAPIC with an irqchip, MSRs with TSC and kvmclock, CPUID) is
//!   encoded with its own CRC-32 into a second preserved allocation.
//! - **retrieve** (any order with the VM and the guest_memfds): the VM comes through the
//!   cross-file API (`luo_get_file_incoming`), retrieved now if it was not yet; a vCPU of the
//!   same id is created on it and the state loaded. A state that does not decode (checksum,
//!   version, lengths) or that KVM refuses fails the retrieve with `EINVAL`.

use zerocopy::{FromBytes, IntoBytes};

use crate::abi::errno::{Errno, SysResult};
use crate::abi::kvm::{KvmVcpuLuoSer, KVM_VCPU_LUO_FH_COMPATIBLE, KVM_VCPU_LUO_MAX_STATE};
use crate::fs::FileId;
use crate::luo::{FileArgs, FileHandler};
use crate::mm::PhysRead;

use super::state_blob::{self, Kept};
use super::vcpu::VcpuState;
use super::vm_luo::VmLuoCtx;

/// The LUO file handler for vCPU files; listed in [`crate::registry::file_handlers`].
pub struct VcpuHandler;

fn header(mem: &dyn PhysRead, pa: u64) -> SysResult<KvmVcpuLuoSer> {
    let mut b = [0u8; std::mem::size_of::<KvmVcpuLuoSer>()];
    mem.read_phys(pa, &mut b).map_err(|_| Errno::EIO)?;
    KvmVcpuLuoSer::read_from_bytes(&b).map_err(|_| Errno::EINVAL)
}

impl<C: VmLuoCtx + ?Sized> FileHandler<C> for VcpuHandler {
    fn compatible(&self) -> &'static str {
        KVM_VCPU_LUO_FH_COMPATIBLE
    }

    fn can_preserve(&self, host: &C, file: FileId) -> bool {
        host.vcpu_file(file).is_some()
    }

    fn preserve(&self, host: &mut C, a: &mut FileArgs) -> SysResult<()> {
        let (vm, id) = match a.file.and_then(|f| host.vcpu_file(f)) {
            Some(v) => (v.vm, v.id),
            None => return Err(Errno::EINVAL),
        };
        if host.vm_file(vm).is_none_or(|v| v.dead) {
            return Err(Errno::EINVAL);
        }
        let (kho, mm) = host.kho_mm();
        let ser = KvmVcpuLuoSer {
            vcpu_id: id,
            ..Default::default()
        };
        let kept = Kept::preserve(kho, mm, ser.as_bytes(), "kvm-vcpu")?;
        a.serialized = kept.pa();
        a.private = Some(Box::new(kept));
        Ok(())
    }

    fn unpreserve(&self, host: &mut C, a: &mut FileArgs) {
        if let Some(k) = a.private.take().and_then(|p| p.downcast::<Kept>().ok()) {
            let (kho, mm) = host.kho_mm();
            k.unpreserve(kho, mm);
        }
    }

    fn freeze(&self, host: &mut C, a: &mut FileArgs) -> SysResult<()> {
        let Some(file) = a.file else {
            return Err(Errno::EINVAL);
        };
        let (vm, vcpu, vcpu_id) = match host.vcpu_file(file) {
            Some(v) => (v.vm, v.handle()?, v.id),
            None => return Err(Errno::EINVAL),
        };
        let vm_token = host.luo_get_token_outgoing(a.session, vm)?;
        // Read ahead with every other vCPU, the vCPU held stopped since (see the host's
        // `kvm::vcpu_snapshot`); else read now.
        let state = if let Some(s) = host.take_vcpu_snapshot(file) {
            s.map_err(|e| {
                tracing::warn!("kvm_vcpu_luo: cannot save the vCPU: {e}");
                Errno::EIO
            })?
        } else {
            // A vCPU inside KVM_RUN holds its lock: it is not paused, so no consistent state.
            let v = match vcpu.try_lock() {
                Ok(v) => v,
                Err(std::sync::TryLockError::WouldBlock) => return Err(Errno::EBUSY),
                Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            };
            VcpuState::save(&v)
                .map_err(|e| {
                    tracing::warn!("kvm_vcpu_luo: cannot save the vCPU: {e}");
                    Errno::EIO
                })?
                .to_bytes()
        };
        let Some(k) = state_blob::kept(a) else {
            return Err(Errno::EINVAL);
        };
        let (kho, mm) = host.kho_mm();
        k.freeze(kho, mm, &state, "kvm-vcpu-state", |state_pa, state_len| {
            KvmVcpuLuoSer {
                vm_token,
                vcpu_id,
                state_pa,
                state_len,
            }
            .as_bytes()
            .to_vec()
        })
    }

    fn unfreeze(&self, host: &mut C, a: &mut FileArgs) {
        if let Some(k) = state_blob::kept(a) {
            let (kho, mm) = host.kho_mm();
            k.unfreeze(kho, mm);
        }
    }

    fn retrieve(&self, host: &mut C, a: &mut FileArgs) -> SysResult<()> {
        if !host.kho().is_restorable(a.serialized) {
            return Err(Errno::EINVAL);
        }
        let h = header(&host.mm().ram, a.serialized)?;
        let bytes = state_blob::read(host, h.state_pa, h.state_len, KVM_VCPU_LUO_MAX_STATE)?;
        let state = VcpuState::from_bytes(&bytes).map_err(|e| {
            tracing::warn!("kvm_vcpu_luo: vCPU {} state refused: {e}", h.vcpu_id);
            Errno::EINVAL
        })?;
        let vm = host.luo_get_file_incoming(a.session, h.vm_token)?;
        if host.vm_file(vm).is_none() {
            return Err(Errno::EINVAL);
        }
        a.file = Some(host.create_restored_vcpu(vm, h.vcpu_id, state)?);
        let (kho, mm) = host.kho_mm();
        kho.restore_free(mm, h.state_pa).map_err(|_| Errno::EIO)?;
        kho.restore_free(mm, a.serialized).map_err(|_| Errno::EIO)?;
        Ok(())
    }

    fn finish(&self, host: &mut C, a: &mut FileArgs) {
        if a.retrieve_status != 0 {
            return;
        }
        // Never retrieved: give back both allocations.
        let state = header(&host.mm().ram, a.serialized)
            .ok()
            .map(|h| h.state_pa);
        state_blob::release_unretrieved(host, state, a.serialized);
    }
}
