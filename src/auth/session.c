/*
 * session.c - signup, login, refresh and logout. Each endpoint is one op
 * (see http_op in http.h) whose states read top to bottom: validate, hash
 * or verify the password on the thread pool, then one transaction that
 * does the change and writes its audit row, then the answer. Nothing is
 * reported as done before COMMIT has answered.
 *
 * Refresh tokens are 256-bit opaque strings stored only as SHA-256. The
 * successor of a refresh token is derived from it with a keyed PRF
 * (auth_refresh_successor), so a spent token presented again inside the
 * grace window gets the very same successor back without the server ever
 * storing a token in clear; outside the window it is reuse, and the whole
 * session (the family) is revoked.
 *
 * With MFA on, login checks the second factor only after the password has
 * verified (mfa.c opens the TOTP secret); the step or backup code is spent
 * by a conditional UPDATE inside the success transaction, so of two logins
 * racing with one code exactly one passes. Second-factor failures count on
 * their own columns (mfa_failures / mfa_locked_until), never the password's.
 */
#include "config.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/sha.h>

#include "cloudsweep/audit.h"
#include "cloudsweep/auth.h"
#include "cloudsweep/authcrypto.h"
#include "cloudsweep/log.h"
#include "cloudsweep/threadpool.h"
#include "cloudsweep/worker.h"
#include "auth_int.h"

struct auth_globals auth_g;

/* ---- helpers shared by the identity handlers ---- */

void auth_b64url(char *out, const unsigned char *in, size_t len)
{
	static const char tab[] =
	    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
	size_t o = 0, i;

	for (i = 0; i + 2 < len; i += 3) {
		unsigned v = (unsigned)in[i] << 16 | (unsigned)in[i + 1] << 8 | in[i + 2];

		out[o++] = tab[v >> 18 & 63];
		out[o++] = tab[v >> 12 & 63];
		out[o++] = tab[v >> 6 & 63];
		out[o++] = tab[v & 63];
	}
	if (len - i == 1) {
		unsigned v = (unsigned)in[i] << 16;

		out[o++] = tab[v >> 18 & 63];
		out[o++] = tab[v >> 12 & 63];
	} else if (len - i == 2) {
		unsigned v = (unsigned)in[i] << 16 | (unsigned)in[i + 1] << 8;

		out[o++] = tab[v >> 18 & 63];
		out[o++] = tab[v >> 12 & 63];
		out[o++] = tab[v >> 6 & 63];
	}
	out[o] = '\0';
}

void auth_token_hash_hex(char out[65], const char *tok)
{
	unsigned char md[SHA256_DIGEST_LENGTH];

	SHA256((const unsigned char *)tok, strlen(tok), md);
	cs_hex(out, md, sizeof(md));
}

void auth_refresh_new(char out[AUTH_REFRESH_TEXT])
{
	unsigned char raw[AUTH_REFRESH_BYTES];

	cs_random(raw, sizeof(raw));
	auth_b64url(out, raw, sizeof(raw));
	cs_wipe(raw, sizeof(raw));
}

int auth_refresh_successor(const char *tok, char out[AUTH_REFRESH_TEXT])
{
	unsigned char md[EVP_MAX_MD_SIZE];
	unsigned int mdlen = 0;

	if (HMAC(EVP_sha256(), auth_g.refresh_key, sizeof(auth_g.refresh_key),
	         (const unsigned char *)tok, strlen(tok), md, &mdlen) == NULL)
		return -1;
	auth_b64url(out, md, AUTH_REFRESH_BYTES);
	cs_wipe(md, sizeof(md));
	return 0;
}

static void auth_standalone_cb(void *arg, int status, const char *event_id)
{
	if (status != 0)
		log_warnx("audit_write_failed", "a standalone audit event could not be written");
}

void auth_audit_standalone(struct http_request *req, const char *org, const char *actor,
                           const char *type, const char *resource_id, json_t *details)
{
	struct audit_event ev;

	if (cs_worker == NULL || cs_worker->db == NULL)
		return;
	audit_event_from_request(&ev, req, org, actor, type);
	ev.resource_id = resource_id;
	ev.details = details;
	if (audit_write_standalone(cs_worker->db, &ev, auth_standalone_cb, NULL) == NULL)
		log_warnx("audit_write_failed", "standalone audit event %s refused", type);
}

/*
 * A refusal whose answer waits for its audit row: a client flooding refused
 * requests is held to the pace the trail can record them, instead of piling
 * up writes that would time out in the pool queue and be lost.
 */
struct audit_refusal {
	struct http_request *req; /* NULL once the request is abandoned */
	int status;
	char code[32];
	char msg[256];
};

static void auth_refusal_answer(struct audit_refusal *r)
{
	if (r->req != NULL) {
		http_set_cancel(r->req, NULL, NULL);
		http_error(r->req, r->status, r->code, "%s", r->msg);
	}
	free(r);
}

static void auth_refusal_cb(void *arg, int status, const char *event_id)
{
	if (status != 0)
		log_warnx("audit_write_failed", "a refusal's audit event could not be written");
	auth_refusal_answer(arg);
}

static void auth_refusal_cancel(struct http_request *req, void *arg)
{
	((struct audit_refusal *)arg)->req = NULL; /* the write goes on; its callback frees */
}

void auth_audit_refuse(struct http_request *req, const char *org, const char *actor,
                       const char *type, const char *resource_id, json_t *details, int status,
                       const char *code, const char *fmt, ...)
{
	struct audit_refusal *r = xcalloc(1, sizeof(*r));
	struct audit_event ev;
	va_list ap;

	r->req = req;
	r->status = status;
	snprintf(r->code, sizeof(r->code), "%s", code);
	va_start(ap, fmt);
	vsnprintf(r->msg, sizeof(r->msg), fmt, ap);
	va_end(ap);
	if (cs_worker == NULL || cs_worker->db == NULL) {
		auth_refusal_answer(r);
		return;
	}
	audit_event_from_request(&ev, req, org, actor, type);
	ev.resource_id = resource_id;
	ev.details = details;
	http_set_cancel(req, auth_refusal_cancel, r);
	if (audit_write_standalone(cs_worker->db, &ev, auth_refusal_cb, r) == NULL) {
		log_warnx("audit_write_failed", "standalone audit event %s refused", type);
		auth_refusal_answer(r);
	}
}

