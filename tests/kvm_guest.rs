//! The CPL3 test guest (`vmm::guest`) and the vCPU helpers (`kvm::vcpu`) on the real `/dev/kvm`.
//!
//! Every test skips with a loud `SKIP:` line when `/dev/kvm` cannot be opened, unless
//! `HANDOVER_REQUIRE_KVM=1`, in which case it fails.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use handover::kvm::vcpu::{
    complete_pending_io, describe_exit, kicks_received, run_kickable, VcpuKicker, VcpuState,
};
use handover::vmm::guest::*;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{FileOffset, MmapRegion, VolatileMemory, VolatileSlice};

const DATA_GPA: u64 = 4 << 30;
const DATA_LEN: u64 = 5 << 20;
const SLOT_SIZE: usize = 16 << 20;
const PAGE: usize = 4096;

fn kvm_or_skip(test: &str) -> Option<Kvm> {
    match Kvm::new() {
        Ok(kvm) => Some(kvm),
        Err(e) => {
            if std::env::var("HANDOVER_REQUIRE_KVM").as_deref() == Ok("1") {
                panic!("{test}: /dev/kvm is required (HANDOVER_REQUIRE_KVM=1) but cannot be opened: {e}");
            }
            // Straight to fd 2: libtest captures `eprintln!` of passing tests, and a skip must
            // be seen.
            let _ = writeln!(
                std::io::stderr().lock(),
                "SKIP: /dev/kvm not available ({e}); {test} did not run (set HANDOVER_REQUIRE_KVM=1 to fail instead)"
            );
            None
        }
    }
}

/// Host monotonic time in µs.
fn now_us() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000 + t.tv_nsec as u64 / 1000
}

/// A memfd ("RAM") with one linear shared mapping, like the host image's direct map.
///
/// The guest writes this memory too, so the test touches it only through volatile copies
/// (`vm_memory`); no Rust reference into the mapping is ever formed.
struct Ram {
    map: MmapRegion,
}

impl Ram {
    fn new(size: usize) -> Ram {
        let fd = rustix::fs::memfd_create(c"kvm-guest-test", rustix::fs::MemfdFlags::CLOEXEC)
            .expect("memfd_create");
        let file = File::from(fd);
        file.set_len(size as u64).expect("ftruncate");
        let map = MmapRegion::from_file(FileOffset::new(file, 0), size).expect("mmap");
        Ram { map }
    }

    /// The memfd itself (for mapping single pages of it elsewhere).
    fn fd(&self) -> BorrowedFd<'_> {
        self.map
            .file_offset()
            .expect("a file mapping")
            .file()
            .as_fd()
    }

    /// The host address of byte `off` of the mapping, for KVM.
    fn ptr(&self, off: usize) -> *mut u8 {
        assert!(off <= self.map.size());
        self.map.as_ptr().wrapping_add(off)
    }

    fn slice(&self, off: usize, len: usize) -> VolatileSlice<'_> {
        let s = self
            .map
            .get_slice(off, len)
            .unwrap_or_else(|e| panic!("RAM {off:#x}+{len:#x}: {e}"));
        assert_eq!(s.len(), len);
        s
    }

    /// A copy of the bytes at `off..off + len`.
    fn read(&self, off: usize, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        assert_eq!(self.slice(off, len).copy_to(&mut buf[..]), len);
        buf
    }

    /// Store `data` at `off`.
    fn write(&self, off: usize, data: &[u8]) {
        self.slice(off, data.len()).copy_from(data);
    }

    /// Copy `off..off + len` out, let `f` edit the copy, and store it back.
    fn update<R>(&self, off: usize, len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
        let mut buf = self.read(off, len);
        let r = f(&mut buf);
        self.write(off, &buf);
        r
    }
}

fn set_slot(vm: &VmFd, slot: u32, gpa: u64, hva: *mut u8, size: usize) {
    let region = kvm_userspace_memory_region {
        slot,
        flags: 0,
        guest_phys_addr: gpa,
        memory_size: size as u64,
        userspace_addr: hva as u64,
    };
    // SAFETY: `hva..hva + size` is a live mapping owned by the test that outlives the VM.
    unsafe { vm.set_user_memory_region(region) }.expect("KVM_SET_USER_MEMORY_REGION");
}

