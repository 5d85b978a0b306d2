/*
 * Small helpers shared by the C programs in this directory: the LUO ioctls as functions that
 * return a new fd or 0 on success and -errno on failure, a byte pattern, and whole-file I/O.
 * Everything is static inline so each program compiles as one translation unit.
 */
#ifndef HANDOVER_TESTS_LU_UTIL_H
#define HANDOVER_TESTS_LU_UTIL_H

#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "liveupdate.h"

_Static_assert(sizeof(struct liveupdate_ioctl_create_session) == 72, "create_session size");
_Static_assert(sizeof(struct liveupdate_ioctl_retrieve_session) == 72, "retrieve_session size");
_Static_assert(sizeof(struct liveupdate_session_preserve_fd) == 16, "preserve_fd size");
_Static_assert(sizeof(struct liveupdate_session_retrieve_fd) == 16, "retrieve_fd size");
_Static_assert(sizeof(struct liveupdate_session_finish) == 8, "finish size");
_Static_assert(sizeof(struct liveupdate_session_get_name) == 72, "get_name size");
_Static_assert(offsetof(struct liveupdate_session_preserve_fd, token) == 8, "token offset");
_Static_assert(LIVEUPDATE_IOCTL_CREATE_SESSION == 0xBA00, "CREATE_SESSION number");
_Static_assert(LIVEUPDATE_IOCTL_RETRIEVE_SESSION == 0xBA01, "RETRIEVE_SESSION number");
_Static_assert(LIVEUPDATE_SESSION_PRESERVE_FD == 0xBA40, "PRESERVE_FD number");
_Static_assert(LIVEUPDATE_SESSION_RETRIEVE_FD == 0xBA41, "RETRIEVE_FD number");
_Static_assert(LIVEUPDATE_SESSION_FINISH == 0xBA42, "FINISH number");
_Static_assert(LIVEUPDATE_SESSION_GET_NAME == 0xBA43, "GET_NAME number");

#define LU_PAGE 4096UL

/* Copy the C string `name` into out[64], zero-padded; at most 63 bytes are taken. */
static inline void lu_name(unsigned char out[LIVEUPDATE_SESSION_NAME_LENGTH], const char *name)
{
	size_t i = 0;

	memset(out, 0, LIVEUPDATE_SESSION_NAME_LENGTH);
	for (; i < LIVEUPDATE_SESSION_NAME_LENGTH - 1 && name[i]; i++)
		out[i] = (unsigned char)name[i];
}

/* Create an outgoing session from 64 raw name bytes (not necessarily NUL-terminated). */
static inline int lu_create_session_raw(int dev, const unsigned char name[LIVEUPDATE_SESSION_NAME_LENGTH])
{
	struct liveupdate_ioctl_create_session a;

	memset(&a, 0, sizeof(a));
	a.size = sizeof(a);
	a.fd = -1;
	memcpy(a.name, name, sizeof(a.name));
	if (ioctl(dev, LIVEUPDATE_IOCTL_CREATE_SESSION, &a) < 0)
		return -errno;
	return a.fd;
}

static inline int lu_create_session(int dev, const char *name)
{
	unsigned char raw[LIVEUPDATE_SESSION_NAME_LENGTH];

	lu_name(raw, name);
	return lu_create_session_raw(dev, raw);
}

static inline int lu_retrieve_session(int dev, const char *name)
{
	struct liveupdate_ioctl_retrieve_session a;

	memset(&a, 0, sizeof(a));
	a.size = sizeof(a);
	a.fd = -1;
	lu_name(a.name, name);
	if (ioctl(dev, LIVEUPDATE_IOCTL_RETRIEVE_SESSION, &a) < 0)
		return -errno;
	return a.fd;
}

static inline int lu_preserve_fd(int session, int fd, uint64_t token)
{
	struct liveupdate_session_preserve_fd a;

	memset(&a, 0, sizeof(a));
	a.size = sizeof(a);
	a.fd = fd;
	a.token = token;
	if (ioctl(session, LIVEUPDATE_SESSION_PRESERVE_FD, &a) < 0)
		return -errno;
	return 0;
}

static inline int lu_retrieve_fd(int session, uint64_t token)
{
	struct liveupdate_session_retrieve_fd a;

	memset(&a, 0, sizeof(a));
	a.size = sizeof(a);
	a.fd = -1;
	a.token = token;
	if (ioctl(session, LIVEUPDATE_SESSION_RETRIEVE_FD, &a) < 0)
		return -errno;
	return a.fd;
}

static inline int lu_finish(int session)
{
	struct liveupdate_session_finish a;

	memset(&a, 0, sizeof(a));
	a.size = sizeof(a);
	if (ioctl(session, LIVEUPDATE_SESSION_FINISH, &a) < 0)
		return -errno;
	return 0;
}

/* GET_NAME into out[64]; returns 0 or -errno. */
static inline int lu_get_name(int session, char out[LIVEUPDATE_SESSION_NAME_LENGTH])
{
	struct liveupdate_session_get_name a;

	memset(&a, 0, sizeof(a));
	a.size = sizeof(a);
	if (ioctl(session, LIVEUPDATE_SESSION_GET_NAME, &a) < 0)
		return -errno;
	memcpy(out, a.name, sizeof(a.name));
	return 0;
}

/* The deterministic content of byte `off` of the file preserved under `token`. */
static inline unsigned char lu_pattern(uint64_t off, uint64_t token)
{
	return (unsigned char)((off * 31 + token) & 0xff);
}

static inline void lu_fill(unsigned char *buf, size_t len, uint64_t off, uint64_t token)
{
	for (size_t i = 0; i < len; i++)
		buf[i] = lu_pattern(off + i, token);
}

/* Index of the first byte of buf[len] (file offset `off`) that breaks the pattern, or -1. */
static inline long lu_mismatch(const unsigned char *buf, size_t len, uint64_t off, uint64_t token)
{
	for (size_t i = 0; i < len; i++)
		if (buf[i] != lu_pattern(off + i, token))
			return (long)i;
	return -1;
}

/* Index of the first non-zero byte of buf[len], or -1. */
static inline long lu_nonzero(const unsigned char *buf, size_t len)
{
	for (size_t i = 0; i < len; i++)
		if (buf[i])
			return (long)i;
	return -1;
}

/* pwrite/pread the whole buffer (looping over short transfers); 0 or -errno. */
static inline int lu_pwrite_all(int fd, const void *buf, size_t len, off_t off)
{
	const char *p = buf;

	while (len) {
		ssize_t n = pwrite(fd, p, len, off);

		if (n < 0)
			return -errno;
		if (n == 0)
			return -EIO;
		p += n;
		len -= (size_t)n;
		off += n;
	}
	return 0;
}

static inline int lu_pread_all(int fd, void *buf, size_t len, off_t off)
{
	char *p = buf;

	while (len) {
		ssize_t n = pread(fd, p, len, off);

		if (n < 0)
			return -errno;
		if (n == 0)
			return -ENODATA; /* the file ended early */
		p += n;
		len -= (size_t)n;
		off += n;
	}
	return 0;
}

static inline int lu_write_all(int fd, const void *buf, size_t len)
{
	const char *p = buf;

	while (len) {
		ssize_t n = write(fd, p, len);

		if (n < 0)
			return -errno;
		if (n == 0)
			return -EIO;
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

#endif /* HANDOVER_TESTS_LU_UTIL_H */
