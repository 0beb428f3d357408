/*
 * aws.h - everything CloudSweep needs to talk to AWS. The module is built in
 * sections, each below its own banner: request signing (AWS Signature
 * Version 4) comes first; request building, transport and XML parsing
 * follow it in later sections.
 *
 * Signing is pure computation on the caller's thread: it never blocks, never
 * calls back and keeps no pointer into the request after it returns. A
 * struct sigv4_signer owns the OpenSSL contexts it reuses for every request
 * and a small cache of derived signing keys, so it belongs to exactly one
 * thread (one per worker reactor). Secrets are borrowed, never copied into
 * long-lived memory: the cache is keyed by an HMAC of the secret under a
 * per-signer random key, and every derived key is wiped when its entry is
 * evicted or the signer freed. Nothing in this section logs a secret.
 */
#ifndef CLOUDSWEEP_AWS_H
#define CLOUDSWEEP_AWS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include "cloudsweep/util.h"

/* ==== Credentials ==== */

/*
 * One set of AWS credentials. Every pointer is borrowed: the signer reads
 * the values during a call and keeps none of them (the session token, when
 * present, is referenced by struct sigv4_result until it is cleared).
 */
struct aws_credentials {
	const char *access_key_id;     /* "AKIA..." or "ASIA..."; borrowed */
	const char *secret_access_key; /* borrowed; never copied, logged or cached in clear */
	const char *session_token;     /* STS session token, or NULL for long-term keys */
};

/* ==== Signature Version 4 ==== */

#define SIGV4_ALGORITHM        "AWS4-HMAC-SHA256"
#define SIGV4_UNSIGNED_PAYLOAD "UNSIGNED-PAYLOAD"
#define SIGV4_HASH_HEX_LEN     64   /* hex SHA-256 / HMAC-SHA256 */
#define SIGV4_AMZ_DATE_LEN     16   /* YYYYMMDDTHHMMSSZ */
#define SIGV4_CACHE_DEFAULT    64   /* signing keys kept when 0 is asked for */
#define SIGV4_CACHE_MAX        4096 /* most signing keys a signer keeps */
#define SIGV4_ADD_MAX          4    /* headers sigv4_sign asks the caller to add */

/* Input limits: anything larger is refused (-1) before any allocation. */
#define SIGV4_METHOD_MAX       16    /* bytes of method */
#define SIGV4_PATH_MAX         8192  /* bytes of path */
#define SIGV4_QUERY_MAX        16384 /* bytes of query string */
#define SIGV4_QUERY_PARAMS_MAX 256   /* query parameters */
#define SIGV4_HEADERS_MAX      64    /* caller headers */
#define SIGV4_HEADER_NAME_MAX  128   /* bytes of one header name */
#define SIGV4_HEADER_VALUE_MAX 8192  /* bytes of one header value */
#define SIGV4_SCOPE_PART_MAX   63    /* bytes of region or service */
#define SIGV4_KEY_ID_MAX       128   /* bytes of access key id */
#define SIGV4_SECRET_MAX       128   /* bytes of secret access key */
#define SIGV4_TOKEN_MAX        8192  /* bytes of session token */

/* Options for one request; 0 is right for every query and JSON protocol service. */
enum sigv4_flags {
	SIGV4_NO_NORMALIZE_PATH = 1 << 0, /* keep ".", ".." and empty path segments as they are */
	SIGV4_NO_DOUBLE_ENCODE = 1 << 1,  /* the path is used as given, not URI-encoded again */
	SIGV4_CONTENT_SHA256 = 1 << 2,    /* add and sign X-Amz-Content-Sha256 */
	SIGV4_TOKEN_UNSIGNED = 1 << 3,    /* add X-Amz-Security-Token but leave it unsigned */
};

/* What S3 expects: the path verbatim and the payload hash as a header. */
#define SIGV4_S3 (SIGV4_NO_NORMALIZE_PATH | SIGV4_NO_DOUBLE_ENCODE | SIGV4_CONTENT_SHA256)

/* One header: a name/value pair, both borrowed. */
struct sigv4_header {
	const char *name;  /* a token; matched case-insensitively */
	const char *value; /* no CR, LF or NUL; surrounding and repeated blanks do not matter */
};

