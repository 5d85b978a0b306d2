/*
 * luo_api: the /dev/liveupdate user API and the memfd calls a live-update client relies on,
 * checked from an ordinary dynamically linked program. No live update happens here.
 *
 * Every case runs in its own forked child (so a crash or a leak stays inside one case) and the
 * parent prints one TAP line per case: "ok N name", "ok N name # SKIP why" or "not ok N name".
 * Diagnostics go to stderr prefixed with "# ". Exit status: 0 if every case passed or skipped
 * for a reason of this machine, 1 if any failed, 4 (kselftest's skip) if /dev/liveupdate is
 * absent and nothing failed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#include "lu_util.h"

#define PASS 0
#define FAIL 1
#define SKIP 4
#define SKIP_NODEV 5 /* a case's exit status when /dev/liveupdate does not exist */

/* Fail the current case with a message naming the line. */
#define CHECK(cond, ...)                                                  \
	do {                                                              \
		if (!(cond)) {                                            \
			fprintf(stderr, "#   line %d: ", __LINE__);       \
			fprintf(stderr, __VA_ARGS__);                     \
			fprintf(stderr, "\n");                            \
			return FAIL;                                      \
		}                                                         \
	} while (0)

/* `call` must fail with errno `want` (helpers return -errno, libc calls -1 with errno set). */
#define CHECK_ERR(expr, want)                                                               \
	do {                                                                                \
		errno = 0;                                                                  \
		long r_ = (long)(expr);                                                     \
		int e_ = r_ < -1 ? (int)-r_ : (r_ == -1 ? errno : 0);                      \
		CHECK(r_ < 0 && e_ == (want), "%s: want %s, got %ld (%s)", #expr, #want,  \
		      r_, r_ < 0 ? strerror(e_) : "success");                             \
	} while (0)

/* `call` must succeed (return >= 0). */
#define CHECK_OK(expr)                                                                    \
	do {                                                                              \
		errno = 0;                                                                \
		long r_ = (long)(expr);                                                   \
		CHECK(r_ >= 0, "%s failed: %s", #expr,                                    \
		      strerror(r_ < -1 ? (int)-r_ : errno));                              \
	} while (0)

/* Open /dev/liveupdate into `dev`, or skip the case where the device does not exist. */
#define OPEN_DEV(dev)                                                                   \
	do {                                                                            \
		(dev) = open(LIVEUPDATE_DEV_PATH, O_RDWR);                              \
		if ((dev) < 0 && errno == ENOENT)                                       \
			return SKIP_NODEV;                                              \
		CHECK((dev) >= 0, "open %s: %s", LIVEUPDATE_DEV_PATH, strerror(errno)); \
	} while (0)

static int memfd_with(const char *name, unsigned int flags, const void *data, size_t len)
{
	int fd = memfd_create(name, flags);

	if (fd < 0)
		return -errno;
	if (len) {
		int r = lu_write_all(fd, data, len);

		if (r < 0) {
			close(fd);
			return r;
		}
	}
	return fd;
}

/* Raise RLIMIT_NOFILE to at least `want` fds. 0, or SKIP if not allowed. */
static int raise_nofile(rlim_t want)
{
	struct rlimit rl;

	if (getrlimit(RLIMIT_NOFILE, &rl) < 0)
		return FAIL;
	if (rl.rlim_cur >= want)
		return 0;
	if (rl.rlim_max < want)
		rl.rlim_max = want;
	rl.rlim_cur = want;
	if (setrlimit(RLIMIT_NOFILE, &rl) < 0) {
		if (errno == EPERM) {
			fprintf(stderr, "# SKIP cannot raise RLIMIT_NOFILE to %lu\n",
				(unsigned long)want);
			return SKIP;
		}
		fprintf(stderr, "# setrlimit: %s\n", strerror(errno));
		return FAIL;
	}
	return 0;
}

/* ---- /dev/liveupdate --------------------------------------------------------------------- */

static int t_basic_open_close(void)
{
	int dev;

	OPEN_DEV(dev);
	CHECK(close(dev) == 0, "close: %s", strerror(errno));
	return PASS;
}

static int t_exclusive_open(void)
{
	int dev, again;

	OPEN_DEV(dev);
	CHECK_ERR(open(LIVEUPDATE_DEV_PATH, O_RDWR), EBUSY);
	close(dev);
	again = open(LIVEUPDATE_DEV_PATH, O_RDWR);
	CHECK(again >= 0, "reopen after close: %s", strerror(errno));
	close(again);
	return PASS;
}

static int t_create_duplicate_session(void)
{
	int dev, s;

	OPEN_DEV(dev);
	s = lu_create_session(dev, "duplicate-session-test");
	CHECK_OK(s);
	CHECK_ERR(lu_create_session(dev, "duplicate-session-test"), EEXIST);
	close(s);
	close(dev);
	return PASS;
}

static int t_create_distinct_sessions(void)
{
	int dev, a, b;

	OPEN_DEV(dev);
	a = lu_create_session(dev, "distinct-session-a");
	CHECK_OK(a);
	b = lu_create_session(dev, "distinct-session-b");
	CHECK_OK(b);
	CHECK(a != b, "two sessions share fd %d", a);
	close(a);
	close(b);
	close(dev);
	return PASS;
}