/// Low memory (2 MiB at GPA 0) and a 16 MiB data slot at 4 GiB, both in one memfd.
fn linear_vm(kvm: &Kvm, ram: &Ram) -> VmFd {
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    set_slot(&vm, 0, 0, ram.ptr(0), LOW_MEM_SIZE);
    set_slot(&vm, 1, DATA_GPA, ram.ptr(LOW_MEM_SIZE), SLOT_SIZE);
    vm
}

fn new_vcpu(kvm: &Kvm, vm: &VmFd) -> VcpuFd {
    let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
    configure_vcpu(kvm, &vcpu).expect("configure_vcpu");
    vcpu
}

fn params(mode: GuestMode) -> GuestParams {
    GuestParams {
        data_gpa: DATA_GPA,
        data_len: DATA_LEN,
        mode,
    }
}

/// Point the guest at a new task: new parameters in the mailbox, registers back to the start.
fn restart(ram: &Ram, vcpu: &VcpuFd, p: &GuestParams) {
    ram.update(MAILBOX_GPA as usize, PAGE, |mb| write_params(mb, p))
        .unwrap();
    vcpu.set_regs(&initial_regs()).unwrap();
}

fn report(ram: &Ram) -> GuestReport {
    read_report(&ram.read(MAILBOX_GPA as usize, MAILBOX_LEN)).unwrap()
}

/// Run until the guest OUTs a status; answer clock and proceed reads.
fn run_to_status(vcpu: &mut VcpuFd, proceed: u32) -> u64 {
    loop {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(PORT_STATUS, d)) => {
                return u64::from(u32::from_le_bytes(d.try_into().unwrap()))
            }
            Ok(VcpuExit::IoIn(PORT_CLOCK, d)) => {
                d.copy_from_slice(&(now_us() as u32).to_le_bytes())
            }
            Ok(VcpuExit::IoIn(PORT_PROCEED, d)) => d.copy_from_slice(&proceed.to_le_bytes()),
            Ok(exit) => panic!("unexpected exit {}", describe_exit(&exit)),
            Err(e) => panic!("KVM_RUN: {e}"),
        }
    }
}

#[test]
fn guest_writes_pattern_at_4gib() {
    let Some(kvm) = kvm_or_skip("guest_writes_pattern_at_4gib") else {
        return;
    };
    let ram = Ram::new(LOW_MEM_SIZE + SLOT_SIZE);
    let vm = linear_vm(&kvm, &ram);
    ram.update(0, LOW_MEM_SIZE, |low| {
        build_image(low, &params(GuestMode::Write))
    })
    .unwrap();
    let mut vcpu = new_vcpu(&kvm, &vm);

    assert_eq!(run_to_status(&mut vcpu, 0), STATUS_WRITTEN);
    assert_eq!(report(&ram).status, STATUS_WRITTEN);
    // The guest ran in user mode all along.
    let sregs = vcpu.get_sregs().unwrap();
    assert_eq!(
        (sregs.cs.selector, sregs.cs.dpl, sregs.cs.l),
        (USER_CS, 3, 1)
    );
    // Every byte, read through the memfd.
    let data = ram.read(LOW_MEM_SIZE, SLOT_SIZE);
    assert_eq!(find_mismatch(&data[..DATA_LEN as usize], 0), None);
    assert!(
        data[DATA_LEN as usize..].iter().all(|&b| b == 0),
        "the guest wrote past the data"
    );
    // A final status repeats.
    assert_eq!(run_to_status(&mut vcpu, 0), STATUS_WRITTEN);
}

