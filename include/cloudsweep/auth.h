/*
 * auth.h - who is calling and what they may do: access tokens (JWT via
 * libjwt), the per-worker revocation mirror, roles and permissions, the
 * authentication and authorization middleware, and the identity API
 * (signup, login, refresh, logout, sessions, me, members).
 *
 * Access tokens are short-lived JWTs with the claims sub, org, role, sid
 * (the login session), iat, exp, jti, iss and aud. Verification accepts
 * only the configured algorithm (so "none" and HS/RS confusion are refused
 * before any signature check), the configured issuer and audience, and at
 * most AUTH_CLOCK_SKEW_S of clock skew. A token whose jti or session was
 * revoked is refused by every worker within a second: revocations are rows
 * in Postgres, announced with NOTIFY and also polled, and each worker keeps
 * them in memory until the tokens they cover have expired. If that mirror
 * cannot be kept fresh the middleware fails closed (503).
 */
#ifndef CLOUDSWEEP_AUTH_H
#define CLOUDSWEEP_AUTH_H

#include <stdbool.h>
#include <time.h>

#include "cloudsweep/config.h"
#include "cloudsweep/db.h"
#include "cloudsweep/http.h"
#include "cloudsweep/util.h"

#define AUTH_CLOCK_SKEW_S    60
#define AUTH_REFRESH_BYTES   32 /* 256-bit opaque refresh tokens */
#define AUTH_REVOKE_POLL_MS  500
#define AUTH_REVOKE_STALE_MS 1500 /* older mirror than this: fail closed */

enum auth_role {
	AUTH_ROLE_NONE = 0,
	AUTH_ROLE_VIEWER,
	AUTH_ROLE_MEMBER,
	AUTH_ROLE_ADMIN,
	AUTH_ROLE_OWNER,
};

/* The claims of an access token. */
struct auth_claims {
	char sub[37]; /* user id */
	char org[37]; /* organization id */
	char sid[37]; /* login session (refresh family) id */
	char jti[37];
	char role[16];
	long long iat, exp;
};

/*
 * Load signing and verification keys from cfg (HS256 secret, or RS256/ES256
 * PEM files); once per process. Returns 0, or -1 with err filled.
 */
int auth_keys_load(const struct config *cfg, char *err, size_t errlen) CS_WUR;
/* Forget the keys (wiped). */
void auth_keys_free(void);
/* Sign c into a compact JWT (malloc'd), or NULL. iat/exp/jti must be set. */
char *auth_token_issue(const struct auth_claims *c);
/*
 * Verify tok at time now: structure, algorithm, signature, iss, aud, exp,
 * iat and the claims' shapes. Returns 0 and fills *out, or -1.
 */
int auth_token_verify(const char *tok, time_t now, struct auth_claims *out) CS_WUR;

/* The role named s, or AUTH_ROLE_NONE. */
enum auth_role auth_role_parse(const char *s);
/* The name of a role ("viewer"...), or "none". */
const char *auth_role_name(enum auth_role r);
/* Whether role holds perm ("scans:read"); admin is denied billing:* explicitly. */
bool auth_role_allows(enum auth_role role, const char *perm);
/* Whether perm is one the permission matrix knows (routes must name known ones). */
bool auth_perm_known(const char *perm);

/*
 * The value of cookie name in a Cookie header value h (NULL is fine): a
 * pointer into h and its length in *lenp, or NULL when absent. The first
 * "name=" pair wins; pairs are separated by ';' and optional spaces.
 */
const char *auth_cookie_find(const char *h, const char *name, size_t *lenp);

/* Start the revocation mirror on this worker's pool (LISTEN cs_revoke + poll). */
void auth_revoke_start(struct event_base *base, struct db_pool *pool);
/* Stop it and free its memory. */
void auth_revoke_stop(void);
/* Whether the mirror is fresh enough to trust (see AUTH_REVOKE_STALE_MS). */
bool auth_revoke_fresh(void);
/* Whether a token with this jti and session was revoked. */
bool auth_revoked(const char *jti, const char *sid);
/* Record a revocation locally at once (the caller also inserted it in Postgres). */
void auth_revoke_note(const char *kind, const char *id, long long expires_at);

/*
 * Middleware: authenticate the caller from "Authorization: Bearer" or the
 * cs_access cookie (filling req->auth), check CSRF on cookie requests that
 * change state, and the route's permission. Public routes pass through
 * (with req->auth filled when a valid token came along).
 */
void auth_mw_authenticate(struct http_request *req);

/* Middleware: charge the request to the shared token buckets; 429 with Retry-After when spent. */
void auth_mw_ratelimit(struct http_request *req);

/* Register the identity routes (signup, login, refresh, logout, me, sessions, members). */
void auth_routes(struct router *r);

/* Per-worker start-up: keys, password thread pool, revocation mirror. 0 or -1 (logged). */
int auth_worker_init(struct event_base *base, const struct config *cfg,
                     struct db_pool *pool) CS_WUR;
/* Per-worker teardown. */
void auth_worker_free(void);

#endif
