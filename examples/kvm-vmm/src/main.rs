//! kvm-vmm: the guest_memfd preservation scenario of the 2026 RFC as a small Rust VMM on the
//! rust-vmm crates (kvm-ioctls, kvm-bindings), with `/dev/liveupdate` through raw ioctls.
//!
//! ```text
//! kvm-vmm IMAGE_WRITE IMAGE_VERIFY
//! ```
//!
//! The images come from `handover guest-image` (5 MiB of data at 4 GiB). Nothing here knows
//! about handover: run under `handover run`, the program's `/dev/kvm` and `/dev/liveupdate` are
//! the host's, and on a kernel with LUO and the RFC it would do the same.
//!
//! - Stage 1 (no incoming state session): a VM with a 16 MiB guest_memfd (MMAP | INIT_SHARED)
//!   at 4 GiB and 2 MiB of anonymous low memory at 0; the guest writes the 5 MiB pattern; the
//!   VMM checks it through the guest_memfd's mmap, preserves the VM and the guest_memfd in a
//!   session, its own state in another, and updates with `reboot(LINUX_REBOOT_CMD_KEXEC)`.
//! - Stage 2 (the state session is there): retrieve both files, check the data through the
//!   mmap (and zeros after it), wrap the retrieved VM fd in a kvm-ioctls `VmFd`, bind new low
//!   memory and the guest_memfd, and let a new vCPU verify the 5 MiB; FINISH both sessions.
//!   Prints `kvm-vmm: stage 2 ok`.

mod guest;
mod luo;
mod mem;

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};

use kvm_bindings::{
    kvm_create_guest_memfd, kvm_userspace_memory_region, kvm_userspace_memory_region2,
    KVM_MEM_GUEST_MEMFD,
};
use kvm_ioctls::{Kvm, VmFd};

use guest::{fail, Error, Result, DATA_GPA, LOW_MEM_SIZE};
use mem::Mapping;

/// `KVM_CAP_USER_MEMORY2`, `KVM_CAP_GUEST_MEMFD`, `KVM_CAP_GUEST_MEMFD_FLAGS` (upstream uapi).
const CAP_USER_MEMORY2: libc::c_ulong = 231;
const CAP_GUEST_MEMFD: libc::c_ulong = 234;
const CAP_GUEST_MEMFD_FLAGS: libc::c_ulong = 244;
/// guest_memfd flags: mmap-able, and shared (not private) from the start.
const GUEST_MEMFD_FLAG_MMAP: u64 = 1 << 0;
const GUEST_MEMFD_FLAG_INIT_SHARED: u64 = 1 << 1;

const GMEM_SIZE: usize = 16 << 20;
const SLOT_LOW: u32 = 0;
const SLOT_GMEM: u32 = 1;

const SESSION: &str = "kvm-vmm";
const STATE_SESSION: &str = "kvm-vmm-state";
const GMEM_TOKEN: u64 = 1;
const VM_TOKEN: u64 = 2;
const STATE_TOKEN: u64 = 1;
/// What the state memfd holds: this magic, then the next stage (u32), then zero (u32).
const STATE_MAGIC: u64 = u64::from_le_bytes(*b"KVMVMM01");

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [write_img, verify_img] = args.as_slice() else {
        eprintln!("usage: kvm-vmm IMAGE_WRITE IMAGE_VERIFY");
        std::process::exit(2);
    };
    if let Err(e) = run(write_img, verify_img) {
        eprintln!("kvm-vmm: {e}");
        std::process::exit(1);
    }
}

fn run(write_img: &str, verify_img: &str) -> Result<()> {
    let dev = luo::open().map_err(|e| ("open /dev/liveupdate", e))?;
    match luo::retrieve_session(dev.as_fd(), STATE_SESSION) {
        Ok(state) => {
            println!("kvm-vmm: stage 2");
            stage2(dev.as_fd(), state, verify_img)
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            println!("kvm-vmm: stage 1");
            stage1(dev.as_fd(), write_img)
        }
        Err(e) => Err(("retrieve session kvm-vmm-state", e).into()),
    }
}

fn open_kvm() -> Result<Kvm> {
    let kvm = Kvm::new().map_err(|e| ("open /dev/kvm", e))?;
    if kvm.get_api_version() != 12 {
        return fail(format!(
            "KVM_GET_API_VERSION = {}, want 12",
            kvm.get_api_version()
        ));
    }
    Ok(kvm)
}

fn check_caps(kvm: &Kvm) -> Result<()> {
    if kvm.check_extension_raw(CAP_USER_MEMORY2) <= 0 {
        return fail("KVM_CAP_USER_MEMORY2 missing".into());
    }
    if kvm.check_extension_raw(CAP_GUEST_MEMFD) <= 0 {
        return fail("KVM_CAP_GUEST_MEMFD missing".into());
    }
    let flags = kvm.check_extension_raw(CAP_GUEST_MEMFD_FLAGS).max(0) as u64;
    let want = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;
    if flags & want != want {
        return fail(format!(
            "KVM_CAP_GUEST_MEMFD_FLAGS = {flags:#x}: MMAP|INIT_SHARED not offered"
        ));
    }
    Ok(())
}

