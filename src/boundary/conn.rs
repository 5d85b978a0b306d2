//! One process's end of the boundary: a `SOCK_SEQPACKET` socket, read with the sender's
//! credentials (`SO_PASSCRED`, so the kernel attaches the sending pid to every message).

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
};
use zerocopy::IntoBytes;

use crate::abi::boundary::{Reply, MAX_PAYLOAD};
use crate::uapi::Pid;

/// A user process as the boundary knows it.
pub struct Conn {
    /// The host's end of the process's socket.
    pub sock: OwnedFd,
    /// The process in the host's process table.
    pub pid: Pid,
    /// Its real pid, once its first message bound the socket to it.
    pub real: Option<i32>,
    /// Before binding: the real pid the first message must come from (the program the host
    /// started), or the real pid of the parent the sender must be a child of (a fork).
    pub expect: Expect,
}

/// Who may bind a new socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Exactly this real pid (a program the host started itself).
    Pid(i32),
    /// A child of this real pid (the socket was made for a `fork`).
    ChildOf(i32),
}

/// One message received.
pub enum Recv {
    /// A message of this many bytes (at the start of the buffer) and the real pid of its
    /// sender (`None` if the kernel attached no credentials).
    Msg(usize, Option<i32>),
    /// Longer than any request: refused without decoding.
    Truncated(Option<i32>),
    /// Nothing to read now.
    Empty,
    /// The other end is closed: every holder of it has exited.
    Closed,
}

impl Conn {
    /// A connection for host process `pid`; `sock` gets `SO_PASSCRED`.
    pub fn new(sock: OwnedFd, pid: Pid, expect: Expect) -> std::io::Result<Conn> {
        rustix::net::sockopt::set_socket_passcred(&sock, true)?;
        Ok(Conn {
            sock,
            pid,
            real: None,
            expect,
        })
    }

    /// Receive one message without blocking, into `buf` (reused across calls: a request is up
    /// to 128 KiB, too much to allocate and zero for each).
    pub fn recv(&self, buf: &mut Vec<u8>) -> Recv {
        buf.resize(
            std::mem::size_of::<crate::abi::boundary::Request>() + MAX_PAYLOAD,
            0,
        );
        let mut space =
            [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4), ScmCredentials(1))];
        let mut anc = RecvAncillaryBuffer::new(&mut space);
        let r = recvmsg(
            &self.sock,
            &mut [IoSliceMut::new(buf)],
            &mut anc,
            RecvFlags::DONTWAIT | RecvFlags::CMSG_CLOEXEC,
        );
        let m = match r {
            Ok(m) => m,
            Err(rustix::io::Errno::AGAIN) | Err(rustix::io::Errno::INTR) => return Recv::Empty,
            Err(_) => return Recv::Closed,
        };
        let mut pid = None;
        for a in anc.drain() {
            match a {
                RecvAncillaryMessage::ScmCredentials(c) => pid = Some(c.pid.as_raw_nonzero().get()),
                // Requests never carry fds: any that come are closed here (dropped).
                RecvAncillaryMessage::ScmRights(fds) => fds.for_each(drop),
                _ => {}
            }
        }
        if m.bytes == 0 && !m.flags.contains(ReturnFlags::TRUNC) {
            return Recv::Closed;
        }
        if m.flags.contains(ReturnFlags::TRUNC) || m.flags.contains(ReturnFlags::CTRUNC) {
            return Recv::Truncated(pid);
        }
        Recv::Msg(m.bytes, pid)
    }

    /// Send a reply, with `fd` passed by `SCM_RIGHTS`. A process that died meanwhile is not an
    /// error here: its socket reports closed on the next read.
    pub fn send(&self, reply: &Reply, payload: &[u8], fd: Option<BorrowedFd<'_>>) {
        self.send_fds(reply, payload, fd.as_slice());
    }

    /// [`Conn::send`] with up to two fds.
    pub fn send_fds(&self, reply: &Reply, payload: &[u8], fds: &[BorrowedFd<'_>]) {
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
        let mut anc = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() {
            anc.push(SendAncillaryMessage::ScmRights(&fds[..fds.len().min(2)]));
        }
        let iov = [IoSlice::new(reply.as_bytes()), IoSlice::new(payload)];
        let n = if payload.is_empty() { 1 } else { 2 };
        if let Err(e) = sendmsg(
            &self.sock,
            &iov[..n],
            &mut anc,
            SendFlags::NOSIGNAL | SendFlags::DONTWAIT,
        ) {
            tracing::debug!("boundary: reply to host pid {} lost: {e}", self.pid);
        }
    }

    /// The socket, for poll.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    /// Wait until a message (or the end) can be read.
    pub fn wait_readable(&self) {
        let mut fds = [rustix::event::PollFd::from_borrowed_fd(
            self.sock.as_fd(),
            rustix::event::PollFlags::IN,
        )];
        let _ = rustix::event::poll(&mut fds, None);
    }
}
