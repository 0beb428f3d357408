/*
 * privacy.c - what a user may do about the data held on them: download it
 * (GET /me/export), correct it (PATCH /me, with a changed email applied only
 * once re-verified through POST /me/email/verify), and delete the account
 * (DELETE /me: soft delete now, purge of the personal data later by the job
 * at the bottom of this file; see privacy.h).
 *
 * There is no mail transport yet, so the email verification token is
 * returned in the PATCH response; like every token it is stored only as
 * its SHA-256. The export is built in SQL as one JSON document and leaves
 * out what belongs to other people: on audit events about the user that
 * someone else caused, that person's id, address and browser are masked.
 */
#include "config.h"

#include <stdlib.h>
#include <string.h>

#include <event2/event.h>

#include "cloudsweep/audit.h"
#include "cloudsweep/auth.h"
#include "cloudsweep/log.h"
#include "cloudsweep/privacy.h"
#include "cloudsweep/worker.h"
#include "auth_int.h"

#define PRIVACY_EXPORT_EVENTS   "10000"    /* newest audit events in an export */
#define PRIVACY_EMAIL_TOKEN_TTL "24 hours" /* how long an email verification token works */
#define PRIVACY_PURGE_LOCK_KEY  "7233630264425640550" /* pg advisory lock of the purge job */

/* ---- GET /api/v1/me/export ---- */

enum export_state {
	EXPORT_BEGIN,  /* BEGIN sent */
	EXPORT_READ,   /* the document built */
	EXPORT_AUDIT,  /* user.exported appended */
	EXPORT_COMMIT, /* COMMIT sent */
};

struct export_op {
	struct http_op op;
	char *doc; /* pool-owned JSON document */
	size_t len;
};

static void export_advance(struct http_op *op, enum db_event ev, const PGresult *res)
{
	struct export_op *x = (struct export_op *)op;
	struct http_request *req = op->req;
	struct audit_event aev;
	json_t *details;

	if (ev != DB_OK) {
		http_op_db_fail(op, ev, res);
		return;
	}
	switch (op->state) {
	case EXPORT_BEGIN: {
		const char *p[1] = { req->auth.user_id };

		op->state = EXPORT_READ;
		(void)http_op_prepared(op, "privacy_export", 1, p);
		return;
	}
	case EXPORT_READ:
		if (PQntuples(res) != 1 || PQgetisnull(res, 0, 0)) {
			http_op_fail(op, 404, "not_found", "not found");
			return;
		}
		x->len = (size_t)PQgetlength(res, 0, 0);
		x->doc = http_strndup(req, PQgetvalue(res, 0, 0), x->len);
		op->state = EXPORT_AUDIT;
		audit_event_from_request(&aev, req, req->auth.org_id, req->auth.user_id,
		                         "user.exported");
		aev.resource_id = req->auth.user_id;
		details = json_pack("{s:I, s:I}", "bytes", (json_int_t)x->len, "audit_events",
		                    (json_int_t)strtoll(PQgetvalue(res, 0, 1), NULL, 10));
		(void)audit_op_write(op, &aev, details);
		return;
	case EXPORT_AUDIT:
		op->state = EXPORT_COMMIT;
		http_op_commit(op);
		return;
	case EXPORT_COMMIT:
		http_set_cancel(req, NULL, NULL);
		http_add_header(req, "Content-Disposition",
		                "attachment; filename=\"cloudsweep-export.json\"");
		http_respond(req, 200, "application/json", x->doc, x->len);
		return;
	}
}

static void me_export_get(struct http_request *req)
{
	struct export_op *x = http_op_new(req, sizeof(*x), export_advance);

	x->op.state = EXPORT_BEGIN;
	(void)http_op_begin(&x->op);
}

/* ---- PATCH /api/v1/me ---- */

enum patch_state {
	PATCH_BEGIN,  /* BEGIN sent */
	PATCH_UPDATE, /* name set and/or the new email recorded as pending */
	PATCH_AUDIT,  /* user.updated appended */
	PATCH_COMMIT, /* COMMIT sent */
};