#[test]
fn prefilled_run_update_times_a_read_pass_and_verifies_without_writing() {
    let Some(kvm) =
        kvm_or_skip("prefilled_run_update_times_a_read_pass_and_verifies_without_writing")
    else {
        return;
    };
    let ram = Ram::new(LOW_MEM_SIZE + SLOT_SIZE);
    let vm = linear_vm(&kvm, &ram);
    ram.update(0, LOW_MEM_SIZE, |low| {
        build_image(low, &params(GuestMode::RunUpdatePrefilled))
    })
    .unwrap();
    let mut vcpu = new_vcpu(&kvm, &vm);
    // The host's pattern, with one byte off: the guest must not write over it.
    let bad = 1_234_567usize;
    ram.update(LOW_MEM_SIZE, DATA_LEN as usize, |d| {
        fill_pattern(d, 0);
        d[bad] ^= 0x10;
    });
    // First exit: the clock read that starts the first read pass, before any status (a second
    // one starts the warm pass).
    match vcpu.run() {
        Ok(VcpuExit::IoIn(PORT_CLOCK, d)) => d.copy_from_slice(&(now_us() as u32).to_le_bytes()),
        Ok(exit) => panic!(
            "expected the pre-pass clock read, got {}",
            describe_exit(&exit)
        ),
        Err(e) => panic!("KVM_RUN: {e}"),
    }
    assert_eq!(run_to_status(&mut vcpu, 0), STATUS_WRITTEN);
    // The pre-pass saw the bad byte (its result is not reported as a status).
    assert_eq!(report(&ram).first_bad, Some(bad as u64));
    assert_eq!(
        ram.read(LOW_MEM_SIZE + bad, 1)[0],
        pattern_byte(bad as u64) ^ 0x10
    );
    // Proceed: the final verify fails at that byte; fixed, a new run verifies OK.
    assert_eq!(run_to_status(&mut vcpu, 1), STATUS_VERIFY_FAILED);
    assert_eq!(report(&ram).first_bad, Some(bad as u64));
    ram.update(LOW_MEM_SIZE, DATA_LEN as usize, |d| d[bad] ^= 0x10);
    restart(&ram, &vcpu, &params(GuestMode::RunUpdatePrefilled));
    assert_eq!(run_to_status(&mut vcpu, 0), STATUS_WRITTEN);
    assert_eq!(run_to_status(&mut vcpu, 1), STATUS_VERIFY_OK);
    assert_eq!(report(&ram).first_bad, None);
}

#[test]
fn guest_verify_reports_first_bad_offset() {
    let Some(kvm) = kvm_or_skip("guest_verify_reports_first_bad_offset") else {
        return;
    };
    let ram = Ram::new(LOW_MEM_SIZE + SLOT_SIZE);
    let vm = linear_vm(&kvm, &ram);
    ram.update(0, LOW_MEM_SIZE, |low| {
        build_image(low, &params(GuestMode::Verify))
    })
    .unwrap();
    let mut vcpu = new_vcpu(&kvm, &vm);
    ram.update(LOW_MEM_SIZE, DATA_LEN as usize, |d| fill_pattern(d, 0));

    assert_eq!(run_to_status(&mut vcpu, 0), STATUS_VERIFY_OK);
    assert_eq!(report(&ram).first_bad, None);

    // One flipped bit in the middle of an 8-byte word, then one in the first byte.
    for off in [3_000_001usize, 0] {
        ram.update(LOW_MEM_SIZE, DATA_LEN as usize, |d| d[off] ^= 0x40);
        restart(&ram, &vcpu, &params(GuestMode::Verify));
        assert_eq!(run_to_status(&mut vcpu, 0), STATUS_VERIFY_FAILED);
        let r = report(&ram);
        assert_eq!(
            (r.status, r.first_bad),
            (STATUS_VERIFY_FAILED, Some(off as u64))
        );
    }

    // A length that is not a multiple of 8: the tail is checked byte by byte, and only the
    // data is checked (the byte after it may be anything).
    ram.update(LOW_MEM_SIZE, DATA_LEN as usize, |d| fill_pattern(d, 0));
    let len = DATA_LEN - 3;
    let odd = GuestParams {
        data_len: len,
        ..params(GuestMode::Verify)
    };
    ram.update(LOW_MEM_SIZE, DATA_LEN as usize, |d| d[len as usize] ^= 1);
    restart(&ram, &vcpu, &odd);
    assert_eq!(run_to_status(&mut vcpu, 0), STATUS_VERIFY_OK);
    ram.update(LOW_MEM_SIZE, DATA_LEN as usize, |d| {
        d[len as usize - 1] ^= 1
    });
    restart(&ram, &vcpu, &odd);
    assert_eq!(run_to_status(&mut vcpu, 0), STATUS_VERIFY_FAILED);
    assert_eq!(report(&ram).first_bad, Some(len - 1));

    // A mode the guest does not know.
    ram.update(MAILBOX_GPA as usize, PAGE, |mb| write_params(mb, &odd))
        .unwrap();
    ram.write(MAILBOX_GPA as usize + MB_MODE, &77u64.to_le_bytes());
    vcpu.set_regs(&initial_regs()).unwrap();
    assert_eq!(run_to_status(&mut vcpu, 0), STATUS_BAD_MODE);
}

