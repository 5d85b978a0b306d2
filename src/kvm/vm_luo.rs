//! The RFC's KVM VM handler, "kvm_vm_luo_v1": preserves the VM type only; retrieve builds a
//! new, empty VM of that type. vCPUs, memslots and devices are the VMM's to recreate.

use zerocopy::IntoBytes;

use crate::abi::errno::{Errno, SysResult};
use crate::abi::kvm::{KvmLuoSer, KVM_LUO_FH_COMPATIBLE};
use crate::fs::FileId;
use crate::luo::{FileArgs, FileHandler, LuoCtx};
use crate::mm::{Folio, PhysRead};

use super::vcpu::VcpuState;
use super::{VcpuFile, VmFile};

/// The LUO file handler for VM files, `kvm_vm_luo_v1`; listed in
/// [`crate::registry::file_handlers`].
pub struct VmHandler;

/// What the VM handler (and the guest_memfd one) needs of its context besides [`LuoCtx`]: the
/// VM files of the file table, and a new VM on retrieve.
pub trait VmLuoCtx: LuoCtx {
    /// The VM file `file`, if it is one.
    fn vm_file(&self, file: FileId) -> Option<&VmFile>;
    /// Create the VM of a retrieved VM file: a new, empty VM of `vm_type`, named as the
    /// next restored VM.
    fn create_restored_vm(&mut self, vm_type: u64) -> SysResult<FileId>;
    /// The vCPU file `file`, if it is one.
    fn vcpu_file(&self, file: FileId) -> Option<&VcpuFile>;
    /// Create the vCPU of a retrieved vCPU file: vCPU `id` of the VM file `vm`, with `state`
    /// loaded.
    fn create_restored_vcpu(&mut self, vm: FileId, id: u64, state: &VcpuState)
        -> SysResult<FileId>;
}

impl<C: VmLuoCtx + ?Sized> FileHandler<C> for VmHandler {
    fn compatible(&self) -> &'static str {
        KVM_LUO_FH_COMPATIBLE
    }

    fn can_preserve(&self, host: &C, file: FileId) -> bool {
        host.vm_file(file).is_some()
    }

    fn preserve(&self, host: &mut C, a: &mut FileArgs) -> SysResult<()> {
        let vm_type = match a.file.and_then(|f| host.vm_file(f)) {
            Some(v) if !v.dead => v.inner.vm_type,
            _ => return Err(Errno::EINVAL),
        };
        let (kho, mm) = host.kho_mm();
        let f = kho.alloc_preserve(mm, 8)?;
        mm.ram
            .write_phys(f.pa(), KvmLuoSer { vm_type }.as_bytes())?;
        kho.label(f.pa(), "kvm-vm");
        a.serialized = f.pa();
        a.private = Some(Box::new(f));
        Ok(())
    }

    fn unpreserve(&self, host: &mut C, a: &mut FileArgs) {
        if let Some(f) = a.private.take().and_then(|p| p.downcast::<Folio>().ok()) {
            let (kho, mm) = host.kho_mm();
            let _ = kho.unpreserve_free(mm, *f);
        }
    }

    fn retrieve(&self, host: &mut C, a: &mut FileArgs) -> SysResult<()> {
        if !host.kho().is_restorable(a.serialized) {
            return Err(Errno::EINVAL);
        }
        let vm_type = host.mm().ram.read_u64(a.serialized)?;
        let (kho, mm) = host.kho_mm();
        kho.restore_free(mm, a.serialized).map_err(|_| Errno::EIO)?;
        a.file = Some(host.create_restored_vm(vm_type)?);
        Ok(())
    }

    fn finish(&self, host: &mut C, a: &mut FileArgs) {
        if a.retrieve_status == 0 {
            let (kho, mm) = host.kho_mm();
            let _ = kho.restore_free(mm, a.serialized);
        }
    }
}

/// Read the VM type of a handed-over VM file blob (for inspect).
pub fn describe(mem: &dyn PhysRead, pa: u64) -> String {
    match mem.read_u64(pa) {
        Ok(t) => format!("VM type {t}"),
        Err(e) => format!("unreadable: {e}"),
    }
}