static int t_retrieve_unknown_session(void)
{
	int dev;

	OPEN_DEV(dev);
	/* Nothing was handed over to this image: stage-1 detection relies on this ENOENT. */
	CHECK_ERR(lu_retrieve_session(dev, "no-such-session"), ENOENT);
	close(dev);
	return PASS;
}

static int t_preserve_memfd(void)
{
	static const char text[] = "hello liveupdate";
	char buf[sizeof(text)];
	int dev, s, m;

	OPEN_DEV(dev);
	s = lu_create_session(dev, "preserve-memfd");
	CHECK_OK(s);
	m = memfd_with("preserve-memfd", 0, text, sizeof(text));
	CHECK_OK(m);
	CHECK_OK(lu_preserve_fd(s, m, 0x1234));
	/* Closing the session unpreserves; the memfd itself stays intact and usable. */
	CHECK(close(s) == 0, "close session: %s", strerror(errno));
	memset(buf, 0, sizeof(buf));
	CHECK_OK(lu_pread_all(m, buf, sizeof(buf), 0));
	CHECK(memcmp(buf, text, sizeof(text)) == 0, "memfd contents changed");
	close(m);
	close(dev);
	return PASS;
}

static int t_preserve_unsupported_fd(void)
{
	int dev, s, null;

	OPEN_DEV(dev);
	s = lu_create_session(dev, "unsupported-fd");
	CHECK_OK(s);
	null = open("/dev/null", O_RDWR);
	CHECK(null >= 0, "open /dev/null: %s", strerror(errno));
	CHECK_ERR(lu_preserve_fd(s, null, 0x99), ENOENT);
	close(null);
	close(s);
	close(dev);
	return PASS;
}

static int t_prevent_double_preservation(void)
{
	int dev, s1, s2, m, d;

	OPEN_DEV(dev);
	s1 = lu_create_session(dev, "double-1");
	CHECK_OK(s1);
	s2 = lu_create_session(dev, "double-2");
	CHECK_OK(s2);
	m = memfd_with("double", 0, "x", 1);
	CHECK_OK(m);
	CHECK_OK(lu_preserve_fd(s1, m, 1));
	/* The same token again is refused first, for being taken. */
	CHECK_ERR(lu_preserve_fd(s1, m, 1), EEXIST);
	/* The same file: under another token, in another session, or through a dup. */
	CHECK_ERR(lu_preserve_fd(s1, m, 2), EBUSY);
	CHECK_ERR(lu_preserve_fd(s2, m, 1), EBUSY);
	d = dup(m);
	CHECK(d >= 0, "dup: %s", strerror(errno));
	CHECK_ERR(lu_preserve_fd(s2, d, 3), EBUSY);
	close(d);
	close(m);
	close(s1);
	close(s2);
	close(dev);
	return PASS;
}

static int t_name_without_nul(void)
{
	unsigned char name[LIVEUPDATE_SESSION_NAME_LENGTH];
	int dev;

	OPEN_DEV(dev);
	memset(name, 'X', sizeof(name));
	CHECK_ERR(lu_create_session_raw(dev, name), EINVAL);
	close(dev);
	return PASS;
}

static int t_empty_name(void)
{
	int dev;

	OPEN_DEV(dev);
	CHECK_ERR(lu_create_session(dev, ""), EINVAL);
	close(dev);
	return PASS;
}

static int get_name_round_trip(const char *name)
{
	char got[LIVEUPDATE_SESSION_NAME_LENGTH];
	int dev, s;

	OPEN_DEV(dev);
	s = lu_create_session(dev, name);
	CHECK_OK(s);
	memset(got, 0x5a, sizeof(got));
	CHECK_OK(lu_get_name(s, got));
	CHECK(memchr(got, 0, sizeof(got)) != NULL, "GET_NAME: no NUL in 64 bytes");
	CHECK(strcmp(got, name) == 0, "GET_NAME: got \"%s\", want \"%s\"", got, name);
	close(s);
	close(dev);
	return PASS;
}

static int t_get_session_name(void)
{
	return get_name_round_trip("get-name-test-session");
}

static int t_get_session_name_max_length(void)
{
	char name[LIVEUPDATE_SESSION_NAME_LENGTH];

	memset(name, 'A', sizeof(name) - 1);
	name[sizeof(name) - 1] = 0;
	return get_name_round_trip(name);
}

#define MANY_SESSIONS 2000

static int t_preserve_many_sessions(void)
{
	static int fds[MANY_SESSIONS];
	char name[LIVEUPDATE_SESSION_NAME_LENGTH];
	int dev, r, s;

	r = raise_nofile(MANY_SESSIONS + 64);
	if (r)
		return r;
	OPEN_DEV(dev);
	for (int i = 0; i < MANY_SESSIONS; i++) {
		snprintf(name, sizeof(name), "many-sessions-%d", i);
		fds[i] = lu_create_session(dev, name);
		CHECK(fds[i] >= 0, "session %d: %s", i, strerror(-fds[i]));
	}
	for (int i = 0; i < MANY_SESSIONS; i++)
		CHECK(close(fds[i]) == 0, "close session %d: %s", i, strerror(errno));
	/* All gone: the first and the last name can be created again. */
	s = lu_create_session(dev, "many-sessions-0");
	CHECK_OK(s);
	close(s);
	snprintf(name, sizeof(name), "many-sessions-%d", MANY_SESSIONS - 1);
	s = lu_create_session(dev, name);
	CHECK_OK(s);
	close(s);
	close(dev);
	return PASS;
}