struct patch_op {
	struct http_op op;
	char *name;                    /* pool-owned, or NULL: unchanged */
	char email[256];               /* the requested address, or empty: unchanged */
	bool email_pending;            /* the address differs from the current one */
	char token[AUTH_REFRESH_TEXT]; /* the verification token, shown once; wiped */
	json_t *user;                  /* owned: the answer's user object */
};

static void patch_cancel(struct http_op *op)
{
	struct patch_op *p = (struct patch_op *)op;

	cs_wipe(p->token, sizeof(p->token));
	json_decref(p->user);
	p->user = NULL;
}

static void patch_advance(struct http_op *op, enum db_event ev, const PGresult *res)
{
	struct patch_op *p = (struct patch_op *)op;
	struct http_request *req = op->req;
	struct audit_event aev;
	json_t *details, *fields;

	if (ev != DB_OK) {
		http_op_db_fail(op, ev, res);
		return;
	}
	switch (op->state) {
	case PATCH_BEGIN: {
		char hash[65];
		const char *params[4] = { req->auth.user_id, p->name,
			                  p->email[0] != '\0' ? p->email : NULL, NULL };

		if (p->email[0] != '\0') {
			auth_refresh_new(p->token);
			auth_token_hash_hex(hash, p->token);
			params[3] = hash;
		}
		op->state = PATCH_UPDATE;
		(void)http_op_prepared(op, "privacy_patch", 4, params);
		return;
	}
	case PATCH_UPDATE:
		if (PQntuples(res) != 1) {
			http_op_fail(op, 401, "unauthenticated", "the account no longer exists");
			return;
		}
		if (strcmp(PQgetvalue(res, 0, 4), "t") == 0) {
			http_op_fail(op, 409, "conflict",
			             "an account with this email already exists");
			return;
		}
		p->email_pending = !PQgetisnull(res, 0, 3) && p->email[0] != '\0';
		p->user =
		    json_pack("{s:s, s:s, s:s, s:s?, s:s?}", "id", PQgetvalue(res, 0, 0), "email",
		              PQgetvalue(res, 0, 1), "name", PQgetvalue(res, 0, 2), "pending_email",
		              PQgetisnull(res, 0, 3) ? NULL : PQgetvalue(res, 0, 3),
		              "email_verification_expires_at",
		              PQgetisnull(res, 0, 5) ? NULL : PQgetvalue(res, 0, 5));
		fields = json_array();
		if (p->name != NULL)
			json_array_append_new(fields, json_string("name"));
		if (p->email[0] != '\0')
			json_array_append_new(fields, json_string("email"));
		details = json_pack("{s:o, s:b}", "fields", fields, "pending_verification",
		                    p->email_pending);
		if (p->user == NULL || details == NULL) {
			json_decref(details);
			http_op_fail(op, 500, "internal", "cannot build the answer");
			return;
		}
		op->state = PATCH_AUDIT;
		audit_event_from_request(&aev, req, req->auth.org_id, req->auth.user_id,
		                         "user.updated");
		aev.resource_id = req->auth.user_id;
		if (p->email_pending)
			(void)auth_op_audit_hmac(op, &aev, details, "email", p->email);
		else
			(void)audit_op_write(op, &aev, details);
		return;
	case PATCH_AUDIT:
		op->state = PATCH_COMMIT;
		http_op_commit(op);
		return;
	case PATCH_COMMIT:
		http_set_cancel(req, NULL, NULL);
		if (p->email_pending)
			json_object_set_new(p->user, "email_verification_token",
			                    json_string(p->token));
		http_respond_json(req, 200, p->user);
		p->user = NULL;
		patch_cancel(op);
		return;
	}
}

