/*
 * members.c - managing an organization's members (add or invite, change a
 * role, remove), ending the caller's own sessions, and changing the
 * caller's password. Each endpoint is one op (see http_op in http.h) whose
 * states read top to bottom; the change, the session revocations it
 * implies and its audit row commit in one transaction before anything is
 * answered.
 *
 * Membership changes of one organization run one at a time: each takes a
 * row lock on the organization first, so two owners demoting each other at
 * once cannot leave it without an owner. The rules are read from the
 * database inside that lock, the caller's current role included (the role
 * in an access token may be up to an hour old): admins and owners manage
 * members, only owners grant, change or remove the owner role, and the
 * last owner can be neither demoted nor removed. A removed or demoted
 * member's sessions in the organization are revoked, so a lowered role
 * takes effect at once instead of when the access token expires.
 */
#include "config.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cloudsweep/audit.h"
#include "cloudsweep/auth.h"
#include "cloudsweep/authcrypto.h"
#include "cloudsweep/log.h"
#include "cloudsweep/worker.h"
#include "auth_int.h"

#define MEMBERS_INVITE_TTL "7 days" /* how long an invitation can be accepted */

int auth_op_sessions_revoke(struct http_op *op, const char *user, const char *org, const char *only,
                            const char *keep, const char *reason)
{
	char ttl[32];
	const char *p[6] = { user, org, only, keep, reason, ttl };

	/* A revoked session's access tokens live at most this long: so must its revocation. */
	snprintf(ttl, sizeof(ttl), "%lld", auth_g.cfg->access_token_ttl_s + 120);
	return http_op_prepared(op, "auth_sessions_revoke", 6, p);
}

void auth_revoked_keep(struct http_request *req, struct auth_revoked *r, const PGresult *res)
{
	int n = res != NULL ? PQntuples(res) : 0;

	r->n = n;
	r->kept = n < AUTH_REVOKED_KEEP ? n : AUTH_REVOKED_KEEP;
	r->sid = r->kept > 0 ? http_alloc(req, (size_t)r->kept * sizeof(*r->sid)) : NULL;
	r->expires_at = (long long)time(NULL) + auth_g.cfg->access_token_ttl_s + 120;
	for (int i = 0; i < r->kept; i++)
		snprintf(r->sid[i], sizeof(r->sid[i]), "%s", PQgetvalue(res, i, 0));
}

void auth_revoked_note(const struct auth_revoked *r)
{
	for (int i = 0; i < r->kept; i++)
		auth_revoke_note("sid", r->sid[i], r->expires_at);
}

/* ---- POST /api/v1/org/members ---- */

enum add_state {
	ADD_BEGIN,  /* BEGIN sent */
	ADD_LOCK,   /* the organization row locked */
	ADD_LOOKUP, /* the caller's role, and the account (and its membership) for the email */
	ADD_INSERT, /* membership inserted, or invitation upserted */
	ADD_AUDIT,  /* org.member.added / org.member.invited appended */
	ADD_COMMIT, /* COMMIT sent */
};

struct add_op {
	struct http_op op;
	char email[256];
	enum auth_role role;
	char user_id[37]; /* the existing account, or empty: an invitation */
	char invite_id[37];
	char token[AUTH_REFRESH_TEXT]; /* the invitation token, shown once; wiped */
	char *name;                    /* pool-owned: the existing account's name */
	char *expires_at;              /* pool-owned: the invitation's expiry (RFC 3339) */
	char *joined_at;               /* pool-owned */
};

static void add_cancel(struct http_op *op)
{
	struct add_op *a = (struct add_op *)op;

	cs_wipe(a->token, sizeof(a->token));
}

