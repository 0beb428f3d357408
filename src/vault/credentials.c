/*
 * credentials.c - the credential store: validation and the HTTP API of AWS
 * accounts and provider credentials, and creds_load(), through which the
 * rest of the daemon gets decrypted material. Each handler that waits on
 * Postgres is an http_op whose states read top to bottom; every write and
 * its audit row commit together. Secrets are sealed before the INSERT
 * leaves the process and wiped from the request body, jansson's copy and
 * every temporary buffer as soon as they are sealed.
 */
#include "config.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cloudsweep/audit.h"
#include "cloudsweep/config.h"
#include "cloudsweep/creds.h"
#include "cloudsweep/http.h"
#include "cloudsweep/log.h"
#include "cloudsweep/vault.h"
#include "cloudsweep/worker.h"
#include "creds_int.h"

#define CREDS_ROLE_ARN_MAX        2048 /* bytes of a role ARN */
#define CREDS_NAME_MAX            255  /* characters of an account or credential name */
#define CREDS_EXT_MIN             8    /* characters of an external id */
#define CREDS_EXT_MAX             64
#define CREDS_KEY_ID_MIN          16 /* characters of an access key id */
#define CREDS_KEY_ID_MAX          128
#define CREDS_SECRET_KEY_MIN      16 /* characters of a secret access key */
#define CREDS_SECRET_KEY_MAX      128
#define CREDS_PROVIDER_SECRET_MAX 16384 /* bytes of a provider credential */
#define CREDS_RELOAD_GAP_MS       1000  /* at most one ring reload a second for unknown versions */

#define CREDS_PROVIDER_JSON                                                                      \
	"json_build_object('id', p.id, 'provider', p.provider, 'name', p.name, 'key_version', "  \
	"vault_blob_version(p.secret_enc), 'created_by', p.created_by, 'created_at', " CREDS_TS( \
	    "p.created_at") ")"

static struct {
	char **regions; /* owned; the allow-list */
	int nregions;
	uint64_t last_reload_ms;
} cr_g;

/* ---- validation ---- */

bool creds_account_id_valid(const char *s)
{
	size_t i;

	for (i = 0; s[i] != '\0'; i++)
		if (!isdigit((unsigned char)s[i]))
			return false;
	return i == 12;
}

bool creds_role_arn_valid(const char *s)
{
	static const char prefix[] = "arn:aws:iam::";
	size_t n = strlen(s), i;

	if (n > CREDS_ROLE_ARN_MAX || strncmp(s, prefix, sizeof(prefix) - 1) != 0)
		return false;
	s += sizeof(prefix) - 1;
	for (i = 0; i < 12; i++)
		if (!isdigit((unsigned char)s[i]))
			return false;
	s += 12;
	if (strncmp(s, ":role/", 6) != 0)
		return false;
	s += 6;
	if (*s == '\0')
		return false;
	for (; *s != '\0'; s++)
		if (!isalnum((unsigned char)*s) && strchr("_+=,.@-", *s) == NULL)
			return false;
	return true;
}

/* Characters of a UTF-8 string (jansson strings are valid UTF-8). */
static size_t creds_utf8_len(const char *s)
{
	size_t n = 0;

	for (; *s != '\0'; s++)
		if (((unsigned char)*s & 0xc0) != 0x80)
			n++;
	return n;
}

bool creds_name_valid(const char *name)
{
	size_t n = creds_utf8_len(name);

	return n >= 1 && n <= CREDS_NAME_MAX && strpbrk(name, "<>\"'") == NULL &&
	       !cs_has_control(name);
}

/* The shape of a region name: lower-case words and a number, e.g. "ap-southeast-2". */
static bool creds_region_shape(const char *s)
{
	size_t n = strlen(s), i, dashes = 0;

	if (n < 6 || n > 32 || !isdigit((unsigned char)s[n - 1]) || !islower((unsigned char)s[0]))
		return false;
	for (i = 0; i < n; i++) {
		if (s[i] == '-') {
			if (s[i + 1] == '-' || s[i + 1] == '\0')
				return false;
			dashes++;
		} else if (!islower((unsigned char)s[i]) && !isdigit((unsigned char)s[i])) {
			return false;
		}
	}
	return dashes >= 2;
}

bool creds_region_allowed(const char *region)
{
	for (int i = 0; i < cr_g.nregions; i++)
		if (strcmp(cr_g.regions[i], region) == 0)
			return true;
	return false;
}

static void creds_regions_clear(void)
{
	for (int i = 0; i < cr_g.nregions; i++)
		free(cr_g.regions[i]);
	free(cr_g.regions);
	cr_g.regions = NULL;
	cr_g.nregions = 0;
}

int creds_config_check(const struct config *cfg, char *err, size_t errlen)
{
	char *list, *tok, *save = NULL;

	if (strcmp(cfg->vault_provider, "kms") == 0) {
		if (kms_config_check(cfg, err, errlen) == -1)
			return -1;
	}
	if (strcmp(cfg->vault_provider, "file") != 0 && strcmp(cfg->vault_provider, "kms") != 0) {
		snprintf(err, errlen, "vault_provider: must be file or kms");
		return -1;
	}
	creds_regions_clear();
	list = xstrdup(cfg->aws_regions);
	for (tok = strtok_r(list, " ,\t", &save); tok != NULL;
	     tok = strtok_r(NULL, " ,\t", &save)) {
		if (!creds_region_shape(tok)) {
			snprintf(err, errlen, "aws_regions: \"%.40s\" is not a region name", tok);
			free(list);
			creds_regions_clear();
			return -1;
		}
		if (creds_region_allowed(tok))
			continue;
		cr_g.regions = xrealloc(cr_g.regions, sizeof(char *) * (size_t)(cr_g.nregions + 1));
		cr_g.regions[cr_g.nregions++] = xstrdup(tok);
	}
	free(list);
	if (cr_g.nregions == 0) {
		snprintf(err, errlen, "aws_regions: the allow-list is empty");
		return -1;
	}
	return 0;
}

