//! The RFC scenario as a VMM would run it, with the VM kept running across the update: a real
//! guest on /dev/kvm writes `byte[i] = (i ^ 0x5A)` over 5 MiB of a 16 MiB guest_memfd bound at
//! 4 GiB; the VMM preserves the VM, the guest_memfd and its low memory while the guest runs,
//! pauses the vCPU, saves its state in a memfd, and the host kexecs; the new image's VMM
//! retrieves everything (in either order), builds a new VM and vCPU, restores the state and
//! the same guest program carries on and checks all 5 MiB.
//!
//! The guest measures the blackout itself: it keeps reading a clock port (the VMM answers with
//! CLOCK_MONOTONIC, which survives the kexec) and reports the largest gap between two reads.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::abi::kvm::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};
use crate::host::Host;
use crate::init::{parse_args, InitOutcome};
use crate::kexec::params::parse_size;
use crate::kvm::vcpu::{VcpuKicker, VcpuState};
use crate::kvm::{IoAction, IoEvent, RunExit};
use crate::time::monotonic_ns;
use crate::uapi::{Errno, Pid, UserMapping};

use super::guest::{self, GuestMode, GuestParams};
use super::libkvm::{self, Region};
use super::libluo::*;
use super::slots::GuestMemSlots;

pub const PROGRAM: &str = "gmem-rfc";

pub const SESSION: &str = "gmem_vm_preservation_session";
pub const STATE: &str = "gmem_preservation_state";
pub const VM_TOKEN: u64 = 0x1001;
pub const GMEM_TOKEN: u64 = 0x1002;
pub const LOW_TOKEN: u64 = 0x1003;
pub const VCPU_TOKEN: u64 = 0x1004;
pub const STATE_TOKEN: u64 = 0x999;
/// Size of the memfds holding the vCPU state (length-prefixed) and the VMM's state (JSON).
const STATE_BYTES: u64 = 64 << 10;
pub const GMEM_GPA: u64 = 4 << 30;

/// Scenario options (`--init-arg key=value`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Options {
    pub guest_mem: u64,
    pub data: u64,
    /// Retrieve the guest_memfd before the VM.
    pub gmem_first: bool,
    /// Do not preserve the VM file: the kexec must be refused and the guest keep running.
    pub no_vm: bool,
    /// In stage 2, retrieve only the guest_memfd and FINISH before retrieving the VM file.
    pub finish_early: bool,
    /// fallocate the data range before the guest runs (no demand faults).
    pub prefault: bool,
    /// fallocate the whole guest_memfd: a fully populated guest (the benchmark).
    pub populate: bool,
    /// Instead of a live update, the baseline without one: snapshot guest memory and vCPU
    /// state to a file in this directory, tear the VM down, build a new one and load it back.
    pub snapshot_dir: Option<String>,
    /// Bind at most this much of the guest_memfd as the guest's memslot (huge guest_memfds
    /// are then preserved and handed over whole while the guest sees the first part).
    pub slot_max: u64,
    /// The guest_memfd is bound as memslots of this size (see `vmm::slots`).
    pub slot_chunk: u64,
    /// After the update, bind only the first chunk before resuming (the rest lazily).
    pub lazy_slots: bool,
    /// ... and the rest from a background thread (else only on the guest's first access).
    pub background_slots: bool,
    /// Live updates in a row (the soak test): after each one the same guest writes its data
    /// again and the host updates again.
    pub cycles: u32,
}

impl Options {
    pub fn slot_size(&self) -> u64 {
        self.guest_mem.min(self.slot_max)
    }
}

impl Options {
    pub fn parse(args: &[String]) -> Result<Options, String> {
        let a = parse_args(args);
        let size = |k: &str, d: u64| a.get(k).map_or(Ok(d), |s| parse_size(s));
        let flag = |k: &str| {
            a.get(k)
                .is_some_and(|v| v.is_empty() || v == "1" || v == "true")
        };
        let o = Options {
            guest_mem: size("guest-mem", 16 << 20)?,
            data: size("data", 5 << 20)?,
            gmem_first: a.get("order").is_some_and(|v| v == "gmem-first"),
            no_vm: flag("no-vm"),
            finish_early: flag("finish-early"),
            prefault: flag("prefault"),
            populate: flag("populate"),
            snapshot_dir: a.get("snapshot-dir").cloned(),
            slot_max: size("slot-max", u64::MAX)?,
            slot_chunk: size("slot-chunk", 1 << 30)?,
            lazy_slots: a.get("lazy-slots").is_none_or(|v| v != "0"),
            background_slots: a.get("background-slots").is_none_or(|v| v != "0"),
            cycles: a.get("cycles").and_then(|v| v.parse().ok()).unwrap_or(1),
        };
        Ok(o)
    }

    /// The limits every option set must keep, checked when parsed from the command line and
    /// again when read back from the state memfd after the update (handed-over bytes are input
    /// like any other): the sizes bound what the VMM allocates (`data` bytes to verify, one
    /// flag per memslot chunk) and must fit the host's RAM and KVM's memslots.
    pub fn validate(&self, ram_size: u64) -> Result<(), String> {
        if self.guest_mem == 0 || self.guest_mem % 4096 != 0 || self.guest_mem > MAX_GUEST_MEM {
            return Err(format!(
                "guest-mem ({}) must be page aligned and 4K..={MAX_GUEST_MEM}",
                self.guest_mem
            ));
        }
        if self.data == 0 || self.data > self.slot_size() || self.data > ram_size {
            return Err(format!(
                "data ({}) must be 1..=guest-mem ({}), within slot-max ({}) and RAM ({ram_size})",
                self.data, self.guest_mem, self.slot_max
            ));
        }
        let chunk = self.slot_chunk.max(4096);
        let chunks = self.slot_size().div_ceil(chunk);
        if chunks > MAX_CHUNKS {
            return Err(format!(
                "slot-chunk ({}) cuts {} bytes into {chunks} memslots, more than {MAX_CHUNKS}",
                self.slot_chunk,
                self.slot_size()
            ));
        }
        Ok(())
    }
}

