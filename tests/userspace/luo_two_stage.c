/*
 * luo_two_stage: memfds of every shape carried across one live update.
 *
 * The program runs twice, once in each image, and finds its stage the way upstream's kexec
 * selftests do: RETRIEVE_SESSION of its state session fails with ENOENT before the update.
 *
 * Stage 1 fills five memfds (written with write(), filled through a shared mapping, sealed,
 * sparse, empty), preserves them in the session "two-stage-data" and a small memfd naming the
 * next stage in "two-stage-state", then hands every fd to a daemon child and exits 0. The
 * daemon only sleeps, so the sessions stay open until the host updates (which kills it).
 *
 * Stage 2 retrieves the sessions and the memfds in another order, checks every byte, size,
 * seal and file position, maps one, finishes both sessions and prints "two-stage: stage 2 ok".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "lu_util.h"

#define STATE_NAME "two-stage-state"
#define DATA_NAME "two-stage-data"
#define STATE_TOKEN 0x5157
#define STATE_TEXT "two-stage next=2"

enum {
	T_WRITTEN = 0x11, /* write() in odd-sized pieces; the file position is left at the end */
	T_MAPPED = 0x12,  /* filled through MAP_SHARED, one page stored after preservation */
	T_SEALED = 0x13,  /* F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW after writing */
	T_SPARSE = 0x14,  /* 8 MiB with a few written ranges */
	T_EMPTY = 0x15,   /* size 0 */
};

#define WRITTEN_SIZE (3 * LU_PAGE + 123)
#define MAPPED_SIZE (4 * LU_PAGE)
#define SEALED_SIZE 5000UL
#define SEALED_SEALS (F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW)
#define SPARSE_SIZE (8UL << 20)

/* The written ranges of the sparse memfd; everything else must read as zeros. */
static const struct {
	unsigned long off, len;
} sparse_ranges[] = {
	{ 0, LU_PAGE },
	{ (1UL << 20) + 3 * LU_PAGE, LU_PAGE },
	{ (5UL << 20) + 100, 8000 }, /* unaligned, across three pages */
	{ SPARSE_SIZE - LU_PAGE, LU_PAGE },
};

#define NRANGES (sizeof(sparse_ranges) / sizeof(sparse_ranges[0]))

static void fail(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	fprintf(stderr, "two-stage: FAIL: ");
	vfprintf(stderr, fmt, ap);
	fprintf(stderr, "\n");
	va_end(ap);
	exit(1);
}

/* A -errno or -1/errno result as text. */
static const char *err(long r)
{
	return strerror(r < -1 ? (int)-r : errno);
}

static int new_memfd(const char *name, unsigned int flags)
{
	int fd = memfd_create(name, flags);

	if (fd < 0)
		fail("memfd_create %s: %s", name, strerror(errno));
	return fd;
}

static void preserve(int session, int fd, uint64_t token)
{
	int r = lu_preserve_fd(session, fd, token);

	if (r < 0)
		fail("preserve token %#llx: %s", (unsigned long long)token, strerror(-r));
}

static void check_size(int fd, const char *what, off_t want)
{
	struct stat st;

	if (fstat(fd, &st) < 0)
		fail("fstat %s: %s", what, strerror(errno));
	if (st.st_size != want)
		fail("%s: size %lld, want %lld", what, (long long)st.st_size, (long long)want);
}

/* Check bytes [off, off+len) of fd against the pattern of `token`. */
static void check_pattern(int fd, const char *what, unsigned long off, unsigned long len,
			  uint64_t token)
{
	unsigned char buf[16384];

	while (len) {
		size_t n = len < sizeof(buf) ? len : sizeof(buf);
		int r = lu_pread_all(fd, buf, n, (off_t)off);
		long bad;

		if (r < 0)
			fail("%s: pread at %lu: %s", what, off, strerror(-r));
		bad = lu_mismatch(buf, n, off, token);
		if (bad >= 0)
			fail("%s: byte at %lu is %#x, want %#x", what, off + bad, buf[bad],
			     lu_pattern(off + bad, token));
		off += n;
		len -= n;
	}
}

/* ---- stage 1 ------------------------------------------------------------------------------ */

