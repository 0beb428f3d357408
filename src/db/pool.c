/*
 * pool.c - the asynchronous PostgreSQL pool (see db.h for the contract).
 * Each query connection is non-blocking libpq in pipeline mode, driven by
 * events on its socket: a query is sent with PQsendQueryParams or
 * PQsendQueryPrepared plus its own PQpipelineSync, appended to the
 * connection's in-flight FIFO, and completed when its Sync comes back, so
 * results map to queries by order alone and an error aborts only its own
 * query. Executions of read-only statements (db_pool_prepare_read) are the
 * exception: those sent in one pass of the event loop share one Sync, sent
 * (and flushed) once the pass is over, so a burst of reads costs the server
 * one implicit transaction, one read and one write instead of one each.
 * Such a query completes at the end of its own results; when a neighbour
 * fails, the server skips the rest of the segment (PIPELINE_ABORTED) and
 * those queries, which never ran, are queued again. Queries that find no connection with room wait
 * in the pool queue and go to the least-loaded connection. A transaction pins the connection its
 * BEGIN went to until COMMIT or ROLLBACK completes. One more connection, outside pipeline mode,
 * LISTENs for the channels that have subscribers. Connections that fail are reopened with
 * exponential backoff and jitter; whatever was in flight on them fails with DB_UNAVAILABLE.
 * Callbacks may cancel queries, roll back, unsubscribe or free the pool
 * while the pool iterates: queries are unlinked before their callback runs,
 * cancelled in-flight queries stay in the FIFO (without a callback) until
 * their result is consumed, and the pool itself is freed only once the
 * outermost event callback returns.
 */
#include "config.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>

#include <event2/event.h>
#include <libpq-fe.h>

#include "cloudsweep/db.h"
#include "cloudsweep/log.h"
#include "cloudsweep/util.h"

#define DB_MAX_INFLIGHT       32    /* queries in flight per connection before queueing */
#define DB_CONNECT_TIMEOUT_MS 10000 /* a connection attempt that takes longer is abandoned */
#define DB_BACKOFF_MIN_MS     100   /* first reconnect delay */
#define DB_BACKOFF_MAX_MS     5000  /* reconnect delay cap */
#define DB_CHANNEL_MAX        63    /* longest channel name (NAMEDATALEN - 1) */
#define DB_APP_NAME           "cloudsweepd" /* application_name unless the conninfo sets one */

enum db_conn_state {
	DB_CONN_IDLE,       /* created, never started */
	DB_CONN_CONNECTING, /* PQconnectPoll in progress; the timer bounds it */
	DB_CONN_READY,      /* up: queries may be sent */
	DB_CONN_FAILING,    /* a send or flush failed; the timer closes it on the next loop pass */
	DB_CONN_BACKOFF,    /* closed; the timer reconnects after the backoff delay */
	DB_CONN_CLOSED,     /* the pool is shutting down; never reconnects */
};

enum db_phase {
	DB_PHASE_RESULTS, /* collecting the head query's results until the NULL that ends them */
	DB_PHASE_SYNC,    /* waiting for the head query's PGRES_PIPELINE_SYNC */
};

enum db_qkind {
	DB_Q_SQL,      /* user query text */
	DB_Q_PREPARED, /* user execution of a registered statement */
	DB_Q_PREPARE,  /* internal: prepare a registered statement on one connection */
	DB_Q_BEGIN,    /* BEGIN of a transaction; pins the connection it is sent on */
	DB_Q_COMMIT,   /* COMMIT of a transaction; unpins when it completes */
	DB_Q_ROLLBACK, /* internal: ROLLBACK, no callback; unpins when it completes */
	DB_Q_SYNC,     /* internal: a batch's Sync sent after its queries had all answered */
};

enum db_qwhere {
	DB_QW_NONE,    /* being set up, or completing */
	DB_QW_WAITING, /* pool->waiting: no connection had room */
	DB_QW_HELD, /* tx->held: waiting for BEGIN to succeed or for room on the pinned connection
	             */
	DB_QW_INFLIGHT, /* conn->inflight: sent, result not yet consumed */
	DB_QW_DEFERRED, /* pool->deferred: fails with defer_ev on the next loop pass */
};

enum db_tx_state {
	DB_TX_BEGINNING, /* BEGIN queued or in flight */
	DB_TX_OPEN,      /* BEGIN succeeded; queries go to the pinned connection */
	DB_TX_FAILED,    /* BEGIN failed or the connection died; queries fail */
	DB_TX_DONE,      /* COMMIT completed or the user rolled back */
};

TAILQ_HEAD(db_qlist, db_query);

struct db_query {
	TAILQ_ENTRY(db_query) entry; /* in the list named by where */
	struct db_pool *pool;
	struct db_conn *conn; /* connection it was sent on (DB_QW_INFLIGHT) */
	struct db_tx *tx;     /* owning transaction (holds a reference) or NULL */
	enum db_qkind kind;
	enum db_qwhere where;
	char *text;      /* SQL, or the statement name for DB_Q_PREPARED/DB_Q_PREPARE */
	const char *sql; /* DB_Q_PREPARE: the statement's SQL (owned by the pool) */
	int nparams;
	char **params; /* one allocation: pointers, then the strings */
	db_cb cb;
	void *arg;
	struct event *ev_timeout; /* deadline, or NULL */
	enum db_event defer_ev;   /* what a deferred query reports */
	bool batch;               /* read-only: may share a Sync with its neighbours */
	bool synced;              /* in flight: a Sync follows it */
	bool cancelled;           /* never invoke cb */
	bool timed_out;           /* the deadline passed; report DB_TIMEOUT */
	bool in_cb;               /* its callback is running */
};

struct db_tx {
	TAILQ_ENTRY(db_tx) entry; /* pool->txs */
	struct db_pool *pool;
	struct db_conn *conn;   /* pinned connection, NULL until BEGIN is sent or after unpinning */
	struct db_query *begin; /* the BEGIN until it completes */
	struct db_qlist held;   /* queries not yet sent */
	enum db_tx_state state;
	int refs;         /* user handle + queries + pin */
	bool user;        /* the caller still owns the handle */
	bool ending;      /* COMMIT queued: no more queries */
	bool rolled_back; /* ROLLBACK issued (or nothing left to roll back) */
};

struct db_conn {
	struct db_pool *pool;
	int id;        /* index, for logs; the listener is pool->size */
	bool listener; /* the LISTEN connection (not pipelined) */
	enum db_conn_state state;
	PGconn *pg;
	struct event *ev_io;    /* connect step while connecting, then persistent read */
	struct event *ev_write; /* armed while PQflush returns 1 */
	struct event *ev_timer; /* connect timeout, backoff, deferred close */
	struct db_qlist inflight;
	int ninflight;
	enum db_phase phase;
	PGresult *res;    /* first result of the head query (or the error at its Sync) */
	bool sync_error;  /* DB_PHASE_SYNC: an error arrived; libpq's NULL after it comes next */
	int unsynced;     /* batched queries sent since the last Sync (the FIFO's tail) */
	struct db_tx *tx; /* pinning transaction (holds a reference) */
	int nprepared;    /* registered statements sent on this connection */
	int backoff_ms;   /* last backoff delay, 0 after a successful connect */
	bool ever_up;     /* has been READY before (reconnects counting) */
	bool lbusy;       /* listener: a LISTEN/UNLISTEN command is in progress */
	char why[256];    /* reason a FAILING connection is closed */
};

struct db_stmt {
	char *name;
	char *sql;
	bool read_only; /* executions may be batched under one Sync */
};

TAILQ_HEAD(db_sublist, db_subscription);

