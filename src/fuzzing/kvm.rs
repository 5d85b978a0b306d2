//! Fuzzing of the KVM part of the host's system-call surface: `/dev/kvm`, VM and guest_memfd
//! ioctls (`KVM_CREATE_VM`, `KVM_CREATE_GUEST_MEMFD`, `KVM_SET_USER_MEMORY_REGION2`,
//! `KVM_CREATE_VCPU`, `KVM_CHECK_EXTENSION`, raw commands), interleaved with the calls that make
//! and break what memslots point at (memfd, mmap, munmap, fallocate punch/allocate, close,
//! process exit), against a live host on the machine's real KVM.
//!
//! After every operation the fuzzer checks that the host's view and KVM's agree: every slot the
//! host tracks has a reserved window under it, every window a slot uses is either in the host's
//! mapping table or emptied, frame accounting adds up, and no call panicked. Sizes the input
//! chooses are capped so one input cannot exhaust the machine (a guest_memfd's page cache is
//! dense: 8 bytes per page).

use zerocopy::IntoBytes;

use crate::abi::kvm::*;
use crate::host::files::FileKind;
use crate::host::Host;
use crate::mm::PAGE_SIZE;
use crate::uapi::{Pid, UserMapping};

/// Bytes of input, read front to back; zeros past the end.
struct Input<'a> {
    b: &'a [u8],
    pos: usize,
}

impl Input<'_> {
    fn done(&self) -> bool {
        self.pos >= self.b.len()
    }
    fn u8(&mut self) -> u8 {
        let v = self.b.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        v
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }
    /// Mostly small page counts, sometimes anything.
    fn pages(&mut self) -> u64 {
        match self.u8() % 8 {
            0 => self.u64(),
            1 => u64::from(self.u8()),
            _ => u64::from(self.u8() % 16) * PAGE_SIZE,
        }
    }
}

/// Most guest_memfd bytes one input may ask for in total.
const GMEM_CAP: u64 = 64 << 20;
const MAX_FDS: usize = 48;
const MAX_MAPS: usize = 16;

/// A live host with one user process; fds and mappings carry over between operations of one
/// input and are dropped (process exit) at its end.
pub struct KvmIoctlFuzzer {
    host: Option<Host>,
    kvm_ok: bool,
}

impl Default for KvmIoctlFuzzer {
    fn default() -> Self {
        Self::new()
    }
}

struct State {
    pid: Pid,
    fds: Vec<i32>,
    maps: Vec<UserMapping>,
    gmem_bytes: u64,
}

impl KvmIoctlFuzzer {
    /// Boot a 128 MiB host; without `/dev/kvm` inputs run nothing (not every fuzz box has KVM).
    pub fn new() -> Self {
        let host = Host::boot(crate::kexec::BootParams {
            ram_size: 128 << 20,
            ..Default::default()
        })
        .ok();
        let kvm_ok = kvm_ioctls::Kvm::new().is_ok();
        Self { host, kvm_ok }
    }

    /// One input: up to 64 operations by one process, then its exit.
    pub fn run(&mut self, data: &[u8]) {
        let Some(h) = self.host.as_mut() else { return };
        if !self.kvm_ok {
            return;
        }
        let total = h.mm.stats().total;
        let mut st = State {
            pid: h.spawn(),
            fds: Vec::new(),
            maps: Vec::new(),
            gmem_bytes: 0,
        };
        let mut c = Input { b: data, pos: 0 };
        let mut n = 0;
        while !c.done() && n < 64 {
            one_op(h, &mut st, &mut c);
            check(h, total);
            n += 1;
        }
        h.exit(st.pid);
        check(h, total);
        assert!(h.maps.is_empty(), "mappings left after process exit");
    }
}

fn pick(v: &[i32], c: &mut Input) -> i32 {
    match c.u8() {
        0xff => c.u32() as i32,
        x if !v.is_empty() => v[x as usize % v.len()],
        x => x as i32 % 8,
    }
}

/// A user address for a plain memslot: inside a mapping, at its edge, or anything (the host's
/// heap, stack and direct map included).
fn uaddr(st: &State, c: &mut Input, h: &Host) -> u64 {
    let probe = 0u8;
    match c.u8() % 6 {
        0 => c.u64(),
        1 => &probe as *const u8 as u64 & !(PAGE_SIZE - 1),
        2 => {
            h.mm.ram
                .slice(0, PAGE_SIZE)
                .map_or(0, |s| s.ptr_guard().as_ptr() as u64)
        }
        _ if st.maps.is_empty() => c.u64() & !(PAGE_SIZE - 1),
        _ => {
            let m = st.maps[c.u8() as usize % st.maps.len()];
            m.addr as u64 + (u64::from(c.u8()) % (m.len / PAGE_SIZE + 1)) * PAGE_SIZE
        }
    }
}

