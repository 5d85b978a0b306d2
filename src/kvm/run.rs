//! Running a vCPU: KVM_RUN on the real vCPU with the host unlocked, guest_memfd faults
//! resolved by the host (allocate, map, re-enter), port I/O handed to the VMM's callback.

use std::sync::Mutex;

use kvm_ioctls::VcpuExit;

use crate::fs::FileKind;
use crate::host::Host;
use crate::uapi::{Errno, Pid, SysResult};

/// A port access by the guest.
#[derive(Debug)]
pub enum IoEvent<'a> {
    In { port: u16, data: &'a mut [u8] },
    Out { port: u16, data: &'a [u8] },
}

/// What the VMM wants after handling an I/O exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoAction {
    Continue,
    Stop,
}

/// Why [`Host::vcpu_run`] returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunExit {
    /// The I/O callback asked to stop.
    Stopped,
    /// Kicked out of KVM_RUN (immediate_exit / signal): the vCPU is paused.
    Interrupted,
    Hlt,
    Shutdown,
    /// A guest access the host could not satisfy: EPERM while the guest_memfd is frozen,
    /// EFAULT outside any guest_memfd.
    MemoryFault {
        gpa: u64,
        size: u64,
        errno: Errno,
    },
    Other(String),
}

impl Host {
    /// Run the vCPU behind `fd` until the guest does something the VMM must see.
    pub fn vcpu_run(
        host: &Mutex<Host>,
        pid: Pid,
        fd: i32,
        io: &mut dyn FnMut(IoEvent<'_>) -> IoAction,
    ) -> SysResult<RunExit> {
        let (vcpu, vm) = {
            let h = host.lock().map_err(|_| Errno::EIO)?;
            match h.files.kind(h.fd_file(pid, fd)?) {
                Some(FileKind::Vcpu(v)) => (v.vcpu.clone(), v.vm),
                _ => return Err(Errno::EINVAL),
            }
        };
        let mut v = vcpu.lock().map_err(|_| Errno::EIO)?;
        loop {
            let fault = match v.run() {
                Ok(VcpuExit::IoIn(port, data)) => {
                    if io(IoEvent::In { port, data }) == IoAction::Stop {
                        return Ok(RunExit::Stopped);
                    }
                    continue;
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    if io(IoEvent::Out { port, data }) == IoAction::Stop {
                        return Ok(RunExit::Stopped);
                    }
                    continue;
                }
                Ok(VcpuExit::MemoryFault { gpa, size, .. }) => (gpa, size),
                Ok(VcpuExit::Hlt) => return Ok(RunExit::Hlt),
                Ok(VcpuExit::Shutdown) => return Ok(RunExit::Shutdown),
                Ok(VcpuExit::Intr) => return Ok(RunExit::Interrupted),
                Ok(other) => return Ok(RunExit::Other(format!("{other:?}"))),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    v.set_kvm_immediate_exit(0);
                    return Ok(RunExit::Interrupted);
                }
                Err(e) => return Err(Errno(e.errno())),
            };
            let (gpa, size) = fault;
            let r = host
                .lock()
                .map_err(|_| Errno::EIO)?
                .gmem_guest_fault(vm, gpa);
            if let Err(errno) = r {
                return Ok(RunExit::MemoryFault { gpa, size, errno });
            }
        }
    }
}
