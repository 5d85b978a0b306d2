//! A small safe wrapper over `userfaultfd(2)`, enough for guest memory that is allocated on
//! demand: the holes of a window are anonymous memory registered in MISSING mode, so a KVM
//! access to one blocks in the kernel and queues a message with the exact address (and the
//! faulting thread's id); a service thread reads it, maps the page and wakes the range.
//!
//! Only what that needs is here: the `UFFDIO_API` handshake (asking for
//! `UFFD_FEATURE_THREAD_ID`), `UFFDIO_REGISTER` in MISSING mode, `UFFDIO_UNREGISTER`,
//! `UFFDIO_WAKE`, non-blocking reads of page-fault messages, and a poll with a stop
//! [`EventFd`]. The uAPI (`include/uapi/linux/userfaultfd.h`: structs, ioctl numbers, flags)
//! comes from `linux-raw-sys`, the system calls from `rustix` (both already used by rustix
//! itself); the `userfaultfd` crate is not used because it needs bindgen, which a fresh CI
//! machine cannot build.
//!
//! The descriptor is created without `UFFD_USER_MODE_ONLY`: the faults that matter are taken
//! by the kernel on KVM's behalf (`get_user_pages`), which that flag would not report. Creating
//! such a descriptor needs `CAP_SYS_PTRACE` or `vm.unprivileged_userfaultfd = 1`; otherwise
//! `/dev/userfaultfd` (`USERFAULTFD_IOC_NEW`) is tried, which only needs access to that file.

use std::mem::{offset_of, size_of};
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

use linux_raw_sys::general::{
    uffd_msg, uffd_msg__bindgen_ty_1__bindgen_ty_1 as uffd_pagefault, uffdio_api, uffdio_range,
    uffdio_register, UFFDIO_REGISTER_MODE_MISSING, UFFD_API, UFFD_EVENT_PAGEFAULT,
    UFFD_PAGEFAULT_FLAG_WRITE, USERFAULTFD_IOC,
};
use linux_raw_sys::ioctl::{UFFDIO_API, UFFDIO_REGISTER, UFFDIO_UNREGISTER, UFFDIO_WAKE};
use rustix::event::{PollFd, PollFlags};
use rustix::io::Errno;
use rustix::ioctl::{ioctl, opcode, Ioctl, IoctlOutput, Opcode, Setter, Updater};

/// `UFFD_FEATURE_THREAD_ID`: page-fault messages carry the faulting thread's id.
pub const UFFD_FEATURE_THREAD_ID: u64 = linux_raw_sys::general::UFFD_FEATURE_THREAD_ID as u64;

/// `USERFAULTFD_IOC_NEW = _IO(USERFAULTFD_IOC, 0x00)` on `/dev/userfaultfd` (not in
/// linux-raw-sys).
const USERFAULTFD_IOC_NEW: Opcode = opcode::none(USERFAULTFD_IOC as u8, 0x00);

/// Where the page-fault fields are in the bytes of a `struct uffd_msg` (`repr(C, packed)`):
/// `arg` is a union, so `arg.pagefault` starts where `arg` does; `feat` is a union whose only
/// member is `ptid`.
const MSG_SIZE: usize = size_of::<uffd_msg>();
const MSG_EVENT: usize = offset_of!(uffd_msg, event);
const MSG_PF_FLAGS: usize = offset_of!(uffd_msg, arg) + offset_of!(uffd_pagefault, flags);
const MSG_PF_ADDRESS: usize = offset_of!(uffd_msg, arg) + offset_of!(uffd_pagefault, address);
const MSG_PF_PTID: usize = offset_of!(uffd_msg, arg) + offset_of!(uffd_pagefault, feat);

const _: () = {
    assert!(MSG_SIZE == 32);
    assert!(MSG_PF_PTID + 4 <= MSG_SIZE);
    assert!(USERFAULTFD_IOC_NEW == 0xaa00);
};

/// `USERFAULTFD_IOC_NEW`: the flags go by value, a new userfaultfd comes back as the result.
struct NewUffd(u32);