#define MANY_FILES 500

static int t_preserve_many_files(void)
{
	static int fds[MANY_FILES];
	char text[32];
	int dev, r, s;

	r = raise_nofile(MANY_FILES + 64);
	if (r)
		return r;
	OPEN_DEV(dev);
	s = lu_create_session(dev, "many-files");
	CHECK_OK(s);
	for (int i = 0; i < MANY_FILES; i++) {
		int n = snprintf(text, sizeof(text), "file-data-%d", i);

		fds[i] = memfd_with("many-files", 0, text, (size_t)n);
		CHECK(fds[i] >= 0, "memfd %d: %s", i, strerror(-fds[i]));
		r = lu_preserve_fd(s, fds[i], (uint64_t)i);
		CHECK(r == 0, "preserve token %d: %s", i, strerror(-r));
	}
	for (int i = 0; i < MANY_FILES; i++)
		CHECK(close(fds[i]) == 0, "close memfd %d: %s", i, strerror(errno));
	CHECK(close(s) == 0, "close session: %s", strerror(errno));
	close(dev);
	return PASS;
}

static int t_session_gone_after_last_close(void)
{
	int dev, s, d, again, m;

	OPEN_DEV(dev);
	s = lu_create_session(dev, "reuse-me");
	CHECK_OK(s);
	d = dup(s);
	CHECK(d >= 0, "dup session fd: %s", strerror(errno));
	close(s);
	/* The dup still holds the session. */
	CHECK_ERR(lu_create_session(dev, "reuse-me"), EEXIST);
	m = memfd_with("reuse-me", 0, "abc", 3);
	CHECK_OK(m);
	CHECK_OK(lu_preserve_fd(d, m, 1));
	close(d);
	/* The last fd is gone: so are the session and the preservation of its memfd. */
	again = lu_create_session(dev, "reuse-me");
	CHECK_OK(again);
	CHECK_OK(lu_preserve_fd(again, m, 1));
	close(again);
	close(m);
	close(dev);
	return PASS;
}

/* Returns PASS if the child ended as `how` says: by exit(0) (sig 0) or by signal `sig`. */
static int check_child(pid_t pid, int sig)
{
	int st;

	CHECK(waitpid(pid, &st, 0) == pid, "waitpid: %s", strerror(errno));
	if (sig)
		CHECK(WIFSIGNALED(st) && WTERMSIG(st) == sig, "child status %#x, want signal %d",
		      st, sig);
	else
		CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0, "child status %#x, want exit 0", st);
	return PASS;
}

/*
 * A child creates a session through the inherited device fd and preserves the parent's memfd
 * in it, then ends without closing anything: by exit(0) or, with `sig`, by that signal. Once
 * waitpid has returned, the session and the preservation must be gone.
 */
static int dying_child(int dev, const char *name, int sig)
{
	int up[2], down[2], m, s, r;
	char c;
	pid_t pid;

	m = memfd_with(name, 0, "held", 4);
	CHECK_OK(m);
	CHECK(pipe(up) == 0 && pipe(down) == 0, "pipe: %s", strerror(errno));
	fflush(NULL);
	pid = fork();
	CHECK(pid >= 0, "fork: %s", strerror(errno));
	if (pid == 0) {
		int cs = lu_create_session(dev, name);

		if (cs < 0 || lu_preserve_fd(cs, m, 7) < 0)
			_exit(3);
		if (write(up[1], "r", 1) != 1)
			_exit(3);
		if (read(down[0], &c, 1) != 1)
			_exit(3);
		if (sig)
			raise(sig);
		_exit(0); /* the session fd is still open */
	}
	close(up[1]);
	close(down[0]);
	r = (int)read(up[0], &c, 1);
	if (r != 1) {
		check_child(pid, 0);
		CHECK(0, "child failed before it held the session");
	}
	CHECK_ERR(lu_create_session(dev, name), EEXIST);
	s = lu_create_session(dev, "dying-child-probe");
	CHECK_OK(s);
	CHECK_ERR(lu_preserve_fd(s, m, 1), EBUSY);
	CHECK(write(down[1], "x", 1) == 1, "pipe write: %s", strerror(errno));
	r = check_child(pid, sig);
	if (r)
		return r;
	/* The child is reaped: its session is dropped and the memfd is free to preserve. */
	CHECK_OK(lu_preserve_fd(s, m, 1));
	close(s);
	s = lu_create_session(dev, name);
	CHECK_OK(s);
	close(s);
	close(up[0]);
	close(down[1]);
	close(m);
	return PASS;
}

static int t_dead_child_drops_session(void)
{
	int dev, r;

	OPEN_DEV(dev);
	r = dying_child(dev, "dying-child-exit", 0);
	if (r)
		return r;
	r = dying_child(dev, "dying-child-kill", SIGKILL);
	if (r)
		return r;
	close(dev);
	return PASS;
}

