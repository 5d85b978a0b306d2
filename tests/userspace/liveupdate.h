/*
 * The /dev/liveupdate user API as this project implements it (the upstream Live Update
 * Orchestrator's numbers and argument layouts), for the user-space tests in this directory.
 * Written for handover because the build machine's kernel headers have no
 * <linux/liveupdate.h>. Only the facts are upstream's: request numbers and struct layouts.
 */
#ifndef HANDOVER_TESTS_LIVEUPDATE_H
#define HANDOVER_TESTS_LIVEUPDATE_H

#include <linux/ioctl.h>
#include <linux/types.h>

#define LIVEUPDATE_DEV_PATH "/dev/liveupdate"

/* Session names are at most 63 bytes plus the terminating NUL. */
#define LIVEUPDATE_SESSION_NAME_LENGTH 64

/* Every request is _IO(0xBA, nr): no size or direction bits, so the value is 0xBA00 | nr. */
#define LIVEUPDATE_IOCTL_TYPE 0xBA

/* On the /dev/liveupdate fd. */
#define LIVEUPDATE_IOCTL_CREATE_SESSION   _IO(LIVEUPDATE_IOCTL_TYPE, 0x00) /* 0xBA00 */
#define LIVEUPDATE_IOCTL_RETRIEVE_SESSION _IO(LIVEUPDATE_IOCTL_TYPE, 0x01) /* 0xBA01 */

/* On a session fd. */
#define LIVEUPDATE_SESSION_PRESERVE_FD _IO(LIVEUPDATE_IOCTL_TYPE, 0x40) /* 0xBA40 */
#define LIVEUPDATE_SESSION_RETRIEVE_FD _IO(LIVEUPDATE_IOCTL_TYPE, 0x41) /* 0xBA41 */
#define LIVEUPDATE_SESSION_FINISH      _IO(LIVEUPDATE_IOCTL_TYPE, 0x42) /* 0xBA42 */
#define LIVEUPDATE_SESSION_GET_NAME    _IO(LIVEUPDATE_IOCTL_TYPE, 0x43) /* 0xBA43 */

/*
 * Each argument struct begins with its own size in bytes; the kernel accepts a shorter
 * struct down to a minimum and a longer one whose extra bytes are zero.
 */

/* CREATE_SESSION: name in, fd of the new outgoing session out (72 bytes). */
struct liveupdate_ioctl_create_session {
	__u32 size;
	__s32 fd;
	__u8 name[LIVEUPDATE_SESSION_NAME_LENGTH];
};

/* RETRIEVE_SESSION: name in, fd of the incoming session out (72 bytes). */
struct liveupdate_ioctl_retrieve_session {
	__u32 size;
	__s32 fd;
	__u8 name[LIVEUPDATE_SESSION_NAME_LENGTH];
};

/* PRESERVE_FD: the fd to preserve and the caller's token for it, both in (16 bytes). */
struct liveupdate_session_preserve_fd {
	__u32 size;
	__s32 fd;
	__aligned_u64 token;
};

/* RETRIEVE_FD: token in, fd of the restored file out (16 bytes). */
struct liveupdate_session_retrieve_fd {
	__u32 size;
	__s32 fd;
	__aligned_u64 token;
};

/* FINISH: nothing but a reserved word that must be zero (8 bytes). */
struct liveupdate_session_finish {
	__u32 size;
	__u32 reserved;
};

/* GET_NAME: reserved must be zero; the session's name comes back NUL-terminated (72 bytes). */
struct liveupdate_session_get_name {
	__u32 size;
	__u32 reserved;
	__u8 name[LIVEUPDATE_SESSION_NAME_LENGTH];
};

#endif /* HANDOVER_TESTS_LIVEUPDATE_H */
