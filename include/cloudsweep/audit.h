/*
 * audit.h - the tamper-evident audit trail every module writes through.
 *
 * An event is appended to its organization's hash chain by the SQL function
 * audit_append (sql/002_audit.sql) inside the caller's own transaction, so
 * an action and its audit row commit together or not at all: if the append
 * fails the caller rolls back and answers an error (fail closed). Event
 * types come from one catalogue (audit_event_types[], documented in
 * doc/audit-events.md); audit_write refuses anything else, and refuses
 * details that would carry a sensitive value in clear, so the catalogue,
 * the documentation and the code cannot drift apart. Sensitive values that
 * must stay matchable (emails, token ids, credential ids) are stored as
 * audit_hmac() digests under a dedicated key.
 *
 * audit_verify_start() recomputes an organization's chain in C, page by
 * page inside one read-only snapshot, and names the first event that does
 * not match. audit_checkpoint_sign() signs every chain head with Ed25519 so
 * that a customer can later prove history was not rewritten, and
 * audit_anchor_sign() signs the retention anchor from which verification
 * starts once old events are pruned.
 *
 * Keys are per process and loaded once by audit_init(); they are never
 * logged and are wiped by audit_shutdown(). Every asynchronous call returns
 * a handle that can be cancelled; a cancelled operation never calls back.
 */
#ifndef CLOUDSWEEP_AUDIT_H
#define CLOUDSWEEP_AUDIT_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>

#include "cloudsweep/db.h"
#include "cloudsweep/util.h"

#define AUDIT_NIL_ORG          "00000000-0000-0000-0000-000000000000" /* events with no organization */
#define AUDIT_HMAC_LEN         76    /* strlen("hmac-sha256:") + 64 hex digits */
#define AUDIT_HASH_LEN         64    /* hex SHA-256 of a chain link */
#define AUDIT_DETAILS_MAX      16384 /* largest serialized details object accepted */
#define AUDIT_VERIFY_PAGE_ROWS 1000  /* events fetched per verification query */

enum audit_result {
	AUDIT_RESULT_DEFAULT = 0, /* the catalogue's usual result for the event type */
	AUDIT_SUCCESS,            /* the action happened */
	AUDIT_DENIED,             /* refused: bad credentials, permission, limit, block */
	AUDIT_ERROR,              /* attempted but failed (AWS error, internal error) */
};

/*
 * One event to append. Every pointer is borrowed for the duration of the
 * call (the values are copied into the query). Free-text fields that may
 * come from a client (ip, user_agent, request_id, resource_id) are cut to
 * a bounded length and invalid UTF-8 or control characters are replaced by
 * '?', so a hostile header can never make the audit insert, and with it the
 * action, fail.
 */
struct audit_event {
	const char *org_id;        /* organization UUID; NULL for none (AUDIT_NIL_ORG) */
	const char *actor;         /* user id, or NULL for "system" */
	const char *ip;            /* client address or NULL */
	const char *user_agent;    /* or NULL */
	const char *request_id;    /* or NULL */
	const char *event_type;    /* a name from audit_event_types[] */
	const char *resource_type; /* NULL: the catalogue's resource type */
	const char *resource_id;   /* or NULL */
	const char *action;        /* NULL: the catalogue's action */
	enum audit_result result;  /* AUDIT_RESULT_DEFAULT: the catalogue's result */
	json_t *details;           /* borrowed JSON object, or NULL for {} */
};

/* One entry of the event catalogue (see doc/audit-events.md). */
struct audit_event_type {
	const char *name;          /* dotted lower case, e.g. "auth.login.failed" */
	const char *resource_type; /* default resource type, or NULL */
	const char *action;        /* default action */
	enum audit_result result;  /* default result */
	const char *hmac_keys;     /* comma-separated details keys that must be HMACs, or NULL */
};

/* The catalogue, in documentation order; audit_event_types_count entries. */
extern const struct audit_event_type audit_event_types[];
/* Number of entries in audit_event_types[]. */
extern const size_t audit_event_types_count;

