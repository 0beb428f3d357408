/*
 * api.c - the scans endpoints (create, list, get with long poll) and the
 * per-worker start-up of everything in scan/. Creating a scan validates the
 * request against the caller's live AWS accounts and their regions, then
 * stores the scan, one unit per account x region and the scan.created
 * audit event in one transaction; workers pick the units up from there.
 */
#include "config.h"

#include <ctype.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cloudsweep/log.h"
#include "cloudsweep/worker.h"
#include "scan_int.h"

#define SCAN_MAX_ACCOUNTS 200
#define SCAN_MAX_REGIONS  32
#define SCAN_MAX_UNITS    5000

struct scan_globals scan_g;

bool scan_query_limit(struct http_request *req, char out[16])
{
	const char *limit = http_query_arg(req, "limit");
	long n = 50;

	if (limit != NULL) {
		char *end;

		n = strtol(limit, &end, 10);
		if (*limit == '\0' || *end != '\0' || n < 1 || n > 500) {
			http_error(req, 400, "invalid_request", "limit must be 1-500");
			return false;
		}
	}
	snprintf(out, 16, "%ld", n);
	return true;
}

void scan_audit_fill(struct audit_event *ev, struct http_request *req, const char *type,
                     const char *resource_id)
{
	audit_event_from_request(ev, req, req->auth.org_id, req->auth.user_id, type);
	ev->resource_id = resource_id;
}

/* Lower-case a UUID in place (NOTIFY payloads and the watch table use lower case). */
static void scan_uuid_lower(char *s)
{
	for (; *s != '\0'; s++)
		*s = (char)tolower((unsigned char)*s);
}

/* ---- POST /api/v1/scans ---- */

enum scan_create_state {
	SCAN_CREATE_BEGIN,    /* BEGIN sent */
	SCAN_CREATE_ACCOUNTS, /* the requested accounts read (FOR SHARE) */
	SCAN_CREATE_INSERT,   /* scan and units inserted */
	SCAN_CREATE_AUDIT,    /* scan.created appended */
	SCAN_CREATE_COMMIT,   /* COMMIT sent */
};

struct scan_create {
	struct http_op op;
	json_t *accounts;        /* owned; requested account ids (strings, lower case) */
	const char *accounts_pg; /* accounts as a Postgres array (request pool), from BEGIN on */
	json_t *regions;         /* owned; requested regions, or NULL */
	json_t *checks;          /* owned; requested checks, or NULL */
	json_t *settings;        /* owned; defaults merged with the overrides */
	char id[37];
	char version[24];
	int units;
};

static void scan_create_free(struct scan_create *sc)
{
	json_decref(sc->accounts);
	json_decref(sc->regions);
	json_decref(sc->checks);
	json_decref(sc->settings);
	sc->accounts = sc->regions = sc->checks = sc->settings = NULL;
}

static void scan_create_on_cancel(struct http_op *op)
{
	scan_create_free((struct scan_create *)op);
}

static bool scan_json_has(const json_t *arr, const char *s)
{
	size_t i;
	const json_t *v;

	json_array_foreach (arr, i, v)
		if (strcmp(json_string_value(v), s) == 0)
			return true;
	return false;
}

/* A Postgres array literal of plain tokens (ids, regions, check names) into the pool. */
static char *scan_pg_array(struct http_request *req, const json_t *arr)
{
	size_t i, len = 3;
	const json_t *v;
	char *out, *p;

	json_array_foreach (arr, i, v)
		len += json_string_length(v) + 1;
	out = p = http_alloc(req, len);
	*p++ = '{';
	json_array_foreach (arr, i, v) {
		if (i > 0)
			*p++ = ',';
		memcpy(p, json_string_value(v), json_string_length(v));
		p += json_string_length(v);
	}
	*p++ = '}';
	*p = '\0';
	return out;
}

