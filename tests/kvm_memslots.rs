//! Memslots own their memory (issue 9): misuse of `KVM_SET_USER_MEMORY_REGION2` through the
//! host's ioctl path gets Linux's errno and never gives a guest host memory outside its slots;
//! windows stay reserved while KVM uses them; frames leave every window before they are freed.
//!
//! Every test skips with a loud `SKIP:` line when `/dev/kvm` cannot be opened, unless
//! `HANDOVER_REQUIRE_KVM=1`, in which case it fails.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use handover::abi::kvm::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};
use handover::host::files::FileKind;
use handover::host::Host;
use handover::kexec::BootParams;
use handover::kvm::RunExit;
use handover::uapi::{Errno, Pid, UserMapping};
use handover::vmm::guest::*;
use handover::vmm::libkvm::*;

const DATA_GPA: u64 = 4 << 30;
const GMEM_SIZE: u64 = 16 << 20;
const PAGE: u64 = 4096;
const RW: i32 = libc::PROT_READ | libc::PROT_WRITE;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// A VM of one user process: low memory is a memfd of the host mapped by that process and
/// bound as a plain slot; the data is a guest_memfd at 4 GiB.
struct Vm {
    shared: Arc<Mutex<Host>>,
    pid: Pid,
    vm: i32,
    gmem: i32,
    low: UserMapping,
    vcpu: i32,
}

fn host() -> Host {
    Host::boot(BootParams {
        ram_size: 256 << 20,
        ..Default::default()
    })
    .unwrap()
}

/// Low memory for the guest image: a host memfd, mapped by `pid`.
fn low_memory(h: &mut Host, pid: Pid) -> UserMapping {
    let fd = h.memfd_create(pid, "low", 0).unwrap();
    h.ftruncate(pid, fd, LOW_MEM_SIZE as u64).unwrap();
    h.mmap(pid, fd, LOW_MEM_SIZE as u64, RW, libc::MAP_SHARED, 0)
        .unwrap()
}

fn params(mode: GuestMode, len: u64) -> GuestParams {
    GuestParams {
        data_gpa: DATA_GPA,
        data_len: len,
        mode,
    }
}

impl Vm {
    /// `data_slots`: (slot, guest_memfd offset, size) bound at `DATA_GPA + offset`.
    fn new(h: Host, data_slots: &[(u32, u64, u64)]) -> Vm {
        let mut h = h;
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
        let low = low_memory(&mut h, pid);
        set_memory_region2(
            &mut h,
            pid,
            vm,
            Region {
                slot: 0,
                gpa: 0,
                size: LOW_MEM_SIZE as u64,
                uaddr: low.addr as u64,
                gmem: None,
            },
        )
        .unwrap();
        for &(slot, off, size) in data_slots {
            set_memory_region2(
                &mut h,
                pid,
                vm,
                Region {
                    slot,
                    gpa: DATA_GPA + off,
                    size,
                    uaddr: 0,
                    gmem: Some((gmem, off)),
                },
            )
            .unwrap();
        }
        let vcpu = create_vcpu(&mut h, pid, vm, 0).unwrap();
        let kvm_sys = h.real_kvm().unwrap();
        {
            let v = h.vcpu(pid, vcpu).unwrap();
            let v = v.lock().unwrap();
            configure_vcpu(&kvm_sys, &v).unwrap();
        }
        let me = Vm {
            shared: Arc::new(Mutex::new(h)),
            pid,
            vm,
            gmem,
            low,
            vcpu,
        };
        me.program(params(GuestMode::Write, PAGE));
        me
    }

    fn host(&self) -> MutexGuard<'_, Host> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Write the guest image for `p` into low memory and reset the registers.
    fn program(&self, p: GuestParams) {
        let mut img = vec![0u8; LOW_MEM_SIZE];
        build_image(&mut img, &p).unwrap();
        let mut h = self.host();
        h.user_write(self.pid, self.low.addr, &img).unwrap();
        h.vcpu(self.pid, self.vcpu)
            .unwrap()
            .lock()
            .unwrap()
            .set_regs(&initial_regs())
            .unwrap();
    }