struct db_channel {
	TAILQ_ENTRY(db_channel) entry; /* pool->channels */
	struct db_sublist subs;
	int nsubs;      /* live subscribers */
	int iterating;  /* > 0 while delivering: unsubscribed entries are unlinked later */
	bool listening; /* LISTEN sent on the current listener connection */
	char name[DB_CHANNEL_MAX + 1];
};

struct db_subscription {
	TAILQ_ENTRY(db_subscription) entry; /* chan->subs */
	struct db_pool *pool;
	struct db_channel *chan;
	db_notify_cb cb;
	void *arg;
	bool dead; /* unsubscribed during delivery; unlinked afterwards */
};

struct db_pool {
	struct event_base *base;
	char *conninfo; /* never logged: it may hold a password */
	int size;
	int query_timeout_ms;
	const struct timeval *timeout_tv; /* common timeout for query deadlines */
	struct db_conn *conns;            /* size query connections, then the listener */
	struct db_conn *listener;
	struct db_qlist waiting;
	int nwaiting;
	struct db_qlist deferred;
	struct event *ev_deferred;
	struct event *ev_sync; /* active while some connection has an open batch */
	struct db_stmt *stmts;
	int nstmts;
	TAILQ_HEAD(, db_channel) channels;
	TAILQ_HEAD(, db_tx) txs;
	unsigned long reconnects;
	int busy;   /* nesting depth of pool entry points */
	bool dying; /* db_pool_free called; freed when busy drops to 0 */
};

static void db_conn_close(struct db_conn *c, const char *reason);
static void db_conn_start(struct db_conn *c);
static void db_conn_send(struct db_conn *c, struct db_query *q);
static void db_query_done(struct db_query *q, enum db_event ev, const PGresult *res);
static void db_pool_dispatch(struct db_pool *pool);
static void db_listener_sync(struct db_pool *pool);
static void db_tx_abandon(struct db_tx *tx);

static const char *const db_conn_state_names[] = {
	"idle", "connecting", "ready", "failing", "backoff", "closed",
};

/* Copy a libpq message into buf on one line: newlines and tabs become spaces. */
static const char *db_trim(char *buf, size_t len, const char *msg)
{
	char *r, *w;

	snprintf(buf, len, "%s", msg != NULL && *msg != '\0' ? msg : "unknown error");
	for (r = w = buf; *r != '\0'; r++) {
		if (*r == '\n' || *r == '\t') {
			if (w > buf && w[-1] != ' ')
				*w++ = ' ';
			continue;
		}
		*w++ = *r;
	}
	*w = '\0';
	cs_rstrip(buf);
	return buf;
}

static void db_pool_enter(struct db_pool *pool)
{
	pool->busy++;
}

static void db_pool_destroy(struct db_pool *pool);

static void db_pool_leave(struct db_pool *pool)
{
	if (--pool->busy == 0 && pool->dying)
		db_pool_destroy(pool);
}

/* ---- transactions: references ---- */

static void db_tx_ref(struct db_tx *tx)
{
	tx->refs++;
}

static void db_tx_unref(struct db_tx *tx)
{
	if (--tx->refs > 0)
		return;
	TAILQ_REMOVE(&tx->pool->txs, tx, entry);
	free(tx);
}

/* The caller's handle is gone: no more callbacks for the tx itself. */
static void db_tx_release(struct db_tx *tx)
{
	if (!tx->user)
		return;
	tx->user = false;
	db_tx_unref(tx);
}

/* ---- queries ---- */

static void db_query_timeout_cb(evutil_socket_t fd, short what, void *arg);

static struct db_query *db_query_new(struct db_pool *pool, enum db_qkind kind, const char *text,
                                     int nparams, const char *const *params, db_cb cb, void *arg)
{
	struct db_query *q;
	size_t need, off;
	char *blk;

	q = xcalloc(1, sizeof(*q));
	q->pool = pool;
	q->kind = kind;
	q->where = DB_QW_NONE;
	q->text = xstrdup(text);
	q->cb = cb;
	q->arg = arg;
	if (nparams > 0) {
		need = (size_t)nparams * sizeof(char *);
		for (int i = 0; i < nparams; i++)
			if (params[i] != NULL)
				need += strlen(params[i]) + 1;
		blk = xmalloc(need);
		q->params = (char **)(void *)blk;
		off = (size_t)nparams * sizeof(char *);
		for (int i = 0; i < nparams; i++) {
			size_t n;

			if (params[i] == NULL) {
				q->params[i] = NULL;
				continue;
			}
			n = strlen(params[i]) + 1;
			memcpy(blk + off, params[i], n);
			q->params[i] = blk + off;
			off += n;
		}
		q->nparams = nparams;
	}
	if (pool->timeout_tv != NULL && kind != DB_Q_PREPARE && kind != DB_Q_SYNC) {
		q->ev_timeout = event_new(pool->base, -1, 0, db_query_timeout_cb, q);
		if (q->ev_timeout == NULL || event_add(q->ev_timeout, pool->timeout_tv) != 0)
			fatalx("db_event_failed", "cannot arm a query deadline");
	}
	return q;
}

static void db_query_stop_timer(struct db_query *q)
{
	if (q->ev_timeout != NULL) {
		event_free(q->ev_timeout);
		q->ev_timeout = NULL;
	}
}

static void db_query_free(struct db_query *q)
{
	db_query_stop_timer(q);
	if (q->tx != NULL) {
		if (q->tx->begin == q)
			q->tx->begin = NULL;
		db_tx_unref(q->tx);
	}
	free(q->params);
	free(q->text);
	free(q);
}

static void db_query_invoke(struct db_query *q, enum db_event ev, const PGresult *res)
{
	if (q->cancelled || q->cb == NULL)
		return;
	q->in_cb = true;
	q->cb(q->arg, ev, res);
	q->in_cb = false;
}

/* Fail every query held by tx (in order). */
static void db_tx_fail_held(struct db_tx *tx)
{
	struct db_query *q;

	while ((q = TAILQ_FIRST(&tx->held)) != NULL) {
		TAILQ_REMOVE(&tx->held, q, entry);
		q->where = DB_QW_NONE;
		db_query_done(q, q->timed_out ? DB_TIMEOUT : DB_UNAVAILABLE, NULL);
	}
}

/*
 * Complete q, already unlinked: invoke its callback unless cancelled, apply
 * what its kind means for its transaction, and free it.
 */
static void db_query_done(struct db_query *q, enum db_event ev, const PGresult *res)
{
	struct db_tx *tx = q->tx;
	char buf[256];

	q->where = DB_QW_NONE;
	db_query_stop_timer(q);
	switch (q->kind) {
	case DB_Q_PREPARE:
		if (ev == DB_ERROR)
			log_warnx("db_prepare_failed", "statement %s: %s", q->text,
			          db_trim(buf, sizeof(buf), PQresultErrorMessage(res)));
		break;
	case DB_Q_ROLLBACK:
	case DB_Q_SYNC:
		break;
	case DB_Q_BEGIN:
		tx->begin = NULL;
		if (q->cancelled)
			break;
		if (ev == DB_OK) {
			tx->state = DB_TX_OPEN;
			db_query_invoke(q, ev, res);
			break;
		}
		/* Held queries fail first: the begin callback is the tx's last word. */
		tx->state = DB_TX_FAILED;
		tx->rolled_back = true;
		db_tx_fail_held(tx);
		db_query_invoke(q, ev, res);
		db_tx_release(tx); /* q's own reference keeps tx alive until db_query_free */
		break;
	case DB_Q_COMMIT:
		/* COMMIT of an aborted transaction answers ROLLBACK without an error. */
		if (ev == DB_OK && strcmp(PQcmdStatus((PGresult *)res), "COMMIT") != 0)
			ev = DB_ERROR;
		tx->state = DB_TX_DONE;
		tx->rolled_back = true;
		db_query_invoke(q, ev, res);
		db_tx_release(tx);
		break;
	case DB_Q_SQL:
	case DB_Q_PREPARED:
		db_query_invoke(q, ev, res);
		break;
	}
	db_query_free(q);
}

