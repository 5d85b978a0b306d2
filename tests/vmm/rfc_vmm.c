/*
 * rfc_vmm: the guest_memfd preservation scenario of the 2026 RFC, as an ordinary C VMM that
 * talks to /dev/kvm and /dev/liveupdate with plain ioctls.
 *
 *   rfc_vmm IMAGE_WRITE IMAGE_VERIFY [--low malloc|memfd] [--order vm-first|gmem-first]
 *           [--native [--corrupt OFFSET]] [--skip-negative]
 *   rfc_vmm IMAGE_WRITE IMAGE_VERIFY --spin exits|tight [--native] [--low ...]
 *   rfc_vmm IMAGE_WRITE IMAGE_VERIFY --eintr signal|immediate|probe [--native] [--low ...]
 *   rfc_vmm IMAGE_WRITE IMAGE_VERIFY --vmm-child exits|tight [--low ...] [--order ...]
 *   rfc_vmm --print-sregs
 *
 * The images come from `handover guest-image` (the CPL3 test guest of src/vmm/guest/, loaded at
 * GPA 0). Stage 1 builds a VM with a 16 MiB guest_memfd at 4 GiB, lets the guest write a 5 MiB
 * pattern there, checks it through the guest_memfd's mmap, preserves the guest_memfd and the VM
 * in a LUO session and updates the kernel with reboot(LINUX_REBOOT_CMD_KEXEC). Stage 2 (the
 * next kernel: found by RETRIEVE_SESSION of the state session) retrieves both, checks the data
 * again, rebinds the guest_memfd on the retrieved VM and lets a new vCPU verify it.
 *
 * --native runs on a kernel without /dev/liveupdate: stage 1 up to the preservation, then the
 * stage 2 checks on the same VM (new low memory, the guest_memfd rebound, a second vCPU).
 * --corrupt OFFSET (with --native) flips that data byte before the verify run, which must then
 * report VERIFY_FAILED at exactly that offset: the check that the verify run can fail.
 * --skip-negative (for debugging) skips the LUO negative cases of stage 1.
 *
 * For the tests that kill VMMs and interrupt KVM_RUN, the guest runs in RUN_UPDATE mode: it
 * writes the pattern, reports WRITTEN, then loops on the clock port. "exits" keeps it there
 * (two I/O exits per loop, proceed is always 0); "tight" parks it instead on a `jmp .` written
 * over the instruction after its WRITTEN report, so KVM_RUN never returns on its own.
 *
 * --spin: build the VM, let the guest write, preserve the VM and the guest_memfd in a session
 * (not with --native), print "rfc_vmm: spinning: pid P, KIND..." and run the guest forever. For
 * a test that SIGKILLs the VMM while its vCPU is in KVM_RUN.
 * --eintr STEP: the guest parked ("tight"), a SIGALRM handler without SA_RESTART, then one
 * of: "signal", a timer signal 50 ms into KVM_RUN must make it return -1/EINTR; "immediate",
 * KVM_RUN with kvm_run->immediate_exit = 1 must return -1/EINTR at once, without a signal;
 * "probe", signals that arrive 1-100 us into the call, counting those that did not end it
 * (it went on until a later signal: lost). Each prints one "rfc_vmm: eintr: ..." result line,
 * then the guest is let go and must verify its data. KVM_RUN failing otherwise than with EINTR
 * is fatal (exit 1).
 * --vmm-child: stage 1 split in two processes. The main process creates the sessions and
 * forks a VMM child, which builds the VM, lets the guest write, preserves the VM and the
 * guest_memfd into the inherited session, prints "rfc_vmm: vmm child running: pid P, KIND, ..."
 * and runs the guest forever. When the child has died by a signal (the test SIGKILLs it), the
 * main process, which still holds the sessions, updates. Stage 2 as usual.
 *
 * Every ioctl number and struct this needs beyond the build machine's <linux/kvm.h> is defined
 * here (guarded), with the upstream values; the static asserts pin the request numbers.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <linux/kvm.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "../userspace/liveupdate.h"
#include "../userspace/lu_util.h"

/* ---- KVM user API the build machine's headers may lack (values from upstream uapi) ---- */

#ifndef KVM_CAP_USER_MEMORY2
#define KVM_CAP_USER_MEMORY2 231
#endif
#ifndef KVM_CAP_GUEST_MEMFD
#define KVM_CAP_GUEST_MEMFD 234
#endif
#ifndef KVM_CAP_GUEST_MEMFD_FLAGS
#define KVM_CAP_GUEST_MEMFD_FLAGS 244
#endif
#ifndef GUEST_MEMFD_FLAG_MMAP
#define GUEST_MEMFD_FLAG_MMAP (1ULL << 0)
#endif
#ifndef GUEST_MEMFD_FLAG_INIT_SHARED
#define GUEST_MEMFD_FLAG_INIT_SHARED (1ULL << 1)
#endif
#ifndef KVM_MEM_GUEST_MEMFD
#define KVM_MEM_GUEST_MEMFD (1UL << 2)
#endif
#ifndef KVM_EXIT_MEMORY_FAULT
#define KVM_EXIT_MEMORY_FAULT 39
#endif