/// Largest guest_memfd the scenario takes (the benchmark's metadata-only points reach 1 TiB).
pub const MAX_GUEST_MEM: u64 = 1 << 46;
/// Most memslots the guest_memfd is cut into: KVM's x86 limit of user memslots (32764), less
/// slot 0 for low memory.
pub const MAX_CHUNKS: u64 = 32_763;

/// Stage 2's options: the state stage 1 wrote, parsed and checked like the command line.
fn read_stage_state(text: &[u8], ram_size: u64) -> Result<StageState, String> {
    let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
    let ss: StageState = serde_json::from_slice(&text[..end]).map_err(e("state"))?;
    ss.opts
        .validate(ram_size)
        .map_err(|m| format!("state: options: {m}"))?;
    Ok(ss)
}

/// What stage 1 hands to stage 2 in the state memfd.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct StageState {
    opts: Options,
    pause_ns: u64,
    paused_at_ns: u64,
    preserve_us: f64,
    pause_us: f64,
    save_us: f64,
    preserved_folios: u64,
}

fn e<T>(what: &'static str) -> impl Fn(T) -> String
where
    T: std::fmt::Display,
{
    move |err| format!("{what}: {err}")
}

fn now_us() -> u64 {
    monotonic_ns() / 1000
}

/// Shared between the VMM thread and the vCPU thread.
#[derive(Default)]
struct GuestIo {
    proceed: AtomicBool,
    status: AtomicU64,
    /// Clock reads answered: a pause only shows in the guest's gap once it has read the clock.
    clock_reads: AtomicU64,
}

type SlotsRef<'a> = Option<(&'a Mutex<Host>, &'a GuestMemSlots)>;

fn io_handler<'a>(
    io: &'a GuestIo,
    mode: GuestMode,
    slots: SlotsRef<'a>,
) -> impl FnMut(IoEvent<'_>) -> IoAction + 'a {
    move |ev| match ev {
        IoEvent::MmioRead { addr, data } => slots
            .and_then(|(h, s)| s.mmio(h, addr, Some(data), None))
            .unwrap_or(IoAction::Stop),
        IoEvent::MmioWrite { addr, data } => slots
            .and_then(|(h, s)| s.mmio(h, addr, None, Some(data)))
            .unwrap_or(IoAction::Stop),
        IoEvent::In {
            port: guest::PORT_CLOCK,
            data,
        } => {
            let v = (now_us() as u32).to_le_bytes();
            let n = data.len().min(4);
            data[..n].copy_from_slice(&v[..n]);
            io.clock_reads.fetch_add(1, Ordering::SeqCst);
            IoAction::Continue
        }
        IoEvent::In {
            port: guest::PORT_PROCEED,
            data,
        } => {
            let v = (io.proceed.load(Ordering::SeqCst) as u32).to_le_bytes();
            let n = data.len().min(4);
            data[..n].copy_from_slice(&v[..n]);
            IoAction::Continue
        }
        IoEvent::Out {
            port: guest::PORT_STATUS,
            data,
        } => {
            let mut b = [0u8; 4];
            let n = data.len().min(4);
            b[..n].copy_from_slice(&data[..n]);
            let st = u32::from_le_bytes(b) as u64;
            io.status.store(st, Ordering::SeqCst);
            if guest::is_final_status(mode, st) {
                IoAction::Stop
            } else {
                IoAction::Continue
            }
        }
        IoEvent::In { data, .. } => {
            data.fill(0);
            IoAction::Continue
        }
        IoEvent::Out { .. } => IoAction::Continue,
    }
}

/// The VM as the VMM sets it up: low memory in a memfd at GPA 0, the guest_memfd at 4 GiB.
struct Vm {
    pid: Pid,
    vm: i32,
    gmem: i32,
    low: i32,
    low_map: UserMapping,
    vcpu: i32,
}

/// Bind low memory (slot 0) and the guest_memfd (chunked slots, all of them if `eager`, else
/// only the first), and create the vCPU.
fn bind(
    h: &mut Host,
    pid: Pid,
    vm: i32,
    gmem: i32,
    low: i32,
    o: &Options,
    eager: bool,
) -> Result<(UserMapping, i32, Arc<GuestMemSlots>), String> {
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    let low_map = h
        .mmap(
            pid,
            low,
            guest::LOW_MEM_SIZE as u64,
            rw,
            libc::MAP_SHARED,
            0,
        )
        .map_err(e("mmap low memory"))?;
    let r = Region {
        slot: 0,
        gpa: 0,
        size: guest::LOW_MEM_SIZE as u64,
        uaddr: low_map.addr as u64,
        gmem: None,
    };
    libkvm::set_memory_region2(h, pid, vm, r).map_err(e("memslot 0"))?;
    let slots = GuestMemSlots::new(pid, vm, gmem, GMEM_GPA, o.slot_size(), o.slot_chunk);
    if eager {
        slots.bind_all(h)?;
    } else {
        slots.bind(h, 0)?;
    }
    let vcpu = libkvm::create_vcpu(h, pid, vm, 0).map_err(e("create vCPU"))?;
    Ok((low_map, vcpu, slots))
}

fn setup(h: &mut Host, pid: Pid, o: &Options) -> Result<Vm, String> {
    let kvm = libkvm::open_kvm(h, pid).map_err(e("open /dev/kvm"))?;
    let vm = libkvm::create_vm(h, pid, kvm, 0).map_err(e("KVM_CREATE_VM"))?;
    let gmem = libkvm::create_guest_memfd(
        h,
        pid,
        vm,
        o.guest_mem,
        GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
    )
    .map_err(e("KVM_CREATE_GUEST_MEMFD"))?;
    if o.populate {
        h.fallocate(pid, gmem, libc::FALLOC_FL_KEEP_SIZE, 0, o.guest_mem)
            .map_err(e("fallocate"))?;
    } else if o.prefault {
        h.fallocate(
            pid,
            gmem,
            libc::FALLOC_FL_KEEP_SIZE,
            0,
            o.data.div_ceil(4096) * 4096,
        )
        .map_err(e("fallocate"))?;
    }
    let low = h.memfd_create(pid, "guest-low", 0).map_err(e("memfd"))?;
    let mut img = vec![0u8; guest::LOW_MEM_SIZE];
    let params = GuestParams {
        data_gpa: GMEM_GPA,
        data_len: o.data,
        mode: GuestMode::RunUpdate,
    };
    guest::build_image(&mut img, &params).map_err(e("guest image"))?;
    h.pwrite(pid, low, &img, 0)
        .map_err(e("write guest image"))?;
    let (low_map, vcpu, _slots) = bind(h, pid, vm, gmem, low, o, true)?;
    let kvm_sys = h.real_kvm().map_err(e("kvm"))?;
    // Ask the XSAVE size now, not in the first save inside the blackout.
    crate::kvm::vcpu::init_xsave_size(&kvm_sys);
    let v = h.vcpu(pid, vcpu).map_err(e("vcpu"))?;
    let v = v.lock().map_err(|_| "vcpu lock".to_string())?;
    guest::configure_vcpu(&kvm_sys, &v).map_err(e("configure vCPU"))?;
    Ok(Vm {
        pid,
        vm,
        gmem,
        low,
        low_map,
        vcpu,
    })
}

fn lock(shared: &Mutex<Host>) -> std::sync::MutexGuard<'_, Host> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

fn read_mailbox(h: &mut Host, vm: &Vm) -> Result<guest::GuestReport, String> {
    let mut mb = [0u8; guest::MAILBOX_LEN];
    h.user_read(
        vm.pid,
        vm.low_map.addr + guest::MAILBOX_GPA as usize,
        &mut mb,
    )
    .map_err(e("read mailbox"))?;
    guest::read_report(&mb).map_err(e("mailbox"))
}

/// Run the guest on its own thread until `stop` says so; returns how the run ended.
fn spawn_guest(
    shared: &Arc<Mutex<Host>>,
    vm: &Vm,
    io: Arc<GuestIo>,
    kicker: Arc<VcpuKicker>,
) -> std::thread::JoinHandle<Result<RunExit, String>> {
    let (shared, pid, fd) = (shared.clone(), vm.pid, vm.vcpu);
    std::thread::spawn(move || {
        let _target = kicker.register_current_thread().map_err(e("kicker"))?;
        let mut handler = io_handler(&io, GuestMode::RunUpdate, None);
        Host::vcpu_run(&shared, pid, fd, &mut handler).map_err(e("KVM_RUN"))
    })
}

fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) -> Result<(), String> {
    let t = Instant::now();
    while !cond() {
        if t.elapsed() > timeout {
            return Err(format!("timed out waiting for {what}"));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    Ok(())
}

fn stage1(shared: &Arc<Mutex<Host>>, pid: Pid, dev: i32, o: &Options) -> Result<Value, String> {
    let vm = setup(&mut lock(shared), pid, o)?;
    run_and_update(shared, pid, dev, o, vm)
}

/// Run the guest until it has written its data, then live-update the host under it. Returns
/// only if the update did not happen (the guest then carries on and verifies its data), or for
/// the snapshot baseline.
fn run_and_update(
    shared: &Arc<Mutex<Host>>,
    pid: Pid,
    dev: i32,
    o: &Options,
    vm: Vm,
) -> Result<Value, String> {
    let kicker = Arc::new(VcpuKicker::new());
    let io = Arc::new(GuestIo::default());
    let t_run = Instant::now();
    let th = spawn_guest(shared, &vm, io.clone(), kicker.clone());
    wait_for(
        "the guest to write its data",
        Duration::from_secs(120),
        || io.status.load(Ordering::SeqCst) != guest::STATUS_NONE || th.is_finished(),
    )?;
    if io.status.load(Ordering::SeqCst) != guest::STATUS_WRITTEN {
        let r = th.join().map_err(|_| "vCPU thread panicked".to_string())?;
        return Err(format!(
            "guest did not write its data: status {}, run {r:?}",
            io.status.load(Ordering::SeqCst)
        ));
    }
    let write_ms = t_run.elapsed().as_secs_f64() * 1e3;
    // The guest measures the blackout between two clock reads: let it take a few first.
    wait_for(
        "the guest to read its clock",
        Duration::from_secs(10),
        || io.clock_reads.load(Ordering::SeqCst) >= 3 || th.is_finished(),
    )?;

    // The baseline preserves nothing: pause, snapshot, restore.
    if let Some(dir) = &o.snapshot_dir {
        let pause_ns = monotonic_ns();
        kicker.kick().map_err(e("kick"))?;
        let exit = th
            .join()
            .map_err(|_| "vCPU thread panicked".to_string())??;
        if exit != RunExit::Interrupted {
            return Err(format!("vCPU did not pause: {exit:?}"));
        }
        let paused_at_ns = monotonic_ns();
        drop(kicker);
        return snapshot_restore(shared, vm, o, dir, pause_ns, paused_at_ns, io);
    }

    // From here on, any failure aborts the update: the sessions are closed (which unpreserves
    // and unfreezes everything) and the guest carries on where it is.
    let mut th = Some(th);
    let mut sessions: Vec<i32> = Vec::new();
    let r = update(
        shared,
        pid,
        dev,
        o,
        &vm,
        &kicker,
        &mut th,
        &mut sessions,
        write_ms,
    );
    let err = match r {
        Ok(never) => match never {},
        Err(err) => err,
    };
    // Still here: the update did not happen.
    drop(kicker);
    {
        let mut h = lock(shared);
        for s in sessions.into_iter().rev() {
            let _ = h.close(pid, s);
        }
    }
    io.proceed.store(true, Ordering::SeqCst);
    let exit = match th.take() {
        Some(t) => t.join().map_err(|_| "vCPU thread panicked".to_string())??,
        None => {
            let mut handler = io_handler(&io, GuestMode::RunUpdate, None);
            Host::vcpu_run(shared, pid, vm.vcpu, &mut handler).map_err(e("KVM_RUN"))?
        }
    };
    let rep = read_mailbox(&mut lock(shared), &vm)?;
    let status = lock(shared).status();
    Ok(json!({
            "update_aborted": err.0, "errno": err.1, "kexec_refused": err.0, "resumed": format!("{exit:?}"),
            "guest_status": guest::status_name(rep.status), "write_ms": write_ms,
            "verified_bytes": if rep.status == guest::STATUS_VERIFY_OK { o.data } else { 0 },
            "status_after": status,
    }))
}

/// Preserve, pause, save and kexec. Returns only on failure: `(what failed, errno)`.
#[allow(clippy::too_many_arguments)]
fn update(
    shared: &Arc<Mutex<Host>>,
    pid: Pid,
    dev: i32,
    o: &Options,
    vm: &Vm,
    kicker: &VcpuKicker,
    th: &mut Option<std::thread::JoinHandle<Result<RunExit, String>>>,
    sessions: &mut Vec<i32>,
    write_ms: f64,
) -> Result<std::convert::Infallible, (String, i32)> {
    let fail = |what: &'static str| move |err: Errno| (format!("{what}: {err}"), err.0);
    // Preserve while the guest keeps running: the guest_memfd freezes here.
    let t = Instant::now();
    let (st, m, folios) = {
        let mut h = lock(shared);
        let s = create_session(&mut h, pid, dev, SESSION).map_err(fail("create session"))?;
        sessions.push(s);
        preserve_fd(&mut h, pid, s, vm.gmem, GMEM_TOKEN).map_err(fail("preserve guest_memfd"))?;
        if !o.no_vm {
            preserve_fd(&mut h, pid, s, vm.vm, VM_TOKEN).map_err(fail("preserve VM"))?;
        }
        preserve_fd(&mut h, pid, s, vm.low, LOW_TOKEN).map_err(fail("preserve low memory"))?;
        // The memfds the vCPU state and the VMM's own state go into are sized and preserved
        // now, so that after the pause only their bytes are written (a preserved memfd keeps
        // its size but stays writable).
        let st = h
            .memfd_create(pid, "vcpu-state", 0)
            .map_err(fail("memfd"))?;
        h.ftruncate(pid, st, STATE_BYTES)
            .map_err(fail("size vCPU state"))?;
        preserve_fd(&mut h, pid, s, st, VCPU_TOKEN).map_err(fail("preserve vCPU state"))?;
        let state_s =
            create_session(&mut h, pid, dev, STATE).map_err(fail("create state session"))?;
        sessions.push(state_s);
        let m = h.memfd_create(pid, "state", 0).map_err(fail("memfd"))?;
        h.ftruncate(pid, m, STATE_BYTES)
            .map_err(fail("size state"))?;
        preserve_fd(&mut h, pid, state_s, m, STATE_TOKEN).map_err(fail("preserve state"))?;
        let f = h
            .fd_file(pid, vm.gmem)
            .ok()
            .and_then(|f| match h.files.kind(f) {
                Some(crate::fs::FileKind::GuestMemfd(g)) => Some(g.pages.nr_present()),
                _ => None,
            });
        (st, m, f.unwrap_or(0))
    };
    let preserve_us = t.elapsed().as_secs_f64() * 1e6;

    // Pause: from here to the resume in the next image is the guest's blackout.
    let pause_ns = monotonic_ns();
    kicker
        .kick()
        .map_err(|err| (format!("kick: {err}"), libc::EIO))?;
    let exit = match th.take() {
        Some(t) => t
            .join()
            .map_err(|_| ("vCPU thread panicked".to_string(), libc::EIO))?,
        None => Err("no vCPU thread".into()),
    };
    match exit {
        Ok(RunExit::Interrupted) => {}
        other => return Err((format!("vCPU did not pause: {other:?}"), libc::EIO)),
    }
    let paused_at_ns = monotonic_ns();
    let t = Instant::now();
    let mut h = lock(shared);
    let state = {
        let v = h.vcpu(pid, vm.vcpu).map_err(fail("vcpu"))?;
        let v = v.lock().map_err(|_| ("vcpu lock".to_string(), libc::EIO))?;
        VcpuState::save(&v)
            .map_err(|err| (format!("save vCPU: {err}"), libc::EIO))?
            .to_bytes()
    };
    let mut framed = (state.len() as u64).to_le_bytes().to_vec();
    framed.extend_from_slice(&state);
    h.pwrite(pid, st, &framed, 0)
        .map_err(fail("write vCPU state"))?;
    let save_us = t.elapsed().as_secs_f64() * 1e6;

    let ss = StageState {
        opts: o.clone(),
        pause_ns,
        paused_at_ns,
        preserve_us,
        pause_us: (paused_at_ns - pause_ns) as f64 / 1e3,
        save_us,
        preserved_folios: folios,
    };
    let text = serde_json::to_vec(&ss).map_err(|err| (format!("state: {err}"), libc::EINVAL))?;
    h.pwrite(pid, m, &text, 0).map_err(fail("write state"))?;
    h.report("rfc-stage1", json!({ "write_ms": write_ms, "preserve_us": preserve_us, "preserved_folios": folios, "state": ss }));
    // The kexec: returns only if it was refused.
    let Err(err) = h.kexec(crate::kexec::KexecRequest::default());
    Err((err.to_string(), err.errno()))
}

/// Bytes moved per read/write of the snapshot baseline.
const SNAPSHOT_CHUNK: usize = 1 << 20;

/// The baseline: what a user does without live update. Save all guest memory and the vCPU
/// state to a file, tear the VM down, create a new VM and guest_memfd, load everything back and
/// resume. The guest measures the blackout the same way.
fn snapshot_restore(
    shared: &Arc<Mutex<Host>>,
    vm: Vm,
    o: &Options,
    dir: &str,
    pause_ns: u64,
    paused_at_ns: u64,
    io: Arc<GuestIo>,
) -> Result<Value, String> {
    use std::io::{Read, Write};
    let pid = vm.pid;
    let path =
        std::path::Path::new(dir).join(format!("handover-snapshot-{}.bin", std::process::id()));
    /// Removes the snapshot file however this function ends.
    struct Cleanup<'a>(&'a std::path::Path);
    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(self.0);
        }
    }
    let _cleanup = Cleanup(&path);
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    let t_save = monotonic_ns();
    {
        let mut h = lock(shared);
        let state = {
            let v = h.vcpu(pid, vm.vcpu).map_err(e("vcpu"))?;
            let v = v.lock().map_err(|_| "vcpu lock".to_string())?;
            VcpuState::save(&v).map_err(e("save vCPU"))?.to_bytes()
        };
        let gmap = h
            .mmap(
                pid,
                vm.gmem,
                o.guest_mem,
                libc::PROT_READ,
                libc::MAP_SHARED,
                0,
            )
            .map_err(e("mmap guest_memfd"))?;
        let mut f = std::fs::File::create(&path).map_err(e("create snapshot file"))?;
        f.write_all(&(state.len() as u64).to_le_bytes())
            .map_err(e("write"))?;
        f.write_all(&state).map_err(e("write"))?;
        // Guest memory is read through the process's mappings like any VMM reads it (a hole
        // reads as zeros), through a bounce buffer: no Rust reference into guest memory.
        let mut buf = vec![0u8; SNAPSHOT_CHUNK];
        for (map, len) in [
            (vm.low_map, guest::LOW_MEM_SIZE as u64),
            (gmap, o.guest_mem),
        ] {
            let mut off = 0u64;
            while off < len {
                let n = (len - off).min(SNAPSHOT_CHUNK as u64) as usize;
                h.user_read(pid, map.addr + off as usize, &mut buf[..n])
                    .map_err(e("read guest memory"))?;
                f.write_all(&buf[..n]).map_err(e("write guest memory"))?;
                off += n as u64;
            }
        }
        f.sync_all().map_err(e("sync snapshot"))?;
        h.munmap(pid, gmap).map_err(e("munmap"))?;
        // Tear the VM down: its memory goes back to the host.
        for fd in [vm.vcpu, vm.gmem, vm.vm] {
            h.close(pid, fd).map_err(e("close"))?;
        }
    }
    let t_saved = monotonic_ns();
    let (vcpu, low_map) = {
        let mut h = lock(shared);
        let kvm = libkvm::open_kvm(&mut h, pid).map_err(e("open /dev/kvm"))?;
        let nvm = libkvm::create_vm(&mut h, pid, kvm, 0).map_err(e("KVM_CREATE_VM"))?;
        let gmem = libkvm::create_guest_memfd(
            &mut h,
            pid,
            nvm,
            o.guest_mem,
            GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
        )
        .map_err(e("KVM_CREATE_GUEST_MEMFD"))?;
        h.fallocate(pid, gmem, libc::FALLOC_FL_KEEP_SIZE, 0, o.guest_mem)
            .map_err(e("fallocate"))?;
        let gmap = h
            .mmap(pid, gmem, o.guest_mem, rw, libc::MAP_SHARED, 0)
            .map_err(e("mmap guest_memfd"))?;
        let mut f = std::fs::File::open(&path).map_err(e("open snapshot"))?;
        let mut n = [0u8; 8];
        f.read_exact(&mut n).map_err(e("read"))?;
        let mut state = vec![0u8; u64::from_le_bytes(n).min(1 << 20) as usize];
        f.read_exact(&mut state).map_err(e("read"))?;
        let mut buf = vec![0u8; SNAPSHOT_CHUNK];
        for (map, len) in [
            (vm.low_map, guest::LOW_MEM_SIZE as u64),
            (gmap, o.guest_mem),
        ] {
            let mut off = 0u64;
            while off < len {
                let n = (len - off).min(SNAPSHOT_CHUNK as u64) as usize;
                f.read_exact(&mut buf[..n])
                    .map_err(e("read guest memory"))?;
                h.user_write(pid, map.addr + off as usize, &buf[..n])
                    .map_err(e("write guest memory"))?;
                off += n as u64;
            }
        }
        h.munmap(pid, gmap).map_err(e("munmap"))?;
        let (low_map, vcpu, _slots) = bind(&mut h, pid, nvm, gmem, vm.low, o, true)?;
        let state = VcpuState::from_bytes(&state).map_err(e("vCPU state"))?;
        let v = h.vcpu(pid, vcpu).map_err(e("vcpu"))?;
        let v = v.lock().map_err(|_| "vcpu lock".to_string())?;
        state.restore(&v).map_err(e("restore vCPU"))?;
        (vcpu, low_map)
    };
    let t_resume = monotonic_ns();
    io.proceed.store(true, Ordering::SeqCst);
    let mut handler = io_handler(&io, GuestMode::RunUpdate, None);
    let exit = Host::vcpu_run(shared, pid, vcpu, &mut handler).map_err(e("KVM_RUN"))?;
    let mut h = lock(shared);
    let vmh = Vm {
        pid,
        vm: -1,
        gmem: -1,
        low: vm.low,
        low_map,
        vcpu,
    };
    let rep = read_mailbox(&mut h, &vmh)?;
    let ok = rep.status == guest::STATUS_VERIFY_OK && exit == RunExit::Stopped;
    let us = |a: u64, b: u64| b.saturating_sub(a) as f64 / 1e3;
    Ok(json!({
        "ok": ok,
        "snapshot": true,
        "guest_status": guest::status_name(rep.status),
        "verified_bytes": if ok { o.data } else { 0 },
        "blackout_us": rep.max_gap_us,
        "snapshot_bytes": o.guest_mem + guest::LOW_MEM_SIZE as u64,
        "phases_us": {
            "pause": us(pause_ns, paused_at_ns),
            "save": us(t_save, t_saved),
            "load": us(t_saved, t_resume),
            "host_pause_to_resume": us(pause_ns, t_resume),
        },
        "opts": o,
    }))
}

