/*
 * retention.c - the periodic job that keeps old rows from piling up. For
 * each organization with audit events older than audit_retention_days it
 * signs a retention anchor at the last such event (audit_anchor_sign) and
 * deletes the events up to it in batches (SQL audit_prune), so
 * GET /audit/verify, which starts from the latest anchor, stays ok. Then it
 * deletes alerts older than alert_retention_days in batches and purges the
 * rate-limit rows (ratelimit_purge). One run at a time across workers and
 * instances: a job lease row (job_lease_take), because the run is many
 * statements on pooled connections where no session lock could be held.
 */
#include "config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cloudsweep/alerts.h"
#include "cloudsweep/audit.h"
#include "cloudsweep/config.h"
#include "cloudsweep/log.h"
#include "cloudsweep/ratelimit.h"

#define RETENTION_LEASE_S 3600 /* a crashed run's lease lapses after this */

enum retention_state {
	RET_IDLE,    /* waiting for the next tick */
	RET_LEASE,   /* job_lease_take running */
	RET_ORGS,    /* listing the organizations with old events */
	RET_ANCHOR,  /* audit_anchor_sign for orgs[idx] */
	RET_PRUNE,   /* audit_prune batches for orgs[idx] */
	RET_ALERTS,  /* deleting old alerts in batches */
	RET_PURGE,   /* ratelimit_purge */
	RET_RELEASE, /* job_lease_release */
};

enum retention_event {
	RET_TICK,   /* the timer fired */
	RET_OK,     /* the pending step succeeded; res or count tell more */
	RET_FAILED, /* the pending step failed */
};

static struct {
	struct db_pool *pool;    /* borrowed */
	struct ratelimit *rl;    /* owned; only for ratelimit_purge */
	struct event *ev;        /* owned; the job timer */
	struct db_query *q;      /* pending query, or NULL */
	struct audit_sign *sign; /* pending anchor signing, or NULL */
	struct rl_op *purge;     /* pending purge, or NULL */
	enum retention_state state;
	long long audit_days, alert_days;
	char holder[128];
	char before[40];  /* the cut-off as RFC 3339 */
	char (*orgs)[37]; /* owned; organizations to prune */
	int norgs, idx;
	long long pruned, alerts_deleted;
	bool no_key_logged;
} ret_g;

static void retention_advance(enum retention_event ev, const PGresult *res, long long count);

static void retention_db_cb(void *arg, enum db_event ev, const PGresult *res)
{
	ret_g.q = NULL;
	if (ev != DB_OK) {
		log_warnx("retention_failed", "%s",
		          res != NULL ? PQresultErrorMessage(res) : "database unavailable");
		retention_advance(RET_FAILED, res, 0);
		return;
	}
	retention_advance(RET_OK, res, 0);
}

static void retention_sign_cb(void *arg, int status, int nsigned)
{
	ret_g.sign = NULL;
	retention_advance(status == 0 ? RET_OK : RET_FAILED, NULL, nsigned);
}

static void retention_purge_cb(void *arg, int status, long long count)
{
	ret_g.purge = NULL;
	retention_advance(status == 0 ? RET_OK : RET_FAILED, NULL, count);
}

static void retention_query(enum retention_state next, const char *sql, int n, const char *const *p)
{
	ret_g.state = next;
	ret_g.q = db_query(ret_g.pool, sql, n, p, retention_db_cb, NULL);
	if (ret_g.q == NULL)
		ret_g.state = RET_IDLE; /* the database is down: the lease lapses, try next tick */
}

static void retention_release(void)
{
	const char *p[2] = { "retention", ret_g.holder };

	log_info("retention_done", "pruned %lld audit events of %d organizations, %lld alerts",
	         ret_g.pruned, ret_g.norgs, ret_g.alerts_deleted);
	retention_query(RET_RELEASE, "SELECT job_lease_release($1, $2)", 2, p);
}

static void retention_alerts_batch(void)
{
	char days[24], lim[16];
	const char *p[2] = { days, lim };

	snprintf(days, sizeof(days), "%lld", ret_g.alert_days);
	snprintf(lim, sizeof(lim), "%d", RETENTION_BATCH);
	retention_query(RET_ALERTS,
	                "WITH d AS (DELETE FROM security_alerts WHERE id IN (SELECT id FROM "
	                "security_alerts WHERE created_at < clock_timestamp() - make_interval("
	                "days => $1::int) LIMIT $2::int) RETURNING 1) SELECT count(*) FROM d",
	                2, p);
}

/* Anchor the next organization, or go on to the alerts after the last. */
static void retention_next_org(void)
{
	if (ret_g.idx >= ret_g.norgs) {
		retention_alerts_batch();
		return;
	}
	ret_g.state = RET_ANCHOR;
	ret_g.sign = audit_anchor_sign(ret_g.pool, ret_g.orgs[ret_g.idx], ret_g.before,
	                               retention_sign_cb, NULL);
	if (ret_g.sign == NULL) {
		if (!ret_g.no_key_logged)
			log_warnx("retention_no_anchor",
			          "audit events are kept: no audit signing key "
			          "to sign retention anchors with");
		ret_g.no_key_logged = true;
		ret_g.idx = ret_g.norgs;
		retention_alerts_batch();
	}
}

static void retention_prune_batch(void)
{
	char lim[16];
	const char *p[2] = { ret_g.orgs[ret_g.idx], lim };

	snprintf(lim, sizeof(lim), "%d", RETENTION_BATCH);
	retention_query(RET_PRUNE, "SELECT audit_prune($1::uuid, $2::int)", 2, p);
}

