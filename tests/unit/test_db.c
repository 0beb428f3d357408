/*
 * test_db.c - TAP tests for the asynchronous PostgreSQL pool and the
 * migration runner against a real server named by CS_TEST_PGURL (skipped
 * when unset). Everything runs in a schema of its own (selected for the
 * pool's connections through PGOPTIONS) that is dropped at the end, and the
 * pool's connections carry an application_name of their own (PGAPPNAME) so
 * a separate admin connection can terminate exactly them. The event loop
 * is driven with a short polling timer until a condition holds or a
 * deadline passes; nothing sleeps longer than it has to.
 */
#include "config.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <event2/event.h>
#include <libpq-fe.h>

#include "cloudsweep/db.h"
#include "cloudsweep/log.h"
#include "cloudsweep/util.h"
#include "tap.h"

static struct event_base *base;
static const char *url;
static PGconn *admin;
static char schema[64];
static char appname[64];
static char chan[64];
static int seq; /* order in which callbacks ran */

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
	struct timeval tick = { 0, 2000 };
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

/* Run until *p >= want. */
static bool wait_int(const int *p, int want, int ms)
{
	struct int_goal g = { p, want };

	return wait_for(int_reached, &g, ms);
}

static bool pool_is_ready(const void *arg)
{
	return db_pool_ready(arg);
}

static bool pool_all_up(const void *arg)
{
	struct db_pool_stats st;

	db_pool_stats(arg, &st);
	return st.connected == st.size;
}

/* ---- query results ---- */

struct res {
	int calls;
	enum db_event ev;
	int order;
	int ntuples;
	bool isnull;
	char val[256];
	char sqlstate[8];
};

static void res_cb(void *arg, enum db_event ev, const PGresult *pr)
{
	struct res *r = arg;
	const char *state;

	r->calls++;
	r->ev = ev;
	r->order = ++seq;
	if (pr != NULL && ev == DB_OK) {
		r->ntuples = PQntuples(pr);
		if (r->ntuples > 0 && PQnfields(pr) > 0) {
			r->isnull = PQgetisnull(pr, 0, 0);
			snprintf(r->val, sizeof(r->val), "%s", PQgetvalue(pr, 0, 0));
		}
	}
	if (pr != NULL && ev == DB_ERROR) {
		state = PQresultErrorField(pr, PG_DIAG_SQLSTATE);
		snprintf(r->sqlstate, sizeof(r->sqlstate), "%s", state != NULL ? state : "");
	}
}

/* Run one query on pool to completion; its result in *r. */
static bool run_query(struct db_pool *pool, struct res *r, const char *sql, int n,
                      const char *const *params)
{
	memset(r, 0, sizeof(*r));
	if (db_query(pool, sql, n, params, res_cb, r) == NULL)
		return false;
	return wait_int(&r->calls, 1, 3000);
}

/* The first value of an admin query (caller frees), or NULL. */
static char *admin_value(const char *sql)
{
	PGresult *res = PQexec(admin, sql);
	char *v = NULL;

	if (PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) > 0)
		v = xstrdup(PQgetvalue(res, 0, 0));
	else if (PQresultStatus(res) != PGRES_TUPLES_OK)
		printf("# admin query failed: %s", PQerrorMessage(admin));
	PQclear(res);
	return v;
}

static bool admin_exec(const char *sql)
{
	PGresult *res = PQexec(admin, sql);
	bool okay =
	    PQresultStatus(res) == PGRES_COMMAND_OK || PQresultStatus(res) == PGRES_TUPLES_OK;

	if (!okay)
		printf("# admin command failed: %s", PQerrorMessage(admin));
	PQclear(res);
	return okay;
}

/* Terminate every backend of the pools under test; how many. */
static int kill_pool_backends(void)
{
	char sql[256], *v;
	int n;

	snprintf(sql, sizeof(sql),
	         "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
	         "WHERE pid <> pg_backend_pid() AND application_name = '%s'",
	         appname);
	v = admin_value(sql);
	n = v != NULL ? atoi(v) : -1;
	free(v);
	return n;
}

/* ---- tests ---- */

static void test_basic(struct db_pool *pool)
{
	struct db_pool_stats st;
	struct res r;

	ok(wait_for(pool_is_ready, pool, 5000), "pool becomes ready");
	ok(wait_for(pool_all_up, pool, 5000), "every pool connection comes up");
	db_pool_stats(pool, &st);
	is_int(st.size, 2, "stats: size");
	is_int(st.connected, 2, "stats: connected");
	is_int(st.waiting, 0, "stats: nothing waiting");

	ok(run_query(pool, &r, "SELECT 1 + 1", 0, NULL), "simple query answered");
	is_int(r.ev, DB_OK, "simple query: DB_OK");
	is_str(r.val, "2", "simple query: value");

	ok(run_query(pool, &r, "SELEC 1", 0, NULL), "syntax error answered");
	is_int(r.ev, DB_ERROR, "syntax error: DB_ERROR");
	is_str(r.sqlstate, "42601", "syntax error: SQLSTATE 42601");
}

static const char *const inject = "'; DROP TABLE items; --";
static const char *const weird = "Robert'); DROP TABLE students;-- \"\\ $1 %s \xc3\xa9\xe2\x82\xac";

