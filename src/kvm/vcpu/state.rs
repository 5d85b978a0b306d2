//! Capture a vCPU's state from KVM ([`VcpuState::save`]) and load it into a fresh vCPU of a new VM
//! ([`VcpuState::restore`]); what is saved and why is in the [`crate::kvm::vcpu`] docs. The
//! state's type and encoding are [`crate::abi::vcpu_state`]'s.

use std::sync::OnceLock;

use kvm_bindings::{kvm_xsave, CpuId, Xsave, KVM_CAP_XSAVE2, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::VcpuFd;

use super::error::{is_unsupported, kvm_err, VcpuError};
use super::msrs::{read_msrs, write_msrs, DEFAULT_MSRS};
use crate::abi::vcpu_state::VcpuState;

/// The fallback XSAVE buffer size when `KVM_CAP_XSAVE2` cannot be asked: bytes that are
/// certainly at least the kernel's `uabi_size` for any vCPU of this host:
/// CPUID.(EAX=0xD,ECX=0):ECX is the XSAVE area size for *all* features the CPU supports in XCR0
/// (dynamic ones such as AMX included), plus a page of slack.
fn xsave_buffer_bytes() -> usize {
    // SAFETY: CPUID is available on every x86_64 CPU; leaf 0xD exists wherever XSAVE does and
    // reads as zeros otherwise. (`__cpuid_count` is a safe fn in newer Rust, hence the allow.)
    #[allow(unused_unsafe)]
    let max = unsafe { std::arch::x86_64::__cpuid_count(0xd, 0) }.ecx as usize;
    max.max(std::mem::size_of::<kvm_xsave>()) + 4096
}

/// The XSAVE buffer size, once known (see [`xsave_size`]).
static XSAVE_SIZE: OnceLock<usize> = OnceLock::new();

/// The XSAVE buffer size for `KVM_GET_XSAVE2`/`KVM_SET_XSAVE`: what
/// `KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2)` reports (the size these ioctls read and write, as
/// kvm-ioctls documents), at least the legacy 4 KiB; where the capability is 0 (a kernel before
/// 5.17) or KVM cannot be asked, `xsave_buffer_bytes()`. Asked once per process: through the
/// `Kvm` given to [`init_xsave_size`], or else by opening `/dev/kvm` on first use (≈30 µs
/// here), which a VMM avoids inside its blackout by calling [`init_xsave_size`] beforehand.
pub fn xsave_size() -> usize {
    *XSAVE_SIZE.get_or_init(|| {
        let cap = kvm_ioctls::Kvm::new()
            .map(|kvm| kvm.check_extension_raw(libc::c_ulong::from(KVM_CAP_XSAVE2)))
            .unwrap_or(0);
        xsave_size_for_cap(cap)
    })
}

/// Ask `KVM_CAP_XSAVE2` on an open `/dev/kvm` (one ioctl) unless the size is known already;
/// returns [`xsave_size`].
pub fn init_xsave_size(kvm: &kvm_ioctls::Kvm) -> usize {
    *XSAVE_SIZE.get_or_init(|| {
        xsave_size_for_cap(kvm.check_extension_raw(libc::c_ulong::from(KVM_CAP_XSAVE2)))
    })
}

fn xsave_size_for_cap(cap: i32) -> usize {
    match usize::try_from(cap) {
        Ok(bytes) if bytes > 0 => bytes.max(std::mem::size_of::<kvm_xsave>()),
        _ => xsave_buffer_bytes(),
    }
}

fn xsave_buffer(words: &[u32]) -> Result<Xsave, VcpuError> {
    let header_words = std::mem::size_of::<kvm_xsave>() / 4;
    let total = xsave_size().div_ceil(4).max(words.len());
    let mut x = Xsave::new(total - header_words).map_err(|_| VcpuError::TooMany {
        what: "XSAVE words",
        count: total,
        max: u32::MAX as usize,
    })?;
    let n = words.len().min(header_words);
    // SAFETY: only element values of the header are changed, not the FAM length.
    unsafe { x.as_mut_fam_struct() }.xsave.region[..n].copy_from_slice(&words[..n]);
    if words.len() > header_words {
        x.as_mut_slice()[..words.len() - header_words].copy_from_slice(&words[header_words..]);
    }
    Ok(x)
}

fn xsave_words(x: &Xsave) -> Vec<u32> {
    let header = &x.as_fam_struct_ref().xsave.region;
    let mut v = header.to_vec();
    v.extend_from_slice(x.as_slice());
    // Trailing zero words carry no state; keep the encoding small.
    let keep = v.iter().rposition(|&w| w != 0).map_or(0, |p| p + 1);
    v.truncate(keep.max(header.len()));
    v
}

impl VcpuState {
    /// Save the state of a vCPU that is not running (its thread is between two `KVM_RUN`s and the
    /// last one returned `EINTR`, see the [`crate::kvm::vcpu`] docs), with the [`DEFAULT_MSRS`].
    pub fn save(vcpu: &VcpuFd) -> Result<Self, VcpuError> {
        Self::save_with_msrs(vcpu, DEFAULT_MSRS)
    }

    /// As [`VcpuState::save`], with an explicit MSR list (e.g. `Kvm::get_msr_index_list`).
    pub fn save_with_msrs(vcpu: &VcpuFd, msr_indices: &[u32]) -> Result<Self, VcpuError> {
        let regs = vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        let sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        let fpu = vcpu.get_fpu().map_err(kvm_err("KVM_GET_FPU"))?;
        let xsave = optional(get_xsave_words(vcpu), "KVM_GET_XSAVE")?;
        let xcrs = optional(vcpu.get_xcrs(), "KVM_GET_XCRS")?;
        let debugregs = optional(vcpu.get_debug_regs(), "KVM_GET_DEBUGREGS")?;
        let events = optional(vcpu.get_vcpu_events(), "KVM_GET_VCPU_EVENTS")?;
        let mp_state = optional(vcpu.get_mp_state(), "KVM_GET_MP_STATE")?;
        let lapic = optional(vcpu.get_lapic(), "KVM_GET_LAPIC")?;
        let msrs = read_msrs(vcpu, msr_indices)?;
        let cpuid = match vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES) {
            Ok(c) => c.as_slice().to_vec(),
            Err(e) if is_unsupported(&e) => Vec::new(),
            Err(source) => {
                return Err(VcpuError::Kvm {
                    op: "KVM_GET_CPUID2",
                    source,
                })
            }
        };
        Ok(VcpuState {
            regs,
            sregs,
            fpu,
            xsave,
            xcrs,
            debugregs,
            events,
            mp_state,
            lapic,
            msrs,
            cpuid,
        })
    }

    /// Load this state into a fresh vCPU (of a new VM on the same memory), in the order KVM
    /// needs: CPUID first (it defines which XSAVE features and MSRs are valid), then MP state,
    /// registers, FPU/XSAVE/XCRs, debug registers, LAPIC, MSRs and finally pending events.
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), VcpuError> {
        if !self.cpuid.is_empty() {
            let cpuid = CpuId::from_entries(&self.cpuid).map_err(|_| VcpuError::TooMany {
                what: "CPUID entries",
                count: self.cpuid.len(),
                max: KVM_MAX_CPUID_ENTRIES,
            })?;
            vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        }
        if let Some(mp) = self.mp_state {
            vcpu.set_mp_state(mp).map_err(kvm_err("KVM_SET_MP_STATE"))?;
        }
        vcpu.set_regs(&self.regs).map_err(kvm_err("KVM_SET_REGS"))?;
        vcpu.set_sregs(&self.sregs)
            .map_err(kvm_err("KVM_SET_SREGS"))?;
        vcpu.set_fpu(&self.fpu).map_err(kvm_err("KVM_SET_FPU"))?;
        if let Some(words) = &self.xsave {
            let x = xsave_buffer(words)?;
            // SAFETY: `x` holds at least `xsave_size()` bytes: the size KVM_CAP_XSAVE2 reports,
            // which is what KVM reads (or, without that capability, `xsave_buffer_bytes()`,
            // which is not less than it).
            unsafe { vcpu.set_xsave2(&x) }.map_err(kvm_err("KVM_SET_XSAVE"))?;
        }
        if let Some(xcrs) = &self.xcrs {
            vcpu.set_xcrs(xcrs).map_err(kvm_err("KVM_SET_XCRS"))?;
        }
        if let Some(d) = &self.debugregs {
            vcpu.set_debug_regs(d)
                .map_err(kvm_err("KVM_SET_DEBUGREGS"))?;
        }
        if let Some(l) = &self.lapic {
            vcpu.set_lapic(l).map_err(kvm_err("KVM_SET_LAPIC"))?;
        }
        write_msrs(vcpu, &self.msrs)?;
        if let Some(ev) = &self.events {
            vcpu.set_vcpu_events(ev)
                .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
        }
        Ok(())
    }
}

