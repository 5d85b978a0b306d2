/* rfc_vmm: KVM, LUO and guest helpers shared by every mode. */
#include "rfc_vmm.h"
int failures;

void die(const char *what)
{
	fprintf(stderr, "rfc_vmm: %s: %s\n", what, strerror(errno));
	exit(1);
}

void fail(const char *fmt, ...)
{
	va_list ap;

	fputs("rfc_vmm: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(1);
}

uint64_t now_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000 + (uint64_t)ts.tv_nsec / 1000;
}

uint64_t get_u64(const unsigned char *p)
{
	uint64_t v;

	memcpy(&v, p, 8);
	return v;
}

unsigned char pattern_byte(uint64_t i)
{
	return (unsigned char)((i ^ 0x5a) & 0xff);
}

/* TAP-style result line for a negative case. */
static int case_no;

void report(int ok, const char *fmt, ...)
{
	va_list ap;

	printf("%sok %d - ", ok ? "" : "not ", ++case_no);
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	putchar('\n');
	fflush(stdout);
	if (!ok)
		failures++;
}

void skip(const char *what)
{
	printf("ok %d - %s # SKIP (--native or --skip-negative)\n", ++case_no, what);
}

/* ---- KVM ---- */

int open_kvm(void)
{
	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	int v;

	if (kvm < 0)
		die("open /dev/kvm");
	v = ioctl(kvm, KVM_GET_API_VERSION, 0);
	if (v != 12)
		fail("KVM_GET_API_VERSION = %d, want 12", v);
	return kvm;
}

void check_caps(int kvm)
{
	int flags;

	if (ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_USER_MEMORY2) <= 0)
		fail("KVM_CAP_USER_MEMORY2 missing");
	if (ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_GUEST_MEMFD) <= 0)
		fail("KVM_CAP_GUEST_MEMFD missing");
	flags = ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_GUEST_MEMFD_FLAGS);
	if (flags < 0)
		die("KVM_CHECK_EXTENSION(KVM_CAP_GUEST_MEMFD_FLAGS)");
	if ((flags & (GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED)) !=
	    (GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED))
		fail("KVM_CAP_GUEST_MEMFD_FLAGS = %#x: MMAP|INIT_SHARED not offered", flags);
}

int create_vm(int kvm)
{
	int vm = ioctl(kvm, KVM_CREATE_VM, 0UL);

	if (vm < 0)
		die("KVM_CREATE_VM");
	return vm;
}

/* KVM_CREATE_GUEST_MEMFD: the new fd, or -errno. */
int create_gmem(int vm, uint64_t size, uint64_t flags)
{
	struct kvm_create_guest_memfd g;
	int fd;

	memset(&g, 0, sizeof(g));
	g.size = size;
	g.flags = flags;
	fd = ioctl(vm, KVM_CREATE_GUEST_MEMFD, &g);
	return fd < 0 ? -errno : fd;
}

void set_region(int vm, uint32_t slot, uint32_t flags, uint64_t gpa, uint64_t size,
		       void *uaddr, int gmem, uint64_t gmem_off)
{
	struct kvm_userspace_memory_region2 r;

	memset(&r, 0, sizeof(r));
	r.slot = slot;
	r.flags = flags;
	r.guest_phys_addr = gpa;
	r.memory_size = size;
	r.userspace_addr = (uint64_t)(uintptr_t)uaddr;
	r.guest_memfd_offset = gmem_off;
	r.guest_memfd = gmem < 0 ? 0 : (uint32_t)gmem;
	if (ioctl(vm, KVM_SET_USER_MEMORY_REGION2, &r) < 0) {
		fprintf(stderr, "rfc_vmm: slot %u gpa %#" PRIx64 " size %#" PRIx64 " flags %#x\n",
			slot, gpa, size, flags);
		die("KVM_SET_USER_MEMORY_REGION2");
	}
}

