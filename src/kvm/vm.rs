//! `/dev/kvm`, VM files and vCPU files, and their ioctls.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_ioctls::{VcpuFd, VmFd};

use crate::abi::errno::{Errno, SysResult};
use crate::fs::FileId;
use crate::mm::VaWindow;
use crate::uapi::MapId;

/// The real VM behind a VM file. Shared with the VM's guest_memfds (as `struct kvm` is).
pub struct VmInner {
    /// The real VM's fd (`KVM_CREATE_VM`).
    pub fd: VmFd,
    /// The machine type given to `KVM_CREATE_VM`; 0 is the default x86 VM, the only one whose
    /// guest_memfds LUO preserves. Handed over by the VM's LUO handler.
    pub vm_type: u64,
    /// Identifier from the host's VM sequence (retrieved VMs included); default name `vm-<id>`.
    pub id: u64,
    /// Name for logs: `vm-<id>`, or `restored-<n>` for a VM rebuilt by LUO retrieve.
    pub name: String,
    /// The host windows the real KVM memslots point into, by slot. A window is referenced
    /// here from the moment KVM accepted the slot until KVM has deleted it, so its address
    /// range is never unmapped (and never reused) while a guest can reach it.
    pub(crate) windows: Mutex<BTreeMap<u32, Arc<VaWindow>>>,
    /// What the VMM set that KVM cannot be asked for (irqchip, PIT, routing, real-mode
    /// addresses), recorded as KVM accepted it; `kvm_vm_luo_v2` carries it.
    pub config: Mutex<super::vm_state::VmConfig>,
    /// A retrieved VM's interrupt controllers, not created yet: the host creates them from
    /// this state before the VM's first vCPU or first interrupt-related ioctl
    /// (`Host::vm_materialize`), so that the memslots the VMM binds first are cheap.
    pub(crate) pending_irqchip: Mutex<Option<crate::abi::vm_state::VmState>>,
}

impl VmInner {
    pub(crate) fn new(fd: VmFd, vm_type: u64, id: u64, name: String) -> Self {
        Self {
            fd,
            vm_type,
            id,
            name,
            windows: Mutex::new(BTreeMap::new()),
            config: Mutex::new(Default::default()),
            pending_irqchip: Mutex::new(None),
        }
    }

    /// `(slot, window base, window length)` of every slot KVM has, for checks.
    pub fn slot_windows(&self) -> Vec<(u32, u64, u64)> {
        self.windows()
            .iter()
            .map(|(s, w)| (*s, w.base() as u64, w.len()))
            .collect()
    }

    /// The recorded configuration (see [`VmInner::config`]).
    pub fn config(&self) -> std::sync::MutexGuard<'_, super::vm_state::VmConfig> {
        self.config.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn windows(&self) -> std::sync::MutexGuard<'_, BTreeMap<u32, Arc<VaWindow>>> {
        self.windows.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Set or delete a real memslot, and only once KVM has done so, swap the window it
    /// holds: the old window (if any) is released after KVM stopped using it. On error
    /// nothing changed, in KVM or here.
    pub(crate) fn set_slot(
        &self,
        slot: u32,
        gpa: u64,
        window: Option<(Arc<VaWindow>, u64)>,
        size: u64,
    ) -> SysResult<()> {
        let uaddr = window.as_ref().map_or(0, |(w, off)| w.base() as u64 + off);
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: uaddr,
        };
        // SAFETY: `uaddr..uaddr+size` lies inside `window` (the caller checked it), a host
        // window that this table keeps reserved until KVM has deleted the slot again; size 0
        // deletes the slot and maps nothing.
        unsafe { self.fd.set_user_memory_region(region) }.map_err(kvm_err)?;
        let old = match window {
            Some((w, _)) => self.windows().insert(slot, w),
            None => self.windows().remove(&slot),
        };
        drop(old);
        Ok(())
    }
}

impl Drop for VmInner {
    /// The last user of the VM is gone. vCPU fds may still keep the kernel's VM alive, so
    /// delete every memslot before the windows go; a window whose slot KVM refuses to delete
    /// stays reserved for good.
    fn drop(&mut self) {
        let windows = std::mem::take(self.windows.get_mut().unwrap_or_else(|p| p.into_inner()));
        for (slot, w) in windows {
            let region = kvm_bindings::kvm_userspace_memory_region {
                slot,
                ..Default::default()
            };
            // SAFETY: deleting a slot (size 0) maps nothing.
            if let Err(e) = unsafe { self.fd.set_user_memory_region(region) } {
                tracing::error!(
                    "VM {}: cannot delete memslot {slot}: {e}; its window stays",
                    self.name
                );
                std::mem::forget(w);
            }
        }
    }
}

