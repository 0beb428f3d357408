/*
 * test_ratelimit.c - TAP tests for the shared rate limiter and login IP
 * blocks. The arithmetic helpers always run; the rest needs a real
 * PostgreSQL named by CS_TEST_PGURL (skipped when unset): sql/004_ratelimit.sql
 * is applied into a schema of this run's own (selected for every pool
 * connection through PGOPTIONS), which is dropped at the end. Several pools
 * on one event loop, each with its own limiter, stand for several workers:
 * they share nothing but Postgres, as worker processes do.
 */
#include "config.h"

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <event2/event.h>
#include <jansson.h>
#include <libpq-fe.h>

#include "cloudsweep/db.h"
#include "cloudsweep/log.h"
#include "cloudsweep/ratelimit.h"
#include "cloudsweep/util.h"
#include "tap.h"

#define NWORKERS 4

static struct event_base *base;
static const char *url;
static PGconn *admin;
static char schema[64];

/* ---- driving the loop ---- */

struct waiter {
	bool (*pred)(const void *);
	const void *arg;
	uint64_t deadline;
	bool met;
};

static void waiter_cb(evutil_socket_t fd, short what, void *arg)
{
	struct waiter *w = arg;

	if (w->pred(w->arg))
		w->met = true;
	if (w->met || cs_now_ms() >= w->deadline)
		event_base_loopbreak(base);
}

/* Run the loop until pred(arg) holds or ms pass; whether it held. */
static bool wait_for(bool (*pred)(const void *), const void *arg, int ms)
{
	struct waiter w = { .pred = pred, .arg = arg, .deadline = cs_now_ms() + (uint64_t)ms };
	struct timeval tick = { 0, 1000 };
	struct event *ev;

	if (pred(arg))
		return true;
	ev = event_new(base, -1, EV_PERSIST, waiter_cb, &w);
	event_add(ev, &tick);
	event_base_dispatch(base);
	event_free(ev);
	return w.met || pred(arg);
}

static bool never(const void *arg)
{
	return false;
}

static void run_ms(int ms)
{
	wait_for(never, NULL, ms);
}

struct int_goal {
	const int *p;
	int want;
};

static bool int_reached(const void *arg)
{
	const struct int_goal *g = arg;

	return *g->p >= g->want;
}

static bool wait_int(const int *p, int want, int ms)
{
	struct int_goal g = { p, want };

	return wait_for(int_reached, &g, ms);
}

static bool pool_all_up(const void *arg)
{
	struct db_pool_stats st;

	db_pool_stats(arg, &st);
	return st.connected == st.size;
}

/* ---- admin connection ---- */

static char *admin_value(const char *fmt, ...) CS_PRINTF(1, 2);
static char *admin_value(const char *fmt, ...)
{
	va_list ap;
	char *sql, *v = NULL;
	PGresult *res;

	va_start(ap, fmt);
	if (vasprintf(&sql, fmt, ap) < 0)
		abort();
	va_end(ap);
	res = PQexec(admin, sql);
	if (PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) > 0)
		v = xstrdup(PQgetisnull(res, 0, 0) ? "(null)" : PQgetvalue(res, 0, 0));
	else if (PQresultStatus(res) != PGRES_TUPLES_OK)
		printf("# admin query failed: %s", PQerrorMessage(admin));
	PQclear(res);
	free(sql);
	return v;
}

static bool admin_exec(const char *fmt, ...) CS_PRINTF(1, 2);
static bool admin_exec(const char *fmt, ...)
{
	va_list ap;
	PGresult *res;
	char *sql;
	bool okay;

	va_start(ap, fmt);
	if (vasprintf(&sql, fmt, ap) < 0)
		abort();
	va_end(ap);
	res = PQexec(admin, sql);
	okay = PQresultStatus(res) == PGRES_COMMAND_OK || PQresultStatus(res) == PGRES_TUPLES_OK;
	if (!okay)
		printf("# admin command failed: %s", PQerrorMessage(admin));
	PQclear(res);
	free(sql);
	return okay;
}

