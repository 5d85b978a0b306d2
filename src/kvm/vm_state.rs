//! Capture a VM's state from KVM ([`save`]) and set a new VM up with it ([`restore`]); the
//! state's type and encoding are [`crate::abi::vm_state`]'s.
//!
//! KVM can be asked for the clock, the irqchip and the PIT, but not for what was only ever set:
//! the GSI routing table, the TSS and identity-map addresses, whether an irqchip or a PIT was
//! created. The host records those as the VMM sets them ([`VmConfig`], kept in the VM).

use kvm_bindings::{
    kvm_clock_data, kvm_irq_routing_entry, kvm_irqchip, kvm_pit_config, KvmIrqRouting,
    KVM_CLOCK_REALTIME, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;

use crate::abi::kvm::{
    KVM_CREATE_IRQCHIP, KVM_CREATE_PIT2, KVM_SET_GSI_ROUTING, KVM_SET_IDENTITY_MAP_ADDR,
    KVM_SET_TSS_ADDR,
};
use crate::abi::vm_state::VmState;
use zerocopy::FromBytes;

/// What a VMM set on a VM that KVM cannot be asked for, recorded by the host when KVM accepted
/// it.
#[derive(Clone, Debug, Default)]
pub struct VmConfig {
    /// `KVM_CREATE_IRQCHIP` succeeded.
    pub irqchip: bool,
    /// `KVM_CREATE_PIT2` succeeded, with these flags.
    pub pit_flags: Option<u32>,
    /// The last `KVM_SET_GSI_ROUTING` table KVM accepted.
    pub routes: Option<Vec<kvm_irq_routing_entry>>,
    /// `KVM_SET_TSS_ADDR`.
    pub tss_addr: Option<u64>,
    /// `KVM_SET_IDENTITY_MAP_ADDR`.
    pub identity_map_addr: Option<u64>,
}

impl VmConfig {
    /// Record VM ioctl `cmd` with argument `arg`, which KVM has just accepted (one of
    /// `KVM_SET_TSS_ADDR`, `KVM_SET_IDENTITY_MAP_ADDR`, `KVM_CREATE_IRQCHIP`, `KVM_CREATE_PIT2`,
    /// `KVM_SET_GSI_ROUTING`; anything else is ignored).
    pub fn record(&mut self, cmd: u64, arg: &[u8]) {
        let u64_at = |off: usize| {
            arg.get(off..off + 8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_ne_bytes)
        };
        match cmd {
            KVM_SET_TSS_ADDR => self.tss_addr = u64_at(0),
            KVM_SET_IDENTITY_MAP_ADDR => self.identity_map_addr = u64_at(0),
            KVM_CREATE_IRQCHIP => self.irqchip = true,
            KVM_CREATE_PIT2 => {
                self.pit_flags = arg
                    .get(..4)
                    .and_then(|b| b.try_into().ok())
                    .map(u32::from_ne_bytes)
            }
            KVM_SET_GSI_ROUTING => {
                let n = arg
                    .get(..4)
                    .and_then(|b| b.try_into().ok())
                    .map_or(0, u32::from_ne_bytes) as usize;
                let size = std::mem::size_of::<kvm_irq_routing_entry>();
                self.routes = arg
                    .get(8..)
                    .and_then(|e| e.get(..n.checked_mul(size)?))
                    .and_then(|e| {
                        e.chunks_exact(size)
                            .map(|c| kvm_irq_routing_entry::read_from_bytes(c).ok())
                            .collect()
                    });
            }
            _ => {}
        }
    }
}

const CHIPS: [u32; 3] = [
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQCHIP_IOAPIC,
];

/// The state of `fd` (a VM of `vm_type` set up as `cfg` says), its vCPUs paused: clock,
/// irqchip and PIT from KVM, the rest from `cfg`.
pub fn save(fd: &VmFd, vm_type: u64, cfg: &VmConfig) -> Result<VmState, kvm_ioctls::Error> {
    let irqchip = if cfg.irqchip {
        let mut chips = [kvm_irqchip::default(); 3];
        for (c, id) in chips.iter_mut().zip(CHIPS) {
            c.chip_id = id;
            fd.get_irqchip(c)?;
        }
        Some(chips)
    } else {
        None
    };
    let pit = match cfg.pit_flags {
        Some(flags) => Some((flags, fd.get_pit2()?)),
        None => None,
    };
    Ok(VmState {
        vm_type,
        clock: Some(fd.get_clock()?),
        irqchip,
        pit,
        routes: cfg.routes.clone(),
        tss_addr: cfg.tss_addr,
        identity_map_addr: cfg.identity_map_addr,
    })
}

/// Set up `fd`, a new VM without vCPUs, as `st` says, all but the interrupt controllers
/// ([`restore_irqchip`]), and return what to record of it: the real-mode addresses and the
/// clock. The clock goes forward by the wall-clock time since the freeze (`KVM_CLOCK_REALTIME`
/// where the saved clock carries a realtime stamp), so guest time continues and never goes
/// back.
pub fn restore(fd: &VmFd, st: &VmState) -> Result<VmConfig, kvm_ioctls::Error> {
    let mut cfg = VmConfig::default();
    if let Some(a) = st.tss_addr {
        fd.set_tss_address(a as usize)?;
        cfg.tss_addr = Some(a);
    }
    if let Some(a) = st.identity_map_addr {
        fd.set_identity_map_address(a)?;
        cfg.identity_map_addr = Some(a);
    }
    if let Some(c) = &st.clock {
        fd.set_clock(&continued(c))?;
    }
    Ok(cfg)
}

/// Whether `st` has interrupt controllers for [`restore_irqchip`] to set up.
pub fn has_irqchip(st: &VmState) -> bool {
    st.irqchip.is_some() || st.pit.is_some() || st.routes.is_some()
}

/// Create and load the irqchip, the PIT and the routing of `st` on `fd` (no vCPU yet), and
/// record them in `cfg`. The first memslot change after `KVM_CREATE_IRQCHIP` costs 5–7 ms on
/// this KVM, once per VM (docs/kvm-probe.md); the host calls this as late as it can: before
/// the VM's first vCPU or anything else that would see the irqchip.
pub fn restore_irqchip(
    fd: &VmFd,
    st: &VmState,
    cfg: &mut VmConfig,
) -> Result<(), kvm_ioctls::Error> {
    if let Some(chips) = &st.irqchip {
        fd.create_irq_chip()?;
        cfg.irqchip = true;
        for c in chips {
            fd.set_irqchip(c)?;
        }
    }
    if let Some((flags, state)) = &st.pit {
        let config = kvm_pit_config {
            flags: *flags,
            ..Default::default()
        };
        fd.create_pit2(config)?;
        cfg.pit_flags = Some(*flags);
        fd.set_pit2(state)?;
    }
    if let Some(routes) = &st.routes {
        let table = KvmIrqRouting::from_entries(routes)
            .map_err(|_| kvm_ioctls::Error::new(libc::EINVAL))?;
        fd.set_gsi_routing(&table)?;
        cfg.routes = Some(routes.clone());
    }
    Ok(())
}

/// The clock to set: the saved one, advanced by KVM itself by the realtime elapsed since
/// `realtime` if the saved clock has a realtime stamp; the other flags are KVM's outputs.
fn continued(c: &kvm_clock_data) -> kvm_clock_data {
    kvm_clock_data {
        clock: c.clock,
        flags: c.flags & KVM_CLOCK_REALTIME,
        realtime: c.realtime,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_realtime_flag_is_passed_back() {
        let c = kvm_clock_data {
            clock: 5,
            flags: KVM_CLOCK_REALTIME | kvm_bindings::KVM_CLOCK_TSC_STABLE | 8,
            realtime: 9,
            host_tsc: 11,
            ..Default::default()
        };
        let n = continued(&c);
        assert_eq!(
            (n.clock, n.flags, n.realtime, n.host_tsc),
            (5, KVM_CLOCK_REALTIME, 9, 0)
        );
    }
}