static int t_preserve_freezes_size(void)
{
	unsigned char buf[LU_PAGE];
	int dev, s, m;
	struct stat st;

	OPEN_DEV(dev);
	s = lu_create_session(dev, "frozen");
	CHECK_OK(s);
	m = memfd_create("frozen", 0);
	CHECK_OK(m);
	CHECK_OK(ftruncate(m, 2 * LU_PAGE));
	CHECK_OK(lu_preserve_fd(s, m, 1));
	/* Preserved: the size is fixed and holes cannot be punched; writing inside is fine. */
	CHECK_ERR(ftruncate(m, 4 * LU_PAGE), EPERM);
	CHECK_ERR(ftruncate(m, LU_PAGE), EPERM);
	CHECK_ERR(fallocate(m, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, LU_PAGE), EPERM);
	lu_fill(buf, sizeof(buf), LU_PAGE, 1);
	CHECK_OK(lu_pwrite_all(m, buf, sizeof(buf), LU_PAGE));
	CHECK_ERR(pwrite(m, buf, 1, 2 * LU_PAGE), EPERM);
	/* Unpreserved by the close of its session: resizable again. */
	close(s);
	CHECK_OK(ftruncate(m, 4 * LU_PAGE));
	CHECK_OK(fstat(m, &st));
	CHECK(st.st_size == 4 * LU_PAGE, "size %lld", (long long)st.st_size);
	close(m);
	close(dev);
	return PASS;
}

static int t_ioctl_rules(void)
{
	struct {
		struct liveupdate_ioctl_create_session a;
		__u64 extra;
	} big;
	int dev, s, m;
	struct liveupdate_session_preserve_fd pres;
	struct liveupdate_session_finish fin;

	OPEN_DEV(dev);
	s = lu_create_session(dev, "kind-rules");
	CHECK_OK(s);
	m = memfd_with("kind-rules", 0, "k", 1);
	CHECK_OK(m);
	CHECK_OK(lu_preserve_fd(s, m, 5));
	/* Retrieve and finish belong to incoming sessions. */
	CHECK_ERR(lu_retrieve_fd(s, 5), EINVAL);
	CHECK_ERR(lu_finish(s), EINVAL);
	/* Session requests on the device fd, device requests on a session fd. */
	CHECK_ERR(lu_preserve_fd(dev, m, 6), EINVAL);
	CHECK_ERR(lu_create_session(s, "kind-rules-2"), EINVAL);
	/* A struct shorter than its minimum. */
	memset(&pres, 0, sizeof(pres));
	pres.size = 8;
	pres.fd = m;
	pres.token = 9;
	CHECK_ERR(ioctl(s, LIVEUPDATE_SESSION_PRESERVE_FD, &pres), EINVAL);
	memset(&fin, 0, sizeof(fin));
	/* Unknown request numbers. */
	CHECK_ERR(ioctl(s, _IO(LIVEUPDATE_IOCTL_TYPE, 0x4f), &fin), EINVAL);
	CHECK_ERR(ioctl(dev, _IO(LIVEUPDATE_IOCTL_TYPE, 0x3f), &fin), EINVAL);
	/* Another ioctl type, or size and direction bits: not a LUO request. */
	CHECK_ERR(ioctl(dev, _IO('X', 0x00), &fin), ENOTTY);
	memset(&big, 0, sizeof(big));
	big.a.size = sizeof(big.a);
	strcpy((char *)big.a.name, "with-dir-bits");
	CHECK_ERR(ioctl(dev, _IOWR(LIVEUPDATE_IOCTL_TYPE, 0x00, struct liveupdate_ioctl_create_session),
			&big.a),
		  ENOTTY);
	/* A longer struct than the kernel's: zero extra bytes are accepted, others are E2BIG. */
	big.a.size = sizeof(big);
	big.extra = 1;
	CHECK_ERR(ioctl(dev, LIVEUPDATE_IOCTL_CREATE_SESSION, &big), E2BIG);
	big.extra = 0;
	big.a.fd = -1;
	CHECK_OK(ioctl(dev, LIVEUPDATE_IOCTL_CREATE_SESSION, &big));
	CHECK(big.a.fd >= 0, "no fd returned for a longer struct");
	close(big.a.fd);
	close(m);
	close(s);
	close(dev);
	return PASS;
}

/* ---- memfd calls ------------------------------------------------------------------------- */