static void test_params(struct db_pool *pool)
{
	const char *p[2];
	char *heap[2];
	struct res r;

	ok(run_query(pool, &r, "CREATE TABLE items (id int PRIMARY KEY, v text)", 0, NULL) &&
	       r.ev == DB_OK,
	   "create table");

	/* Parameters are copied: free them right after queueing. */
	heap[0] = xstrdup("1");
	heap[1] = xstrdup(inject);
	memset(&r, 0, sizeof(r));
	ok(db_query(pool, "INSERT INTO items (id, v) VALUES ($1, $2)", 2, (const char *const *)heap,
	            res_cb, &r) != NULL,
	   "insert queued");
	free(heap[0]);
	free(heap[1]);
	ok(wait_int(&r.calls, 1, 3000) && r.ev == DB_OK, "insert of an injection string");

	p[0] = "2";
	p[1] = NULL;
	ok(run_query(pool, &r, "INSERT INTO items (id, v) VALUES ($1, $2)", 2, p) && r.ev == DB_OK,
	   "insert of a NULL parameter");
	p[0] = "3";
	p[1] = weird;
	ok(run_query(pool, &r, "INSERT INTO items (id, v) VALUES ($1, $2)", 2, p) && r.ev == DB_OK,
	   "insert of quotes, backslashes and UTF-8");

	p[0] = "1";
	ok(run_query(pool, &r, "SELECT v FROM items WHERE id = $1", 1, p), "select id 1");
	is_str(r.val, inject, "injection string read back verbatim");
	p[0] = "2";
	ok(run_query(pool, &r, "SELECT v FROM items WHERE id = $1", 1, p), "select id 2");
	ok(r.ev == DB_OK && r.ntuples == 1 && r.isnull, "NULL read back as NULL");
	p[0] = "3";
	ok(run_query(pool, &r, "SELECT v FROM items WHERE id = $1", 1, p), "select id 3");
	is_str(r.val, weird, "quotes, backslashes and UTF-8 read back verbatim");
	p[0] = inject;
	ok(run_query(pool, &r, "SELECT $1::text", 1, p) && r.ev == DB_OK, "injection as a value");
	is_str(r.val, inject, "value echoed verbatim");
	ok(run_query(pool, &r, "SELECT count(*) FROM items", 0, NULL), "count rows");
	is_str(r.val, "3", "the table survived with its three rows");
}

/*
 * A query whose implicit transaction fails at commit (a deferred constraint)
 * reports the error, not the rows it returned before its Sync.
 */
static void test_commit_error(struct db_pool *pool)
{
	struct res r;

	ok(run_query(pool, &r,
	             "CREATE TABLE deferred (id int UNIQUE DEFERRABLE INITIALLY DEFERRED)", 0,
	             NULL) &&
	       r.ev == DB_OK,
	   "table with a deferred constraint");
	ok(run_query(pool, &r, "INSERT INTO deferred VALUES (1), (1) RETURNING id", 0, NULL),
	   "insert violating it answered");
	is_int(r.ev, DB_ERROR, "deferred violation at commit: DB_ERROR");
	is_str(r.sqlstate, "23505", "deferred violation: SQLSTATE 23505");
	ok(run_query(pool, &r, "SELECT count(*) FROM deferred", 0, NULL) && r.ev == DB_OK &&
	       strcmp(r.val, "0") == 0,
	   "nothing committed");
	ok(run_query(pool, &r, "INSERT INTO deferred VALUES (2) RETURNING id", 0, NULL) &&
	       r.ev == DB_OK && strcmp(r.val, "2") == 0,
	   "the connection carries on");
}

static void test_prepared(struct db_pool *pool)
{
	const char *p[1];
	struct res r;

	is_int(db_pool_prepare(pool, "item_v", "SELECT v FROM items WHERE id = $1", 1), 0,
	       "register a statement on live connections");
	is_int(db_pool_prepare(pool, "item_v", "SELECT 1", 0), -1, "duplicate name refused");
	p[0] = "1";
	memset(&r, 0, sizeof(r));
	ok(db_query_prepared(pool, "item_v", 1, p, res_cb, &r) != NULL, "prepared query queued");
	ok(wait_int(&r.calls, 1, 3000) && r.ev == DB_OK, "prepared query: DB_OK");
	is_str(r.val, inject, "prepared query: value");
	p[0] = NULL;
	memset(&r, 0, sizeof(r));
	db_query_prepared(pool, "item_v", 1, p, res_cb, &r);
	ok(wait_int(&r.calls, 1, 3000) && r.ev == DB_OK && r.ntuples == 0,
	   "prepared query with a NULL parameter: no rows");
	memset(&r, 0, sizeof(r));
	db_query_prepared(pool, "no_such_stmt", 0, NULL, res_cb, &r);
	ok(wait_int(&r.calls, 1, 3000) && r.ev == DB_ERROR, "unknown statement: DB_ERROR");
	is_str(r.sqlstate, "26000", "unknown statement: SQLSTATE 26000");
}

/*
 * Reads registered with db_pool_prepare_read share one Sync per loop pass
 * (one implicit transaction: the same transaction_timestamp()); a failing
 * one fails alone, the ones the server skipped after it run again, and
 * plain queries, transactions and cancellations mix with them safely.
 */