    /// Registers back to the start: the same program runs again.
    fn restart(&self) {
        let h = self.host();
        h.vcpu(self.pid, self.vcpu)
            .unwrap()
            .lock()
            .unwrap()
            .set_regs(&initial_regs())
            .unwrap();
    }

    /// One run: `Ok(status)` when the guest reported, else how the run ended.
    fn run(&self) -> Result<u64, String> {
        let mut status = None;
        let r = Host::vcpu_run(
            &self.shared,
            self.pid,
            self.vcpu,
            &mut status_io(&mut status),
        );
        match r {
            Ok(RunExit::Stopped) => status.ok_or_else(|| "stopped without status".into()),
            Ok(e) => Err(format!("{e:?}")),
            Err(e) => Err(format!("KVM_RUN: {e}")),
        }
    }

    fn region(&self, r: Region) -> Result<(), Errno> {
        set_memory_region2(&mut self.host(), self.pid, self.vm, r)
    }

    fn data_region(&self, slot: u32, off: u64, size: u64) -> Region {
        Region {
            slot,
            gpa: DATA_GPA + off,
            size,
            uaddr: 0,
            gmem: Some((self.gmem, off)),
        }
    }

    fn slots(&self) -> Vec<u32> {
        let h = self.host();
        let f = h.fd_file(self.pid, self.vm).unwrap();
        match h.files().kind(f) {
            Some(FileKind::Vm(v)) => v.slots.keys().copied().collect(),
            _ => panic!("not a VM"),
        }
    }

    /// Physical address of guest_memfd page `index`, if present.
    fn gmem_page(&self, index: u64) -> Option<u64> {
        let h = self.host();
        let f = h.fd_file(self.pid, self.gmem).unwrap();
        match h.files().kind(f) {
            Some(FileKind::GuestMemfd(g)) => g.pages.pa(index),
            _ => panic!("not a guest_memfd"),
        }
    }

    /// Run the Write program once and check the page the guest wrote.
    fn write_and_check(&self, off: u64) {
        self.program(GuestParams {
            data_gpa: DATA_GPA + off,
            data_len: PAGE,
            mode: GuestMode::Write,
        });
        assert_eq!(self.run(), Ok(STATUS_WRITTEN));
        let mut h = self.host();
        let m = h
            .mmap(self.pid, self.gmem, GMEM_SIZE, RW, libc::MAP_SHARED, 0)
            .unwrap();
        let mut buf = vec![0u8; PAGE as usize];
        h.user_read(self.pid, m.addr + off as usize, &mut buf)
            .unwrap();
        h.munmap(self.pid, m).unwrap();
        for (i, b) in buf.iter().enumerate() {
            assert_eq!(
                *b,
                pattern_byte(i as u64),
                "byte {i} of the page at {off:#x}"
            );
        }
    }
}

/// A thread that runs the guest's program from the start, again and again, until `stop`;
/// `each` sees every run's result.
fn run_until_stopped(
    vm: &Arc<Vm>,
    stop: &Arc<AtomicBool>,
    each: impl Fn(Result<u64, String>) + Send + 'static,
) -> std::thread::JoinHandle<()> {
    let (vm, stop) = (vm.clone(), stop.clone());
    std::thread::spawn(move || {
        while !stop.load(Ordering::SeqCst) {
            vm.restart();
            each(vm.run());
        }
    })
}

/// Is `addr` inside a mapping of this process (any protection)?
fn va_reserved(addr: usize) -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines()
        .find(|l| {
            let r = l.split_whitespace().next().unwrap_or("");
            let (a, b) = r.split_once('-').unwrap_or(("0", "0"));
            let a = usize::from_str_radix(a, 16).unwrap_or(0);
            let b = usize::from_str_radix(b, 16).unwrap_or(0);
            addr >= a && addr < b
        })
        .map(|l| l.to_string())
}

