/*
 * rfc_vmm --live: the RFC scenario with the guest kept running across the update, as a VMM
 * that wants the shortest blackout would do it, and the guest measuring that blackout.
 *
 * Stage 1: the guest (RUN_UPDATE mode) writes its 5 MiB on a vCPU thread, reports WRITTEN and
 * loops on its clock port. While it runs, the main thread preserves the guest_memfd, the VM,
 * the low-memory memfd and an empty vCPU-state memfd, then pauses the vCPU (immediate_exit and
 * a signal to its thread: KVM_RUN returns EINTR), saves the vCPU's state into the preserved
 * memfd and updates with reboot(LINUX_REBOOT_CMD_KEXEC).
 *
 * Stage 2: retrieve everything, rebind low memory and the guest_memfd on the retrieved VM,
 * create a vCPU, load the saved state and let the guest go on: it reads its clock once more,
 * verifies the 5 MiB and reports the largest gap between two clock reads, which is the
 * blackout it saw. One line "rfc_vmm: live {...}" carries it with the VMM's own phases
 * (CLOCK_MONOTONIC, which runs on across the update).
 */
#include "rfc_vmm.h"

#define LOW_TOKEN 3
#define VCPU_TOKEN 4
#define LIVE_MAGIC 0x314556494c4652ULL /* "RFLIVE1" */
#define STATE_BYTES (64UL << 10)
#define N_LIVE_MSRS 14

/* MSRs saved with the vCPU (src/kvm/vcpu/msrs.rs DEFAULT_MSRS, TSC first). */
static const uint32_t live_msrs[N_LIVE_MSRS] = {
	0x10,	    0x3b,	0x174,	    0x175,	0x176,	    0x1a0,	0x277,
	0x6e0,	    0xc0000081, 0xc0000082, 0xc0000083, 0xc0000084, 0xc0000102, 0xc0000103,
};

struct live_msrs {
	struct kvm_msrs hdr;
	struct kvm_msr_entry e[N_LIVE_MSRS];
};

#define MAX_CPUID 256

struct live_cpuid {
	struct kvm_cpuid2 hdr;
	struct kvm_cpuid_entry2 e[MAX_CPUID];
};

/* The vCPU-state memfd: which optional parts were saved, the state, and stage 1's clock. */
struct live_state {
	uint64_t magic;
	uint32_t has_xsave, has_xcrs;
	uint64_t t_pause, t_paused, t_saved; /* CLOCK_MONOTONIC us */
	uint64_t preserve_us, write_ms;
	struct kvm_regs regs;
	struct kvm_sregs sregs;
	struct kvm_fpu fpu;
	struct kvm_xsave xsave;
	struct kvm_xcrs xcrs;
	struct kvm_debugregs debugregs;
	struct kvm_vcpu_events events;
	struct kvm_mp_state mp;
	struct live_msrs msrs;
	struct live_cpuid cpuid; /* the vCPU's own (KVM_GET_CPUID2), set again as it was */
};

_Static_assert(sizeof(struct live_state) <= STATE_BYTES, "live_state fits its memfd");

/* Shared by the main thread and the vCPU thread of stage 1. */
struct live_run {
	struct machine *m;
	pthread_t thread;
	int status;	  /* last status the guest reported (atomic) */
	long clock_reads; /* atomic */
	int pause;	  /* the main thread asked for a pause (atomic) */
	int stopped;	  /* the vCPU thread has left its loop (atomic) */
	int err;	  /* errno of a failed KVM_RUN, or 0 */
};

static void on_kick(int sig)
{
	(void)sig;
}