int auth_op_audit_hmac(struct http_op *op, struct audit_event *ev, json_t *details, const char *key,
                       const char *value)
{
	if (details != NULL && audit_details_set_hmac(details, key, value) == -1) {
		json_decref(details);
		http_op_fail(op, 500, "internal", "the audit trail is not ready");
		return -1;
	}
	return audit_op_write(op, ev, details);
}

/* The body's string field name, bounded; on failure answers 400 naming it. */
const char *auth_body_str(struct http_request *req, json_t *body, const char *name, size_t maxlen,
                          bool required)
{
	json_t *v = json_object_get(body, name);

	if (v == NULL || json_is_null(v)) {
		if (required)
			http_error(req, 400, "invalid_request", "field %s is required", name);
		return NULL;
	}
	if (!json_is_string(v) || json_string_length(v) > maxlen ||
	    strlen(json_string_value(v)) != json_string_length(v)) {
		http_error(req, 400, "invalid_request",
		           "field %s must be a string of at most %zu bytes", name, maxlen);
		return NULL;
	}
	return json_string_value(v);
}

void auth_body_free(json_t *body)
{
	static const char *const secret_fields[] = {
		"password", "current_password", "new_password",  "totp",         "backup_code",
		"code",     "invite_token",     "refresh_token", "access_token", "token"
	};

	/* The body held a password, a code or a token: wipe jansson's copies before freeing. */
	for (size_t i = 0; i < CS_ARRAY_LEN(secret_fields); i++) {
		json_t *v = json_object_get(body, secret_fields[i]);

		if (json_is_string(v))
			cs_wipe((char *)json_string_value(v), json_string_length(v));
	}
	json_decref(body);
}

/* Normalize an email into out (lower-cased, trimmed); -1 when it does not look like one. */
int auth_email_normalize(const char *in, char *out, size_t outlen)
{
	size_t len, at = 0, n = 0;

	while (*in == ' ' || *in == '\t')
		in++;
	len = strlen(in);
	while (len > 0 && (in[len - 1] == ' ' || in[len - 1] == '\t'))
		len--;
	if (len < 3 || len > 254 || len + 1 > outlen)
		return -1;
	for (size_t i = 0; i < len; i++) {
		unsigned char ch = (unsigned char)in[i];

		if (ch <= ' ' || ch == 0x7f || ch == '<' || ch == '>' || ch == '"' || ch == '\'' ||
		    ch == '\\' || ch == ',' || ch == ';')
			return -1;
		if (ch == '@') {
			at = i;
			n++;
		}
		out[i] = (char)(ch >= 'A' && ch <= 'Z' ? ch + 32 : ch);
	}
	out[len] = '\0';
	if (n != 1 || at == 0 || at == len - 1 || strchr(out + at, '.') == NULL)
		return -1;
	return 0;
}

static void auth_set_cookies(struct http_request *req, const char *access, long long ttl)
{
	unsigned char raw[24];
	char csrf[40], *line;

	cs_random(raw, sizeof(raw));
	auth_b64url(csrf, raw, sizeof(raw));
	line = xasprintf("cs_access=%s; Path=/; Max-Age=%lld; HttpOnly; Secure; SameSite=Lax",
	                 access, ttl);
	http_add_header(req, "Set-Cookie", line);
	free(line);
	line = xasprintf("cs_csrf=%s; Path=/; Max-Age=%lld; Secure; SameSite=Lax", csrf, ttl);
	http_add_header(req, "Set-Cookie", line);
	free(line);
}

void auth_clear_cookies(struct http_request *req)
{
	http_add_header(req, "Set-Cookie",
	                "cs_access=; Path=/; Max-Age=0; HttpOnly; Secure; SameSite=Lax");
	http_add_header(req, "Set-Cookie", "cs_csrf=; Path=/; Max-Age=0; Secure; SameSite=Lax");
}

/* Answer 200 with a fresh access token for (user, org, role, session) and refresh. */
void auth_respond_tokens(struct http_request *req, int status, const char *user, const char *org,
                         const char *role, const char *sid, const char *refresh)
{
	struct auth_claims c;
	long long now = (long long)time(NULL);
	char *access;
	json_t *doc;

	memset(&c, 0, sizeof(c));
	snprintf(c.sub, sizeof(c.sub), "%s", user);
	snprintf(c.org, sizeof(c.org), "%s", org);
	snprintf(c.sid, sizeof(c.sid), "%s", sid);
	snprintf(c.role, sizeof(c.role), "%s", role);
	cs_uuid4(c.jti);
	c.iat = now;
	c.exp = now + auth_g.cfg->access_token_ttl_s;
	access = auth_token_issue(&c);
	if (access == NULL) {
		http_error(req, 500, "internal", "cannot sign the access token");
		return;
	}
	auth_set_cookies(req, access, auth_g.cfg->access_token_ttl_s);
	doc = json_pack("{s:s, s:s, s:s, s:I}", "access_token", access, "refresh_token", refresh,
	                "token_type", "Bearer", "expires_in",
	                (json_int_t)auth_g.cfg->access_token_ttl_s);
	cs_free_secret(access);
	http_respond_json(req, status, doc);
}

/* ---- POST /api/v1/auth/signup ---- */

enum signup_state {
	SIGNUP_HASHING, /* argon2id on the thread pool */
	SIGNUP_BEGIN,   /* BEGIN sent */
	SIGNUP_INSERT,  /* user, org and membership inserted in one statement */
	SIGNUP_AUDIT,   /* auth.signup appended */
	SIGNUP_COMMIT,  /* COMMIT sent */
};

struct signup_op {
	struct http_op op;
	struct password_job *job; /* pending hash, or NULL */
	char email[256];
	char *name, *org_name, *phc; /* pool-owned */
	char user_id[37], org_id[37];
	char invite_hash[65]; /* SHA-256 of the invitation token; empty: a new organization */
	char role[16];        /* the role the account gets in org_id */
};

static void signup_advance(struct http_op *op, enum db_event ev, const PGresult *res);

static void signup_cancel(struct http_op *op)
{
	struct signup_op *s = (struct signup_op *)op;

	if (s->job != NULL)
		password_cancel(s->job);
	s->job = NULL;
}

static void signup_hashed_cb(void *arg, const char *phc)
{
	struct signup_op *s = arg;

	s->job = NULL;
	if (phc == NULL) {
		http_op_fail(&s->op, 500, "internal", "cannot hash the password");
		return;
	}
	s->phc = http_strndup(s->op.req, phc, strlen(phc));
	s->op.advance(&s->op, DB_OK, NULL);
}