unsigned char *map_gmem(int gmem)
{
	void *p = mmap(NULL, GMEM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, gmem, 0);

	if (p == MAP_FAILED)
		die("mmap guest_memfd");
	return p;
}

/* Slot 1: the guest_memfd at 4 GiB, userspace_addr its own mapping (MMAP guest_memfd). */
void bind_gmem(int vm, int gmem, unsigned char *map)
{
	set_region(vm, SLOT_GMEM, KVM_MEM_GUEST_MEMFD, GMEM_GPA, GMEM_SIZE, map, gmem, 0);
}

void unbind_slot(int vm, uint32_t slot, uint32_t flags, uint64_t gpa, int gmem)
{
	set_region(vm, slot, flags, gpa, 0, NULL, gmem, 0);
}

struct low_mem alloc_low(enum low_kind kind)
{
	struct low_mem l = { NULL, -1 };

	if (kind == LOW_MEMFD) {
		void *p;

		l.memfd = memfd_create("rfc-vmm-low", MFD_CLOEXEC);
		if (l.memfd < 0)
			die("memfd_create low memory");
		if (ftruncate(l.memfd, LOW_MEM_SIZE) < 0)
			die("ftruncate low memory");
		p = mmap(NULL, LOW_MEM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, l.memfd, 0);
		if (p == MAP_FAILED)
			die("mmap low memory");
		l.mem = p;
	} else {
		void *p = NULL;
		int r = posix_memalign(&p, LOW_MEM_SIZE, LOW_MEM_SIZE);

		if (r) {
			errno = r;
			die("posix_memalign low memory");
		}
		memset(p, 0, LOW_MEM_SIZE);
		l.mem = p;
	}
	return l;
}

void free_low(struct low_mem *l)
{
	if (l->memfd >= 0) {
		munmap(l->mem, LOW_MEM_SIZE);
		close(l->memfd);
	} else {
		free(l->mem);
	}
	l->mem = NULL;
	l->memfd = -1;
}

/*
 * Load an image from `handover guest-image` and check its mailbox against the scenario. The
 * file is read into a buffer and copied: under `handover run` the untouched pages of a host
 * memfd mapping are PROT_NONE until a user-space access faults them in, so read(2) straight
 * into low memory would fail with EFAULT.
 */
void load_image(const char *path, unsigned char *low, uint64_t want_mode)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	struct stat st;
	const unsigned char *mb = low + MAILBOX_GPA;
	unsigned char *buf = malloc(LOW_IMAGE_SIZE);
	int r;

	if (!buf)
		die("malloc image buffer");

	if (fd < 0)
		die(path);
	if (fstat(fd, &st) < 0)
		die("fstat image");
	if ((uint64_t)st.st_size != LOW_IMAGE_SIZE)
		fail("%s: %lld bytes, want %lu (LOW_IMAGE_SIZE)", path, (long long)st.st_size,
		     LOW_IMAGE_SIZE);
	r = lu_pread_all(fd, buf, LOW_IMAGE_SIZE, 0);
	if (r < 0) {
		errno = -r;
		die("read image");
	}
	close(fd);
	memcpy(low, buf, LOW_IMAGE_SIZE);
	free(buf);
	if (get_u64(mb + MB_MAGIC) != GUEST_MAGIC)
		fail("%s: no guest magic in the mailbox", path);
	if (get_u64(mb + MB_DATA_GPA) != GMEM_GPA || get_u64(mb + MB_DATA_LEN) != DATA_LEN)
		fail("%s: data %#" PRIx64 "+%#" PRIx64 ", want %#llx+%#llx", path,
		     get_u64(mb + MB_DATA_GPA), get_u64(mb + MB_DATA_LEN), GMEM_GPA, DATA_LEN);
	if (get_u64(mb + MB_MODE) != want_mode)
		fail("%s: mode %" PRIu64 ", want %" PRIu64, path, get_u64(mb + MB_MODE), want_mode);
}