/* ---- the key ring ---- */

struct vault_keyring *creds_ring_for(const char *blob)
{
	struct vault_keyring *kr = vault_ring();
	int v = blob != NULL ? vault_blob_kek_version(blob) : -1;

	if (kr != NULL && v > 0 && !vault_keyring_has_version(kr, v) &&
	    cs_now_ms() - cr_g.last_reload_ms >= CREDS_RELOAD_GAP_MS) {
		cr_g.last_reload_ms = cs_now_ms();
		if (vault_worker_reload() == 0)
			log_info("vault_reload", "key ring reloaded: a blob names version %d", v);
		kr = vault_ring();
	}
	return kr;
}

/* ---- material ---- */

void creds_free(struct creds *c)
{
	if (c == NULL)
		return;
	cs_free_secret(c->external_id);
	cs_free_secret(c->secret_access_key);
	free(c->role_arn);
	free(c->access_key_id);
	for (int i = 0; i < c->nregions; i++)
		free(c->regions[i]);
	free(c->regions);
	cs_wipe(c, sizeof(*c));
	free(c);
}

/* ---- creds_load ---- */

/*
 * No transaction: the read has nothing to roll back, and credential.read is
 * one statement of its own, so the org's chain head is never held across a
 * round trip (a scan reads a credential per unit, all on one org's chain).
 * The plaintext still goes to the caller only once that row has committed.
 */
enum creds_load_state {
	CL_READ,  /* the row is being read */
	CL_AUDIT, /* credential.read being appended */
};

struct creds_load {
	struct db_pool *pool;      /* borrowed */
	struct db_query *q;        /* CL_READ: the read, until it answers */
	struct audit_write *audit; /* CL_AUDIT: the append, until it answers */
	enum creds_load_state state;
	char org[37], id[37], actor[37];
	char purpose[8];  /* "scan", "verify", "cleanup" */
	char ref_key[16]; /* "scan_id", "waste_item_id" or "" */
	char ref[37];
	struct creds *c; /* owned until handed over */
	creds_load_cb cb;
	void *arg;
};

static void creds_load_end(struct creds_load *l, enum creds_status st)
{
	struct creds *c = st == CREDS_OK ? l->c : NULL;

	db_query_cancel(l->q);
	audit_write_cancel(l->audit);
	if (st != CREDS_OK)
		creds_free(l->c);
	l->c = NULL;
	l->cb(l->arg, st, c);
	cs_wipe(l, sizeof(*l));
	free(l);
}

static enum creds_status creds_db_status(enum db_event ev)
{
	return ev == DB_UNAVAILABLE || ev == DB_TIMEOUT ? CREDS_UNAVAILABLE : CREDS_ERROR;
}

/* Open one sealed field into *out (a C string the caller wipes); 0 or -1. */
static int creds_open_field(const char *org, const char *id, const char *field, const char *blob,
                            char **out)
{
	struct vault_keyring *kr = creds_ring_for(blob);
	unsigned char *pt = NULL;
	size_t len = 0;

	*out = NULL;
	if (kr == NULL || vault_open(kr, org, id, field, blob, &pt, &len) == -1)
		return -1;
	if (memchr(pt, '\0', len) != NULL) {
		vault_secret_free(pt, len);
		return -1;
	}
	*out = (char *)pt; /* NUL-terminated by vault_open; wiped by cs_free_secret */
	return 0;
}

/* Turn the row (kind, account_id, role_arn, ext, key id, secret, regions json) into l->c. */
static int creds_load_decrypt(struct creds_load *l, const PGresult *res)
{
	struct creds *c = xcalloc(1, sizeof(*c));
	const char *kind = PQgetvalue(res, 0, 0);
	const char *blob;
	json_t *regions;
	json_error_t jerr;
	size_t i;

	l->c = c;
	snprintf(c->id, sizeof(c->id), "%s", l->id);
	snprintf(c->org_id, sizeof(c->org_id), "%s", l->org);
	snprintf(c->account_id, sizeof(c->account_id), "%s", PQgetvalue(res, 0, 1));
	if (strcmp(kind, "role") == 0) {
		c->kind = CREDS_ROLE;
		c->role_arn = xstrdup(PQgetvalue(res, 0, 2));
		blob = PQgetvalue(res, 0, 3);
		if (PQgetisnull(res, 0, 3) ||
		    creds_open_field(l->org, l->id, CREDS_FIELD_EXTERNAL_ID, blob,
		                     &c->external_id) == -1)
			return -1;
	} else {
		c->kind = CREDS_KEYS;
		c->access_key_id = xstrdup(PQgetvalue(res, 0, 4));
		blob = PQgetvalue(res, 0, 5);
		if (PQgetisnull(res, 0, 5) ||
		    creds_open_field(l->org, l->id, CREDS_FIELD_SECRET_KEY, blob,
		                     &c->secret_access_key) == -1)
			return -1;
	}
	c->key_version = vault_blob_kek_version(blob);
	regions = json_loads(PQgetvalue(res, 0, 6), 0, &jerr);
	if (!json_is_array(regions)) {
		json_decref(regions);
		return -1;
	}
	c->regions = xcalloc(json_array_size(regions) + 1, sizeof(char *));
	for (i = 0; i < json_array_size(regions); i++) {
		const char *r = json_string_value(json_array_get(regions, i));

		if (r != NULL)
			c->regions[c->nregions++] = xstrdup(r);
	}
	json_decref(regions);
	return 0;
}

static void creds_load_audit_cb(void *arg, int status, const char *event_id)
{
	struct creds_load *l = arg;

	l->audit = NULL;
	creds_load_end(l, status == 0 ? CREDS_OK : CREDS_UNAVAILABLE);
}

