/*
 * op.c - the plumbing of handlers that wait on Postgres. An op holds the one
 * query it waits for and the transaction it has open; every result comes
 * back to the handler's single advance function, and a client that goes
 * away cancels the query and rolls the transaction back, so no late
 * callback touches a freed request and no half-done action commits.
 */
#include "config.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cloudsweep/db.h"
#include "cloudsweep/http.h"
#include "cloudsweep/log.h"
#include "cloudsweep/worker.h"

/*
 * A COMMIT cannot be called back off; if the client leaves while it runs,
 * this small record outlives the request and swallows the answer.
 */
struct http_op_commit {
	struct http_op *op; /* borrowed; NULL once the request is gone */
};

static void http_op_cancel_cb(struct http_request *req, void *arg)
{
	struct http_op *op = arg;

	if (op->on_cancel != NULL)
		op->on_cancel(op);
	if (op->committing != NULL)
		op->committing->op = NULL;
	op->committing = NULL;
	if (op->q != NULL)
		db_query_cancel(op->q);
	op->q = NULL;
	http_op_rollback(op);
}

void *http_op_new(struct http_request *req, size_t size, http_op_fn advance)
{
	struct http_op *op = http_alloc(req, size);

	memset(op, 0, size);
	op->req = req;
	op->advance = advance;
	http_set_cancel(req, http_op_cancel_cb, op);
	return op;
}

void http_op_db_cb(void *arg, enum db_event ev, const PGresult *res)
{
	struct http_op *op = arg;

	op->q = NULL;
	op->advance(op, ev, res);
}

void http_op_track(struct http_op *op, struct db_query *q)
{
	op->q = q;
}

static struct db_pool *http_op_pool(void)
{
	return cs_worker != NULL ? cs_worker->db : NULL;
}

int http_op_query(struct http_op *op, const char *sql, int n, const char *const *params)
{
	struct db_pool *pool = http_op_pool();

	if (op->tx != NULL)
		op->q = db_tx_query(op->tx, sql, n, params, http_op_db_cb, op);
	else if (pool != NULL)
		op->q = db_query(pool, sql, n, params, http_op_db_cb, op);
	else
		op->q = NULL;
	if (op->q == NULL) {
		http_op_fail(op, 503, "unavailable", "the database is unreachable; retry later");
		return -1;
	}
	return 0;
}

int http_op_prepared(struct http_op *op, const char *name, int n, const char *const *params)
{
	struct db_pool *pool = http_op_pool();

	if (op->tx != NULL)
		op->q = db_tx_query_prepared(op->tx, name, n, params, http_op_db_cb, op);
	else if (pool != NULL)
		op->q = db_query_prepared(pool, name, n, params, http_op_db_cb, op);
	else
		op->q = NULL;
	if (op->q == NULL) {
		http_op_fail(op, 503, "unavailable", "the database is unreachable; retry later");
		return -1;
	}
	return 0;
}

static void http_op_begin_cb(void *arg, enum db_event ev, const PGresult *res)
{
	struct http_op *op = arg;

	if (ev != DB_OK)
		op->tx = NULL; /* the pool freed it */
	op->advance(op, ev, res);
}

int http_op_begin(struct http_op *op)
{
	struct db_pool *pool = http_op_pool();

	op->tx = pool != NULL ? db_tx_begin(pool, http_op_begin_cb, op) : NULL;
	if (op->tx == NULL) {
		http_op_fail(op, 503, "unavailable", "the database is unreachable; retry later");
		return -1;
	}
	return 0;
}

static void http_op_commit_cb(void *arg, enum db_event ev, const PGresult *res)
{
	struct http_op_commit *c = arg;
	struct http_op *op = c->op;

	free(c);
	if (op == NULL)
		return; /* the client left; the commit went on without it */
	op->committing = NULL;
	op->advance(op, ev, res);
}

void http_op_commit(struct http_op *op)
{
	struct db_tx *tx = op->tx;

	/* From here the transaction belongs to the pool: nobody may roll it back. */
	op->tx = NULL;
	if (tx == NULL) {
		http_op_fail(op, 500, "internal", "no transaction to commit");
		return;
	}
	op->committing = xcalloc(1, sizeof(*op->committing));
	op->committing->op = op;
	db_tx_commit(tx, http_op_commit_cb, op->committing);
}

void http_op_rollback(struct http_op *op)
{
	if (op->tx != NULL)
		db_tx_rollback(op->tx);
	op->tx = NULL;
}

void http_op_fail(struct http_op *op, int status, const char *code, const char *fmt, ...)
{
	char msg[512];
	va_list ap;

	if (op->q != NULL)
		db_query_cancel(op->q);
	op->q = NULL;
	http_op_rollback(op);
	if (op->on_cancel != NULL)
		op->on_cancel(op);
	http_set_cancel(op->req, NULL, NULL);
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	http_error(op->req, status, code, "%s", msg);
}

void http_op_db_fail(struct http_op *op, enum db_event ev, const PGresult *res)
{
	const char *state = res != NULL ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;

	if (ev == DB_UNAVAILABLE || ev == DB_TIMEOUT) {
		http_op_fail(op, 503, "unavailable", "the database is unreachable; retry later");
		return;
	}
	if (state != NULL && strncmp(state, "22", 2) == 0) {
		/* Data exceptions come from client values (a bad timestamp or id in a filter). */
		http_op_fail(op, 400, "invalid_request", "a parameter has an invalid value");
		return;
	}
	log_warnx("db_error", "%s",
	          res != NULL ? PQresultErrorMessage(res) : "query failed without a result");
	http_op_fail(op, 500, "internal", "internal error");
}

void http_op_json_advance(struct http_op *op, enum db_event ev, const PGresult *res)
{
	const char *doc;

	if (ev != DB_OK) {
		http_op_db_fail(op, ev, res);
		return;
	}
	http_set_cancel(op->req, NULL, NULL);
	if (PQntuples(res) != 1 || PQgetisnull(res, 0, 0)) {
		http_error(op->req, 404, "not_found", "not found");
		return;
	}
	doc = PQgetvalue(res, 0, 0);
	http_respond(op->req, 200, "application/json", doc, strlen(doc));
}

void http_op_read_json(struct http_request *req, const char *stmt, int n, const char *const *params)
{
	struct http_op *op = http_op_new(req, sizeof(*op), http_op_json_advance);

	(void)http_op_prepared(op, stmt, n, params);
}
