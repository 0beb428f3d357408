/*
 * router.c - routes (method + path pattern with {parameters}), the
 * middleware chain, and http_dispatch(), where every parsed request enters:
 * request id -> route match (404/405) -> middleware stages -> handler.
 */
#include "config.h"

#include <stdlib.h>
#include <string.h>

#include "cloudsweep/db.h"
#include "cloudsweep/http.h"
#include "cloudsweep/log.h"
#include "cloudsweep/worker.h"

#define ROUTER_MAX_MW 16

struct router {
	struct route *routes[METRICS_MAX_ROUTES]; /* owned */
	int nroutes;
	const char
	    *names[METRICS_MAX_ROUTES + 1]; /* names[i] borrowed from routes; [0] "unmatched" */
	http_middleware_fn mw[ROUTER_MAX_MW];
	int nmw;
};

/* Split "/a/b/{c}" into owned segments; returns the count. */
static int router_split(const char *pattern, char ***segsp)
{
	char **segs = NULL;
	int n = 0;
	const char *p = pattern;

	while (*p == '/') {
		const char *e = strchr(p + 1, '/');
		size_t len = e ? (size_t)(e - p - 1) : strlen(p + 1);

		segs = xrealloc(segs, sizeof(*segs) * (size_t)(n + 1));
		segs[n++] = xstrndup(p + 1, len);
		if (e == NULL)
			break;
		p = e;
	}
	*segsp = segs;
	return n;
}

struct router *router_new(void)
{
	struct router *r = xcalloc(1, sizeof(*r));

	r->names[0] = "unmatched";
	return r;
}

void router_free(struct router *r)
{
	if (r == NULL)
		return;
	for (int i = 0; i < r->nroutes; i++) {
		struct route *rt = r->routes[i];

		for (int j = 0; j < rt->nsegs; j++)
			free(rt->segs[j]);
		free(rt->segs);
		free((char *)rt->pattern);
		free((char *)rt->method);
		free(rt);
	}
	free(r);
}

int router_count(const struct router *r)
{
	return r->nroutes;
}

const struct route *router_route(const struct router *r, int i)
{
	return r->routes[i];
}

const struct route *router_add(struct router *r, const char *method, const char *pattern,
                               http_handler_fn handler, unsigned flags)
{
	return router_add_perm(r, method, pattern, handler, flags, NULL);
}

const struct route *router_add_perm(struct router *r, const char *method, const char *pattern,
                                    http_handler_fn handler, unsigned flags, const char *perm)
{
	struct route *rt;

	if (r->nroutes + 1 >= METRICS_MAX_ROUTES)
		fatalx("router", "too many routes");
	/* An API route without a stated guard is a bug: refuse to start with it. */
	if (strncmp(pattern, "/api/", 5) == 0 && perm == NULL &&
	    !(flags & (ROUTE_PUBLIC | ROUTE_SELF)))
		fatalx("router", "%s %s names no permission", method, pattern);
	rt = xcalloc(1, sizeof(*rt));
	rt->method = xstrdup(method);
	rt->pattern = xstrdup(pattern);
	rt->handler = handler;
	rt->flags = flags;
	rt->perm = perm;
	rt->nsegs = router_split(pattern, &rt->segs);
	r->routes[r->nroutes++] = rt;
	rt->index = r->nroutes;
	r->names[rt->index] = rt->pattern;
	return rt;
}

void router_use(struct router *r, http_middleware_fn mw)
{
	if (r->nmw >= ROUTER_MAX_MW)
		fatalx("router", "too many middleware stages");
	r->mw[r->nmw++] = mw;
}

const char *const *router_route_names(const struct router *r, int *n)
{
	*n = r->nroutes + 1;
	return r->names;
}