static int make_written(void)
{
	unsigned char buf[WRITTEN_SIZE];
	int fd = new_memfd("two-stage-written", 0);
	unsigned long off = 0;
	/* Odd-sized pieces (the last one is the rest), crossing pages at different places. */
	static const unsigned long pieces[] = { 1, 999, 4096, 3000, WRITTEN_SIZE - 8096 };

	lu_fill(buf, sizeof(buf), 0, T_WRITTEN);
	for (size_t i = 0; i < sizeof(pieces) / sizeof(pieces[0]); i++) {
		int r = lu_write_all(fd, buf + off, pieces[i]);

		if (r < 0)
			fail("write written memfd: %s", strerror(-r));
		off += pieces[i];
	}
	if (off != WRITTEN_SIZE)
		fail("internal: pieces add up to %lu", off);
	return fd;
}

static int make_mapped(unsigned char **map)
{
	int fd = new_memfd("two-stage-mapped", 0);
	unsigned char *p;

	if (ftruncate(fd, MAPPED_SIZE) < 0)
		fail("ftruncate mapped memfd: %s", strerror(errno));
	p = mmap(NULL, MAPPED_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED)
		fail("mmap mapped memfd: %s", strerror(errno));
	/* Pages 0-2 now; page 3 after PRESERVE_FD (writing inside the size stays allowed). */
	lu_fill(p, 3 * LU_PAGE, 0, T_MAPPED);
	*map = p;
	return fd;
}

static int make_sealed(void)
{
	unsigned char buf[SEALED_SIZE];
	int fd = new_memfd("two-stage-sealed", MFD_ALLOW_SEALING);
	int r;

	lu_fill(buf, sizeof(buf), 0, T_SEALED);
	r = lu_write_all(fd, buf, sizeof(buf));
	if (r < 0)
		fail("write sealed memfd: %s", strerror(-r));
	if (fcntl(fd, F_ADD_SEALS, SEALED_SEALS) < 0)
		fail("F_ADD_SEALS: %s", strerror(errno));
	if (fcntl(fd, F_GET_SEALS) != SEALED_SEALS)
		fail("F_GET_SEALS before preservation: %#x", fcntl(fd, F_GET_SEALS));
	return fd;
}

static int make_sparse(void)
{
	unsigned char buf[8000];
	int fd = new_memfd("two-stage-sparse", 0);

	if (ftruncate(fd, SPARSE_SIZE) < 0)
		fail("ftruncate sparse memfd: %s", strerror(errno));
	for (size_t i = 0; i < NRANGES; i++) {
		unsigned long off = sparse_ranges[i].off, len = sparse_ranges[i].len;
		int r;

		lu_fill(buf, len, off, T_SPARSE);
		r = lu_pwrite_all(fd, buf, len, (off_t)off);
		if (r < 0)
			fail("pwrite sparse memfd at %lu: %s", off, strerror(-r));
	}
	check_size(fd, "sparse before preservation", SPARSE_SIZE);
	return fd;
}

/*
 * Fork a child that keeps every fd of this process (and with them the sessions) and sleeps
 * until the update kills it; return once it runs, like upstream's daemonize_and_wait. The sleep
 * is bounded so a host that never updates cannot leave it behind for ever.
 */
static void hand_to_daemon(void)
{
	int p[2];
	char c = 0;
	pid_t pid;

	if (pipe(p) < 0)
		fail("pipe: %s", strerror(errno));
	fflush(NULL);
	pid = fork();
	if (pid < 0)
		fail("fork: %s", strerror(errno));
	if (pid == 0) {
		int null = open("/dev/null", O_RDWR);

		close(p[0]);
		setsid();
		if (null >= 0) {
			dup2(null, 0);
			dup2(null, 1);
			dup2(null, 2);
			if (null > 2)
				close(null);
		}
		if (write(p[1], "h", 1) != 1)
			_exit(1);
		close(p[1]);
		for (int i = 0; i < 600; i++)
			sleep(1);
		_exit(0);
	}
	close(p[1]);
	if (read(p[0], &c, 1) != 1 || c != 'h')
		fail("the daemon did not start");
	close(p[0]);
}