/// Slot 0: `low` at GPA 0, with the original `KVM_SET_USER_MEMORY_REGION`.
fn bind_low(vm: &VmFd, low: &Mapping) -> Result<()> {
    let r = kvm_userspace_memory_region {
        slot: SLOT_LOW,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: low.len() as u64,
        userspace_addr: low.addr(),
    };
    // SAFETY: `low` is mapped for its length and outlives the slot (the VM is closed, or the
    // process ends, before it is unmapped).
    unsafe { vm.set_user_memory_region(r) }.map_err(|e| ("KVM_SET_USER_MEMORY_REGION", e))?;
    Ok(())
}

/// Slot 1: the guest_memfd at 4 GiB, its own mapping as userspace_addr.
fn bind_gmem(vm: &VmFd, gmem: BorrowedFd<'_>, map: &Mapping) -> Result<()> {
    let r = kvm_userspace_memory_region2 {
        slot: SLOT_GMEM,
        flags: KVM_MEM_GUEST_MEMFD,
        guest_phys_addr: DATA_GPA,
        memory_size: GMEM_SIZE as u64,
        userspace_addr: map.addr(),
        guest_memfd_offset: 0,
        guest_memfd: gmem.as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: the mapping covers the slot and outlives it, as for `bind_low`.
    unsafe { vm.set_user_memory_region2(r) }.map_err(|e| ("KVM_SET_USER_MEMORY_REGION2", e))?;
    Ok(())
}

/// `pwrite`/`pread` of all of `buf` at offset 0 (a state memfd is tiny).
fn pwrite_all(fd: BorrowedFd<'_>, buf: &[u8]) -> std::io::Result<()> {
    // SAFETY: `buf` is valid for reads of its length.
    let n = unsafe { libc::pwrite(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), 0) };
    match n {
        n if n < 0 => Err(std::io::Error::last_os_error()),
        n if n as usize == buf.len() => Ok(()),
        n => Err(std::io::Error::other(format!("short write: {n}"))),
    }
}