#[test]
fn complete_pending_io_finishes_an_in() {
    let Some(kvm) = kvm_or_skip("complete_pending_io_finishes_an_in") else {
        return;
    };
    let ram = Ram::new(LOW_MEM_SIZE + SLOT_SIZE);
    let vm = linear_vm(&kvm, &ram);
    ram.update(0, LOW_MEM_SIZE, |low| {
        build_image(low, &params(GuestMode::RunUpdate))
    })
    .unwrap();
    let mut vcpu = new_vcpu(&kvm, &vm);
    assert_eq!(run_to_status(&mut vcpu, 0), STATUS_WRITTEN);
    match vcpu.run() {
        Ok(VcpuExit::IoIn(PORT_CLOCK, d)) => d.copy_from_slice(&0x1234_5678u32.to_le_bytes()),
        other => panic!("expected the first clock read, got {other:?}"),
    }
    let before = vcpu.get_regs().unwrap();
    complete_pending_io(&mut vcpu).unwrap();
    let after = vcpu.get_regs().unwrap();
    assert_eq!(after.rax & 0xffff_ffff, 0x1234_5678);
    assert_eq!(
        after.rip,
        before.rip + 1,
        "the 1-byte `in eax, dx` was retired"
    );
}

#[test]
fn run_update_pause_save_new_vm_restore() {
    let Some(kvm) = kvm_or_skip("run_update_pause_save_new_vm_restore") else {
        return;
    };
    let ram = Arc::new(Ram::new(LOW_MEM_SIZE + SLOT_SIZE));
    let vm = linear_vm(&kvm, &ram);
    ram.update(0, LOW_MEM_SIZE, |low| {
        build_image(low, &params(GuestMode::RunUpdate))
    })
    .unwrap();
    let mut vcpu = new_vcpu(&kvm, &vm);
    assert_eq!(run_to_status(&mut vcpu, 0), STATUS_WRITTEN);

    // The vCPU thread answers clock reads (remembering the last answer) and "not yet" to
    // proceed, until it is kicked.
    let kicker = Arc::new(VcpuKicker::new());
    let last_clock = Arc::new(AtomicU32::new(0));
    let thread = {
        let (kicker, last_clock) = (kicker.clone(), last_clock.clone());
        std::thread::spawn(move || {
            let _target = kicker.register_current_thread().unwrap();
            let mut clock_reads = 0u64;
            loop {
                match run_kickable(&mut vcpu) {
                    Ok(VcpuExit::IoIn(PORT_CLOCK, d)) => {
                        let t = now_us() as u32;
                        last_clock.store(t, Ordering::SeqCst);
                        d.copy_from_slice(&t.to_le_bytes());
                        clock_reads += 1;
                    }
                    Ok(VcpuExit::IoIn(PORT_PROCEED, d)) => d.copy_from_slice(&0u32.to_le_bytes()),
                    Ok(exit) => panic!("unexpected exit {}", describe_exit(&exit)),
                    Err(e) if e.errno() == libc::EINTR => {
                        if kicker.take_kick() {
                            return (vcpu, clock_reads);
                        }
                    }
                    Err(e) => panic!("KVM_RUN: {e}"),
                }
            }
        })
    };
    // Let the guest loop for a while, then pause it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while last_clock.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "the guest never read the clock");
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(20));
    kicker.kick().unwrap();
    let (vcpu, clock_reads) = thread.join().unwrap();
    assert!(
        clock_reads > 2,
        "only {clock_reads} clock reads before the pause"
    );
    let last_before = last_clock.load(Ordering::SeqCst);

    // Save, store the state in a memfd and read it back, destroy the VM.
    let state = VcpuState::save(&vcpu).unwrap();
    assert_eq!(state.sregs.cs.dpl, 3);
    let bytes = state.to_bytes();
    let stored = Ram::new(bytes.len().div_ceil(PAGE) * PAGE);
    stored.write(0, &bytes);
    let state = VcpuState::from_bytes(&stored.read(0, bytes.len())).unwrap();
    drop(kicker);
    drop(vcpu);
    drop(vm);
    std::thread::sleep(Duration::from_millis(3));

    // A new VM and vCPU on the same memory.
    let vm = linear_vm(&kvm, &ram);
    let mut vcpu = vm.create_vcpu(0).unwrap();
    state.restore(&vcpu).unwrap();
    let sregs = vcpu.get_sregs().unwrap();
    assert_eq!((sregs.cs.selector, sregs.cs.dpl), (USER_CS, 3));
    assert_eq!(vcpu.get_regs().unwrap().rip, state.regs.rip);

    // Resume: the first clock answer after the pause closes the largest gap.
    let mut first_after = None;
    let mut reads_after = 0u64;
    let status = loop {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(PORT_STATUS, d)) => {
                break u64::from(u32::from_le_bytes(d.try_into().unwrap()))
            }
            Ok(VcpuExit::IoIn(PORT_CLOCK, d)) => {
                let t = now_us() as u32;
                first_after.get_or_insert(t);
                reads_after += 1;
                d.copy_from_slice(&t.to_le_bytes());
            }
            Ok(VcpuExit::IoIn(PORT_PROCEED, d)) => d.copy_from_slice(&1u32.to_le_bytes()),
            Ok(exit) => panic!("unexpected exit {}", describe_exit(&exit)),
            Err(e) => panic!("KVM_RUN: {e}"),
        }
    };
    assert_eq!(status, STATUS_VERIFY_OK);
    let r = report(&ram);
    assert_eq!((r.status, r.first_bad), (STATUS_VERIFY_OK, None));
    let pause_gap = u64::from(
        first_after
            .expect("no clock read after resume")
            .wrapping_sub(last_before),
    );
    assert!(
        pause_gap >= 3_000,
        "the pause lasted at least the 3 ms sleep, measured {pause_gap} µs"
    );
    assert!(
        r.max_gap_us >= pause_gap,
        "guest max gap {} µs < pause gap {pause_gap} µs",
        r.max_gap_us
    );
    // `loops` counts the clock reads after the first one.
    assert!(reads_after >= 1);
    assert_eq!(r.loops, clock_reads - 1 + reads_after);
}

