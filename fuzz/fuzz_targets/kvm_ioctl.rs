#![no_main]
//! The KVM ioctl path on a live host with the machine's real /dev/kvm: VM, guest_memfd and
//! memslot ioctls interleaved with mmap/munmap/fallocate/close, checking after each call that
//! the host and KVM agree on every memslot's memory. See `handover::fuzzing::kvm`.

use std::sync::{Mutex, OnceLock};

use handover::fuzzing::kvm::KvmIoctlFuzzer;
use libfuzzer_sys::fuzz_target;

static HOST: OnceLock<Mutex<KvmIoctlFuzzer>> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let m = HOST.get_or_init(|| Mutex::new(KvmIoctlFuzzer::new()));
    let mut f = m.lock().unwrap_or_else(|e| e.into_inner());
    f.run(data);
});