/* Queue q to fail with ev on the next loop pass (never call back from inside an API call). */
static void db_query_defer(struct db_query *q, enum db_event ev)
{
	struct db_pool *pool = q->pool;

	db_query_stop_timer(q);
	q->defer_ev = ev;
	q->where = DB_QW_DEFERRED;
	TAILQ_INSERT_TAIL(&pool->deferred, q, entry);
	event_active(pool->ev_deferred, EV_TIMEOUT, 1);
}

static void db_pool_deferred_cb(evutil_socket_t fd, short what, void *arg)
{
	struct db_pool *pool = arg;
	struct db_query *q;

	db_pool_enter(pool);
	while (!pool->dying && (q = TAILQ_FIRST(&pool->deferred)) != NULL) {
		TAILQ_REMOVE(&pool->deferred, q, entry);
		db_query_done(q, q->defer_ev, NULL);
	}
	db_pool_leave(pool);
}

/* ---- connections ---- */

static void db_conn_set_state(struct db_conn *c, enum db_conn_state st)
{
	if (c->state == st)
		return;
	log_debug("db_conn_state", "connection %d: %s -> %s", c->id, db_conn_state_names[c->state],
	          db_conn_state_names[st]);
	c->state = st;
}

static void db_notice_cb(void *arg, const char *message)
{
	struct db_conn *c = arg;
	char buf[256];

	log_debug("db_notice", "connection %d: %s", c->id, db_trim(buf, sizeof(buf), message));
}

/* Mark c failed from inside an API call; db_conn_close runs on the next loop pass. */
static void db_conn_fail(struct db_conn *c, const char *reason)
{
	if (c->state != DB_CONN_READY)
		return;
	db_trim(c->why, sizeof(c->why), reason);
	event_del(c->ev_io);
	event_del(c->ev_write);
	db_conn_set_state(c, DB_CONN_FAILING);
	event_active(c->ev_timer, EV_TIMEOUT, 1);
}

static void db_conn_flush(struct db_conn *c)
{
	int r;

	if (c->state != DB_CONN_READY)
		return;
	r = PQflush(c->pg);
	if (r < 0)
		db_conn_fail(c, PQerrorMessage(c->pg));
	else if (r > 0)
		event_add(c->ev_write, NULL);
	else
		event_del(c->ev_write);
}

static void db_conn_unpin(struct db_conn *c)
{
	struct db_tx *tx = c->tx;

	if (tx == NULL)
		return;
	c->tx = NULL;
	if (tx->conn == c)
		tx->conn = NULL;
	db_tx_unref(tx);
}

static int db_conn_backoff_ms(struct db_conn *c)
{
	uint32_t r;
	int base;

	base = c->backoff_ms == 0 ? DB_BACKOFF_MIN_MS : c->backoff_ms * 2;
	if (base > DB_BACKOFF_MAX_MS)
		base = DB_BACKOFF_MAX_MS;
	c->backoff_ms = base;
	cs_random(&r, sizeof(r));
	return base / 2 + (int)(r % (uint32_t)(base / 2 + 1));
}

static void db_timer_add_ms(struct event *ev, int ms)
{
	struct timeval tv = { .tv_sec = ms / 1000, .tv_usec = (ms % 1000) * 1000 };

	event_add(ev, &tv);
}

static void db_pool_fail_waiting(struct db_pool *pool)
{
	struct db_query *q;

	while ((q = TAILQ_FIRST(&pool->waiting)) != NULL) {
		TAILQ_REMOVE(&pool->waiting, q, entry);
		pool->nwaiting--;
		q->where = DB_QW_NONE;
		db_query_done(q, q->timed_out ? DB_TIMEOUT : DB_UNAVAILABLE, NULL);
	}
}

static void db_listener_reset(struct db_pool *pool)
{
	struct db_channel *ch, *next;

	for (ch = TAILQ_FIRST(&pool->channels); ch != NULL; ch = next) {
		next = TAILQ_NEXT(ch, entry);
		ch->listening = false;
		if (ch->nsubs == 0 && ch->iterating == 0) {
			TAILQ_REMOVE(&pool->channels, ch, entry);
			free(ch);
		}
	}
}

/*
 * The one teardown: stop c's events, finish its PGconn, schedule a
 * reconnect (unless the pool is closing) and fail what was in flight, its
 * pinned transaction's held queries and, when no connection is left, the
 * pool queue. Safe to re-enter from callbacks it invokes.
 */
static void db_conn_close(struct db_conn *c, const char *reason)
{
	struct db_pool *pool = c->pool;
	struct db_query *q;
	struct db_tx *tx;
	char buf[256];

	if (c->pg != NULL && !pool->dying) {
		db_trim(buf, sizeof(buf), c->state == DB_CONN_FAILING ? c->why : reason);
		log_warnx(c->state == DB_CONN_CONNECTING ? "db_connect_failed" : "db_conn_lost",
		          "connection %d%s: %s", c->id, c->listener ? " (listener)" : "", buf);
	}
	event_del(c->ev_io);
	event_del(c->ev_write);
	event_del(c->ev_timer);
	if (c->res != NULL) {
		PQclear(c->res);
		c->res = NULL;
	}
	c->phase = DB_PHASE_RESULTS;
	c->sync_error = false;
	c->unsynced = 0;
	if (c->pg != NULL) {
		PQfinish(c->pg);
		c->pg = NULL;
	}
	c->nprepared = 0;
	c->lbusy = false;
	if (pool->dying) {
		db_conn_set_state(c, DB_CONN_CLOSED);
	} else {
		db_conn_set_state(c, DB_CONN_BACKOFF);
		db_timer_add_ms(c->ev_timer, db_conn_backoff_ms(c));
	}
	if (c->listener) {
		db_listener_reset(pool);
		return;
	}

	tx = c->tx;
	c->tx = NULL;
	if (tx != NULL) {
		if (tx->conn == c)
			tx->conn = NULL;
		if (tx->state == DB_TX_BEGINNING || tx->state == DB_TX_OPEN) {
			tx->state = DB_TX_FAILED;
			tx->rolled_back = true;
		}
	}
	while ((q = TAILQ_FIRST(&c->inflight)) != NULL) {
		TAILQ_REMOVE(&c->inflight, q, entry);
		c->ninflight--;
		q->where = DB_QW_NONE;
		db_query_done(q, q->timed_out ? DB_TIMEOUT : DB_UNAVAILABLE, NULL);
	}
	if (tx != NULL) {
		db_tx_fail_held(tx);
		db_tx_unref(tx);
	}
	if (!db_pool_ready(pool))
		db_pool_fail_waiting(pool);
}

/* Send the registered statements this connection has not prepared yet. */
static void db_conn_send_prepares(struct db_conn *c)
{
	struct db_pool *pool = c->pool;
	struct db_query *q;

	while (c->state == DB_CONN_READY && c->nprepared < pool->nstmts) {
		struct db_stmt *st = &pool->stmts[c->nprepared++];

		q = db_query_new(pool, DB_Q_PREPARE, st->name, 0, NULL, NULL, NULL);
		q->sql = st->sql;
		db_conn_send(c, q);
	}
}

/*
 * Close c's open batch: a Sync after the last query sent. Returns false when
 * the send failed (c is FAILING then).
 */