/* Check the accounts against the request and build the units' account and region arrays. */
static void scan_create_plan(struct scan_create *sc, const PGresult *res)
{
	struct http_op *op = &sc->op;
	json_t *ua = json_array(), *ur = json_array();
	size_t i;
	int row, n = PQntuples(res);
	json_t *id;
	char *a, *r, nunits[16], msg[256];

	json_array_foreach (sc->accounts, i, id) {
		json_t *regions = NULL;
		json_error_t je;

		for (row = 0; row < n; row++)
			if (strcmp(PQgetvalue(res, row, 0), json_string_value(id)) == 0)
				break;
		if (row == n) {
			/* Copied first: failing the op frees the request's lists. */
			snprintf(
			    msg, sizeof(msg),
			    "aws_account_ids: %s is not a live AWS account of this organization",
			    json_string_value(id));
			http_op_fail(op, 400, "invalid_request", "%s", msg);
			goto done;
		}
		regions = json_loads(PQgetvalue(res, row, 1), 0, &je);
		if (sc->regions != NULL) {
			size_t k;
			json_t *want;

			json_array_foreach (sc->regions, k, want) {
				if (!scan_json_has(regions, json_string_value(want))) {
					snprintf(msg, sizeof(msg),
					         "regions: %s is not enabled for AWS account %s",
					         json_string_value(want), json_string_value(id));
					json_decref(regions);
					http_op_fail(op, 400, "invalid_request", "%s", msg);
					goto done;
				}
				json_array_append(ua, id);
				json_array_append(ur, want);
			}
		} else {
			size_t k;
			json_t *have;

			json_array_foreach (regions, k, have) {
				json_array_append(ua, id);
				json_array_append(ur, have);
			}
		}
		json_decref(regions);
	}
	if (json_array_size(ua) == 0) {
		http_op_fail(op, 400, "invalid_request",
		             "regions: the accounts have no region to scan");
		goto done;
	}
	if (json_array_size(ua) > SCAN_MAX_UNITS) {
		http_op_fail(op, 400, "invalid_request",
		             "aws_account_ids: at most %d account x region units per scan",
		             SCAN_MAX_UNITS);
		goto done;
	}
	sc->units = (int)json_array_size(ua);
	a = scan_pg_array(op->req, ua);
	r = scan_pg_array(op->req, ur);
	snprintf(nunits, sizeof(nunits), "%d", sc->units);
	{
		struct http_request *req = op->req;
		char *settings = json_dumps(sc->settings, JSON_COMPACT);
		const char *p[9] = { req->auth.org_id,
			             req->auth.user_id,
			             sc->accounts_pg,
			             sc->regions != NULL ? scan_pg_array(req, sc->regions) : NULL,
			             sc->checks != NULL ? scan_pg_array(req, sc->checks) : NULL,
			             settings,
			             a,
			             r,
			             nunits };

		sc->op.state = SCAN_CREATE_INSERT;
		(void)http_op_prepared(op, "scan_create", 9, p);
		free(settings);
	}
done:
	json_decref(ua);
	json_decref(ur);
}

static void scan_create_advance(struct http_op *op, enum db_event ev, const PGresult *res)
{
	struct scan_create *sc = (struct scan_create *)op;
	struct http_request *req = op->req;

	if (ev != DB_OK) {
		http_op_db_fail(op, ev, res);
		return;
	}
	switch (op->state) {
	case SCAN_CREATE_BEGIN: {
		const char *p[2];

		sc->accounts_pg = scan_pg_array(req, sc->accounts);
		p[0] = sc->accounts_pg;
		p[1] = req->auth.org_id;
		op->state = SCAN_CREATE_ACCOUNTS;
		(void)http_op_prepared(op, "scan_accounts", 2, p);
		return;
	}
	case SCAN_CREATE_ACCOUNTS:
		scan_create_plan(sc, res);
		return;
	case SCAN_CREATE_INSERT: {
		struct audit_event aev;
		json_t *details;

		snprintf(sc->id, sizeof(sc->id), "%s", PQgetvalue(res, 0, 0));
		snprintf(sc->version, sizeof(sc->version), "%s", PQgetvalue(res, 0, 1));
		op->state = SCAN_CREATE_AUDIT;
		scan_audit_fill(&aev, req, "scan.created", sc->id);
		details = json_pack("{s:i, s:O, s:O?, s:O?}", "units", sc->units, "aws_account_ids",
		                    sc->accounts, "regions", sc->regions, "checks", sc->checks);
		(void)audit_op_write(op, &aev, details);
		return;
	}
	case SCAN_CREATE_AUDIT:
		op->state = SCAN_CREATE_COMMIT;
		http_op_commit(op);
		return;
	case SCAN_CREATE_COMMIT: {
		char loc[64];

		scan_create_free(sc);
		http_set_cancel(req, NULL, NULL);
		snprintf(loc, sizeof(loc), "/api/v1/scans/%s", sc->id);
		http_add_header(req, "Location", loc);
		http_respond_json(req, 202,
		                  json_pack("{s:s, s:s, s:I}", "id", sc->id, "status", "queued",
		                            "version", (json_int_t)strtoll(sc->version, NULL, 10)));
		return;
	}
	}
}

