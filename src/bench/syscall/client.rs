//! The client half of `handover bench syscall`: this binary run by `handover run`, so its
//! `libc` calls go through the preload library. It measures the forwarded ioctl, the mapped
//! writes and `write()` into host and real memfds, and prints one [`ClientReport`].

use super::*;

/// Whether `fd` is one of the preload's placeholders for a host file (an `O_PATH` fd of
/// `/dev/null` in the real kernel), asked of the kernel directly.
fn is_host_placeholder(fd: i32) -> bool {
    // SAFETY: fcntl(F_GETFL) with an integer fd.
    let fl = unsafe { libc::syscall(libc::SYS_fcntl, fd, libc::F_GETFL) };
    fl >= 0 && (fl as i32) & libc::O_PATH != 0
}

const MEMFD_NAME: &CStr = c"handover-bench";

/// A new memfd of `kind`, checked to be what it should be.
fn memfd(kind: MemfdKind) -> Result<i32, String> {
    let fd = match kind {
        // SAFETY: a NUL-terminated name and flags.
        MemfdKind::Host => unsafe { libc::memfd_create(MEMFD_NAME.as_ptr(), libc::MFD_CLOEXEC) },
        // SAFETY: the raw syscall, which the preload library does not see.
        MemfdKind::Real => unsafe {
            libc::syscall(
                libc::SYS_memfd_create,
                MEMFD_NAME.as_ptr(),
                libc::MFD_CLOEXEC,
            ) as i32
        },
    };
    if fd < 0 {
        return Err(os_err(&format!("memfd_create ({kind:?})")));
    }
    if is_host_placeholder(fd) != (kind == MemfdKind::Host) {
        close(fd);
        return Err(format!(
            "memfd_create ({kind:?}) did not give a {kind:?} memfd: is this running under \
             `handover run`?"
        ));
    }
    Ok(fd)
}

fn close(fd: i32) {
    // SAFETY: closing an fd this module opened.
    unsafe { libc::close(fd) };
}

fn fstat(fd: i32) -> Result<libc::stat, String> {
    // SAFETY: an all-zero `struct stat` is valid, and fstat fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a `struct stat`.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(os_err("fstat"));
    }
    Ok(st)
}

fn minor_faults() -> u64 {
    // SAFETY: an all-zero `struct rusage` is valid, and getrusage fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a `struct rusage`.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    ru.ru_minflt as u64
}

/// One mapping run: create, size, map; store every word; check; unmap and close.
fn mmap_run(kind: MemfdKind, run: usize, size: u64) -> Result<MmapRun, String> {
    let len = usize::try_from(size).map_err(|_| "size too large")?;
    let words = len / 8;
    let seed = (run as u64) << 40;

    let t0 = Instant::now();
    let fd = memfd(kind)?;
    // SAFETY: ftruncate of the memfd just made.
    if unsafe { libc::ftruncate(fd, size as libc::off_t) } != 0 {
        close(fd);
        return Err(os_err("ftruncate"));
    }
    // SAFETY: a new shared mapping of the whole file; nothing else is at the address.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        close(fd);
        return Err(os_err("mmap"));
    }
    let t1 = Instant::now();
    let f0 = minor_faults();
    let w = p.cast::<u64>();
    for i in 0..words {
        // SAFETY: `i` < `words`: inside the mapping. Memory shared with the host is written
        // only with volatile stores.
        unsafe { w.add(i).write_volatile(seed | i as u64) };
    }
    let t2 = Instant::now();
    let faults = minor_faults() - f0;

    // Untimed checks: the file holds every page, and each page holds what was stored.
    let st = fstat(fd);
    let mut bad = None;
    for i in (0..words).step_by(4096 / 8).chain(words.checked_sub(1)) {
        // SAFETY: inside the mapping; volatile, as above.
        let v = unsafe { w.add(i).read_volatile() };
        if v != seed | i as u64 {
            bad = Some(i);
            break;
        }
    }

    let t3 = Instant::now();
    // SAFETY: the mapping made above, unmapped once.
    let um = unsafe { libc::munmap(p, len) };
    close(fd);
    let t4 = Instant::now();
    if um != 0 {
        return Err(os_err("munmap"));
    }
    let st = st?;
    if (st.st_blocks as u64) * 512 < size {
        return Err(format!(
            "{kind:?} memfd holds {} bytes after every word of {size} was written",
            st.st_blocks * 512
        ));
    }
    if let Some(i) = bad {
        return Err(format!(
            "{kind:?} memfd: word {i} does not hold what was stored"
        ));
    }
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    let total = ms(t1 - t0) + ms(t2 - t1) + ms(t4 - t3);
    Ok(MmapRun {
        kind,
        run,
        setup_ms: ms(t1 - t0),
        touch_ms: ms(t2 - t1),
        teardown_ms: ms(t4 - t3),
        total_ms: total,
        gb_per_s: size as f64 / 1e9 / (total / 1e3),
        minor_faults: faults,
    })
}

