//! `handover bench kvm-floor`: the least any live update of many VMs must spend on this
//! machine's KVM, with no host image around it.
//!
//! N VMs of M vCPUs are built as the fleet builds them (TSS address, in-kernel irqchip, PIT,
//! the default GSI routing, a 2 MiB low memslot, vCPUs with the host's CPUID, an enabled LAPIC
//! and long-mode registers). Then, run after run:
//! - **save**: every VM's and every vCPU's state read with the handlers' own code
//!   ([`vm_state::save`], [`VcpuState::save`]), spread over the threads;
//! - **restore**: N new VMs set up from those states in the order the host's restore uses
//!   (create, [`vm_state::restore`], the low memslot, [`vm_state::restore_irqchip`], then each
//!   vCPU created and loaded with [`VcpuState::restore`]), spread over the threads.
//!
//! Left out, so the figures are a floor: the exec and boot of a new image, KHO and LUO,
//! encoding and checksums, guest_memfd, vCPU threads and their first `KVM_RUN`, and guests
//! using the CPUs once they are back. The saved VMs are closed between the save and the
//! restore, outside the timings; each run saves the VMs the previous one restored.

use std::sync::Arc;
use std::time::Instant;

use kvm_bindings::{
    kvm_irq_routing_entry, kvm_mp_state, kvm_pit_config, kvm_userspace_memory_region,
    KvmIrqRouting, KVM_IRQ_ROUTING_IRQCHIP, KVM_MP_STATE_RUNNABLE, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::Serialize;

use super::live_snapshot::mem::GuestMap;
use super::Spread;
use crate::abi::vm_state::VmState;
use crate::kvm::vcpu::VcpuState;
use crate::kvm::vm_state::{self, VmConfig};
use crate::vmm::guest;

/// What to measure.
#[derive(Clone, Debug, Serialize)]
pub struct Spec {
    /// VMs.
    pub vms: u32,
    /// vCPUs per VM.
    pub vcpus: u32,
    /// Save-and-restore runs.
    pub runs: u32,
    /// Threads sharing the save and the restore (the fleet's restore workers).
    pub threads: u32,
}

/// One run.
#[derive(Clone, Debug, Serialize)]
pub struct Run {
    /// Wall time of saving every VM and vCPU, ms.
    pub save_ms: f64,
    /// Wall time of the restore, until the last VM had all its vCPUs loaded, ms.
    pub restore_ms: f64,
    /// CPU time of this process over the restore (all threads), ms.
    pub restore_cpu_ms: f64,
    /// When each VM was ready, ms from the restore's start, in VM order.
    pub ready_ms: Vec<f64>,
}

/// The result: every run, and their spreads.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// What was measured.
    pub spec: Spec,
    /// CPUs of the machine.
    pub cpus: usize,
    /// Save wall time, ms, one value per run.
    pub save_ms: Spread,
    /// Restore wall time, ms, one value per run.
    pub restore_ms: Spread,
    /// Restore CPU time, ms, one value per run.
    pub restore_cpu_ms: Spread,
    /// When a VM was ready, ms from the restore's start: every VM of every run a sample.
    pub ready_ms: Spread,
    /// Every run.
    pub runs: Vec<Run>,
}

/// Where the fleet's VMs have their TSS (the RFC VMM's address).
const TSS_ADDR: u64 = crate::vmm::rfc::TSS_ADDR;

/// One VM, its vCPUs and its low memory; the memory outlives the VM (fields drop in order).
struct FloorVm {
    vcpus: Vec<VcpuFd>,
    vm: VmFd,
    _low: GuestMap,
}

/// The saved state of one VM.
struct Saved {
    vm: VmState,
    vcpus: Vec<VcpuState>,
}

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> String {
    move |e| format!("{what}: {e}")
}

/// The GSI routing the fleet's VMMs set (`vmm::libkvm::create_irqchip`): the PIC pins but 2,
/// then the IOAPIC's 24 with GSI 0 on pin 2.
fn default_routes() -> Vec<kvm_irq_routing_entry> {
    let pic = (0..16u32).filter(|&g| g != 2).map(|g| (g, g / 8, g % 8));
    let ioapic = (0..24u32).map(|g| (g, 2, if g == 0 { 2 } else { g }));
    pic.chain(ioapic)
        .map(|(gsi, irqchip, pin)| {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_IRQCHIP,
                ..Default::default()
            };
            e.u.irqchip.irqchip = irqchip;
            e.u.irqchip.pin = pin;
            e
        })
        .collect()
}

