#![no_main]
//! The process boundary's request path on a live host (booted once): messages of programs under
//! `handover run`, decoded and dispatched, with every process of an input exited after it and
//! nothing left behind. See fuzz/README.md and `handover::fuzzing::BoundaryFuzzer`.

use std::sync::{Mutex, OnceLock};

use handover::fuzzing::BoundaryFuzzer;
use libfuzzer_sys::fuzz_target;

static HOST: OnceLock<Mutex<BoundaryFuzzer>> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let m = HOST.get_or_init(|| Mutex::new(BoundaryFuzzer::new()));
    let mut f = m.lock().unwrap_or_else(|e| e.into_inner());
    f.run(data);
});
