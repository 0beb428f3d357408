/*
 * mfa.c - the second factor: TOTP enrollment and activation, turning MFA
 * off, replacing the backup codes, and the TOTP check the login path uses.
 * Each endpoint is one op (see http_op in http.h) whose states read top to
 * bottom: read the caller's MFA columns, check the code (or the password,
 * on the thread pool), then one transaction with a conditional UPDATE and
 * the audit row, then the answer.
 *
 * The TOTP secret is sealed by the vault, bound to (organization, user,
 * "totp_secret"); the organization is stored beside the blob because the
 * one a login picks can change. A code is accepted once: the step it
 * matched is stored in users.mfa_last_step by an UPDATE that only succeeds
 * while the stored step is lower, so two requests racing with one code
 * cannot both pass. Wrong codes count towards the second factor's own
 * lockout (mfa_failures / mfa_locked_until), never the password's.
 */
#include "config.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cloudsweep/audit.h"
#include "cloudsweep/authcrypto.h"
#include "cloudsweep/log.h"
#include "cloudsweep/vault.h"
#include "cloudsweep/worker.h"
#include "auth_int.h"

#define MFA_FIELD    "totp_secret" /* the vault binding's field name */
#define MFA_CODE_MAX 16            /* longest TOTP code field accepted (digits and spaces) */

int auth_mfa_totp_check(const char *org, const char *user, const char *blob, const char *code,
                        long long last_step, long long *step)
{
	unsigned char *secret = NULL;
	size_t len = 0;
	int64_t matched = 0;
	int rc;

	if (org == NULL || blob == NULL || vault_ring() == NULL)
		return -1;
	if (vault_open(vault_ring(), org, user, MFA_FIELD, blob, &secret, &len) == -1)
		return -1;
	rc = totp_verify(secret, len, code, time(NULL), (int64_t)last_step, &matched);
	vault_secret_free(secret, len);
	if (rc == 0)
		*step = (long long)matched;
	return rc;
}

/* ---- one op for the four endpoints ---- */

enum mfa_kind {
	MFA_ENROLL,     /* POST /auth/mfa/enroll */
	MFA_ACTIVATE,   /* POST /auth/mfa/activate {code} */
	MFA_DISABLE,    /* POST /auth/mfa/disable {code | password} */
	MFA_REGENERATE, /* POST /auth/mfa/backup-codes {code} */
};

enum mfa_state {
	MFA_LOOKUP,     /* the caller's MFA columns are being read */
	MFA_VERIFY,     /* argon2id of the password on the thread pool (disable by password) */
	MFA_FAIL_COUNT, /* a wrong code or password counted; then 400 */
	MFA_BEGIN,      /* BEGIN sent */
	MFA_WRITE,      /* the conditional UPDATE (secret, activation, removal, codes) */
	MFA_AUDIT,      /* the event appended */
	MFA_COMMIT,     /* COMMIT sent; then the answer */
};

struct mfa_op {
	struct http_op op;
	enum mfa_kind kind;
	struct password_job *job; /* pending argon2 verification, or NULL */
	char code[MFA_CODE_MAX + 1];
	char *pw; /* malloc'd copy of the password, wiped when the op ends */
	size_t pwlen;
	char *blob;        /* pool-owned: the sealed secret, stored or read */
	char blob_org[37]; /* the organization the blob is bound to */
	char step[32];     /* the TOTP step the code matched, as text */
	bool count_pw;     /* the failure counts against the password (else the second factor) */
	char secret_b32[TOTP_B32_LEN + 1];
	char *uri; /* malloc'd otpauth URI (holds the secret), wiped when the op ends */
	char codes[BACKUP_CODE_COUNT][BACKUP_CODE_SIZE];
	char answer[512]; /* the JSON answer, built here so that it can be wiped */
	char hashes[BACKUP_CODE_COUNT * (BACKUP_CODE_HASH_LEN + 1) + 3]; /* "{h,h,...}" */
};

