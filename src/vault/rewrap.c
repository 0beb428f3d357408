/*
 * rewrap.c - key-encryption-key rotation and what follows it: the admin
 * endpoints (rotate, list versions with their blob counts), the per-worker
 * cs_vault subscription that reloads the ring when any worker or instance
 * rotates or retires a version, the background job that re-wraps stored
 * data keys under the current version, and the `cloudsweepd keys` command.
 *
 * The job is one state machine per worker driven by a timer: it runs only
 * while the ring holds versions older than the current one, and each batch
 * is one short transaction that first takes a transaction-scoped advisory
 * lock (so one runner at a time across workers and instances, and a
 * crashed runner holds nothing), reads up to rewrap_batch blobs on old
 * versions from the vault_blobs view, re-wraps them in C (vault_rewrap: only
 * the data key is unwrapped, the secret never is) and stores each one only
 * where the column still holds the old blob (vault_rewrap_apply), so a
 * concurrent change or delete is never overwritten.
 */
#include "config.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cloudsweep/audit.h"
#include "cloudsweep/config.h"
#include "cloudsweep/creds.h"
#include "creds_int.h"
#include "cloudsweep/http.h"
#include "cloudsweep/log.h"
#include "cloudsweep/vault.h"
#include "cloudsweep/worker.h"

#ifndef SYSCONFDIR
#define SYSCONFDIR "/usr/local/etc"
#endif

/* The advisory lock key of the re-wrap job (any constant shared by every runner). */
#define REWRAP_LOCK_SQL "SELECT pg_try_advisory_xact_lock(7304290517763126101)"

enum rewrap_state {
	RW_IDLE,   /* waiting for the timer */
	RW_BEGIN,  /* BEGIN sent */
	RW_LOCK,   /* trying the advisory lock */
	RW_SELECT, /* reading a batch of blobs on old versions */
	RW_APPLY,  /* storing the re-wrapped blobs */
	RW_COMMIT, /* COMMIT sent */
};

/* Outlives the job while COMMIT runs, so a stop during COMMIT is safe. */
struct rewrap_commit {
	bool gone; /* the job was stopped; drop the answer */
};

static struct {
	struct db_pool *pool;             /* borrowed */
	struct event *ev;                 /* owned; the job timer */
	struct db_subscription *sub;      /* owned; cs_vault */
	struct db_tx *tx;                 /* open batch transaction, or NULL */
	struct db_query *q;               /* pending query, or NULL */
	struct rewrap_commit *committing; /* owned by the pool callback while COMMIT runs */
	enum rewrap_state state;
	long long batch, interval_s;
	long long batches, rewrapped; /* totals of this worker */
	int nrows, nfailed;           /* of the batch in flight */
	bool again;                   /* run the next batch at once */
	bool started;
	struct timespec dir_mtime; /* of the key directory when last loaded */
} rw;

static void rewrap_advance(enum db_event ev, const PGresult *res);

static void rewrap_arm(bool now)
{
	struct timeval tv = { now ? 0 : (time_t)rw.interval_s, 0 };

	if (rw.ev != NULL)
		event_add(rw.ev, &tv);
}

/* End the batch (rolled back unless committed) and wait for the next tick. */
static void rewrap_idle(void)
{
	if (rw.q != NULL)
		db_query_cancel(rw.q);
	rw.q = NULL;
	if (rw.tx != NULL)
		db_tx_rollback(rw.tx);
	rw.tx = NULL;
	rw.state = RW_IDLE;
	rewrap_arm(rw.again);
	rw.again = false;
}

static void rewrap_db_cb(void *arg, enum db_event ev, const PGresult *res)
{
	rw.q = NULL;
	if (rw.state == RW_BEGIN && ev != DB_OK)
		rw.tx = NULL; /* the pool freed it */
	rewrap_advance(ev, res);
}

static void rewrap_commit_cb(void *arg, enum db_event ev, const PGresult *res)
{
	struct rewrap_commit *c = arg;
	bool gone = c->gone;

	free(c);
	if (gone)
		return;
	rw.committing = NULL;
	rewrap_advance(ev, res);
}

static void rewrap_query(enum rewrap_state next, const char *sql, int n, const char *const *p)
{
	rw.state = next;
	rw.q = db_tx_query(rw.tx, sql, n, p, rewrap_db_cb, NULL);
	if (rw.q == NULL)
		rewrap_idle();
}