static void me_patch(struct http_request *req)
{
	json_t *body = http_json_body(req);
	const char *key, *name = NULL, *email = NULL;
	json_t *v;
	struct patch_op *p;
	char norm[256];

	if (body == NULL)
		return;
	json_object_foreach (body, key, v) {
		if (strcmp(key, "name") != 0 && strcmp(key, "email") != 0) {
			http_error(req, 400, "invalid_request",
			           "field %.64s cannot be changed here (name, email)", key);
			goto out;
		}
	}
	if (json_object_get(body, "name") != NULL) {
		name = auth_body_str(req, body, "name", 255, true);
		if (name == NULL)
			goto out;
		if (cs_has_control(name)) {
			http_error(req, 400, "invalid_request",
			           "field name must not contain control characters");
			goto out;
		}
	}
	if (json_object_get(body, "email") != NULL) {
		email = auth_body_str(req, body, "email", 254, true);
		if (email == NULL)
			goto out;
		if (auth_email_normalize(email, norm, sizeof(norm)) == -1) {
			http_error(req, 400, "invalid_request",
			           "field email is not a valid address");
			goto out;
		}
	}
	if (name == NULL && email == NULL) {
		http_error(req, 400, "invalid_request", "field name or email is required");
		goto out;
	}
	p = http_op_new(req, sizeof(*p), patch_advance);
	p->op.on_cancel = patch_cancel;
	if (name != NULL)
		p->name = http_strndup(req, name, strlen(name));
	if (email != NULL)
		snprintf(p->email, sizeof(p->email), "%s", norm);
	p->op.state = PATCH_BEGIN;
	(void)http_op_begin(&p->op);
out:
	json_decref(body);
}

/* ---- POST /api/v1/me/email/verify ---- */

enum verify_state {
	VERIFY_BEGIN,  /* BEGIN sent */
	VERIFY_APPLY,  /* the pending address made the account's email */
	VERIFY_AUDIT,  /* user.updated appended */
	VERIFY_COMMIT, /* COMMIT sent */
};

struct verify_email_op {
	struct http_op op;
	char hash[65];
	json_t *user; /* owned: the answer */
	char email[256];
};

static void verify_email_cancel(struct http_op *op)
{
	struct verify_email_op *v = (struct verify_email_op *)op;

	json_decref(v->user);
	v->user = NULL;
}

static void verify_email_advance(struct http_op *op, enum db_event ev, const PGresult *res)
{
	struct verify_email_op *v = (struct verify_email_op *)op;
	struct http_request *req = op->req;
	struct audit_event aev;
	const char *sqlstate;

	if (ev != DB_OK) {
		sqlstate = res != NULL ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
		if (op->state == VERIFY_APPLY && sqlstate != NULL &&
		    strcmp(sqlstate, "23505") == 0) {
			http_op_fail(op, 409, "conflict",
			             "an account with this email already exists");
			return;
		}
		http_op_db_fail(op, ev, res);
		return;
	}
	switch (op->state) {
	case VERIFY_BEGIN: {
		const char *p[2] = { req->auth.user_id, v->hash };

		op->state = VERIFY_APPLY;
		(void)http_op_prepared(op, "privacy_email_verify", 2, p);
		return;
	}
	case VERIFY_APPLY:
		if (PQntuples(res) != 1) {
			http_op_fail(op, 400, "invalid_request",
			             "field token is invalid or expired");
			return;
		}
		snprintf(v->email, sizeof(v->email), "%s", PQgetvalue(res, 0, 1));
		v->user = json_pack("{s:s, s:s, s:s}", "id", PQgetvalue(res, 0, 0), "email",
		                    v->email, "name", PQgetvalue(res, 0, 2));
		op->state = VERIFY_AUDIT;
		audit_event_from_request(&aev, req, req->auth.org_id, req->auth.user_id,
		                         "user.updated");
		aev.resource_id = req->auth.user_id;
		auth_op_audit_hmac(op, &aev,
		                   json_pack("{s:[s], s:b}", "fields", "email", "verified", 1),
		                   "email", v->email);
		return;
	case VERIFY_AUDIT:
		op->state = VERIFY_COMMIT;
		http_op_commit(op);
		return;
	case VERIFY_COMMIT:
		http_set_cancel(req, NULL, NULL);
		if (v->user == NULL) {
			http_error(req, 500, "internal", "cannot build the answer");
			return;
		}
		http_respond_json(req, 200, v->user);
		v->user = NULL;
		return;
	}
}

