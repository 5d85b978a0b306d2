/*
 * boundary_abuse: a program that talks to the host over its boundary socket directly (the fd
 * named by HANDOVER_SOCK, with send and recv, no preload call in between) and checks that the
 * host refuses what a well-behaved preload library would never send:
 *
 *  - malformed messages (short, unknown op, payload where none belongs, longer than any
 *    request), ops on fds the process does not have, a fault outside any mapping, an open of a
 *    path the host does not serve, a dup to a negative fd;
 *  - a request from a process the host never made (a child of raw syscall(SYS_fork), which
 *    inherits the parent's socket): EPERM, whatever it sends;
 *  - a child made by the library's fork() that creates sessions (through the library and by raw
 *    requests), maps and faults a memfd, sends requests it never reads the replies of (a
 *    preserve, a fork, a read) and dies by SIGKILL: afterwards the device opens and the same
 *    session names can be created again (nothing of the child is left).
 *
 * One TAP line per check, the plan at the end; exit status 0 only if every check passed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "lu_util.h"

/* ---- a copy of the wire format (src/abi/boundary.rs) ---- */
struct hreq {
	uint32_t op, flags;
	int32_t fd, fd2;
	uint64_t a[4];
};
struct hrep {
	int64_t ret;
	uint64_t b[3];
};
struct mmargs {
	uint64_t addr, len;
	uint32_t prot, flags;
	uint64_t off;
};
_Static_assert(sizeof(struct hreq) == 48, "request header size");
_Static_assert(sizeof(struct hrep) == 32, "reply header size");
_Static_assert(sizeof(struct mmargs) == 32, "mmap payload size");

enum {
	OP_HELLO = 1, OP_OPEN, OP_CLOSE, OP_DUP, OP_IOCTL, OP_MEMFD_CREATE, OP_READ, OP_WRITE,
	OP_LSEEK, OP_FTRUNCATE, OP_FALLOCATE, OP_FSTAT, OP_SEALS, OP_MMAP, OP_MUNMAP, OP_FAULT,
	OP_FORK_PREPARE, OP_FORK_ABORT, OP_REBOOT, OP_RAMFD, OP_RELEASE,
};
#define MAX_PAYLOAD (128u << 10)
#define F_WRITE_FAULT 1u

/* What raw_* return when the exchange itself failed (never a -errno). */
#define SEND_FAILED (-100000)
#define NO_REPLY (-100001)
#define SHORT_REPLY (-100002)

/* Fd numbers no host file uses here: where raw requests put the files they create. */
#define SPARE_FD_A 900
#define SPARE_FD_B 901
/* An address range nothing is mapped at: the host's mapping records there are only records. */
#define FAKE_ADDR 0x7e0000000000ull

static int sock = -1;
static int ntests, nfailed;
static struct hrep last_reply; /* the last reply recv_reply read */

static void check(int cond, const char *fmt, ...)
{
	va_list ap;

	ntests++;
	printf("%s %d - ", cond ? "ok" : "not ok", ntests);
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
	fflush(stdout);
	if (!cond)
		nfailed++;
}

/* An errno value as text for the TAP lines, or what went wrong with the exchange. */
static const char *what(int64_t r)
{
	static char b[64];

	if (r == SEND_FAILED)
		return "send failed";
	if (r == NO_REPLY)
		return "no reply within 10 s";
	if (r == SHORT_REPLY)
		return "reply shorter than its header";
	if (r >= 0) {
		snprintf(b, sizeof(b), "%lld", (long long)r);
		return b;
	}
	snprintf(b, sizeof(b), "-%lld (%s)", (long long)-r, strerror((int)-r));
	return b;
}

/* Read one reply; any fd passed with it is closed. Returns its ret. */
static int64_t recv_reply(void)
{
	static char buf[sizeof(struct hrep) + MAX_PAYLOAD];
	char ctl[CMSG_SPACE(4 * sizeof(int))];
	struct iovec iv = {buf, sizeof(buf)};
	struct msghdr m = {.msg_iov = &iv, .msg_iovlen = 1, .msg_control = ctl,
			   .msg_controllen = sizeof(ctl)};
	struct pollfd p = {.fd = sock, .events = POLLIN};
	struct hrep r;
	ssize_t n;

	if (poll(&p, 1, 10000) != 1)
		return NO_REPLY;
	do
		n = recvmsg(sock, &m, MSG_CMSG_CLOEXEC);
	while (n < 0 && errno == EINTR);
	for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c)) {
		if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
			int fd;

			memcpy(&fd, CMSG_DATA(c), sizeof(fd));
			syscall(SYS_close, fd);
		}
	}
	if (n < (ssize_t)sizeof(r))
		return SHORT_REPLY;
	memcpy(&r, buf, sizeof(r));
	last_reply = r;
	return r.ret;
}

