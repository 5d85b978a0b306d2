//! Guest faults on guest_memfd holes, served by the host image (userfaultfd on the kernel
//! mapping of the guest_memfd, see `kvm::run`): the CPL3 guest writes into a guest_memfd that
//! was never fallocated and pages come in on demand; while the guest_memfd is frozen
//! (preserved) the fault comes back to the VMM as `RunExit::MemoryFault { errno: EPERM }` and
//! the run continues once it is unfrozen.
//!
//! Every test skips with a loud `SKIP:` line when `/dev/kvm` cannot be opened, unless
//! `HANDOVER_REQUIRE_KVM=1`, in which case it fails. The tests of this file run one at a time
//! (they count the service threads and measure fault costs).

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use handover::abi::kvm::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};
use handover::host::files::FileKind;
use handover::host::Host;
use handover::kexec::BootParams;
use handover::kvm::vcpu::VcpuKicker;
use handover::kvm::RunExit;
use handover::uapi::{Errno, Pid};
use handover::vmm::guest::*;
use handover::vmm::libkvm::*;
use handover::vmm::libluo::*;

const MIB: u64 = 1 << 20;
const DATA_GPA: u64 = 4 << 30;
const DATA_LEN: u64 = 5 << 20;
const GMEM_SIZE: u64 = 16 * MIB;
const PAGE: u64 = 4096;
const DATA_PAGES: u64 = DATA_LEN / PAGE;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Straight to fd 2: libtest captures `eprintln!` of passing tests.
fn note(msg: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{msg}");
}

/// The guest's low memory: a memfd of the host, mapped by the VMM process and bound as a
/// plain memslot at GPA 0 (the VMM's own memory, not a guest_memfd). The host accepts plain
/// slots only inside a mapping of the caller, and the VMM touches the memory through the host
/// (volatile copies), never through a Rust reference.
struct LowMem {
    addr: usize,
}

impl LowMem {
    fn new(h: &mut Host, pid: Pid) -> LowMem {
        let fd = h
            .memfd_create(pid, "kvm-faults-low", 0)
            .expect("memfd_create");
        h.ftruncate(pid, fd, LOW_MEM_SIZE as u64)
            .expect("ftruncate");
        let m = h
            .mmap(
                pid,
                fd,
                LOW_MEM_SIZE as u64,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                0,
            )
            .expect("mmap");
        h.close(pid, fd).expect("close");
        LowMem { addr: m.addr }
    }

    /// The VMM's address of the mapping, for KVM.
    fn addr(&self) -> u64 {
        self.addr as u64
    }

    /// A copy of the bytes at `off..off + len`.
    fn read(&self, h: &mut Host, pid: Pid, off: usize, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        h.user_read(pid, self.addr + off, &mut buf)
            .expect("read low memory");
        buf
    }

    /// Copy `off..off + len` out, let `f` edit the copy, and store it back.
    fn update<R>(
        &self,
        h: &mut Host,
        pid: Pid,
        off: usize,
        len: usize,
        f: impl FnOnce(&mut [u8]) -> R,
    ) -> R {
        let mut buf = self.read(h, pid, off, len);
        let r = f(&mut buf);
        h.user_write(pid, self.addr + off, &buf)
            .expect("write low memory");
        r
    }
}

/// Kicks the vCPU if one run takes longer than [`RUN_TIMEOUT`], so a broken fault path fails
/// the test (`vcpu_run` returns) instead of hanging it.
struct Watchdog {
    kicker: Arc<VcpuKicker>,
    /// Deadline of the current run, µs since `epoch`; `u64::MAX` when no run is going on.
    deadline: Arc<AtomicU64>,
    epoch: Instant,
    stop: Arc<AtomicBool>,
}

const RUN_TIMEOUT: Duration = Duration::from_secs(60);

