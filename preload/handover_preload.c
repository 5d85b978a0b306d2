/*
 * The process boundary, program side: an LD_PRELOAD library that `handover run` puts into the
 * programs it starts. Calls on host objects (/dev/liveupdate, host memfds and the fds made from
 * them) go to the host image over a SOCK_SEQPACKET socket; every other call goes to the real
 * kernel. The wire format is src/abi/boundary.rs; docs/userspace.md says what is covered.
 *
 * Host files get real fd numbers: each one is backed by an O_PATH placeholder of /dev/null, so
 * the real kernel keeps the numbering (lowest free fd, dup, close) and every call this library
 * does not forward fails on it with an errno (EBADF) instead of acting on something else.
 *
 * mmap of a host memfd maps the file's RAM frames from the host's RAM memfd (zero copy); holes
 * are PROT_NONE and a SIGSEGV handler asks the host to allocate them on first touch.
 *
 * Requests are serialized by one lock. The lock is never held while touching program memory
 * that may be a host mapping, so the fault handler (which takes the lock) cannot deadlock.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <ucontext.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))

/* ---- wire format (src/abi/boundary.rs) ---- */
struct hreq {
	uint32_t op, flags;
	int32_t fd, fd2;
	uint64_t a[4];
};
struct hrep {
	int64_t ret;
	uint64_t b[3];
};
struct prun {
	uint64_t index, pfn, npages;
};
struct hstat {
	uint32_t mode, nlink;
	uint64_t size, blocks, ino, rdev;
};
struct mmargs {
	uint64_t addr, len;
	uint32_t prot, flags;
	uint64_t off;
};
enum {
	OP_HELLO = 1, OP_OPEN, OP_CLOSE, OP_DUP, OP_IOCTL, OP_MEMFD_CREATE, OP_READ, OP_WRITE,
	OP_LSEEK, OP_FTRUNCATE, OP_FALLOCATE, OP_FSTAT, OP_SEALS, OP_MMAP, OP_MUNMAP, OP_FAULT,
	OP_FORK_PREPARE, OP_FORK_ABORT, OP_REBOOT, OP_RAMFD, OP_RELEASE, OP_KICK,
};
#define F_POSITIONAL 1u
#define F_WRITE_FAULT 1u
#define F_EXEC 1u
#define MAX_PAYLOAD (128u << 10)
#define NOFILE_MAX (1 << 20)
#define SPIN_NS 50000L
#define PAGE 4096ul
#define LUO_TYPE 0xBA
#define KEXEC_CMD 0x45584543

/* ---- state ---- */
static int sock = -1;     /* the socket to the host, or -1: not a host process */
static int detached;      /* started under handover run but not connected (see init) */
static int ramfd = -1;    /* the host's RAM memfd, fetched on the first mmap */
static unsigned char hostfd[NOFILE_MAX];
static volatile int lk;

struct region {
	uint64_t addr, len, pgoff, file;
	int prot;
};
#define MAX_REGIONS 65536
static struct region *regions;
static int nregions;

static struct sigaction prev_segv; /* the program's own SIGSEGV action, chained to */

/* vCPUs: hostfd[fd] == HOST_VCPU marks a vCPU fd (the real vCPU fd, so mmap of kvm_run is
 * the real page); its ioctls go over its own socket to its host thread. */
#define HOST_FILE 1
#define HOST_VCPU 2
struct vcpu {
	int fd, chan;
	volatile int lk;
};
#define MAX_VCPUS 1024
static struct vcpu vcpus[MAX_VCPUS];
static int nvcpus;

static struct vcpu *vcpu_of(int fd)
{
	for (int i = 0; i < nvcpus; i++)
		if (vcpus[i].fd == fd)
			return &vcpus[i];
	return NULL;
}

static void lock(void)
{
	while (__atomic_exchange_n(&lk, 1, __ATOMIC_ACQUIRE))
		sched_yield();
}

static void unlock(void)
{
	__atomic_store_n(&lk, 0, __ATOMIC_RELEASE);
}

static int is_host(int fd)
{
	return sock >= 0 && fd >= 0 && fd < NOFILE_MAX && hostfd[fd];
}

static void set_host(int fd, int on)
{
	if (fd >= 0 && fd < NOFILE_MAX)
		hostfd[fd] = on;
}

/* ---- raw syscalls: the real kernel ---- */
static long sys_close(int fd) { return syscall(SYS_close, fd); }
static int placeholder(int cloexec)
{
	return (int)syscall(SYS_openat, AT_FDCWD, "/dev/null", O_PATH | (cloexec ? O_CLOEXEC : 0));
}
static void *sys_mmap(void *a, size_t l, int p, int f, int fd, off_t o)
{
	return (void *)syscall(SYS_mmap, a, l, p, f, fd, o);
}

/* Receive a reply on `s`: spin (yielding) for a while, then sleep. With `vcpu_fd` >= 0 the
 * wait is for KVM_RUN or another vCPU ioctl on that vCPU: a signal that interrupts the wait
 * (the program's handler has run) kicks the vCPU, so that its KVM_RUN returns EINTR. */
static long kick_vcpu(int fd);

