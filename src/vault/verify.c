/*
 * verify.c - the onboarding check of an AWS account. For a role: AssumeRole
 * with the stored external id must succeed, and AssumeRole with a random
 * wrong external id must be refused; if the wrong one is accepted the
 * customer's trust policy does not check the external id (the confused
 * deputy hole) and the account is flagged. For a key pair:
 * GetCallerIdentity must name the account the keys were stored for. The
 * outcome (status, verified_at, verify_error, external_id_enforced) and the
 * credential.verified audit event commit together. Nothing here logs or
 * stores a secret: the decrypted material is wiped as soon as AWS answered.
 */
#include "config.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cloudsweep/audit.h"
#include "cloudsweep/aws.h"
#include "cloudsweep/creds.h"
#include "cloudsweep/log.h"
#include "cloudsweep/util.h"
#include "creds_int.h"

#define VERIFY_SESSION        "cloudsweep-verify"       /* RoleSessionName of the real try */
#define VERIFY_PROBE_SESSION  "cloudsweep-verify-probe" /* ... of the wrong-external-id probe */
#define VERIFY_DEFAULT_REGION "us-east-1"

enum verify_state {
	VS_LOAD,     /* creds_load pending */
	VS_ASSUME,   /* AssumeRole with the stored external id */
	VS_PROBE,    /* AssumeRole with a wrong external id: must be refused */
	VS_IDENTITY, /* GetCallerIdentity with the key pair */
	VS_BEGIN,    /* BEGIN sent for the outcome */
	VS_UPDATE,   /* the row being updated */
	VS_AUDIT,    /* credential.verified being appended */
	VS_COMMIT,   /* COMMIT sent; cannot be called back off */
};

enum verify_event {
	VE_CREDS, /* creds_load answered */
	VE_AWS,   /* STS answered (or gave up) */
	VE_DB,    /* a step of the outcome's transaction answered */
};

/* One event and what came with it; pointers valid only during the advance. */
struct verify_input {
	enum verify_event ev;
	enum creds_status cst;        /* VE_CREDS */
	struct creds *c;              /* VE_CREDS, handed over on CREDS_OK */
	const struct aws_result *aws; /* VE_AWS */
	enum db_event db;             /* VE_DB */
	const PGresult *res;          /* VE_DB */
};

struct creds_verify {
	struct db_pool *pool; /* borrowed */
	enum verify_state state;
	bool cancelled;            /* the owner left while COMMIT ran; free on its answer */
	struct creds_load *load;   /* pending, or NULL */
	struct aws_sts_wait *wait; /* pending, or NULL */
	struct aws_call *call;     /* pending, or NULL */
	struct db_tx *tx;          /* open transaction, or NULL */
	struct db_query *q;        /* pending query, or NULL */
	struct creds *c;           /* owned secrets; freed (wiped) once AWS answered */
	char org[37], id[37];
	char actor[37];
	char *ip, *user_agent, *request_id; /* owned copies, or NULL */
	/* the outcome */
	bool ok, unreachable;
	int enforced;             /* 1, 0, -1 unknown */
	enum audit_result result; /* credential.verified's result */
	char *role_arn;           /* owned, or NULL */
	char code[64];            /* "" when ok */
	char *message;            /* owned, or NULL when ok */
	char aws_request_id[128]; /* of the decisive call */
	char probe_request_id[128];
	char *account; /* owned account JSON after the update, or NULL */
	creds_verify_cb cb;
	void *arg;
};

static void verify_advance(struct creds_verify *v, const struct verify_input *in);

bool creds_verify_available(void)
{
	return aws_worker_client() != NULL && aws_worker_base_credentials() != NULL;
}

static void verify_free(struct creds_verify *v)
{
	creds_free(v->c);
	free(v->ip);
	free(v->user_agent);
	free(v->request_id);
	free(v->role_arn);
	free(v->message);
	free(v->account);
	free(v);
}