#[test]
fn plain_slot_must_lie_in_a_mapping_of_the_caller() {
    if !kvm_available("plain_slot_must_lie_in_a_mapping_of_the_caller") {
        return;
    }
    let _s = serial();
    let vm = Vm::new(host(), &[(1, 0, GMEM_SIZE)]);
    let heap = vec![0u8; 1 << 20];
    let heap_page = (heap.as_ptr() as u64 + PAGE - 1) & !(PAGE - 1);
    let stack_var = 0u64;
    let stack_page = (&stack_var as *const u64 as u64) & !(PAGE - 1);
    let other = {
        let mut h = vm.host();
        let p2 = h.spawn();
        low_memory(&mut h, p2)
    };
    let plain = |uaddr: u64, size: u64, gpa: u64| Region {
        slot: 5,
        gpa,
        size,
        uaddr,
        gmem: None,
    };
    let low = vm.low.addr as u64;
    let cases: [(&str, Region, Errno); 9] = [
        ("host heap", plain(heap_page, PAGE, 8 << 30), Errno::EFAULT),
        (
            "host stack",
            plain(stack_page, PAGE, 8 << 30),
            Errno::EFAULT,
        ),
        (
            "another process's mapping",
            plain(other.addr as u64, PAGE, 8 << 30),
            Errno::EFAULT,
        ),
        (
            "runs past the end of the mapping",
            plain(low, LOW_MEM_SIZE as u64 + PAGE, 8 << 30),
            Errno::EFAULT,
        ),
        (
            "address wraps",
            plain(!(PAGE - 1), 2 * PAGE, 8 << 30),
            Errno::EFAULT,
        ),
        (
            "unaligned address",
            plain(low + 8, PAGE, 8 << 30),
            Errno::EINVAL,
        ),
        (
            "unaligned size",
            plain(low, PAGE + 1, 8 << 30),
            Errno::EINVAL,
        ),
        (
            "unaligned gpa",
            plain(low, PAGE, (8 << 30) + 512),
            Errno::EINVAL,
        ),
        (
            "guest address wraps",
            plain(low, 2 * PAGE, !(PAGE - 1)),
            Errno::EINVAL,
        ),
    ];
    for (what, r, want) in cases {
        assert_eq!(vm.region(r), Err(want), "{what}");
        assert_eq!(vm.slots(), vec![0, 1], "{what}: no slot was added");
    }
    // Overlapping guest ranges: KVM's own EEXIST, and nothing changes here.
    assert_eq!(
        vm.region(plain(low, PAGE, DATA_GPA + PAGE)),
        Err(Errno::EEXIST)
    );
    assert_eq!(vm.slots(), vec![0, 1]);
    // The guest still runs on the slots it has.
    vm.write_and_check(0);
    // A slot inside the caller's own mapping is fine, also at an offset in it.
    vm.region(plain(low + PAGE, PAGE, 8 << 30)).unwrap();
    assert_eq!(vm.slots(), vec![0, 1, 5]);
}

#[test]
fn munmap_under_a_slot_empties_the_window_but_keeps_it_reserved() {
    if !kvm_available("munmap_under_a_slot_empties_the_window_but_keeps_it_reserved") {
        return;
    }
    let _s = serial();
    let vm = Vm::new(host(), &[(1, 0, GMEM_SIZE)]);
    vm.write_and_check(0);
    // A second plain slot over its own mapping of a memfd, then munmap it while bound.
    let extra = {
        let mut h = vm.host();
        let fd = h.memfd_create(vm.pid, "extra", 0).unwrap();
        h.ftruncate(vm.pid, fd, 16 * PAGE).unwrap();
        h.fallocate(vm.pid, fd, 0, 0, 16 * PAGE).unwrap();
        let m = h
            .mmap(vm.pid, fd, 16 * PAGE, RW, libc::MAP_SHARED, 0)
            .unwrap();
        h.user_write(vm.pid, m.addr, &[0xaa; 64]).unwrap();
        h.close(vm.pid, fd).unwrap();
        m
    };
    vm.region(Region {
        slot: 7,
        gpa: 8 << 30,
        size: 16 * PAGE,
        uaddr: extra.addr as u64,
        gmem: None,
    })
    .unwrap();
    let frames_before = vm.host().status().frames.used;
    vm.host().munmap(vm.pid, extra).unwrap();
    // The memfd is gone (its last reference was the mapping) and its frames are free ...
    assert!(vm.host().status().frames.used < frames_before);
    // ... but the address range stays reserved, with no access, while KVM has the slot.
    let line = va_reserved(extra.addr).expect("window unmapped under a live memslot");
    assert!(line.contains("---p"), "window still accessible: {line}");
    let mut probe = [0u8; 1];
    assert_eq!(
        vm.host().user_read(vm.pid, extra.addr, &mut probe),
        Err(Errno::EFAULT),
        "the process still reaches its munmapped range"
    );
    // The guest keeps running on its other slots.
    vm.write_and_check(PAGE);
    // Deleting the slot releases the reservation.
    vm.region(Region {
        slot: 7,
        gpa: 8 << 30,
        size: 0,
        uaddr: 0,
        gmem: None,
    })
    .unwrap();
    assert_ne!(
        va_reserved(extra.addr),
        Some(line),
        "window kept after its slot went"
    );
}