static ssize_t wait_reply(int s, struct msghdr *rm, int vcpu_fd, const sigset_t *mask)
{
	ssize_t n;
	struct timespec t0, t1;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (;;) {
		n = recvmsg(s, rm, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
		if (n >= 0 || (errno != EAGAIN && errno != EINTR))
			return n;
		/* Yield while spinning: on a busy machine the host may be waiting for this CPU. */
		sched_yield();
		clock_gettime(CLOCK_MONOTONIC, &t1);
		if ((t1.tv_sec - t0.tv_sec) * 1000000000L + (t1.tv_nsec - t0.tv_nsec) > SPIN_NS)
			break;
	}
	for (;;) {
		struct pollfd p = {.fd = s, .events = POLLIN};
		/* poll, unlike recvmsg, is never restarted after a signal handler. For a vCPU the
		 * caller blocked signals for the whole call; ppoll lets them in (with the program's
		 * own mask) only here, so a signal that came at any point of the call is seen. */
		long pr = syscall(SYS_ppoll, &p, 1, NULL, mask, 8);
		int e = errno;
		if (pr < 0) {
			if (e == EINTR && vcpu_fd >= 0)
				kick_vcpu(vcpu_fd);
			if (e == EINTR)
				continue;
			errno = e;
			return -1;
		}
		n = recvmsg(s, rm, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
		if (n >= 0 || (errno != EAGAIN && errno != EINTR))
			return n;
	}
}

/*
 * One request and its reply on socket `s`. The caller holds the lock that serializes `s`.
 * Returns the reply's ret (>= 0 or -errno); -EIO if the host is gone. `rfd[0..2]` get the fds
 * passed with the reply, or -1. For a call on vCPU `vcpu_fd` the caller holds signals
 * (hold_signals) and `mask` is the program's own mask, which the wait lets them in with.
 */
static long call_on(int s, int vcpu_fd, const sigset_t *mask, struct hreq *q, const void *pl,
		    size_t pln, void *out, size_t cap, size_t *got, uint64_t b[3], int rfd[2])
{
	struct iovec iv[2] = {{q, sizeof *q}, {(void *)pl, pln}};
	struct msghdr m = {.msg_iov = iv, .msg_iovlen = pln ? 2 : 1};
	if (rfd)
		rfd[0] = rfd[1] = -1;
	if (got)
		*got = 0;
	for (;;) {
		if (sendmsg(s, &m, MSG_NOSIGNAL) >= 0)
			break;
		if (errno != EINTR)
			return -EIO;
	}
	struct hrep r;
	char ctl[CMSG_SPACE(2 * sizeof(int))];
	struct iovec ov[2] = {{&r, sizeof r}, {out, cap}};
	struct msghdr rm = {.msg_iov = ov, .msg_iovlen = cap ? 2 : 1, .msg_control = ctl,
			    .msg_controllen = sizeof ctl};
	ssize_t n = wait_reply(s, &rm, vcpu_fd, mask);
	if (n < (ssize_t)sizeof r)
		return -EIO;
	for (struct cmsghdr *c = CMSG_FIRSTHDR(&rm); c; c = CMSG_NXTHDR(&rm, c)) {
		if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
			int nfd = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
			for (int i = 0; i < nfd; i++) {
				int fd;
				memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
				if (rfd && i < 2)
					rfd[i] = fd;
				else
					sys_close(fd);
			}
		}
	}
	if (got)
		*got = (size_t)n - sizeof r;
	if (b)
		memcpy(b, r.b, sizeof r.b);
	return r.ret;
}

/* A request on the process socket (the caller holds the lock); `*rfd` gets a passed fd. */
static long call(struct hreq *q, const void *pl, size_t pln, void *out, size_t cap, size_t *got,
		 uint64_t b[3], int *rfd)
{
	int fds[2];
	long r = call_on(sock, -1, NULL, q, pl, pln, out, cap, got, b, fds);
	if (fds[1] >= 0)
		sys_close(fds[1]);
	if (rfd)
		*rfd = fds[0];
	else if (fds[0] >= 0)
		sys_close(fds[0]);
	return r;
}

static long call0(struct hreq *q, const void *pl, size_t pln)
{
	lock();
	long r = call(q, pl, pln, NULL, 0, NULL, NULL, NULL);
	unlock();
	return r;
}

static long kick_vcpu(int fd)
{
	struct hreq q = {.op = OP_KICK, .fd = fd, .fd2 = -1};
	/* Not under the process lock if this thread holds it (it never does while it waits for
	 * a vCPU): the kick is one short request. */
	return call0(&q, NULL, 0);
}

static long fail(long r)
{
	if (r < 0) {
		errno = (int)-r;
		return -1;
	}
	return r;
}

/* Touch each page of a program buffer before the lock is taken, so that faults on host
 * mappings in it are served now and the kernel can copy it during the request. */
static void pretouch(const void *p, size_t n)
{
	const volatile char *c = p;
	if (!n)
		return;
	for (size_t i = 0; i < n; i += PAGE - ((uintptr_t)(c + i) & (PAGE - 1)))
		(void)c[i];
	(void)c[n - 1];
}

/* Copy from/to our own memory, failing with EFAULT instead of crashing on a bad pointer. */
static int copy_in(void *dst, const void *src, size_t n)
{
	struct iovec l = {dst, n}, r = {(void *)src, n};
	if (!n)
		return 0;
	return syscall(SYS_process_vm_readv, getpid(), &l, 1, &r, 1, 0) == (long)n ? 0 : -EFAULT;
}

static int copy_out(void *dst, const void *src, size_t n)
{
	struct iovec l = {(void *)src, n}, r = {dst, n};
	if (!n)
		return 0;
	return syscall(SYS_process_vm_writev, getpid(), &l, 1, &r, 1, 0) == (long)n ? 0 : -EFAULT;
}

/* ---- mappings ---- */
static int region_of(uint64_t a)
{
	for (int i = 0; i < nregions; i++)
		if (a >= regions[i].addr && a - regions[i].addr < regions[i].len)
			return i;
	return -1;
}

static int overlaps_region(uint64_t a, uint64_t len)
{
	for (int i = 0; i < nregions; i++)
		if (a < regions[i].addr + regions[i].len && regions[i].addr < a + len)
			return 1;
	return 0;
}

/* Map the runs the host returned into region r (caller holds the lock). */
static void map_runs(const struct region *r, const struct prun *runs, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		uint64_t idx = runs[i].index, np = runs[i].npages, pfn = runs[i].pfn;
		uint64_t end = r->pgoff + r->len / PAGE;
		if (idx < r->pgoff || idx >= end)
			continue;
		if (np > end - idx)
			np = end - idx;
		sys_mmap((void *)(r->addr + (idx - r->pgoff) * PAGE), np * PAGE, r->prot,
			 MAP_SHARED | MAP_FIXED, ramfd, (off_t)(pfn * PAGE));
	}
}

static void chain_segv(int sig, siginfo_t *si, void *uc)
{
	if (prev_segv.sa_flags & SA_SIGINFO && prev_segv.sa_sigaction) {
		prev_segv.sa_sigaction(sig, si, uc);
		return;
	}
	if (prev_segv.sa_handler != SIG_DFL && prev_segv.sa_handler != SIG_IGN) {
		prev_segv.sa_handler(sig);
		return;
	}
	/* Default action: return with SIGSEGV reset, so the access faults again and kills. */
	signal(SIGSEGV, SIG_DFL);
}

static void on_segv(int sig, siginfo_t *si, void *ucv)
{
	int saved = errno;
	uint64_t a = (uint64_t)(uintptr_t)si->si_addr;
	ucontext_t *uc = ucv;
	int write = (uc->uc_mcontext.gregs[REG_ERR] & 2) != 0;
	lock();
	int i = region_of(a);
	/* Not ours, or a PROT_NONE mapping (where every access is a real SIGSEGV). */
	if (i < 0 || regions[i].prot == PROT_NONE) {
		unlock();
		errno = saved;
		chain_segv(sig, si, ucv);
		return;
	}
	static struct prun runs[512];
	struct hreq q = {.op = OP_FAULT, .flags = write ? F_WRITE_FAULT : 0, .a = {a & ~(PAGE - 1)}};
	size_t got;
	long r = call(&q, NULL, 0, runs, sizeof runs, &got, NULL, NULL);
	if (r >= 0)
		map_runs(&regions[i], runs, got / sizeof runs[0]);
	unlock();
	errno = saved;
	if (r == -EFAULT || r == -EIO) {
		/* Past the end of the file (or no host): SIGBUS, as Linux sends. */
		signal(SIGBUS, SIG_DFL);
		raise(SIGBUS);
	} else if (r < 0) {
		chain_segv(sig, si, ucv);
	}
}