static void test_batch(struct db_pool *pool)
{
	static const char *const divs[] = { "1", "0", "2", "5" };
	static const char *const want[] = { "10", "", "5", "2" };
	struct res r[6], w;
	const char *p[2];
	struct db_tx *tx;
	bool same = true, ordered = true;

	is_int(db_pool_prepare_read(pool, "rd_ts", "SELECT transaction_timestamp()::text", 0), 0,
	       "read-only statement registered");
	is_int(db_pool_prepare_read(pool, "rd_div", "SELECT 10 / $1::int", 1), 0,
	       "second read-only statement registered");
	run_ms(50);

	memset(r, 0, sizeof(r));
	for (int i = 0; i < 5; i++)
		db_query_prepared(pool, "rd_ts", 0, NULL, res_cb, &r[i]);
	for (int i = 0; i < 5; i++)
		if (!wait_int(&r[i].calls, 1, 3000) || r[i].ev != DB_OK)
			same = false;
	for (int i = 1; i < 5; i++) {
		same = same && strcmp(r[i].val, r[0].val) == 0;
		ordered = ordered && r[i].order > r[i - 1].order;
	}
	ok(same, "five reads of one pass share one transaction (one Sync)");
	ok(ordered, "batched reads answer in order");

	memset(r, 0, sizeof(r));
	for (int i = 0; i < 4; i++) {
		p[0] = divs[i];
		db_query_prepared(pool, "rd_div", 1, p, res_cb, &r[i]);
	}
	for (int i = 0; i < 4; i++)
		wait_int(&r[i].calls, 1, 3000);
	ok(r[0].ev == DB_OK && strcmp(r[0].val, want[0]) == 0, "read before the failing one: ok");
	ok(r[1].ev == DB_ERROR && strcmp(r[1].sqlstate, "22012") == 0 && r[1].calls == 1,
	   "the failing read fails alone (22012)");
	ok(r[2].ev == DB_OK && strcmp(r[2].val, want[2]) == 0 && r[2].calls == 1 &&
	       r[3].ev == DB_OK && strcmp(r[3].val, want[3]) == 0 && r[3].calls == 1,
	   "the reads skipped after it run again and answer once");

	/* A plain write closing a batch whose read fails: skipped, run again, applied once. */
	memset(r, 0, sizeof(r));
	memset(&w, 0, sizeof(w));
	p[0] = "0";
	db_query_prepared(pool, "rd_div", 1, p, res_cb, &r[0]);
	p[0] = "900";
	p[1] = "batched write";
	db_query(pool, "INSERT INTO items (id, v) VALUES ($1, $2) RETURNING v", 2, p, res_cb, &w);
	ok(wait_int(&w.calls, 1, 3000) && w.ev == DB_OK && strcmp(w.val, "batched write") == 0 &&
	       r[0].ev == DB_ERROR,
	   "a write after a failing read in its batch: ok");
	ok(run_query(pool, &r[1], "SELECT count(*) FROM items WHERE id = 900", 0, NULL) &&
	       strcmp(r[1].val, "1") == 0,
	   "the write applied exactly once");

	/* Reads, then a transaction on the same connection in the same pass. */
	memset(r, 0, sizeof(r));
	memset(&w, 0, sizeof(w));
	db_query_prepared(pool, "rd_ts", 0, NULL, res_cb, &r[0]);
	db_query_prepared(pool, "rd_ts", 0, NULL, res_cb, &r[1]);
	tx = db_tx_begin(pool, NULL, NULL);
	p[0] = "901";
	p[1] = "in a transaction";
	db_tx_query(tx, "INSERT INTO items (id, v) VALUES ($1, $2)", 2, p, NULL, NULL);
	db_tx_query(tx, "SELECT transaction_timestamp()::text", 0, NULL, res_cb, &r[2]);
	db_tx_commit(tx, res_cb, &w);
	ok(wait_int(&w.calls, 1, 3000) && w.ev == DB_OK && r[0].ev == DB_OK && r[1].ev == DB_OK &&
	       r[2].ev == DB_OK,
	   "a transaction after batched reads on one connection commits");
	ok(strcmp(r[0].val, r[1].val) == 0 && strcmp(r[2].val, r[0].val) != 0,
	   "the transaction is not part of the batch");

	/* Cancelled batched reads never call back; the others answer. */
	memset(r, 0, sizeof(r));
	struct db_query *c1, *c2;
	db_query_prepared(pool, "rd_ts", 0, NULL, res_cb, &r[0]);
	c1 = db_query_prepared(pool, "rd_ts", 0, NULL, res_cb, &r[1]);
	p[0] = "0";
	db_query_prepared(pool, "rd_div", 1, p, res_cb, &r[2]);
	p[0] = "10";
	c2 = db_query_prepared(pool, "rd_div", 1, p, res_cb, &r[3]);
	db_query_prepared(pool, "rd_ts", 0, NULL, res_cb, &r[4]);
	db_query_cancel(c1);
	db_query_cancel(c2); /* skipped by the failure, then dropped instead of run again */
	ok(wait_int(&r[4].calls, 1, 3000) && r[0].calls == 1 && r[2].calls == 1 && r[4].ev == DB_OK,
	   "the reads left answer");
	run_ms(50);
	ok(r[1].calls == 0 && r[3].calls == 0, "cancelled batched reads never call back");
}

/* With several connections, the reads of one pass still gather on one open batch. */
static void test_batch_affinity(struct db_pool *pool)
{
	struct res r[6];
	bool same = true;

	is_int(db_pool_prepare_read(pool, "rd_ts2", "SELECT transaction_timestamp()::text", 0), 0,
	       "read-only statement registered on a two-connection pool");
	run_ms(50);
	memset(r, 0, sizeof(r));
	for (int i = 0; i < 6; i++)
		db_query_prepared(pool, "rd_ts2", 0, NULL, res_cb, &r[i]);
	for (int i = 0; i < 6; i++)
		same = same && wait_int(&r[i].calls, 1, 3000) && r[i].ev == DB_OK &&
		       strcmp(r[i].val, r[0].val) == 0;
	ok(same, "six reads of one pass on two connections share one batch");
}

#define NPIPE 200