static void mfa_wipe(struct mfa_op *m)
{
	if (m->pw != NULL) {
		cs_wipe(m->pw, m->pwlen);
		free(m->pw);
		m->pw = NULL;
	}
	cs_free_secret(m->uri);
	m->uri = NULL;
	cs_wipe(m->code, sizeof(m->code));
	cs_wipe(m->secret_b32, sizeof(m->secret_b32));
	cs_wipe(m->codes, sizeof(m->codes));
	cs_wipe(m->answer, sizeof(m->answer));
}

static void mfa_cancel(struct http_op *op)
{
	struct mfa_op *m = (struct mfa_op *)op;

	if (m->job != NULL)
		password_cancel(m->job);
	m->job = NULL;
	mfa_wipe(m);
}

/* Fresh backup codes in m->codes and their stored forms as a text[] literal; 0 or -1. */
static int mfa_codes_new(struct mfa_op *m)
{
	size_t o = 0;

	if (backup_codes_generate(BACKUP_CODE_COUNT, m->codes) == -1)
		return -1;
	m->hashes[o++] = '{';
	for (size_t i = 0; i < BACKUP_CODE_COUNT; i++) {
		char *h = backup_code_hash(m->op.req->auth.user_id, m->codes[i]);

		if (h == NULL)
			return -1;
		if (i > 0)
			m->hashes[o++] = ',';
		memcpy(m->hashes + o, h, BACKUP_CODE_HASH_LEN);
		o += BACKUP_CODE_HASH_LEN;
		free(h);
	}
	m->hashes[o++] = '}';
	m->hashes[o] = '\0';
	return 0;
}

/* A fresh secret in m->secret_b32 and sealed in m->blob; 0 or -1 (answered). */
static int mfa_secret_new(struct mfa_op *m)
{
	struct http_request *req = m->op.req;
	unsigned char secret[TOTP_SECRET_LEN];
	char *b32 = NULL, *blob = NULL;
	int rc = -1;

	if (vault_ring() == NULL) {
		http_op_fail(&m->op, 503, "unavailable", "the vault is not ready; retry later");
		return -1;
	}
	if (totp_secret_generate(secret) == -1)
		goto fail;
	b32 = totp_base32_encode(secret, sizeof(secret), false);
	if (b32 == NULL || strlen(b32) != TOTP_B32_LEN)
		goto fail;
	blob = vault_seal(vault_ring(), req->auth.org_id, req->auth.user_id, MFA_FIELD, secret,
	                  sizeof(secret));
	if (blob == NULL)
		goto fail;
	memcpy(m->secret_b32, b32, TOTP_B32_LEN + 1);
	m->blob = http_strndup(req, blob, strlen(blob));
	snprintf(m->blob_org, sizeof(m->blob_org), "%s", req->auth.org_id);
	rc = 0;
fail:
	cs_wipe(secret, sizeof(secret));
	cs_free_secret(b32);
	free(blob);
	if (rc == -1)
		http_op_fail(&m->op, 500, "internal", "cannot create the TOTP secret");
	return rc;
}

static void mfa_advance(struct http_op *op, enum db_event ev, const PGresult *res);

/* Count a wrong code (or password) against the caller's lockout, then answer 400. */
static void mfa_fail_count(struct mfa_op *m)
{
	char thr[32], base[32];
	const char *p[3] = { m->op.req->auth.user_id, thr, base };

	snprintf(thr, sizeof(thr), "%lld", auth_g.cfg->lockout_threshold);
	snprintf(base, sizeof(base), "%lld", auth_g.cfg->lockout_base_s);
	mfa_wipe(m);
	m->op.state = MFA_FAIL_COUNT;
	if (m->count_pw)
		(void)http_op_query(&m->op, AUTH_PW_FAIL_SQL, 3, p);
	else
		(void)http_op_query(&m->op, AUTH_MFA_FAIL_SQL, 3, p);
}