static int need_ramfd(void)
{
	if (ramfd >= 0)
		return 0;
	struct hreq q = {.op = OP_RAMFD, .fd = -1, .fd2 = -1};
	int fd;
	long r = call(&q, NULL, 0, NULL, 0, NULL, NULL, &fd);
	if (r < 0)
		return (int)r;
	if (fd < 0)
		return -EIO;
	ramfd = fd;
	return 0;
}

/* ---- connection ---- */
static void set_pid_env(void)
{
	char b[32];
	snprintf(b, sizeof b, "%d", (int)getpid());
	setenv("HANDOVER_PID", b, 1);
}

/* Bind the socket to this process. After execve, the host fds that close-on-exec closed are
 * reported closed. */
static int hello(int exec)
{
	static int32_t fds[4096];
	struct hreq q = {.op = OP_HELLO, .flags = exec ? F_EXEC : 0, .fd = -1, .fd2 = -1};
	size_t got;
	long r = call(&q, NULL, 0, fds, sizeof fds, &got, NULL, NULL);
	if (r < 0)
		return (int)r;
	for (size_t i = 0; i < got / sizeof fds[0]; i++) {
		int fd = fds[i];
		if (fd < 0 || fd >= NOFILE_MAX)
			continue;
		if (syscall(SYS_fcntl, fd, F_GETFD) < 0) {
			struct hreq c = {.op = OP_CLOSE, .fd = fd, .fd2 = -1};
			call(&c, NULL, 0, NULL, 0, NULL, NULL, NULL);
		} else {
			hostfd[fd] = 1;
		}
	}
	return 0;
}

