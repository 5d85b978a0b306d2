//! KVM ioctls passed to the real KVM as they are ([`crate::abi::kvm::PASSTHROUGH`]): the
//! system, VM and vCPU calls a VMM makes that need nothing of the host but the real fd.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Mutex;

use kvm_ioctls::VcpuFd;

use crate::abi::errno::{Errno, SysResult};
use crate::abi::kvm::{passthrough, ArgKind, Scope, KVM_RUN};
use crate::fs::FileId;
use crate::host::Host;
use crate::kvm::vm::arg_u64;

/// `ioctl(fd, cmd, arg)` for a pass-through command of argument layout `kind`. The kernel
/// touches at most `kind.len(arg)` bytes; EFAULT if `arg` is shorter than that.
pub fn raw_ioctl(fd: RawFd, cmd: u64, kind: ArgKind, arg: &mut [u8]) -> SysResult<i64> {
    let r = match kind {
        // SAFETY: an ioctl without an argument.
        ArgKind::None => unsafe { libc::ioctl(fd, cmd as libc::c_ulong, 0usize) },
        // SAFETY: the argument is an integer, not a pointer.
        ArgKind::Int => unsafe { libc::ioctl(fd, cmd as libc::c_ulong, arg_u64(arg)? as usize) },
        ArgKind::Fixed(_) | ArgKind::Counted { .. } => {
            let need = kind.len(arg).ok_or(Errno::EFAULT)?;
            if arg.len() < need {
                return Err(Errno::EFAULT);
            }
            // SAFETY: `arg` is a live buffer of at least the bytes this command's argument
            // layout lets the kernel read or write, and it holds no pointer.
            unsafe { libc::ioctl(fd, cmd as libc::c_ulong, arg.as_mut_ptr()) }
        }
    };
    if r < 0 {
        return Err(Errno(
            std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO),
        ));
    }
    Ok(r as i64)
}

/// A vCPU ioctl other than `KVM_RUN`, on `vcpu` (its lock held for the call, as the kernel's
/// vCPU mutex). ENOTTY for what is not passed through.
pub fn vcpu_ioctl(vcpu: &Mutex<VcpuFd>, cmd: u64, arg: &mut [u8]) -> SysResult<i64> {
    let kind = passthrough(Scope::Vcpu, cmd).ok_or(Errno::ENOTTY)?;
    if cmd == KVM_RUN {
        return Err(Errno::ENOTTY);
    }
    let v = vcpu.lock().unwrap_or_else(|e| e.into_inner());
    raw_ioctl(v.as_raw_fd(), cmd, kind, arg)
}

impl Host {
    /// A system ioctl passed to the real `/dev/kvm`.
    pub(crate) fn kvm_dev_passthrough(&mut self, cmd: u64, arg: &mut [u8]) -> SysResult<i64> {
        let kind = passthrough(Scope::System, cmd).ok_or(Errno::ENOTTY)?;
        let kvm = self.real_kvm()?;
        raw_ioctl(kvm.as_raw_fd(), cmd, kind, arg)
    }

    /// A VM ioctl passed to the real VM.
    pub(crate) fn kvm_vm_passthrough(
        &mut self,
        vm: FileId,
        cmd: u64,
        arg: &mut [u8],
    ) -> SysResult<i64> {
        let kind = passthrough(Scope::Vm, cmd).ok_or(Errno::ENOTTY)?;
        let inner = self.vm_inner(vm)?;
        raw_ioctl(inner.fd.as_raw_fd(), cmd, kind, arg)
    }
}