static void mfa_verified_cb(void *arg, int result)
{
	struct mfa_op *m = arg;

	m->job = NULL;
	if (result != 0) {
		m->count_pw = true;
		mfa_fail_count(m);
		return;
	}
	mfa_wipe(m);
	m->op.state = MFA_BEGIN;
	(void)http_op_begin(&m->op);
}

/* The lookup's row is in res: decide, check the code or start the password check. */
static void mfa_looked_up(struct mfa_op *m, const PGresult *res)
{
	struct http_op *op = &m->op;
	bool enabled, locked;
	long long last, step = 0;
	int rc;

	if (PQntuples(res) != 1) {
		http_op_fail(op, 401, "unauthenticated", "the account no longer exists");
		return;
	}
	enabled = strcmp(PQgetvalue(res, 0, 2), "t") == 0;
	locked = strcmp(PQgetvalue(res, 0, 4), "t") == 0;
	last = strtoll(PQgetvalue(res, 0, 3), NULL, 10);
	if (!PQgetisnull(res, 0, 0)) {
		m->blob =
		    http_strndup(op->req, PQgetvalue(res, 0, 0), strlen(PQgetvalue(res, 0, 0)));
		snprintf(m->blob_org, sizeof(m->blob_org), "%s", PQgetvalue(res, 0, 1));
	}
	if (m->kind == MFA_ACTIVATE && enabled) {
		http_op_fail(op, 409, "conflict", "MFA is already active");
		return;
	}
	if (m->kind == MFA_ACTIVATE && m->blob == NULL) {
		http_op_fail(op, 409, "conflict", "no pending enrollment; enroll first");
		return;
	}
	if (m->kind != MFA_ACTIVATE && !enabled) {
		http_op_fail(op, 409, "conflict", "MFA is not active");
		return;
	}
	if (m->pw != NULL) {
		/* Accounts without a password (GitHub only) pay for a dummy check and fail. */
		const char *phc = PQgetisnull(res, 0, 6) ? password_dummy_hash(&auth_g.pp)
		                                         : PQgetvalue(res, 0, 6);
		bool pw_locked = strcmp(PQgetvalue(res, 0, 7), "t") == 0;

		if (pw_locked)
			phc = password_dummy_hash(&auth_g.pp);
		op->state = MFA_VERIFY;
		m->job = password_verify_start(auth_g.tp, phc, m->pw, m->pwlen, mfa_verified_cb, m);
		if (m->job == NULL)
			http_op_fail(op, 503, "unavailable",
			             "too many logins in progress; retry later");
		return;
	}
	if (locked && m->kind != MFA_ACTIVATE) {
		http_add_header(op->req, "Retry-After", PQgetvalue(res, 0, 5));
		http_op_fail(op, 429, "mfa_locked",
		             "too many wrong codes; the second factor is locked for a while");
		return;
	}
	rc = auth_mfa_totp_check(m->blob_org, op->req->auth.user_id, m->blob, m->code, last, &step);
	if (rc == -1) {
		http_op_fail(op, 500, "internal", "cannot check the code");
		return;
	}
	if (rc == 1) {
		if (m->kind == MFA_ACTIVATE) { /* the caller's own fresh secret: nothing to guess */
			http_op_fail(op, 400, "invalid_code",
			             "the code is wrong or was already used");
			return;
		}
		mfa_fail_count(m);
		return;
	}
	snprintf(m->step, sizeof(m->step), "%lld", step);
	if (m->kind != MFA_DISABLE && mfa_codes_new(m) == -1) {
		http_op_fail(op, 500, "internal", "cannot create backup codes");
		return;
	}
	op->state = MFA_BEGIN;
	(void)http_op_begin(op);
}

static const char mfa_sql_enroll[] =
    "UPDATE users SET mfa_secret = $2, mfa_secret_org = $3, mfa_last_step = 0 "
    "WHERE id = $1 AND NOT mfa_enabled AND deleted_at IS NULL RETURNING email";