/* Cancel whatever is pending; the transaction is rolled back. */
static void verify_stop(struct creds_verify *v)
{
	if (v->load != NULL)
		creds_load_cancel(v->load);
	v->load = NULL;
	if (v->wait != NULL)
		aws_sts_wait_cancel(v->wait);
	v->wait = NULL;
	if (v->call != NULL)
		aws_call_cancel(v->call);
	v->call = NULL;
	if (v->q != NULL)
		db_query_cancel(v->q);
	v->q = NULL;
	if (v->tx != NULL)
		db_tx_rollback(v->tx);
	v->tx = NULL;
}

/* The one way out: hand the outcome to the owner and free. */
static void verify_end(struct creds_verify *v, enum creds_verify_status st)
{
	struct creds_verify_result r;

	verify_stop(v);
	memset(&r, 0, sizeof(r));
	r.ok = v->ok;
	r.unreachable = v->unreachable;
	r.enforced = v->enforced;
	r.role_arn = v->role_arn;
	r.code = v->code;
	r.message = v->message != NULL ? v->message : "";
	r.account = v->account;
	v->cb(v->arg, st, &r);
	verify_free(v);
}

static enum creds_verify_status verify_db_status(enum db_event ev)
{
	return ev == DB_UNAVAILABLE || ev == DB_TIMEOUT ? CREDS_VERIFY_UNAVAILABLE
	                                                : CREDS_VERIFY_ERROR;
}

/* Record a failed check: code, a message without secrets, the audit result. */
static void verify_fail(struct creds_verify *v, const char *code, enum audit_result result,
                        const char *fmt, ...) CS_PRINTF(4, 5);

static void verify_fail(struct creds_verify *v, const char *code, enum audit_result result,
                        const char *fmt, ...)
{
	char msg[768];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	v->ok = false;
	v->result = result;
	snprintf(v->code, sizeof(v->code), "%s", code);
	free(v->message);
	v->message = xstrdup(msg);
}

/* Classify an AWS failure of the step named what. */
static void verify_aws_fail(struct creds_verify *v, const char *what, const struct aws_result *res)
{
	switch (res->status) {
	case AWS_OK:
		return;
	case AWS_ERR_SERVICE:
		verify_fail(
		    v, res->error_code[0] != '\0' ? res->error_code : "aws_error",
		    strcmp(res->error_code, "AccessDenied") == 0 ? AUDIT_DENIED : AUDIT_ERROR,
		    "%s was refused by AWS (HTTP %d): %s", what, res->http_status, res->message);
		return;
	case AWS_ERR_REQUEST:
		verify_fail(v, "aws_request_invalid", AUDIT_ERROR, "%s could not be sent: %s", what,
		            res->message);
		return;
	case AWS_ERR_THROTTLED:
	case AWS_ERR_TIMEOUT:
	case AWS_ERR_NETWORK:
	case AWS_ERR_RESPONSE:
		v->unreachable = true;
		verify_fail(v, "aws_unavailable", AUDIT_ERROR,
		            "AWS STS did not answer %s (%s after %d attempts): %s", what,
		            aws_status_name(res->status), res->attempts, res->message);
		return;
	}
}

static void verify_aws_cb(const struct aws_result *res, void *arg)
{
	struct creds_verify *v = arg;
	struct verify_input in = { .ev = VE_AWS, .aws = res };

	v->call = NULL;
	verify_advance(v, &in);
}

static void verify_sts_cb(const struct aws_result *res, const struct aws_credentials *creds,
                          time_t expiration, void *arg)
{
	struct creds_verify *v = arg;
	struct verify_input in = { .ev = VE_AWS, .aws = res };

	(void)creds; /* the probe's credentials are never used */
	(void)expiration;
	v->wait = NULL;
	verify_advance(v, &in);
}

static void verify_load_cb(void *arg, enum creds_status st, struct creds *c)
{
	struct creds_verify *v = arg;
	struct verify_input in = { .ev = VE_CREDS, .cst = st, .c = c };

	v->load = NULL;
	verify_advance(v, &in);
}