static void creds_load_read_cb(void *arg, enum db_event ev, const PGresult *res)
{
	struct creds_load *l = arg;
	struct audit_event aev;
	json_t *details;

	l->q = NULL;
	if (ev != DB_OK) {
		creds_load_end(l, creds_db_status(ev));
		return;
	}
	if (PQntuples(res) != 1) {
		creds_load_end(l, CREDS_NOT_FOUND);
		return;
	}
	if (creds_load_decrypt(l, res) == -1) {
		log_warnx("creds_open_failed",
		          "the secret of AWS account %s (org %s) does not open", l->id, l->org);
		creds_load_end(l, CREDS_ERROR);
		return;
	}
	details = json_pack("{s:s, s:i}", "purpose", l->purpose, "key_version", l->c->key_version);
	if (details != NULL && l->ref_key[0] != '\0')
		json_object_set_new(details, l->ref_key, json_string(l->ref));
	/* As before: without the audit key the event goes out without it. */
	if (details != NULL && l->c->access_key_id != NULL &&
	    audit_details_set_hmac(details, "access_key_id", l->c->access_key_id) == -1)
		log_debug("creds_load", "access_key_id left out of the audit details");
	memset(&aev, 0, sizeof(aev));
	aev.org_id = l->org;
	aev.actor = l->actor[0] != '\0' ? l->actor : NULL;
	aev.event_type = "credential.read";
	aev.resource_id = l->id;
	aev.details = details;
	l->state = CL_AUDIT;
	l->audit =
	    details != NULL ? audit_write_standalone(l->pool, &aev, creds_load_audit_cb, l) : NULL;
	json_decref(details);
	if (l->audit == NULL)
		creds_load_end(l, CREDS_ERROR);
}

/* Split purpose into l->purpose / ref_key / ref; -1 when it is not one of the forms. */
static int creds_purpose_parse(struct creds_load *l, const char *purpose)
{
	if (purpose == NULL)
		return -1;
	if (strcmp(purpose, "verify") == 0) {
		snprintf(l->purpose, sizeof(l->purpose), "verify");
		return 0;
	}
	if (strncmp(purpose, "scan:", 5) == 0)
		purpose += 5;
	if (cs_uuid_valid(purpose)) {
		snprintf(l->purpose, sizeof(l->purpose), "scan");
		snprintf(l->ref_key, sizeof(l->ref_key), "scan_id");
		snprintf(l->ref, sizeof(l->ref), "%s", purpose);
		return 0;
	}
	if (strncmp(purpose, "cleanup:", 8) == 0 && cs_uuid_valid(purpose + 8)) {
		snprintf(l->purpose, sizeof(l->purpose), "cleanup");
		snprintf(l->ref_key, sizeof(l->ref_key), "waste_item_id");
		snprintf(l->ref, sizeof(l->ref), "%s", purpose + 8);
		return 0;
	}
	return -1;
}

struct creds_load *creds_load_as(struct db_pool *pool, const char *org_id,
                                 const char *aws_account_id, const char *purpose, const char *actor,
                                 creds_load_cb cb, void *arg)
{
	struct creds_load *l;

	if (pool == NULL || cb == NULL || !cs_uuid_valid(org_id) ||
	    !cs_uuid_valid(aws_account_id) || (actor != NULL && !cs_uuid_valid(actor)))
		return NULL;
	l = xcalloc(1, sizeof(*l));
	if (creds_purpose_parse(l, purpose) == -1) {
		free(l);
		return NULL;
	}
	l->pool = pool;
	l->cb = cb;
	l->arg = arg;
	snprintf(l->org, sizeof(l->org), "%s", org_id);
	snprintf(l->id, sizeof(l->id), "%s", aws_account_id);
	if (actor != NULL)
		snprintf(l->actor, sizeof(l->actor), "%s", actor);
	l->state = CL_READ;
	l->q = db_query(pool,
	                "SELECT kind, account_id, role_arn, external_id_enc, access_key_id, "
	                "secret_access_key_enc, to_json(regions)::text FROM aws_accounts "
	                "WHERE id = $1::uuid AND org_id = $2::uuid AND deleted_at IS NULL",
	                2, (const char *const[]){ l->id, l->org }, creds_load_read_cb, l);
	if (l->q == NULL) {
		free(l);
		return NULL;
	}
	return l;
}

struct creds_load *creds_load(struct db_pool *pool, const char *org_id, const char *aws_account_id,
                              const char *purpose, creds_load_cb cb, void *arg)
{
	return creds_load_as(pool, org_id, aws_account_id, purpose, NULL, cb, arg);
}

void creds_load_cancel(struct creds_load *l)
{
	if (l == NULL)
		return;
	db_query_cancel(l->q);
	audit_write_cancel(l->audit);
	creds_free(l->c);
	cs_wipe(l, sizeof(*l));
	free(l);
}

/* ---- request helpers ---- */

/* Wipe every secret a request carried: the raw body and jansson's strings; then free body. */
static void creds_body_free(struct http_request *req, json_t *body)
{
	static const char *const secret_keys[] = { "external_id", "secret_access_key", "secret" };

	for (size_t i = 0; body != NULL && i < sizeof(secret_keys) / sizeof(secret_keys[0]); i++) {
		json_t *v = json_object_get(body, secret_keys[i]);

		if (json_is_string(v))
			cs_wipe((char *)json_string_value(v), json_string_length(v));
	}
	json_decref(body);
	if (req->body != NULL)
		cs_wipe(req->body, req->body_len);
}

/* A string field: NULL and 400 naming it when it is present but not a clean string. */
static const char *creds_str(struct http_request *req, json_t *body, const char *name,
                             size_t maxlen, bool *bad)
{
	json_t *v = json_object_get(body, name);

	if (v == NULL || json_is_null(v))
		return NULL;
	if (!json_is_string(v) || json_string_length(v) > maxlen ||
	    strlen(json_string_value(v)) != json_string_length(v)) {
		http_error(req, 400, "invalid_request", "%s must be a string of at most %zu bytes",
		           name, maxlen);
		*bad = true;
		return NULL;
	}
	return json_string_value(v);
}

