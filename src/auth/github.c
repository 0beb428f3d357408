/*
 * github.c - sign-in with GitHub and the GitHub webhook receiver.
 *
 * Sign-in is the OAuth 2.0 authorization-code flow with PKCE (S256).
 * GET /auth/github/login stores a fresh state (only its SHA-256), the
 * SHA-256 of a browser-binding value sent back as the cs_oauth cookie, and
 * the PKCE verifier, then redirects to GitHub. GET /auth/github/callback
 * deletes that row in one statement (single use, and only when the cookie
 * matches), exchanges the code with the worker's outbound client, reads
 * /user and /user/emails, and then, in one transaction with its audit rows,
 * links or creates the account and opens a session. Accounts are matched by
 * GitHub's numeric user id only: an existing account that merely shares the
 * email is never taken over (the browser is sent to the app with
 * ?github_error=account_exists, and the user can log in and link from
 * there). A session opened by GitHub has no refresh token (it could only
 * travel in a URL); it lasts as long as its access token.
 *
 * POST /webhooks/github checks X-Hub-Signature-256 over the raw body in
 * constant time, records each X-GitHub-Delivery once, and on
 * github_app_authorization/revoked revokes every session of the linked user
 * through the revocations table, which every worker mirrors within a second.
 */
#include "config.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/sha.h>

#include "cloudsweep/audit.h"
#include "cloudsweep/client.h"
#include "cloudsweep/log.h"
#include "cloudsweep/worker.h"
#include "auth_int.h"

#define GH_STATE_TTL_S      600
#define GH_VALUE_TEXT       48 /* base64url of 32 random bytes (43) and a NUL */
#define GH_TOKEN_MAX        255
#define GH_SECRET_FILE_MAX  4096
#define GH_CALL_DEADLINE_MS 10000
#define GH_BODY_MAX         (1024 * 1024)
#define GH_FIELD_MAX        100 /* delivery ids, event names, logins */
#define GH_COOKIE           "cs_oauth"
#define GH_COOKIE_PATH      "/api/v1/auth/github"

static struct {
	const struct config *cfg;   /* borrowed; the worker's configuration */
	struct http_client *client; /* owned; NULL when sign-in is off */
	char *web, *api;            /* owned; base URLs without a trailing slash */
	char *client_secret;        /* owned secret, or NULL when sign-in is off */
	char *hook_secret;          /* owned secret, or NULL: every delivery is refused */
	size_t hook_secret_len;
} gh;

/* ---- small helpers ---- */

/* A growing malloc'd string; wiped when freed since it may hold secrets. */
struct gh_buf {
	char *p;
	size_t len, cap;
};

static void gh_buf_add(struct gh_buf *b, const char *s, size_t n)
{
	if (b->len + n + 1 > b->cap) {
		size_t cap = b->cap == 0 ? 256 : b->cap;
		char *p;

		while (b->len + n + 1 > cap)
			cap *= 2;
		p = xmalloc(cap);
		if (b->len > 0)
			memcpy(p, b->p, b->len);
		if (b->p != NULL) {
			cs_wipe(b->p, b->cap);
			free(b->p);
		}
		b->p = p;
		b->cap = cap;
	}
	memcpy(b->p + b->len, s, n);
	b->len += n;
	b->p[b->len] = '\0';
}

static void gh_buf_str(struct gh_buf *b, const char *s)
{
	gh_buf_add(b, s, strlen(s));
}