static void verify_db_cb(void *arg, enum db_event ev, const PGresult *res)
{
	struct creds_verify *v = arg;
	struct verify_input in = { .ev = VE_DB, .db = ev, .res = res };

	v->q = NULL;
	if (v->state == VS_COMMIT && v->cancelled) {
		verify_free(v);
		return;
	}
	verify_advance(v, &in);
}

static void verify_begin_cb(void *arg, enum db_event ev, const PGresult *res)
{
	struct creds_verify *v = arg;

	if (ev != DB_OK)
		v->tx = NULL; /* the pool freed it */
	verify_db_cb(arg, ev, res);
}

static const char *verify_region(const struct creds *c)
{
	return c->nregions > 0 ? c->regions[0] : VERIFY_DEFAULT_REGION;
}

/* AssumeRole the account's role with external_id; -1 when it could not start. */
static int verify_assume(struct creds_verify *v, const char *external_id, const char *session)
{
	struct aws_assume_role role = {
		.role_arn = v->c->role_arn,
		.external_id = external_id,
		.session_name = session,
		.source_identity = v->org,
		.no_cache = true,
	};

	v->wait = aws_sts_assume_role(aws_worker_client(), aws_worker_base_credentials(),
	                              verify_region(v->c), &role, verify_sts_cb, v);
	return v->wait != NULL ? 0 : -1;
}

/* GetCallerIdentity with the stored key pair; -1 when it could not start. */
static int verify_identity(struct creds_verify *v)
{
	struct aws_credentials keys = { .access_key_id = v->c->access_key_id,
		                        .secret_access_key = v->c->secret_access_key };
	struct aws_request req = {
		.service = AWS_STS,
		.region = verify_region(v->c),
		.creds = &keys,
		.account = v->c->account_id,
		.action = "GetCallerIdentity",
	};

	v->call = aws_call(aws_worker_client(), &req, verify_aws_cb, v);
	return v->call != NULL ? 0 : -1;
}

/* AWS has said all it will: drop the secrets and store the outcome. */
static void verify_store(struct creds_verify *v)
{
	creds_free(v->c);
	v->c = NULL;
	v->state = VS_BEGIN;
	v->tx = db_tx_begin(v->pool, verify_begin_cb, v);
	if (v->tx == NULL)
		verify_end(v, CREDS_VERIFY_UNAVAILABLE);
}

static void verify_on_loaded(struct creds_verify *v, const struct verify_input *in)
{
	int rc;

	if (in->cst != CREDS_OK) {
		verify_end(v, in->cst == CREDS_NOT_FOUND     ? CREDS_VERIFY_NOT_FOUND
		              : in->cst == CREDS_UNAVAILABLE ? CREDS_VERIFY_UNAVAILABLE
		                                             : CREDS_VERIFY_ERROR);
		return;
	}
	v->c = in->c;
	if (v->c->kind == CREDS_ROLE) {
		v->state = VS_ASSUME;
		rc = verify_assume(v, v->c->external_id, VERIFY_SESSION);
	} else {
		v->state = VS_IDENTITY;
		rc = verify_identity(v);
	}
	if (rc == -1) {
		verify_fail(v, "aws_request_invalid", AUDIT_ERROR,
		            "the STS request could not be built");
		verify_store(v);
	}
}

static void verify_on_assumed(struct creds_verify *v, const struct aws_result *res)
{
	const char *arn = aws_xml_text(res->xml, "AssumeRoleResult/AssumedRoleUser/Arn");
	unsigned char rnd[16];
	char wrong[64];

	snprintf(v->aws_request_id, sizeof(v->aws_request_id), "%s", res->request_id);
	if (res->status != AWS_OK) {
		verify_aws_fail(v, "AssumeRole with the stored external id", res);
		verify_store(v);
		return;
	}
	v->role_arn = arn != NULL ? xstrdup(arn) : NULL;
	/* A fresh random id each time: no trust policy can name it. */
	cs_random(rnd, sizeof(rnd));
	memcpy(wrong, "cs-probe-", 9);
	cs_hex(wrong + 9, rnd, sizeof(rnd));
	v->state = VS_PROBE;
	if (verify_assume(v, wrong, VERIFY_PROBE_SESSION) == -1) {
		verify_fail(v, "aws_request_invalid", AUDIT_ERROR,
		            "the STS probe request could not be built");
		verify_store(v);
	}
}

