//! `/dev/kvm`, VM files and vCPU files on the host, and their ioctls.

use crate::abi::errno::{Errno, SysResult};
use crate::abi::kvm::*;
use crate::abi::vm_state::VmState;
use crate::fs::FileId;
use crate::host::files::FileKind;
use crate::host::Host;
use crate::kvm::vm::*;
use crate::kvm::GuestMemfd;
use crate::mm::PAGE_SIZE;
use crate::uapi::{MapId, Pid, KERNEL_PID};
use kvm_ioctls::{Kvm, VcpuFd};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use zerocopy::{FromBytes, FromZeros};

impl Host {
    /// The machine's KVM, opened once per image.
    pub fn real_kvm(&mut self) -> SysResult<Arc<Kvm>> {
        if let Some(k) = &self.kvm {
            return Ok(k.clone());
        }
        let k = Arc::new(Kvm::new().map_err(kvm_err)?);
        // Ask the XSAVE size once, while /dev/kvm is open anyway (vCPU state capture needs it).
        crate::kvm::vcpu::init_xsave_size(&k);
        self.kvm = Some(k.clone());
        Ok(k)
    }

    /// A new VM file of `vm_type` on the real KVM.
    ///
    /// A software-protected VM (type 1) is a default VM of the machine's KVM, which offers no
    /// private-memory type: the host image keeps its private pages from the host itself.
    pub fn kvm_create_vm_file(&mut self, vm_type: u64, name: Option<String>) -> SysResult<FileId> {
        let kvm = self.real_kvm()?;
        let real_type = if has_private_memory(vm_type) {
            KVM_X86_DEFAULT_VM
        } else {
            vm_type
        };
        let fd = match self.vm_pool.take(real_type) {
            Some(fd) => fd,
            None => kvm.create_vm_with_type(real_type).map_err(kvm_err)?,
        };
        self.next_vm_id += 1;
        let id = self.next_vm_id;
        let inner = Arc::new(VmInner::new(
            fd,
            vm_type,
            id,
            name.unwrap_or_else(|| format!("vm-{id}")),
        ));
        Ok(self.files.install(FileKind::Vm(VmFile {
            inner,
            slots: BTreeMap::new(),
            dead: false,
        })))
    }

    pub(crate) fn kvm_dev_ioctl(&mut self, pid: Pid, cmd: u64, arg: &mut [u8]) -> SysResult<i64> {
        match cmd {
            KVM_GET_API_VERSION => Ok(12),
            KVM_CHECK_EXTENSION => self.kvm_check_extension(arg_u64(arg)?, None),
            KVM_CREATE_VM => {
                let f = self.kvm_create_vm_file(arg_u64(arg)?, None)?;
                Ok(self.fd_install(pid, f, true)? as i64)
            }
            _ => self.kvm_dev_passthrough(cmd, arg),
        }
    }

    /// `KVM_CHECK_EXTENSION` on `/dev/kvm` (`vm_type` None) or on a VM of `vm_type`.
    fn kvm_check_extension(&mut self, cap: u64, vm_type: Option<u64>) -> SysResult<i64> {
        Ok(match cap {
            KVM_CAP_GUEST_MEMFD => 1,
            KVM_CAP_GUEST_MEMFD_FLAGS => self.gmem_supported_flags(vm_type) as i64,
            KVM_CAP_VM_TYPES => {
                let real = self.real_kvm()?.check_extension_raw(cap);
                (real.max(0) as i64) | (1 << KVM_X86_SW_PROTECTED_VM)
            }
            KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES => {
                if vm_type.is_none_or(has_private_memory) {
                    KVM_MEMORY_ATTRIBUTE_PRIVATE as i64
                } else {
                    0
                }
            }
            c => {
                let kvm = self.real_kvm()?;
                // SAFETY-free: a plain ioctl on the real /dev/kvm.
                kvm.check_extension_raw(c) as i64
            }
        })
    }

