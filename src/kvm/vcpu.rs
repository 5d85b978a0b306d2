//! Small helpers over `kvm-ioctls` for one x86 vCPU: save its state so that it can continue in a
//! *new* VM ([`VcpuState`]), and pause it from another thread ([`VcpuKicker`], [`run_kickable`]).
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
//! The vCPU thread registers itself with a [`VcpuKicker`] and runs the vCPU with
//! [`run_kickable`]. Another thread calls [`VcpuKicker::kick`]: it records the request and sends
//! [`kick_signal`] to the registered thread with `pthread_kill`. That thread's own signal handler
//! sets `immediate_exit` in the `kvm_run` of the vCPU it is running, so `KVM_RUN` returns `EINTR`
//! whether the thread is inside the guest, blocked on a fault or about to enter; a kick that
//! comes between two runs is seen by the next [`run_kickable`], which then returns `EINTR` at
//! once. `kvm_run` is only ever written on the vCPU thread (the rust-vmm/Firecracker pattern);
//! there is no second mapping of it. On `EINTR` the vCPU thread calls
//! [`VcpuKicker::take_kick`]: if it returns `true` the vCPU is paused, any I/O the guest was
//! waiting for has been completed by that last `KVM_RUN`, and [`VcpuState::save`] captures a
//! consistent state.
//!
//! ```no_run
//! # use handover::kvm::vcpu::{run_kickable, VcpuKicker, VcpuState};
//! # fn f(kvm_vcpu: &mut kvm_ioctls::VcpuFd, kicker: &VcpuKicker) -> Result<VcpuState, Box<dyn std::error::Error>> {
//! let _target = kicker.register_current_thread()?;
//! loop {
//!     match run_kickable(kvm_vcpu) {
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

use std::cell::RefCell;
use std::marker::PhantomData;
use std::sync::atomic::{compiler_fence, AtomicBool, AtomicPtr, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_run, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, Xsave,
    KVM_CAP_XSAVE2, KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::Killable;
use zerocopy::{FromBytes, Immutable, IntoBytes};

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

/// `kvm_fpu` with zerocopy's derives: kvm-bindings 0.14 derives `IntoBytes`/`FromBytes` (feature
/// `serde`) for every uAPI struct saved here except this one. Same fields in the same order, so
/// the same bytes (padding fields included); the derives prove there is no implicit padding.
#[derive(Clone, Copy, FromBytes, IntoBytes, Immutable)]
#[repr(C)]
struct FpuBytes {
    fpr: [[u8; 16]; 8],
    fcw: u16,
    fsw: u16,
    ftwx: u8,
    pad1: u8,
    last_opcode: u16,
    last_ip: u64,
    last_dp: u64,
    xmm: [[u8; 16]; 16],
    mxcsr: u32,
    pad2: u32,
}

const _: () = {
    assert!(std::mem::size_of::<FpuBytes>() == std::mem::size_of::<kvm_fpu>());
    assert!(std::mem::offset_of!(FpuBytes, xmm) == std::mem::offset_of!(kvm_fpu, xmm));
    assert!(std::mem::offset_of!(FpuBytes, pad2) == std::mem::offset_of!(kvm_fpu, pad2));
};

impl From<&kvm_fpu> for FpuBytes {
    fn from(f: &kvm_fpu) -> Self {
        FpuBytes {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            pad1: f.pad1,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            pad2: f.pad2,
        }
    }
}

impl From<FpuBytes> for kvm_fpu {
    fn from(f: FpuBytes) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            pad1: f.pad1,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            pad2: f.pad2,
        }
    }
}

/// A uAPI struct from exactly its bytes.
fn read_exact<T: FromBytes>(b: &[u8]) -> Option<T> {
    T::read_from_bytes(b).ok()
}

