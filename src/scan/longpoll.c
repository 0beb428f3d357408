/*
 * longpoll.c - GET /api/v1/scans/{id}?wait=&since_version=. A request whose
 * scan is not newer than since_version is parked: no thread, no pooled
 * connection, no busy loop - just an entry in a per-worker table keyed by
 * scan id and a timer at its deadline. The worker LISTENs on cs_scan; a
 * NOTIFY '<id>:<version>' from any worker or instance makes the table read
 * that scan once and answer every waiter the new version concerns, so a
 * thousand clients watching one scan cost one query per change. A client
 * that goes away is removed at once through the request's cancel hook.
 *
 * A change that lands between a waiter's first read and its parking is not
 * lost: the waiter joins the table before that read, and the table
 * remembers the highest version announced while anyone watches.
 */
#include "config.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cloudsweep/log.h"
#include "scan_int.h"

#define SCAN_WATCH_BUCKETS 4096

enum scan_waiter_state {
	SCAN_WAITER_READING, /* the first, org-scoped read is in flight */
	SCAN_WAITER_PARKED,  /* waits for a newer version or its deadline */
	SCAN_WAITER_DUE,     /* the deadline passed: the next read of the scan answers it */
};

struct scan_watch;

struct scan_waiter {
	struct http_op op;               /* first member: the first read */
	struct scan_waiter *next, *prev; /* the watch's list */
	struct scan_watch *watch;        /* borrowed; NULL once detached */
	enum scan_waiter_state state;
	long long since;
	int wait_s;
	struct event *ev_deadline; /* owned while parked */
};

/* Everyone on this worker waiting for one scan. */
struct scan_watch {
	struct scan_watch *hnext; /* hash chain */
	char scan_id[37];         /* lower case, as NOTIFY spells it */
	struct scan_waiter *waiters;
	long long seen_version; /* highest version announced while watched */
	struct db_query *q;     /* the shared read in flight, or NULL */
	bool read_again;        /* something changed while q was in flight */
	bool busy;              /* answering from a callback: do not free yet */
	uint64_t woken_us;      /* when the NOTIFY that started the pending read arrived */
};

static struct {
	struct scan_watch *buckets[SCAN_WATCH_BUCKETS];
	struct db_subscription *sub; /* cs_scan */
	long long parked;            /* waiters on this worker */
} lp;

static void scan_watch_read(struct scan_watch *w);

static unsigned scan_watch_hash(const char *id)
{
	unsigned h = 2166136261u;

	for (; *id != '\0'; id++)
		h = (h ^ (unsigned char)*id) * 16777619u;
	return h % SCAN_WATCH_BUCKETS;
}

static struct scan_watch *scan_watch_find(const char *id)
{
	struct scan_watch *w;

	for (w = lp.buckets[scan_watch_hash(id)]; w != NULL; w = w->hnext)
		if (strcmp(w->scan_id, id) == 0)
			return w;
	return NULL;
}

static struct scan_watch *scan_watch_get(const char *id)
{
	struct scan_watch *w = scan_watch_find(id);
	unsigned b;

	if (w != NULL)
		return w;
	w = xcalloc(1, sizeof(*w));
	snprintf(w->scan_id, sizeof(w->scan_id), "%s", id);
	b = scan_watch_hash(id);
	w->hnext = lp.buckets[b];
	lp.buckets[b] = w;
	return w;
}

static void scan_watch_free_if_idle(struct scan_watch *w)
{
	struct scan_watch **pp;

	if (w->waiters != NULL || w->busy)
		return;
	if (w->q != NULL)
		db_query_cancel(w->q);
	for (pp = &lp.buckets[scan_watch_hash(w->scan_id)]; *pp != NULL; pp = &(*pp)->hnext) {
		if (*pp == w) {
			*pp = w->hnext;
			break;
		}
	}
	free(w);
}

static void scan_waiter_attach(struct scan_waiter *wt, struct scan_watch *w)
{
	wt->watch = w;
	wt->next = w->waiters;
	wt->prev = NULL;
	if (w->waiters != NULL)
		w->waiters->prev = wt;
	w->waiters = wt;
	lp.parked++;
}

