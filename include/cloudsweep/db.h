/*
 * db.h - the asynchronous PostgreSQL pool a worker owns.
 *
 * Every connection is non-blocking libpq driven by the worker's event_base,
 * in pipeline mode so that several independent queries are in flight on one
 * connection (one Sync per query, so a failing query never poisons its
 * neighbours; reads registered with db_pool_prepare_read share a Sync per
 * loop pass, and those a failing neighbour skipped are run again). Queries
 * are parameterized only; frequently used statements are registered once
 * with db_pool_prepare() and prepared on every connection as it comes up.
 * A transaction pins one connection until it commits or rolls back. A dedicated connection LISTENs
 * for the channels that have subscribers and fans NOTIFY payloads out to them.
 *
 * Connections that fail are re-opened with exponential backoff and jitter.
 * While no connection is up, new queries fail at once with DB_UNAVAILABLE
 * so the API can answer 503 instead of queueing forever.
 *
 * Every asynchronous call returns a handle that can be cancelled; after
 * cancellation the callback is never invoked, so an owner that goes away
 * cancels what it has pending and no late callback touches freed memory.
 */
#ifndef CLOUDSWEEP_DB_H
#define CLOUDSWEEP_DB_H

#include <event2/event.h>
#include <libpq-fe.h>
#include <stdbool.h>

#include "cloudsweep/util.h"

struct db_pool;
struct db_query;
struct db_tx;
struct db_subscription;

enum db_event {
	DB_OK,          /* the query ran; res is its result (TUPLES_OK or COMMAND_OK) */
	DB_ERROR,       /* the server answered with an error; res holds it */
	DB_UNAVAILABLE, /* no connection, or the connection died; res is NULL */
	DB_TIMEOUT,     /* the query did not finish within its deadline; res is NULL */
};

/*
 * Result callback. res is borrowed and valid only during the call. For
 * DB_ERROR, PQresultErrorField(res, PG_DIAG_SQLSTATE) tells what failed.
 * A callback may queue, cancel, commit, roll back, unsubscribe or even free
 * the pool. Pass a NULL cb to ignore a query's result.
 */
typedef void (*db_cb)(void *arg, enum db_event ev, const PGresult *res);

/* NOTIFY callback: channel and payload are borrowed for the call. */
typedef void (*db_notify_cb)(void *arg, const char *channel, const char *payload);

struct db_pool_stats {
	int size;      /* configured connections */
	int connected; /* connections up and idle or busy */
	int in_use;    /* connections with queries in flight or pinned by a transaction */
	int waiting;   /* queries queued for a connection */
	unsigned long reconnects; /* connections re-opened since start */
};

/*
 * Create a pool of size connections (plus one listener connection) using
 * conninfo; connecting starts at once and proceeds in the background.
 * application_name is "cloudsweepd" unless conninfo or PGAPPNAME sets one.
 * query_timeout_ms bounds each query from the moment it is queued (0 for
 * none): on expiry its callback gets DB_TIMEOUT and, if it was already
 * sent, its connection is reset (the other queries in flight there get
 * DB_UNAVAILABLE). Returns NULL on bad arguments or unparsable conninfo.
 */
struct db_pool *db_pool_new(struct event_base *base, const char *conninfo, int size,
                            int query_timeout_ms);
/*
 * Close every connection; pending callbacks are invoked with DB_UNAVAILABLE
 * first. May be called from a pool callback. Every handle of the pool
 * (queries, transactions, subscriptions) is invalid afterwards.
 */
void db_pool_free(struct db_pool *pool);
/* True when at least one query connection is up. */
bool db_pool_ready(const struct db_pool *pool);
/* Fill *st with current counters. */
void db_pool_stats(const struct db_pool *pool, struct db_pool_stats *st);

/*
 * Register a named statement that every connection prepares when it comes
 * up. Call before or after connections exist; returns 0 or -1 (duplicate).
 * A connection pinned by a transaction prepares it once the transaction
 * ends. Invalid SQL is logged; executing it then fails with DB_ERROR.
 */