static void *live_vcpu(void *p)
{
	struct live_run *lr = p;
	struct kvm_run *run = lr->m->v.run;

	for (;;) {
		uint32_t val;

		if (ioctl(lr->m->v.fd, KVM_RUN, 0) < 0) {
			if ((errno == EINTR || errno == EAGAIN) &&
			    !__atomic_load_n(&lr->pause, __ATOMIC_ACQUIRE))
				continue;
			if (errno != EINTR)
				lr->err = errno;
			break;
		}
		if (run->exit_reason != KVM_EXIT_IO || run->io.size != 4 || run->io.count != 1) {
			fprintf(stderr, "rfc_vmm: live: exit reason %u\n", run->exit_reason);
			lr->err = EIO;
			break;
		}
		if (run->io.direction == KVM_EXIT_IO_OUT && run->io.port == PORT_STATUS) {
			memcpy(&val, (unsigned char *)run + run->io.data_offset, 4);
			__atomic_store_n(&lr->status, (int)val, __ATOMIC_RELEASE);
			if (val != STATUS_WRITTEN) /* a final status: the guest repeats it forever */
				break;
			continue;
		}
		if (run->io.direction != KVM_EXIT_IO_IN ||
		    (run->io.port != PORT_CLOCK && run->io.port != PORT_PROCEED)) {
			fprintf(stderr, "rfc_vmm: live: I/O on port %#x\n", run->io.port);
			lr->err = EIO;
			break;
		}
		if (run->io.port == PORT_CLOCK) {
			val = (uint32_t)now_us();
			__atomic_add_fetch(&lr->clock_reads, 1, __ATOMIC_RELEASE);
		} else {
			val = 0; /* proceed: not before the update */
		}
		memcpy((unsigned char *)run + run->io.data_offset, &val, 4);
	}
	__atomic_store_n(&lr->stopped, 1, __ATOMIC_RELEASE);
	return NULL;
}

static void wait_until(struct live_run *lr, int (*done)(struct live_run *), const char *what)
{
	uint64_t t0 = now_us();

	while (!done(lr)) {
		if (__atomic_load_n(&lr->stopped, __ATOMIC_ACQUIRE))
			fail("live: the vCPU thread stopped (status %d, errno %d) waiting for %s",
			     lr->status, lr->err, what);
		if (now_us() - t0 > 120000000)
			fail("live: no %s after 120 s", what);
		usleep(200);
	}
}

static int written_and_ticking(struct live_run *lr)
{
	return __atomic_load_n(&lr->status, __ATOMIC_ACQUIRE) == STATUS_WRITTEN &&
	       __atomic_load_n(&lr->clock_reads, __ATOMIC_ACQUIRE) >= 3;
}

static void xioctl(int fd, unsigned long req, void *arg, const char *what)
{
	if (ioctl(fd, req, arg) < 0)
		die(what);
}

/* The vCPU's state; XSAVE and XCRS where this KVM has them. */
static void save_vcpu(int kvm, int vcpu, struct live_state *s)
{
	xioctl(vcpu, KVM_GET_REGS, &s->regs, "KVM_GET_REGS");
	xioctl(vcpu, KVM_GET_SREGS, &s->sregs, "KVM_GET_SREGS");
	xioctl(vcpu, KVM_GET_FPU, &s->fpu, "KVM_GET_FPU");
	s->has_xsave = ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_XSAVE) > 0;
	if (s->has_xsave)
		xioctl(vcpu, KVM_GET_XSAVE, &s->xsave, "KVM_GET_XSAVE");
	s->has_xcrs = ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_XCRS) > 0;
	if (s->has_xcrs)
		xioctl(vcpu, KVM_GET_XCRS, &s->xcrs, "KVM_GET_XCRS");
	xioctl(vcpu, KVM_GET_DEBUGREGS, &s->debugregs, "KVM_GET_DEBUGREGS");
	xioctl(vcpu, KVM_GET_VCPU_EVENTS, &s->events, "KVM_GET_VCPU_EVENTS");
	xioctl(vcpu, KVM_GET_MP_STATE, &s->mp, "KVM_GET_MP_STATE");
	if (ioctl(vcpu, KVM_GET_MSRS, &s->msrs) != (int)s->msrs.hdr.nmsrs)
		die("KVM_GET_MSRS");
}

/* Before the pause: keep the MSRs of live_msrs this vCPU can read (KVM_GET_MSRS stops at the
 * first one it cannot), so that the save in the blackout is one call. */