static bool creds_limit_cursor(struct http_request *req, char lim[16], const char **cursor)
{
	const char *limit = http_query_arg(req, "limit");
	long n = 50;

	if (limit != NULL) {
		char *end;

		n = strtol(limit, &end, 10);
		if (*limit == '\0' || *end != '\0' || n < 1 || n > 500) {
			http_error(req, 400, "invalid_request", "limit must be 1-500");
			return false;
		}
	}
	snprintf(lim, 16, "%ld", n);
	*cursor = http_query_arg(req, "cursor");
	if (*cursor != NULL && !cs_uuid_valid(*cursor)) {
		http_error(req, 400, "invalid_request", "cursor is not valid");
		return false;
	}
	return true;
}

/* The {id} path parameter when it is a UUID; else answers 404 and returns NULL. */
static const char *creds_path_id(struct http_request *req)
{
	const char *id = http_param(req, "id");

	if (!cs_uuid_valid(id)) {
		http_error(req, 404, "not_found", "not found");
		return NULL;
	}
	return id;
}

/*
 * The check's outcome as the API shows it: {ok, assumed_role_arn,
 * external_id_enforced, error: {code, message} when not ok, account}.
 */
static json_t *acct_verify_doc(const struct creds_verify_result *r)
{
	json_t *doc = json_pack("{s:b, s:s?, s:o}", "ok", r->ok, "assumed_role_arn", r->role_arn,
	                        "external_id_enforced",
	                        r->enforced == -1 ? json_null() : json_boolean(r->enforced == 1));

	if (doc != NULL && !r->ok)
		json_object_set_new(
		    doc, "error", json_pack("{s:s, s:s}", "code", r->code, "message", r->message));
	return doc;
}

/* The who of a request, for the audit rows of the check. */
static struct creds_verify_who acct_verify_who(struct http_request *req)
{
	struct creds_verify_who who = { .actor = req->auth.user_id,
		                        .ip = req->client_ip,
		                        .user_agent = http_header(req, "User-Agent"),
		                        .request_id = req->request_id };

	return who;
}

/* ---- POST /api/v1/aws-accounts ---- */

enum acct_create_state {
	AC_BEGIN,  /* BEGIN sent */
	AC_INSERT, /* the row is being inserted */
	AC_AUDIT,  /* credential.created being appended */
	AC_COMMIT, /* COMMIT sent */
};

struct acct_create {
	struct http_op op;
	char id[37];
	char account_id[13];
	const char *name;         /* pool-owned */
	const char *role_arn;     /* pool-owned, or NULL */
	const char *ext_blob;     /* pool-owned vault blob, or NULL */
	char ext_last4[20];       /* last 4 characters of the external id (UTF-8) */
	const char *key_id;       /* pool-owned, or NULL */
	const char *key_blob;     /* pool-owned vault blob, or NULL */
	const char *regions_lit;  /* pool-owned Postgres array literal */
	const char *regions_json; /* pool-owned JSON array text */
	const char *doc;          /* pool-owned answer, once inserted */
	int key_version;
};

static void acct_create_verified_cb(void *arg, enum creds_verify_status st,
                                    const struct creds_verify_result *r)
{
	struct acct_create *ac = arg;
	struct http_request *req = ac->op.req;
	json_error_t jerr;
	json_t *doc, *ver;

	http_set_cancel(req, NULL, NULL);
	doc = json_loads(st == CREDS_VERIFY_DONE && r->account != NULL ? r->account : ac->doc, 0,
	                 &jerr);
	if (doc == NULL) {
		http_respond(req, 201, "application/json", ac->doc, strlen(ac->doc));
		return;
	}
	if (st == CREDS_VERIFY_DONE)
		ver = acct_verify_doc(r);
	else
		ver = json_pack("{s:b, s:n, s:n, s:{s:s, s:s}}", "ok", 0, "assumed_role_arn",
		                "external_id_enforced", "error", "code", "verify_failed", "message",
		                "the account was stored but could not be checked; call "
		                "POST /api/v1/aws-accounts/{id}/verify");
	json_object_set_new(doc, "verification", ver);
	http_respond_json(req, 201, doc);
}

/* The client left while the check ran: forget it (a COMMIT already sent completes). */
static void acct_verify_cancel_cb(struct http_request *req, void *arg)
{
	(void)req;
	creds_verify_cancel(arg);
}

/*
 * The onboarding check after a create: the account is stored whatever it
 * finds, and the 201 carries the outcome under "verification". -1 when it
 * could not start (answer the plain 201).
 */
static int acct_create_verify(struct acct_create *ac)
{
	struct http_request *req = ac->op.req;
	struct creds_verify_who who = acct_verify_who(req);
	struct creds_verify *v = creds_verify_start(cs_worker->db, req->auth.org_id, ac->id, &who,
	                                            acct_create_verified_cb, ac);

	if (v == NULL)
		return -1;
	http_set_cancel(req, acct_verify_cancel_cb, v);
	return 0;
}

