/*
 * handlers_core.c - operational endpoints: /health (the process answers,
 * no dependencies), /ready (a real round trip to Postgres), /metrics
 * (Prometheus text for the whole instance, loopback or bearer token only).
 */
#include "config.h"

#include <stdlib.h>
#include <string.h>

#include "cloudsweep/auth.h"
#include "cloudsweep/db.h"
#include "cloudsweep/http.h"
#include "cloudsweep/log.h"
#include "cloudsweep/worker.h"

static void health_get(struct http_request *req)
{
	static const char body[] = "{\"status\":\"ok\"}";

	http_respond(req, 200, "application/json", body, sizeof(body) - 1);
}

/* /ready is a small state machine: query sent -> answer or client gone. */
struct ready_state {
	struct http_request *req; /* borrowed */
	struct db_query *q;       /* pending query, or NULL */
};

static void ready_db_cb(void *arg, enum db_event ev, const PGresult *res)
{
	struct ready_state *st = arg;
	struct http_request *req = st->req;

	st->q = NULL;
	http_set_cancel(req, NULL, NULL);
	if (ev == DB_OK && !auth_revoke_fresh()) {
		/* Authenticated requests would be refused until the revocation mirror is current.
		 */
		http_error(req, 503, "unavailable", "token revocations are not loaded yet");
	} else if (ev == DB_OK) {
		static const char body[] = "{\"status\":\"ready\"}";

		http_respond(req, 200, "application/json", body, sizeof(body) - 1);
	} else {
		http_error(req, 503, "unavailable", "the database is unreachable; retry later");
	}
}

static void ready_cancel_cb(struct http_request *req, void *arg)
{
	struct ready_state *st = arg;

	if (st->q != NULL)
		db_query_cancel(st->q);
	st->q = NULL;
}

static void ready_get(struct http_request *req)
{
	struct ready_state *st = http_alloc(req, sizeof(*st));

	st->req = req;
	st->q = cs_worker && cs_worker->db
	            ? db_query(cs_worker->db, "SELECT 1", 0, NULL, ready_db_cb, st)
	            : NULL;
	if (st->q == NULL) {
		http_error(req, 503, "unavailable", "the database is unreachable; retry later");
		return;
	}
	http_set_cancel(req, ready_cancel_cb, st);
}

static bool metrics_allowed(struct http_request *req)
{
	const char *auth = http_header(req, "Authorization");
	const char *tok = cs_worker ? cs_worker->cfg->metrics_token : NULL;

	if (strncmp(req->client_ip, "127.", 4) == 0 || strcmp(req->client_ip, "::1") == 0)
		return true;
	if (tok == NULL || auth == NULL || strncmp(auth, "Bearer ", 7) != 0)
		return false;
	return strlen(auth + 7) == strlen(tok) && cs_consttime_eq(auth + 7, tok, strlen(tok));
}

static void metrics_get(struct http_request *req)
{
	const char *const *names;
	size_t len;
	char *text;
	int n;

	if (!metrics_allowed(req)) {
		http_error(req, 403, "forbidden",
		           "metrics are available from loopback or with the metrics token");
		return;
	}
	names = router_route_names(req->router, &n);
	text = metrics_render(cs_worker->metrics, names, n, &len);
	http_respond(req, 200, "text/plain; version=0.0.4; charset=utf-8", text, len);
	free(text);
}

void http_core_routes(struct router *r)
{
	router_add(r, "GET", "/health", health_get, 0);
	router_add(r, "GET", "/ready", ready_get, 0);
	router_add(r, "GET", "/metrics", metrics_get, 0);
}