impl Watchdog {
    fn new(kicker: VcpuKicker) -> Watchdog {
        let w = Watchdog {
            kicker: Arc::new(kicker),
            deadline: Arc::new(AtomicU64::new(u64::MAX)),
            epoch: Instant::now(),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let (k, d, e, stop) = (
            w.kicker.clone(),
            w.deadline.clone(),
            w.epoch,
            w.stop.clone(),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(50));
                if e.elapsed().as_micros() as u64 > d.load(Ordering::SeqCst) {
                    note("watchdog: the vCPU run timed out, kicking it");
                    let _ = k.kick();
                    d.store(u64::MAX, Ordering::SeqCst);
                }
            }
        });
        w
    }

    fn arm(&self) {
        let at = (self.epoch.elapsed() + RUN_TIMEOUT).as_micros() as u64;
        self.deadline.store(at, Ordering::SeqCst);
    }

    fn disarm(&self) {
        self.deadline.store(u64::MAX, Ordering::SeqCst);
        self.kicker.take_kick();
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// A VM with the low image at GPA 0 and a 16 MiB guest_memfd at 4 GiB, one configured vCPU.
struct Guest {
    shared: Arc<Mutex<Host>>,
    pid: Pid,
    gmem: i32,
    vcpu: i32,
    low: LowMem,
    watchdog: Watchdog,
}

impl Guest {
    /// `prefault`: bytes of the guest_memfd to fallocate before binding it.
    fn new(mode: GuestMode, prefault: u64) -> Guest {
        let mut h = Host::boot(BootParams {
            ram_size: 256 << 20,
            ..Default::default()
        })
        .unwrap();
        let pid = h.spawn();
        let kvm = open_kvm(&mut h, pid).unwrap();
        let vm = create_vm(&mut h, pid, kvm, 0).unwrap();
        let gmem = create_guest_memfd(
            &mut h,
            pid,
            vm,
            GMEM_SIZE,
            GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
        )
        .unwrap();
        if prefault > 0 {
            h.fallocate(pid, gmem, libc::FALLOC_FL_KEEP_SIZE, 0, prefault)
                .unwrap();
        }
        let low = LowMem::new(&mut h, pid);
        low.update(&mut h, pid, 0, LOW_MEM_SIZE, |b| {
            build_image(b, &params(mode))
        })
        .unwrap();
        set_memory_region2(
            &mut h,
            pid,
            vm,
            Region {
                slot: 0,
                gpa: 0,
                size: LOW_MEM_SIZE as u64,
                uaddr: low.addr(),
                gmem: None,
            },
        )
        .unwrap();
        set_memory_region2(
            &mut h,
            pid,
            vm,
            Region {
                slot: 1,
                gpa: DATA_GPA,
                size: GMEM_SIZE,
                uaddr: 0,
                gmem: Some((gmem, 0)),
            },
        )
        .unwrap();
        let vcpu = create_vcpu(&mut h, pid, vm, 0).unwrap();
        let kvm_sys = h.real_kvm().unwrap();
        let watchdog = {
            let v = h.vcpu(pid, vcpu).unwrap();
            let v = v.lock().unwrap();
            configure_vcpu(&kvm_sys, &v).unwrap();
            Watchdog::new(VcpuKicker::new())
        };
        Guest {
            shared: Arc::new(Mutex::new(h)),
            pid,
            gmem,
            vcpu,
            low,
            watchdog,
        }
    }

    fn host(&self) -> MutexGuard<'_, Host> {
        self.shared.lock().unwrap()
    }

    /// Run until the guest reports a status (`Ok(status)`) or `vcpu_run` returns otherwise.
    fn run(&self) -> Result<u64, RunExit> {
        let mut status = None;
        let exit = {
            let _target = self.watchdog.kicker.register_current_thread().unwrap();
            self.watchdog.arm();
            let r = Host::vcpu_run(
                &self.shared,
                self.pid,
                self.vcpu,
                &mut status_io(&mut status),
            );
            self.watchdog.disarm();
            r.unwrap()
        };
        match (exit, status) {
            (RunExit::Stopped, Some(s)) => Ok(s),
            (e, _) => Err(e),
        }
    }

    /// Point the guest at a new task (mailbox + registers back to the start).
    fn restart(&self, mode: GuestMode) {
        let mut h = self.host();
        self.low
            .update(
                &mut h,
                self.pid,
                MAILBOX_GPA as usize,
                PAGE as usize,
                |mb| write_params(mb, &params(mode)),
            )
            .unwrap();
        h.vcpu(self.pid, self.vcpu)
            .unwrap()
            .lock()
            .unwrap()
            .set_regs(&initial_regs())
            .unwrap();
    }

    fn present(&self) -> u64 {
        let h = self.host();
        let f = h.fd_file(self.pid, self.gmem).unwrap();
        match h.files().kind(f) {
            Some(FileKind::GuestMemfd(g)) => g.pages.nr_present(),
            _ => panic!("not a guest_memfd"),
        }
    }

    /// The data as the host sees it: through a user mapping of the guest_memfd, only the
    /// first `len` bytes (reading a hole there would allocate it).
    fn host_data(&self, len: u64) -> Vec<u8> {
        let mut h = self.host();
        let m = h
            .mmap(
                self.pid,
                self.gmem,
                GMEM_SIZE,
                libc::PROT_READ,
                libc::MAP_SHARED,
                0,
            )
            .unwrap();
        let mut buf = vec![0u8; len as usize];
        h.user_read(self.pid, m.addr, &mut buf).unwrap();
        h.munmap(self.pid, m).unwrap();
        buf
    }

    fn first_bad(&self) -> Option<u64> {
        let mut h = self.host();
        read_report(
            &self
                .low
                .read(&mut h, self.pid, MAILBOX_GPA as usize, MAILBOX_LEN),
        )
        .unwrap()
        .first_bad
    }
}