static void me_email_verify_post(struct http_request *req)
{
	json_t *body = http_json_body(req);
	const char *tok;
	struct verify_email_op *v;

	if (body == NULL)
		return;
	tok = auth_body_str(req, body, "token", AUTH_REFRESH_TEXT - 1, true);
	if (tok == NULL)
		goto out;
	v = http_op_new(req, sizeof(*v), verify_email_advance);
	v->op.on_cancel = verify_email_cancel;
	auth_token_hash_hex(v->hash, tok);
	v->op.state = VERIFY_BEGIN;
	(void)http_op_begin(&v->op);
out:
	auth_body_free(body);
}

/* ---- DELETE /api/v1/me ---- */

enum delete_state {
	DELETE_BEGIN,  /* BEGIN sent */
	DELETE_LOCK,   /* the caller's organizations locked (no concurrent role changes) */
	DELETE_CHECK,  /* organizations where the caller is the only owner among members */
	DELETE_MARK,   /* deleted_at set */
	DELETE_REVOKE, /* every session revoked */
	DELETE_AUDIT,  /* user.deleted appended */
	DELETE_COMMIT, /* COMMIT sent */
};

struct delete_op {
	struct http_op op;
	char purge_after[40];
	struct auth_revoked revoked;
};

static void delete_advance(struct http_op *op, enum db_event ev, const PGresult *res)
{
	struct delete_op *d = (struct delete_op *)op;
	struct http_request *req = op->req;
	struct audit_event aev;
	json_t *details;

	if (ev != DB_OK) {
		http_op_db_fail(op, ev, res);
		return;
	}
	switch (op->state) {
	case DELETE_BEGIN: {
		const char *p[1] = { req->auth.user_id };

		op->state = DELETE_LOCK;
		(void)http_op_query(
		    op,
		    "SELECT id FROM orgs WHERE id IN (SELECT org_id FROM memberships "
		    "WHERE user_id = $1) ORDER BY id FOR UPDATE",
		    1, p);
		return;
	}
	case DELETE_LOCK: {
		const char *p[1] = { req->auth.user_id };

		op->state = DELETE_CHECK;
		(void)http_op_prepared(op, "privacy_sole_owner", 1, p);
		return;
	}
	case DELETE_CHECK: {
		char days[32];
		const char *p[2] = { req->auth.user_id, days };

		if (PQntuples(res) > 0) {
			http_op_fail(op, 409, "conflict",
			             "you are the only owner of organization %s, which has other "
			             "members: make one of them owner first",
			             PQgetvalue(res, 0, 0));
			return;
		}
		snprintf(days, sizeof(days), "%lld", auth_g.cfg->purge_after_days);
		op->state = DELETE_MARK;
		(void)http_op_query(
		    op,
		    "UPDATE users SET deleted_at = now(), pending_email = NULL, "
		    "pending_email_token_hash = NULL, pending_email_expires_at = NULL "
		    "WHERE id = $1 AND deleted_at IS NULL "
		    "RETURNING audit_rfc3339(now() + make_interval(days => $2::int))",
		    2, p);
		return;
	}
	case DELETE_MARK:
		if (PQntuples(res) != 1) {
			http_op_fail(op, 401, "unauthenticated", "the account no longer exists");
			return;
		}
		snprintf(d->purge_after, sizeof(d->purge_after), "%s", PQgetvalue(res, 0, 0));
		op->state = DELETE_REVOKE;
		(void)auth_op_sessions_revoke(op, req->auth.user_id, NULL, NULL, NULL,
		                              "account_deleted");
		return;
	case DELETE_REVOKE:
		auth_revoked_keep(req, &d->revoked, res);
		op->state = DELETE_AUDIT;
		audit_event_from_request(&aev, req, req->auth.org_id, req->auth.user_id,
		                         "user.deleted");
		aev.resource_id = req->auth.user_id;
		details = json_pack("{s:s, s:i}", "purge_after", d->purge_after, "sessions_revoked",
		                    d->revoked.n);
		(void)audit_op_write(op, &aev, details);
		return;
	case DELETE_AUDIT:
		op->state = DELETE_COMMIT;
		http_op_commit(op);
		return;
	case DELETE_COMMIT:
		http_set_cancel(req, NULL, NULL);
		auth_revoked_note(&d->revoked);
		auth_clear_cookies(req);
		http_respond(req, 204, NULL, NULL, 0);
		return;
	}
}

