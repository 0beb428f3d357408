/*
 * admin.c - the administrators' security endpoints: the active login
 * blocks (list, lift) and the security alerts (cursor paging). Reads build
 * their JSON in SQL; lifting a block and its audit event commit together.
 * Alerts are scoped to the caller's organization plus, for now, the alerts
 * that span organizations (stored under the nil org, e.g. failed logins
 * from one address against several accounts).
 */
#include "config.h"

#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cloudsweep/alerts.h"
#include "cloudsweep/audit.h"
#include "cloudsweep/http.h"
#include "cloudsweep/log.h"
#include "cloudsweep/worker.h"
#include "../auth/auth_int.h"

/* GET /api/v1/admin/ip-blocks */
static void admin_blocks_get(struct http_request *req)
{
	char lim[16];
	const char *p[1] = { lim };

	snprintf(lim, sizeof(lim), "%d", 1000);
	http_op_read_json(req, "admin_blocks", 1, p);
}

enum unblock_state {
	UNBLOCK_BEGIN,  /* BEGIN running */
	UNBLOCK_LIFT,   /* rl_unblock running */
	UNBLOCK_AUDIT,  /* access.ip_unblocked being appended */
	UNBLOCK_COMMIT, /* COMMIT running */
};

struct unblock_op {
	struct http_op op;
	char ip[INET6_ADDRSTRLEN];
	long long lifted;
};

static void admin_unblock_advance(struct http_op *op, enum db_event ev, const PGresult *res)
{
	struct unblock_op *u = (struct unblock_op *)op;
	struct audit_event aev;

	if (ev != DB_OK) {
		http_op_db_fail(op, ev, res);
		return;
	}
	switch ((enum unblock_state)op->state) {
	case UNBLOCK_BEGIN: {
		const char *p[1] = { u->ip };

		op->state = UNBLOCK_LIFT;
		(void)http_op_query(op, "SELECT rl_unblock($1::inet)", 1, p);
		return;
	}
	case UNBLOCK_LIFT: {
		json_t *details;

		u->lifted = PQntuples(res) == 1 ? atoll(PQgetvalue(res, 0, 0)) : 0;
		if (u->lifted == 0) {
			http_op_fail(op, 404, "not_found", "no active block for this address");
			return;
		}
		op->state = UNBLOCK_AUDIT;
		audit_event_from_request(&aev, op->req, op->req->auth.org_id, op->req->auth.user_id,
		                         "access.ip_unblocked");
		aev.resource_id = u->ip;
		details = json_pack("{s:I}", "lifted", (json_int_t)u->lifted);
		(void)audit_op_write(op, &aev, details);
		return;
	}
	case UNBLOCK_AUDIT:
		op->state = UNBLOCK_COMMIT;
		http_op_commit(op);
		return;
	case UNBLOCK_COMMIT:
		http_set_cancel(op->req, NULL, NULL);
		log_info("ip_unblocked", "an administrator lifted the login block of %s", u->ip);
		http_respond_json(
		    op->req, 200,
		    json_pack("{s:s, s:I}", "ip", u->ip, "lifted", (json_int_t)u->lifted));
		return;
	}
}

/* DELETE /api/v1/admin/ip-blocks/{ip} */
static void admin_unblock_delete(struct http_request *req)
{
	const char *ip = http_param(req, "ip");
	unsigned char buf[sizeof(struct in6_addr)];
	struct unblock_op *u;

	u = http_op_new(req, sizeof(*u), admin_unblock_advance);
	/* Canonical text, so the audit row names the address one way only. */
	if (ip != NULL && inet_pton(AF_INET, ip, buf) == 1)
		(void)inet_ntop(AF_INET, buf, u->ip, sizeof(u->ip));
	else if (ip != NULL && inet_pton(AF_INET6, ip, buf) == 1)
		(void)inet_ntop(AF_INET6, buf, u->ip, sizeof(u->ip));
	if (u->ip[0] == '\0') {
		http_op_fail(&u->op, 400, "invalid_request", "ip must be an IPv4 or IPv6 address");
		return;
	}
	u->op.state = UNBLOCK_BEGIN;
	(void)http_op_begin(&u->op);
}