static int t_memfd_seals(void)
{
	unsigned char buf[LU_PAGE];
	int m, plain;
	void *p;

	m = memfd_create("sealed", MFD_ALLOW_SEALING);
	CHECK_OK(m);
	lu_fill(buf, sizeof(buf), 0, 3);
	CHECK_OK(lu_write_all(m, buf, sizeof(buf)));
	CHECK(fcntl(m, F_GET_SEALS) == 0, "F_GET_SEALS on a new memfd: %d", fcntl(m, F_GET_SEALS));

	CHECK_OK(fcntl(m, F_ADD_SEALS, F_SEAL_SHRINK));
	CHECK_ERR(ftruncate(m, LU_PAGE / 2), EPERM);
	CHECK_OK(ftruncate(m, 2 * LU_PAGE));

	CHECK_OK(fcntl(m, F_ADD_SEALS, F_SEAL_GROW));
	CHECK_ERR(ftruncate(m, 4 * LU_PAGE), EPERM);
	CHECK_ERR(pwrite(m, buf, 16, 2 * LU_PAGE), EPERM);
	CHECK(pwrite(m, buf, 16, LU_PAGE) == 16, "pwrite inside the size: %s", strerror(errno));

	/* F_SEAL_WRITE is refused while a writable shared mapping exists. */
	p = mmap(NULL, LU_PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, m, 0);
	CHECK(p != MAP_FAILED, "mmap: %s", strerror(errno));
	CHECK_ERR(fcntl(m, F_ADD_SEALS, F_SEAL_WRITE), EBUSY);
	CHECK_OK(munmap(p, LU_PAGE));

	CHECK_OK(fcntl(m, F_ADD_SEALS, F_SEAL_WRITE));
	CHECK_ERR(write(m, buf, 1), EPERM);
	CHECK_ERR(pwrite(m, buf, 1, 0), EPERM);
	CHECK(mmap(NULL, LU_PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, m, 0) == MAP_FAILED &&
		      errno == EPERM,
	      "writable shared mmap of a write-sealed memfd: want EPERM");
	p = mmap(NULL, LU_PAGE, PROT_READ, MAP_SHARED, m, 0);
	CHECK(p != MAP_FAILED, "read-only mmap of a sealed memfd: %s", strerror(errno));
	CHECK(lu_mismatch(p, LU_PAGE, 0, 3) < 0, "sealed memfd: mapping shows other bytes");
	CHECK_OK(munmap(p, LU_PAGE));
	memset(buf, 0, sizeof(buf));
	CHECK_OK(lu_pread_all(m, buf, sizeof(buf), 0));
	CHECK(lu_mismatch(buf, sizeof(buf), 0, 3) < 0, "sealed memfd: contents changed");
	CHECK(fcntl(m, F_GET_SEALS) == (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE),
	      "F_GET_SEALS = %#x", fcntl(m, F_GET_SEALS));

	CHECK_OK(fcntl(m, F_ADD_SEALS, F_SEAL_SEAL));
	CHECK_ERR(fcntl(m, F_ADD_SEALS, F_SEAL_FUTURE_WRITE), EPERM);
	CHECK(fcntl(m, F_GET_SEALS) == (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL),
	      "F_GET_SEALS after F_SEAL_SEAL = %#x", fcntl(m, F_GET_SEALS));
	close(m);

	/* Without MFD_ALLOW_SEALING a memfd is born sealed against sealing. */
	plain = memfd_create("unsealable", 0);
	CHECK_OK(plain);
	CHECK(fcntl(plain, F_GET_SEALS) == F_SEAL_SEAL, "F_GET_SEALS = %#x",
	      fcntl(plain, F_GET_SEALS));
	CHECK_ERR(fcntl(plain, F_ADD_SEALS, F_SEAL_WRITE), EPERM);
	close(plain);
	return PASS;
}

static int t_memfd_fstat_size(void)
{
	unsigned char buf[12345];
	struct stat st;
	int m;

	m = memfd_create("fstat", 0);
	CHECK_OK(m);
	CHECK_OK(fstat(m, &st));
	CHECK(S_ISREG(st.st_mode), "mode %#o is not a regular file", st.st_mode);
	CHECK(st.st_size == 0, "new memfd size %lld", (long long)st.st_size);
	lu_fill(buf, sizeof(buf), 0, 9);
	CHECK_OK(lu_write_all(m, buf, sizeof(buf)));
	CHECK_OK(fstat(m, &st));
	CHECK(st.st_size == (off_t)sizeof(buf), "size %lld after write", (long long)st.st_size);
	CHECK_OK(ftruncate(m, 1 << 20));
	CHECK_OK(fstat(m, &st));
	CHECK(st.st_size == 1 << 20, "size %lld after ftruncate", (long long)st.st_size);
	close(m);
	return PASS;
}

