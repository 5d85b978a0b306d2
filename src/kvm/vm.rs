//! `/dev/kvm`, VM files and vCPU files, and their ioctls.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use zerocopy::FromBytes;

use crate::abi::kvm::*;
use crate::fs::{FileId, FileKind};
use crate::host::Host;
use crate::uapi::{Errno, MapId, Pid, SysResult};

use super::GuestMemfd;

/// The real VM behind a VM file. Shared with the VM's guest_memfds (as `struct kvm` is).
pub struct VmInner {
    pub fd: VmFd,
    pub vm_type: u64,
    /// Identifier from a sequence; a retrieved VM is named `restored-<id>` (see
    /// ARCHITECTURE.md).
    pub id: u64,
    pub name: String,
}

/// A memslot as we track it.
#[derive(Debug, Clone, Copy)]
pub struct Slot {
    pub gpa: u64,
    pub size: u64,
    /// guest_memfd file and offset, for guest_memfd slots.
    pub gmem: Option<(FileId, u64)>,
    /// Our kernel mapping of the guest_memfd the slot points at.
    pub map: Option<MapId>,
}

pub struct VmFile {
    pub inner: Arc<VmInner>,
    pub slots: BTreeMap<u32, Slot>,
    /// Killed (e.g. by an unrecoverable error): cannot be preserved.
    pub dead: bool,
}

pub struct VcpuFile {
    pub vcpu: Arc<Mutex<VcpuFd>>,
    pub vm: FileId,
    pub id: u64,
}

fn arg_u64(arg: &[u8]) -> SysResult<u64> {
    let b: [u8; 8] = arg
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or(Errno::EFAULT)?;
    Ok(u64::from_ne_bytes(b))
}

fn kvm_err(e: kvm_ioctls::Error) -> Errno {
    Errno(e.errno())
}

impl Host {
    /// The machine's KVM, opened once per image.
    pub fn real_kvm(&mut self) -> SysResult<Arc<Kvm>> {
        if let Some(k) = &self.kvm {
            return Ok(k.clone());
        }
        let k = Arc::new(Kvm::new().map_err(kvm_err)?);
        self.kvm = Some(k.clone());
        Ok(k)
    }

    /// A new VM file of `vm_type` on the real KVM.
    pub fn kvm_create_vm_file(&mut self, vm_type: u64, name: Option<String>) -> SysResult<FileId> {
        let kvm = self.real_kvm()?;
        let fd = kvm.create_vm_with_type(vm_type).map_err(kvm_err)?;
        self.next_vm_id += 1;
        let id = self.next_vm_id;
        let inner = Arc::new(VmInner {
            fd,
            vm_type,
            id,
            name: name.unwrap_or_else(|| format!("vm-{id}")),
        });
        Ok(self.files.install(FileKind::Vm(VmFile {
            inner,
            slots: BTreeMap::new(),
            dead: false,
        })))
    }

    pub(crate) fn kvm_dev_ioctl(&mut self, pid: Pid, cmd: u64, arg: &mut [u8]) -> SysResult<i64> {
        match cmd {
            KVM_GET_API_VERSION => Ok(12),
            KVM_CHECK_EXTENSION => self.kvm_check_extension(arg_u64(arg)?),
            KVM_CREATE_VM => {
                let f = self.kvm_create_vm_file(arg_u64(arg)?, None)?;
                Ok(self.fd_install(pid, f, true)? as i64)
            }
            _ => Err(Errno::ENOTTY),
        }
    }

