//! KVM as the host image serves it: `/dev/kvm`, VM and vCPU files backed by the machine's real
//! KVM (rust-vmm `kvm-ioctls`), guest_memfd files whose folios live in our RAM, and the RFC's
//! LUO handlers for both.
//!
//! Guest memory: a guest_memfd bound to a memslot is mapped into a host
//! [`VaWindow`](crate::mm::VaWindow) page by page from the RAM memfd, and the real memslot
//! points at that window. The guest therefore reads and writes the very RAM frames KHO preserves.
//!
//! Guest faults: this machine's KVM reports no GPA for a fault on an unbacked page of an
//! hva-backed slot (see docs/kvm-probe.md), so the window's holes are anonymous memory
//! registered with userfaultfd (`crate::mm::uffd`). A guest access to a page not yet allocated
//! blocks in the kernel; the host's fault service ([`run`]) allocates the folio, maps it over the
//! hole and wakes the vCPU — or, while the file is frozen for preservation, kicks the vCPU out of
//! `KVM_RUN` so that [`Host::vcpu_run`](crate::host::Host) returns the fault to the VMM with
//! EPERM. About 55 µs per fault here; a VMM that wants none allocates up front (fallocate).

pub mod gmem_attrs;
pub mod guest_memfd;
pub mod guest_memfd_luo;
pub mod guest_memfd_luo_v3;
pub mod run;
pub mod state_blob;
pub mod vcpu;
pub mod vcpu_luo;
pub mod vm;
pub mod vm_luo;
pub mod vm_state;

pub use guest_memfd::GuestMemfd;
pub use run::{IoAction, IoEvent, RunExit};
pub use vm::{VcpuFile, VmFile};
