/*
 * rbac.c - roles, the permission matrix of the API contract, and the
 * middleware that authenticates a caller and authorizes the route. The
 * matrix is data: each permission names the lowest role that holds it, and
 * billing:* carries an explicit deny for admin that no allow can override.
 * Every route names a permission, or is marked public or self-service;
 * auth_routes_check() refuses a router where one does not (the unit tests
 * and start-up both run it), so a route cannot be added unguarded.
 */
#include "config.h"

#include <string.h>
#include <time.h>

#include "cloudsweep/auth.h"
#include "cloudsweep/log.h"
#include "auth_int.h"

static const char *const role_names[] = { "none", "viewer", "member", "admin", "owner" };

static const struct {
	const char *perm;
	enum auth_role min_role;
} perm_matrix[] = {
	{ "scans:read", AUTH_ROLE_VIEWER },          { "waste_items:read", AUTH_ROLE_VIEWER },
	{ "reports:read", AUTH_ROLE_VIEWER },        { "scans:create", AUTH_ROLE_MEMBER },
	{ "waste_items:approve", AUTH_ROLE_MEMBER }, { "aws_accounts:read", AUTH_ROLE_MEMBER },
	{ "aws_accounts:write", AUTH_ROLE_ADMIN },   { "waste_items:cleanup", AUTH_ROLE_ADMIN },
	{ "members:read", AUTH_ROLE_VIEWER },        { "members:manage", AUTH_ROLE_ADMIN },
	{ "audit:read", AUTH_ROLE_ADMIN },           { "keys:rotate", AUTH_ROLE_ADMIN },
	{ "security:read", AUTH_ROLE_ADMIN },        { "billing:read", AUTH_ROLE_OWNER },
	{ "security:manage", AUTH_ROLE_ADMIN },      { "billing:manage", AUTH_ROLE_OWNER },
};

enum auth_role auth_role_parse(const char *s)
{
	if (s == NULL)
		return AUTH_ROLE_NONE;
	for (size_t i = 1; i < CS_ARRAY_LEN(role_names); i++)
		if (strcmp(s, role_names[i]) == 0)
			return (enum auth_role)i;
	return AUTH_ROLE_NONE;
}

const char *auth_role_name(enum auth_role r)
{
	return (size_t)r < CS_ARRAY_LEN(role_names) ? role_names[r] : "none";
}

bool auth_perm_known(const char *perm)
{
	for (size_t i = 0; i < CS_ARRAY_LEN(perm_matrix); i++)
		if (strcmp(perm_matrix[i].perm, perm) == 0)
			return true;
	return false;
}

bool auth_role_allows(enum auth_role role, const char *perm)
{
	if (perm == NULL || role == AUTH_ROLE_NONE)
		return false;
	/* Explicit deny beats any allow: admins never hold billing:*. */
	if (role == AUTH_ROLE_ADMIN && strncmp(perm, "billing:", 8) == 0)
		return false;
	for (size_t i = 0; i < CS_ARRAY_LEN(perm_matrix); i++)
		if (strcmp(perm_matrix[i].perm, perm) == 0)
			return role >= perm_matrix[i].min_role;
	return false; /* unknown permissions are held by nobody */
}

const char *auth_cookie_find(const char *h, const char *name, size_t *lenp)
{
	size_t nlen = strlen(name);

	while (h != NULL && *h != '\0') {
		const char *end = strchr(h, ';');
		size_t len = end != NULL ? (size_t)(end - h) : strlen(h);

		while (len > 0 && *h == ' ') {
			h++;
			len--;
		}
		if (len > nlen && strncmp(h, name, nlen) == 0 && h[nlen] == '=') {
			*lenp = len - nlen - 1;
			return h + nlen + 1;
		}
		h = end != NULL ? end + 1 : NULL;
	}
	return NULL;
}

