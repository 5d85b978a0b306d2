//! KVM as the host image serves it: `/dev/kvm`, VM and vCPU files backed by the machine's real
//! KVM (rust-vmm `kvm-ioctls`), guest_memfd files whose folios live in our RAM, and the RFC's
//! LUO handlers for both.
//!
//! Guest memory: a guest_memfd bound to a memslot is mapped into a host [`VaWindow`]
//! (`crate::mm::VaWindow`) page by page from the RAM memfd, and the real memslot points at that
//! window. The guest therefore reads and writes the very RAM frames KHO preserves. A guest
//! access to a page not yet allocated makes the real KVM exit with `KVM_EXIT_MEMORY_FAULT`
//! (the window is PROT_NONE there); [`run`] allocates the folio, maps it and re-enters the
//! guest — or, while the file is frozen for preservation, returns the fault to the VMM with
//! EPERM.

pub mod guest_memfd;
pub mod guest_memfd_luo;
pub mod run;
pub mod vcpu;
pub mod vm;
pub mod vm_luo;

pub use guest_memfd::GuestMemfd;
pub use run::{IoAction, IoEvent, RunExit};
pub use vm::{VcpuFile, VmFile};