static int stage1(int dev)
{
	unsigned char *map;
	int state, data, st, fds[5], r;

	data = lu_create_session(dev, DATA_NAME);
	if (data < 0)
		fail("create %s: %s", DATA_NAME, strerror(-data));
	state = lu_create_session(dev, STATE_NAME);
	if (state < 0)
		fail("create %s: %s", STATE_NAME, strerror(-state));

	fds[0] = make_written();
	fds[1] = make_mapped(&map);
	fds[2] = make_sealed();
	fds[3] = make_sparse();
	fds[4] = new_memfd("two-stage-empty", 0);

	preserve(data, fds[0], T_WRITTEN);
	preserve(data, fds[1], T_MAPPED);
	preserve(data, fds[2], T_SEALED);
	preserve(data, fds[3], T_SPARSE);
	preserve(data, fds[4], T_EMPTY);

	/* A store after preservation is part of what is handed over. */
	lu_fill(map + 3 * LU_PAGE, LU_PAGE, 3 * LU_PAGE, T_MAPPED);
	if (munmap(map, MAPPED_SIZE) < 0)
		fail("munmap: %s", strerror(errno));

	st = new_memfd("two-stage-state", 0);
	r = lu_write_all(st, STATE_TEXT, sizeof(STATE_TEXT));
	if (r < 0)
		fail("write state memfd: %s", strerror(-r));
	preserve(state, st, STATE_TOKEN);

	printf("two-stage: stage 1 preserved 5 memfds in \"%s\"\n", DATA_NAME);
	hand_to_daemon();

	/* Only the daemon's copies keep the sessions open from here on. */
	for (int i = 0; i < 5; i++)
		close(fds[i]);
	close(st);
	close(state);
	close(data);
	close(dev);
	printf("two-stage: stage 1 done, the daemon holds the sessions\n");
	return 0;
}

/* ---- stage 2 ------------------------------------------------------------------------------ */

static int retrieve(int session, uint64_t token)
{
	int fd = lu_retrieve_fd(session, token);

	if (fd < 0)
		fail("retrieve token %#llx: %s", (unsigned long long)token, strerror(-fd));
	return fd;
}

static void verify_written(int fd)
{
	off_t pos = lseek(fd, 0, SEEK_CUR);
	char c;

	check_size(fd, "written", WRITTEN_SIZE);
	check_pattern(fd, "written", 0, WRITTEN_SIZE, T_WRITTEN);
	/* The file position is handed over too: the writes left it at the end. */
	if (pos != (off_t)WRITTEN_SIZE)
		fail("written: position %lld, want %lu", (long long)pos, WRITTEN_SIZE);
	if (read(fd, &c, 1) != 0)
		fail("written: read at the end returned data");
}

static void verify_mapped(int fd)
{
	unsigned char *p;
	unsigned char b = 0;
	long bad;

	check_size(fd, "mapped", MAPPED_SIZE);
	check_pattern(fd, "mapped", 0, MAPPED_SIZE, T_MAPPED);
	p = mmap(NULL, MAPPED_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED)
		fail("mmap the retrieved memfd: %s", strerror(errno));
	bad = lu_mismatch(p, MAPPED_SIZE, 0, T_MAPPED);
	if (bad >= 0)
		fail("mapped: byte %ld seen through the new mapping is %#x", bad, p[bad]);
	/* The retrieved memfd is an ordinary one: a store through the mapping reads back. */
	p[LU_PAGE + 7] = 0xa5;
	if (pread(fd, &b, 1, LU_PAGE + 7) != 1 || b != 0xa5)
		fail("mapped: store through the new mapping not seen by pread");
	p[LU_PAGE + 7] = lu_pattern(LU_PAGE + 7, T_MAPPED);
	if (munmap(p, MAPPED_SIZE) < 0)
		fail("munmap: %s", strerror(errno));
}

static void verify_sealed(int fd)
{
	int seals = fcntl(fd, F_GET_SEALS);

	check_size(fd, "sealed", SEALED_SIZE);
	check_pattern(fd, "sealed", 0, SEALED_SIZE, T_SEALED);
	if (seals != SEALED_SEALS)
		fail("sealed: F_GET_SEALS %#x, want %#x", seals, SEALED_SEALS);
	if (pwrite(fd, "x", 1, 0) != -1 || errno != EPERM)
		fail("sealed: pwrite was not refused with EPERM");
	if (ftruncate(fd, SEALED_SIZE + 1) != -1 || errno != EPERM)
		fail("sealed: growing was not refused with EPERM");
}