/* "{1,2}": the loaded versions below the current one, or NULL when there are none. */
static char *rewrap_old_versions(struct vault_keyring *kr)
{
	int cur = vault_keyring_current_version(kr);
	size_t cap = 16, len = 1;
	char *s = xmalloc(cap);
	int n = 0;

	s[0] = '{';
	for (int v = 1; v < cur; v++) {
		char num[16];
		int k;

		if (!vault_keyring_has_version(kr, v))
			continue;
		k = snprintf(num, sizeof(num), "%s%d", n > 0 ? "," : "", v);
		if (len + (size_t)k + 2 > cap) {
			cap = 2 * (len + (size_t)k + 2);
			s = xrealloc(s, cap);
		}
		memcpy(s + len, num, (size_t)k);
		len += (size_t)k;
		n++;
	}
	s[len++] = '}';
	s[len] = '\0';
	if (n == 0) {
		free(s);
		return NULL;
	}
	return s;
}

/* Re-wrap the selected rows (tbl, field, id, org_id, blob) into a JSON text for the apply. */
static char *rewrap_batch_json(const PGresult *res)
{
	json_t *arr = json_array();
	char *out;

	rw.nrows = PQntuples(res);
	rw.nfailed = 0;
	for (int i = 0; i < rw.nrows; i++) {
		const char *tbl = PQgetvalue(res, i, 0), *field = PQgetvalue(res, i, 1);
		const char *id = PQgetvalue(res, i, 2), *org = PQgetvalue(res, i, 3);
		const char *blob = PQgetvalue(res, i, 4);
		struct vault_keyring *kr = creds_ring_for(blob);
		char *fresh = kr != NULL ? vault_rewrap(kr, org, id, field, blob) : NULL;

		if (fresh == NULL) {
			rw.nfailed++;
			continue;
		}
		json_array_append_new(arr,
		                      json_pack("{s:s, s:s, s:s, s:s, s:s}", "tbl", tbl, "field",
		                                field, "id", id, "old", blob, "new", fresh));
		free(fresh);
	}
	if (rw.nfailed > 0)
		log_warnx("rewrap_failed", "%d of %d blobs did not unwrap; they stay as they are",
		          rw.nfailed, rw.nrows);
	out = json_dumps(arr, JSON_COMPACT);
	json_decref(arr);
	return out;
}

static void rewrap_advance(enum db_event ev, const PGresult *res)
{
	if (ev != DB_OK) {
		if (rw.state != RW_BEGIN)
			log_warnx("rewrap_failed", "%s",
			          res != NULL ? PQresultErrorMessage(res) : "database unavailable");
		rewrap_idle();
		return;
	}
	switch (rw.state) {
	case RW_IDLE:
		return;
	case RW_BEGIN:
		rewrap_query(RW_LOCK, REWRAP_LOCK_SQL, 0, NULL);
		return;
	case RW_LOCK: {
		struct vault_keyring *kr = vault_ring();
		char lim[24], *versions;
		const char *p[2];

		if (PQntuples(res) != 1 || strcmp(PQgetvalue(res, 0, 0), "t") != 0) {
			rewrap_idle(); /* another worker or instance is running a batch */
			return;
		}
		versions = kr != NULL ? rewrap_old_versions(kr) : NULL;
		if (versions == NULL) {
			rewrap_idle();
			return;
		}
		snprintf(lim, sizeof(lim), "%lld", rw.batch);
		p[0] = versions;
		p[1] = lim;
		rewrap_query(
		    RW_SELECT,
		    "SELECT tbl, field, id::text, org_id::text, blob FROM vault_blobs WHERE "
		    "vault_blob_version(blob) = ANY($1::int[]) LIMIT $2::int",
		    2, p);
		free(versions);
		return;
	}
	case RW_SELECT: {
		char *doc;
		const char *p[1];

		if (PQntuples(res) == 0) {
			rewrap_idle();
			return;
		}
		doc = rewrap_batch_json(res);
		if (doc == NULL) {
			rewrap_idle();
			return;
		}
		p[0] = doc;
		rewrap_query(RW_APPLY, "SELECT vault_rewrap_apply($1::jsonb)", 1, p);
		free(doc);
		return;
	}
	case RW_APPLY: {
		struct db_tx *tx = rw.tx;
		long long n = PQntuples(res) == 1 ? atoll(PQgetvalue(res, 0, 0)) : 0;

		rw.rewrapped += n;
		/* A full batch that all re-wrapped: more may be waiting, go on at once. */
		rw.again = rw.nfailed == 0 && rw.nrows >= rw.batch;
		rw.tx = NULL;
		rw.state = RW_COMMIT;
		rw.committing = xcalloc(1, sizeof(*rw.committing));
		db_tx_commit(tx, rewrap_commit_cb, rw.committing);
		return;
	}
	case RW_COMMIT:
		rw.batches++;
		log_debug("rewrap_batch", "re-wrapped a batch of %d blobs", rw.nrows);
		rewrap_idle();
		return;
	}
}

