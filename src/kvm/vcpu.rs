//! Small helpers over `kvm-ioctls` for one x86 vCPU: save its state so that it can continue in a
//! *new* VM ([`VcpuState`]), and pause it from another thread ([`VcpuKicker`]).
//!
//! What is saved was decided by probing this machine's `/dev/kvm` (`kvm_pvm`, see
//! `docs/kvm-probe.md`): regs, sregs, FPU, XSAVE, XCRs, debug registers, vCPU events, MP state,
//! the vCPU's CPUID and a fixed list of MSRs are all readable and accepted by a fresh vCPU of a
//! new VM. The local APIC is saved only when the VM has an in-kernel irqchip (our VMs do not;
//! `KVM_GET_LAPIC` then fails with `EINVAL`). Nested state and TSC scaling are not supported by
//! this host and are not saved.
//!
//! # Pausing a vCPU
//!
//! The vCPU thread registers itself with a [`VcpuKicker`] and runs the usual loop. Another thread
//! calls [`VcpuKicker::kick`]: it sets `kvm_run.immediate_exit` and sends [`kick_signal`] (a
//! real-time signal with a no-op handler) to the vCPU thread, so `KVM_RUN` returns `EINTR`
//! whether the thread is inside the guest or between two runs. On `EINTR` the vCPU thread calls
//! [`VcpuKicker::take_kick`]: if it returns `true` the vCPU is paused, any I/O the guest was
//! waiting for has been completed by that last `KVM_RUN`, and [`VcpuState::save`] captures a
//! consistent state.
//!
//! ```no_run
//! # use handover::kvm::vcpu::{VcpuKicker, VcpuState};
//! # fn f(kvm_vcpu: &mut kvm_ioctls::VcpuFd, kicker: &VcpuKicker) -> Result<VcpuState, Box<dyn std::error::Error>> {
//! let _target = kicker.register_current_thread()?;
//! loop {
//!     match kvm_vcpu.run() {
//!         Ok(_exit) => { /* handle I/O */ }
//!         Err(e) if e.errno() == libc::EINTR => {
//!             if kicker.take_kick() {
//!                 break;
//!             }
//!         }
//!         Err(e) => return Err(e.into()),
//!     }
//! }
//! Ok(VcpuState::save(kvm_vcpu)?)
//! # }
//! ```

use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Mutex, OnceLock};

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, Xsave,
    KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{VcpuExit, VcpuFd};