__attribute__((constructor)) static void handover_init(void)
{
	const char *s = getenv("HANDOVER_SOCK");
	if (!s)
		return;
	int fd = atoi(s);
	const char *p = getenv("HANDOVER_PID");
	if (p && atoi(p) != (int)getpid()) {
		/* Started by a descendant the host does not know (posix_spawn, clone): the socket
		 * is its parent's; leave it, and give this process no host access. */
		sys_close(fd);
		detached = 1;
		return;
	}
	regions = sys_mmap(NULL, MAX_REGIONS * sizeof *regions, PROT_READ | PROT_WRITE,
			   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (regions == MAP_FAILED) {
		detached = 1;
		return;
	}
	sock = fd;
	if (hello(p != NULL) < 0) {
		fprintf(stderr, "handover: the host refused this process; no host access\n");
		sock = -1;
		detached = 1;
		return;
	}
	set_pid_env();
	struct sigaction sa = {.sa_sigaction = on_segv, .sa_flags = SA_SIGINFO | SA_NODEFER};
	sigemptyset(&sa.sa_mask);
	sigaction(SIGSEGV, &sa, &prev_segv);
}

/* ---- open, close, dup ---- */
static int host_path(const char *p)
{
	return p && (strcmp(p, "/dev/liveupdate") == 0 || strcmp(p, "/dev/kvm") == 0);
}

static int host_open(const char *path, int flags)
{
	if (sock < 0) {
		errno = ENODEV;
		return -1;
	}
	int ph = placeholder(flags & O_CLOEXEC);
	if (ph < 0)
		return -1;
	struct hreq q = {.op = OP_OPEN, .fd = -1, .fd2 = ph, .a = {(uint32_t)flags}};
	long r = call0(&q, path, strlen(path));
	if (r < 0) {
		sys_close(ph);
		return (int)fail(r);
	}
	set_host(ph, 1);
	return ph;
}

static int mode_arg(int flags, va_list ap)
{
	return (flags & (O_CREAT | __O_TMPFILE)) ? va_arg(ap, int) : 0;
}

EXPORT int open(const char *path, int flags, ...)
{
	va_list ap;
	va_start(ap, flags);
	int mode = mode_arg(flags, ap);
	va_end(ap);
	if ((sock >= 0 || detached) && host_path(path))
		return host_open(path, flags);
	return (int)syscall(SYS_openat, AT_FDCWD, path, flags, mode);
}
EXPORT int open64(const char *path, int flags, ...) __attribute__((alias("open")));

EXPORT int __open_2(const char *path, int flags)
{
	return open(path, flags);
}
EXPORT int __open64_2(const char *path, int flags) __attribute__((alias("__open_2")));

EXPORT int openat(int dirfd, const char *path, int flags, ...)
{
	va_list ap;
	va_start(ap, flags);
	int mode = mode_arg(flags, ap);
	va_end(ap);
	if ((sock >= 0 || detached) && host_path(path))
		return host_open(path, flags);
	return (int)syscall(SYS_openat, dirfd, path, flags, mode);
}
EXPORT int openat64(int dirfd, const char *path, int flags, ...) __attribute__((alias("openat")));

EXPORT int __openat_2(int dirfd, const char *path, int flags)
{
	return openat(dirfd, path, flags);
}
EXPORT int __openat64_2(int dirfd, const char *path, int flags) __attribute__((alias("__openat_2")));

EXPORT int close(int fd)
{
	if (is_host(fd)) {
		struct hreq q = {.op = OP_CLOSE, .fd = fd, .fd2 = -1};
		lock();
		call(&q, NULL, 0, NULL, 0, NULL, NULL, NULL);
		struct vcpu *v = hostfd[fd] == HOST_VCPU ? vcpu_of(fd) : NULL;
		if (v) {
			sys_close(v->chan);
			*v = vcpus[--nvcpus];
		}
		set_host(fd, 0);
		long r = sys_close(fd);
		unlock();
		return (int)r;
	}
	return (int)syscall(SYS_close, fd);
}

/* After the real kernel made `newfd` a copy of `old` (dup, dup2, dup3, F_DUPFD), make the host
 * agree: host file `old` at `newfd`, or `newfd` no longer a host fd. Caller holds the lock. */
static void dup_done(int old, int newfd, int was_host)
{
	if (newfd < 0)
		return;
	if (is_host(old)) {
		struct hreq q = {.op = OP_DUP, .fd = old, .fd2 = newfd};
		if (call(&q, NULL, 0, NULL, 0, NULL, NULL, NULL) >= 0)
			set_host(newfd, 1);
	} else if (was_host) {
		struct hreq q = {.op = OP_CLOSE, .fd = newfd, .fd2 = -1};
		call(&q, NULL, 0, NULL, 0, NULL, NULL, NULL);
		set_host(newfd, 0);
	}
}

EXPORT int dup(int fd)
{
	if (!is_host(fd))
		return (int)syscall(SYS_dup, fd);
	lock();
	int n = (int)syscall(SYS_dup, fd);
	dup_done(fd, n, 0);
	unlock();
	return n;
}

EXPORT int dup3(int old, int newfd, int flags)
{
	if (!is_host(old) && !is_host(newfd))
		return (int)syscall(SYS_dup3, old, newfd, flags);
	lock();
	int was = is_host(newfd);
	int n = (int)syscall(SYS_dup3, old, newfd, flags);
	if (n >= 0)
		dup_done(old, n, was);
	unlock();
	return n;
}

EXPORT int dup2(int old, int newfd)
{
	if (old == newfd)
		return (int)syscall(SYS_fcntl, old, F_GETFD) < 0 ? -1 : newfd;
	return dup3(old, newfd, 0);
}

/* ---- fcntl ---- */
static long host_fcntl(int fd, int cmd, long arg)
{
	switch (cmd) {
	case F_ADD_SEALS:
	case F_GET_SEALS: {
		struct hreq q = {.op = OP_SEALS, .fd = fd, .fd2 = -1, .a = {(uint64_t)cmd, (uint64_t)arg}};
		return fail(call0(&q, NULL, 0));
	}
	case F_DUPFD:
	case F_DUPFD_CLOEXEC: {
		lock();
		int n = (int)syscall(SYS_fcntl, fd, cmd, arg);
		dup_done(fd, n, 0);
		unlock();
		return n;
	}
	case F_GETFL:
		return O_RDWR | O_LARGEFILE;
	case F_SETFL:
		return 0;
	default:
		/* F_GETFD/F_SETFD act on the placeholder, which is right; the rest fail (EBADF)
		 * on an O_PATH fd, as documented. */
		return syscall(SYS_fcntl, fd, cmd, arg);
	}
}

EXPORT int fcntl(int fd, int cmd, ...)
{
	va_list ap;
	va_start(ap, cmd);
	long arg = va_arg(ap, long);
	va_end(ap);
	if (is_host(fd))
		return (int)host_fcntl(fd, cmd, arg);
	return (int)syscall(SYS_fcntl, fd, cmd, arg);
}
EXPORT int fcntl64(int fd, int cmd, ...) __attribute__((alias("fcntl")));

/* ---- ioctl ---- */
static int creates_fd(unsigned long req)
{
	switch (req) {
	case 0xBA00: /* LIVEUPDATE_IOCTL_CREATE_SESSION */
	case 0xBA01: /* LIVEUPDATE_IOCTL_RETRIEVE_SESSION */
	case 0xBA41: /* LIVEUPDATE_SESSION_RETRIEVE_FD */
		return 1;
	default:
		/* KVM (type 0xAE) creates VMs, vCPUs, guest_memfds and devices. */
		return ((req >> 8) & 0xff) == 0xAE;
	}
}

/* KVM ioctls whose argument is a header counting the entries that follow it:
 * (command, header bytes, entry bytes). */
static const struct {
	unsigned long cmd;
	uint32_t header, entry;
} counted[] = {
	{0xc008ae05, 8, 40}, /* KVM_GET_SUPPORTED_CPUID */
	{0xc008ae09, 8, 40}, /* KVM_GET_EMULATED_CPUID */
	{0x4008ae90, 8, 40}, /* KVM_SET_CPUID2 */
	{0xc008ae91, 8, 40}, /* KVM_GET_CPUID2 */
	{0xc004ae02, 4, 4},  /* KVM_GET_MSR_INDEX_LIST */
	{0xc004ae0a, 4, 4},  /* KVM_GET_MSR_FEATURE_INDEX_LIST */
	{0xc008ae88, 8, 16}, /* KVM_GET_MSRS */
	{0x4008ae89, 8, 16}, /* KVM_SET_MSRS */
};

/* Bytes of the argument of `req` to send, and whether to copy them back; < 0 is -errno. */
static long arg_bytes(unsigned long req, void *arg, int *copy_back)
{
	unsigned dir = (unsigned)(req >> 30), type = (req >> 8) & 0xff;
	size_t n = (req >> 16) & 0x3fff; /* _IOC_SIZE */
	*copy_back = (dir & 2) != 0;
	if (type == LUO_TYPE) {
		/* LUO argument structs start with their own size (_IO numbers carry none). */
		uint32_t sz;
		if (copy_in(&sz, arg, sizeof sz) < 0)
			return -EFAULT;
		*copy_back = 1;
		return sz < MAX_PAYLOAD ? sz : MAX_PAYLOAD;
	}
	if (dir == 0) /* _IO: the argument is a value (sent as 8 bytes) */
		return 0;
	for (size_t i = 0; i < sizeof counted / sizeof counted[0]; i++) {
		if (counted[i].cmd != req)
			continue;
		uint32_t cnt;
		if (copy_in(&cnt, arg, sizeof cnt) < 0)
			return -EFAULT;
		uint64_t len = counted[i].header + (uint64_t)cnt * counted[i].entry;
		return len <= MAX_PAYLOAD ? (long)len : -E2BIG;
	}
	return (long)n;
}

static int convert_to_host_memory(uint64_t addr, uint64_t len);

/* KVM_SET_USER_MEMORY_REGION(2) naming program memory that is not a host mapping (malloc,
 * anonymous mmap): its contents move into a host memfd mapped in place first, so that the
 * guest and the program keep seeing the same bytes. */
static int prepare_memslot(unsigned long req, const char *buf, size_t n)
{
	uint64_t size, uaddr;
	uint32_t flags;
	if (req == 0x4020ae46 && n >= 32) { /* KVM_SET_USER_MEMORY_REGION */
		memcpy(&flags, buf + 4, 4);
		memcpy(&size, buf + 16, 8);
		memcpy(&uaddr, buf + 24, 8);
	} else if (req == 0x40a0ae49 && n >= 32) { /* KVM_SET_USER_MEMORY_REGION2 */
		memcpy(&flags, buf + 4, 4);
		memcpy(&size, buf + 16, 8);
		memcpy(&uaddr, buf + 24, 8);
		if (flags & 4) /* KVM_MEM_GUEST_MEMFD: the guest_memfd backs it */
			return 0;
	} else {
		return 0;
	}
	if (size == 0 || (uaddr & (PAGE - 1)) || (size & (PAGE - 1)) || uaddr + size < uaddr)
		return 0; /* deletes, and what the host refuses itself */
	lock();
	int inside = 0;
	for (int i = 0; i < nregions; i++)
		if (uaddr >= regions[i].addr && uaddr + size <= regions[i].addr + regions[i].len)
			inside = 1;
	unlock();
	return inside ? 0 : convert_to_host_memory(uaddr, size);
}

static long vcpu_call(struct vcpu *v, const sigset_t *mask, unsigned long req, char *buf,
		      size_t n, size_t *got)
{
	struct hreq q = {.op = OP_IOCTL, .fd = v->fd, .fd2 = -1, .a = {req}};
	while (__atomic_exchange_n(&v->lk, 1, __ATOMIC_ACQUIRE))
		sched_yield();
	long r = call_on(v->chan, v->fd, mask, &q, buf, n, buf, n, got, NULL, NULL);
	__atomic_store_n(&v->lk, 0, __ATOMIC_RELEASE);
	return r;
}

/* The host made a vCPU at placeholder `ph`: put the real vCPU fd there and keep its socket. */
static int adopt_vcpu(int ph, int real, int chan)
{
	int hi = chan >= 0 ? (int)syscall(SYS_fcntl, chan, F_DUPFD_CLOEXEC, 512) : -1;
	if (chan >= 0)
		sys_close(chan);
	if (real < 0 || hi < 0 || nvcpus >= MAX_VCPUS ||
	    syscall(SYS_dup3, real, ph, O_CLOEXEC) < 0) {
		if (real >= 0)
			sys_close(real);
		if (hi >= 0)
			sys_close(hi);
		return -1;
	}
	sys_close(real);
	vcpus[nvcpus++] = (struct vcpu){ph, hi, 0};
	set_host(ph, HOST_VCPU);
	return 0;
}

/* Block every signal but the synchronous faults; `old` gets the mask to restore. */
static void hold_signals(sigset_t *old)
{
	sigset_t all;
	sigfillset(&all);
	sigdelset(&all, SIGSEGV);
	sigdelset(&all, SIGBUS);
	pthread_sigmask(SIG_BLOCK, &all, old);
}

static long host_ioctl(int fd, unsigned long req, void *arg, const sigset_t *vcpu_mask);

EXPORT int ioctl(int fd, unsigned long req, ...)
{
	va_list ap;
	va_start(ap, req);
	void *arg = va_arg(ap, void *);
	va_end(ap);
	if (!is_host(fd))
		return (int)syscall(SYS_ioctl, fd, req, arg);
	if (hostfd[fd] != HOST_VCPU)
		return (int)fail(host_ioctl(fd, req, arg, NULL));
	/* A vCPU call holds signals from its first steps to its wait for the reply, which lets
	 * them in with the program's mask (wait_reply) and kicks the vCPU if one comes. So a
	 * signal that comes once the call has begun, even before the request is sent, stops the
	 * run, as one that reaches a native KVM_RUN does. Only a signal handled before the hold
	 * does not, as one handled just before a native syscall; the window is a few
	 * instructions, no longer the argument copy, allocation and lock that came first. */
	sigset_t old;
	hold_signals(&old);
	long r = host_ioctl(fd, req, arg, &old);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	return (int)fail(r);
}

/* ioctl on a host fd: the request and its reply, -errno on failure. `vcpu_mask` is non-NULL
 * for a vCPU fd, whose caller holds signals: the program's own mask. */
static long host_ioctl(int fd, unsigned long req, void *arg, const sigset_t *vcpu_mask)
{
	int copy_back;
	long n = arg_bytes(req, arg, &copy_back);
	if (n < 0)
		return n;
	uint64_t value = (uint64_t)(uintptr_t)arg;
	char *buf = malloc(n ? (size_t)n : 8);
	if (!buf)
		return -ENOMEM;
	if (n == 0) {
		memcpy(buf, &value, 8);
		n = 8;
		copy_back = 0;
	} else if (copy_in(buf, arg, (size_t)n) < 0) {
		free(buf);
		return -EFAULT;
	}
	size_t got = 0;
	long r;
	struct vcpu *v = vcpu_mask ? vcpu_of(fd) : NULL;
	if (v) {
		r = vcpu_call(v, vcpu_mask, req, buf, (size_t)n, &got);
	} else {
		int pr = prepare_memslot(req, buf, (size_t)n);
		if (pr < 0) {
			free(buf);
			return pr;
		}
		/* A placeholder for the fd the call may create (only calls that can create one). */
		int ph = creates_fd(req) ? placeholder(1) : -1;
		struct hreq q = {.op = OP_IOCTL, .fd = fd, .fd2 = ph, .a = {req}};
		uint64_t b[3] = {~0ull, 0, 0};
		int fds[2] = {-1, -1};
		lock();
		r = call_on(sock, -1, NULL, &q, buf, (size_t)n, buf, (size_t)n, &got, b, fds);
		if (ph >= 0 && b[0] == (uint64_t)(int64_t)ph) {
			if (b[2] == 1) {
				/* A vCPU: the real vCPU fd and its socket came with the reply. */
				if (adopt_vcpu(ph, fds[0], fds[1]) < 0 && r >= 0) {
					struct hreq c = {.op = OP_CLOSE, .fd = ph, .fd2 = -1};
					call(&c, NULL, 0, NULL, 0, NULL, NULL, NULL);
					r = -ENOMEM;
				}
				fds[0] = fds[1] = -1;
			} else {
				set_host(ph, HOST_FILE);
				if (!b[1])
					syscall(SYS_fcntl, ph, F_SETFD, 0);
			}
			ph = -1;
		}
		unlock();
		for (int i = 0; i < 2; i++)
			if (fds[i] >= 0)
				sys_close(fds[i]);
		if (ph >= 0)
			sys_close(ph);
	}
	if (req == 0xBA40 && r == -EBADF && n >= 8) {
		/* PRESERVE_FD of a file of the real kernel (the host has no such fd): the host has
		 * no handler for it, which upstream reports as ENOENT. */
		int32_t pfd;
		memcpy(&pfd, buf + 4, sizeof pfd);
		if (!is_host(pfd) && syscall(SYS_fcntl, pfd, F_GETFD) >= 0)
			r = -ENOENT;
	}
	if (copy_back && got && copy_out(arg, buf, got < (size_t)n ? got : (size_t)n) < 0 && r >= 0)
		r = -EFAULT;
	free(buf);
	return r;
}

/* ---- memfd ---- */
EXPORT int memfd_create(const char *name, unsigned int flags)
{
	if (sock < 0)
		return (int)syscall(SYS_memfd_create, name, flags);
	char nb[256];
	size_t len = strnlen(name, sizeof nb);
	if (len >= 250) {
		errno = EINVAL;
		return -1;
	}
	memcpy(nb, name, len);
	int ph = placeholder(flags & 1 /* MFD_CLOEXEC */);
	if (ph < 0)
		return -1;
	struct hreq q = {.op = OP_MEMFD_CREATE, .fd = -1, .fd2 = ph, .a = {flags}};
	/* An empty name still sends one byte: the payload may not be empty. */
	long r = call0(&q, len ? nb : "\0", len ? len : 1);
	if (r < 0) {
		sys_close(ph);
		return (int)fail(r);
	}
	set_host(ph, 1);
	return ph;
}

/* ---- read and write ---- */
static ssize_t host_read(int fd, void *buf, size_t count, int64_t pos, int positional)
{
	size_t done = 0;
	pretouch(buf, count);
	while (done < count) {
		size_t n = count - done < MAX_PAYLOAD ? count - done : MAX_PAYLOAD;
		struct hreq q = {.op = OP_READ, .flags = positional ? F_POSITIONAL : 0, .fd = fd,
				 .fd2 = -1, .a = {n, (uint64_t)(pos + (int64_t)done)}};
		size_t got;
		lock();
		long r = call(&q, NULL, 0, (char *)buf + done, n, &got, NULL, NULL);
		unlock();
		if (r < 0)
			return done ? (ssize_t)done : fail(r);
		done += (size_t)r;
		if ((size_t)r < n)
			break;
	}
	return (ssize_t)done;
}

static ssize_t host_write(int fd, const void *buf, size_t count, int64_t pos, int positional)
{
	size_t done = 0;
	pretouch(buf, count);
	while (done < count || (count == 0 && done == 0)) {
		size_t n = count - done < MAX_PAYLOAD ? count - done : MAX_PAYLOAD;
		struct hreq q = {.op = OP_WRITE, .flags = positional ? F_POSITIONAL : 0, .fd = fd,
				 .fd2 = -1, .a = {(uint64_t)(pos + (int64_t)done)}};
		long r = call0(&q, (const char *)buf + done, n);
		if (r < 0)
			return done ? (ssize_t)done : fail(r);
		done += (size_t)r;
		if (count == 0 || (size_t)r < n)
			break;
	}
	return (ssize_t)done;
}

/* The real kernel writing into a host mapping's hole fails with EFAULT (no SIGSEGV reaches
 * the fault handler): serve the holes of a buffer first. */
static void pretouch_if_host(const void *buf, size_t n)
{
	if (sock < 0 || !n)
		return;
	lock();
	int o = overlaps_region((uint64_t)(uintptr_t)buf, n);
	unlock();
	if (o)
		pretouch(buf, n);
}

EXPORT ssize_t read(int fd, void *buf, size_t n)
{
	if (is_host(fd))
		return host_read(fd, buf, n, 0, 0);
	pretouch_if_host(buf, n);
	return syscall(SYS_read, fd, buf, n);
}
EXPORT ssize_t write(int fd, const void *buf, size_t n)
{
	return is_host(fd) ? host_write(fd, buf, n, 0, 0) : syscall(SYS_write, fd, buf, n);
}
EXPORT ssize_t pread(int fd, void *buf, size_t n, off_t off)
{
	if (!is_host(fd)) {
		pretouch_if_host(buf, n);
		return syscall(SYS_pread64, fd, buf, n, off);
	}
	if (off < 0)
		return fail(-EINVAL);
	return host_read(fd, buf, n, off, 1);
}
EXPORT ssize_t pread64(int fd, void *buf, size_t n, off_t off) __attribute__((alias("pread")));
EXPORT ssize_t pwrite(int fd, const void *buf, size_t n, off_t off)
{
	if (!is_host(fd))
		return syscall(SYS_pwrite64, fd, buf, n, off);
	if (off < 0)
		return fail(-EINVAL);
	return host_write(fd, buf, n, off, 1);
}
EXPORT ssize_t pwrite64(int fd, const void *buf, size_t n, off_t off) __attribute__((alias("pwrite")));

static ssize_t host_rwv(int fd, const struct iovec *iov, int cnt, int64_t pos, int positional,
			int wr)
{
	ssize_t total = 0;
	if (cnt < 0 || cnt > 1024)
		return fail(-EINVAL);
	for (int i = 0; i < cnt; i++) {
		ssize_t r = wr ? host_write(fd, iov[i].iov_base, iov[i].iov_len, pos + total, positional)
			       : host_read(fd, iov[i].iov_base, iov[i].iov_len, pos + total, positional);
		if (r < 0)
			return total ? total : -1;
		total += r;
		if ((size_t)r < iov[i].iov_len)
			break;
	}
	return total;
}

EXPORT ssize_t readv(int fd, const struct iovec *iov, int cnt)
{
	return is_host(fd) ? host_rwv(fd, iov, cnt, 0, 0, 0) : syscall(SYS_readv, fd, iov, cnt);
}
EXPORT ssize_t writev(int fd, const struct iovec *iov, int cnt)
{
	return is_host(fd) ? host_rwv(fd, iov, cnt, 0, 0, 1) : syscall(SYS_writev, fd, iov, cnt);
}
EXPORT ssize_t preadv(int fd, const struct iovec *iov, int cnt, off_t off)
{
	return is_host(fd) ? host_rwv(fd, iov, cnt, off, 1, 0)
			   : syscall(SYS_preadv, fd, iov, cnt, off, 0);
}
EXPORT ssize_t preadv64(int fd, const struct iovec *iov, int cnt, off_t off) __attribute__((alias("preadv")));
EXPORT ssize_t pwritev(int fd, const struct iovec *iov, int cnt, off_t off)
{
	return is_host(fd) ? host_rwv(fd, iov, cnt, off, 1, 1)
			   : syscall(SYS_pwritev, fd, iov, cnt, off, 0);
}
EXPORT ssize_t pwritev64(int fd, const struct iovec *iov, int cnt, off_t off) __attribute__((alias("pwritev")));

/*
 * ftruncate and fallocate: if the call dropped pages this process maps, the host keeps their
 * frames until the process has replaced them with holes in its own mappings (so no mapping
 * ever shows a frame that was freed), then it is told to free them.
 */
static long shrink_call(struct hreq *q)
{
	uint64_t b[3] = {0, 0, 0};
	lock();
	long r = call(q, NULL, 0, NULL, 0, NULL, b, NULL);
	if (b[0]) {
		for (int i = 0; i < nregions; i++) {
			struct region *g = &regions[i];
			uint64_t s = g->pgoff > b[1] ? g->pgoff : b[1];
			uint64_t e = g->pgoff + g->len / PAGE;
			if (g->file != b[0])
				continue;
			if (e > b[2])
				e = b[2];
			if (s < e)
				sys_mmap((void *)(g->addr + (s - g->pgoff) * PAGE), (e - s) * PAGE, PROT_NONE,
					 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
		}
		struct hreq rel = {.op = OP_RELEASE, .fd = -1, .fd2 = -1};
		call(&rel, NULL, 0, NULL, 0, NULL, NULL, NULL);
	}
	unlock();
	return r;
}

EXPORT off_t lseek(int fd, off_t off, int whence)
{
	if (!is_host(fd))
		return syscall(SYS_lseek, fd, off, whence);
	struct hreq q = {.op = OP_LSEEK, .fd = fd, .fd2 = -1, .a = {(uint64_t)off, (uint64_t)whence}};
	return fail(call0(&q, NULL, 0));
}
EXPORT off_t lseek64(int fd, off_t off, int whence) __attribute__((alias("lseek")));

EXPORT int ftruncate(int fd, off_t len)
{
	if (!is_host(fd))
		return (int)syscall(SYS_ftruncate, fd, len);
	if (len < 0)
		return (int)fail(-EINVAL);
	struct hreq q = {.op = OP_FTRUNCATE, .fd = fd, .fd2 = -1, .a = {(uint64_t)len}};
	return (int)fail(shrink_call(&q));
}
EXPORT int ftruncate64(int fd, off_t len) __attribute__((alias("ftruncate")));

EXPORT int fallocate(int fd, int mode, off_t off, off_t len)
{
	if (!is_host(fd))
		return (int)syscall(SYS_fallocate, fd, mode, off, len);
	if (off < 0 || len <= 0)
		return (int)fail(-EINVAL);
	struct hreq q = {.op = OP_FALLOCATE, .fd = fd, .fd2 = -1,
			 .a = {(uint64_t)mode, (uint64_t)off, (uint64_t)len}};
	return (int)fail(shrink_call(&q));
}
EXPORT int fallocate64(int fd, int mode, off_t off, off_t len) __attribute__((alias("fallocate")));

EXPORT int posix_fallocate(int fd, off_t off, off_t len)
{
	if (!is_host(fd)) {
		long r = syscall(SYS_fallocate, fd, 0, off, len);
		return r < 0 ? errno : 0;
	}
	int saved = errno;
	int r = fallocate(fd, 0, off, len) < 0 ? errno : 0;
	errno = saved;
	return r;
}
EXPORT int posix_fallocate64(int fd, off_t off, off_t len) __attribute__((alias("posix_fallocate")));

/* ---- stat ---- */
static int host_stat(int fd, struct hstat *h)
{
	struct hreq q = {.op = OP_FSTAT, .fd = fd, .fd2 = -1};
	size_t got;
	lock();
	long r = call(&q, NULL, 0, h, sizeof *h, &got, NULL, NULL);
	unlock();
	if (r >= 0 && got != sizeof *h)
		r = -EIO;
	return (int)r;
}

static int fill_stat(int fd, struct stat *st)
{
	struct hstat h;
	int r = host_stat(fd, &h);
	if (r < 0)
		return (int)fail(r);
	struct timespec now;
	clock_gettime(CLOCK_REALTIME, &now);
	memset(st, 0, sizeof *st);
	st->st_dev = 0x48; /* like an anon/shmem superblock: one device for all host files */
	st->st_ino = h.ino;
	st->st_mode = h.mode;
	st->st_nlink = h.nlink;
	st->st_uid = getuid();
	st->st_gid = getgid();
	st->st_rdev = h.rdev;
	st->st_size = (off_t)h.size;
	st->st_blksize = PAGE;
	st->st_blocks = (blkcnt_t)h.blocks;
	st->st_atim = st->st_mtim = st->st_ctim = now;
	return 0;
}

EXPORT int fstat(int fd, struct stat *st)
{
	return is_host(fd) ? fill_stat(fd, st) : (int)syscall(SYS_fstat, fd, st);
}
/* struct stat64 is struct stat on x86_64. */
EXPORT int fstat64(int fd, struct stat64 *st)
{
	return fstat(fd, (struct stat *)st);
}

EXPORT int __fxstat(int ver, int fd, struct stat *st)
{
	(void)ver;
	return fstat(fd, st);
}
EXPORT int __fxstat64(int ver, int fd, struct stat *st) __attribute__((alias("__fxstat")));

EXPORT int fstatat(int dirfd, const char *path, struct stat *st, int flags)
{
	if (is_host(dirfd) && path && !path[0] && (flags & AT_EMPTY_PATH))
		return fill_stat(dirfd, st);
	return (int)syscall(SYS_newfstatat, dirfd, path, st, flags);
}
EXPORT int fstatat64(int dirfd, const char *path, struct stat64 *st, int flags)
{
	return fstatat(dirfd, path, (struct stat *)st, flags);
}

EXPORT int statx(int dirfd, const char *path, int flags, unsigned int mask, struct statx *sx)
{
	if (is_host(dirfd) && path && !path[0] && (flags & AT_EMPTY_PATH)) {
		struct stat st;
		if (fill_stat(dirfd, &st) < 0)
			return -1;
		memset(sx, 0, sizeof *sx);
		sx->stx_mask = STATX_BASIC_STATS;
		sx->stx_blksize = (uint32_t)st.st_blksize;
		sx->stx_nlink = (uint32_t)st.st_nlink;
		sx->stx_uid = st.st_uid;
		sx->stx_gid = st.st_gid;
		sx->stx_mode = (uint16_t)st.st_mode;
		sx->stx_ino = st.st_ino;
		sx->stx_size = (uint64_t)st.st_size;
		sx->stx_blocks = (uint64_t)st.st_blocks;
		sx->stx_rdev_major = (uint32_t)(st.st_rdev >> 8);
		sx->stx_rdev_minor = (uint32_t)(st.st_rdev & 0xff);
		return 0;
	}
	return (int)syscall(SYS_statx, dirfd, path, flags, mask, sx);
}

/* ---- mmap ---- */
EXPORT void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
	if ((flags & MAP_ANONYMOUS) || !is_host(fd) || hostfd[fd] == HOST_VCPU)
		return sys_mmap(addr, len, prot, flags, fd, off);
	if (len == 0 || (off & (PAGE - 1))) {
		errno = EINVAL;
		return MAP_FAILED;
	}
	size_t rlen = (len + PAGE - 1) & ~(PAGE - 1);
	int fixed = flags & (MAP_FIXED | MAP_FIXED_NOREPLACE);
	void *base = sys_mmap(addr, rlen, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | fixed,
			      -1, 0);
	if ((unsigned long)base > -4096ul) {
		errno = (int)-(long)base;
		return MAP_FAILED;
	}
	struct mmargs a = {(uint64_t)(uintptr_t)base, rlen, (uint32_t)prot, (uint32_t)flags, (uint64_t)off};
	struct hreq q = {.op = OP_MMAP, .fd = fd, .fd2 = -1};
	static struct prun runs[4096];
	size_t got = 0;
	uint64_t b[3] = {0, 0, 0};
	lock();
	long r = need_ramfd();
	if (r >= 0 && nregions >= MAX_REGIONS)
		r = -ENOMEM;
	if (r >= 0)
		r = call(&q, &a, sizeof a, runs, sizeof runs, &got, b, NULL);
	if (r < 0) {
		unlock();
		syscall(SYS_munmap, base, rlen);
		errno = (int)-r;
		return MAP_FAILED;
	}
	struct region *g = &regions[nregions++];
	*g = (struct region){a.addr, rlen, (uint64_t)off / PAGE, b[0], prot};
	map_runs(g, runs, got / sizeof runs[0]);
	unlock();
	return base;
}
EXPORT void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off_t off) __attribute__((alias("mmap")));

