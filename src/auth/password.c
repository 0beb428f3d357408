/*
 * password.c - argon2id password hashes in PHC form, the password policy,
 * the dummy hash that keeps unknown-email logins as slow as real ones, and
 * the asynchronous wrappers that run argon2 on the worker's thread pool.
 *
 * A stored PHC string is parsed and bounded before libargon2 sees it, so a
 * corrupted or hostile row cannot make a worker allocate gigabytes. The
 * asynchronous wrappers copy the password into a job the pool owns; the
 * work function wipes the copy as soon as argon2 has read it, and the
 * cleanup wipes it too when the job is cancelled before it ran.
 */
#include "config.h"

#include <argon2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include <openssl/rand.h>

#include "cloudsweep/authcrypto.h"
#include "cloudsweep/log.h"
#include "cloudsweep/threadpool.h"
#include "cloudsweep/util.h"

#define PASSWORD_PHC_PREFIX  "$argon2id$v=19$"
#define PASSWORD_SALT_B64LEN 22      /* unpadded base64 of PASSWORD_SALT_LEN bytes */
#define PASSWORD_HASH_B64LEN 43      /* unpadded base64 of PASSWORD_HASH_LEN bytes */
#define PASSWORD_DUMMY_LEN   32      /* random bytes hashed for the dummy */
#define PASSWORD_ERR_RAND    (-1000) /* our own error code beside libargon2's: no salt */
#define PASSWORD_NICE        10      /* hashing threads yield the cores to the reactors */

const struct password_params password_params_default = {
	.m_kib = PASSWORD_M_DEFAULT,
	.t_cost = PASSWORD_T_DEFAULT,
	.parallelism = PASSWORD_P_DEFAULT,
};

/* What a PHC string says, once parsed; the base64 parts are only measured. */
struct password_phc {
	struct password_params params;
	size_t salt_b64len;
	size_t hash_b64len;
};

enum password_job_kind {
	PASSWORD_JOB_HASH,   /* pw -> phc */
	PASSWORD_JOB_VERIFY, /* phc + pw -> result */
};

struct password_job {
	enum password_job_kind kind;
	struct tp_job *tpj;            /* the pool's handle; valid until done or cleanup */
	struct password_params params; /* hash only */
	char *pw;                      /* owned copy; wiped and freed by the work or cleanup */
	size_t pwlen;
	char *phc;  /* owned: the input (verify) or the output (hash), or NULL */
	int result; /* verify: 0 / 1 / -1 */
	password_hash_cb hash_cb;
	password_verify_cb verify_cb;
	void *arg; /* the caller's, borrowed; never touched after a cancel */
};

static char *password_dummy;                      /* owned PHC, or NULL */
static struct password_params password_dummy_for; /* params password_dummy was made with */

bool password_params_valid(const struct password_params *p)
{
	return p->t_cost >= 1 && p->t_cost <= PASSWORD_T_MAX && p->parallelism >= 1 &&
	       p->parallelism <= PASSWORD_P_MAX && p->m_kib >= PASSWORD_M_MIN &&
	       p->m_kib <= PASSWORD_M_MAX && p->m_kib >= 8 * p->parallelism;
}

/* Parse a decimal uint32 without sign or leading zeros at *sp; advances *sp. */
static int password_parse_u32(const char **sp, uint32_t *out)
{
	const char *s = *sp;
	uint64_t v = 0;
	size_t n = 0;

	if (s[0] == '0' && s[1] >= '0' && s[1] <= '9')
		return -1;
	while (s[n] >= '0' && s[n] <= '9') {
		v = v * 10 + (uint64_t)(s[n] - '0');
		if (++n > 10 || v > UINT32_MAX)
			return -1;
	}
	if (n == 0)
		return -1;
	*out = (uint32_t)v;
	*sp = s + n;
	return 0;
}