/* Send exactly `len` bytes as one message. */
static int send_bytes(const void *msg, size_t len)
{
	ssize_t n;

	do
		n = send(sock, msg, len, MSG_NOSIGNAL);
	while (n < 0 && errno == EINTR);
	return n == (ssize_t)len ? 0 : -1;
}

/* Send a request header and payload as one message, without reading the reply. */
static int send_req(const struct hreq *q, const void *pl, size_t pln)
{
	static char buf[sizeof(struct hreq) + MAX_PAYLOAD];

	if (pln > MAX_PAYLOAD)
		return -1;
	memcpy(buf, q, sizeof(*q));
	if (pln)
		memcpy(buf + sizeof(*q), pl, pln);
	return send_bytes(buf, sizeof(*q) + pln);
}

/* One request and its reply. */
static int64_t raw(uint32_t op, int32_t fd, int32_t fd2, uint64_t a0, uint64_t a1, const void *pl,
		   size_t pln)
{
	struct hreq q = {.op = op, .fd = fd, .fd2 = fd2, .a = {a0, a1}};

	if (send_req(&q, pl, pln) < 0)
		return SEND_FAILED;
	return recv_reply();
}

static int64_t raw_bytes(const void *msg, size_t len)
{
	if (send_bytes(msg, len) < 0)
		return SEND_FAILED;
	return recv_reply();
}

/* ---- malformed requests and calls on things the process does not have ---- */
static void malformed(void)
{
	char small[20];
	struct hreq q;
	int64_t r;
	int dev;

	memset(small, 0, sizeof(small));
	small[0] = OP_CLOSE;
	r = raw_bytes(small, sizeof(small));
	check(r == -EINVAL, "a 20-byte message is EINVAL (got %s)", what(r));

	r = raw(999, -1, -1, 0, 0, NULL, 0);
	check(r == -ENOSYS, "unknown op 999 is ENOSYS (got %s)", what(r));

	r = raw(OP_CLOSE, 77, -1, 0, 0, "x", 1);
	check(r == -EINVAL, "Close with a payload is EINVAL (got %s)", what(r));

	r = raw(OP_MMAP, 3, -1, 0, 0, "short", 5);
	check(r == -EINVAL, "Mmap with a 5-byte payload is EINVAL (got %s)", what(r));

	{
		size_t len = sizeof(struct hreq) + MAX_PAYLOAD + 64;
		char *big = calloc(1, len);
		int sz = 1 << 20;

		q = (struct hreq){.op = OP_WRITE, .fd = 77, .fd2 = -1};
		memcpy(big, &q, sizeof(q));
		/* The default send buffer takes it; a larger one only helps where it does not. */
		setsockopt(sock, SOL_SOCKET, SO_SNDBUF, &sz, sizeof(sz));
		r = big ? raw_bytes(big, len) : SEND_FAILED;
		check(r == -EINVAL, "a message of 48 + 128 KiB + 64 bytes is EINVAL (got %s%s)",
		      what(r), r == SEND_FAILED ? strerror(errno) : "");
		free(big);
	}

	r = raw(OP_CLOSE, 77, -1, 0, 0, NULL, 0);
	check(r == -EBADF, "Close of fd 77, not a host fd, is EBADF (got %s)", what(r));

	r = raw(OP_READ, 500, -1, 16, 0, NULL, 0);
	check(r == -EBADF, "Read of fd 500 is EBADF (got %s)", what(r));

	r = raw(OP_FAULT, -1, -1, 0x10000, 0, NULL, 0);
	check(r == -EFAULT, "Fault outside any mapping is EFAULT (got %s)", what(r));

	r = raw(OP_MUNMAP, -1, -1, FAKE_ADDR, 4 * LU_PAGE, NULL, 0);
	check(r == 0, "Munmap of a range with no host mapping is 0 (got %s)", what(r));

	r = raw(OP_OPEN, -1, SPARE_FD_A, O_RDWR, 0, "/etc/passwd", strlen("/etc/passwd"));
	check(r == -ENOENT, "Open of /etc/passwd is ENOENT (got %s)", what(r));
	r = raw(OP_CLOSE, SPARE_FD_A, -1, 0, 0, NULL, 0);
	check(r == -EBADF, "... and installed nothing at its fd2 (Close: %s)", what(r));

	dev = open(LIVEUPDATE_DEV_PATH, O_RDWR);
	check(dev >= 0, "open %s through the library (%s)", LIVEUPDATE_DEV_PATH,
	      dev >= 0 ? "ok" : strerror(errno));
	if (dev < 0)
		return;
	r = raw(OP_DUP, dev, -1, 0, 0, NULL, 0);
	check(r == -EBADF, "Dup of the device to fd -1 is EBADF (got %s)", what(r));
	r = raw(OP_DUP, dev, -77, 0, 0, NULL, 0);
	check(r == -EBADF, "Dup of the device to fd -77 is EBADF (got %s)", what(r));
	r = raw(OP_DUP, dev, 1 << 20, 0, 0, NULL, 0);
	check(r == -EBADF, "Dup of the device to fd 2^20 (past NOFILE) is EBADF (got %s)", what(r));
	r = raw(OP_OPEN, -1, dev, O_RDWR, 0, "/dev/null", strlen("/dev/null"));
	check(r == -EBADF, "Open into fd2 = an fd that is a host file already is EBADF (got %s)",
	      what(r));
	check(close(dev) == 0, "close the device through the library");
}