#ifndef KVM_CREATE_GUEST_MEMFD
struct kvm_create_guest_memfd {
	__u64 size;
	__u64 flags;
	__u64 reserved[6];
};
#define KVM_CREATE_GUEST_MEMFD _IOWR(KVMIO, 0xd4, struct kvm_create_guest_memfd)
#endif

#ifndef KVM_SET_USER_MEMORY_REGION2
struct kvm_userspace_memory_region2 {
	__u32 slot;
	__u32 flags;
	__u64 guest_phys_addr;
	__u64 memory_size;
	__u64 userspace_addr;
	__u64 guest_memfd_offset;
	__u32 guest_memfd;
	__u32 pad1;
	__u64 pad2[14];
};
#define KVM_SET_USER_MEMORY_REGION2 _IOW(KVMIO, 0x49, struct kvm_userspace_memory_region2)
#endif

#ifndef LINUX_REBOOT_CMD_KEXEC
#define LINUX_REBOOT_CMD_KEXEC 0x45584543
#endif

_Static_assert(sizeof(struct kvm_create_guest_memfd) == 64, "kvm_create_guest_memfd size");
_Static_assert(sizeof(struct kvm_userspace_memory_region2) == 160, "region2 size");
_Static_assert(sizeof(struct kvm_sregs) == 312, "kvm_sregs size");
_Static_assert(sizeof(struct kvm_regs) == 144, "kvm_regs size");
_Static_assert(sizeof(struct kvm_cpuid2) == 8, "kvm_cpuid2 header size");
_Static_assert(sizeof(struct kvm_cpuid_entry2) == 40, "kvm_cpuid_entry2 size");
_Static_assert(KVM_GET_API_VERSION == 0xae00, "KVM_GET_API_VERSION");
_Static_assert(KVM_CREATE_VM == 0xae01, "KVM_CREATE_VM");
_Static_assert(KVM_CHECK_EXTENSION == 0xae03, "KVM_CHECK_EXTENSION");
_Static_assert(KVM_GET_VCPU_MMAP_SIZE == 0xae04, "KVM_GET_VCPU_MMAP_SIZE");
_Static_assert(KVM_GET_SUPPORTED_CPUID == 0xc008ae05, "KVM_GET_SUPPORTED_CPUID");
_Static_assert(KVM_CREATE_VCPU == 0xae41, "KVM_CREATE_VCPU");
_Static_assert(KVM_SET_USER_MEMORY_REGION2 == 0x40a0ae49, "KVM_SET_USER_MEMORY_REGION2");
_Static_assert(KVM_CREATE_GUEST_MEMFD == 0xc040aed4, "KVM_CREATE_GUEST_MEMFD");
_Static_assert(KVM_RUN == 0xae80, "KVM_RUN");
_Static_assert(KVM_GET_REGS == 0x8090ae81, "KVM_GET_REGS");
_Static_assert(KVM_SET_REGS == 0x4090ae82, "KVM_SET_REGS");
_Static_assert(KVM_GET_SREGS == 0x8138ae83, "KVM_GET_SREGS");
_Static_assert(KVM_SET_SREGS == 0x4138ae84, "KVM_SET_SREGS");
_Static_assert(KVM_SET_CPUID2 == 0x4008ae90, "KVM_SET_CPUID2");

/* ---- The test guest (src/vmm/guest/: layout.rs, mailbox.rs, cpu.rs) ---- */

#define LOW_MEM_SIZE (2UL << 20)     /* slot 0 at GPA 0 */
#define LOW_IMAGE_SIZE 0x4b000UL     /* PD_GPA + 64 page directories */
#define MAILBOX_GPA 0x1000UL
#define GDT_GPA 0x2000UL
#define GDT_LIMIT 0x4f               /* 8 descriptors + the 16-byte TSS descriptor - 1 */
#define CODE_GPA 0x3000UL
#define STACK_TOP 0x6000UL
#define TSS_GPA 0x6000UL
#define TSS_LIMIT 0x2068U            /* 0x68 + 8 KiB I/O bitmap */
#define PML4_GPA 0x9000UL
#define USER_DS 0x2b
#define USER_CS 0x33
#define TSS_SEL 0x40

#define PORT_STATUS 0x0e80
#define PORT_CLOCK 0x0e84
#define PORT_PROCEED 0x0e88

#define MB_MAGIC 0x00
#define MB_DATA_GPA 0x08
#define MB_DATA_LEN 0x10
#define MB_MODE 0x18
#define MB_STATUS 0x20
#define MB_FIRST_BAD 0x28
#define GUEST_MAGIC 0x3153455547564f48ULL /* "HOVGUES1" little-endian */

#define MODE_WRITE 1
#define MODE_VERIFY 2
#define MODE_RUN_UPDATE 3
#define STATUS_NONE 0
#define STATUS_WRITTEN 1
#define STATUS_VERIFY_OK 2
#define STATUS_VERIFY_FAILED 3
#define STATUS_BAD_MODE 4