int db_pool_prepare(struct db_pool *pool, const char *name, const char *sql, int nparams);
/*
 * Register a statement without side effects (a plain SELECT of tables, no
 * volatile functions that write). Its executions outside transactions may
 * share one Sync with the other reads sent in the same loop pass, so the
 * server answers a burst of them as one implicit transaction; when one of
 * them fails, those after it are run again, transparently.
 */
int db_pool_prepare_read(struct db_pool *pool, const char *name, const char *sql, int nparams);

/*
 * Queue a parameterized query (text parameters; NULL entries are SQL NULL).
 * params are copied, so the caller may free them on return. Returns a handle,
 * or NULL when the pool has no connection up (callback not invoked; the
 * caller answers 503).
 */
struct db_query *db_query(struct db_pool *pool, const char *sql, int nparams,
                          const char *const *params, db_cb cb, void *arg);
/* Like db_query for a statement registered with db_pool_prepare. */
struct db_query *db_query_prepared(struct db_pool *pool, const char *name, int nparams,
                                   const char *const *params, db_cb cb, void *arg);
/*
 * Forget a pending query: its callback will not run. The handle is invalid
 * afterwards, and also once its callback has returned (cancelling from inside
 * its own callback is harmless). A cancelled query already sent still
 * occupies its connection until its result arrives.
 */
void db_query_cancel(struct db_query *q);

/*
 * Start a transaction: pins a connection and runs BEGIN. cb is called once
 * with DB_OK (tx usable) or a failure (tx already freed).
 * Returns NULL when the pool is unavailable (cb not invoked).
 * Queries queued before cb runs are held until BEGIN succeeds; if it fails
 * they get DB_UNAVAILABLE before cb. If the connection dies later, the
 * pending queries get DB_UNAVAILABLE and the tx refuses new ones; the
 * caller still ends it with db_tx_commit (DB_UNAVAILABLE) or db_tx_rollback.
 */
struct db_tx *db_tx_begin(struct db_pool *pool, db_cb cb, void *arg);
/* Queue a query inside the transaction; as db_query, but NULL once committing or dead. */
struct db_query *db_tx_query(struct db_tx *tx, const char *sql, int nparams,
                             const char *const *params, db_cb cb, void *arg);
/* Prepared-statement variant of db_tx_query. */
struct db_query *db_tx_query_prepared(struct db_tx *tx, const char *name, int nparams,
                                      const char *const *params, db_cb cb, void *arg);
/*
 * COMMIT; cb gets DB_OK when committed. The tx is freed after cb returns.
 * If an earlier statement failed, the server rolls back instead: cb gets
 * DB_ERROR with a COMMAND_OK res whose PQcmdStatus is "ROLLBACK" (no
 * SQLSTATE). On a dead tx cb gets DB_UNAVAILABLE on the next loop pass.
 */
void db_tx_commit(struct db_tx *tx, db_cb cb, void *arg);
/* ROLLBACK and free the tx now; no further callbacks for it. Safe after a failed query. */
void db_tx_rollback(struct db_tx *tx);

/*
 * Subscribe to NOTIFY on channel (an identifier: [a-z0-9_]{1,63}; NULL
 * otherwise). The listener connection LISTENs on first subscriber and
 * re-LISTENs after reconnecting; notifications sent while it is down are lost.
 */
struct db_subscription *db_subscribe(struct db_pool *pool, const char *channel, db_notify_cb cb,
                                     void *arg);
/* Stop receiving; the handle is invalid afterwards. */
void db_unsubscribe(struct db_subscription *sub);

/*
 * Apply the migrations in sqldir (files NNN_name.sql, in numeric order; other
 * names are ignored) that are not yet recorded in schema_migrations, each in
 * its own transaction with its record, serialized across concurrent runners
 * with an advisory lock. A file must not contain transaction control or
 * statements that cannot run in a transaction block. Blocking: for the
 * `migrate` command and tests, never on a worker's reactor.
 * Returns the number applied, or -1 on error (logged).
 */
int db_migrate(const char *conninfo, const char *sqldir);

#endif