static void test_pipeline(struct db_pool *pool)
{
	static struct res r[NPIPE];
	struct db_pool_stats st;
	char num[16];
	const char *p[1] = { num };
	int done = 0, right = 0, queued = 0;
	uint64_t t0 = cs_now_ms();

	memset(r, 0, sizeof(r));
	for (int i = 0; i < NPIPE; i++) {
		snprintf(num, sizeof(num), "%d", i);
		if (db_query(pool, "SELECT $1::int * 2", 1, p, res_cb, &r[i]) != NULL)
			queued++;
	}
	is_int(queued, NPIPE, "%d queries queued", NPIPE);
	db_pool_stats(pool, &st);
	ok(st.waiting > 0, "beyond the in-flight cap, queries wait (%d)", st.waiting);
	ok(st.in_use == 2, "both connections in use");
	for (int i = 0; i < NPIPE; i++) {
		if (!wait_int(&r[i].calls, 1, 5000))
			break;
		done++;
		snprintf(num, sizeof(num), "%d", i * 2);
		if (r[i].ev == DB_OK && strcmp(r[i].val, num) == 0)
			right++;
	}
	is_int(done, NPIPE, "all %d pipelined queries answered", NPIPE);
	is_int(right, NPIPE, "every answer matches its query");
	db_pool_stats(pool, &st);
	is_int(st.waiting, 0, "queue drained");
	printf("# %d queries in %llu ms\n", NPIPE, (unsigned long long)(cs_now_ms() - t0));
}

static void test_pipeline_error(struct db_pool *p1)
{
	struct res a, b, c, d, e;

	memset(&a, 0, sizeof(a));
	memset(&b, 0, sizeof(b));
	memset(&c, 0, sizeof(c));
	memset(&d, 0, sizeof(d));
	memset(&e, 0, sizeof(e));
	ok(wait_for(pool_is_ready, p1, 5000), "single-connection pool ready");
	db_query(p1, "SELECT 1", 0, NULL, res_cb, &a);
	db_query(p1, "SELECT 1/0", 0, NULL, res_cb, &b);
	db_query(p1, "SELECT 3", 0, NULL, res_cb, &c);
	db_query(p1, "SELECT * FROM no_such_table", 0, NULL, res_cb, &d);
	db_query(p1, "SELECT 5", 0, NULL, res_cb, &e);
	ok(wait_int(&e.calls, 1, 3000), "pipeline with failures answered");
	ok(a.ev == DB_OK && strcmp(a.val, "1") == 0, "query before the failure succeeds");
	ok(b.ev == DB_ERROR && strcmp(b.sqlstate, "22012") == 0, "division by zero: 22012");
	ok(c.ev == DB_OK && strcmp(c.val, "3") == 0, "query after the failure succeeds");
	ok(d.ev == DB_ERROR && strcmp(d.sqlstate, "42P01") == 0, "missing table: 42P01");
	ok(e.ev == DB_OK && strcmp(e.val, "5") == 0, "last query succeeds");
	ok(a.order < b.order && b.order < c.order && c.order < d.order && d.order < e.order,
	   "callbacks in pipeline order");
}

/* A statement registered while the only connection is pinned is prepared after the tx. */
static void test_prepare_late(struct db_pool *p1)
{
	const char *p[1] = { "41" };
	struct res rb, rq, rc, r;
	struct db_tx *tx;

	memset(&rb, 0, sizeof(rb));
	tx = db_tx_begin(p1, res_cb, &rb);
	ok(tx != NULL && wait_int(&rb.calls, 1, 3000) && rb.ev == DB_OK,
	   "tx pins the only connection");
	is_int(db_pool_prepare(p1, "late_stmt", "SELECT $1::int + 1", 1), 0,
	       "register a statement while pinned");
	memset(&rq, 0, sizeof(rq));
	db_tx_query(tx, "SELECT 1", 0, NULL, res_cb, &rq);
	memset(&rc, 0, sizeof(rc));
	db_tx_commit(tx, res_cb, &rc);
	ok(wait_int(&rc.calls, 1, 3000) && rq.ev == DB_OK && rc.ev == DB_OK,
	   "tx unaffected by the registration");
	memset(&r, 0, sizeof(r));
	db_query_prepared(p1, "late_stmt", 1, p, res_cb, &r);
	ok(wait_int(&r.calls, 1, 3000) && r.ev == DB_OK && strcmp(r.val, "42") == 0,
	   "late statement prepared once the connection is free");
}