static void me_delete(struct http_request *req)
{
	struct delete_op *d = http_op_new(req, sizeof(*d), delete_advance);

	d->op.state = DELETE_BEGIN;
	(void)http_op_begin(&d->op);
}

/* ---- the purge job ---- */

enum purge_state {
	PURGE_IDLE,   /* waiting for the timer */
	PURGE_BEGIN,  /* BEGIN sent */
	PURGE_LOCK,   /* pg_try_advisory_xact_lock: one purger at a time, deployment-wide */
	PURGE_SCRUB,  /* a batch of accounts scrubbed; one row per (user, organization) */
	PURGE_AUDIT,  /* user.purged being appended, one event per row */
	PURGE_COMMIT, /* COMMIT sent */
};

struct purge_row {
	char user_id[37];
	char org_id[37];
};

static struct {
	struct event_base *base;  /* borrowed */
	const struct config *cfg; /* borrowed */
	struct db_pool *pool;     /* borrowed */
	struct event *ev;         /* owned timer */
	struct db_tx *tx;         /* open transaction, or NULL */
	struct db_query *q;       /* pending query, or NULL */
	enum purge_state state;
	struct purge_row *rows; /* owned; the batch being audited */
	int nrows, next, users;
	bool committing; /* COMMIT sent: its callback owns the outcome */
} pj;

static void purge_db_cb(void *arg, enum db_event ev, const PGresult *res);

static void purge_schedule(long long seconds)
{
	struct timeval tv = { (time_t)seconds, 0 };

	if (pj.ev != NULL && event_add(pj.ev, &tv) == -1)
		log_warnx("privacy_purge", "cannot re-arm the purge timer");
}

/* End a run: roll back what is open, forget the batch, wait for the next tick. */
static void purge_end(long long next_s)
{
	if (pj.q != NULL)
		db_query_cancel(pj.q);
	pj.q = NULL;
	if (pj.tx != NULL)
		db_tx_rollback(pj.tx);
	pj.tx = NULL;
	free(pj.rows);
	pj.rows = NULL;
	pj.nrows = pj.next = pj.users = 0;
	pj.state = PURGE_IDLE;
	purge_schedule(next_s);
}

static void purge_audit_next(void)
{
	struct audit_event ev;
	const struct purge_row *r;

	if (pj.next == pj.nrows) {
		pj.state = PURGE_COMMIT;
		pj.committing = true;
		db_tx_commit(pj.tx, purge_db_cb, NULL);
		pj.tx = NULL; /* the pool owns it until the callback */
		return;
	}
	r = &pj.rows[pj.next++];
	memset(&ev, 0, sizeof(ev));
	ev.org_id = r->org_id;
	ev.actor = NULL; /* system */
	ev.event_type = "user.purged";
	ev.resource_id = r->user_id;
	pj.q = audit_write(pj.tx, &ev, purge_db_cb, NULL);
	if (pj.q == NULL) {
		log_warnx("privacy_purge", "the audit trail refused user.purged; retrying later");
		purge_end(pj.cfg->purge_interval_s);
	}
}

