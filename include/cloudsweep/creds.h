/*
 * creds.h - the credential store built on the vault: customers' AWS
 * accounts (an IAM role with its external id, or an access key pair) and
 * generic provider credentials, their HTTP API, the internal loader that
 * later users (the scanner, the verify endpoint) decrypt them through, and
 * key-encryption-key rotation with the background re-wrap job.
 *
 * Secrets are sealed with vault_seal(vault_ring(), org_id, row_id, field)
 * before they reach Postgres (the row id is generated first, so the blob is
 * bound to its row), never returned by the API (external_id_last4 at most)
 * and never logged or audited. creds_load() decrypts one account for a
 * named purpose and writes the credential.read audit event in the same
 * transaction as the read: no audit row, no plaintext.
 *
 * Rotation (POST /api/v1/admin/keys/rotate, `cloudsweepd keys rotate`)
 * adds a KEK version in the key directory, audits key.rotated and sends
 * NOTIFY cs_vault in one transaction; every worker of every instance
 * LISTENs and reloads its ring, and also reloads when it meets a blob that
 * names a version it does not have yet. A per-worker job then re-wraps the
 * stored data keys in batches (one runner at a time across workers and
 * instances, by a transaction-scoped advisory lock), replacing each blob
 * only if it is unchanged. `cloudsweepd keys retire N` refuses while any
 * blob still names version N.
 */
#ifndef CLOUDSWEEP_CREDS_H
#define CLOUDSWEEP_CREDS_H

#include <event2/event.h>
#include <stdbool.h>
#include <stddef.h>

#include "cloudsweep/db.h"
#include "cloudsweep/util.h"

struct config;
struct router;

#define CREDS_FIELD_EXTERNAL_ID "external_id" /* vault field of aws_accounts.external_id_enc */
#define CREDS_FIELD_SECRET_KEY  "secret_access_key" /* ... of secret_access_key_enc */
#define CREDS_FIELD_PROVIDER    "secret"            /* ... of provider_credentials.secret_enc */
#define CREDS_REGIONS_MAX       64                  /* regions per account */
#define CREDS_VAULT_CHANNEL     "cs_vault"          /* NOTIFY channel: reload the key ring */

enum creds_kind {
	CREDS_ROLE, /* role_arn + external_id: STS AssumeRole */
	CREDS_KEYS, /* access_key_id + secret_access_key */
};

/* The decrypted material of one AWS account. Free with creds_free (wipes the secrets). */
struct creds {
	enum creds_kind kind;
	char id[37];             /* aws_accounts.id */
	char org_id[37];         /* the owning organization */
	char account_id[13];     /* the 12-digit AWS account id */
	char *role_arn;          /* owned; CREDS_ROLE only, else NULL */
	char *external_id;       /* owned secret; CREDS_ROLE only, else NULL */
	char *access_key_id;     /* owned; CREDS_KEYS only, else NULL */
	char *secret_access_key; /* owned secret; CREDS_KEYS only, else NULL */
	char **regions;          /* owned array of nregions owned strings */
	int nregions;
	int key_version; /* the KEK version the secret was sealed under */
};

/* Wipe the secrets and free c; NULL is fine. */
void creds_free(struct creds *c);

enum creds_status {
	CREDS_OK,          /* c holds the material */
	CREDS_NOT_FOUND,   /* no live account with that id in that organization */
	CREDS_UNAVAILABLE, /* the database is down or timed out */
	CREDS_ERROR,       /* the blob does not open, the audit write failed, or bad arguments */
};

/* Outcome of creds_load: on CREDS_OK c is the caller's (creds_free), else NULL. */
typedef void (*creds_load_cb)(void *arg, enum creds_status st, struct creds *c);

struct creds_load;

/*
 * Decrypt AWS account aws_account_id of org_id for purpose, which is
 * "verify", a scan id (a UUID: purpose "scan"), "scan:<scan id>" or
 * "cleanup:<waste item id>": read the row, open its secret (reloading the
 * key ring first if the blob names a version this worker has not loaded
 * yet), append credential.read (actor "system", details purpose, scan_id or
 * waste_item_id, key_version) as a statement of its own; the plaintext is
 * handed over only once that row has committed. Returns a handle, or NULL
 * without a callback when the arguments are bad or the pool is unavailable.
 */
struct creds_load *creds_load(struct db_pool *pool, const char *org_id, const char *aws_account_id,
                              const char *purpose, creds_load_cb cb, void *arg);
/* As creds_load, naming the user on whose behalf the secret is read (the audit actor). */
struct creds_load *creds_load_as(struct db_pool *pool, const char *org_id,
                                 const char *aws_account_id, const char *purpose, const char *actor,
                                 creds_load_cb cb, void *arg);
/* Forget a load: no callback; a credential.read already sent may still commit. */
void creds_load_cancel(struct creds_load *l);

/* ---- validation (also used by the tests) ---- */

/* Whether s is a 12-digit AWS account id. */
bool creds_account_id_valid(const char *s);
/* Whether s matches ^arn:aws:iam::\d{12}:role/[\w+=,.@-]+$ (at most 2048 bytes). */
bool creds_role_arn_valid(const char *s);
/* Whether name is 1-255 characters of UTF-8 without <>"' or control characters. */
bool creds_name_valid(const char *name);
/* Whether region is on the configured allow-list (creds_worker_init or creds_config_check). */
bool creds_region_allowed(const char *region);

/* ---- the worker ---- */

/*
 * Check the creds options (vault_provider, aws_regions) and remember the
 * allow-list; 0, or -1 with err set. Run by `-n`, serving and `keys`.
 */
int creds_config_check(const struct config *cfg, char *err, size_t errlen) CS_WUR;
/* Register the aws-accounts, provider-credentials and admin key routes. */
void creds_routes(struct router *r);
/*
 * Per-worker start-up: prepare statements, LISTEN on cs_vault, start the
 * re-wrap timer. 0, or -1 (logged).
 */
int creds_worker_init(struct event_base *base, const struct config *cfg,
                      struct db_pool *pool) CS_WUR;
/* Per-worker teardown: the re-wrap job and subscriptions cancelled. */
void creds_worker_free(void);

/*
 * Reload the worker's ring when blob names a KEK version it does not have
 * (at most once a second), then return the ring; NULL when none is loaded.
 */
struct vault_keyring *creds_ring_for(const char *blob);

/* ---- rotation and re-wrap (rewrap.c) ---- */

/* Start the re-wrap timer and the cs_vault subscription (creds_worker_init calls it). */
void creds_rewrap_start(struct event_base *base, const struct config *cfg, struct db_pool *pool);
/* Stop them; a batch in flight is rolled back. */
void creds_rewrap_stop(void);
/* Run a re-wrap batch now unless one is running (after a rotation; tests). */
void creds_rewrap_kick(void);
/* Register POST /api/v1/admin/keys/rotate and GET /api/v1/admin/keys. */
void creds_keys_routes(struct router *r);
/*
 * `cloudsweepd [-c file] keys list|rotate|retire N`: argv holds the words
 * after "keys". Returns the process exit status (0, 1 failure, 2 usage).
 */
int creds_keys_main(const char *config_path, bool debug, int argc, char **argv);

#endif