#[test]
fn chunk_slots_share_one_window_and_a_failure_leaves_the_others() {
    if !kvm_available("chunk_slots_share_one_window_and_a_failure_leaves_the_others") {
        return;
    }
    let _s = serial();
    let half = GMEM_SIZE / 2;
    let vm = Vm::new(host(), &[(1, 0, half)]);
    vm.write_and_check(0);
    // A slot number beyond KVM's limit: KVM refuses, the window of the bound chunk stays.
    assert!(vm.region(vm.data_region(0x7fff, half, half)).is_err());
    assert_eq!(vm.slots(), vec![0, 1]);
    vm.write_and_check(PAGE);
    // Bind the second chunk; then delete the first while the second stays.
    vm.region(vm.data_region(2, half, half)).unwrap();
    vm.write_and_check(half);
    vm.region(vm.data_region(1, 0, 0)).unwrap();
    assert_eq!(vm.slots(), vec![0, 2]);
    vm.write_and_check(half + PAGE);
    // Replacing the remaining chunk with a different size is KVM's EINVAL; it stays usable.
    assert_eq!(
        vm.region(vm.data_region(2, half, half - PAGE)),
        Err(Errno::EINVAL)
    );
    vm.write_and_check(half + 2 * PAGE);
    // The first chunk's gpa is no guest memory any more: the guest's access exits.
    vm.program(params(GuestMode::Write, PAGE));
    assert!(vm.run().is_err(), "the deleted slot still reached memory");
}

/// A guest writes one page over and over while the host punches it out of the guest_memfd.
/// Each frame that leaves the file must read zero when it is handed out next, to the guest
/// itself or to another file: a guest write can never land in a free frame.
#[test]
fn punch_while_the_guest_hammers_the_page() {
    if !kvm_available("punch_while_the_guest_hammers_the_page") {
        return;
    }
    let _s = serial();
    let vm = Arc::new(Vm::new(host(), &[(1, 0, GMEM_SIZE)]));
    vm.program(params(GuestMode::Write, PAGE));
    let stop = Arc::new(AtomicBool::new(false));
    let runs = Arc::new(AtomicU64::new(0));
    let guest = {
        let runs = runs.clone();
        run_until_stopped(&vm, &stop, move |r| {
            assert_eq!(r, Ok(STATUS_WRITTEN));
            runs.fetch_add(1, Ordering::SeqCst);
        })
    };
    // Another process of the host, standing for another VM: a memfd that takes frames.
    let (other, other_fd) = {
        let mut h = vm.host();
        let p = h.spawn();
        let fd = h.memfd_create(p, "other-vm", 0).unwrap();
        h.ftruncate(p, fd, PAGE).unwrap();
        (p, fd)
    };
    // The guest_memfd allocated in one go: its frames are ordinary ones, not a 2 MiB file
    // block that a fault in an empty range reserves (whose frames return to the block, and the
    // block to the buddy whole, so no other file could get the punched frame at once).
    vm.host()
        .fallocate(vm.pid, vm.gmem, libc::FALLOC_FL_KEEP_SIZE, 0, GMEM_SIZE)
        .unwrap();
    let mut punched = 0u32;
    let mut reused = 0;
    let start = std::time::Instant::now();
    let enough = |punched: u32| {
        let t = start.elapsed().as_secs();
        (t >= 3 && punched >= 200) || t >= 30
    };
    while !enough(punched) {
        let Some(pa) = vm.gmem_page(0) else {
            std::thread::yield_now();
            continue;
        };
        let mut h = vm.host();
        h.fallocate(
            vm.pid,
            vm.gmem,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            PAGE,
        )
        .unwrap();
        punched += 1;
        // The other file takes a frame (the allocator hands out the one just freed first,
        // when it can) and must see zeros.
        h.fallocate(other, other_fd, libc::FALLOC_FL_KEEP_SIZE, 0, PAGE)
            .unwrap();
        let f = h.fd_file(other, other_fd).unwrap();
        let got = match h.files().kind(f) {
            Some(FileKind::Memfd(m)) => m.pages.pa(0),
            _ => None,
        };
        reused += usize::from(got == Some(pa));
        let mut buf = vec![0u8; PAGE as usize];
        h.pread(other, other_fd, &mut buf, 0).unwrap();
        assert!(
            buf.iter().all(|&b| b == 0),
            "another file got a frame with guest data (punch {punched})"
        );
        h.fallocate(
            other,
            other_fd,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            PAGE,
        )
        .unwrap();
        drop(h);
        std::thread::yield_now();
    }
    stop.store(true, Ordering::SeqCst);
    guest.join().unwrap();
    let runs = runs.load(Ordering::SeqCst);
    eprintln!("punch while hammering: {punched} punches, {runs} guest runs, {reused} frames reused at once by the other file");
    assert!(runs > 10, "the guest hardly ran ({runs} runs)");
    assert!(
        reused > 0,
        "the test never handed a punched frame to the other file"
    );
    // The guest's page, faulted back in, holds what the guest wrote last: nothing was lost
    // into a free frame.
    vm.write_and_check(0);
}