fn one_op(h: &mut Host, st: &mut State, c: &mut Input) {
    let pid = st.pid;
    let op = c.u8() % 14;
    let fd_room = st.fds.len() < MAX_FDS;
    match op {
        0 if fd_room => {
            if let Ok(fd) = h.open(pid, "/dev/kvm", 0) {
                st.fds.push(fd);
            }
        }
        1..=5 => {
            let fd = pick(&st.fds, c);
            let (cmd, mut arg): (u64, Vec<u8>) = match op {
                1 => {
                    let t = if c.u8() & 1 == 0 { 0 } else { c.u64() };
                    (KVM_CREATE_VM, t.to_ne_bytes().to_vec())
                }
                2 => {
                    let size = c.pages();
                    if size > GMEM_CAP.saturating_sub(st.gmem_bytes) {
                        return;
                    }
                    let flags = match c.u8() % 4 {
                        0 => c.u64(),
                        1 => GUEST_MEMFD_FLAG_MMAP,
                        _ => GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
                    };
                    st.gmem_bytes += size;
                    let a = CreateGuestMemfd {
                        size,
                        flags,
                        page_order: 0,
                        pad: [0; 7],
                        reserved: [0; 5],
                    };
                    (KVM_CREATE_GUEST_MEMFD, a.as_bytes().to_vec())
                }
                3 => {
                    let gmem = c.u8() & 1 == 0;
                    let r = UserMemoryRegion2 {
                        slot: if c.u8() == 0xff {
                            c.u32()
                        } else {
                            u32::from(c.u8() % 6)
                        },
                        flags: if c.u8() == 0xff {
                            c.u32()
                        } else if gmem {
                            KVM_MEM_GUEST_MEMFD
                        } else {
                            0
                        },
                        guest_phys_addr: if c.u8() == 0xff {
                            c.u64()
                        } else {
                            u64::from(c.u8() % 8) << 22
                        },
                        memory_size: c.pages(),
                        userspace_addr: uaddr(st, c, h),
                        guest_memfd_offset: c.pages(),
                        guest_memfd: pick(&st.fds, c) as u32,
                        ..Default::default()
                    };
                    (KVM_SET_USER_MEMORY_REGION2, r.as_bytes().to_vec())
                }
                4 => (
                    KVM_CREATE_VCPU,
                    u64::from(c.u8() % 4).to_ne_bytes().to_vec(),
                ),
                _ => {
                    let cmd = if c.u8() & 1 == 0 {
                        KVM_CHECK_EXTENSION
                    } else {
                        c.u64()
                    };
                    let n = c.u8() as usize % 200;
                    let mut v: Vec<u8> = (0..n).map(|_| c.u8()).collect();
                    if cmd == KVM_CHECK_EXTENSION && v.len() >= 8 {
                        // Real capability numbers, mostly.
                        let cap = u64::from(v[0]);
                        v[..8].copy_from_slice(&cap.to_ne_bytes());
                    }
                    (cmd, v)
                }
            };
            // Sometimes a short argument buffer.
            if c.u8() == 0xfe {
                let keep = c.u8() as usize % (arg.len() + 1);
                arg.truncate(keep);
            }
            let before = arg.len();
            let r = h.ioctl(pid, fd, cmd, &mut arg);
            assert_eq!(arg.len(), before, "ioctl changed its buffer's length");
            if let Ok(v) = r {
                if matches!(
                    cmd,
                    KVM_CREATE_VM | KVM_CREATE_GUEST_MEMFD | KVM_CREATE_VCPU
                ) {
                    let nfd = v as i32;
                    assert!(h.fd_file(pid, nfd).is_ok(), "returned fd {nfd} is not open");
                    st.fds.push(nfd);
                }
            }
        }
        6 if fd_room => {
            if let Ok(fd) = h.memfd_create(pid, "fuzz", 0) {
                let size = c.pages().min(4 << 20);
                let _ = h.ftruncate(pid, fd, size);
                st.fds.push(fd);
            }
        }
        7 if st.maps.len() < MAX_MAPS => {
            let fd = pick(&st.fds, c);
            let len = c.pages().min(8 << 20);
            let prot = match c.u8() % 3 {
                0 => libc::PROT_READ,
                _ => libc::PROT_READ | libc::PROT_WRITE,
            };
            let flags = if c.u8() == 0 {
                libc::MAP_PRIVATE
            } else {
                libc::MAP_SHARED
            };
            if let Ok(m) = h.mmap(pid, fd, len, prot, flags, c.pages() % (1 << 30)) {
                st.maps.push(m);
            }
        }
        8 if !st.maps.is_empty() => {
            let m = st.maps.remove(c.u8() as usize % st.maps.len());
            assert!(h.munmap(pid, m).is_ok(), "munmap of a live mapping failed");
        }
        9 => {
            let fd = pick(&st.fds, c);
            let _ = h.close(pid, fd);
            st.fds.retain(|&x| x != fd);
        }
        10 => {
            let fd = pick(&st.fds, c);
            let mode = match c.u8() % 4 {
                0 => c.u32() as i32,
                1 => libc::FALLOC_FL_KEEP_SIZE,
                _ => libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE,
            };
            let (off, len) = (c.pages(), c.pages());
            let _ = h.fallocate(pid, fd, mode, off, len.min(16 << 20));
        }
        11 if !st.maps.is_empty() => {
            // A user access through a mapping (faults pages in, or EFAULT).
            let m = st.maps[c.u8() as usize % st.maps.len()];
            let off = (c.u64() % m.len) as usize;
            let mut b = [0u8; 16];
            let n = b.len().min(m.len as usize - off);
            if c.u8() & 1 == 0 {
                let _ = h.user_read(pid, m.addr + off, &mut b[..n]);
            } else {
                let _ = h.user_write(pid, m.addr + off, &b[..n]);
            }
        }
        12 if fd_room => {
            if let Ok(d) = h.dup(pid, pick(&st.fds, c)) {
                st.fds.push(d);
            }
        }
        _ => {}
    }
}

