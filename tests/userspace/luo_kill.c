/*
 * luo_kill STEPS: processes killed in the middle of preparing a live update leave nothing
 * behind, and a clean preparation afterwards is carried across the update.
 *
 * Stage 1 (the state session "kill-state" is absent): for k = 0 .. STEPS-1 a child runs the
 * steps of a preparation (open /dev/liveupdate, create session "kill-k", create and write a
 * memfd, map and dirty it, preserve it, then more memfds) and kills itself with SIGKILL right
 * after step k. The parent checks the child died of SIGKILL, and that what it held is gone:
 * /dev/liveupdate opens (not EBUSY) and "kill-k" can be created again. Then the parent
 * preserves one memfd in "kill-final" plus a state session and asks for the update itself
 * with reboot(LINUX_REBOOT_CMD_KEXEC) while it holds them.
 *
 * Stage 2 checks the memfd, that no "kill-k" session came across, finishes both sessions and
 * prints "kill: stage 2 ok".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/reboot.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "lu_util.h"

#define STATE_NAME "kill-state"
#define FINAL_NAME "kill-final"
#define STATE_TOKEN 1
#define STATE_TEXT "kill next=2"
#define FINAL_TOKEN 0x42
#define FINAL_SIZE (3 * LU_PAGE)

static void fail(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	fprintf(stderr, "kill: FAIL: ");
	vfprintf(stderr, fmt, ap);
	fprintf(stderr, "\n");
	va_end(ap);
	exit(1);
}

/* In a child: report what went wrong and end with a status the parent will not mistake. */
static void child_fail(int step, const char *what, int e)
{
	fprintf(stderr, "kill: child step %d: %s: %s\n", step, what, strerror(e));
	_exit(2);
}

/*
 * The preparation, run by a child that dies by SIGKILL right after step `kill_after`.
 * Step 0 opens the device, 1 creates the session, 2 writes a memfd, 3 maps and dirties it,
 * 4 preserves it, 5 dups the session fd and preserves a second memfd, and every later step
 * preserves one more memfd.
 */
static void child(int k, int kill_after)
{
	unsigned char buf[LU_PAGE];
	char name[LIVEUPDATE_SESSION_NAME_LENGTH];
	int dev = -1, s = -1, m = -1, r;
	unsigned char *p;

	for (int step = 0; step <= kill_after; step++) {
		switch (step) {
		case 0:
			dev = open(LIVEUPDATE_DEV_PATH, O_RDWR);
			if (dev < 0)
				child_fail(step, "open " LIVEUPDATE_DEV_PATH, errno);
			break;
		case 1:
			snprintf(name, sizeof(name), "kill-%d", k);
			s = lu_create_session(dev, name);
			if (s < 0)
				child_fail(step, "create session", -s);
			break;
		case 2:
			m = memfd_create("kill-child", 0);
			if (m < 0)
				child_fail(step, "memfd_create", errno);
			if (ftruncate(m, 2 * LU_PAGE) < 0)
				child_fail(step, "ftruncate", errno);
			lu_fill(buf, sizeof(buf), 0, (uint64_t)k);
			r = lu_write_all(m, buf, sizeof(buf));
			if (r < 0)
				child_fail(step, "write", -r);
			break;
		case 3:
			p = mmap(NULL, 2 * LU_PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, m, 0);
			if (p == MAP_FAILED)
				child_fail(step, "mmap", errno);
			lu_fill(p + LU_PAGE, LU_PAGE, LU_PAGE, (uint64_t)k);
			p[0] ^= 0xff;
			break;
		case 4:
			r = lu_preserve_fd(s, m, 1);
			if (r < 0)
				child_fail(step, "preserve", -r);
			break;
		default: {
			int extra = memfd_create("kill-extra", 0);

			if (extra < 0)
				child_fail(step, "memfd_create", errno);
			r = lu_write_all(extra, "extra", 5);
			if (r < 0)
				child_fail(step, "write", -r);
			if (step == 5 && dup(s) < 0)
				child_fail(step, "dup session fd", errno);
			r = lu_preserve_fd(s, extra, (uint64_t)step);
			if (r < 0)
				child_fail(step, "preserve", -r);
			break;
		}
		}
	}
	raise(SIGKILL);
	_exit(3); /* not reached */
}

