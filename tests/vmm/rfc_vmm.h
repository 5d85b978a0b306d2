/* rfc_vmm: definitions shared by its source files (see rfc_vmm.c). */
#ifndef RFC_VMM_H
#define RFC_VMM_H

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
#define MB_MAX_GAP_US 0x30
#define MB_LOOPS 0x38
#define STATE_MAGIC 0x31304d56434652ULL /* "RFCVM01" */

enum low_kind { LOW_MEMFD, LOW_MALLOC };
enum order { VM_FIRST, GMEM_FIRST };
enum spin { SPIN_NONE, SPIN_EXITS, SPIN_TIGHT };
enum eintr { EINTR_NONE, EINTR_SIGNAL, EINTR_IMMEDIATE, EINTR_PROBE, EINTR_LATE };

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
	int live;          /* --live: the guest runs on across the update (live.c) */
};

/* What the state session's memfd holds. */
struct stage_state {
	uint64_t magic;
	uint32_t next_stage;
	uint32_t order;
	uint32_t low;
	uint32_t live; /* --live */
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

struct machine {
	int vm, gmem;
	unsigned char *gmem_map;
	struct low_mem low;
	struct vcpu v;
};

extern int failures;

void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
void report(int ok, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void die(const char *what);
uint64_t now_us(void);
uint64_t get_u64(const unsigned char *p);
unsigned char pattern_byte(uint64_t i);
void skip(const char *what);
int open_kvm(void);
void check_caps(int kvm);
int create_vm(int kvm);
int create_gmem(int vm, uint64_t size, uint64_t flags);
void set_region(int vm, uint32_t slot, uint32_t flags, uint64_t gpa, uint64_t size,
		void *uaddr, int gmem, uint64_t gmem_off);
unsigned char *map_gmem(int gmem);
void bind_gmem(int vm, int gmem, unsigned char *map);
void unbind_slot(int vm, uint32_t slot, uint32_t flags, uint64_t gpa, int gmem);
struct low_mem alloc_low(enum low_kind kind);
void free_low(struct low_mem *l);
void load_image(const char *path, unsigned char *low, uint64_t want_mode);
void print_vcpu_state(void);
void set_cpuid(int kvm, int vcpu);
void map_run(int kvm, struct vcpu *v);
struct vcpu create_vcpu(int kvm, int vm, unsigned long id);
void destroy_vcpu(struct vcpu *v);
void dump_regs(int vcpu);
uint64_t run_guest(struct vcpu *v, const unsigned char *low, const char *what);
void check_gmem(const unsigned char *map, int check_tail, const char *when);
void verify_run(int kvm, int vm, int gmem, unsigned char *gmem_map, const struct opts *o,
		unsigned long vcpu_id, long long bad_at, const char *what);
void negative_cases(int kvm, int dev);
void write_state(int dev, const struct opts *o);
void preserve_vm_and_gmem(int s, enum order order, int vm, int gmem);
int stage1(const struct opts *o, int dev);
int retrieve(int s, uint64_t token, const char *what);
int stage2(const struct opts *o, int dev, int state_s);
void spin_forever(struct vcpu *v, enum spin kind) __attribute__((noreturn));
const char *spin_name(enum spin k);
void machine_written(int kvm, const struct opts *o, struct machine *m);
void park(unsigned char *low);
void unpark(unsigned char *low);
int run_spin(const struct opts *o, int dev);
int run_bench_exits(const struct opts *o);
int run_slot_churn(const struct opts *o);
int stage1_vmm_child(const struct opts *o, int dev);
int cmp_u64(const void *a, const void *b);
int run_eintr(const struct opts *o);
int live_stage1(const struct opts *o, int dev);
int live_stage2(const struct opts *o, int dev, int state_s, uint64_t t_main);

#endif