static void purge_db_cb(void *arg, enum db_event ev, const PGresult *res)
{
	const char *why;

	if (pj.pool == NULL)
		return; /* stopped while a COMMIT was in flight: the pool reports its end */
	pj.q = NULL;
	if (pj.state == PURGE_BEGIN && ev != DB_OK)
		pj.tx = NULL; /* a failed BEGIN frees its transaction */
	if (pj.state == PURGE_COMMIT)
		pj.committing = false;
	if (ev != DB_OK) {
		why = res != NULL ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
		log_warnx("privacy_purge", "purging deleted accounts failed (%s); retrying later",
		          why != NULL ? why : (ev == DB_TIMEOUT ? "timeout" : "unavailable"));
		purge_end(pj.cfg->purge_interval_s);
		return;
	}
	switch (pj.state) {
	case PURGE_IDLE:
		return;
	case PURGE_BEGIN:
		pj.state = PURGE_LOCK;
		pj.q = db_tx_query(pj.tx,
		                   "SELECT pg_try_advisory_xact_lock(" PRIVACY_PURGE_LOCK_KEY ")",
		                   0, NULL, purge_db_cb, NULL);
		break;
	case PURGE_LOCK: {
		char days[32], batch[16];
		const char *p[2] = { days, batch };

		if (PQntuples(res) != 1 || strcmp(PQgetvalue(res, 0, 0), "t") != 0) {
			purge_end(pj.cfg->purge_interval_s); /* another worker is purging */
			return;
		}
		snprintf(days, sizeof(days), "%lld", pj.cfg->purge_after_days);
		snprintf(batch, sizeof(batch), "%d", PRIVACY_PURGE_BATCH);
		pj.state = PURGE_SCRUB;
		pj.q = db_tx_query_prepared(pj.tx, "privacy_purge", 2, p, purge_db_cb, NULL);
		break;
	}
	case PURGE_SCRUB:
		pj.nrows = PQntuples(res);
		if (pj.nrows == 0) {
			purge_end(pj.cfg->purge_interval_s);
			return;
		}
		pj.rows = xcalloc((size_t)pj.nrows, sizeof(*pj.rows));
		for (int i = 0; i < pj.nrows; i++) {
			snprintf(pj.rows[i].user_id, sizeof(pj.rows[i].user_id), "%s",
			         PQgetvalue(res, i, 0));
			snprintf(pj.rows[i].org_id, sizeof(pj.rows[i].org_id), "%s",
			         PQgetvalue(res, i, 1));
			if (i == 0 || strcmp(pj.rows[i].user_id, pj.rows[i - 1].user_id) != 0)
				pj.users++;
		}
		pj.state = PURGE_AUDIT;
		purge_audit_next();
		return;
	case PURGE_AUDIT:
		purge_audit_next();
		return;
	case PURGE_COMMIT: {
		int users = pj.users;

		log_info("privacy_purge", "purged the personal data of %d deleted accounts", users);
		/* A full batch suggests more are due: go on at once. */
		purge_end(users >= PRIVACY_PURGE_BATCH ? 0 : pj.cfg->purge_interval_s);
		return;
	}
	}
	if (pj.q == NULL) {
		log_warnx("privacy_purge", "the database refused the purge query; retrying later");
		purge_end(pj.cfg->purge_interval_s);
	}
}

static void purge_tick_cb(evutil_socket_t fd, short what, void *arg)
{
	if (pj.state != PURGE_IDLE || pj.committing)
		return;
	pj.state = PURGE_BEGIN;
	pj.tx = db_tx_begin(pj.pool, purge_db_cb, NULL);
	if (pj.tx == NULL) {
		pj.state = PURGE_IDLE;
		purge_schedule(pj.cfg->purge_interval_s); /* the database is down: try later */
	}
}