/// An array of uAPI structs from its bytes, at most `max` of them.
fn read_vec<T: FromBytes>(b: &[u8], max: usize) -> Option<Vec<T>> {
    let size = std::mem::size_of::<T>();
    if b.len() % size != 0 || b.len() / size > max {
        return None;
    }
    b.chunks_exact(size).map(read_exact::<T>).collect()
}

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
/// 5.17) or KVM cannot be asked, [`xsave_buffer_bytes`]. Asked once per process: through the
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

    /// Encode: `STATE_MAGIC`, version (u32), section count (u32), then per section a tag (u32),
    /// a byte length (u32) and the raw uAPI struct(s), and a CRC-32 of everything before it.
    /// All integers little-endian (this is an x86-64-only format).
    pub fn to_bytes(&self) -> Vec<u8> {
        let fpu = FpuBytes::from(&self.fpu);
        let mut sections: Vec<(u32, &[u8])> = vec![
            (TAG_REGS, self.regs.as_bytes()),
            (TAG_SREGS, self.sregs.as_bytes()),
            (TAG_FPU, fpu.as_bytes()),
        ];
        let xsave_bytes: Option<Vec<u8>> = self
            .xsave
            .as_ref()
            .map(|w| w.iter().flat_map(|x| x.to_le_bytes()).collect());
        if let Some(x) = &xsave_bytes {
            sections.push((TAG_XSAVE, x));
        }
        if let Some(x) = &self.xcrs {
            sections.push((TAG_XCRS, x.as_bytes()));
        }
        if let Some(x) = &self.debugregs {
            sections.push((TAG_DEBUGREGS, x.as_bytes()));
        }
        if let Some(x) = &self.events {
            sections.push((TAG_EVENTS, x.as_bytes()));
        }
        if let Some(x) = &self.mp_state {
            sections.push((TAG_MP_STATE, x.as_bytes()));
        }
        if let Some(x) = &self.lapic {
            sections.push((TAG_LAPIC, x.as_bytes()));
        }
        sections.push((TAG_MSRS, self.msrs.as_bytes()));
        sections.push((TAG_CPUID, self.cpuid.as_bytes()));

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
                TAG_REGS => regs = Some(read_exact(payload).ok_or(size_err)?),
                TAG_SREGS => sregs = Some(read_exact(payload).ok_or(size_err)?),
                TAG_FPU => {
                    fpu = Some(kvm_fpu::from(
                        read_exact::<FpuBytes>(payload).ok_or(size_err)?,
                    ))
                }
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
                TAG_XCRS => st.xcrs = Some(read_exact(payload).ok_or(size_err)?),
                TAG_DEBUGREGS => st.debugregs = Some(read_exact(payload).ok_or(size_err)?),
                TAG_EVENTS => st.events = Some(read_exact(payload).ok_or(size_err)?),
                TAG_MP_STATE => st.mp_state = Some(read_exact(payload).ok_or(size_err)?),
                TAG_LAPIC => st.lapic = Some(read_exact(payload).ok_or(size_err)?),
                TAG_MSRS => st.msrs = read_vec(payload, KVM_MAX_MSR_ENTRIES).ok_or(size_err)?,
                TAG_CPUID => st.cpuid = read_vec(payload, KVM_MAX_CPUID_ENTRIES).ok_or(size_err)?,
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

/// Offset of the kick signal from `SIGRTMIN()`.
const KICK_SIGNAL_OFFSET: libc::c_int = 0;

/// The signal [`VcpuKicker::kick`] sends: `SIGRTMIN() + 0`. Its handler is installed by the first
/// [`VcpuKicker::register_current_thread`] of the process and replaces any other handler.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN() + KICK_SIGNAL_OFFSET
}

thread_local! {
    /// The `kvm_run` of the vCPU this thread is running in [`run_kickable`] (set around `KVM_RUN`
    /// only), or null. Written by this thread, read by [`kick_handler`] on this thread.
    static RUNNING: AtomicPtr<kvm_run> = const { AtomicPtr::new(std::ptr::null_mut()) };
    /// Kick signals this thread has received.
    static KICKS_RECEIVED: AtomicU64 = const { AtomicU64::new(0) };
    /// The kickers this thread is registered with, one entry per live [`KickTarget`].
    static REGISTERED: RefCell<Vec<Arc<KickState>>> = const { RefCell::new(Vec::new()) };
    /// This thread as a kick target; dropped (marked dead) when the thread ends.
    static THIS_THREAD: ThreadSlot = ThreadSlot::current();
}