static void verify_on_probed(struct creds_verify *v, const struct aws_result *res)
{
	snprintf(v->probe_request_id, sizeof(v->probe_request_id), "%s", res->request_id);
	if (res->status == AWS_OK) {
		v->enforced = 0;
		verify_fail(v, "external_id_not_enforced", AUDIT_DENIED,
		            "the role's trust policy accepted a wrong external id: add the "
		            "condition sts:ExternalId to it, or anyone who knows the role ARN can "
		            "make CloudSweep assume it (confused deputy)");
	} else if (res->status == AWS_ERR_SERVICE) {
		/* Refused, as it must be: AccessDenied from a sound trust policy. */
		v->enforced = 1;
		v->ok = true;
		v->result = AUDIT_SUCCESS;
	} else {
		verify_aws_fail(v, "the wrong-external-id probe", res);
	}
	verify_store(v);
}

static void verify_on_identity(struct creds_verify *v, const struct aws_result *res)
{
	const struct aws_xml_node *r = aws_xml_child(res->xml, "GetCallerIdentityResult");
	const char *account = aws_xml_text(r, "Account");
	const char *arn = aws_xml_text(r, "Arn");

	snprintf(v->aws_request_id, sizeof(v->aws_request_id), "%s", res->request_id);
	if (res->status != AWS_OK) {
		verify_aws_fail(v, "GetCallerIdentity with the stored access key", res);
	} else if (account == NULL || strcmp(account, v->c->account_id) != 0) {
		verify_fail(v, "account_mismatch", AUDIT_DENIED,
		            "the access key belongs to AWS account %s, not %s",
		            account != NULL ? account : "(none)", v->c->account_id);
	} else {
		v->role_arn = arn != NULL ? xstrdup(arn) : NULL;
		v->ok = true;
		v->result = AUDIT_SUCCESS;
	}
	verify_store(v);
}

static void verify_update(struct creds_verify *v)
{
	char *err = NULL;
	const char *p[6];

	if (!v->ok)
		err = xasprintf("%s: %s", v->code, v->message != NULL ? v->message : "");
	p[0] = v->id;
	p[1] = v->org;
	p[2] = v->ok ? "verified" : v->unreachable ? NULL : "failed";
	p[3] = v->ok ? "t" : "f";
	p[4] = err;
	p[5] = v->enforced == 1 ? "t" : v->enforced == 0 ? "f" : NULL;
	v->state = VS_UPDATE;
	v->q = db_tx_query(v->tx,
	                   "UPDATE aws_accounts a SET status = coalesce($3, a.status), "
	                   "verified_at = CASE WHEN $4::bool THEN now() ELSE a.verified_at END, "
	                   "verify_error = $5, external_id_enforced = "
	                   "coalesce($6::bool, a.external_id_enforced) WHERE a.id = $1::uuid "
	                   "AND a.org_id = $2::uuid AND a.deleted_at IS NULL "
	                   "RETURNING " CREDS_ACCOUNT_JSON,
	                   6, p, verify_db_cb, v);
	free(err);
	if (v->q == NULL)
		verify_end(v, CREDS_VERIFY_UNAVAILABLE);
}