/// Errors of the vCPU helpers.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM ioctl failed.
    #[error("{op}: {source}")]
    Kvm {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// `KVM_SET_MSRS` stopped before the end of the list.
    #[error("KVM_SET_MSRS accepted {done} of {total} MSRs; MSR {index:#x} was refused")]
    MsrRefused {
        done: usize,
        total: usize,
        index: u32,
    },
    /// More entries than KVM accepts in one call.
    #[error("too many {what}: {count} (at most {max})")]
    TooMany {
        what: &'static str,
        count: usize,
        max: usize,
    },
    /// An encoded state that is not a valid [`VcpuState`].
    #[error("bad vCPU state encoding: {0}")]
    Decode(&'static str),
    /// An encoded state of another format version.
    #[error("unsupported vCPU state version {0} (this build reads {STATE_VERSION})")]
    Version(u32),
    /// [`complete_pending_io`] got an exit instead of `EINTR`.
    #[error("KVM_RUN with immediate_exit returned an exit ({0}) instead of EINTR")]
    NotSettled(String),
    /// A system call of the kicker failed.
    #[error("{op}: {source}")]
    Sys {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

fn kvm_err(op: &'static str) -> impl Fn(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Kvm { op, source }
}

/// `true` for the errnos with which KVM says "this vCPU/VM does not have that state".
fn is_unsupported(e: &kvm_ioctls::Error) -> bool {
    matches!(
        e.errno(),
        libc::EINVAL | libc::ENOTTY | libc::ENXIO | libc::EOPNOTSUPP
    )
}

/// MSRs saved by [`VcpuState::save`]: the architectural state a long-mode guest can change,
/// plus KVM's paravirtual per-vCPU MSRs. MSRs a vCPU cannot read are skipped.
pub const DEFAULT_MSRS: &[u32] = &[
    0x0000_0010, // IA32_TSC (first: KVM derives the new VM's TSC offset from it)
    0x0000_003b, // IA32_TSC_ADJUST
    0x0000_0174, // IA32_SYSENTER_CS
    0x0000_0175, // IA32_SYSENTER_ESP
    0x0000_0176, // IA32_SYSENTER_EIP
    0x0000_01a0, // IA32_MISC_ENABLE
    0x0000_0277, // IA32_PAT
    0x0000_06e0, // IA32_TSC_DEADLINE
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
    0x4b56_4d01, // MSR_KVM_SYSTEM_TIME_NEW (kvmclock)
    0x4b56_4d02, // MSR_KVM_ASYNC_PF_EN
    0x4b56_4d03, // MSR_KVM_STEAL_TIME
    0x4b56_4d04, // MSR_KVM_PV_EOI_EN
    0x4b56_4d05, // MSR_KVM_POLL_CONTROL
    0x4b56_4d06, // MSR_KVM_ASYNC_PF_INT
];

/// Marks the KVM uAPI structs that are copied to and from bytes.
///
/// # Safety
///
/// Implementors are `#[repr(C)]` structs made only of integers and arrays or unions of integers,
/// without implicit padding (the kernel pads its uAPI explicitly; kvm-bindings derives
/// `zerocopy::IntoBytes + FromBytes` for exactly these types under its `serde` feature), so all
/// of their bytes are initialized and every bit pattern is a valid value.
unsafe trait Pod: Copy {}
// SAFETY: see the trait; sizes are checked against the uAPI in the tests.
unsafe impl Pod for kvm_regs {}
// SAFETY: see the trait.
unsafe impl Pod for kvm_sregs {}
// SAFETY: see the trait.
unsafe impl Pod for kvm_fpu {}
// SAFETY: see the trait.
unsafe impl Pod for kvm_xcrs {}
// SAFETY: see the trait.
unsafe impl Pod for kvm_lapic_state {}
// SAFETY: see the trait.
unsafe impl Pod for kvm_vcpu_events {}
// SAFETY: see the trait.
unsafe impl Pod for kvm_mp_state {}
// SAFETY: see the trait.
unsafe impl Pod for kvm_debugregs {}
// SAFETY: see the trait.
unsafe impl Pod for kvm_msr_entry {}
// SAFETY: see the trait.
unsafe impl Pod for kvm_cpuid_entry2 {}

fn pod_bytes<T: Pod>(v: &T) -> &[u8] {
    // SAFETY: `T: Pod` has no padding, so all `size_of::<T>()` bytes behind `v` are initialized;
    // the slice borrows `v`.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
}

fn pod_slice_bytes<T: Pod>(v: &[T]) -> &[u8] {
    // SAFETY: as for `pod_bytes`; a slice of `T` has no padding between elements.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

fn pod_read<T: Pod>(b: &[u8]) -> Option<T> {
    if b.len() != std::mem::size_of::<T>() {
        return None;
    }
    // SAFETY: the length is exactly `size_of::<T>()`, `read_unaligned` has no alignment
    // requirement, and every bit pattern is a valid `T` (`Pod`).
    Some(unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<T>()) })
}

fn pod_read_vec<T: Pod>(b: &[u8], max: usize) -> Option<Vec<T>> {
    let size = std::mem::size_of::<T>();
    if b.len() % size != 0 || b.len() / size > max {
        return None;
    }
    b.chunks_exact(size).map(pod_read::<T>).collect()
}

/// Bytes of XSAVE buffer that are certainly at least the kernel's `uabi_size` for any vCPU of
/// this host: CPUID.(EAX=0xD,ECX=0):ECX is the XSAVE area size for *all* features the CPU
/// supports in XCR0 (dynamic ones such as AMX included), plus a page of slack.
fn xsave_buffer_bytes() -> usize {
    // SAFETY: CPUID is available on every x86_64 CPU; leaf 0xD exists wherever XSAVE does and
    // reads as zeros otherwise. (`__cpuid_count` is a safe fn in newer Rust, hence the allow.)
    #[allow(unused_unsafe)]
    let max = unsafe { std::arch::x86_64::__cpuid_count(0xd, 0) }.ecx as usize;
    max.max(std::mem::size_of::<kvm_xsave>()) + 4096
}

fn xsave_buffer(words: &[u32]) -> Result<Xsave, VcpuError> {
    let header_words = std::mem::size_of::<kvm_xsave>() / 4;
    let total = (xsave_buffer_bytes() / 4).max(words.len());
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

/// Everything needed to continue a paused vCPU in a new VM (on the same guest memory).
#[derive(Clone)]
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: kvm_fpu,
    /// `KVM_GET_XSAVE(2)` buffer in 32-bit words (at least the 4 KiB legacy `kvm_xsave`).
    pub xsave: Option<Vec<u32>>,
    pub xcrs: Option<kvm_xcrs>,
    pub debugregs: Option<kvm_debugregs>,
    pub events: Option<kvm_vcpu_events>,
    pub mp_state: Option<kvm_mp_state>,
    /// Only with an in-kernel irqchip.
    pub lapic: Option<kvm_lapic_state>,
    /// The readable subset of the requested MSRs, in request order.
    pub msrs: Vec<kvm_msr_entry>,
    /// The vCPU's CPUID (empty if it was never set).
    pub cpuid: Vec<kvm_cpuid_entry2>,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("rsp", &format_args!("{:#x}", self.regs.rsp))
            .field("cs", &format_args!("{:#x}", self.sregs.cs.selector))
            .field("xsave_words", &self.xsave.as_ref().map(Vec::len))
            .field("xcrs", &self.xcrs.is_some())
            .field("debugregs", &self.debugregs.is_some())
            .field("events", &self.events.is_some())
            .field("mp_state", &self.mp_state.map(|m| m.mp_state))
            .field("lapic", &self.lapic.is_some())
            .field("msrs", &self.msrs.len())
            .field("cpuid", &self.cpuid.len())
            .finish()
    }
}

/// Magic at the start of an encoded [`VcpuState`].
pub const STATE_MAGIC: [u8; 8] = *b"HOVVCPU\0";
/// Format version of the encoding.
pub const STATE_VERSION: u32 = 1;

const TAG_REGS: u32 = 1;
const TAG_SREGS: u32 = 2;
const TAG_FPU: u32 = 3;
const TAG_XSAVE: u32 = 4;
const TAG_XCRS: u32 = 5;
const TAG_DEBUGREGS: u32 = 6;
const TAG_EVENTS: u32 = 7;
const TAG_MP_STATE: u32 = 8;
const TAG_LAPIC: u32 = 9;
const TAG_MSRS: u32 = 10;
const TAG_CPUID: u32 = 11;
const TAG_MAX: u32 = 11;
/// Largest XSAVE buffer accepted when decoding (words): 1 MiB.
const MAX_XSAVE_WORDS: usize = 1 << 18;

impl VcpuState {
    /// Save the state of a vCPU that is not running (its thread is between two `KVM_RUN`s and the
    /// last one returned `EINTR`, see the module docs), with the [`DEFAULT_MSRS`].
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
            // SAFETY: `x` holds at least `xsave_buffer_bytes()` bytes, which is not less than the
            // XSAVE size KVM reads for any vCPU of this host (see `xsave_buffer_bytes`).
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

    /// Encode: `STATE_MAGIC`, version (u32), section count (u32), then per section a tag (u32),
    /// a byte length (u32) and the raw uAPI struct(s), and a CRC-32 of everything before it.
    /// All integers little-endian (this is an x86-64-only format).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut sections: Vec<(u32, &[u8])> = vec![
            (TAG_REGS, pod_bytes(&self.regs)),
            (TAG_SREGS, pod_bytes(&self.sregs)),
            (TAG_FPU, pod_bytes(&self.fpu)),
        ];
        let xsave_bytes: Option<Vec<u8>> = self
            .xsave
            .as_ref()
            .map(|w| w.iter().flat_map(|x| x.to_le_bytes()).collect());
        if let Some(x) = &xsave_bytes {
            sections.push((TAG_XSAVE, x));
        }
        if let Some(x) = &self.xcrs {
            sections.push((TAG_XCRS, pod_bytes(x)));
        }
        if let Some(x) = &self.debugregs {
            sections.push((TAG_DEBUGREGS, pod_bytes(x)));
        }
        if let Some(x) = &self.events {
            sections.push((TAG_EVENTS, pod_bytes(x)));
        }
        if let Some(x) = &self.mp_state {
            sections.push((TAG_MP_STATE, pod_bytes(x)));
        }
        if let Some(x) = &self.lapic {
            sections.push((TAG_LAPIC, pod_bytes(x)));
        }
        sections.push((TAG_MSRS, pod_slice_bytes(&self.msrs)));
        sections.push((TAG_CPUID, pod_slice_bytes(&self.cpuid)));

        let mut out =
            Vec::with_capacity(16 + sections.iter().map(|s| 8 + s.1.len()).sum::<usize>() + 4);
        out.extend_from_slice(&STATE_MAGIC);
        out.extend_from_slice(&STATE_VERSION.to_le_bytes());
        out.extend_from_slice(&(sections.len() as u32).to_le_bytes());
        for (tag, body) in sections {
            out.extend_from_slice(&tag.to_le_bytes());
            out.extend_from_slice(&(body.len() as u32).to_le_bytes());
            out.extend_from_slice(body);
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decode what [`VcpuState::to_bytes`] produced. Every length is checked; any damage is an
    /// error, never a panic.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, VcpuError> {
        let bad = VcpuError::Decode;
        if bytes.len() < 20 {
            return Err(bad("shorter than header and checksum"));
        }
        if bytes[..8] != STATE_MAGIC {
            return Err(bad("bad magic"));
        }
        let u32_at = |b: &[u8], off: usize| -> Option<u32> {
            b.get(off..off.checked_add(4)?)
                .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        };
        let version = u32_at(bytes, 8).ok_or(bad("truncated header"))?;
        if version != STATE_VERSION {
            return Err(VcpuError::Version(version));
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        if u32_at(crc, 0) != Some(crc32fast::hash(body)) {
            return Err(bad("checksum mismatch"));
        }
        let count = u32_at(body, 12).ok_or(bad("truncated header"))?;
        if count > TAG_MAX {
            return Err(bad("too many sections"));
        }

        let mut seen = [false; TAG_MAX as usize + 1];
        let (mut regs, mut sregs, mut fpu) = (None, None, None);
        let mut st = VcpuState {
            regs: kvm_regs::default(),
            sregs: kvm_sregs::default(),
            fpu: kvm_fpu::default(),
            xsave: None,
            xcrs: None,
            debugregs: None,
            events: None,
            mp_state: None,
            lapic: None,
            msrs: Vec::new(),
            cpuid: Vec::new(),
        };
        let mut off = 16usize;
        for _ in 0..count {
            let tag = u32_at(body, off).ok_or(bad("truncated section header"))?;
            let len = u32_at(body, off + 4).ok_or(bad("truncated section header"))? as usize;
            off += 8;
            let payload = off
                .checked_add(len)
                .and_then(|end| body.get(off..end))
                .ok_or(bad("section runs past the end"))?;
            off += len;
            let slot = seen
                .get_mut(tag as usize)
                .filter(|_| tag != 0)
                .ok_or(bad("unknown section tag"))?;
            if std::mem::replace(slot, true) {
                return Err(bad("duplicate section"));
            }
            let size_err = bad("section has the wrong size");
            match tag {
                TAG_REGS => regs = Some(pod_read(payload).ok_or(size_err)?),
                TAG_SREGS => sregs = Some(pod_read(payload).ok_or(size_err)?),
                TAG_FPU => fpu = Some(pod_read(payload).ok_or(size_err)?),
                TAG_XSAVE => {
                    let legacy = std::mem::size_of::<kvm_xsave>();
                    if payload.len() % 4 != 0
                        || payload.len() < legacy
                        || payload.len() / 4 > MAX_XSAVE_WORDS
                    {
                        return Err(size_err);
                    }
                    st.xsave = Some(
                        payload
                            .chunks_exact(4)
                            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                            .collect(),
                    );
                }
                TAG_XCRS => st.xcrs = Some(pod_read(payload).ok_or(size_err)?),
                TAG_DEBUGREGS => st.debugregs = Some(pod_read(payload).ok_or(size_err)?),
                TAG_EVENTS => st.events = Some(pod_read(payload).ok_or(size_err)?),
                TAG_MP_STATE => st.mp_state = Some(pod_read(payload).ok_or(size_err)?),
                TAG_LAPIC => st.lapic = Some(pod_read(payload).ok_or(size_err)?),
                TAG_MSRS => st.msrs = pod_read_vec(payload, KVM_MAX_MSR_ENTRIES).ok_or(size_err)?,
                TAG_CPUID => {
                    st.cpuid = pod_read_vec(payload, KVM_MAX_CPUID_ENTRIES).ok_or(size_err)?
                }
                _ => return Err(bad("unknown section tag")),
            }
        }
        if off != body.len() {
            return Err(bad("trailing bytes after the last section"));
        }
        if let Some(x) = &st.xcrs {
            if x.nr_xcrs as usize > x.xcrs.len() {
                return Err(bad("nr_xcrs out of range"));
            }
        }
        st.regs = regs.ok_or(bad("missing regs"))?;
        st.sregs = sregs.ok_or(bad("missing sregs"))?;
        st.fpu = fpu.ok_or(bad("missing fpu"))?;
        Ok(st)
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
    // SAFETY: `x` holds at least `xsave_buffer_bytes()` bytes, which is not less than the XSAVE
    // size KVM writes for any vCPU of this host (see `xsave_buffer_bytes`).
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

fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, VcpuError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::TooMany {
            what: "MSRs",
            count: rest.len(),
            max: KVM_MAX_MSR_ENTRIES,
        })?;
        let n = vcpu
            .get_msrs(&mut msrs)
            .map_err(kvm_err("KVM_GET_MSRS"))?
            .min(rest.len());
        out.extend_from_slice(&msrs.as_slice()[..n]);
        // Entry `n` could not be read: skip it and go on with the rest.
        rest = rest.get(n + 1..).unwrap_or(&[]);
    }
    Ok(out)
}