#define INITIAL_RFLAGS 0x3002ULL     /* bit 1, IOPL 3 */
#define INITIAL_CR0 0x80050033ULL    /* PE MP ET NE WP PG */
#define INITIAL_CR4 0x20ULL          /* PAE */
#define INITIAL_EFER 0x500ULL        /* LME LMA */

/* ---- The scenario ---- */

#define GMEM_GPA (4ULL << 30)
#define GMEM_SIZE (16ULL << 20)
#define DATA_LEN (5ULL << 20)
#define SLOT_LOW 0
#define SLOT_GMEM 1

#define SESSION "rfc-vmm"
#define STATE_SESSION "rfc-vmm-state"
#define NEG_SESSION "rfc-vmm-neg"
#define GMEM_TOKEN 1
#define VM_TOKEN 2
#define STATE_TOKEN 1
#define STATE_MAGIC 0x31304d56434652ULL /* "RFCVM01" */

enum low_kind { LOW_MEMFD, LOW_MALLOC };
enum order { VM_FIRST, GMEM_FIRST };
enum spin { SPIN_NONE, SPIN_EXITS, SPIN_TIGHT };
enum eintr { EINTR_NONE, EINTR_SIGNAL, EINTR_IMMEDIATE, EINTR_PROBE };

struct opts {
	const char *image_write;
	const char *image_verify;
	enum low_kind low;
	enum order order;
	int native;
	int skip_negative; /* debugging: go straight to the main flow */
	long long corrupt; /* data offset to flip before the native verify run, or -1 */
	enum spin spin;    /* --spin KIND */
	enum eintr eintr;  /* --eintr STEP */
	enum spin child;   /* --vmm-child KIND */
	long bench_exits;  /* --bench-exits N: time N port-I/O exits, then exit */
	int slot_churn;    /* --slot-churn: memslot changes while the guest faults its data in */
};

/* What the state session's memfd holds. */
struct stage_state {
	uint64_t magic;
	uint32_t next_stage;
	uint32_t order;
	uint32_t low;
	uint32_t reserved;
};

/* Low memory: 2 MiB at GPA 0, from a memfd or from anonymous memory. */
struct low_mem {
	unsigned char *mem;
	int memfd; /* -1 for malloc */
};

struct vcpu {
	int fd;
	struct kvm_run *run;
	size_t run_size;
};

static int failures;