static bool admin_is(const char *want, const char *fmt, ...) CS_PRINTF(2, 3);
static bool admin_is(const char *want, const char *fmt, ...)
{
	va_list ap;
	char *sql, *v;
	bool same;

	va_start(ap, fmt);
	if (vasprintf(&sql, fmt, ap) < 0)
		abort();
	va_end(ap);
	v = admin_value("%s", sql);
	same = v != NULL && strcmp(v, want) == 0;
	if (!same)
		printf("#   got '%s', want '%s'\n", v != NULL ? v : "(no value)", want);
	free(v);
	free(sql);
	return same;
}

/* ---- callbacks ---- */

struct cres {
	int calls;
	int allowed, limited, unavailable;
	enum rl_verdict last;
	int retry;
};

static void cres_cb(void *arg, enum rl_verdict v, int retry_after_s)
{
	struct cres *r = arg;

	r->calls++;
	r->last = v;
	r->retry = retry_after_s;
	if (v == RL_ALLOW)
		r->allowed++;
	else if (v == RL_LIMITED)
		r->limited++;
	else
		r->unavailable++;
}

/* One check, run to its answer. */
static enum rl_verdict check1(struct ratelimit *rl, const char *ip, const char *user,
                              const char *org, int *retry)
{
	struct rl_subject s = { ip, user, org };
	struct cres r = { 0 };

	ratelimit_check(rl, &s, cres_cb, &r);
	if (!wait_int(&r.calls, 1, 5000))
		return (enum rl_verdict) - 1;
	if (retry != NULL)
		*retry = r.retry;
	return r.last;
}

/* n sequential checks; the number allowed. */
static int check_n(struct ratelimit *rl, const char *ip, const char *user, const char *org, int n)
{
	int allowed = 0;

	for (int i = 0; i < n; i++)
		allowed += check1(rl, ip, user, org, NULL) == RL_ALLOW;
	return allowed;
}

static enum rl_verdict blocked1(struct ratelimit *rl, const char *ip, int *retry)
{
	struct cres r = { 0 };

	ratelimit_ip_blocked(rl, ip, cres_cb, &r);
	if (!wait_int(&r.calls, 1, 5000))
		return (enum rl_verdict) - 1;
	if (retry != NULL)
		*retry = r.retry;
	return r.last;
}

struct lres {
	int calls;
	int blocked;
	int new_blocks;
	int unavailable;
	int retry;
};

static void lres_cb(void *arg, enum rl_verdict v, int retry_after_s, bool new_block)
{
	struct lres *r = arg;

	r->calls++;
	r->blocked += v == RL_LIMITED;
	r->unavailable += v == RL_UNAVAILABLE;
	r->new_blocks += new_block;
	r->retry = retry_after_s;
}

struct listres {
	int calls;
	int status;
	json_t *blocks;
};

static void listres_cb(void *arg, int status, json_t *blocks)
{
	struct listres *r = arg;

	r->calls++;
	r->status = status;
	r->blocks = blocks != NULL ? json_incref(blocks) : NULL;
}

struct countres {
	int calls;
	int status;
	long long n;
};

static void countres_cb(void *arg, int status, long long n)
{
	struct countres *r = arg;

	r->calls++;
	r->status = status;
	r->n = n;
}

/* ---- tests ---- */

static void test_helpers(void)
{
	struct ratelimit_config cfg;

	is_int(ratelimit_retry_after_s(0), 1, "retry-after of 0 ms is 1 s");
	is_int(ratelimit_retry_after_s(1), 1, "1 ms rounds up to 1 s");
	is_int(ratelimit_retry_after_s(1000), 1, "1000 ms is 1 s");
	is_int(ratelimit_retry_after_s(1001), 2, "1001 ms rounds up to 2 s");
	is_int(ratelimit_retry_after_s(59999), 60, "59999 ms is 60 s");
	is_int(ratelimit_max_lease(10), 1, "10-token burst: lease 1 (every request asks Postgres)");
	is_int(ratelimit_max_lease(5), 1, "tiny burst: lease 1");
	is_int(ratelimit_max_lease(50), 5, "50-token burst: lease 5");
	is_int(ratelimit_max_lease(100000), RL_LEASE_CAP, "lease capped");
	ratelimit_config_defaults(&cfg);
	ok(cfg.anon_rate_per_min == 10 && cfg.user_rate_per_min == 100 &&
	       cfg.block_threshold == 5 && cfg.block_window_s == 300 && cfg.block_duration_s == 900,
	   "defaults: 10/min anonymous, 100/min user, 5 failures in 5 min block 15 min");
}

