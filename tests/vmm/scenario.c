/* rfc_vmm: the RFC scenario in two stages, and the LUO negative cases. */
#include "rfc_vmm.h"
/* ---- The verify half (stage 2, or the second half of --native) ---- */

/*
 * On `vm` (holding `gmem`): fresh low memory with the verify image at slot 0, the guest_memfd
 * bound at 4 GiB (slot 1), a new vCPU `vcpu_id`; run the guest and expect VERIFY_OK, or with
 * `bad_at` >= 0 VERIFY_FAILED at that offset.
 */
void verify_run(int kvm, int vm, int gmem, unsigned char *gmem_map, const struct opts *o,
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

void negative_cases(int kvm, int dev)
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

	/*
	 * A vCPU fd has a handler in handover (kvm_vcpu_luo_v1, beyond the RFC, where it is
	 * ENOENT); closing the session below unpreserves it. The /dev/kvm fd has none.
	 */
	fd = ioctl(vm, KVM_CREATE_VCPU, 0UL);
	if (fd < 0) {
		report(0, "vCPU fd: KVM_CREATE_VCPU failed: %s", strerror(errno));
	} else {
		r = lu_preserve_fd(s, fd, 0x9003);
		report(r == 0, "PRESERVE_FD of a vCPU fd succeeds (kvm_vcpu_luo_v1) (got %s)",
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

void write_state(int dev, const struct opts *o)
{
	struct stage_state st;
	int s, m, r;

	memset(&st, 0, sizeof(st));
	st.magic = STATE_MAGIC;
	st.next_stage = 2;
	st.order = o->order;
	st.low = o->low;
	st.live = (uint32_t)o->live;
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
void preserve_vm_and_gmem(int s, enum order order, int vm, int gmem)
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

int stage1(const struct opts *o, int dev)
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
		skip("PRESERVE_FD of a vCPU fd succeeds (kvm_vcpu_luo_v1)");
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

int retrieve(int s, uint64_t token, const char *what)
{
	int fd = lu_retrieve_fd(s, token);

	if (fd < 0) {
		errno = -fd;
		die(what);
	}
	return fd;
}

int stage2(const struct opts *o, int dev, int state_s)
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
	if (st.order != (uint32_t)o->order || st.low != (uint32_t)o->low || st.live)
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