static void test_tx(struct db_pool *pool)
{
	struct res rb, rq, rc, r, rb2, rx;
	struct db_pool_stats st;
	struct db_tx *tx, *tx2;

	/* Commit. */
	memset(&rb, 0, sizeof(rb));
	tx = db_tx_begin(pool, res_cb, &rb);
	ok(tx != NULL && wait_int(&rb.calls, 1, 3000) && rb.ev == DB_OK, "begin: DB_OK");
	memset(&rq, 0, sizeof(rq));
	db_tx_query(tx, "INSERT INTO items (id, v) VALUES (10, 'tx')", 0, NULL, res_cb, &rq);
	ok(wait_int(&rq.calls, 1, 3000) && rq.ev == DB_OK, "insert in tx");
	ok(run_query(pool, &r, "SELECT count(*) FROM items WHERE id = 10", 0, NULL) &&
	       strcmp(r.val, "0") == 0,
	   "uncommitted row invisible to another connection (tx pins its own)");
	memset(&rc, 0, sizeof(rc));
	db_tx_commit(tx, res_cb, &rc);
	ok(wait_int(&rc.calls, 1, 3000) && rc.ev == DB_OK, "commit: DB_OK");
	ok(run_query(pool, &r, "SELECT count(*) FROM items WHERE id = 10", 0, NULL) &&
	       strcmp(r.val, "1") == 0,
	   "committed row visible");

	/* Rollback. */
	memset(&rb, 0, sizeof(rb));
	tx = db_tx_begin(pool, res_cb, &rb);
	ok(tx != NULL && wait_int(&rb.calls, 1, 3000) && rb.ev == DB_OK, "second begin");
	memset(&rq, 0, sizeof(rq));
	db_tx_query(tx, "INSERT INTO items (id, v) VALUES (11, 'rolled back')", 0, NULL, res_cb,
	            &rq);
	ok(wait_int(&rq.calls, 1, 3000) && rq.ev == DB_OK, "insert in second tx");
	db_tx_rollback(tx);
	ok(run_query(pool, &r, "SELECT count(*) FROM items WHERE id = 11", 0, NULL) &&
	       strcmp(r.val, "0") == 0,
	   "rolled-back row absent");

	/* A failed statement aborts the tx; COMMIT then reports the rollback. */
	memset(&rb, 0, sizeof(rb));
	tx = db_tx_begin(pool, res_cb, &rb);
	/* Queued before BEGIN answered: held until it succeeds. */
	memset(&rq, 0, sizeof(rq));
	db_tx_query(tx, "SELECT 1/0", 0, NULL, res_cb, &rq);
	memset(&r, 0, sizeof(r));
	db_tx_query(tx, "SELECT 1", 0, NULL, res_cb, &r);
	memset(&rc, 0, sizeof(rc));
	db_tx_commit(tx, res_cb, &rc);
	ok(db_tx_query(tx, "SELECT 1", 0, NULL, res_cb, &r) == NULL, "no queries after commit");
	ok(wait_int(&rc.calls, 1, 3000), "aborted tx: commit answered");
	ok(rb.ev == DB_OK && rb.order < rq.order, "begin answered first");
	ok(rq.ev == DB_ERROR && strcmp(rq.sqlstate, "22012") == 0, "failing statement in tx");
	ok(r.ev == DB_ERROR && strcmp(r.sqlstate, "25P02") == 0, "next statement: 25P02");
	ok(rc.ev == DB_ERROR, "commit of an aborted tx: DB_ERROR");

	/* Rollback before BEGIN completes: the begin callback never runs. */
	memset(&rb, 0, sizeof(rb));
	tx = db_tx_begin(pool, res_cb, &rb);
	db_tx_rollback(tx);
	ok(run_query(pool, &r, "SELECT 7", 0, NULL) && r.ev == DB_OK,
	   "pool fine after early rollback");
	run_ms(20);
	is_int(rb.calls, 0, "begin callback of a rolled-back tx never runs");

	/* Two open transactions pin both connections: a plain query waits. */
	memset(&rb, 0, sizeof(rb));
	memset(&rb2, 0, sizeof(rb2));
	tx = db_tx_begin(pool, res_cb, &rb);
	tx2 = db_tx_begin(pool, res_cb, &rb2);
	ok(wait_int(&rb.calls, 1, 3000) && wait_int(&rb2.calls, 1, 3000) && rb.ev == DB_OK &&
	       rb2.ev == DB_OK,
	   "two transactions open");
	memset(&rx, 0, sizeof(rx));
	db_query(pool, "SELECT 42", 0, NULL, res_cb, &rx);
	run_ms(20);
	db_pool_stats(pool, &st);
	ok(rx.calls == 0 && st.waiting == 1, "plain query waits while all connections are pinned");
	memset(&rc, 0, sizeof(rc));
	db_tx_commit(tx, res_cb, &rc);
	ok(wait_int(&rx.calls, 1, 3000) && rx.ev == DB_OK && strcmp(rx.val, "42") == 0,
	   "waiting query runs once a transaction ends");
	ok(rc.calls == 1 && rc.ev == DB_OK, "empty commit: DB_OK");
	db_tx_rollback(tx2);
}

static struct db_query *victim;

static void cancel_other_cb(void *arg, enum db_event ev, const PGresult *pr)
{
	res_cb(arg, ev, pr);
	db_query_cancel(victim);
}

#define NCANCEL 80

static void test_cancel(struct db_pool *p1)
{
	static struct res many[NCANCEL];
	static struct db_query *hq[NCANCEL];
	struct res a, b, x, y, z;
	struct db_query *q;
	int cancelled_calls = 0, kept_calls = 0;

	memset(&a, 0, sizeof(a));
	memset(&b, 0, sizeof(b));
	q = db_query(p1, "SELECT pg_sleep(0.05)", 0, NULL, res_cb, &a);
	ok(q != NULL, "query to cancel queued");
	db_query_cancel(q);
	db_query(p1, "SELECT 2", 0, NULL, res_cb, &b);
	ok(wait_int(&b.calls, 1, 3000) && b.ev == DB_OK, "query after a cancelled one answered");
	is_int(a.calls, 0, "cancelled in-flight query: callback never runs");

	/* A callback cancels a later query in the same pipeline. */
	memset(&x, 0, sizeof(x));
	memset(&y, 0, sizeof(y));
	memset(&z, 0, sizeof(z));
	db_query(p1, "SELECT 1", 0, NULL, cancel_other_cb, &x);
	victim = db_query(p1, "SELECT 2", 0, NULL, res_cb, &y);
	db_query(p1, "SELECT 3", 0, NULL, res_cb, &z);
	ok(wait_int(&z.calls, 1, 3000) && z.ev == DB_OK, "pipeline after in-callback cancel");
	ok(x.calls == 1 && y.calls == 0, "query cancelled from another callback never called back");

	/* Cancel queued (not yet sent) queries. */
	memset(many, 0, sizeof(many));
	for (int i = 0; i < NCANCEL; i++)
		hq[i] = db_query(p1, "SELECT 1", 0, NULL, res_cb, &many[i]);
	for (int i = 1; i < NCANCEL; i += 2)
		db_query_cancel(hq[i]);
	ok(wait_int(&many[NCANCEL - 2].calls, 1, 3000), "kept queries answered");
	run_ms(10);
	for (int i = 0; i < NCANCEL; i++) {
		if (i % 2)
			cancelled_calls += many[i].calls;
		else
			kept_calls += many[i].calls;
	}
	is_int(kept_calls, NCANCEL / 2, "every kept query called back once");
	is_int(cancelled_calls, 0, "no cancelled query called back");
}