static void add_advance(struct http_op *op, enum db_event ev, const PGresult *res)
{
	struct add_op *a = (struct add_op *)op;
	struct http_request *req = op->req;
	struct audit_event aev;
	const char *sqlstate;

	if (ev != DB_OK) {
		sqlstate = res != NULL ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
		if (op->state == ADD_INSERT && sqlstate != NULL && strcmp(sqlstate, "23505") == 0) {
			http_op_fail(op, 409, "conflict", "this user is already a member");
			return;
		}
		http_op_db_fail(op, ev, res);
		return;
	}
	switch (op->state) {
	case ADD_BEGIN: {
		const char *p[1] = { req->auth.org_id };

		op->state = ADD_LOCK;
		(void)http_op_prepared(op, "members_lock_org", 1, p);
		return;
	}
	case ADD_LOCK: {
		const char *p[3] = { a->email, req->auth.org_id, req->auth.user_id };

		op->state = ADD_LOOKUP;
		(void)http_op_prepared(op, "members_add_lookup", 3, p);
		return;
	}
	case ADD_LOOKUP: {
		enum auth_role caller = auth_role_parse(PQgetvalue(res, 0, 0));

		if (caller < AUTH_ROLE_ADMIN) {
			http_op_fail(op, 403, "forbidden", "managing members needs the admin role");
			return;
		}
		if (a->role == AUTH_ROLE_OWNER && caller != AUTH_ROLE_OWNER) {
			http_op_fail(op, 403, "forbidden",
			             "only an owner can grant the owner role");
			return;
		}
		if (!PQgetisnull(res, 0, 2)) {
			http_op_fail(op, 409, "conflict", "this user is already a member");
			return;
		}
		op->state = ADD_INSERT;
		if (!PQgetisnull(res, 0, 1)) {
			const char *p[3] = { req->auth.org_id, PQgetvalue(res, 0, 1),
				             auth_role_name(a->role) };

			snprintf(a->user_id, sizeof(a->user_id), "%s", PQgetvalue(res, 0, 1));
			a->name =
			    http_strndup(req, PQgetvalue(res, 0, 3), strlen(PQgetvalue(res, 0, 3)));
			(void)http_op_query(
			    op,
			    "INSERT INTO memberships (org_id, user_id, role) "
			    "VALUES ($1, $2, $3) RETURNING audit_rfc3339(created_at)",
			    3, p);
		} else {
			char hash[65];
			const char *p[6] = { a->invite_id, req->auth.org_id,
				             a->email,     auth_role_name(a->role),
				             hash,         req->auth.user_id };

			cs_uuid4(a->invite_id);
			auth_refresh_new(a->token);
			auth_token_hash_hex(hash, a->token);
			(void)http_op_query(
			    op,
			    "INSERT INTO org_invitations (id, org_id, email, role, token_hash, "
			    "invited_by, expires_at) VALUES ($1, $2, $3, $4, $5, $6, "
			    "now() + interval '" MEMBERS_INVITE_TTL "') "
			    "ON CONFLICT (org_id, email) WHERE accepted_at IS NULL DO UPDATE SET "
			    "id = EXCLUDED.id, role = EXCLUDED.role, token_hash = "
			    "EXCLUDED.token_hash, "
			    "invited_by = EXCLUDED.invited_by, created_at = now(), "
			    "expires_at = EXCLUDED.expires_at RETURNING audit_rfc3339(expires_at)",
			    6, p);
		}
		return;
	}
	case ADD_INSERT: {
		json_t *details;
		const char *v = PQgetvalue(res, 0, 0);

		op->state = ADD_AUDIT;
		if (a->user_id[0] != '\0') {
			a->joined_at = http_strndup(req, v, strlen(v));
			audit_event_from_request(&aev, req, req->auth.org_id, req->auth.user_id,
			                         "org.member.added");
			aev.resource_id = a->user_id;
			details = json_pack("{s:s}", "role", auth_role_name(a->role));
		} else {
			a->expires_at = http_strndup(req, v, strlen(v));
			audit_event_from_request(&aev, req, req->auth.org_id, req->auth.user_id,
			                         "org.member.invited");
			aev.resource_id = a->invite_id;
			details = json_pack("{s:s, s:s}", "role", auth_role_name(a->role),
			                    "expires_at", a->expires_at);
		}
		auth_op_audit_hmac(op, &aev, details, "email", a->email);
		return;
	}
	case ADD_AUDIT:
		op->state = ADD_COMMIT;
		http_op_commit(op);
		return;
	case ADD_COMMIT:
		http_set_cancel(req, NULL, NULL);
		if (a->user_id[0] != '\0') {
			http_respond_json(
			    req, 201,
			    json_pack("{s:s, s:s, s:s, s:s, s:s, s:s}", "status", "added",
			              "user_id", a->user_id, "email", a->email, "name", a->name,
			              "role", auth_role_name(a->role), "joined_at", a->joined_at));
		} else {
			http_respond_json(req, 201,
			                  json_pack("{s:s, s:s, s:s, s:s, s:s, s:s}", "status",
			                            "invited", "invitation_id", a->invite_id,
			                            "email", a->email, "role",
			                            auth_role_name(a->role), "expires_at",
			                            a->expires_at, "invite_token", a->token));
		}
		add_cancel(op);
		return;
	}
}

