/*
 * rfc_vmm: the guest_memfd preservation scenario of the 2026 RFC, as an ordinary C VMM that
 * talks to /dev/kvm and /dev/liveupdate with plain ioctls.
 *
 *   rfc_vmm IMAGE_WRITE IMAGE_VERIFY [--low malloc|memfd] [--order vm-first|gmem-first]
 *           [--native [--corrupt OFFSET]] [--skip-negative]
 *   rfc_vmm IMAGE_WRITE IMAGE_VERIFY --spin exits|tight [--native] [--low ...]
 *   rfc_vmm IMAGE_WRITE IMAGE_VERIFY --eintr signal|immediate|probe|late [--native] [--low ...]
 *   rfc_vmm IMAGE_WRITE IMAGE_VERIFY --vmm-child exits|tight [--low ...] [--order ...]
 *   rfc_vmm IMAGE_WRITE IMAGE_VERIFY --live [--order ...]
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
 * --live (live.c): the guest keeps running across the update and measures its blackout.
 *
 * Every ioctl number and struct this needs beyond the build machine's <linux/kvm.h> is defined
 * here (guarded), with the upstream values; the static asserts pin the request numbers.
 */
#include "rfc_vmm.h"

static void usage(void)
{
	fprintf(stderr, "usage: rfc_vmm IMAGE_WRITE IMAGE_VERIFY [--low malloc|memfd] "
			"[--order vm-first|gmem-first] [--native [--corrupt OFFSET]]\n"
			"               [--skip-negative]\n"
			"       rfc_vmm IMAGE_WRITE IMAGE_VERIFY --spin exits|tight [--native] [--low ...]\n"
			"       rfc_vmm IMAGE_WRITE IMAGE_VERIFY --eintr signal|immediate|probe|late [--native] "
			"[--low ...]\n"
			"       rfc_vmm IMAGE_WRITE IMAGE_VERIFY --vmm-child exits|tight [--low ...] "
			"[--order ...]\n"
			"       rfc_vmm IMAGE_WRITE IMAGE_VERIFY --bench-exits N [--native] [--low ...]\n"
			"       rfc_vmm IMAGE_WRITE IMAGE_VERIFY --slot-churn [--native] [--low ...]\n"
			"       rfc_vmm IMAGE_WRITE IMAGE_VERIFY --live [--order ...]\n"
			"       rfc_vmm --print-sregs\n");
	exit(2);
}

int main(int argc, char **argv)
{
	struct opts o = { NULL, NULL, LOW_MEMFD, VM_FIRST, 0, 0, -1, SPIN_NONE, EINTR_NONE, SPIN_NONE, 0, 0 };
	int npos = 0, dev, state_s;
	uint64_t t_main = now_us(); /* stage 2 of --live: the end of the update, as main sees it */

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
			else if (!strcmp(a, "late"))
				o.eintr = EINTR_LATE;
			else
				usage();
		} else if (!strcmp(a, "--bench-exits") && i + 1 < argc) {
			o.bench_exits = strtol(argv[++i], NULL, 0);
			if (o.bench_exits < 10)
				usage();
		} else if (!strcmp(a, "--live")) {
			o.live = 1;
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
	/* --live preserves low memory: it must be a memfd. */
	if (o.live && (o.native || o.low != LOW_MEMFD || o.spin != SPIN_NONE ||
		       o.eintr != EINTR_NONE || o.child != SPIN_NONE || o.bench_exits || o.slot_churn))
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
		printf("rfc_vmm: stage 2%s\n", o.live ? " (live)" : "");
		return o.live ? live_stage2(&o, dev, state_s, t_main) : stage2(&o, dev, state_s);
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
	if (o.live)
		return live_stage1(&o, dev);
	return o.child != SPIN_NONE ? stage1_vmm_child(&o, dev) : stage1(&o, dev);
}