/* A list field of the body: strings, 1..max, unique, each accepted by ok(); NULL when absent. */
static int scan_body_list(struct http_request *req, json_t *body, const char *name, size_t max,
                          bool (*ok)(const char *), json_t **out)
{
	json_t *v = json_object_get(body, name), *list;
	size_t i;
	const json_t *e;

	*out = NULL;
	if (v == NULL || json_is_null(v))
		return 0;
	if (!json_is_array(v) || json_array_size(v) == 0 || json_array_size(v) > max) {
		http_error(req, 400, "invalid_request", "%s must be an array of 1-%zu strings",
		           name, max);
		return -1;
	}
	list = json_array();
	json_array_foreach (v, i, e) {
		char buf[64];

		if (!json_is_string(e) || json_string_length(e) >= sizeof(buf) ||
		    strlen(json_string_value(e)) != json_string_length(e) ||
		    !ok(json_string_value(e))) {
			http_error(req, 400, "invalid_request", "%s[%zu] is not valid", name, i);
			json_decref(list);
			return -1;
		}
		snprintf(buf, sizeof(buf), "%s", json_string_value(e));
		if (ok == cs_uuid_valid)
			scan_uuid_lower(buf);
		if (scan_json_has(list, buf)) {
			http_error(req, 400, "invalid_request", "%s[%zu] is repeated", name, i);
			json_decref(list);
			return -1;
		}
		json_array_append_new(list, json_string(buf));
	}
	*out = list;
	return 0;
}

static bool scan_region_ok(const char *s)
{
	size_t i, dashes = 0, n = strlen(s);

	if (n < 9 || n > 25 || !isdigit((unsigned char)s[n - 1]))
		return false;
	for (i = 0; i < n; i++) {
		if (s[i] == '-')
			dashes++;
		else if (!islower((unsigned char)s[i]) && !isdigit((unsigned char)s[i]))
			return false;
	}
	return dashes >= 2;
}

/* The scan's settings: every default, overridden by the body's settings object. */
static json_t *scan_body_settings(struct http_request *req, json_t *body)
{
	json_t *in = json_object_get(body, "settings"), *out = json_object();
	const char *key;
	json_t *v;
	size_t i;

	for (i = 0; i < scan_settings_count; i++) {
		const struct scan_setting *s = &scan_settings[i];

		json_object_set_new(out, s->name,
		                    s->type == SCAN_SETTING_INT ? json_integer(s->def)
		                                                : json_string(s->sdef));
	}
	if (in == NULL || json_is_null(in))
		return out;
	if (!json_is_object(in)) {
		http_error(req, 400, "invalid_request", "settings must be an object");
		json_decref(out);
		return NULL;
	}
	json_object_foreach (in, key, v) {
		const struct scan_setting *s = NULL;

		for (i = 0; i < scan_settings_count; i++)
			if (strcmp(scan_settings[i].name, key) == 0)
				s = &scan_settings[i];
		if (s == NULL ||
		    (s->type == SCAN_SETTING_INT &&
		     (!json_is_integer(v) || json_integer_value(v) < s->min ||
		      json_integer_value(v) > s->max)) ||
		    (s->type == SCAN_SETTING_STRING &&
		     (!json_is_string(v) || json_string_length(v) == 0 ||
		      json_string_length(v) > 128))) {
			http_error(req, 400, "invalid_request", "settings.%.64s is not valid", key);
			json_decref(out);
			return NULL;
		}
		json_object_set(out, key, v);
	}
	return out;
}