static void acct_create_advance(struct http_op *op, enum db_event ev, const PGresult *res)
{
	struct acct_create *ac = (struct acct_create *)op;
	struct http_request *req = op->req;

	if (ev != DB_OK) {
		const char *state = res != NULL ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;

		if (op->state == AC_INSERT && state != NULL && strcmp(state, "23505") == 0) {
			http_op_fail(op, 409, "conflict",
			             "AWS account %s is already connected to this organization",
			             ac->account_id);
			return;
		}
		http_op_db_fail(op, ev, res);
		return;
	}
	switch (op->state) {
	case AC_BEGIN: {
		const char *p[11] = { ac->id,
			              req->auth.org_id,
			              ac->account_id,
			              ac->name,
			              ac->role_arn != NULL ? "role" : "keys",
			              ac->role_arn,
			              ac->ext_blob,
			              ac->ext_blob != NULL ? ac->ext_last4 : NULL,
			              ac->key_id,
			              ac->key_blob,
			              ac->regions_lit };
		const char *q[12];

		memcpy(q, p, sizeof(p));
		q[11] = req->auth.user_id;
		op->state = AC_INSERT;
		(void)http_op_query(
		    op,
		    "INSERT INTO aws_accounts AS a (id, org_id, account_id, account_name, "
		    "kind, role_arn, external_id_enc, external_id_last4, access_key_id, "
		    "secret_access_key_enc, regions, created_by) VALUES ($1, $2, $3, $4, "
		    "$5, $6, $7, $8, $9, $10, $11::text[], $12) "
		    "RETURNING " CREDS_ACCOUNT_JSON,
		    12, q);
		return;
	}
	case AC_INSERT: {
		struct audit_event aev;
		json_t *details, *regions;
		json_error_t jerr;

		ac->doc = http_strndup(req, PQgetvalue(res, 0, 0), (size_t)PQgetlength(res, 0, 0));
		op->state = AC_AUDIT;
		regions = json_loads(ac->regions_json, 0, &jerr);
		details = json_pack("{s:s, s:s, s:o, s:i}", "account_id", ac->account_id, "kind",
		                    ac->role_arn != NULL ? "role" : "access_key", "regions",
		                    regions != NULL ? regions : json_array(), "key_version",
		                    ac->key_version);
		audit_event_from_request(&aev, req, req->auth.org_id, req->auth.user_id,
		                         "credential.created");
		aev.resource_id = ac->id;
		if (details != NULL && ac->key_id != NULL &&
		    audit_details_set_hmac(details, "access_key_id", ac->key_id) == -1) {
			json_decref(details);
			details = NULL;
		}
		(void)audit_op_write(op, &aev, details);
		return;
	}
	case AC_AUDIT:
		op->state = AC_COMMIT;
		http_op_commit(op);
		return;
	case AC_COMMIT:
		http_set_cancel(req, NULL, NULL);
		if (cs_worker->cfg->aws_verify_on_create && creds_verify_available() &&
		    acct_create_verify(ac) == 0)
			return;
		http_respond(req, 201, "application/json", ac->doc, strlen(ac->doc));
		return;
	}
}

/* Seal a secret for (org, id, field) into a pool-owned blob; NULL answers 500. */
static const char *creds_seal(struct http_request *req, const char *id, const char *field,
                              const char *secret, int *version)
{
	struct vault_keyring *kr = vault_ring();
	char *blob;
	const char *out;

	if (kr == NULL) {
		http_error(req, 500, "internal", "the vault is not ready");
		return NULL;
	}
	blob = vault_seal(kr, req->auth.org_id, id, field, secret, strlen(secret));
	if (blob == NULL) {
		http_error(req, 500, "internal", "the secret could not be encrypted");
		return NULL;
	}
	*version = vault_blob_kek_version(blob);
	out = http_strndup(req, blob, strlen(blob));
	free(blob);
	return out;
}

/* Validate body.regions into ac (literal and JSON); -1 has answered 400. */
static int acct_regions(struct http_request *req, json_t *body, const char **litp,
                        const char **jsonp)
{
	json_t *v = json_object_get(body, "regions"), *e;
	size_t i, lit_len = 2;
	char *lit, *js;
	json_t *seen;

	if (!json_is_array(v) || json_array_size(v) == 0 ||
	    json_array_size(v) > CREDS_REGIONS_MAX) {
		http_error(req, 400, "invalid_request",
		           "regions must be an array of 1-%d region names from the allow-list",
		           CREDS_REGIONS_MAX);
		return -1;
	}
	seen = json_array();
	json_array_foreach (v, i, e) {
		const char *r = json_string_value(e);

		if (r == NULL || strlen(r) != json_string_length(e) || !creds_region_allowed(r)) {
			http_error(req, 400, "invalid_request",
			           "regions[%zu] is not an allowed region", i);
			json_decref(seen);
			return -1;
		}
		for (size_t j = 0; j < json_array_size(seen); j++) {
			if (strcmp(json_string_value(json_array_get(seen, j)), r) == 0) {
				http_error(req, 400, "invalid_request", "regions[%zu] is repeated",
				           i);
				json_decref(seen);
				return -1;
			}
		}
		json_array_append_new(seen, json_string(r));
		lit_len += strlen(r) + 1;
	}
	/* Allowed names are [a-z0-9-]: nothing to quote in the array literal. */
	lit = http_alloc(req, lit_len + 1);
	lit[0] = '{';
	lit[1] = '\0';
	json_array_foreach (seen, i, e) {
		if (i > 0)
			strcat(lit, ",");
		strcat(lit, json_string_value(e));
	}
	strcat(lit, "}");
	*litp = lit;
	js = json_dumps(seen, JSON_COMPACT);
	json_decref(seen);
	if (js == NULL) {
		http_error(req, 500, "internal", "internal error");
		return -1;
	}
	*jsonp = http_strndup(req, js, strlen(js));
	free(js);
	return 0;
}

/* The last 4 characters of a UTF-8 string into out. */
static void creds_last4(const char *s, char *out, size_t outlen)
{
	size_t n = strlen(s), start = n;
	int chars = 0;

	while (start > 0 && chars < 4) {
		start--;
		if (((unsigned char)s[start] & 0xc0) != 0x80)
			chars++;
	}
	snprintf(out, outlen, "%s", s + start);
}

static bool creds_key_id_valid(const char *s)
{
	size_t n = strlen(s);

	if (n < CREDS_KEY_ID_MIN || n > CREDS_KEY_ID_MAX)
		return false;
	for (; *s != '\0'; s++)
		if (!isupper((unsigned char)*s) && !isdigit((unsigned char)*s))
			return false;
	return true;
}

static bool creds_secret_key_valid(const char *s)
{
	size_t n = strlen(s);

	if (n < CREDS_SECRET_KEY_MIN || n > CREDS_SECRET_KEY_MAX)
		return false;
	for (; *s != '\0'; s++)
		if ((unsigned char)*s <= ' ' || (unsigned char)*s >= 0x7f)
			return false;
	return true;
}