fn low_slot(vm: &VmFd, low: &GuestMap) -> Result<(), String> {
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: low.len() as u64,
        userspace_addr: low.addr(),
    };
    // SAFETY: `low` is a live anonymous mapping of that length, and it outlives the VM
    // (`FloorVm` drops the VM first).
    unsafe { vm.set_user_memory_region(region) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))
}

/// A VM as the fleet builds one, and what the host records of it.
fn build(kvm: &Kvm, vcpus: u32) -> Result<(FloorVm, VmConfig), String> {
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    vm.set_tss_address(TSS_ADDR as usize)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
    let routes = default_routes();
    let table = KvmIrqRouting::from_entries(&routes).map_err(|e| format!("routing: {e:?}"))?;
    vm.set_gsi_routing(&table)
        .map_err(kvm_err("KVM_SET_GSI_ROUTING"))?;
    let low = GuestMap::anonymous(guest::LOW_MEM_SIZE)?;
    low_slot(&vm, &low)?;
    let mut vs = Vec::new();
    for k in 0..vcpus {
        let v = vm
            .create_vcpu(u64::from(k))
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        guest::configure_vcpu(kvm, &v).map_err(|e| e.to_string())?;
        let base = v.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        v.set_sregs(&guest::smp_sregs(base))
            .map_err(kvm_err("KVM_SET_SREGS"))?;
        v.set_regs(&guest::smp_regs(k))
            .map_err(kvm_err("KVM_SET_REGS"))?;
        guest::enable_lapic(&v).map_err(|e| e.to_string())?;
        let runnable = kvm_mp_state {
            mp_state: KVM_MP_STATE_RUNNABLE,
        };
        v.set_mp_state(runnable)
            .map_err(kvm_err("KVM_SET_MP_STATE"))?;
        vs.push(v);
    }
    let cfg = VmConfig {
        irqchip: true,
        pit_flags: Some(KVM_PIT_SPEAKER_DUMMY),
        routes: Some(routes),
        tss_addr: Some(TSS_ADDR),
        identity_map_addr: None,
    };
    Ok((
        FloorVm {
            vcpus: vs,
            vm,
            _low: low,
        },
        cfg,
    ))
}

fn save(vm: &FloorVm, cfg: &VmConfig) -> Result<Saved, String> {
    let st = vm_state::save(&vm.vm, 0, cfg).map_err(kvm_err("VM state"))?;
    let vcpus = vm
        .vcpus
        .iter()
        .map(|v| VcpuState::save(v).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    Ok(Saved { vm: st, vcpus })
}

fn restore(kvm: &Kvm, s: &Saved) -> Result<FloorVm, String> {
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    let mut cfg = vm_state::restore(&vm, &s.vm).map_err(kvm_err("VM state"))?;
    let low = GuestMap::anonymous(guest::LOW_MEM_SIZE)?;
    low_slot(&vm, &low)?;
    vm_state::restore_irqchip(&vm, &s.vm, &mut cfg).map_err(kvm_err("irqchip"))?;
    let mut vcpus = Vec::new();
    for (k, st) in s.vcpus.iter().enumerate() {
        let v = vm
            .create_vcpu(k as u64)
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        st.restore(&v).map_err(|e| e.to_string())?;
        vcpus.push(v);
    }
    Ok(FloorVm {
        vcpus,
        vm,
        _low: low,
    })
}

/// Run `job(i)` for every `i` in `0..n` on `threads` threads, each taking the next index; the
/// results in index order, each with when it finished (ms from the start).
fn spread_over<T: Send>(
    threads: u32,
    n: usize,
    job: impl Fn(usize) -> Result<T, String> + Sync,
) -> Result<(Vec<(T, f64)>, f64), String> {
    let t0 = Instant::now();
    let out = crate::par::map_indexed(n, threads as usize, "kvm-floor", |i| {
        job(i).map(|r| (r, t0.elapsed().as_secs_f64() * 1e3))
    });
    let wall = t0.elapsed().as_secs_f64() * 1e3;
    let v = out
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err("a thread of the floor benchmark panicked".into())))
        .collect::<Result<_, _>>()?;
    Ok((v, wall))
}

