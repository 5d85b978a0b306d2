//! Upstream's `tools/testing/selftests/liveupdate/liveupdate.c`, one test each with the same
//! expectations, plus the LUO rules the selftests do not cover (session kinds, ioctl argument
//! rules, FINISH with a handler that says no, close semantics, retrieval order).

use handover::host::Host;
use handover::kexec::BootParams;
use handover::uapi::{Errno, Pid};
use handover::vmm::libluo::*;

fn host() -> (Host, Pid) {
    let mut h = Host::boot(BootParams {
        ram_size: 256 << 20,
        ..Default::default()
    })
    .expect("boot");
    let pid = h.spawn();
    (h, pid)
}

fn dev(h: &mut Host, pid: Pid) -> i32 {
    h.open(pid, "/dev/liveupdate", 0)
        .expect("open /dev/liveupdate")
}

fn kexec(h: Host) -> (Host, Pid) {
    let mut h = h.kexec_in_process().expect("kexec");
    let pid = h.spawn();
    (h, pid)
}

#[test]
fn basic_open_close() {
    let (mut h, pid) = host();
    let fd = dev(&mut h, pid);
    assert_eq!(h.close(pid, fd), Ok(()));
}

#[test]
fn exclusive_open() {
    let (mut h, pid) = host();
    let _fd = dev(&mut h, pid);
    assert_eq!(h.open(pid, "/dev/liveupdate", 0), Err(Errno::EBUSY));
    let other = h.spawn();
    assert_eq!(h.open(other, "/dev/liveupdate", 0), Err(Errno::EBUSY));
}

#[test]
fn create_duplicate_session() {
    let (mut h, pid) = host();
    let d = dev(&mut h, pid);
    create_session(&mut h, pid, d, "duplicate-session-test").unwrap();
    assert_eq!(
        create_session(&mut h, pid, d, "duplicate-session-test"),
        Err(Errno::EEXIST)
    );
}

#[test]
fn create_distinct_sessions() {
    let (mut h, pid) = host();
    let d = dev(&mut h, pid);
    let a = create_session(&mut h, pid, d, "distinct-session-1").unwrap();
    let b = create_session(&mut h, pid, d, "distinct-session-2").unwrap();
    assert!(a >= 0 && b >= 0 && a != b);
}

#[test]
fn preserve_memfd() {
    let (mut h, pid) = host();
    let d = dev(&mut h, pid);
    let s = create_session(&mut h, pid, d, "preserve-memfd-test").unwrap();
    let m = memfd_with(&mut h, pid, b"hello liveupdate").unwrap();
    preserve_fd(&mut h, pid, s, m, 0x1234).unwrap();
    h.close(pid, s).unwrap();
    assert_eq!(&read_all(&mut h, pid, m, 16).unwrap(), b"hello liveupdate");
}

#[test]
fn preserve_multiple_memfds() {
    let (mut h, pid) = host();
    let d = dev(&mut h, pid);
    let s = create_session(&mut h, pid, d, "preserve-multi-memfd-test").unwrap();
    let a = memfd_with(&mut h, pid, b"memfd-one").unwrap();
    let b = memfd_with(&mut h, pid, b"memfd-two").unwrap();
    preserve_fd(&mut h, pid, s, a, 0xAAAA).unwrap();
    preserve_fd(&mut h, pid, s, b, 0xBBBB).unwrap();
    assert_eq!(&read_all(&mut h, pid, a, 9).unwrap(), b"memfd-one");
    assert_eq!(&read_all(&mut h, pid, b, 9).unwrap(), b"memfd-two");
}

