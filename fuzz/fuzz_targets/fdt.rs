#![no_main]
//! See fuzz/README.md and `handover::fuzzing::fdt`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| handover::fuzzing::fdt(data));
