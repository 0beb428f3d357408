/*
 * exec.c - the executor: claims units of scans from Postgres and runs them
 * on this worker's reactor. Claims are event driven (NOTIFY cs_scan_work
 * when units are queued or finish) with a slow poll that also reclaims
 * units whose lease lapsed because their worker died. A unit holds a lease
 * it renews every lease/3 seconds; every write names the lease, and a write
 * that finds the lease gone makes the unit stop at once (another worker
 * owns it now), so a unit never runs twice at once.
 *
 * A unit runs the detectors that implement its checks, at most
 * scan_unit_detectors at once, collects their items, skipped checks and
 * API call counts, and ends with one write that stores the unit's outcome
 * and its items together, under the lease.
 */
#include "config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cloudsweep/aws.h"
#include "cloudsweep/log.h"
#include "scan_int.h"

#define SCAN_UNIT_MAX_ERRORS 50 /* errors kept per unit */
#define SCAN_FINISH_RETRY_S  2  /* pause before retrying a failed final write */
#define SCAN_LEASE_TOKEN_MAX 64
#define SCAN_SESSION_TRIES   5 /* credential loads tried while the database is busy */

enum scan_unit_state {
	SCAN_UNIT_SESSION,   /* the account's credentials are being loaded (and a role assumed) */
	SCAN_UNIT_RUNNING,   /* detectors run (or are about to start) */
	SCAN_UNIT_FINISHING, /* the final write is in flight (or waits to be retried) */
	SCAN_UNIT_DONE,      /* written, or given up; freed once the stack unwinds */
};

enum scan_unit_event {
	SCAN_UNIT_EV_KICK,           /* start more detectors, or finish when all are done */
	SCAN_UNIT_EV_SESSION_OK,     /* credentials are ready: start the detectors */
	SCAN_UNIT_EV_SESSION_FAILED, /* no credentials: the unit fails with the reason */
	SCAN_UNIT_EV_SESSION_RETRY,  /* the database was busy: load the credentials again */
	SCAN_UNIT_EV_HEARTBEAT,      /* time to renew the lease */
	SCAN_UNIT_EV_HEARTBEAT_OK,   /* the lease was renewed */
	SCAN_UNIT_EV_LEASE_LOST,     /* a write found the lease taken over or the unit gone */
	SCAN_UNIT_EV_WRITTEN,        /* the final write committed */
	SCAN_UNIT_EV_WRITE_FAILED,   /* the final write failed; retry while the lease lasts */
	SCAN_UNIT_EV_STOP,           /* the worker stops */
};

struct scan_unit {
	struct scan_unit *next, *prev; /* the executor's list */
	enum scan_unit_state state;
	char id[37], scan_id[37], org_id[37], account_id[37];
	char region[32];
	char lease[SCAN_LEASE_TOKEN_MAX]; /* the lease owner token of this claim */
	json_t *settings;                 /* owned; the scan's thresholds */
	json_t *checks;                   /* owned; requested check names, or NULL for all */
	struct scan_detector_run *runs;   /* owned; one per detector to run */
	size_t nruns, next_run;
	int in_flight;              /* runs started and not done */
	struct event *ev_heartbeat; /* owned; renews the lease */
	struct event *ev_kick;      /* owned; advances after the caller's stack unwinds */
	struct db_query *q;         /* the pending heartbeat or final write, or NULL */
	bool q_is_heartbeat;        /* which one q is */
	long long api_calls;
	json_t *items;                       /* owned; [{type, resource_id, details, cost}] */
	json_t *errors;                      /* owned; [{check, code, message}] */
	bool skipped;                        /* a check was skipped: the unit ends partial */
	bool run_failed;                     /* a detector failed: the unit ends partial */
	bool no_session;                     /* no credentials: the unit ends failed */
	int session_tries;                   /* credential loads started */
	struct scan_session *session;        /* the pending session, or NULL */
	struct aws_owned_credentials *creds; /* owned; wiped in scan_unit_free */
	struct aws_credentials view;         /* borrowed view of creds the runs sign with */
	int pending_ev;                      /* the event ev_kick delivers */
};

struct scan_exec {
	struct db_subscription *sub; /* cs_scan_work */
	struct event *ev_poll;       /* owned; slow poll for queued and lapsed units */
	struct event *ev_claim;      /* owned; coalesces claim requests */
	struct db_query *q_claim;    /* the claim in flight, or NULL */
	bool claim_again;            /* a request arrived while a claim was in flight */
	struct scan_unit *units;     /* owned list of units this worker runs */
	int nunits;
	bool running;
};