#[test]
fn preserve_complex_scenario() {
    let (mut h, pid) = host();
    let d = dev(&mut h, pid);
    let s1 = create_session(&mut h, pid, d, "complex-session-1").unwrap();
    let s2 = create_session(&mut h, pid, d, "complex-session-2").unwrap();
    let d1 = memfd_with(&mut h, pid, b"data for session 1").unwrap();
    let e1 = h.memfd_create(pid, "empty1", 0).unwrap();
    let d2 = memfd_with(&mut h, pid, b"data for session 2").unwrap();
    let e2 = h.memfd_create(pid, "empty2", 0).unwrap();
    preserve_fd(&mut h, pid, s1, d1, 0x1111).unwrap();
    preserve_fd(&mut h, pid, s1, e1, 0x2222).unwrap();
    preserve_fd(&mut h, pid, s2, d2, 0x3333).unwrap();
    preserve_fd(&mut h, pid, s2, e2, 0x4444).unwrap();
    assert_eq!(
        &read_all(&mut h, pid, d1, 18).unwrap(),
        b"data for session 1"
    );
    assert_eq!(
        &read_all(&mut h, pid, d2, 18).unwrap(),
        b"data for session 2"
    );
    assert_eq!(read_all(&mut h, pid, e1, 16).unwrap().len(), 0);
    assert_eq!(read_all(&mut h, pid, e2, 16).unwrap().len(), 0);
}

#[test]
fn preserve_unsupported_fd() {
    let (mut h, pid) = host();
    let d = dev(&mut h, pid);
    let s = create_session(&mut h, pid, d, "unsupported-fd-test").unwrap();
    let null = h.open(pid, "/dev/null", 0).unwrap();
    assert_eq!(
        preserve_fd(&mut h, pid, s, null, 0xDEAD),
        Err(Errno::ENOENT)
    );
}

#[test]
fn prevent_double_preservation() {
    let (mut h, pid) = host();
    let d = dev(&mut h, pid);
    let s1 = create_session(&mut h, pid, d, "double-preserve-1").unwrap();
    let s2 = create_session(&mut h, pid, d, "double-preserve-2").unwrap();
    let m = memfd_with(&mut h, pid, b"x").unwrap();
    preserve_fd(&mut h, pid, s1, m, 0x1).unwrap();
    assert_eq!(preserve_fd(&mut h, pid, s2, m, 0x2), Err(Errno::EBUSY));
    assert_eq!(preserve_fd(&mut h, pid, s1, m, 0x3), Err(Errno::EBUSY));
    // A dup of the same memfd is the same file.
    let dup = h.dup(pid, m).unwrap();
    assert_eq!(preserve_fd(&mut h, pid, s2, dup, 0x4), Err(Errno::EBUSY));
}

#[test]
fn create_session_no_null_termination() {
    let (mut h, pid) = host();
    let d = dev(&mut h, pid);
    assert_eq!(
        create_session(&mut h, pid, d, &"X".repeat(64)),
        Err(Errno::EINVAL)
    );
}

#[test]
fn create_session_empty_name() {
    let (mut h, pid) = host();
    let d = dev(&mut h, pid);
    assert_eq!(create_session(&mut h, pid, d, ""), Err(Errno::EINVAL));
}

#[test]
fn get_session_name() {
    let (mut h, pid) = host();
    let d = dev(&mut h, pid);
    let s = create_session(&mut h, pid, d, "get-name-test-session").unwrap();
    assert_eq!(get_name(&mut h, pid, s).unwrap(), "get-name-test-session");
}

#[test]
fn get_session_name_max_length() {
    let (mut h, pid) = host();
    let d = dev(&mut h, pid);
    let name = "a".repeat(63);
    let s = create_session(&mut h, pid, d, &name).unwrap();
    assert_eq!(get_name(&mut h, pid, s).unwrap(), name);
}

#[test]
fn preserve_many_sessions() {
    let (mut h, pid) = host();
    let d = dev(&mut h, pid);
    let fds: Vec<i32> = (0..2000)
        .map(|i| create_session(&mut h, pid, d, &format!("many-test-{i}")).unwrap())
        .collect();
    assert_eq!(h.luo().counts().0, 2000);
    for fd in fds {
        h.close(pid, fd).unwrap();
    }
    assert_eq!(h.luo().counts().0, 0);
}

#[test]
fn preserve_many_files() {
    let (mut h, pid) = host();
    let d = dev(&mut h, pid);
    let s = create_session(&mut h, pid, d, "many-files").unwrap();
    let used0 = h.mm().stats().used;
    let nodes0 = h.status().tracker_bytes;
    for i in 0..500u64 {
        let m = memfd_with(&mut h, pid, format!("file-data-{i}").as_bytes()).unwrap();
        preserve_fd(&mut h, pid, s, m, i).unwrap();
        h.close(pid, m).unwrap();
    }
    assert_eq!(h.luo().counts().2, 500);
    h.close(pid, s).unwrap();
    assert_eq!(h.luo().counts().2, 0);
    assert_eq!(
        h.status().preserved,
        0,
        "closing the session unpreserved everything"
    );
    // Tracker nodes stay once allocated (as upstream); everything else was freed.
    let grown = (h.status().tracker_bytes - nodes0) / 4096;
    assert_eq!(
        h.mm().stats().used,
        used0 + grown,
        "the memfds' pages were freed with them"
    );
}