static bool db_conn_sync(struct db_conn *c)
{
	struct db_query *q;

	if (c->unsynced == 0)
		return true;
	c->unsynced = 0;
	q = TAILQ_LAST(&c->inflight, db_qlist);
	if (q == NULL) {
		/*
		 * The batch has answered already (a big one: libpq and the server
		 * flushed along the way); its implicit transaction still needs the
		 * Sync, and the Sync's answer needs a place in the FIFO.
		 */
		q = db_query_new(c->pool, DB_Q_SYNC, "Sync", 0, NULL, NULL, NULL);
		q->conn = c;
		q->where = DB_QW_INFLIGHT;
		TAILQ_INSERT_TAIL(&c->inflight, q, entry);
		c->ninflight++;
	}
	q->synced = true;
	if (c->state != DB_CONN_READY)
		return false;
	if (PQpipelineSync(c->pg) != 1) {
		db_conn_fail(c, PQerrorMessage(c->pg));
		return false;
	}
	return true;
}

/* End of a loop pass: close every open batch and send it. */
static void db_pool_sync_cb(evutil_socket_t fd, short what, void *arg)
{
	struct db_pool *pool = arg;

	db_pool_enter(pool);
	for (int i = 0; i < pool->size; i++) {
		struct db_conn *c = &pool->conns[i];

		if (c->unsynced > 0 && db_conn_sync(c))
			db_conn_flush(c);
	}
	db_pool_leave(pool);
}

/*
 * Send q on c and append it to the in-flight FIFO: a batched query joins
 * c's open batch (the Sync comes at the end of the loop pass); any other
 * query gets its own Sync, which closes the batch too, so a plain query
 * shares the batch's implicit transaction (read-only neighbours; if one
 * fails, q is skipped and queued again). BEGIN, PREPARE and transaction
 * queries never share: the batch is closed before them. A failed send marks
 * c FAILING: q still joins the FIFO and fails with the rest when c is
 * closed on the next loop pass.
 */
static void db_conn_send(struct db_conn *c, struct db_query *q)
{
	const char *const *params = (const char *const *)q->params;
	bool batch = q->batch && c->tx == NULL;
	int r = 0;

	/* Never inside a transaction: a Parse there could fail with it or abort it. */
	if (q->kind != DB_Q_PREPARE && c->tx == NULL)
		db_conn_send_prepares(c);
	if (!batch && (q->kind == DB_Q_PREPARE || q->kind == DB_Q_BEGIN || q->tx != NULL))
		db_conn_sync(c);
	if (c->state == DB_CONN_READY) {
		switch (q->kind) {
		case DB_Q_PREPARE:
			r = PQsendPrepare(c->pg, q->text, q->sql, 0, NULL);
			break;
		case DB_Q_PREPARED:
			r = PQsendQueryPrepared(c->pg, q->text, q->nparams, params, NULL, NULL, 0);
			break;
		case DB_Q_SQL:
		case DB_Q_BEGIN:
		case DB_Q_COMMIT:
		case DB_Q_ROLLBACK:
		case DB_Q_SYNC: /* never sent this way (db_conn_sync) */
			r = PQsendQueryParams(c->pg, q->text, q->nparams, NULL, params, NULL, NULL,
			                      0);
			break;
		}
		if (r == 1 && !batch)
			r = PQpipelineSync(c->pg);
		if (r != 1)
			db_conn_fail(c, PQerrorMessage(c->pg));
	}
	q->conn = c;
	q->where = DB_QW_INFLIGHT;
	q->synced = !batch;
	TAILQ_INSERT_TAIL(&c->inflight, q, entry);
	c->ninflight++;
	if (q->kind == DB_Q_BEGIN && c->tx == NULL) {
		c->tx = q->tx;
		db_tx_ref(q->tx);
		q->tx->conn = c;
	}
	if (batch) {
		if (c->unsynced++ == 0)
			event_active(c->pool->ev_sync, EV_TIMEOUT, 1);
		return;
	}
	c->unsynced = 0;
	db_conn_flush(c);
}

/* Move held queries of an open transaction to its connection while there is room. */
static void db_tx_pump(struct db_tx *tx)
{
	struct db_conn *c = tx->conn;
	struct db_query *q;

	while (tx->state == DB_TX_OPEN && c != NULL && c->tx == tx && c->state == DB_CONN_READY &&
	       c->ninflight < DB_MAX_INFLIGHT && (q = TAILQ_FIRST(&tx->held)) != NULL) {
		TAILQ_REMOVE(&tx->held, q, entry);
		db_conn_send(c, q);
	}
}

/*
 * A READY, unpinned connection with room for q, or NULL: for a batched read
 * one whose batch is open (the bigger the batch, the less the server pays
 * per query), else the least loaded.
 */
static struct db_conn *db_pool_pick(struct db_pool *pool, const struct db_query *q)
{
	struct db_conn *best = NULL;

	for (int i = 0; i < pool->size; i++) {
		struct db_conn *c = &pool->conns[i];

		if (c->state != DB_CONN_READY || c->tx != NULL || c->ninflight >= DB_MAX_INFLIGHT)
			continue;
		if (q->batch && c->unsynced > 0)
			return c;
		if (best == NULL || c->ninflight < best->ninflight)
			best = c;
	}
	return best;
}

static void db_pool_dispatch(struct db_pool *pool)
{
	struct db_query *q;
	struct db_conn *c;

	while (!pool->dying && (q = TAILQ_FIRST(&pool->waiting)) != NULL) {
		if ((c = db_pool_pick(pool, q)) == NULL)
			break;
		TAILQ_REMOVE(&pool->waiting, q, entry);
		pool->nwaiting--;
		db_conn_send(c, q);
	}
}

static bool db_result_is_fatal(const PGresult *res)
{
	const char *sev = PQresultErrorField(res, PG_DIAG_SEVERITY_NONLOCALIZED);

	return sev != NULL && (strcmp(sev, "FATAL") == 0 || strcmp(sev, "PANIC") == 0);
}

/* The head query's Sync arrived: complete it with the result collected. */
static void db_conn_complete(struct db_conn *c)
{
	struct db_query *q = TAILQ_FIRST(&c->inflight);
	PGresult *res = c->res;
	enum db_event ev;

	TAILQ_REMOVE(&c->inflight, q, entry);
	c->ninflight--;
	c->res = NULL;
	c->phase = DB_PHASE_RESULTS;
	if (res != NULL && PQresultStatus(res) == PGRES_PIPELINE_ABORTED && q->tx == NULL &&
	    (q->kind == DB_Q_SQL || q->kind == DB_Q_PREPARED)) {
		/* A batch neighbour failed and the server skipped q: it never ran. */
		PQclear(res);
		if (q->cancelled) {
			db_query_done(q, DB_ERROR, NULL);
			return;
		}
		q->conn = NULL;
		q->where = DB_QW_WAITING;
		TAILQ_INSERT_TAIL(&c->pool->waiting, q, entry);
		c->pool->nwaiting++;
		return;
	}
	if (res == NULL)
		res = PQmakeEmptyPGresult(c->pg, PGRES_FATAL_ERROR);
	switch (PQresultStatus(res)) {
	case PGRES_TUPLES_OK:
	case PGRES_COMMAND_OK:
	case PGRES_EMPTY_QUERY:
		ev = DB_OK;
		break;
	default:
		ev = DB_ERROR;
		break;
	}
	if (q->kind == DB_Q_COMMIT || q->kind == DB_Q_ROLLBACK ||
	    (q->kind == DB_Q_BEGIN && ev != DB_OK && !q->cancelled && c->tx == q->tx))
		db_conn_unpin(c);
	db_query_done(q, ev, res);
	PQclear(res);
}

/* A query completed on c: room for held transaction queries and the pool queue. */
static void db_conn_after_complete(struct db_conn *c)
{
	struct db_pool *pool = c->pool;

	if (c->state == DB_CONN_READY && !pool->dying) {
		if (c->tx != NULL)
			db_tx_pump(c->tx);
		db_pool_dispatch(pool);
	}
}