static void acct_create(struct http_request *req)
{
	json_t *body = http_json_body(req);
	struct acct_create *ac;
	const char *account_id = NULL, *name = NULL, *arn = NULL, *ext = NULL, *key_id = NULL,
	           *secret = NULL, *regions_lit, *regions_json, *blob;
	char id[37];
	int version = 0;
	bool bad = false;

	if (body == NULL) {
		if (req->body != NULL)
			cs_wipe(req->body, req->body_len);
		return;
	}
	account_id = creds_str(req, body, "account_id", 64, &bad);
	if (!bad)
		name = creds_str(req, body, "account_name", 4 * CREDS_NAME_MAX, &bad);
	if (!bad)
		arn = creds_str(req, body, "role_arn", CREDS_ROLE_ARN_MAX, &bad);
	if (!bad)
		ext = creds_str(req, body, "external_id", 4 * CREDS_EXT_MAX, &bad);
	if (!bad)
		key_id = creds_str(req, body, "access_key_id", CREDS_KEY_ID_MAX, &bad);
	if (!bad)
		secret = creds_str(req, body, "secret_access_key", CREDS_SECRET_KEY_MAX, &bad);
	if (bad)
		goto done;
	if (account_id == NULL || !creds_account_id_valid(account_id)) {
		http_error(req, 400, "invalid_request", "account_id must be 12 digits");
		goto done;
	}
	if (name == NULL || !creds_name_valid(name)) {
		http_error(
		    req, 400, "invalid_request",
		    "account_name must be 1-255 characters without <>\"' or control characters");
		goto done;
	}
	if ((arn != NULL || ext != NULL) && (key_id != NULL || secret != NULL)) {
		http_error(req, 400, "invalid_request",
		           "role_arn: give role_arn and external_id, or access_key_id and "
		           "secret_access_key, not both");
		goto done;
	}
	if (arn == NULL && ext == NULL && key_id == NULL && secret == NULL) {
		http_error(req, 400, "invalid_request",
		           "role_arn is required (with external_id), or access_key_id with "
		           "secret_access_key");
		goto done;
	}
	if (arn != NULL || ext != NULL) {
		if (arn == NULL || !creds_role_arn_valid(arn)) {
			http_error(req, 400, "invalid_request",
			           "role_arn must look like arn:aws:iam::<12 digits>:role/<name>");
			goto done;
		}
		if (strncmp(arn + 13, account_id, 12) != 0) {
			http_error(req, 400, "invalid_request",
			           "role_arn must belong to account_id %s", account_id);
			goto done;
		}
		if (ext == NULL || creds_utf8_len(ext) < CREDS_EXT_MIN ||
		    creds_utf8_len(ext) > CREDS_EXT_MAX || cs_has_control(ext)) {
			http_error(req, 400, "invalid_request",
			           "external_id must be %d-%d characters", CREDS_EXT_MIN,
			           CREDS_EXT_MAX);
			goto done;
		}
	} else {
		if (key_id == NULL || !creds_key_id_valid(key_id)) {
			http_error(req, 400, "invalid_request",
			           "access_key_id must be %d-%d upper-case letters and digits",
			           CREDS_KEY_ID_MIN, CREDS_KEY_ID_MAX);
			goto done;
		}
		if (secret == NULL || !creds_secret_key_valid(secret)) {
			http_error(req, 400, "invalid_request",
			           "secret_access_key must be %d-%d printable characters",
			           CREDS_SECRET_KEY_MIN, CREDS_SECRET_KEY_MAX);
			goto done;
		}
	}
	if (acct_regions(req, body, &regions_lit, &regions_json) == -1)
		goto done;
	cs_uuid4(id);
	if (arn != NULL)
		blob = creds_seal(req, id, CREDS_FIELD_EXTERNAL_ID, ext, &version);
	else
		blob = creds_seal(req, id, CREDS_FIELD_SECRET_KEY, secret, &version);
	if (blob == NULL)
		goto done;
	ac = http_op_new(req, sizeof(*ac), acct_create_advance);
	memcpy(ac->id, id, sizeof(ac->id));
	snprintf(ac->account_id, sizeof(ac->account_id), "%s", account_id);
	ac->name = http_strndup(req, name, strlen(name));
	ac->regions_lit = regions_lit;
	ac->regions_json = regions_json;
	ac->key_version = version;
	if (arn != NULL) {
		ac->role_arn = http_strndup(req, arn, strlen(arn));
		creds_last4(ext, ac->ext_last4, sizeof(ac->ext_last4));
		ac->ext_blob = blob;
	} else {
		ac->key_id = http_strndup(req, key_id, strlen(key_id));
		ac->key_blob = blob;
	}
	creds_body_free(req, body);
	ac->op.state = AC_BEGIN;
	(void)http_op_begin(&ac->op);
	return;
done:
	creds_body_free(req, body);
}

/* ---- GET /api/v1/aws-accounts, GET /api/v1/aws-accounts/{id} ---- */

/* A page of the organization's rows from stmt ($1 org, $2 limit, $3 cursor). */
static void creds_list(struct http_request *req, const char *stmt)
{
	char lim[16];
	const char *cursor;
	const char *p[3];

	if (!creds_limit_cursor(req, lim, &cursor))
		return;
	p[0] = req->auth.org_id;
	p[1] = lim;
	p[2] = cursor;
	http_op_read_json(req, stmt, 3, p);
}

static void acct_list(struct http_request *req)
{
	creds_list(req, "creds_account_list");
}

static void acct_get(struct http_request *req)
{
	const char *id = creds_path_id(req);
	const char *p[2];

	if (id == NULL)
		return;
	p[0] = id;
	p[1] = req->auth.org_id;
	http_op_read_json(req, "creds_account_get", 2, p);
}

/* ---- DELETE /api/v1/aws-accounts/{id} ---- */

enum acct_delete_state {
	AD_BEGIN,  /* BEGIN sent */
	AD_UPDATE, /* soft delete, secrets wiped from the row */
	AD_AUDIT,  /* credential.deleted being appended */
	AD_COMMIT, /* COMMIT sent */
};

struct acct_delete {
	struct http_op op;
	const char *id; /* borrowed from the request */
};