/* The value of cookie name in the Cookie header, copied into the pool, or NULL. */
static const char *auth_cookie(struct http_request *req, const char *name)
{
	size_t len;
	const char *v = auth_cookie_find(http_header(req, "Cookie"), name, &len);

	return v != NULL ? http_strndup(req, v, len) : NULL;
}

static bool auth_method_changes_state(const char *m)
{
	return strcmp(m, "GET") != 0 && strcmp(m, "HEAD") != 0 && strcmp(m, "OPTIONS") != 0;
}

void auth_mw_authenticate(struct http_request *req)
{
	const struct route *rt = req->route;
	const char *authz = http_header(req, "Authorization");
	const char *tok = NULL;
	struct auth_claims c;
	bool needs_auth = !(rt->flags & ROUTE_PUBLIC);
	bool have_token;

	/* Core endpoints (/health, /ready, /metrics) carry no auth flags at all. */
	if (rt->perm == NULL && !(rt->flags & (ROUTE_PUBLIC | ROUTE_SELF))) {
		http_next(req);
		return;
	}
	if (authz != NULL) {
		if (strncmp(authz, "Bearer ", 7) == 0)
			tok = authz + 7;
	} else {
		tok = auth_cookie(req, "cs_access");
		req->auth.via_cookie = tok != NULL;
	}
	have_token = tok != NULL && *tok != '\0';
	if (!have_token) {
		if (needs_auth) {
			http_error(req, 401, "unauthenticated", "authentication required");
			return;
		}
		http_next(req);
		return;
	}
	if (!auth_revoke_fresh()) {
		http_error(req, 503, "unavailable",
		           "cannot confirm token revocations; retry later");
		return;
	}
	if (auth_token_verify(tok, time(NULL), &c) == -1 || auth_revoked(c.jti, c.sid)) {
		if (needs_auth) {
			http_error(req, 401, "unauthenticated", "invalid or expired credentials");
			return;
		}
		req->auth.via_cookie = false;
		http_next(req); /* a public route ignores a stale token */
		return;
	}
	req->auth.authenticated = true;
	memcpy(req->auth.user_id, c.sub, sizeof(c.sub));
	memcpy(req->auth.org_id, c.org, sizeof(c.org));
	memcpy(req->auth.session_id, c.sid, sizeof(c.sid));
	memcpy(req->auth.jti, c.jti, sizeof(c.jti));
	snprintf(req->auth.role, sizeof(req->auth.role), "%s", c.role);
	req->auth.exp = c.exp;

	/* Double-submit CSRF check: a cookie may ride along on a forged request, a header not. */
	if (req->auth.via_cookie && auth_method_changes_state(req->method) &&
	    !(rt->flags & ROUTE_NO_CSRF)) {
		const char *want = auth_cookie(req, "cs_csrf");
		const char *got = http_header(req, "X-CSRF-Token");

		if (want == NULL || got == NULL || strlen(want) < 16 ||
		    strlen(want) != strlen(got) || !cs_consttime_eq(want, got, strlen(want))) {
			json_t *d =
			    json_pack("{s:s, s:s}", "method", req->method, "path", rt->pattern);

			auth_audit_refuse(req, req->auth.org_id, req->auth.user_id,
			                  "access.csrf_failed", NULL, d, 403, "csrf_failed",
			                  "missing or wrong X-CSRF-Token");
			json_decref(d);
			return;
		}
	}
	if (rt->perm != NULL && !auth_role_allows(auth_role_parse(req->auth.role), rt->perm)) {
		json_t *d = json_pack("{s:s, s:s, s:s, s:s}", "permission", rt->perm, "method",
		                      req->method, "path", rt->pattern, "role", req->auth.role);

		auth_audit_refuse(req, req->auth.org_id, req->auth.user_id,
		                  "access.permission_denied", NULL, d, 403, "forbidden",
		                  "your role lacks the permission %s", rt->perm);
		json_decref(d);
		return;
	}
	http_next(req);
}