/* Consume every complete result on a query connection. */
static void db_conn_process(struct db_conn *c)
{
	struct db_pool *pool = c->pool;
	PGresult *res;
	char buf[256];

	while (c->state == DB_CONN_READY && !pool->dying && !TAILQ_EMPTY(&c->inflight)) {
		if (PQisBusy(c->pg))
			break;
		res = PQgetResult(c->pg);
		if (PQstatus(c->pg) == CONNECTION_BAD || (res != NULL && db_result_is_fatal(res))) {
			db_trim(buf, sizeof(buf),
			        res != NULL ? PQresultErrorMessage(res) : PQerrorMessage(c->pg));
			PQclear(res);
			db_conn_close(c, buf);
			return;
		}
		if (c->phase == DB_PHASE_RESULTS) {
			if (res == NULL && !TAILQ_FIRST(&c->inflight)->synced) {
				db_conn_complete(c); /* a batched query: no Sync of its own */
				db_conn_after_complete(c);
			} else if (res == NULL) {
				c->phase = DB_PHASE_SYNC;
			} else if (PQresultStatus(res) == PGRES_PIPELINE_SYNC) {
				PQclear(res);
				db_conn_complete(c);
			} else if (c->res == NULL) {
				c->res = res;
			} else {
				PQclear(res);
			}
			continue;
		}
		if (res == NULL) {
			if (!c->sync_error)
				break;         /* the Sync has not arrived yet */
			c->sync_error = false; /* the end of that error's results */
			continue;
		}
		if (PQresultStatus(res) != PGRES_PIPELINE_SYNC) {
			/*
			 * An error between a query's results and its Sync is its implicit
			 * transaction failing to commit (a deferred constraint, say): the
			 * query failed after all. libpq ends the error with a NULL of its own.
			 */
			c->sync_error = true;
			if (PQresultStatus(res) == PGRES_FATAL_ERROR &&
			    (c->res == NULL || PQresultStatus(c->res) != PGRES_FATAL_ERROR)) {
				PQclear(c->res);
				c->res = res;
			} else {
				PQclear(res);
			}
			continue;
		}
		PQclear(res);
		db_conn_complete(c);
		db_conn_after_complete(c);
	}
}

static void db_channel_deliver(struct db_pool *pool, struct db_channel *ch, const char *payload);

/* Listener: finish LISTEN/UNLISTEN commands and deliver notifications. */
static void db_listener_process(struct db_conn *c)
{
	struct db_pool *pool = c->pool;
	struct db_channel *ch;
	PGnotify *n;
	PGresult *res;
	char buf[256];

	while (c->lbusy && !PQisBusy(c->pg)) {
		res = PQgetResult(c->pg);
		if (res == NULL) {
			c->lbusy = false;
			break;
		}
		if (PQresultStatus(res) != PGRES_COMMAND_OK)
			log_warnx("db_listen_failed", "%s",
			          db_trim(buf, sizeof(buf), PQresultErrorMessage(res)));
		PQclear(res);
	}
	if (PQstatus(c->pg) == CONNECTION_BAD) {
		db_conn_close(c, PQerrorMessage(c->pg));
		return;
	}
	while (c->state == DB_CONN_READY && !pool->dying && (n = PQnotifies(c->pg)) != NULL) {
		TAILQ_FOREACH (ch, &pool->channels, entry)
			if (strcmp(ch->name, n->relname) == 0)
				break;
		if (ch != NULL && ch->nsubs > 0)
			db_channel_deliver(pool, ch, n->extra);
		PQfreemem(n);
	}
	if (c->state == DB_CONN_READY && !pool->dying)
		db_listener_sync(pool);
}

static void db_conn_read_cb(evutil_socket_t fd, short what, void *arg)
{
	struct db_conn *c = arg;
	struct db_pool *pool = c->pool;

	db_pool_enter(pool);
	if (c->state != DB_CONN_READY)
		goto out;
	if (!PQconsumeInput(c->pg)) {
		db_conn_close(c, PQerrorMessage(c->pg));
		goto out;
	}
	if (c->listener)
		db_listener_process(c);
	else
		db_conn_process(c);
	db_conn_flush(c);
out:
	db_pool_leave(pool);
}

static void db_conn_write_cb(evutil_socket_t fd, short what, void *arg)
{
	struct db_conn *c = arg;
	struct db_pool *pool = c->pool;

	db_pool_enter(pool);
	db_conn_flush(c);
	db_pool_leave(pool);
}

/* The connection is established: switch modes, prepare, and start serving. */
static void db_conn_up(struct db_conn *c)
{
	struct db_pool *pool = c->pool;
	evutil_socket_t fd = PQsocket(c->pg);

	if (PQsetnonblocking(c->pg, 1) != 0 || (!c->listener && PQenterPipelineMode(c->pg) != 1)) {
		db_conn_close(c, PQerrorMessage(c->pg));
		return;
	}
	event_del(c->ev_timer);
	event_del(c->ev_io);
	event_assign(c->ev_io, pool->base, fd, EV_READ | EV_PERSIST, db_conn_read_cb, c);
	event_assign(c->ev_write, pool->base, fd, EV_WRITE | EV_PERSIST, db_conn_write_cb, c);
	if (event_add(c->ev_io, NULL) != 0) {
		db_conn_close(c, "cannot watch the socket");
		return;
	}
	if (c->ever_up)
		pool->reconnects++;
	c->ever_up = true;
	c->backoff_ms = 0;
	c->phase = DB_PHASE_RESULTS;
	db_conn_set_state(c, DB_CONN_READY);
	log_info("db_connected", "connection %d up%s", c->id, c->listener ? " (listener)" : "");
	if (c->listener) {
		db_listener_sync(pool);
	} else {
		db_conn_send_prepares(c);
		db_pool_dispatch(pool);
	}
	db_conn_flush(c);
}

static void db_conn_connect_cb(evutil_socket_t fd, short what, void *arg);

/*
 * Wait for the socket to become ready for what. The event is re-assigned at
 * every step because libpq may switch sockets while connecting (another
 * host or address, or a retry without SSL).
 */
static void db_conn_watch(struct db_conn *c, short what)
{
	evutil_socket_t fd = PQsocket(c->pg);

	if (fd < 0) {
		db_conn_close(c, "no socket");
		return;
	}
	event_del(c->ev_io);
	event_assign(c->ev_io, c->pool->base, fd, what, db_conn_connect_cb, c);
	if (event_add(c->ev_io, NULL) != 0)
		db_conn_close(c, "cannot watch the socket");
}

static void db_conn_connect_cb(evutil_socket_t fd, short what, void *arg)
{
	struct db_conn *c = arg;
	struct db_pool *pool = c->pool;

	db_pool_enter(pool);
	if (c->state != DB_CONN_CONNECTING)
		goto out;
	switch (PQconnectPoll(c->pg)) {
	case PGRES_POLLING_READING:
		db_conn_watch(c, EV_READ);
		break;
	case PGRES_POLLING_WRITING:
		db_conn_watch(c, EV_WRITE);
		break;
	case PGRES_POLLING_OK:
		db_conn_up(c);
		break;
	default:
		db_conn_close(c, PQerrorMessage(c->pg));
		break;
	}
out:
	db_pool_leave(pool);
}

static void db_conn_timer_cb(evutil_socket_t fd, short what, void *arg)
{
	struct db_conn *c = arg;
	struct db_pool *pool = c->pool;

	db_pool_enter(pool);
	switch (c->state) {
	case DB_CONN_CONNECTING:
		db_conn_close(c, "connect timeout");
		break;
	case DB_CONN_FAILING:
		db_conn_close(c, c->why);
		break;
	case DB_CONN_BACKOFF:
		db_conn_start(c);
		break;
	default:
		break;
	}
	db_pool_leave(pool);
}