static int t_memfd_io_round_trip(void)
{
	unsigned char a[3000], b[5000], got[8000];
	struct iovec iov[2];
	int m;

	m = memfd_create("io", 0);
	CHECK_OK(m);
	lu_fill(a, sizeof(a), 0, 21);
	lu_fill(b, sizeof(b), sizeof(a), 21);
	iov[0] = (struct iovec){ a, sizeof(a) };
	iov[1] = (struct iovec){ b, sizeof(b) };
	CHECK(writev(m, iov, 2) == 8000, "writev: %s", strerror(errno));
	CHECK(lseek(m, 0, SEEK_CUR) == 8000, "offset after writev");
	CHECK(lseek(m, 0, SEEK_END) == 8000, "SEEK_END");
	CHECK(read(m, got, 1) == 0, "read at end of file is not 0");
	CHECK(lseek(m, 100, SEEK_SET) == 100, "SEEK_SET: %s", strerror(errno));
	CHECK(lseek(m, 50, SEEK_CUR) == 150, "SEEK_CUR: %s", strerror(errno));
	CHECK(read(m, got, 1000) == 1000, "read: %s", strerror(errno));
	CHECK(lu_mismatch(got, 1000, 150, 21) < 0, "read: wrong bytes");
	CHECK(lseek(m, 0, SEEK_CUR) == 1150, "offset after read");
	CHECK_ERR(lseek(m, -1, SEEK_SET), EINVAL);

	/* pread and pwrite leave the offset alone. */
	memset(got, 0, sizeof(got));
	CHECK(pread(m, got, sizeof(got), 0) == 8000, "pread: %s", strerror(errno));
	CHECK(lu_mismatch(got, 8000, 0, 21) < 0, "pread: wrong bytes");
	lu_fill(a, 500, 7000, 22);
	CHECK(pwrite(m, a, 500, 7000) == 500, "pwrite: %s", strerror(errno));
	CHECK(lseek(m, 0, SEEK_CUR) == 1150, "pread/pwrite moved the offset");
	CHECK(pread(m, got, 600, 6900) == 600, "pread: %s", strerror(errno));
	CHECK(lu_mismatch(got, 100, 6900, 21) < 0 && lu_mismatch(got + 100, 500, 7000, 22) < 0,
	      "pwrite: wrong bytes read back");

	/* readv across two buffers from the current offset; a short read at the end of file. */
	CHECK(lseek(m, 7500, SEEK_SET) == 7500, "SEEK_SET");
	iov[0] = (struct iovec){ got, 200 };
	iov[1] = (struct iovec){ got + 200, 1000 };
	CHECK(readv(m, iov, 2) == 500, "readv at 7500 of 8000");
	CHECK(lu_mismatch(got, 500, 7500, 21) < 0, "readv: wrong bytes");

	/* write past the end leaves a hole that reads as zeros. */
	CHECK(lseek(m, 20000, SEEK_SET) == 20000, "SEEK_SET past the end");
	CHECK(write(m, "z", 1) == 1, "write past the end: %s", strerror(errno));
	CHECK(pread(m, got, 8000, 8000) == 8000, "pread the hole");
	CHECK(lu_nonzero(got, 8000) < 0, "hole is not zero");
	CHECK(pread(m, got, 10, 20000) == 1 && got[0] == 'z', "byte after the hole");
	close(m);
	return PASS;
}

static int t_memfd_dup(void)
{
	unsigned char buf[64];
	int m, d, d2, d3, d4;

	m = memfd_create("dup", 0);
	CHECK_OK(m);
	lu_fill(buf, sizeof(buf), 0, 40);
	CHECK_OK(lu_write_all(m, buf, 16));
	d = dup(m);
	CHECK(d >= 0 && d != m, "dup: %s", strerror(errno));
	/* A dup shares the open file, and with it the offset. */
	CHECK_OK(lu_write_all(d, buf + 16, 16));
	CHECK(lseek(m, 0, SEEK_CUR) == 32, "dup does not share the offset");
	d2 = dup2(m, 200);
	CHECK(d2 == 200, "dup2 to 200: %d (%s)", d2, strerror(errno));
	d3 = fcntl(m, F_DUPFD, 300);
	CHECK(d3 >= 300, "F_DUPFD 300: %d (%s)", d3, strerror(errno));
	d4 = dup3(m, 250, O_CLOEXEC);
	CHECK(d4 == 250, "dup3 to 250: %d (%s)", d4, strerror(errno));
	CHECK_OK(lu_write_all(d2, buf + 32, 16));
	CHECK_OK(lu_write_all(d3, buf + 48, 16));
	CHECK(lseek(d4, 0, SEEK_CUR) == 64, "offset through dup3");
	/* Closing dups leaves the original working. */
	CHECK_OK(close(d));
	CHECK_OK(close(d2));
	CHECK_OK(close(d3));
	CHECK_OK(close(d4));
	CHECK_ERR(lseek(d, 0, SEEK_CUR), EBADF);
	memset(buf, 0, sizeof(buf));
	CHECK(pread(m, buf, sizeof(buf), 0) == 64, "pread after closing the dups: %s",
	      strerror(errno));
	CHECK(lu_mismatch(buf, sizeof(buf), 0, 40) < 0, "wrong bytes through the dups");
	/* dup2 over a dup of the same file, then close the original: the dup still works. */
	d = dup(m);
	CHECK(d >= 0, "dup: %s", strerror(errno));
	CHECK(dup2(m, d) == d, "dup2 onto an open fd: %s", strerror(errno));
	CHECK_OK(close(m));
	CHECK(pread(d, buf, 8, 0) == 8, "dup after closing the original: %s", strerror(errno));
	close(d);
	return PASS;
}