/// The kick signal's handler. It runs on the thread that was signalled, interrupting it: if that
/// thread is inside [`run_kickable`], it sets that vCPU's `immediate_exit`, so that a `KVM_RUN`
/// that has not yet entered the guest returns `EINTR` at once (one that has is interrupted by the
/// signal itself). It only touches lock-free atomics in `const`-initialized thread-locals without
/// destructors and one byte of `kvm_run`, which is async-signal-safe.
extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let _ = KICKS_RECEIVED.try_with(|n| n.fetch_add(1, Ordering::Relaxed));
    let run = RUNNING
        .try_with(|r| r.load(Ordering::Relaxed))
        .unwrap_or(std::ptr::null_mut());
    if !run.is_null() {
        // SAFETY: `RUNNING` is non-null only inside `run_kickable`, which holds the `VcpuFd` (and
        // so its `kvm_run` mapping) mutably borrowed and clears it before returning; this handler
        // runs on that same thread. No reference is formed: one byte that KVM reads on entry is
        // stored through the raw pointer, volatile because the kernel reads it.
        unsafe { std::ptr::write_volatile(&raw mut (*run).immediate_exit, 1) };
    }
}

/// Install [`kick_handler`] once per process (`vmm_sys_util::signal::register_signal_handler`,
/// all signals blocked while it runs), with `SA_RESTART` added: other blocking system calls of a
/// kicked thread are restarted instead of failing with `EINTR`. `KVM_RUN` is never restarted (it
/// returns `EINTR` itself), so kicks still work.
fn install_kick_handler() -> Result<(), VcpuError> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    let r = INSTALLED.get_or_init(|| {
        let sig = kick_signal();
        vmm_sys_util::signal::register_signal_handler(sig, kick_handler).map_err(|e| e.errno())?;
        // vmm-sys-util sets `SA_SIGINFO` only.
        // SAFETY: sigaction on valid, zero-initialized structs that live across the calls; the
        // handler stays the one just installed, only its flags change.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut act) != 0 {
                return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
            }
            act.sa_flags |= libc::SA_RESTART;
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

/// A thread that kickers may signal: its `pthread_t` and whether it still runs.
#[derive(Debug)]
struct KickThread {
    handle: libc::pthread_t,
    /// `true` until the thread's thread-locals are destroyed, which happens before it ends and
    /// its `pthread_t` can be reused. Kicks signal while holding this lock.
    alive: Mutex<bool>,
}

/// The value of [`THIS_THREAD`]: marks the thread dead when the thread ends. Because it is a
/// thread-local destructor and not a guard, `mem::forget` of a [`KickTarget`] cannot leave a
/// kicker pointing at a thread that has ended.
struct ThreadSlot(Arc<KickThread>);

impl ThreadSlot {
    fn current() -> ThreadSlot {
        ThreadSlot(Arc::new(KickThread {
            // SAFETY: pthread_self has no preconditions.
            handle: unsafe { libc::pthread_self() },
            alive: Mutex::new(true),
        }))
    }
}

impl Drop for ThreadSlot {
    fn drop(&mut self) {
        *self.0.alive.lock().unwrap_or_else(|e| e.into_inner()) = false;
    }
}

/// A [`KickThread`] known to be alive for as long as this value exists (it holds the lock).
struct LiveThread<'a> {
    handle: libc::pthread_t,
    _alive: std::sync::MutexGuard<'a, bool>,
}

// SAFETY: a `LiveThread` exists only while the thread's `alive` flag is `true` and locked, so the
// thread's thread-local destructors have not finished, it has not ended, and `handle` (its own
// `pthread_self()`) is valid for at least as long as this value.
unsafe impl Killable for LiveThread<'_> {
    fn pthread_handle(&self) -> libc::pthread_t {
        self.handle
    }
}

/// What a [`VcpuKicker`] shares with the threads registered with it.
#[derive(Debug, Default)]
struct KickState {
    pending: AtomicBool,
    target: Mutex<Option<Arc<KickThread>>>,
}

/// Pauses a vCPU that runs in another thread. See the module docs for the protocol.
///
/// The kicker does not touch the vCPU: it records the request and signals the registered thread,
/// whose own signal handler sets `immediate_exit` (only ever written on the vCPU thread).
/// Share it between threads with an `Arc`.
#[derive(Debug, Default)]
pub struct VcpuKicker {
    state: Arc<KickState>,
}