// ---- beyond the upstream selftests ----

#[test]
fn session_ioctls_on_the_wrong_kind_of_session() {
    let (mut h, pid) = host();
    let d = dev(&mut h, pid);
    let s = create_session(&mut h, pid, d, "out").unwrap();
    let m = memfd_with(&mut h, pid, b"data").unwrap();
    preserve_fd(&mut h, pid, s, m, 7).unwrap();
    assert_eq!(retrieve_fd(&mut h, pid, s, 7), Err(Errno::EINVAL));
    assert_eq!(finish(&mut h, pid, s), Err(Errno::EINVAL));
    h.close(pid, d).unwrap();
    let (mut h, pid) = kexec(h);
    let d = dev(&mut h, pid);
    let s = retrieve_session(&mut h, pid, d, "out").unwrap();
    let m2 = memfd_with(&mut h, pid, b"new").unwrap();
    assert_eq!(preserve_fd(&mut h, pid, s, m2, 8), Err(Errno::EINVAL));
    assert_eq!(
        retrieve_session(&mut h, pid, d, "out"),
        Err(Errno::EINVAL),
        "already retrieved"
    );
    assert_eq!(
        retrieve_session(&mut h, pid, d, "missing"),
        Err(Errno::ENOENT)
    );
    assert_eq!(get_name(&mut h, pid, s).unwrap(), "out");
}

#[test]
fn malformed_ioctl_arguments() {
    use handover::abi::luo::*;
    let (mut h, pid) = host();
    let d = dev(&mut h, pid);
    let s = create_session(&mut h, pid, d, "args").unwrap();
    let mut name = [0u8; 72];
    name[8..12].copy_from_slice(b"abcd");
    let set = |mut b: Vec<u8>, size: u32| {
        b[..4].copy_from_slice(&size.to_ne_bytes());
        b
    };
    // (fd, cmd, buffer, expected errno)
    let cases: Vec<(i32, u64, Vec<u8>, Errno)> = vec![
        (d, 0xBA05, set(name.to_vec(), 72), Errno::EINVAL), // nr beyond the device table
        (d, 0x5401, set(name.to_vec(), 72), Errno::ENOTTY), // not a LUO ioctl
        (d, 0xC048BA00, set(name.to_vec(), 72), Errno::ENOTTY), // direction/size bits set
        (
            d,
            LIVEUPDATE_IOCTL_CREATE_SESSION,
            set(name.to_vec(), 71),
            Errno::EINVAL,
        ), // too small
        (
            d,
            LIVEUPDATE_IOCTL_CREATE_SESSION,
            set([name.to_vec(), vec![0, 0, 1, 0]].concat(), 76),
            Errno::E2BIG,
        ),
        (
            d,
            LIVEUPDATE_IOCTL_CREATE_SESSION,
            set(name.to_vec(), 100),
            Errno::EFAULT,
        ), // beyond the buffer
        (
            d,
            LIVEUPDATE_IOCTL_CREATE_SESSION,
            vec![72, 0],
            Errno::EFAULT,
        ),
        (
            s,
            LIVEUPDATE_IOCTL_CREATE_SESSION,
            set(name.to_vec(), 72),
            Errno::EINVAL,
        ), // device ioctl on a session
        (s, 0xBA44, set(vec![0; 16], 16), Errno::EINVAL),
        (
            s,
            LIVEUPDATE_SESSION_PRESERVE_FD,
            set(vec![0; 16], 15),
            Errno::EINVAL,
        ),
        (
            s,
            LIVEUPDATE_SESSION_PRESERVE_FD,
            set([vec![0; 16], vec![1]].concat(), 17),
            Errno::E2BIG,
        ),
        (
            s,
            LIVEUPDATE_SESSION_PRESERVE_FD,
            set(vec![0, 0, 0, 0, 99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], 16),
            Errno::EBADF,
        ),
        (
            s,
            LIVEUPDATE_SESSION_GET_NAME,
            set([vec![0; 4], vec![1, 0, 0, 0], vec![0; 64]].concat(), 72),
            Errno::EINVAL,
        ),
    ];
    for (i, (fd, cmd, mut buf, want)) in cases.into_iter().enumerate() {
        assert_eq!(
            h.ioctl(pid, fd, cmd, &mut buf),
            Err(want),
            "case {i}: cmd {cmd:#x}"
        );
    }
    // A larger struct with zero trailing bytes is accepted.
    let mut big = set([name.to_vec(), vec![0; 8]].concat(), 80);
    assert_eq!(
        h.ioctl(pid, d, LIVEUPDATE_IOCTL_CREATE_SESSION, &mut big),
        Ok(0)
    );
    assert_eq!(
        h.ioctl(pid, 99, LIVEUPDATE_IOCTL_CREATE_SESSION, &mut big),
        Err(Errno::EBADF)
    );
}