static struct scan_exec ex;

static void scan_unit_advance(struct scan_unit *u, enum scan_unit_event ev);
static void scan_unit_open_session(struct scan_unit *u);
static void scan_exec_claim_soon(void);

/* ---- reporting from detectors ---- */

bool scan_run_wants(const struct scan_detector_run *run, const char *check)
{
	size_t i;
	const json_t *c;

	if (run->unit->checks == NULL)
		return true;
	json_array_foreach (run->unit->checks, i, c)
		if (strcmp(json_string_value(c), check) == 0)
			return true;
	return false;
}

void scan_run_api_calls(struct scan_detector_run *run, int n)
{
	if (n > 0)
		run->unit->api_calls += n;
}

static void scan_unit_error(struct scan_unit *u, const char *check, const char *code,
                            const char *message)
{
	if (json_array_size(u->errors) >= SCAN_UNIT_MAX_ERRORS)
		return;
	json_array_append_new(u->errors, json_pack("{s:s?, s:s, s:s}", "check", check, "code", code,
	                                           "message", message != NULL ? message : code));
}

int scan_run_item(struct scan_detector_run *run, const char *type, const char *resource_id,
                  json_t *details, double monthly_usd)
{
	struct scan_unit *u = run->unit;
	json_t *it;

	if ((long long)json_array_size(u->items) >= scan_g.cfg->scan_max_items_per_unit ||
	    type == NULL || resource_id == NULL || !(monthly_usd >= 0)) {
		json_decref(details);
		return -1;
	}
	it = json_pack("{s:s, s:s, s:o, s:f}", "type", type, "resource_id", resource_id, "details",
	               details != NULL ? details : json_object(), "cost", monthly_usd);
	if (it == NULL)
		return -1;
	json_array_append_new(u->items, it);
	return 0;
}

void scan_run_note(struct scan_detector_run *run, const char *check, const char *code,
                   const char *message)
{
	scan_unit_error(run->unit, check, code, message);
}

void scan_run_skipped(struct scan_detector_run *run, const char *check, const char *code,
                      const char *message)
{
	run->unit->skipped = true;
	scan_unit_error(run->unit, check, code, message);
}

/* Deliver ev to u from the event loop, after the caller's stack has unwound. */
static void scan_unit_later(struct scan_unit *u, enum scan_unit_event ev)
{
	u->pending_ev = ev;
	event_active(u->ev_kick, EV_TIMEOUT, 1);
}

void scan_run_done(struct scan_detector_run *run, int status)
{
	struct scan_unit *u = run->unit;

	if (status != 0) {
		u->run_failed = true;
		scan_unit_error(u, run->det->name, "detector_failed",
		                "the detector failed; its checks did not complete");
	}
	run->det = NULL; /* done: never cancelled again */
	u->in_flight--;
	scan_unit_later(u, SCAN_UNIT_EV_KICK);
}

/* ---- one unit ---- */

static void scan_unit_kick_cb(evutil_socket_t fd, short what, void *arg)
{
	struct scan_unit *u = arg;

	scan_unit_advance(u, (enum scan_unit_event)u->pending_ev);
}

static void scan_unit_heartbeat_cb(evutil_socket_t fd, short what, void *arg)
{
	scan_unit_advance(arg, SCAN_UNIT_EV_HEARTBEAT);
}

static void scan_unit_db_cb(void *arg, enum db_event ev, const PGresult *res)
{
	struct scan_unit *u = arg;
	bool hb = u->q_is_heartbeat;
	bool hit = ev == DB_OK && PQntuples(res) == 1 && !PQgetisnull(res, 0, 0) &&
	           strcmp(PQgetvalue(res, 0, 0), "0") != 0;

	u->q = NULL;
	if (ev != DB_OK) {
		if (ev == DB_ERROR)
			log_warnx("scan_unit_write", "unit %s: %s", u->id,
			          PQresultErrorMessage(res));
		/* A heartbeat that fails is retried by the next one; the lease is still ours. */
		if (!hb)
			scan_unit_advance(u, SCAN_UNIT_EV_WRITE_FAILED);
		return;
	}
	if (!hit) {
		scan_unit_advance(u, SCAN_UNIT_EV_LEASE_LOST);
		return;
	}
	scan_unit_advance(u, hb ? SCAN_UNIT_EV_HEARTBEAT_OK : SCAN_UNIT_EV_WRITTEN);
}