struct sub_rec {
	int count;
	bool chan_ok;
	char last[128];
	struct db_subscription *self; /* set to unsubscribe on first delivery */
};

static void notify_cb(void *arg, const char *channel, const char *payload)
{
	struct sub_rec *s = arg;

	s->count++;
	s->chan_ok = strcmp(channel, chan) == 0;
	snprintf(s->last, sizeof(s->last), "%s", payload);
	if (s->self != NULL) {
		db_unsubscribe(s->self);
		s->self = NULL;
	}
}

struct two_subs {
	const struct sub_rec *a, *b;
	const char *payload;
};

static bool both_got(const void *arg)
{
	const struct two_subs *t = arg;

	if (t->payload == NULL)
		return t->a->count > 0 && (t->b == NULL || t->b->count > 0);
	return strcmp(t->a->last, t->payload) == 0 &&
	       (t->b == NULL || strcmp(t->b->last, t->payload) == 0);
}

static void notify(struct db_pool *pool, const char *payload)
{
	const char *p[2] = { chan, payload };

	db_query(pool, "SELECT pg_notify($1, $2)", 2, p, NULL, NULL);
}

struct heard_goal {
	const struct sub_rec *a, *b;
	int a0, b0;
};

static bool both_heard(const void *arg)
{
	const struct heard_goal *g = arg;

	return g->a->count > g->a0 && (g->b == NULL || g->b->count > g->b0);
}

/* NOTIFY until a and b hear something new (the LISTEN may still be on its way). */
static bool notify_until_heard(struct db_pool *pool, const struct sub_rec *a,
                               const struct sub_rec *b)
{
	struct heard_goal g = { a, b, a->count, b != NULL ? b->count : 0 };

	for (int i = 0; i < 100; i++) {
		notify(pool, "ping");
		if (wait_for(both_heard, &g, 30))
			return true;
	}
	return false;
}

static struct sub_rec s1;
static struct db_subscription *sub1;

static void test_notify(struct db_pool *pool)
{
	static struct sub_rec s2, s3;
	struct db_subscription *sub2, *sub3;
	struct two_subs t;
	int before;
	char longname[80];

	memset(longname, 'a', 64);
	longname[64] = '\0';
	ok(db_subscribe(pool, "Bad", notify_cb, &s1) == NULL, "upper case channel refused");
	ok(db_subscribe(pool, "", notify_cb, &s1) == NULL, "empty channel refused");
	ok(db_subscribe(pool, "a\"; DROP", notify_cb, &s1) == NULL, "quote in channel refused");
	ok(db_subscribe(pool, longname, notify_cb, &s1) == NULL, "64-character channel refused");
	longname[63] = '\0';
	sub2 = db_subscribe(pool, longname, notify_cb, &s2);
	ok(sub2 != NULL, "63-character channel accepted");
	db_unsubscribe(sub2);

	sub1 = db_subscribe(pool, chan, notify_cb, &s1);
	sub2 = db_subscribe(pool, chan, notify_cb, &s2);
	sub3 = db_subscribe(pool, chan, notify_cb, &s3);
	s3.self = sub3;
	ok(sub1 != NULL && sub2 != NULL && sub3 != NULL, "three subscriptions");
	ok(notify_until_heard(pool, &s1, &s2), "both subscribers hear a notification");
	notify(pool, "final 'quoted' \xc3\xa9");
	t = (struct two_subs){ &s1, &s2, "final 'quoted' \xc3\xa9" };
	ok(wait_for(both_got, &t, 3000), "payload delivered verbatim to both");
	is_int(s1.count, s2.count, "both subscribers got every notification");
	ok(s1.chan_ok && s2.chan_ok, "channel name passed to the callback");
	is_int(s3.count, 1, "subscriber that unsubscribed in its callback got exactly one");

	db_unsubscribe(sub2);
	before = s2.count;
	notify(pool, "after");
	t = (struct two_subs){ &s1, NULL, "after" };
	ok(wait_for(both_got, &t, 3000), "remaining subscriber hears the next notification");
	is_int(s2.count, before, "unsubscribed one does not");
}

static void test_reconnect(struct db_pool *pool)
{
	struct res rb, rq, rs, rc, r;
	struct db_pool_stats st, st0;
	const char *p[1] = { "1" };
	struct db_tx *tx;
	int killed;

	db_pool_stats(pool, &st0);
	memset(&rb, 0, sizeof(rb));
	tx = db_tx_begin(pool, res_cb, &rb);
	ok(tx != NULL && wait_int(&rb.calls, 1, 3000) && rb.ev == DB_OK, "tx open before the kill");
	memset(&rq, 0, sizeof(rq));
	memset(&rs, 0, sizeof(rs));
	db_tx_query(tx, "SELECT pg_sleep(5)", 0, NULL, res_cb, &rq);
	db_query(pool, "SELECT pg_sleep(5)", 0, NULL, res_cb, &rs);
	run_ms(20);

	killed = kill_pool_backends();
	ok(killed >= 3, "server terminated the pools' connections (%d)", killed);
	ok(wait_int(&rq.calls, 1, 3000) && rq.ev == DB_UNAVAILABLE,
	   "in-flight tx query: DB_UNAVAILABLE");
	ok(wait_int(&rs.calls, 1, 3000) && rs.ev == DB_UNAVAILABLE,
	   "in-flight plain query: DB_UNAVAILABLE");
	ok(db_tx_query(tx, "SELECT 1", 0, NULL, res_cb, &r) == NULL, "dead tx refuses queries");
	memset(&rc, 0, sizeof(rc));
	db_tx_commit(tx, res_cb, &rc);
	is_int(rc.calls, 0, "commit of a dead tx does not call back synchronously");
	ok(wait_int(&rc.calls, 1, 3000) && rc.ev == DB_UNAVAILABLE,
	   "commit of a dead tx: DB_UNAVAILABLE");

	ok(wait_for(pool_all_up, pool, 5000), "connections come back");
	db_pool_stats(pool, &st);
	ok(st.reconnects >= st0.reconnects + 2, "reconnects counted (%lu)", st.reconnects);
	ok(run_query(pool, &r, "SELECT 'back'", 0, NULL) && strcmp(r.val, "back") == 0,
	   "query after reconnect");
	memset(&r, 0, sizeof(r));
	db_query_prepared(pool, "item_v", 1, p, res_cb, &r);
	ok(wait_int(&r.calls, 1, 3000) && r.ev == DB_OK && strcmp(r.val, inject) == 0,
	   "statements prepared again after reconnect");
	ok(notify_until_heard(pool, &s1, NULL), "LISTEN again after reconnect");
}

