/*
 * limit.c - the rate-limit middleware and the login-address block, on the
 * shared token buckets of audit/ratelimit.c. Anonymous API requests are
 * charged to the client address, authenticated ones to the user, and all of
 * them to the global safety bucket; a refusal is 429 with Retry-After and an
 * access.rate_limited audit event. When Postgres cannot answer, the request
 * is refused with 503 (fail closed), never waved through.
 *
 * A flood of refused requests must not turn into a flood of audit writes:
 * a subject's (user's or address's) first refusal writes its event, and the
 * answer waits for it; the refusals that follow within
 * ratelimit_audit_fold_s are counted per worker and written as one event
 * when the period is over ("refusals": n), so every 429 is accounted for at
 * a bounded cost.
 *
 * An organization's tier (orgs.rate_limit_per_min) replaces the user rate
 * for its members. The tiers are read for all organizations at once, at
 * most every org_limits_refresh_s per worker and never on the request's
 * path: a request uses what the worker knows (the default until the first
 * read answers). Each distinct tier rate has a limiter of its own on the
 * same shared buckets, since a limiter's rates are fixed when it is made.
 */
#include "config.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/event.h>

#include "cloudsweep/log.h"
#include "cloudsweep/ratelimit.h"
#include "cloudsweep/worker.h"
#include "auth_int.h"

#define LIMIT_TIERS_MAX  16     /* distinct tier rates served; beyond, the default rate */
#define LIMIT_ORGS_MAX   100000 /* organizations with a tier read at once */
#define LIMIT_FOLD_SLOTS 1024   /* subjects whose refusals a worker folds at once */

/* The refusals of one subject within its fold period. */
struct limit_fold {
	char subject[72];     /* "u:<user id>" or "a:<address>"; "" when free */
	uint64_t since_ms;    /* when the subject's last event was written */
	unsigned long folded; /* refusals answered since, without an event of their own */
	/* what the summary event says */
	char org_id[37], user_id[37], ip[64], method[16], path[128];
	long long limit_per_min;
};

struct limit_org {
	char org_id[37];
	long long rate_per_min;
};

struct limit_tier {
	long long rate_per_min;
	struct ratelimit *rl; /* owned */
};

/* This worker's view of the organization tiers. */
static struct {
	struct limit_org *orgs; /* owned, sorted by org_id */
	size_t norgs;
	struct limit_tier tiers[LIMIT_TIERS_MAX];
	int ntiers;
	struct db_query *q;  /* pending refresh, or NULL */
	uint64_t fetched_ms; /* when the last refresh was asked for; 0: never */
	bool full_logged;
	struct limit_fold *folds; /* owned, LIMIT_FOLD_SLOTS, made at the first refusal */
	struct event *fold_timer; /* owned: writes the folded refusals */
	struct event *fold_term;  /* owned: SIGTERM writes them all while the pool still runs */
} limit_g;

static int limit_org_cmp(const void *a, const void *b)
{
	return strcmp(((const struct limit_org *)a)->org_id, ((const struct limit_org *)b)->org_id);
}

static void limit_orgs_cb(void *arg, enum db_event ev, const PGresult *res)
{
	size_t n;

	limit_g.q = NULL;
	if (ev != DB_OK) {
		log_warnx("org_limits_refresh",
		          "cannot read the organization tiers; keeping the last");
		return;
	}
	n = (size_t)PQntuples(res);
	free(limit_g.orgs);
	limit_g.orgs = n > 0 ? xcalloc(n, sizeof(*limit_g.orgs)) : NULL;
	for (size_t i = 0; i < n; i++) {
		snprintf(limit_g.orgs[i].org_id, sizeof(limit_g.orgs[i].org_id), "%s",
		         PQgetvalue(res, (int)i, 0));
		limit_g.orgs[i].rate_per_min = atoll(PQgetvalue(res, (int)i, 1));
	}
	limit_g.norgs = n;
	if (n > 1)
		qsort(limit_g.orgs, n, sizeof(*limit_g.orgs), limit_org_cmp);
}

/* Start a refresh of the tiers when the worker's copy is older than the TTL. */
static void limit_orgs_refresh(void)
{
	uint64_t now = cs_now_ms();
	char lim[24];
	const char *p[1] = { lim };

	if (limit_g.q != NULL || cs_worker == NULL || cs_worker->db == NULL ||
	    (limit_g.fetched_ms != 0 &&
	     now - limit_g.fetched_ms < (uint64_t)auth_g.cfg->org_limits_refresh_s * 1000))
		return;
	limit_g.fetched_ms = now;
	snprintf(lim, sizeof(lim), "%d", LIMIT_ORGS_MAX);
	limit_g.q = db_query(cs_worker->db,
	                     "SELECT id::text, rate_limit_per_min FROM orgs WHERE "
	                     "rate_limit_per_min IS NOT NULL ORDER BY id LIMIT $1::int",
	                     1, p, limit_orgs_cb, NULL);
}