/* The body's role field as a role; on failure answers 400 naming it. */
static enum auth_role members_body_role(struct http_request *req, json_t *body)
{
	const char *s = auth_body_str(req, body, "role", 16, true);
	enum auth_role r;

	if (s == NULL)
		return AUTH_ROLE_NONE;
	r = auth_role_parse(s);
	if (r == AUTH_ROLE_NONE)
		http_error(req, 400, "invalid_request",
		           "field role must be one of viewer, member, admin, owner");
	return r;
}

static void members_post(struct http_request *req)
{
	json_t *body = http_json_body(req);
	const char *email;
	enum auth_role role;
	struct add_op *a;
	char norm[256];

	if (body == NULL)
		return;
	email = auth_body_str(req, body, "email", 254, true);
	if (email == NULL)
		goto out;
	if (auth_email_normalize(email, norm, sizeof(norm)) == -1) {
		http_error(req, 400, "invalid_request", "field email is not a valid address");
		goto out;
	}
	role = members_body_role(req, body);
	if (role == AUTH_ROLE_NONE)
		goto out;
	a = http_op_new(req, sizeof(*a), add_advance);
	a->op.on_cancel = add_cancel;
	snprintf(a->email, sizeof(a->email), "%s", norm);
	a->role = role;
	a->op.state = ADD_BEGIN;
	(void)http_op_begin(&a->op);
out:
	json_decref(body);
}

/* ---- PATCH and DELETE /api/v1/org/members/{user_id} ---- */

enum member_state {
	MEMBER_BEGIN,  /* BEGIN sent */
	MEMBER_LOCK,   /* the organization row locked: one membership change at a time */
	MEMBER_LOOKUP, /* the target's role, the caller's role and the number of owners */
	MEMBER_CHANGE, /* role updated, or membership deleted */
	MEMBER_REVOKE, /* the target's sessions in this organization revoked */
	MEMBER_AUDIT,  /* org.member.role_changed / org.member.removed appended */
	MEMBER_COMMIT, /* COMMIT sent */
};

struct member_op {
	struct http_op op;
	bool remove; /* DELETE; otherwise PATCH */
	char target[37];
	enum auth_role old_role, new_role;
	struct auth_revoked revoked;
};

