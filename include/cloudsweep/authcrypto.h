/*
 * authcrypto.h - the cryptographic primitives behind login: argon2id
 * password hashing (synchronous, and asynchronous on the worker's thread
 * pool so the reactor never spends tens of milliseconds in argon2), the
 * password policy, TOTP (RFC 6238 over HOTP, RFC 4226) with base32 secrets
 * and otpauth:// URIs, and single-use backup codes.
 *
 * Nothing here touches the database: storing hashes, remembering the last
 * TOTP step accepted and spending a backup code exactly once (UPDATE ...
 * WHERE used_at IS NULL RETURNING) are the caller's. Passwords, TOTP
 * secrets and backup codes are secrets: callers wipe their copies
 * (cs_wipe / cs_free_secret) and never log them; this module wipes every
 * copy it makes.
 */
#ifndef CLOUDSWEEP_AUTHCRYPTO_H
#define CLOUDSWEEP_AUTHCRYPTO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include "cloudsweep/threadpool.h"
#include "cloudsweep/util.h"

/* argon2id defaults (OWASP's m=19 MiB, t=2, p=1) and bounds accepted from config or a PHC. */
#define PASSWORD_M_DEFAULT 19456 /* KiB */
#define PASSWORD_T_DEFAULT 2
#define PASSWORD_P_DEFAULT 1
#define PASSWORD_M_MIN     8       /* KiB; argon2 needs 8 KiB per lane */
#define PASSWORD_M_MAX     1048576 /* KiB (1 GiB): a stored PHC cannot make us allocate more */
#define PASSWORD_T_MAX     64
#define PASSWORD_P_MAX     16
#define PASSWORD_SALT_LEN  16
#define PASSWORD_HASH_LEN  32
#define PASSWORD_MIN_CHARS 12  /* code points */
#define PASSWORD_MAX_CHARS 128 /* code points */
#define PASSWORD_MAX_BYTES 512 /* 128 code points of at most 4 bytes */
#define PASSWORD_PHC_MAX   160 /* longest PHC string produced or accepted */

/* argon2id cost parameters. */
struct password_params {
	uint32_t m_kib;       /* memory in KiB */
	uint32_t t_cost;      /* passes */
	uint32_t parallelism; /* lanes (argon2 runs them on one thread here) */
};

/* The defaults, for callers that have no configuration. */
extern const struct password_params password_params_default;

/* Whether params lie within the bounds above (m >= 8 * p as argon2 requires). */
bool password_params_valid(const struct password_params *params);

/*
 * argon2id of pw (pwlen bytes, at most PASSWORD_MAX_BYTES) under a fresh
 * 16-byte salt, as a PHC string "$argon2id$v=19$m=..,t=..,p=..$salt$hash"
 * (unpadded base64) that the caller frees. params NULL means the defaults.
 * NULL on invalid parameters or failure (logged without the password).
 * Blocks for as long as argon2 takes: on the reactor use password_hash_start.
 */
char *password_hash(const struct password_params *params, const char *pw, size_t pwlen);

/*
 * Check pw against a PHC string: 0 match, 1 mismatch, -1 malformed or
 * unsupported PHC (anything but argon2id v=19 within the bounds above).
 * The comparison is constant-time. A pw longer than PASSWORD_MAX_BYTES is
 * a mismatch (no such password can have been set).
 */
int password_verify(const char *phc, const char *pw, size_t pwlen) CS_WUR;

/* Whether phc should be recomputed with params at the next successful login. */
bool password_needs_rehash(const char *phc, const struct password_params *params);

/*
 * The policy for a new password: 12 to 128 code points of valid UTF-8 (no
 * NUL, no overlong forms or surrogates), and not the email address in any
 * ASCII letter case. Returns 0 when acceptable, else -1 with *why set to a
 * static message fit for the client (it never quotes the password).
 */
int password_policy_check(const char *pw, size_t pwlen, const char *email, const char **why) CS_WUR;

/*
 * The PHC of a random password under params (NULL: defaults), computed on
 * the first call and again whenever params change. Verify against it when
 * the email is unknown, so that answer costs the same argon2 time as a
 * real check. Call once at start-up (it blocks for one hash); the string
 * is borrowed, valid until a call with other params. NULL on failure.
 */
const char *password_dummy_hash(const struct password_params *params);
/* Release the cached dummy hash (for leak-checked tests and shutdown). */
void password_dummy_clear(void);

struct password_job;

/* A hash finished: phc is borrowed for the call, NULL when hashing failed. */
typedef void (*password_hash_cb)(void *arg, const char *phc);
/* A verification finished: result as password_verify (0 / 1 / -1). */
typedef void (*password_verify_cb)(void *arg, int result);

/*
 * password_hash on a pool thread; cb runs on the reactor. The password is
 * copied (and the copy wiped as soon as argon2 has read it), so pw may be
 * wiped when this returns. Returns a handle, or NULL without calling back
 * when the pool's queue is full (answer 503) or the arguments are invalid.
 */