/* The limiter for a request of org_id: its tier's (rate in *tierp), or the default one. */
static struct ratelimit *limit_for_org(const char *org_id, long long *tierp)
{
	struct limit_org key, *o;
	struct ratelimit_config rc;
	struct limit_tier *t;

	limit_orgs_refresh();
	if (org_id == NULL || limit_g.norgs == 0)
		return auth_g.rl;
	snprintf(key.org_id, sizeof(key.org_id), "%s", org_id);
	o = bsearch(&key, limit_g.orgs, limit_g.norgs, sizeof(*o), limit_org_cmp);
	if (o == NULL || o->rate_per_min == (long long)auth_g.cfg->ratelimit_user_per_min)
		return auth_g.rl;
	for (int i = 0; i < limit_g.ntiers; i++)
		if (limit_g.tiers[i].rate_per_min == o->rate_per_min) {
			*tierp = o->rate_per_min;
			return limit_g.tiers[i].rl;
		}
	if (limit_g.ntiers == LIMIT_TIERS_MAX) {
		if (!limit_g.full_logged)
			log_warnx("org_limits_tiers",
			          "more than %d distinct tier rates; the others "
			          "get the default user rate",
			          LIMIT_TIERS_MAX);
		limit_g.full_logged = true;
		return auth_g.rl;
	}
	ratelimit_config_from(&rc, auth_g.cfg, o->rate_per_min);
	t = &limit_g.tiers[limit_g.ntiers];
	t->rl = ratelimit_new(cs_worker->db, &rc);
	if (t->rl == NULL)
		return auth_g.rl;
	t->rate_per_min = o->rate_per_min;
	limit_g.ntiers++;
	*tierp = o->rate_per_min;
	return t->rl;
}

static void limit_fold_written(void *arg, int status, const char *event_id)
{
	if (status != 0)
		log_warnx("audit_write_failed",
		          "folded access.rate_limited events were not written");
}

/* Write the refusals folded in f as one event and start a new period. */
static void limit_fold_flush(struct limit_fold *f, uint64_t now)
{
	struct audit_event ev;
	json_t *d;

	if (f->folded > 0 && cs_worker != NULL && cs_worker->db != NULL) {
		memset(&ev, 0, sizeof(ev));
		ev.org_id = *f->org_id != '\0' ? f->org_id : NULL;
		ev.actor = *f->user_id != '\0' ? f->user_id : NULL;
		ev.ip = f->ip;
		ev.event_type = "access.rate_limited";
		ev.resource_id = f->path;
		d = json_pack("{s:s, s:I, s:s, s:s, s:I}", "bucket",
		              ev.actor != NULL ? "user" : "ip", "limit_per_min",
		              (json_int_t)f->limit_per_min, "method", f->method, "path", f->path,
		              "refusals", (json_int_t)f->folded);
		ev.details = d;
		if (d == NULL ||
		    audit_write_standalone(cs_worker->db, &ev, limit_fold_written, NULL) == NULL)
			log_warnx("audit_write_failed", "%lu folded refusals were not written",
			          f->folded);
		json_decref(d);
	}
	f->folded = 0;
	f->since_ms = now;
}

/* Every half period: write the folds whose period is over, free the idle slots. */
static void limit_fold_sweep(evutil_socket_t fd, short what, void *arg)
{
	uint64_t now = cs_now_ms(), period = (uint64_t)auth_g.cfg->ratelimit_audit_fold_s * 1000;

	for (size_t i = 0; i < LIMIT_FOLD_SLOTS; i++) {
		struct limit_fold *f = &limit_g.folds[i];

		if (*f->subject == '\0' || now - f->since_ms < period)
			continue;
		if (f->folded > 0)
			limit_fold_flush(f, now);
		else
			*f->subject = '\0';
	}
}

/* The worker drains: write every fold now, while the reactor and the pool run. */
static void limit_fold_term(evutil_socket_t fd, short what, void *arg)
{
	for (size_t i = 0; i < LIMIT_FOLD_SLOTS; i++)
		limit_fold_flush(&limit_g.folds[i], cs_now_ms());
}

/*
 * Account one refusal of req's subject: true when it needs an event of its
 * own (the first of a period), false when it was folded into the next one.
 */