static void member_advance(struct http_op *op, enum db_event ev, const PGresult *res)
{
	struct member_op *m = (struct member_op *)op;
	struct http_request *req = op->req;
	struct audit_event aev;

	if (ev != DB_OK) {
		http_op_db_fail(op, ev, res);
		return;
	}
	switch (op->state) {
	case MEMBER_BEGIN: {
		const char *p[1] = { req->auth.org_id };

		op->state = MEMBER_LOCK;
		(void)http_op_prepared(op, "members_lock_org", 1, p);
		return;
	}
	case MEMBER_LOCK: {
		const char *p[3] = { req->auth.org_id, m->target, req->auth.user_id };

		op->state = MEMBER_LOOKUP;
		(void)http_op_prepared(op, "members_lookup", 3, p);
		return;
	}
	case MEMBER_LOOKUP: {
		enum auth_role caller = auth_role_parse(PQgetvalue(res, 0, 1));
		long owners = strtol(PQgetvalue(res, 0, 2), NULL, 10);

		if (caller < AUTH_ROLE_ADMIN) {
			http_op_fail(op, 403, "forbidden", "managing members needs the admin role");
			return;
		}
		if (PQgetisnull(res, 0, 0)) {
			http_op_fail(op, 404, "not_found", "no such member");
			return;
		}
		m->old_role = auth_role_parse(PQgetvalue(res, 0, 0));
		if (caller != AUTH_ROLE_OWNER &&
		    (m->old_role == AUTH_ROLE_OWNER || m->new_role == AUTH_ROLE_OWNER)) {
			http_op_fail(op, 403, "forbidden",
			             "only an owner can grant, change or remove the owner role");
			return;
		}
		if (!m->remove && m->new_role == m->old_role) {
			http_op_rollback(op);
			http_set_cancel(req, NULL, NULL);
			http_respond_json(req, 200,
			                  json_pack("{s:s, s:s}", "user_id", m->target, "role",
			                            auth_role_name(m->new_role)));
			return;
		}
		if (m->old_role == AUTH_ROLE_OWNER && owners <= 1) {
			http_op_fail(op, 409, "conflict",
			             "the last owner cannot be %s; make another member owner first",
			             m->remove ? "removed" : "demoted");
			return;
		}
		op->state = MEMBER_CHANGE;
		if (m->remove) {
			const char *p[2] = { req->auth.org_id, m->target };

			(void)http_op_query(
			    op, "DELETE FROM memberships WHERE org_id = $1 AND user_id = $2", 2, p);
		} else {
			const char *p[3] = { req->auth.org_id, m->target,
				             auth_role_name(m->new_role) };

			(void)http_op_query(
			    op,
			    "UPDATE memberships SET role = $3 WHERE org_id = $1 AND user_id = $2",
			    3, p);
		}
		return;
	}
	case MEMBER_CHANGE:
		op->state = MEMBER_REVOKE;
		if (m->remove || m->new_role < m->old_role) {
			(void)auth_op_sessions_revoke(op, m->target, req->auth.org_id, NULL, NULL,
			                              m->remove ? "member_removed"
			                                        : "role_lowered");
			return;
		}
		member_advance(op, DB_OK, NULL); /* a raised role needs no revocation */
		return;
	case MEMBER_REVOKE: {
		json_t *details;

		auth_revoked_keep(req, &m->revoked, res);
		op->state = MEMBER_AUDIT;
		if (m->remove) {
			audit_event_from_request(&aev, req, req->auth.org_id, req->auth.user_id,
			                         "org.member.removed");
			details = json_pack("{s:s, s:i}", "role", auth_role_name(m->old_role),
			                    "sessions_revoked", m->revoked.n);
		} else {
			audit_event_from_request(&aev, req, req->auth.org_id, req->auth.user_id,
			                         "org.member.role_changed");
			details = json_pack(
			    "{s:s, s:s, s:i}", "old_role", auth_role_name(m->old_role), "new_role",
			    auth_role_name(m->new_role), "sessions_revoked", m->revoked.n);
		}
		aev.resource_id = m->target;
		(void)audit_op_write(op, &aev, details);
		return;
	}
	case MEMBER_AUDIT:
		op->state = MEMBER_COMMIT;
		http_op_commit(op);
		return;
	case MEMBER_COMMIT:
		http_set_cancel(req, NULL, NULL);
		auth_revoked_note(&m->revoked);
		if (m->remove)
			http_respond(req, 204, NULL, NULL, 0);
		else
			http_respond_json(req, 200,
			                  json_pack("{s:s, s:s}", "user_id", m->target, "role",
			                            auth_role_name(m->new_role)));
		return;
	}
}

static void member_start(struct http_request *req, bool remove, enum auth_role role)
{
	const char *target = http_param(req, "user_id");
	struct member_op *m;

	if (!cs_uuid_valid(target)) {
		http_error(req, 404, "not_found", "no such member");
		return;
	}
	m = http_op_new(req, sizeof(*m), member_advance);
	m->remove = remove;
	m->new_role = role;
	snprintf(m->target, sizeof(m->target), "%s", target);
	for (char *c = m->target; *c != '\0'; c++)
		if (*c >= 'A' && *c <= 'F')
			*c = (char)(*c + 32);
	m->op.state = MEMBER_BEGIN;
	(void)http_op_begin(&m->op);
}

static void members_patch(struct http_request *req)
{
	json_t *body = http_json_body(req);
	enum auth_role role;

	if (body == NULL)
		return;
	role = members_body_role(req, body);
	if (role != AUTH_ROLE_NONE)
		member_start(req, false, role);
	json_decref(body);
}

static void members_delete(struct http_request *req)
{
	member_start(req, true, AUTH_ROLE_NONE);
}

/* ---- DELETE /api/v1/org/invitations/{id} ---- */