static int t_memfd_mmap_shared(void)
{
	const size_t len = 4 * LU_PAGE;
	unsigned char buf[4 * LU_PAGE];
	unsigned char *p, *q;
	int m;

	m = memfd_create("mmap", 0);
	CHECK_OK(m);
	CHECK_OK(ftruncate(m, (off_t)len));
	/* Bytes written with write() show in a mapping made afterwards ... */
	lu_fill(buf, 2 * LU_PAGE, 0, 50);
	CHECK_OK(lu_write_all(m, buf, 2 * LU_PAGE));
	p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, m, 0);
	CHECK(p != MAP_FAILED, "mmap: %s", strerror(errno));
	CHECK(lu_mismatch(p, 2 * LU_PAGE, 0, 50) < 0, "mapping does not show written bytes");
	CHECK(lu_nonzero(p + 2 * LU_PAGE, 2 * LU_PAGE) < 0, "unwritten pages are not zero");
	/* ... and in a mapping that already exists. */
	lu_fill(buf, 100, 3 * LU_PAGE + 10, 51);
	CHECK_OK(lu_pwrite_all(m, buf, 100, 3 * LU_PAGE + 10));
	CHECK(lu_mismatch(p + 3 * LU_PAGE + 10, 100, 3 * LU_PAGE + 10, 51) < 0,
	      "existing mapping does not show a later pwrite");
	/* Stores through the mapping show in read(). */
	lu_fill(p + LU_PAGE, LU_PAGE, LU_PAGE, 52);
	lu_fill(p + 2 * LU_PAGE + 1, 7, 2 * LU_PAGE + 1, 53);
	CHECK_OK(lu_pread_all(m, buf, len, 0));
	CHECK(lu_mismatch(buf + LU_PAGE, LU_PAGE, LU_PAGE, 52) < 0, "read misses mapped stores");
	CHECK(lu_mismatch(buf + 2 * LU_PAGE + 1, 7, 2 * LU_PAGE + 1, 53) < 0,
	      "read misses a store into a hole page");
	/* A second mapping at a page offset sees the same pages. */
	q = mmap(NULL, LU_PAGE, PROT_READ, MAP_SHARED, m, LU_PAGE);
	CHECK(q != MAP_FAILED, "mmap at offset: %s", strerror(errno));
	CHECK(lu_mismatch(q, LU_PAGE, LU_PAGE, 52) < 0, "mapping at an offset shows other bytes");
	/* A punched hole reads as zeros through the mapping too. */
	CHECK_OK(fallocate(m, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, LU_PAGE, LU_PAGE));
	CHECK(lu_nonzero(q, LU_PAGE) < 0, "punched page not zero in the mapping");
	CHECK_OK(munmap(q, LU_PAGE));
	CHECK_OK(munmap(p, len));
	/* The file outlives its mappings. */
	CHECK_OK(lu_pread_all(m, buf, LU_PAGE, 0));
	CHECK(lu_mismatch(buf, LU_PAGE, 0, 50) < 0, "contents changed after munmap");
	close(m);
	return PASS;
}

static int t_memfd_truncate_and_punch(void)
{
	const size_t n = 3 * LU_PAGE;
	unsigned char buf[6 * LU_PAGE];
	struct stat st;
	int m;

	m = memfd_create("truncate", 0);
	CHECK_OK(m);
	lu_fill(buf, n, 0, 60);
	CHECK_OK(lu_write_all(m, buf, n));

	/* Grow: the new tail reads as zeros. */
	CHECK_OK(ftruncate(m, 6 * LU_PAGE));
	CHECK_OK(lu_pread_all(m, buf, 6 * LU_PAGE, 0));
	CHECK(lu_mismatch(buf, n, 0, 60) < 0, "grow changed the old bytes");
	CHECK(lu_nonzero(buf + n, 3 * LU_PAGE) < 0, "grown tail is not zero");

	/* Shrink into the middle of a page, then grow again: the cut bytes come back as zeros. */
	CHECK_OK(ftruncate(m, LU_PAGE + 100));
	CHECK_OK(fstat(m, &st));
	CHECK(st.st_size == (off_t)(LU_PAGE + 100), "size %lld after shrink",
	      (long long)st.st_size);
	CHECK(pread(m, buf, sizeof(buf), 0) == (ssize_t)(LU_PAGE + 100), "read after shrink");
	CHECK_OK(ftruncate(m, n));
	CHECK_OK(lu_pread_all(m, buf, n, 0));
	CHECK(lu_mismatch(buf, LU_PAGE + 100, 0, 60) < 0, "shrink changed the kept bytes");
	CHECK(lu_nonzero(buf + LU_PAGE + 100, n - LU_PAGE - 100) < 0,
	      "bytes cut by the shrink came back");

	/* Punch a whole page and an unaligned range; the size does not change. */
	lu_fill(buf, n, 0, 61);
	CHECK_OK(lu_pwrite_all(m, buf, n, 0));
	CHECK_OK(fallocate(m, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, LU_PAGE, LU_PAGE));
	CHECK_OK(fallocate(m, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 2 * LU_PAGE + 10, 90));
	CHECK_OK(fstat(m, &st));
	CHECK(st.st_size == (off_t)n, "punch changed the size to %lld", (long long)st.st_size);
	CHECK_OK(lu_pread_all(m, buf, n, 0));
	CHECK(lu_mismatch(buf, LU_PAGE, 0, 61) < 0, "bytes before the hole changed");
	CHECK(lu_nonzero(buf + LU_PAGE, LU_PAGE) < 0, "punched page is not zero");
	CHECK(lu_mismatch(buf + 2 * LU_PAGE, 10, 2 * LU_PAGE, 61) < 0, "bytes before range");
	CHECK(lu_nonzero(buf + 2 * LU_PAGE + 10, 90) < 0, "punched range is not zero");
	CHECK(lu_mismatch(buf + 2 * LU_PAGE + 100, LU_PAGE - 100, 2 * LU_PAGE + 100, 61) < 0,
	      "bytes after the punched range changed");
	/* Ranges Linux refuses before the file's own code (vfs_fallocate): a negative offset
	 * or length, an end past the largest offset; the bytes stay. */
	CHECK_ERR(fallocate(m, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, -LU_PAGE, LU_PAGE), EINVAL);
	CHECK_ERR(fallocate(m, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, -LU_PAGE), EINVAL);
	CHECK_ERR(fallocate(m, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
			    INT64_MAX - LU_PAGE + 1, 2 * LU_PAGE),
		  EFBIG);
	CHECK_ERR(fallocate(m, 0, INT64_MAX - LU_PAGE + 1, 2 * LU_PAGE), EFBIG);
	CHECK_OK(lu_pread_all(m, buf, LU_PAGE, 0));
	CHECK(lu_mismatch(buf, LU_PAGE, 0, 61) < 0, "a refused fallocate changed bytes");
	/* The hole can be written again. */
	lu_fill(buf, 10, LU_PAGE + 5, 62);
	CHECK_OK(lu_pwrite_all(m, buf, 10, LU_PAGE + 5));
	CHECK_OK(lu_pread_all(m, buf, 20, LU_PAGE));
	CHECK(lu_nonzero(buf, 5) < 0 && lu_mismatch(buf + 5, 10, LU_PAGE + 5, 62) < 0 &&
		      lu_nonzero(buf + 15, 5) < 0,
	      "write into a punched page");
	close(m);
	return PASS;
}