fn stage2(
    shared: &Arc<Mutex<Host>>,
    pid: Pid,
    dev: i32,
    state_session: i32,
) -> Result<Value, String> {
    let t_stage2 = monotonic_ns();
    let mut h = lock(shared);
    let m = retrieve_fd(&mut h, pid, state_session, STATE_TOKEN).map_err(e("retrieve state"))?;
    let text = read_all(&mut h, pid, m, 1 << 16).map_err(e("read state"))?;
    let ss = read_stage_state(&text, h.mm.ram.size())?;
    let o = ss.opts.clone();
    let s = retrieve_session(&mut h, pid, dev, SESSION).map_err(e("retrieve session"))?;
    if o.finish_early {
        // Retrieve the guest_memfd only (the VM comes along inside LUO), then FINISH.
        let g = retrieve_fd(&mut h, pid, s, GMEM_TOKEN).map_err(e("retrieve guest_memfd"))?;
        finish(&mut h, pid, s).map_err(e("finish"))?;
        let vm_after = retrieve_fd(&mut h, pid, s, VM_TOKEN);
        let map = h
            .mmap(pid, g, o.guest_mem, libc::PROT_READ, libc::MAP_SHARED, 0)
            .map_err(e("mmap"))?;
        // In pieces: `data` may be as large as RAM.
        let mut buf = vec![0u8; (1usize << 20).min(o.data as usize)];
        let mut bad = None;
        let mut off = 0u64;
        while off < o.data && bad.is_none() {
            let n = buf.len().min((o.data - off) as usize);
            h.user_read(pid, map.addr + off as usize, &mut buf[..n])
                .map_err(e("read guest_memfd"))?;
            bad = guest::find_mismatch(&buf[..n], off);
            off += n as u64;
        }
        return Ok(json!({
            "finish_early": true,
            "vm_after_finish": format!("{:?}", vm_after.err()),
            "host_verified_bytes": if bad.is_none() { o.data } else { 0 },
            "first_bad": bad,
        }));
    }
    let (vm, gmem) = if o.gmem_first {
        let g = retrieve_fd(&mut h, pid, s, GMEM_TOKEN).map_err(e("retrieve guest_memfd"))?;
        (
            retrieve_fd(&mut h, pid, s, VM_TOKEN).map_err(e("retrieve VM"))?,
            g,
        )
    } else {
        let v = retrieve_fd(&mut h, pid, s, VM_TOKEN).map_err(e("retrieve VM"))?;
        (
            v,
            retrieve_fd(&mut h, pid, s, GMEM_TOKEN).map_err(e("retrieve guest_memfd"))?,
        )
    };
    let low = retrieve_fd(&mut h, pid, s, LOW_TOKEN).map_err(e("retrieve low memory"))?;
    let st = retrieve_fd(&mut h, pid, s, VCPU_TOKEN).map_err(e("retrieve vCPU state"))?;
    let bytes = read_all(&mut h, pid, st, STATE_BYTES as usize).map_err(e("read vCPU state"))?;
    let len = bytes
        .get(..8)
        .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or_default())) as usize;
    let bytes = bytes
        .get(8..8usize.saturating_add(len))
        .ok_or("vCPU state: bad length")?;
    let t_retrieved = monotonic_ns();
    let state = VcpuState::from_bytes(bytes).map_err(e("vCPU state"))?;
    let (low_map, vcpu, slots) = bind(&mut h, pid, vm, gmem, low, &o, !o.lazy_slots)?;
    let t_bound = monotonic_ns();
    {
        // The XSAVE size through the host's open /dev/kvm (one ioctl, not an open).
        let kvm_sys = h.real_kvm().map_err(e("kvm"))?;
        crate::kvm::vcpu::init_xsave_size(&kvm_sys);
        let v = h.vcpu(pid, vcpu).map_err(e("vcpu"))?;
        let v = v.lock().map_err(|_| "vcpu lock".to_string())?;
        state.restore(&v).map_err(e("restore vCPU"))?;
    }
    let vmh = Vm {
        pid,
        vm,
        gmem,
        low,
        low_map,
        vcpu,
    };
    let vm_name = h
        .vm_inner(h.fd_file(pid, vm).map_err(e("vm"))?)
        .map(|i| i.name.clone())
        .unwrap_or_default();
    let boot = h.info.clone();
    let params = h.params.clone();
    let handover_bytes = params.prev_handover_bytes.unwrap_or(0);
    drop(h);
    // Resuming the guest accepts the update: from here on there is no rollback.
    lock(shared).kho.mark_committed();
    let t_resume = monotonic_ns();
    // Resumed: bind the other chunks of guest memory off the blackout.
    let bg =
        (o.lazy_slots && o.background_slots).then(|| slots.bind_rest_in_background(shared.clone()));
    let io = GuestIo::default();
    io.proceed.store(true, Ordering::SeqCst);
    let mut handler = io_handler(
        &io,
        GuestMode::RunUpdate,
        Some((shared.as_ref(), slots.as_ref())),
    );
    let exit = Host::vcpu_run(shared, pid, vcpu, &mut handler).map_err(e("KVM_RUN"))?;
    let t_done = monotonic_ns();
    // The guest runs again: the previous image's VMs can go now, and what was read of the
    // handover.
    {
        let mut h = lock(shared);
        h.release_previous_image(false);
        let Host { kho, mm, .. } = &mut *h;
        kho.commit(mm).map_err(e("commit"))?;
    }
    let bg_us = match bg.map(|t| t.join()) {
        Some(Ok(r)) => Some(r?),
        Some(Err(_)) => return Err("slot binding thread panicked".into()),
        None => None,
    };
    let slots_bound = slots.nr_bound();
    let mut h = lock(shared);
    let rep = read_mailbox(&mut h, &vmh)?;
    finish(&mut h, pid, s).map_err(e("finish session"))?;
    let ok = rep.status == guest::STATUS_VERIFY_OK && exit == RunExit::Stopped;
    let us = |a: u64, b: u64| b.saturating_sub(a) as f64 / 1e3;
    let start = params.kexec_start_ns.unwrap_or(ss.paused_at_ns);
    let exec = params.exec_ns.unwrap_or(start);
    let result = json!({
        "ok": ok,
        "guest_status": guest::status_name(rep.status),
        "first_bad": rep.first_bad,
        "verified_bytes": if ok { o.data } else { 0 },
        "blackout_us": rep.max_gap_us,
        "guest_loops": rep.loops,
        "handover_bytes": handover_bytes,
        "preserved_folios": ss.preserved_folios,
        "vm_name": vm_name,
        "memslots": { "chunks": slots.nr(), "bound_at_end": slots_bound, "background_bind_us": bg_us },
        "order": if o.gmem_first { "gmem-first" } else { "vm-first" },
        "phases_us": {
            "preserve_while_running": ss.preserve_us,
            "pause": ss.pause_us,
            "save_state": ss.save_us,
            "freeze_and_finalize": us(start, exec),
            "exec": us(exec, boot.boot_start_ns),
            "boot": boot.boot_us as f64,
            "retrieve": us(t_stage2, t_retrieved),
            "resume": us(t_retrieved, t_resume),
            "resume_bind_memslots": us(t_retrieved, t_bound),
            "resume_vcpu_state": us(t_bound, t_resume),
            "host_pause_to_resume": us(ss.pause_ns, t_resume),
            "verify_after_resume": us(t_resume, t_done),
        },
        "opts": o,
    });
    // Close what this cycle read (they would otherwise pile up over a soak).
    for fd in [m, st] {
        let _ = h.close(pid, fd);
    }
    let cycle = h.info.kexec_count;
    if ok && cycle < o.cycles {
        let frames_used = h.mm.stats().used;
        h.report(
            "rfc-cycle",
            json!({ "cycle": cycle, "ok": ok, "blackout_us": rep.max_gap_us, "frames_used": frames_used, "rss_kib": rss_kib(), "result": result }),
        );
        drop(h);
        return run_and_update(shared, pid, dev, &o, restart_guest(shared, vmh, &o)?);
    }
    drop(h);
    let mut result = result;
    if let Some(obj) = result.as_object_mut() {
        obj.insert("cycle".into(), cycle.into());
        obj.insert("rollback".into(), lock(shared).info.rollback.clone().into());
    }
    Ok(result)
}