enum invitation_state {
	INVITATION_BEGIN,  /* BEGIN sent */
	INVITATION_DELETE, /* the open invitation deleted (or none) */
	INVITATION_AUDIT,  /* org.member.invitation_revoked appended */
	INVITATION_COMMIT, /* COMMIT sent */
};

static void invitation_delete_advance(struct http_op *op, enum db_event ev, const PGresult *res)
{
	struct http_request *req = op->req;
	struct audit_event aev;

	if (ev != DB_OK) {
		http_op_db_fail(op, ev, res);
		return;
	}
	switch (op->state) {
	case INVITATION_BEGIN: {
		const char *p[2] = { http_param(req, "id"), req->auth.org_id };

		op->state = INVITATION_DELETE;
		(void)http_op_query(
		    op,
		    "DELETE FROM org_invitations WHERE id = $1::uuid AND "
		    "org_id = $2::uuid AND accepted_at IS NULL RETURNING role, email",
		    2, p);
		return;
	}
	case INVITATION_DELETE:
		if (PQntuples(res) != 1) {
			http_op_fail(op, 404, "not_found", "no such open invitation");
			return;
		}
		op->state = INVITATION_AUDIT;
		audit_event_from_request(&aev, req, req->auth.org_id, req->auth.user_id,
		                         "org.member.invitation_revoked");
		aev.resource_id = http_param(req, "id");
		(void)auth_op_audit_hmac(op, &aev,
		                         json_pack("{s:s}", "role", PQgetvalue(res, 0, 0)), "email",
		                         PQgetvalue(res, 0, 1));
		return;
	case INVITATION_AUDIT:
		op->state = INVITATION_COMMIT;
		http_op_commit(op);
		return;
	case INVITATION_COMMIT:
		http_set_cancel(req, NULL, NULL);
		http_respond(req, 204, NULL, NULL, 0);
		return;
	}
}

static void invitation_delete(struct http_request *req)
{
	struct http_op *op;

	if (!cs_uuid_valid(http_param(req, "id"))) {
		http_error(req, 404, "not_found", "no such open invitation");
		return;
	}
	op = http_op_new(req, sizeof(*op), invitation_delete_advance);
	op->state = INVITATION_BEGIN;
	(void)http_op_begin(op);
}

/* ---- DELETE /api/v1/me/sessions[/{id}] ---- */

enum sessions_state {
	SESSIONS_BEGIN,  /* BEGIN sent */
	SESSIONS_REVOKE, /* the sessions revoked */
	SESSIONS_AUDIT,  /* auth.sessions.revoked appended */
	SESSIONS_COMMIT, /* COMMIT sent */
};

struct sessions_op {
	struct http_op op;
	const char *only; /* pool-owned: the one session to end, or NULL */
	bool all;         /* the current session too */
	struct auth_revoked revoked;
};

static void sessions_advance(struct http_op *op, enum db_event ev, const PGresult *res)
{
	struct sessions_op *s = (struct sessions_op *)op;
	struct http_request *req = op->req;
	struct audit_event aev;
	json_t *details;
	bool current = false;

	if (ev != DB_OK) {
		http_op_db_fail(op, ev, res);
		return;
	}
	switch (op->state) {
	case SESSIONS_BEGIN:
		op->state = SESSIONS_REVOKE;
		(void)auth_op_sessions_revoke(
		    op, req->auth.user_id, NULL, s->only,
		    s->all || s->only != NULL ? NULL : req->auth.session_id, "user_request");
		return;
	case SESSIONS_REVOKE:
		auth_revoked_keep(req, &s->revoked, res);
		if (s->only != NULL && s->revoked.n == 0) {
			http_op_fail(op, 404, "not_found", "no such session");
			return;
		}
		op->state = SESSIONS_AUDIT;
		audit_event_from_request(&aev, req, req->auth.org_id, req->auth.user_id,
		                         "auth.sessions.revoked");
		aev.resource_id = req->auth.user_id;
		details = json_pack("{s:s, s:i, s:s?}", "reason", "user_request", "families",
		                    s->revoked.n, "session_id", s->only);
		(void)audit_op_write(op, &aev, details);
		return;
	case SESSIONS_AUDIT:
		op->state = SESSIONS_COMMIT;
		http_op_commit(op);
		return;
	case SESSIONS_COMMIT:
		http_set_cancel(req, NULL, NULL);
		auth_revoked_note(&s->revoked);
		for (int i = 0; i < s->revoked.kept; i++)
			if (strcmp(s->revoked.sid[i], req->auth.session_id) == 0)
				current = true;
		if (current)
			auth_clear_cookies(req);
		if (s->only != NULL)
			http_respond(req, 204, NULL, NULL, 0);
		else
			http_respond_json(req, 200,
			                  json_pack("{s:i, s:b}", "revoked", s->revoked.n,
			                            "current_revoked", current));
		return;
	}
}

