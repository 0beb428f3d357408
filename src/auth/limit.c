/*
 * limit.c - the rate-limit middleware and the login-address block, on the
 * shared token buckets of audit/ratelimit.c. Anonymous API requests are
 * charged to the client address, authenticated ones to the user, and all of
 * them to the global safety bucket; a refusal is 429 with Retry-After and an
 * access.rate_limited audit event. When Postgres cannot answer, the request
 * is refused with 503 (fail closed), never waved through.
 */
#include "config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cloudsweep/log.h"
#include "cloudsweep/ratelimit.h"
#include "cloudsweep/worker.h"
#include "auth_int.h"

struct limit_wait {
	struct http_request *req; /* borrowed */
	struct rl_check *check;   /* pending check, or NULL */
	bool returned;            /* ratelimit_check has returned (the answer may come first) */
	bool answered;
	enum rl_verdict verdict;
	int retry_after_s;
};

/* Answer a refusal the limiter decided; true when the request must stop. */
static bool limit_refuse(struct http_request *req, enum rl_verdict v, int retry_after_s,
                         const char *what)
{
	char ra[16];

	if (v == RL_ALLOW)
		return false;
	snprintf(ra, sizeof(ra), "%d", retry_after_s > 0 ? retry_after_s : 1);
	if (v == RL_UNAVAILABLE) {
		http_error(req, 503, "unavailable", "the database is unreachable; retry later");
		return true;
	}
	http_add_header(req, "Retry-After", ra);
	auth_audit_standalone(req, req->auth.authenticated ? req->auth.org_id : NULL,
	                      req->auth.authenticated ? req->auth.user_id : NULL,
	                      "access.rate_limited", req->route->pattern, NULL);
	http_error(req, 429, "rate_limited", "%s; retry after %s s", what, ra);
	return true;
}

static void limit_continue(struct limit_wait *w)
{
	http_set_cancel(w->req, NULL, NULL);
	if (!limit_refuse(w->req, w->verdict, w->retry_after_s, "too many requests"))
		http_next(w->req);
}

static void limit_checked_cb(void *arg, enum rl_verdict v, int retry_after_s)
{
	struct limit_wait *w = arg;

	w->check = NULL;
	w->answered = true;
	w->verdict = v;
	w->retry_after_s = retry_after_s;
	if (w->returned)
		limit_continue(w); /* asynchronous answer */
}

static void limit_cancel_cb(struct http_request *req, void *arg)
{
	struct limit_wait *w = arg;

	if (w->check != NULL)
		ratelimit_check_cancel(w->check);
	w->check = NULL;
}

void auth_mw_ratelimit(struct http_request *req)
{
	const struct route *rt = req->route;
	struct limit_wait *w;
	struct rl_subject s;

	/* Operational endpoints (/health, /ready, /metrics) are not API calls. */
	if (auth_g.rl == NULL || (rt->perm == NULL && !(rt->flags & (ROUTE_PUBLIC | ROUTE_SELF)))) {
		http_next(req);
		return;
	}
	w = http_alloc(req, sizeof(*w));
	memset(w, 0, sizeof(*w));
	w->req = req;
	s.ip = req->client_ip;
	s.user_id = req->auth.authenticated ? req->auth.user_id : NULL;
	s.org_id = req->auth.authenticated ? req->auth.org_id : NULL;
	http_set_cancel(req, limit_cancel_cb, w);
	w->check = ratelimit_check(auth_g.rl, &s, limit_checked_cb, w);
	w->returned = true;
	if (w->answered)
		limit_continue(w); /* answered from the worker's lease before returning */
}

/* ---- login-address blocks ---- */

struct block_wait {
	struct http_request *req;
	struct rl_check *check;
	bool returned, answered;
	enum rl_verdict verdict;
	int retry_after_s;
	void (*proceed)(struct http_request *req); /* borrowed: the login handler proper */
};

static void block_continue(struct block_wait *w)
{
	char ra[16];

	http_set_cancel(w->req, NULL, NULL);
	if (w->verdict == RL_ALLOW) {
		w->proceed(w->req);
		return;
	}
	if (w->verdict == RL_UNAVAILABLE) {
		http_error(w->req, 503, "unavailable", "the database is unreachable; retry later");
		return;
	}
	snprintf(ra, sizeof(ra), "%d", w->retry_after_s > 0 ? w->retry_after_s : 1);
	http_add_header(w->req, "Retry-After", ra);
	http_error(w->req, 429, "rate_limited",
	           "too many failed logins from this address; retry after %s s", ra);
}

static void block_checked_cb(void *arg, enum rl_verdict v, int retry_after_s)
{
	struct block_wait *w = arg;

	w->check = NULL;
	w->answered = true;
	w->verdict = v;
	w->retry_after_s = retry_after_s;
	if (w->returned)
		block_continue(w);
}

static void block_cancel_cb(struct http_request *req, void *arg)
{
	struct block_wait *w = arg;

	if (w->check != NULL)
		ratelimit_check_cancel(w->check);
	w->check = NULL;
}

void auth_login_gate(struct http_request *req, void (*proceed)(struct http_request *req))
{
	struct block_wait *w;

	if (auth_g.rl == NULL) {
		proceed(req);
		return;
	}
	w = http_alloc(req, sizeof(*w));
	memset(w, 0, sizeof(*w));
	w->req = req;
	w->proceed = proceed;
	http_set_cancel(req, block_cancel_cb, w);
	w->check = ratelimit_ip_blocked(auth_g.rl, req->client_ip, block_checked_cb, w);
	w->returned = true;
	if (w->answered)
		block_continue(w);
}

static void limit_audit_cb(void *arg, int status, const char *event_id)
{
	if (status != 0)
		log_warnx("audit_write_failed", "access.ip_blocked could not be written");
}

struct failed_note {
	char ip[64], request_id[HTTP_REQUEST_ID_MAX + 1];
};

static void login_failed_cb(void *arg, enum rl_verdict v, int retry_after_s, bool new_block)
{
	struct failed_note *n = arg;

	if (new_block && cs_worker != NULL && cs_worker->db != NULL) {
		struct audit_event ev;
		json_t *details = json_pack("{s:i}", "blocked_for_s", retry_after_s);

		memset(&ev, 0, sizeof(ev));
		ev.ip = n->ip;
		ev.request_id = n->request_id;
		ev.event_type = "access.ip_blocked";
		ev.resource_id = n->ip;
		ev.details = details;
		log_warnx("ip_blocked", "login blocked for %s after repeated failures", n->ip);
		if (audit_write_standalone(cs_worker->db, &ev, limit_audit_cb, NULL) == NULL)
			log_warnx("audit_write_failed", "access.ip_blocked refused");
		json_decref(details);
	}
	free(n);
}

void auth_login_failed_note(struct http_request *req)
{
	struct failed_note *n;

	if (auth_g.rl == NULL)
		return;
	/* Outlives the request: the count matters even when the client has gone. */
	n = xcalloc(1, sizeof(*n));
	snprintf(n->ip, sizeof(n->ip), "%s", req->client_ip);
	snprintf(n->request_id, sizeof(n->request_id), "%s", req->request_id);
	/* A NULL handle means the callback already ran (and freed n). */
	(void)ratelimit_login_failed(auth_g.rl, n->ip, login_failed_cb, n);
}