/* Cut `a..a+len` out of the region table, as the host cuts its records. Caller holds the lock. */
static void trim_regions(uint64_t a, uint64_t len)
{
	uint64_t e = a + len;
	for (int i = 0; i < nregions;) {
		struct region r = regions[i];
		uint64_t re = r.addr + r.len;
		if (re <= a || e <= r.addr) {
			i++;
			continue;
		}
		regions[i] = regions[--nregions];
		if (r.addr < a && nregions < MAX_REGIONS)
			regions[nregions++] = (struct region){r.addr, a - r.addr, r.pgoff, r.file, r.prot};
		if (e < re && nregions < MAX_REGIONS)
			regions[nregions++] = (struct region){e, re - e, r.pgoff + (e - r.addr) / PAGE,
							      r.file, r.prot};
	}
}

EXPORT int munmap(void *addr, size_t len)
{
	uint64_t a = (uint64_t)(uintptr_t)addr, l = (len + PAGE - 1) & ~(PAGE - 1);
	if (sock < 0)
		return (int)syscall(SYS_munmap, addr, len);
	lock();
	long r = syscall(SYS_munmap, addr, len);
	if (r == 0 && overlaps_region(a, l)) {
		struct hreq q = {.op = OP_MUNMAP, .fd = -1, .fd2 = -1, .a = {a, l}};
		call(&q, NULL, 0, NULL, 0, NULL, NULL, NULL);
		trim_regions(a, l);
	}
	unlock();
	return (int)r;
}