/// Resident memory of this host image, KiB (VmRSS).
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Point the guest back at the start of its program (write, then wait for the next update).
fn restart_guest(shared: &Arc<Mutex<Host>>, vm: Vm, o: &Options) -> Result<Vm, String> {
    let mut h = lock(shared);
    let mut mb = [0u8; guest::MAILBOX_LEN];
    let params = GuestParams {
        data_gpa: GMEM_GPA,
        data_len: o.data,
        mode: GuestMode::RunUpdate,
    };
    guest::write_params(&mut mb, &params).map_err(e("guest params"))?;
    h.user_write(vm.pid, vm.low_map.addr + guest::MAILBOX_GPA as usize, &mb)
        .map_err(e("mailbox"))?;
    // Registers back to the start (CPUID stays: KVM refuses to change it once a vCPU ran).
    let v = h.vcpu(vm.pid, vm.vcpu).map_err(e("vcpu"))?;
    let v = v.lock().map_err(|_| "vcpu lock".to_string())?;
    let base = v.get_sregs().map_err(e("get sregs"))?;
    v.set_sregs(&guest::initial_sregs(base))
        .map_err(e("set sregs"))?;
    v.set_regs(&guest::initial_regs()).map_err(e("set regs"))?;
    drop(v);
    Ok(vm)
}