static struct ratelimit *new_rl(struct db_pool *pool, double anon, double anon_burst, double user,
                                double user_burst, double global, double global_burst)
{
	struct ratelimit_config cfg;

	ratelimit_config_defaults(&cfg);
	cfg.anon_rate_per_min = anon;
	cfg.anon_burst = anon_burst;
	cfg.user_rate_per_min = user;
	cfg.user_burst = user_burst;
	cfg.global_rate_per_min = global;
	cfg.global_burst = global_burst;
	return ratelimit_new(pool, &cfg);
}

static void test_config(struct db_pool *pool)
{
	struct ratelimit_config cfg;
	struct rl_org_override bad = { "org", -5, 0 };

	ratelimit_config_defaults(&cfg);
	cfg.anon_rate_per_min = -1;
	ok(ratelimit_new(pool, &cfg) == NULL, "negative rate refused");
	ratelimit_config_defaults(&cfg);
	cfg.user_burst = 0.5;
	ok(ratelimit_new(pool, &cfg) == NULL, "burst below one token refused");
	ratelimit_config_defaults(&cfg);
	cfg.orgs = &bad;
	cfg.norgs = 1;
	ok(ratelimit_new(pool, &cfg) == NULL, "bad org override refused");
	ratelimit_config_defaults(&cfg);
	cfg.block_threshold = 0;
	ok(ratelimit_new(pool, &cfg) == NULL, "block threshold 0 refused");
}

static void test_bucket(struct db_pool *pool)
{
	struct ratelimit *rl = new_rl(pool, 60, 3, 6, 1, 0, 0);
	int retry = 0;
	enum rl_verdict v;

	ok(rl != NULL, "limiter: 60/min burst 3 anonymous, 6/min burst 1 per user");
	ok(check_n(rl, "10.1.0.1", NULL, NULL, 3) == 3, "burst of 3 admitted");
	v = check1(rl, "10.1.0.1", NULL, NULL, &retry);
	ok(v == RL_LIMITED && retry == 1, "4th limited, Retry-After 1 (got %d, %d)", v, retry);
	ok(check1(rl, "10.1.0.2", NULL, NULL, NULL) == RL_ALLOW,
	   "another address has its own bucket");
	run_ms(1100);
	ok(check1(rl, "10.1.0.1", NULL, NULL, NULL) == RL_ALLOW, "one token back after 1.1 s");
	v = check1(rl, "10.1.0.1", NULL, NULL, &retry);
	ok(v == RL_LIMITED && retry == 1, "and only one");
	run_ms(2100);
	ok(check_n(rl, "10.1.0.1", NULL, NULL, 3) == 2,
	   "2.1 s later: two tokens (refill at 1/s, not back to the burst)");

	ok(check1(rl, "10.1.0.1", "user-a", NULL, NULL) == RL_ALLOW,
	   "authenticated: charged to the user, not the address");
	v = check1(rl, "10.1.0.9", "user-a", NULL, &retry);
	ok(v == RL_LIMITED && retry == 10,
	   "user at 6/min: second request limited, Retry-After 10 (got %d)", retry);

	ok(check1(rl, "2001:db8:1:2::1", NULL, NULL, NULL) == RL_ALLOW &&
	       check_n(rl, "2001:db8:1:2:ffff::7", NULL, NULL, 3) == 2,
	   "IPv6 addresses of one /64 share a bucket");
	ok(admin_is("1", "SELECT count(*) FROM rate_buckets WHERE key = 'ip:2001:db8:1:2::/64'"),
	   "the /64 is the key");
	v = check1(rl, "not-an-ip", NULL, NULL, &retry);
	ok(v == RL_UNAVAILABLE && retry == RL_UNAVAILABLE_RETRY_S, "garbage address refused");
	ratelimit_free(rl);
}