/* ---- a process the host never made ---- */
static void raw_fork_child(void)
{
	int pipefd[2], st;
	int64_t got[3] = {NO_REPLY, NO_REPLY, NO_REPLY};
	pid_t c;

	if (pipe(pipefd) < 0) {
		check(0, "pipe: %s", strerror(errno));
		return;
	}
	fflush(NULL);
	c = (pid_t)syscall(SYS_fork);
	if (c == 0) {
		/* Plain syscalls only: glibc's view of this process is its parent's. */
		got[0] = raw(OP_HELLO, -1, -1, 0, 0, NULL, 0);
		got[1] = raw(OP_OPEN, -1, SPARE_FD_A, O_RDWR, 0, LIVEUPDATE_DEV_PATH,
			     strlen(LIVEUPDATE_DEV_PATH));
		got[2] = raw(OP_FORK_PREPARE, -1, -1, 0, 0, NULL, 0);
		if (write(pipefd[1], got, sizeof(got)) != sizeof(got))
			syscall(SYS_exit_group, 2);
		syscall(SYS_exit_group, 0);
	}
	close(pipefd[1]);
	if (c < 0) {
		check(0, "raw fork: %s", strerror(errno));
		close(pipefd[0]);
		return;
	}
	/* The parent does not touch the socket until the child is done with it. */
	if (waitpid(c, &st, 0) != c || !WIFEXITED(st) || WEXITSTATUS(st) != 0)
		check(0, "raw-fork child: wait status %#x", st);
	if (read(pipefd[0], got, sizeof(got)) != sizeof(got))
		check(0, "raw-fork child reported nothing");
	close(pipefd[0]);
	check(got[0] == -EPERM, "raw-fork child: Hello on the parent's socket is EPERM (got %s)",
	      what(got[0]));
	check(got[1] == -EPERM, "raw-fork child: Open of %s is EPERM (got %s)", LIVEUPDATE_DEV_PATH,
	      what(got[1]));
	check(got[2] == -EPERM, "raw-fork child: ForkPrepare is EPERM (got %s)", what(got[2]));
	/* The parent's socket still works and is still the parent's. */
	int64_t r = raw(OP_CLOSE, 77, -1, 0, 0, NULL, 0);
	check(r == -EBADF, "the parent's socket still serves the parent (Close 77: %s)", what(r));
}

/* ---- a child killed in the middle ---- */

/* In the child: an exit status naming the step that failed. */
static void child_step(int ok, int step)
{
	if (!ok)
		_exit(10 + step);
}