/* The catalogue entry for name, or NULL when the type is not catalogued. */
const struct audit_event_type *audit_event_type_find(const char *name);
/* Whether name is a catalogued event type. */
bool audit_event_type_known(const char *name);
/* "success", "denied" or "error" for a result (DEFAULT maps to "success"). */
const char *audit_result_name(enum audit_result r);

/*
 * Load the keys; call once per process before anything else here (again
 * after audit_shutdown to reload). hmac_key_file holds at least 32 bytes of
 * key: either the raw bytes, or their base64 (standard alphabet, padded,
 * optional trailing newline). The content is taken as base64 when it is
 * entirely valid padded base64 that decodes to 32 bytes or more, and as raw
 * bytes otherwise (e.g. `head -c 32 /dev/urandom` or `openssl rand -base64
 * 32` both work). signing_key_file is an Ed25519 private key in PEM (PKCS#8,
 * `openssl genpkey -algorithm ed25519`); NULL disables signing and
 * signature checks. A file readable by group or others is logged as a
 * warning. Returns 0, or -1 (logged without any key material).
 */
int audit_init(const char *hmac_key_file, const char *signing_key_file) CS_WUR;
/* Wipe and release the keys and OpenSSL contexts. */
void audit_shutdown(void);

/*
 * "hmac-sha256:<64 hex>" of value under the audit key (the caller frees),
 * or NULL when value is NULL or audit_init has not run. Callers normalize
 * what they hash (emails lower-cased and trimmed) so an operator computing
 * the same HMAC finds the events.
 */
char *audit_hmac(const char *value);
/* Set details[key] to audit_hmac(value); 0, or -1 (not initialized, bad arguments). */
int audit_details_set_hmac(json_t *details, const char *key, const char *value) CS_WUR;

/*
 * Queue the append of ev inside the caller's open (READ COMMITTED)
 * transaction; the org's chain head stays locked until it ends, so keep
 * such transactions short. cb gets
 * DB_OK with one row (id, seq, hash) once the row is written; on anything
 * else the caller must roll back and fail the action. Returns the query
 * handle (db_query_cancel applies), or NULL without calling back when the
 * event is refused (unknown type, bad org id, details not an object, too
 * large or holding a sensitive key in clear: logged) or the transaction
 * cannot take queries.
 */
struct db_query *audit_write(struct db_tx *tx, const struct audit_event *ev, db_cb cb, void *arg);

struct http_op;
struct http_request;
/* ev zeroed, then type, org, actor and the request's address, user agent and id. */
void audit_event_from_request(struct audit_event *ev, struct http_request *req, const char *org,
                              const char *actor, const char *type);
/*
 * audit_write for an HTTP handler's operation: ev with details (stolen; a
 * NULL from a failed json_pack is refused) in op's transaction, tracked by
 * op, whose advance function gets the answer. -1 when refused: op has
 * answered 500 (fail closed).
 */
int audit_op_write(struct http_op *op, struct audit_event *ev, json_t *details);

struct audit_write;

/* Outcome of audit_write_standalone: status 0 and the event id once committed, or -1. */
typedef void (*audit_write_cb)(void *arg, int status, const char *event_id);

/*
 * Append ev in a transaction of its own, for events with no surrounding
 * action (rate limited, CSRF failure, login failure, a credential read):
 * one statement, committed at its own Sync, so the org's chain head is
 * locked only while it runs. Returns a handle, or NULL without calling back
 * when the event is refused or the pool is unavailable.
 */
struct audit_write *audit_write_standalone(struct db_pool *pool, const struct audit_event *ev,
                                           audit_write_cb cb, void *arg);
/* Forget a standalone write: no callback; the row may still commit if it was sent. */
void audit_write_cancel(struct audit_write *w);

struct audit_verify;