/// `KVM_SET_MSRS` with all of `entries`. KVM refuses some writes of a value the fresh vCPU
/// already has (e.g. `MSR_KVM_ASYNC_PF_INT` = 0 without an in-kernel LAPIC): a refused MSR whose
/// current value already equals the saved one is skipped; any other refusal is an error.
fn write_msrs(vcpu: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<(), VcpuError> {
    let mut rest = entries;
    while !rest.is_empty() {
        let msrs = Msrs::from_entries(rest).map_err(|_| VcpuError::TooMany {
            what: "MSRs",
            count: rest.len(),
            max: KVM_MAX_MSR_ENTRIES,
        })?;
        let done = vcpu.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
        let Some(refused) = rest.get(done) else {
            return Ok(());
        };
        let current = read_msrs(vcpu, &[refused.index])?;
        if current.first().map(|m| m.data) != Some(refused.data) {
            return Err(VcpuError::MsrRefused {
                done: entries.len() - rest.len() + done,
                total: entries.len(),
                index: refused.index,
            });
        }
        rest = &rest[done + 1..];
    }
    Ok(())
}

/// Complete whatever the last exit left pending (the `IN` data or `OUT` the VMM just handled)
/// without running guest code: `KVM_RUN` with `immediate_exit` set, which must return `EINTR`.
/// Call it on the thread that owns the vCPU before [`VcpuState::save`] when the vCPU was stopped
/// right after an I/O exit rather than by a kick.
pub fn complete_pending_io(vcpu: &mut VcpuFd) -> Result<(), VcpuError> {
    vcpu.set_kvm_immediate_exit(1);
    let r = match vcpu.run() {
        Err(e) if e.errno() == libc::EINTR => Ok(()),
        Err(source) => Err(VcpuError::Kvm {
            op: "KVM_RUN",
            source,
        }),
        Ok(exit) => Err(VcpuError::NotSettled(describe_exit(&exit))),
    };
    vcpu.set_kvm_immediate_exit(0);
    r
}

/// One-line description of an exit, for error messages.
pub fn describe_exit(exit: &VcpuExit<'_>) -> String {
    match exit {
        VcpuExit::IoIn(port, data) => format!("IoIn(port {port:#x}, {} bytes)", data.len()),
        VcpuExit::IoOut(port, data) => format!("IoOut(port {port:#x}, {data:02x?})"),
        VcpuExit::MmioRead(addr, data) => format!("MmioRead({addr:#x}, {} bytes)", data.len()),
        VcpuExit::MmioWrite(addr, data) => format!("MmioWrite({addr:#x}, {data:02x?})"),
        other => format!("{other:?}"),
    }
}

/// The signal [`VcpuKicker::kick`] sends: `SIGRTMIN`.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

extern "C" fn kick_handler(_sig: libc::c_int) {}

/// Install the no-op handler for [`kick_signal`] once per process. A handler someone else
/// installed is kept (any handler makes `KVM_RUN` return `EINTR`); `SIG_DFL` (which would kill
/// the process) and `SIG_IGN` (which would discard the kick) are replaced.
fn install_kick_handler() -> Result<(), VcpuError> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    let r = INSTALLED.get_or_init(|| {
        let sig = kick_signal();
        // SAFETY: plain sigaction calls with valid, zero-initialized structs; the handler is an
        // `extern "C"` function that does nothing (async-signal-safe).
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut old) != 0 {
                return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
            }
            if old.sa_sigaction != libc::SIG_DFL && old.sa_sigaction != libc::SIG_IGN {
                return Ok(());
            }
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = kick_handler as extern "C" fn(libc::c_int) as libc::sighandler_t;
            libc::sigemptyset(&mut act.sa_mask);
            act.sa_flags = 0;
            if libc::sigaction(sig, &act, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
            }
        }
        Ok(())
    });
    r.map_err(|errno| VcpuError::Sys {
        op: "sigaction",
        source: std::io::Error::from_raw_os_error(errno),
    })
}