/* Reload the ring when the key directory changed behind our back (a missed NOTIFY). */
static void rewrap_dir_check(void)
{
	const char *dir = vault_key_dir();
	struct stat st;

	if (dir == NULL || stat(dir, &st) == -1)
		return;
	if (st.st_mtim.tv_sec == rw.dir_mtime.tv_sec && st.st_mtim.tv_nsec == rw.dir_mtime.tv_nsec)
		return;
	if (rw.dir_mtime.tv_sec != 0 || rw.dir_mtime.tv_nsec != 0) {
		if (vault_worker_reload() == 0)
			log_info("vault_reload", "key directory changed: ring reloaded");
	}
	rw.dir_mtime = st.st_mtim;
}

static void rewrap_tick_cb(evutil_socket_t fd, short what, void *arg)
{
	struct vault_keyring *kr;
	char *versions;

	rewrap_dir_check();
	if (rw.state != RW_IDLE)
		return;
	kr = vault_ring();
	versions = kr != NULL ? rewrap_old_versions(kr) : NULL;
	if (versions == NULL) {
		rewrap_arm(false); /* nothing older than the current version is loaded */
		return;
	}
	free(versions);
	rw.state = RW_BEGIN;
	rw.tx = db_tx_begin(rw.pool, rewrap_db_cb, NULL);
	if (rw.tx == NULL) {
		rw.state = RW_IDLE;
		rewrap_arm(false);
	}
}

static void rewrap_notify_cb(void *arg, const char *channel, const char *payload)
{
	struct stat st;
	const char *dir = vault_key_dir();

	if (vault_worker_reload() == 0)
		log_info("vault_reload", "key ring reloaded (%s)", payload != NULL ? payload : "");
	if (dir != NULL && stat(dir, &st) == 0)
		rw.dir_mtime = st.st_mtim;
	creds_rewrap_kick();
}

void creds_rewrap_kick(void)
{
	if (rw.started && rw.state == RW_IDLE)
		rewrap_arm(true);
}

void creds_rewrap_start(struct event_base *base, const struct config *cfg, struct db_pool *pool)
{
	memset(&rw, 0, sizeof(rw));
	rw.pool = pool;
	rw.batch = cfg->rewrap_batch;
	rw.interval_s = cfg->rewrap_interval_s;
	rw.ev = evtimer_new(base, rewrap_tick_cb, NULL);
	if (rw.ev == NULL)
		fatalx("rewrap", "cannot create the re-wrap timer");
	rw.sub = db_subscribe(pool, CREDS_VAULT_CHANNEL, rewrap_notify_cb, NULL);
	rw.started = true;
	rewrap_dir_check();
	rewrap_arm(false);
}

void creds_rewrap_stop(void)
{
	if (!rw.started)
		return;
	if (rw.committing != NULL)
		rw.committing->gone = true;
	if (rw.q != NULL)
		db_query_cancel(rw.q);
	if (rw.tx != NULL)
		db_tx_rollback(rw.tx);
	if (rw.sub != NULL)
		db_unsubscribe(rw.sub);
	if (rw.ev != NULL)
		event_free(rw.ev);
	memset(&rw, 0, sizeof(rw));
}

/* ---- GET /api/v1/admin/keys ---- */

