/* rfc_vmm: --eintr, KVM_RUN interrupted by a signal or immediate_exit. */
#include "rfc_vmm.h"
#include <ucontext.h>

static volatile sig_atomic_t in_call; /* set around the KVM_RUN call */
static volatile sig_atomic_t nsig;    /* SIGALRMs since the round started */
static volatile sig_atomic_t first_in_call;
static volatile sig_atomic_t first_held; /* SIGALRM was blocked where the first one came */
static volatile uint64_t first_sig_us;

static void on_alarm(int sig, siginfo_t *si, void *ctx)
{
	(void)sig;
	(void)si;
	if (nsig == 0) {
		first_in_call = in_call;
		/* The mask of the interrupted code. Under handover the library's KVM_RUN holds
		 * signals from its first steps and lets them in only in its wait for the reply
		 * (the kernel then reports the held mask here): a signal that came with SIGALRM
		 * unblocked was handled before the call was entered, as one handled just before a
		 * native ioctl enters the kernel, and cannot stop it. */
		first_held = sigismember(&((ucontext_t *)ctx)->uc_sigmask, SIGALRM) == 1;
		first_sig_us = now_us(); /* clock_gettime is async-signal-safe */
	}
	nsig++;
}

/* ITIMER_REAL: the first SIGALRM in `first_us`, then every `every_us` (0: none). */
static void arm(long first_us, long every_us)
{
	struct itimerval it;

	it.it_value.tv_sec = first_us / 1000000;
	it.it_value.tv_usec = first_us % 1000000;
	it.it_interval.tv_sec = every_us / 1000000;
	it.it_interval.tv_usec = every_us % 1000000;
	if (setitimer(ITIMER_REAL, &it, NULL) < 0)
		die("setitimer");
}

struct interrupted {
	uint64_t t_call, t_ret, first_sig;
	int nsig, first_in_call, first_held;
};

/* One KVM_RUN of the parked guest with the timer armed; it must end with -1/EINTR. */
static struct interrupted interrupted_run(struct vcpu *v, long first_us, long every_us)
{
	struct interrupted r;
	int ret, e;

	arm(0, 0); /* a signal still pending is delivered when setitimer returns */
	nsig = 0;
	first_in_call = 0;
	first_held = 0;
	first_sig_us = 0;
	arm(first_us, every_us);
	r.t_call = now_us();
	in_call = 1;
	ret = ioctl(v->fd, KVM_RUN, 0);
	e = errno;
	in_call = 0;
	r.t_ret = now_us();
	arm(0, 0);
	if (ret >= 0)
		fail("eintr: KVM_RUN of the parked guest returned %d, exit reason %u (want -1/EINTR)",
		     ret, v->run->exit_reason);
	if (e != EINTR) {
		errno = e;
		die("eintr: KVM_RUN of the parked guest");
	}
	r.nsig = nsig;
	r.first_in_call = first_in_call;
	r.first_held = first_held;
	r.first_sig = first_sig_us;
	return r;
}

#define PROBE_ROUNDS 100

/* "late": the guest runs its clock loop on a thread of its own (an exit every few us). */
struct late {
	struct vcpu *v;
	int done;     /* atomic */
	int err;      /* errno of the KVM_RUN that failed */
	long exits;   /* before it */
};

static void *late_vcpu(void *p)
{
	struct late *l = p;
	struct kvm_run *run = l->v->run;

	for (;;) {
		uint32_t val;

		if (ioctl(l->v->fd, KVM_RUN, 0) < 0) {
			l->err = errno;
			break;
		}
		if (run->exit_reason != KVM_EXIT_IO || run->io.direction != KVM_EXIT_IO_IN) {
			l->err = EIO;
			break;
		}
		val = run->io.port == PORT_CLOCK ? (uint32_t)now_us() : 0;
		memcpy((unsigned char *)run + run->io.data_offset, &val, 4);
		l->exits++;
	}
	__atomic_store_n(&l->done, 1, __ATOMIC_RELEASE);
	return NULL;
}

/*
 * immediate_exit set by another thread while the vCPU runs, with no signal: KVM reads it when
 * KVM_RUN is entered, so the call after the current one must return EINTR.
 */
static void eintr_late(struct vcpu *v)
{
	struct late l = { v, 0, 0, 0 };
	pthread_t t;
	uint64_t t_set;

	if (pthread_create(&t, NULL, late_vcpu, &l))
		die("pthread_create");
	usleep(20000);
	t_set = now_us();
	__atomic_store_n(&v->run->immediate_exit, 1, __ATOMIC_RELEASE);
	while (!__atomic_load_n(&l.done, __ATOMIC_ACQUIRE)) {
		if (now_us() - t_set > 2000000)
			fail("eintr: late: KVM_RUN went on for 2 s after immediate_exit was set "
			     "(%ld exits)", l.exits);
		usleep(100);
	}
	pthread_join(t, NULL);
	v->run->immediate_exit = 0;
	if (l.err != EINTR) {
		errno = l.err;
		die("eintr: late: KVM_RUN");
	}
	printf("rfc_vmm: eintr: late: KVM_RUN returned -1/EINTR %.3f ms after immediate_exit was "
	       "set by another thread, after %ld exits\n",
	       (now_us() - t_set) / 1000.0, l.exits);
}

