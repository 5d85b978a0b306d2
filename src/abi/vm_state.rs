//! The saved state of one x86 VM as it crosses a kexec (`kvm_vm_luo_v2`): [`VmState`] (plain
//! uAPI structs and the set-only settings the host recorded) and its encoding in the container
//! of [`super::sections`] ([`VmState::to_bytes`], [`VmState::from_bytes`]).
//!
//! Capturing it from KVM and loading it into a new VM is `kvm::vm_state`'s.

use kvm_bindings::{kvm_clock_data, kvm_irq_routing_entry, kvm_irqchip, kvm_pit_state2};
use zerocopy::{FromBytes, IntoBytes};

use super::sections::{self, SectionError};

/// Everything of a VM (besides memory, memslots and vCPUs) that a guest can observe: the
/// in-kernel interrupt controllers and timer, the interrupt routing, the clock, and the
/// addresses KVM was told for its real-mode helpers.
#[derive(Clone, Default)]
pub struct VmState {
    /// The machine type given to `KVM_CREATE_VM`.
    pub vm_type: u64,
    /// `KVM_GET_CLOCK` at the freeze (its `realtime` lets the restore advance the clock by the
    /// time that passed, `KVM_CLOCK_REALTIME`).
    pub clock: Option<kvm_clock_data>,
    /// With an in-kernel irqchip: PIC master, PIC slave, IOAPIC (`KVM_GET_IRQCHIP` 0, 1, 2).
    pub irqchip: Option<[kvm_irqchip; 3]>,
    /// With an in-kernel PIT: the flags it was created with (`KVM_CREATE_PIT2`) and its state
    /// (`KVM_GET_PIT2`).
    pub pit: Option<(u32, kvm_pit_state2)>,
    /// The GSI routing table last set (`KVM_SET_GSI_ROUTING`; KVM cannot be asked for it).
    pub routes: Option<Vec<kvm_irq_routing_entry>>,
    /// `KVM_SET_TSS_ADDR`, if it was set.
    pub tss_addr: Option<u64>,
    /// `KVM_SET_IDENTITY_MAP_ADDR`, if it was set.
    pub identity_map_addr: Option<u64>,
}

impl std::fmt::Debug for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmState")
            .field("vm_type", &self.vm_type)
            .field("clock", &self.clock.map(|c| c.clock))
            .field("irqchip", &self.irqchip.is_some())
            .field("pit", &self.pit.map(|p| p.0))
            .field("routes", &self.routes.as_ref().map(Vec::len))
            .field("tss_addr", &self.tss_addr)
            .field("identity_map_addr", &self.identity_map_addr)
            .finish()
    }
}

/// Magic at the start of an encoded [`VmState`].
pub const VM_STATE_MAGIC: [u8; 8] = *b"HOVVMST\0";
/// Format version of the encoding.
pub const VM_STATE_VERSION: u32 = 1;
/// Most routing entries a VM may have (KVM's `KVM_MAX_IRQ_ROUTES`).
pub const MAX_ROUTES: usize = 4096;

const TAG_TYPE: u32 = 1;
const TAG_CLOCK: u32 = 2;
const TAG_IRQCHIP: u32 = 3;
const TAG_PIT: u32 = 4;
const TAG_ROUTES: u32 = 5;
const TAG_TSS: u32 = 6;
const TAG_IDENTITY: u32 = 7;
const TAG_MAX: u32 = 7;

/// An encoded [`VmState`] that cannot be decoded.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("bad VM state encoding: {0}")]
pub struct VmStateError(pub SectionError);

impl VmState {
    /// Encode, one section per piece of state present.
    pub fn to_bytes(&self) -> Vec<u8> {
        let ty = self.vm_type.to_le_bytes();
        let mut s: Vec<(u32, Vec<u8>)> = vec![(TAG_TYPE, ty.to_vec())];
        if let Some(c) = &self.clock {
            s.push((TAG_CLOCK, c.as_bytes().to_vec()));
        }
        if let Some(chips) = &self.irqchip {
            s.push((TAG_IRQCHIP, chips.as_bytes().to_vec()));
        }
        if let Some((flags, st)) = &self.pit {
            let mut b = flags.to_le_bytes().to_vec();
            b.extend_from_slice(st.as_bytes());
            s.push((TAG_PIT, b));
        }
        if let Some(r) = &self.routes {
            s.push((TAG_ROUTES, r.as_bytes().to_vec()));
        }
        if let Some(a) = self.tss_addr {
            s.push((TAG_TSS, a.to_le_bytes().to_vec()));
        }
        if let Some(a) = self.identity_map_addr {
            s.push((TAG_IDENTITY, a.to_le_bytes().to_vec()));
        }
        let refs: Vec<(u32, &[u8])> = s.iter().map(|(t, b)| (*t, b.as_slice())).collect();
        sections::encode(&VM_STATE_MAGIC, VM_STATE_VERSION, &refs)
    }