/* Match path against rt, filling params on success. */
static bool router_match_one(const struct route *rt, struct http_request *req)
{
	const char *p = req->path;
	int seg = 0, np = 0;

	while (*p == '/' && seg < rt->nsegs) {
		const char *e = strchr(p + 1, '/');
		size_t len = e ? (size_t)(e - p - 1) : strlen(p + 1);
		const char *pat = rt->segs[seg];

		if (pat[0] == '{') {
			char *v;

			if (len == 0 || np >= HTTP_MAX_PARAMS)
				return false;
			v = http_pct_decode(req, p + 1, len, false);
			if (v == NULL)
				return false;
			req->param_names[np] = pat; /* "{id}": compared without braces below */
			req->param_values[np++] = v;
		} else if (strlen(pat) != len || strncmp(pat, p + 1, len) != 0) {
			return false;
		}
		seg++;
		p += 1 + len;
	}
	if (*p != '\0' || seg != rt->nsegs)
		return false;
	req->nparams = np;
	return true;
}

int router_match(const struct router *r, struct http_request *req, char *allow, size_t allowlen)
{
	bool path_matched = false;

	if (allowlen > 0)
		allow[0] = '\0';
	if (req->path == NULL)
		return 404;
	for (int i = 0; i < r->nroutes; i++) {
		const struct route *rt = r->routes[i];
		bool same_method =
		    strcmp(rt->method, req->method) == 0 ||
		    (strcmp(req->method, "HEAD") == 0 && strcmp(rt->method, "GET") == 0);

		if (!router_match_one(rt, req))
			continue;
		if (same_method) {
			req->route = rt;
			return 0;
		}
		if (path_matched)
			strncat(allow, ", ", allowlen - strlen(allow) - 1);
		strncat(allow, rt->method, allowlen - strlen(allow) - 1);
		path_matched = true;
	}
	req->nparams = 0;
	return path_matched ? 405 : 404;
}

/* Route parameter names are stored as "{name}"; compare the inside. */
const char *http_param(const struct http_request *req, const char *name)
{
	size_t n = strlen(name);

	for (int i = 0; i < req->nparams; i++) {
		const char *pn = req->param_names[i];

		if (strncmp(pn + 1, name, n) == 0 && pn[n + 1] == '}' && pn[n + 2] == '\0')
			return req->param_values[i];
	}
	return NULL;
}

/* A client-supplied request id is echoed only if it is short and plain. */
static bool router_sane_request_id(const char *id)
{
	size_t n = 0;

	for (; id[n] != '\0'; n++) {
		char ch = id[n];

		if (n >= HTTP_REQUEST_ID_MAX)
			return false;
		if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
		      (ch >= '0' && ch <= '9') || ch == '-' || ch == '_' || ch == '.'))
			return false;
	}
	return n >= 1;
}

void http_next(struct http_request *req)
{
	const struct router *r = req->router;

	if (req->mw_next < r->nmw) {
		r->mw[req->mw_next++](req);
		return;
	}
	req->route->handler(req);
}

void http_dispatch(struct http_request *req)
{
	const char *rid = http_header(req, "X-Request-Id");
	char allow[128];
	int rc;

	if (rid != NULL && router_sane_request_id(rid))
		snprintf(req->request_id, sizeof(req->request_id), "%s", rid);
	else
		cs_uuid4(req->request_id);

	rc = router_match(req->router, req, allow, sizeof(allow));
	if (rc == 405) {
		http_add_header(req, "Allow", allow);
		http_error(req, 405, "method_not_allowed", "%s is not allowed here; allowed: %s",
		           req->method, allow);
		return;
	}
	if (rc != 0) {
		http_error(req, 404, "not_found", "no such resource");
		return;
	}
	req->mw_next = 0;
	http_next(req);
}

/* Middleware: answer 503 for routes that need the database while it is unreachable. */
void http_mw_db_gate(struct http_request *req)
{
	if ((req->route->flags & ROUTE_NEEDS_DB) && cs_worker != NULL &&
	    (cs_worker->db == NULL || !db_pool_ready(cs_worker->db))) {
		http_error(req, 503, "unavailable", "the database is unreachable; retry later");
		return;
	}
	http_next(req);
}