static void scan_unit_free(struct scan_unit *u)
{
	size_t i;

	for (i = 0; i < u->nruns; i++) {
		struct scan_detector_run *run = &u->runs[i];

		if (run->det != NULL && i < u->next_run && run->det->cancel != NULL)
			run->det->cancel(run);
	}
	if (u->q != NULL)
		db_query_cancel(u->q);
	if (u->session != NULL)
		scan_session_cancel(u->session);
	if (u->creds != NULL) {
		aws_owned_credentials_clear(u->creds);
		free(u->creds);
	}
	if (u->prev != NULL)
		u->prev->next = u->next;
	else if (ex.units == u)
		ex.units = u->next;
	if (u->next != NULL)
		u->next->prev = u->prev;
	ex.nunits--;
	event_free(u->ev_heartbeat);
	event_free(u->ev_kick);
	json_decref(u->settings);
	json_decref(u->checks);
	json_decref(u->items);
	json_decref(u->errors);
	free(u->runs);
	free(u);
}

/* The one way a unit ends: cancel its work, forget it, and let the worker claim more. */
static void scan_unit_close(struct scan_unit *u, const char *reason)
{
	log_debug("scan_unit_closed", "unit %s of scan %s: %s", u->id, u->scan_id, reason);
	u->state = SCAN_UNIT_DONE;
	scan_unit_free(u);
	scan_exec_claim_soon();
}

static void scan_unit_arm_heartbeat(struct scan_unit *u)
{
	long long ms = scan_g.cfg->scan_lease_s * 1000 / 3;
	struct timeval tv = { (time_t)(ms / 1000), (suseconds_t)((ms % 1000) * 1000) };

	evtimer_add(u->ev_heartbeat, &tv);
}

static void scan_unit_send_heartbeat(struct scan_unit *u)
{
	char lease_s[24], calls[24];
	const char *p[4] = { u->id, u->lease, lease_s, calls };

	snprintf(lease_s, sizeof(lease_s), "%lld", scan_g.cfg->scan_lease_s);
	snprintf(calls, sizeof(calls), "%lld", u->api_calls);
	u->q_is_heartbeat = true;
	u->q = db_query_prepared(scan_g.pool, "scan_unit_heartbeat", 4, p, scan_unit_db_cb, u);
	if (u->q == NULL)
		log_warnx("scan_unit_heartbeat", "unit %s: the database is unavailable", u->id);
}

static void scan_unit_send_finish(struct scan_unit *u)
{
	char calls[24], nitems[24];
	char *errors = json_dumps(u->errors, JSON_COMPACT);
	char *items = json_dumps(u->items, JSON_COMPACT);
	const char *status = u->no_session                 ? "failed"
	                     : u->skipped || u->run_failed ? "partial"
	                                                   : "succeeded";
	const char *p[7] = { u->id, u->lease, status, calls, nitems, errors, items };

	snprintf(calls, sizeof(calls), "%lld", u->api_calls);
	snprintf(nitems, sizeof(nitems), "%zu", json_array_size(u->items));
	u->q_is_heartbeat = false;
	u->q = errors != NULL && items != NULL
	           ? db_query_prepared(scan_g.pool, "scan_unit_finish", 7, p, scan_unit_db_cb, u)
	           : NULL;
	free(errors);
	free(items);
	if (u->q == NULL)
		scan_unit_later(u, SCAN_UNIT_EV_WRITE_FAILED);
}

/* Start detectors up to the per-unit bound; true when every run has finished. */
static bool scan_unit_start_runs(struct scan_unit *u)
{
	while (u->next_run < u->nruns && u->in_flight < scan_g.cfg->scan_unit_detectors) {
		struct scan_detector_run *run = &u->runs[u->next_run++];

		u->in_flight++;
		if (run->det->start(run) == -1) {
			const char *const *c;

			for (c = run->det->checks; *c != NULL; c++)
				if (scan_run_wants(run, *c))
					scan_run_skipped(run, *c, "not_started",
					                 "the check could not be started");
			run->det = NULL;
			u->in_flight--;
		}
	}
	return u->next_run == u->nruns && u->in_flight == 0;
}