static void verify_sparse(int fd)
{
	static unsigned char buf[1 << 16];
	unsigned long off;

	check_size(fd, "sparse", SPARSE_SIZE);
	for (off = 0; off < SPARSE_SIZE; off += sizeof(buf)) {
		int r = lu_pread_all(fd, buf, sizeof(buf), (off_t)off);

		if (r < 0)
			fail("sparse: pread at %lu: %s", off, strerror(-r));
		for (unsigned long i = 0; i < sizeof(buf); i++) {
			unsigned long at = off + i;
			unsigned char want = 0;

			for (size_t k = 0; k < NRANGES; k++)
				if (at >= sparse_ranges[k].off &&
				    at < sparse_ranges[k].off + sparse_ranges[k].len)
					want = lu_pattern(at, T_SPARSE);
			if (buf[i] != want)
				fail("sparse: byte at %lu is %#x, want %#x", at, buf[i], want);
		}
	}
}

static void verify_empty(int fd)
{
	char c;

	check_size(fd, "empty", 0);
	if (read(fd, &c, 1) != 0)
		fail("empty: read returned data");
}

static int stage2(int dev, int state)
{
	char name[LIVEUPDATE_SESSION_NAME_LENGTH], text[sizeof(STATE_TEXT)];
	int data, st, written, again, mapped, sealed, sparse, empty, r;

	r = lu_get_name(state, name);
	if (r < 0 || strcmp(name, STATE_NAME) != 0)
		fail("GET_NAME of the state session: %s", r < 0 ? strerror(-r) : name);
	st = retrieve(state, STATE_TOKEN);
	r = lu_pread_all(st, text, sizeof(text), 0);
	if (r < 0 || memcmp(text, STATE_TEXT, sizeof(text)) != 0)
		fail("state memfd: %s", r < 0 ? strerror(-r) : "wrong contents");

	r = lu_retrieve_session(dev, STATE_NAME);
	if (r != -EINVAL)
		fail("second RETRIEVE_SESSION of %s: %s, want EINVAL", STATE_NAME,
		     r < 0 ? strerror(-r) : "success");
	data = lu_retrieve_session(dev, DATA_NAME);
	if (data < 0)
		fail("retrieve %s: %s", DATA_NAME, strerror(-data));
	r = lu_retrieve_fd(data, 0x99);
	if (r != -ENOENT)
		fail("RETRIEVE_FD of an unknown token: %s, want ENOENT",
		     r < 0 ? strerror(-r) : "success");
	r = lu_preserve_fd(data, st, 0x98);
	if (r != -EINVAL)
		fail("PRESERVE_FD into an incoming session: %s, want EINVAL",
		     r < 0 ? strerror(-r) : "success");

	/* Not the order of preservation. */
	empty = retrieve(data, T_EMPTY);
	sparse = retrieve(data, T_SPARSE);
	sealed = retrieve(data, T_SEALED);
	mapped = retrieve(data, T_MAPPED);
	written = retrieve(data, T_WRITTEN);

	verify_empty(empty);
	verify_sparse(sparse);
	verify_sealed(sealed);
	verify_mapped(mapped);
	verify_written(written);

	/* Retrieving a token again gives another fd for the same file: the offset is shared. */
	again = retrieve(data, T_WRITTEN);
	if (lseek(again, 10, SEEK_SET) != 10 || lseek(written, 0, SEEK_CUR) != 10)
		fail("a second RETRIEVE_FD of a token is not the same file");
	close(again);

	r = lu_finish(data);
	if (r < 0)
		fail("FINISH %s: %s", DATA_NAME, strerror(-r));
	r = lu_finish(data);
	if (r < 0)
		fail("second FINISH %s: %s", DATA_NAME, strerror(-r));
	r = lu_finish(state);
	if (r < 0)
		fail("FINISH %s: %s", STATE_NAME, strerror(-r));

	/* The files are the program's own now. */
	check_pattern(written, "written after FINISH", 0, WRITTEN_SIZE, T_WRITTEN);
	check_pattern(sparse, "sparse after FINISH", 0, LU_PAGE, T_SPARSE);

	close(empty);
	close(sparse);
	close(sealed);
	close(mapped);
	close(written);
	close(st);
	close(data);
	close(state);
	close(dev);
	printf("two-stage: stage 2 ok\n");
	return 0;
}

int main(void)
{
	int dev, state;

	dev = open(LIVEUPDATE_DEV_PATH, O_RDWR);
	if (dev < 0)
		fail("open %s: %s", LIVEUPDATE_DEV_PATH, strerror(errno));
	state = lu_retrieve_session(dev, STATE_NAME);
	if (state == -ENOENT)
		return stage1(dev);
	if (state < 0)
		fail("RETRIEVE_SESSION %s: %s", STATE_NAME, err(state));
	return stage2(dev, state);
}