static void scans_post(struct http_request *req)
{
	json_t *body = http_json_body(req);
	struct scan_create *sc;
	json_t *accounts = NULL, *regions = NULL, *checks = NULL, *settings = NULL;

	if (body == NULL)
		return;
	if (json_object_get(body, "aws_account_ids") == NULL) {
		http_error(req, 400, "invalid_request", "aws_account_ids is required");
		goto fail;
	}
	if (scan_body_list(req, body, "aws_account_ids", SCAN_MAX_ACCOUNTS, cs_uuid_valid,
	                   &accounts) == -1 ||
	    scan_body_list(req, body, "regions", SCAN_MAX_REGIONS, scan_region_ok, &regions) ==
	        -1 ||
	    scan_body_list(req, body, "checks", scan_checks_count, scan_check_known, &checks) == -1)
		goto fail;
	settings = scan_body_settings(req, body);
	if (settings == NULL)
		goto fail;
	json_decref(body);
	sc = http_op_new(req, sizeof(*sc), scan_create_advance);
	sc->op.on_cancel = scan_create_on_cancel;
	sc->accounts = accounts;
	sc->regions = regions;
	sc->checks = checks;
	sc->settings = settings;
	sc->op.state = SCAN_CREATE_BEGIN;
	(void)http_op_begin(&sc->op);
	return;
fail:
	json_decref(accounts);
	json_decref(regions);
	json_decref(checks);
	json_decref(body);
}

/* ---- GET /api/v1/scans/{id} and GET /api/v1/scans ---- */

static void scan_get(struct http_request *req)
{
	const char *id = http_param(req, "id");
	const char *wait = http_query_arg(req, "wait"),
	           *since = http_query_arg(req, "since_version");
	char *end, *lid;
	long w = 0;
	long long v = -1;

	if (!cs_uuid_valid(id)) {
		http_error(req, 404, "not_found", "no such scan");
		return;
	}
	if (wait != NULL) {
		w = strtol(wait, &end, 10);
		if (*wait == '\0' || *end != '\0' || w < 0 || w > 60) {
			http_error(req, 400, "invalid_request", "wait must be 0-60 seconds");
			return;
		}
	}
	if (since != NULL) {
		v = strtoll(since, &end, 10);
		if (*since == '\0' || *end != '\0' || v < 0) {
			http_error(req, 400, "invalid_request",
			           "since_version must be a non-negative integer");
			return;
		}
	}
	lid = http_strndup(req, id, 36);
	scan_uuid_lower(lid);
	scan_longpoll_get(req, lid, since != NULL ? (int)w : 0, v);
}

static void scans_list(struct http_request *req)
{
	const char *status = http_query_arg(req, "status"), *cursor = http_query_arg(req, "cursor");
	char lim[16];

	if (!scan_query_limit(req, lim))
		return;
	if (cursor != NULL && !cs_uuid_valid(cursor)) {
		http_error(req, 400, "invalid_request", "cursor is not valid");
		return;
	}
	if (status != NULL && strcmp(status, "queued") != 0 && strcmp(status, "running") != 0 &&
	    strcmp(status, "succeeded") != 0 && strcmp(status, "partial") != 0 &&
	    strcmp(status, "failed") != 0) {
		http_error(req, 400, "invalid_request", "status is not valid");
		return;
	}
	{
		const char *p[4] = { req->auth.org_id, status, lim, cursor };

		http_op_read_json(req, "scan_list", 4, p);
	}
}

