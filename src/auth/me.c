/*
 * me.c - the caller's own account, the organization's member list, the
 * audit trail endpoints, and the per-worker start-up of everything in
 * auth/. Reads build their JSON in SQL (one round trip, no copying through
 * libpq rows) and are always scoped to the caller's organization.
 */
#include "config.h"

#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "cloudsweep/audit.h"
#include "cloudsweep/log.h"
#include "cloudsweep/ratelimit.h"
#include "cloudsweep/worker.h"
#include "auth_int.h"

static void me_get(struct http_request *req)
{
	const char *p[2] = { req->auth.user_id, req->auth.org_id };

	http_op_read_json(req, "auth_me", 2, p);
}

static void me_sessions_get(struct http_request *req)
{
	const char *p[2] = { req->auth.user_id, req->auth.session_id };

	http_op_read_json(req, "auth_me_sessions", 2, p);
}

static void members_get(struct http_request *req)
{
	const char *p[1] = { req->auth.org_id };

	http_op_read_json(req, "auth_members", 1, p);
}

/* GET /api/v1/org/invitations: the open ones (never their tokens). */
static void invitations_get(struct http_request *req)
{
	const char *p[1] = { req->auth.org_id };

	http_op_read_json(req, "auth_invitations", 1, p);
}

/* GET /api/v1/audit?from=&to=&event_type=&user_id=&limit=&cursor= */
static void audit_list_get(struct http_request *req)
{
	const char *from = http_query_arg(req, "from"), *to = http_query_arg(req, "to");
	const char *type = http_query_arg(req, "event_type"),
	           *user = http_query_arg(req, "user_id");
	const char *limit = http_query_arg(req, "limit"), *cursor = http_query_arg(req, "cursor");
	const char *p[7];
	char lim[16];
	long n = 50;

	if (limit != NULL) {
		char *end;

		n = strtol(limit, &end, 10);
		if (*limit == '\0' || *end != '\0' || n < 1 || n > 500) {
			http_error(req, 400, "invalid_request", "limit must be 1-500");
			return;
		}
	}
	if (cursor != NULL && strspn(cursor, "0123456789") != strlen(cursor)) {
		http_error(req, 400, "invalid_request", "cursor is not valid");
		return;
	}
	snprintf(lim, sizeof(lim), "%ld", n);
	p[0] = req->auth.org_id;
	p[1] = from;
	p[2] = to;
	p[3] = type;
	p[4] = user;
	p[5] = lim;
	p[6] = cursor;
	/* Bad timestamps or ids surface as 22xxx errors: answer them as 400. */
	http_op_read_json(req, "audit_list", 7, p);
}

struct verify_op {
	struct http_request *req;
	struct audit_verify *v;
};

static void audit_verify_done_cb(void *arg, const struct audit_verify_result *r)
{
	struct verify_op *vo = arg;

	vo->v = NULL;
	http_set_cancel(vo->req, NULL, NULL);
	if (r->status != 0) {
		http_error(vo->req, 503, "unavailable",
		           "the audit trail cannot be read; retry later");
		return;
	}
	http_respond_json(vo->req, 200, audit_verify_result_json(r));
}

static void audit_verify_cancel_cb(struct http_request *req, void *arg)
{
	struct verify_op *vo = arg;

	if (vo->v != NULL)
		audit_verify_cancel(vo->v);
	vo->v = NULL;
}

static void audit_verify_get(struct http_request *req)
{
	struct verify_op *vo = http_alloc(req, sizeof(*vo));

	vo->req = req;
	vo->v = audit_verify_start(cs_worker->db, req->auth.org_id, audit_verify_done_cb, vo);
	if (vo->v == NULL) {
		http_error(req, 503, "unavailable", "the database is unreachable; retry later");
		return;
	}
	http_set_cancel(req, audit_verify_cancel_cb, vo);
}

