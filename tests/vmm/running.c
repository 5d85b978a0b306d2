/* rfc_vmm: guests that keep running: --spin, --bench-exits, --slot-churn, --vmm-child. */
#include "rfc_vmm.h"
/* ---- Guests that keep running: killed VMMs, EINTR ---- */

/*
 * Where "tight" parks the guest: the instruction after RUN_UPDATE mode's WRITTEN report
 * (`mov $PORT_CLOCK,%edx`, ba 84 0e 00 00, at code offset 0x70 of src/vmm/guest/program.rs).
 * Its first two bytes become `jmp .` (eb fe); putting them back lets the guest go on.
 */
#define PARK_OFF 0x70
static const unsigned char park_jmp[2] = { 0xeb, 0xfe };
static const unsigned char park_orig[2] = { 0xba, 0x84 };


const char *spin_name(enum spin k)
{
	return k == SPIN_TIGHT ? "tight" : "exits";
}

/*
 * A VM with the guest_memfd at 4 GiB and low memory at 0, the write image switched to
 * RUN_UPDATE mode, run until the guest reports WRITTEN: it then stands at its clock loop.
 */
void machine_written(int kvm, const struct opts *o, struct machine *m)
{
	uint64_t status, mode = MODE_RUN_UPDATE;

	m->vm = create_vm(kvm);
	m->gmem = create_gmem(m->vm, GMEM_SIZE,
			      GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED);
	if (m->gmem < 0) {
		errno = -m->gmem;
		die("KVM_CREATE_GUEST_MEMFD");
	}
	m->gmem_map = map_gmem(m->gmem);
	bind_gmem(m->vm, m->gmem, m->gmem_map);
	m->low = alloc_low(o->low);
	load_image(o->image_write, m->low.mem, MODE_WRITE);
	memcpy(m->low.mem + MAILBOX_GPA + MB_MODE, &mode, sizeof(mode));
	set_region(m->vm, SLOT_LOW, 0, 0, LOW_MEM_SIZE, m->low.mem, -1, 0);
	m->v = create_vcpu(kvm, m->vm, 0);
	status = run_guest(&m->v, m->low.mem, "write (run-update mode)");
	if (status != STATUS_WRITTEN)
		fail("guest status %" PRIu64 ", want %d (written)", status, STATUS_WRITTEN);
}

void park(unsigned char *low)
{
	unsigned char *c = low + CODE_GPA + PARK_OFF;

	if (memcmp(c, park_orig, sizeof(park_orig)))
		fail("guest code at %#lx is %02x %02x, not mov $PORT_CLOCK,%%edx", CODE_GPA + PARK_OFF,
		     c[0], c[1]);
	memcpy(c, park_jmp, sizeof(park_jmp));
}

void unpark(unsigned char *low)
{
	memcpy(low + CODE_GPA + PARK_OFF, park_orig, sizeof(park_orig));
}

/* Run the guest forever: its clock loop (proceed is always 0), or parked on `jmp .`. */
void spin_forever(struct vcpu *v, enum spin kind)
{
	struct kvm_run *run = v->run;

	for (;;) {
		uint32_t val;

		if (ioctl(v->fd, KVM_RUN, 0) < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			die("KVM_RUN (spinning)");
		}
		if (kind == SPIN_TIGHT)
			fail("the parked guest exited: reason %u", run->exit_reason);
		if (run->exit_reason != KVM_EXIT_IO || run->io.direction != KVM_EXIT_IO_IN ||
		    run->io.size != 4 || run->io.count != 1 ||
		    (run->io.port != PORT_CLOCK && run->io.port != PORT_PROCEED))
			fail("spinning guest: exit reason %u (port %#x)", run->exit_reason,
			     run->io.port);
		val = run->io.port == PORT_CLOCK ? (uint32_t)now_us() : 0;
		memcpy((unsigned char *)run + run->io.data_offset, &val, 4);
	}
}

/* --spin: see the top of the file. Never returns; the test kills the process. */
int run_spin(const struct opts *o, int dev)
{
	int kvm = open_kvm();
	struct machine m;

	check_caps(kvm);
	machine_written(kvm, o, &m);
	if (dev >= 0) {
		int s = lu_create_session(dev, SESSION);

		if (s < 0) {
			errno = -s;
			die("create session " SESSION);
		}
		preserve_vm_and_gmem(s, o->order, m.vm, m.gmem);
	}
	if (o->spin == SPIN_TIGHT)
		park(m.low.mem);
	printf("rfc_vmm: spinning: pid %d, %s%s\n", (int)getpid(), spin_name(o->spin),
	       dev >= 0 ? ", VM and guest_memfd preserved" : "");
	fflush(stdout);
	spin_forever(&m.v, o->spin);
}


/*
 * --bench-exits N: the guest at its clock loop (every iteration two port-I/O exits, IN from
 * the clock and the proceed ports); time each KVM_RUN call from entry to its return with the
 * exit, answer it, N times. Prints one line: rfc_vmm: exits {"n":..,"p50_ns":..,...}.
 */
