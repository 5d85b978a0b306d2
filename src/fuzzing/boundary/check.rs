//! The invariants the boundary fuzzer checks after every request and every input.

use super::*;

/// What must come back once every process of an input has exited.
/// The frames are counted without the KHO tracker's nodes: like upstream's radix tree, it keeps
/// the nodes a preservation added after the pages are unpreserved (they are reused).
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Totals {
    files: usize,
    outgoing_sessions: usize,
    preserved_pages: u64,
    frames_used_without_tracker: u64,
    host_mappings: usize,
}

impl Totals {
    pub(super) fn of(h: &Host) -> Totals {
        let st = h.status();
        Totals {
            files: h.files().len(),
            outgoing_sessions: h.luo().outgoing.len(),
            preserved_pages: st.preserved,
            frames_used_without_tracker: st.frames.used - st.tracker_bytes / PAGE_SIZE,
            host_mappings: h.maps.len(),
        }
    }
}

/// What a reply must be, whatever the request.
pub(super) fn check_answer(h: &Host, pid: Pid, q: &Request, op: Op, a: &Answer) {
    assert!(
        a.payload.len() <= MAX_PAYLOAD,
        "{op:?}: a reply payload of {} bytes does not fit one message",
        a.payload.len()
    );
    let fds = fds_of(h, pid);
    match op {
        Op::Open | Op::MemfdCreate | Op::Dup if a.reply.ret >= 0 => {
            assert_eq!(
                a.reply.ret,
                i64::from(q.fd2),
                "{op:?} installed its file elsewhere than fd2"
            );
            assert!(
                fds.contains(&q.fd2),
                "{op:?} returned fd {} not open",
                q.fd2
            );
        }
        Op::Ioctl if a.reply.b[0] != u64::MAX => {
            assert_eq!(
                a.reply.b[0], q.fd2 as u64,
                "ioctl reports an fd other than its placeholder"
            );
            assert!(fds.contains(&q.fd2), "ioctl reports fd {} not open", q.fd2);
        }
        Op::Hello if fds.len() <= MAX_PAYLOAD / 4 => {
            assert_eq!(a.payload, fds.as_bytes(), "Hello lists other fds");
        }
        _ => {}
    }
}

/// What must hold between any two requests, for every process of the input.
pub(super) fn check_procs(h: &Host, procs: &[Proc]) {
    let mut writable: HashMap<u64, u32> = HashMap::new();
    for p in procs {
        let Ok(pr) = h.proc_ref(p.pid) else {
            panic!("process {} is gone without an exit", p.pid);
        };
        assert_eq!(pr.pending_fd, None, "an fd reservation was left behind");
        assert_eq!(pr.deferred, None, "a deferred range was not taken");
        for (fd, e) in &pr.fds {
            assert!(
                h.files().get(e.file).is_some(),
                "fd {fd} of process {} refers to file {} that was released",
                p.pid,
                e.file
            );
        }
        for m in &pr.remote {
            assert!(
                h.files().get(m.file).is_some(),
                "a mapping at {:#x} refers to file {} that was released",
                m.addr,
                m.file
            );
            assert!(
                m.len > 0
                    && m.len % PAGE_SIZE == 0
                    && m.addr % PAGE_SIZE == 0
                    && m.addr.checked_add(m.len).is_some(),
                "a mapping record is malformed: {:#x}+{:#x}",
                m.addr,
                m.len
            );
            if m.writable {
                *writable.entry(m.file).or_default() += 1;
            }
        }
    }
    for m in h.maps.values() {
        assert!(
            h.files().get(m.file).is_some(),
            "a host mapping refers to file {} that was released",
            m.file
        );
        if m.writable {
            *writable.entry(m.file).or_default() += 1;
        }
    }
    for id in h.files().ids() {
        if let Some(FileKind::Memfd(m)) = h.files().kind(id) {
            let want = writable.get(&id).copied().unwrap_or(0);
            assert_eq!(
                m.writable_maps, want,
                "memfd {id} counts {} writable mappings, there are {want}",
                m.writable_maps
            );
        }
    }
}