/*
 * The request to sign. Every pointer is borrowed for the duration of the
 * call. path and query are exactly what goes on the request line (path
 * from its leading '/', query without '?'); the signer canonicalizes them
 * (query parameters are percent-decoded and re-encoded per RFC 3986, so a
 * wire query may use either form). headers are all the headers to sign and
 * must include Host; repeated names are signed as one comma-joined value in
 * their order here. The signer itself adds X-Amz-Date, X-Amz-Security-Token
 * (when the credentials carry one) and, with SIGV4_CONTENT_SHA256,
 * X-Amz-Content-Sha256, and refuses those names (and Authorization) in
 * headers.
 */
struct sigv4_request {
	const char *method;                 /* "GET", "POST", ... */
	const char *path;                   /* "/" for query and JSON protocol APIs */
	const char *query;                  /* "Action=...&Version=...", or NULL / "" */
	const struct sigv4_header *headers; /* nheaders entries */
	size_t nheaders;
	const void *payload;      /* body, or NULL when payload_len is 0 */
	size_t payload_len;       /* body length; any size (it is only hashed) */
	const char *payload_hash; /* precomputed hex SHA-256 or SIGV4_UNSIGNED_PAYLOAD; NULL: hash
	                             payload */
	const char *region;       /* "us-east-1" */
	const char *service;      /* "ec2", "sts", ... (the signing name) */
	time_t now;               /* signing time (UTC seconds); tests inject a fixed one */
	unsigned flags;           /* enum sigv4_flags */
};

/*
 * What signing produced. headers[0..nheaders) are the headers to add to the
 * request, in this order; their values point into this struct (and, for
 * X-Amz-Security-Token, into the credentials), so the struct must not be
 * copied and the credentials must outlive its use. Release it with
 * sigv4_result_clear().
 */
struct sigv4_result {
	char amz_date[SIGV4_AMZ_DATE_LEN + 1];      /* X-Amz-Date value */
	char payload_hash[SIGV4_HASH_HEX_LEN + 1];  /* payload hash that was signed */
	char signature[SIGV4_HASH_HEX_LEN + 1];     /* hex signature */
	char *authorization;                        /* owned: Authorization value */
	struct sigv4_header headers[SIGV4_ADD_MAX]; /* headers to add; borrowed values */
	size_t nheaders;
};

/* Counters of the signing-key cache, for tests and metrics. */
struct sigv4_stats {
	uint64_t hits;      /* signing keys found in the cache */
	uint64_t misses;    /* signing keys derived */
	uint64_t evictions; /* entries dropped to make room */
	size_t entries;     /* entries in use */
	size_t capacity;    /* entries the cache holds */
};

struct sigv4_signer;

/*
 * A signer with room for cache_entries signing keys (0: SIGV4_CACHE_DEFAULT,
 * at most SIGV4_CACHE_MAX). One per thread. NULL when OpenSSL cannot
 * provide HMAC-SHA256 (logged).
 */
struct sigv4_signer *sigv4_signer_new(size_t cache_entries);
/* Wipe every cached key and release the signer; NULL is fine. */
void sigv4_signer_free(struct sigv4_signer *s);
/* Copy the cache counters into st. */
void sigv4_signer_stats(const struct sigv4_signer *s, struct sigv4_stats *st);

/*
 * Sign req with cred. On success fills out (which the caller then clears
 * with sigv4_result_clear) and returns 0. Returns -1, with out cleared,
 * when an input is malformed or over a limit above, or on an OpenSSL
 * failure (logged, without any secret).
 */
int sigv4_sign(struct sigv4_signer *s, const struct aws_credentials *cred,
               const struct sigv4_request *req, struct sigv4_result *out) CS_WUR;
/* Free what out owns and zero it; safe on a zeroed or already cleared result. */
void sigv4_result_clear(struct sigv4_result *out);

/*
 * The canonical request (*creqp) and the string to sign (*stsp) sigv4_sign
 * would use, as malloc'd strings the caller frees; either pointer may be
 * NULL when not wanted. For tests and debugging: neither holds a secret.
 * Returns 0, or -1 as sigv4_sign does (outputs set to NULL).
 */
int sigv4_canonical(struct sigv4_signer *s, const struct aws_credentials *cred,
                    const struct sigv4_request *req, char **creqp, char **stsp) CS_WUR;

/*
 * URI-encode len bytes of in per the SigV4 rules (RFC 3986 unreserved
 * characters stay, everything else becomes %XX in upper case; '/' stays too
 * when keep_slash) into a malloc'd string; NULL when len is over
 * SIGV4_QUERY_MAX. Callers use it to build query strings and S3 keys that
 * sign the same way they travel.
 */
char *sigv4_uri_encode(const char *in, size_t len, bool keep_slash);

#endif
