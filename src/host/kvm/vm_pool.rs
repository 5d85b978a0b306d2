//! Empty VMs made ahead of a live update's restore. When the incoming sessions are read, the
//! host knows how many VM files the VMMs may retrieve; one thread of its own creates that many
//! empty default-type VMs, outside the host lock, while the VMMs start up and retrieve. A VM
//! file retrieved (or created) later takes one from the pool instead of calling
//! `KVM_CREATE_VM` under the lock, so the restores of different VMs no longer wait for each
//! other's VM creation (0.17–0.3 ms each here). An empty VM is the same whether it was created
//! now or a few milliseconds ago: no memslot, no vCPU, no irqchip, and its clock is set when
//! the retrieved state is loaded. Whatever is left when the update is committed is dropped.

use std::sync::{Arc, Mutex};

use kvm_ioctls::{Kvm, VmFd};

use crate::abi::kvm::KVM_X86_DEFAULT_VM;

/// Most VMs the pool makes for one update.
pub(crate) const MAX_POOLED: usize = 256;

/// The pool, shared with its filling thread.
#[derive(Default, Clone)]
pub(crate) struct VmPool(Arc<Mutex<Vec<VmFd>>>);

impl VmPool {
    /// Create `n` (at most [`MAX_POOLED`]) empty VMs on a thread of their own. If the thread
    /// cannot start, the VMs are simply created when asked for.
    pub(crate) fn fill(&self, kvm: Arc<Kvm>, n: usize) {
        let pool = self.clone();
        let n = n.min(MAX_POOLED);
        let spawned = std::thread::Builder::new()
            .name("vm-pool".into())
            .spawn(move || {
                for _ in 0..n {
                    match kvm.create_vm_with_type(KVM_X86_DEFAULT_VM) {
                        Ok(fd) => pool.lock().push(fd),
                        Err(e) => {
                            tracing::debug!("vm pool: KVM_CREATE_VM: {e}");
                            return;
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::debug!("vm pool: no thread ({e})");
        }
    }

    /// An empty VM of `real_type`, if one is ready.
    pub(crate) fn take(&self, real_type: u64) -> Option<VmFd> {
        if real_type != KVM_X86_DEFAULT_VM {
            return None;
        }
        self.lock().pop()
    }

    /// Drop what is left (the update is committed).
    pub(crate) fn drain(&self) -> usize {
        std::mem::take(&mut *self.lock()).len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<VmFd>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_makes_default_vms_and_drops_the_rest() {
        if !crate::vmm::libkvm::kvm_available("pool_makes_default_vms_and_drops_the_rest") {
            return;
        }
        let kvm = Kvm::new().expect("/dev/kvm");
        let pool = VmPool::default();
        assert!(pool.take(KVM_X86_DEFAULT_VM).is_none(), "empty at first");
        pool.fill(Arc::new(kvm), 3);
        let t = std::time::Instant::now();
        while pool.lock().len() < 3 {
            assert!(t.elapsed().as_secs() < 30, "the pool never filled");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        // Only the machine's default type comes from the pool.
        assert!(pool.take(1).is_none());
        let vm = pool.take(KVM_X86_DEFAULT_VM).expect("a pooled VM");
        // A pooled VM is an ordinary empty VM: it takes a vCPU.
        vm.create_vcpu(0).expect("vCPU on a pooled VM");
        assert_eq!(pool.drain(), 2);
        assert!(pool.take(KVM_X86_DEFAULT_VM).is_none());
    }
}