static const char mfa_sql_activate[] =
    "WITH u AS (UPDATE users SET mfa_enabled = true, mfa_last_step = $2::bigint, "
    "mfa_failures = 0, mfa_locked_until = NULL WHERE id = $1 AND NOT mfa_enabled "
    "AND mfa_secret = $3 AND mfa_last_step < $2::bigint RETURNING id), "
    "d AS (DELETE FROM backup_codes WHERE user_id IN (SELECT id FROM u)), "
    "i AS (INSERT INTO backup_codes (user_id, code_hash) SELECT u.id, h "
    "FROM u, unnest($4::text[]) h) "
    "SELECT count(*) FROM u";

static const char mfa_sql_regenerate[] =
    "WITH u AS (UPDATE users SET mfa_last_step = $2::bigint, mfa_failures = 0, "
    "mfa_locked_until = NULL WHERE id = $1 AND mfa_enabled AND mfa_secret = $3 "
    "AND mfa_last_step < $2::bigint AND NOT coalesce(mfa_locked_until > now(), false) "
    "RETURNING id), "
    "d AS (DELETE FROM backup_codes WHERE user_id IN (SELECT id FROM u)), "
    "i AS (INSERT INTO backup_codes (user_id, code_hash) SELECT u.id, h "
    "FROM u, unnest($4::text[]) h) "
    "SELECT count(*) FROM u";

/* $2 is NULL when the password was checked instead of a code. */
static const char mfa_sql_disable[] =
    "WITH u AS (UPDATE users SET mfa_enabled = false, mfa_secret = NULL, "
    "mfa_secret_org = NULL, mfa_last_step = 0, mfa_failures = 0, mfa_locked_until = NULL "
    "WHERE id = $1 AND mfa_enabled AND mfa_secret = $3 AND ($2::bigint IS NULL OR "
    "(mfa_last_step < $2::bigint AND NOT coalesce(mfa_locked_until > now(), false))) "
    "RETURNING id), "
    "d AS (DELETE FROM backup_codes WHERE user_id IN (SELECT id FROM u)) "
    "SELECT count(*) FROM u";

static void mfa_write(struct mfa_op *m)
{
	struct http_request *req = m->op.req;
	const char *step = m->step[0] != '\0' ? m->step : NULL; /* NULL: password checked */
	const char *p[4] = { req->auth.user_id, step, m->blob, m->hashes };

	m->op.state = MFA_WRITE;
	switch (m->kind) {
	case MFA_ENROLL:
		p[1] = m->blob;
		p[2] = m->blob_org;
		(void)http_op_query(&m->op, mfa_sql_enroll, 3, p);
		return;
	case MFA_ACTIVATE:
		(void)http_op_query(&m->op, mfa_sql_activate, 4, p);
		return;
	case MFA_REGENERATE:
		(void)http_op_query(&m->op, mfa_sql_regenerate, 4, p);
		return;
	case MFA_DISABLE:
		(void)http_op_query(&m->op, mfa_sql_disable, 3, p);
		return;
	}
}

static void mfa_audit(struct mfa_op *m)
{
	static const char *const types[] = {
		[MFA_ENROLL] = "auth.mfa.enrolled",
		[MFA_ACTIVATE] = "auth.mfa.activated",
		[MFA_DISABLE] = "auth.mfa.disabled",
		[MFA_REGENERATE] = "auth.mfa.backup_codes_regenerated",
	};
	struct http_request *req = m->op.req;
	struct audit_event aev;
	json_t *details;

	audit_event_from_request(&aev, req, req->auth.org_id, req->auth.user_id, types[m->kind]);
	aev.resource_id = req->auth.user_id;
	if (m->kind == MFA_ENROLL)
		details = json_object();
	else if (m->kind == MFA_DISABLE)
		details = json_pack("{s:s}", "method", m->step[0] != '\0' ? "totp" : "password");
	else
		details = json_pack("{s:i}", "backup_codes", BACKUP_CODE_COUNT);
	m->op.state = MFA_AUDIT;
	(void)audit_op_write(&m->op, &aev, details);
}

/*
 * The otpauth URI for the account named by the stored email (an address with a
 * colon cannot be a label: the user id then); 0 or -1 (logged).
 */