static bool limit_fold(struct http_request *req, long long limit_per_min)
{
	uint64_t now = cs_now_ms(), period = (uint64_t)auth_g.cfg->ratelimit_audit_fold_s * 1000;
	uint64_t h = 1469598103934665603ULL; /* FNV-1a */
	struct limit_fold *f;
	char subject[72];
	struct timeval tv;

	if (limit_g.folds == NULL) {
		if (cs_worker == NULL || cs_worker->base == NULL)
			return true;
		limit_g.folds = xcalloc(LIMIT_FOLD_SLOTS, sizeof(*limit_g.folds));
		limit_g.fold_timer =
		    event_new(cs_worker->base, -1, EV_PERSIST, limit_fold_sweep, NULL);
		limit_g.fold_term = evsignal_new(cs_worker->base, SIGTERM, limit_fold_term, NULL);
		tv.tv_sec = auth_g.cfg->ratelimit_audit_fold_s > 1
		                ? auth_g.cfg->ratelimit_audit_fold_s / 2
		                : 1;
		tv.tv_usec = 0;
		if (limit_g.fold_timer == NULL || event_add(limit_g.fold_timer, &tv) == -1 ||
		    limit_g.fold_term == NULL || event_add(limit_g.fold_term, NULL) == -1)
			fatal("oom", "the rate-limit fold events");
	}
	snprintf(subject, sizeof(subject), "%s:%s", req->auth.authenticated ? "u" : "a",
	         req->auth.authenticated ? req->auth.user_id : req->client_ip);
	for (const char *p = subject; *p != '\0'; p++)
		h = (h ^ (unsigned char)*p) * 1099511628211ULL;
	f = &limit_g.folds[h % LIMIT_FOLD_SLOTS];
	if (strcmp(f->subject, subject) == 0 && now - f->since_ms < period) {
		f->folded++;
		snprintf(f->method, sizeof(f->method), "%s", req->method);
		snprintf(f->path, sizeof(f->path), "%s", req->route->pattern);
		f->limit_per_min = limit_per_min;
		return false;
	}
	limit_fold_flush(f, now); /* the slot's previous subject, if it has refusals to tell */
	snprintf(f->subject, sizeof(f->subject), "%s", subject);
	snprintf(f->org_id, sizeof(f->org_id), "%s",
	         req->auth.authenticated ? req->auth.org_id : "");
	snprintf(f->user_id, sizeof(f->user_id), "%s",
	         req->auth.authenticated ? req->auth.user_id : "");
	snprintf(f->ip, sizeof(f->ip), "%s", req->client_ip);
	return true;
}

void auth_limit_free(void)
{
	unsigned long lost = 0;

	for (size_t i = 0; limit_g.folds != NULL && i < LIMIT_FOLD_SLOTS; i++)
		lost += limit_g.folds[i].folded;
	if (lost > 0) /* refused after SIGTERM's flush, or the reactor stopped without one */
		log_warnx("audit_write_failed", "%lu folded 429s end with the worker unwritten",
		          lost);
	if (limit_g.fold_timer != NULL)
		event_free(limit_g.fold_timer);
	if (limit_g.fold_term != NULL)
		event_free(limit_g.fold_term);
	free(limit_g.folds);
	if (limit_g.q != NULL)
		db_query_cancel(limit_g.q);
	for (int i = 0; i < limit_g.ntiers; i++)
		ratelimit_free(limit_g.tiers[i].rl);
	free(limit_g.orgs);
	memset(&limit_g, 0, sizeof(limit_g));
}

struct limit_wait {
	struct http_request *req; /* borrowed */
	struct rl_check *check;   /* pending check, or NULL */
	bool returned;            /* ratelimit_check has returned (the answer may come first) */
	bool answered;
	enum rl_verdict verdict;
	int retry_after_s;
	long long limit_per_min; /* the subject bucket's rate, for the audit event */
};

/* Answer a refusal the limiter decided; true when the request must stop. */
static bool limit_refuse(struct http_request *req, enum rl_verdict v, int retry_after_s,
                         long long limit_per_min, const char *what)
{
	json_t *details;
	char ra[16];

	if (v == RL_ALLOW)
		return false;
	snprintf(ra, sizeof(ra), "%d", retry_after_s > 0 ? retry_after_s : 1);
	if (v == RL_UNAVAILABLE) {
		http_error(req, 503, "unavailable", "the database is unreachable; retry later");
		return true;
	}
	http_add_header(req, "Retry-After", ra);
	if (!limit_fold(req, limit_per_min)) {
		http_error(req, 429, "rate_limited", "%s; retry after %s s", what, ra);
		return true;
	}
	details =
	    json_pack("{s:s, s:I, s:s, s:s, s:i, s:i}", "bucket",
	              req->auth.authenticated ? "user" : "ip", "limit_per_min",
	              (json_int_t)limit_per_min, "method", req->method, "path", req->route->pattern,
	              "retry_after", retry_after_s > 0 ? retry_after_s : 1, "refusals", 1);
	auth_audit_refuse(req, req->auth.authenticated ? req->auth.org_id : NULL,
	                  req->auth.authenticated ? req->auth.user_id : NULL, "access.rate_limited",
	                  req->route->pattern, details, 429, "rate_limited", "%s; retry after %s s",
	                  what, ra);
	json_decref(details);
	return true;
}

static void limit_continue(struct limit_wait *w)
{
	http_set_cancel(w->req, NULL, NULL);
	if (!limit_refuse(w->req, w->verdict, w->retry_after_s, w->limit_per_min,
	                  "too many requests"))
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
	struct ratelimit *rl;
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
	w->limit_per_min = req->auth.authenticated ? auth_g.cfg->ratelimit_user_per_min
	                                           : auth_g.cfg->ratelimit_anon_per_min;
	rl = req->auth.authenticated ? limit_for_org(s.org_id, &w->limit_per_min) : auth_g.rl;
	w->check = ratelimit_check(rl, &s, limit_checked_cb, w);
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