// SAFETY: `USERFAULTFD_IOC_NEW` takes its flags as the integer argument, reads and writes no
// memory of the caller (hence not mutating), and returns a new file descriptor that nothing else
// owns, which `output_from_ptr` takes ownership of.
unsafe impl Ioctl for NewUffd {
    type Output = OwnedFd;
    const IS_MUTATING: bool = false;

    fn opcode(&self) -> Opcode {
        USERFAULTFD_IOC_NEW
    }

    fn as_ptr(&mut self) -> *mut std::ffi::c_void {
        std::ptr::without_provenance_mut(self.0 as usize)
    }

    unsafe fn output_from_ptr(
        out: IoctlOutput,
        _: *mut std::ffi::c_void,
    ) -> rustix::io::Result<OwnedFd> {
        // SAFETY: rustix returned a non-negative result, the new descriptor, which we own.
        Ok(unsafe { OwnedFd::from_raw_fd(out) })
    }
}

/// A page fault reported by the descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageFault {
    /// The faulting address (page aligned: `UFFD_FEATURE_EXACT_ADDRESS` is not requested).
    pub address: u64,
    /// A write fault.
    pub write: bool,
    /// The faulting thread, if the descriptor has [`UFFD_FEATURE_THREAD_ID`].
    pub tid: Option<i32>,
}

impl PageFault {
    /// Decode one `struct uffd_msg`; `None` for other events (none are requested).
    fn decode(msg: &[u8; MSG_SIZE], with_tid: bool) -> Option<PageFault> {
        if u32::from(msg[MSG_EVENT]) != UFFD_EVENT_PAGEFAULT {
            return None;
        }
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&msg[o..o + 8]);
            u64::from_ne_bytes(b)
        };
        let mut ptid = [0u8; 4];
        ptid.copy_from_slice(&msg[MSG_PF_PTID..MSG_PF_PTID + 4]);
        let tid = i32::from_ne_bytes(ptid);
        Some(PageFault {
            address: u64_at(MSG_PF_ADDRESS),
            write: u64_at(MSG_PF_FLAGS) & u64::from(UFFD_PAGEFAULT_FLAG_WRITE) != 0,
            tid: (with_tid && tid > 0).then_some(tid),
        })
    }
}

/// One userfaultfd descriptor (close-on-exec, non-blocking).
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    features: u64,
}

impl Uffd {
    /// A new descriptor with the API handshake done, with [`UFFD_FEATURE_THREAD_ID`] if the
    /// kernel has it.
    pub fn new() -> Result<Uffd, Errno> {
        let first = Self::raw_new()?;
        match Self::handshake(first, UFFD_FEATURE_THREAD_ID) {
            Ok(u) => Ok(u),
            // The handshake can only be made once per descriptor: retry on a fresh one
            // without features.
            Err(Errno::INVAL) => Self::handshake(Self::raw_new()?, 0),
            Err(e) => Err(e),
        }
    }

    fn raw_new() -> Result<OwnedFd, Errno> {
        use rustix::mm::UserfaultfdFlags;
        let flags = UserfaultfdFlags::CLOEXEC | UserfaultfdFlags::NONBLOCK;
        // SAFETY: creating the descriptor is safe; what it can do to this process's memory is
        // confined to the ranges `register_missing` registers, whose callers own them.
        let err = match unsafe { rustix::mm::userfaultfd(flags) } {
            Ok(fd) => return Ok(fd),
            Err(e) if e == Errno::PERM || e == Errno::NOSYS => e,
            Err(e) => return Err(e),
        };
        // Not allowed to see kernel-mode faults through the syscall: try the device.
        let Ok(dev) = rustix::fs::open(
            "/dev/userfaultfd",
            rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        ) else {
            return Err(err);
        };
        // SAFETY: `NewUffd` describes USERFAULTFD_IOC_NEW on `/dev/userfaultfd` (see its impl).
        unsafe { ioctl(&dev, NewUffd(flags.bits())) }.map_err(|_| err)
    }