static void scan_waiter_detach(struct scan_waiter *wt)
{
	struct scan_watch *w = wt->watch;

	if (wt->ev_deadline != NULL)
		event_free(wt->ev_deadline);
	wt->ev_deadline = NULL;
	if (w == NULL)
		return;
	if (wt->prev != NULL)
		wt->prev->next = wt->next;
	else
		w->waiters = wt->next;
	if (wt->next != NULL)
		wt->next->prev = wt->prev;
	wt->watch = NULL;
	lp.parked--;
	scan_watch_free_if_idle(w);
}

/* The client went away while parked (or the worker shuts its connections). */
static void scan_waiter_cancel_cb(struct http_request *req, void *arg)
{
	scan_waiter_detach(arg);
}

/* The client went away during the first read (the op cancels the query itself). */
static void scan_waiter_op_cancel(struct http_op *op)
{
	scan_waiter_detach((struct scan_waiter *)op);
}

static void scan_waiter_answer(struct scan_waiter *wt, const char *doc)
{
	struct http_request *req = wt->op.req;

	scan_waiter_detach(wt);
	http_set_cancel(req, NULL, NULL);
	http_respond(req, 200, "application/json", doc, strlen(doc));
}

static void scan_waiter_deadline_cb(evutil_socket_t fd, short what, void *arg)
{
	struct scan_waiter *wt = arg;

	wt->state = SCAN_WAITER_DUE;
	scan_watch_read(wt->watch);
}

static void scan_waiter_park(struct scan_waiter *wt)
{
	struct timeval tv = { wt->wait_s, 0 };

	wt->state = SCAN_WAITER_PARKED;
	wt->ev_deadline = evtimer_new(scan_g.base, scan_waiter_deadline_cb, wt);
	if (wt->ev_deadline == NULL || evtimer_add(wt->ev_deadline, &tv) == -1)
		fatalx("scan_longpoll", "cannot arm a long-poll timer");
	http_set_cancel(wt->op.req, scan_waiter_cancel_cb, wt);
	/* A change announced while the first read ran: read again now. */
	if (wt->watch->seen_version > wt->since)
		scan_watch_read(wt->watch);
}

/* The first read: (version, doc) of the caller's scan. */
static void scan_waiter_advance(struct http_op *op, enum db_event ev, const PGresult *res)
{
	struct scan_waiter *wt = (struct scan_waiter *)op;
	long long version;
	const char *doc;

	if (ev != DB_OK) {
		scan_waiter_detach(wt);
		http_op_db_fail(op, ev, res);
		return;
	}
	if (PQntuples(res) != 1) {
		scan_waiter_detach(wt);
		http_op_fail(op, 404, "not_found", "no such scan");
		return;
	}
	version = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
	doc = PQgetvalue(res, 0, 1);
	if (wt->watch == NULL || version > wt->since || scan_g.stopping) {
		scan_waiter_answer(wt, doc);
		return;
	}
	scan_waiter_park(wt);
}

/* The shared read of a watched scan: answer whoever it concerns. */
static void scan_watch_read_cb(void *arg, enum db_event ev, const PGresult *res)
{
	struct scan_watch *w = arg;
	struct scan_waiter *wt, *next;
	long long version = 0;
	const char *doc = NULL;

	int answered = 0;
	uint64_t read_us = cs_now_us();

	w->q = NULL;
	w->busy = true;
	if (ev == DB_OK && PQntuples(res) == 1) {
		version = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
		doc = PQgetvalue(res, 0, 1);
		if (version > w->seen_version)
			w->seen_version = version;
	}
	for (wt = w->waiters; wt != NULL; wt = next) {
		next = wt->next;
		if (wt->state == SCAN_WAITER_READING)
			continue;
		if (doc != NULL && (version > wt->since || wt->state == SCAN_WAITER_DUE)) {
			scan_waiter_answer(wt, doc);
			answered++;
		} else if (doc == NULL && (wt->state == SCAN_WAITER_DUE || ev == DB_OK)) {
			struct http_op *op = &wt->op;

			/* The scan is gone (404), or it cannot be read when the wait is over. */
			scan_waiter_detach(wt);
			if (ev == DB_OK)
				http_op_fail(op, 404, "not_found", "no such scan");
			else
				http_op_db_fail(op, ev, res);
		}
	}
	w->busy = false;
	if (w->woken_us != 0 && answered > 0)
		log_debug(
		    "scan_longpoll_woken",
		    "scan %s version %lld: %d answered %.1f ms after the NOTIFY (read %.1f ms)",
		    w->scan_id, version, answered, (double)(cs_now_us() - w->woken_us) / 1000.0,
		    (double)(read_us - w->woken_us) / 1000.0);
	w->woken_us = 0;
	if (w->read_again && w->waiters != NULL) {
		w->read_again = false;
		scan_watch_read(w);
		return;
	}
	scan_watch_free_if_idle(w);
}