EXPORT int mprotect(void *addr, size_t len, int prot)
{
	uint64_t a = (uint64_t)(uintptr_t)addr, l = (len + PAGE - 1) & ~(PAGE - 1);
	if (sock >= 0) {
		lock();
		int o = overlaps_region(a, l);
		unlock();
		if (o) /* holes are PROT_NONE placeholders: changing them would expose them */
			return (int)fail(-EACCES);
	}
	return (int)syscall(SYS_mprotect, addr, len, prot);
}

EXPORT void *mremap(void *old, size_t olen, size_t nlen, int flags, ...)
{
	va_list ap;
	va_start(ap, flags);
	void *na = va_arg(ap, void *);
	va_end(ap);
	if (sock >= 0) {
		lock();
		int o = overlaps_region((uint64_t)(uintptr_t)old, olen);
		unlock();
		if (o) {
			errno = EINVAL;
			return MAP_FAILED;
		}
	}
	return (void *)syscall(SYS_mremap, old, olen, nlen, flags, na);
}

/* ---- poll: host files are always ready, as files without a poll method are ---- */
EXPORT int poll(struct pollfd *fds, nfds_t n, int timeout)
{
	int host = 0;
	for (nfds_t i = 0; i < n; i++)
		if (is_host(fds[i].fd)) {
			host = 1;
			break;
		}
	if (!host) {
		struct timespec ts = {timeout / 1000, (timeout % 1000) * 1000000L};
		return (int)syscall(SYS_ppoll, fds, n, timeout < 0 ? NULL : &ts, NULL, 8);
	}
	struct pollfd *tmp = malloc(n * sizeof *tmp);
	if (!tmp)
		return (int)fail(-ENOMEM);
	int ready = 0;
	for (nfds_t i = 0; i < n; i++) {
		tmp[i] = fds[i];
		if (is_host(fds[i].fd)) {
			tmp[i].fd = -1;
			ready = 1;
		}
	}
	struct timespec zero = {0, 0}, ts = {timeout / 1000, (timeout % 1000) * 1000000L};
	long r = syscall(SYS_ppoll, tmp, n, ready ? &zero : (timeout < 0 ? NULL : &ts), NULL, 8);
	if (r < 0) {
		free(tmp);
		return -1;
	}
	int count = 0;
	for (nfds_t i = 0; i < n; i++) {
		if (is_host(fds[i].fd))
			fds[i].revents = fds[i].events & (POLLIN | POLLOUT | POLLRDNORM | POLLWRNORM);
		else
			fds[i].revents = tmp[i].revents;
		count += fds[i].revents != 0;
	}
	free(tmp);
	return count;
}