    fn kvm_check_extension(&mut self, cap: u64) -> SysResult<i64> {
        Ok(match cap {
            KVM_CAP_GUEST_MEMFD => 1,
            KVM_CAP_GUEST_MEMFD_FLAGS => {
                (GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED) as i64
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
            KVM_CHECK_EXTENSION => self.kvm_check_extension(arg_u64(arg)?),
            KVM_CREATE_GUEST_MEMFD => {
                let a = CreateGuestMemfd::read_from_bytes(arg.get(..64).ok_or(Errno::EFAULT)?)
                    .map_err(|_| Errno::EFAULT)?;
                if a.reserved.iter().any(|&r| r != 0) {
                    return Err(Errno::EINVAL);
                }
                let f = self.gmem_create(vm, a.size, a.flags)?;
                // Like the kernel: a guest_memfd fd is not close-on-exec.
                Ok(self.fd_install(pid, f, false)? as i64)
            }
            KVM_SET_USER_MEMORY_REGION2 => {
                let r = UserMemoryRegion2::read_from_bytes(arg.get(..160).ok_or(Errno::EFAULT)?)
                    .map_err(|_| Errno::EFAULT)?;
                self.kvm_set_memory_region(pid, vm, &r)?;
                Ok(0)
            }
            KVM_CREATE_VCPU => {
                let id = arg_u64(arg)?;
                let inner = self.vm_inner(vm)?;
                let vcpu = inner.fd.create_vcpu(id).map_err(kvm_err)?;
                let f = self.files.install(FileKind::Vcpu(VcpuFile {
                    vcpu: Arc::new(Mutex::new(vcpu)),
                    vm,
                    id,
                }));
                Ok(self.fd_install(pid, f, true)? as i64)
            }
            _ => Err(Errno::ENOTTY),
        }
    }

    pub fn vm_inner(&self, vm: FileId) -> SysResult<Arc<VmInner>> {
        match self.files.kind(vm) {
            Some(FileKind::Vm(v)) => Ok(v.inner.clone()),
            _ => Err(Errno::EBADF),
        }
    }

    /// `KVM_SET_USER_MEMORY_REGION2`. A guest_memfd slot is backed by our mapping of the
    /// file; a plain slot takes the caller's address (a mapping of this process) as is.
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
        let old = match self.files.kind_mut(vm) {
            Some(FileKind::Vm(v)) => v.slots.remove(&r.slot),
            _ => return Err(Errno::EBADF),
        };
        if let Some(Slot { map: Some(m), .. }) = old {
            self.unmap_id(m);
        }
        if r.memory_size == 0 {
            let region = kvm_bindings::kvm_userspace_memory_region {
                slot: r.slot,
                ..Default::default()
            };
            // SAFETY: deleting a slot (size 0) maps nothing.
            unsafe { inner.fd.set_user_memory_region(region) }.map_err(kvm_err)?;
            return Ok(());
        }
        let (uaddr, gmem, map) = if r.flags & KVM_MEM_GUEST_MEMFD != 0 {
            let gfile = self.fd_file(pid, r.guest_memfd as i32)?;
            let g: &GuestMemfd = match self.files.kind(gfile) {
                Some(FileKind::GuestMemfd(g)) => g,
                _ => return Err(Errno::EINVAL),
            };
            if !Arc::ptr_eq(&g.vm, &inner)
                || r.guest_memfd_offset % crate::mm::PAGE_SIZE != 0
                || r.guest_memfd_offset
                    .checked_add(r.memory_size)
                    .is_none_or(|e| e > g.size)
            {
                return Err(Errno::EINVAL);
            }
            let m = self.kernel_map(gfile)?;
            let base = self
                .maps
                .get(&m)
                .map(|x| x.window.base() as u64)
                .ok_or(Errno::EFAULT)?;
            (
                base + r.guest_memfd_offset,
                Some((gfile, r.guest_memfd_offset)),
                Some(m),
            )
        } else {
            (r.userspace_addr, None, None)
        };
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot: r.slot,
            flags: 0,
            guest_phys_addr: r.guest_phys_addr,
            memory_size: r.memory_size,
            userspace_addr: uaddr,
        };
        // SAFETY: `uaddr` is either our own window onto the guest_memfd (alive as long as the
        // slot: the slot holds the mapping) or an address the caller mapped in this process.
        if let Err(e) = unsafe { inner.fd.set_user_memory_region(region) } {
            if let Some(m) = map {
                self.unmap_id(m);
            }
            return Err(kvm_err(e));
        }
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

    /// Release of a VM file: drop its slots' mappings (the real VM goes when its last user
    /// does).
    pub(crate) fn kvm_vm_release(&mut self, v: VmFile) {
        for s in v.slots.values() {
            if let Some(m) = s.map {
                self.unmap_id(m);
            }
        }
    }

    /// The vCPU behind `fd`, for register access (the real vCPU fd, as a VMM uses it).
    pub fn vcpu(&self, pid: Pid, fd: i32) -> SysResult<Arc<Mutex<VcpuFd>>> {
        match self.files.kind(self.fd_file(pid, fd)?) {
            Some(FileKind::Vcpu(v)) => Ok(v.vcpu.clone()),
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