static void choose_msrs(int vcpu, struct live_msrs *out)
{
	struct live_msrs one;

	memset(out, 0, sizeof(*out));
	for (int i = 0; i < N_LIVE_MSRS; i++) {
		memset(&one, 0, sizeof(one));
		one.hdr.nmsrs = 1;
		one.e[0].index = live_msrs[i];
		if (ioctl(vcpu, KVM_GET_MSRS, &one) == 1)
			out->e[out->hdr.nmsrs++].index = live_msrs[i];
	}
}

/*
 * A vCPU of the retrieved VM with the saved state: the guest must see the CPUID it had, so the
 * saved one is set (not KVM_GET_SUPPORTED_CPUID, which would also cost two more calls here).
 */
static struct vcpu restored_vcpu(int kvm, int vm, struct live_state *s)
{
	struct vcpu v;

	v.fd = ioctl(vm, KVM_CREATE_VCPU, 0UL);
	if (v.fd < 0)
		die("KVM_CREATE_VCPU");
	map_run(kvm, &v);
	if (s->cpuid.hdr.nent > MAX_CPUID)
		fail("live stage 2: %u CPUID entries saved, at most %d", s->cpuid.hdr.nent, MAX_CPUID);
	xioctl(v.fd, KVM_SET_CPUID2, &s->cpuid, "KVM_SET_CPUID2");
	return v;
}

/* Load a saved state into a new vCPU (CPUID already set); TSC first, with the MSRs. */
static void restore_vcpu(int vcpu, struct live_state *s)
{
	xioctl(vcpu, KVM_SET_SREGS, &s->sregs, "KVM_SET_SREGS");
	if (s->msrs.hdr.nmsrs > N_LIVE_MSRS)
		fail("live stage 2: %u MSRs saved, at most %d", s->msrs.hdr.nmsrs, N_LIVE_MSRS);
	if (ioctl(vcpu, KVM_SET_MSRS, &s->msrs) != (int)s->msrs.hdr.nmsrs)
		die("KVM_SET_MSRS");
	xioctl(vcpu, KVM_SET_REGS, &s->regs, "KVM_SET_REGS");
	xioctl(vcpu, KVM_SET_FPU, &s->fpu, "KVM_SET_FPU");
	if (s->has_xsave)
		xioctl(vcpu, KVM_SET_XSAVE, &s->xsave, "KVM_SET_XSAVE");
	if (s->has_xcrs)
		xioctl(vcpu, KVM_SET_XCRS, &s->xcrs, "KVM_SET_XCRS");
	xioctl(vcpu, KVM_SET_DEBUGREGS, &s->debugregs, "KVM_SET_DEBUGREGS");
	xioctl(vcpu, KVM_SET_VCPU_EVENTS, &s->events, "KVM_SET_VCPU_EVENTS");
	xioctl(vcpu, KVM_SET_MP_STATE, &s->mp, "KVM_SET_MP_STATE");
}

static int preserve(int s, int fd, uint64_t token, const char *what)
{
	int r = lu_preserve_fd(s, fd, token);

	if (r < 0) {
		errno = -r;
		die(what);
	}
	return r;
}