static int mfa_uri_new(struct mfa_op *m, const char *email)
{
	m->uri = totp_otpauth_uri(auth_g.cfg->mfa_issuer, email, m->secret_b32);
	if (m->uri == NULL)
		m->uri = totp_otpauth_uri(auth_g.cfg->mfa_issuer, m->op.req->auth.user_id,
		                          m->secret_b32);
	if (m->uri == NULL) {
		log_warnx("mfa_uri", "cannot build the otpauth URI; check mfa_issuer");
		return -1;
	}
	return 0;
}

/*
 * Answer after COMMIT. The secret and the codes are written into m->answer
 * by hand rather than through jansson, so that every copy the process keeps
 * can be wiped (base32, percent-encoded URIs and the code alphabet need no
 * JSON escaping).
 */
static void mfa_respond(struct mfa_op *m)
{
	struct http_request *req = m->op.req;
	size_t o = 0;
	int n = 0;

	http_set_cancel(req, NULL, NULL);
	switch (m->kind) {
	case MFA_ENROLL:
		n = snprintf(m->answer, sizeof(m->answer),
		             "{\"secret\":\"%s\",\"otpauth_uri\":\"%s\"}", m->secret_b32, m->uri);
		break;
	case MFA_ACTIVATE:
	case MFA_REGENERATE:
		n = snprintf(m->answer, sizeof(m->answer), "{\"backup_codes\":[");
		for (size_t i = 0; i < BACKUP_CODE_COUNT && n > 0 && (size_t)n < sizeof(m->answer);
		     i++) {
			o = (size_t)n;
			n += snprintf(m->answer + o, sizeof(m->answer) - o, "%s\"%s\"",
			              i > 0 ? "," : "", m->codes[i]);
		}
		if (n > 0 && (size_t)n < sizeof(m->answer)) {
			o = (size_t)n;
			n += snprintf(m->answer + o, sizeof(m->answer) - o, "]}");
		}
		break;
	case MFA_DISABLE:
		mfa_wipe(m);
		http_respond(req, 204, NULL, NULL, 0);
		return;
	}
	if (n <= 0 || (size_t)n >= sizeof(m->answer)) {
		mfa_wipe(m);
		http_error(req, 500, "internal", "cannot build the answer");
		return;
	}
	http_respond(req, 200, "application/json", m->answer, (size_t)n);
	mfa_wipe(m);
}

static void mfa_advance(struct http_op *op, enum db_event ev, const PGresult *res)
{
	struct mfa_op *m = (struct mfa_op *)op;

	if (ev != DB_OK) {
		http_op_db_fail(op, ev, res);
		return;
	}
	switch (op->state) {
	case MFA_LOOKUP:
		mfa_looked_up(m, res);
		return;
	case MFA_VERIFY: /* the thread pool answers through mfa_verified_cb */
		http_op_fail(op, 500, "internal", "MFA in an unexpected state");
		return;
	case MFA_FAIL_COUNT:
		http_set_cancel(op->req, NULL, NULL);
		if (m->count_pw)
			http_error(op->req, 400, "invalid_password", "the password is wrong");
		else
			http_error(op->req, 400, "invalid_code",
			           "the code is wrong or was already used");
		return;
	case MFA_BEGIN:
		mfa_write(m);
		return;
	case MFA_WRITE:
		if (m->kind == MFA_ENROLL && PQntuples(res) != 1) {
			http_op_fail(op, 409, "conflict", "MFA is already active");
			return;
		}
		if (m->kind == MFA_ENROLL && mfa_uri_new(m, PQgetvalue(res, 0, 0)) == -1) {
			http_op_fail(op, 500, "internal", "cannot build the enrollment URI");
			return;
		}
		if (m->kind != MFA_ENROLL && strcmp(PQgetvalue(res, 0, 0), "1") != 0) {
			/* Another request changed the secret or spent this step first. */
			http_op_fail(op, 400, "invalid_code",
			             "the code is wrong or was already used");
			return;
		}
		mfa_audit(m);
		return;
	case MFA_AUDIT:
		op->state = MFA_COMMIT;
		http_op_commit(op);
		return;
	case MFA_COMMIT:
		mfa_respond(m);
		return;
	}
}

