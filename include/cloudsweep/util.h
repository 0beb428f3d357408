/*
 * util.h - small helpers every module uses: allocation that never returns
 * NULL for control structures, monotonic and wall clocks, RFC 3339 time,
 * random bytes, hex, and constant-time comparison. Allocation failure on
 * small control structures is fatal (the process cannot do anything useful
 * without them); allocation driven by untrusted input must be bounded by the
 * caller and uses plain malloc so the failure can be answered.
 */
#ifndef CLOUDSWEEP_UTIL_H
#define CLOUDSWEEP_UTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#define CS_UNUSED       __attribute__((unused))
#define CS_WUR          __attribute__((warn_unused_result))
#define CS_PRINTF(f, a) __attribute__((format(printf, f, a)))
#define CS_NORETURN     __attribute__((noreturn))
#define CS_ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

/* Allocate or die. */
void *xmalloc(size_t n);
/* Zeroed allocation of nmemb * size with overflow check, or die. */
void *xcalloc(size_t nmemb, size_t size);
/* Resize or die. */
void *xrealloc(void *p, size_t n);
/* Duplicate a NUL-terminated string or die. */
char *xstrdup(const char *s);
/* Duplicate n bytes of s and NUL-terminate, or die. */
char *xstrndup(const char *s, size_t n);
/* printf into a fresh allocation, or die. */
char *xasprintf(const char *fmt, ...) CS_PRINTF(1, 2);

/* Monotonic clock in milliseconds. */
uint64_t cs_now_ms(void);
/* Monotonic clock in microseconds. */
uint64_t cs_now_us(void);
/* Format a wall-clock time as RFC 3339 UTC with milliseconds into buf (>= 32 bytes). */
void cs_rfc3339(char *buf, size_t len, const struct timespec *ts);

/* Fill buf with cryptographically secure random bytes; fatal on failure. */
void cs_random(void *buf, size_t len);
/* Encode len bytes as lowercase hex into out (2*len+1 bytes). */
void cs_hex(char *out, const unsigned char *in, size_t len);
/* Compare two buffers in time that depends only on len. */
bool cs_consttime_eq(const void *a, const void *b, size_t len);
/* s is a UUID in its canonical text form (8-4-4-4-12 hex digits, either case). */
bool cs_uuid_valid(const char *s);
/* s holds an ASCII control character (below 0x20, or DEL). */
bool cs_has_control(const char *s);
/* A random version-4 UUID in canonical text form into out (37 bytes). */
void cs_uuid4(char out[37]);

/* Wipe memory holding a secret so the compiler cannot elide it. */
void cs_wipe(void *p, size_t len);
/* Wipe and free a NUL-terminated secret string; NULL is fine. */
void cs_free_secret(char *s);

/* Read a whole small file (at most max bytes) into a NUL-terminated buffer; NULL on error (errno
 * set). */
char *cs_read_file(const char *path, size_t max, size_t *lenp);
/* Strip trailing whitespace (newlines from secret files) in place. */
void cs_rstrip(char *s);

#endif