static void verify_audit(struct creds_verify *v, const PGresult *res)
{
	struct audit_event aev;
	json_t *details;

	if (PQntuples(res) != 1) {
		verify_end(v, CREDS_VERIFY_NOT_FOUND); /* deleted meanwhile */
		return;
	}
	v->account = xstrdup(PQgetvalue(res, 0, 0));
	details = json_pack("{s:b, s:s?, s:s, s:o}", "ok", v->ok, "assumed_role_arn", v->role_arn,
	                    "aws_request_id", v->aws_request_id, "external_id_enforced",
	                    v->enforced == -1 ? json_null() : json_boolean(v->enforced == 1));
	if (details != NULL && !v->ok)
		json_object_set_new(details, "aws_error", json_string(v->code));
	if (details != NULL && v->probe_request_id[0] != '\0')
		json_object_set_new(details, "probe_request_id", json_string(v->probe_request_id));
	memset(&aev, 0, sizeof(aev));
	aev.org_id = v->org;
	aev.actor = v->actor[0] != '\0' ? v->actor : NULL;
	aev.ip = v->ip;
	aev.user_agent = v->user_agent;
	aev.request_id = v->request_id;
	aev.event_type = "credential.verified";
	aev.resource_id = v->id;
	aev.result = v->result;
	aev.details = details;
	v->state = VS_AUDIT;
	v->q = details != NULL ? audit_write(v->tx, &aev, verify_db_cb, v) : NULL;
	json_decref(details);
	if (v->q == NULL)
		verify_end(v, CREDS_VERIFY_ERROR);
}

static void verify_advance(struct creds_verify *v, const struct verify_input *in)
{
	if (in->ev == VE_DB && in->db != DB_OK) {
		if (in->db != DB_ERROR || v->state == VS_BEGIN)
			log_warnx("verify_store", "storing the check of AWS account %s failed",
			          v->id);
		else
			log_warnx("verify_store", "storing the check of AWS account %s: %s", v->id,
			          in->res != NULL ? PQresultErrorMessage(in->res) : "failed");
		verify_end(v, verify_db_status(in->db));
		return;
	}
	switch (v->state) {
	case VS_LOAD:
		verify_on_loaded(v, in);
		return;
	case VS_ASSUME:
		verify_on_assumed(v, in->aws);
		return;
	case VS_PROBE:
		verify_on_probed(v, in->aws);
		return;
	case VS_IDENTITY:
		verify_on_identity(v, in->aws);
		return;
	case VS_BEGIN:
		verify_update(v);
		return;
	case VS_UPDATE:
		verify_audit(v, in->res);
		return;
	case VS_AUDIT: {
		struct db_tx *tx = v->tx;

		v->state = VS_COMMIT;
		v->tx = NULL;
		db_tx_commit(tx, verify_db_cb, v);
		return;
	}
	case VS_COMMIT:
		log_info("aws_account_verified", "AWS account %s (org %s): %s%s%s", v->id, v->org,
		         v->ok ? "ok" : "failed", v->ok ? "" : " ", v->code);
		verify_end(v, CREDS_VERIFY_DONE);
		return;
	}
}

struct creds_verify *creds_verify_start(struct db_pool *pool, const char *org_id, const char *id,
                                        const struct creds_verify_who *who, creds_verify_cb cb,
                                        void *arg)
{
	struct creds_verify *v;

	if (pool == NULL || cb == NULL || org_id == NULL || id == NULL || !creds_verify_available())
		return NULL;
	v = xcalloc(1, sizeof(*v));
	v->pool = pool;
	v->cb = cb;
	v->arg = arg;
	v->enforced = -1;
	v->result = AUDIT_ERROR;
	snprintf(v->org, sizeof(v->org), "%s", org_id);
	snprintf(v->id, sizeof(v->id), "%s", id);
	if (who != NULL) {
		if (who->actor != NULL)
			snprintf(v->actor, sizeof(v->actor), "%s", who->actor);
		v->ip = who->ip != NULL ? xstrdup(who->ip) : NULL;
		v->user_agent = who->user_agent != NULL ? xstrdup(who->user_agent) : NULL;
		v->request_id = who->request_id != NULL ? xstrdup(who->request_id) : NULL;
	}
	v->state = VS_LOAD;
	v->load = creds_load_as(pool, org_id, id, "verify", v->actor[0] != '\0' ? v->actor : NULL,
	                        verify_load_cb, v);
	if (v->load == NULL) {
		verify_free(v);
		return NULL;
	}
	return v;
}

void creds_verify_cancel(struct creds_verify *v)
{
	if (v == NULL)
		return;
	if (v->state == VS_COMMIT) {
		v->cancelled = true; /* the commit's answer frees it */
		return;
	}
	verify_stop(v);
	verify_free(v);
}