static void acct_delete_advance(struct http_op *op, enum db_event ev, const PGresult *res)
{
	struct acct_delete *ad = (struct acct_delete *)op;
	struct http_request *req = op->req;

	if (ev != DB_OK) {
		http_op_db_fail(op, ev, res);
		return;
	}
	switch (op->state) {
	case AD_BEGIN: {
		const char *p[2] = { ad->id, req->auth.org_id };

		op->state = AD_UPDATE;
		(void)http_op_query(
		    op,
		    "UPDATE aws_accounts SET deleted_at = now(), external_id_enc = NULL, "
		    "secret_access_key_enc = NULL WHERE id = $1::uuid AND org_id = "
		    "$2::uuid AND deleted_at IS NULL RETURNING account_id",
		    2, p);
		return;
	}
	case AD_UPDATE: {
		struct audit_event aev;
		json_t *details;

		if (PQntuples(res) != 1) {
			http_op_fail(op, 404, "not_found", "not found");
			return;
		}
		details = json_pack("{s:s}", "account_id", PQgetvalue(res, 0, 0));
		audit_event_from_request(&aev, req, req->auth.org_id, req->auth.user_id,
		                         "credential.deleted");
		aev.resource_id = ad->id;
		op->state = AD_AUDIT;
		(void)audit_op_write(op, &aev, details);
		return;
	}
	case AD_AUDIT:
		op->state = AD_COMMIT;
		http_op_commit(op);
		return;
	case AD_COMMIT:
		http_set_cancel(req, NULL, NULL);
		http_respond(req, 204, NULL, NULL, 0);
		return;
	}
}

static void acct_delete(struct http_request *req)
{
	const char *id = creds_path_id(req);
	struct acct_delete *ad;

	if (id == NULL)
		return;
	ad = http_op_new(req, sizeof(*ad), acct_delete_advance);
	ad->id = id;
	ad->op.state = AD_BEGIN;
	(void)http_op_begin(&ad->op);
}

/* ---- POST /api/v1/aws-accounts/{id}/verify ---- */

/*
 * 200 with {ok:false, error} when AWS answered and refused (or the trust
 * policy is unsound); 502 with the same body when AWS could not be reached.
 */
static void acct_verify_cb(void *arg, enum creds_verify_status st,
                           const struct creds_verify_result *r)
{
	struct http_request *req = arg;
	json_error_t jerr;
	json_t *doc;

	http_set_cancel(req, NULL, NULL);
	switch (st) {
	case CREDS_VERIFY_DONE:
		break;
	case CREDS_VERIFY_NOT_FOUND:
		http_error(req, 404, "not_found", "not found");
		return;
	case CREDS_VERIFY_UNAVAILABLE:
		http_error(req, 503, "unavailable", "the database is unreachable; retry later");
		return;
	case CREDS_VERIFY_ERROR:
		http_error(req, 500, "internal", "the credentials could not be checked");
		return;
	}
	doc = acct_verify_doc(r);
	if (doc == NULL) {
		http_error(req, 500, "internal", "internal error");
		return;
	}
	if (r->account != NULL)
		json_object_set_new(doc, "account", json_loads(r->account, 0, &jerr));
	if (r->unreachable)
		json_object_set_new(doc, "request_id", json_string(req->request_id));
	http_respond_json(req, r->unreachable ? 502 : 200, doc);
}

static void acct_verify(struct http_request *req)
{
	const char *id = creds_path_id(req);
	struct creds_verify_who who;
	struct creds_verify *v;

	if (id == NULL)
		return;
	if (!creds_verify_available()) {
		http_error(req, 501, "not_implemented",
		           "this server has no AWS credentials (aws_credentials_file or "
		           "AWS_ACCESS_KEY_ID) to verify accounts with");
		return;
	}
	who = acct_verify_who(req);
	v = creds_verify_start(cs_worker->db, req->auth.org_id, id, &who, acct_verify_cb, req);
	if (v == NULL) {
		http_error(req, 503, "unavailable", "the database is unreachable; retry later");
		return;
	}
	http_set_cancel(req, acct_verify_cancel_cb, v);
}

/* ---- provider credentials ---- */

enum prov_create_state {
	PC_BEGIN,  /* BEGIN sent */
	PC_INSERT, /* the row is being inserted */
	PC_AUDIT,  /* credential.created being appended */
	PC_COMMIT, /* COMMIT sent */
};

struct prov_create {
	struct http_op op;
	char id[37];
	const char *provider; /* static */
	const char *name;     /* pool-owned */
	const char *blob;     /* pool-owned vault blob */
	const char *doc;      /* pool-owned answer */
	int key_version;
};

static void prov_create_advance(struct http_op *op, enum db_event ev, const PGresult *res)
{
	struct prov_create *pc = (struct prov_create *)op;
	struct http_request *req = op->req;

	if (ev != DB_OK) {
		http_op_db_fail(op, ev, res);
		return;
	}
	switch (op->state) {
	case PC_BEGIN: {
		const char *p[6] = { pc->id,   req->auth.org_id, pc->provider,
			             pc->name, pc->blob,         req->auth.user_id };

		op->state = PC_INSERT;
		(void)http_op_query(
		    op,
		    "INSERT INTO provider_credentials AS p (id, org_id, provider, name, "
		    "secret_enc, created_by) VALUES ($1, $2, $3, $4, $5, $6) "
		    "RETURNING " CREDS_PROVIDER_JSON,
		    6, p);
		return;
	}
	case PC_INSERT: {
		struct audit_event aev;
		json_t *details;

		pc->doc = http_strndup(req, PQgetvalue(res, 0, 0), (size_t)PQgetlength(res, 0, 0));
		details = json_pack("{s:s, s:s, s:i}", "kind", "provider", "provider", pc->provider,
		                    "key_version", pc->key_version);
		audit_event_from_request(&aev, req, req->auth.org_id, req->auth.user_id,
		                         "credential.created");
		aev.resource_type = "provider_credential";
		aev.resource_id = pc->id;
		op->state = PC_AUDIT;
		(void)audit_op_write(op, &aev, details);
		return;
	}
	case PC_AUDIT:
		op->state = PC_COMMIT;
		http_op_commit(op);
		return;
	case PC_COMMIT:
		http_set_cancel(req, NULL, NULL);
		http_respond(req, 201, "application/json", pc->doc, strlen(pc->doc));
		return;
	}
}