/* {provider, current_version, versions: [{version, state, blobs}], blobs_to_rewrap}. */
static json_t *keys_doc(json_t *counts)
{
	struct vault_keyring *kr = vault_ring();
	int cur = kr != NULL ? vault_keyring_current_version(kr) : 0, top = cur;
	json_t *versions = json_array(), *e;
	long long pending = 0;
	size_t i;

	json_array_foreach (counts, i, e) {
		int v = (int)json_integer_value(json_object_get(e, "version"));

		if (v > top)
			top = v;
	}
	for (int v = top; v >= 1; v--) {
		long long blobs = 0;
		bool loaded = kr != NULL && vault_keyring_has_version(kr, v);

		json_array_foreach (counts, i, e)
			if (json_integer_value(json_object_get(e, "version")) == v)
				blobs = json_integer_value(json_object_get(e, "blobs"));
		if (!loaded && blobs == 0)
			continue;
		if (v != cur)
			pending += blobs;
		json_array_append_new(versions, json_pack("{s:i, s:s, s:I}", "version", v, "state",
		                                          v == cur ? "current"
		                                          : loaded ? "active"
		                                                   : "not_loaded",
		                                          "blobs", (json_int_t)blobs));
	}
	return json_pack("{s:s, s:i, s:o, s:I}", "provider", "file", "current_version", cur,
	                 "versions", versions, "blobs_to_rewrap", (json_int_t)pending);
}

static void keys_list_advance(struct http_op *op, enum db_event ev, const PGresult *res)
{
	json_t *counts, *doc;
	json_error_t jerr;

	if (ev != DB_OK) {
		http_op_db_fail(op, ev, res);
		return;
	}
	http_set_cancel(op->req, NULL, NULL);
	counts = json_loads(PQgetvalue(res, 0, 0), 0, &jerr);
	doc = counts != NULL ? keys_doc(counts) : NULL;
	json_decref(counts);
	if (doc == NULL) {
		http_error(op->req, 500, "internal", "internal error");
		return;
	}
	http_respond_json(op->req, 200, doc);
}

#define KEYS_COUNTS_SQL                                                                     \
	"SELECT coalesce(json_agg(json_build_object('version', version, 'blobs', blobs)), " \
	"'[]')::text FROM vault_blob_counts() WHERE version IS NOT NULL"

static void keys_list(struct http_request *req)
{
	struct http_op *op = http_op_new(req, sizeof(*op), keys_list_advance);

	(void)http_op_query(op, KEYS_COUNTS_SQL, 0, NULL);
}

/* ---- POST /api/v1/admin/keys/rotate ---- */

enum keys_rotate_state {
	KR_BEGIN,  /* BEGIN sent */
	KR_AUDIT,  /* key file created; key.rotated being appended */
	KR_NOTIFY, /* NOTIFY cs_vault queued (sent at COMMIT) */
	KR_COMMIT, /* COMMIT sent */
};

struct keys_rotate {
	struct http_op op;
	int old_version, new_version;
};

static void keys_rotate_advance(struct http_op *op, enum db_event ev, const PGresult *res)
{
	struct keys_rotate *kr = (struct keys_rotate *)op;
	struct http_request *req = op->req;

	if (ev != DB_OK) {
		http_op_db_fail(op, ev, res);
		return;
	}
	switch (op->state) {
	case KR_BEGIN: {
		struct audit_event aev;
		json_t *details;

		kr->old_version =
		    vault_ring() != NULL ? vault_keyring_current_version(vault_ring()) : 0;
		kr->new_version = strcmp(cs_worker->cfg->vault_provider, "kms") == 0
		                      ? kms_rotate(cs_worker->cfg)
		                      : vault_keyring_rotate(vault_key_dir());
		if (kr->new_version == -1) {
			http_op_fail(op, 500, "internal", "a new key version could not be created");
			return;
		}
		details = json_pack("{s:i, s:i}", "old_version", kr->old_version, "new_version",
		                    kr->new_version);
		audit_event_from_request(&aev, req, req->auth.org_id, req->auth.user_id,
		                         "key.rotated");
		op->state = KR_AUDIT;
		{
			char rid[16];

			snprintf(rid, sizeof(rid), "%d", kr->new_version);
			aev.resource_id = rid;
			(void)audit_op_write(op, &aev, details);
		}
		return;
	}
	case KR_AUDIT: {
		const char *p[1] = { "rotate" };

		op->state = KR_NOTIFY;
		(void)http_op_query(op, "SELECT vault_notify_reload($1)", 1, p);
		return;
	}
	case KR_NOTIFY:
		op->state = KR_COMMIT;
		http_op_commit(op);
		return;
	case KR_COMMIT: {
		json_t *doc;

		http_set_cancel(req, NULL, NULL);
		/* New writes of this worker use the new version at once; others on the NOTIFY. */
		if (vault_worker_reload() == -1)
			log_warnx("vault_reload", "the new key version %d did not load",
			          kr->new_version);
		creds_rewrap_kick();
		log_info("key_rotated", "key-encryption key version %d created (was %d)",
		         kr->new_version, kr->old_version);
		doc = json_pack("{s:i, s:i, s:s}", "version", kr->new_version, "previous_version",
		                kr->old_version, "rewrap", "background");
		http_respond_json(req, 201, doc);
		return;
	}
	}
}