/* Whether s is "<RFC 3339 UTC>_<uuid>", the alerts cursor. */
static bool admin_cursor_ok(const char *s, char *ts, size_t tslen, char *id, size_t idlen)
{
	const char *sep = strrchr(s, '_');

	if (sep == NULL || (size_t)(sep - s) >= tslen || strlen(sep + 1) != 36 || idlen < 37)
		return false;
	if (strspn(s, "0123456789-:.TZ") != (size_t)(sep - s) ||
	    strspn(sep + 1, "0123456789abcdef-") != 36)
		return false;
	memcpy(ts, s, (size_t)(sep - s));
	ts[sep - s] = '\0';
	memcpy(id, sep + 1, 37);
	return true;
}

/* GET /api/v1/admin/alerts?limit=&cursor=&severity=&rule= */
static void admin_alerts_get(struct http_request *req)
{
	const char *limit = http_query_arg(req, "limit"), *cursor = http_query_arg(req, "cursor");
	const char *sev = http_query_arg(req, "severity"), *rule = http_query_arg(req, "rule");
	char lim[16], ts[40] = "", id[37] = "";
	const char *p[6];
	long n = 50;

	if (limit != NULL) {
		char *end;

		n = strtol(limit, &end, 10);
		if (*limit == '\0' || *end != '\0' || n < 1 || n > 500) {
			http_error(req, 400, "invalid_request", "limit must be 1-500");
			return;
		}
	}
	if (cursor != NULL && !admin_cursor_ok(cursor, ts, sizeof(ts), id, sizeof(id))) {
		http_error(req, 400, "invalid_request", "cursor is not valid");
		return;
	}
	if (sev != NULL && strcmp(sev, "low") != 0 && strcmp(sev, "medium") != 0 &&
	    strcmp(sev, "high") != 0 && strcmp(sev, "critical") != 0) {
		http_error(req, 400, "invalid_request",
		           "severity must be low, medium, high or critical");
		return;
	}
	if (rule != NULL && strlen(rule) > 64) {
		http_error(req, 400, "invalid_request", "rule is too long");
		return;
	}
	snprintf(lim, sizeof(lim), "%ld", n);
	p[0] = req->auth.org_id;
	p[1] = sev;
	p[2] = rule;
	p[3] = lim;
	p[4] = cursor != NULL ? ts : NULL;
	p[5] = cursor != NULL ? id : NULL;
	http_op_read_json(req, "admin_alerts", 6, p);
}

void alerts_routes(struct router *r)
{
	struct db_pool *db = cs_worker->db;

	db_pool_prepare(db, "admin_blocks",
	                "SELECT json_build_object('items', rl_blocks_json($1::int), "
	                "'next_cursor', NULL)",
	                1);
	db_pool_prepare_read(
	    db, "admin_alerts",
	    "WITH page AS (SELECT * FROM security_alerts WHERE org_id IN ($1::uuid, "
	    "'" AUDIT_NIL_ORG "'::uuid) AND ($2::text IS NULL OR severity = $2) "
	    "AND ($3::text IS NULL OR rule = $3) AND ($5::timestamptz IS NULL OR "
	    "(created_at, id) < ($5::timestamptz, $6::uuid)) "
	    "ORDER BY created_at DESC, id DESC LIMIT $4::int + 1), "
	    "shown AS (SELECT * FROM page ORDER BY created_at DESC, id DESC LIMIT $4::int) "
	    "SELECT json_build_object('items', coalesce((SELECT json_agg(json_build_object("
	    "'id', id, 'org_id', org_id, 'rule', rule, 'severity', severity, 'subject', subject, "
	    "'count', count, 'details', details, 'first_seen', audit_rfc3339(first_seen), "
	    "'last_seen', audit_rfc3339(last_seen), 'created_at', audit_rfc3339(created_at), "
	    "'delivered_at', audit_rfc3339(delivered_at)) ORDER BY created_at DESC, id DESC) "
	    "FROM shown), '[]'), 'next_cursor', CASE WHEN (SELECT count(*) FROM page) > $4::int "
	    "THEN (SELECT audit_rfc3339(created_at) || '_' || id FROM shown "
	    "ORDER BY created_at, id LIMIT 1) END)",
	    6);
	router_add_perm(r, "GET", "/api/v1/admin/ip-blocks", admin_blocks_get, ROUTE_NEEDS_DB,
	                "security:read");
	router_add_perm(r, "DELETE", "/api/v1/admin/ip-blocks/{ip}", admin_unblock_delete,
	                ROUTE_NEEDS_DB, "security:manage");
	router_add_perm(r, "GET", "/api/v1/admin/alerts", admin_alerts_get, ROUTE_NEEDS_DB,
	                "security:read");
}