static void die(const char *what)
{
	fprintf(stderr, "rfc_vmm: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void fail(const char *fmt, ...)
{
	va_list ap;

	fputs("rfc_vmm: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(1);
}

static uint64_t now_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000 + (uint64_t)ts.tv_nsec / 1000;
}

static uint64_t get_u64(const unsigned char *p)
{
	uint64_t v;

	memcpy(&v, p, 8);
	return v;
}

static unsigned char pattern_byte(uint64_t i)
{
	return (unsigned char)((i ^ 0x5a) & 0xff);
}

/* TAP-style result line for a negative case. */
static int case_no;

static void report(int ok, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void report(int ok, const char *fmt, ...)
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

static void skip(const char *what)
{
	printf("ok %d - %s # SKIP (--native or --skip-negative)\n", ++case_no, what);
}

/* ---- KVM ---- */

static int open_kvm(void)
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

static void check_caps(int kvm)
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

static int create_vm(int kvm)
{
	int vm = ioctl(kvm, KVM_CREATE_VM, 0UL);

	if (vm < 0)
		die("KVM_CREATE_VM");
	return vm;
}

/* KVM_CREATE_GUEST_MEMFD: the new fd, or -errno. */
static int create_gmem(int vm, uint64_t size, uint64_t flags)
{
	struct kvm_create_guest_memfd g;
	int fd;

	memset(&g, 0, sizeof(g));
	g.size = size;
	g.flags = flags;
	fd = ioctl(vm, KVM_CREATE_GUEST_MEMFD, &g);
	return fd < 0 ? -errno : fd;
}

static void set_region(int vm, uint32_t slot, uint32_t flags, uint64_t gpa, uint64_t size,
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

static unsigned char *map_gmem(int gmem)
{
	void *p = mmap(NULL, GMEM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, gmem, 0);

	if (p == MAP_FAILED)
		die("mmap guest_memfd");
	return p;
}

/* Slot 1: the guest_memfd at 4 GiB, userspace_addr its own mapping (MMAP guest_memfd). */
static void bind_gmem(int vm, int gmem, unsigned char *map)
{
	set_region(vm, SLOT_GMEM, KVM_MEM_GUEST_MEMFD, GMEM_GPA, GMEM_SIZE, map, gmem, 0);
}

static void unbind_slot(int vm, uint32_t slot, uint32_t flags, uint64_t gpa, int gmem)
{
	set_region(vm, slot, flags, gpa, 0, NULL, gmem, 0);
}

static struct low_mem alloc_low(enum low_kind kind)
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

static void free_low(struct low_mem *l)
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
static void load_image(const char *path, unsigned char *low, uint64_t want_mode)
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
static void print_vcpu_state(void)
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
static void set_cpuid(int kvm, int vcpu)
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

static struct vcpu create_vcpu(int kvm, int vm, unsigned long id)
{
	struct vcpu v;
	struct kvm_sregs s;
	struct kvm_regs r;
	int size;
	void *p;

	v.fd = ioctl(vm, KVM_CREATE_VCPU, id);
	if (v.fd < 0)
		die("KVM_CREATE_VCPU");
	size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	if (size < (int)sizeof(struct kvm_run))
		die("KVM_GET_VCPU_MMAP_SIZE");
	v.run_size = (size_t)size;
	p = mmap(NULL, v.run_size, PROT_READ | PROT_WRITE, MAP_SHARED, v.fd, 0);
	if (p == MAP_FAILED)
		die("mmap kvm_run");
	v.run = p;
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

static void destroy_vcpu(struct vcpu *v)
{
	munmap(v->run, v->run_size);
	close(v->fd);
	v->fd = -1;
}

static void dump_regs(int vcpu)
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
static uint64_t run_guest(struct vcpu *v, const unsigned char *low, const char *what)
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
static void check_gmem(const unsigned char *map, int check_tail, const char *when)
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

/* ---- The verify half (stage 2, or the second half of --native) ---- */

/*
 * On `vm` (holding `gmem`): fresh low memory with the verify image at slot 0, the guest_memfd
 * bound at 4 GiB (slot 1), a new vCPU `vcpu_id`; run the guest and expect VERIFY_OK, or with
 * `bad_at` >= 0 VERIFY_FAILED at that offset.
 */
static void verify_run(int kvm, int vm, int gmem, unsigned char *gmem_map, const struct opts *o,
		       unsigned long vcpu_id, long long bad_at, const char *what)
{
	struct low_mem low = alloc_low(o->low);
	struct vcpu v;
	uint64_t status, bad;

	load_image(o->image_verify, low.mem, MODE_VERIFY);
	set_region(vm, SLOT_LOW, 0, 0, LOW_MEM_SIZE, low.mem, -1, 0);
	bind_gmem(vm, gmem, gmem_map);
	v = create_vcpu(kvm, vm, vcpu_id);
	status = run_guest(&v, low.mem, what);
	bad = get_u64(low.mem + MAILBOX_GPA + MB_FIRST_BAD);
	if (bad_at >= 0) {
		if (status != STATUS_VERIFY_FAILED || bad != (uint64_t)bad_at)
			fail("%s: guest status %" PRIu64 ", first bad offset %#" PRIx64
			     " (want status %d at %#llx)",
			     what, status, bad, STATUS_VERIFY_FAILED, bad_at);
		printf("rfc_vmm: %s: the guest found the flipped byte at %#llx\n", what, bad_at);
	} else {
		if (status != STATUS_VERIFY_OK)
			fail("%s: guest status %" PRIu64 ", first bad offset %#" PRIx64
			     " (want status %d)",
			     what, status, bad, STATUS_VERIFY_OK);
		printf("rfc_vmm: %s: the guest verified %llu bytes\n", what, DATA_LEN);
	}
	destroy_vcpu(&v);
	free_low(&low);
}

/* ---- LUO negative cases (stage 1, under the host only) ---- */

static void negative_cases(int kvm, int dev)
{
	int vm = create_vm(kvm);
	int s, fd, r;

	s = lu_create_session(dev, "rfc-vmm-neg-preserve");
	if (s < 0) {
		errno = -s;
		die("create session rfc-vmm-neg-preserve");
	}

	/* guest_memfd without INIT_SHARED: no handler accepts it (can_preserve), so ENOENT. */
	fd = create_gmem(vm, GMEM_SIZE, GUEST_MEMFD_FLAG_MMAP);
	if (fd < 0) {
		report(0, "guest_memfd MMAP-only: KVM_CREATE_GUEST_MEMFD failed: %s", strerror(-fd));
	} else {
		r = lu_preserve_fd(s, fd, 0x9002);
		report(r == -ENOENT, "PRESERVE_FD of a guest_memfd with MMAP only is ENOENT (got %s)",
		       r ? strerror(-r) : "success");
		close(fd);
	}
	fd = create_gmem(vm, GMEM_SIZE, 0);
	if (fd < 0) {
		report(0, "guest_memfd flags 0: KVM_CREATE_GUEST_MEMFD failed: %s", strerror(-fd));
	} else {
		r = lu_preserve_fd(s, fd, 0x9001);
		report(r == -ENOENT,
		       "PRESERVE_FD of a guest_memfd without MMAP|INIT_SHARED is ENOENT (got %s)",
		       r ? strerror(-r) : "success");
		close(fd);
	}

	/* Files no handler takes: a vCPU fd, the /dev/kvm fd. */
	fd = ioctl(vm, KVM_CREATE_VCPU, 0UL);
	if (fd < 0) {
		report(0, "vCPU fd: KVM_CREATE_VCPU failed: %s", strerror(errno));
	} else {
		r = lu_preserve_fd(s, fd, 0x9003);
		report(r == -ENOENT, "PRESERVE_FD of a vCPU fd is ENOENT (got %s)",
		       r ? strerror(-r) : "success");
		close(fd);
	}
	r = lu_preserve_fd(s, kvm, 0x9004);
	report(r == -ENOENT, "PRESERVE_FD of the /dev/kvm fd is ENOENT (got %s)",
	       r ? strerror(-r) : "success");
	close(s);

	/*
	 * A guest_memfd preserved without its VM: preserving works (and freezes the file), but its
	 * freeze at reboot finds no VM token in the session, so the update is refused with ENOENT
	 * and everything carries on. Closing the session unpreserves and unfreezes it.
	 */
	s = lu_create_session(dev, NEG_SESSION);
	if (s < 0) {
		errno = -s;
		die("create session " NEG_SESSION);
	}
	fd = create_gmem(vm, GMEM_SIZE, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED);
	if (fd < 0) {
		errno = -fd;
		die("KVM_CREATE_GUEST_MEMFD (negative case)");
	}
	r = lu_preserve_fd(s, fd, GMEM_TOKEN);
	report(r == 0, "PRESERVE_FD of a guest_memfd without its VM succeeds (got %s)",
	       r ? strerror(-r) : "success");
	if (r < 0) {
		/* Nothing preserved: a reboot now would update, not be refused. */
		report(0, "fallocate of a preserved (frozen) guest_memfd is EPERM # not run");
		report(0, "reboot(KEXEC) with a guest_memfd but not its VM preserved is refused "
			  "# not run");
		close(s);
		close(fd);
		close(vm);
		return;
	}
	r = fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, 4096) < 0 ? -errno : 0;
	report(r == -EPERM, "fallocate of a preserved (frozen) guest_memfd is EPERM (got %s)",
	       r ? strerror(-r) : "success");
	fflush(stdout);
	errno = 0;
	r = reboot(LINUX_REBOOT_CMD_KEXEC);
	report(r == -1 && errno == ENOENT,
	       "reboot(KEXEC) with a guest_memfd but not its VM preserved is refused: -1/ENOENT "
	       "(got %d/%s)",
	       r, strerror(errno));
	close(s);
	r = fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, 4096) < 0 ? -errno : 0;
	report(r == 0, "after the refused update and the session's close, fallocate works (got %s)",
	       r ? strerror(-r) : "success");
	close(fd);
	close(vm);
}

/* ---- Stages ---- */

static void write_state(int dev, const struct opts *o)
{
	struct stage_state st;
	int s, m, r;

	memset(&st, 0, sizeof(st));
	st.magic = STATE_MAGIC;
	st.next_stage = 2;
	st.order = o->order;
	st.low = o->low;
	s = lu_create_session(dev, STATE_SESSION);
	if (s < 0) {
		errno = -s;
		die("create session " STATE_SESSION);
	}
	m = memfd_create("rfc-vmm-state", MFD_CLOEXEC);
	if (m < 0)
		die("memfd_create state");
	r = lu_pwrite_all(m, &st, sizeof(st), 0);
	if (r < 0) {
		errno = -r;
		die("write state");
	}
	r = lu_preserve_fd(s, m, STATE_TOKEN);
	if (r < 0) {
		errno = -r;
		die("preserve state memfd");
	}
	/* The session fd stays open (and this process alive) until the update. */
}

/* PRESERVE_FD of the VM (token VM_TOKEN) and the guest_memfd (GMEM_TOKEN) into session `s`. */
static void preserve_vm_and_gmem(int s, enum order order, int vm, int gmem)
{
	int r;

	if (order == VM_FIRST) {
		r = lu_preserve_fd(s, vm, VM_TOKEN);
		if (r < 0) {
			errno = -r;
			die("preserve the VM");
		}
		r = lu_preserve_fd(s, gmem, GMEM_TOKEN);
	} else {
		r = lu_preserve_fd(s, gmem, GMEM_TOKEN);
		if (r < 0) {
			errno = -r;
			die("preserve the guest_memfd");
		}
		r = lu_preserve_fd(s, vm, VM_TOKEN);
	}
	if (r < 0) {
		errno = -r;
		die(order == VM_FIRST ? "preserve the guest_memfd" : "preserve the VM");
	}
}

static int stage1(const struct opts *o, int dev)
{
	int kvm = open_kvm();
	int vm, gmem, s, r;
	unsigned char *gmem_map;
	struct low_mem low;
	struct vcpu v;
	uint64_t status;

	check_caps(kvm);
	if (o->native || o->skip_negative) {
		skip("PRESERVE_FD of a guest_memfd with MMAP only is ENOENT");
		skip("PRESERVE_FD of a guest_memfd without MMAP|INIT_SHARED is ENOENT");
		skip("PRESERVE_FD of a vCPU fd is ENOENT");
		skip("PRESERVE_FD of the /dev/kvm fd is ENOENT");
		skip("reboot(KEXEC) with a guest_memfd but not its VM preserved is refused");
	} else {
		negative_cases(kvm, dev);
		if (failures)
			fail("%d negative case(s) failed", failures);
	}

	vm = create_vm(kvm);
	gmem = create_gmem(vm, GMEM_SIZE, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED);
	if (gmem < 0) {
		errno = -gmem;
		die("KVM_CREATE_GUEST_MEMFD");
	}
	gmem_map = map_gmem(gmem);
	bind_gmem(vm, gmem, gmem_map);
	low = alloc_low(o->low);
	load_image(o->image_write, low.mem, MODE_WRITE);
	set_region(vm, SLOT_LOW, 0, 0, LOW_MEM_SIZE, low.mem, -1, 0);
	v = create_vcpu(kvm, vm, 0);
	status = run_guest(&v, low.mem, "stage 1 write");
	if (status != STATUS_WRITTEN)
		fail("stage 1: guest status %" PRIu64 ", want %d (written)", status, STATUS_WRITTEN);
	/* The vCPU is not running from here on: the VMM has paused its guest. */
	check_gmem(gmem_map, 0, "stage 1");

	if (o->native) {
		/*
		 * No update here: do stage 2's work on the same VM. Drop both slots and the vCPU,
		 * then fresh low memory, the guest_memfd bound again, a new vCPU (id 1).
		 */
		destroy_vcpu(&v);
		unbind_slot(vm, SLOT_LOW, 0, 0, -1);
		unbind_slot(vm, SLOT_GMEM, KVM_MEM_GUEST_MEMFD, GMEM_GPA, gmem);
		free_low(&low);
		munmap(gmem_map, GMEM_SIZE);
		gmem_map = map_gmem(gmem);
		check_gmem(gmem_map, 1, "native verify");
		if (o->corrupt >= 0)
			gmem_map[o->corrupt] ^= 0xff;
		verify_run(kvm, vm, gmem, gmem_map, o, 1, o->corrupt, "native verify");
		munmap(gmem_map, GMEM_SIZE);
		close(gmem);
		close(vm);
		close(kvm);
		printf("rfc_vmm: native %s\n", o->corrupt >= 0 ? "corrupt ok" : "ok");
		return 0;
	}

	s = lu_create_session(dev, SESSION);
	if (s < 0) {
		errno = -s;
		die("create session " SESSION);
	}
	preserve_vm_and_gmem(s, o->order, vm, gmem);
	write_state(dev, o);
	printf("rfc_vmm: stage 1: VM and guest_memfd preserved (%s), updating\n",
	       o->order == VM_FIRST ? "vm-first" : "gmem-first");
	fflush(stdout);
	r = reboot(LINUX_REBOOT_CMD_KEXEC);
	fail("stage 1: reboot(LINUX_REBOOT_CMD_KEXEC) returned %d: %s", r, strerror(errno));
}

static int retrieve(int s, uint64_t token, const char *what)
{
	int fd = lu_retrieve_fd(s, token);

	if (fd < 0) {
		errno = -fd;
		die(what);
	}
	return fd;
}

static int stage2(const struct opts *o, int dev, int state_s)
{
	struct stage_state st;
	int kvm, s, m, vm, gmem, r;
	unsigned char *gmem_map;

	m = retrieve(state_s, STATE_TOKEN, "retrieve the state memfd");
	r = lu_pread_all(m, &st, sizeof(st), 0);
	if (r < 0) {
		errno = -r;
		die("read state");
	}
	close(m);
	if (st.magic != STATE_MAGIC || st.next_stage != 2)
		fail("stage 2: bad state (magic %#" PRIx64 ", stage %u)", st.magic, st.next_stage);
	if (st.order != (uint32_t)o->order || st.low != (uint32_t)o->low)
		fail("stage 2: stage 1 ran with other options (order %u low %u)", st.order, st.low);

	s = lu_retrieve_session(dev, SESSION);
	if (s < 0) {
		errno = -s;
		die("retrieve session " SESSION);
	}
	if (o->order == VM_FIRST) {
		vm = retrieve(s, VM_TOKEN, "retrieve the VM");
		gmem = retrieve(s, GMEM_TOKEN, "retrieve the guest_memfd");
	} else {
		gmem = retrieve(s, GMEM_TOKEN, "retrieve the guest_memfd");
		vm = retrieve(s, VM_TOKEN, "retrieve the VM");
	}
	printf("rfc_vmm: stage 2: retrieved the VM (fd %d) and the guest_memfd (fd %d)\n", vm, gmem);

	gmem_map = map_gmem(gmem);
	check_gmem(gmem_map, 1, "stage 2");
	kvm = open_kvm();
	verify_run(kvm, vm, gmem, gmem_map, o, 0, -1, "stage 2 verify");

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
	munmap(gmem_map, GMEM_SIZE);
	close(gmem);
	close(vm);
	close(s);
	close(state_s);
	close(kvm);
	printf("rfc_vmm: stage 2 ok\n");
	return 0;
}

/* ---- Guests that keep running: killed VMMs, EINTR ---- */

/*
 * Where "tight" parks the guest: the instruction after RUN_UPDATE mode's WRITTEN report
 * (`mov $PORT_CLOCK,%edx`, ba 84 0e 00 00, at code offset 0x70 of src/vmm/guest/program.rs).
 * Its first two bytes become `jmp .` (eb fe); putting them back lets the guest go on.
 */
#define PARK_OFF 0x70
static const unsigned char park_jmp[2] = { 0xeb, 0xfe };
static const unsigned char park_orig[2] = { 0xba, 0x84 };

struct machine {
	int vm, gmem;
	unsigned char *gmem_map;
	struct low_mem low;
	struct vcpu v;
};

static const char *spin_name(enum spin k)
{
	return k == SPIN_TIGHT ? "tight" : "exits";
}

/*
 * A VM with the guest_memfd at 4 GiB and low memory at 0, the write image switched to
 * RUN_UPDATE mode, run until the guest reports WRITTEN: it then stands at its clock loop.
 */
static void machine_written(int kvm, const struct opts *o, struct machine *m)
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

static void park(unsigned char *low)
{
	unsigned char *c = low + CODE_GPA + PARK_OFF;

	if (memcmp(c, park_orig, sizeof(park_orig)))
		fail("guest code at %#lx is %02x %02x, not mov $PORT_CLOCK,%%edx", CODE_GPA + PARK_OFF,
		     c[0], c[1]);
	memcpy(c, park_jmp, sizeof(park_jmp));
}

static void unpark(unsigned char *low)
{
	memcpy(low + CODE_GPA + PARK_OFF, park_orig, sizeof(park_orig));
}

/* Run the guest forever: its clock loop (proceed is always 0), or parked on `jmp .`. */
static void spin_forever(struct vcpu *v, enum spin kind) __attribute__((noreturn));
static void spin_forever(struct vcpu *v, enum spin kind)
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
static int run_spin(const struct opts *o, int dev)
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

static int cmp_u64(const void *a, const void *b);

/*
 * --bench-exits N: the guest at its clock loop (every iteration two port-I/O exits, IN from
 * the clock and the proceed ports); time each KVM_RUN call from entry to its return with the
 * exit, answer it, N times. Prints one line: rfc_vmm: exits {"n":..,"p50_ns":..,...}.
 */
static int run_bench_exits(const struct opts *o)
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

static int run_slot_churn(const struct opts *o)
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

static volatile sig_atomic_t in_call; /* set around the KVM_RUN call */
static volatile sig_atomic_t nsig;    /* SIGALRMs since the round started */
static volatile sig_atomic_t first_in_call;
static volatile uint64_t first_sig_us;

static void on_alarm(int sig)
{
	(void)sig;
	if (nsig == 0) {
		first_in_call = in_call;
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
	int nsig, first_in_call;
};

/* One KVM_RUN of the parked guest with the timer armed; it must end with -1/EINTR. */
static struct interrupted interrupted_run(struct vcpu *v, long first_us, long every_us)
{
	struct interrupted r;
	int ret, e;

	arm(0, 0); /* a signal still pending is delivered when setitimer returns */
	nsig = 0;
	first_in_call = 0;
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
	r.first_sig = first_sig_us;
	return r;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

#define PROBE_ROUNDS 100

/* --eintr: see the top of the file. */
static int run_eintr(const struct opts *o)
{
	int kvm = open_kvm();
	struct machine m;
	struct sigaction sa;
	struct interrupted r;
	uint64_t lat[PROBE_ROUNDS], status;
	int inside = 0, lost = 0, nlat = 0;

	check_caps(kvm);
	machine_written(kvm, o, &m);
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_alarm;
	sigemptyset(&sa.sa_mask);
	sa.sa_flags = 0; /* no SA_RESTART (KVM_RUN is never restarted anyway) */
	if (sigaction(SIGALRM, &sa, NULL) < 0)
		die("sigaction SIGALRM");
	park(m.low.mem);
	printf("rfc_vmm: eintr: guest parked (pid %d)\n", (int)getpid());
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
		/* The first signal 1-100 us into the call, then every 20 ms. */
		for (int i = 0; i < PROBE_ROUNDS; i++) {
			r = interrupted_run(&m.v, 1 + (i * 37) % 100, 20000);
			if (!r.first_in_call)
				continue;
			inside++;
			if (r.nsig > 1)
				lost++;
			else
				lat[nlat++] = r.t_ret - r.first_sig;
		}
		qsort(lat, (size_t)nlat, sizeof(lat[0]), cmp_u64);
		printf("rfc_vmm: eintr: probe: %d of %d early signals arrived inside KVM_RUN, %d of "
		       "them lost; handler to return: median %" PRIu64 " us, max %" PRIu64 " us\n",
		       inside, PROBE_ROUNDS, lost, nlat ? lat[nlat / 2] : 0,
		       nlat ? lat[nlat - 1] : 0);
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

/* --vmm-child: see the top of the file. Returns only on failure (reboot refused). */
static int stage1_vmm_child(const struct opts *o, int dev)
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

static void usage(void)
{
	fprintf(stderr, "usage: rfc_vmm IMAGE_WRITE IMAGE_VERIFY [--low malloc|memfd] "
			"[--order vm-first|gmem-first] [--native [--corrupt OFFSET]]\n"
			"               [--skip-negative]\n"
			"       rfc_vmm IMAGE_WRITE IMAGE_VERIFY --spin exits|tight [--native] [--low ...]\n"
			"       rfc_vmm IMAGE_WRITE IMAGE_VERIFY --eintr signal|immediate|probe [--native] "
			"[--low ...]\n"
			"       rfc_vmm IMAGE_WRITE IMAGE_VERIFY --vmm-child exits|tight [--low ...] "
			"[--order ...]\n"
			"       rfc_vmm IMAGE_WRITE IMAGE_VERIFY --bench-exits N [--native] [--low ...]\n"
			"       rfc_vmm IMAGE_WRITE IMAGE_VERIFY --slot-churn [--native] [--low ...]\n"
			"       rfc_vmm --print-sregs\n");
	exit(2);
}

int main(int argc, char **argv)
{
	struct opts o = { NULL, NULL, LOW_MEMFD, VM_FIRST, 0, 0, -1, SPIN_NONE, EINTR_NONE, SPIN_NONE, 0, 0 };
	int npos = 0, dev, state_s;

	setvbuf(stdout, NULL, _IOLBF, 0);
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];

		if (!strcmp(a, "--print-sregs")) {
			print_vcpu_state();
			return 0;
		} else if (!strcmp(a, "--native")) {
			o.native = 1;
		} else if ((!strcmp(a, "--spin") || !strcmp(a, "--vmm-child")) && i + 1 < argc) {
			enum spin *k = !strcmp(a, "--spin") ? &o.spin : &o.child;

			a = argv[++i];
			if (!strcmp(a, "exits"))
				*k = SPIN_EXITS;
			else if (!strcmp(a, "tight"))
				*k = SPIN_TIGHT;
			else
				usage();
		} else if (!strcmp(a, "--eintr") && i + 1 < argc) {
			a = argv[++i];
			if (!strcmp(a, "signal"))
				o.eintr = EINTR_SIGNAL;
			else if (!strcmp(a, "immediate"))
				o.eintr = EINTR_IMMEDIATE;
			else if (!strcmp(a, "probe"))
				o.eintr = EINTR_PROBE;
			else
				usage();
		} else if (!strcmp(a, "--bench-exits") && i + 1 < argc) {
			o.bench_exits = strtol(argv[++i], NULL, 0);
			if (o.bench_exits < 10)
				usage();
		} else if (!strcmp(a, "--slot-churn")) {
			o.slot_churn = 1;
		} else if (!strcmp(a, "--skip-negative")) {
			o.skip_negative = 1;
		} else if (!strcmp(a, "--corrupt") && i + 1 < argc) {
			char *end;

			o.corrupt = strtoll(argv[++i], &end, 0);
			if (*end || o.corrupt < 0 || (unsigned long long)o.corrupt >= DATA_LEN)
				usage();
		} else if (!strcmp(a, "--low") && i + 1 < argc) {
			a = argv[++i];
			if (!strcmp(a, "memfd"))
				o.low = LOW_MEMFD;
			else if (!strcmp(a, "malloc"))
				o.low = LOW_MALLOC;
			else
				usage();
		} else if (!strcmp(a, "--order") && i + 1 < argc) {
			a = argv[++i];
			if (!strcmp(a, "vm-first"))
				o.order = VM_FIRST;
			else if (!strcmp(a, "gmem-first"))
				o.order = GMEM_FIRST;
			else
				usage();
		} else if (a[0] == '-') {
			usage();
		} else if (npos == 0) {
			o.image_write = a;
			npos++;
		} else if (npos == 1) {
			o.image_verify = a;
			npos++;
		} else {
			usage();
		}
	}
	if (npos != 2 || (o.corrupt >= 0 && !o.native))
		usage();
	if ((o.spin != SPIN_NONE) + (o.eintr != EINTR_NONE) + (o.child != SPIN_NONE) > 1 ||
	    (o.child != SPIN_NONE && o.native))
		usage();
	printf("rfc_vmm: low %s, order %s%s\n", o.low == LOW_MEMFD ? "memfd" : "malloc",
	       o.order == VM_FIRST ? "vm-first" : "gmem-first", o.native ? ", native" : "");

	if (o.eintr != EINTR_NONE)
		return run_eintr(&o);
	if (o.bench_exits)
		return run_bench_exits(&o);
	if (o.slot_churn)
		return run_slot_churn(&o);
	if (o.spin != SPIN_NONE && o.native)
		return run_spin(&o, -1);
	if (o.native)
		return stage1(&o, -1);

	dev = open(LIVEUPDATE_DEV_PATH, O_RDWR | O_CLOEXEC);
	if (dev < 0)
		die("open " LIVEUPDATE_DEV_PATH " (use --native without it)");
	if (o.spin != SPIN_NONE)
		return run_spin(&o, dev);
	state_s = lu_retrieve_session(dev, STATE_SESSION);
	if (state_s >= 0) {
		printf("rfc_vmm: stage 2\n");
		return stage2(&o, dev, state_s);
	}
	if (state_s != -ENOENT) {
		errno = -state_s;
		die("retrieve session " STATE_SESSION);
	}
	/* A refused update that happened after all would leave the negative case's session. */
	state_s = lu_retrieve_session(dev, NEG_SESSION);
	if (state_s >= 0)
		fail("stage 1 again after an update with only a guest_memfd preserved: "
		     "that update should have been refused");
	printf("rfc_vmm: stage 1\n");
	return o.child != SPIN_NONE ? stage1_vmm_child(&o, dev) : stage1(&o, dev);
}
