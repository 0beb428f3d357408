/*
 * http.h - requests, responses, the router and the middleware chain.
 *
 * The connection layer (net/) parses a request with llhttp into a struct
 * http_request and hands it to http_dispatch(). The request then runs the
 * middleware chain (request id -> database gate -> ... -> route handler);
 * each stage either answers or calls http_next(). Stages and handlers may
 * be asynchronous: they return without answering, keep a cancellable handle
 * to their pending work, and register it with http_set_cancel() so that a
 * client that goes away cancels it (the cancel callback runs, then the
 * request is freed; the handler must not touch it afterwards).
 *
 * Every answer leaves through http_respond() (or a helper built on it),
 * which builds the whole response - status line, headers, body - in one
 * buffer that the connection writes as one TLS record. Errors leave through
 * http_error(), which writes the API's error shape.
 *
 * Per-request scratch memory comes from the request's pool (http_alloc and
 * friends) and is freed with the request.
 */
#ifndef CLOUDSWEEP_HTTP_H
#define CLOUDSWEEP_HTTP_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cloudsweep/db.h"
#include "cloudsweep/util.h"

struct conn;
struct router;
struct http_request;

#define HTTP_MAX_PARAMS     8
#define HTTP_REQUEST_ID_MAX 64

struct http_header {
	const char *name;  /* pool-owned, as received */
	const char *value; /* pool-owned, trimmed */
};

/* A chunk of the request's scratch pool. */
struct http_pool_chunk;

typedef void (*http_handler_fn)(struct http_request *req);
typedef void (*http_cancel_fn)(struct http_request *req, void *arg);
/* A middleware stage: answer, or call http_next(req) now or later. */
typedef void (*http_middleware_fn)(struct http_request *req);

enum route_flags {
	ROUTE_NEEDS_DB = 1 << 0, /* answer 503 while the database is unreachable */
	ROUTE_PUBLIC = 1 << 1,   /* no authentication: the handler decides who may call */
	ROUTE_SELF = 1 << 2,     /* any authenticated caller, about themselves */
	ROUTE_NO_CSRF = 1 << 3,  /* cookie requests need no CSRF token (login flows) */
};

/* Who is calling, as the authentication middleware established it. */
struct http_auth {
	bool authenticated;
	bool via_cookie; /* the access token came from the cs_access cookie */
	char user_id[37];
	char org_id[37];
	char session_id[37];
	char jti[37];
	char role[16];
	long long exp; /* the access token's expiry, seconds since the epoch */
};

struct route {
	const char *method;  /* "GET", ... */
	const char *pattern; /* "/api/v1/scans/{id}" */
	http_handler_fn handler;
	unsigned flags;
	const char *perm; /* the permission the route needs ("scans:read"), or NULL */
	int index;        /* metrics index; 0 is reserved for unmatched requests */
	int nsegs;
	char **segs; /* owned; "{name}" segments are parameters */
};

struct http_request {
	struct conn *conn;           /* borrowed; the connection that owns this request */
	const struct router *router; /* borrowed; routes and middleware */
	uint64_t start_us;
	const char *method;          /* pool-owned */
	char *target;                /* pool-owned raw request target */
	char *path;                  /* pool-owned path part of target, not decoded */
	char *query;                 /* pool-owned query string without '?', or NULL */
	struct http_header *headers; /* pool-owned array */
	int nheaders;
	char *body; /* pool-owned, NUL-terminated; body_len bytes */
	size_t body_len;
	char request_id[HTTP_REQUEST_ID_MAX + 1];
	char client_ip[64];
	bool keep_alive;

	const struct route *route; /* matched route, or NULL */
	int nparams;
	const char *param_names[HTTP_MAX_PARAMS];
	const char *param_values[HTTP_MAX_PARAMS]; /* pool-owned, percent-decoded */

	struct http_auth auth; /* filled by the authentication middleware */

	int mw_next; /* next middleware stage to run */
	http_cancel_fn cancel;
	void *cancel_arg;
	bool responded;
	int status;

	/* Extra response headers added by handlers: "Name: value\r\n" lines. */
	char *resp_headers; /* pool-owned */
	size_t resp_headers_len;

	struct http_pool_chunk *pool; /* owned chunks */
};

/* Allocate n bytes from the request's pool (freed with the request). */
void *http_alloc(struct http_request *req, size_t n);
/* Copy len bytes plus a NUL into the request's pool. */
char *http_strndup(struct http_request *req, const char *s, size_t len);
/* Free the request and its pool (connection layer only). */
void http_request_free(struct http_request *req);
/* A fresh request for a connection (connection layer only; conn may be NULL in tests). */
struct http_request *http_request_new(struct conn *conn, const struct router *router);

/* The value of header name (case-insensitive), or NULL. */
const char *http_header(const struct http_request *req, const char *name);
/* The percent-decoded value of route parameter name, or NULL. */
const char *http_param(const struct http_request *req, const char *name);
/* The percent-decoded value of query argument name (first one), or NULL. */
const char *http_query_arg(struct http_request *req, const char *name);
/* Percent-decode [s, s+len) into the pool ('+' is a space when form is true); NULL if malformed. */
char *http_pct_decode(struct http_request *req, const char *s, size_t len, bool form);

/* Register what to call if the request is abandoned (client gone, shutdown). */
void http_set_cancel(struct http_request *req, http_cancel_fn fn, void *arg);
/* Add a response header; name and value must be sane (no CR/LF). */
void http_add_header(struct http_request *req, const char *name, const char *value);
/* Answer with a body of len bytes (content_type may be NULL when len is 0). */
void http_respond(struct http_request *req, int status, const char *content_type, const char *body,
                  size_t len);
