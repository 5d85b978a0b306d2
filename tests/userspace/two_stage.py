#!/usr/bin/env python3
"""Two memfds carried across one live update by a Python program (standard library only).

usage: two_stage.py [daemon|reboot]

Stage 1 (the state session "py-two-stage-state" is absent) preserves a memfd written with
os.write and one filled through mmap in the session "py-two-stage-data", plus a state memfd.
Then, with "daemon" (the default), a forked child holds every fd while the program exits 0 and
the host updates; with "reboot" the program asks for the update itself through ctypes
reboot(LINUX_REBOOT_CMD_KEXEC). Stage 2 retrieves both memfds, checks every byte, finishes the
sessions and prints "python two-stage ok".
"""

import errno
import fcntl
import mmap
import os
import struct
import sys
import time

DEV = "/dev/liveupdate"

# _IO(0xBA, nr): no size or direction bits.
CREATE_SESSION = 0xBA00
RETRIEVE_SESSION = 0xBA01
PRESERVE_FD = 0xBA40
RETRIEVE_FD = 0xBA41
FINISH = 0xBA42

LINUX_REBOOT_CMD_KEXEC = 0x45584543

STATE_NAME = b"py-two-stage-state"
DATA_NAME = b"py-two-stage-data"
STATE_TOKEN = 0x77
STATE_TEXT = b"python next=2"
WRITTEN_TOKEN = 0x31
MAPPED_TOKEN = 0x32
WRITTEN_SIZE = 3 * 4096 + 777
MAPPED_SIZE = 5 * 4096

# struct liveupdate_ioctl_{create,retrieve}_session: u32 size, s32 fd, u8 name[64]
SESSION_FMT = "=Ii64s"
# struct liveupdate_session_{preserve,retrieve}_fd: u32 size, s32 fd, u64 token
FD_FMT = "=IiQ"
# struct liveupdate_session_finish: u32 size, u32 reserved
FINISH_FMT = "=II"


def fail(msg):
    print(f"python two-stage: FAIL: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def pattern(off, length, token):
    return bytes(((i * 31 + token) & 0xFF) for i in range(off, off + length))


def session_ioctl(dev, request, name):
    """CREATE_SESSION or RETRIEVE_SESSION; returns the new fd (raises OSError)."""
    arg = bytearray(struct.pack(SESSION_FMT, struct.calcsize(SESSION_FMT), -1, name))
    fcntl.ioctl(dev, request, arg, True)
    return struct.unpack(SESSION_FMT, arg)[1]


def preserve(session, fd, token):
    arg = bytearray(struct.pack(FD_FMT, struct.calcsize(FD_FMT), fd, token))
    fcntl.ioctl(session, PRESERVE_FD, arg, True)


def retrieve(session, token):
    arg = bytearray(struct.pack(FD_FMT, struct.calcsize(FD_FMT), -1, token))
    fcntl.ioctl(session, RETRIEVE_FD, arg, True)
    return struct.unpack(FD_FMT, arg)[1]


def finish(session):
    arg = bytearray(struct.pack(FINISH_FMT, struct.calcsize(FINISH_FMT), 0))
    fcntl.ioctl(session, FINISH, arg, True)


def write_all(fd, data):
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def read_at(fd, length, off):
    out = bytearray()
    while len(out) < length:
        chunk = os.pread(fd, length - len(out), off + len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def hold_in_daemon():
    """Fork a child that keeps every fd open until the update kills it (bounded sleep)."""
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.setsid()
            null = os.open("/dev/null", os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.write(w, b"h")
            os.close(w)
            for _ in range(600):
                time.sleep(1)
        finally:
            os._exit(0)
    os.close(w)
    if os.read(r, 1) != b"h":
        fail("the daemon did not start")
    os.close(r)


def stage1(dev, mode):
    data = session_ioctl(dev, CREATE_SESSION, DATA_NAME)
    state = session_ioctl(dev, CREATE_SESSION, STATE_NAME)

    written = os.memfd_create("py-written")
    write_all(written, pattern(0, WRITTEN_SIZE, WRITTEN_TOKEN))
    if os.fstat(written).st_size != WRITTEN_SIZE:
        fail("written memfd has the wrong size")

    mapped = os.memfd_create("py-mapped")
    os.ftruncate(mapped, MAPPED_SIZE)
    with mmap.mmap(mapped, MAPPED_SIZE, flags=mmap.MAP_SHARED,
                   prot=mmap.PROT_READ | mmap.PROT_WRITE) as m:
        m[:] = pattern(0, MAPPED_SIZE, MAPPED_TOKEN)
        m.flush()

    preserve(data, written, WRITTEN_TOKEN)
    preserve(data, mapped, MAPPED_TOKEN)

    st = os.memfd_create("py-state")
    write_all(st, STATE_TEXT)
    preserve(state, st, STATE_TOKEN)
    print("python two-stage: stage 1 preserved 2 memfds", flush=True)

    if mode == "reboot":
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.reboot(ctypes.c_int(LINUX_REBOOT_CMD_KEXEC))
        fail(f"reboot(LINUX_REBOOT_CMD_KEXEC) returned: {os.strerror(ctypes.get_errno())}")

    hold_in_daemon()
    for fd in (written, mapped, st, data, state, dev):
        os.close(fd)
    print("python two-stage: stage 1 done, the daemon holds the sessions", flush=True)


def stage2(dev, state):
    st = retrieve(state, STATE_TOKEN)
    if read_at(st, len(STATE_TEXT) + 1, 0) != STATE_TEXT:
        fail("state memfd has the wrong contents")
    data = session_ioctl(dev, RETRIEVE_SESSION, DATA_NAME)

    mapped = retrieve(data, MAPPED_TOKEN)
    written = retrieve(data, WRITTEN_TOKEN)

    if os.fstat(written).st_size != WRITTEN_SIZE:
        fail(f"written memfd: size {os.fstat(written).st_size}, want {WRITTEN_SIZE}")
    if read_at(written, WRITTEN_SIZE, 0) != pattern(0, WRITTEN_SIZE, WRITTEN_TOKEN):
        fail("written memfd: contents differ")

    if os.fstat(mapped).st_size != MAPPED_SIZE:
        fail(f"mapped memfd: size {os.fstat(mapped).st_size}, want {MAPPED_SIZE}")
    want = pattern(0, MAPPED_SIZE, MAPPED_TOKEN)
    with mmap.mmap(mapped, MAPPED_SIZE, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ) as m:
        if m[:] != want:
            fail("mapped memfd: contents differ through mmap")
    if read_at(mapped, MAPPED_SIZE, 0) != want:
        fail("mapped memfd: contents differ through pread")

    finish(data)
    finish(state)
    for fd in (written, mapped, st, data, state, dev):
        os.close(fd)
    print("python two-stage ok", flush=True)


def main():
    mode = sys.argv[1] if len(sys.argv) > 1 else "daemon"
    if mode not in ("daemon", "reboot"):
        fail(f"unknown mode {mode!r}: daemon or reboot")
    try:
        dev = os.open(DEV, os.O_RDWR)
    except OSError as e:
        fail(f"open {DEV}: {e.strerror}")
    try:
        state = session_ioctl(dev, RETRIEVE_SESSION, STATE_NAME)
    except OSError as e:
        if e.errno != errno.ENOENT:
            fail(f"RETRIEVE_SESSION {STATE_NAME.decode()}: {e.strerror}")
        state = None
    try:
        if state is None:
            stage1(dev, mode)
        else:
            stage2(dev, state)
    except OSError as e:
        fail(f"{e.strerror} (errno {e.errno})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
