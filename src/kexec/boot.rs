//! Boot of a host image: cold (new RAM) or KHO (RAM and handover inherited from the previous
//! image). The order matters and mirrors Linux: scratch first, then the handover is validated
//! and every preserved frame reserved, and only then does the normal zone hand anything out.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Instant;

use crate::host::Host;
use crate::kho::{self, Kho};
use crate::luo::{FileHandler, Luo};
use crate::mm::{pfn_to_pa, Folio, FrameAllocator, Mm, MmError, Ram, Ranges, PAGE_SIZE};
use crate::time::monotonic_ns;

use super::exec::exec_image;
use super::params::{default_scratch_size, BootParams};
use super::reaper::Reaper;

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

/// Why a host image could not boot.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Creating, adopting or mapping RAM, or setting up the allocator, failed.
    #[error("cannot set up RAM: {0}")]
    Ram(#[from] MmError),
    /// KHO could not be set up (a refused handover is not an error: the image boots clean).
    #[error("cannot set up KHO: {0}")]
    Kho(#[from] kho::KhoError),
    /// The `--ram-fd` number is not the RAM memfd (see [`adopt_ram_fd`]).
    #[error("--ram-fd {fd} refused: {why}")]
    RamFd {
        /// The fd number from the command line.
        fd: i32,
        /// What check it failed.
        why: String,
    },
}

/// Take the RAM memfd the previous image passed by number (`--ram-fd`). The number comes from
/// the command line, so it is checked through a borrow before this process owns it: open, not
/// stdio, a memfd (it has seals and `/proc/self/fd` names it `/memfd:...`), of the size `--ram`
/// says. A refused number is not closed. The adopted fd is close-on-exec again (the previous
/// image cleared that for the exec): children of this image do not inherit RAM.
pub fn adopt_ram_fd(fd: i32, size: u64) -> Result<OwnedFd, BootError> {
    let bad = |why: String| BootError::RamFd { fd, why };
    if fd < 3 {
        return Err(bad("stdio or negative: not the RAM memfd".into()));
    }
    // SAFETY: F_GETFD only reads this process's fd table; no memory is involved.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(bad(format!(
            "not open: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: `fd` is open (F_GETFD succeeded) and nothing closes it while `b` is used: the
    // borrow ends in this function, in early boot.
    let b = unsafe { BorrowedFd::borrow_raw(fd) };
    rustix::fs::fcntl_get_seals(b).map_err(|e| bad(format!("not a memfd (F_GET_SEALS: {e})")))?;
    // Seals alone also admit tmpfs files; the link names a memfd. Without /proc (not mounted)
    // the seals are all there is to go by.
    if let Ok(link) = std::fs::read_link(format!("/proc/self/fd/{fd}")) {
        if !link.to_string_lossy().starts_with("/memfd:") {
            return Err(bad(format!("{} is not a memfd", link.display())));
        }
    }
    let st = rustix::fs::fstat(b).map_err(|e| bad(format!("fstat: {e}")))?;
    if st.st_size as u64 != size {
        return Err(bad(format!(
            "its size {} is not the RAM size {size}",
            st.st_size
        )));
    }
    // SAFETY: checked above: an open memfd of the RAM's size, which the previous image (this
    // same process before the exec) passed to us; nothing else in this process owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC)
        .map_err(|e| BootError::Ram(MmError::Sys(e)))?;
    Ok(owned)
}

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
            kvm: None,
            next_vm_id: 0,
            restored_vms: 0,
            reaper,
            guest_faults: None,
            params,
            info,
            corrupt_handover: None,
        };
        if host.luo.enabled {
            host.luo_early_init();
            host.register_handlers(handlers);
        } else {
            // Without LUO nothing can ask for a rollback later.
            host.kho.commit(&mut host.mm)?;
        }
        host.kho.booted = true;
        host.info.boot_us = t0.elapsed().as_micros() as u64;
        Ok(host)
    }
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

/// Kexec back into `image` with the same handover, which this image did not touch, passing on
/// RAM (`ram`) and the reaper's pidfd.
pub(crate) fn rollback_exec(
    params: &BootParams,
    ram: BorrowedFd<'_>,
    reaper: Option<BorrowedFd<'_>>,
    a: crate::kho::KhoBootArgs,
    image: &std::path::Path,
    why: &str,
) -> std::io::Error {
    tracing::error!(
        "rollback: this image cannot take the handover ({why}); kexec back into {}",
        image.display()
    );
    // What the previous image passed on comes back as it was: its handover, its timings.
    let mut back = params.next(params.ram_size, ram.as_raw_fd(), a);
    back.kexec_start_ns = params.kexec_start_ns;
    back.exec_ns = params.exec_ns;
    back.prev_handover_bytes = params.prev_handover_bytes;
    back.reaper_fd = reaper.map(|fd| fd.as_raw_fd());
    back.rollback = Some(why.to_string());
    exec_image(image, &back)
}
