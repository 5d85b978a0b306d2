//! The KVM VM handlers.
//!
//! - The RFC's `kvm_vm_luo_v1` preserves the VM type only; retrieve builds a new, empty VM of
//!   that type. vCPUs, memslots and devices are the VMM's to recreate.
//! - Our `kvm_vm_luo_v2` also carries what a guest can observe of the VM itself
//!   ([`crate::abi::vm_state`]): the in-kernel PIC and IOAPIC, the PIT, the GSI routing, the
//!   TSS and identity-map addresses, and the clock. Preserve writes the type; freeze (vCPUs
//!   paused) saves the state into a second allocation; retrieve creates the VM and sets it up
//!   with that state before any vCPU exists, the clock advanced by the time that passed.
//!
//! New preservations use v2 (`--vm-luo v1` selects v1); both are read.

use zerocopy::{FromBytes, IntoBytes};

use crate::abi::errno::{Errno, SysResult};
use crate::abi::kvm::{
    KvmLuoSer, KvmVmLuoSerV2, KVM_LUO_FH_COMPATIBLE, KVM_VM_LUO_MAX_STATE,
    KVM_VM_LUO_V2_FH_COMPATIBLE,
};
use crate::abi::vm_state::VmState;
use crate::fs::FileId;
use crate::luo::{FileArgs, FileHandler, LuoCtx};
use crate::mm::{Folio, PhysRead};

use super::state_blob::{self, Kept};
use super::vcpu::VcpuState;
use super::{VcpuFile, VmFile};

/// Which blob format a [`VmHandler`] reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmFormat {
    /// The RFC's `kvm_vm_luo_v1`: the VM type.
    V1,
    /// `kvm_vm_luo_v2`: the type and the VM's state.
    V2,
}

/// The LUO file handler for VM files, one per format; listed in
/// [`crate::registry::file_handlers`].
pub struct VmHandler {
    /// The format of this handler's blobs.
    pub format: VmFormat,
}

/// What the VM handlers (and the guest_memfd and vCPU ones) need of their context besides
/// [`LuoCtx`]: the VM and vCPU files of the file table, and new ones on retrieve.
pub trait VmLuoCtx: LuoCtx {
    /// The VM file `file`, if it is one.
    fn vm_file(&self, file: FileId) -> Option<&VmFile>;
    /// Create the VM of a retrieved VM file: a new VM of `state.vm_type`, named as the next
    /// restored VM, set up with `state` (a v1 blob gives a state of its type only).
    fn create_restored_vm(&mut self, state: &VmState) -> SysResult<FileId>;
    /// The state of the VM of VM file `file`, its vCPUs paused.
    fn vm_save(&self, file: FileId) -> SysResult<VmState>;
    /// Preserve VM files in the RFC's v1 format (`--vm-luo v1`).
    fn vm_luo_v1(&self) -> bool;
    /// The vCPU file `file`, if it is one.
    fn vcpu_file(&self, file: FileId) -> Option<&VcpuFile>;
    /// Create the vCPU of a retrieved vCPU file: vCPU `id` of the VM file `vm`, with `state`
    /// loaded before its first use (by the thread that first uses it).
    fn create_restored_vcpu(&mut self, vm: FileId, id: u64, state: VcpuState) -> SysResult<FileId>;
    /// The state of vCPU file `file` as read for the freeze in progress while the vCPU was
    /// held stopped (encoded, or why it could not be read), if it was read ahead; once.
    fn take_vcpu_snapshot(&mut self, file: FileId) -> Option<Result<Vec<u8>, String>>;
}

fn v2_header(mem: &dyn PhysRead, pa: u64) -> SysResult<KvmVmLuoSerV2> {
    let mut b = [0u8; std::mem::size_of::<KvmVmLuoSerV2>()];
    mem.read_phys(pa, &mut b).map_err(|_| Errno::EIO)?;
    KvmVmLuoSerV2::read_from_bytes(&b).map_err(|_| Errno::EINVAL)
}