fn scenario(shared: &Arc<Mutex<Host>>) -> Result<Value, String> {
    let r = scenario_inner(shared);
    // A failure before the guests resumed in this image: go back to the previous image, which
    // still has everything.
    if let Err(why) = &r {
        let mut h = lock(shared);
        if h.info.kho_boot && !h.kho.committed() {
            let err = h.rollback(why);
            return Err(format!("{why}; rollback failed: {err}"));
        }
    }
    r
}

fn scenario_inner(shared: &Arc<Mutex<Host>>) -> Result<Value, String> {
    let (pid, dev, state) = {
        let mut h = lock(shared);
        if let Some(why) = h.info.refused.clone() {
            // Booted clean after refusing a handover (and, if it could, after a rollback that
            // refused it too): the VM is lost; say so rather than start over.
            return Err(format!("the handover was refused: {why}"));
        }
        let pid = h.spawn();
        let dev = h
            .open(pid, "/dev/liveupdate", 0)
            .map_err(e("open /dev/liveupdate"))?;
        (pid, dev, retrieve_session(&mut h, pid, dev, STATE))
    };
    match state {
        Err(Errno::ENOENT) => {
            let o = {
                let h = lock(shared);
                let o = Options::parse(&h.params.init_args)?;
                o.validate(h.mm.ram.size())?;
                o
            };
            stage1(shared, pid, dev, &o)
        }
        Ok(st) => stage2(shared, pid, dev, st),
        Err(err) => Err(format!("retrieve state session: {err}")),
    }
}