/// `Some` on success, `None` when the vCPU does not have that state, else the error.
fn optional<T>(r: Result<T, kvm_ioctls::Error>, op: &'static str) -> Result<Option<T>, VcpuError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if is_unsupported(&e) => Ok(None),
        Err(source) => Err(VcpuError::Kvm { op, source }),
    }
}

fn get_xsave_words(vcpu: &VcpuFd) -> Result<Vec<u32>, kvm_ioctls::Error> {
    let mut x = match xsave_buffer(&[]) {
        Ok(x) => x,
        Err(_) => return Err(kvm_ioctls::Error::new(libc::ENOMEM)),
    };
    // SAFETY: `x` holds at least `xsave_size()` bytes: the size KVM_CAP_XSAVE2 reports, which
    // is what KVM writes (without that capability there is no KVM_GET_XSAVE2 and the call fails).
    match unsafe { vcpu.get_xsave2(&mut x) } {
        Ok(()) => Ok(xsave_words(&x)),
        // Kernels before 5.17 have only KVM_GET_XSAVE (4 KiB).
        Err(e) if e.errno() == libc::ENOTTY || e.errno() == libc::EINVAL => {
            let legacy = vcpu.get_xsave()?;
            Ok(legacy.region.to_vec())
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xsave_buffer_holds_words() {
        let words: Vec<u32> = (0..1500u32).collect();
        let x = xsave_buffer(&words).unwrap();
        let back = xsave_words(&x);
        assert_eq!(&back[..1500], &words[..]);
        assert!(xsave_buffer_bytes() >= 4096 + 4096);
    }

    #[test]
    fn xsave_size_is_kvm_cap_xsave2() {
        assert_eq!(xsave_size_for_cap(0), xsave_buffer_bytes());
        assert_eq!(xsave_size_for_cap(-1), xsave_buffer_bytes());
        assert_eq!(xsave_size_for_cap(2432), 4096);
        assert_eq!(xsave_size_for_cap(11008), 11008);
        let t = std::time::Instant::now();
        let size = xsave_size();
        let first = t.elapsed();
        match kvm_ioctls::Kvm::new() {
            Ok(kvm) => {
                let cap = kvm.check_extension_raw(libc::c_ulong::from(KVM_CAP_XSAVE2));
                assert_eq!(size, xsave_size_for_cap(cap));
                assert_eq!(init_xsave_size(&kvm), size);
                eprintln!("KVM_CAP_XSAVE2 = {cap}: XSAVE buffer {size} bytes ({first:?} to ask)");
            }
            Err(e) => eprintln!("no /dev/kvm ({e}): XSAVE buffer {size} bytes (fallback)"),
        }
        let x = xsave_buffer(&[]).unwrap();
        assert!(std::mem::size_of_val(x.as_fam_struct_ref()) + 4 * x.as_slice().len() >= size);
    }
}