/* Length of the run of unpadded base64 characters at s. */
static size_t password_b64_span(const char *s)
{
	return strspn(s, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/");
}

/* Parse "$argon2id$v=19$m=M,t=T,p=P$salt$hash" with bounded parameters; 0 or -1. */
static int password_phc_parse(const char *phc, struct password_phc *out)
{
	const char *s = phc;

	if (phc == NULL || strnlen(phc, PASSWORD_PHC_MAX + 1) > PASSWORD_PHC_MAX)
		return -1;
	if (strncmp(s, PASSWORD_PHC_PREFIX "m=", strlen(PASSWORD_PHC_PREFIX "m=")) != 0)
		return -1;
	s += strlen(PASSWORD_PHC_PREFIX "m=");
	if (password_parse_u32(&s, &out->params.m_kib) == -1 || strncmp(s, ",t=", 3) != 0)
		return -1;
	s += 3;
	if (password_parse_u32(&s, &out->params.t_cost) == -1 || strncmp(s, ",p=", 3) != 0)
		return -1;
	s += 3;
	if (password_parse_u32(&s, &out->params.parallelism) == -1 || *s++ != '$')
		return -1;
	out->salt_b64len = password_b64_span(s);
	s += out->salt_b64len;
	if (*s++ != '$')
		return -1;
	out->hash_b64len = password_b64_span(s);
	s += out->hash_b64len;
	/* libargon2 insists on at least 8 bytes of salt and 4 of hash. */
	if (*s != '\0' || out->salt_b64len < 11 || out->hash_b64len < 6)
		return -1;
	return password_params_valid(&out->params) ? 0 : -1;
}

/* Text for a libargon2 error code or ours. */
static const char *password_err_message(int err)
{
	return err == PASSWORD_ERR_RAND ? "RAND_bytes failed" : argon2_error_message(err);
}

/* argon2id without logging (safe on a pool thread); NULL on failure, *err set. */
static char *password_hash_quiet(const struct password_params *p, const char *pw, size_t pwlen,
                                 int *err)
{
	unsigned char salt[PASSWORD_SALT_LEN];
	char *phc;
	size_t len;

	*err = ARGON2_OK;
	if (pwlen > PASSWORD_MAX_BYTES || !password_params_valid(p)) {
		*err = ARGON2_INCORRECT_PARAMETER;
		return NULL;
	}
	if (RAND_bytes(salt, sizeof(salt)) != 1) {
		*err = PASSWORD_ERR_RAND;
		return NULL;
	}
	len = argon2_encodedlen(p->t_cost, p->m_kib, p->parallelism, sizeof(salt),
	                        PASSWORD_HASH_LEN, Argon2_id);
	phc = xmalloc(len);
	*err = argon2id_hash_encoded(p->t_cost, p->m_kib, p->parallelism, pw, pwlen, salt,
	                             sizeof(salt), PASSWORD_HASH_LEN, phc, len);
	if (*err != ARGON2_OK) {
		free(phc);
		return NULL;
	}
	return phc;
}

char *password_hash(const struct password_params *params, const char *pw, size_t pwlen)
{
	char *phc;
	int err;

	phc = password_hash_quiet(params != NULL ? params : &password_params_default, pw, pwlen,
	                          &err);
	if (phc == NULL)
		log_warnx("password_hash_failed", "argon2id: %s", password_err_message(err));
	return phc;
}

int password_verify(const char *phc, const char *pw, size_t pwlen)
{
	struct password_phc parsed;
	int rc;

	if (password_phc_parse(phc, &parsed) == -1)
		return -1;
	if (pw == NULL || pwlen > PASSWORD_MAX_BYTES)
		return 1;
	rc = argon2id_verify(phc, pw, pwlen);
	if (rc == ARGON2_OK)
		return 0;
	if (rc == ARGON2_VERIFY_MISMATCH)
		return 1;
	return -1;
}

bool password_needs_rehash(const char *phc, const struct password_params *params)
{
	const struct password_params *want = params != NULL ? params : &password_params_default;
	struct password_phc parsed;

	if (password_phc_parse(phc, &parsed) == -1)
		return true;
	return parsed.params.m_kib != want->m_kib || parsed.params.t_cost != want->t_cost ||
	       parsed.params.parallelism != want->parallelism ||
	       parsed.salt_b64len != PASSWORD_SALT_B64LEN ||
	       parsed.hash_b64len != PASSWORD_HASH_B64LEN;
}

/* Code points in strict UTF-8 (no NUL, overlong forms, surrogates or > U+10FFFF), or -1. */
static long password_utf8_count(const unsigned char *s, size_t len)
{
	long count = 0;
	size_t i = 0, n;
	uint32_t cp;

	while (i < len) {
		unsigned char c = s[i];

		if (c == 0)
			return -1;
		if (c < 0x80) {
			n = 1;
			cp = c;
		} else if (c >= 0xc2 && c <= 0xdf) {
			n = 2;
			cp = c & 0x1f;
		} else if (c >= 0xe0 && c <= 0xef) {
			n = 3;
			cp = c & 0x0f;
		} else if (c >= 0xf0 && c <= 0xf4) {
			n = 4;
			cp = c & 0x07;
		} else {
			return -1;
		}
		if (len - i < n)
			return -1;
		for (size_t k = 1; k < n; k++) {
			if ((s[i + k] & 0xc0) != 0x80)
				return -1;
			cp = (cp << 6) | (s[i + k] & 0x3f);
		}
		if ((n == 3 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) ||
		    (n == 4 && (cp < 0x10000 || cp > 0x10ffff)))
			return -1;
		i += n;
		count++;
	}
	return count;
}

/* Equal ignoring ASCII letter case (locale-independent). */
static bool password_ascii_caseeq(const char *a, size_t alen, const char *b)
{
	size_t blen = strlen(b);

	if (alen != blen)
		return false;
	for (size_t i = 0; i < alen; i++) {
		unsigned char x = (unsigned char)a[i], y = (unsigned char)b[i];

		if (x >= 'A' && x <= 'Z')
			x = (unsigned char)(x - 'A' + 'a');
		if (y >= 'A' && y <= 'Z')
			y = (unsigned char)(y - 'A' + 'a');
		if (x != y)
			return false;
	}
	return true;
}

int password_policy_check(const char *pw, size_t pwlen, const char *email, const char **why)
{
	long chars;

	if (pw == NULL) {
		*why = "password is required";
		return -1;
	}
	if (pwlen > PASSWORD_MAX_BYTES) {
		*why = "password must be at most 128 characters";
		return -1;
	}
	chars = password_utf8_count((const unsigned char *)pw, pwlen);
	if (chars == -1) {
		*why = "password must be valid UTF-8 text without NUL characters";
		return -1;
	}
	if (chars < PASSWORD_MIN_CHARS) {
		*why = "password must be at least 12 characters";
		return -1;
	}
	if (chars > PASSWORD_MAX_CHARS) {
		*why = "password must be at most 128 characters";
		return -1;
	}
	if (email != NULL && password_ascii_caseeq(pw, pwlen, email)) {
		*why = "password must not be the email address";
		return -1;
	}
	*why = NULL;
	return 0;
}

const char *password_dummy_hash(const struct password_params *params)
{
	const struct password_params *p = params != NULL ? params : &password_params_default;
	unsigned char pw[PASSWORD_DUMMY_LEN];

	if (password_dummy != NULL && memcmp(p, &password_dummy_for, sizeof(*p)) == 0)
		return password_dummy;
	password_dummy_clear();
	if (RAND_bytes(pw, sizeof(pw)) != 1) {
		log_warnx("password_dummy_failed", "RAND_bytes failed");
		return NULL;
	}
	password_dummy = password_hash(p, (const char *)pw, sizeof(pw));
	cs_wipe(pw, sizeof(pw));
	if (password_dummy != NULL)
		password_dummy_for = *p;
	return password_dummy;
}

void password_dummy_clear(void)
{
	free(password_dummy);
	password_dummy = NULL;
}

/* Wipe and release the password copy; idempotent. */
static void password_job_wipe(struct password_job *j)
{
	if (j->pw != NULL) {
		cs_wipe(j->pw, j->pwlen);
		free(j->pw);
		j->pw = NULL;
	}
}

static void password_job_free(struct password_job *j)
{
	password_job_wipe(j);
	free(j->phc);
	free(j);
}

/*
 * Pool thread: run argon2 and wipe the password copy at once. The thread
 * first lowers its own priority (Linux nices threads one by one), so that
 * while logins hash on every core the reactors still answer everyone else
 * promptly; with idle cores the hashing runs as fast as before.
 */
static void password_work_cb(void *arg)
{
	static __thread bool niced;
	struct password_job *j = arg;
	char *out;
	int err;

	if (!niced) {
		niced = true;
		if (setpriority(PRIO_PROCESS, (id_t)gettid(), PASSWORD_NICE) == -1)
			log_debug("password_nice",
			          "setpriority failed; hashing at normal priority");
	}

	switch (j->kind) {
	case PASSWORD_JOB_HASH:
		out = password_hash_quiet(&j->params, j->pw, j->pwlen, &err);
		j->result = out != NULL ? 0 : err;
		j->phc = out;
		break;
	case PASSWORD_JOB_VERIFY:
		j->result = password_verify(j->phc, j->pw, j->pwlen);
		break;
	}
	password_job_wipe(j);
}

/* Reactor: hand the result to the caller. */
static void password_done_cb(void *arg)
{
	struct password_job *j = arg;

	switch (j->kind) {
	case PASSWORD_JOB_HASH:
		if (j->phc == NULL)
			log_warnx("password_hash_failed", "argon2id: %s",
			          password_err_message(j->result));
		j->hash_cb(j->arg, j->phc);
		break;
	case PASSWORD_JOB_VERIFY:
		j->verify_cb(j->arg, j->result);
		break;
	}
	password_job_free(j);
}

/* Reactor: the job was cancelled or dropped; the caller's arg is not touched. */
static void password_cleanup_cb(void *arg)
{
	password_job_free(arg);
}

/* Copy the password into a new job. */
static struct password_job *password_job_new(enum password_job_kind kind, const char *pw,
                                             size_t pwlen, void *arg)
{
	struct password_job *j = xcalloc(1, sizeof(*j));

	j->kind = kind;
	j->pw = xmalloc(pwlen + 1);
	if (pwlen > 0)
		memcpy(j->pw, pw, pwlen);
	j->pw[pwlen] = '\0';
	j->pwlen = pwlen;
	j->arg = arg;
	return j;
}

/* Submit j, or free it when the pool refuses. */
static struct password_job *password_job_submit(struct threadpool *tp, struct password_job *j)
{
	j->tpj = threadpool_submit(tp, password_work_cb, password_done_cb, password_cleanup_cb, j);
	if (j->tpj == NULL) {
		log_warnx("password_pool_full", "argon2 job refused: thread pool queue full");
		password_job_free(j);
		return NULL;
	}
	return j;
}

struct password_job *password_hash_start(struct threadpool *tp,
                                         const struct password_params *params, const char *pw,
                                         size_t pwlen, password_hash_cb cb, void *arg)
{
	const struct password_params *p = params != NULL ? params : &password_params_default;
	struct password_job *j;

	if (pw == NULL || pwlen > PASSWORD_MAX_BYTES || !password_params_valid(p))
		return NULL;
	j = password_job_new(PASSWORD_JOB_HASH, pw, pwlen, arg);
	j->params = *p;
	j->hash_cb = cb;
	return password_job_submit(tp, j);
}

struct password_job *password_verify_start(struct threadpool *tp, const char *phc, const char *pw,
                                           size_t pwlen, password_verify_cb cb, void *arg)
{
	struct password_job *j;

	if (phc == NULL || pw == NULL)
		return NULL;
	/* Over-long input can never match; one byte past the limit is enough to say so. */
	if (pwlen > PASSWORD_MAX_BYTES)
		pwlen = PASSWORD_MAX_BYTES + 1;
	j = password_job_new(PASSWORD_JOB_VERIFY, pw, pwlen, arg);
	j->phc = xstrndup(phc, strnlen(phc, PASSWORD_PHC_MAX + 1));
	j->verify_cb = cb;
	return password_job_submit(tp, j);
}

void password_cancel(struct password_job *job)
{
	threadpool_cancel(job->tpj);
}
