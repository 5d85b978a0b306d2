//! The states of every preserved vCPU, read at once for a freeze and spread over the CPUs.
//!
//! A kernel's `kvm_vcpu_luo` freeze finds a stopped vCPU's state in memory. Here each vCPU
//! state is a dozen `KVM_GET_*` ioctls at 7–9 µs each on this KVM (docs/kvm-probe.md): about
//! 0.1 ms per vCPU, 6.5 ms for 64 vCPUs on the kexec's one thread. So before the serial
//! freeze, the host takes every preserved vCPU's lock on the kexec thread (a vCPU inside
//! `KVM_RUN` holds its own, and is left for its freeze to refuse with `EBUSY`) and reads the
//! held vCPUs' states on one thread per CPU. The locks stay taken until the freeze is over, so
//! no held vCPU runs between its snapshot and its freeze; each vCPU's freeze then takes its
//! snapshot ([`Host::take_vcpu_snapshot`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use kvm_ioctls::VcpuFd;

use crate::fs::FileId;
use crate::host::files::FileKind;
use crate::host::Host;
use crate::kvm::vcpu::VcpuState;

/// A vCPU's encoded state, or why it could not be read.
pub type Snapshot = Result<Vec<u8>, String>;

/// The vCPUs of some files, by file: found first, then locked and read by
/// [`VcpuHandles::hold_and_read`].
pub struct VcpuHandles(Vec<(FileId, Arc<Mutex<VcpuFd>>)>);

/// The vCPUs held for a freeze: locked until this is dropped.
pub struct Held<'a> {
    _guards: Vec<MutexGuard<'a, VcpuFd>>,
}

impl Host {
    /// The vCPUs of those of `files` that are vCPU files (a pending state is loaded first;
    /// a vCPU whose state cannot be loaded is left out, for its freeze to report).
    pub(crate) fn vcpu_handles(&self, files: impl IntoIterator<Item = FileId>) -> VcpuHandles {
        VcpuHandles(
            files
                .into_iter()
                .filter_map(|f| match self.files.kind(f) {
                    Some(FileKind::Vcpu(v)) => v.handle().ok().map(|h| (f, h)),
                    _ => None,
                })
                .collect(),
        )
    }

    /// The snapshot [`VcpuHandles::hold_and_read`] took of vCPU file `file` for this freeze,
    /// if it took one (each is taken once).
    pub(crate) fn take_vcpu_snapshot(&mut self, file: FileId) -> Option<Snapshot> {
        self.vcpu_snapshots.remove(&file)
    }
}

impl VcpuHandles {
    /// Lock every vCPU that is not in `KVM_RUN`, then read the locked ones' states on up to
    /// `threads` threads. Returns the locks (held until dropped) and the states by file.
    pub fn hold_and_read(&self, threads: usize) -> (Held<'_>, HashMap<FileId, Snapshot>) {
        let mut guards = Vec::new();
        let mut held = Vec::new();
        for (f, h) in &self.0 {
            let g = match h.try_lock() {
                Ok(g) => g,
                Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                // In KVM_RUN: not paused; its freeze refuses it.
                Err(std::sync::TryLockError::WouldBlock) => continue,
            };
            held.push(*f);
            guards.push(g);
        }
        let vcpus: Vec<&VcpuFd> = guards.iter().map(|g| &**g).collect();
        let states = read_all(&vcpus, threads);
        let snapshots = held.into_iter().zip(states).collect();
        (Held { _guards: guards }, snapshots)
    }
}

/// The encoded states of `vcpus`, in order, read on up to `threads` threads (the calling one
/// among them).
fn read_all(vcpus: &[&VcpuFd], threads: usize) -> Vec<Snapshot> {
    let read = |v: &VcpuFd| -> Snapshot {
        if crate::fault::hit("kvm.vcpu_snapshot") {
            return Err("fault injected at kvm.vcpu_snapshot".into());
        }
        VcpuState::save(v)
            .map(|s| s.to_bytes())
            .map_err(|e| e.to_string())
    };
    crate::par::map_indexed(vcpus.len(), threads, "vcpu-snapshot", |i| read(vcpus[i]))
        .into_iter()
        .map(|s| s.unwrap_or_else(|| Err("not read (the read panicked)".into())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_read_on_threads_are_each_vcpus_own() {
        if !crate::vmm::libkvm::kvm_available("states_read_on_threads_are_each_vcpus_own") {
            return;
        }
        let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
        crate::kvm::vcpu::init_xsave_size(&kvm);
        let vm = kvm.create_vm().expect("VM");
        let vcpus: Vec<VcpuFd> = (0..5)
            .map(|k| {
                let v = vm.create_vcpu(k).expect("vCPU");
                let mut r = v.get_regs().expect("regs");
                r.rbx = 0x1000 + k;
                v.set_regs(&r).expect("set regs");
                v
            })
            .collect();
        let refs: Vec<&VcpuFd> = vcpus.iter().collect();
        for threads in [1, 2, 3, 8] {
            let states = read_all(&refs, threads);
            assert_eq!(states.len(), 5);
            for (k, s) in states.into_iter().enumerate() {
                let st = VcpuState::from_bytes(&s.expect("read")).expect("decode");
                assert_eq!(
                    st.regs.rbx,
                    0x1000 + k as u64,
                    "{threads} threads, vCPU {k}"
                );
            }
        }
        assert!(read_all(&[], 2).is_empty());
    }
}
