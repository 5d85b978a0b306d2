//! Boot of a host image (the glue of `kexec::boot`): cold (new RAM) or KHO (RAM and handover
//! inherited from the previous image). The order matters and mirrors Linux: scratch first, then
//! the handover is validated and every preserved frame reserved, and only then does the normal
//! zone hand anything out.

use std::sync::Arc;
use std::time::Instant;

use crate::host::Host;
use crate::kexec::boot::{adopt_ram_fd, rollback_exec, BootError};
use crate::kexec::params::default_scratch_size;
use crate::kexec::reaper::Reaper;
use crate::kexec::{BootInfo, BootParams};
use crate::kho::{self, Kho};
use crate::luo::{FileHandler, Luo};
use crate::mm::hugetlb::{size_name, HUGE_ORDERS};
use crate::mm::{pfn_to_pa, Folio, FrameAllocator, HugePageRequest, HugePool, Mm, Ram, Ranges};
use crate::mm::{MmError, PAGE_SIZE};
use crate::time::monotonic_ns;

impl Host {
    /// Boot an image with `params` and these LUO file `handlers` (the image's registry,
    /// assembled by the composition root: `crate::registry`), registered in this order before
    /// user space can open `/dev/liveupdate`. A handover with a file no handler supports is
    /// refused.
    pub fn boot_with(
        mut params: BootParams,
        handlers: &[Arc<dyn FileHandler<Host>>],
    ) -> Result<Host, BootError> {
        let t0 = Instant::now();
        let boot_start_ns = monotonic_ns();
        let ram = match params.ram_fd {
            Some(fd) => Ram::adopt(adopt_ram_fd(fd, params.ram_size)?, params.ram_size)?,
            None => Ram::create(params.ram_size)?,
        };
        // The previous image's reaper: only a pidfd of our own child is taken (and ever
        // signalled); anything else is left alone.
        let reaper = params
            .reaper_fd
            .take()
            .and_then(|fd| match Reaper::adopt(fd) {
                Ok(r) => {
                    tracing::info!("previous image's reaper adopted (pidfd {fd})");
                    Some(r)
                }
                Err(why) => {
                    tracing::warn!("ignoring --reaper-fd {fd}: {why}");
                    None
                }
            });
        let nr_frames = ram.nr_frames();
        let cold_scratch = 0..default_scratch_size(ram.size()) / PAGE_SIZE;
        let mut info = BootInfo {
            boot_start_ns,
            reaper: reaper.is_some(),
            ..Default::default()
        };

        // Scratch: the previous image's range on a KHO boot, else a fresh one.
        let mut frames = None;
        if let Some(a) = params.kho {
            match FrameAllocator::new(nr_frames, a.scratch_pfns()) {
                Ok(f) => frames = Some(f),
                Err(e) => info.refused = Some(e.to_string()),
            }
        }
        let frames = match frames {
            Some(f) => f,
            None => FrameAllocator::new(nr_frames, cold_scratch)?,
        };
        let s = frames.scratch();
        ram.discard(pfn_to_pa(s.start), pfn_to_pa(s.end - s.start))?;

        // Validate the whole handover before reserving anything: KHO's part, then LUO's
        // (sessions, files, and a handler for every file).
        let mut incoming = None;
        let mut reserved = Ranges::new();
        let mut rollback_to = params.prev_image.clone();
        if let (Some(a), None) = (params.kho, &info.refused) {
            match kho::boot::discover(&ram, a) {
                Ok((inc, r)) => {
                    let count = inc.metadata.as_ref().map_or(0, |m| m.kexec_count);
                    crate::fault::init(count, params.rollback.is_some());
                    if let Some(p) = inc.metadata.as_ref().and_then(|m| m.previous_image.clone()) {
                        rollback_to = Some(p.into());
                    }
                    let check = if crate::fault::hit("boot.refuse") {
                        Err(
                            "injected fault at boot.refuse: this image does not take the handover"
                                .to_string(),
                        )
                    } else if params.liveupdate {
                        let supported: Vec<&str> =
                            handlers.iter().map(|h| h.compatible()).collect();
                        crate::luo::serialize::validate(&ram, &inc, &supported)
                            .map_err(|e| e.to_string())
                    } else {
                        Ok(())
                    };
                    match check {
                        Ok(()) => {
                            incoming = Some(inc);
                            reserved = r;
                        }
                        Err(why) => info.refused = Some(why),
                    }
                }
                Err(e) => info.refused = Some(e.to_string()),
            }
        } else {
            crate::fault::init(0, params.rollback.is_some());
        }
        if let Some(why) = &params.rollback {
            tracing::warn!(
                "rollback: booted again after the next image refused the handover: {why}"
            );
            info.rollback = Some(why.clone());
        }
        if let (Some(why), Some(a)) = (info.refused.clone(), params.kho) {
            // Nothing is touched yet: hand the same handover back to the image that made it.
            if let (None, Some(image)) = (&params.rollback, &rollback_to) {
                let reaper = reaper.as_ref().map(|r| r.fd());
                let err = rollback_exec(&params, ram.fd(), reaper, a, image, &why);
                tracing::error!("rollback to {} failed: {err}", image.display());
            }
            tracing::error!("KHO: refusing the handover: {why}; booting clean with all RAM free");
        }

        let mut mm = Mm::new(ram, frames);
        mm.online_normal(&reserved)?;
        // The huge-page pool, as soon as the normal zone is online (before anything else is
        // allocated there); after a kexec the frames the previous image preserved are not
        // free and cannot be taken.
        let hugepool = reserve_hugepages(&mut mm, &params.hugepages, params.kho.is_some())?;
        let nodes: Vec<u64> = incoming
            .as_ref()
            .map(|i| i.tracker.node_pages().to_vec())
            .unwrap_or_default();

        let args = incoming.as_ref().map(|i| i.args);
        if let Some(inc) = &incoming {
            info.kho_boot = true;
            info.incoming_pages = inc.tracker.outstanding().1;
            if let Some(m) = &inc.metadata {
                info.exec_from = Some(m.previous_release.clone());
                info.kexec_count = m.kexec_count;
                tracing::info!(
                    "exec from: {} (count {})",
                    m.previous_release,
                    m.kexec_count
                );
            }
        }
        let meta = incoming.as_ref().and_then(|i| {
            i.tree
                .subtrees
                .get(crate::abi::kho::KEXEC_METADATA_NAME)
                .copied()
        });
        let integrity = incoming.as_ref().and_then(|i| {
            i.tree
                .subtrees
                .get(crate::abi::kho::INTEGRITY_NAME)
                .copied()
        });
        let mut kho = Kho::new(&mut mm, s, incoming)?;
        // The tracker, the tree and the metadata blob have been read: give their memory back
        // (once the update commits: until then a rollback needs them).
        let mut node_folios: Vec<Folio> = nodes
            .iter()
            .map(|&pa| Folio {
                pfn: pa / PAGE_SIZE,
                order: 0,
            })
            .collect();
        kho.release_many(&mut mm, &mut node_folios)?;
        if let Some(a) = args {
            kho.restore_free(&mut mm, a.fdt_pa)?;
        }
        if let Some(m) = meta {
            kho.restore_free(&mut mm, m.pa)?;
        }
        if let Some(st) = integrity {
            // Checked in discover; its table and header are KHO's own and go back now.
            let mut b = [0u8; std::mem::size_of::<crate::abi::kho::IntegrityHeader>()];
            crate::mm::PhysRead::read_phys(&mm.ram, st.pa, &mut b)?;
            if let Ok(h) =
                <crate::abi::kho::IntegrityHeader as zerocopy::FromBytes>::read_from_bytes(&b)
            {
                kho.restore_array(&mut mm, &h.entries)?;
            }
            kho.restore_free(&mut mm, st.pa)?;
        }
        let luo = Luo::new(params.liveupdate);
        let mut host = Host {
            mm,
            kho,
            luo,
            files: Default::default(),
            procs: Default::default(),
            maps: Default::default(),
            next_pid: 0,
            next_map: 0,
            luo_incoming: None,
            reaping: None,
            kvm: None,
            vm_pool: Default::default(),
            vcpu_snapshots: Default::default(),
            next_vm_id: 0,
            restored_vms: 0,
            reaper,
            guest_faults: None,
            hugepool,
            params,
            info,
            #[cfg(feature = "test-hooks")]
            corrupt_handover: None,
        };
        if host.luo.enabled {
            host.luo_early_init();
            host.register_handlers(handlers);
        } else {
            // Without LUO nothing can ask for a rollback later.
            host.kho.commit(&mut host.mm)?;
            host.refill_hugepages();
        }
        host.kho.booted = true;
        host.info.boot_us = t0.elapsed().as_micros() as u64;
        // The kexec that started this image is over: user space runs at ordinary priority.
        crate::kexec::priority::relax();
        Ok(host)
    }
}