void auth_me_routes(struct router *r)
{
	struct db_pool *db = cs_worker->db;

	db_pool_prepare_read(
	    db, "auth_me",
	    "SELECT json_build_object('id', u.id, 'email', u.email, 'name', u.name, "
	    "'mfa_enabled', u.mfa_enabled, 'github_login', u.github_login, "
	    "'created_at', to_char(u.created_at AT TIME ZONE 'UTC', "
	    "'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), "
	    "'org', json_build_object('id', o.id, 'name', o.name), 'role', m.role) "
	    "FROM users u JOIN memberships m ON m.user_id = u.id AND m.org_id = $2 "
	    "JOIN orgs o ON o.id = m.org_id WHERE u.id = $1 AND u.deleted_at IS NULL",
	    2);
	db_pool_prepare_read(
	    db, "auth_me_sessions",
	    "SELECT json_build_object('items', coalesce(json_agg(json_build_object("
	    "'id', s.id, 'method', s.method, 'ip', s.ip, 'user_agent', s.user_agent, "
	    "'created_at', s.created_at, 'last_used_at', s.last_used_at, "
	    "'current', s.id = $2::uuid) ORDER BY s.created_at DESC), '[]'), "
	    "'next_cursor', NULL) FROM sessions s WHERE s.user_id = $1 "
	    "AND s.revoked_at IS NULL AND s.expires_at > now()",
	    2);
	db_pool_prepare_read(
	    db, "auth_members",
	    "SELECT json_build_object('items', coalesce(json_agg(json_build_object("
	    "'user_id', u.id, 'email', u.email, 'name', u.name, 'role', m.role, "
	    "'joined_at', m.created_at) ORDER BY m.created_at), '[]'), "
	    "'next_cursor', NULL) FROM memberships m JOIN users u ON u.id = m.user_id "
	    "WHERE m.org_id = $1 AND u.deleted_at IS NULL",
	    1);
	db_pool_prepare_read(
	    db, "auth_invitations",
	    "SELECT json_build_object('items', coalesce(json_agg(json_build_object("
	    "'id', i.id, 'email', i.email, 'role', i.role, 'invited_by', i.invited_by, "
	    "'created_at', i.created_at, 'expires_at', i.expires_at, "
	    "'expired', i.expires_at <= now()) ORDER BY i.created_at DESC), '[]'), "
	    "'next_cursor', NULL) FROM org_invitations i "
	    "WHERE i.org_id = $1 AND i.accepted_at IS NULL",
	    1);
	db_pool_prepare_read(
	    db, "audit_list",
	    "WITH page AS (SELECT * FROM audit_events WHERE org_id = $1 "
	    "AND ($2::timestamptz IS NULL OR occurred_at >= $2::timestamptz) "
	    "AND ($3::timestamptz IS NULL OR occurred_at < $3::timestamptz) "
	    "AND ($4::text IS NULL OR event_type = $4) AND ($5::text IS NULL OR actor = $5) "
	    "AND ($7::bigint IS NULL OR seq < $7::bigint) ORDER BY seq DESC LIMIT $6::int + 1), "
	    "shown AS (SELECT * FROM page ORDER BY seq DESC LIMIT $6::int) "
	    "SELECT json_build_object('items', coalesce((SELECT json_agg(json_build_object("
	    "'id', id, 'seq', seq, 'occurred_at', audit_rfc3339(occurred_at), 'actor', actor, "
	    "'actor_ip', actor_ip, 'user_agent', user_agent, 'request_id', request_id, "
	    "'event_type', event_type, 'resource_type', resource_type, 'resource_id', "
	    "resource_id, 'action', action, 'result', result, 'details', details, 'hash', hash) "
	    "ORDER BY seq DESC) FROM shown), '[]'), 'next_cursor', CASE WHEN (SELECT count(*) "
	    "FROM page) > $6::int THEN (SELECT min(seq)::text FROM shown) END)",
	    7);
	router_add_perm(r, "GET", "/api/v1/me", me_get, ROUTE_NEEDS_DB | ROUTE_SELF, NULL);
	router_add_perm(r, "GET", "/api/v1/me/sessions", me_sessions_get,
	                ROUTE_NEEDS_DB | ROUTE_SELF, NULL);
	router_add_perm(r, "GET", "/api/v1/org/members", members_get, ROUTE_NEEDS_DB,
	                "members:read");
	router_add_perm(r, "GET", "/api/v1/org/invitations", invitations_get, ROUTE_NEEDS_DB,
	                "members:manage");
	router_add_perm(r, "GET", "/api/v1/audit", audit_list_get, ROUTE_NEEDS_DB, "audit:read");
	router_add_perm(r, "GET", "/api/v1/audit/verify", audit_verify_get, ROUTE_NEEDS_DB,
	                "audit:read");
}

void auth_routes(struct router *r)
{
	auth_session_routes(r);
	auth_me_routes(r);
	auth_mfa_routes(r);
	auth_github_routes(r);
	auth_members_routes(r);
}

int auth_worker_init(struct event_base *base, const struct config *cfg, struct db_pool *pool)
{
	char err[256];
	unsigned int len = 0;
	static const char label[] = "cloudsweep refresh-token successor v1";

	auth_g.cfg = cfg;
	auth_g.pp.m_kib = (uint32_t)cfg->argon2_memory_kib;
	auth_g.pp.t_cost = (uint32_t)cfg->argon2_iterations;
	auth_g.pp.parallelism = (uint32_t)cfg->argon2_parallelism;
	if (auth_keys_load(cfg, err, sizeof(err)) == -1) {
		log_warnx("auth_init", "%s", err);
		return -1;
	}
	/* The successor key is derived from the signing key: stable across workers and restarts. */
	{
		const char *k = cfg->jwt_secret;
		char *pem = NULL;
		size_t klen;

		if (k == NULL) {
			pem = cs_read_file(cfg->jwt_private_key_file, 65536, &klen);
			if (pem == NULL) {
				log_warnx("auth_init", "cannot read the JWT private key");
				return -1;
			}
			k = pem;
		}
		klen = strlen(k);
		if (HMAC(EVP_sha256(), k, (int)klen, (const unsigned char *)label,
		         sizeof(label) - 1, auth_g.refresh_key, &len) == NULL) {
			cs_free_secret(pem);
			return -1;
		}
		cs_free_secret(pem);
	}
	if (password_dummy_hash(&auth_g.pp) == NULL) {
		log_warnx("auth_init", "cannot compute the dummy password hash");
		return -1;
	}
	auth_g.tp = threadpool_new(base, (int)cfg->auth_threads, 256);
	if (auth_g.tp == NULL)
		return -1;
	{
		struct ratelimit_config rc;

		ratelimit_config_from(&rc, cfg, cfg->ratelimit_user_per_min);
		auth_g.rl = ratelimit_new(pool, &rc);
		if (auth_g.rl == NULL) {
			log_warnx("auth_init", "cannot start the rate limiter");
			return -1;
		}
	}
	auth_revoke_start(base, pool);
	return 0;
}

void auth_worker_free(void)
{
	auth_revoke_stop();
	auth_limit_free();
	ratelimit_free(auth_g.rl);
	auth_g.rl = NULL;
	threadpool_free(auth_g.tp);
	auth_g.tp = NULL;
	cs_wipe(auth_g.refresh_key, sizeof(auth_g.refresh_key));
	auth_keys_free();
	password_dummy_clear();
}
