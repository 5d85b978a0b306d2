//! The next image's command line, in one place: which parameters every image of a chain hands
//! on ([`BootParams::next`]) and how parameters are written as the arguments `handover boot`
//! parses back ([`BootParams::to_args`]). The normal kexec (`kexec::reboot`) and the rollback
//! exec (`kexec::boot`) both build their command line here.

use std::ffi::{OsStr, OsString};
use std::os::fd::RawFd;

use crate::kho::KhoBootArgs;

use super::params::BootParams;

impl BootParams {
    /// The parameters of the image this one execs: the handover (RAM of `ram_size` bytes passed
    /// as fd `ram_fd`, KHO's tree and scratch at `kho`) and what the first image's command line
    /// set for the whole chain: LUO on or off, the guest_memfd format, the init program and its
    /// arguments, the report file, the next image, the handover dump and the huge-page pool's
    /// request. The caller adds what only it knows: timings, the previous image, a rollback
    /// reason, the reaper's pidfd.
    ///
    /// Every field is named, so a new parameter must be decided on here.
    pub fn next(&self, ram_size: u64, ram_fd: RawFd, kho: KhoBootArgs) -> BootParams {
        BootParams {
            ram_size,
            ram_fd: Some(ram_fd),
            kho: Some(kho),
            liveupdate: self.liveupdate,
            gmem_luo_v1: self.gmem_luo_v1,
            vm_luo_v1: self.vm_luo_v1,
            init: self.init.clone(),
            init_args: self.init_args.clone(),
            report: self.report.clone(),
            next_image: self.next_image.clone(),
            dump_handover: self.dump_handover.clone(),
            hugepages: self.hugepages,
            kexec_start_ns: None,
            exec_ns: None,
            prev_handover_bytes: None,
            prev_image: None,
            rollback: None,
            reaper_fd: None,
        }
    }

    /// `boot` and one `--flag=value` for every parameter that is set: the arguments of the
    /// `handover` binary that boot an image with exactly these parameters. A value is joined to
    /// its flag, so one that starts with `-` (a rollback reason, an init argument) stays a
    /// value; paths are passed as they are, not as UTF-8.
    pub fn to_args(&self) -> Vec<OsString> {
        let p = self;
        let mut v = vec![
            OsString::from("boot"),
            flag("--ram", p.ram_size.to_string()),
        ];
        if let Some(fd) = p.ram_fd {
            v.push(flag("--ram-fd", fd.to_string()));
        }
        if let Some(a) = p.kho {
            v.push(flag(
                "--kho-fdt",
                format!("{:#x}:{:#x}", a.fdt_pa, a.fdt_size),
            ));
            v.push(flag(
                "--kho-scratch",
                format!("{:#x}:{:#x}", a.scratch_pa, a.scratch_size),
            ));
            if let Some(c) = a.fdt_crc {
                v.push(flag("--kho-fdt-crc", c.to_string()));
            }
        }
        if !p.liveupdate {
            v.push("--liveupdate=off".into());
        }
        if p.gmem_luo_v1 {
            v.push("--gmem-luo=v1".into());
        }
        if p.vm_luo_v1 {
            v.push("--vm-luo=v1".into());
        }
        if !p.hugepages.is_empty() {
            v.push(flag("--hugepages", p.hugepages.to_string()));
        }
        for (name, n) in [
            ("--kexec-start-ns", p.kexec_start_ns),
            ("--exec-ns", p.exec_ns),
            ("--handover-bytes", p.prev_handover_bytes),
        ] {
            if let Some(n) = n {
                v.push(flag(name, n.to_string()));
            }
        }
        if let Some(fd) = p.reaper_fd {
            v.push(flag("--reaper-fd", fd.to_string()));
        }
        if let Some(i) = &p.init {
            v.push(flag("--init", i));
        }
        for a in &p.init_args {
            v.push(flag("--init-arg", a));
        }
        for (name, path) in [
            ("--report", &p.report),
            ("--next-image", &p.next_image),
            ("--dump-handover", &p.dump_handover),
            ("--prev-image", &p.prev_image),
        ] {
            if let Some(path) = path {
                v.push(flag(name, path));
            }
        }
        if let Some(why) = &p.rollback {
            v.push(flag("--rollback", why));
        }
        v
    }
}

/// `--name=value`.
fn flag(name: &str, value: impl AsRef<OsStr>) -> OsString {
    let mut s = OsString::from(name);
    s.push("=");
    s.push(value);
    s
}