#[test]
fn preserved_memfd_is_frozen_and_closing_the_session_unfreezes_it() {
    let (mut h, pid) = host();
    let d = dev(&mut h, pid);
    let s = create_session(&mut h, pid, d, "freeze").unwrap();
    let m = h.memfd_create(pid, "sparse", 0).unwrap();
    h.ftruncate(pid, m, 64 << 10).unwrap();
    h.pwrite(pid, m, b"head", 0).unwrap();
    preserve_fd(&mut h, pid, s, m, 1).unwrap();
    assert_eq!(
        h.status().preserved,
        16 + 3,
        "holes were filled: 16 pages, plus folio list (page and chunk) and blob"
    );
    assert_eq!(h.ftruncate(pid, m, 128 << 10), Err(Errno::EPERM));
    assert_eq!(h.ftruncate(pid, m, 4096), Err(Errno::EPERM));
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    assert_eq!(h.fallocate(pid, m, punch, 0, 4096), Err(Errno::EPERM));
    assert_eq!(
        h.pwrite(pid, m, b"x", 64 << 10),
        Err(Errno::EPERM),
        "no growth by write"
    );
    h.pwrite(pid, m, b"still writable", 100).unwrap();
    h.close(pid, s).unwrap();
    assert_eq!(h.status().preserved, 0);
    h.ftruncate(pid, m, 128 << 10).unwrap();
    h.fallocate(pid, m, punch, 0, 4096).unwrap();
    assert_eq!(read_all(&mut h, pid, m, 4).unwrap(), vec![0; 4]);
}

