/*
 * items.c - waste items (list with filters, approve, dismiss; the cleanup
 * actions are in cleanup.c) and the savings report. Every read is scoped to the
 * caller's organization; an item of another organization is not found.
 * Approving and dismissing commit with their audit event.
 */
#include "config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cloudsweep/log.h"
#include "scan_int.h"

#define ITEM_JSON_SQL SCAN_ITEM_JSON_SQL

static const char *const item_statuses[] = { "open", "approved", "cleaned", "failed", "dismissed" };

/* ---- GET /api/v1/waste-items ---- */

static void items_list(struct http_request *req)
{
	const char *scan = http_query_arg(req, "scan_id"), *status = http_query_arg(req, "status");
	const char *type = http_query_arg(req, "type"), *acct = http_query_arg(req, "account_id");
	const char *region = http_query_arg(req, "region"), *cursor = http_query_arg(req, "cursor");
	char lim[16];
	size_t i;

	if (!scan_query_limit(req, lim))
		return;
	if (scan != NULL && !cs_uuid_valid(scan)) {
		http_error(req, 400, "invalid_request", "scan_id is not a UUID");
		return;
	}
	if (acct != NULL && !cs_uuid_valid(acct)) {
		http_error(req, 400, "invalid_request", "account_id is not a UUID");
		return;
	}
	if (cursor != NULL && !cs_uuid_valid(cursor)) {
		http_error(req, 400, "invalid_request", "cursor is not valid");
		return;
	}
	if (type != NULL && !scan_check_known(type)) {
		http_error(req, 400, "invalid_request", "type is not a known check");
		return;
	}
	if (region != NULL && strlen(region) > 32) {
		http_error(req, 400, "invalid_request", "region is not valid");
		return;
	}
	for (i = 0; status != NULL && i < CS_ARRAY_LEN(item_statuses); i++)
		if (strcmp(status, item_statuses[i]) == 0)
			break;
	if (status != NULL && i == CS_ARRAY_LEN(item_statuses)) {
		http_error(req, 400, "invalid_request", "status is not valid");
		return;
	}
	{
		const char *p[8] = {
			req->auth.org_id, scan, status, type, acct, region, lim, cursor
		};
		http_op_read_json(req, "item_list", 8, p);
	}
}

/* ---- POST /api/v1/waste-items/{id}/approve and /dismiss ---- */

enum item_change_state {
	ITEM_CHANGE_BEGIN,  /* BEGIN sent */
	ITEM_CHANGE_UPDATE, /* the status changed (or not: then the lookup says why) */
	ITEM_CHANGE_LOOKUP, /* the item's current status read */
	ITEM_CHANGE_AUDIT,  /* the audit event appended */
	ITEM_CHANGE_COMMIT, /* COMMIT sent */
};

struct item_change {
	struct http_op op;
	const char *id;                                    /* pool-owned */
	const char *stmt;                                  /* the prepared UPDATE */
	const char *event;                                 /* the audit event type */
	const char *doc;                                   /* pool-owned item JSON once updated */
	const char *type, *resource_id, *region, *account; /* pool-owned, once updated */
	char from_status[16];                              /* the status before the change */
};