/* ---- driver ------------------------------------------------------------------------------ */

struct test_case {
	const char *name;
	int (*fn)(void);
};

static const struct test_case cases[] = {
	{ "basic_open_close", t_basic_open_close },
	{ "exclusive_open", t_exclusive_open },
	{ "create_duplicate_session", t_create_duplicate_session },
	{ "create_distinct_sessions", t_create_distinct_sessions },
	{ "retrieve_unknown_session", t_retrieve_unknown_session },
	{ "preserve_memfd", t_preserve_memfd },
	{ "preserve_unsupported_fd", t_preserve_unsupported_fd },
	{ "prevent_double_preservation", t_prevent_double_preservation },
	{ "create_session_no_null_termination", t_name_without_nul },
	{ "create_session_empty_name", t_empty_name },
	{ "get_session_name", t_get_session_name },
	{ "get_session_name_max_length", t_get_session_name_max_length },
	{ "preserve_many_sessions", t_preserve_many_sessions },
	{ "preserve_many_files", t_preserve_many_files },
	{ "session_gone_after_last_close", t_session_gone_after_last_close },
	{ "dead_child_drops_session", t_dead_child_drops_session },
	{ "preserve_freezes_size", t_preserve_freezes_size },
	{ "ioctl_rules", t_ioctl_rules },
	{ "memfd_seals", t_memfd_seals },
	{ "memfd_fstat_size", t_memfd_fstat_size },
	{ "memfd_io_round_trip", t_memfd_io_round_trip },
	{ "memfd_dup", t_memfd_dup },
	{ "memfd_mmap_shared", t_memfd_mmap_shared },
	{ "memfd_truncate_and_punch", t_memfd_truncate_and_punch },
};

#define NCASES ((int)(sizeof(cases) / sizeof(cases[0])))

int main(int argc, char **argv)
{
	int failed = 0, skipped = 0, dev_absent = 0;
	const char *only = argc > 1 ? argv[1] : NULL;

	printf("TAP version 13\n1..%d\n", NCASES);
	for (int i = 0; i < NCASES; i++) {
		const struct test_case *t = &cases[i];
		int st, code;
		pid_t pid;

		if (only && strcmp(only, t->name) != 0) {
			printf("ok %d %s # SKIP not selected\n", i + 1, t->name);
			skipped++;
			continue;
		}
		fflush(NULL);
		pid = fork();
		if (pid < 0) {
			fprintf(stderr, "# fork: %s\n", strerror(errno));
			printf("not ok %d %s\n", i + 1, t->name);
			failed++;
			continue;
		}
		if (pid == 0) {
			alarm(60); /* a hang fails the case instead of the whole run */
			code = t->fn();
			fflush(NULL);
			_exit(code);
		}
		if (waitpid(pid, &st, 0) != pid) {
			fprintf(stderr, "# waitpid: %s\n", strerror(errno));
			st = -1;
		}
		if (st != -1 && WIFEXITED(st) && WEXITSTATUS(st) == PASS) {
			printf("ok %d %s\n", i + 1, t->name);
		} else if (st != -1 && WIFEXITED(st) && WEXITSTATUS(st) == SKIP) {
			printf("ok %d %s # SKIP\n", i + 1, t->name);
			skipped++;
		} else if (st != -1 && WIFEXITED(st) && WEXITSTATUS(st) == SKIP_NODEV) {
			printf("ok %d %s # SKIP %s is absent\n", i + 1, t->name,
			       LIVEUPDATE_DEV_PATH);
			skipped++;
			dev_absent = 1;
		} else {
			if (st != -1 && WIFSIGNALED(st))
				fprintf(stderr, "# %s: killed by signal %d\n", t->name, WTERMSIG(st));
			printf("not ok %d %s\n", i + 1, t->name);
			failed++;
		}
	}
	printf("# passed %d, skipped %d, failed %d\n", NCASES - failed - skipped, skipped, failed);
	fflush(NULL);
	if (failed)
		return 1;
	return dev_absent ? SKIP : 0;
}