static void user_segment(struct kvm_segment *s, uint16_t sel, uint8_t type, uint8_t l, uint8_t db)
{
	memset(s, 0, sizeof(*s));
	s->base = 0;
	s->limit = 0xffffffff;
	s->selector = sel;
	s->type = type;
	s->present = 1;
	s->dpl = 3;
	s->db = db;
	s->s = 1;
	s->l = l;
	s->g = 1;
}

/* initial_sregs() of src/vmm/guest/cpu.rs: 64-bit CPL3, paging, the TSS with its I/O bitmap. */
static void init_sregs(struct kvm_sregs *s)
{
	user_segment(&s->cs, USER_CS, 0xb, 1, 0);
	user_segment(&s->ds, USER_DS, 0x3, 0, 1);
	s->es = s->fs = s->gs = s->ss = s->ds;
	memset(&s->tr, 0, sizeof(s->tr));
	s->tr.base = TSS_GPA;
	s->tr.limit = TSS_LIMIT;
	s->tr.selector = TSS_SEL;
	s->tr.type = 0xb; /* busy 64-bit TSS */
	s->tr.present = 1;
	memset(&s->ldt, 0, sizeof(s->ldt));
	s->ldt.type = 0x2;
	s->ldt.unusable = 1;
	memset(&s->gdt, 0, sizeof(s->gdt));
	s->gdt.base = GDT_GPA;
	s->gdt.limit = GDT_LIMIT;
	memset(&s->idt, 0, sizeof(s->idt)); /* no IDT: an exception is a triple fault */
	s->cr0 = INITIAL_CR0;
	s->cr2 = 0;
	s->cr3 = PML4_GPA;
	s->cr4 = INITIAL_CR4;
	s->cr8 = 0;
	s->efer = INITIAL_EFER;
	memset(s->interrupt_bitmap, 0, sizeof(s->interrupt_bitmap));
}

static void init_regs(struct kvm_regs *r)
{
	memset(r, 0, sizeof(*r));
	r->rip = CODE_GPA;
	r->rsp = STACK_TOP;
	r->rflags = INITIAL_RFLAGS;
}

static void print_segment(const char *name, const struct kvm_segment *s)
{
	printf("%s selector=0x%x base=0x%llx limit=0x%x type=0x%x present=%u dpl=%u db=%u s=%u l=%u "
	       "g=%u avl=%u unusable=%u\n",
	       name, s->selector, (unsigned long long)s->base, s->limit, s->type, s->present, s->dpl,
	       s->db, s->s, s->l, s->g, s->avl, s->unusable);
}

/* The same lines as `handover guest-image --print-sregs`, for what init_sregs/init_regs set. */
void print_vcpu_state(void)
{
	struct kvm_sregs s;
	struct kvm_regs r;

	memset(&s, 0, sizeof(s));
	init_sregs(&s);
	init_regs(&r);
	print_segment("cs", &s.cs);
	print_segment("ds", &s.ds);
	print_segment("es", &s.es);
	print_segment("fs", &s.fs);
	print_segment("gs", &s.gs);
	print_segment("ss", &s.ss);
	print_segment("tr", &s.tr);
	print_segment("ldt", &s.ldt);
	printf("gdt base=0x%llx limit=0x%x\n", (unsigned long long)s.gdt.base, s.gdt.limit);
	printf("idt base=0x%llx limit=0x%x\n", (unsigned long long)s.idt.base, s.idt.limit);
	printf("cr0=0x%llx cr2=0x%llx cr3=0x%llx cr4=0x%llx cr8=0x%llx efer=0x%llx\n",
	       (unsigned long long)s.cr0, (unsigned long long)s.cr2, (unsigned long long)s.cr3,
	       (unsigned long long)s.cr4, (unsigned long long)s.cr8, (unsigned long long)s.efer);
	printf("rip=0x%llx rsp=0x%llx rflags=0x%llx\n", (unsigned long long)r.rip,
	       (unsigned long long)r.rsp, (unsigned long long)r.rflags);
}