static void sessions_start(struct http_request *req, const char *only, bool all)
{
	struct sessions_op *s = http_op_new(req, sizeof(*s), sessions_advance);

	s->only = only;
	s->all = all;
	s->op.state = SESSIONS_BEGIN;
	(void)http_op_begin(&s->op);
}

static void me_session_delete(struct http_request *req)
{
	const char *id = http_param(req, "id");

	if (!cs_uuid_valid(id)) {
		http_error(req, 404, "not_found", "no such session");
		return;
	}
	sessions_start(req, id, false);
}

static void me_sessions_delete(struct http_request *req)
{
	const char *all = http_query_arg(req, "all");
	bool everything = false;

	if (all != NULL) {
		if (strcmp(all, "1") == 0 || strcmp(all, "true") == 0) {
			everything = true;
		} else if (strcmp(all, "0") != 0 && strcmp(all, "false") != 0) {
			http_error(req, 400, "invalid_request",
			           "query argument all must be 1 or 0");
			return;
		}
	}
	sessions_start(req, NULL, everything);
}

/* ---- POST /api/v1/me/password ---- */

enum password_state {
	PASSWORD_LOOKUP, /* the caller's hash, email and lockout read */
	PASSWORD_VERIFY, /* the current password checked on the thread pool */
	PASSWORD_FAILED, /* a wrong current password counted like a failed login */
	PASSWORD_HASH,   /* the new password hashed on the thread pool */
	PASSWORD_BEGIN,  /* BEGIN sent */
	PASSWORD_UPDATE, /* the new hash stored (if the old one is still in place) */
	PASSWORD_REVOKE, /* every other session of the caller revoked */
	PASSWORD_AUDIT,  /* auth.password.changed appended */
	PASSWORD_COMMIT, /* COMMIT sent */
};

struct password_op {
	struct http_op op;
	struct password_job *job; /* pending argon2 job, or NULL */
	char *cur, *next;         /* malloc'd copies of the passwords, wiped when the op ends */
	size_t curlen, nextlen;
	char *old_phc, *new_phc; /* pool-owned */
	bool locked;
	struct auth_revoked revoked;
};

static void password_op_wipe(struct password_op *p)
{
	if (p->cur != NULL) {
		cs_wipe(p->cur, p->curlen);
		free(p->cur);
		p->cur = NULL;
	}
	if (p->next != NULL) {
		cs_wipe(p->next, p->nextlen);
		free(p->next);
		p->next = NULL;
	}
}

static void password_op_cancel(struct http_op *op)
{
	struct password_op *p = (struct password_op *)op;

	if (p->job != NULL)
		password_cancel(p->job);
	p->job = NULL;
	password_op_wipe(p);
}

static void password_hashed_cb(void *arg, const char *phc)
{
	struct password_op *p = arg;

	p->job = NULL;
	password_op_wipe(p);
	if (phc == NULL) {
		http_op_fail(&p->op, 500, "internal", "cannot hash the password");
		return;
	}
	p->new_phc = http_strndup(p->op.req, phc, strlen(phc));
	p->op.state = PASSWORD_BEGIN;
	(void)http_op_begin(&p->op);
}

static void password_verified_cb(void *arg, int result)
{
	struct password_op *p = arg;

	p->job = NULL;
	if (p->cur != NULL) {
		cs_wipe(p->cur, p->curlen);
		free(p->cur);
		p->cur = NULL;
	}
	if (result != 0 || p->locked || p->old_phc == NULL) {
		char thr[32], base[32];
		const char *params[3] = { p->op.req->auth.user_id, thr, base };

		password_op_wipe(p);
		snprintf(thr, sizeof(thr), "%lld", auth_g.cfg->lockout_threshold);
		snprintf(base, sizeof(base), "%lld", auth_g.cfg->lockout_base_s);
		p->op.state = PASSWORD_FAILED;
		(void)http_op_prepared(&p->op, "members_password_failed", 3, params);
		return;
	}
	p->op.state = PASSWORD_HASH;
	p->job =
	    password_hash_start(auth_g.tp, &auth_g.pp, p->next, p->nextlen, password_hashed_cb, p);
	if (p->job == NULL)
		http_op_fail(&p->op, 503, "unavailable",
		             "too many logins in progress; retry later");
}