static void signup_advance(struct http_op *op, enum db_event ev, const PGresult *res)
{
	struct signup_op *s = (struct signup_op *)op;
	struct audit_event aev;
	json_t *details;
	const char *sqlstate;

	if (ev != DB_OK) {
		sqlstate = res != NULL ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
		if (op->state == SIGNUP_INSERT && sqlstate != NULL &&
		    strcmp(sqlstate, "23505") == 0) {
			http_op_fail(op, 409, "conflict",
			             "an account with this email already exists");
			return;
		}
		http_op_db_fail(op, ev, res);
		return;
	}
	switch (op->state) {
	case SIGNUP_HASHING:
		op->state = SIGNUP_BEGIN;
		(void)http_op_begin(op);
		return;
	case SIGNUP_BEGIN: {
		const char *p[6] = {
			s->user_id, s->email, s->name, s->phc, s->org_id, s->org_name
		};

		op->state = SIGNUP_INSERT;
		if (*s->invite_hash != '\0') {
			/* Accept the invitation and join its organization, all or nothing. */
			p[4] = s->invite_hash;
			(void)http_op_query(
			    op,
			    "WITH inv AS (UPDATE org_invitations SET accepted_at = now() "
			    "WHERE token_hash = $5 AND email = $2 AND accepted_at IS NULL "
			    "AND expires_at > now() RETURNING org_id, role), "
			    "u AS (INSERT INTO users (id, email, name, password_hash) "
			    "SELECT $1, $2, $3, $4 FROM inv RETURNING id), "
			    "m AS (INSERT INTO memberships (org_id, user_id, role) "
			    "SELECT inv.org_id, u.id, inv.role FROM inv, u RETURNING org_id, role) "
			    "SELECT m.org_id, m.role, o.name FROM m JOIN orgs o ON o.id = m.org_id",
			    5, p);
			return;
		}
		(void)http_op_query(
		    op,
		    "WITH u AS (INSERT INTO users (id, email, name, password_hash) "
		    "VALUES ($1, $2, $3, $4) RETURNING id), "
		    "o AS (INSERT INTO orgs (id, name) VALUES ($5, $6) RETURNING id) "
		    "INSERT INTO memberships (org_id, user_id, role) "
		    "SELECT o.id, u.id, 'owner' FROM u, o",
		    6, p);
		return;
	}
	case SIGNUP_INSERT:
		if (*s->invite_hash != '\0') {
			if (res == NULL || PQntuples(res) != 1) {
				http_op_fail(
				    op, 400, "invalid_invite",
				    "the invitation is unknown, expired, already used or for "
				    "another email address");
				return;
			}
			snprintf(s->org_id, sizeof(s->org_id), "%s", PQgetvalue(res, 0, 0));
			snprintf(s->role, sizeof(s->role), "%s", PQgetvalue(res, 0, 1));
			s->org_name = http_strndup(op->req, PQgetvalue(res, 0, 2),
			                           (size_t)PQgetlength(res, 0, 2));
		}
		op->state = SIGNUP_AUDIT;
		audit_event_from_request(&aev, op->req, s->org_id, s->user_id, "auth.signup");
		aev.resource_id = s->user_id;
		details = json_pack("{s:s, s:s, s:b}", "org_name", s->org_name, "role", s->role,
		                    "invitation", *s->invite_hash != '\0');
		auth_op_audit_hmac(op, &aev, details, "email", s->email);
		return;
	case SIGNUP_AUDIT:
		op->state = SIGNUP_COMMIT;
		http_op_commit(op);
		return;
	case SIGNUP_COMMIT:
		http_set_cancel(op->req, NULL, NULL);
		http_respond_json(op->req, 201,
		                  json_pack("{s:{s:s, s:s, s:s}, s:{s:s, s:s}, s:s}", "user", "id",
		                            s->user_id, "email", s->email, "name", s->name, "org",
		                            "id", s->org_id, "name", s->org_name, "role", s->role));
		return;
	}
}

static void auth_signup(struct http_request *req)
{
	json_t *body = http_json_body(req);
	const char *email, *pw, *org_name, *name, *invite, *why = NULL;
	struct signup_op *s;

	if (body == NULL)
		return;
	invite = json_object_get(body, "invite_token") != NULL
	             ? auth_body_str(req, body, "invite_token", 128, true)
	             : "";
	if (invite == NULL)
		goto out;
	email = auth_body_str(req, body, "email", 254, true);
	if (email == NULL)
		goto out;
	pw = auth_body_str(req, body, "password", PASSWORD_MAX_BYTES, true);
	if (pw == NULL)
		goto out;
	/* Joining by invitation: the organization is the inviter's. */
	org_name = *invite != '\0' ? "-" : auth_body_str(req, body, "org_name", 255, true);
	if (org_name == NULL)
		goto out;
	name = json_object_get(body, "name") != NULL ? auth_body_str(req, body, "name", 255, false)
	                                             : "";
	if (name == NULL)
		goto out;
	s = http_op_new(req, sizeof(*s), signup_advance);
	s->op.on_cancel = signup_cancel;
	if (auth_email_normalize(email, s->email, sizeof(s->email)) == -1) {
		http_op_fail(&s->op, 400, "invalid_request", "field email is not a valid address");
		goto out;
	}
	if (*org_name == '\0' || strpbrk(org_name, "<>\"'") != NULL) {
		http_op_fail(&s->op, 400, "invalid_request",
		             "field org_name must be 1-255 characters without <>\"'");
		goto out;
	}
	if (password_policy_check(pw, strlen(pw), s->email, &why) != 0) {
		http_op_fail(&s->op, 400, "invalid_request", "field password: %s",
		             why != NULL ? why : "does not meet the policy");
		goto out;
	}
	s->name = http_strndup(req, name, strlen(name));
	s->org_name = http_strndup(req, org_name, strlen(org_name));
	snprintf(s->role, sizeof(s->role), "owner");
	if (*invite != '\0')
		auth_token_hash_hex(s->invite_hash, invite);
	cs_uuid4(s->user_id);
	cs_uuid4(s->org_id);
	s->op.state = SIGNUP_HASHING;
	s->job = password_hash_start(auth_g.tp, &auth_g.pp, pw, strlen(pw), signup_hashed_cb, s);
	if (s->job == NULL) {
		http_op_fail(&s->op, 503, "unavailable",
		             "too many logins in progress; retry later");
		goto out;
	}
out:
	auth_body_free(body);
}