/* Answer with a JSON document (steals the reference). */
void http_respond_json(struct http_request *req, int status, json_t *doc);
/* Answer with the API error shape {"error":{code,message},"request_id"}. */
void http_error(struct http_request *req, int status, const char *code, const char *fmt, ...)
    CS_PRINTF(4, 5);
/*
 * Build the wire bytes of a response (status line, headers, body) into one
 * malloc'd buffer; *lenp receives its length. Used by http_respond.
 */
char *http_build_response(struct http_request *req, int status, const char *content_type,
                          const char *body, size_t len, size_t *lenp);
/* The standard reason phrase of status. */
const char *http_reason(int status);

/* Run the next middleware stage, or the route handler after the last. */
void http_next(struct http_request *req);
/* Start processing a parsed request (connection layer only). */
void http_dispatch(struct http_request *req);

/* Create an empty router. */
struct router *router_new(void);
/* Free a router and its routes. */
void router_free(struct router *r);
/* Number of routes registered on r. */
int router_count(const struct router *r);
/* Route i (0 <= i < router_count), in registration order. */
const struct route *router_route(const struct router *r, int i);
/* Add a route; pattern segments "{name}" match one path segment. Returns the route. */
const struct route *router_add(struct router *r, const char *method, const char *pattern,
                               http_handler_fn handler, unsigned flags);
/* Like router_add, naming the permission the route needs (NULL: see flags). */
const struct route *router_add_perm(struct router *r, const char *method, const char *pattern,
                                    http_handler_fn handler, unsigned flags, const char *perm);
/* Append a middleware stage (runs in the order added, before the handler). */
void router_use(struct router *r, http_middleware_fn mw);
/*
 * Match req->method/req->path: sets req->route and params and returns 0;
 * returns 404 when no pattern matches, 405 when only the method differs (then
 * allow receives the allowed methods, comma-separated).
 */
int router_match(const struct router *r, struct http_request *req, char *allow, size_t allowlen);
/* Route names for metrics, index 0 is "unmatched"; *n receives the count. */
const char *const *router_route_names(const struct router *r, int *n);

/* Middleware: 503 with Retry-After for ROUTE_NEEDS_DB routes while the database is down. */
void http_mw_db_gate(struct http_request *req);
/* Parse a request body as a JSON object (depth and size bounded); on failure answers 400 and
 * returns NULL. */
json_t *http_json_body(struct http_request *req);
/* Register the core handlers: /health, /ready, /metrics. */
void http_core_routes(struct router *r);

/*
 * A handler that waits on the database is a small state machine: a struct
 * that starts with struct http_op, an enum of states in op->state, and one
 * advance function that every query result, transaction step and audit
 * write of the op comes back to. The op owns at most one pending query and
 * one open transaction; if the client goes away both are cancelled (the
 * transaction rolled back) and advance is never called again.
 */
struct http_op;
typedef void (*http_op_fn)(struct http_op *op, enum db_event ev, const PGresult *res);

struct http_op {
	struct http_request *req;              /* borrowed; the request this op answers */
	struct db_query *q;                    /* pending query, or NULL */
	struct db_tx *tx;                      /* open transaction, or NULL */
	struct http_op_commit *committing;     /* owned by the pool callback while COMMIT runs */
	int state;                             /* the handler's own enum */
	http_op_fn advance;                    /* called with every result */
	void (*on_cancel)(struct http_op *op); /* cancels the handler's own pending work */
};

/* Allocate an op of size bytes (>= sizeof(struct http_op)) from req's pool. */
void *http_op_new(struct http_request *req, size_t size, http_op_fn advance);
/* Run a parameterized query (inside the op's transaction when one is open); -1 answers 503. */
int http_op_query(struct http_op *op, const char *sql, int n, const char *const *params);
/* Like http_op_query for a statement registered with db_pool_prepare. */
int http_op_prepared(struct http_op *op, const char *name, int n, const char *const *params);
/* BEGIN; advance gets DB_OK with res NULL when the transaction is open. -1 answers 503. */
int http_op_begin(struct http_op *op);
/* COMMIT; advance gets DB_OK when committed (op->tx is NULL again). */
void http_op_commit(struct http_op *op);
/* Roll back the open transaction, if any. */
void http_op_rollback(struct http_op *op);
/* Hand the op's pending-query slot a query started elsewhere (e.g. audit_write). */
void http_op_track(struct http_op *op, struct db_query *q);
/* The callback to pass to such a query, with op as its argument. */
void http_op_db_cb(void *arg, enum db_event ev, const PGresult *res);
/* Roll back and answer the error shape; the usual way a failing op ends. */
void http_op_fail(struct http_op *op, int status, const char *code, const char *fmt, ...)
    CS_PRINTF(4, 5);
/* Answer a database failure: 503 when unavailable or timed out, 500 otherwise. */
void http_op_db_fail(struct http_op *op, enum db_event ev, const PGresult *res);
/*
 * Answer the JSON document a statement returned in row 0, column 0 (200),
 * 404 when it returned no row or NULL. Start it with
 * http_op_read_json(req, stmt, n, params) for a prepared statement.
 */
void http_op_json_advance(struct http_op *op, enum db_event ev, const PGresult *res);
void http_op_read_json(struct http_request *req, const char *stmt, int n,
                       const char *const *params);

#endif