static void test_retry_sql(void)
{
	char *v;
	int ms;

	ok(admin_is("1", "SELECT granted FROM rl_take('sql:r', 6, 1, 1)"), "SQL: one token");
	v = admin_value("SELECT granted || ' ' || retry_after_ms FROM rl_take('sql:r', 6, 1, 1)");
	ok(v != NULL && sscanf(v, "0 %d", &ms) == 1 && ms > 9900 && ms <= 10000,
	   "SQL: none left; next in ~10 s at 6/min (%s)", v != NULL ? v : "?");
	free(v);
	ok(admin_is("5", "SELECT granted FROM rl_take('sql:w', 60, 5, 8)"),
	   "SQL: a lease of 8 from a burst of 5 grants 5");
	ok(!admin_exec("SELECT * FROM rl_take('sql:x', 0, 5, 1)"), "SQL: zero rate refused");
	ok(!admin_exec("SELECT * FROM rl_take('sql:x', 10, 0.5, 1)"), "SQL: burst < 1 refused");
}

static void test_org_and_global(struct db_pool *pool)
{
	struct rl_org_override gold = { "org-gold", 1000, 0 };
	struct ratelimit_config cfg;
	struct ratelimit *rl;
	int retry = 0, n;
	enum rl_verdict v;

	ratelimit_config_defaults(&cfg);
	cfg.user_rate_per_min = 5;
	cfg.global_rate_per_min = 0;
	cfg.orgs = &gold;
	cfg.norgs = 1;
	rl = ratelimit_new(pool, &cfg);
	ok(rl != NULL, "limiter with an org override (1000/min over 5/min)");
	ok(check_n(rl, "10.2.0.1", "u-plain", "org-plain", 8) == 5,
	   "user of an ordinary org: 5 of 8");
	ok(check_n(rl, "10.2.0.1", "u-gold", "org-gold", 40) == 40,
	   "user of the gold org: 40 of 40");
	ratelimit_free(rl);

	rl = new_rl(pool, 1000, 0, 1000, 0, 60, 3);
	ok(rl != NULL, "limiter with a global bucket of burst 3");
	n = 0;
	for (int i = 0; i < 3; i++) {
		char ip[32];

		snprintf(ip, sizeof(ip), "10.3.0.%d", i + 1);
		n += check1(rl, ip, NULL, NULL, NULL) == RL_ALLOW;
	}
	ok(n == 3, "three addresses admitted");
	v = check1(rl, "10.3.0.9", NULL, NULL, &retry);
	ok(v == RL_LIMITED && retry == 1, "a fourth address hits the global bucket");
	ratelimit_free(rl);
	admin_exec("DELETE FROM rate_buckets WHERE key = 'global'");
}

/* ---- many workers hammering one key ---- */

struct hammer {
	struct ratelimit *rl;
	struct rl_subject s;
	int inflight;
	int allowed, limited, unavailable;
	bool stop;
};

static void hammer_cb(void *arg, enum rl_verdict v, int retry_after_s);

static void hammer_fire(struct hammer *h)
{
	/* Bounded per tick: locally cached denials answer synchronously. */
	for (int n = 0; n < 8 && !h->stop && h->inflight < 8; n++) {
		h->inflight++;
		ratelimit_check(h->rl, &h->s, hammer_cb, h);
	}
}

static void hammer_cb(void *arg, enum rl_verdict v, int retry_after_s)
{
	struct hammer *h = arg;

	h->inflight--;
	h->allowed += v == RL_ALLOW;
	h->limited += v == RL_LIMITED;
	h->unavailable += v == RL_UNAVAILABLE;
}

static void hammer_tick(evutil_socket_t fd, short what, void *arg)
{
	struct hammer *hs = arg;

	for (int i = 0; i < NWORKERS; i++)
		hammer_fire(&hs[i]);
}

static bool hammer_drained(const void *arg)
{
	const struct hammer *hs = arg;

	for (int i = 0; i < NWORKERS; i++)
		if (hs[i].inflight > 0)
			return false;
	return true;
}

/*
 * NWORKERS limiters, each on its own pool, keep 8 checks each in flight on
 * one key for ms milliseconds (a limited check is retried at once, as a
 * client hammering would). Returns the total admitted; *elapsed_s the time.
 */