/// One write() run: `size` bytes in `block`-sized write() calls into a new memfd.
fn write_run(kind: MemfdKind, run: usize, size: u64, block: u64) -> Result<WriteRun, String> {
    let block = usize::try_from(block).map_err(|_| "block too large")?;
    let mut buf: Vec<u8> = (0..block).map(|i| (i as u8) ^ (run as u8)).collect();
    let fd = memfd(kind)?;
    let mut done = 0u64;
    let t = Instant::now();
    while done < size {
        let n = block.min((size - done) as usize);
        // Each block differs from the one before.
        buf[..8].copy_from_slice(&done.to_ne_bytes());
        // SAFETY: `buf` holds at least `n` bytes.
        let r = unsafe { libc::write(fd, buf.as_ptr().cast(), n) };
        if r <= 0 {
            let e = os_err("write");
            close(fd);
            return Err(e);
        }
        done += r as u64;
    }
    let d = t.elapsed();
    let st = fstat(fd);
    close(fd);
    let st = st?;
    if st.st_size as u64 != size {
        return Err(format!(
            "{kind:?} memfd is {} bytes after writing {size}",
            st.st_size
        ));
    }
    Ok(WriteRun {
        kind,
        run,
        ms: d.as_secs_f64() * 1e3,
        gb_per_s: size as f64 / 1e9 / d.as_secs_f64(),
    })
}

/// GET_NAME on a host session, `iters` times, through `libc::ioctl` (forwarded by the preload).
fn forwarded_ioctl(iters: usize) -> Result<Latency, String> {
    // SAFETY: a NUL-terminated path.
    let dev = unsafe { libc::open(c"/dev/liveupdate".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if dev < 0 {
        return Err(os_err("open /dev/liveupdate"));
    }
    if !is_host_placeholder(dev) {
        close(dev);
        return Err(
            "/dev/liveupdate is not the host's: is this running under `handover run`?".into(),
        );
    }
    let mut c = CreateSession {
        size: std::mem::size_of::<CreateSession>() as u32,
        fd: -1,
        name: [0; 64],
    };
    c.name[..SESSION.len()].copy_from_slice(SESSION.as_bytes());
    // SAFETY: the argument is a `struct liveupdate_ioctl_create_session`.
    let r = unsafe {
        libc::ioctl(
            dev,
            crate::abi::luo::LIVEUPDATE_IOCTL_CREATE_SESSION as libc::c_ulong,
            &mut c as *mut CreateSession,
        )
    };
    if r != 0 {
        let e = os_err("CREATE_SESSION");
        close(dev);
        return Err(e);
    }
    let s = c.fd;
    let l = time_calls(iters, || {
        let mut a = get_name_arg();
        // SAFETY: the argument is a `struct liveupdate_session_get_name`.
        let r = unsafe {
            libc::ioctl(
                s,
                LIVEUPDATE_SESSION_GET_NAME as libc::c_ulong,
                &mut a as *mut SessionGetName,
            )
        };
        if r != 0 {
            return Err(os_err("GET_NAME"));
        }
        if !name_is(std::hint::black_box(&a)) {
            return Err("GET_NAME: wrong name".into());
        }
        Ok(())
    });
    close(s);
    close(dev);
    l
}

/// The client: every forwarded measurement (see the module documentation). Host and real
/// memfd runs alternate which goes first.
pub fn client(o: &Options) -> Result<ClientReport, String> {
    if std::env::var_os("HANDOVER_SOCK").is_none() {
        return Err(
            "bench syscall-client runs under `handover run` (use `handover bench syscall`)".into(),
        );
    }
    let forwarded = forwarded_ioctl(o.iters)?;
    let preload_kernel = kernel_ioctl(o.iters)?;
    let order = |run: usize| {
        if run % 2 == 0 {
            [MemfdKind::Host, MemfdKind::Real]
        } else {
            [MemfdKind::Real, MemfdKind::Host]
        }
    };
    let runs = o.runs.max(1);
    let mut mmap_runs = Vec::new();
    for run in 0..runs {
        for kind in order(run) {
            mmap_runs.push(mmap_run(kind, run, o.size)?);
        }
    }
    let mut write_runs = Vec::new();
    for run in 0..runs {
        for kind in order(run) {
            write_runs.push(write_run(kind, run, o.size, o.block)?);
        }
    }
    let mstat = |k: MemfdKind, f: fn(&MmapRun) -> f64| {
        RunStats::of(
            &mmap_runs
                .iter()
                .filter(|r| r.kind == k)
                .map(f)
                .collect::<Vec<_>>(),
        )
    };
    let wstat = |k: MemfdKind| {
        RunStats::of(
            &write_runs
                .iter()
                .filter(|r| r.kind == k)
                .map(|r| r.gb_per_s)
                .collect::<Vec<_>>(),
        )
    };
    let host = mstat(MemfdKind::Host, |r| r.total_ms);
    let real = mstat(MemfdKind::Real, |r| r.total_ms);
    Ok(ClientReport {
        options: o.clone(),
        forwarded_ioctl: forwarded,
        preload_kernel_ioctl: preload_kernel,
        mmap_host_touch_ms: mstat(MemfdKind::Host, |r| r.touch_ms),
        mmap_real_touch_ms: mstat(MemfdKind::Real, |r| r.touch_ms),
        mmap_ratio_p50: host.p50 / real.p50,
        mmap_host_ms: host,
        mmap_real_ms: real,
        mmap_runs,
        write_host_gb_s: wstat(MemfdKind::Host),
        write_real_gb_s: wstat(MemfdKind::Real),
        write_runs,
    })
}