/* Stage 1 of --live. Returns only on failure (the update was refused). */
int live_stage1(const struct opts *o, int dev)
{
	static struct live_state st; /* 8 KiB: not on the stack */
	int kvm = open_kvm(), s, stfd, r;
	struct machine m;
	struct live_run lr;
	struct sigaction sa;
	uint64_t t0, t_run;

	check_caps(kvm);
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_kick;
	sigemptyset(&sa.sa_mask);
	if (sigaction(SIGUSR1, &sa, NULL) < 0) /* no SA_RESTART */
		die("sigaction SIGUSR1");

	m.vm = create_vm(kvm);
	m.gmem = create_gmem(m.vm, GMEM_SIZE, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED);
	if (m.gmem < 0) {
		errno = -m.gmem;
		die("KVM_CREATE_GUEST_MEMFD");
	}
	m.gmem_map = map_gmem(m.gmem);
	bind_gmem(m.vm, m.gmem, m.gmem_map);
	m.low = alloc_low(LOW_MEMFD);
	load_image(o->image_write, m.low.mem, MODE_WRITE);
	{
		uint64_t mode = MODE_RUN_UPDATE;

		memcpy(m.low.mem + MAILBOX_GPA + MB_MODE, &mode, sizeof(mode));
	}
	set_region(m.vm, SLOT_LOW, 0, 0, LOW_MEM_SIZE, m.low.mem, -1, 0);
	m.v = create_vcpu(kvm, m.vm, 0);
	/* Before the vCPU runs: a vCPU ioctl from another thread waits for KVM_RUN to return (on
	 * Linux too, for the vCPU mutex), and this guest re-enters at once. */
	choose_msrs(m.v.fd, &st.msrs);
	st.cpuid.hdr.nent = MAX_CPUID;
	xioctl(m.v.fd, KVM_GET_CPUID2, &st.cpuid, "KVM_GET_CPUID2");

	memset(&lr, 0, sizeof(lr));
	lr.m = &m;
	t_run = now_us();
	if (pthread_create(&lr.thread, NULL, live_vcpu, &lr))
		die("pthread_create");
	wait_until(&lr, written_and_ticking, "WRITTEN and three clock reads");
	st.write_ms = (now_us() - t_run) / 1000;
	check_gmem(m.gmem_map, 0, "live stage 1");

	/* Preserve while the guest runs; the vCPU-state memfd is sized and preserved now. */
	t0 = now_us();
	s = lu_create_session(dev, SESSION);
	if (s < 0) {
		errno = -s;
		die("create session " SESSION);
	}
	preserve_vm_and_gmem(s, o->order, m.vm, m.gmem);
	preserve(s, m.low.memfd, LOW_TOKEN, "preserve low memory");
	stfd = memfd_create("rfc-vmm-vcpu", MFD_CLOEXEC);
	if (stfd < 0)
		die("memfd_create vCPU state");
	if (ftruncate(stfd, STATE_BYTES) < 0)
		die("ftruncate vCPU state");
	preserve(s, stfd, VCPU_TOKEN, "preserve vCPU state");
	write_state(dev, o);
	st.preserve_us = now_us() - t0;

	/* Pause: from here to the guest's next clock read in stage 2 is its blackout. */
	st.t_pause = now_us();
	__atomic_store_n(&lr.pause, 1, __ATOMIC_RELEASE);
	m.v.run->immediate_exit = 1;
	if (pthread_kill(lr.thread, SIGUSR1))
		die("pthread_kill");
	if (pthread_join(lr.thread, NULL))
		die("pthread_join");
	if (lr.err) {
		errno = lr.err;
		die("live: KVM_RUN before the pause");
	}
	st.t_paused = now_us();
	st.magic = LIVE_MAGIC;
	save_vcpu(kvm, m.v.fd, &st);
	st.t_saved = now_us();
	r = lu_pwrite_all(stfd, &st, sizeof(st), 0);
	if (r < 0) {
		errno = -r;
		die("write vCPU state");
	}
	r = reboot(LINUX_REBOOT_CMD_KEXEC);
	fail("live stage 1: reboot(LINUX_REBOOT_CMD_KEXEC) returned %d: %s", r, strerror(errno));
}