/* ---- POST /api/v1/auth/login ---- */

enum login_state {
	LOGIN_LOOKUP,      /* the user row (or none) is being read */
	LOGIN_VERIFY,      /* argon2id verification (against a dummy hash for unknown emails) */
	LOGIN_REHASH,      /* the stored hash used old parameters: hashing anew */
	LOGIN_BEGIN,       /* BEGIN for the success path */
	LOGIN_MFA_SPEND,   /* the TOTP step or the backup code spent (conditional UPDATE) */
	LOGIN_MFA_AUDIT,   /* auth.mfa.used / auth.mfa.backup_code_used appended */
	LOGIN_WRITE,       /* session, refresh token and user counters written */
	LOGIN_AUDIT,       /* auth.login.succeeded appended */
	LOGIN_COMMIT,      /* COMMIT sent; then the tokens go out */
	LOGIN_FAIL_BEGIN,  /* BEGIN for the failure path */
	LOGIN_FAIL_UPDATE, /* failure counter and lockout (password's or MFA's) updated */
	LOGIN_FAIL_AUDIT,  /* auth.login.failed appended */
	LOGIN_FAIL_COMMIT, /* COMMIT sent; then 401 */
};

#define LOGIN_TOTP_MAX   16 /* longest totp field accepted (six digits, maybe spaced) */
#define LOGIN_BACKUP_MAX 32 /* longest backup_code field accepted */

/* What a failed login counts against, and how it is answered. */
enum login_fail {
	LOGIN_FAIL_PASSWORD,     /* pw_failures; 401 invalid_credentials */
	LOGIN_FAIL_MFA_REQUIRED, /* nothing counted; 401 mfa_required */
	LOGIN_FAIL_MFA,          /* mfa_failures; 401 invalid_code */
	LOGIN_FAIL_MFA_LOCKED,   /* mfa_failures (the lock grows); 429 mfa_locked */
};

struct login_op {
	struct http_op op;
	struct password_job *job; /* pending argon2 job, or NULL */
	char email[256];
	char *pw; /* malloc'd copy, wiped when the op ends */
	size_t pwlen;
	bool found, locked, mfa_enabled;
	const char *why; /* static: why the login failed, for the audit row */
	char user_id[37], org_id[37], role[16], session_id[37];
	char *phc, *new_phc; /* pool-owned */
	char refresh[AUTH_REFRESH_TEXT];
	/* The second factor, used only once the password has verified. */
	char totp[LOGIN_TOTP_MAX + 1];            /* as given, or empty; wiped */
	char backup_code[LOGIN_BACKUP_MAX + 1];   /* as given, or empty; wiped */
	char *mfa_blob;                           /* pool-owned sealed TOTP secret, or NULL */
	char mfa_org[37];                         /* the blob's organization binding */
	long long mfa_last_step;                  /* users.mfa_last_step at lookup */
	bool mfa_locked;                          /* mfa_locked_until is in the future */
	char mfa_retry[24];                       /* seconds until it is not, for Retry-After */
	char mfa_step[32];                        /* the TOTP step accepted, as text */
	int mfa_offset;                           /* that step minus the current one (-1, 0, 1) */
	char code_hash[BACKUP_CODE_HASH_LEN + 1]; /* the backup code's stored form */
	long long codes_left;                     /* backup codes unspent after this one */
	enum login_fail fail;                     /* what a failure counts against */
};

static void login_wipe(struct login_op *l)
{
	if (l->pw != NULL) {
		cs_wipe(l->pw, l->pwlen);
		free(l->pw);
		l->pw = NULL;
	}
	cs_wipe(l->totp, sizeof(l->totp));
	cs_wipe(l->backup_code, sizeof(l->backup_code));
}

static void login_cancel(struct http_op *op)
{
	struct login_op *l = (struct login_op *)op;

	if (l->job != NULL)
		password_cancel(l->job);
	l->job = NULL;
	login_wipe(l);
	cs_wipe(l->refresh, sizeof(l->refresh));
}

static void login_fail_start(struct login_op *l, enum login_fail fail, const char *why)
{
	login_wipe(l);
	l->fail = fail;
	l->why = why;
	l->op.state = LOGIN_FAIL_BEGIN;
	(void)http_op_begin(&l->op);
}

/*
 * The password verified and MFA is on: check the code given (TOTP here; a
 * backup code only by spending it in the transaction). 0 to go on, -1 when
 * the login has failed (started or answered).
 */
static int login_mfa_check(struct login_op *l)
{
	long long step = 0;
	int rc;

	if (l->totp[0] == '\0' && l->backup_code[0] == '\0') {
		login_fail_start(l, LOGIN_FAIL_MFA_REQUIRED, "mfa_required");
		return -1;
	}
	if (l->mfa_locked) {
		/* No code is even checked while locked: a guess gains nothing. */
		login_fail_start(l, LOGIN_FAIL_MFA_LOCKED, "mfa_locked");
		return -1;
	}
	if (l->backup_code[0] != '\0') {
		char *h = backup_code_hash(l->user_id, l->backup_code);

		if (h == NULL) {
			login_fail_start(l, LOGIN_FAIL_MFA, "mfa_invalid");
			return -1;
		}
		snprintf(l->code_hash, sizeof(l->code_hash), "%s", h);
		free(h);
		return 0;
	}
	rc = auth_mfa_totp_check(l->mfa_org, l->user_id, l->mfa_blob, l->totp, l->mfa_last_step,
	                         &step);
	if (rc == -1) {
		login_wipe(l);
		http_op_fail(&l->op, 500, "internal", "cannot check the second factor");
		return -1;
	}
	if (rc == 1) {
		login_fail_start(l, LOGIN_FAIL_MFA, "mfa_invalid");
		return -1;
	}
	snprintf(l->mfa_step, sizeof(l->mfa_step), "%lld", step);
	l->mfa_offset = (int)(step - (long long)totp_time_step(time(NULL)));
	return 0;
}