static void db_conn_start(struct db_conn *c)
{
	struct db_pool *pool = c->pool;
	const char *const keys[] = { "dbname", "fallback_application_name", NULL };
	const char *const vals[] = { pool->conninfo, DB_APP_NAME, NULL };

	c->pg = PQconnectStartParams(keys, vals, 1);
	if (c->pg == NULL) {
		log_warnx("db_connect_failed", "connection %d: out of memory", c->id);
		db_conn_set_state(c, DB_CONN_BACKOFF);
		db_timer_add_ms(c->ev_timer, db_conn_backoff_ms(c));
		return;
	}
	db_conn_set_state(c, DB_CONN_CONNECTING);
	if (PQstatus(c->pg) == CONNECTION_BAD) {
		db_conn_close(c, PQerrorMessage(c->pg));
		return;
	}
	PQsetNoticeProcessor(c->pg, db_notice_cb, c);
	db_timer_add_ms(c->ev_timer, DB_CONNECT_TIMEOUT_MS);
	/* Before the first PQconnectPoll, behave as if it returned PGRES_POLLING_WRITING. */
	db_conn_watch(c, EV_WRITE);
}

/* ---- query deadlines ---- */

static void db_query_timeout_cb(evutil_socket_t fd, short what, void *arg)
{
	struct db_query *q = arg;
	struct db_pool *pool = q->pool;
	struct db_tx *tx = q->tx;
	bool is_commit;

	db_pool_enter(pool);
	q->timed_out = true;
	switch (q->where) {
	case DB_QW_WAITING:
		TAILQ_REMOVE(&pool->waiting, q, entry);
		pool->nwaiting--;
		db_query_done(q, DB_TIMEOUT, NULL);
		break;
	case DB_QW_HELD:
		if (q->kind == DB_Q_COMMIT && tx->conn != NULL) {
			/* The outcome must not stay open: reset, which also rolls back. */
			db_conn_close(tx->conn, "commit timeout");
			break;
		}
		is_commit = q->kind == DB_Q_COMMIT;
		TAILQ_REMOVE(&tx->held, q, entry);
		db_tx_ref(tx);
		db_query_done(q, DB_TIMEOUT, NULL);
		if (is_commit)
			db_tx_abandon(tx); /* drops the BEGIN still waiting for a connection */
		db_tx_unref(tx);
		break;
	case DB_QW_INFLIGHT:
		/* Only a reset gets rid of a running query without a blocking PQcancel. */
		db_conn_close(q->conn, "query timeout");
		break;
	default:
		break;
	}
	db_pool_leave(pool);
}

/* ---- pool ---- */

/* Create a pool and start connecting; NULL on bad arguments or conninfo. */
struct db_pool *db_pool_new(struct event_base *base, const char *conninfo, int size,
                            int query_timeout_ms)
{
	struct db_pool *pool;
	PQconninfoOption *opts;
	char *err = NULL;
	struct timeval tv;

	if (base == NULL || conninfo == NULL || size < 1 || size > 1024 || query_timeout_ms < 0) {
		log_errorx("db_pool_invalid", "bad pool arguments");
		return NULL;
	}
	opts = PQconninfoParse(conninfo, &err);
	if (opts == NULL) {
		/* The parser's message may quote the conninfo (and a password): not logged. */
		log_errorx("db_conninfo_invalid", "cannot parse the database connection string");
		PQfreemem(err);
		return NULL;
	}
	PQconninfoFree(opts);

	pool = xcalloc(1, sizeof(*pool));
	pool->base = base;
	pool->conninfo = xstrdup(conninfo);
	pool->size = size;
	pool->query_timeout_ms = query_timeout_ms;
	TAILQ_INIT(&pool->waiting);
	TAILQ_INIT(&pool->deferred);
	TAILQ_INIT(&pool->channels);
	TAILQ_INIT(&pool->txs);
	if (query_timeout_ms > 0) {
		tv.tv_sec = query_timeout_ms / 1000;
		tv.tv_usec = (query_timeout_ms % 1000) * 1000;
		pool->timeout_tv = event_base_init_common_timeout(base, &tv);
		if (pool->timeout_tv == NULL)
			fatalx("db_event_failed", "cannot set up query deadlines");
	}
	pool->ev_deferred = event_new(base, -1, 0, db_pool_deferred_cb, pool);
	pool->ev_sync = event_new(base, -1, 0, db_pool_sync_cb, pool);
	pool->conns = xcalloc((size_t)size + 1, sizeof(*pool->conns));
	pool->listener = &pool->conns[size];
	pool->listener->listener = true;
	for (int i = 0; i <= size; i++) {
		struct db_conn *c = &pool->conns[i];

		c->pool = pool;
		c->id = i;
		c->state = DB_CONN_IDLE;
		TAILQ_INIT(&c->inflight);
		c->ev_io = event_new(base, -1, 0, db_conn_connect_cb, c);
		c->ev_write = event_new(base, -1, 0, db_conn_write_cb, c);
		c->ev_timer = event_new(base, -1, 0, db_conn_timer_cb, c);
		if (c->ev_io == NULL || c->ev_write == NULL || c->ev_timer == NULL)
			fatalx("db_event_failed", "cannot allocate connection events");
	}
	if (pool->ev_deferred == NULL || pool->ev_sync == NULL)
		fatalx("db_event_failed", "cannot allocate pool events");
	db_pool_enter(pool);
	for (int i = 0; i <= size; i++)
		db_conn_start(&pool->conns[i]);
	db_pool_leave(pool);
	return pool;
}

static void db_pool_destroy(struct db_pool *pool)
{
	struct db_channel *ch;
	struct db_subscription *s;
	struct db_tx *tx;

	for (int i = 0; i <= pool->size; i++) {
		struct db_conn *c = &pool->conns[i];

		event_free(c->ev_io);
		event_free(c->ev_write);
		event_free(c->ev_timer);
	}
	while ((ch = TAILQ_FIRST(&pool->channels)) != NULL) {
		while ((s = TAILQ_FIRST(&ch->subs)) != NULL) {
			TAILQ_REMOVE(&ch->subs, s, entry);
			free(s);
		}
		TAILQ_REMOVE(&pool->channels, ch, entry);
		free(ch);
	}
	while ((tx = TAILQ_FIRST(&pool->txs)) != NULL) {
		TAILQ_REMOVE(&pool->txs, tx, entry);
		free(tx);
	}
	for (int i = 0; i < pool->nstmts; i++) {
		free(pool->stmts[i].name);
		free(pool->stmts[i].sql);
	}
	free(pool->stmts);
	event_free(pool->ev_deferred);
	event_free(pool->ev_sync);
	free(pool->conns);
	cs_free_secret(pool->conninfo);
	free(pool);
}

/* Close every connection, fail what is pending, then free the pool. */
void db_pool_free(struct db_pool *pool)
{
	struct db_query *q;

	if (pool == NULL || pool->dying)
		return;
	db_pool_enter(pool);
	pool->dying = true;
	for (int i = 0; i <= pool->size; i++)
		db_conn_close(&pool->conns[i], "pool closing");
	db_pool_fail_waiting(pool);
	while ((q = TAILQ_FIRST(&pool->deferred)) != NULL) {
		TAILQ_REMOVE(&pool->deferred, q, entry);
		db_query_done(q, q->defer_ev, NULL);
	}
	db_pool_leave(pool);
}

/* True when a query connection is READY. */
bool db_pool_ready(const struct db_pool *pool)
{
	if (pool == NULL || pool->dying)
		return false;
	for (int i = 0; i < pool->size; i++)
		if (pool->conns[i].state == DB_CONN_READY)
			return true;
	return false;
}

