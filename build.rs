//! Builds the process boundary's preload library (`preload/handover_preload.c`) with the C
//! compiler, so that the `handover` binary can carry it (`include_bytes!`) and write it out at
//! run time: `handover run` needs no install step.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = "preload/handover_preload.c";
    println!("cargo:rerun-if-changed={src}");
    println!("cargo:rerun-if-env-changed=CC");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"))
        .join("libhandover_preload.so");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = Command::new(&cc)
        .args([
            "-shared",
            "-fPIC",
            "-O2",
            "-g",
            "-std=gnu11",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-fvisibility=hidden",
            // glibc declares paths nonnull; a NULL from a program must still be checked.
            "-fno-delete-null-pointer-checks",
            "-Wno-nonnull-compare",
            "-o",
        ])
        .arg(&out)
        .arg(src)
        .arg("-ldl")
        .status()
        .unwrap_or_else(|e| panic!("cannot run the C compiler {cc:?} for {src}: {e}"));
    assert!(status.success(), "{cc} failed to build {src}");
}