/// The invariants that must hold between any two system calls.
fn check(h: &Host, total: u64) {
    let s = h.mm.stats();
    assert_eq!(s.free + s.used, total, "frame accounting: {s:?}");
    for id in h.files.ids() {
        let Some(FileKind::Vm(v)) = h.files.kind(id) else {
            continue;
        };
        let windows = v.inner.slot_windows();
        let slots: Vec<u32> = v.slots.keys().copied().collect();
        let bound: Vec<u32> = windows.iter().map(|w| w.0).collect();
        assert_eq!(
            slots, bound,
            "VM file {id}: host slots and KVM windows disagree"
        );
        for (slot, s) in &v.slots {
            let (_, base, len) = windows
                .iter()
                .find(|w| w.0 == *slot)
                .copied()
                .unwrap_or_default();
            match h.maps.get(&s.map) {
                // The slot's mapping is live: the window KVM uses is that mapping's.
                Some(m) => assert!(
                    m.window.base() as u64 == base && m.window.len() == len,
                    "VM file {id} slot {slot}: KVM's window is not the mapping's"
                ),
                // The mapping was unmapped under the slot: KVM's window is still reserved
                // (held by the VM) and empty.
                None => assert!(len > 0, "VM file {id} slot {slot}: window gone"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A few fixed sequences and pseudo-random inputs through the fuzzer (the fuzz target runs
    /// millions); skips where /dev/kvm cannot be opened.
    #[test]
    fn kvm_ioctl_fuzzer_runs_sequences() {
        if !crate::vmm::libkvm::kvm_available("kvm_ioctl_fuzzer_runs_sequences") {
            return;
        }
        let mut f = KvmIoctlFuzzer::new();
        // open kvm, create VM, memfd, mmap, plain slot over it, munmap, punch, exit.
        let seq = [
            0u8, 0, 1, 0, 0, 0, 6, 3, 5, 7, 2, 3, 3, 1, 1, 0, 1, 0, 0, 5, 4, 0, 0, 8, 0, 10, 2, 2,
        ];
        f.run(&seq);
        // Found by the fuzzer in CI: a hole punched in a memfd at an offset near u64::MAX
        // overflowed the page arithmetic of `Memfd::fallocate`.
        f.run(&[
            48, 26, 255, 246, 220, 0, 15, 0, 0, 255, 255, 255, 255, 255, 255, 255, 121, 121, 121,
            121, 121, 121, 121, 121, 121, 121, 121, 121, 121, 121, 121, 121, 121, 255, 255, 0,
        ]);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..300 {
            let n = (x % 400) as usize;
            let input: Vec<u8> = (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x >> 24) as u8
                })
                .collect();
            f.run(&input);
        }
    }
}
