/*
 * scan_int.h - what the files of scan/ share and nobody else needs: the
 * worker's scan resources, the settings table, and the entry points of the
 * executor, the long poll and the route files.
 */
#ifndef CLOUDSWEEP_SCAN_INT_H
#define CLOUDSWEEP_SCAN_INT_H

#include <event2/event.h>
#include <jansson.h>
#include <stdbool.h>

#include "cloudsweep/audit.h"
#include "cloudsweep/http.h"
#include "cloudsweep/scan.h"

/* The scan JSON of the API, built in SQL from a row of scans aliased s. */
#define SCAN_JSON_SQL                                                                              \
	"json_build_object('id', s.id, 'status', s.status, 'version', s.version, "                 \
	"'progress', json_build_object('units_total', s.units_total, 'units_done', s.units_done, " \
	"'api_calls', s.api_calls, 'items_found', s.items_found), 'errors', s.errors, "            \
	"'items', s.item_counts, 'aws_account_ids', s.account_ids, 'regions', s.regions, "         \
	"'checks', s.checks, 'settings', s.settings, 'created_by', s.created_by, "                 \
	"'created_at', audit_rfc3339(s.created_at), 'started_at', audit_rfc3339(s.started_at), "   \
	"'finished_at', audit_rfc3339(s.finished_at), "                                            \
	"'estimated_monthly_savings_usd', s.estimated_monthly_savings_usd)"

/*
 * The executor's statements (exported for the unit tests). Claim: up to $3
 * units for lease owner $1 ($2 lease seconds, $4 global and $5 per-org caps,
 * $6 attempts); checks come back as JSON text. Heartbeat and finish name
 * the lease ($1 unit, $2 owner) and answer count 0 when it was taken over;
 * finish stores the outcome and the unit's items ($7, a JSON array of
 * {type, resource_id, details, cost}) in one statement.
 */
#define SCAN_CLAIM_SQL                                                                       \
	"SELECT unit_id, scan_id, org_id, aws_account_id, region, attempts, "                \
	"CASE WHEN checks IS NULL THEN NULL ELSE to_json(checks)::text END, settings::text " \
	"FROM scan_claim($1, $2::int, $3::int, $4::int, $5::int, $6::int)"
#define SCAN_HEARTBEAT_SQL                                                              \
	"WITH u AS (UPDATE scan_units SET lease_expires_at = now() + "                  \
	"make_interval(secs => $3::int), heartbeat_at = now(), api_calls = $4::bigint " \
	"WHERE id = $1::uuid AND lease_owner = $2 AND status = 'running' RETURNING 1) " \
	"SELECT count(*) FROM u"
#define SCAN_FINISH_SQL                                                                       \
	"WITH u AS (UPDATE scan_units SET status = $3, finished_at = now(), "                 \
	"lease_owner = NULL, lease_expires_at = NULL, api_calls = $4::bigint, "               \
	"items_found = $5::int, errors = $6::jsonb WHERE id = $1::uuid AND lease_owner = $2 " \
	"AND status = 'running' RETURNING id, scan_id, org_id, aws_account_id, region), "     \
	"i AS (INSERT INTO waste_items (org_id, scan_id, unit_id, aws_account_id, region, "   \
	"type, resource_id, details, estimated_monthly_cost_usd) SELECT u.org_id, "           \
	"u.scan_id, u.id, u.aws_account_id, u.region, x.type, x.resource_id, "                \
	"coalesce(x.details, '{}'), round(x.cost::numeric, 2) FROM u, "                       \
	"jsonb_to_recordset($7::jsonb) AS x(type text, resource_id text, details jsonb, "     \
	"cost float8) ON CONFLICT DO NOTHING RETURNING 1) "                                   \
	"SELECT (SELECT count(*) FROM u), (SELECT count(*) FROM i)"

struct scan_globals {
	const struct config *cfg; /* borrowed; the worker's configuration */
	struct event_base *base;  /* borrowed */
	struct db_pool *pool;     /* borrowed */
	struct pricing *prices;   /* owned */
	struct event *ev_term;    /* owned; SIGTERM: answer parked polls, release units */
	struct event *ev_int;     /* owned; SIGINT: the same */
	bool stopping;            /* the worker drains: no new claims or parked polls */
};

extern struct scan_globals scan_g;

enum scan_setting_type {
	SCAN_SETTING_INT,    /* an integer within [min, max] */
	SCAN_SETTING_STRING, /* a short string */
};

/* One threshold a scan may override in its settings. */
struct scan_setting {
	const char *name;
	enum scan_setting_type type;
	long long def, min, max; /* SCAN_SETTING_INT */
	const char *sdef;        /* SCAN_SETTING_STRING default */
};

extern const struct scan_setting scan_settings[];
extern const size_t scan_settings_count;

/* Executor (exec.c): claim and run units on this worker. */
int scan_exec_start(void) CS_WUR;
/* Stop claiming; with release, hand running units back to the queue (best effort). */
void scan_exec_stop(bool release);

/* Long poll (longpoll.c). */
int scan_longpoll_start(void) CS_WUR;
/* Answer every parked poll now (shutdown) and stop listening. */
void scan_longpoll_stop(void);
/* Stop listening (after every parked request is gone). */
void scan_longpoll_free(void);
/*
 * GET one scan of the caller's org: at once, or, with wait_s > 0, parked
 * until its version exceeds since (or the wait ends).
 */
void scan_longpoll_get(struct http_request *req, const char *scan_id, int wait_s, long long since);

/* Route registration of each file. */
void scan_api_routes(struct router *r);
void scan_items_routes(struct router *r);
/* cleanup.c: POST /waste-items/{id}/cleanup and /waste-items/cleanup (from scan_items_routes). */
void scan_cleanup_routes(struct router *r);
/* Whether approvals tag resources for mark-then-act (cleanup_grace_days > 0). */
bool scan_cleanup_marks(void);
/*
 * Answer an approval (doc, the item JSON) after tagging the resource
 * cloudsweep:marked-for-deletion=<date the grace period ends> (EC2 types);
 * the answer says whether the tag was set. Strings are borrowed from req.
 */
void scan_cleanup_mark(struct http_request *req, const char *doc, const char *item_id,
                       const char *type, const char *resource_id, const char *region,
                       const char *account_uuid);

/* The waste item JSON of the API, from a row of waste_items aliased w. */
#define SCAN_ITEM_JSON_SQL                                                                    \
	"json_build_object('id', w.id, 'scan_id', w.scan_id, 'type', w.type, 'resource_id', " \
	"w.resource_id, 'region', w.region, 'account_id', w.aws_account_id, 'details', "      \
	"w.details, 'estimated_monthly_cost_usd', w.estimated_monthly_cost_usd, 'status', "   \
	"w.status, 'created_at', audit_rfc3339(w.created_at), 'approved_by', w.approved_by, " \
	"'approved_at', audit_rfc3339(w.approved_at), 'dismissed_at', "                       \
	"audit_rfc3339(w.dismissed_at), 'outcome', w.outcome, 'aws_request_id', "             \
	"w.aws_request_id, 'cleaned_at', audit_rfc3339(w.cleaned_at))"

/* Parse ?limit= (default 50, 1-500) into out; false has answered 400. */
bool scan_query_limit(struct http_request *req, char out[16]);
/* Fill ev with the request's context (org, actor, ip, user agent, request id). */
void scan_audit_fill(struct audit_event *ev, struct http_request *req, const char *type,
                     const char *resource_id);

#endif