/// The vCPU thread's registration with a [`VcpuKicker`]; unregisters on drop. It stays on the
/// thread that registered (not `Send`). Forgetting it leaks the registration until the thread
/// ends, never longer: a kick then still signals nothing but that live thread.
#[derive(Debug)]
pub struct KickTarget {
    state: Arc<KickState>,
    thread: Arc<KickThread>,
    _not_send: PhantomData<*const ()>,
}

impl Drop for KickTarget {
    fn drop(&mut self) {
        let still_registered = REGISTERED
            .try_with(|r| {
                let mut r = r.borrow_mut();
                if let Some(i) = r.iter().rposition(|s| Arc::ptr_eq(s, &self.state)) {
                    r.swap_remove(i);
                }
                r.iter().any(|s| Arc::ptr_eq(s, &self.state))
            })
            .unwrap_or(false);
        if still_registered {
            return;
        }
        let mut target = self.state.target.lock().unwrap_or_else(|e| e.into_inner());
        if target
            .as_ref()
            .is_some_and(|t| Arc::ptr_eq(t, &self.thread))
        {
            *target = None;
        }
    }
}

/// Whether a kicker the calling thread is registered with has a kick pending.
pub fn this_thread_kicked() -> bool {
    REGISTERED
        .try_with(|r| r.borrow().iter().any(|s| s.pending.load(Ordering::SeqCst)))
        .unwrap_or(false)
}

/// Kick signals the calling thread has received so far.
pub fn kicks_received() -> u64 {
    KICKS_RECEIVED
        .try_with(|n| n.load(Ordering::Relaxed))
        .unwrap_or(0)
}

/// [`RUNNING`] set for the duration of one `KVM_RUN`.
struct Running(*mut kvm_run);

impl Running {
    fn enter(run: *mut kvm_run) -> Running {
        let prev = RUNNING.with(|r| r.swap(run, Ordering::Relaxed));
        // The handler (same thread) must see the pointer before the kick check that follows.
        compiler_fence(Ordering::SeqCst);
        Running(prev)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        compiler_fence(Ordering::SeqCst);
        RUNNING.with(|r| r.store(self.0, Ordering::Relaxed));
    }
}

/// `KVM_RUN` once, such that the [`VcpuKicker`]s the calling thread is registered with can stop
/// it. A kick requested before this call makes it return `EINTR` without entering the guest; one
/// that comes during the call makes `KVM_RUN` return `EINTR` whether the vCPU is in the guest,
/// blocked on a fault, or about to enter. `immediate_exit` is cleared on entry (kicks that
/// arrived meanwhile are still pending and set it again), so a stray signal costs at most one
/// extra `EINTR`. [`complete_pending_io`] is unaffected.
pub fn run_kickable(vcpu: &mut VcpuFd) -> Result<VcpuExit<'_>, kvm_ioctls::Error> {
    vcpu.set_kvm_immediate_exit(0);
    // The raw pointer is taken once, here, and never turned back into a reference; it is
    // published only for the duration of this call.
    let run: *mut kvm_run = std::ptr::from_mut(vcpu.get_kvm_run());
    let _running = Running::enter(run);
    // A kick whose signal came before `Running::enter` is seen here; one that comes after it
    // finds `RUNNING` set (or is still pending when KVM_RUN starts).
    if this_thread_kicked() {
        vcpu.set_kvm_immediate_exit(1);
    }
    vcpu.run()
}

impl VcpuKicker {
    /// A kicker with no thread registered and no kick pending.
    pub fn new() -> Self {
        Self::default()
    }

    /// Register the calling thread as the vCPU thread: install the process-wide handler of
    /// [`kick_signal`] (first time) and unblock it in this thread. Keep the returned guard alive
    /// while the thread runs the vCPU with [`run_kickable`]. A kick made before this call is
    /// still pending and stops the thread's next run.
    pub fn register_current_thread(&self) -> Result<KickTarget, VcpuError> {
        install_kick_handler()?;
        vmm_sys_util::signal::unblock_signal(kick_signal()).map_err(|e| VcpuError::Sys {
            op: "pthread_sigmask",
            source: std::io::Error::other(e.to_string()),
        })?;
        let thread = THIS_THREAD
            .try_with(|t| t.0.clone())
            .map_err(|_| VcpuError::Sys {
                op: "register a thread that is ending",
                source: std::io::Error::from_raw_os_error(libc::ESRCH),
            })?;
        REGISTERED.with(|r| r.borrow_mut().push(self.state.clone()));
        *self.state.target.lock().unwrap_or_else(|e| e.into_inner()) = Some(thread.clone());
        Ok(KickTarget {
            state: self.state.clone(),
            thread,
            _not_send: PhantomData,
        })
    }

