//! A small safe wrapper over `userfaultfd(2)`, enough for guest memory that is allocated on
//! demand: the holes of a window are anonymous memory registered in MISSING mode, so a KVM
//! access to one blocks in the kernel and queues a message with the exact address (and the
//! faulting thread's id); a service thread reads it, maps the page and wakes the range.
//!
//! Only what that needs is here: the `UFFDIO_API` handshake (asking for
//! `UFFD_FEATURE_THREAD_ID`), `UFFDIO_REGISTER` in MISSING mode, `UFFDIO_UNREGISTER`,
//! `UFFDIO_WAKE`, non-blocking reads of page-fault messages, and a poll with a stop
//! [`EventFd`]. The uAPI (`include/uapi/linux/userfaultfd.h`) is defined by hand: the
//! `userfaultfd` crate needs bindgen, which a fresh CI machine cannot build.
//!
//! The descriptor is created without `UFFD_USER_MODE_ONLY`: the faults that matter are taken
//! by the kernel on KVM's behalf (`get_user_pages`), which that flag would not report. Creating
//! such a descriptor needs `CAP_SYS_PTRACE` or `vm.unprivileged_userfaultfd = 1`; otherwise
//! `/dev/userfaultfd` (`USERFAULTFD_IOC_NEW`) is tried, which only needs access to that file.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use rustix::io::Errno;

/// `UFFD_API`.
const UFFD_API: u64 = 0xaa;
/// ioctl type of userfaultfd (`UFFDIO`).
const UFFDIO: u32 = 0xaa;

/// `_IOC(dir, type, nr, size)` on x86-64 and the other asm-generic architectures.
const fn ioc(dir: u32, nr: u32, size: usize) -> u32 {
    (dir << 30) | ((size as u32) << 16) | (UFFDIO << 8) | nr
}
const IOC_NONE: u32 = 0;
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

/// `UFFDIO_API = _IOWR(UFFDIO, 0x3f, struct uffdio_api)`.
const UFFDIO_API: u32 = ioc(IOC_READ | IOC_WRITE, 0x3f, std::mem::size_of::<UffdioApi>());
/// `UFFDIO_REGISTER = _IOWR(UFFDIO, 0x00, struct uffdio_register)`.
const UFFDIO_REGISTER: u32 = ioc(
    IOC_READ | IOC_WRITE,
    0x00,
    std::mem::size_of::<UffdioRegister>(),
);
/// `UFFDIO_UNREGISTER = _IOR(UFFDIO, 0x01, struct uffdio_range)`.
const UFFDIO_UNREGISTER: u32 = ioc(IOC_READ, 0x01, std::mem::size_of::<UffdioRange>());
/// `UFFDIO_WAKE = _IOR(UFFDIO, 0x02, struct uffdio_range)`.
const UFFDIO_WAKE: u32 = ioc(IOC_READ, 0x02, std::mem::size_of::<UffdioRange>());
/// `USERFAULTFD_IOC_NEW = _IO(0xaa, 0x00)` on `/dev/userfaultfd`.
const USERFAULTFD_IOC_NEW: u32 = ioc(IOC_NONE, 0x00, 0);

/// `UFFDIO_REGISTER_MODE_MISSING`.
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
/// `UFFD_FEATURE_THREAD_ID`: page-fault messages carry the faulting thread's id.
pub const UFFD_FEATURE_THREAD_ID: u64 = 1 << 8;
/// `UFFD_EVENT_PAGEFAULT`.
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// `UFFD_PAGEFAULT_FLAG_WRITE`.
const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Default)]
struct UffdioRange {
    start: u64,
    len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

/// `struct uffd_msg`: an 8-byte header (event first) and a 24-byte union. For a page fault the
/// union is `{ u64 flags; u64 address; u32 ptid; }`.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    arg: [u64; 3],
}