/* Fill *st with the pool's counters. */
void db_pool_stats(const struct db_pool *pool, struct db_pool_stats *st)
{
	memset(st, 0, sizeof(*st));
	st->size = pool->size;
	for (int i = 0; i < pool->size; i++) {
		const struct db_conn *c = &pool->conns[i];

		if (c->state == DB_CONN_READY)
			st->connected++;
		if (c->ninflight > 0 || c->tx != NULL)
			st->in_use++;
	}
	st->waiting = pool->nwaiting;
	st->reconnects = pool->reconnects;
}

static int db_pool_register(struct db_pool *pool, const char *name, const char *sql, int nparams,
                            bool read_only)
{
	struct db_stmt *st;

	if (pool == NULL) /* no database (`cloudsweepd routes`): nothing to prepare */
		return 0;
	if (name == NULL || *name == '\0' || sql == NULL || nparams < 0)
		goto fail;
	for (int i = 0; i < pool->nstmts; i++)
		if (strcmp(pool->stmts[i].name, name) == 0)
			goto fail;
	pool->stmts = xrealloc(pool->stmts, ((size_t)pool->nstmts + 1) * sizeof(*pool->stmts));
	st = &pool->stmts[pool->nstmts++];
	st->name = xstrdup(name);
	st->sql = xstrdup(sql);
	st->read_only = read_only;
	/* Pinned connections catch up before their first query after the transaction. */
	for (int i = 0; i < pool->size && !pool->dying; i++)
		if (pool->conns[i].state == DB_CONN_READY && pool->conns[i].tx == NULL)
			db_conn_send_prepares(&pool->conns[i]);
	return 0;
fail:
	return -1;
}

/* Register a statement that every connection prepares; -1 on a duplicate name. */
int db_pool_prepare(struct db_pool *pool, const char *name, const char *sql, int nparams)
{
	return db_pool_register(pool, name, sql, nparams, false);
}

/* The same for a statement without side effects, whose executions may be batched. */
int db_pool_prepare_read(struct db_pool *pool, const char *name, const char *sql, int nparams)
{
	return db_pool_register(pool, name, sql, nparams, true);
}

static bool db_nparams_ok(int nparams, const char *const *params)
{
	if (nparams < 0 || nparams > 65535 || (nparams > 0 && params == NULL)) {
		log_warnx("db_query_invalid", "bad parameter count %d", nparams);
		return false;
	}
	return true;
}

static struct db_query *db_submit(struct db_pool *pool, enum db_qkind kind, const char *text,
                                  int nparams, const char *const *params, db_cb cb, void *arg)
{
	struct db_query *q;
	struct db_conn *c;

	if (pool == NULL || !db_pool_ready(pool) || !db_nparams_ok(nparams, params))
		return NULL;
	q = db_query_new(pool, kind, text, nparams, params, cb, arg);
	if (kind == DB_Q_PREPARED)
		for (int i = 0; i < pool->nstmts; i++)
			if (strcmp(pool->stmts[i].name, text) == 0) {
				q->batch = pool->stmts[i].read_only;
				break;
			}
	c = TAILQ_EMPTY(&pool->waiting) ? db_pool_pick(pool, q) : NULL;
	if (c != NULL) {
		db_conn_send(c, q);
	} else {
		q->where = DB_QW_WAITING;
		TAILQ_INSERT_TAIL(&pool->waiting, q, entry);
		pool->nwaiting++;
	}
	return q;
}

/* Queue a parameterized query; NULL when no connection is up. */
struct db_query *db_query(struct db_pool *pool, const char *sql, int nparams,
                          const char *const *params, db_cb cb, void *arg)
{
	return db_submit(pool, DB_Q_SQL, sql, nparams, params, cb, arg);
}

/* Queue an execution of a registered statement; NULL when no connection is up. */
struct db_query *db_query_prepared(struct db_pool *pool, const char *name, int nparams,
                                   const char *const *params, db_cb cb, void *arg)
{
	return db_submit(pool, DB_Q_PREPARED, name, nparams, params, cb, arg);
}

/* Forget a pending query: its callback never runs. */
void db_query_cancel(struct db_query *q)
{
	if (q == NULL || q->cancelled)
		return;
	q->cancelled = true;
	q->cb = NULL;
	if (q->in_cb)
		return;
	switch (q->where) {
	case DB_QW_WAITING:
		TAILQ_REMOVE(&q->pool->waiting, q, entry);
		q->pool->nwaiting--;
		db_query_free(q);
		break;
	case DB_QW_HELD:
		TAILQ_REMOVE(&q->tx->held, q, entry);
		db_query_free(q);
		break;
	case DB_QW_DEFERRED:
		TAILQ_REMOVE(&q->pool->deferred, q, entry);
		db_query_free(q);
		break;
	case DB_QW_INFLIGHT:
		/* Its result is still consumed in order; the deadline still bounds it. */
		break;
	case DB_QW_NONE:
		break;
	}
}

/* ---- transactions ---- */

/* Start a transaction; NULL when no connection is up. */
struct db_tx *db_tx_begin(struct db_pool *pool, db_cb cb, void *arg)
{
	struct db_query *q;
	struct db_tx *tx;
	struct db_conn *c;

	if (pool == NULL || !db_pool_ready(pool))
		return NULL;
	tx = xcalloc(1, sizeof(*tx));
	tx->pool = pool;
	tx->state = DB_TX_BEGINNING;
	tx->user = true;
	tx->refs = 1;
	TAILQ_INIT(&tx->held);
	TAILQ_INSERT_TAIL(&pool->txs, tx, entry);

	q = db_query_new(pool, DB_Q_BEGIN, "BEGIN", 0, NULL, cb, arg);
	q->tx = tx;
	db_tx_ref(tx);
	tx->begin = q;
	c = TAILQ_EMPTY(&pool->waiting) ? db_pool_pick(pool, q) : NULL;
	if (c != NULL) {
		db_conn_send(c, q);
	} else {
		q->where = DB_QW_WAITING;
		TAILQ_INSERT_TAIL(&pool->waiting, q, entry);
		pool->nwaiting++;
	}
	return tx;
}

static struct db_query *db_tx_submit(struct db_tx *tx, enum db_qkind kind, const char *text,
                                     int nparams, const char *const *params, db_cb cb, void *arg)
{
	struct db_query *q;

	if (tx == NULL || !tx->user || tx->ending || tx->pool->dying ||
	    (tx->state != DB_TX_BEGINNING && tx->state != DB_TX_OPEN) ||
	    !db_nparams_ok(nparams, params))
		return NULL;
	q = db_query_new(tx->pool, kind, text, nparams, params, cb, arg);
	q->tx = tx;
	db_tx_ref(tx);
	q->where = DB_QW_HELD;
	TAILQ_INSERT_TAIL(&tx->held, q, entry);
	db_tx_pump(tx);
	return q;
}

/* Queue a query inside the transaction; NULL when the transaction is unusable. */
struct db_query *db_tx_query(struct db_tx *tx, const char *sql, int nparams,
                             const char *const *params, db_cb cb, void *arg)
{
	return db_tx_submit(tx, DB_Q_SQL, sql, nparams, params, cb, arg);
}

/* Queue a registered statement inside the transaction. */
struct db_query *db_tx_query_prepared(struct db_tx *tx, const char *name, int nparams,
                                      const char *const *params, db_cb cb, void *arg)
{
	return db_tx_submit(tx, DB_Q_PREPARED, name, nparams, params, cb, arg);
}

