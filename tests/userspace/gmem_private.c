/*
 * gmem_private: private guest memory from an ordinary program under `handover run`, with plain
 * ioctls on the host's /dev/kvm. A software-protected VM's guest_memfd without INIT_SHARED
 * starts private: a touch through mmap is SIGBUS. KVM_SET_MEMORY_ATTRIBUTES2 on the guest_memfd
 * fd converts pages in place. Converting to private a page this program maps is EAGAIN with
 * error_offset (the host cannot take a page out of another address space); once unmapped it
 * is accepted, and the bytes written while shared are there again when shared once more.
 *
 * One TAP line per check, the plan at the end; exit status 0 only if every check passed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

/* The constants and structs the system headers may lack (upstream values; the in-place
 * conversion series v8 for the last two, docs/private-memory.md). */
#ifndef KVM_CREATE_GUEST_MEMFD
struct kvm_create_guest_memfd {
	__u64 size;
	__u64 flags;
	__u64 reserved[6];
};
#define KVM_CREATE_GUEST_MEMFD _IOWR(KVMIO, 0xd4, struct kvm_create_guest_memfd)
#endif
#ifndef KVM_CAP_VM_TYPES
#define KVM_CAP_VM_TYPES 235
#endif
#define GMEM_MMAP (1ULL << 0)
#define SW_PROTECTED_VM 1UL
#define ATTR_PRIVATE (1ULL << 3)

struct attrs2 {
	uint64_t offset, size, attributes, flags, error_offset, reserved[11];
};
#define SET_MEMORY_ATTRIBUTES2 _IOWR(KVMIO, 0xd2, struct attrs2)
_Static_assert(sizeof(struct attrs2) == 128, "kvm_memory_attributes2 size");
_Static_assert(SET_MEMORY_ATTRIBUTES2 == 0xc080aed2, "KVM_SET_MEMORY_ATTRIBUTES2");

#define SIZE (16 * 4096)

static int n, failures;

static void check(int ok, const char *what)
{
	printf("%sok %d - %s\n", ok ? "" : "not ", ++n, what);
	fflush(stdout);
	if (!ok)
		failures++;
}

/* KVM_SET_MEMORY_ATTRIBUTES2: 0, or -errno (with *err_off on failure). */
static int convert(int g, uint64_t off, uint64_t size, int private, uint64_t *err_off)
{
	struct attrs2 a;

	memset(&a, 0, sizeof(a));
	a.offset = off;
	a.size = size;
	a.attributes = private ? ATTR_PRIVATE : 0;
	a.error_offset = 0xdead;
	if (ioctl(g, SET_MEMORY_ATTRIBUTES2, &a) == 0)
		return 0;
	if (err_off)
		*err_off = a.error_offset;
	return -errno;
}

/* Read one byte at p in a child: its wait status. */
static int touch_in_child(volatile const unsigned char *p)
{
	int st = 0;
	pid_t pid = fork();

	if (pid == 0) {
		(void)*p;
		_exit(0);
	}
	if (pid < 0 || waitpid(pid, &st, 0) != pid)
		return -1;
	return st;
}

int main(void)
{
	struct kvm_create_guest_memfd c;
	int kvm, vm, g, st, r;
	unsigned char *p;
	uint64_t off = 0;

	setvbuf(stdout, NULL, _IOLBF, 0);
	kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	check(kvm >= 0, "open /dev/kvm");
	check((ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_VM_TYPES) & (1 << SW_PROTECTED_VM)) != 0,
	      "KVM_CAP_VM_TYPES offers the software-protected VM");
	vm = ioctl(kvm, KVM_CREATE_VM, SW_PROTECTED_VM);
	check(vm >= 0, "KVM_CREATE_VM(KVM_X86_SW_PROTECTED_VM)");
	memset(&c, 0, sizeof(c));
	c.size = SIZE;
	c.flags = GMEM_MMAP;
	g = ioctl(vm, KVM_CREATE_GUEST_MEMFD, &c);
	check(g >= 0, "KVM_CREATE_GUEST_MEMFD(MMAP), no INIT_SHARED");
	if (kvm < 0 || vm < 0 || g < 0) {
		printf("1..%d\n", n);
		return 1;
	}
	p = mmap(NULL, SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, g, 0);
	check(p != MAP_FAILED, "mmap of the guest_memfd");
	if (p == MAP_FAILED) {
		printf("1..%d\n", n);
		return 1;
	}
	st = touch_in_child(p);
	check(WIFSIGNALED(st) && WTERMSIG(st) == SIGBUS, "a private page through mmap is SIGBUS");

	check(convert(g, 0, 8192, 0, NULL) == 0, "pages 0-1 converted to shared");
	memcpy(p + 4096, "hello", 5);
	check(memcmp(p + 4096, "hello", 5) == 0, "a shared page is read and written through mmap");
	check(convert(g, 4096, 4097, 1, NULL) == -EINVAL, "an unaligned size is EINVAL");

	r = convert(g, 4096, 4096, 1, &off);
	check(r == -EAGAIN && off == 4096,
	      "a page this program maps cannot become private: EAGAIN, error_offset at it");
	errno = 0;
	check(fallocate(g, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, 4096, 4096) < 0 &&
		      errno == EBUSY,
	      "nor can it be punched while mapped: EBUSY (its frame would stay mapped here)");
	check(memcmp(p + 4096, "hello", 5) == 0, "and its bytes are still there");
	munmap(p, SIZE);
	check(convert(g, 0, 8192, 1, NULL) == 0, "unmapped, the pages become private");
	p = mmap(NULL, SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, g, 0);
	check(p != MAP_FAILED, "mmap again");
	if (p != MAP_FAILED) {
		st = touch_in_child(p + 4096);
		check(WIFSIGNALED(st) && WTERMSIG(st) == SIGBUS, "the private page is SIGBUS again");
		check(convert(g, 4096, 4096, 0, NULL) == 0, "page 1 shared again");
		check(memcmp(p + 4096, "hello", 5) == 0,
		      "its bytes stayed in place through private and back");
		munmap(p, SIZE);
	}
	close(g);
	close(vm);
	close(kvm);
	printf("1..%d\n", n);
	return failures ? 1 : 0;
}