    pub(crate) fn kvm_vm_ioctl(
        &mut self,
        pid: Pid,
        vm: FileId,
        cmd: u64,
        arg: &mut [u8],
    ) -> SysResult<i64> {
        match cmd {
            KVM_CHECK_EXTENSION => {
                let t = self.vm_inner(vm)?.vm_type;
                self.kvm_check_extension(arg_u64(arg)?, Some(t))
            }
            KVM_CREATE_GUEST_MEMFD => {
                let a = CreateGuestMemfd::read_from_bytes(arg.get(..64).ok_or(Errno::EFAULT)?)
                    .map_err(|_| Errno::EFAULT)?;
                if a.reserved.iter().any(|&r| r != 0) || a.pad.iter().any(|&p| p != 0) {
                    return Err(Errno::EINVAL);
                }
                let f = self.gmem_create_order(vm, a.size, a.flags, u32::from(a.page_order))?;
                // Like the kernel: a guest_memfd fd is not close-on-exec.
                Ok(self.fd_install(pid, f, false)? as i64)
            }
            KVM_SET_USER_MEMORY_REGION => {
                // The original call: the same as REGION2 without guest_memfd.
                let v1 = arg.get(..32).ok_or(Errno::EFAULT)?;
                let word =
                    |i: usize| u64::from_ne_bytes(v1[i..i + 8].try_into().unwrap_or_default());
                let slot = u32::from_ne_bytes(v1[0..4].try_into().unwrap_or_default());
                let flags = u32::from_ne_bytes(v1[4..8].try_into().unwrap_or_default());
                if flags & KVM_MEM_GUEST_MEMFD != 0 {
                    return Err(Errno::EINVAL);
                }
                let mut r = UserMemoryRegion2::new_zeroed();
                r.slot = slot;
                r.flags = flags;
                r.guest_phys_addr = word(8);
                r.memory_size = word(16);
                r.userspace_addr = word(24);
                self.kvm_set_memory_region(pid, vm, &r)?;
                Ok(0)
            }
            KVM_SET_USER_MEMORY_REGION2 => {
                let r = UserMemoryRegion2::read_from_bytes(arg.get(..160).ok_or(Errno::EFAULT)?)
                    .map_err(|_| Errno::EFAULT)?;
                self.kvm_set_memory_region(pid, vm, &r)?;
                Ok(0)
            }
            KVM_CREATE_VCPU => {
                let f = self.kvm_create_vcpu_file(vm, arg_u64(arg)?, None)?;
                Ok(self.fd_install(pid, f, true)? as i64)
            }
            KVM_SET_TSS_ADDR
            | KVM_SET_IDENTITY_MAP_ADDR
            | KVM_CREATE_IRQCHIP
            | KVM_CREATE_PIT2
            | KVM_SET_GSI_ROUTING => {
                let inner = self.vm_inner(vm)?;
                Self::vm_materialize(&inner)?;
                let r = self.kvm_vm_passthrough(vm, cmd, arg)?;
                inner.config().record(cmd, arg);
                Ok(r)
            }
            _ => {
                // Anything else may see the interrupt controllers: a retrieved VM gets them now.
                Self::vm_materialize(self.vm_inner(vm)?.as_ref())?;
                self.kvm_vm_passthrough(vm, cmd, arg)
            }
        }
    }

    /// A new VM file for a retrieved one: a VM of `state.vm_type` named as the next restored
    /// VM, set up with `state` before anything else can reach it (see `kvm::vm_state::restore`).
    pub fn kvm_create_restored_vm(&mut self, state: &VmState) -> SysResult<FileId> {
        self.restored_vms += 1;
        let name = format!("restored-{}", self.restored_vms);
        let f = self.kvm_create_vm_file(state.vm_type, Some(name))?;
        let inner = self.vm_inner(f)?;
        match crate::kvm::vm_state::restore(&inner.fd, state) {
            Ok(cfg) => {
                *inner.config() = cfg;
                if crate::kvm::vm_state::has_irqchip(state) {
                    *lock(&inner.pending_irqchip) = Some(state.clone());
                }
                Ok(f)
            }
            Err(e) => {
                tracing::warn!("{}: VM state refused: {e}", inner.name);
                self.fput(f);
                Err(Errno::EINVAL)
            }
        }
    }

    /// Create a retrieved VM's interrupt controllers if they are still pending (see
    /// `VmInner::pending_irqchip`): before its first vCPU, an ioctl that could see them, or its
    /// next freeze. `EINVAL` if KVM refuses the state. The pending state stays locked until
    /// they exist, so that a caller on another thread never sees a VM half made.
    pub(crate) fn vm_materialize(inner: &VmInner) -> SysResult<()> {
        let mut pending = lock(&inner.pending_irqchip);
        let Some(st) = pending.take() else {
            return Ok(());
        };
        let mut cfg = inner.config();
        crate::kvm::vm_state::restore_irqchip(&inner.fd, &st, &mut cfg).map_err(|e| {
            tracing::warn!("{}: irqchip state refused: {e}", inner.name);
            Errno::EINVAL
        })
    }

