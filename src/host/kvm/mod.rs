//! KVM on the host: `/dev/kvm`, VM and vCPU files, guest_memfd, running vCPUs.

mod guest_memfd;
pub mod passthrough;
pub(crate) mod run;
pub(crate) mod vcpu_snapshot;
mod vm;
pub(crate) mod vm_pool;