static void item_change_advance(struct http_op *op, enum db_event ev, const PGresult *res)
{
	struct item_change *ic = (struct item_change *)op;
	struct http_request *req = op->req;

	if (ev != DB_OK) {
		http_op_db_fail(op, ev, res);
		return;
	}
	switch (op->state) {
	case ITEM_CHANGE_BEGIN: {
		const char *p[3] = { ic->id, req->auth.org_id, req->auth.user_id };

		op->state = ITEM_CHANGE_UPDATE;
		(void)http_op_prepared(op, ic->stmt, 3, p);
		return;
	}
	case ITEM_CHANGE_UPDATE: {
		struct audit_event aev;
		json_t *details;

		if (PQntuples(res) != 1) {
			const char *p[2] = { ic->id, req->auth.org_id };

			op->state = ITEM_CHANGE_LOOKUP;
			(void)http_op_prepared(op, "item_status", 2, p);
			return;
		}
		ic->doc = http_strndup(req, PQgetvalue(res, 0, 0), (size_t)PQgetlength(res, 0, 0));
		ic->type = http_strndup(req, PQgetvalue(res, 0, 3), (size_t)PQgetlength(res, 0, 3));
		ic->resource_id =
		    http_strndup(req, PQgetvalue(res, 0, 4), (size_t)PQgetlength(res, 0, 4));
		ic->region =
		    http_strndup(req, PQgetvalue(res, 0, 5), (size_t)PQgetlength(res, 0, 5));
		ic->account =
		    http_strndup(req, PQgetvalue(res, 0, 6), (size_t)PQgetlength(res, 0, 6));
		snprintf(ic->from_status, sizeof(ic->from_status), "%s", PQgetvalue(res, 0, 1));
		op->state = ITEM_CHANGE_AUDIT;
		scan_audit_fill(&aev, req, ic->event, ic->id);
		details = json_pack("{s:s, s:s, s:s, s:s}", "scan_id", PQgetvalue(res, 0, 2),
		                    "type", PQgetvalue(res, 0, 3), "resource_id",
		                    PQgetvalue(res, 0, 4), "from_status", ic->from_status);
		(void)audit_op_write(op, &aev, details);
		return;
	}
	case ITEM_CHANGE_LOOKUP:
		if (PQntuples(res) != 1)
			http_op_fail(op, 404, "not_found", "no such waste item");
		else
			http_op_fail(op, 409, "conflict", "the item is %s", PQgetvalue(res, 0, 0));
		return;
	case ITEM_CHANGE_AUDIT:
		op->state = ITEM_CHANGE_COMMIT;
		http_op_commit(op);
		return;
	case ITEM_CHANGE_COMMIT:
		if (strcmp(ic->event, "waste_item.approved") == 0 && scan_cleanup_marks()) {
			/* Mark-then-act: the resource is tagged before the answer. */
			http_set_cancel(req, NULL, NULL);
			scan_cleanup_mark(req, ic->doc, ic->id, ic->type, ic->resource_id,
			                  ic->region, ic->account);
			return;
		}
		http_set_cancel(req, NULL, NULL);
		http_respond(req, 200, "application/json", ic->doc, strlen(ic->doc));
		return;
	}
}

static void item_change(struct http_request *req, const char *stmt, const char *event)
{
	const char *id = http_param(req, "id");
	struct item_change *ic;

	if (!cs_uuid_valid(id)) {
		http_error(req, 404, "not_found", "no such waste item");
		return;
	}
	ic = http_op_new(req, sizeof(*ic), item_change_advance);
	ic->id = id;
	ic->stmt = stmt;
	ic->event = event;
	ic->op.state = ITEM_CHANGE_BEGIN;
	(void)http_op_begin(&ic->op);
}

static void item_approve(struct http_request *req)
{
	item_change(req, "item_approve", "waste_item.approved");
}

static void item_dismiss(struct http_request *req)
{
	item_change(req, "item_dismiss", "waste_item.dismissed");
}

/* ---- GET /api/v1/reports/savings ---- */

static void report_savings(struct http_request *req)
{
	const char *scan = http_query_arg(req, "scan_id");
	const struct pricing *pr = scan_prices();

	if (scan != NULL && !cs_uuid_valid(scan)) {
		http_error(req, 400, "invalid_request", "scan_id is not a UUID");
		return;
	}
	{
		const char *p[4] = { req->auth.org_id, scan, pricing_source(pr),
			             pricing_as_of(pr) };
		http_op_read_json(req, "report_savings", 4, p);
	}
}

/* Totals over the latest finding of each resource, when it is still open or approved. */
#define REPORT_GROUP(outer, key, col)                                                             \
	"'" outer "', coalesce((SELECT json_agg(json_build_object('" key "', g.k, 'items', g.n, " \
	"'monthly_usd', g.usd) ORDER BY g.usd DESC, g.k) FROM (SELECT " col " AS k, count(*) "    \
	"AS n, sum(estimated_monthly_cost_usd) AS usd FROM it GROUP BY 1) g), '[]')"