#[test]
fn scattered_per_page_mapping_with_a_hole() {
    let Some(kvm) = kvm_or_skip("scattered_per_page_mapping_with_a_hole") else {
        return;
    };
    let pages = SLOT_SIZE / PAGE;
    // The slot's pages plus one spare page at the end.
    let ram = Ram::new(LOW_MEM_SIZE + SLOT_SIZE + PAGE);
    // Page i of the slot is memfd page `offset(i)`: a permutation of the data area.
    let offset = |i: usize| LOW_MEM_SIZE + PAGE * ((i * 7919 + 13) % pages);
    // Reserve the slot's address range, then map each page separately.
    // SAFETY: a fresh PROT_NONE reservation placed by the kernel.
    let va = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            SLOT_SIZE,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    assert_ne!(va, libc::MAP_FAILED);
    let va = va.cast::<u8>();
    let map_page = |i: usize| {
        // SAFETY: replaces page `i` of our own reservation (MAP_FIXED inside it) with a shared
        // mapping of a memfd page; no Rust reference points into the reservation.
        let p = unsafe {
            libc::mmap(
                va.add(i * PAGE).cast(),
                PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                ram.fd().as_raw_fd(),
                offset(i) as i64,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
    };
    let hole = 300usize;
    for i in (0..pages).filter(|&i| i != hole) {
        map_page(i);
    }

    let vm = kvm.create_vm().unwrap();
    set_slot(&vm, 0, 0, ram.ptr(0), LOW_MEM_SIZE);
    set_slot(&vm, 1, DATA_GPA, va, SLOT_SIZE);
    ram.update(0, LOW_MEM_SIZE, |low| {
        build_image(low, &params(GuestMode::Write))
    })
    .unwrap();
    let mut vcpu = new_vcpu(&kvm, &vm);

    // The guest reaches the hole: KVM_RUN fails with EFAULT (no KVM_EXIT_MEMORY_FAULT on this
    // kind of slot). Back the page and run again: the guest continues.
    let mut faults = 0;
    let status = loop {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(PORT_STATUS, d)) => {
                break u64::from(u32::from_le_bytes(d.try_into().unwrap()))
            }
            Ok(VcpuExit::MemoryFault { gpa, .. }) => {
                assert_eq!(gpa & !(PAGE as u64 - 1), DATA_GPA + (hole * PAGE) as u64);
                map_page(hole);
                faults += 1;
            }
            Err(e) if e.errno() == libc::EFAULT => {
                let regs = vcpu.get_regs().unwrap();
                // The fill loop's store address is rdi + rcx.
                assert_eq!(
                    (regs.rdi + regs.rcx) / PAGE as u64,
                    DATA_GPA / PAGE as u64 + hole as u64
                );
                map_page(hole);
                faults += 1;
            }
            Ok(exit) => panic!("unexpected exit {}", describe_exit(&exit)),
            Err(e) => panic!("KVM_RUN: {e}"),
        }
        assert!(faults <= 1, "faulted again after backing the page");
    };
    assert_eq!(status, STATUS_WRITTEN);
    assert_eq!(faults, 1);

    // Every byte landed at its scattered memfd offset.
    for i in 0..DATA_LEN as usize / PAGE {
        let page = ram.read(offset(i), PAGE);
        assert_eq!(
            find_mismatch(&page, (i * PAGE) as u64),
            None,
            "slot page {i}"
        );
    }
    // And the guest reads it back through the same scattered mapping.
    restart(&ram, &vcpu, &params(GuestMode::Verify));
    assert_eq!(run_to_status(&mut vcpu, 0), STATUS_VERIFY_OK);
    // Remapping a page elsewhere while the VM lives is seen by the guest (MMU notifier).
    let moved = 7usize;
    let dst = LOW_MEM_SIZE + SLOT_SIZE; // the spare page
    let copy = ram.read(offset(moved), PAGE);
    ram.write(dst, &copy);
    ram.update(dst, PAGE, |p| p[99] ^= 0xff);
    // SAFETY: as in `map_page`, for page `moved` of the reservation.
    let p = unsafe {
        libc::mmap(
            va.add(moved * PAGE).cast(),
            PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_FIXED,
            ram.fd().as_raw_fd(),
            dst as i64,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    restart(&ram, &vcpu, &params(GuestMode::Verify));
    assert_eq!(run_to_status(&mut vcpu, 0), STATUS_VERIFY_FAILED);
    assert_eq!(report(&ram).first_bad, Some((moved * PAGE + 99) as u64));

    drop(vcpu);
    drop(vm);
    // SAFETY: the VM that used the reservation is gone; unmap our own range.
    unsafe { libc::munmap(va.cast(), SLOT_SIZE) };
}

/// A vCPU whose guest spins in `jmp $` at its entry point: it never exits by itself.
fn spinning_vcpu(kvm: &Kvm, ram: &Ram) -> (VmFd, VcpuFd) {
    let vm = linear_vm(kvm, ram);
    ram.update(0, LOW_MEM_SIZE, |b| {
        build_image(b, &params(GuestMode::Write))
    })
    .unwrap();
    ram.write(CODE_GPA as usize, &[0xeb, 0xfe]);
    let vcpu = new_vcpu(kvm, &vm);
    (vm, vcpu)
}

/// Wait for the vCPU thread's result. If it does not come, the kick was lost: interrupt the
/// thread's `KVM_RUN` with a plain signal (which works without `immediate_exit`) so that the test
/// fails instead of hanging.
fn join_or_rescue<T: Send + 'static>(
    what: &str,
    rx: &std::sync::mpsc::Receiver<T>,
    thread: &std::thread::JoinHandle<()>,
) -> T {
    use vmm_sys_util::signal::Killable;
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(v) => v,
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            panic!("{what}: the vCPU thread ended without a result")
        }
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            for _ in 0..50 {
                if thread.is_finished() {
                    break;
                }
                let _ = thread.kill(handover::kvm::vcpu::kick_signal());
                std::thread::sleep(Duration::from_millis(100));
            }
            panic!("{what}: the kick was lost, the vCPU kept running");
        }
    }
}