static void test_timeout(void)
{
	struct db_pool *pt;
	struct db_pool_stats st;
	struct res a, b, r;
	uint64_t t0;

	pt = db_pool_new(base, url, 1, 200);
	ok(pt != NULL && wait_for(pool_is_ready, pt, 5000), "pool with a 200 ms deadline ready");
	memset(&a, 0, sizeof(a));
	memset(&b, 0, sizeof(b));
	t0 = cs_now_ms();
	db_query(pt, "SELECT pg_sleep(2)", 0, NULL, res_cb, &a);
	run_ms(100);
	db_query(pt, "SELECT 1", 0, NULL, res_cb, &b);
	ok(wait_int(&a.calls, 1, 1500) && a.ev == DB_TIMEOUT, "slow query: DB_TIMEOUT");
	ok(cs_now_ms() - t0 < 1000, "timeout fired early (%llu ms)",
	   (unsigned long long)(cs_now_ms() - t0));
	ok(b.calls == 1 && b.ev == DB_UNAVAILABLE,
	   "query behind it on the reset connection: DB_UNAVAILABLE");
	ok(wait_for(pool_is_ready, pt, 3000), "connection reset and back");
	ok(run_query(pt, &r, "SELECT 1", 0, NULL) && r.ev == DB_OK, "query after the reset");
	db_pool_stats(pt, &st);
	is_int(st.reconnects, 1, "one reconnect after the timeout");
	db_pool_free(pt);
}

static void test_unreachable(void)
{
	struct db_pool *pu;
	struct db_pool_stats st;
	struct res r;

	ok(db_pool_new(base, "host='unterminated", 1, 0) == NULL, "unparsable conninfo refused");
	pu = db_pool_new(base, "host=127.0.0.1 port=1 dbname=x user=x", 2, 0);
	ok(pu != NULL, "pool for an unreachable server created");
	run_ms(50);
	ok(!db_pool_ready(pu), "unreachable server: not ready");
	memset(&r, 0, sizeof(r));
	ok(db_query(pu, "SELECT 1", 0, NULL, res_cb, &r) == NULL, "db_query fails fast with NULL");
	ok(db_tx_begin(pu, res_cb, &r) == NULL, "db_tx_begin fails fast with NULL");
	run_ms(10);
	is_int(r.calls, 0, "no callback for refused calls");
	db_pool_stats(pu, &st);
	is_int(st.connected, 0, "no connection up");
	db_pool_free(pu);
}

static struct db_pool *pf2;

static void free_pool_cb(void *arg, enum db_event ev, const PGresult *pr)
{
	res_cb(arg, ev, pr);
	db_pool_free(pf2);
}

static void test_free(void)
{
	struct db_pool *pf;
	struct res a, b, c, rb, rt;
	struct db_tx *tx;
	static struct sub_rec sr;

	pf = db_pool_new(base, url, 1, 0);
	ok(pf != NULL && wait_for(pool_is_ready, pf, 5000), "pool to free ready");
	memset(&a, 0, sizeof(a));
	db_query(pf, "SELECT pg_sleep(1)", 0, NULL, res_cb, &a);
	db_pool_free(pf);
	ok(a.calls == 1 && a.ev == DB_UNAVAILABLE, "db_pool_free fails pending queries first");

	/* Free the pool from inside one of its callbacks (three connections: tx, sleep, free). */
	pf2 = db_pool_new(base, url, 3, 1000);
	ok(pf2 != NULL && wait_for(pool_all_up, pf2, 5000), "second pool to free ready");
	memset(&b, 0, sizeof(b));
	memset(&c, 0, sizeof(c));
	memset(&rb, 0, sizeof(rb));
	memset(&rt, 0, sizeof(rt));
	db_subscribe(pf2, chan, notify_cb, &sr);
	tx = db_tx_begin(pf2, res_cb, &rb);
	ok(wait_int(&rb.calls, 1, 3000) && rb.ev == DB_OK, "tx on the second pool");
	db_tx_query(tx, "SELECT pg_sleep(1)", 0, NULL, res_cb, &rt);
	db_query(pf2, "SELECT pg_sleep(1)", 0, NULL, res_cb, &c);
	db_query(pf2, "SELECT 1", 0, NULL, free_pool_cb, &b);
	ok(wait_int(&b.calls, 1, 3000), "callback that frees its pool ran");
	ok(c.calls == 1 && c.ev == DB_UNAVAILABLE, "pending query failed by the free");
	ok(rt.calls == 1 && rt.ev == DB_UNAVAILABLE, "pending tx query failed by the free");
	run_ms(20);
	ok(b.calls == 1 && c.calls == 1 && rt.calls == 1, "nothing called back after the free");
}