/* --eintr: see the top of the file. */
int run_eintr(const struct opts *o)
{
	int kvm = open_kvm();
	struct machine m;
	struct sigaction sa;
	struct interrupted r;
	uint64_t lat[PROBE_ROUNDS], status;
	int inside = 0, lost = 0, nlat = 0, before_entry = 0;

	check_caps(kvm);
	machine_written(kvm, o, &m);
	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = on_alarm;
	sigemptyset(&sa.sa_mask);
	sa.sa_flags = SA_SIGINFO; /* no SA_RESTART (KVM_RUN is never restarted anyway) */
	if (sigaction(SIGALRM, &sa, NULL) < 0)
		die("sigaction SIGALRM");
	if (o->eintr != EINTR_LATE)
		park(m.low.mem);
	printf("rfc_vmm: eintr: guest %s (pid %d)\n", o->eintr == EINTR_LATE ? "running" : "parked",
	       (int)getpid());
	fflush(stdout);

	switch (o->eintr) {
	case EINTR_SIGNAL:
		/* A signal 50 ms into the call; should it be lost, more follow every 500 ms. */
		r = interrupted_run(&m.v, 50000, 500000);
		printf("rfc_vmm: eintr: signal: KVM_RUN returned -1/EINTR after %.1f ms, %.3f ms "
		       "after the handler ran; %d signal%s, exit reason %u\n",
		       (r.t_ret - r.t_call) / 1000.0, (r.t_ret - r.first_sig) / 1000.0, r.nsig,
		       r.nsig == 1 ? "" : "s", m.v.run->exit_reason);
		break;
	case EINTR_IMMEDIATE:
		/* No signal is due: a watchdog one comes after 500 ms (and every 500 ms). */
		m.v.run->immediate_exit = 1;
		r = interrupted_run(&m.v, 500000, 500000);
		m.v.run->immediate_exit = 0;
		printf("rfc_vmm: eintr: immediate: KVM_RUN returned -1/EINTR after %.1f ms; %d "
		       "signal%s\n",
		       (r.t_ret - r.t_call) / 1000.0, r.nsig, r.nsig == 1 ? "" : "s");
		break;
	case EINTR_PROBE:
		/* The first signal 1-100 us into the call, then every 250 ms: a signal counts as
		 * lost only if the call was still running when the next one came, so the gap must
		 * be far above what a loaded 2-CPU machine delays a kick by (tens of ms measured).
		 * Under handover a signal handled before the library held signals did not reach
		 * the call (see on_alarm): it is counted apart, not as inside. */
		for (int i = 0; i < PROBE_ROUNDS; i++) {
			r = interrupted_run(&m.v, 1 + (i * 37) % 100, 250000);
			if (!r.first_in_call)
				continue;
			if (!o->native && !r.first_held) {
				before_entry++;
				continue;
			}
			inside++;
			if (r.nsig > 1)
				lost++;
			else
				lat[nlat++] = r.t_ret - r.first_sig;
		}
		qsort(lat, (size_t)nlat, sizeof(lat[0]), cmp_u64);
		printf("rfc_vmm: eintr: probe: %d of %d early signals arrived inside KVM_RUN, %d of "
		       "them lost; handler to return: median %" PRIu64 " us, max %" PRIu64 " us; "
		       "%d handled before the call held signals\n",
		       inside, PROBE_ROUNDS, lost, nlat ? lat[nlat / 2] : 0,
		       nlat ? lat[nlat - 1] : 0, before_entry);
		break;
	case EINTR_LATE:
		eintr_late(&m.v);
		break;
	case EINTR_NONE:
		break;
	}
	fflush(stdout);

	/* The vCPU is intact: let the guest go on; it finishes its loop and verifies. */
	unpark(m.low.mem);
	status = run_guest(&m.v, m.low.mem, "eintr: after EINTR");
	if (status != STATUS_VERIFY_OK)
		fail("eintr: guest status %" PRIu64 " after EINTR, want %d (verify ok)", status,
		     STATUS_VERIFY_OK);
	printf("rfc_vmm: eintr: the guest went on and verified %llu bytes\n", DATA_LEN);
	destroy_vcpu(&m.v);
	munmap(m.gmem_map, GMEM_SIZE);
	close(m.gmem);
	close(m.vm);
	free_low(&m.low);
	close(kvm);
	printf("rfc_vmm: eintr ok\n");
	return 0;
}