static const char mfa_sql_lookup[] =
    "SELECT mfa_secret, mfa_secret_org, mfa_enabled, mfa_last_step, "
    "coalesce(mfa_locked_until > now(), false), "
    "greatest(1, ceil(extract(epoch FROM mfa_locked_until - now())))::bigint, "
    "password_hash, coalesce(pw_locked_until > now(), false) "
    "FROM users WHERE id = $1 AND deleted_at IS NULL";

/* Parse the body's code (and, for disable, password) into a new op; NULL when answered. */
static struct mfa_op *mfa_op_start(struct http_request *req, enum mfa_kind kind)
{
	json_t *body = NULL;
	const char *code = NULL, *pw = NULL;
	struct mfa_op *m = NULL;

	if (kind != MFA_ENROLL) {
		body = http_json_body(req);
		if (body == NULL)
			return NULL;
		code = auth_body_str(req, body, "code", MFA_CODE_MAX, false);
		if (code == NULL && req->responded)
			goto out;
		if (kind == MFA_DISABLE) {
			pw = auth_body_str(req, body, "password", PASSWORD_MAX_BYTES, false);
			if (pw == NULL && req->responded)
				goto out;
			if ((code == NULL) == (pw == NULL)) {
				http_error(
				    req, 400, "invalid_request",
				    "field code or field password is required (one of them)");
				goto out;
			}
		} else if (code == NULL) {
			http_error(req, 400, "invalid_request", "field code is required");
			goto out;
		}
	}
	m = http_op_new(req, sizeof(*m), mfa_advance);
	m->op.on_cancel = mfa_cancel;
	m->kind = kind;
	if (code != NULL)
		snprintf(m->code, sizeof(m->code), "%s", code);
	if (pw != NULL) {
		m->pwlen = strlen(pw);
		m->pw = xstrndup(pw, m->pwlen);
	}
out:
	auth_body_free(body);
	return m;
}

static void mfa_enroll(struct http_request *req)
{
	struct mfa_op *m = mfa_op_start(req, MFA_ENROLL);

	if (m == NULL || mfa_secret_new(m) == -1)
		return;
	m->op.state = MFA_BEGIN;
	(void)http_op_begin(&m->op);
}

static void mfa_lookup_start(struct http_request *req, enum mfa_kind kind)
{
	struct mfa_op *m = mfa_op_start(req, kind);
	const char *p[1] = { req->auth.user_id };

	if (m == NULL)
		return;
	m->op.state = MFA_LOOKUP;
	(void)http_op_query(&m->op, mfa_sql_lookup, 1, p);
}

static void mfa_activate(struct http_request *req)
{
	mfa_lookup_start(req, MFA_ACTIVATE);
}

static void mfa_disable(struct http_request *req)
{
	mfa_lookup_start(req, MFA_DISABLE);
}

static void mfa_backup_codes(struct http_request *req)
{
	mfa_lookup_start(req, MFA_REGENERATE);
}

void auth_mfa_routes(struct router *r)
{
	router_add_perm(r, "POST", "/api/v1/auth/mfa/enroll", mfa_enroll,
	                ROUTE_NEEDS_DB | ROUTE_SELF, NULL);
	router_add_perm(r, "POST", "/api/v1/auth/mfa/activate", mfa_activate,
	                ROUTE_NEEDS_DB | ROUTE_SELF, NULL);
	router_add_perm(r, "POST", "/api/v1/auth/mfa/disable", mfa_disable,
	                ROUTE_NEEDS_DB | ROUTE_SELF, NULL);
	router_add_perm(r, "POST", "/api/v1/auth/mfa/backup-codes", mfa_backup_codes,
	                ROUTE_NEEDS_DB | ROUTE_SELF, NULL);
}