static void password_advance(struct http_op *op, enum db_event ev, const PGresult *res)
{
	struct password_op *p = (struct password_op *)op;
	struct http_request *req = op->req;
	struct audit_event aev;

	if (ev != DB_OK) {
		http_op_db_fail(op, ev, res);
		return;
	}
	switch (op->state) {
	case PASSWORD_LOOKUP: {
		const char *why = NULL, *hash;

		if (PQntuples(res) != 1) {
			http_op_fail(op, 401, "unauthenticated", "the account no longer exists");
			return;
		}
		if (password_policy_check(p->next, p->nextlen, PQgetvalue(res, 0, 1), &why) != 0) {
			http_op_fail(op, 400, "invalid_request", "field new_password: %s",
			             why != NULL ? why : "does not meet the policy");
			return;
		}
		if (!PQgetisnull(res, 0, 0))
			p->old_phc =
			    http_strndup(req, PQgetvalue(res, 0, 0), strlen(PQgetvalue(res, 0, 0)));
		p->locked = strcmp(PQgetvalue(res, 0, 2), "t") == 0;
		/* A locked account or one without a password still pays a real argon2 run. */
		hash =
		    p->old_phc != NULL && !p->locked ? p->old_phc : password_dummy_hash(&auth_g.pp);
		op->state = PASSWORD_VERIFY;
		p->job = password_verify_start(auth_g.tp, hash, p->cur, p->curlen,
		                               password_verified_cb, p);
		if (p->job == NULL)
			http_op_fail(op, 503, "unavailable",
			             "too many logins in progress; retry later");
		return;
	}
	case PASSWORD_FAILED:
		http_set_cancel(req, NULL, NULL);
		http_error(req, 403, "invalid_credentials", "the current password is wrong");
		return;
	case PASSWORD_BEGIN: {
		const char *params[3] = { req->auth.user_id, p->new_phc, p->old_phc };

		op->state = PASSWORD_UPDATE;
		(void)http_op_query(op,
		                    "UPDATE users SET password_hash = $2, pw_failures = 0, "
		                    "pw_locked_until = NULL WHERE id = $1 AND deleted_at IS NULL "
		                    "AND password_hash = $3",
		                    3, params);
		return;
	}
	case PASSWORD_UPDATE:
		if (strcmp(PQcmdTuples((PGresult *)res), "1") != 0) {
			http_op_fail(op, 409, "conflict", "the password was changed meanwhile");
			return;
		}
		op->state = PASSWORD_REVOKE;
		(void)auth_op_sessions_revoke(op, req->auth.user_id, NULL, NULL,
		                              req->auth.session_id, "password_changed");
		return;
	case PASSWORD_REVOKE: {
		json_t *details;

		auth_revoked_keep(req, &p->revoked, res);
		op->state = PASSWORD_AUDIT;
		audit_event_from_request(&aev, req, req->auth.org_id, req->auth.user_id,
		                         "auth.password.changed");
		aev.resource_id = req->auth.user_id;
		details = json_pack("{s:i}", "sessions_revoked", p->revoked.n);
		(void)audit_op_write(op, &aev, details);
		return;
	}
	case PASSWORD_AUDIT:
		op->state = PASSWORD_COMMIT;
		http_op_commit(op);
		return;
	case PASSWORD_COMMIT:
		http_set_cancel(req, NULL, NULL);
		auth_revoked_note(&p->revoked);
		http_respond_json(req, 200, json_pack("{s:i}", "sessions_revoked", p->revoked.n));
		return;
	default:
		http_op_fail(op, 500, "internal", "password change in an unexpected state");
		return;
	}
}