/* KVM_GET_SUPPORTED_CPUID (growing the buffer on E2BIG) → KVM_SET_CPUID2. */
void set_cpuid(int kvm, int vcpu)
{
	for (unsigned int nent = 64; nent <= 1024; nent *= 2) {
		size_t len = sizeof(struct kvm_cpuid2) + nent * sizeof(struct kvm_cpuid_entry2);
		struct kvm_cpuid2 *c = calloc(1, len);

		if (!c)
			die("calloc cpuid");
		c->nent = nent;
		if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, c) < 0) {
			free(c);
			if (errno == E2BIG)
				continue;
			die("KVM_GET_SUPPORTED_CPUID");
		}
		if (ioctl(vcpu, KVM_SET_CPUID2, c) < 0)
			die("KVM_SET_CPUID2");
		free(c);
		return;
	}
	fail("KVM_GET_SUPPORTED_CPUID: more than 1024 entries");
}

/* Map the vCPU's kvm_run (all KVM_GET_VCPU_MMAP_SIZE bytes). */
void map_run(int kvm, struct vcpu *v)
{
	int size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	void *p;

	if (size < (int)sizeof(struct kvm_run))
		die("KVM_GET_VCPU_MMAP_SIZE");
	v->run_size = (size_t)size;
	p = mmap(NULL, v->run_size, PROT_READ | PROT_WRITE, MAP_SHARED, v->fd, 0);
	if (p == MAP_FAILED)
		die("mmap kvm_run");
	v->run = p;
}

struct vcpu create_vcpu(int kvm, int vm, unsigned long id)
{
	struct vcpu v;
	struct kvm_sregs s;
	struct kvm_regs r;

	v.fd = ioctl(vm, KVM_CREATE_VCPU, id);
	if (v.fd < 0)
		die("KVM_CREATE_VCPU");
	map_run(kvm, &v);
	printf("rfc_vmm: vCPU %lu: kvm_run mapping %zu bytes\n", id, v.run_size);
	set_cpuid(kvm, v.fd);
	/* Start from the vCPU's own state (apic_base and the like), as initial_sregs does. */
	if (ioctl(v.fd, KVM_GET_SREGS, &s) < 0)
		die("KVM_GET_SREGS");
	init_sregs(&s);
	if (ioctl(v.fd, KVM_SET_SREGS, &s) < 0)
		die("KVM_SET_SREGS");
	init_regs(&r);
	if (ioctl(v.fd, KVM_SET_REGS, &r) < 0)
		die("KVM_SET_REGS");
	return v;
}

void destroy_vcpu(struct vcpu *v)
{
	munmap(v->run, v->run_size);
	close(v->fd);
	v->fd = -1;
}

void dump_regs(int vcpu)
{
	struct kvm_regs r;

	if (ioctl(vcpu, KVM_GET_REGS, &r) < 0) {
		perror("rfc_vmm: KVM_GET_REGS");
		return;
	}
	fprintf(stderr,
		"rfc_vmm: rip=%#llx rsp=%#llx rflags=%#llx rax=%#llx rcx=%#llx rdx=%#llx rdi=%#llx "
		"rsi=%#llx\n",
		r.rip, r.rsp, r.rflags, r.rax, r.rcx, r.rdx, r.rdi, r.rsi);
}

/*
 * Run the guest until it reports a final status (an OUT to PORT_STATUS); return the status.
 * The guest then repeats its OUT forever, so not calling KVM_RUN again leaves the vCPU stopped.
 */