int run_bench_exits(const struct opts *o)
{
	int kvm = open_kvm();
	struct machine m;
	uint64_t *t = calloc((size_t)o->bench_exits, sizeof(*t));
	struct kvm_run *run;
	long n = o->bench_exits;

	if (!t)
		die("calloc");
	check_caps(kvm);
	machine_written(kvm, o, &m);
	run = m.v.run;
	for (long i = 0; i < n;) {
		struct timespec a, b;
		uint32_t val;

		clock_gettime(CLOCK_MONOTONIC, &a);
		if (ioctl(m.v.fd, KVM_RUN, 0) < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			die("KVM_RUN (bench)");
		}
		clock_gettime(CLOCK_MONOTONIC, &b);
		if (run->exit_reason != KVM_EXIT_IO || run->io.direction != KVM_EXIT_IO_IN ||
		    (run->io.port != PORT_CLOCK && run->io.port != PORT_PROCEED))
			fail("bench: exit reason %u (port %#x)", run->exit_reason, run->io.port);
		val = run->io.port == PORT_CLOCK ? (uint32_t)now_us() : 0;
		memcpy((unsigned char *)run + run->io.data_offset, &val, 4);
		t[i++] = (uint64_t)(b.tv_sec - a.tv_sec) * 1000000000ull + (uint64_t)b.tv_nsec -
			 (uint64_t)a.tv_nsec;
	}
	qsort(t, (size_t)n, sizeof(*t), cmp_u64);
	printf("rfc_vmm: exits {\"n\":%ld,\"p50_ns\":%" PRIu64 ",\"p90_ns\":%" PRIu64
	       ",\"p99_ns\":%" PRIu64 ",\"max_ns\":%" PRIu64 "}\n",
	       n, t[n / 2], t[n * 9 / 10], t[n * 99 / 100], t[n - 1]);
	free(t);
	return 0;
}

/*
 * --slot-churn: the guest writes its 5 MiB (1,280 guest_memfd pages, each a fault the host
 * serves) on a thread of its own, while the main thread adds and deletes an unrelated memslot
 * in a loop. Each change waits for the vCPU to leave KVM_RUN; the host must not hang (its fault
 * service nudges the vCPU out of a fault it cannot serve while the host is busy). Prints the
 * number of changes and checks the data.
 */
struct churn {
	struct machine *m;
	volatile int done;
	uint64_t status;
};

static void *churn_vcpu(void *p)
{
	struct churn *c = p;

	c->status = run_guest(&c->m->v, c->m->low.mem, "write (slot churn)");
	__atomic_store_n(&c->done, 1, __ATOMIC_RELEASE);
	return NULL;
}

int run_slot_churn(const struct opts *o)
{
	int kvm = open_kvm();
	struct machine m;
	struct churn c = { &m, 0, 0 };
	struct low_mem extra;
	pthread_t t;
	long changes = 0;

	check_caps(kvm);
	m.vm = create_vm(kvm);
	m.gmem = create_gmem(m.vm, GMEM_SIZE, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED);
	if (m.gmem < 0) {
		errno = -m.gmem;
		die("KVM_CREATE_GUEST_MEMFD");
	}
	m.gmem_map = map_gmem(m.gmem);
	bind_gmem(m.vm, m.gmem, m.gmem_map);
	m.low = alloc_low(o->low);
	load_image(o->image_write, m.low.mem, MODE_WRITE);
	set_region(m.vm, SLOT_LOW, 0, 0, LOW_MEM_SIZE, m.low.mem, -1, 0);
	extra = alloc_low(LOW_MEMFD);
	m.v = create_vcpu(kvm, m.vm, 0);
	if (pthread_create(&t, NULL, churn_vcpu, &c))
		die("pthread_create");
	while (!__atomic_load_n(&c.done, __ATOMIC_ACQUIRE)) {
		set_region(m.vm, 5, 0, 1ull << 30, LOW_MEM_SIZE, extra.mem, -1, 0);
		set_region(m.vm, 5, 0, 1ull << 30, 0, extra.mem, -1, 0);
		changes += 2;
	}
	pthread_join(t, NULL);
	if (c.status != STATUS_WRITTEN)
		fail("guest status %" PRIu64 ", want %d (written)", c.status, STATUS_WRITTEN);
	check_gmem(m.gmem_map, 0, "slot churn");
	printf("rfc_vmm: slot churn ok: %ld memslot changes while the guest wrote\n", changes);
	return 0;
}

/* --eintr */
/* --vmm-child: see the top of the file. Returns only on failure (reboot refused). */
int stage1_vmm_child(const struct opts *o, int dev)
{
	int s, st, r;
	pid_t pid;

	s = lu_create_session(dev, SESSION);
	if (s < 0) {
		errno = -s;
		die("create session " SESSION);
	}
	write_state(dev, o);
	fflush(stdout);
	pid = fork();
	if (pid < 0)
		die("fork the VMM child");
	if (pid == 0) {
		int kvm = open_kvm();
		struct machine m;

		check_caps(kvm);
		machine_written(kvm, o, &m);
		check_gmem(m.gmem_map, 0, "vmm child");
		preserve_vm_and_gmem(s, o->order, m.vm, m.gmem);
		if (o->child == SPIN_TIGHT)
			park(m.low.mem);
		printf("rfc_vmm: vmm child running: pid %d, %s, VM and guest_memfd preserved\n",
		       (int)getpid(), spin_name(o->child));
		fflush(stdout);
		spin_forever(&m.v, o->child);
	}
	if (waitpid(pid, &st, 0) != pid)
		die("waitpid the VMM child");
	if (!WIFSIGNALED(st))
		fail("the VMM child ended with wait status %#x, not by a signal", st);
	printf("rfc_vmm: vmm child killed by signal %d; updating with the sessions it left\n",
	       WTERMSIG(st));
	fflush(stdout);
	r = reboot(LINUX_REBOOT_CMD_KEXEC);
	fail("stage 1: reboot(LINUX_REBOOT_CMD_KEXEC) returned %d: %s", r, strerror(errno));
}