impl<C: VmLuoCtx + ?Sized> FileHandler<C> for VmHandler {
    fn compatible(&self) -> &'static str {
        match self.format {
            VmFormat::V1 => KVM_LUO_FH_COMPATIBLE,
            VmFormat::V2 => KVM_VM_LUO_V2_FH_COMPATIBLE,
        }
    }

    fn can_preserve(&self, host: &C, file: FileId) -> bool {
        let wanted = match self.format {
            VmFormat::V1 => true,
            VmFormat::V2 => !host.vm_luo_v1(),
        };
        wanted && host.vm_file(file).is_some()
    }

    fn preserve(&self, host: &mut C, a: &mut FileArgs) -> SysResult<()> {
        let vm_type = match a.file.and_then(|f| host.vm_file(f)) {
            Some(v) if !v.dead => v.inner.vm_type,
            _ => return Err(Errno::EINVAL),
        };
        let (kho, mm) = host.kho_mm();
        match self.format {
            VmFormat::V1 => {
                let f = state_blob::write(kho, mm, KvmLuoSer { vm_type }.as_bytes(), "kvm-vm")?;
                a.serialized = f.pa();
                a.private = Some(Box::new(f));
            }
            VmFormat::V2 => {
                let ser = KvmVmLuoSerV2 {
                    vm_type,
                    ..Default::default()
                };
                let kept = Kept::preserve(kho, mm, ser.as_bytes(), "kvm-vm-v2")?;
                a.serialized = kept.pa();
                a.private = Some(Box::new(kept));
            }
        }
        Ok(())
    }

    fn unpreserve(&self, host: &mut C, a: &mut FileArgs) {
        let Some(p) = a.private.take() else {
            return;
        };
        let (kho, mm) = host.kho_mm();
        match p.downcast::<Kept>() {
            Ok(k) => k.unpreserve(kho, mm),
            Err(p) => {
                if let Ok(f) = p.downcast::<Folio>() {
                    let _ = kho.unpreserve_free(mm, *f);
                }
            }
        }
    }

    fn freeze(&self, host: &mut C, a: &mut FileArgs) -> SysResult<()> {
        if self.format == VmFormat::V1 {
            return Ok(());
        }
        let file = a.file.ok_or(Errno::EINVAL)?;
        let state = host.vm_save(file)?;
        let bytes = state.to_bytes();
        let Some(k) = state_blob::kept(a) else {
            return Err(Errno::EINVAL);
        };
        let (kho, mm) = host.kho_mm();
        k.freeze(kho, mm, &bytes, "kvm-vm-state", |state_pa, state_len| {
            KvmVmLuoSerV2 {
                vm_type: state.vm_type,
                state_pa,
                state_len,
                reserved: 0,
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
        let (state, state_pa) = match self.format {
            VmFormat::V1 => {
                let vm_type = host.mm().ram.read_u64(a.serialized)?;
                (
                    VmState {
                        vm_type,
                        ..Default::default()
                    },
                    None,
                )
            }
            VmFormat::V2 => {
                let h = v2_header(&host.mm().ram, a.serialized)?;
                let bytes = state_blob::read(host, h.state_pa, h.state_len, KVM_VM_LUO_MAX_STATE)?;
                let st = VmState::from_bytes(&bytes).map_err(|e| {
                    tracing::warn!("kvm_vm_luo_v2: VM state refused: {e}");
                    Errno::EINVAL
                })?;
                if st.vm_type != h.vm_type {
                    return Err(Errno::EINVAL);
                }
                (st, Some(h.state_pa))
            }
        };
        a.file = Some(host.create_restored_vm(&state)?);
        let (kho, mm) = host.kho_mm();
        if let Some(pa) = state_pa {
            kho.restore_free(mm, pa).map_err(|_| Errno::EIO)?;
        }
        kho.restore_free(mm, a.serialized).map_err(|_| Errno::EIO)?;
        Ok(())
    }

    fn finish(&self, host: &mut C, a: &mut FileArgs) {
        if a.retrieve_status != 0 {
            return;
        }
        let state = match self.format {
            VmFormat::V1 => None,
            VmFormat::V2 => v2_header(&host.mm().ram, a.serialized)
                .ok()
                .map(|h| h.state_pa),
        };
        state_blob::release_unretrieved(host, state, a.serialized);
    }
}