/* Wipe the password fields of a body before it is freed. */
static void me_password_post(struct http_request *req)
{
	json_t *body = http_json_body(req);
	const char *cur, *next;
	struct password_op *p;
	const char *params[1];

	if (body == NULL)
		return;
	cur = auth_body_str(req, body, "current_password", PASSWORD_MAX_BYTES, true);
	if (cur == NULL)
		goto out;
	next = auth_body_str(req, body, "new_password", PASSWORD_MAX_BYTES, true);
	if (next == NULL)
		goto out;
	p = http_op_new(req, sizeof(*p), password_advance);
	p->op.on_cancel = password_op_cancel;
	p->curlen = strlen(cur);
	p->cur = xstrndup(cur, p->curlen);
	p->nextlen = strlen(next);
	p->next = xstrndup(next, p->nextlen);
	params[0] = req->auth.user_id;
	p->op.state = PASSWORD_LOOKUP;
	(void)http_op_prepared(&p->op, "members_password_lookup", 1, params);
out:
	auth_body_free(body);
}

/* ---- registration ---- */

void auth_members_routes(struct router *r)
{
	struct db_pool *db = cs_worker->db;

	db_pool_prepare(
	    db, "auth_sessions_revoke",
	    "WITH s AS (UPDATE sessions SET revoked_at = now(), revoke_reason = $5 "
	    "WHERE user_id = $1 AND ($2::uuid IS NULL OR org_id = $2::uuid) "
	    "AND ($3::uuid IS NULL OR id = $3::uuid) AND ($4::uuid IS NULL OR id <> $4::uuid) "
	    "AND revoked_at IS NULL AND expires_at > now() RETURNING id) "
	    "INSERT INTO revocations (kind, value, expires_at) "
	    "SELECT 'sid', id, now() + make_interval(secs => $6::bigint) FROM s RETURNING value",
	    6);
	db_pool_prepare(db, "members_lock_org", "SELECT 1 FROM orgs WHERE id = $1 FOR UPDATE", 1);
	db_pool_prepare(db, "members_lookup",
	                "SELECT (SELECT m.role FROM memberships m JOIN users u ON u.id = m.user_id "
	                "WHERE m.org_id = $1 AND m.user_id = $2 AND u.deleted_at IS NULL), "
	                "(SELECT role FROM memberships WHERE org_id = $1 AND user_id = $3), "
	                "(SELECT count(*) FROM memberships m JOIN users u ON u.id = m.user_id "
	                "WHERE m.org_id = $1 AND m.role = 'owner' AND u.deleted_at IS NULL)",
	                3);
	db_pool_prepare(
	    db, "members_add_lookup",
	    "SELECT (SELECT role FROM memberships WHERE org_id = $2 AND user_id = $3), "
	    "u.id, (SELECT role FROM memberships WHERE org_id = $2 AND user_id = u.id), "
	    "u.name FROM (SELECT 1) x LEFT JOIN users u ON u.email = $1 "
	    "AND u.deleted_at IS NULL",
	    3);
	db_pool_prepare(db, "members_password_lookup",
	                "SELECT password_hash, email, coalesce(pw_locked_until > now(), false) "
	                "FROM users WHERE id = $1 AND deleted_at IS NULL",
	                1);
	db_pool_prepare(db, "members_password_failed", AUTH_PW_FAIL_SQL, 3);
	router_add_perm(r, "POST", "/api/v1/org/members", members_post, ROUTE_NEEDS_DB,
	                "members:manage");
	router_add_perm(r, "PATCH", "/api/v1/org/members/{user_id}", members_patch, ROUTE_NEEDS_DB,
	                "members:manage");
	router_add_perm(r, "DELETE", "/api/v1/org/members/{user_id}", members_delete,
	                ROUTE_NEEDS_DB, "members:manage");
	router_add_perm(r, "DELETE", "/api/v1/org/invitations/{id}", invitation_delete,
	                ROUTE_NEEDS_DB, "members:manage");
	router_add_perm(r, "DELETE", "/api/v1/me/sessions", me_sessions_delete,
	                ROUTE_NEEDS_DB | ROUTE_SELF, NULL);
	router_add_perm(r, "DELETE", "/api/v1/me/sessions/{id}", me_session_delete,
	                ROUTE_NEEDS_DB | ROUTE_SELF, NULL);
	router_add_perm(r, "POST", "/api/v1/me/password", me_password_post,
	                ROUTE_NEEDS_DB | ROUTE_SELF, NULL);
	auth_privacy_routes(r);
}