/// The huge-page pool of `req`, 1 GiB folios first (see `mm::hugetlb`). If RAM cannot hold
/// it, a cold boot fails; a boot after a kexec (`after_kexec`, also a rollback or a refused
/// handover) keeps what fits and logs a warning: a kexec never fails for the pool.
fn reserve_hugepages(
    mm: &mut Mm,
    req: &HugePageRequest,
    after_kexec: bool,
) -> Result<HugePool, BootError> {
    let mut pool = HugePool::new();
    for order in HUGE_ORDERS {
        let n = req.count(order);
        if n == 0 {
            continue;
        }
        // After a kexec the pool is filled later (`Host::refill_hugepages`, at commit): taking
        // thousands of folios here would be inside the blackout, and the previous image's
        // folios still in use are not free yet.
        if after_kexec {
            pool.defer(order, n).map_err(BootError::HugePages)?;
            continue;
        }
        match pool.reserve(mm, order, n) {
            Ok(()) => tracing::info!("hugepages: {n} × {} reserved", size_name(order)),
            Err(e @ MmError::HugePagesShort { .. }) if after_kexec => tracing::warn!(
                "hugepages: {e}; booting with the smaller pool (folios adopted from the \
                 previous image count towards it)"
            ),
            Err(e) => return Err(BootError::HugePages(e)),
        }
    }
    Ok(pool)
}

impl Host {
    /// File handlers, registered before user space can open `/dev/liveupdate` (upstream:
    /// late_initcall and module init).
    fn register_handlers(&mut self, handlers: &[Arc<dyn FileHandler<Host>>]) {
        for h in handlers {
            if let Err(e) = self.luo.register(h.clone()) {
                tracing::warn!("liveupdate: cannot register a file handler: {e}");
            }
        }
    }
}