    /// Decode what [`VmState::to_bytes`] produced; any damage is an error, never a panic.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, VmStateError> {
        let bad = |w| VmStateError(SectionError::Decode(w));
        let secs = sections::decode(bytes, &VM_STATE_MAGIC, VM_STATE_VERSION, TAG_MAX)
            .map_err(VmStateError)?;
        let mut st = VmState::default();
        let mut has_type = false;
        for (tag, p) in secs {
            let size = bad("section has the wrong size");
            let u64_of = |p: &[u8]| u64::read_from_bytes(p).map_err(|_| size);
            match tag {
                TAG_TYPE => {
                    st.vm_type = u64_of(p)?;
                    has_type = true;
                }
                TAG_CLOCK => st.clock = Some(kvm_clock_data::read_from_bytes(p).map_err(|_| size)?),
                TAG_IRQCHIP => {
                    st.irqchip = Some(<[kvm_irqchip; 3]>::read_from_bytes(p).map_err(|_| size)?)
                }
                TAG_PIT => {
                    let (f, rest) = p.split_at_checked(4).ok_or(size)?;
                    let flags = u32::read_from_bytes(f).map_err(|_| size)?;
                    st.pit = Some((
                        flags,
                        kvm_pit_state2::read_from_bytes(rest).map_err(|_| size)?,
                    ));
                }
                TAG_ROUTES => {
                    let n = std::mem::size_of::<kvm_irq_routing_entry>();
                    if p.len() % n != 0 || p.len() / n > MAX_ROUTES {
                        return Err(size);
                    }
                    st.routes = Some(
                        p.chunks_exact(n)
                            .map(kvm_irq_routing_entry::read_from_bytes)
                            .collect::<Result<_, _>>()
                            .map_err(|_| size)?,
                    );
                }
                TAG_TSS => st.tss_addr = Some(u64_of(p)?),
                TAG_IDENTITY => st.identity_map_addr = Some(u64_of(p)?),
                _ => return Err(bad("unknown section tag")),
            }
        }
        if !has_type {
            return Err(bad("missing VM type"));
        }
        if st
            .irqchip
            .is_some_and(|c| (0..3).any(|i| c[i].chip_id != i as u32))
        {
            return Err(bad("irqchip ids out of order"));
        }
        Ok(st)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VmState {
        let mut chips = [kvm_irqchip::default(); 3];
        for (i, c) in chips.iter_mut().enumerate() {
            c.chip_id = i as u32;
            let mut dummy = [0i8; 512];
            dummy[7] = 0x40 + i as i8;
            c.chip = kvm_bindings::kvm_irqchip__bindgen_ty_1 { dummy };
        }
        let mut pit = kvm_pit_state2::default();
        pit.channels[0].count = 0x1234;
        let r = kvm_irq_routing_entry {
            gsi: 9,
            type_: 1,
            u: kvm_bindings::kvm_irq_routing_entry__bindgen_ty_1 {
                irqchip: kvm_bindings::kvm_irq_routing_irqchip { irqchip: 2, pin: 9 },
            },
            ..Default::default()
        };
        VmState {
            vm_type: 0,
            clock: Some(kvm_clock_data {
                clock: 123_456_789,
                flags: 2,
                realtime: 77,
                ..Default::default()
            }),
            irqchip: Some(chips),
            pit: Some((1, pit)),
            routes: Some(vec![r; 3]),
            tss_addr: Some(0xfffb_d000),
            identity_map_addr: Some(0xfffb_c000),
        }
    }

    #[test]
    fn round_trip() {
        let s = sample();
        let b = s.to_bytes();
        let d = VmState::from_bytes(&b).unwrap();
        assert_eq!(d.to_bytes(), b);
        assert_eq!(d.clock.unwrap().clock, 123_456_789);
        assert_eq!(d.irqchip.unwrap()[2].chip_id, 2);
        assert_eq!(d.pit.unwrap().1.channels[0].count, 0x1234);
        assert_eq!(d.routes.as_ref().unwrap().len(), 3);
        assert_eq!(d.tss_addr, Some(0xfffb_d000));
        let bare = VmState::default();
        let d = VmState::from_bytes(&bare.to_bytes()).unwrap();
        assert!(d.irqchip.is_none() && d.pit.is_none() && d.routes.is_none());
    }

    #[test]
    fn damage_is_an_error() {
        let b = sample().to_bytes();
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 0x01;
            assert!(VmState::from_bytes(&c).is_err(), "flip at {i}");
        }
        assert!(VmState::from_bytes(&b[..b.len() - 1]).is_err());
    }
}