/* What a verification found. */
struct audit_verify_result {
	int status;                  /* 0: the chain was read; -1: the database failed (503) */
	bool ok;                     /* every event and checkpoint matched */
	long long events_checked;    /* events examined, the first bad one included */
	char first_bad_event_id[37]; /* empty when ok, or when no single event is to blame */
	const char *reason;          /* static string, see below */
};
/*
 * Reasons with status 0: "ok"; "hash_mismatch" (an event's content does
 * not give its hash), "prev_hash_mismatch" (the link to the previous event
 * is broken), "seq_gap" (an event is missing before the one named),
 * "beyond_head" (an event lies past the chain head), "head_mismatch" (the
 * chain does not end at the head: trailing events deleted, or the last one
 * rewritten), "checkpoint_mismatch" / "checkpoint_missing" (the chain does
 * not pass through the latest signed head), "checkpoint_signature_invalid",
 * "anchor_signature_invalid", "no_verify_key" (checkpoints exist but no key
 * is loaded to check them). With status -1: "unavailable", "timeout",
 * "query_failed", "internal", "bad_bounds_result".
 */

/* Called once with the result (borrowed for the call). */
typedef void (*audit_verify_cb)(void *arg, const struct audit_verify_result *r);

/*
 * Recompute org_id's chain: from genesis, or from the latest retention
 * anchor (whose signature must verify) when there is one. Each event's
 * seq must follow the previous one, its prev_hash must equal the previous
 * hash, and SHA-256(previous hash "\n" audit_canonical(event)) must equal
 * its hash; the last event must be the chain head, and the latest signed
 * head checkpoint must lie on the chain. Runs in one REPEATABLE READ, READ
 * ONLY transaction so concurrent appends and pruning cannot cause a false
 * alarm. Returns a handle, or NULL (no callback) when org_id is not a UUID
 * or the pool is unavailable.
 */
struct audit_verify *audit_verify_start(struct db_pool *pool, const char *org_id,
                                        audit_verify_cb cb, void *arg);
/* Stop a verification; its callback will not run. */
void audit_verify_cancel(struct audit_verify *v);
/* {ok, events_checked, first_bad_event_id|null} for the API (new reference). */
json_t *audit_verify_result_json(const struct audit_verify_result *r);

struct audit_sign;

/* Outcome of a signing run: status 0 and how many checkpoints were stored, or -1. */
typedef void (*audit_sign_cb)(void *arg, int status, int nsigned);

/*
 * Sign the head of every chain that has advanced since its last signed
 * checkpoint (kind 'head'), in batches. Meant for a periodic timer on one
 * or more workers: concurrent runs store each checkpoint once. Returns a
 * handle, or NULL (no callback) without a signing key or an available pool.
 */
struct audit_sign *audit_checkpoint_sign(struct db_pool *pool, audit_sign_cb cb, void *arg);
/*
 * Sign a retention anchor (kind 'retention') at org_id's last event that
 * occurred before `before` (a timestamptz literal); nsigned is 0 when there
 * is none. Retention then deletes up to the anchor with SQL audit_prune().
 */
struct audit_sign *audit_anchor_sign(struct db_pool *pool, const char *org_id, const char *before,
                                     audit_sign_cb cb, void *arg);
/* Stop a signing run; its callback will not run (a batch already sent may still be stored). */
void audit_sign_cancel(struct audit_sign *s);

/* A stored checkpoint as text (borrowed strings), for audit_checkpoint_verify. */
struct audit_checkpoint {
	const char *org_id; /* lower-case UUID */
	long long seq;
	const char *hash;      /* 64 hex */
	const char *signed_at; /* audit_rfc3339(signed_at): UTC with microseconds */
	const char *signature; /* base64 */
	const char *key_id;    /* must name the loaded key */
};

/*
 * Check a checkpoint's Ed25519 signature over "org_id|seq|hash|signed_at"
 * with the loaded key. Returns 0 when it verifies, -1 otherwise.
 */
int audit_checkpoint_verify(const struct audit_checkpoint *cp) CS_WUR;
/* The verifying key as SubjectPublicKeyInfo PEM, or NULL without a signing key. */
const char *audit_public_key_pem(void);
/* The key id stored with each checkpoint ("ed25519:" + 16 hex), or NULL. */
const char *audit_key_id(void);

#endif
