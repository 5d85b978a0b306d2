#![no_main]
//! A whole handover image: a real handover (made once by an in-process kexec) patched by the
//! input, checksums repaired unless the input says not to, then discover + validate + inspect.
//! See fuzz/README.md and `handover::fuzzing::handover`.

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

static TEMPLATE: OnceLock<handover::fuzzing::HandoverTemplate> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let t = TEMPLATE.get_or_init(handover::fuzzing::handover_template);
    handover::fuzzing::handover(t, data);
});