/* ---- processes ---- */
typedef pid_t (*fork_fn)(void);

EXPORT pid_t fork(void)
{
	fork_fn real = (fork_fn)dlsym(RTLD_NEXT, "fork");
	if (sock < 0)
		return real();
	struct hreq q = {.op = OP_FORK_PREPARE, .fd = -1, .fd2 = -1};
	int csock;
	lock();
	long child = call(&q, NULL, 0, NULL, 0, NULL, NULL, &csock);
	if (child < 0 || csock < 0) {
		unlock();
		if (csock >= 0)
			sys_close(csock);
		return (pid_t)fail(child < 0 ? child : -EIO);
	}
	pid_t p = real();
	if (p == 0) {
		/* The child: its own socket at the same number, then bind it to this pid. */
		syscall(SYS_dup3, csock, sock, 0);
		sys_close(csock);
		if (hello(0) < 0) {
			fprintf(stderr, "handover: forked child refused by the host\n");
			_exit(127);
		}
		set_pid_env();
		unlock();
		return 0;
	}
	sys_close(csock);
	if (p < 0) {
		int e = errno;
		struct hreq a = {.op = OP_FORK_ABORT, .fd = -1, .fd2 = -1, .a = {(uint64_t)child}};
		call(&a, NULL, 0, NULL, 0, NULL, NULL, NULL);
		errno = e;
	}
	unlock();
	return p;
}