/// Slots deleted, added again and refused by KVM under a running vCPU: the guest gets exits,
/// the host stays sound, host and KVM agree on the slots, and the data is where it was.
#[test]
fn slot_changes_while_the_vcpu_runs() {
    if !kvm_available("slot_changes_while_the_vcpu_runs") {
        return;
    }
    let _s = serial();
    let vm = Arc::new(Vm::new(host(), &[(1, 0, GMEM_SIZE)]));
    // The guest's pages are allocated up front: no demand fault can be pending while a
    // memslot changes. (A vCPU blocked on a guest_memfd demand fault during a memslot change is
    // handled by the fault service's nudge, but one run in about ten of an earlier version of
    // this test still hung there: see the issue 9 note.)
    vm.host()
        .fallocate(vm.pid, vm.gmem, libc::FALLOC_FL_KEEP_SIZE, 0, 64 * PAGE)
        .unwrap();
    vm.program(params(GuestMode::Write, 64 * PAGE));
    // Fail instead of hanging CI if a memslot change never returns.
    let done = Arc::new(AtomicBool::new(false));
    {
        let done = done.clone();
        std::thread::spawn(move || {
            for _ in 0..1200 {
                std::thread::sleep(std::time::Duration::from_millis(100));
                if done.load(Ordering::SeqCst) {
                    return;
                }
            }
            eprintln!("slot_changes_while_the_vcpu_runs: no progress in 120 s, aborting");
            std::process::abort();
        });
    }
    let stop = Arc::new(AtomicBool::new(false));
    let exits = Arc::new(AtomicU64::new(0));
    let guest = {
        let exits = exits.clone();
        run_until_stopped(&vm, &stop, move |r| {
            if r != Ok(STATUS_WRITTEN) {
                exits.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    for i in 0..200 {
        vm.region(vm.data_region(1, 0, 0)).unwrap();
        std::thread::yield_now();
        vm.region(vm.data_region(1, 0, GMEM_SIZE)).unwrap();
        // A change KVM refuses while the vCPU runs: nothing moves.
        assert!(vm.region(vm.data_region(0x7fff, 0, PAGE)).is_err());
        assert_eq!(vm.slots(), vec![0, 1]);
        if i % 10 == 0 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
    stop.store(true, Ordering::SeqCst);
    guest.join().unwrap();
    done.store(true, Ordering::SeqCst);
    eprintln!(
        "slot changes under a running vCPU: {} runs ended without their status",
        exits.load(Ordering::SeqCst)
    );
    vm.write_and_check(0);
}