static int hammer(struct db_pool **pools, double rate, double burst, const char *ip,
                  const char *user, int ms, double *elapsed_s, int *unavailable)
{
	struct hammer hs[NWORKERS];
	struct timeval tick = { 0, 200 };
	struct event *ev;
	uint64_t t0;
	int total = 0;

	memset(hs, 0, sizeof(hs));
	for (int i = 0; i < NWORKERS; i++) {
		hs[i].rl = new_rl(pools[i], rate, burst, rate, burst, 0, 0);
		hs[i].s.ip = ip;
		hs[i].s.user_id = user;
	}
	ev = event_new(base, -1, EV_PERSIST, hammer_tick, hs);
	t0 = cs_now_ms();
	event_add(ev, &tick);
	run_ms(ms);
	for (int i = 0; i < NWORKERS; i++)
		hs[i].stop = true;
	event_free(ev);
	wait_for(hammer_drained, hs, 5000);
	*elapsed_s = (double)(cs_now_ms() - t0) / 1000;
	*unavailable = 0;
	for (int i = 0; i < NWORKERS; i++) {
		printf("#   worker %d: %d admitted, %d limited\n", i, hs[i].allowed, hs[i].limited);
		total += hs[i].allowed;
		*unavailable += hs[i].unavailable;
		ratelimit_free(hs[i].rl);
	}
	return total;
}

static void test_workers(struct db_pool **pools)
{
	double t, bound;
	int n, unav;

	/* 600/min = 10/s, burst 50: leases of up to 5 per worker. */
	n = hammer(pools, 600, 50, "10.4.0.1", "hammered-user", 2000, &t, &unav);
	bound = 50 + 10 * t + NWORKERS * ratelimit_max_lease(50);
	ok(unav == 0, "no check unavailable");
	ok(n >= 50 && n <= bound,
	   "%d workers, %.2f s on one 600/min burst-50 key: %d admitted, <= %.0f (burst + rate*t + "
	   "workers*lease), not %d workers' worth",
	   NWORKERS, t, n, bound, NWORKERS);

	/* The anonymous default: 10/min, lease 1, every request asks Postgres. */
	n = hammer(pools, 10, 10, "10.4.0.2", NULL, 1500, &t, &unav);
	bound = 10 + 10 * t / 60 + NWORKERS * ratelimit_max_lease(10);
	ok(unav == 0 && n >= 10 && n <= bound,
	   "%d workers on one 10/min address: %d admitted, <= %.1f (%d unavailable)", NWORKERS, n,
	   bound, unav);
}

static void test_coalescing(struct db_pool *pool)
{
	struct ratelimit *rl = new_rl(pool, 600, 100, 600, 100, 0, 0);
	struct rl_subject s = { "10.5.0.1", NULL, NULL };
	struct cres r = { 0 };
	int pending = 0;

	for (int i = 0; i < 6; i++)
		pending += ratelimit_check(rl, &s, cres_cb, &r) != NULL;
	ok(pending == 6 && r.calls == 0, "six concurrent checks of a new key all wait");
	ok(wait_int(&r.calls, 6, 3000) && r.allowed == 6, "all six admitted");
	/* The first check asked for 1; the five that queued behind it for a lease sized to the
	 * demand seen (6): two queries, not six, and one token left in the lease. */
	ok(admin_is("93", "SELECT floor(tokens) FROM rate_buckets WHERE key = 'ip:10.5.0.1'"),
	   "served by two queries (1 + a lease of 6: bucket at 93), not six");
	memset(&r, 0, sizeof(r));
	ok(ratelimit_check(rl, &s, cres_cb, &r) == NULL && r.calls == 1 && r.last == RL_ALLOW,
	   "a later check within the lease is answered at once, from the lease");
	ratelimit_free(rl);
}

static void test_unavailable(void)
{
	struct db_pool *dead =
	    db_pool_new(base, "host=/nonexistent/cs_rl port=1 dbname=x", 1, 1000);
	struct rl_subject s = { "10.6.0.1", NULL, NULL };
	struct ratelimit *rl;
	struct cres r = { 0 }, b = { 0 };
	struct lres l = { 0 };
	struct listres lr = { 0 };

	ok(dead != NULL, "a pool to nowhere");
	run_ms(50);
	rl = new_rl(dead, 10, 0, 100, 0, 100, 0);
	ok(rl != NULL, "limiter on it");
	ok(ratelimit_check(rl, &s, cres_cb, &r) == NULL && r.calls == 1 &&
	       r.last == RL_UNAVAILABLE && r.retry == RL_UNAVAILABLE_RETRY_S,
	   "check: RL_UNAVAILABLE at once (fail closed, 503)");
	ok(ratelimit_ip_blocked(rl, "10.6.0.1", cres_cb, &b) == NULL && b.calls == 1 &&
	       b.last == RL_UNAVAILABLE,
	   "ip_blocked: RL_UNAVAILABLE");
	ok(ratelimit_login_failed(rl, "10.6.0.1", lres_cb, &l) == NULL && l.calls == 1 &&
	       l.unavailable == 1,
	   "login_failed: RL_UNAVAILABLE");
	ok(ratelimit_blocks_list(rl, listres_cb, &lr) == NULL && lr.calls == 1 && lr.status == -1,
	   "blocks_list: -1");
	ratelimit_free(rl);
	db_pool_free(dead);
}