/* Stage 2 of --live (the state session is retrieved, its memfd read by the caller). */
int live_stage2(const struct opts *o, int dev, int state_s, uint64_t t_main)
{
	static struct live_state st;
	struct machine m;
	int kvm, s, stfd, lowfd, r;
	uint64_t t_retrieved, t_restored, t_done, status, gap, loops;
	struct stage_state ss;
	void *p;

	r = retrieve(state_s, STATE_TOKEN, "retrieve the state memfd");
	if (lu_pread_all(r, &ss, sizeof(ss), 0) < 0)
		die("read state");
	close(r);
	if (ss.magic != STATE_MAGIC || ss.next_stage != 2 || !ss.live ||
	    ss.order != (uint32_t)o->order)
		fail("live stage 2: stage 1 ran otherwise (magic %#" PRIx64 ", stage %u, live %u, "
		     "order %u)",
		     ss.magic, ss.next_stage, ss.live, ss.order);
	s = lu_retrieve_session(dev, SESSION);
	if (s < 0) {
		errno = -s;
		die("retrieve session " SESSION);
	}
	if (o->order == VM_FIRST) {
		m.vm = retrieve(s, VM_TOKEN, "retrieve the VM");
		m.gmem = retrieve(s, GMEM_TOKEN, "retrieve the guest_memfd");
	} else {
		m.gmem = retrieve(s, GMEM_TOKEN, "retrieve the guest_memfd");
		m.vm = retrieve(s, VM_TOKEN, "retrieve the VM");
	}
	lowfd = retrieve(s, LOW_TOKEN, "retrieve low memory");
	stfd = retrieve(s, VCPU_TOKEN, "retrieve the vCPU state");
	r = lu_pread_all(stfd, &st, sizeof(st), 0);
	if (r < 0) {
		errno = -r;
		die("read vCPU state");
	}
	if (st.magic != LIVE_MAGIC)
		fail("live stage 2: vCPU state magic %#" PRIx64, st.magic);
	t_retrieved = now_us();

	p = mmap(NULL, LOW_MEM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, lowfd, 0);
	if (p == MAP_FAILED)
		die("mmap low memory");
	m.low.mem = p;
	m.low.memfd = lowfd;
	m.gmem_map = map_gmem(m.gmem);
	set_region(m.vm, SLOT_LOW, 0, 0, LOW_MEM_SIZE, m.low.mem, -1, 0);
	bind_gmem(m.vm, m.gmem, m.gmem_map);
	kvm = open_kvm();
	m.v = restored_vcpu(kvm, m.vm, &st);
	restore_vcpu(m.v.fd, &st);
	t_restored = now_us();

	/* The guest reads its clock (the end of its blackout), proceeds, verifies. */
	status = run_guest(&m.v, m.low.mem, "live: after the update");
	t_done = now_us();
	gap = get_u64(m.low.mem + MAILBOX_GPA + MB_MAX_GAP_US);
	loops = get_u64(m.low.mem + MAILBOX_GPA + MB_LOOPS);
	if (status != STATUS_VERIFY_OK)
		fail("live stage 2: guest status %" PRIu64 " (first bad byte %" PRIu64
		     "), want %d (verify ok)",
		     status, get_u64(m.low.mem + MAILBOX_GPA + MB_FIRST_BAD), STATUS_VERIFY_OK);
	check_gmem(m.gmem_map, 1, "live stage 2");
	r = lu_finish(s);
	if (r < 0) {
		errno = -r;
		die("FINISH " SESSION);
	}
	r = lu_finish(state_s);
	if (r < 0) {
		errno = -r;
		die("FINISH " STATE_SESSION);
	}
	printf("rfc_vmm: live {\"blackout_us\":%" PRIu64 ",\"loops\":%" PRIu64
	       ",\"write_ms\":%" PRIu64 ",\"preserve_us\":%" PRIu64 ",\"pause_us\":%" PRIu64
	       ",\"save_us\":%" PRIu64 ",\"saved_to_main_us\":%" PRIu64
	       ",\"retrieve_us\":%" PRIu64 ",\"restore_us\":%" PRIu64
	       ",\"pause_to_resume_us\":%" PRIu64 ",\"verify_us\":%" PRIu64
	       ",\"t_pause_us\":%" PRIu64 ",\"t_saved_us\":%" PRIu64 ",\"t_main_us\":%" PRIu64
	       ",\"t_restored_us\":%" PRIu64 "}\n",
	       gap, loops, st.write_ms, st.preserve_us, st.t_paused - st.t_pause,
	       st.t_saved - st.t_paused, t_main - st.t_saved, t_retrieved - t_main,
	       t_restored - t_retrieved, t_restored - st.t_pause, t_done - t_restored,
	       st.t_pause, st.t_saved, t_main, t_restored);
	destroy_vcpu(&m.v);
	munmap(m.gmem_map, GMEM_SIZE);
	munmap(m.low.mem, LOW_MEM_SIZE);
	close(lowfd);
	close(stfd);
	close(m.gmem);
	close(m.vm);
	close(s);
	close(state_s);
	close(kvm);
	printf("rfc_vmm: live ok\n");
	return 0;
}
