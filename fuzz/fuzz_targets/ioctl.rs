#![no_main]
//! The in-process ioctl path on a live host (booted once, with incoming sessions from an
//! in-process kexec): device and session fds get fuzzed commands and argument buffers.
//! See fuzz/README.md and `handover::fuzzing::IoctlFuzzer`.

use std::sync::{Mutex, OnceLock};

use handover::fuzzing::IoctlFuzzer;
use libfuzzer_sys::fuzz_target;

static HOST: OnceLock<Mutex<IoctlFuzzer>> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let m = HOST.get_or_init(|| Mutex::new(IoctlFuzzer::new()));
    let mut f = m.lock().unwrap_or_else(|e| e.into_inner());
    f.run(data);
});