#[test]
fn kick_before_run_is_not_lost() {
    let Some(kvm) = kvm_or_skip("kick_before_run_is_not_lost") else {
        return;
    };
    let ram = Ram::new(LOW_MEM_SIZE + SLOT_SIZE);
    let (_vm, mut vcpu) = spinning_vcpu(&kvm, &ram);
    let kicker = Arc::new(VcpuKicker::new());
    // 1. Kicked before the vCPU thread even registered: nothing to signal, the kick waits.
    kicker.kick().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let (kicked_tx, kicked_rx) = std::sync::mpsc::channel::<()>();
    let thread = {
        let kicker = kicker.clone();
        std::thread::spawn(move || {
            let _target = kicker.register_current_thread().unwrap();
            let first = run_kickable(&mut vcpu).map(|e| describe_exit(&e));
            let seen = kicks_received();
            tx.send((
                "first run",
                first.map_err(|e| e.errno()),
                kicker.take_kick(),
            ))
            .unwrap();
            // 2. Kicked between two runs: the signal is handled here, outside KVM_RUN.
            kicked_rx.recv().unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            while kicks_received() == seen && Instant::now() < deadline {
                std::thread::yield_now();
            }
            assert_eq!(kicks_received(), seen + 1, "the kick signal never arrived");
            let second = run_kickable(&mut vcpu).map(|e| describe_exit(&e));
            tx.send((
                "run after a kick between runs",
                second.map_err(|e| e.errno()),
                kicker.take_kick(),
            ))
            .unwrap();
        })
    };
    let (what, r, took) = join_or_rescue("kick before registration", &rx, &thread);
    assert_eq!(
        (r, took),
        (Err(libc::EINTR), true),
        "{what}: returns EINTR at once"
    );
    kicker.kick().unwrap();
    kicked_tx.send(()).unwrap();
    let (what, r, took) = join_or_rescue("kick between runs", &rx, &thread);
    assert_eq!(
        (r, took),
        (Err(libc::EINTR), true),
        "{what}: returns EINTR at once"
    );
    thread.join().unwrap();
}