uint64_t run_guest(struct vcpu *v, const unsigned char *low, const char *what)
{
	struct kvm_run *run = v->run;
	uint64_t t0 = now_us();

	for (unsigned long exits = 1; exits <= 100000; exits++) {
		if (ioctl(v->fd, KVM_RUN, 0) < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			fprintf(stderr, "rfc_vmm: %s: KVM_RUN failed, exit_reason %u\n", what,
				run->exit_reason);
			dump_regs(v->fd);
			die("KVM_RUN");
		}
		switch (run->exit_reason) {
		case KVM_EXIT_IO: {
			unsigned char *data = (unsigned char *)run + run->io.data_offset;
			uint32_t val = 0;

			if (run->io.size != 4 || run->io.count != 1)
				fail("%s: I/O of size %u count %u on port %#x", what, run->io.size,
				     run->io.count, run->io.port);
			if (run->io.direction == KVM_EXIT_IO_OUT && run->io.port == PORT_STATUS) {
				uint64_t mb_status;

				memcpy(&val, data, 4);
				mb_status = get_u64(low + MAILBOX_GPA + MB_STATUS);
				if (mb_status != val)
					fail("%s: OUT status %u but the mailbox says %" PRIu64, what,
					     val, mb_status);
				printf("rfc_vmm: %s: status %u at exit %lu, %.2f ms\n", what, val,
				       exits, (now_us() - t0) / 1000.0);
				return val;
			}
			if (run->io.direction == KVM_EXIT_IO_IN && run->io.port == PORT_CLOCK) {
				val = (uint32_t)now_us();
				memcpy(data, &val, 4);
				continue;
			}
			if (run->io.direction == KVM_EXIT_IO_IN && run->io.port == PORT_PROCEED) {
				val = 1;
				memcpy(data, &val, 4);
				continue;
			}
			fail("%s: unexpected I/O: dir %u port %#x", what, run->io.direction,
			     run->io.port);
		}
		case KVM_EXIT_INTR:
			continue;
		case KVM_EXIT_MMIO:
			fail("%s: MMIO at %#llx (no memslot there)", what,
			     (unsigned long long)run->mmio.phys_addr);
		case KVM_EXIT_MEMORY_FAULT: {
			/* {flags, gpa, size} at the start of the exit union. */
			const uint64_t *mf = (const uint64_t *)&run->hw;

			fail("%s: memory fault: flags %#" PRIx64 " gpa %#" PRIx64 " size %#" PRIx64,
			     what, mf[0], mf[1], mf[2]);
		}
		case KVM_EXIT_SHUTDOWN:
			fprintf(stderr, "rfc_vmm: %s: guest shut down (triple fault)\n", what);
			dump_regs(v->fd);
			exit(1);
		case KVM_EXIT_FAIL_ENTRY:
			fail("%s: entry failed, reason %#llx", what,
			     (unsigned long long)run->fail_entry.hardware_entry_failure_reason);
		default:
			fprintf(stderr, "rfc_vmm: %s: unexpected exit reason %u\n", what,
				run->exit_reason);
			dump_regs(v->fd);
			exit(1);
		}
	}
	fail("%s: no status after 100000 exits", what);
}

/* Check the guest_memfd through its mapping: the pattern in the data, zeros after it. */
void check_gmem(const unsigned char *map, int check_tail, const char *when)
{
	uint64_t t0 = now_us();

	for (uint64_t i = 0; i < DATA_LEN; i++)
		if (map[i] != pattern_byte(i))
			fail("%s: guest_memfd byte %#" PRIx64 " is %#x, want %#x", when, i, map[i],
			     pattern_byte(i));
	if (check_tail) {
		long nz = lu_nonzero(map + DATA_LEN, GMEM_SIZE - DATA_LEN);

		if (nz >= 0)
			fail("%s: guest_memfd byte %#llx past the data is %#x, want 0", when,
			     (unsigned long long)(DATA_LEN + (uint64_t)nz), map[DATA_LEN + nz]);
	}
	printf("rfc_vmm: %s: guest_memfd mmap holds the %llu-byte pattern%s (%.2f ms)\n", when,
	       DATA_LEN, check_tail ? ", the rest of the 16 MiB is zero" : "",
	       (now_us() - t0) / 1000.0);
}

int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}