/* vfork children share memory with the parent until execve; fork is a valid vfork. */
EXPORT pid_t vfork(void)
{
	return fork();
}

EXPORT int reboot(int cmd)
{
	if (sock >= 0 && cmd == KEXEC_CMD) {
		struct hreq q = {.op = OP_REBOOT, .fd = -1, .fd2 = -1, .a = {(uint32_t)cmd}};
		long r = call0(&q, NULL, 0);
		if (r < 0)
			return (int)fail(r);
		/* The update is under way; like every process of the old image, this one ends. */
		for (;;)
			pause();
	}
	return (int)syscall(SYS_reboot, 0xfee1dead, 672274793, cmd, NULL);
}

/* Move program memory `addr..addr+len` (anonymous, private) into a new host memfd mapped at
 * the same address: copy it in, then map the memfd over it. 0, or -errno (EFAULT if the range
 * maps nothing). */
static int convert_to_host_memory(uint64_t addr, uint64_t len)
{
	unsigned char vec[64];
	/* mincore fails with ENOMEM on an unmapped range (checked a slice at a time). */
	for (uint64_t o = 0; o < len; o += sizeof vec * PAGE) {
		uint64_t l = len - o < sizeof vec * PAGE ? len - o : sizeof vec * PAGE;
		if (syscall(SYS_mincore, addr + o, l, vec) < 0)
			return errno == ENOMEM ? -EFAULT : -errno;
	}
	int saved = errno;
	int fd = memfd_create("handover-guest-ram", MFD_CLOEXEC);
	if (fd < 0)
		return -errno;
	long r = 0;
	if (ftruncate(fd, (off_t)len) < 0 || pwrite(fd, (void *)addr, len, 0) != (ssize_t)len)
		r = -errno;
	else if (mmap((void *)addr, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0) ==
		 MAP_FAILED)
		r = -errno;
	close(fd);
	errno = saved;
	return (int)r;
}