/* The unit's one transition function. */
static void scan_unit_advance(struct scan_unit *u, enum scan_unit_event ev)
{
	switch (ev) {
	case SCAN_UNIT_EV_STOP:
		scan_unit_close(u, "worker stopping");
		return;
	case SCAN_UNIT_EV_LEASE_LOST:
		log_warnx("scan_unit_lease_lost", "unit %s of scan %s: lease taken over; stopping",
		          u->id, u->scan_id);
		scan_unit_close(u, "lease lost");
		return;
	case SCAN_UNIT_EV_HEARTBEAT:
		if (u->q == NULL)
			scan_unit_send_heartbeat(u);
		scan_unit_arm_heartbeat(u);
		return;
	case SCAN_UNIT_EV_HEARTBEAT_OK:
		if (u->state == SCAN_UNIT_FINISHING)
			scan_unit_send_finish(u); /* the final write waited for the heartbeat */
		return;
	case SCAN_UNIT_EV_SESSION_OK:
		u->state = SCAN_UNIT_RUNNING;
		scan_unit_advance(u, SCAN_UNIT_EV_KICK);
		return;
	case SCAN_UNIT_EV_SESSION_RETRY:
		if (u->state == SCAN_UNIT_SESSION)
			scan_unit_open_session(u);
		return;
	case SCAN_UNIT_EV_SESSION_FAILED:
		u->no_session = true;
		u->next_run = u->nruns; /* nothing runs without credentials */
		u->state = SCAN_UNIT_RUNNING;
		scan_unit_advance(u, SCAN_UNIT_EV_KICK);
		return;
	case SCAN_UNIT_EV_KICK:
		if (u->state != SCAN_UNIT_RUNNING)
			return;
		if (!scan_unit_start_runs(u))
			return;
		u->state = SCAN_UNIT_FINISHING;
		if (u->q == NULL)
			scan_unit_send_finish(u);
		return;
	case SCAN_UNIT_EV_WRITE_FAILED: {
		struct timeval tv = { SCAN_FINISH_RETRY_S, 0 };

		/* Retry from the heartbeat timer; the lease check decides if it is still ours. */
		evtimer_add(u->ev_heartbeat, &tv);
		return;
	}
	case SCAN_UNIT_EV_WRITTEN:
		log_debug("scan_unit_finished", "unit %s of scan %s (%s %s)", u->id, u->scan_id,
		          u->account_id, u->region);
		scan_unit_close(u, "finished");
		return;
	}
}

/* The database was busy: try again in a second while tries remain (the lease is still ours). */
static bool scan_unit_session_retry(struct scan_unit *u)
{
	struct timeval tv = { 1, 0 };

	if (u->session_tries >= SCAN_SESSION_TRIES)
		return false;
	u->pending_ev = SCAN_UNIT_EV_SESSION_RETRY;
	return event_add(u->ev_kick, &tv) == 0;
}

static void scan_unit_session_cb(void *arg, int status, const char *code, const char *message,
                                 struct aws_owned_credentials *creds)
{
	struct scan_unit *u = arg;
	size_t i;

	u->session = NULL;
	if (status != 0 && strcmp(code, "unavailable") == 0 && scan_unit_session_retry(u))
		return;
	if (status != 0) {
		log_warnx("scan_unit_session", "unit %s of scan %s: no credentials (%s)", u->id,
		          u->scan_id, code);
		scan_unit_error(u, NULL, code, message);
		scan_unit_advance(u, SCAN_UNIT_EV_SESSION_FAILED);
		return;
	}
	u->creds = creds;
	u->view = aws_owned_credentials_view(creds);
	for (i = 0; i < u->nruns; i++)
		u->runs[i].creds = &u->view;
	scan_unit_advance(u, SCAN_UNIT_EV_SESSION_OK);
}

/* Load the unit's credentials (audited under the scan's id), then run the detectors. */
static void scan_unit_open_session(struct scan_unit *u)
{
	char purpose[48];

	u->session_tries++;
	snprintf(purpose, sizeof(purpose), "scan:%s", u->scan_id);
	u->state = SCAN_UNIT_SESSION;
	u->session = scan_session_start(scan_g.pool, u->org_id, u->account_id, purpose, u->region,
	                                scan_unit_session_cb, u);
	if (u->session == NULL && scan_unit_session_retry(u))
		return;
	if (u->session == NULL) {
		scan_unit_error(u, NULL, "unavailable", "the credentials could not be loaded");
		u->no_session = true;
		u->next_run = u->nruns;
		u->state = SCAN_UNIT_RUNNING;
		scan_unit_later(u, SCAN_UNIT_EV_KICK);
	}
}