static void login_rehashed_cb(void *arg, const char *phc)
{
	struct login_op *l = arg;

	l->job = NULL;
	if (phc != NULL)
		l->new_phc = http_strndup(l->op.req, phc, strlen(phc));
	login_wipe(l);
	l->op.state = LOGIN_BEGIN;
	(void)http_op_begin(&l->op);
}

static void login_verified_cb(void *arg, int result)
{
	struct login_op *l = arg;

	l->job = NULL;
	if (!l->found || l->locked || result != 0) {
		login_fail_start(l, LOGIN_FAIL_PASSWORD,
		                 !l->found   ? "unknown_email"
		                 : l->locked ? "locked"
		                             : "bad_password");
		return;
	}
	if (l->mfa_enabled && login_mfa_check(l) == -1)
		return;
	if (password_needs_rehash(l->phc, &auth_g.pp)) {
		l->op.state = LOGIN_REHASH;
		l->job = password_hash_start(auth_g.tp, &auth_g.pp, l->pw, l->pwlen,
		                             login_rehashed_cb, l);
		if (l->job != NULL)
			return;
	}
	login_wipe(l);
	l->op.state = LOGIN_BEGIN;
	(void)http_op_begin(&l->op);
}

/* The success path's writes: a session, its first refresh token, the user's counters. */
static void login_write(struct login_op *l)
{
	char ttl[32], rhash[65];
	const char *ua = http_header(l->op.req, "User-Agent");
	const char *p[8] = { l->session_id,        l->user_id, l->org_id, l->op.req->client_ip,
		             ua != NULL ? ua : "", ttl,        rhash,     l->new_phc };

	cs_uuid4(l->session_id);
	auth_refresh_new(l->refresh);
	auth_token_hash_hex(rhash, l->refresh);
	snprintf(ttl, sizeof(ttl), "%lld", auth_g.cfg->refresh_token_ttl_s);
	l->op.state = LOGIN_WRITE;
	(void)http_op_query(
	    &l->op,
	    "WITH s AS (INSERT INTO sessions (id, user_id, org_id, method, ip, user_agent, "
	    "expires_at) VALUES ($1, $2, $3, 'password', $4, left($5, 512), "
	    "now() + make_interval(secs => $6::bigint)) RETURNING id, expires_at), "
	    "r AS (INSERT INTO refresh_tokens (token_hash, session_id, expires_at) "
	    "SELECT decode($7, 'hex'), s.id, s.expires_at FROM s) "
	    "UPDATE users SET pw_failures = 0, pw_locked_until = NULL, mfa_failures = 0, "
	    "mfa_locked_until = NULL, last_login_at = now(), "
	    "password_hash = coalesce($8, password_hash) WHERE id = $2",
	    8, p);
}

/* Spend the accepted TOTP step or the backup code, race-safe: $1 user, $2 step or hash. */
static void login_mfa_spend(struct login_op *l)
{
	l->op.state = LOGIN_MFA_SPEND;
	if (l->code_hash[0] != '\0') {
		const char *p[2] = { l->user_id, l->code_hash };

		/* All parts share one snapshot: the count is of the codes unspent before. */
		(void)http_op_query(
		    &l->op,
		    "WITH spent AS (UPDATE backup_codes SET used_at = now() WHERE user_id = $1 "
		    "AND code_hash = $2 AND used_at IS NULL AND EXISTS (SELECT 1 FROM users "
		    "WHERE id = $1 AND mfa_enabled AND NOT coalesce(mfa_locked_until > now(), "
		    "false)) RETURNING 1) "
		    "SELECT (SELECT count(*) FROM spent), (SELECT count(*) FROM backup_codes "
		    "WHERE user_id = $1 AND used_at IS NULL) - (SELECT count(*) FROM spent)",
		    2, p);
	} else {
		const char *p[3] = { l->user_id, l->mfa_step, l->mfa_blob };

		(void)http_op_query(
		    &l->op,
		    "WITH u AS (UPDATE users SET mfa_last_step = $2::bigint WHERE id = $1 "
		    "AND mfa_enabled AND mfa_secret = $3 AND mfa_last_step < $2::bigint "
		    "AND NOT coalesce(mfa_locked_until > now(), false) RETURNING 1) "
		    "SELECT count(*), 0 FROM u",
		    3, p);
	}
}