/// Offset of `immediate_exit` in `struct kvm_run`.
const IMMEDIATE_EXIT_OFFSET: usize = std::mem::offset_of!(kvm_bindings::kvm_run, immediate_exit);

/// Pauses a vCPU that runs in another thread. See the module docs for the protocol.
///
/// The kicker maps the first page of the vCPU's `kvm_run` by itself, so it can be shared with
/// other threads (`Arc<VcpuKicker>`) independently of the `VcpuFd`. That mapping keeps the vCPU
/// (and so its VM) alive in the kernel until the kicker is dropped: drop it with the vCPU.
pub struct VcpuKicker {
    run: NonNull<libc::c_void>,
    map_len: usize,
    pending: AtomicBool,
    target: Mutex<Option<libc::pid_t>>,
}

// SAFETY: the only state behind the raw pointer is the shared `kvm_run` page, which is accessed
// exclusively through an `AtomicU8`; everything else is `Sync` already.
unsafe impl Send for VcpuKicker {}
// SAFETY: see `Send`.
unsafe impl Sync for VcpuKicker {}

impl std::fmt::Debug for VcpuKicker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuKicker")
            .field("pending", &self.pending.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// The vCPU thread's registration with a [`VcpuKicker`]; unregisters on drop.
#[derive(Debug)]
pub struct KickTarget<'a> {
    kicker: &'a VcpuKicker,
}

