//! What this image is made of, assembled at the composition root: the LUO file handlers it
//! registers at boot. They are defined beside their subsystems (`fs`, `kvm`, `luo`) and listed
//! here, above them; the boot path (`kexec::boot`) is handed the list and does not know them.
//! (The other registry, of init programs, is assembled by `cli::boot`, above `vmm`.)

use std::sync::Arc;

use crate::fs::memfd_luo::MemfdHandler;
use crate::host::Host;
use crate::kexec::boot::BootError;
use crate::kexec::BootParams;
use crate::kvm::guest_memfd_luo::{Format, GuestMemfdHandler};
use crate::kvm::guest_memfd_luo_v3::GuestMemfdV3Handler;
use crate::kvm::vcpu_luo::VcpuHandler;
use crate::kvm::vm_luo::{VmFormat, VmHandler};
use crate::luo::FileHandler;

/// The file handlers this image has, in registration order.
pub fn file_handlers() -> Vec<Arc<dyn FileHandler<Host>>> {
    #[allow(unused_mut)]
    let mut hs: Vec<Arc<dyn FileHandler<Host>>> = vec![
        Arc::new(MemfdHandler),
        // v2 first, as for guest_memfd: new preservations use it; v1 stays readable.
        Arc::new(VmHandler {
            format: VmFormat::V2,
        }),
        Arc::new(VmHandler {
            format: VmFormat::V1,
        }),
        Arc::new(VcpuHandler),
        // v2 first: it is the format new preservations use; v1 stays readable.
        Arc::new(GuestMemfdHandler { format: Format::V2 }),
        Arc::new(GuestMemfdHandler { format: Format::V1 }),
        Arc::new(GuestMemfdV3Handler),
    ];
    // Test hook: the handler of `/dev/liveupdate-test` files (LUO core tests).
    #[cfg(feature = "test-hooks")]
    hs.insert(1, Arc::new(crate::luo::test_handler::TestHandler));
    hs
}

/// The compatible strings of [`file_handlers`].
pub fn supported_compatibles() -> Vec<&'static str> {
    file_handlers().iter().map(|h| h.compatible()).collect()
}

impl Host {
    /// Boot an image of this build: [`Host::boot_with`] its [`file_handlers`].
    pub fn boot(params: BootParams) -> Result<Host, BootError> {
        Host::boot_with(params, &file_handlers())
    }
}