static void login_advance(struct http_op *op, enum db_event ev, const PGresult *res)
{
	struct login_op *l = (struct login_op *)op;
	struct audit_event aev;
	json_t *details;

	if (ev != DB_OK) {
		http_op_db_fail(op, ev, res);
		return;
	}
	switch (op->state) {
	case LOGIN_LOOKUP: {
		const char *hash;

		l->found =
		    PQntuples(res) == 1 && !PQgetisnull(res, 0, 1) && !PQgetisnull(res, 0, 4);
		if (l->found) {
			snprintf(l->user_id, sizeof(l->user_id), "%s", PQgetvalue(res, 0, 0));
			l->phc = http_strndup(op->req, PQgetvalue(res, 0, 1),
			                      strlen(PQgetvalue(res, 0, 1)));
			l->mfa_enabled = strcmp(PQgetvalue(res, 0, 2), "t") == 0;
			l->locked = strcmp(PQgetvalue(res, 0, 3), "t") == 0;
			snprintf(l->org_id, sizeof(l->org_id), "%s", PQgetvalue(res, 0, 4));
			snprintf(l->role, sizeof(l->role), "%s", PQgetvalue(res, 0, 5));
			if (!PQgetisnull(res, 0, 6) && !PQgetisnull(res, 0, 7)) {
				l->mfa_blob = http_strndup(op->req, PQgetvalue(res, 0, 6),
				                           strlen(PQgetvalue(res, 0, 6)));
				snprintf(l->mfa_org, sizeof(l->mfa_org), "%s",
				         PQgetvalue(res, 0, 7));
			}
			l->mfa_last_step = strtoll(PQgetvalue(res, 0, 8), NULL, 10);
			l->mfa_locked = strcmp(PQgetvalue(res, 0, 9), "t") == 0;
			snprintf(l->mfa_retry, sizeof(l->mfa_retry), "%s", PQgetvalue(res, 0, 10));
		}
		/* Unknown and locked accounts pay for a real argon2 run too: same time, same
		 * answer. */
		hash = l->found && !l->locked ? l->phc : password_dummy_hash(&auth_g.pp);
		op->state = LOGIN_VERIFY;
		l->job =
		    password_verify_start(auth_g.tp, hash, l->pw, l->pwlen, login_verified_cb, l);
		if (l->job == NULL)
			http_op_fail(op, 503, "unavailable",
			             "too many logins in progress; retry later");
		return;
	}
	case LOGIN_BEGIN:
		if (l->mfa_enabled)
			login_mfa_spend(l);
		else
			login_write(l);
		return;
	case LOGIN_MFA_SPEND:
		if (strcmp(PQgetvalue(res, 0, 0), "1") != 0) {
			/* Replayed, raced by another login with the same code, or locked
			 * meanwhile: a failure, counted in this very transaction. */
			l->fail = LOGIN_FAIL_MFA;
			l->why = "mfa_invalid";
			op->state = LOGIN_FAIL_BEGIN;
			login_advance(op, DB_OK, NULL);
			return;
		}
		l->codes_left = strtoll(PQgetvalue(res, 0, 1), NULL, 10);
		op->state = LOGIN_MFA_AUDIT;
		audit_event_from_request(&aev, op->req, l->org_id, l->user_id,
		                         l->code_hash[0] != '\0' ? "auth.mfa.backup_code_used"
		                                                 : "auth.mfa.used");
		aev.resource_id = l->user_id;
		details = l->code_hash[0] != '\0'
		              ? json_pack("{s:I}", "remaining", (json_int_t)l->codes_left)
		              : json_pack("{s:i}", "step", l->mfa_offset);
		(void)audit_op_write(op, &aev, details);
		return;
	case LOGIN_MFA_AUDIT:
		login_write(l);
		return;
	case LOGIN_WRITE:
		op->state = LOGIN_AUDIT;
		audit_event_from_request(&aev, op->req, l->org_id, l->user_id,
		                         "auth.login.succeeded");
		aev.resource_id = l->user_id;
		details = json_pack("{s:s, s:s, s:b}", "method", "password", "session_id",
		                    l->session_id, "mfa", l->mfa_enabled);
		auth_op_audit_hmac(op, &aev, details, "email", l->email);
		return;
	case LOGIN_AUDIT:
		op->state = LOGIN_COMMIT;
		http_op_commit(op);
		return;
	case LOGIN_COMMIT:
		http_set_cancel(op->req, NULL, NULL);
		auth_respond_tokens(op->req, 200, l->user_id, l->org_id, l->role, l->session_id,
		                    l->refresh);
		cs_wipe(l->refresh, sizeof(l->refresh));
		return;
	case LOGIN_FAIL_BEGIN: {
		char thr[32], base[32];
		const char *p[3] = { l->user_id, thr, base };

		op->state = LOGIN_FAIL_UPDATE;
		if (!l->found || l->fail == LOGIN_FAIL_MFA_REQUIRED) {
			/* Nothing to count: an unknown email, or a client that asks what is next.
			 */
			login_advance(op, DB_OK, NULL);
			return;
		}
		snprintf(thr, sizeof(thr), "%lld", auth_g.cfg->lockout_threshold);
		snprintf(base, sizeof(base), "%lld", auth_g.cfg->lockout_base_s);
		if (l->fail != LOGIN_FAIL_PASSWORD) { /* the second factor has its own lockout */
			(void)http_op_query(op, AUTH_MFA_FAIL_SQL, 3, p);
			return;
		}
		(void)http_op_query(op, AUTH_PW_FAIL_SQL, 3, p);
		return;
	}
	case LOGIN_FAIL_UPDATE:
		op->state = LOGIN_FAIL_AUDIT;
		audit_event_from_request(&aev, op->req, l->found ? l->org_id : NULL,
		                         l->found ? l->user_id : NULL, "auth.login.failed");
		aev.resource_id = l->found ? l->user_id : NULL;
		details = json_pack("{s:s, s:b}", "reason", l->why, "mfa", l->mfa_enabled);
		auth_op_audit_hmac(op, &aev, details, "email", l->email);
		return;
	case LOGIN_FAIL_AUDIT:
		op->state = LOGIN_FAIL_COMMIT;
		http_op_commit(op);
		return;
	case LOGIN_FAIL_COMMIT:
		http_set_cancel(op->req, NULL, NULL);
		switch (l->fail) {
		case LOGIN_FAIL_PASSWORD:
			auth_login_failed_note(op->req);
			http_error(op->req, 401, "invalid_credentials", "wrong email or password");
			return;
		case LOGIN_FAIL_MFA_REQUIRED:
			http_error(op->req, 401, "mfa_required",
			           "a second factor is required: totp or backup_code");
			return;
		case LOGIN_FAIL_MFA:
			auth_login_failed_note(op->req);
			http_error(op->req, 401, "invalid_code",
			           "the second factor code is wrong or was already used");
			return;
		case LOGIN_FAIL_MFA_LOCKED:
			auth_login_failed_note(op->req);
			http_add_header(op->req, "Retry-After", l->mfa_retry);
			http_error(op->req, 429, "mfa_locked",
			           "too many wrong codes; the second factor is locked for a while");
			return;
		}
		return;
	default:
		http_op_fail(op, 500, "internal", "login in an unexpected state");
		return;
	}
}

static void auth_login_checked(struct http_request *req)
{
	json_t *body = http_json_body(req);
	const char *email, *pw, *totp = NULL, *backup = NULL;
	struct login_op *l;
	const char *p[1];

	if (body == NULL)
		return;
	email = auth_body_str(req, body, "email", 254, true);
	if (email == NULL)
		goto out;
	pw = auth_body_str(req, body, "password", PASSWORD_MAX_BYTES, true);
	if (pw == NULL)
		goto out;
	totp = auth_body_str(req, body, "totp", LOGIN_TOTP_MAX, false);
	if (totp == NULL && req->responded)
		goto out;
	backup = auth_body_str(req, body, "backup_code", LOGIN_BACKUP_MAX, false);
	if (backup == NULL && req->responded)
		goto out;
	if (totp != NULL && backup != NULL) {
		http_error(req, 400, "invalid_request",
		           "field totp and field backup_code: give one of them, not both");
		goto out;
	}
	l = http_op_new(req, sizeof(*l), login_advance);
	l->op.on_cancel = login_cancel;
	if (auth_email_normalize(email, l->email, sizeof(l->email)) == -1) {
		/* Not an address at all: no account can match, but answer like any failure. */
		snprintf(l->email, sizeof(l->email), "%.200s", email);
	}
	l->pwlen = strlen(pw);
	l->pw = xstrndup(pw, l->pwlen);
	snprintf(l->totp, sizeof(l->totp), "%s", totp != NULL ? totp : "");
	snprintf(l->backup_code, sizeof(l->backup_code), "%s", backup != NULL ? backup : "");
	p[0] = l->email;
	l->op.state = LOGIN_LOOKUP;
	(void)http_op_prepared(&l->op, "auth_login_lookup", 1, p);
out:
	auth_body_free(body);
}