static void keys_rotate(struct http_request *req)
{
	struct keys_rotate *kr;

	if (vault_key_dir() == NULL) {
		http_error(
		    req, 409, "conflict",
		    "the keys come from CLOUDSWEEP_VAULT_KEKS; rotating needs vault_key_dir");
		return;
	}
	kr = http_op_new(req, sizeof(*kr), keys_rotate_advance);
	kr->op.state = KR_BEGIN;
	(void)http_op_begin(&kr->op);
}

void creds_keys_routes(struct router *r)
{
	router_add_perm(r, "GET", "/api/v1/admin/keys", keys_list, ROUTE_NEEDS_DB, "keys:rotate");
	router_add_perm(r, "POST", "/api/v1/admin/keys/rotate", keys_rotate, ROUTE_NEEDS_DB,
	                "keys:rotate");
}

/* ---- `cloudsweepd keys` ---- */

/* One query of the command, waited for on a private loop. */
struct cli_q {
	bool done;
	enum db_event ev;
	PGresult *res; /* owned copy, or NULL */
};

static struct event_base *cli_base;

static void cli_cb(void *arg, enum db_event ev, const PGresult *res)
{
	struct cli_q *c = arg;

	c->done = true;
	c->ev = ev;
	c->res = res != NULL ? PQcopyResult(res, PG_COPYRES_ATTRS | PG_COPYRES_TUPLES) : NULL;
}

static void cli_tick_cb(evutil_socket_t fd, short what, void *arg)
{
}

/* Run the loop until c is answered (or the pool is up, c NULL); false after 15 s. */
static bool cli_wait(struct cli_q *c, struct db_pool *pool)
{
	uint64_t deadline = cs_now_ms() + 15000;
	struct timeval tick = { 0, 20000 };
	struct event *ev = event_new(cli_base, -1, EV_PERSIST, cli_tick_cb, NULL);
	bool ok;

	if (ev == NULL || event_add(ev, &tick) == -1)
		fatalx("keys", "cannot create a timer");
	while (c != NULL ? !c->done : !db_pool_ready(pool)) {
		if (cs_now_ms() >= deadline)
			break;
		event_base_loop(cli_base, EVLOOP_ONCE);
	}
	ok = c != NULL ? c->done && c->ev == DB_OK : db_pool_ready(pool);
	event_free(ev);
	return ok;
}

static void cli_q_clear(struct cli_q *c)
{
	PQclear(c->res);
	memset(c, 0, sizeof(*c));
}

/* How many stored blobs name version; -1 on failure. */
static long long cli_blobs_of(struct db_pool *pool, int version)
{
	struct cli_q c = { 0 };
	char v[16];
	const char *p[1] = { v };
	long long n = -1;

	snprintf(v, sizeof(v), "%d", version);
	if (db_query(pool,
	             "SELECT count(*) FROM vault_blobs WHERE vault_blob_version(blob) = $1::int", 1,
	             p, cli_cb, &c) != NULL &&
	    cli_wait(&c, pool) && PQntuples(c.res) == 1)
		n = atoll(PQgetvalue(c.res, 0, 0));
	cli_q_clear(&c);
	return n;
}

/* Append ev and NOTIFY cs_vault in one transaction; 0 or -1. */
static int cli_audit_notify(struct db_pool *pool, const struct audit_event *ev, const char *why)
{
	struct cli_q c = { 0 };
	struct db_tx *tx = db_tx_begin(pool, cli_cb, &c);
	const char *p[1] = { why };
	int rc = -1;

	if (tx == NULL || !cli_wait(&c, pool))
		goto out;
	cli_q_clear(&c);
	if (audit_write(tx, ev, cli_cb, &c) == NULL || !cli_wait(&c, pool))
		goto fail;
	cli_q_clear(&c);
	if (db_tx_query(tx, "SELECT vault_notify_reload($1)", 1, p, cli_cb, &c) == NULL ||
	    !cli_wait(&c, pool))
		goto fail;
	cli_q_clear(&c);
	db_tx_commit(tx, cli_cb, &c);
	rc = cli_wait(&c, pool) ? 0 : -1;
	goto out;
fail:
	db_tx_rollback(tx);
out:
	cli_q_clear(&c);
	return rc;
}