static void killed_child(void)
{
	static unsigned char page[2 * LU_PAGE];
	unsigned char name[LIVEUPDATE_SESSION_NAME_LENGTH];
	int st, dev = -1;
	pid_t c;

	fflush(NULL);
	c = fork();
	if (c == 0) {
		struct liveupdate_ioctl_create_session cs;
		struct liveupdate_session_preserve_fd pf;
		struct mmargs ma;
		struct hreq q;
		int s, m;

		/* Through the library: the device, a session, a preserved memfd. */
		dev = open(LIVEUPDATE_DEV_PATH, O_RDWR);
		child_step(dev >= 0, 0);
		s = lu_create_session(dev, "abuse-killed");
		child_step(s >= 0, 1);
		m = memfd_create("abuse-killed", 0);
		child_step(m >= 0, 2);
		lu_fill(page, sizeof(page), 0, 7);
		child_step(lu_write_all(m, page, sizeof(page)) == 0, 3);
		child_step(lu_preserve_fd(s, m, 1) == 0, 4);

		/* Raw requests, checked: a second session at a spare fd, a memfd at another, written,
		 * mapped at an address the host only records, and a page of it faulted in. */
		memset(&cs, 0, sizeof(cs));
		cs.size = sizeof(cs);
		cs.fd = -1;
		lu_name(cs.name, "abuse-raw");
		q = (struct hreq){.op = OP_IOCTL, .fd = dev, .fd2 = SPARE_FD_A,
				  .a = {LIVEUPDATE_IOCTL_CREATE_SESSION}};
		child_step(send_req(&q, &cs, sizeof(cs)) == 0, 5);
		child_step(recv_reply() == 0 && last_reply.b[0] == SPARE_FD_A, 5);
		q = (struct hreq){.op = OP_MEMFD_CREATE, .fd = -1, .fd2 = SPARE_FD_B};
		child_step(send_req(&q, "raw", 3) == 0, 6);
		child_step(recv_reply() == SPARE_FD_B, 6);
		q = (struct hreq){.op = OP_WRITE, .fd = SPARE_FD_B, .fd2 = -1};
		child_step(send_req(&q, page, sizeof(page)) == 0, 7);
		child_step(recv_reply() == (int64_t)sizeof(page), 7);
		ma = (struct mmargs){FAKE_ADDR, 4 * LU_PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, 0};
		q = (struct hreq){.op = OP_MMAP, .fd = SPARE_FD_B, .fd2 = -1};
		child_step(send_req(&q, &ma, sizeof(ma)) == 0, 8);
		child_step(recv_reply() == 0, 8);
		q = (struct hreq){.op = OP_FAULT, .flags = F_WRITE_FAULT, .fd = -1, .fd2 = -1,
				  .a = {FAKE_ADDR + LU_PAGE}};
		child_step(send_req(&q, NULL, 0) == 0, 9);
		child_step(recv_reply() == 0, 9);
		/* Then requests whose replies are never read: preserve the raw memfd in the raw
		 * session, a fork, a read of 128 KiB, and the child dies. */
		memset(&pf, 0, sizeof(pf));
		pf.size = sizeof(pf);
		pf.fd = SPARE_FD_B;
		pf.token = 2;
		q = (struct hreq){.op = OP_IOCTL, .fd = SPARE_FD_A, .fd2 = -1,
				  .a = {LIVEUPDATE_SESSION_PRESERVE_FD}};
		child_step(send_req(&q, &pf, sizeof(pf)) == 0, 10);
		q = (struct hreq){.op = OP_FORK_PREPARE, .fd = -1, .fd2 = -1};
		child_step(send_req(&q, NULL, 0) == 0, 11);
		q = (struct hreq){.op = OP_READ, .fd = SPARE_FD_B, .fd2 = -1, .a = {MAX_PAYLOAD}};
		child_step(send_req(&q, NULL, 0) == 0, 12);
		kill(getpid(), SIGKILL);
		_exit(99); /* not reached */
	}
	if (c < 0) {
		check(0, "fork: %s", strerror(errno));
		return;
	}
	if (waitpid(c, &st, 0) != c) {
		check(0, "waitpid: %s", strerror(errno));
		return;
	}
	check(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL,
	      "the library-forked child died of SIGKILL mid-request (status %#x%s)", st,
	      WIFEXITED(st) && WEXITSTATUS(st) >= 10 ? ": a step failed, see the exit code" : "");

	/* The child is reaped, so its socket is closed: the host ends it before it serves this
	 * process's next request (as Linux releases a process's files before its parent can
	 * reap it). */
	dev = open(LIVEUPDATE_DEV_PATH, O_RDWR);
	check(dev >= 0, "after the kill, %s opens (%s)", LIVEUPDATE_DEV_PATH,
	      dev >= 0 ? "ok" : strerror(errno));
	if (dev < 0)
		return;
	lu_name(name, "abuse-killed");
	int s1 = lu_create_session_raw(dev, name);
	check(s1 >= 0, "session \"abuse-killed\" can be created again (%s)",
	      s1 >= 0 ? "ok" : strerror(-s1));
	int s2 = lu_create_session(dev, "abuse-raw");
	check(s2 >= 0, "session \"abuse-raw\" (made by a raw request) can be created again (%s)",
	      s2 >= 0 ? "ok" : strerror(-s2));
	int64_t r = raw(OP_CLOSE, SPARE_FD_B, -1, 0, 0, NULL, 0);
	check(r == -EBADF, "the child's fds are not the parent's (Close %d: %s)", SPARE_FD_B,
	      what(r));
	r = raw(OP_FAULT, -1, -1, FAKE_ADDR + LU_PAGE, 0, NULL, 0);
	check(r == -EFAULT, "nor are its mappings (Fault: %s)", what(r));
	if (s1 >= 0)
		close(s1);
	if (s2 >= 0)
		close(s2);
	close(dev);
}

int main(void)
{
	const char *s = getenv("HANDOVER_SOCK"), *p = getenv("HANDOVER_PID");

	printf("TAP version 13\n");
	if (!s) {
		printf("not ok 1 - HANDOVER_SOCK is not set: run under handover run\n1..1\n");
		return 1;
	}
	sock = atoi(s);
	check(p && atoi(p) == (int)getpid(), "HANDOVER_PID is this process (%s, pid %d)",
	      p ? p : "unset", (int)getpid());
	malformed();
	raw_fork_child();
	killed_child();
	printf("1..%d\n", ntests);
	return nfailed ? 1 : 0;
}