    /// Ask the vCPU to stop: the registered thread's current or next [`run_kickable`] returns
    /// `EINTR`. Returns at once; the vCPU thread sees the request through
    /// [`VcpuKicker::take_kick`]. With no thread registered (or one that has ended) nothing is
    /// signalled and the kick waits for the next registration.
    pub fn kick(&self) -> Result<(), VcpuError> {
        self.state.pending.store(true, Ordering::SeqCst);
        self.signal()
    }

    /// Send [`kick_signal`] to the registered thread, if it is alive.
    fn signal(&self) -> Result<(), VcpuError> {
        let target = self.state.target.lock().unwrap_or_else(|e| e.into_inner());
        let Some(t) = target.as_ref() else {
            return Ok(());
        };
        let alive = t.alive.lock().unwrap_or_else(|e| e.into_inner());
        if !*alive {
            return Ok(());
        }
        let live = LiveThread {
            handle: t.handle,
            _alive: alive,
        };
        live.kill(kick_signal()).map_err(|e| VcpuError::Sys {
            op: "pthread_kill",
            source: std::io::Error::from_raw_os_error(e.errno()),
        })
    }

    /// Make the registered thread's current `KVM_RUN` return without asking it to stop: the
    /// signal alone, no kick recorded, so [`Host::vcpu_run`](crate::host::Host) takes it for a
    /// stray signal and runs again. The guest fault service uses it to get a vCPU that is
    /// blocked on a fault out of KVM while another thread waits for KVM (see `kvm::run`).
    pub fn nudge(&self) -> Result<(), VcpuError> {
        self.signal()
    }

    /// On the vCPU thread, after `KVM_RUN` returned `EINTR`: report whether a kick was requested
    /// (and consume it). `false` means a stray signal: run again.
    pub fn take_kick(&self) -> bool {
        self.state.pending.swap(false, Ordering::SeqCst)
    }

    /// Whether a kick is requested and not yet taken.
    pub fn is_pending(&self) -> bool {
        self.state.pending.load(Ordering::SeqCst)
    }
}