static int cli_list(struct db_pool *pool, const char *dir)
{
	struct vault_keyring *kr = vault_keyring_load(dir, getenv(VAULT_KEKS_ENV));
	struct cli_q c = { 0 };
	json_t *counts = NULL, *e;
	json_error_t jerr;
	size_t i;

	if (kr == NULL)
		return 1;
	if (db_query(pool, KEYS_COUNTS_SQL, 0, NULL, cli_cb, &c) == NULL || !cli_wait(&c, pool)) {
		fprintf(stderr, "cloudsweepd: cannot count the stored blobs\n");
		cli_q_clear(&c);
		vault_keyring_free(kr);
		return 1;
	}
	counts = json_loads(PQgetvalue(c.res, 0, 0), 0, &jerr);
	cli_q_clear(&c);
	/* The same view as GET /api/v1/admin/keys, from the ring on disk: version, state, blobs. */
	for (int v = vault_keyring_current_version(kr); v >= 1; v--) {
		long long blobs = 0;

		json_array_foreach (counts, i, e)
			if (json_integer_value(json_object_get(e, "version")) == v)
				blobs = json_integer_value(json_object_get(e, "blobs"));
		if (!vault_keyring_has_version(kr, v) && blobs == 0)
			continue;
		printf("%d\t%s\t%lld\n", v,
		       v == vault_keyring_current_version(kr) ? "current"
		       : vault_keyring_has_version(kr, v)     ? "active"
		                                              : "not_loaded",
		       blobs);
	}
	json_decref(counts);
	vault_keyring_free(kr);
	return 0;
}

static const struct config *cli_cfg; /* borrowed while creds_keys_main runs */

static int cli_rotate(struct db_pool *pool, const char *dir)
{
	bool kms = strcmp(cli_cfg->vault_provider, "kms") == 0;
	struct vault_keyring *kr =
	    kms ? kms_ring_load(cli_cfg) : vault_keyring_load(dir, getenv(VAULT_KEKS_ENV));
	struct audit_event ev;
	json_t *details;
	char rid[16];
	int old, fresh, rc;

	if (kr == NULL && !kms)
		return 1;
	/* With KMS the first version is created from nothing. */
	old = kr != NULL ? vault_keyring_current_version(kr) : 0;
	vault_keyring_free(kr);
	fresh = kms ? kms_rotate(cli_cfg) : vault_keyring_rotate(dir);
	if (fresh == -1)
		return 1;
	snprintf(rid, sizeof(rid), "%d", fresh);
	details = json_pack("{s:i, s:i}", "old_version", old, "new_version", fresh);
	memset(&ev, 0, sizeof(ev));
	ev.event_type = "key.rotated";
	ev.resource_id = rid;
	ev.details = details;
	rc = cli_audit_notify(pool, &ev, "rotate");
	json_decref(details);
	if (rc == -1) {
		fprintf(
		    stderr,
		    "cloudsweepd: key version %d created, but the audit event or the reload "
		    "notice failed; running workers pick the version up within rewrap_interval_s\n",
		    fresh);
		return 1;
	}
	printf("key version %d created (was %d); workers reload, stored keys are re-wrapped in "
	       "the background\n",
	       fresh, old);
	return 0;
}