#[test]
fn finish_with_a_handler_that_says_no() {
    let (mut h, pid) = host();
    let d = dev(&mut h, pid);
    let s = create_session(&mut h, pid, d, "blocked").unwrap();
    let t = h.open(pid, "/dev/liveupdate-test", 0).unwrap();
    h.test_file_set(
        pid,
        t,
        handover::fs::TestFile {
            value: 42,
            ..Default::default()
        },
    )
    .unwrap();
    let m = memfd_with(&mut h, pid, b"keep me").unwrap();
    preserve_fd(&mut h, pid, s, m, 1).unwrap();
    preserve_fd(&mut h, pid, s, t, 2).unwrap();
    let (mut h, pid) = kexec(h);
    let d = dev(&mut h, pid);
    let s = retrieve_session(&mut h, pid, d, "blocked").unwrap();
    let t = retrieve_fd(&mut h, pid, s, 2).unwrap();
    assert_eq!(h.test_file_get(pid, t).unwrap().value, 42);
    h.test_file_set(
        pid,
        t,
        handover::fs::TestFile {
            value: 42,
            block_finish: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(finish(&mut h, pid, s), Err(Errno::EBUSY));
    // Nothing changed: the memfd can still be retrieved and read.
    let m = retrieve_fd(&mut h, pid, s, 1).unwrap();
    assert_eq!(&read_all(&mut h, pid, m, 7).unwrap(), b"keep me");
    h.test_file_set(
        pid,
        t,
        handover::fs::TestFile {
            value: 42,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(finish(&mut h, pid, s), Ok(()));
    assert_eq!(
        retrieve_fd(&mut h, pid, s, 1),
        Err(Errno::ENOENT),
        "a finished session's files are gone"
    );
    assert_eq!(
        &read_all(&mut h, pid, m, 7).unwrap(),
        b"keep me",
        "retrieved files live on"
    );
}

#[test]
fn closing_an_outgoing_session_before_kexec_drops_its_files() {
    let (mut h, pid) = host();
    let d = dev(&mut h, pid);
    let s = create_session(&mut h, pid, d, "closed-early").unwrap();
    let m = memfd_with(&mut h, pid, b"gone").unwrap();
    preserve_fd(&mut h, pid, s, m, 1).unwrap();
    h.close(pid, s).unwrap();
    h.ftruncate(pid, m, 8192).unwrap();
    let (mut h, pid) = kexec(h);
    let d = dev(&mut h, pid);
    assert_eq!(
        retrieve_session(&mut h, pid, d, "closed-early"),
        Err(Errno::ENOENT)
    );
    assert_eq!(h.status().incoming_outstanding, 0);
}

#[test]
fn retrieval_in_every_order() {
    let tokens = [10u64, 20, 30];
    let orders = [
        [0, 1, 2],
        [0, 2, 1],
        [1, 0, 2],
        [1, 2, 0],
        [2, 0, 1],
        [2, 1, 0],
    ];
    for order in orders {
        let (mut h, pid) = host();
        let d = dev(&mut h, pid);
        let s = create_session(&mut h, pid, d, "order").unwrap();
        for t in tokens {
            let m = memfd_with(&mut h, pid, format!("token-{t}").as_bytes()).unwrap();
            preserve_fd(&mut h, pid, s, m, t).unwrap();
        }
        let (mut h, pid) = kexec(h);
        let d = dev(&mut h, pid);
        let s = retrieve_session(&mut h, pid, d, "order").unwrap();
        for i in order {
            let t = tokens[i];
            let m = retrieve_fd(&mut h, pid, s, t).unwrap();
            assert_eq!(
                read_all(&mut h, pid, m, 8).unwrap(),
                format!("token-{t}").as_bytes()
            );
            let again = retrieve_fd(&mut h, pid, s, t).unwrap();
            assert_eq!(
                h.fd_file(pid, again),
                h.fd_file(pid, m),
                "same file on a second retrieve"
            );
        }
        assert_eq!(retrieve_fd(&mut h, pid, s, 99), Err(Errno::ENOENT));
        finish(&mut h, pid, s).unwrap();
    }
}

#[test]
fn unretrieved_files_are_discarded_by_finish() {
    let (mut h, pid) = host();
    let d = dev(&mut h, pid);
    let s = create_session(&mut h, pid, d, "discard").unwrap();
    for t in 0..4u64 {
        let m = h.memfd_create(pid, "big", 0).unwrap();
        h.ftruncate(pid, m, 1 << 20).unwrap();
        preserve_fd(&mut h, pid, s, m, t).unwrap();
        h.close(pid, m).unwrap();
    }
    let (mut h, pid) = kexec(h);
    assert_eq!(
        h.status().incoming_outstanding,
        4 * (256 + 3) + 3,
        "per memfd 1 MiB, list page, chunk, blob; LUO blob, session and file blocks"
    );
    let d = dev(&mut h, pid);
    let s = retrieve_session(&mut h, pid, d, "discard").unwrap();
    let _kept = retrieve_fd(&mut h, pid, s, 0).unwrap();
    finish(&mut h, pid, s).unwrap();
    assert_eq!(h.status().incoming_outstanding, 0);
    let st = h.mm().stats();
    assert_eq!(
        st.used,
        256 + 1,
        "one retrieved memfd and the tracker root stay"
    );
}

#[test]
fn memfd_seals_position_and_sparse_reads_survive() {
    use handover::fs::memfd::*;
    let (mut h, pid) = host();
    let d = dev(&mut h, pid);
    let s = create_session(&mut h, pid, d, "seals").unwrap();
    let m = h.memfd_create(pid, "sealed", MFD_ALLOW_SEALING).unwrap();
    h.write(pid, m, b"0123456789").unwrap();
    h.add_seals(pid, m, F_SEAL_GROW | F_SEAL_SHRINK).unwrap();
    assert_eq!(h.lseek(pid, m, 0, libc::SEEK_CUR).unwrap(), 10);
    preserve_fd(&mut h, pid, s, m, 1).unwrap();
    h.lseek(pid, m, 4, libc::SEEK_SET).unwrap();
    let (mut h, pid) = kexec(h);
    let d = dev(&mut h, pid);
    let s = retrieve_session(&mut h, pid, d, "seals").unwrap();
    let m = retrieve_fd(&mut h, pid, s, 1).unwrap();
    assert_eq!(h.get_seals(pid, m).unwrap(), F_SEAL_GROW | F_SEAL_SHRINK);
    assert_eq!(
        h.lseek(pid, m, 0, libc::SEEK_CUR).unwrap(),
        4,
        "position refreshed at freeze"
    );
    let mut b = [0u8; 6];
    assert_eq!(h.read(pid, m, &mut b).unwrap(), 6);
    assert_eq!(&b, b"456789");
    assert_eq!(
        h.ftruncate(pid, m, 100),
        Err(Errno::EPERM),
        "GROW seal kept"
    );
    assert_eq!(h.ftruncate(pid, m, 10), Ok(()), "not frozen any more");
}

#[test]
fn mmap_of_a_memfd_sees_the_same_pages() {
    let (mut h, pid) = host();
    let m = h.memfd_create(pid, "mapped", 0).unwrap();
    h.ftruncate(pid, m, 3 * 4096).unwrap();
    let map = h
        .mmap(
            pid,
            m,
            3 * 4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            0,
        )
        .unwrap();
    h.user_write(pid, map.addr + 4090, b"across pages").unwrap();
    let mut b = [0u8; 12];
    h.pread(pid, m, &mut b, 4090).unwrap();
    assert_eq!(&b, b"across pages");
    // Present pages are reachable through the raw pointer too.
    // SAFETY: the page at offset 4096 is present (written above) and mapped shared.
    let byte = unsafe { std::ptr::read_volatile(map.ptr().add(4096)) };
    assert_eq!(byte, b' ');
    assert_eq!(
        h.user_read(pid, map.addr + 3 * 4096, &mut b),
        Err(Errno::EFAULT),
        "beyond the mapping"
    );
    h.ftruncate(pid, m, 4096).unwrap();
    assert_eq!(
        h.user_read(pid, map.addr + 4096, &mut b),
        Err(Errno::EFAULT),
        "beyond EOF: SIGBUS"
    );
    assert_eq!(
        h.mmap(pid, m, 4096, libc::PROT_READ, libc::MAP_PRIVATE, 0),
        Err(Errno::EINVAL)
    );
    h.munmap(pid, map).unwrap();
}

/// Review #9: a handover whose update counter cannot be incremented (`liveupdate_num` =
/// u64::MAX) is refused at boot, not wrapped (release) or a panic (debug).
#[test]
fn liveupdate_num_at_max_is_refused() {
    let (mut h, pid) = host();
    let d = dev(&mut h, pid);
    let s = create_session(&mut h, pid, d, "counter").unwrap();
    let m = memfd_with(&mut h, pid, b"counted").unwrap();
    preserve_fd(&mut h, pid, s, m, 1).unwrap();
    h.luo_mut().liveupdate_num = u64::MAX - 1;
    let (mut h, pid) = kexec(h);
    assert_eq!(h.luo().liveupdate_num, u64::MAX, "{:?}", h.info().refused);
    let d = dev(&mut h, pid);
    let s = retrieve_session(&mut h, pid, d, "counter").unwrap();
    let m = retrieve_fd(&mut h, pid, s, 1).unwrap();
    finish(&mut h, pid, s).unwrap();
    let s = create_session(&mut h, pid, d, "counter-2").unwrap();
    preserve_fd(&mut h, pid, s, m, 2).unwrap();
    // In process, a refused handover must not roll back (that would execve the test binary):
    // mark the next boot as a rollback already, which never rolls back again.
    h.params_mut().rollback = Some("test: no rollback".into());
    let (h, _) = kexec(h);
    let why = h.info().refused.clone().unwrap_or_default();
    assert!(why.contains("liveupdate_num"), "refused: {why:?}");
    assert!(!h.info().kho_boot);
}