    fn handshake(fd: OwnedFd, features: u64) -> Result<Uffd, Errno> {
        let mut api = uffdio_api {
            api: u64::from(UFFD_API),
            features,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes a `struct uffdio_api`, which `api` is; it lives
        // across the call.
        unsafe { ioctl(&fd, Updater::<{ UFFDIO_API }, uffdio_api>::new(&mut api)) }?;
        Ok(Uffd {
            fd,
            features: features & api.features,
        })
    }

    /// Whether page-fault messages carry the faulting thread's id.
    pub fn has_thread_id(&self) -> bool {
        self.features & UFFD_FEATURE_THREAD_ID != 0
    }

    /// Register `start..start+len` (page aligned, covered by anonymous, shmem or hugetlb
    /// mappings) in MISSING mode: from now on an access to a page of it that has no page
    /// blocks until [`Uffd::wake`] and is reported by [`Uffd::read_faults`]. Mapping something
    /// else over part of the range (`MAP_FIXED`) drops the registration there.
    pub fn register_missing(&self, start: u64, len: u64) -> Result<(), Errno> {
        let mut r = uffdio_register {
            range: uffdio_range { start, len },
            mode: u64::from(UFFDIO_REGISTER_MODE_MISSING),
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes a `struct uffdio_register`, which `r` is; it
        // lives across the call. Registration changes how faults in the range are served, not
        // the memory itself.
        unsafe {
            ioctl(
                &self.fd,
                Updater::<{ UFFDIO_REGISTER }, uffdio_register>::new(&mut r),
            )
        }
    }

    /// Undo [`Uffd::register_missing`] on a range (threads blocked there are woken).
    pub fn unregister(&self, start: u64, len: u64) -> Result<(), Errno> {
        // SAFETY: UFFDIO_UNREGISTER reads a `struct uffdio_range`, which rustix passes by
        // pointer; it changes no memory this process can see.
        unsafe {
            ioctl(
                &self.fd,
                Setter::<{ UFFDIO_UNREGISTER }, uffdio_range>::new(uffdio_range { start, len }),
            )
        }
    }

    /// Wake the threads blocked on faults in `start..start+len`: they retry the access.
    pub fn wake(&self, start: u64, len: u64) -> Result<(), Errno> {
        // SAFETY: UFFDIO_WAKE reads a `struct uffdio_range`, which rustix passes by pointer; it
        // changes no memory this process can see.
        unsafe {
            ioctl(
                &self.fd,
                Setter::<{ UFFDIO_WAKE }, uffdio_range>::new(uffdio_range { start, len }),
            )
        }
    }

    /// Append every pending page-fault message to `out` without blocking; the number read.
    /// Other events (none are requested) are skipped.
    pub fn read_faults(&self, out: &mut Vec<PageFault>) -> Result<usize, Errno> {
        let mut buf = [0u8; 32 * MSG_SIZE];
        let mut n = 0;
        loop {
            let got = match rustix::io::read(&self.fd, &mut buf) {
                Ok(got) => got,
                Err(Errno::INTR) => continue,
                Err(Errno::AGAIN) => return Ok(n),
                Err(e) => return Err(e),
            };
            if got < MSG_SIZE {
                return Ok(n);
            }
            for m in buf[..got].chunks_exact(MSG_SIZE) {
                let m: &[u8; MSG_SIZE] = m.try_into().map_err(|_| Errno::IO)?;
                if let Some(f) = PageFault::decode(m, self.has_thread_id()) {
                    out.push(f);
                    n += 1;
                }
            }
        }
    }

    /// Wait until a fault is pending or `stop` is signalled, at most `timeout` (`None`:
    /// forever). Returns (fault pending, stop signalled).
    pub fn wait(&self, stop: &EventFd, timeout: Option<Duration>) -> Result<(bool, bool), Errno> {
        let timeout = timeout
            .map(|t| rustix::event::Timespec::try_from(t).map_err(|_| Errno::INVAL))
            .transpose()?;
        let mut fds = [
            PollFd::new(&self.fd, PollFlags::IN),
            PollFd::new(&stop.fd, PollFlags::IN),
        ];
        loop {
            match rustix::event::poll(&mut fds, timeout.as_ref()) {
                Ok(_) => break,
                Err(Errno::INTR) => continue,
                Err(e) => return Err(e),
            }
        }
        let ready = |p: &PollFd<'_>| {
            p.revents()
                .intersects(PollFlags::IN | PollFlags::ERR | PollFlags::HUP)
        };
        Ok((ready(&fds[0]), ready(&fds[1])))
    }
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// An `eventfd` (`rustix::event::eventfd`) used to wake a thread waiting in [`Uffd::wait`].
#[derive(Debug)]
pub struct EventFd {
    fd: OwnedFd,
}

impl EventFd {
    /// A new non-blocking, close-on-exec eventfd with counter 0; the syscall's errno on failure.
    pub fn new() -> Result<EventFd, Errno> {
        use rustix::event::EventfdFlags;
        let fd = rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        Ok(EventFd { fd })
    }

    /// Make the descriptor readable (until [`EventFd::clear`]).
    pub fn signal(&self) {
        // A full counter (EAGAIN) already means "readable", so the result does not matter.
        let _ = rustix::io::write(&self.fd, &1u64.to_ne_bytes());
    }

    /// Reset the counter.
    pub fn clear(&self) {
        let mut v = [0u8; 8];
        // Non-blocking: EAGAIN when it was not signalled, which is fine.
        let _ = rustix::io::read(&self.fd, &mut v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::mm::{mmap, mmap_anonymous, munmap, MapFlags, ProtFlags};
    use std::sync::atomic::{AtomicI32, Ordering};
    use std::sync::Arc;

    const PAGE: usize = 4096;

    fn uffd_or_skip(test: &str) -> Option<Uffd> {
        match Uffd::new() {
            Ok(u) => Some(u),
            Err(e) => {
                eprintln!("SKIP: {test}: userfaultfd is not available here ({e})");
                None
            }
        }
    }

    /// A thread touching a registered hole blocks; the message names the address and the
    /// thread; mapping a page over the hole and waking lets it read that page.
    #[test]
    fn missing_fault_is_reported_and_resolved_by_mapping() {
        let Some(u) = uffd_or_skip("missing_fault_is_reported_and_resolved_by_mapping") else {
            return;
        };
        // SAFETY: a fresh anonymous mapping placed by the kernel.
        let base = unsafe {
            mmap_anonymous(
                std::ptr::null_mut(),
                4 * PAGE,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE | MapFlags::NORESERVE,
            )
        }
        .unwrap() as usize;
        u.register_missing(base as u64, 4 * PAGE as u64).unwrap();
        let target = base + 2 * PAGE + 100;
        // If an assertion fails while the thread is blocked, give it a page before the uffd
        // goes (a released uffd turns the fault into SIGBUS, which would kill the test binary).
        struct Rescue<'a>(&'a Uffd, usize, bool);
        impl Drop for Rescue<'_> {
            fn drop(&mut self) {
                if self.2 {
                    return;
                }
                // SAFETY: MAP_FIXED anonymous memory inside the test's own mapping.
                let _ = unsafe {
                    mmap_anonymous(
                        self.1 as *mut _,
                        PAGE,
                        ProtFlags::READ | ProtFlags::WRITE,
                        MapFlags::PRIVATE | MapFlags::FIXED,
                    )
                };
                let _ = self.0.wake(self.1 as u64, PAGE as u64);
            }
        }
        let mut rescue = Rescue(&u, base + 2 * PAGE, false);
        let tid = Arc::new(AtomicI32::new(0));
        let t = {
            let tid = tid.clone();
            std::thread::spawn(move || {
                // SAFETY: gettid has no preconditions.
                tid.store(unsafe { libc::gettid() }, Ordering::SeqCst);
                // SAFETY: `target` is inside the live mapping; the read blocks until the page
                // is provided.
                unsafe { std::ptr::read_volatile(target as *const u8) }
            })
        };
        let stop = EventFd::new().unwrap();
        let mut faults = Vec::new();
        while faults.is_empty() {
            let (ready, stopped) = u.wait(&stop, Some(Duration::from_secs(10))).unwrap();
            assert!(ready && !stopped, "no fault reported");
            u.read_faults(&mut faults).unwrap();
        }
        assert_eq!(faults.len(), 1);
        assert_eq!(faults[0].address, (base + 2 * PAGE) as u64);
        assert!(!faults[0].write);
        if u.has_thread_id() {
            assert_eq!(faults[0].tid, Some(tid.load(Ordering::SeqCst)));
        }
        // Provide the page: a shared memfd page with a known byte.
        let fd = rustix::fs::memfd_create("uffd-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&fd, PAGE as u64).unwrap();
        rustix::io::pwrite(&fd, &[0x77], 100).unwrap();
        // SAFETY: MAP_FIXED inside our own mapping.
        unsafe {
            mmap(
                (base + 2 * PAGE) as *mut _,
                PAGE,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED | MapFlags::FIXED,
                &fd,
                0,
            )
        }
        .unwrap();
        u.wake((base + 2 * PAGE) as u64, PAGE as u64).unwrap();
        assert_eq!(t.join().unwrap(), 0x77);
        rescue.2 = true;
        // Nothing else pending; the stop eventfd works.
        assert_eq!(u.read_faults(&mut faults).unwrap(), 0);
        stop.signal();
        assert_eq!(u.wait(&stop, Some(Duration::ZERO)).unwrap(), (false, true));
        stop.clear();
        assert_eq!(u.wait(&stop, Some(Duration::ZERO)).unwrap(), (false, false));
        u.unregister(base as u64, 4 * PAGE as u64).unwrap();
        // SAFETY: unmapping our own mapping.
        unsafe { munmap(base as *mut _, 4 * PAGE) }.unwrap();
    }

    #[test]
    fn page_fault_messages_decode() {
        // struct uffd_msg: event, 7 reserved bytes, then pagefault { flags, address, ptid }.
        let mut m = [0u8; MSG_SIZE];
        m[0] = UFFD_EVENT_PAGEFAULT as u8;
        m[8..16].copy_from_slice(&1u64.to_ne_bytes());
        m[16..24].copy_from_slice(&0x7f00_1234_5000u64.to_ne_bytes());
        m[24..28].copy_from_slice(&4321i32.to_ne_bytes());
        let f = PageFault::decode(&m, true).unwrap();
        assert_eq!(
            f,
            PageFault {
                address: 0x7f00_1234_5000,
                write: true,
                tid: Some(4321)
            }
        );
        assert_eq!(PageFault::decode(&m, false).unwrap().tid, None);
        m[8] = 0;
        assert!(!PageFault::decode(&m, true).unwrap().write);
        m[0] = linux_raw_sys::general::UFFD_EVENT_FORK as u8;
        assert_eq!(PageFault::decode(&m, true), None);
    }

    /// The fallback when the syscall is refused: a descriptor from `/dev/userfaultfd` that
    /// takes the handshake and registrations.
    #[test]
    fn device_gives_a_working_descriptor() {
        let dev = match rustix::fs::open(
            "/dev/userfaultfd",
            rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        ) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("SKIP: device_gives_a_working_descriptor: /dev/userfaultfd: {e}");
                return;
            }
        };
        let flags = rustix::mm::UserfaultfdFlags::CLOEXEC | rustix::mm::UserfaultfdFlags::NONBLOCK;
        // SAFETY: as in `Uffd::raw_new`.
        let fd = unsafe { ioctl(&dev, NewUffd(flags.bits())) }.unwrap();
        let u = Uffd::handshake(fd, UFFD_FEATURE_THREAD_ID).unwrap();
        // SAFETY: a fresh anonymous mapping placed by the kernel.
        let base = unsafe {
            mmap_anonymous(
                std::ptr::null_mut(),
                PAGE,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE | MapFlags::NORESERVE,
            )
        }
        .unwrap();
        u.register_missing(base as u64, PAGE as u64).unwrap();
        u.wake(base as u64, PAGE as u64).unwrap();
        u.unregister(base as u64, PAGE as u64).unwrap();
        // SAFETY: unmapping our own mapping.
        unsafe { munmap(base, PAGE) }.unwrap();
    }

    #[test]
    fn bad_ranges_are_errors() {
        let Some(u) = uffd_or_skip("bad_ranges_are_errors") else {
            return;
        };
        assert_eq!(u.register_missing(1, PAGE as u64), Err(Errno::INVAL));
        assert_eq!(u.wake(0x1000, 3), Err(Errno::INVAL));
    }
}