/* Append s percent-encoded (RFC 3986 unreserved characters stay as they are). */
static void gh_buf_pct(struct gh_buf *b, const char *s)
{
	static const char hex[] = "0123456789ABCDEF";

	for (; *s != '\0'; s++) {
		unsigned char ch = (unsigned char)*s;
		char enc[3];

		if ((ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') ||
		    (ch >= '0' && ch <= '9') || ch == '-' || ch == '.' || ch == '_' || ch == '~') {
			gh_buf_add(b, s, 1);
			continue;
		}
		enc[0] = '%';
		enc[1] = hex[ch >> 4];
		enc[2] = hex[ch & 15];
		gh_buf_add(b, enc, 3);
	}
}

/* Append "&name=value" (no '&' when the buffer is empty or ends in '?'). */
static void gh_buf_param(struct gh_buf *b, const char *name, const char *value)
{
	if (b->len > 0 && b->p[b->len - 1] != '?')
		gh_buf_add(b, "&", 1);
	gh_buf_str(b, name);
	gh_buf_add(b, "=", 1);
	gh_buf_pct(b, value);
}

static void gh_buf_free(struct gh_buf *b)
{
	if (b->p != NULL) {
		cs_wipe(b->p, b->cap);
		free(b->p);
	}
	memset(b, 0, sizeof(*b));
}

/* A fresh 256-bit random value as base64url. */
static void gh_random_value(char out[GH_VALUE_TEXT])
{
	unsigned char raw[32];

	cs_random(raw, sizeof(raw));
	auth_b64url(out, raw, sizeof(raw));
	cs_wipe(raw, sizeof(raw));
}

/* Whether v is a short token of [A-Za-z0-9._-] (header values that go into SQL and audit). */
static bool gh_word_ok(const char *v, size_t max)
{
	size_t n;

	if (v == NULL || *v == '\0')
		return false;
	n = strspn(v, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-");
	return v[n] == '\0' && n <= max;
}

/* Copy base, dropping trailing slashes; NULL when it is not an http(s) URL. */
static char *gh_base_url(const char *base)
{
	struct http_client_url u;
	char *s;
	size_t n;

	if (http_client_url_parse(base, &u) == -1 || u.query != NULL)
		return NULL;
	s = xstrdup(base);
	n = strlen(s);
	while (n > 0 && s[n - 1] == '/')
		s[--n] = '\0';
	return s;
}

/* Read a secret file (trailing whitespace dropped); NULL when unreadable or empty. */
static char *gh_read_secret(const char *path, const char *option)
{
	char *s = cs_read_file(path, GH_SECRET_FILE_MAX, NULL);

	if (s == NULL) {
		log_warn("github_init", "cannot read %s", option);
		return NULL;
	}
	cs_rstrip(s);
	if (*s == '\0') {
		log_warnx("github_init", "%s is empty", option);
		cs_free_secret(s);
		return NULL;
	}
	return s;
}

/* Send the browser to the app, with ?github_error=code or ?github_linked=1 (code NULL). */
static void gh_redirect_app(struct http_request *req, const char *error)
{
	const char *app = gh.cfg->github_app_url;
	char *loc;

	if (error == NULL)
		loc = xasprintf("%s%sgithub_linked=1", app, strchr(app, '?') != NULL ? "&" : "?");
	else if (*error == '\0')
		loc = xstrdup(app);
	else
		loc = xasprintf("%s%sgithub_error=%s", app, strchr(app, '?') != NULL ? "&" : "?",
		                error);
	http_add_header(req, "Location", loc);
	free(loc);
	http_respond(req, 302, NULL, NULL, 0);
}

/* ---- GET /api/v1/auth/github/login ---- */

enum gh_login_state {
	GH_LOGIN_STORE, /* the hashed state, binding and verifier are being inserted */
};

struct gh_login_op {
	struct http_op op;
	char state[GH_VALUE_TEXT], binding[GH_VALUE_TEXT], verifier[GH_VALUE_TEXT];
};

static void gh_login_wipe(struct http_op *op)
{
	struct gh_login_op *l = (struct gh_login_op *)op;

	cs_wipe(l->state, sizeof(l->state));
	cs_wipe(l->binding, sizeof(l->binding));
	cs_wipe(l->verifier, sizeof(l->verifier));
}

static void gh_login_advance(struct http_op *op, enum db_event ev, const PGresult *res)
{
	struct gh_login_op *l = (struct gh_login_op *)op;
	unsigned char md[SHA256_DIGEST_LENGTH];
	char challenge[GH_VALUE_TEXT], *cookie;
	struct gh_buf loc = { 0 };

	if (ev != DB_OK) {
		http_op_db_fail(op, ev, res);
		return;
	}
	http_set_cancel(op->req, NULL, NULL);
	SHA256((const unsigned char *)l->verifier, strlen(l->verifier), md);
	auth_b64url(challenge, md, sizeof(md));
	gh_buf_str(&loc, gh.web);
	gh_buf_str(&loc, "/login/oauth/authorize?");
	gh_buf_param(&loc, "client_id", gh.cfg->github_client_id);
	gh_buf_param(&loc, "redirect_uri", gh.cfg->github_redirect_url);
	gh_buf_param(&loc, "scope", "read:user user:email");
	gh_buf_param(&loc, "state", l->state);
	gh_buf_param(&loc, "code_challenge", challenge);
	gh_buf_param(&loc, "code_challenge_method", "S256");
	cookie = xasprintf(GH_COOKIE "=%s; Path=" GH_COOKIE_PATH
	                             "; Max-Age=%d; HttpOnly; Secure; SameSite=Lax",
	                   l->binding, GH_STATE_TTL_S);
	http_add_header(op->req, "Set-Cookie", cookie);
	http_add_header(op->req, "Location", loc.p);
	cs_free_secret(cookie);
	gh_buf_free(&loc);
	gh_login_wipe(op);
	http_respond(op->req, 302, NULL, NULL, 0);
}

static void gh_login(struct http_request *req)
{
	const char *link = http_query_arg(req, "link");
	struct gh_login_op *l;
	char state_hash[65], binding_hash[65], ttl[16];
	const char *p[5];

	if (gh.client == NULL) {
		http_error(req, 404, "not_found", "GitHub sign-in is not configured");
		return;
	}
	if (link != NULL && strcmp(link, "1") != 0 && strcmp(link, "0") != 0) {
		http_error(req, 400, "invalid_request", "query argument link must be 0 or 1");
		return;
	}
	if (link != NULL && strcmp(link, "1") == 0 && !req->auth.authenticated) {
		http_error(req, 401, "unauthenticated", "linking GitHub needs a signed-in session");
		return;
	}
	l = http_op_new(req, sizeof(*l), gh_login_advance);
	l->op.on_cancel = gh_login_wipe;
	gh_random_value(l->state);
	gh_random_value(l->binding);
	gh_random_value(l->verifier);
	auth_token_hash_hex(state_hash, l->state);
	auth_token_hash_hex(binding_hash, l->binding);
	snprintf(ttl, sizeof(ttl), "%d", GH_STATE_TTL_S);
	p[0] = state_hash;
	p[1] = binding_hash;
	p[2] = l->verifier;
	p[3] = link != NULL && strcmp(link, "1") == 0 ? req->auth.user_id : NULL;
	p[4] = ttl;
	l->op.state = GH_LOGIN_STORE;
	(void)http_op_prepared(&l->op, "github_state_store", 5, p);
}

/* ---- GET /api/v1/auth/github/callback ---- */

enum gh_cb_state {
	GH_CB_CONSUME,      /* the state row is deleted if the cookie matches (single use) */
	GH_CB_TOKEN,        /* the code is being exchanged for a GitHub access token */
	GH_CB_USER,         /* GET <api>/user */
	GH_CB_EMAILS,       /* GET <api>/user/emails */
	GH_CB_BEGIN,        /* BEGIN sent */
	GH_CB_LOOKUP,       /* identity by GitHub id, account by email, the link target */
	GH_CB_LINK,         /* identity inserted for the session's user */
	GH_CB_LINK_AUDIT,   /* user.updated appended */
	GH_CB_SIGNUP,       /* new user, org, owner membership and identity inserted */
	GH_CB_SIGNUP_AUDIT, /* auth.signup appended */
	GH_CB_SESSION,      /* the session row written */
	GH_CB_AUDIT,        /* auth.login.succeeded appended */
	GH_CB_COMMIT,       /* COMMIT sent; then cookies and the redirect */
};

struct gh_callback_op {
	struct http_op op;
	struct http_call *call; /* pending GitHub call, or NULL */
	char *code;             /* malloc'd; the one-time code, wiped */
	char verifier[GH_VALUE_TEXT];
	char token[GH_TOKEN_MAX + 1]; /* GitHub access token, wiped after the last call */
	char link_user[37];           /* empty: a sign-in, not a link */
	char github_id[24];
	char login[GH_FIELD_MAX + 1];
	char *name; /* pool-owned display name for a new user */
	char email[256];
	char user_id[37], org_id[37], role[16], session_id[37];
	bool linked;
};

static void gh_cb_wipe(struct gh_callback_op *c)
{
	if (c->code != NULL)
		cs_free_secret(c->code);
	c->code = NULL;
	cs_wipe(c->verifier, sizeof(c->verifier));
	cs_wipe(c->token, sizeof(c->token));
}

static void gh_cb_cancel(struct http_op *op)
{
	struct gh_callback_op *c = (struct gh_callback_op *)op;

	if (c->call != NULL)
		http_call_cancel(c->call);
	c->call = NULL;
	gh_cb_wipe(c);
}

/* Audit a refused sign-in (in a transaction of its own: no action happened). */
static void gh_cb_audit_failed(struct gh_callback_op *c, const char *reason, const char *user)
{
	json_t *d = json_pack("{s:s, s:s}", "reason", reason, "method", "github");

	if (d == NULL)
		return;
	if (*c->github_id != '\0')
		json_object_set_new(d, "github_id", json_string(c->github_id));
	if (*c->email != '\0' && audit_details_set_hmac(d, "email", c->email) == -1)
		json_object_del(d, "email");
	auth_audit_standalone(c->op.req, NULL, user, "auth.login.failed", user, d);
	json_decref(d);
}

/* End the sign-in with a JSON error, audited as auth.login.failed with reason. */
static void gh_cb_fail(struct gh_callback_op *c, int status, const char *code, const char *reason,
                       const char *msg)
{
	gh_cb_audit_failed(c, reason, *c->link_user != '\0' ? c->link_user : NULL);
	http_op_fail(&c->op, status, code, "%s", msg);
}

/* End the sign-in by sending the browser to the app with ?github_error=error. */
static void gh_cb_redirect_error(struct gh_callback_op *c, const char *error, const char *user)
{
	http_op_rollback(&c->op);
	gh_cb_cancel(&c->op);
	gh_cb_audit_failed(c, error, user);
	http_set_cancel(c->op.req, NULL, NULL);
	gh_redirect_app(c->op.req, error);
}

static void gh_call_cb(const struct http_client_result *res, void *arg);

/* Start a call to GitHub; on failure the op has answered. */
static void gh_cb_call(struct gh_callback_op *c, const char *method, const char *url,
                       const void *body, size_t body_len)
{
	struct http_client_header h[3];
	struct http_client_request r;
	char *authz = NULL;
	size_t n = 0;

	if (body_len > 0) {
		h[n++] = (struct http_client_header){ "Content-Type",
			                              "application/x-www-form-urlencoded" };
		h[n++] = (struct http_client_header){ "Accept", "application/json" };
	} else {
		authz = xasprintf("Bearer %s", c->token);
		h[n++] = (struct http_client_header){ "Authorization", authz };
		h[n++] = (struct http_client_header){ "Accept", "application/vnd.github+json" };
	}
	memset(&r, 0, sizeof(r));
	r.method = method;
	r.url = url;
	r.headers = h;
	r.nheaders = n;
	r.body = body;
	r.body_len = body_len;
	r.deadline_ms = GH_CALL_DEADLINE_MS;
	c->call = http_client_request(gh.client, &r, gh_call_cb, c);
	cs_free_secret(authz);
	if (c->call == NULL)
		gh_cb_fail(c, 502, "github_unavailable", "github_request_invalid",
		           "the request to GitHub could not be made");
}

static void gh_cb_exchange(struct gh_callback_op *c)
{
	struct gh_buf form = { 0 };
	char *url = xasprintf("%s/login/oauth/access_token", gh.web);

	gh_buf_param(&form, "client_id", gh.cfg->github_client_id);
	gh_buf_param(&form, "client_secret", gh.client_secret);
	gh_buf_param(&form, "code", c->code);
	gh_buf_param(&form, "redirect_uri", gh.cfg->github_redirect_url);
	gh_buf_param(&form, "code_verifier", c->verifier);
	c->op.state = GH_CB_TOKEN;
	gh_cb_call(c, "POST", url, form.p, form.len);
	gh_buf_free(&form);
	free(url);
}

/* The token endpoint answered: {access_token,...} or GitHub's {error,...} (with 200). */
static void gh_cb_token_done(struct gh_callback_op *c, const struct http_client_result *res)
{
	json_t *doc = res->status == 200 ? json_loadb(res->body, res->body_len, 0, NULL) : NULL;
	const char *err = json_string_value(json_object_get(doc, "error"));
	const char *tok = json_string_value(json_object_get(doc, "access_token"));
	char *url;

	gh_cb_wipe(c); /* the code and verifier are spent either way */
	if (err != NULL &&
	    (strcmp(err, "bad_verification_code") == 0 || strcmp(err, "invalid_grant") == 0)) {
		gh_cb_fail(c, 400, "github_bad_code", "github_bad_verification_code",
		           "GitHub refused the authorization code (expired or already used); "
		           "sign in again");
		goto out;
	}
	if (err != NULL || tok == NULL || *tok == '\0' || strlen(tok) > GH_TOKEN_MAX ||
	    strpbrk(tok, " \t\r\n") != NULL) {
		gh_cb_fail(c, 502, "github_error",
		           err != NULL && strcmp(err, "incorrect_client_credentials") == 0
		               ? "github_client_credentials"
		               : "github_token_error",
		           "GitHub did not issue an access token; check the GitHub app settings");
		goto out;
	}
	snprintf(c->token, sizeof(c->token), "%s", tok);
	url = xasprintf("%s/user", gh.api);
	c->op.state = GH_CB_USER;
	gh_cb_call(c, "GET", url, NULL, 0);
	free(url);
out:
	auth_body_free(doc); /* access_token, and refresh_token with expiring user tokens */
}

static void gh_cb_user_done(struct gh_callback_op *c, const struct http_client_result *res)
{
	json_t *doc = res->status == 200 ? json_loadb(res->body, res->body_len, 0, NULL) : NULL;
	json_t *id = json_object_get(doc, "id");
	const char *login = json_string_value(json_object_get(doc, "login"));
	const char *name = json_string_value(json_object_get(doc, "name"));
	char *url;

	if (res->status == 401) {
		gh_cb_fail(c, 502, "github_error", "github_token_refused",
		           "GitHub refused the access token it had just issued");
		goto out;
	}
	if (!json_is_integer(id) || json_integer_value(id) <= 0 ||
	    !gh_word_ok(login, GH_FIELD_MAX)) {
		gh_cb_fail(c, 502, "github_error", "github_user_unreadable",
		           "GitHub's user profile could not be read");
		goto out;
	}
	snprintf(c->github_id, sizeof(c->github_id), "%lld", (long long)json_integer_value(id));
	snprintf(c->login, sizeof(c->login), "%s", login);
	if (name == NULL || *name == '\0' || strlen(name) > 255)
		name = login;
	c->name = http_strndup(c->op.req, name, strlen(name));
	url = xasprintf("%s/user/emails", gh.api);
	c->op.state = GH_CB_EMAILS;
	gh_cb_call(c, "GET", url, NULL, 0);
	free(url);
out:
	json_decref(doc);
}

static void gh_cb_emails_done(struct gh_callback_op *c, const struct http_client_result *res)
{
	json_t *doc = res->status == 200 ? json_loadb(res->body, res->body_len, 0, NULL) : NULL;
	const char *found = NULL;
	size_t i;
	json_t *e;

	cs_wipe(c->token, sizeof(c->token)); /* no more calls with it */
	if (!json_is_array(doc)) {
		gh_cb_fail(c, 502, "github_error",
		           res->status == 401 ? "github_token_refused" : "github_emails_unreadable",
		           "GitHub's email addresses could not be read");
		goto out;
	}
	json_array_foreach (doc, i, e) {
		if (json_is_true(json_object_get(e, "primary")) &&
		    json_is_true(json_object_get(e, "verified")))
			found = json_string_value(json_object_get(e, "email"));
	}
	if (found == NULL || auth_email_normalize(found, c->email, sizeof(c->email)) == -1) {
		c->email[0] = '\0';
		gh_cb_fail(c, 400, "github_email_unverified", "github_email_unverified",
		           "the GitHub account has no verified primary email address");
		goto out;
	}
	c->op.state = GH_CB_BEGIN;
	(void)http_op_begin(&c->op);
out:
	json_decref(doc);
}

static void gh_call_cb(const struct http_client_result *res, void *arg)
{
	struct gh_callback_op *c = arg;

	c->call = NULL;
	if (res->error != HTTP_CLIENT_OK) {
		log_warnx("github_call_failed", "a call to GitHub failed: %s",
		          http_client_error_name(res->error));
		gh_cb_fail(c, 502, "github_unavailable",
		           res->error == HTTP_CLIENT_ERR_TIMEOUT ? "github_timeout"
		                                                 : "github_unreachable",
		           res->error == HTTP_CLIENT_ERR_TIMEOUT ? "GitHub did not answer in time"
		                                                 : "GitHub could not be reached");
		return;
	}
	switch (c->op.state) {
	case GH_CB_TOKEN:
		gh_cb_token_done(c, res);
		return;
	case GH_CB_USER:
		gh_cb_user_done(c, res);
		return;
	case GH_CB_EMAILS:
		gh_cb_emails_done(c, res);
		return;
	default:
		gh_cb_fail(c, 500, "internal", "internal", "sign-in in an unexpected state");
		return;
	}
}

/* Access token and cookies for the new session, then the redirect to the app. */
static void gh_cb_respond_session(struct gh_callback_op *c)
{
	struct http_request *req = c->op.req;
	long long ttl = gh.cfg->access_token_ttl_s, now = (long long)time(NULL);
	struct auth_claims cl;
	unsigned char raw[24];
	char csrf[40], *access, *line;

	memset(&cl, 0, sizeof(cl));
	snprintf(cl.sub, sizeof(cl.sub), "%s", c->user_id);
	snprintf(cl.org, sizeof(cl.org), "%s", c->org_id);
	snprintf(cl.sid, sizeof(cl.sid), "%s", c->session_id);
	snprintf(cl.role, sizeof(cl.role), "%s", c->role);
	cs_uuid4(cl.jti);
	cl.iat = now;
	cl.exp = now + ttl;
	access = auth_token_issue(&cl);
	if (access == NULL) {
		http_error(req, 500, "internal", "cannot sign the access token");
		return;
	}
	cs_random(raw, sizeof(raw));
	auth_b64url(csrf, raw, sizeof(raw));
	line = xasprintf("cs_access=%s; Path=/; Max-Age=%lld; HttpOnly; Secure; SameSite=Lax",
	                 access, ttl);
	http_add_header(req, "Set-Cookie", line);
	cs_free_secret(line);
	line = xasprintf("cs_csrf=%s; Path=/; Max-Age=%lld; Secure; SameSite=Lax", csrf, ttl);
	http_add_header(req, "Set-Cookie", line);
	free(line);
	cs_free_secret(access);
	gh_redirect_app(req, "");
}

/* Decide from the lookup row what this callback does: link, sign up, sign in, or refuse. */
static void gh_cb_decide(struct gh_callback_op *c, const PGresult *res)
{
	struct http_op *op = &c->op;
	bool has_identity = !PQgetisnull(res, 0, 0);
	const char *owner = PQgetvalue(res, 0, 0);

	if (*c->link_user != '\0') {
		if (PQgetisnull(res, 0, 6) || strcmp(PQgetvalue(res, 0, 6), "t") != 0) {
			gh_cb_redirect_error(c, "account_deleted", c->link_user);
		} else if (has_identity && strcmp(owner, c->link_user) == 0) {
			http_op_rollback(op);
			http_set_cancel(op->req, NULL, NULL);
			gh_redirect_app(op->req, NULL); /* already linked: nothing to change */
		} else if (has_identity) {
			gh_cb_redirect_error(c, "github_account_in_use", c->link_user);
		} else if (!PQgetisnull(res, 0, 5)) {
			gh_cb_redirect_error(c, "other_github_linked", c->link_user);
		} else {
			const char *p[3] = { c->github_id, c->link_user, c->login };

			op->state = GH_CB_LINK;
			(void)http_op_prepared(op, "github_link", 3, p);
		}
		return;
	}
	if (has_identity) {
		if (strcmp(PQgetvalue(res, 0, 1), "t") != 0) {
			gh_cb_redirect_error(c, "account_deleted", owner);
			return;
		}
		if (PQgetisnull(res, 0, 2)) {
			gh_cb_redirect_error(c, "no_organization", owner);
			return;
		}
		snprintf(c->user_id, sizeof(c->user_id), "%s", owner);
		snprintf(c->org_id, sizeof(c->org_id), "%s", PQgetvalue(res, 0, 2));
		snprintf(c->role, sizeof(c->role), "%s", PQgetvalue(res, 0, 3));
		op->state = GH_CB_SIGNUP_AUDIT; /* continue as if the account had just been made */
		op->advance(op, DB_OK, NULL);
		return;
	}
	if (!PQgetisnull(res, 0, 4)) {
		/* Same email, no link: never a silent takeover. The owner logs in and links. */
		gh_cb_redirect_error(c, "account_exists", PQgetvalue(res, 0, 4));
		return;
	}
	{
		const char *p[6] = { c->user_id,   c->email, c->name,
			             c->github_id, c->login, c->org_id };

		cs_uuid4(c->user_id);
		cs_uuid4(c->org_id);
		snprintf(c->role, sizeof(c->role), "owner");
		op->state = GH_CB_SIGNUP;
		(void)http_op_prepared(op, "github_signup", 6, p);
	}
}

static void gh_cb_advance(struct http_op *op, enum db_event ev, const PGresult *res)
{
	struct gh_callback_op *c = (struct gh_callback_op *)op;
	struct audit_event aev;
	json_t *details;

	if (ev != DB_OK) {
		const char *st = res != NULL ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;

		if (st != NULL && strcmp(st, "23505") == 0) {
			http_op_fail(
			    op, 409, "conflict",
			    "this GitHub account or email was just linked elsewhere; retry");
			return;
		}
		http_op_db_fail(op, ev, res);
		return;
	}
	switch (op->state) {
	case GH_CB_CONSUME:
		if (PQntuples(res) != 1 || strcmp(PQgetvalue(res, 0, 0), "t") != 0) {
			gh_cb_fail(
			    c, 400, "invalid_state", "invalid_state",
			    "the sign-in state is unknown, expired, already used or not this "
			    "browser's");
			return;
		}
		snprintf(c->verifier, sizeof(c->verifier), "%s", PQgetvalue(res, 0, 1));
		if (!PQgetisnull(res, 0, 2))
			snprintf(c->link_user, sizeof(c->link_user), "%s", PQgetvalue(res, 0, 2));
		gh_cb_exchange(c);
		return;
	case GH_CB_BEGIN: {
		const char *p[3] = { c->github_id, c->email,
			             *c->link_user != '\0' ? c->link_user : NULL };

		op->state = GH_CB_LOOKUP;
		(void)http_op_prepared(op, "github_lookup", 3, p);
		return;
	}
	case GH_CB_LOOKUP:
		gh_cb_decide(c, res);
		return;
	case GH_CB_LINK:
		op->state = GH_CB_LINK_AUDIT;
		c->linked = true;
		audit_event_from_request(&aev, op->req,
		                         op->req->auth.authenticated ? op->req->auth.org_id : NULL,
		                         c->link_user, "user.updated");
		aev.resource_id = c->link_user;
		details = json_pack("{s:[s], s:s}", "fields", "github", "github_id", c->github_id);
		(void)audit_op_write(op, &aev, details);
		return;
	case GH_CB_LINK_AUDIT:
		op->state = GH_CB_COMMIT;
		http_op_commit(op);
		return;
	case GH_CB_SIGNUP:
		op->state = GH_CB_SIGNUP_AUDIT;
		audit_event_from_request(&aev, op->req, c->org_id, c->user_id, "auth.signup");
		aev.resource_id = c->user_id;
		details = json_pack("{s:s, s:s, s:s}", "org_id", c->org_id, "method", "github",
		                    "github_id", c->github_id);
		auth_op_audit_hmac(op, &aev, details, "email", c->email);
		return;
	case GH_CB_SIGNUP_AUDIT: {
		char ttl[32];
		const char *ua = http_header(op->req, "User-Agent");
		const char *p[8] = { c->session_id,      c->user_id,           c->org_id,
			             op->req->client_ip, ua != NULL ? ua : "", ttl,
			             c->login,           c->github_id };

		cs_uuid4(c->session_id);
		snprintf(ttl, sizeof(ttl), "%lld", gh.cfg->access_token_ttl_s);
		op->state = GH_CB_SESSION;
		(void)http_op_prepared(op, "github_session", 8, p);
		return;
	}
	case GH_CB_SESSION:
		op->state = GH_CB_AUDIT;
		audit_event_from_request(&aev, op->req, c->org_id, c->user_id,
		                         "auth.login.succeeded");
		aev.resource_id = c->user_id;
		details = json_pack("{s:s, s:b, s:s, s:s}", "method", "github", "mfa", 0,
		                    "session_id", c->session_id, "github_id", c->github_id);
		auth_op_audit_hmac(op, &aev, details, "email", c->email);
		return;
	case GH_CB_AUDIT:
		op->state = GH_CB_COMMIT;
		http_op_commit(op);
		return;
	case GH_CB_COMMIT:
		http_set_cancel(op->req, NULL, NULL);
		if (c->linked)
			gh_redirect_app(op->req, NULL);
		else
			gh_cb_respond_session(c);
		return;
	default:
		http_op_fail(op, 500, "internal", "sign-in in an unexpected state");
		return;
	}
}

static void gh_callback(struct http_request *req)
{
	const char *state = http_query_arg(req, "state"), *code = http_query_arg(req, "code");
	const char *error = http_query_arg(req, "error");
	const char *cookie;
	struct gh_callback_op *c;
	char state_hash[65], binding_hash[65], *bind;
	size_t blen = 0;
	const char *p[2] = { state_hash, binding_hash };

	if (gh.client == NULL) {
		http_error(req, 404, "not_found", "GitHub sign-in is not configured");
		return;
	}
	/* The binding cookie is single use like the state: expire it whatever happens. */
	http_add_header(req, "Set-Cookie",
	                GH_COOKIE "=; Path=" GH_COOKIE_PATH "; Max-Age=0; HttpOnly; Secure; "
	                          "SameSite=Lax");
	c = http_op_new(req, sizeof(*c), gh_cb_advance);
	c->op.on_cancel = gh_cb_cancel;
	cookie = auth_cookie_find(http_header(req, "Cookie"), GH_COOKIE, &blen);
	if (state == NULL || *state == '\0' || strlen(state) > 128 || cookie == NULL || blen == 0 ||
	    blen > 128) {
		gh_cb_fail(c, 400, "invalid_state", "invalid_state",
		           cookie == NULL ? "the sign-in cookie is missing; start again"
		                          : "the state parameter is missing or malformed");
		return;
	}
	if (error != NULL) {
		/* The user declined (or GitHub refused) on GitHub's page: no code to exchange. */
		gh_cb_fail(c, 403, "github_denied",
		           strcmp(error, "access_denied") == 0 ? "github_access_denied"
		                                               : "github_authorize_error",
		           "GitHub did not authorize the sign-in");
		return;
	}
	if (code == NULL || *code == '\0' || strlen(code) > 512) {
		gh_cb_fail(c, 400, "invalid_request", "github_no_code",
		           "query argument code is missing or too long");
		return;
	}
	c->code = xstrdup(code);
	bind = xstrndup(cookie, blen);
	auth_token_hash_hex(state_hash, state);
	auth_token_hash_hex(binding_hash, bind);
	cs_free_secret(bind);
	c->op.state = GH_CB_CONSUME;
	(void)http_op_prepared(&c->op, "github_state_consume", 2, p);
}

/* ---- POST /api/v1/webhooks/github ---- */

enum gh_hook_state {
	GH_HOOK_BEGIN,  /* BEGIN sent */
	GH_HOOK_RECORD, /* the delivery inserted, or found: a replay */
	GH_HOOK_USER,   /* the account linked to the sender looked up */
	GH_HOOK_REVOKE, /* every session of the linked user revoked */
	GH_HOOK_AUDIT,  /* auth.sessions.revoked appended */
	GH_HOOK_COMMIT, /* COMMIT sent */
};

struct gh_hook_op {
	struct http_op op;
	char delivery[GH_FIELD_MAX + 1], event[GH_FIELD_MAX + 1], action[GH_FIELD_MAX + 1];
	char sender[24];              /* GitHub user id of the payload's sender, or empty */
	bool revoke;                  /* github_app_authorization / revoked */
	char user_id[37], org_id[37]; /* the linked account and its home org ("": none) */
	struct auth_revoked revoked;
};

/* Whether X-Hub-Signature-256 is the HMAC-SHA256 of the raw body under the secret. */
static bool gh_hook_signature_ok(const struct http_request *req)
{
	const char *sig = http_header(req, "X-Hub-Signature-256");
	unsigned char want[EVP_MAX_MD_SIZE], got[32];
	unsigned int wlen = 0;
	bool ok;

	if (gh.hook_secret == NULL || sig == NULL || strncmp(sig, "sha256=", 7) != 0 ||
	    strlen(sig + 7) != 64)
		return false;
	for (size_t i = 0; i < 32; i++) {
		char pair[3] = { sig[7 + 2 * i], sig[8 + 2 * i], '\0' };
		char *end;

		if (strspn(pair, "0123456789abcdefABCDEF") != 2)
			return false;
		got[i] = (unsigned char)strtoul(pair, &end, 16);
	}
	if (HMAC(EVP_sha256(), gh.hook_secret, (int)gh.hook_secret_len,
	         (const unsigned char *)(req->body != NULL ? req->body : ""), req->body_len, want,
	         &wlen) == NULL ||
	    wlen != 32)
		return false;
	ok = CRYPTO_memcmp(want, got, 32) == 0;
	cs_wipe(want, sizeof(want));
	return ok;
}

static void gh_hook_respond(struct http_op *op, const char *status)
{
	struct gh_hook_op *h = (struct gh_hook_op *)op;

	http_set_cancel(op->req, NULL, NULL);
	http_respond_json(op->req, 202,
	                  json_pack("{s:s, s:s}", "status", status, "delivery_id", h->delivery));
}

static void gh_hook_advance(struct http_op *op, enum db_event ev, const PGresult *res)
{
	struct gh_hook_op *h = (struct gh_hook_op *)op;
	struct audit_event aev;
	json_t *details;

	if (ev != DB_OK) {
		http_op_db_fail(op, ev, res);
		return;
	}
	switch (op->state) {
	case GH_HOOK_BEGIN: {
		const char *p[4] = { h->delivery, h->event, *h->action != '\0' ? h->action : NULL,
			             *h->sender != '\0' ? h->sender : NULL };

		op->state = GH_HOOK_RECORD;
		(void)http_op_prepared(op, "github_delivery_record", 4, p);
		return;
	}
	case GH_HOOK_RECORD:
		if (PQntuples(res) == 0) {
			/* A replay: acknowledged, nothing done twice. */
			http_op_rollback(op);
			gh_hook_respond(op, "duplicate");
			return;
		}
		if (!h->revoke || *h->sender == '\0') {
			op->state = GH_HOOK_COMMIT;
			http_op_commit(op);
			return;
		}
		{
			const char *p[1] = { h->sender };

			op->state = GH_HOOK_USER;
			(void)http_op_prepared(op, "github_hook_user", 1, p);
		}
		return;
	case GH_HOOK_USER:
		if (PQntuples(res) != 1) {
			op->state = GH_HOOK_COMMIT; /* nobody linked to that GitHub account */
			http_op_commit(op);
			return;
		}
		snprintf(h->user_id, sizeof(h->user_id), "%s", PQgetvalue(res, 0, 0));
		snprintf(h->org_id, sizeof(h->org_id), "%s", PQgetvalue(res, 0, 1));
		op->state = GH_HOOK_REVOKE;
		(void)auth_op_sessions_revoke(op, h->user_id, NULL, NULL, NULL,
		                              "github_app_revoked");
		return;
	case GH_HOOK_REVOKE:
		auth_revoked_keep(op->req, &h->revoked, res);
		op->state = GH_HOOK_AUDIT;
		audit_event_from_request(&aev, op->req, *h->org_id != '\0' ? h->org_id : NULL, NULL,
		                         "auth.sessions.revoked");
		aev.resource_id = h->user_id;
		details = json_pack("{s:s, s:i, s:s}", "reason", "github_app_revoked", "families",
		                    h->revoked.n, "delivery_id", h->delivery);
		(void)audit_op_write(op, &aev, details);
		return;
	case GH_HOOK_AUDIT:
		op->state = GH_HOOK_COMMIT;
		http_op_commit(op);
		return;
	case GH_HOOK_COMMIT:
		/* This worker refuses the tokens at once; the others follow the NOTIFY. */
		auth_revoked_note(&h->revoked);
		gh_hook_respond(op, "accepted");
		return;
	}
}

static void gh_webhook(struct http_request *req)
{
	const char *delivery = http_header(req, "X-GitHub-Delivery");
	const char *event = http_header(req, "X-GitHub-Event");
	struct gh_hook_op *h;
	json_t *body, *sender;
	const char *action;

	if (!gh_hook_signature_ok(req)) {
		json_t *d = json_pack(
		    "{s:o, s:o}", "delivery_id",
		    gh_word_ok(delivery, GH_FIELD_MAX) ? json_string(delivery) : json_null(),
		    "event", gh_word_ok(event, GH_FIELD_MAX) ? json_string(event) : json_null());

		auth_audit_refuse(req, NULL, NULL, "webhook.github.rejected", NULL, d, 401,
		                  "bad_signature",
		                  "X-Hub-Signature-256 is missing or does not match the body");
		json_decref(d);
		return;
	}
	if (!gh_word_ok(delivery, GH_FIELD_MAX)) {
		http_error(req, 400, "invalid_request",
		           "header X-GitHub-Delivery is missing or invalid");
		return;
	}
	if (!gh_word_ok(event, GH_FIELD_MAX)) {
		http_error(req, 400, "invalid_request",
		           "header X-GitHub-Event is missing or invalid");
		return;
	}
	body = http_json_body(req);
	if (body == NULL)
		return;
	h = http_op_new(req, sizeof(*h), gh_hook_advance);
	snprintf(h->delivery, sizeof(h->delivery), "%s", delivery);
	snprintf(h->event, sizeof(h->event), "%s", event);
	action = json_string_value(json_object_get(body, "action"));
	if (gh_word_ok(action, GH_FIELD_MAX))
		snprintf(h->action, sizeof(h->action), "%s", action);
	sender = json_object_get(json_object_get(body, "sender"), "id");
	if (json_is_integer(sender) && json_integer_value(sender) > 0)
		snprintf(h->sender, sizeof(h->sender), "%lld",
		         (long long)json_integer_value(sender));
	h->revoke =
	    strcmp(h->event, "github_app_authorization") == 0 && strcmp(h->action, "revoked") == 0;
	json_decref(body);
	h->op.state = GH_HOOK_BEGIN;
	(void)http_op_begin(&h->op);
}

/* ---- registration and per-worker start-up ---- */

void auth_github_routes(struct router *r)
{
	struct db_pool *db = cs_worker->db;

	db_pool_prepare(db, "github_state_store",
	                "WITH gc AS (DELETE FROM github_oauth_states WHERE expires_at < now() - "
	                "interval '1 hour') "
	                "INSERT INTO github_oauth_states (state_hash, binding_hash, code_verifier, "
	                "link_user_id, expires_at) VALUES (decode($1, 'hex'), decode($2, 'hex'), "
	                "$3, $4::uuid, now() + make_interval(secs => $5::int))",
	                5);
	db_pool_prepare(db, "github_state_consume",
	                "DELETE FROM github_oauth_states WHERE state_hash = decode($1, 'hex') "
	                "AND binding_hash = decode($2, 'hex') "
	                "RETURNING expires_at > now(), code_verifier, link_user_id",
	                2);
	db_pool_prepare(
	    db, "github_lookup",
	    "SELECT gi.user_id, u.deleted_at IS NULL, m.org_id, m.role, "
	    "(SELECT e.id FROM users e WHERE e.email = $2 AND e.deleted_at IS NULL), "
	    "(SELECT l.github_id FROM github_identities l WHERE l.user_id = $3::uuid), "
	    "(SELECT d.deleted_at IS NULL FROM users d WHERE d.id = $3::uuid) "
	    "FROM (SELECT $1::bigint AS gid) x "
	    "LEFT JOIN github_identities gi ON gi.github_id = x.gid "
	    "LEFT JOIN users u ON u.id = gi.user_id "
	    "LEFT JOIN LATERAL (SELECT org_id, role FROM memberships WHERE user_id = gi.user_id "
	    "ORDER BY (role = 'owner') DESC, created_at LIMIT 1) m ON true",
	    3);
	db_pool_prepare(db, "github_link",
	                "WITH i AS (INSERT INTO github_identities (github_id, user_id, login) "
	                "VALUES ($1::bigint, $2::uuid, $3)) "
	                "UPDATE users SET github_id = $1::bigint, github_login = $3 WHERE id = $2",
	                3);
	db_pool_prepare(db, "github_signup",
	                "WITH u AS (INSERT INTO users (id, email, name, github_id, github_login) "
	                "VALUES ($1, $2, $3, $4::bigint, $5) RETURNING id), "
	                "o AS (INSERT INTO orgs (id, name) VALUES ($6, $5) RETURNING id), "
	                "m AS (INSERT INTO memberships (org_id, user_id, role) "
	                "SELECT o.id, u.id, 'owner' FROM u, o) "
	                "INSERT INTO github_identities (github_id, user_id, login) "
	                "SELECT $4::bigint, u.id, $5 FROM u",
	                6);
	db_pool_prepare(
	    db, "github_session",
	    "WITH s AS (INSERT INTO sessions (id, user_id, org_id, method, ip, "
	    "user_agent, expires_at) VALUES ($1, $2, $3, 'github', $4, left($5, 512), "
	    "now() + make_interval(secs => $6::bigint))), "
	    "i AS (UPDATE github_identities SET login = $7 WHERE github_id = $8::bigint) "
	    "UPDATE users SET last_login_at = now(), github_login = $7 WHERE id = $2",
	    8);
	db_pool_prepare(
	    db, "github_delivery_record",
	    "INSERT INTO github_deliveries (delivery_id, event, action, github_user_id) "
	    "VALUES ($1, $2, $3, $4::bigint) ON CONFLICT (delivery_id) DO NOTHING "
	    "RETURNING 1",
	    4);
	db_pool_prepare(db, "github_hook_user",
	                "SELECT gi.user_id, coalesce((SELECT m.org_id::text FROM memberships m "
	                "WHERE m.user_id = gi.user_id ORDER BY (m.role = 'owner') DESC, "
	                "m.created_at LIMIT 1), '') FROM github_identities gi "
	                "WHERE gi.github_id = $1::bigint",
	                1);
	router_add_perm(r, "GET", "/api/v1/auth/github/login", gh_login,
	                ROUTE_NEEDS_DB | ROUTE_PUBLIC | ROUTE_NO_CSRF, NULL);
	router_add_perm(r, "GET", "/api/v1/auth/github/callback", gh_callback,
	                ROUTE_NEEDS_DB | ROUTE_PUBLIC | ROUTE_NO_CSRF, NULL);
	router_add_perm(r, "POST", "/api/v1/webhooks/github", gh_webhook,
	                ROUTE_NEEDS_DB | ROUTE_PUBLIC | ROUTE_NO_CSRF, NULL);
}

int auth_github_init(struct event_base *base, const struct config *cfg)
{
	struct http_client_options opt;

	memset(&gh, 0, sizeof(gh));
	gh.cfg = cfg;
	if (*cfg->github_webhook_secret_file != '\0') {
		gh.hook_secret =
		    gh_read_secret(cfg->github_webhook_secret_file, "github_webhook_secret_file");
		if (gh.hook_secret == NULL)
			goto fail;
		gh.hook_secret_len = strlen(gh.hook_secret);
	}
	if (*cfg->github_client_id == '\0')
		return 0; /* sign-in off; webhooks may still be received */
	if (*cfg->github_redirect_url == '\0' || *cfg->github_client_secret_file == '\0') {
		log_warnx(
		    "github_init",
		    "github_client_id needs github_redirect_url and github_client_secret_file");
		goto fail;
	}
	gh.web = gh_base_url(cfg->github_web_url);
	gh.api = gh_base_url(cfg->github_api_url);
	if (gh.web == NULL || gh.api == NULL) {
		log_warnx("github_init", "github_web_url and github_api_url must be http(s) URLs");
		goto fail;
	}
	gh.client_secret =
	    gh_read_secret(cfg->github_client_secret_file, "github_client_secret_file");
	if (gh.client_secret == NULL)
		goto fail;
	memset(&opt, 0, sizeof(opt));
	opt.ca_file = *cfg->github_ca_file != '\0' ? cfg->github_ca_file : NULL;
	opt.max_conns_per_host = 4;
	opt.deadline_ms = GH_CALL_DEADLINE_MS;
	opt.max_body_bytes = GH_BODY_MAX;
	gh.client = http_client_new(base, &opt);
	if (gh.client == NULL)
		goto fail;
	return 0;
fail:
	auth_github_free();
	return -1;
}

void auth_github_free(void)
{
	if (gh.client != NULL)
		http_client_free(gh.client);
	free(gh.web);
	free(gh.api);
	cs_free_secret(gh.client_secret);
	cs_free_secret(gh.hook_secret);
	memset(&gh, 0, sizeof(gh));
}