static void prov_create(struct http_request *req)
{
	json_t *body = http_json_body(req);
	struct prov_create *pc;
	const char *provider = NULL, *name = NULL, *secret = NULL, *blob;
	char id[37];
	int version = 0;
	bool bad = false;

	if (body == NULL) {
		if (req->body != NULL)
			cs_wipe(req->body, req->body_len);
		return;
	}
	provider = creds_str(req, body, "provider", 16, &bad);
	if (!bad)
		name = creds_str(req, body, "name", 4 * CREDS_NAME_MAX, &bad);
	if (!bad)
		secret = creds_str(req, body, "secret", CREDS_PROVIDER_SECRET_MAX, &bad);
	if (bad)
		goto done;
	if (provider == NULL || (strcmp(provider, "gcp") != 0 && strcmp(provider, "azure") != 0)) {
		http_error(req, 400, "invalid_request", "provider must be gcp or azure");
		goto done;
	}
	if (name == NULL || !creds_name_valid(name)) {
		http_error(req, 400, "invalid_request",
		           "name must be 1-255 characters without <>\"' or control characters");
		goto done;
	}
	if (secret == NULL || *secret == '\0') {
		http_error(req, 400, "invalid_request", "secret is required (a non-empty string)");
		goto done;
	}
	cs_uuid4(id);
	blob = creds_seal(req, id, CREDS_FIELD_PROVIDER, secret, &version);
	if (blob == NULL)
		goto done;
	pc = http_op_new(req, sizeof(*pc), prov_create_advance);
	memcpy(pc->id, id, sizeof(pc->id));
	pc->provider = strcmp(provider, "gcp") == 0 ? "gcp" : "azure";
	pc->name = http_strndup(req, name, strlen(name));
	pc->blob = blob;
	pc->key_version = version;
	creds_body_free(req, body);
	pc->op.state = PC_BEGIN;
	(void)http_op_begin(&pc->op);
	return;
done:
	creds_body_free(req, body);
}

static void prov_list(struct http_request *req)
{
	creds_list(req, "creds_provider_list");
}

/* ---- registration ---- */

/* A cursor-paginated list of table t (alias x) as {items, next_cursor}, newest first. */
#define CREDS_LIST_SQL(t, x, json, live)                                                       \
	"WITH page AS (SELECT * FROM " t " " x " WHERE " x ".org_id = $1::uuid " live          \
	" AND ($3::uuid IS NULL OR (" x ".created_at, " x ".id) < (SELECT c.created_at, c.id " \
	"FROM " t " c WHERE c.id = $3::uuid AND c.org_id = $1::uuid)) ORDER BY " x             \
	".created_at DESC, " x ".id DESC LIMIT $2::int + 1), shown AS (SELECT * FROM page "    \
	"ORDER BY created_at DESC, id DESC LIMIT $2::int) SELECT json_build_object('items', "  \
	"coalesce((SELECT json_agg(" json " ORDER BY " x ".created_at DESC, " x ".id DESC) "   \
	"FROM shown " x "), '[]'), 'next_cursor', CASE WHEN (SELECT count(*) FROM page) > "    \
	"$2::int THEN (SELECT " x ".id::text FROM shown " x " ORDER BY " x ".created_at, " x   \
	".id LIMIT 1) END)"

void creds_routes(struct router *r)
{
	router_add_perm(r, "POST", "/api/v1/aws-accounts", acct_create, ROUTE_NEEDS_DB,
	                "aws_accounts:write");
	router_add_perm(r, "GET", "/api/v1/aws-accounts", acct_list, ROUTE_NEEDS_DB,
	                "aws_accounts:read");
	router_add_perm(r, "GET", "/api/v1/aws-accounts/{id}", acct_get, ROUTE_NEEDS_DB,
	                "aws_accounts:read");
	router_add_perm(r, "DELETE", "/api/v1/aws-accounts/{id}", acct_delete, ROUTE_NEEDS_DB,
	                "aws_accounts:write");
	router_add_perm(r, "POST", "/api/v1/aws-accounts/{id}/verify", acct_verify, ROUTE_NEEDS_DB,
	                "aws_accounts:write");
	router_add_perm(r, "POST", "/api/v1/provider-credentials", prov_create, ROUTE_NEEDS_DB,
	                "aws_accounts:write");
	router_add_perm(r, "GET", "/api/v1/provider-credentials", prov_list, ROUTE_NEEDS_DB,
	                "aws_accounts:read");
	creds_keys_routes(r);
}

int creds_worker_init(struct event_base *base, const struct config *cfg, struct db_pool *pool)
{
	char err[256];

	if (creds_config_check(cfg, err, sizeof(err)) == -1) {
		log_warnx("creds_init", "%s", err);
		return -1;
	}
	db_pool_prepare_read(pool, "creds_account_get",
	                     "SELECT " CREDS_ACCOUNT_JSON
	                     " FROM aws_accounts a WHERE a.id = $1::uuid "
	                     "AND a.org_id = $2::uuid AND a.deleted_at IS NULL",
	                     2);
	db_pool_prepare_read(
	    pool, "creds_account_list",
	    CREDS_LIST_SQL("aws_accounts", "a", CREDS_ACCOUNT_JSON, "AND a.deleted_at IS NULL"), 3);
	db_pool_prepare_read(pool, "creds_provider_list",
	                     CREDS_LIST_SQL("provider_credentials", "p", CREDS_PROVIDER_JSON, ""),
	                     3);
	creds_rewrap_start(base, cfg, pool);
	return 0;
}

void creds_worker_free(void)
{
	creds_rewrap_stop();
	creds_regions_clear();
}