    /// `Host::vm_materialize` for the VM file behind `fd`, with the host lock held only to
    /// find it. A VMM that restores many VMs at once calls this between binding a VM's memory
    /// and retrieving its vCPUs: the KVM work of creating the interrupt controllers of
    /// different VMs (about 0.3 ms each here) then runs on several CPUs at once.
    pub fn vm_materialize_unlocked(host: &Mutex<Host>, pid: Pid, fd: i32) -> SysResult<()> {
        let inner = {
            let h = host.lock().map_err(|_| Errno::EIO)?;
            let f = h.fd_file(pid, fd)?;
            h.vm_inner(f)?
        };
        Self::vm_materialize(&inner)
    }

    /// The state of the VM behind VM file `vm` (see `kvm::vm_state::save`).
    pub fn kvm_vm_save(&self, vm: FileId) -> SysResult<VmState> {
        let inner = self.vm_inner(vm)?;
        Self::vm_materialize(&inner)?;
        let cfg = inner.config().clone();
        crate::kvm::vm_state::save(&inner.fd, inner.vm_type, &cfg).map_err(|e| {
            tracing::warn!("{}: cannot save the VM: {e}", inner.name);
            Errno::EIO
        })
    }

    /// A new vCPU file: vCPU `id` of the VM file `vm`, with `state` (a vCPU retrieved by LUO)
    /// loaded before its first use: by the thread that first runs it, or by the first ioctl
    /// or save that reaches it (`VcpuFile::handle`). If KVM refuses the state then, that use
    /// fails with `EIO`.
    pub fn kvm_create_vcpu_file(
        &mut self,
        vm: FileId,
        id: u64,
        state: Option<crate::kvm::vcpu::VcpuState>,
    ) -> SysResult<FileId> {
        let inner = self.vm_inner(vm)?;
        Self::vm_materialize(&inner)?;
        let vcpu = inner.fd.create_vcpu(id).map_err(kvm_err)?;
        if state.is_some() {
            // Opening the machine's KVM asks the XSAVE size the state needs (once per image).
            self.real_kvm()?;
        }
        Ok(self
            .files
            .install(FileKind::Vcpu(VcpuFile::new(vcpu, vm, id, state))))
    }

    /// The VM behind the VM file `vm`, shared; EBADF if `vm` is not a VM file.
    pub fn vm_inner(&self, vm: FileId) -> SysResult<Arc<VmInner>> {
        match self.files.kind(vm) {
            Some(FileKind::Vm(v)) => Ok(v.inner.clone()),
            _ => Err(Errno::EBADF),
        }
    }