const _: () = {
    assert!(std::mem::size_of::<UffdioApi>() == 24);
    assert!(std::mem::size_of::<UffdioRange>() == 16);
    assert!(std::mem::size_of::<UffdioRegister>() == 32);
    assert!(std::mem::size_of::<UffdMsg>() == 32);
    assert!(UFFDIO_API == 0xc018_aa3f);
    assert!(UFFDIO_REGISTER == 0xc020_aa00);
    assert!(UFFDIO_UNREGISTER == 0x8010_aa01);
    assert!(UFFDIO_WAKE == 0x8010_aa02);
    assert!(USERFAULTFD_IOC_NEW == 0xaa00);
};

fn last_errno() -> Errno {
    Errno::from_raw_os_error(
        std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO),
    )
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
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: userfaultfd takes only a flags argument and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::c_long::from(flags)) };
        if fd >= 0 {
            let fd = RawFd::try_from(fd).map_err(|_| Errno::BADF)?;
            // SAFETY: the kernel just returned this fd; nothing else owns it.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        let err = last_errno();
        if err != Errno::PERM && err != Errno::NOSYS {
            return Err(err);
        }
        // Not allowed to see kernel-mode faults through the syscall: try the device.
        // SAFETY: open with a NUL-terminated path; the result is checked.
        let dev =
            unsafe { libc::open(c"/dev/userfaultfd".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if dev < 0 {
            return Err(err);
        }
        // SAFETY: `dev` is the fd open just returned; nothing else owns it.
        let dev = unsafe { OwnedFd::from_raw_fd(dev) };
        // SAFETY: USERFAULTFD_IOC_NEW takes the flags by value and returns a new fd or -1.
        let fd = unsafe {
            libc::ioctl(
                dev.as_raw_fd(),
                USERFAULTFD_IOC_NEW as _,
                libc::c_ulong::from(flags as u32),
            )
        };
        if fd < 0 {
            return Err(err);
        }
        // SAFETY: the kernel just returned this fd; nothing else owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    fn handshake(fd: OwnedFd, features: u64) -> Result<Uffd, Errno> {
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes a `struct uffdio_api`, which `api` is
        // (`repr(C)`, size checked above); it lives across the call.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, &mut api) };
        if rc != 0 {
            return Err(last_errno());
        }
        Ok(Uffd {
            fd,
            features: features & api.features,
        })
    }

    /// Whether page-fault messages carry the faulting thread's id.
    pub fn has_thread_id(&self) -> bool {
        self.features & UFFD_FEATURE_THREAD_ID != 0
    }

    fn range_ioctl(&self, req: u32, start: u64, len: u64) -> Result<(), Errno> {
        let mut r = UffdioRange { start, len };
        // SAFETY: UNREGISTER and WAKE read a `struct uffdio_range`, which `r` is; it lives
        // across the call. Neither changes any memory this process can see.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), req as _, &mut r) };
        if rc != 0 {
            return Err(last_errno());
        }
        Ok(())
    }

    /// Register `start..start+len` (page aligned, covered by anonymous, shmem or hugetlb
    /// mappings) in MISSING mode: from now on an access to a page of it that has no page
    /// blocks until [`Uffd::wake`] and is reported by [`Uffd::read_faults`]. Mapping something
    /// else over part of the range (`MAP_FIXED`) drops the registration there.
    pub fn register_missing(&self, start: u64, len: u64) -> Result<(), Errno> {
        let mut r = UffdioRegister {
            range: UffdioRange { start, len },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes a `struct uffdio_register`, which `r` is;
        // it lives across the call. Registration changes how faults in the range are served,
        // not the memory itself.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER as _, &mut r) };
        if rc != 0 {
            return Err(last_errno());
        }
        Ok(())
    }

    /// Undo [`Uffd::register_missing`] on a range (threads blocked there are woken).
    pub fn unregister(&self, start: u64, len: u64) -> Result<(), Errno> {
        self.range_ioctl(UFFDIO_UNREGISTER, start, len)
    }

    /// Wake the threads blocked on faults in `start..start+len`: they retry the access.
    pub fn wake(&self, start: u64, len: u64) -> Result<(), Errno> {
        self.range_ioctl(UFFDIO_WAKE, start, len)
    }

    /// Append every pending page-fault message to `out` without blocking; the number read.
    /// Other events (none are requested) are skipped.
    pub fn read_faults(&self, out: &mut Vec<PageFault>) -> Result<usize, Errno> {
        let mut msgs = [UffdMsg::default(); 32];
        let mut n = 0;
        loop {
            // SAFETY: reading into a buffer of `size_of_val(&msgs)` bytes that we own; every
            // bit pattern is a valid `UffdMsg` (integers only).
            let rc = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    msgs.as_mut_ptr().cast(),
                    std::mem::size_of_val(&msgs),
                )
            };
            if rc < 0 {
                let e = last_errno();
                if e == Errno::INTR {
                    continue;
                }
                if e == Errno::AGAIN {
                    return Ok(n);
                }
                return Err(e);
            }
            let got = usize::try_from(rc).unwrap_or(0) / std::mem::size_of::<UffdMsg>();
            if got == 0 {
                return Ok(n);
            }
            for m in &msgs[..got.min(msgs.len())] {
                if m.event != UFFD_EVENT_PAGEFAULT {
                    continue;
                }
                let tid = (m.arg[2] & 0xffff_ffff) as u32 as i32;
                out.push(PageFault {
                    address: m.arg[1],
                    write: m.arg[0] & UFFD_PAGEFAULT_FLAG_WRITE != 0,
                    tid: (self.has_thread_id() && tid > 0).then_some(tid),
                });
                n += 1;
            }
        }
    }

    /// Wait until a fault is pending or `stop` is signalled, at most `timeout` (`None`:
    /// forever). Returns (fault pending, stop signalled).
    pub fn wait(&self, stop: &EventFd, timeout: Option<Duration>) -> Result<(bool, bool), Errno> {
        let ms = timeout.map_or(-1, |t| i32::try_from(t.as_millis()).unwrap_or(i32::MAX));
        let mut fds = [
            libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        loop {
            // SAFETY: poll on an array of two initialized pollfds that we own.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
            if rc >= 0 {
                break;
            }
            let e = last_errno();
            if e != Errno::INTR {
                return Err(e);
            }
        }
        let ready =
            |p: &libc::pollfd| p.revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0;
        Ok((ready(&fds[0]), ready(&fds[1])))
    }
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// An `eventfd` used to wake a thread waiting in [`Uffd::wait`].
#[derive(Debug)]
pub struct EventFd {
    fd: OwnedFd,
}

impl EventFd {
    pub fn new() -> Result<EventFd, Errno> {
        // SAFETY: eventfd takes an initial value and flags and returns a new fd or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(last_errno());
        }
        // SAFETY: the kernel just returned this fd; nothing else owns it.
        Ok(EventFd {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Make the descriptor readable (until [`EventFd::clear`]).
    pub fn signal(&self) {
        let one = 1u64;
        // SAFETY: writing 8 bytes from a local u64 to our own eventfd; a full counter
        // (EAGAIN) already means "readable", so the result does not matter.
        let _ = unsafe {
            libc::write(
                self.fd.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }

    /// Reset the counter.
    pub fn clear(&self) {
        let mut v = 0u64;
        // SAFETY: reading 8 bytes into a local u64 from our own non-blocking eventfd.
        let _ = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut v as *mut u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
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
    fn bad_ranges_are_errors() {
        let Some(u) = uffd_or_skip("bad_ranges_are_errors") else {
            return;
        };
        assert_eq!(u.register_missing(1, PAGE as u64), Err(Errno::INVAL));
        assert_eq!(u.wake(0x1000, 3), Err(Errno::INVAL));
    }
}