struct password_job *password_hash_start(struct threadpool *tp,
                                         const struct password_params *params, const char *pw,
                                         size_t pwlen, password_hash_cb cb, void *arg);
/* password_verify on a pool thread (phc and pw copied); as password_hash_start otherwise. */
struct password_job *password_verify_start(struct threadpool *tp, const char *phc, const char *pw,
                                           size_t pwlen, password_verify_cb cb, void *arg);
/* Forget a job: cb will not run; the pool wipes and frees the copies when the work ends. */
void password_cancel(struct password_job *job);

/* TOTP: RFC 6238 with SHA-1, 30 s steps, 6 digits, secrets of 20 bytes. */
#define TOTP_SECRET_LEN 20
#define TOTP_B32_LEN    32 /* unpadded base32 of a 20-byte secret */
#define TOTP_PERIOD     30
#define TOTP_DIGITS     6
#define TOTP_WINDOW     1   /* steps accepted either side of now */
#define TOTP_LABEL_MAX  256 /* longest issuer or account accepted in a URI */

/* Fill secret with TOTP_SECRET_LEN bytes from the private DRBG; 0 or -1. */
int totp_secret_generate(unsigned char secret[TOTP_SECRET_LEN]) CS_WUR;

/*
 * Base32 (RFC 4648, upper case) of len bytes into a new string, with "="
 * padding when pad is true (otpauth URIs use none). Caller frees.
 */
char *totp_base32_encode(const unsigned char *in, size_t len, bool pad);

/*
 * Decode base32, ignoring letter case, spaces and trailing "=" padding,
 * into out (outmax bytes). Returns the number of bytes, or -1 when the
 * input holds another character, has impossible length or trailing bits
 * that are not zero, or does not fit.
 */
long totp_base32_decode(const char *in, unsigned char *out, size_t outmax) CS_WUR;

/* The time step (RFC 6238's T) holding Unix time now. */
int64_t totp_time_step(time_t now);

/* HOTP (RFC 4226, HMAC-SHA-1) of counter with digits (6..8) digits; -1 on error. */
long totp_hotp(const unsigned char *secret, size_t len, uint64_t counter, int digits);

/* The 6-digit TOTP code for a time step; -1 on error. */
long totp_code(const unsigned char *secret, size_t len, int64_t step);

/*
 * Check a code typed by the user (6 digits; spaces ignored) at Unix time
 * now, within +-TOTP_WINDOW steps. A step <= last_used_step (0 when no
 * code was ever accepted) is refused, so each code is accepted once: on
 * success the caller stores *matched_step as the new last_used_step.
 * Every candidate is compared in constant time. Returns 0 accepted, 1
 * refused (wrong, replayed or malformed code), -1 internal error.
 */
int totp_verify(const unsigned char *secret, size_t len, const char *code, time_t now,
                int64_t last_used_step, int64_t *matched_step) CS_WUR;

/*
 * The Key Uri Format enrollment URI
 * "otpauth://totp/Issuer:account?secret=..&issuer=..&algorithm=SHA1&digits=6&period=30"
 * with issuer and account percent-encoded (RFC 3986: all but unreserved
 * characters). Caller frees. NULL when issuer or account is empty, longer
 * than TOTP_LABEL_MAX or holds a colon (the Key Uri Format forbids one,
 * even encoded), or secret_b32 is not unpadded upper-case base32.
 */
char *totp_otpauth_uri(const char *issuer, const char *account, const char *secret_b32);

/* Release this thread's HMAC context (tests and shutdown). */
void totp_shutdown(void);

/* Backup codes: 12 symbols of a 31-symbol alphabet, shown as "xxxxxx-xxxxxx". */
#define BACKUP_CODE_COUNT    10
#define BACKUP_CODE_SYMBOLS  12                        /* ~59.5 bits of entropy */
#define BACKUP_CODE_SIZE     (BACKUP_CODE_SYMBOLS + 2) /* one dash and the NUL */
#define BACKUP_CODE_HASH_LEN 64                        /* hex SHA-256 */

/* The alphabet: lower-case letters and digits without 0, o, 1, l, i. */
extern const char backup_code_alphabet[];

/*
 * Fill out[0..n-1] with n distinct fresh codes "xxxxxx-xxxxxx", each
 * symbol drawn uniformly (rejection sampling over private DRBG bytes).
 * Show them once, store only backup_code_hash, then cs_wipe them. 0 or -1.
 */
int backup_codes_generate(size_t n, char (*out)[BACKUP_CODE_SIZE]) CS_WUR;

/*
 * The stored form of a code for user_id: hex SHA-256 over a domain label,
 * the user id and the normalized code (lower-cased; dashes and spaces
 * removed), for an indexed equality lookup on (user_id, hash). Caller
 * frees. NULL when the code does not normalize to BACKUP_CODE_SYMBOLS
 * symbols of the alphabet (so it cannot match any stored code).
 */
char *backup_code_hash(const char *user_id, const char *code);

#endif
