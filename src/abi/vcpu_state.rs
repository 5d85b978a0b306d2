//! The saved state of one x86 vCPU as it crosses a kexec: [`VcpuState`] (plain uAPI structs) and
//! its versioned encoding, `STATE_MAGIC`, a version, tagged sections and a CRC-32
//! ([`VcpuState::to_bytes`], [`VcpuState::from_bytes`]).
//!
//! Capturing this state from KVM and loading it into a new vCPU is `kvm::vcpu`'s
//! (`VcpuState::save`, `VcpuState::restore`); this module only turns it into bytes and back.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, KVM_MAX_CPUID_ENTRIES,
    KVM_MAX_MSR_ENTRIES,
};
use zerocopy::{FromBytes, Immutable, IntoBytes};

use super::sections::SectionError;

/// Everything needed to continue a paused vCPU in a new VM (on the same guest memory).
#[derive(Clone)]
pub struct VcpuState {
    /// General-purpose registers, RIP and RFLAGS (`KVM_GET_REGS`).
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER, APIC base (`KVM_GET_SREGS`).
    pub sregs: kvm_sregs,
    /// x87 and SSE state (`KVM_GET_FPU`).
    pub fpu: kvm_fpu,
    /// `KVM_GET_XSAVE(2)` buffer in 32-bit words (at least the 4 KiB legacy `kvm_xsave`).
    pub xsave: Option<Vec<u32>>,
    /// Extended control registers (`KVM_GET_XCRS`).
    pub xcrs: Option<kvm_xcrs>,
    /// Debug registers (`KVM_GET_DEBUGREGS`).
    pub debugregs: Option<kvm_debugregs>,
    /// Pending exceptions, interrupts and NMIs (`KVM_GET_VCPU_EVENTS`).
    pub events: Option<kvm_vcpu_events>,
    /// Runnable, halted, waiting for SIPI... (`KVM_GET_MP_STATE`).
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

/// An encoded [`VcpuState`] that cannot be decoded.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    /// An encoding that is not a valid [`VcpuState`].
    #[error("bad vCPU state encoding: {0}")]
    Decode(&'static str),
    /// An encoding of another format version.
    #[error("unsupported vCPU state version {0} (this build reads {STATE_VERSION})")]
    Version(u32),
}

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

impl VcpuState {
    /// Encode: `STATE_MAGIC`, version and one section per uAPI struct (or array of them) in
    /// the container of [`super::sections`] (tags, lengths, CRC-32).
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

        super::sections::encode(&STATE_MAGIC, STATE_VERSION, &sections)
    }

    /// Decode what [`VcpuState::to_bytes`] produced. Every length is checked; any damage is an
    /// error, never a panic.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, VcpuStateError> {
        let bad = VcpuStateError::Decode;
        let sections = super::sections::decode(bytes, &STATE_MAGIC, STATE_VERSION, TAG_MAX)
            .map_err(|e| match e {
                SectionError::Decode(why) => bad(why),
                SectionError::Version(v) => VcpuStateError::Version(v),
            })?;
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
        for (tag, payload) in sections {
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
            Err(VcpuStateError::Version(2))
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
}