static void scan_watch_read(struct scan_watch *w)
{
	const char *p[1] = { w->scan_id };

	if (w->q != NULL || w->busy) {
		w->read_again = true;
		return;
	}
	w->q = db_query_prepared(scan_g.pool, "scan_get_any", 1, p, scan_watch_read_cb, w);
	if (w->q == NULL)
		w->read_again = false; /* the pool is down; deadlines will retry */
}

static void scan_longpoll_notify_cb(void *arg, const char *channel, const char *payload)
{
	char id[37];
	const char *colon = strchr(payload, ':');
	struct scan_watch *w;
	struct scan_waiter *wt;
	long long version;

	if (colon == NULL || colon - payload != 36)
		return;
	memcpy(id, payload, 36);
	id[36] = '\0';
	w = scan_watch_find(id);
	if (w == NULL)
		return;
	version = strtoll(colon + 1, NULL, 10);
	if (version > w->seen_version)
		w->seen_version = version;
	for (wt = w->waiters; wt != NULL; wt = wt->next) {
		if (wt->state != SCAN_WAITER_READING && wt->since < version) {
			if (w->woken_us == 0)
				w->woken_us = cs_now_us();
			scan_watch_read(w);
			return;
		}
	}
}

void scan_longpoll_get(struct http_request *req, const char *scan_id, int wait_s, long long since)
{
	struct scan_waiter *wt = http_op_new(req, sizeof(*wt), scan_waiter_advance);
	const char *p[2] = { scan_id, req->auth.org_id };

	wt->op.on_cancel = scan_waiter_op_cancel;
	wt->since = since;
	wt->wait_s = wait_s;
	wt->state = SCAN_WAITER_READING;
	if (wait_s > 0 && !scan_g.stopping) {
		if (lp.parked >= scan_g.cfg->scan_longpoll_max) {
			http_set_cancel(req, NULL, NULL);
			http_add_header(req, "Retry-After", "1");
			http_error(req, 503, "unavailable",
			           "too many waiting requests; retry later");
			return;
		}
		scan_waiter_attach(wt, scan_watch_get(scan_id));
	}
	(void)http_op_prepared(&wt->op, "scan_get", 2, p);
}

int scan_longpoll_start(void)
{
	if (db_pool_prepare_read(scan_g.pool, "scan_get",
	                         "SELECT s.version, " SCAN_JSON_SQL "::text FROM scans s "
	                         "WHERE s.id = $1::uuid AND s.org_id = $2::uuid",
	                         2) == -1 ||
	    db_pool_prepare_read(scan_g.pool, "scan_get_any",
	                         "SELECT s.version, " SCAN_JSON_SQL "::text FROM scans s "
	                         "WHERE s.id = $1::uuid",
	                         1) == -1)
		return -1;
	lp.sub = db_subscribe(scan_g.pool, "cs_scan", scan_longpoll_notify_cb, NULL);
	return lp.sub != NULL ? 0 : -1;
}

void scan_longpoll_stop(void)
{
	size_t b;

	/* Answer every parked waiter with the scan as it is now. */
	for (b = 0; b < SCAN_WATCH_BUCKETS; b++) {
		struct scan_watch *w, *next;

		for (w = lp.buckets[b]; w != NULL; w = next) {
			struct scan_waiter *wt;

			next = w->hnext;
			for (wt = w->waiters; wt != NULL; wt = wt->next)
				if (wt->state == SCAN_WAITER_PARKED)
					wt->state = SCAN_WAITER_DUE;
			scan_watch_read(w);
		}
	}
}

void scan_longpoll_free(void)
{
	if (lp.sub != NULL)
		db_unsubscribe(lp.sub);
	lp.sub = NULL;
}