void privacy_purge_start(struct event_base *base, const struct config *cfg, struct db_pool *pool)
{
	long long first = cfg->purge_interval_s < PRIVACY_PURGE_FIRST_S ? cfg->purge_interval_s
	                                                                : PRIVACY_PURGE_FIRST_S;

	memset(&pj, 0, sizeof(pj));
	pj.base = base;
	pj.cfg = cfg;
	pj.pool = pool;
	db_pool_prepare(
	    pool, "privacy_purge",
	    "WITH v AS (SELECT id FROM users WHERE deleted_at IS NOT NULL AND purged_at IS NULL "
	    "AND deleted_at < now() - make_interval(days => $1::int) ORDER BY deleted_at "
	    "LIMIT $2::int FOR UPDATE SKIP LOCKED), "
	    "o AS (SELECT v.id AS user_id, coalesce(m.org_id, '" AUDIT_NIL_ORG "'::uuid) AS org_id "
	    "FROM v LEFT JOIN memberships m ON m.user_id = v.id), "
	    "s AS (DELETE FROM sessions WHERE user_id IN (SELECT id FROM v)), "
	    "b AS (DELETE FROM backup_codes WHERE user_id IN (SELECT id FROM v)), "
	    "m AS (DELETE FROM memberships WHERE user_id IN (SELECT id FROM v)), "
	    "gd AS (UPDATE github_deliveries SET github_user_id = NULL WHERE github_user_id IN "
	    "(SELECT github_id FROM github_identities WHERE user_id IN (SELECT id FROM v))), "
	    "gi AS (DELETE FROM github_identities WHERE user_id IN (SELECT id FROM v)), "
	    "gs AS (DELETE FROM github_oauth_states WHERE link_user_id IN (SELECT id FROM v)), "
	    "i AS (UPDATE org_invitations SET invited_by = NULL WHERE invited_by IN "
	    "(SELECT id FROM v)), "
	    "u AS (UPDATE users SET email = 'purged-' || users.id::text, name = '', "
	    "password_hash = NULL, github_id = NULL, github_login = NULL, mfa_secret = NULL, "
	    "mfa_secret_org = NULL, "
	    "mfa_enabled = false, mfa_last_step = 0, pw_failures = 0, pw_locked_until = NULL, "
	    "mfa_failures = 0, mfa_locked_until = NULL, last_login_at = NULL, "
	    "pending_email = NULL, pending_email_token_hash = NULL, "
	    "pending_email_expires_at = NULL, purged_at = now() FROM v WHERE users.id = v.id) "
	    "SELECT user_id, org_id FROM o ORDER BY user_id, org_id",
	    2);
	pj.ev = event_new(base, -1, 0, purge_tick_cb, NULL);
	if (pj.ev == NULL)
		fatalx("privacy_purge", "cannot create the purge timer");
	purge_schedule(first);
}

void privacy_purge_stop(void)
{
	if (pj.q != NULL)
		db_query_cancel(pj.q);
	pj.q = NULL;
	if (pj.tx != NULL)
		db_tx_rollback(pj.tx);
	pj.tx = NULL;
	if (pj.ev != NULL)
		event_free(pj.ev);
	free(pj.rows);
	memset(&pj, 0, sizeof(pj));
}

/* ---- registration ---- */