struct lfire {
	struct ratelimit *rl;
	struct lres r;
};

static void test_login_blocks(struct db_pool **pools)
{
	struct ratelimit_config cfg;
	struct ratelimit *rls[NWORKERS];
	struct lfire lf[NWORKERS];
	struct lres l = { 0 };
	struct listres lr = { 0 };
	struct countres cr = { 0 };
	int calls, blocks, news, retry = 0;
	json_t *it;
	size_t idx;
	bool found = false;

	ratelimit_config_defaults(&cfg);
	cfg.block_duration_s = 2;
	for (int i = 0; i < NWORKERS; i++)
		rls[i] = ratelimit_new(pools[i], &cfg);

	ok(blocked1(rls[0], "10.7.0.1", NULL) == RL_ALLOW, "a fresh address is not blocked");
	for (int i = 0; i < 4; i++)
		ratelimit_login_failed(rls[i % NWORKERS], "10.7.0.1", lres_cb, &l);
	ok(wait_int(&l.calls, 4, 3000) && l.blocked == 0 && l.new_blocks == 0,
	   "four failures: no block");

	/* Every worker records 3 failures of another address at the same moment. */
	memset(lf, 0, sizeof(lf));
	for (int k = 0; k < 3; k++)
		for (int i = 0; i < NWORKERS; i++)
			ratelimit_login_failed(rls[i], "10.7.0.2", lres_cb, &lf[i].r);
	calls = 0;
	for (uint64_t end = cs_now_ms() + 5000; cs_now_ms() < end;) {
		calls = 0;
		for (int i = 0; i < NWORKERS; i++)
			calls += lf[i].r.calls;
		if (calls == 3 * NWORKERS)
			break;
		run_ms(5);
	}
	blocks = news = 0;
	for (int i = 0; i < NWORKERS; i++) {
		blocks += lf[i].r.blocked;
		news += lf[i].r.new_blocks;
	}
	ok(calls == 3 * NWORKERS, "%d concurrent failures recorded", calls);
	ok(news == 1, "exactly one call created the block (%d)", news);
	ok(blocks == 3 * NWORKERS - 4, "the 5th and later failures report the block (%d)", blocks);
	ok(admin_is("1", "SELECT count(*) FROM ip_blocks WHERE ip = '10.7.0.2'"),
	   "exactly one block row");
	ok(admin_is("5", "SELECT failures FROM ip_blocks WHERE ip = '10.7.0.2'"),
	   "recorded with the 5 failures that triggered it");
	for (int i = 0; i < NWORKERS; i++) {
		enum rl_verdict v = blocked1(rls[i], "10.7.0.2", &retry);

		ok(v == RL_LIMITED && retry >= 1 && retry <= 2,
		   "worker %d sees the block (%d s left)", i, retry);
	}
	ok(ratelimit_blocks_list(rls[1], listres_cb, &lr) != NULL && wait_int(&lr.calls, 1, 3000) &&
	       lr.status == 0 && json_is_array(lr.blocks),
	   "block list answered");
	json_array_foreach (lr.blocks, idx, it) {
		if (strcmp(json_string_value(json_object_get(it, "ip")) ?: "", "10.7.0.2") == 0 &&
		    json_is_string(json_object_get(it, "expires_at")) &&
		    json_integer_value(json_object_get(it, "failures")) == 5 &&
		    strcmp(json_string_value(json_object_get(it, "reason")) ?: "",
		           "too_many_failed_logins") == 0)
			found = true;
	}
	ok(found, "the block is listed for admins");
	json_decref(lr.blocks);

	run_ms(2200);
	for (int i = 0; i < NWORKERS; i++)
		ok(blocked1(rls[i], "10.7.0.2", NULL) == RL_ALLOW,
		   "worker %d: the block lifted by itself after 2 s", i);
	memset(&l, 0, sizeof(l));
	ratelimit_login_failed(rls[0], "10.7.0.2", lres_cb, &l);
	ok(wait_int(&l.calls, 1, 3000) && l.blocked == 0,
	   "a failure after the block does not re-block at once (earlier failures spent)");

	/* Administrator's unblock, seen within the cache bound. */
	cfg.block_threshold = 1;
	cfg.block_duration_s = 600;
	ratelimit_free(rls[0]);
	rls[0] = ratelimit_new(pools[0], &cfg);
	memset(&l, 0, sizeof(l));
	ratelimit_login_failed(rls[0], "10.7.0.3", lres_cb, &l);
	ok(wait_int(&l.calls, 1, 3000) && l.new_blocks == 1 && l.retry > 590,
	   "threshold 1: blocked for 600 s");
	ok(blocked1(rls[1], "10.7.0.3", NULL) == RL_LIMITED, "another worker sees it");
	ok(ratelimit_unblock(rls[0], "10.7.0.3", countres_cb, &cr) != NULL &&
	       wait_int(&cr.calls, 1, 3000) && cr.status == 0 && cr.n == 1,
	   "unblocked by an administrator");
	run_ms(RL_BLOCK_CACHE_MS + 50);
	ok(blocked1(rls[1], "10.7.0.3", NULL) == RL_ALLOW, "seen within the cache bound");

	memset(&cr, 0, sizeof(cr));
	ok(ratelimit_purge(rls[0], countres_cb, &cr) != NULL && wait_int(&cr.calls, 1, 3000) &&
	       cr.status == 0,
	   "purge runs (%lld rows)", cr.n);
	for (int i = 0; i < NWORKERS; i++)
		ratelimit_free(rls[i]);
}