static void auth_login(struct http_request *req)
{
	auth_login_gate(req, auth_login_checked);
}

/* ---- POST /api/v1/auth/refresh ---- */

enum refresh_state {
	REFRESH_BEGIN,  /* BEGIN sent */
	REFRESH_LOOKUP, /* the presented token's row, locked */
	REFRESH_ROTATE, /* spent it and inserted its successor */
	REFRESH_REVOKE, /* reuse: the whole family revoked */
	REFRESH_AUDIT,  /* auth.refresh.succeeded / auth.refresh.reused appended */
	REFRESH_COMMIT, /* COMMIT sent */
};

struct refresh_op {
	struct http_op op;
	char hash[65], next_hash[65];
	char token[AUTH_REFRESH_TEXT], next[AUTH_REFRESH_TEXT];
	char session_id[37], user_id[37], org_id[37], role[16];
	bool reused, grace;
};

static void refresh_cancel(struct http_op *op)
{
	struct refresh_op *r = (struct refresh_op *)op;

	cs_wipe(r->token, sizeof(r->token));
	cs_wipe(r->next, sizeof(r->next));
}

static void refresh_advance(struct http_op *op, enum db_event ev, const PGresult *res)
{
	struct refresh_op *r = (struct refresh_op *)op;
	struct audit_event aev;
	json_t *details;

	if (ev != DB_OK) {
		http_op_db_fail(op, ev, res);
		return;
	}
	switch (op->state) {
	case REFRESH_BEGIN: {
		const char *p[1] = { r->hash };

		op->state = REFRESH_LOOKUP;
		(void)http_op_query(
		    op,
		    "SELECT rt.session_id, rt.spent_at IS NOT NULL, "
		    "coalesce(extract(epoch FROM now() - rt.spent_at), 0)::float8, "
		    "encode(rt.successor, 'hex'), rt.expires_at > now(), "
		    "s.revoked_at IS NULL AND s.expires_at > now(), s.user_id, s.org_id, m.role, "
		    "u.deleted_at IS NULL "
		    "FROM refresh_tokens rt JOIN sessions s ON s.id = rt.session_id "
		    "JOIN users u ON u.id = s.user_id "
		    "LEFT JOIN memberships m ON m.org_id = s.org_id AND m.user_id = s.user_id "
		    "WHERE rt.token_hash = decode($1, 'hex') FOR UPDATE OF rt",
		    1, p);
		return;
	}
	case REFRESH_LOOKUP: {
		bool spent, live;

		if (PQntuples(res) != 1) {
			http_op_fail(op, 401, "unauthenticated",
			             "unknown or expired refresh token");
			return;
		}
		snprintf(r->session_id, sizeof(r->session_id), "%s", PQgetvalue(res, 0, 0));
		snprintf(r->user_id, sizeof(r->user_id), "%s", PQgetvalue(res, 0, 6));
		snprintf(r->org_id, sizeof(r->org_id), "%s", PQgetvalue(res, 0, 7));
		snprintf(r->role, sizeof(r->role), "%s", PQgetvalue(res, 0, 8));
		spent = strcmp(PQgetvalue(res, 0, 1), "t") == 0;
		live = strcmp(PQgetvalue(res, 0, 4), "t") == 0 &&
		       strcmp(PQgetvalue(res, 0, 5), "t") == 0 &&
		       strcmp(PQgetvalue(res, 0, 9), "t") == 0 && !PQgetisnull(res, 0, 8);
		if (!live) {
			http_op_fail(op, 401, "unauthenticated",
			             "unknown or expired refresh token");
			return;
		}
		if (auth_refresh_successor(r->token, r->next) == -1) {
			http_op_fail(op, 500, "internal", "cannot derive the refresh token");
			return;
		}
		auth_token_hash_hex(r->next_hash, r->next);
		if (spent) {
			double age = strtod(PQgetvalue(res, 0, 2), NULL);

			if (age <= (double)auth_g.cfg->refresh_grace_s &&
			    strcmp(PQgetvalue(res, 0, 3), r->next_hash) == 0) {
				/* Two tabs refreshed at once: the same successor, nothing new
				 * stored. */
				r->grace = true;
				op->state = REFRESH_AUDIT;
				refresh_advance(op, DB_OK, NULL);
				return;
			}
			r->reused = true;
			{
				char ttl[32];
				const char *p[2] = { r->session_id, ttl };

				snprintf(ttl, sizeof(ttl), "%lld",
				         auth_g.cfg->access_token_ttl_s + 120);
				op->state = REFRESH_REVOKE;
				(void)http_op_query(
				    op,
				    "WITH s AS (UPDATE sessions SET revoked_at = now(), "
				    "revoke_reason = 'refresh_token_reused' WHERE id = $1 "
				    "AND revoked_at IS NULL) "
				    "INSERT INTO revocations (kind, value, expires_at) "
				    "VALUES ('sid', $1::uuid, now() + make_interval(secs => "
				    "$2::bigint))",
				    2, p);
			}
			return;
		}
		{
			const char *p[3] = { r->hash, r->next_hash, r->session_id };

			op->state = REFRESH_ROTATE;
			(void)http_op_query(
			    op,
			    "WITH spent AS (UPDATE refresh_tokens SET spent_at = now(), "
			    "successor = decode($2, 'hex') WHERE token_hash = decode($1, 'hex') "
			    "RETURNING expires_at), "
			    "touch AS (UPDATE sessions SET last_used_at = now() WHERE id = $3) "
			    "INSERT INTO refresh_tokens (token_hash, session_id, expires_at) "
			    "SELECT decode($2, 'hex'), $3, expires_at FROM spent",
			    3, p);
		}
		return;
	}
	case REFRESH_ROTATE:
	case REFRESH_REVOKE:
	case REFRESH_AUDIT:
		if (op->state == REFRESH_AUDIT && r->grace) {
			r->grace = false; /* fall into the audit append once */
		} else if (op->state == REFRESH_AUDIT) {
			op->state = REFRESH_COMMIT;
			http_op_commit(op);
			return;
		}
		op->state = REFRESH_AUDIT;
		audit_event_from_request(&aev, op->req, r->org_id, r->user_id,
		                         r->reused ? "auth.refresh.reused"
		                                   : "auth.refresh.succeeded");
		aev.resource_type = "session";
		aev.resource_id = r->session_id;
		details = json_object();
		auth_op_audit_hmac(op, &aev, details, "jti", r->hash);
		return;
	case REFRESH_COMMIT:
		http_set_cancel(op->req, NULL, NULL);
		if (r->reused) {
			auth_revoke_note("sid", r->session_id,
			                 (long long)time(NULL) + auth_g.cfg->access_token_ttl_s +
			                     120);
			auth_clear_cookies(op->req);
			http_error(op->req, 401, "token_reused",
			           "this refresh token was already used; the session is revoked");
		} else {
			auth_respond_tokens(op->req, 200, r->user_id, r->org_id, r->role,
			                    r->session_id, r->next);
		}
		refresh_cancel(op);
		return;
	}
}