void scan_items_routes(struct router *r)
{
	struct db_pool *db = scan_g.pool;

	db_pool_prepare_read(
	    db, "item_list",
	    "WITH page AS (SELECT * FROM waste_items w WHERE w.org_id = $1::uuid "
	    "AND ($2::uuid IS NULL OR w.scan_id = $2::uuid) AND ($3::text IS NULL OR w.status = "
	    "$3) "
	    "AND ($4::text IS NULL OR w.type = $4) AND ($5::uuid IS NULL OR w.aws_account_id = "
	    "$5::uuid) AND ($6::text IS NULL OR w.region = $6) AND ($8::uuid IS NULL OR "
	    "(w.created_at, w.id) < (SELECT c.created_at, c.id FROM waste_items c WHERE c.id = "
	    "$8::uuid AND c.org_id = $1::uuid)) ORDER BY w.created_at DESC, w.id DESC "
	    "LIMIT $7::int + 1), shown AS (SELECT * FROM page ORDER BY created_at DESC, id DESC "
	    "LIMIT $7::int) SELECT json_build_object('items', coalesce((SELECT "
	    "json_agg(" ITEM_JSON_SQL
	    " ORDER BY w.created_at DESC, w.id DESC) FROM shown w), '[]'), 'next_cursor', "
	    "CASE WHEN (SELECT count(*) FROM page) > $7::int THEN (SELECT w.id::text FROM shown w "
	    "ORDER BY w.created_at, w.id LIMIT 1) END)::text",
	    8);
	db_pool_prepare(
	    db, "item_approve",
	    "WITH old AS (SELECT id, status FROM waste_items WHERE id = $1::uuid "
	    "AND org_id = $2::uuid AND status IN ('open', 'dismissed') FOR UPDATE) "
	    "UPDATE waste_items w SET status = 'approved', approved_by = $3::uuid, "
	    "approved_at = now(), dismissed_by = NULL, dismissed_at = NULL FROM old "
	    "WHERE w.id = old.id RETURNING " ITEM_JSON_SQL
	    "::text, old.status, w.scan_id, w.type, w.resource_id, w.region, w.aws_account_id",
	    3);
	db_pool_prepare(
	    db, "item_dismiss",
	    "WITH old AS (SELECT id, status FROM waste_items WHERE id = $1::uuid "
	    "AND org_id = $2::uuid AND status IN ('open', 'approved') FOR UPDATE) "
	    "UPDATE waste_items w SET status = 'dismissed', dismissed_by = $3::uuid, "
	    "dismissed_at = now(), approved_by = NULL, approved_at = NULL FROM old "
	    "WHERE w.id = old.id RETURNING " ITEM_JSON_SQL
	    "::text, old.status, w.scan_id, w.type, w.resource_id, w.region, w.aws_account_id",
	    3);
	db_pool_prepare_read(
	    db, "item_status",
	    "SELECT status FROM waste_items WHERE id = $1::uuid AND org_id = $2::uuid", 2);
	db_pool_prepare_read(
	    db, "report_savings",
	    "WITH latest AS (SELECT DISTINCT ON (aws_account_id, region, type, resource_id) * "
	    "FROM waste_items WHERE org_id = $1::uuid AND ($2::uuid IS NULL OR scan_id = $2::uuid) "
	    "ORDER BY aws_account_id, region, type, resource_id, created_at DESC), "
	    "it AS (SELECT * FROM latest WHERE status IN ('open', 'approved')) "
	    "SELECT json_build_object('currency', 'USD', 'total_monthly_usd', "
	    "coalesce((SELECT sum(estimated_monthly_cost_usd) FROM it), 0), 'items', "
	    "(SELECT count(*) FROM it), " REPORT_GROUP("by_type", "type", "type") ", " REPORT_GROUP(
	        "by_account", "account_id",
	        "aws_account_id") ", " REPORT_GROUP("by_region", "region",
	                                            "region") ", 'pricing', "
	                                                      "json_build_object('source', "
	                                                      "$3::text, 'as_of', $4::text))::text",
	    4);
	router_add_perm(r, "GET", "/api/v1/waste-items", items_list, ROUTE_NEEDS_DB,
	                "waste_items:read");
	router_add_perm(r, "POST", "/api/v1/waste-items/{id}/approve", item_approve, ROUTE_NEEDS_DB,
	                "waste_items:approve");
	router_add_perm(r, "POST", "/api/v1/waste-items/{id}/dismiss", item_dismiss, ROUTE_NEEDS_DB,
	                "waste_items:approve");
	scan_cleanup_routes(r);
	router_add_perm(r, "GET", "/api/v1/reports/savings", report_savings, ROUTE_NEEDS_DB,
	                "reports:read");
}