static void test_cancel(struct db_pool *pool)
{
	struct ratelimit *rl = new_rl(pool, 10, 0, 100, 0, 1000, 0);
	struct rl_subject s = { "10.8.0.1", NULL, NULL };
	struct cres r = { 0 }, b = { 0 }, f = { 0 };
	struct lres l = { 0 };
	struct listres lr = { 0 };
	struct countres cr = { 0 };
	struct rl_check *c1, *c2, *c3;
	struct rl_op *o1, *o2, *o3;

	c1 = ratelimit_check(rl, &s, cres_cb, &r);
	c2 = ratelimit_check(rl, &s, cres_cb, &r);
	c3 = ratelimit_ip_blocked(rl, "10.8.0.1", cres_cb, &b);
	o1 = ratelimit_login_failed(rl, "10.8.0.2", lres_cb, &l);
	o2 = ratelimit_blocks_list(rl, listres_cb, &lr);
	o3 = ratelimit_purge(rl, countres_cb, &cr);
	ok(c1 != NULL && c2 != NULL && c3 != NULL && o1 != NULL && o2 != NULL && o3 != NULL,
	   "six operations pending");
	ratelimit_check_cancel(c2);
	ratelimit_check_cancel(c1);
	ratelimit_check_cancel(c3);
	ratelimit_op_cancel(o1);
	ratelimit_op_cancel(o2);
	ratelimit_op_cancel(o3);
	run_ms(300);
	ok(r.calls == 0 && b.calls == 0 && l.calls == 0 && lr.calls == 0 && cr.calls == 0,
	   "cancelled operations never call back");
	ok(check1(rl, "10.8.0.1", NULL, NULL, NULL) == RL_ALLOW, "the limiter works afterwards");

	/* Freeing answers what is pending. */
	ok(ratelimit_check(rl, &(struct rl_subject){ "10.8.0.3", NULL, NULL }, cres_cb, &f) != NULL,
	   "a check pending");
	ratelimit_free(rl);
	ok(f.calls == 1 && f.last == RL_UNAVAILABLE, "freeing the limiter answers it unavailable");
	run_ms(200);
	ok(f.calls == 1, "and only once");
}