/// A memslot as we track it.
#[derive(Debug, Clone, Copy)]
pub struct Slot {
    /// Guest physical address of the slot's first byte.
    pub gpa: u64,
    /// Slot size in bytes (0 is not tracked: it deletes the slot).
    pub size: u64,
    /// guest_memfd file and offset, for guest_memfd slots.
    pub gmem: Option<(FileId, u64)>,
    /// The mapping the slot points into: the guest_memfd's kernel mapping, or the caller's
    /// mapping for a plain slot.
    pub map: MapId,
}

/// A VM file (`KVM_CREATE_VM`'s fd): the shared VM and the memslots set through it.
pub struct VmFile {
    /// The VM, shared with its guest_memfds.
    pub inner: Arc<VmInner>,
    /// Memslots by slot number (`KVM_SET_USER_MEMORY_REGION2`), as the host tracks them.
    pub slots: BTreeMap<u32, Slot>,
    /// Killed (e.g. by an unrecoverable error): cannot be preserved.
    pub dead: bool,
}

/// A vCPU file (`KVM_CREATE_VCPU`'s fd).
pub struct VcpuFile {
    /// The real vCPU; its mutex is held for the whole of a `Host::vcpu_run`. Reached through
    /// [`VcpuFile::handle`], which loads a pending state first.
    vcpu: Arc<Mutex<VcpuFd>>,
    /// The state a retrieve (`kvm_vcpu_luo`) left to load: it is loaded before the vCPU's first
    /// use, by the thread that first uses it, so that a VMM restoring many VMs does not load
    /// every vCPU's state on its one thread (see docs/vmm.md, "Many VMs").
    pending: PendingState,
    /// The VM file it was created on.
    pub vm: FileId,
    /// The vCPU id passed to `KVM_CREATE_VCPU`.
    pub id: u64,
}

/// A vCPU state waiting to be loaded into its vCPU.
pub type PendingState = Arc<Mutex<Option<Box<crate::kvm::vcpu::VcpuState>>>>;

impl VcpuFile {
    /// A vCPU file for `vcpu` of VM file `vm`, with `pending` to load before its first use.
    pub fn new(
        vcpu: VcpuFd,
        vm: FileId,
        id: u64,
        pending: Option<crate::kvm::vcpu::VcpuState>,
    ) -> VcpuFile {
        VcpuFile {
            vcpu: Arc::new(Mutex::new(vcpu)),
            pending: Arc::new(Mutex::new(pending.map(Box::new))),
            vm,
            id,
        }
    }

    /// The real vCPU, its pending state loaded first (EIO if KVM refuses that state).
    pub fn handle(&self) -> SysResult<Arc<Mutex<VcpuFd>>> {
        load_pending(&self.vcpu, &self.pending)?;
        Ok(self.vcpu.clone())
    }

    /// The real vCPU and its pending state, for a run that loads the state on its own
    /// thread ([`load_pending`]).
    pub fn parts(&self) -> (Arc<Mutex<VcpuFd>>, PendingState) {
        (self.vcpu.clone(), self.pending.clone())
    }
}

/// Load `pending` into `vcpu` if a state is waiting (once; EIO if KVM refuses it, and the
/// state is then dropped: the vCPU is unusable, as after a failed `KVM_SET_*`).
pub fn load_pending(
    vcpu: &Mutex<VcpuFd>,
    pending: &Mutex<Option<Box<crate::kvm::vcpu::VcpuState>>>,
) -> SysResult<()> {
    let mut p = pending.lock().map_err(|_| Errno::EIO)?;
    if let Some(state) = p.take() {
        let v = vcpu.lock().map_err(|_| Errno::EIO)?;
        state.restore(&v).map_err(|e| {
            tracing::warn!("vCPU state refused when loaded: {e}");
            Errno::EIO
        })?;
    }
    Ok(())
}

pub(crate) fn arg_u64(arg: &[u8]) -> SysResult<u64> {
    let b: [u8; 8] = arg
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or(Errno::EFAULT)?;
    Ok(u64::from_ne_bytes(b))
}

pub(crate) fn kvm_err(e: kvm_ioctls::Error) -> Errno {
    Errno(e.errno())
}

/// Whether VMs of `vm_type` have private memory: here the software-protected type, served on
/// a default VM of the machine's KVM (which offers no other), its private pages kept from the
/// host by the host image itself.
pub fn has_private_memory(vm_type: u64) -> bool {
    vm_type == crate::abi::kvm::KVM_X86_SW_PROTECTED_VM
}