#[test]
fn kicked_spinning_guest_returns() {
    let Some(kvm) = kvm_or_skip("kicked_spinning_guest_returns") else {
        return;
    };
    let ram = Ram::new(LOW_MEM_SIZE + SLOT_SIZE);
    let (_vm, mut vcpu) = spinning_vcpu(&kvm, &ram);
    let kicker = Arc::new(VcpuKicker::new());
    let (tx, rx) = std::sync::mpsc::channel();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let thread = {
        let kicker = kicker.clone();
        std::thread::spawn(move || {
            let _target = kicker.register_current_thread().unwrap();
            ready_tx.send(()).unwrap();
            let mut runs = 0u32;
            let r = loop {
                runs += 1;
                match run_kickable(&mut vcpu) {
                    Err(e) if e.errno() == libc::EINTR => {
                        if kicker.take_kick() {
                            break Ok(runs);
                        }
                    }
                    Err(e) => break Err(format!("KVM_RUN: {e}")),
                    Ok(exit) => break Err(format!("unexpected exit {}", describe_exit(&exit))),
                }
            };
            tx.send(r).unwrap();
        })
    };
    ready_rx.recv().unwrap();
    // Let the guest spin (in the guest, most of the time) before the kick.
    std::thread::sleep(Duration::from_millis(50));
    kicker.kick().unwrap();
    let runs = join_or_rescue("kick of a spinning guest", &rx, &thread).unwrap();
    thread.join().unwrap();
    assert!(runs >= 1);
}
