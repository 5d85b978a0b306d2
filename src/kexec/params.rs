//! The host image's boot parameters: what a bootloader or the previous image passes on the
//! command line. KHO boots add the RAM fd and the handover location.

use std::path::PathBuf;

use crate::kho::KhoBootArgs;
use crate::mm::{HugePageRequest, PAGE_SIZE};

/// Default RAM of a host image: sparse, so this costs nothing until used.
pub const DEFAULT_RAM: u64 = 4 << 30;

/// Everything one image boots with. [`BootParams::to_args`] (in `kexec::cmdline`) writes it as
/// the command line `handover boot` parses back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootParams {
    /// RAM size in bytes (`--ram`).
    pub ram_size: u64,
    /// Inherited RAM memfd (KHO boot only).
    pub ram_fd: Option<i32>,
    /// Where the handover is (KHO boot only).
    pub kho: Option<KhoBootArgs>,
    /// `liveupdate=on` (default on).
    pub liveupdate: bool,
    /// Init program to run after boot, and its arguments.
    pub init: Option<String>,
    /// Arguments of the init program.
    pub init_args: Vec<String>,
    /// JSON-lines report file every image appends its events to.
    pub report: Option<PathBuf>,
    /// Image to kexec into (default: this binary).
    pub next_image: Option<PathBuf>,
    /// CLOCK_MONOTONIC ns at which the previous image started its reboot path.
    pub kexec_start_ns: Option<u64>,
    /// CLOCK_MONOTONIC ns right before the previous image's `execve`.
    pub exec_ns: Option<u64>,
    /// Handover metadata bytes the previous image wrote.
    pub prev_handover_bytes: Option<u64>,
    /// The image that booted us (where to roll back to).
    pub prev_image: Option<PathBuf>,
    /// This boot is a rollback: the next image could not take the handover, for this reason.
    pub rollback: Option<String>,
    /// The previous image's reaper process (see `kexec::reboot`): the number of the pidfd the
    /// previous image passed, checked by `Reaper::adopt` at boot before it is used. Taken (set
    /// to `None`) once the boot has adopted or refused it.
    pub reaper_fd: Option<i32>,
    /// Preserve guest_memfds in the RFC's per-folio "guest_memfd_luo_v1" format instead of v2.
    pub gmem_luo_v1: bool,
    /// Preserve VM files in the RFC's "kvm_vm_luo_v1" format (the type only) instead of v2.
    pub vm_luo_v1: bool,
    /// Write a dump of the outgoing handover here at each kexec.
    pub dump_handover: Option<PathBuf>,
    /// The huge-page pool to reserve at boot (`--hugepages 2M:N,1G:M`; see `mm::hugetlb`),
    /// the same for every image of a chain.
    pub hugepages: HugePageRequest,
}

impl Default for BootParams {
    fn default() -> Self {
        Self {
            ram_size: DEFAULT_RAM,
            ram_fd: None,
            kho: None,
            liveupdate: true,
            init: None,
            init_args: Vec::new(),
            report: None,
            next_image: None,
            kexec_start_ns: None,
            exec_ns: None,
            gmem_luo_v1: false,
            vm_luo_v1: false,
            reaper_fd: None,
            prev_image: None,
            rollback: None,
            prev_handover_bytes: None,
            dump_handover: None,
            hugepages: HugePageRequest::default(),
        }
    }
}

/// Default scratch size for a cold boot: 1/64 of RAM, between 16 MiB and 256 MiB, 4 MiB
/// aligned.
pub fn default_scratch_size(ram: u64) -> u64 {
    let block = PAGE_SIZE << crate::mm::MAX_ORDER;
    ((ram / 64).clamp(16 << 20, 256 << 20) / block) * block
}

/// Parse sizes like `4G`, `256M`, `64k`, `4096`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let s = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("unknown size suffix in {s:?}")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|_| format!("not a size: {s:?}"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("size overflows: {s:?}"))
}

/// Parse `PA:SIZE` (hex or decimal).
pub fn parse_range(s: &str) -> Result<(u64, u64), String> {
    let (a, b) = s
        .split_once(':')
        .ok_or_else(|| format!("expected ADDR:SIZE, got {s:?}"))?;
    Ok((parse_u64(a)?, parse_u64(b)?))
}

/// Parse a u64, hex with a `0x` prefix or decimal.
pub fn parse_u64(s: &str) -> Result<u64, String> {
    let r = match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|_| format!("not a number: {s:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4G").unwrap(), 4 << 30);
        assert_eq!(parse_size("16MiB").unwrap(), 16 << 20);
        assert_eq!(parse_size("5M").unwrap(), 5 << 20);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("x").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert_eq!(parse_range("0x1000:4096").unwrap(), (0x1000, 4096));
        assert_eq!(default_scratch_size(4 << 30), 64 << 20);
        assert_eq!(default_scratch_size(256 << 20), 16 << 20);
    }
}

/// What this boot found.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct BootInfo {
    /// The previous image handed over memory and it was accepted.
    pub kho_boot: bool,
    /// Why a handover was refused, if it was.
    pub refused: Option<String>,
    /// Release of the previous image.
    pub exec_from: Option<String>,
    /// Kexecs since the last cold boot.
    pub kexec_count: u32,
    /// Pages preserved by the previous image, reserved at boot.
    pub incoming_pages: u64,
    /// This boot is a rollback: why the next image refused the handover.
    pub rollback: Option<String>,
    /// Time from process start of boot to the allocator being online, microseconds.
    pub boot_us: u64,
    /// CLOCK_MONOTONIC ns when this image started booting.
    pub boot_start_ns: u64,
    /// The previous image's reaper was passed by a valid pidfd and adopted.
    pub reaper: bool,
}