/* A claimed row: (unit_id, scan_id, org_id, aws_account_id, region, attempts, checks, settings). */
static void scan_unit_start(const PGresult *res, int row, const char *lease)
{
	struct scan_unit *u = xcalloc(1, sizeof(*u));
	json_error_t je;
	size_t i, n = 0;

	snprintf(u->id, sizeof(u->id), "%s", PQgetvalue(res, row, 0));
	snprintf(u->scan_id, sizeof(u->scan_id), "%s", PQgetvalue(res, row, 1));
	snprintf(u->org_id, sizeof(u->org_id), "%s", PQgetvalue(res, row, 2));
	snprintf(u->account_id, sizeof(u->account_id), "%s", PQgetvalue(res, row, 3));
	snprintf(u->region, sizeof(u->region), "%s", PQgetvalue(res, row, 4));
	snprintf(u->lease, sizeof(u->lease), "%s", lease);
	u->checks = PQgetisnull(res, row, 6) ? NULL : json_loads(PQgetvalue(res, row, 6), 0, &je);
	u->settings = json_loads(PQgetvalue(res, row, 7), 0, &je);
	if (u->settings == NULL)
		u->settings = json_object();
	u->items = json_array();
	u->errors = json_array();
	u->ev_heartbeat = evtimer_new(scan_g.base, scan_unit_heartbeat_cb, u);
	u->ev_kick = event_new(scan_g.base, -1, 0, scan_unit_kick_cb, u);
	if (u->ev_heartbeat == NULL || u->ev_kick == NULL)
		fatalx("scan_unit_start", "cannot create the unit's events");
	u->runs = xcalloc(scan_detectors_count + 1, sizeof(*u->runs));
	for (i = 0; i < scan_detectors_count; i++) {
		struct scan_detector_run *run = &u->runs[n];
		const char *const *c;

		run->det = &scan_detectors[i];
		run->unit = u;
		for (c = run->det->checks; c != NULL && *c != NULL; c++)
			if (scan_run_wants(run, *c))
				break;
		if (c == NULL || *c == NULL)
			continue; /* none of its checks was asked for */
		run->org_id = u->org_id;
		run->account_id = u->account_id;
		run->region = u->region;
		run->settings = u->settings;
		n++;
	}
	u->nruns = n;
	u->next = ex.units;
	if (ex.units != NULL)
		ex.units->prev = u;
	ex.units = u;
	ex.nunits++;
	u->state = SCAN_UNIT_RUNNING;
	log_debug("scan_unit_started", "unit %s of scan %s (%s %s) attempt %s lease %s", u->id,
	          u->scan_id, u->account_id, u->region, PQgetvalue(res, row, 5), u->lease);
	scan_unit_arm_heartbeat(u);
	if (u->nruns > 0) {
		scan_unit_open_session(u);
		return;
	}
	scan_unit_later(u, SCAN_UNIT_EV_KICK);
}

/* ---- claiming ---- */

struct scan_claim_arg {
	char lease[SCAN_LEASE_TOKEN_MAX];
	int want;
};

static struct scan_claim_arg claim_arg;

static void scan_exec_claim_cb(void *arg, enum db_event ev, const PGresult *res)
{
	int i, n;

	ex.q_claim = NULL;
	if (ev != DB_OK) {
		if (ev == DB_ERROR)
			log_warnx("scan_claim", "%s", PQresultErrorMessage(res));
		return; /* the poll tries again */
	}
	n = PQntuples(res);
	for (i = 0; i < n && ex.running; i++)
		scan_unit_start(res, i, claim_arg.lease);
	if (n > 0)
		log_debug("scan_claimed", "%d units (lease %s)", n, claim_arg.lease);
	if (ex.claim_again || (n == claim_arg.want && n > 0)) {
		ex.claim_again = false;
		scan_exec_claim_soon();
	}
}