/* COMMIT; cb reports the outcome and the tx is freed after it returns. */
void db_tx_commit(struct db_tx *tx, db_cb cb, void *arg)
{
	struct db_query *q;

	if (tx == NULL || !tx->user || tx->ending)
		return;
	q = db_query_new(tx->pool, DB_Q_COMMIT, "COMMIT", 0, NULL, cb, arg);
	q->tx = tx;
	db_tx_ref(tx);
	tx->ending = true;
	if (tx->pool->dying || (tx->state != DB_TX_BEGINNING && tx->state != DB_TX_OPEN)) {
		db_query_defer(q, DB_UNAVAILABLE);
		return;
	}
	q->where = DB_QW_HELD;
	TAILQ_INSERT_TAIL(&tx->held, q, entry);
	db_tx_pump(tx);
}

/*
 * Drop everything pending for tx without callbacks and, if the server may
 * hold an open transaction for it, send ROLLBACK on the pinned connection
 * (which stays pinned until the ROLLBACK completes).
 */
static void db_tx_abandon(struct db_tx *tx)
{
	struct db_pool *pool = tx->pool;
	struct db_query *q, *next;
	struct db_conn *c = tx->conn;
	bool commit_sent = false;

	while ((q = TAILQ_FIRST(&tx->held)) != NULL) {
		TAILQ_REMOVE(&tx->held, q, entry);
		db_query_free(q);
	}
	if (tx->begin != NULL && tx->begin->where == DB_QW_WAITING) {
		q = tx->begin;
		TAILQ_REMOVE(&pool->waiting, q, entry);
		pool->nwaiting--;
		db_query_free(q);
	}
	for (q = TAILQ_FIRST(&pool->deferred); q != NULL; q = next) {
		next = TAILQ_NEXT(q, entry);
		if (q->tx == tx) {
			TAILQ_REMOVE(&pool->deferred, q, entry);
			db_query_free(q);
		}
	}
	if (c != NULL && c->tx == tx) {
		TAILQ_FOREACH (q, &c->inflight, entry) {
			if (q->tx != tx)
				continue;
			if (q->kind == DB_Q_COMMIT)
				commit_sent = true;
			q->cancelled = true;
			q->cb = NULL;
		}
		if (!tx->rolled_back && !commit_sent && c->state == DB_CONN_READY && !pool->dying) {
			q = db_query_new(pool, DB_Q_ROLLBACK, "ROLLBACK", 0, NULL, NULL, NULL);
			db_conn_send(c, q);
		}
	}
	tx->rolled_back = true;
	tx->state = DB_TX_DONE;
}

/* ROLLBACK and free the tx now; no further callbacks for it. */
void db_tx_rollback(struct db_tx *tx)
{
	if (tx == NULL || !tx->user)
		return;
	db_tx_abandon(tx); /* the user's reference keeps tx alive */
	db_tx_release(tx);
}

/* ---- LISTEN/NOTIFY ---- */

static bool db_channel_valid(const char *name)
{
	size_t n = 0;

	if (name == NULL)
		return false;
	for (; name[n] != '\0'; n++)
		if (!((name[n] >= 'a' && name[n] <= 'z') || (name[n] >= '0' && name[n] <= '9') ||
		      name[n] == '_'))
			return false;
	return n >= 1 && n <= DB_CHANNEL_MAX;
}

static void db_channel_sweep(struct db_pool *pool, struct db_channel *ch)
{
	struct db_subscription *s, *next;

	if (ch->iterating > 0)
		return;
	for (s = TAILQ_FIRST(&ch->subs); s != NULL; s = next) {
		next = TAILQ_NEXT(s, entry);
		if (s->dead) {
			TAILQ_REMOVE(&ch->subs, s, entry);
			free(s);
		}
	}
	if (ch->nsubs == 0 && !ch->listening) {
		TAILQ_REMOVE(&pool->channels, ch, entry);
		free(ch);
	}
}

/* Deliver one notification to the channel's subscribers as of now. */
static void db_channel_deliver(struct db_pool *pool, struct db_channel *ch, const char *payload)
{
	struct db_subscription *s, *last;

	last = TAILQ_LAST(&ch->subs, db_sublist);
	ch->iterating++;
	for (s = TAILQ_FIRST(&ch->subs); s != NULL; s = TAILQ_NEXT(s, entry)) {
		if (!s->dead)
			s->cb(s->arg, ch->name, payload);
		if (s == last || pool->dying)
			break;
	}
	ch->iterating--;
	if (!pool->dying && ch->iterating == 0)
		db_channel_sweep(pool, ch);
}

/*
 * Bring the listener's LISTEN set in line with the subscriptions: one
 * simple-query command at a time, sent when the previous one finished.
 */
static void db_listener_sync(struct db_pool *pool)
{
	struct db_conn *c = pool->listener;
	struct db_channel *ch, *next;
	size_t len = 1, off = 0;
	char *cmd;

	if (c->state != DB_CONN_READY || c->lbusy || pool->dying)
		return;
	TAILQ_FOREACH (ch, &pool->channels, entry)
		len += sizeof("UNLISTEN \"\";") + DB_CHANNEL_MAX;
	cmd = xmalloc(len);
	cmd[0] = '\0';
	for (ch = TAILQ_FIRST(&pool->channels); ch != NULL; ch = next) {
		next = TAILQ_NEXT(ch, entry);
		if (ch->nsubs > 0 && !ch->listening) {
			off += (size_t)snprintf(cmd + off, len - off, "LISTEN \"%s\";", ch->name);
			ch->listening = true;
		} else if (ch->nsubs == 0 && ch->listening) {
			off += (size_t)snprintf(cmd + off, len - off, "UNLISTEN \"%s\";", ch->name);
			ch->listening = false;
		}
		if (ch->nsubs == 0 && !ch->listening && ch->iterating == 0)
			db_channel_sweep(pool, ch);
	}
	if (off > 0) {
		if (PQsendQuery(c->pg, cmd) == 1)
			c->lbusy = true;
		else
			db_conn_fail(c, PQerrorMessage(c->pg));
		db_conn_flush(c);
	}
	free(cmd);
}

/* Subscribe to NOTIFY on channel; NULL for an invalid name. */
struct db_subscription *db_subscribe(struct db_pool *pool, const char *channel, db_notify_cb cb,
                                     void *arg)
{
	struct db_subscription *s;
	struct db_channel *ch;

	if (pool == NULL || pool->dying || cb == NULL || !db_channel_valid(channel)) {
		log_warnx("db_subscribe_invalid", "bad subscription");
		return NULL;
	}
	TAILQ_FOREACH (ch, &pool->channels, entry)
		if (strcmp(ch->name, channel) == 0)
			break;
	if (ch == NULL) {
		ch = xcalloc(1, sizeof(*ch));
		TAILQ_INIT(&ch->subs);
		snprintf(ch->name, sizeof(ch->name), "%s", channel);
		TAILQ_INSERT_TAIL(&pool->channels, ch, entry);
	}
	s = xcalloc(1, sizeof(*s));
	s->pool = pool;
	s->chan = ch;
	s->cb = cb;
	s->arg = arg;
	TAILQ_INSERT_TAIL(&ch->subs, s, entry);
	ch->nsubs++;
	db_listener_sync(pool);
	return s;
}

/* Stop receiving; UNLISTEN when the channel has no subscriber left. */
void db_unsubscribe(struct db_subscription *sub)
{
	struct db_pool *pool;
	struct db_channel *ch;

	if (sub == NULL || sub->dead)
		return;
	pool = sub->pool;
	ch = sub->chan;
	ch->nsubs--;
	sub->dead = true;
	sub->cb = NULL;
	if (ch->iterating > 0)
		return; /* unlinked when delivery finishes */
	TAILQ_REMOVE(&ch->subs, sub, entry);
	free(sub);
	if (ch->nsubs == 0) {
		if (ch->listening)
			db_listener_sync(pool);
		else
			db_channel_sweep(pool, ch);
	}
}