static void auth_refresh(struct http_request *req)
{
	json_t *body = http_json_body(req);
	const char *tok;
	struct refresh_op *r;

	if (body == NULL)
		return;
	tok = auth_body_str(req, body, "refresh_token", AUTH_REFRESH_TEXT - 1, true);
	if (tok == NULL)
		goto out;
	r = http_op_new(req, sizeof(*r), refresh_advance);
	r->op.on_cancel = refresh_cancel;
	snprintf(r->token, sizeof(r->token), "%s", tok);
	auth_token_hash_hex(r->hash, r->token);
	r->op.state = REFRESH_BEGIN;
	(void)http_op_begin(&r->op);
out:
	auth_body_free(body);
}

/* ---- POST /api/v1/auth/logout ---- */

enum logout_state {
	LOGOUT_BEGIN,  /* BEGIN sent */
	LOGOUT_REVOKE, /* jti and session revoked */
	LOGOUT_AUDIT,  /* auth.logout appended */
	LOGOUT_COMMIT, /* COMMIT sent */
};

static void logout_advance(struct http_op *op, enum db_event ev, const PGresult *res)
{
	struct http_request *req = op->req;
	struct audit_event aev;
	json_t *details;
	char exp[32], ttl[32];
	long long sid_exp = (long long)time(NULL) + auth_g.cfg->access_token_ttl_s + 120;

	if (ev != DB_OK) {
		http_op_db_fail(op, ev, res);
		return;
	}
	switch (op->state) {
	case LOGOUT_BEGIN: {
		const char *p[4] = { req->auth.jti, exp, req->auth.session_id, ttl };

		snprintf(exp, sizeof(exp), "%lld", req->auth.exp);
		snprintf(ttl, sizeof(ttl), "%lld", auth_g.cfg->access_token_ttl_s + 120);
		op->state = LOGOUT_REVOKE;
		(void)http_op_query(
		    op,
		    "WITH s AS (UPDATE sessions SET revoked_at = now(), "
		    "revoke_reason = 'logout' WHERE id = $3 AND revoked_at IS NULL), "
		    "t AS (UPDATE refresh_tokens SET spent_at = coalesce(spent_at, now()) "
		    "WHERE session_id = $3) "
		    "INSERT INTO revocations (kind, value, expires_at) VALUES "
		    "('jti', $1::uuid, to_timestamp($2::bigint)), "
		    "('sid', $3::uuid, now() + make_interval(secs => $4::bigint))",
		    4, p);
		return;
	}
	case LOGOUT_REVOKE:
		op->state = LOGOUT_AUDIT;
		audit_event_from_request(&aev, req, req->auth.org_id, req->auth.user_id,
		                         "auth.logout");
		aev.resource_id = req->auth.session_id;
		details = json_object();
		auth_op_audit_hmac(op, &aev, details, "jti", req->auth.jti);
		return;
	case LOGOUT_AUDIT:
		op->state = LOGOUT_COMMIT;
		http_op_commit(op);
		return;
	case LOGOUT_COMMIT:
		http_set_cancel(req, NULL, NULL);
		auth_revoke_note("jti", req->auth.jti, req->auth.exp);
		auth_revoke_note("sid", req->auth.session_id, sid_exp);
		auth_clear_cookies(req);
		http_respond(req, 204, NULL, NULL, 0);
		return;
	}
}

static void auth_logout(struct http_request *req)
{
	struct http_op *op = http_op_new(req, sizeof(*op), logout_advance);

	op->state = LOGOUT_BEGIN;
	(void)http_op_begin(op);
}

/* ---- registration ---- */

void auth_session_routes(struct router *r)
{
	db_pool_prepare(
	    cs_worker->db, "auth_login_lookup",
	    "SELECT u.id, u.password_hash, u.mfa_enabled, coalesce(u.pw_locked_until > now(), "
	    "false), "
	    "m.org_id, m.role, u.mfa_secret, u.mfa_secret_org, u.mfa_last_step, "
	    "coalesce(u.mfa_locked_until > now(), false), "
	    "greatest(1, ceil(extract(epoch FROM u.mfa_locked_until - now())))::bigint "
	    "FROM users u LEFT JOIN LATERAL (SELECT org_id, role FROM memberships "
	    "WHERE user_id = u.id ORDER BY (role = 'owner') DESC, created_at LIMIT 1) m ON true "
	    "WHERE u.email = $1 AND u.deleted_at IS NULL",
	    1);
	router_add_perm(r, "POST", "/api/v1/auth/signup", auth_signup,
	                ROUTE_NEEDS_DB | ROUTE_PUBLIC | ROUTE_NO_CSRF, NULL);
	router_add_perm(r, "POST", "/api/v1/auth/login", auth_login,
	                ROUTE_NEEDS_DB | ROUTE_PUBLIC | ROUTE_NO_CSRF, NULL);
	router_add_perm(r, "POST", "/api/v1/auth/refresh", auth_refresh,
	                ROUTE_NEEDS_DB | ROUTE_PUBLIC | ROUTE_NO_CSRF, NULL);
	router_add_perm(r, "POST", "/api/v1/auth/logout", auth_logout, ROUTE_NEEDS_DB | ROUTE_SELF,
	                NULL);
}