void auth_privacy_routes(struct router *r)
{
	struct db_pool *db = cs_worker->db;

	db_pool_prepare(
	    db, "privacy_export",
	    "WITH ev AS (SELECT * FROM audit_events WHERE actor = $1::text OR resource_id = "
	    "$1::text "
	    "ORDER BY occurred_at DESC, seq DESC LIMIT " PRIVACY_EXPORT_EVENTS ") "
	    "SELECT json_build_object('format', 'cloudsweep-export-v1', "
	    "'exported_at', audit_rfc3339(now()), "
	    "'user', (SELECT json_build_object('id', u.id, 'email', u.email, 'name', u.name, "
	    "'pending_email', u.pending_email, 'github_id', u.github_id, "
	    "'github_login', u.github_login, 'mfa_enabled', u.mfa_enabled, "
	    "'created_at', audit_rfc3339(u.created_at), 'updated_at', audit_rfc3339(u.updated_at), "
	    "'last_login_at', audit_rfc3339(u.last_login_at)) FROM users u WHERE u.id = $1::uuid), "
	    "'github', (SELECT json_build_object('id', g.github_id, 'login', g.login, "
	    "'linked_at', audit_rfc3339(g.linked_at)) FROM github_identities g "
	    "WHERE g.user_id = $1::uuid), "
	    "'memberships', coalesce((SELECT json_agg(json_build_object('org_id', o.id, "
	    "'org_name', o.name, 'role', m.role, 'joined_at', audit_rfc3339(m.created_at)) "
	    "ORDER BY m.created_at) FROM memberships m JOIN orgs o ON o.id = m.org_id "
	    "WHERE m.user_id = $1::uuid), '[]'), "
	    "'sessions', coalesce((SELECT json_agg(json_build_object('id', s.id, 'org_id', "
	    "s.org_id, 'method', s.method, 'ip', s.ip, 'user_agent', s.user_agent, "
	    "'created_at', audit_rfc3339(s.created_at), "
	    "'last_used_at', audit_rfc3339(s.last_used_at), "
	    "'expires_at', audit_rfc3339(s.expires_at), "
	    "'revoked_at', audit_rfc3339(s.revoked_at), 'revoke_reason', s.revoke_reason) "
	    "ORDER BY s.created_at) FROM sessions s WHERE s.user_id = $1::uuid), '[]'), "
	    "'audit_events', coalesce((SELECT json_agg(json_build_object('id', e.id, "
	    "'org_id', e.org_id, 'occurred_at', audit_rfc3339(e.occurred_at), "
	    "'actor', CASE WHEN e.actor IN ($1::text, 'system') THEN e.actor "
	    "ELSE 'another_user' END, "
	    "'actor_ip', CASE WHEN e.actor = $1::text THEN e.actor_ip END, "
	    "'user_agent', CASE WHEN e.actor = $1::text THEN e.user_agent END, "
	    "'event_type', e.event_type, 'resource_type', e.resource_type, "
	    "'resource_id', CASE WHEN e.resource_type = 'user' AND e.resource_id <> $1::text "
	    "THEN 'another_user' ELSE e.resource_id END, "
	    "'action', e.action, 'result', e.result, 'details', e.details) "
	    "ORDER BY e.occurred_at, e.seq) FROM ev e), '[]'), "
	    "'audit_events_truncated', (SELECT count(*) FROM ev) >= " PRIVACY_EXPORT_EVENTS
	    ")::text, (SELECT count(*) FROM ev)",
	    1);
	db_pool_prepare(
	    db, "privacy_patch",
	    "UPDATE users SET name = coalesce($2, name), "
	    "pending_email = CASE WHEN $3::text IS NULL THEN pending_email "
	    "WHEN $3 = email THEN NULL ELSE $3 END, "
	    "pending_email_token_hash = CASE WHEN $3::text IS NULL THEN pending_email_token_hash "
	    "WHEN $3 = email THEN NULL ELSE $4 END, "
	    "pending_email_expires_at = CASE WHEN $3::text IS NULL THEN pending_email_expires_at "
	    "WHEN $3 = email THEN NULL ELSE now() + interval '" PRIVACY_EMAIL_TOKEN_TTL "' END "
	    "WHERE id = $1 AND deleted_at IS NULL "
	    "RETURNING id, email, name, pending_email, $3::text IS NOT NULL AND EXISTS "
	    "(SELECT 1 FROM users o WHERE o.email = $3 AND o.id <> $1 AND o.deleted_at IS NULL), "
	    "audit_rfc3339(pending_email_expires_at)",
	    4);
	db_pool_prepare(db, "privacy_email_verify",
	                "UPDATE users SET email = pending_email, pending_email = NULL, "
	                "pending_email_token_hash = NULL, pending_email_expires_at = NULL "
	                "WHERE id = $1 AND deleted_at IS NULL AND pending_email IS NOT NULL "
	                "AND pending_email_token_hash = $2 AND pending_email_expires_at > now() "
	                "RETURNING id, email, name",
	                2);
	db_pool_prepare(
	    db, "privacy_sole_owner",
	    "SELECT m.org_id FROM memberships m WHERE m.user_id = $1 AND m.role = 'owner' "
	    "AND NOT EXISTS (SELECT 1 FROM memberships o JOIN users u ON u.id = o.user_id "
	    "WHERE o.org_id = m.org_id AND o.user_id <> $1 AND o.role = 'owner' "
	    "AND u.deleted_at IS NULL) "
	    "AND EXISTS (SELECT 1 FROM memberships o JOIN users u ON u.id = o.user_id "
	    "WHERE o.org_id = m.org_id AND o.user_id <> $1 AND u.deleted_at IS NULL) "
	    "ORDER BY m.org_id",
	    1);
	router_add_perm(r, "GET", "/api/v1/me/export", me_export_get, ROUTE_NEEDS_DB | ROUTE_SELF,
	                NULL);
	router_add_perm(r, "PATCH", "/api/v1/me", me_patch, ROUTE_NEEDS_DB | ROUTE_SELF, NULL);
	router_add_perm(r, "DELETE", "/api/v1/me", me_delete, ROUTE_NEEDS_DB | ROUTE_SELF, NULL);
	router_add_perm(r, "POST", "/api/v1/me/email/verify", me_email_verify_post,
	                ROUTE_NEEDS_DB | ROUTE_SELF, NULL);
}