impl Drop for KickTarget<'_> {
    fn drop(&mut self) {
        *self.kicker.target.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

impl VcpuKicker {
    /// A kicker for `vcpu`. Installs the process-wide no-op handler for [`kick_signal`] on
    /// first use.
    pub fn new(vcpu: &VcpuFd) -> Result<Self, VcpuError> {
        install_kick_handler()?;
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let map_len = usize::try_from(page).unwrap_or(4096).max(4096);
        // SAFETY: a new shared mapping of the vCPU fd at offset 0 (the `kvm_run` page), placed by
        // the kernel; it does not alias any Rust object.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(VcpuError::Sys {
                op: "mmap(kvm_run)",
                source: std::io::Error::last_os_error(),
            });
        }
        let run = NonNull::new(p).ok_or(VcpuError::Sys {
            op: "mmap(kvm_run)",
            source: std::io::Error::from_raw_os_error(libc::EFAULT),
        })?;
        Ok(VcpuKicker {
            run,
            map_len,
            pending: AtomicBool::new(false),
            target: Mutex::new(None),
        })
    }

    fn immediate_exit(&self) -> &AtomicU8 {
        // SAFETY: the mapping is at least one page and lives as long as `self`; the byte at
        // `IMMEDIATE_EXIT_OFFSET` is `kvm_run.immediate_exit`, which user space may change at any
        // time, and we only ever access it atomically.
        unsafe {
            &*self
                .run
                .as_ptr()
                .cast::<u8>()
                .add(IMMEDIATE_EXIT_OFFSET)
                .cast::<AtomicU8>()
        }
    }

    /// Register the calling thread as the vCPU thread (and unblock [`kick_signal`] in it).
    /// Keep the returned guard alive while the thread runs the vCPU.
    pub fn register_current_thread(&self) -> Result<KickTarget<'_>, VcpuError> {
        // SAFETY: sigset manipulation on a local, zero-initialized set; pthread_sigmask only
        // changes the calling thread's mask.
        let rc = unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, kick_signal());
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(VcpuError::Sys {
                op: "pthread_sigmask",
                source: std::io::Error::from_raw_os_error(rc),
            });
        }
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        *self.target.lock().unwrap_or_else(|e| e.into_inner()) = Some(tid);
        Ok(KickTarget { kicker: self })
    }

    /// Ask the vCPU to stop: its current or next `KVM_RUN` returns `EINTR`. Returns at once;
    /// the vCPU thread sees the request through [`VcpuKicker::take_kick`].
    pub fn kick(&self) -> Result<(), VcpuError> {
        self.pending.store(true, Ordering::SeqCst);
        self.immediate_exit().store(1, Ordering::SeqCst);
        let target = self.target.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tid) = *target {
            // SAFETY: tgkill to a thread of this process; the target thread unregisters (under
            // this lock) before it ends, and the signal's handler is a no-op.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_tgkill,
                    libc::getpid(),
                    libc::c_long::from(tid),
                    libc::c_long::from(kick_signal()),
                )
            };
            if rc != 0 {
                return Err(VcpuError::Sys {
                    op: "tgkill",
                    source: std::io::Error::last_os_error(),
                });
            }
        }
        Ok(())
    }

    /// On the vCPU thread, after `KVM_RUN` returned `EINTR`: clear `immediate_exit` and report
    /// whether a kick was requested (and consume it). `false` means a stray signal: run again.
    pub fn take_kick(&self) -> bool {
        self.immediate_exit().store(0, Ordering::SeqCst);
        self.pending.swap(false, Ordering::SeqCst)
    }

    /// Whether a kick is requested and not yet taken.
    pub fn is_pending(&self) -> bool {
        self.pending.load(Ordering::SeqCst)
    }
}