fn params(mode: GuestMode) -> GuestParams {
    GuestParams {
        data_gpa: DATA_GPA,
        data_len: DATA_LEN,
        mode,
    }
}

/// Threads of this process named like the fault service.
fn service_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| {
                    std::fs::read_to_string(e.path().join("comm"))
                        .is_ok_and(|c| c.trim() == "gmem-faults")
                })
                .count()
        })
        .unwrap_or(0)
}

fn wait_for_service_threads(n: usize) -> bool {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(5) {
        if service_threads() == n {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[test]
fn guest_writes_into_an_unallocated_guest_memfd() {
    if !kvm_available("guest_writes_into_an_unallocated_guest_memfd") {
        return;
    }
    let _s = serial();
    let g = Guest::new(GuestMode::Write, 0);
    assert_eq!(g.present(), 0);
    let t = Instant::now();
    assert_eq!(g.run(), Ok(STATUS_WRITTEN));
    let cold = t.elapsed();
    // Exactly the written pages came in; holes stay holes.
    assert_eq!(g.present(), DATA_PAGES);
    let data = g.host_data(DATA_LEN);
    assert_eq!(
        find_mismatch(&data, 0),
        None,
        "host reads what the guest wrote"
    );
    assert_eq!(
        g.present(),
        DATA_PAGES,
        "reading present pages allocates nothing"
    );

    // The guest sees the same bytes, and a second write takes no faults.
    g.restart(GuestMode::Verify);
    assert_eq!(g.run(), Ok(STATUS_VERIFY_OK));
    g.restart(GuestMode::Write);
    let t = Instant::now();
    assert_eq!(g.run(), Ok(STATUS_WRITTEN));
    let warm = t.elapsed();
    assert_eq!(g.present(), DATA_PAGES);

    // The same write into a fallocated guest_memfd: every page present, but still the first
    // touch by this VM (the shadow-MMU fault).
    let p = Guest::new(GuestMode::Write, DATA_LEN);
    let t = Instant::now();
    assert_eq!(p.run(), Ok(STATUS_WRITTEN));
    let prefaulted = t.elapsed();
    drop(p);
    let per_fault = cold.saturating_sub(prefaulted).as_secs_f64() * 1e6 / DATA_PAGES as f64;
    note(&format!(
        "guest write of 5 MiB: {:.1} ms with {DATA_PAGES} demand faults, {:.1} ms fallocated \
         first, {:.2} ms warm: {:.0} µs per demand fault ({:.0} µs per page all in)",
        cold.as_secs_f64() * 1e3,
        prefaulted.as_secs_f64() * 1e3,
        warm.as_secs_f64() * 1e3,
        per_fault,
        cold.as_secs_f64() * 1e6 / DATA_PAGES as f64,
    ));

    // vcpu_run round trip when nothing faults (the guest repeats its final OUT).
    let mut rt = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        assert_eq!(g.run(), Ok(STATUS_WRITTEN));
        rt.push(t.elapsed().as_secs_f64() * 1e6);
    }
    note(&format!(
        "vcpu_run round trip with the fault service: {:.0} µs (median of 50)",
        median(rt)
    ));
}

#[test]
fn punched_page_faults_in_again_as_zeros() {
    if !kvm_available("punched_page_faults_in_again_as_zeros") {
        return;
    }
    let _s = serial();
    let g = Guest::new(GuestMode::Write, 0);
    assert_eq!(g.run(), Ok(STATUS_WRITTEN));
    assert_eq!(g.present(), DATA_PAGES);
    // Punch page 7: the kernel mapping gets a registered hole there again.
    g.host()
        .fallocate(
            g.pid,
            g.gmem,
            libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE,
            7 * PAGE,
            PAGE,
        )
        .unwrap();
    assert_eq!(g.present(), DATA_PAGES - 1);
    g.restart(GuestMode::Verify);
    assert_eq!(g.run(), Ok(STATUS_VERIFY_FAILED));
    assert_eq!(
        g.first_bad(),
        Some(7 * PAGE),
        "the punched page reads as zeros"
    );
    assert_eq!(g.present(), DATA_PAGES, "the guest's read faulted it in");
    g.restart(GuestMode::Write);
    assert_eq!(g.run(), Ok(STATUS_WRITTEN));
    assert_eq!(find_mismatch(&g.host_data(DATA_LEN), 0), None);
}

#[test]
fn frozen_guest_memfd_returns_the_fault_to_the_vmm() {
    if !kvm_available("frozen_guest_memfd_returns_the_fault_to_the_vmm") {
        return;
    }
    let _s = serial();
    let g = Guest::new(GuestMode::Write, 0);
    let s = {
        let mut h = g.host();
        let dev = h.open(g.pid, "/dev/liveupdate", 0).unwrap();
        let s = create_session(&mut h, g.pid, dev, "frozen-faults").unwrap();
        preserve_fd(&mut h, g.pid, s, g.gmem, 0x42).unwrap();
        s
    };
    let mut t_refused = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        assert_eq!(
            g.run(),
            Err(RunExit::MemoryFault {
                gpa: DATA_GPA,
                size: PAGE,
                errno: Errno::EPERM
            }),
            "the first write is refused, again on every run while frozen"
        );
        t_refused.push(t.elapsed().as_secs_f64() * 1e6);
    }
    assert_eq!(g.present(), 0, "nothing allocated while frozen");
    // Closing the session unfreezes; the blocked write is retried and completes.
    g.host().close(g.pid, s).unwrap();
    assert_eq!(g.run(), Ok(STATUS_WRITTEN));
    assert_eq!(g.present(), DATA_PAGES);
    assert_eq!(find_mismatch(&g.host_data(DATA_LEN), 0), None);
    note(&format!(
        "frozen guest_memfd: vcpu_run returns MemoryFault(EPERM) after {:.0} µs (median of 5, \
         fault + refusal + kick)",
        median(t_refused)
    ));
}

#[test]
fn frozen_fault_reports_the_gpa_past_the_present_pages() {
    if !kvm_available("frozen_fault_reports_the_gpa_past_the_present_pages") {
        return;
    }
    let _s = serial();
    // 1 MiB + 3 pages are present; the guest writes them and faults on the next page.
    let pre = MIB + 3 * PAGE;
    let g = Guest::new(GuestMode::Write, pre);
    let s = {
        let mut h = g.host();
        let dev = h.open(g.pid, "/dev/liveupdate", 0).unwrap();
        let s = create_session(&mut h, g.pid, dev, "frozen-gpa").unwrap();
        preserve_fd(&mut h, g.pid, s, g.gmem, 0x43).unwrap();
        s
    };
    assert_eq!(
        g.run(),
        Err(RunExit::MemoryFault {
            gpa: DATA_GPA + pre,
            size: PAGE,
            errno: Errno::EPERM
        })
    );
    assert_eq!(g.present(), pre / PAGE);
    assert_eq!(
        find_mismatch(&g.host_data(pre), 0),
        None,
        "the present part is written"
    );
    g.host().close(g.pid, s).unwrap();
    assert_eq!(g.run(), Ok(STATUS_WRITTEN));
    assert_eq!(g.present(), DATA_PAGES);
    assert_eq!(find_mismatch(&g.host_data(DATA_LEN), 0), None);
}

#[test]
fn fault_service_holds_no_reference_and_ends_with_the_host() {
    if !kvm_available("fault_service_holds_no_reference_and_ends_with_the_host") {
        return;
    }
    let _s = serial();
    assert!(
        wait_for_service_threads(0),
        "services of earlier tests ended"
    );
    let g = Guest::new(GuestMode::Write, 0);
    assert_eq!(service_threads(), 0, "binding alone starts no thread");
    assert_eq!(g.run(), Ok(STATUS_WRITTEN));
    assert_eq!(service_threads(), 1);
    assert_eq!(
        Arc::strong_count(&g.shared),
        1,
        "the service holds only a Weak"
    );
    assert_eq!(
        Host::start_fault_service(&g.shared),
        Ok(true),
        "already running"
    );
    assert_eq!(service_threads(), 1);

    // Moved to another Arc (as `Arc::try_unwrap` + a new Arc does), the host gets a new
    // service and the old one ends.
    let Guest {
        shared,
        pid,
        gmem,
        vcpu,
        low,
        watchdog,
    } = g;
    let host = Arc::try_unwrap(shared)
        .expect("no other reference")
        .into_inner()
        .unwrap();
    let g = Guest {
        shared: Arc::new(Mutex::new(host)),
        pid,
        gmem,
        vcpu,
        low,
        watchdog,
    };
    g.restart(GuestMode::Verify);
    assert_eq!(g.run(), Ok(STATUS_VERIFY_OK));
    assert!(wait_for_service_threads(1), "one service after the move");

    drop(g);
    assert!(
        wait_for_service_threads(0),
        "the service thread ends with the host"
    );
}
