/*
 * session.c - AWS credentials for one account of one organization, for a
 * named purpose (a scan, a cleanup): the account's material is decrypted
 * through creds_load (which audits credential.read in the same
 * transaction), then a role is assumed through the worker's STS cache
 * (RoleSessionName = the purpose's kind, SourceIdentity = the organization)
 * or a key pair is handed over as it is. Every secret the session touches
 * is wiped before its memory is released.
 */
#include "config.h"

#include <stdlib.h>
#include <string.h>

#include "cloudsweep/aws.h"
#include "cloudsweep/creds.h"
#include "cloudsweep/log.h"
#include "cloudsweep/scan.h"

#define SCAN_SESSION_NAME_MAX 64 /* RoleSessionName is at most 64 characters */

struct scan_session {
	struct creds_load *load;  /* the pending load, or NULL */
	struct aws_sts_wait *sts; /* the pending assume, or NULL */
	char org_id[37];
	char session_name[SCAN_SESSION_NAME_MAX + 1];
	char *region; /* owned */
	scan_session_cb cb;
	void *arg;
};

static void scan_session_free(struct scan_session *s)
{
	if (s->load != NULL)
		creds_load_cancel(s->load);
	if (s->sts != NULL)
		aws_sts_wait_cancel(s->sts);
	free(s->region);
	free(s);
}

/* The one way out: free the session, then tell the owner (who may start another). */
static void scan_session_finish(struct scan_session *s, int status, const char *code,
                                const char *message, struct aws_owned_credentials *creds)
{
	scan_session_cb cb = s->cb;
	void *arg = s->arg;

	s->load = NULL;
	s->sts = NULL;
	scan_session_free(s);
	cb(arg, status, code, message, creds);
}

static char *scan_session_dup(const char *v)
{
	return v != NULL ? xstrdup(v) : NULL;
}

static void scan_session_sts_cb(const struct aws_result *res, const struct aws_credentials *c,
                                time_t expiration, void *arg)
{
	struct scan_session *s = arg;
	struct aws_owned_credentials *oc;

	s->sts = NULL;
	if (res->status != AWS_OK || c == NULL) {
		scan_session_finish(s, -1,
		                    res->error_code != NULL && res->error_code[0] != '\0'
		                        ? res->error_code
		                        : aws_status_name(res->status),
		                    res->message != NULL && res->message[0] != '\0'
		                        ? res->message
		                        : "the role could not be assumed",
		                    NULL);
		return;
	}
	oc = xcalloc(1, sizeof(*oc));
	oc->access_key_id = scan_session_dup(c->access_key_id);
	oc->secret_access_key = scan_session_dup(c->secret_access_key);
	oc->session_token = scan_session_dup(c->session_token);
	oc->expiration = expiration;
	scan_session_finish(s, 0, NULL, NULL, oc);
}

static void scan_session_load_cb(void *arg, enum creds_status st, struct creds *c)
{
	struct scan_session *s = arg;
	struct aws_owned_credentials *oc;
	const struct aws_credentials *base;
	struct aws_assume_role role = { 0 };

	s->load = NULL;
	switch (st) {
	case CREDS_OK:
		break;
	case CREDS_NOT_FOUND:
		scan_session_finish(s, -1, "account_not_found", "the AWS account no longer exists",
		                    NULL);
		return;
	case CREDS_UNAVAILABLE:
		scan_session_finish(s, -1, "unavailable", "the database is unavailable", NULL);
		return;
	case CREDS_ERROR:
	default:
		creds_free(c);
		scan_session_finish(s, -1, "credentials_error",
		                    "the account's credentials could not be read", NULL);
		return;
	}
	if (c->kind == CREDS_KEYS) {
		oc = xcalloc(1, sizeof(*oc));
		oc->access_key_id = scan_session_dup(c->access_key_id);
		oc->secret_access_key = scan_session_dup(c->secret_access_key);
		creds_free(c);
		scan_session_finish(s, 0, NULL, NULL, oc);
		return;
	}
	base = aws_worker_base_credentials();
	if (base == NULL || aws_worker_client() == NULL) {
		creds_free(c);
		scan_session_finish(s, -1, "no_base_credentials",
		                    "CloudSweep has no AWS credentials to assume roles with", NULL);
		return;
	}
	role.role_arn = c->role_arn;
	role.external_id = c->external_id;
	role.session_name = s->session_name;
	role.source_identity = s->org_id;
	s->sts = aws_sts_assume_role(aws_worker_client(), base, s->region, &role,
	                             scan_session_sts_cb, s);
	creds_free(c); /* the assume copied what it needs */
	if (s->sts == NULL)
		scan_session_finish(s, -1, "invalid_role", "the role cannot be assumed", NULL);
}

struct scan_session *scan_session_start(struct db_pool *pool, const char *org_id,
                                        const char *aws_account_uuid, const char *purpose,
                                        const char *region, scan_session_cb cb, void *arg)
{
	struct scan_session *s;
	size_t i, n;

	if (pool == NULL || org_id == NULL || strlen(org_id) != 36 || aws_account_uuid == NULL ||
	    purpose == NULL || region == NULL || cb == NULL)
		return NULL;
	s = xcalloc(1, sizeof(*s));
	s->cb = cb;
	s->arg = arg;
	snprintf(s->org_id, sizeof(s->org_id), "%s", org_id);
	/* The session name is the purpose's kind ("scan:<id>" -> "scan"; a bare scan id too). */
	n = strcspn(purpose, ":");
	if (n == 36 && purpose[n] == '\0')
		snprintf(s->session_name, sizeof(s->session_name), "scan");
	else
		snprintf(s->session_name, sizeof(s->session_name), "%.*s",
		         (int)(n < SCAN_SESSION_NAME_MAX ? n : SCAN_SESSION_NAME_MAX), purpose);
	for (i = 0; s->session_name[i] != '\0'; i++)
		if (strchr("+=,.@-_", s->session_name[i]) == NULL &&
		    !((s->session_name[i] >= 'a' && s->session_name[i] <= 'z') ||
		      (s->session_name[i] >= 'A' && s->session_name[i] <= 'Z') ||
		      (s->session_name[i] >= '0' && s->session_name[i] <= '9')))
			s->session_name[i] = '-';
	if (i < 2)
		snprintf(s->session_name, sizeof(s->session_name), "cloudsweep");
	s->region = xstrdup(region);
	s->load = creds_load(pool, org_id, aws_account_uuid, purpose, scan_session_load_cb, s);
	if (s->load == NULL) {
		scan_session_free(s);
		return NULL;
	}
	return s;
}

void scan_session_cancel(struct scan_session *s)
{
	if (s != NULL)
		scan_session_free(s);
}
