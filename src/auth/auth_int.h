/*
 * auth_int.h - what the files of auth/ share and nobody else needs: the
 * worker's auth resources and the small helpers every identity handler uses.
 */
#ifndef CLOUDSWEEP_AUTH_INT_H
#define CLOUDSWEEP_AUTH_INT_H

#include <jansson.h>

#include "cloudsweep/audit.h"
#include "cloudsweep/auth.h"
#include "cloudsweep/authcrypto.h"
#include "cloudsweep/threadpool.h"

#define AUTH_REFRESH_TEXT 48 /* base64url of 32 bytes (43) and a NUL, rounded */

struct auth_globals {
	const struct config *cfg;      /* borrowed; the worker's configuration */
	struct threadpool *tp;         /* owned; argon2id off the reactor */
	struct password_params pp;     /* hashing parameters from cfg */
	unsigned char refresh_key[32]; /* derives refresh-token successors; wiped at exit */
	struct ratelimit *rl;          /* owned; shared token buckets and login blocks */
};

extern struct auth_globals auth_g;

/* base64url without padding of len bytes into out (4*ceil(len/3)+1 bytes). */
void auth_b64url(char *out, const unsigned char *in, size_t len);
/* Hex SHA-256 of a token, for lookups by hash. */
void auth_token_hash_hex(char out[65], const char *tok);
/* A fresh random refresh token. */
void auth_refresh_new(char out[AUTH_REFRESH_TEXT]);
/* The successor of refresh token tok (keyed PRF, deterministic); 0 or -1. */
int auth_refresh_successor(const char *tok, char out[AUTH_REFRESH_TEXT]) CS_WUR;
/* Append an event in a transaction of its own, logging (not failing) on error. */
void auth_audit_standalone(struct http_request *req, const char *org, const char *actor,
                           const char *type, const char *resource_id, json_t *details);
/* Answer req with an API error once its refusal event is appended (standalone). */
void auth_audit_refuse(struct http_request *req, const char *org, const char *actor,
                       const char *type, const char *resource_id, json_t *details, int status,
                       const char *code, const char *fmt, ...) CS_PRINTF(9, 10);
/* Set details[key] to the audit HMAC of value and append ev with them (details stolen). */
int auth_op_audit_hmac(struct http_op *op, struct audit_event *ev, json_t *details, const char *key,
                       const char *value);
/* A bounded string field of a JSON body; NULL when missing/invalid (400 answered if so). */
const char *auth_body_str(struct http_request *req, json_t *body, const char *name, size_t maxlen,
                          bool required);
/* Free a request body, wiping its "password" field first. */
void auth_body_free(json_t *body);
/* Lower-case and trim an email; -1 when it does not look like one. */
int auth_email_normalize(const char *in, char *out, size_t outlen) CS_WUR;
/* Expire the auth cookies in the response. */
void auth_clear_cookies(struct http_request *req);
/* Issue an access token and answer {access_token, refresh_token, ...} with cookies. */
void auth_respond_tokens(struct http_request *req, int status, const char *user, const char *org,
                         const char *role, const char *sid, const char *refresh);

/* Run proceed(req) unless the client address is blocked from logging in (429). */
void auth_login_gate(struct http_request *req, void (*proceed)(struct http_request *req));
/* Count a failed login against the client address (may block it). */
void auth_login_failed_note(struct http_request *req);
/* Free limit.c's tier limiters and fold table (auth_worker_free calls it). */
void auth_limit_free(void);

/* Sessions revoked inside an op's transaction, to tell this worker's mirror after COMMIT. */
struct auth_revoked {
	int n;           /* sessions revoked (all of them, even beyond those kept in sid) */
	int kept;        /* entries in sid */
	char (*sid)[37]; /* pool-owned ids, at most AUTH_REVOKED_KEEP */
	long long expires_at;
};
#define AUTH_REVOKED_KEEP 1000 /* beyond this the NOTIFY-driven mirror poll covers the rest */

/*
 * Revoke user's live sessions in op's transaction: those of org (NULL: every
 * organization), only session `only` when not NULL, sparing session `keep`
 * when not NULL; reason goes to sessions.revoke_reason. Each one gets a
 * 'sid' revocation row (NOTIFY reaches every worker). advance gets the rows;
 * pass them to auth_revoked_keep. -1 has answered already.
 */
int auth_op_sessions_revoke(struct http_op *op, const char *user, const char *org, const char *only,
                            const char *keep, const char *reason);
/* Remember the session ids of an auth_op_sessions_revoke result in r (request pool). */
void auth_revoked_keep(struct http_request *req, struct auth_revoked *r, const PGresult *res);
/* Record r's revocations in this worker's mirror at once; call after COMMIT. */
void auth_revoked_note(const struct auth_revoked *r);

/* mfa.c: TOTP enrollment, activation, disabling and backup codes. */
void auth_mfa_routes(struct router *r);
/*
 * Open a user's sealed TOTP secret (blob bound to org) and check code at the
 * current time, refusing steps <= last_step: 0 accepted (*step set to the
 * matched step), 1 refused, -1 the secret does not open (logged).
 */
int auth_mfa_totp_check(const char *org, const char *user, const char *blob, const char *code,
                        long long last_step, long long *step) CS_WUR;
/*
 * Count a failed password for user $1 with threshold $2 and base seconds $3:
 * from the threshold on, the lock doubles with every failure (at most 1 h).
 */
#define AUTH_PW_FAIL_SQL                                                             \
	"UPDATE users SET pw_failures = pw_failures + 1, pw_locked_until = CASE "    \
	"WHEN pw_failures + 1 >= $2::int THEN now() + make_interval(secs => "        \
	"least($3::float8 * power(2, least(pw_failures + 1 - $2::int, 20)), 3600)) " \
	"ELSE pw_locked_until END WHERE id = $1"
/* The same for a failed second factor, on its own columns. */
#define AUTH_MFA_FAIL_SQL                                                             \
	"UPDATE users SET mfa_failures = mfa_failures + 1, mfa_locked_until = CASE "  \
	"WHEN mfa_failures + 1 >= $2::int THEN now() + make_interval(secs => "        \
	"least($3::float8 * power(2, least(mfa_failures + 1 - $2::int, 20)), 3600)) " \
	"ELSE mfa_locked_until END WHERE id = $1"

/* Route registration of each file. */
void auth_session_routes(struct router *r);
void auth_me_routes(struct router *r);
/* members.c: org members, the caller's sessions, password change. */
void auth_members_routes(struct router *r);
/* privacy.c: export, rectification, email re-verification, account deletion. */
void auth_privacy_routes(struct router *r);
/* GitHub sign-in and webhook routes (github.c). */
void auth_github_routes(struct router *r);
/* Per-worker GitHub start-up: secrets and the outbound client. 0 or -1 (logged). */
int auth_github_init(struct event_base *base, const struct config *cfg) CS_WUR;
/* Per-worker GitHub teardown: pending calls cancelled, secrets wiped. */
void auth_github_free(void);

#endif