/// The init program: stage 1 on a cold boot, stage 2 after the kexec.
pub fn run(host: Host) -> (Host, InitOutcome) {
    let kho_boot = host.info.kho_boot;
    let shared = Arc::new(Mutex::new(host));
    let r = scenario(&shared);
    let host = take_back(shared);
    match r {
        Ok(v) => {
            let event = if kho_boot {
                "rfc-stage2"
            } else if v.get("snapshot").is_some() {
                "rfc-snapshot"
            } else {
                "rfc-aborted"
            };
            host.report(event, v);
            (host, InitOutcome::Halt(0))
        }
        Err(msg) => {
            tracing::error!("{PROGRAM}: {msg}");
            host.report("rfc-failed", json!({ "error": msg }));
            (host, InitOutcome::Halt(1))
        }
    }
}

/// The host back from its `Arc` once every vCPU thread is gone.
fn take_back(mut shared: Arc<Mutex<Host>>) -> Host {
    loop {
        match Arc::try_unwrap(shared) {
            Ok(m) => return m.into_inner().unwrap_or_else(|p| p.into_inner()),
            Err(s) => {
                shared = s;
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn options_are_validated() {
        let ram = 1 << 30;
        let ok = Options::parse(&args(&["guest-mem=16M", "data=5M"])).unwrap();
        assert_eq!(ok.validate(ram), Ok(()));
        for bad in [
            &["guest-mem=16M", "data=0"][..],
            &["guest-mem=16M", "data=17M"],
            &["guest-mem=4097", "data=1"],
            &["guest-mem=128T", "data=1M"],
            &["guest-mem=16M", "data=8M", "slot-max=4M"],
            &["guest-mem=2G", "data=2G"],
            &["guest-mem=1T", "data=1M", "slot-chunk=4K"],
        ] {
            let o = Options::parse(&args(bad)).unwrap();
            assert!(o.validate(ram).is_err(), "{bad:?} accepted");
        }
    }

    /// The options stage 1 hands over are input to stage 2: sizes that would make it allocate
    /// without bound are refused before anything is allocated.
    #[test]
    fn stage_state_read_back_is_validated() {
        let ram = 1 << 30;
        let o = Options::parse(&args(&["guest-mem=16M", "data=5M"])).unwrap();
        let ss = StageState {
            opts: o,
            pause_ns: 0,
            paused_at_ns: 0,
            preserve_us: 0.0,
            pause_us: 0.0,
            save_us: 0.0,
            preserved_folios: 0,
        };
        let mut text = serde_json::to_vec(&ss).unwrap();
        text.extend_from_slice(&[0; 16]);
        assert!(read_stage_state(&text, ram).is_ok());
        let patch = |f: &dyn Fn(&mut Options)| {
            let mut s = ss.clone();
            f(&mut s.opts);
            serde_json::to_vec(&s).unwrap()
        };
        for (what, t) in [
            ("huge data", patch(&|o| o.data = u64::MAX)),
            (
                "data beyond RAM",
                patch(&|o| {
                    o.guest_mem = 1 << 40;
                    o.data = 1 << 39
                }),
            ),
            ("huge guest_mem", patch(&|o| o.guest_mem = !4095u64)),
            (
                "chunks",
                patch(&|o| {
                    o.guest_mem = 1 << 40;
                    o.slot_chunk = 0
                }),
            ),
            ("zero data", patch(&|o| o.data = 0)),
        ] {
            let r = read_stage_state(&t, ram);
            assert!(
                r.as_ref().is_err_and(|m| m.contains("options")),
                "{what}: {:?}",
                r.map(|s| s.opts)
            );
        }
        assert!(read_stage_state(b"{not json", ram).is_err());
    }
}
