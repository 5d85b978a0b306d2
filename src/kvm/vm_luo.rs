//! The RFC's KVM VM handler, "kvm_vm_luo_v1": preserves the VM type only; retrieve builds a
//! new, empty VM of that type. vCPUs, memslots and devices are the VMM's to recreate.

use zerocopy::IntoBytes;

use crate::abi::errno::{Errno, SysResult};
use crate::abi::kvm::{KvmLuoSer, KVM_LUO_FH_COMPATIBLE};
use crate::fs::FileId;
use crate::host::files::FileKind;
use crate::host::Host;
use crate::luo::{FileArgs, FileHandler};
use crate::mm::{Folio, PhysRead};

pub struct VmHandler;

impl FileHandler<Host> for VmHandler {
    fn compatible(&self) -> &'static str {
        KVM_LUO_FH_COMPATIBLE
    }

    fn can_preserve(&self, host: &Host, file: FileId) -> bool {
        matches!(host.files.kind(file), Some(FileKind::Vm(_)))
    }

    fn preserve(&self, host: &mut Host, a: &mut FileArgs) -> SysResult<()> {
        let vm_type = match a.file.and_then(|f| host.files.kind(f)) {
            Some(FileKind::Vm(v)) if !v.dead => v.inner.vm_type,
            _ => return Err(Errno::EINVAL),
        };
        let f = host.kho.alloc_preserve(&mut host.mm, 8)?;
        host.mm
            .ram
            .write_phys(f.pa(), KvmLuoSer { vm_type }.as_bytes())?;
        host.kho.label(f.pa(), "kvm-vm");
        a.serialized = f.pa();
        a.private = Some(Box::new(f));
        Ok(())
    }

    fn unpreserve(&self, host: &mut Host, a: &mut FileArgs) {
        if let Some(f) = a.private.take().and_then(|p| p.downcast::<Folio>().ok()) {
            let _ = host.kho.unpreserve_free(&mut host.mm, *f);
        }
    }

    fn retrieve(&self, host: &mut Host, a: &mut FileArgs) -> SysResult<()> {
        if !host.kho.is_restorable(a.serialized) {
            return Err(Errno::EINVAL);
        }
        let vm_type = host.mm.ram.read_u64(a.serialized)?;
        host.kho
            .restore_free(&mut host.mm, a.serialized)
            .map_err(|_| Errno::EIO)?;
        host.restored_vms += 1;
        let name = format!("restored-{}", host.restored_vms);
        a.file = Some(host.kvm_create_vm_file(vm_type, Some(name))?);
        Ok(())
    }

    fn finish(&self, host: &mut Host, a: &mut FileArgs) {
        if a.retrieve_status == 0 {
            let _ = host.kho.restore_free(&mut host.mm, a.serialized);
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