/* The one function that moves the job. */
static void retention_advance(enum retention_event ev, const PGresult *res, long long count)
{
	if (ev == RET_FAILED && ret_g.state != RET_IDLE) {
		if (ret_g.state == RET_RELEASE) {
			ret_g.state = RET_IDLE;
			return;
		}
		retention_release();
		return;
	}
	switch (ret_g.state) {
	case RET_IDLE: {
		const char *p[3] = { "retention", ret_g.holder, NULL };
		char secs[16];

		if (ev != RET_TICK)
			return;
		snprintf(secs, sizeof(secs), "%d", RETENTION_LEASE_S);
		p[2] = secs;
		ret_g.pruned = ret_g.alerts_deleted = 0;
		ret_g.norgs = ret_g.idx = 0;
		retention_query(RET_LEASE, "SELECT job_lease_take($1, $2, $3::int)", 3, p);
		return;
	}
	case RET_LEASE: {
		char days[24], lim[16];
		const char *p[2] = { days, lim };

		if (PQntuples(res) != 1 || strcmp(PQgetvalue(res, 0, 0), "t") != 0) {
			ret_g.state = RET_IDLE; /* another worker or instance runs it */
			return;
		}
		snprintf(days, sizeof(days), "%lld", ret_g.audit_days);
		snprintf(lim, sizeof(lim), "%d", RETENTION_ORGS_MAX);
		retention_query(
		    RET_ORGS,
		    "WITH b AS (SELECT clock_timestamp() - make_interval(days => "
		    "$1::int) AS t) SELECT audit_rfc3339(b.t), o.org_id FROM b LEFT JOIN "
		    "LATERAL (SELECT h.org_id FROM audit_chain_heads h WHERE EXISTS ("
		    "SELECT 1 FROM audit_events e WHERE e.org_id = h.org_id AND "
		    "e.occurred_at < b.t) LIMIT $2::int) o ON true",
		    2, p);
		return;
	}
	case RET_ORGS:
		if (PQntuples(res) < 1) {
			retention_release();
			return;
		}
		snprintf(ret_g.before, sizeof(ret_g.before), "%s", PQgetvalue(res, 0, 0));
		free(ret_g.orgs);
		ret_g.orgs = xcalloc((size_t)PQntuples(res), sizeof(*ret_g.orgs));
		for (int i = 0; i < PQntuples(res); i++)
			if (!PQgetisnull(res, i, 1))
				snprintf(ret_g.orgs[ret_g.norgs++], 37, "%s",
				         PQgetvalue(res, i, 1));
		retention_next_org();
		return;
	case RET_ANCHOR:
		if (count == 0) { /* nothing before the cut-off after all */
			ret_g.idx++;
			retention_next_org();
			return;
		}
		retention_prune_batch();
		return;
	case RET_PRUNE: {
		long long n = PQntuples(res) == 1 ? atoll(PQgetvalue(res, 0, 0)) : 0;

		ret_g.pruned += n;
		if (n >= RETENTION_BATCH) {
			retention_prune_batch();
			return;
		}
		ret_g.idx++;
		retention_next_org();
		return;
	}
	case RET_ALERTS: {
		long long n = PQntuples(res) == 1 ? atoll(PQgetvalue(res, 0, 0)) : 0;

		ret_g.alerts_deleted += n;
		if (n >= RETENTION_BATCH) {
			retention_alerts_batch();
			return;
		}
		if (ret_g.rl == NULL) {
			retention_release();
			return;
		}
		ret_g.state = RET_PURGE;
		ret_g.purge = ratelimit_purge(ret_g.rl, retention_purge_cb, NULL);
		/* NULL: the callback ran already (and moved the job on). */
		return;
	}
	case RET_PURGE:
		retention_release();
		return;
	case RET_RELEASE:
		ret_g.state = RET_IDLE;
		return;
	}
}

static void retention_tick_cb(evutil_socket_t fd, short what, void *arg)
{
	retention_advance(RET_TICK, NULL, 0);
}

void retention_start(struct event_base *base, const struct config *cfg, struct db_pool *pool)
{
	struct ratelimit_config rc;
	struct timeval tv = { (time_t)cfg->retention_interval_s, 0 };
	char host[64];

	memset(&ret_g, 0, sizeof(ret_g));
	ret_g.pool = pool;
	ret_g.audit_days = cfg->audit_retention_days;
	ret_g.alert_days = cfg->alert_retention_days;
	if (gethostname(host, sizeof(host)) == -1)
		snprintf(host, sizeof(host), "unknown");
	host[sizeof(host) - 1] = '\0';
	snprintf(ret_g.holder, sizeof(ret_g.holder), "%s:%ld", host, (long)getpid());
	ratelimit_config_from(&rc, cfg, cfg->ratelimit_user_per_min);
	ret_g.rl = ratelimit_new(pool, &rc);
	ret_g.ev = event_new(base, -1, EV_PERSIST, retention_tick_cb, NULL);
	if (ret_g.rl == NULL || ret_g.ev == NULL || event_add(ret_g.ev, &tv) == -1)
		log_warnx("retention_start", "the retention job cannot run on this worker");
}

void retention_stop(void)
{
	if (ret_g.ev != NULL)
		event_free(ret_g.ev);
	if (ret_g.q != NULL)
		db_query_cancel(ret_g.q);
	if (ret_g.sign != NULL)
		audit_sign_cancel(ret_g.sign);
	if (ret_g.purge != NULL)
		ratelimit_op_cancel(ret_g.purge);
	ratelimit_free(ret_g.rl);
	free(ret_g.orgs);
	memset(&ret_g, 0, sizeof(ret_g));
}