void scan_api_routes(struct router *r)
{
	struct db_pool *db = scan_g.pool;

	db_pool_prepare(db, "scan_accounts",
	                "SELECT a.id::text, to_json(coalesce(a.regions, '{}'))::text FROM "
	                "aws_accounts a WHERE a.id = ANY($1::uuid[]) AND a.org_id = $2::uuid "
	                "AND a.deleted_at IS NULL FOR SHARE",
	                2);
	db_pool_prepare(
	    db, "scan_create",
	    "WITH s AS (INSERT INTO scans (org_id, created_by, account_ids, regions, checks, "
	    "settings, units_total) VALUES ($1::uuid, $2::uuid, $3::uuid[], $4::text[], "
	    "$5::text[], $6::jsonb, $9::int) RETURNING id, version), "
	    "u AS (INSERT INTO scan_units (scan_id, org_id, aws_account_id, region) "
	    "SELECT s.id, $1::uuid, x.a, x.r FROM s, unnest($7::uuid[], $8::text[]) AS x(a, r) "
	    "RETURNING 1) SELECT s.id, s.version, (SELECT count(*) FROM u) FROM s",
	    9);
	db_pool_prepare_read(
	    db, "scan_list",
	    "WITH page AS (SELECT * FROM scans s WHERE s.org_id = $1::uuid "
	    "AND ($2::text IS NULL OR s.status = $2::text) AND ($4::uuid IS NULL OR "
	    "(s.created_at, s.id) < (SELECT c.created_at, c.id FROM scans c WHERE c.id = $4::uuid "
	    "AND c.org_id = $1::uuid)) ORDER BY s.created_at DESC, s.id DESC LIMIT $3::int + 1), "
	    "shown AS (SELECT * FROM page ORDER BY created_at DESC, id DESC LIMIT $3::int) "
	    "SELECT json_build_object('items', coalesce((SELECT json_agg(" SCAN_JSON_SQL
	    " ORDER BY s.created_at DESC, s.id DESC) FROM shown s), '[]'), 'next_cursor', "
	    "CASE WHEN (SELECT count(*) FROM page) > $3::int THEN (SELECT s.id::text FROM shown s "
	    "ORDER BY s.created_at, s.id LIMIT 1) END)::text",
	    4);
	router_add_perm(r, "POST", "/api/v1/scans", scans_post, ROUTE_NEEDS_DB, "scans:create");
	router_add_perm(r, "GET", "/api/v1/scans", scans_list, ROUTE_NEEDS_DB, "scans:read");
	router_add_perm(r, "GET", "/api/v1/scans/{id}", scan_get, ROUTE_NEEDS_DB, "scans:read");
}

/* ---- the worker ---- */

const struct pricing *scan_prices(void)
{
	return scan_g.prices;
}

static void scan_term_cb(evutil_socket_t sig, short what, void *arg)
{
	if (scan_g.stopping)
		return;
	scan_g.stopping = true;
	scan_exec_stop(true);
	scan_longpoll_stop();
}

void scan_routes(struct router *r)
{
	scan_api_routes(r);
	scan_items_routes(r);
}

int scan_worker_init(struct event_base *base, const struct config *cfg, struct db_pool *pool)
{
	char err[512];
	char *path = NULL;

	memset(&scan_g, 0, sizeof(scan_g));
	scan_g.cfg = cfg;
	scan_g.base = base;
	scan_g.pool = pool;
	if (*cfg->scan_prices_file != '\0') {
		path = xstrdup(cfg->scan_prices_file);
	} else {
		/* Next to the migrations: <pkgdatadir>/data, or data/ of the source tree. */
		path = xasprintf("%s/../data/prices.json", cfg->sql_dir);
	}
	scan_g.prices = pricing_load(path, err, sizeof(err));
	free(path);
	if (scan_g.prices == NULL) {
		log_warnx("scan_init", "cannot load the price table: %s", err);
		return -1;
	}
	if (scan_longpoll_start() == -1 || scan_exec_start() == -1) {
		log_warnx("scan_init", "cannot start the scan executor");
		return -1;
	}
	scan_g.ev_term = evsignal_new(base, SIGTERM, scan_term_cb, NULL);
	scan_g.ev_int = evsignal_new(base, SIGINT, scan_term_cb, NULL);
	if (scan_g.ev_term == NULL || scan_g.ev_int == NULL ||
	    event_add(scan_g.ev_term, NULL) == -1 || event_add(scan_g.ev_int, NULL) == -1)
		return -1;
	return 0;
}

void scan_worker_free(void)
{
	scan_g.stopping = true;
	scan_exec_stop(false);
	scan_longpoll_free();
	if (scan_g.ev_term != NULL)
		event_free(scan_g.ev_term);
	if (scan_g.ev_int != NULL)
		event_free(scan_g.ev_int);
	pricing_free(scan_g.prices);
	memset(&scan_g, 0, sizeof(scan_g));
}