static int cli_retire(struct db_pool *pool, const char *dir, const char *arg)
{
	struct audit_event ev;
	json_t *details;
	char *end;
	long v = strtol(arg, &end, 10);
	long long n;
	int rc;

	if (*arg == '\0' || *end != '\0' || v < 1 || v > VAULT_KEK_VERSION_MAX) {
		fprintf(stderr, "cloudsweepd: keys retire: \"%s\" is not a version\n", arg);
		return 2;
	}
	n = cli_blobs_of(pool, (int)v);
	if (n < 0) {
		fprintf(stderr, "cloudsweepd: cannot count the blobs that use version %ld\n", v);
		return 1;
	}
	if (n > 0) {
		fprintf(stderr,
		        "cloudsweepd: version %ld still protects %lld stored blob(s); wait for the "
		        "re-wrap job (GET /api/v1/admin/keys shows progress)\n",
		        v, n);
		return 1;
	}
	if (vault_keyring_retire(dir, (int)v, n) == -1) {
		fprintf(stderr, "cloudsweepd: version %ld cannot be retired (see log)\n", v);
		return 1;
	}
	details = json_pack("{s:i}", "version", (int)v);
	memset(&ev, 0, sizeof(ev));
	ev.event_type = "key.retired";
	ev.resource_id = arg;
	ev.details = details;
	rc = cli_audit_notify(pool, &ev, "retire");
	json_decref(details);
	if (rc == -1) {
		fprintf(stderr,
		        "cloudsweepd: version %ld retired, but the audit event or the "
		        "reload notice failed\n",
		        v);
		return 1;
	}
	printf("key version %ld retired\n", v);
	return 0;
}

int creds_keys_main(const char *config_path, bool debug, int argc, char **argv)
{
	struct config *cfg;
	struct db_pool *pool = NULL;
	char err[512], *conninfo;
	const char *dir;
	int rc = 1;

	if (argc < 1 || (strcmp(argv[0], "retire") == 0 ? argc != 2 : argc != 1) ||
	    (strcmp(argv[0], "list") != 0 && strcmp(argv[0], "rotate") != 0 &&
	     strcmp(argv[0], "retire") != 0)) {
		fprintf(stderr, "usage: cloudsweepd [-c file] keys list|rotate|retire N\n");
		return 2;
	}
	if (config_path == NULL && access(SYSCONFDIR "/cloudsweepd.conf", R_OK) == 0)
		config_path = SYSCONFDIR "/cloudsweepd.conf";
	cfg = config_load_all(config_path, NULL, NULL, err, sizeof(err));
	if (cfg == NULL) {
		fprintf(stderr, "cloudsweepd: configuration error: %s\n", err);
		return 1;
	}
	log_set_role("keys", -1);
	log_set_level(debug ? LOG_LVL_DEBUG : (enum log_level)cfg->log_level_num);
	if (creds_config_check(cfg, err, sizeof(err)) == -1) {
		fprintf(stderr, "cloudsweepd: configuration error: %s\n", err);
		goto out;
	}
	dir = *cfg->vault_key_dir != '\0' ? cfg->vault_key_dir : NULL;
	if (dir == NULL && strcmp(argv[0], "list") != 0) {
		fprintf(stderr,
		        "cloudsweepd: keys %s needs vault_key_dir (keys from %s are managed "
		        "outside the daemon)\n",
		        argv[0], VAULT_KEKS_ENV);
		goto out;
	}
	if (audit_init(*cfg->audit_hmac_key_file != '\0' ? cfg->audit_hmac_key_file : NULL,
	               *cfg->audit_signing_key_file != '\0' ? cfg->audit_signing_key_file : NULL) ==
	    -1) {
		fprintf(stderr, "cloudsweepd: cannot load the audit keys (audit_hmac_key_file)\n");
		goto out;
	}
	cli_base = event_base_new();
	if (cli_base == NULL)
		fatalx("event_base_new", "cannot create the reactor");
	conninfo = config_db_conninfo(cfg);
	pool = db_pool_new(cli_base, conninfo, 1, (int)cfg->db_query_timeout_ms);
	cs_free_secret(conninfo);
	if (pool == NULL || !cli_wait(NULL, pool)) {
		fprintf(stderr, "cloudsweepd: the database is unreachable\n");
		goto out;
	}
	cli_cfg = cfg;
	if (strcmp(argv[0], "list") == 0)
		rc = cli_list(pool, dir);
	else if (strcmp(argv[0], "rotate") == 0)
		rc = cli_rotate(pool, dir);
	else
		rc = cli_retire(pool, dir, argv[1]);
out:
	if (pool != NULL)
		db_pool_free(pool);
	if (cli_base != NULL) {
		event_base_loop(cli_base, EVLOOP_NONBLOCK);
		event_base_free(cli_base);
		cli_base = NULL;
	}
	audit_shutdown();
	config_free(cfg);
	return rc;
}