    /// `KVM_SET_USER_MEMORY_REGION2`. A guest_memfd slot points at the host's mapping of the
    /// file; a plain slot at the caller's own mapping, which must hold the whole range. Every
    /// check happens before KVM is asked; KVM's own answer (overlap EEXIST, slot limits, ...)
    /// is passed through, and on any error nothing changed.
    fn kvm_set_memory_region(
        &mut self,
        pid: Pid,
        vm: FileId,
        r: &UserMemoryRegion2,
    ) -> SysResult<()> {
        let inner = self.vm_inner(vm)?;
        if r.flags & !KVM_MEM_GUEST_MEMFD != 0 || r.pad1 != 0 || r.pad2.iter().any(|&p| p != 0) {
            return Err(Errno::EINVAL);
        }
        // As Linux: size, guest address and user address page aligned, no wrap-around.
        if r.memory_size % PAGE_SIZE != 0
            || r.guest_phys_addr % PAGE_SIZE != 0
            || r.userspace_addr % PAGE_SIZE != 0
            || r.guest_phys_addr.checked_add(r.memory_size).is_none()
        {
            return Err(Errno::EINVAL);
        }
        let old = match self.files.kind(vm) {
            Some(FileKind::Vm(v)) => v.slots.get(&r.slot).copied(),
            _ => return Err(Errno::EBADF),
        };
        // As Linux: a guest_memfd slot is immutable (it can only be deleted), and a slot
        // cannot become one.
        if r.memory_size != 0
            && old.is_some()
            && (r.flags & KVM_MEM_GUEST_MEMFD != 0 || old.is_some_and(|o| o.gmem.is_some()))
        {
            return Err(Errno::EINVAL);
        }
        if r.memory_size == 0 {
            inner.set_slot(r.slot, 0, None, 0)?;
            self.forget_slot(vm, r.slot, old);
            return Ok(());
        }
        let (map, window, off, gmem) = if r.flags & KVM_MEM_GUEST_MEMFD != 0 {
            let gfile = self.fd_file(pid, r.guest_memfd as i32)?;
            let g: &GuestMemfd = match self.files.kind(gfile) {
                Some(FileKind::GuestMemfd(g)) => g,
                _ => return Err(Errno::EINVAL),
            };
            if !Arc::ptr_eq(&g.vm, &inner)
                || r.guest_memfd_offset % PAGE_SIZE != 0
                || r.guest_memfd_offset
                    .checked_add(r.memory_size)
                    .is_none_or(|e| e > g.size)
            {
                return Err(Errno::EINVAL);
            }
            let m = self.kernel_map(gfile)?;
            let first = r.guest_memfd_offset / PAGE_SIZE;
            self.kernel_map_range(gfile, m, first, first + r.memory_size / PAGE_SIZE);
            let w = self
                .maps
                .get(&m)
                .map(|x| x.window.clone())
                .ok_or(Errno::EFAULT)?;
            (
                m,
                w,
                r.guest_memfd_offset,
                Some((gfile, r.guest_memfd_offset)),
            )
        } else {
            let (m, w, off) = self.user_window(pid, r.userspace_addr, r.memory_size)?;
            (m, w, off, None)
        };
        if let Err(e) = inner.set_slot(
            r.slot,
            r.guest_phys_addr,
            Some((window, off)),
            r.memory_size,
        ) {
            // A kernel mapping made for this call and used by no slot goes again.
            self.drop_kernel_map_if_unused(vm, map);
            return Err(e);
        }
        self.forget_slot(vm, r.slot, old);
        if let Some(FileKind::Vm(v)) = self.files.kind_mut(vm) {
            v.slots.insert(
                r.slot,
                Slot {
                    gpa: r.guest_phys_addr,
                    size: r.memory_size,
                    gmem,
                    map,
                },
            );
        }
        Ok(())
    }

    /// KVM no longer has `old` at `slot`: drop it from the VM's table, and the guest_memfd
    /// kernel mapping it used if no other slot uses it.
    fn forget_slot(&mut self, vm: FileId, slot: u32, old: Option<Slot>) {
        if let Some(FileKind::Vm(v)) = self.files.kind_mut(vm) {
            v.slots.remove(&slot);
        }
        if let Some(o) = old {
            self.drop_kernel_map_if_unused(vm, o.map);
        }
    }

    /// Remove mapping `map` if it is a guest_memfd kernel mapping that no slot of `vm` uses.
    fn drop_kernel_map_if_unused(&mut self, vm: FileId, map: MapId) {
        let kernel = self.maps.get(&map).is_some_and(|m| m.pid == KERNEL_PID);
        let used = match self.files.kind(vm) {
            Some(FileKind::Vm(v)) => v.slots.values().any(|s| s.map == map),
            _ => false,
        };
        if kernel && !used {
            self.unmap_id(map);
        }
    }

    /// Release of a VM file. The real VM lives on while a guest_memfd or vCPU of it does, and
    /// keeps its memslots (their windows stay reserved, see [`VmInner`]); the guest_memfd
    /// kernel mappings go now, emptied, so the files can be released and their frames freed.
    pub(crate) fn kvm_vm_release(&mut self, v: VmFile) {
        let maps: std::collections::BTreeSet<MapId> = v.slots.values().map(|s| s.map).collect();
        for m in maps {
            if self.maps.get(&m).is_some_and(|x| x.pid == KERNEL_PID) {
                self.unmap_id(m);
            }
        }
    }

    /// The vCPU behind `fd`, for register access (the real vCPU fd, as a VMM uses it).
    pub fn vcpu(&self, pid: Pid, fd: i32) -> SysResult<Arc<Mutex<VcpuFd>>> {
        match self.files.kind(self.fd_file(pid, fd)?) {
            Some(FileKind::Vcpu(v)) => v.handle(),
            _ => Err(Errno::EINVAL),
        }
    }

    /// Mark a VM dead (what KVM does after an unrecoverable error); it can no longer be
    /// preserved.
    pub fn kvm_kill_vm(&mut self, pid: Pid, fd: i32) -> SysResult<()> {
        match self.files.kind_mut(self.fd_file(pid, fd)?) {
            Some(FileKind::Vm(v)) => {
                v.dead = true;
                Ok(())
            }
            _ => Err(Errno::EINVAL),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
