/*
 * creds_int.h - what the credential store's files share and nobody else
 * needs: the SQL that renders an aws_accounts row for the API, and the
 * onboarding check (verify.c) that credentials.c runs for
 * POST /api/v1/aws-accounts/{id}/verify and after a create.
 */
#ifndef CLOUDSWEEP_CREDS_INT_H
#define CLOUDSWEEP_CREDS_INT_H

#include <stdbool.h>

#include "cloudsweep/db.h"
#include "cloudsweep/util.h"
#include "cloudsweep/vault.h"

/* RFC 3339 UTC of a timestamptz column. */
#define CREDS_TS(col) "to_char(" col " AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')"

/* The API's view of an aws_accounts row "a": never a secret, the external id's last 4 at most. */
#define CREDS_ACCOUNT_JSON                                                                    \
	"json_build_object('id', a.id, 'account_id', a.account_id, 'account_name', "          \
	"a.account_name, 'kind', a.kind, 'role_arn', a.role_arn, 'external_id_last4', "       \
	"a.external_id_last4, 'access_key_id_last4', right(a.access_key_id, 4), 'regions', "  \
	"to_json(a.regions), 'status', a.status, 'verified_at', " CREDS_TS(                   \
	    "a.verified_at") ", 'verify_error', a.verify_error, 'external_id_enforced', "     \
	                     "a.external_id_enforced, "                                       \
	                     "'key_version', vault_blob_version(coalesce(a.external_id_enc, " \
	                     "a.secret_access_key_enc)), 'created_by', a.created_by, "        \
	                     "'created_at', " CREDS_TS("a.created_at") ")"

/* ---- the onboarding check (verify.c) ---- */

/* Who asked, for the audit rows; every pointer is copied by creds_verify_start. */
struct creds_verify_who {
	const char *actor;      /* user id, or NULL for "system" */
	const char *ip;         /* or NULL */
	const char *user_agent; /* or NULL */
	const char *request_id; /* or NULL */
};

enum creds_verify_status {
	CREDS_VERIFY_DONE,        /* the check ran (or AWS was unreachable); see the result */
	CREDS_VERIFY_NOT_FOUND,   /* no live account with that id in that organization */
	CREDS_VERIFY_UNAVAILABLE, /* the database is down or timed out */
	CREDS_VERIFY_ERROR,       /* the secret does not open or the audit write failed */
};

/* What the check found; every pointer is valid only during the callback. */
struct creds_verify_result {
	bool ok;              /* the credentials work and the trust policy is sound */
	bool unreachable;     /* AWS did not answer (network, timeout, throttled to the end) */
	int enforced;         /* external_id_enforced: 1, 0, or -1 when not known (key pairs) */
	const char *role_arn; /* the assumed role's ARN (or the key pair's caller ARN), or NULL */
	const char *code;     /* error code, "" when ok */
	const char *message;  /* a clear message without secrets, "" when ok */
	const char *account;  /* the account row as API JSON after the update, or NULL */
};

typedef void (*creds_verify_cb)(void *arg, enum creds_verify_status st,
                                const struct creds_verify_result *r);

struct creds_verify;

/*
 * Run the onboarding check of AWS account id of org: decrypt it (purpose
 * "verify", credential.read), AssumeRole with its external id and then
 * with a random wrong one that must be refused (key pairs:
 * GetCallerIdentity must name the same account), store status, verified_at,
 * verify_error and external_id_enforced and append credential.verified in
 * one transaction. cb runs once from the event loop. NULL (no callback)
 * when the arguments are bad or the pool is unavailable.
 */
struct creds_verify *creds_verify_start(struct db_pool *pool, const char *org_id, const char *id,
                                        const struct creds_verify_who *who, creds_verify_cb cb,
                                        void *arg);
/* Forget a check: no callback; a COMMIT already sent still completes. */
void creds_verify_cancel(struct creds_verify *v);
/* Whether this worker can reach AWS at all (a client and base credentials). */
bool creds_verify_available(void);

/* ---- the AWS KMS key provider (kms.c) ---- */

struct config;
struct vault_keyring;

/* With vault_provider = kms: key id, region and key directory are set; 0, or -1 with err. */
int kms_config_check(const struct config *cfg, char *err, size_t errlen) CS_WUR;
/*
 * The ring of every kek-<N>.kms in vault_key_dir, each unwrapped with KMS
 * Decrypt (EncryptionContext naming N) on a private event loop; the
 * plaintext keys are wiped once the ring holds them. NULL (logged) when a
 * file does not open or there is none.
 */
struct vault_keyring *kms_ring_load(const struct config *cfg);
/*
 * As kms_ring_load, but the versions prev already holds are copied from it
 * (kek-<N>.kms files are never rewritten) and only the others go to KMS
 * Decrypt. prev may be NULL; it is left unchanged.
 */
struct vault_keyring *kms_ring_reload(const struct config *cfg, const struct vault_keyring *prev);
/*
 * For kms.c's reload only: copy version's KEK out of kr into key (the
 * caller wipes it). 0, or -1 when kr does not hold version.
 */
int vault_keyring_kek_copy(const struct vault_keyring *kr, int version,
                           unsigned char key[VAULT_KEY_LEN]) CS_WUR;
/*
 * Create version N+1 (N: the highest kek- number in vault_key_dir, retired
 * and file-provider ones included) as kek-<N+1>.kms from KMS
 * GenerateDataKey (AES_256); the plaintext key is wiped unused. Blocks on
 * a private event loop for one KMS call. The new version, or -1 (logged).
 */
int kms_rotate(const struct config *cfg) CS_WUR;

#endif