/// Measure `spec`. Needs `/dev/kvm`.
pub fn run(spec: &Spec) -> Result<Report, String> {
    let kvm = Arc::new(Kvm::new().map_err(|e| format!("/dev/kvm: {e}"))?);
    crate::kvm::vcpu::init_xsave_size(&kvm);
    let n = spec.vms as usize;
    let built = (0..n)
        .map(|_| build(&kvm, spec.vcpus))
        .collect::<Result<Vec<_>, _>>()?;
    let mut runs = Vec::new();
    let mut source = built;
    for _ in 0..spec.runs {
        let (saved, save_ms) = {
            let src = &source;
            spread_over(spec.threads, n, |i| save(&src[i].0, &src[i].1))?
        };
        let saved: Vec<Saved> = saved.into_iter().map(|(s, _)| s).collect();
        // The saved VMs go before the restore's timing starts (in an update, the previous
        // image's VMs are torn down by its reaper, beside the restore).
        drop(source);
        let cpu0 = crate::time::process_cpu_ns();
        let (restored, restore_ms) = spread_over(spec.threads, n, |i| restore(&kvm, &saved[i]))?;
        let restore_cpu_ms = crate::time::process_cpu_ns().saturating_sub(cpu0) as f64 / 1e6;
        runs.push(Run {
            save_ms,
            restore_ms,
            restore_cpu_ms,
            ready_ms: restored.iter().map(|(_, t)| *t).collect(),
        });
        // The next run saves the VMs just restored, as the next update of a fleet would.
        source = restored
            .into_iter()
            .zip(&saved)
            .map(|((v, _), s)| (v, config_of(&s.vm)))
            .collect();
    }
    drop(source);
    let col = |f: fn(&Run) -> f64| Spread::of(&runs.iter().map(f).collect::<Vec<_>>());
    let ready: Vec<f64> = runs.iter().flat_map(|r| r.ready_ms.clone()).collect();
    Ok(Report {
        spec: spec.clone(),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        save_ms: col(|r| r.save_ms),
        restore_ms: col(|r| r.restore_ms),
        restore_cpu_ms: col(|r| r.restore_cpu_ms),
        ready_ms: Spread::of(&ready),
        runs,
    })
}

/// What the host would have recorded of a VM restored from `st`.
fn config_of(st: &VmState) -> VmConfig {
    VmConfig {
        irqchip: st.irqchip.is_some(),
        pit_flags: st.pit.as_ref().map(|(f, _)| *f),
        routes: st.routes.clone(),
        tss_addr: st.tss_addr,
        identity_map_addr: st.identity_map_addr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floor_restores_the_state_it_saved() {
        if !crate::vmm::libkvm::kvm_available("floor_restores_the_state_it_saved") {
            return;
        }
        let kvm = Kvm::new().expect("/dev/kvm");
        crate::kvm::vcpu::init_xsave_size(&kvm);
        let (vm, cfg) = build(&kvm, 2).expect("build");
        let saved = save(&vm, &cfg).expect("save");
        drop(vm);
        let back = restore(&kvm, &saved).expect("restore");
        let again = save(&back, &config_of(&saved.vm)).expect("save again");
        for (k, (a, b)) in saved.vcpus.iter().zip(&again.vcpus).enumerate() {
            assert_eq!(a.regs.rip, b.regs.rip, "vCPU {k} rip");
            assert_eq!(a.regs.rsp, b.regs.rsp, "vCPU {k} rsp");
            assert_eq!(a.sregs.cr3, b.sregs.cr3, "vCPU {k} cr3");
            assert_eq!(a.sregs.efer, b.sregs.efer, "vCPU {k} efer");
            assert_eq!(a.cpuid.len(), b.cpuid.len(), "vCPU {k} CPUID entries");
            let la = a.lapic.as_ref().expect("an in-kernel LAPIC");
            let lb = b.lapic.as_ref().expect("an in-kernel LAPIC");
            assert_eq!(
                la.regs[0xf0..0xf4],
                lb.regs[0xf0..0xf4],
                "vCPU {k} LAPIC SVR"
            );
        }
        assert!(again.vm.irqchip.is_some() && again.vm.pit.is_some());
        assert_eq!(again.vm.routes.as_ref().map(Vec::len), Some(39));

        let r = run(&Spec {
            vms: 3,
            vcpus: 2,
            runs: 2,
            threads: 2,
        })
        .expect("floor run");
        assert_eq!(r.runs.len(), 2);
        assert_eq!(r.ready_ms.n, 6, "every VM of every run is a sample");
        for x in &r.runs {
            assert!(x.restore_ms > 0.0 && x.save_ms > 0.0);
            let last = x.ready_ms.iter().cloned().fold(0.0, f64::max);
            assert!(last <= x.restore_ms, "a VM ready after the restore ended");
        }
    }
}