impl Drop for VcpuKicker {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping created in `new`; no reference into it outlives
        // `self`.
        unsafe {
            libc::munmap(self.run.as_ptr(), self.map_len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VcpuState {
        let mut st = VcpuState {
            regs: kvm_regs {
                rip: 0x3000,
                rsp: 0x6000,
                rflags: 0x3002,
                rax: 0x1234_5678_9abc_def0,
                ..Default::default()
            },
            sregs: kvm_sregs::default(),
            fpu: kvm_fpu::default(),
            xsave: Some((0..1024u32).collect()),
            xcrs: Some(kvm_xcrs::default()),
            debugregs: Some(kvm_debugregs::default()),
            events: Some(kvm_vcpu_events::default()),
            mp_state: Some(kvm_mp_state { mp_state: 0 }),
            lapic: None,
            msrs: vec![
                kvm_msr_entry {
                    index: 0x10,
                    data: 77,
                    ..Default::default()
                },
                kvm_msr_entry {
                    index: 0xc000_0082,
                    data: 0xffff_ffff_8100_0000,
                    ..Default::default()
                },
            ],
            cpuid: vec![kvm_cpuid_entry2 {
                function: 0x8000_0001,
                edx: 1 << 29,
                ..Default::default()
            }],
        };
        st.sregs.cs.selector = 0x33;
        st.sregs.efer = 0x500;
        st.fpu.mxcsr = 0x1f80;
        st
    }

    #[test]
    fn uapi_sizes() {
        use std::mem::size_of;
        assert_eq!(size_of::<kvm_regs>(), 144);
        assert_eq!(size_of::<kvm_sregs>(), 312);
        assert_eq!(size_of::<kvm_fpu>(), 416);
        assert_eq!(size_of::<kvm_xsave>(), 4096);
        assert_eq!(size_of::<kvm_xcrs>(), 392);
        assert_eq!(size_of::<kvm_lapic_state>(), 1024);
        assert_eq!(size_of::<kvm_vcpu_events>(), 64);
        assert_eq!(size_of::<kvm_debugregs>(), 128);
        assert_eq!(size_of::<kvm_mp_state>(), 4);
        assert_eq!(size_of::<kvm_msr_entry>(), 16);
        assert_eq!(size_of::<kvm_cpuid_entry2>(), 40);
        assert_eq!(IMMEDIATE_EXIT_OFFSET, 1);
    }

    #[test]
    fn round_trip() {
        let st = sample();
        let bytes = st.to_bytes();
        let back = VcpuState::from_bytes(&bytes).unwrap();
        assert_eq!(back.regs, st.regs);
        assert_eq!(back.sregs, st.sregs);
        assert_eq!(back.fpu, st.fpu);
        assert_eq!(back.xsave, st.xsave);
        assert_eq!(back.xcrs, st.xcrs);
        assert_eq!(back.debugregs, st.debugregs);
        assert_eq!(back.events, st.events);
        assert_eq!(back.mp_state, st.mp_state);
        assert!(back.lapic.is_none());
        assert_eq!(back.msrs, st.msrs);
        assert_eq!(back.cpuid, st.cpuid);
        assert_eq!(back.to_bytes(), bytes);
    }

    #[test]
    fn damaged_encodings_are_errors() {
        let bytes = sample().to_bytes();
        // Every truncation fails.
        for len in 0..bytes.len() {
            assert!(VcpuState::from_bytes(&bytes[..len]).is_err(), "len {len}");
        }
        // Every single-bit flip fails (the checksum catches what the structure does not).
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            assert!(VcpuState::from_bytes(&b).is_err(), "flip at {i}");
        }
        let mut v2 = bytes.clone();
        v2[8] = 2;
        assert!(matches!(
            VcpuState::from_bytes(&v2),
            Err(VcpuError::Version(2))
        ));
    }

    /// Re-checksum a hand-built body.
    fn seal(mut body: Vec<u8>) -> Vec<u8> {
        let crc = crc32fast::hash(&body);
        body.extend_from_slice(&crc.to_le_bytes());
        body
    }

    fn header(count: u32) -> Vec<u8> {
        let mut b = STATE_MAGIC.to_vec();
        b.extend_from_slice(&STATE_VERSION.to_le_bytes());
        b.extend_from_slice(&count.to_le_bytes());
        b
    }

    fn section(b: &mut Vec<u8>, tag: u32, body: &[u8]) {
        b.extend_from_slice(&tag.to_le_bytes());
        b.extend_from_slice(&(body.len() as u32).to_le_bytes());
        b.extend_from_slice(body);
    }

    #[test]
    fn structurally_bad_but_checksummed() {
        let regs = kvm_regs::default();
        let sregs = kvm_sregs::default();
        let fpu = kvm_fpu::default();
        let base = |count| {
            let mut b = header(count);
            section(&mut b, TAG_REGS, pod_bytes(&regs));
            section(&mut b, TAG_SREGS, pod_bytes(&sregs));
            section(&mut b, TAG_FPU, pod_bytes(&fpu));
            b
        };
        assert!(VcpuState::from_bytes(&seal(base(3))).is_ok());
        // Missing fpu.
        let mut b = header(2);
        section(&mut b, TAG_REGS, pod_bytes(&regs));
        section(&mut b, TAG_SREGS, pod_bytes(&sregs));
        assert!(VcpuState::from_bytes(&seal(b)).is_err());
        // Duplicate.
        let mut b = base(4);
        section(&mut b, TAG_REGS, pod_bytes(&regs));
        assert!(VcpuState::from_bytes(&seal(b)).is_err());
        // Unknown tag, tag 0.
        for tag in [0, TAG_MAX + 1, u32::MAX] {
            let mut b = base(4);
            section(&mut b, tag, &[]);
            assert!(VcpuState::from_bytes(&seal(b)).is_err(), "tag {tag}");
        }
        // Wrong sizes.
        let mut b = base(4);
        section(&mut b, TAG_XCRS, &[0; 10]);
        assert!(VcpuState::from_bytes(&seal(b)).is_err());
        let mut b = base(4);
        section(&mut b, TAG_MSRS, &[0; 17]);
        assert!(VcpuState::from_bytes(&seal(b)).is_err());
        let mut b = base(4);
        section(&mut b, TAG_XSAVE, &[0; 100]);
        assert!(VcpuState::from_bytes(&seal(b)).is_err());
        let mut b = base(4);
        section(
            &mut b,
            TAG_CPUID,
            &vec![0; 40 * (KVM_MAX_CPUID_ENTRIES + 1)],
        );
        assert!(VcpuState::from_bytes(&seal(b)).is_err());
        // Count says more than present; count says fewer (trailing bytes).
        assert!(VcpuState::from_bytes(&seal(base(4))).is_err());
        assert!(VcpuState::from_bytes(&seal(base(2))).is_err());
        // Section length past the end.
        let mut b = base(4);
        b.extend_from_slice(&TAG_LAPIC.to_le_bytes());
        b.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(VcpuState::from_bytes(&seal(b)).is_err());
        // nr_xcrs out of range.
        let xcrs = kvm_xcrs {
            nr_xcrs: 17,
            ..Default::default()
        };
        let mut b = base(4);
        section(&mut b, TAG_XCRS, pod_bytes(&xcrs));
        assert!(VcpuState::from_bytes(&seal(b)).is_err());
    }

    #[test]
    fn xsave_buffer_holds_words() {
        let words: Vec<u32> = (0..1500u32).collect();
        let x = xsave_buffer(&words).unwrap();
        let back = xsave_words(&x);
        assert_eq!(&back[..1500], &words[..]);
        assert!(xsave_buffer_bytes() >= 4096 + 4096);
    }
}