/* A callback that frees the limiter it came from. */
struct freer {
	struct ratelimit *rl;
	int calls;
};

static void freer_cb(void *arg, enum rl_verdict v, int retry_after_s)
{
	struct freer *fr = arg;

	fr->calls++;
	if (fr->rl != NULL) {
		ratelimit_free(fr->rl);
		fr->rl = NULL;
	}
}

static void test_free_from_cb(struct db_pool *pool)
{
	struct rl_subject s = { "10.8.1.1", NULL, NULL };
	struct freer fr = { 0 };
	struct cres r = { 0 };

	fr.rl = new_rl(pool, 600, 100, 600, 100, 0, 0);
	ratelimit_check(fr.rl, &s, freer_cb, &fr);
	ratelimit_check(fr.rl, &s, cres_cb, &r);
	ok(wait_int(&fr.calls, 1, 3000) && fr.rl == NULL, "limiter freed from its own callback");
	ok(wait_int(&r.calls, 1, 1000) && r.calls == 1, "the other waiter still answered once (%d)",
	   r.last);
}

static bool apply_sql(void)
{
	char *sql;
	PGresult *res;
	bool okay;

	sql = cs_read_file(SRCDIR "/sql/004_ratelimit.sql", 1 << 20, NULL);
	if (sql == NULL)
		return false;
	res = PQexec(admin, sql);
	okay = PQresultStatus(res) == PGRES_COMMAND_OK;
	if (!okay)
		printf("# applying 004_ratelimit.sql: %s", PQerrorMessage(admin));
	PQclear(res);
	free(sql);
	return okay;
}

static void db_tests(void)
{
	const char *const keys[] = { "dbname", "application_name", NULL };
	const char *vals[] = { url, "cs_test_ratelimit_admin", NULL };
	struct db_pool *pools[NWORKERS];
	char opts[128];
	bool up = true;

	admin = PQconnectdbParams(keys, vals, 1);
	if (PQstatus(admin) != CONNECTION_OK) {
		ok(0, "admin connection: %s", PQerrorMessage(admin));
		PQfinish(admin);
		return;
	}
	admin_exec("SET client_min_messages = warning");
	snprintf(schema, sizeof(schema), "cs_test_rl_%ld_%ld", (long)getpid(), (long)time(NULL));
	ok(admin_exec("CREATE SCHEMA %s", schema) && admin_exec("SET search_path = %s", schema),
	   "test schema created");
	ok(apply_sql(), "004_ratelimit.sql applied into it");
	snprintf(opts, sizeof(opts), "-c search_path=%s", schema);
	setenv("PGOPTIONS", opts, 1);

	base = event_base_new();
	for (int i = 0; i < NWORKERS; i++)
		pools[i] = db_pool_new(base, url, 2, 5000);
	for (int i = 0; i < NWORKERS; i++)
		up = up && pools[i] != NULL && wait_for(pool_all_up, pools[i], 5000);
	ok(up, "%d pools (workers) up", NWORKERS);

	test_config(pools[0]);
	test_bucket(pools[0]);
	test_retry_sql();
	test_org_and_global(pools[0]);
	test_coalescing(pools[1]);
	test_workers(pools);
	test_unavailable();
	test_login_blocks(pools);
	test_cancel(pools[2]);
	test_free_from_cb(pools[3]);

	for (int i = 0; i < NWORKERS; i++)
		db_pool_free(pools[i]);
	run_ms(10);
	event_base_free(base);
	ok(admin_exec("RESET search_path") && admin_exec("DROP SCHEMA %s CASCADE", schema),
	   "test schema dropped");
	PQfinish(admin);
}

int main(void)
{
	uint64_t t0 = cs_now_ms();

	log_set_role("test_ratelimit", -1);
	log_set_level(getenv("CS_TEST_VERBOSE") != NULL ? LOG_LVL_DEBUG : LOG_LVL_FATAL);
	test_helpers();
	url = getenv("CS_TEST_PGURL");
	if (url == NULL || *url == '\0') {
		printf("# CS_TEST_PGURL not set: database tests skipped\n");
		return tap_done();
	}
	db_tests();
	printf("# finished in %llu ms\n", (unsigned long long)(cs_now_ms() - t0));
	return tap_done();
}