fn pread_all(fd: BorrowedFd<'_>, buf: &mut [u8]) -> std::io::Result<()> {
    // SAFETY: `buf` is valid for writes of its length.
    let n = unsafe { libc::pread(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    match n {
        n if n < 0 => Err(std::io::Error::last_os_error()),
        n if n as usize == buf.len() => Ok(()),
        n => Err(std::io::Error::other(format!("short read: {n}"))),
    }
}

fn stage1(dev: BorrowedFd<'_>, write_img: &str) -> Result<()> {
    let kvm = open_kvm()?;
    check_caps(&kvm)?;
    let vm = kvm.create_vm().map_err(|e| ("KVM_CREATE_VM", e))?;
    let gmem = vm
        .create_guest_memfd(kvm_create_guest_memfd {
            size: GMEM_SIZE as u64,
            flags: GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
            reserved: [0; 6],
        })
        .map_err(|e| ("KVM_CREATE_GUEST_MEMFD", e))?;
    // SAFETY: the ioctl just returned this new fd; nothing else owns it.
    let gmem = unsafe { OwnedFd::from_raw_fd(gmem) };
    let gmem_map = Mapping::shared(gmem.as_fd(), GMEM_SIZE).map_err(|e| ("mmap guest_memfd", e))?;
    bind_gmem(&vm, gmem.as_fd(), &gmem_map)?;
    let low = Mapping::anonymous(LOW_MEM_SIZE).map_err(|e| ("mmap low memory", e))?;
    guest::load_image(write_img, &low, guest::MODE_WRITE)?;
    bind_low(&vm, &low)?;
    let mut vcpu = guest::create_vcpu(&kvm, &vm, 0)?;
    let status = guest::run(&mut vcpu, &low, "stage 1 write")?;
    if status != guest::STATUS_WRITTEN {
        return fail(format!(
            "stage 1: guest status {status}, want {} (written)",
            guest::STATUS_WRITTEN
        ));
    }
    // The vCPU is not running from here on: the VMM has paused its guest.
    guest::check_gmem(&gmem_map, false, "stage 1")?;

    let s = luo::create_session(dev, SESSION).map_err(|e| ("create session kvm-vmm", e))?;
    luo::preserve_fd(s.as_fd(), vm.as_raw_fd(), VM_TOKEN).map_err(|e| ("preserve the VM", e))?;
    luo::preserve_fd(s.as_fd(), gmem.as_raw_fd(), GMEM_TOKEN)
        .map_err(|e| ("preserve the guest_memfd", e))?;

    // The state session: one memfd saying that stage 2 comes next.
    let state =
        luo::create_session(dev, STATE_SESSION).map_err(|e| ("create session kvm-vmm-state", e))?;
    // SAFETY: a NUL-terminated name; memfd_create touches nothing else.
    let m = unsafe { libc::memfd_create(c"kvm-vmm-state".as_ptr(), libc::MFD_CLOEXEC) };
    if m < 0 {
        return Err(("memfd_create", std::io::Error::last_os_error()).into());
    }
    // SAFETY: memfd_create just returned this new fd.
    let m = unsafe { OwnedFd::from_raw_fd(m) };
    let mut st = [0u8; 16];
    st[..8].copy_from_slice(&STATE_MAGIC.to_le_bytes());
    st[8..12].copy_from_slice(&2u32.to_le_bytes());
    pwrite_all(m.as_fd(), &st).map_err(|e| ("write the state", e))?;
    luo::preserve_fd(state.as_fd(), m.as_raw_fd(), STATE_TOKEN)
        .map_err(|e| ("preserve the state memfd", e))?;

    println!("kvm-vmm: stage 1: VM and guest_memfd preserved, updating");
    // Everything above stays open (the sessions hold their files) until the update ends this
    // process; reboot returns only if the update was refused.
    let e = luo::kexec();
    Err(Error(format!(
        "stage 1: reboot(LINUX_REBOOT_CMD_KEXEC) returned: {e}"
    )))
}

fn stage2(dev: BorrowedFd<'_>, state: OwnedFd, verify_img: &str) -> Result<()> {
    let m = luo::retrieve_fd(state.as_fd(), STATE_TOKEN)
        .map_err(|e| ("retrieve the state memfd", e))?;
    let mut st = [0u8; 16];
    pread_all(m.as_fd(), &mut st).map_err(|e| ("read the state", e))?;
    drop(m);
    let magic = u64::from_le_bytes(st[..8].try_into().expect("8 bytes"));
    let next = u32::from_le_bytes(st[8..12].try_into().expect("4 bytes"));
    if magic != STATE_MAGIC || next != 2 {
        return fail(format!(
            "stage 2: bad state (magic {magic:#x}, stage {next})"
        ));
    }

    let s = luo::retrieve_session(dev, SESSION).map_err(|e| ("retrieve session kvm-vmm", e))?;
    let vm_fd = luo::retrieve_fd(s.as_fd(), VM_TOKEN).map_err(|e| ("retrieve the VM", e))?;
    let gmem =
        luo::retrieve_fd(s.as_fd(), GMEM_TOKEN).map_err(|e| ("retrieve the guest_memfd", e))?;
    println!(
        "kvm-vmm: stage 2: retrieved the VM (fd {}) and the guest_memfd (fd {})",
        vm_fd.as_raw_fd(),
        gmem.as_raw_fd()
    );
    let gmem_map = Mapping::shared(gmem.as_fd(), GMEM_SIZE).map_err(|e| ("mmap guest_memfd", e))?;
    guest::check_gmem(&gmem_map, true, "stage 2")?;

    let kvm = open_kvm()?;
    // SAFETY: RETRIEVE_FD returned this VM fd to us and nothing else uses it: the VmFd owns it.
    let vm = unsafe { kvm.create_vmfd_from_rawfd(vm_fd.into_raw_fd()) }
        .map_err(|e| ("wrap the retrieved VM", e))?;
    let low = Mapping::anonymous(LOW_MEM_SIZE).map_err(|e| ("mmap low memory", e))?;
    guest::load_image(verify_img, &low, guest::MODE_VERIFY)?;
    bind_low(&vm, &low)?;
    bind_gmem(&vm, gmem.as_fd(), &gmem_map)?;
    let mut vcpu = guest::create_vcpu(&kvm, &vm, 0)?;
    let status = guest::run(&mut vcpu, &low, "stage 2 verify")?;
    if status != guest::STATUS_VERIFY_OK {
        return fail(format!(
            "stage 2: guest status {status}, first bad offset {:#x} (want status {})",
            guest::mailbox(&low, guest::MB_FIRST_BAD),
            guest::STATUS_VERIFY_OK
        ));
    }
    println!(
        "kvm-vmm: stage 2 verify: the guest verified {} bytes",
        guest::DATA_LEN
    );

    luo::finish(s.as_fd()).map_err(|e| ("FINISH kvm-vmm", e))?;
    luo::finish(state.as_fd()).map_err(|e| ("FINISH kvm-vmm-state", e))?;
    drop(vcpu);
    drop(vm);
    drop(gmem_map);
    drop(gmem);
    drop(low);
    println!("kvm-vmm: stage 2 ok");
    Ok(())
}