static void scan_exec_claim(void)
{
	char lease_s[24], want[24], gcap[24], ocap[24], att[24], uuid[37];
	const char *p[6] = { claim_arg.lease, lease_s, want, gcap, ocap, att };
	const struct config *cfg = scan_g.cfg;
	int room = (int)cfg->scan_worker_units - ex.nunits;

	if (!ex.running || room <= 0)
		return;
	if (ex.q_claim != NULL) {
		ex.claim_again = true;
		return;
	}
	cs_uuid4(uuid);
	snprintf(claim_arg.lease, sizeof(claim_arg.lease), "%ld/%s", (long)getpid(), uuid);
	claim_arg.want = room;
	snprintf(lease_s, sizeof(lease_s), "%lld", cfg->scan_lease_s);
	snprintf(want, sizeof(want), "%d", room);
	snprintf(gcap, sizeof(gcap), "%lld", cfg->scan_max_running);
	snprintf(ocap, sizeof(ocap), "%lld", cfg->scan_max_running_per_org);
	snprintf(att, sizeof(att), "%lld", cfg->scan_max_attempts);
	ex.q_claim = db_query_prepared(scan_g.pool, "scan_claim", 6, p, scan_exec_claim_cb, NULL);
}

static void scan_exec_claim_cb_ev(evutil_socket_t fd, short what, void *arg)
{
	scan_exec_claim();
}

/* Claim from the loop, once, however many times this is asked before it runs. */
static void scan_exec_claim_soon(void)
{
	if (ex.running && ex.ev_claim != NULL)
		event_active(ex.ev_claim, EV_TIMEOUT, 1);
}

static void scan_exec_notify_cb(void *arg, const char *channel, const char *payload)
{
	scan_exec_claim_soon();
}

static void scan_exec_poll_cb(evutil_socket_t fd, short what, void *arg)
{
	scan_exec_claim_soon();
}

int scan_exec_start(void)
{
	struct db_pool *db = scan_g.pool;
	struct timeval poll = { (time_t)scan_g.cfg->scan_poll_s, 0 };

	if (db_pool_prepare(db, "scan_claim", SCAN_CLAIM_SQL, 6) == -1 ||
	    db_pool_prepare(db, "scan_unit_heartbeat", SCAN_HEARTBEAT_SQL, 4) == -1 ||
	    db_pool_prepare(db, "scan_unit_finish", SCAN_FINISH_SQL, 7) == -1)
		return -1;
	ex.running = true;
	ex.ev_claim = event_new(scan_g.base, -1, 0, scan_exec_claim_cb_ev, NULL);
	ex.ev_poll = event_new(scan_g.base, -1, EV_PERSIST, scan_exec_poll_cb, NULL);
	if (ex.ev_claim == NULL || ex.ev_poll == NULL || event_add(ex.ev_poll, &poll) == -1)
		return -1;
	ex.sub = db_subscribe(db, "cs_scan_work", scan_exec_notify_cb, NULL);
	if (ex.sub == NULL)
		return -1;
	scan_exec_claim_soon();
	return 0;
}

void scan_exec_stop(bool release)
{
	char *arr = NULL;
	size_t len = 0;
	FILE *f;

	ex.running = false;
	if (ex.sub != NULL)
		db_unsubscribe(ex.sub);
	ex.sub = NULL;
	if (ex.q_claim != NULL)
		db_query_cancel(ex.q_claim);
	ex.q_claim = NULL;
	if (release && ex.units != NULL && (f = open_memstream(&arr, &len)) != NULL) {
		struct scan_unit *u;

		fputc('{', f);
		for (u = ex.units; u != NULL; u = u->next)
			fprintf(f, "%s\"%s\"", u == ex.units ? "" : ",", u->lease);
		fputc('}', f);
		if (fclose(f) == 0) {
			/* Best effort: the units are queued again at once instead of when the lease
			 * lapses. */
			const char *p[1] = { arr };

			if (db_query(
			        scan_g.pool,
			        "UPDATE scan_units SET status = 'queued', lease_owner = NULL, "
			        "lease_expires_at = NULL, attempts = greatest(attempts - 1, 0) "
			        "WHERE status = 'running' AND lease_owner = ANY($1::text[])",
			        1, p, NULL, NULL) == NULL)
				log_warnx("scan_release",
				          "cannot hand units back; their leases will lapse");
		}
		free(arr);
	}
	while (ex.units != NULL)
		scan_unit_advance(ex.units, SCAN_UNIT_EV_STOP);
	if (ex.ev_claim != NULL)
		event_free(ex.ev_claim);
	if (ex.ev_poll != NULL)
		event_free(ex.ev_poll);
	ex.ev_claim = ex.ev_poll = NULL;
}