static bool write_file(const char *dir, const char *name, const char *text)
{
	char path[512];
	FILE *f;

	snprintf(path, sizeof(path), "%s/%s", dir, name);
	f = fopen(path, "w");
	if (f == NULL)
		return false;
	fputs(text, f);
	return fclose(f) == 0;
}

static void remove_file(const char *dir, const char *name)
{
	char path[512];

	snprintf(path, sizeof(path), "%s/%s", dir, name);
	unlink(path);
}

static void test_migrate(void)
{
	char dir[] = "/tmp/cs_test_migrate_XXXXXX";
	char sql[256], *v;

	ok(mkdtemp(dir) != NULL, "temp migrations directory");
	ok(write_file(
	       dir, "001_first.sql",
	       "CREATE TABLE mig_a (id int PRIMARY KEY);\nINSERT INTO mig_a VALUES (1);\n") &&
	       write_file(
	           dir, "002_second.sql",
	           "-- comment\nCREATE TABLE mig_b (x text);\nINSERT INTO mig_a VALUES (2);\n") &&
	       write_file(dir, "README", "not a migration\n") &&
	       write_file(dir, "abc.sql", "SELECT 1/0;\n"),
	   "migration files written");
	is_int(db_migrate(url, dir), 2, "first run applies two migrations");
	is_int(db_migrate(url, dir), 0, "second run applies none");
	snprintf(sql, sizeof(sql),
	         "SELECT string_agg(version || ':' || name, ',' ORDER BY version) "
	         "FROM %s.schema_migrations",
	         schema);
	v = admin_value(sql);
	is_str(v, "001:first,002:second", "schema_migrations records both");
	free(v);
	snprintf(sql, sizeof(sql), "SELECT count(*) FROM %s.mig_a", schema);
	v = admin_value(sql);
	is_str(v, "2", "both files ran");
	free(v);

	ok(write_file(dir, "003_bad.sql", "CREATE TABLE mig_c (id int);\nSELECT 1/0;\n"),
	   "failing migration written");
	is_int(db_migrate(url, dir), -1, "failing migration: -1");
	snprintf(sql, sizeof(sql), "SELECT to_regclass('%s.mig_c') IS NULL", schema);
	v = admin_value(sql);
	is_str(v, "t", "failing migration rolled back");
	free(v);
	snprintf(sql, sizeof(sql), "SELECT count(*) FROM %s.schema_migrations", schema);
	v = admin_value(sql);
	is_str(v, "2", "failing migration not recorded");
	free(v);
	remove_file(dir, "003_bad.sql");

	ok(write_file(dir, "002_dup.sql", "SELECT 1;\n"), "duplicate version written");
	is_int(db_migrate(url, dir), -1, "duplicate version numbers: -1");
	remove_file(dir, "002_dup.sql");
	is_int(db_migrate(url, "/nonexistent/cs_migrations"), -1, "missing directory: -1");

	remove_file(dir, "001_first.sql");
	remove_file(dir, "002_second.sql");
	remove_file(dir, "README");
	remove_file(dir, "abc.sql");
	rmdir(dir);
}

int main(void)
{
	const char *const keys[] = { "dbname", "application_name", NULL };
	const char *vals[] = { NULL, "cs_test_db_admin", NULL };
	struct db_pool *pool, *p1;
	char sql[256], opts[128];
	uint64_t t0 = cs_now_ms();

	url = getenv("CS_TEST_PGURL");
	if (url == NULL || *url == '\0')
		return tap_skip_all("CS_TEST_PGURL not set");
	log_set_role("test_db", -1);
	log_set_level(getenv("CS_TEST_VERBOSE") != NULL ? LOG_LVL_DEBUG : LOG_LVL_ERROR);

	vals[0] = url;
	admin = PQconnectdbParams(keys, vals, 1);
	if (PQstatus(admin) != CONNECTION_OK) {
		ok(0, "admin connection: %s", PQerrorMessage(admin));
		PQfinish(admin);
		return tap_done();
	}
	admin_exec("SET client_min_messages = warning");
	snprintf(schema, sizeof(schema), "cs_test_%ld_%ld", (long)getpid(), (long)time(NULL));
	snprintf(appname, sizeof(appname), "cs_test_db_%ld", (long)getpid());
	snprintf(chan, sizeof(chan), "cs_test_chan_%ld", (long)getpid());
	snprintf(sql, sizeof(sql), "CREATE SCHEMA %s", schema);
	ok(admin_exec(sql), "test schema created");
	snprintf(opts, sizeof(opts), "-c search_path=%s", schema);
	setenv("PGOPTIONS", opts, 1);
	setenv("PGAPPNAME", appname, 1);

	base = event_base_new();
	pool = db_pool_new(base, url, 2, 0);
	p1 = db_pool_new(base, url, 1, 0);
	ok(pool != NULL && p1 != NULL, "pools created");

	test_basic(pool);
	test_params(pool);
	test_commit_error(pool);
	test_prepared(pool);
	test_pipeline(pool);
	test_pipeline_error(p1);
	test_prepare_late(p1);
	test_batch(p1);
	test_batch_affinity(pool);
	test_tx(pool);
	test_cancel(p1);
	test_notify(pool);
	test_reconnect(pool);
	test_timeout();
	test_unreachable();
	test_free();
	db_unsubscribe(sub1);
	db_pool_free(p1);
	db_pool_free(pool);
	run_ms(10);
	test_migrate();

	snprintf(sql, sizeof(sql), "DROP SCHEMA %s CASCADE", schema);
	ok(admin_exec(sql), "test schema dropped");
	PQfinish(admin);
	event_base_free(base);
	printf("# finished in %llu ms\n", (unsigned long long)(cs_now_ms() - t0));
	return tap_done();
}