/// Offset of `immediate_exit` in `struct kvm_run` (checked against the uAPI in the tests).
#[cfg(test)]
const IMMEDIATE_EXIT_OFFSET: usize = std::mem::offset_of!(kvm_bindings::kvm_run, immediate_exit);

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

    /// A state whose every struct has distinct non-zero bytes (padding fields included).
    fn patterned() -> VcpuState {
        let mut st = sample();
        let fill = |b: &mut [u8], seed: u8| {
            for (i, x) in b.iter_mut().enumerate() {
                *x = seed.wrapping_add((i as u8).wrapping_mul(7)) | 1;
            }
        };
        let mut fpu = [0u8; 416];
        fill(&mut fpu, 3);
        st.fpu
            .fpr
            .iter_mut()
            .flatten()
            .zip(&fpu)
            .for_each(|(d, s)| *d = *s);
        st.fpu.fcw = 0x1234;
        st.fpu.fsw = 0x5678;
        st.fpu.ftwx = 0x9a;
        st.fpu.pad1 = 0xbc;
        st.fpu.last_opcode = 0xdef0;
        st.fpu.last_ip = 0x1122_3344_5566_7788;
        st.fpu.last_dp = 0x99aa_bbcc_ddee_ff00;
        st.fpu
            .xmm
            .iter_mut()
            .flatten()
            .zip(fpu[128..].iter())
            .for_each(|(d, s)| *d = *s);
        st.fpu.mxcsr = 0x1f80;
        st.fpu.pad2 = 0xcafe_f00d;
        st.regs.rbx = 0x0102_0304_0506_0708;
        st.sregs.cr3 = 0x1000;
        st.sregs.interrupt_bitmap = [1, 2, 3, 4];
        st.debugregs = Some(kvm_debugregs {
            db: [1, 2, 3, 4],
            dr6: 0xffff_0ff0,
            dr7: 0x400,
            flags: 5,
            reserved: [6; 9],
        });
        st.mp_state = Some(kvm_mp_state { mp_state: 3 });
        st.msrs[0].reserved = 0x55;
        st.cpuid[0].padding = [7, 8, 9];
        st
    }

    /// The encoding is byte-for-byte what the hand `Pod` casts produced (length and CRC of
    /// this state's encoding taken with that code), and every byte, padding fields included,
    /// comes back.
    #[test]
    fn encoding_is_unchanged_since_pod() {
        let st = patterned();
        let bytes = st.to_bytes();
        assert_eq!((bytes.len(), crc32fast::hash(&bytes)), (5728, 0x2144_df1c));
        let back = VcpuState::from_bytes(&bytes).unwrap();
        assert_eq!(back.fpu, st.fpu);
        assert_eq!((back.fpu.pad1, back.fpu.pad2), (0xbc, 0xcafe_f00d));
        assert_eq!(back.to_bytes(), bytes);
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
            section(&mut b, TAG_REGS, regs.as_bytes());
            section(&mut b, TAG_SREGS, sregs.as_bytes());
            section(&mut b, TAG_FPU, FpuBytes::from(&fpu).as_bytes());
            b
        };
        assert!(VcpuState::from_bytes(&seal(base(3))).is_ok());
        // Missing fpu.
        let mut b = header(2);
        section(&mut b, TAG_REGS, regs.as_bytes());
        section(&mut b, TAG_SREGS, sregs.as_bytes());
        assert!(VcpuState::from_bytes(&seal(b)).is_err());
        // Duplicate.
        let mut b = base(4);
        section(&mut b, TAG_REGS, regs.as_bytes());
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
        section(&mut b, TAG_XCRS, xcrs.as_bytes());
        assert!(VcpuState::from_bytes(&seal(b)).is_err());
    }

    #[test]
    fn kick_signals_only_the_live_registered_thread() {
        // Registered: a kick from the thread itself is delivered before `kick` returns.
        let k = VcpuKicker::new();
        std::thread::scope(|s| {
            s.spawn(|| {
                let before = kicks_received();
                let target = k.register_current_thread().unwrap();
                assert!(!this_thread_kicked());
                k.kick().unwrap();
                assert_eq!(kicks_received(), before + 1);
                assert!(this_thread_kicked());
                assert!(k.take_kick());
                assert!(!this_thread_kicked());
                // Unregistered: the kick is recorded, nothing is signalled.
                drop(target);
                k.kick().unwrap();
                assert_eq!(kicks_received(), before + 1);
                assert!(!this_thread_kicked(), "no longer registered");
                assert!(k.take_kick());
            });
        });

        // A thread that forgot its registration and ended: its kicker keeps the target, but the
        // target is dead, so a kick signals nothing, even when a new thread got the same
        // `pthread_t` (glibc reuses a joined thread's descriptor and stack).
        let k = Arc::new(VcpuKicker::new());
        let old = std::thread::spawn({
            let k = k.clone();
            move || {
                std::mem::forget(k.register_current_thread().unwrap());
                // SAFETY: pthread_self has no preconditions.
                unsafe { libc::pthread_self() }
            }
        })
        .join()
        .unwrap();
        let target_alive = |k: &VcpuKicker| {
            let t = k.state.target.lock().unwrap();
            t.as_ref().map(|t| *t.alive.lock().unwrap())
        };
        assert_eq!(target_alive(&k), Some(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let newer = std::thread::spawn(move || {
            // SAFETY: pthread_self has no preconditions.
            ready_tx.send(unsafe { libc::pthread_self() }).unwrap();
            go_rx.recv().unwrap();
            kicks_received()
        });
        let reused = ready_rx.recv().unwrap() == old;
        k.kick().unwrap();
        assert!(k.is_pending());
        go_tx.send(()).unwrap();
        assert_eq!(
            newer.join().unwrap(),
            0,
            "a thread that never registered got a kick (pthread_t reused: {reused})"
        );
    }

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