static void kill_children(int steps)
{
	char name[LIVEUPDATE_SESSION_NAME_LENGTH];

	for (int k = 0; k < steps; k++) {
		int st, dev, s;
		pid_t pid;

		fflush(NULL);
		pid = fork();
		if (pid < 0)
			fail("fork: %s", strerror(errno));
		if (pid == 0)
			child(k, k);
		if (waitpid(pid, &st, 0) != pid)
			fail("waitpid: %s", strerror(errno));
		if (!WIFSIGNALED(st) || WTERMSIG(st) != SIGKILL)
			fail("child %d: status %#x, want death by SIGKILL", k, st);
		/* Everything the dead child held is released. */
		dev = open(LIVEUPDATE_DEV_PATH, O_RDWR);
		if (dev < 0)
			fail("after child %d: open %s: %s", k, LIVEUPDATE_DEV_PATH,
			     strerror(errno));
		snprintf(name, sizeof(name), "kill-%d", k);
		s = lu_create_session(dev, name);
		if (s < 0)
			fail("after child %d: create %s: %s", k, name, strerror(-s));
		close(s);
		close(dev);
		printf("kill: child %d killed after step %d, nothing left behind\n", k, k);
	}
}

static void stage1(int steps)
{
	unsigned char buf[LU_PAGE];
	unsigned char *p;
	int dev, state, final, st, m, r;

	kill_children(steps);

	dev = open(LIVEUPDATE_DEV_PATH, O_RDWR);
	if (dev < 0)
		fail("open %s: %s", LIVEUPDATE_DEV_PATH, strerror(errno));
	state = lu_create_session(dev, STATE_NAME);
	if (state < 0)
		fail("create %s: %s", STATE_NAME, strerror(-state));
	final = lu_create_session(dev, FINAL_NAME);
	if (final < 0)
		fail("create %s: %s", FINAL_NAME, strerror(-final));

	/* Page 0 by write(), page 1 through a mapping, page 2 by pwrite(). */
	m = memfd_create("kill-final", 0);
	if (m < 0)
		fail("memfd_create: %s", strerror(errno));
	lu_fill(buf, sizeof(buf), 0, FINAL_TOKEN);
	r = lu_write_all(m, buf, sizeof(buf));
	if (r < 0)
		fail("write: %s", strerror(-r));
	if (ftruncate(m, FINAL_SIZE) < 0)
		fail("ftruncate: %s", strerror(errno));
	p = mmap(NULL, FINAL_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, m, 0);
	if (p == MAP_FAILED)
		fail("mmap: %s", strerror(errno));
	lu_fill(p + LU_PAGE, LU_PAGE / 2, LU_PAGE, FINAL_TOKEN);
	lu_fill(buf, sizeof(buf), 2 * LU_PAGE, FINAL_TOKEN);
	r = lu_pwrite_all(m, buf, sizeof(buf), 2 * LU_PAGE);
	if (r < 0)
		fail("pwrite: %s", strerror(-r));
	r = lu_preserve_fd(final, m, FINAL_TOKEN);
	if (r < 0)
		fail("preserve: %s", strerror(-r));
	/* The rest of page 1 is stored after preservation, through the mapping still in place. */
	lu_fill(p + LU_PAGE + LU_PAGE / 2, LU_PAGE / 2, LU_PAGE + LU_PAGE / 2, FINAL_TOKEN);

	st = memfd_create("kill-state", 0);
	if (st < 0)
		fail("memfd_create: %s", strerror(errno));
	r = lu_write_all(st, STATE_TEXT, sizeof(STATE_TEXT));
	if (r < 0)
		fail("write: %s", strerror(-r));
	r = lu_preserve_fd(state, st, STATE_TOKEN);
	if (r < 0)
		fail("preserve state: %s", strerror(-r));

	printf("kill: stage 1 done, %d children killed; asking for the update\n", steps);
	fflush(NULL);
	/* Holding every fd: the update happens inside this call and the process ends with it. */
	reboot(LINUX_REBOOT_CMD_KEXEC);
	fail("reboot(LINUX_REBOOT_CMD_KEXEC) returned: %s", strerror(errno));
}

static void stage2(int dev, int state, int steps)
{
	char name[LIVEUPDATE_SESSION_NAME_LENGTH], text[sizeof(STATE_TEXT)];
	unsigned char buf[FINAL_SIZE];
	struct stat sb;
	int final, st, m, r;
	long bad;

	st = lu_retrieve_fd(state, STATE_TOKEN);
	if (st < 0)
		fail("retrieve the state memfd: %s", strerror(-st));
	r = lu_pread_all(st, text, sizeof(text), 0);
	if (r < 0 || memcmp(text, STATE_TEXT, sizeof(text)) != 0)
		fail("state memfd: %s", r < 0 ? strerror(-r) : "wrong contents");

	final = lu_retrieve_session(dev, FINAL_NAME);
	if (final < 0)
		fail("retrieve %s: %s", FINAL_NAME, strerror(-final));
	m = lu_retrieve_fd(final, FINAL_TOKEN);
	if (m < 0)
		fail("retrieve the memfd: %s", strerror(-m));
	if (fstat(m, &sb) < 0 || sb.st_size != (off_t)FINAL_SIZE)
		fail("memfd size %lld, want %lu", (long long)sb.st_size, FINAL_SIZE);
	r = lu_pread_all(m, buf, sizeof(buf), 0);
	if (r < 0)
		fail("pread: %s", strerror(-r));
	bad = lu_mismatch(buf, sizeof(buf), 0, FINAL_TOKEN);
	if (bad >= 0)
		fail("memfd byte %ld is %#x, want %#x", bad, buf[bad], lu_pattern(bad, FINAL_TOKEN));

	/* Nothing of the killed children came across. */
	for (int k = 0; k < steps; k++) {
		snprintf(name, sizeof(name), "kill-%d", k);
		r = lu_retrieve_session(dev, name);
		if (r != -ENOENT)
			fail("session %s came across (%s)", name, r < 0 ? strerror(-r) : "retrieved");
	}

	r = lu_finish(final);
	if (r < 0)
		fail("FINISH %s: %s", FINAL_NAME, strerror(-r));
	r = lu_finish(state);
	if (r < 0)
		fail("FINISH %s: %s", STATE_NAME, strerror(-r));
	close(m);
	close(st);
	close(final);
	close(state);
	close(dev);
	printf("kill: stage 2 ok\n");
}

int main(int argc, char **argv)
{
	int steps, dev, state;
	char *end;

	if (argc != 2)
		fail("usage: luo_kill STEPS");
	steps = (int)strtol(argv[1], &end, 10);
	if (*end || steps < 1 || steps > 100)
		fail("STEPS must be 1..100, not \"%s\"", argv[1]);
	dev = open(LIVEUPDATE_DEV_PATH, O_RDWR);
	if (dev < 0)
		fail("open %s: %s", LIVEUPDATE_DEV_PATH, strerror(errno));
	state = lu_retrieve_session(dev, STATE_NAME);
	if (state == -ENOENT) {
		/* The children open the device themselves: it admits one opener at a time. */
		close(dev);
		stage1(steps);
		return 1; /* not reached */
	}
	if (state < 0)
		fail("RETRIEVE_SESSION %s: %s", STATE_NAME, strerror(-state));
	stage2(dev, state, steps);
	return 0;
}
