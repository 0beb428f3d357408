/*
 * test_audit.c - TAP tests for the audit module. The key, HMAC and
 * catalogue checks need nothing but OpenSSL and always run; the chain,
 * concurrency, tampering, checkpoint and retention checks run against a
 * real PostgreSQL named by CS_TEST_PGURL (skipped when unset), in a schema
 * of their own (selected for every connection through PGOPTIONS) into
 * which the project's migrations are applied and which is dropped at the
 * end. Tampering is done the way an intruder with table access would: with
 * plain SQL on a separate admin connection. Keys are generated for the run
 * with OpenSSL into a private temporary directory.
 */
#include "config.h"

#include <ctype.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <event2/event.h>
#include <jansson.h>
#include <libpq-fe.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/pem.h>

#include "cloudsweep/audit.h"
#include "cloudsweep/db.h"
#include "cloudsweep/log.h"
#include "cloudsweep/util.h"
#include "tap.h"

static struct event_base *base;
static const char *url;
static PGconn *admin;
static char schema[64];
static char keydir[] = "/tmp/cs_test_audit_XXXXXX";
static char raw_key_path[256], b64_key_path[256], short_key_path[256], ed_key_path[256],
    ec_key_path[256], junk_key_path[256];
static unsigned char hmac_key[32];

/* ---- driving the loop ---- */

struct waiter {
	bool (*pred)(const void *);
	const void *arg;
	uint64_t deadline;
	bool met;
};

static void waiter_cb(evutil_socket_t fd, short what, void *arg)
{
	struct waiter *w = arg;

	if (w->pred(w->arg))
		w->met = true;
	if (w->met || cs_now_ms() >= w->deadline)
		event_base_loopbreak(base);
}

/* Run the loop until pred(arg) holds or ms pass; whether it held. */
static bool wait_for(bool (*pred)(const void *), const void *arg, int ms)
{
	struct waiter w = { .pred = pred, .arg = arg, .deadline = cs_now_ms() + (uint64_t)ms };
	struct timeval tick = { 0, 2000 };
	struct event *ev;

	if (pred(arg))
		return true;
	ev = event_new(base, -1, EV_PERSIST, waiter_cb, &w);
	event_add(ev, &tick);
	event_base_dispatch(base);
	event_free(ev);
	return w.met || pred(arg);
}

static bool never(const void *arg)
{
	return false;
}

static void run_ms(int ms)
{
	wait_for(never, NULL, ms);
}

struct int_goal {
	const int *p;
	int want;
};

static bool int_reached(const void *arg)
{
	const struct int_goal *g = arg;

	return *g->p >= g->want;
}

/* Run until *p >= want. */
static bool wait_int(const int *p, int want, int ms)
{
	struct int_goal g = { p, want };

	return wait_for(int_reached, &g, ms);
}

static bool pool_all_up(const void *arg)
{
	struct db_pool_stats st;

	db_pool_stats(arg, &st);
	return st.connected == st.size;
}

/* ---- admin connection (the intruder, and the oracle) ---- */

/* The first value of an admin query (caller frees), or NULL. */
static char *admin_value(const char *fmt, ...) CS_PRINTF(1, 2);
static char *admin_value(const char *fmt, ...)
{
	va_list ap;
	char *sql, *v = NULL;
	PGresult *res;

	va_start(ap, fmt);
	if (vasprintf(&sql, fmt, ap) < 0)
		abort();
	va_end(ap);
	res = PQexec(admin, sql);
	if (PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) > 0)
		v = xstrdup(PQgetisnull(res, 0, 0) ? "(null)" : PQgetvalue(res, 0, 0));
	else if (PQresultStatus(res) != PGRES_TUPLES_OK)
		printf("# admin query failed: %s", PQerrorMessage(admin));
	PQclear(res);
	free(sql);
	return v;
}

static bool admin_exec(const char *fmt, ...) CS_PRINTF(1, 2);
static bool admin_exec(const char *fmt, ...)
{
	va_list ap;
	PGresult *res;
	char *sql;
	bool okay;

	va_start(ap, fmt);
	if (vasprintf(&sql, fmt, ap) < 0)
		abort();
	va_end(ap);
	res = PQexec(admin, sql);
	okay = PQresultStatus(res) == PGRES_COMMAND_OK || PQresultStatus(res) == PGRES_TUPLES_OK;
	if (!okay)
		printf("# admin command failed: %s", PQerrorMessage(admin));
	PQclear(res);
	free(sql);
	return okay;
}

/* Run a tampering template with every %1$s replaced by org. */
static bool admin_exec_org(const char *tpl, const char *org)
{
	size_t n = 0, olen = strlen(org);
	char *sql = xmalloc(strlen(tpl) * 2 + 64 * olen);
	bool okay;

	for (const char *p = tpl; *p != '\0';) {
		if (strncmp(p, "%1$s", 4) == 0) {
			memcpy(sql + n, org, olen);
			n += olen;
			p += 4;
		} else {
			sql[n++] = *p++;
		}
	}
	sql[n] = '\0';
	okay = admin_exec("%s", sql);
	free(sql);
	return okay;
}

/* admin_value compared with want; frees the value. */
static bool admin_is(const char *want, const char *fmt, ...) CS_PRINTF(2, 3);
static bool admin_is(const char *want, const char *fmt, ...)
{
	va_list ap;
	char *sql, *v;
	bool same;

	va_start(ap, fmt);
	if (vasprintf(&sql, fmt, ap) < 0)
		abort();
	va_end(ap);
	v = admin_value("%s", sql);
	same = v != NULL && strcmp(v, want) == 0;
	if (!same)
		printf("#   got '%s', want '%s'\n", v != NULL ? v : "(no value)", want);
	free(v);
	free(sql);
	return same;
}

/* ---- audit operations driven to completion ---- */

struct wres {
	int calls;
	int status;
	char id[37];
};

static void wres_cb(void *arg, int status, const char *id)
{
	struct wres *r = arg;

	r->calls++;
	r->status = status;
	snprintf(r->id, sizeof(r->id), "%s", id != NULL ? id : "");
}

/* A standalone write of a type with optional details; the event id into id (37 bytes). */
static bool write_event(struct db_pool *pool, const char *org, const char *type, json_t *details,
                        char *id)
{
	struct audit_event ev = {
		.org_id = org,
		.actor = "5d0f9a52-4a8f-4f7b-9a5e-0c7a2b6d1e11",
		.ip = "203.0.113.7",
		.user_agent = "test-agent/1.0",
		.request_id = "req-1",
		.event_type = type,
		.resource_id = "r-1",
		.details = details,
	};
	struct wres r = { 0 };

	if (audit_write_standalone(pool, &ev, wres_cb, &r) == NULL)
		return false;
	if (!wait_int(&r.calls, 1, 5000) || r.status != 0)
		return false;
	if (id != NULL)
		memcpy(id, r.id, 37);
	return true;
}

/* n events into org, their ids into ids[0..n-1]. */
static bool write_n(struct db_pool *pool, const char *org, int n, char ids[][37])
{
	for (int i = 0; i < n; i++) {
		json_t *d = json_pack("{s:i, s:s, s:[i, {s:b}]}", "n", i + 1, "note",
		                      "caf\xc3\xa9 \"q\"\n", "list", i, "deep", 1);

		if (!write_event(pool, org, "scan.created", d, ids[i])) {
			json_decref(d);
			return false;
		}
		json_decref(d);
	}
	return true;
}

struct vres {
	int calls;
	struct audit_verify_result r;
};

static void vres_cb(void *arg, const struct audit_verify_result *r)
{
	struct vres *v = arg;

	v->calls++;
	v->r = *r;
}

static bool verify(struct db_pool *pool, const char *org, struct vres *v)
{
	memset(v, 0, sizeof(*v));
	if (audit_verify_start(pool, org, vres_cb, v) == NULL)
		return false;
	return wait_int(&v->calls, 1, 10000);
}

struct sres {
	int calls;
	int status;
	int nsigned;
};

static void sres_cb(void *arg, int status, int nsigned)
{
	struct sres *s = arg;

	s->calls++;
	s->status = status;
	s->nsigned = nsigned;
}

static bool sign_heads(struct db_pool *pool, struct sres *s)
{
	memset(s, 0, sizeof(*s));
	if (audit_checkpoint_sign(pool, sres_cb, s) == NULL)
		return false;
	return wait_int(&s->calls, 1, 10000) && s->status == 0;
}

struct qres {
	int calls;
	enum db_event ev;
	char val[128];
	char sqlstate[8];
};

static void qres_cb(void *arg, enum db_event ev, const PGresult *res)
{
	struct qres *q = arg;
	const char *st;

	q->calls++;
	q->ev = ev;
	if (ev == DB_OK && PQntuples(res) > 0 && PQnfields(res) > 0)
		snprintf(q->val, sizeof(q->val), "%s", PQgetvalue(res, 0, 0));
	if (ev == DB_ERROR) {
		st = PQresultErrorField(res, PG_DIAG_SQLSTATE);
		snprintf(q->sqlstate, sizeof(q->sqlstate), "%s", st != NULL ? st : "");
	}
}

static void new_org(char org[37])
{
	cs_uuid4(org);
}

/* ---- keys ---- */

static bool write_bytes(const char *path, const void *p, size_t n)
{
	FILE *f = fopen(path, "w");
	bool okay;

	if (f == NULL)
		return false;
	okay = fwrite(p, 1, n, f) == n;
	okay = fclose(f) == 0 && okay;
	return okay && chmod(path, 0600) == 0;
}

static bool write_pkey(const char *path, const char *alg)
{
	EVP_PKEY *k = alg != NULL ? EVP_PKEY_Q_keygen(NULL, NULL, alg) : NULL;
	FILE *f;
	bool okay;

	if (alg != NULL && strcmp(alg, "EC") == 0)
		k = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
	if (k == NULL || (f = fopen(path, "w")) == NULL) {
		EVP_PKEY_free(k);
		return false;
	}
	okay = PEM_write_PrivateKey(f, k, NULL, NULL, 0, NULL, NULL) == 1;
	okay = fclose(f) == 0 && okay;
	EVP_PKEY_free(k);
	return okay && chmod(path, 0600) == 0;
}

static bool make_keys(void)
{
	char b64[64];
	int n;

	if (mkdtemp(keydir) == NULL)
		return false;
	snprintf(raw_key_path, sizeof(raw_key_path), "%s/hmac.raw", keydir);
	snprintf(b64_key_path, sizeof(b64_key_path), "%s/hmac.b64", keydir);
	snprintf(short_key_path, sizeof(short_key_path), "%s/hmac.short", keydir);
	snprintf(ed_key_path, sizeof(ed_key_path), "%s/ed25519.pem", keydir);
	snprintf(ec_key_path, sizeof(ec_key_path), "%s/ec.pem", keydir);
	snprintf(junk_key_path, sizeof(junk_key_path), "%s/junk.pem", keydir);
	/* Random until the raw key cannot be mistaken for base64 (all but certain at once). */
	do
		cs_random(hmac_key, sizeof(hmac_key));
	while (strspn((char *)hmac_key, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123"
	                                "456789+/=") >= sizeof(hmac_key));
	n = EVP_EncodeBlock((unsigned char *)b64, hmac_key, sizeof(hmac_key));
	b64[n++] = '\n';
	return write_bytes(raw_key_path, hmac_key, sizeof(hmac_key)) &&
	       write_bytes(b64_key_path, b64, (size_t)n) &&
	       write_bytes(short_key_path, "too short\n", 10) &&
	       write_bytes(junk_key_path, "-----BEGIN PRIVATE KEY-----\nAAAA\n", 33) &&
	       write_pkey(ed_key_path, "ED25519") && write_pkey(ec_key_path, "EC");
}

static void remove_keys(void)
{
	const char *files[] = { raw_key_path, b64_key_path, short_key_path,
		                ed_key_path,  ec_key_path,  junk_key_path };

	for (size_t i = 0; i < CS_ARRAY_LEN(files); i++)
		unlink(files[i]);
	rmdir(keydir);
}

static bool is_lower_hex(const char *s, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
			return false;
	return s[n] == '\0';
}

static void test_keys_and_hmac(void)
{
	unsigned char mac[32];
	unsigned int maclen = 0;
	char want[AUDIT_HMAC_LEN + 1], *h1, *h2, *h3, *h4;
	json_t *d;

	ok(audit_hmac("x") == NULL, "no HMAC before audit_init");
	ok(audit_verify_start((struct db_pool *)1, AUDIT_NIL_ORG, vres_cb, NULL) == NULL,
	   "no verification before audit_init");
	is_int(audit_init("/nonexistent/cs_audit_key", NULL), -1, "missing HMAC key file refused");
	is_int(audit_init(short_key_path, NULL), -1, "HMAC key under 32 bytes refused");
	is_int(audit_init(raw_key_path, ec_key_path), -1, "P-256 signing key refused");
	is_int(audit_init(raw_key_path, junk_key_path), -1, "garbage PEM refused");
	is_int(audit_init(raw_key_path, "/nonexistent/cs_ed25519.pem"), -1,
	       "missing signing key file refused");
	ok(audit_hmac("x") == NULL, "a failed init leaves nothing loaded");

	is_int(audit_init(raw_key_path, NULL), 0, "raw HMAC key without a signing key");
	ok(audit_public_key_pem() == NULL && audit_key_id() == NULL,
	   "no signing key: no public key");
	ok(audit_checkpoint_sign((struct db_pool *)1, sres_cb, NULL) == NULL,
	   "no signing key: checkpoint signing refused");
	h1 = audit_hmac("alice@example.com");
	h2 = audit_hmac("alice@example.com");
	h3 = audit_hmac("bob@example.com");
	ok(h1 != NULL && strlen(h1) == AUDIT_HMAC_LEN && strncmp(h1, "hmac-sha256:", 12) == 0 &&
	       is_lower_hex(h1 + 12, 64),
	   "HMAC format hmac-sha256:<64 lower-case hex>");
	is_str(h2, h1, "HMAC is stable across calls (one context, re-initialised)");
	ok(h3 != NULL && strcmp(h1, h3) != 0, "different values, different HMACs");
	HMAC(EVP_sha256(), hmac_key, sizeof(hmac_key), (const unsigned char *)"alice@example.com",
	     17, mac, &maclen);
	memcpy(want, "hmac-sha256:", 12);
	cs_hex(want + 12, mac, maclen);
	is_str(h1, want, "HMAC equals an independent HMAC-SHA256 under the key");
	ok(audit_hmac(NULL) == NULL, "HMAC of NULL is NULL");
	h4 = audit_hmac("");
	ok(h4 != NULL && strlen(h4) == AUDIT_HMAC_LEN, "HMAC of the empty string");
	free(h4);
	free(h2);
	free(h3);

	is_int(audit_init(b64_key_path, ed_key_path), 0, "base64 HMAC key with an Ed25519 key");
	h2 = audit_hmac("alice@example.com");
	is_str(h2, h1, "base64 key file gives the same HMAC as the raw one");
	free(h2);
	ok(audit_public_key_pem() != NULL &&
	       strncmp(audit_public_key_pem(), "-----BEGIN PUBLIC KEY-----", 26) == 0,
	   "public key exposed as PEM");
	ok(audit_key_id() != NULL && strlen(audit_key_id()) == 24 &&
	       strncmp(audit_key_id(), "ed25519:", 8) == 0 && is_lower_hex(audit_key_id() + 8, 16),
	   "key id ed25519:<16 hex> (%s)", audit_key_id() != NULL ? audit_key_id() : "");

	d = json_object();
	is_int(audit_details_set_hmac(d, "email", "alice@example.com"), 0, "details_set_hmac");
	is_str(json_string_value(json_object_get(d, "email")), h1, "details hold the HMAC");
	is_int(audit_details_set_hmac(NULL, "email", "x"), -1, "details_set_hmac on NULL refused");
	json_decref(d);
	free(h1);
}

/* ---- the catalogue and its documentation ---- */

static bool dotted_lower(const char *s)
{
	int dots = 0;

	if (!islower((unsigned char)*s))
		return false;
	for (const char *p = s; *p; p++) {
		if (*p == '.') {
			if (p[1] == '\0' || p[1] == '.' || p[-1] == '.')
				return false;
			dots++;
		} else if (!islower((unsigned char)*p) && *p != '_') {
			return false;
		}
	}
	return dots >= 1;
}

/* The cell text of column col (0-based) of a table row, without backticks; false if absent. */
static bool md_cell(const char *line, int col, char *out, size_t len)
{
	const char *p = line, *end;
	size_t o = 0;

	for (int c = 0; c <= col; c++) {
		p = strchr(p, '|');
		if (p == NULL)
			return false;
		p++;
	}
	end = strchr(p, '|');
	if (end == NULL)
		return false;
	while (p < end && *p == ' ')
		p++;
	while (end > p && end[-1] == ' ')
		end--;
	for (; p < end && o + 1 < len; p++)
		if (*p != '`')
			out[o++] = *p;
	out[o] = '\0';
	return true;
}

static void test_catalogue(void)
{
	char path[512], line[4096], name[128], rtype[64], action[64];
	int bad_names = 0, dups = 0, documented = 0, matched = 0, mismatched = 0;
	bool *seen = xcalloc(audit_event_types_count, sizeof(bool));
	FILE *f;

	ok(audit_event_types_count >= 30, "catalogue has %zu event types", audit_event_types_count);
	for (size_t i = 0; i < audit_event_types_count; i++) {
		if (!dotted_lower(audit_event_types[i].name)) {
			printf("#   bad name %s\n", audit_event_types[i].name);
			bad_names++;
		}
		for (size_t j = 0; j < i; j++)
			if (strcmp(audit_event_types[i].name, audit_event_types[j].name) == 0)
				dups++;
	}
	is_int(bad_names, 0, "every event type is dotted lower case");
	is_int(dups, 0, "no event type twice");
	ok(audit_event_type_known("auth.login.succeeded") &&
	       audit_event_type_known("auth.login.failed") &&
	       audit_event_type_known("auth.refresh.reused") &&
	       audit_event_type_known("credential.read") &&
	       audit_event_type_known("waste_item.cleaned"),
	   "the named examples are catalogued");
	ok(!audit_event_type_known("auth.login") && !audit_event_type_known("") &&
	       !audit_event_type_known(NULL) && !audit_event_type_known("AUTH.LOGIN.FAILED"),
	   "unknown names are not");

	snprintf(path, sizeof(path), "%s/doc/audit-events.md", SRCDIR);
	f = fopen(path, "r");
	ok(f != NULL, "doc/audit-events.md readable");
	while (f != NULL && fgets(line, sizeof(line), f) != NULL) {
		const struct audit_event_type *t;
		size_t idx;

		if (strncmp(line, "| `", 3) != 0 || !md_cell(line, 0, name, sizeof(name)) ||
		    !dotted_lower(name) || !md_cell(line, 2, rtype, sizeof(rtype)) ||
		    !md_cell(line, 3, action, sizeof(action)))
			continue;
		documented++;
		t = audit_event_type_find(name);
		if (t == NULL) {
			printf("#   documented but not in audit_event_types[]: %s\n", name);
			mismatched++;
			continue;
		}
		idx = (size_t)(t - audit_event_types);
		seen[idx] = true;
		if (strcmp(rtype, t->resource_type != NULL ? t->resource_type : "\xe2\x80\x94") !=
		        0 ||
		    strcmp(action, t->action) != 0) {
			printf("#   %s: doc says %s/%s, code says %s/%s\n", name, rtype, action,
			       t->resource_type != NULL ? t->resource_type : "-", t->action);
			mismatched++;
			continue;
		}
		matched++;
	}
	if (f != NULL)
		fclose(f);
	for (size_t i = 0; i < audit_event_types_count; i++)
		if (!seen[i])
			printf("#   in audit_event_types[] but not documented: %s\n",
			       audit_event_types[i].name);
	is_int(documented, (int)audit_event_types_count,
	       "documentation lists as many types as the code");
	is_int(matched, (int)audit_event_types_count,
	       "every catalogued type documented with the same resource type and action");
	is_int(mismatched, 0, "nothing documented that the code lacks");
	free(seen);
}

/* ---- database tests ---- */

static struct db_pool *pool, *pool2;

static void test_basic(void)
{
	char org[37], ids[5][37], id[37];
	struct vres v;
	json_t *j;
	char *s;

	new_org(org);
	ok(write_n(pool, org, 5, ids), "five events appended to a new org");
	ok(admin_is("5|1|5",
	            "SELECT count(*) || '|' || min(seq) || '|' || max(seq) FROM "
	            "audit_events WHERE org_id = '%s'",
	            org),
	   "seq 1..5 without gaps");
	ok(admin_is("t",
	            "SELECT bool_and(prev_hash = lag) FROM (SELECT prev_hash, coalesce(lag(hash) "
	            "OVER (ORDER BY seq), repeat('0', 64)) AS lag FROM audit_events WHERE "
	            "org_id = '%s') x",
	            org),
	   "each prev_hash is the previous hash, genesis 64 zeros");
	ok(admin_is("t",
	            "SELECT h.seq = 5 AND h.hash = e.hash FROM audit_chain_heads h JOIN "
	            "audit_events e ON e.org_id = h.org_id AND e.seq = 5 WHERE h.org_id = '%s'",
	            org),
	   "head at the last event");
	ok(admin_is("scan|create|success",
	            "SELECT resource_type || '|' || action || '|' || "
	            "result FROM audit_events WHERE org_id = '%s' AND seq = 1",
	            org),
	   "catalogue defaults filled in (resource type, action, result)");
	ok(verify(pool, org, &v), "verification answered");
	ok(v.r.status == 0 && v.r.ok && v.r.events_checked == 5 &&
	       v.r.first_bad_event_id[0] == '\0',
	   "intact chain verifies (%lld events, %s)", v.r.events_checked,
	   v.r.reason != NULL ? v.r.reason : "?");
	j = audit_verify_result_json(&v.r);
	s = json_dumps(j, JSON_COMPACT | JSON_SORT_KEYS);
	is_str(s, "{\"events_checked\":5,\"first_bad_event_id\":null,\"ok\":true}",
	       "verification as API JSON");
	free(s);
	json_decref(j);

	new_org(org);
	ok(verify(pool, org, &v) && v.r.status == 0 && v.r.ok && v.r.events_checked == 0,
	   "org without events verifies, 0 checked");
	ok(audit_verify_start(pool, "not-a-uuid", vres_cb, &v) == NULL, "bad org id refused");

	ok(write_event(pool, NULL, "auth.login.failed", NULL, id), "event with no organization");
	ok(admin_is("00000000-0000-0000-0000-000000000000|denied|{}",
	            "SELECT org_id || '|' || result || '|' || details FROM audit_events WHERE id = "
	            "'%s'",
	            id),
	   "stored under the nil org, default result denied, details {}");
	ok(verify(pool, AUDIT_NIL_ORG, &v) && v.r.ok, "nil-org chain verifies");
}

static void test_refusals(void)
{
	struct audit_event ev = { .event_type = "auth.login.failed" };
	struct qres rb = { 0 }, rq = { 0 };
	char *h = audit_hmac("alice@example.com");
	char big[AUDIT_DETAILS_MAX + 10];
	struct wres w = { 0 };
	struct db_tx *tx;
	json_t *d;

	tx = db_tx_begin(pool, qres_cb, &rb);
	ok(tx != NULL && wait_int(&rb.calls, 1, 3000) && rb.ev == DB_OK, "tx for refusals");

	ev.event_type = "auth.login.exploded";
	ok(audit_write(tx, &ev, qres_cb, &rq) == NULL, "unknown event type refused in a tx");
	ok(audit_write_standalone(pool, &ev, wres_cb, &w) == NULL,
	   "unknown type refused standalone");
	ev.event_type = NULL;
	ok(audit_write(tx, &ev, qres_cb, &rq) == NULL, "NULL event type refused");

	ev.event_type = "auth.login.failed";
	ev.org_id = "1234";
	ok(audit_write(tx, &ev, qres_cb, &rq) == NULL, "org id that is not a UUID refused");
	ev.org_id = NULL;

	d = json_pack("{s:s}", "email", "alice@example.com");
	ev.details = d;
	ok(audit_write(tx, &ev, qres_cb, &rq) == NULL, "plaintext email in details refused");
	json_decref(d);
	d = json_pack("{s:{s:[{s:s}]}}", "outer", "list", "Password", "hunter2hunter2");
	ev.details = d;
	ok(audit_write(tx, &ev, qres_cb, &rq) == NULL, "nested plaintext password refused");
	json_decref(d);
	d = json_pack("{s:s}", "access_key_id", "AKIAIOSFODNN7EXAMPLE");
	ev.event_type = "credential.created";
	ev.details = d;
	ok(audit_write(tx, &ev, qres_cb, &rq) == NULL,
	   "a type's own HMAC'd key (access_key_id) in clear refused");
	json_decref(d);
	d = json_pack("[s]", "x");
	ev.details = d;
	ok(audit_write(tx, &ev, qres_cb, &rq) == NULL, "details that are not an object refused");
	json_decref(d);
	memset(big, 'a', sizeof(big) - 1);
	big[sizeof(big) - 1] = '\0';
	d = json_pack("{s:s}", "blob", big);
	ev.details = d;
	ok(audit_write(tx, &ev, qres_cb, &rq) == NULL, "details over %d bytes refused",
	   AUDIT_DETAILS_MAX);
	json_decref(d);
	ev.result = (enum audit_result)42;
	ev.details = NULL;
	ok(audit_write(tx, &ev, qres_cb, &rq) == NULL, "bad result value refused");
	ev.result = AUDIT_RESULT_DEFAULT;
	run_ms(20);
	is_int(rq.calls + w.calls, 0, "refused events never call back");

	ev.event_type = "auth.login.failed";
	d = json_pack("{s:s, s:n, s:s}", "email", h, "jti", "reason", "invalid_credentials");
	ev.details = d;
	ok(audit_write(tx, &ev, qres_cb, &rq) != NULL, "HMAC'd email (and null jti) accepted");
	json_decref(d);
	ok(wait_int(&rq.calls, 1, 3000) && rq.ev == DB_OK, "append in the tx answered DB_OK");
	db_tx_rollback(tx);
	free(h);
}

static void test_sanitize(void)
{
	char ua[2000], org[37];
	struct audit_event ev = {
		.org_id = org,
		.event_type = "access.rate_limited",
		.user_agent = ua,
		.ip = "10.0.0.1\r\nX-Injected: 1",
		.request_id = "\xc3\x28\xed\xa0\x80ok",
	};
	struct wres w = { 0 };

	new_org(org);
	memset(ua, 'u', sizeof(ua) - 1);
	ua[sizeof(ua) - 1] = '\0';
	memcpy(ua, "\xff\xfe bad \x01 \xe2\x82\xac", 12);
	memcpy(ua + 510, "\xe2\x82\xac", 3); /* straddles the 512-byte limit */
	ok(audit_write_standalone(pool, &ev, wres_cb, &w) != NULL && wait_int(&w.calls, 1, 3000) &&
	       w.status == 0,
	   "invalid UTF-8 and control characters do not fail the write");
	ok(admin_is("510|true",
	            "SELECT octet_length(user_agent) || '|' || (right(user_agent, 3) = "
	            "'uuu') FROM audit_events WHERE id = '%s'",
	            w.id),
	   "user agent cut to at most 512 bytes at a character boundary");
	ok(admin_is("?? bad ? \xe2\x82\xac|10.0.0.1??X-Injected: 1|?(???ok",
	            "SELECT left(user_agent, 10) || '|' || actor_ip || '|' || request_id FROM "
	            "audit_events WHERE id = '%s'",
	            w.id),
	   "invalid bytes and control characters stored as '?'");
}

#define NCONC 40

static void test_concurrency(void)
{
	static struct wres w[NCONC];
	struct audit_event ev = { .event_type = "credential.read" };
	struct qres b1 = { 0 }, b2 = { 0 }, a1 = { 0 }, a2 = { 0 }, c1 = { 0 }, c2 = { 0 };
	struct db_tx *t1, *t2;
	char org[37];
	struct vres v;
	int done = 0, good = 0;

	new_org(org);
	ev.org_id = org;
	memset(w, 0, sizeof(w));
	for (int i = 0; i < NCONC; i++)
		audit_write_standalone(i % 2 ? pool2 : pool, &ev, wres_cb, &w[i]);
	for (int i = 0; i < NCONC; i++) {
		if (!wait_int(&w[i].calls, 1, 10000))
			break;
		done++;
		good += w[i].status == 0;
	}
	is_int(done, NCONC, "%d interleaved writes from two pools answered", NCONC);
	is_int(good, NCONC, "all committed");
	ok(admin_is("40|1|40|40",
	            "SELECT count(*) || '|' || min(seq) || '|' || max(seq) || '|' || "
	            "count(DISTINCT seq) FROM audit_events WHERE org_id = '%s'",
	            org),
	   "seq contiguous 1..%d", NCONC);
	ok(verify(pool2, org, &v) && v.r.ok && v.r.events_checked == NCONC,
	   "interleaved chain verifies (%lld, %s)", v.r.events_checked, v.r.reason);

	/* The head lock serializes writers of one org until the first commits. */
	t1 = db_tx_begin(pool, qres_cb, &b1);
	t2 = db_tx_begin(pool2, qres_cb, &b2);
	ok(wait_int(&b1.calls, 1, 3000) && wait_int(&b2.calls, 1, 3000), "two transactions open");
	audit_write(t1, &ev, qres_cb, &a1);
	ok(wait_int(&a1.calls, 1, 3000) && a1.ev == DB_OK, "first worker appended (lock held)");
	audit_write(t2, &ev, qres_cb, &a2);
	run_ms(300);
	is_int(a2.calls, 0, "second worker's append waits on the head lock");
	db_tx_commit(t1, qres_cb, &c1);
	ok(wait_int(&a2.calls, 1, 3000) && a2.ev == DB_OK, "second append proceeds after commit");
	ok(c1.calls == 1 && c1.ev == DB_OK, "first commit DB_OK");
	db_tx_commit(t2, qres_cb, &c2);
	ok(wait_int(&c2.calls, 1, 3000) && c2.ev == DB_OK, "second commit DB_OK");
	ok(admin_is("41|42",
	            "SELECT string_agg(seq::text, '|' ORDER BY seq) FROM audit_events "
	            "WHERE org_id = '%s' AND seq > 40",
	            org),
	   "the two got consecutive positions");
	ok(verify(pool, org, &v) && v.r.ok && v.r.events_checked == NCONC + 2,
	   "chain still verifies");
}

static void test_rollback(void)
{
	struct audit_event ev = { .event_type = "credential.deleted", .resource_id = "acct-9" };
	struct qres rb = { 0 }, ra = { 0 }, rf = { 0 }, rc = { 0 }, rh, rha;
	char org[37], ids[2][37], *head0, *head1, id[37];
	const char *p[1] = { org };
	struct db_tx *tx, *hold;
	struct vres v;

	new_org(org);
	ev.org_id = org;
	ok(write_n(pool, org, 2, ids), "two events before the failing action");
	head0 = admin_value("SELECT seq || ':' || hash FROM audit_chain_heads WHERE org_id = '%s'",
	                    org);

	/* The action's later statement fails; the caller rolls back. */
	tx = db_tx_begin(pool, qres_cb, &rb);
	ok(audit_write(tx, &ev, qres_cb, &ra) != NULL, "audit row queued in the action's tx");
	db_tx_query(tx, "SELECT 1/0", 0, NULL, qres_cb, &rf);
	ok(wait_int(&rf.calls, 1, 3000) && ra.ev == DB_OK && strcmp(ra.val, "") != 0,
	   "audit append succeeded inside the tx");
	ok(rf.ev == DB_ERROR && strcmp(rf.sqlstate, "22012") == 0, "the action's statement failed");
	db_tx_rollback(tx);
	run_ms(20);
	ok(admin_is("2", "SELECT count(*) FROM audit_events WHERE org_id = '%s'", org),
	   "after rollback no audit row");
	head1 = admin_value("SELECT seq || ':' || hash FROM audit_chain_heads WHERE org_id = '%s'",
	                    org);
	ok(head0 != NULL && head1 != NULL && strcmp(head0, head1) == 0, "chain head unchanged");
	free(head1);

	/* Same, but the caller commits anyway: the server answers ROLLBACK. */
	memset(&rb, 0, sizeof(rb));
	memset(&ra, 0, sizeof(ra));
	memset(&rf, 0, sizeof(rf));
	tx = db_tx_begin(pool, qres_cb, &rb);
	audit_write(tx, &ev, qres_cb, &ra);
	db_tx_query(tx, "SELECT * FROM no_such_table", 0, NULL, qres_cb, &rf);
	db_tx_commit(tx, qres_cb, &rc);
	ok(wait_int(&rc.calls, 1, 3000) && rc.ev == DB_ERROR, "commit after a failure: DB_ERROR");
	head1 = admin_value("SELECT seq || ':' || hash FROM audit_chain_heads WHERE org_id = '%s'",
	                    org);
	ok(head1 != NULL && strcmp(head0, head1) == 0 &&
	       admin_is("2", "SELECT count(*) FROM audit_events WHERE org_id = '%s'", org),
	   "no row, head unchanged");
	free(head1);
	free(head0);

	/* The audit append itself fails (lock timeout): the action goes with it. */
	ok(admin_exec("CREATE TABLE IF NOT EXISTS audit_test_actions (org uuid, what text)"),
	   "action table");
	memset(&rb, 0, sizeof(rb));
	memset(&ra, 0, sizeof(ra));
	memset(&rf, 0, sizeof(rf));
	memset(&rc, 0, sizeof(rc));
	memset(&rh, 0, sizeof(rh));
	memset(&rha, 0, sizeof(rha));
	hold = db_tx_begin(pool2, qres_cb, &rh);
	audit_write(hold, &ev, qres_cb, &rha);
	ok(wait_int(&rha.calls, 1, 3000) && rha.ev == DB_OK, "another worker holds the head lock");
	tx = db_tx_begin(pool, qres_cb, &rb);
	db_tx_query(tx, "SET LOCAL lock_timeout = '100ms'", 0, NULL, NULL, NULL);
	db_tx_query(tx, "INSERT INTO audit_test_actions VALUES ($1, 'deleted')", 1, p, qres_cb,
	            &rf);
	audit_write(tx, &ev, qres_cb, &ra);
	ok(wait_int(&ra.calls, 1, 3000) && rf.ev == DB_OK && ra.ev == DB_ERROR &&
	       strcmp(ra.sqlstate, "55P03") == 0,
	   "the action's write succeeded, its audit append failed (%s)", ra.sqlstate);
	db_tx_commit(tx, qres_cb, &rc);
	ok(wait_int(&rc.calls, 1, 3000) && rc.ev == DB_ERROR, "so the commit rolls back");
	ok(admin_is("0", "SELECT count(*) FROM audit_test_actions WHERE org = '%s'", org),
	   "the action left no trace (fail closed)");
	db_tx_rollback(hold);
	run_ms(20);
	ok(admin_is("2", "SELECT count(*) FROM audit_events WHERE org_id = '%s'", org),
	   "still two audit rows");

	ok(write_event(pool, org, "credential.deleted", NULL, id), "next event written");
	ok(admin_is("3", "SELECT seq FROM audit_events WHERE id = '%s'", id),
	   "it takes the next position (no gap from the rolled-back one)");
	ok(verify(pool, org, &v) && v.r.ok && v.r.events_checked == 3, "chain verifies");
}

/* How an intruder tampers, and what verification must say. %1$s is the org. */
struct tamper {
	const char *name;
	const char *sql;
	int bad_seq;        /* original position of the event to be named, 0 for none */
	const char *bad_id; /* or a literal id */
	const char *reason;
};

static const struct tamper tampers[] = {
	{ "details edited",
	  "UPDATE audit_events SET details = '{\"n\": 99}' WHERE org_id = '%1$s' AND seq = 3", 3,
	  NULL, "hash_mismatch" },
	{ "result edited",
	  "UPDATE audit_events SET result = 'denied' WHERE org_id = '%1$s' AND seq = 3", 3, NULL,
	  "hash_mismatch" },
	{ "time moved by 1 us",
	  "UPDATE audit_events SET occurred_at = occurred_at + interval '1 microsecond' "
	  "WHERE org_id = '%1$s' AND seq = 2",
	  2, NULL, "hash_mismatch" },
	{ "ip of the last event edited",
	  "UPDATE audit_events SET actor_ip = '198.51.100.1' WHERE org_id = '%1$s' AND seq = 5", 5,
	  NULL, "hash_mismatch" },
	{ "middle row deleted", "DELETE FROM audit_events WHERE org_id = '%1$s' AND seq = 3", 4,
	  NULL, "seq_gap" },
	{ "first row deleted", "DELETE FROM audit_events WHERE org_id = '%1$s' AND seq = 1", 2,
	  NULL, "seq_gap" },
	{ "last row deleted", "DELETE FROM audit_events WHERE org_id = '%1$s' AND seq = 5", 0, NULL,
	  "head_mismatch" },
	{ "two rows' seq swapped",
	  "UPDATE audit_events SET seq = 1000 WHERE org_id = '%1$s' AND seq = 2; "
	  "UPDATE audit_events SET seq = 2 WHERE org_id = '%1$s' AND seq = 3; "
	  "UPDATE audit_events SET seq = 3 WHERE org_id = '%1$s' AND seq = 1000",
	  3, NULL, "prev_hash_mismatch" },
	{ "two rows' contents swapped (ids kept in place)",
	  "UPDATE audit_events a SET details = b.details, occurred_at = b.occurred_at "
	  "FROM audit_events b WHERE a.org_id = '%1$s' AND b.org_id = a.org_id "
	  "AND ((a.seq = 2 AND b.seq = 4) OR (a.seq = 4 AND b.seq = 2))",
	  2, NULL, "hash_mismatch" },
	{ "row rewritten with a recomputed hash",
	  "UPDATE audit_events e SET details = '{\"n\": 99}' WHERE org_id = '%1$s' AND seq = 3; "
	  "UPDATE audit_events e SET hash = encode(sha256(convert_to(e.prev_hash || E'\\n' || "
	  "audit_canonical(e), 'UTF8')), 'hex') WHERE org_id = '%1$s' AND seq = 3",
	  4, NULL, "prev_hash_mismatch" },
	{ "prev_hash edited",
	  "UPDATE audit_events SET prev_hash = repeat('1', 64) WHERE org_id = '%1$s' AND seq = 4",
	  4, NULL, "prev_hash_mismatch" },
	{ "row appended behind the head's back",
	  "INSERT INTO audit_events SELECT 'aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa', org_id, 6, "
	  "occurred_at, actor, actor_ip, user_agent, request_id, event_type, resource_type, "
	  "resource_id, action, result, details, hash, hash FROM audit_events "
	  "WHERE org_id = '%1$s' AND seq = 5",
	  0, "aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa", "beyond_head" },
	{ "chain head deleted", "DELETE FROM audit_chain_heads WHERE org_id = '%1$s'", 1, NULL,
	  "beyond_head" },
	{ "chain head moved back", "UPDATE audit_chain_heads SET seq = 4 WHERE org_id = '%1$s'", 5,
	  NULL, "beyond_head" },
};

static void test_tampering(void)
{
	char org[37], ids[5][37];
	struct vres v;

	for (size_t i = 0; i < CS_ARRAY_LEN(tampers); i++) {
		const struct tamper *t = &tampers[i];
		const char *want = t->bad_id != NULL ? t->bad_id
		                   : t->bad_seq > 0  ? ids[t->bad_seq - 1]
		                                     : "";

		new_org(org);
		if (!write_n(pool, org, 5, ids) || !verify(pool, org, &v) || !v.r.ok) {
			ok(0, "%s: setup", t->name);
			continue;
		}
		if (!admin_exec_org(t->sql, org)) {
			ok(0, "%s: tampering SQL", t->name);
			continue;
		}
		ok(verify(pool, org, &v) && v.r.status == 0 && !v.r.ok, "%s: detected", t->name);
		ok(strcmp(v.r.first_bad_event_id, want) == 0 && strcmp(v.r.reason, t->reason) == 0,
		   "%s: names %s (%s), got %s (%s)", t->name, *want ? want : "no event", t->reason,
		   *v.r.first_bad_event_id ? v.r.first_bad_event_id : "no event", v.r.reason);
	}
}

static void test_paging(void)
{
	char org[37], *bad;
	struct vres v;

	new_org(org);
	ok(admin_exec("SELECT count(*) FROM generate_series(1, 2500) g, LATERAL audit_append('%s', "
	              "'system', NULL, NULL, NULL, 'scan.created', 'scan', g::text, 'create', "
	              "'success', jsonb_build_object('n', g, 'f', g / 7.0))",
	              org),
	   "2500 events appended in one transaction");
	ok(verify(pool, org, &v) && v.r.ok && v.r.events_checked == 2500,
	   "verification pages through %d-row pages: %lld checked", AUDIT_VERIFY_PAGE_ROWS,
	   v.r.events_checked);
	bad = admin_value("SELECT id FROM audit_events WHERE org_id = '%s' AND seq = 2222", org);
	admin_exec("UPDATE audit_events SET resource_id = 'x' WHERE org_id = '%s' AND seq = 2222",
	           org);
	ok(verify(pool, org, &v) && !v.r.ok && bad != NULL &&
	       strcmp(v.r.first_bad_event_id, bad) == 0 && v.r.events_checked == 2222,
	   "edit on the third page named after 2222 events");
	free(bad);
}

/* The latest checkpoint of org and kind as a struct; strings in buf (freed by the caller). */
static PGresult *load_checkpoint(const char *org, const char *kind, struct audit_checkpoint *cp)
{
	const char *p[2] = { org, kind };
	PGresult *res =
	    PQexecParams(admin,
	                 "SELECT org_id, seq, hash, audit_rfc3339(signed_at), signature, key_id "
	                 "FROM audit_checkpoints WHERE org_id = $1 AND kind = $2 "
	                 "ORDER BY seq DESC LIMIT 1",
	                 2, NULL, p, NULL, NULL, 0);

	if (PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != 1) {
		PQclear(res);
		return NULL;
	}
	*cp = (struct audit_checkpoint){
		.org_id = PQgetvalue(res, 0, 0),
		.seq = strtoll(PQgetvalue(res, 0, 1), NULL, 10),
		.hash = PQgetvalue(res, 0, 2),
		.signed_at = PQgetvalue(res, 0, 3),
		.signature = PQgetvalue(res, 0, 4),
		.key_id = PQgetvalue(res, 0, 5),
	};
	return res;
}

/* Verify cp with nothing but OpenSSL and the exposed PEM, as a customer would. */
static bool customer_verify(const struct audit_checkpoint *cp)
{
	const char *pem = audit_public_key_pem();
	unsigned char sig[80];
	EVP_MD_CTX *ctx = EVP_MD_CTX_new();
	EVP_PKEY *pk = NULL;
	char msg[512];
	BIO *bio;
	int n, rc = 0;

	bio = BIO_new_mem_buf(pem, -1);
	pk = PEM_read_bio_PUBKEY(bio, NULL, NULL, NULL);
	BIO_free(bio);
	n = EVP_DecodeBlock(sig, (const unsigned char *)cp->signature, (int)strlen(cp->signature));
	snprintf(msg, sizeof(msg), "%s|%lld|%s|%s", cp->org_id, cp->seq, cp->hash, cp->signed_at);
	if (pk != NULL && n == 66 && EVP_DigestVerifyInit(ctx, NULL, NULL, NULL, pk) == 1)
		rc = EVP_DigestVerify(ctx, sig, 64, (const unsigned char *)msg, strlen(msg));
	EVP_PKEY_free(pk);
	EVP_MD_CTX_free(ctx);
	return rc == 1;
}

static void test_checkpoints(void)
{
	char org[37], org2[37], ids[5][37], *nheads, hash2[65], at2[64], sig2[100];
	struct audit_checkpoint cp, bad;
	struct sres s;
	struct vres v;
	PGresult *res;
	int want;

	/* Heads of many orgs: signing pages through them in batches. */
	ok(admin_exec("INSERT INTO audit_chain_heads SELECT gen_random_uuid(), 1, repeat('a', 64) "
	              "FROM generate_series(1, 1500)"),
	   "1500 more chain heads");
	new_org(org);
	ok(write_n(pool, org, 5, ids), "five events in a fresh org");
	nheads = admin_value("SELECT count(*) FROM audit_chain_heads WHERE seq > 0");
	want = nheads != NULL ? atoi(nheads) : -1;
	free(nheads);
	ok(sign_heads(pool, &s), "checkpoint signing run");
	is_int(s.nsigned, want, "every head signed (%d)", want);
	ok(sign_heads(pool2, &s) && s.nsigned == 0, "second run: nothing new to sign");
	ok(admin_is("t", "SELECT count(*) = count(DISTINCT org_id) FROM audit_checkpoints WHERE "
	                 "kind = 'head'"),
	   "one checkpoint per head");

	res = load_checkpoint(org, "head", &cp);
	ok(res != NULL && cp.seq == 5, "checkpoint of the fresh org at seq 5");
	if (res == NULL)
		return;
	ok(strcmp(cp.key_id, audit_key_id()) == 0, "stored with the key id");
	ok(strlen(cp.signed_at) == 27 && cp.signed_at[26] == 'Z',
	   "signed_at in RFC 3339 with us: %s", cp.signed_at);
	is_int(audit_checkpoint_verify(&cp), 0, "checkpoint signature verifies");
	ok(customer_verify(&cp), "and verifies with only the public PEM and OpenSSL");

	bad = cp;
	bad.seq = cp.seq + 1;
	is_int(audit_checkpoint_verify(&bad), -1, "tampered seq fails");
	ok(!customer_verify(&bad), "tampered seq fails for the customer too");
	snprintf(hash2, sizeof(hash2), "%s", cp.hash);
	hash2[0] = hash2[0] == 'a' ? 'b' : 'a';
	bad = cp;
	bad.hash = hash2;
	is_int(audit_checkpoint_verify(&bad), -1, "tampered hash fails");
	snprintf(at2, sizeof(at2), "%s", cp.signed_at);
	at2[3] = at2[3] == '0' ? '1' : '0';
	bad = cp;
	bad.signed_at = at2;
	is_int(audit_checkpoint_verify(&bad), -1, "tampered signed_at fails");
	snprintf(sig2, sizeof(sig2), "%s", cp.signature);
	sig2[10] = sig2[10] == 'A' ? 'B' : 'A';
	bad = cp;
	bad.signature = sig2;
	is_int(audit_checkpoint_verify(&bad), -1, "tampered signature fails");
	bad = cp;
	bad.org_id = AUDIT_NIL_ORG;
	is_int(audit_checkpoint_verify(&bad), -1, "another org's id fails");
	bad = cp;
	bad.key_id = "ed25519:0000000000000000";
	is_int(audit_checkpoint_verify(&bad), -1, "unknown key id fails");
	bad = cp;
	bad.signature = "bm90IGEgc2lnbmF0dXJl";
	is_int(audit_checkpoint_verify(&bad), -1, "short signature fails");
	PQclear(res);

	ok(write_event(pool, org, "scan.created", NULL, NULL), "one more event");
	ok(sign_heads(pool, &s) && s.nsigned == 1, "next run signs just that head");
	ok(verify(pool, org, &v) && v.r.ok && v.r.events_checked == 6, "chain with checkpoints ok");

	/* A forged checkpoint (no key) is caught. */
	ok(admin_exec("UPDATE audit_checkpoints SET hash = repeat('b', 64) WHERE org_id = '%s' AND "
	              "kind = 'head' AND seq = 6",
	              org),
	   "checkpoint hash forged");
	ok(verify(pool, org, &v) && !v.r.ok &&
	       strcmp(v.r.reason, "checkpoint_signature_invalid") == 0,
	   "forged checkpoint detected (%s)", v.r.reason);
	admin_exec("DELETE FROM audit_checkpoints WHERE org_id = '%s' AND seq = 6", org);

	/* A rewrite that recomputes every later hash and the head fools the chain alone... */
	static const char rewrite[] =
	    "DO $$ DECLARE r audit_events; prev text; BEGIN "
	    "UPDATE audit_events SET details = '{\"forged\": true}' WHERE org_id = '%1$s' AND seq "
	    "= 3; "
	    "SELECT hash INTO prev FROM audit_events WHERE org_id = '%1$s' AND seq = 2; "
	    "FOR r IN SELECT * FROM audit_events WHERE org_id = '%1$s' AND seq >= 3 ORDER BY seq "
	    "LOOP "
	    "  r.prev_hash := prev; "
	    "  r.hash := encode(sha256(convert_to(prev || E'\\n' || audit_canonical(r), 'UTF8')), "
	    "'hex'); "
	    "  UPDATE audit_events SET prev_hash = r.prev_hash, hash = r.hash WHERE id = r.id; "
	    "  prev := r.hash; "
	    "END LOOP; "
	    "UPDATE audit_chain_heads SET hash = prev WHERE org_id = '%1$s'; END $$";
	new_org(org2);
	ok(write_n(pool, org2, 5, ids) && admin_exec_org(rewrite, org2),
	   "consistent rewrite, no checkpoint");
	ok(verify(pool, org2, &v) && v.r.ok,
	   "without a checkpoint a full rewrite is internally consistent (why we sign)");
	/* ...but not the signed checkpoint. */
	ok(admin_exec_org(rewrite, org), "consistent rewrite of the checkpointed org");
	ok(verify(pool, org, &v) && !v.r.ok && strcmp(v.r.reason, "checkpoint_mismatch") == 0 &&
	       strcmp(v.r.first_bad_event_id, ids[0]) != 0,
	   "the signed checkpoint exposes it (%s at %s)", v.r.reason, v.r.first_bad_event_id);
}

static void test_retention(void)
{
	char org[37], ids[6][37], *cut;
	struct audit_checkpoint cp;
	struct sres s = { 0 };
	struct vres v;
	PGresult *res;

	new_org(org);
	ok(write_n(pool, org, 6, ids), "six events");
	cut = admin_value("SELECT occurred_at FROM audit_events WHERE org_id = '%s' AND seq = 4",
	                  org);
	ok(cut != NULL && audit_anchor_sign(pool, org, cut, sres_cb, &s) != NULL,
	   "anchor requested");
	ok(wait_int(&s.calls, 1, 3000) && s.status == 0 && s.nsigned == 1,
	   "retention anchor signed");
	free(cut);
	res = load_checkpoint(org, "retention", &cp);
	ok(res != NULL && cp.seq == 3 && audit_checkpoint_verify(&cp) == 0,
	   "anchor at the last event before the cut-off (seq 3), signature ok");
	PQclear(res);
	memset(&s, 0, sizeof(s));
	ok(audit_anchor_sign(pool, org, "1970-01-01T00:00:00Z", sres_cb, &s) != NULL &&
	       wait_int(&s.calls, 1, 3000) && s.status == 0 && s.nsigned == 0,
	   "no event before the cut-off: nothing signed");

	ok(verify(pool, org, &v) && v.r.ok && v.r.events_checked == 3,
	   "verification starts after the anchor (%lld checked)", v.r.events_checked);
	ok(admin_is("2", "SELECT audit_prune('%s', 2)", org), "prune a batch of 2");
	ok(verify(pool, org, &v) && v.r.ok && v.r.events_checked == 3, "chain ok mid-retention");
	ok(admin_is("1", "SELECT audit_prune('%s', 2)", org), "prune the rest (1)");
	ok(admin_is("0", "SELECT audit_prune('%s', 2)", org), "nothing more to prune");
	ok(admin_is("4", "SELECT min(seq) FROM audit_events WHERE org_id = '%s'", org),
	   "events after the anchor kept");
	ok(verify(pool, org, &v) && v.r.ok && v.r.events_checked == 3, "chain ok after retention");

	ok(admin_exec("UPDATE audit_checkpoints SET seq = 4 WHERE org_id = '%s' AND kind = "
	              "'retention'",
	              org),
	   "anchor moved forward (hiding event 4)");
	ok(verify(pool, org, &v) && !v.r.ok && strcmp(v.r.reason, "anchor_signature_invalid") == 0,
	   "forged anchor detected (%s)", v.r.reason);
	admin_exec(
	    "UPDATE audit_checkpoints SET seq = 3 WHERE org_id = '%s' AND kind = 'retention'", org);
	admin_exec("DELETE FROM audit_events WHERE org_id = '%s' AND seq = 4", org);
	ok(verify(pool, org, &v) && !v.r.ok && strcmp(v.r.reason, "seq_gap") == 0 &&
	       strcmp(v.r.first_bad_event_id, ids[4]) == 0,
	   "deleting the first event after the anchor is still detected");
}

static void test_cancel(void)
{
	struct audit_event ev = { .event_type = "scan.created" };
	struct audit_write *w;
	struct audit_verify *vh;
	struct audit_sign *sh;
	struct wres wr = { 0 };
	struct vres v = { 0 };
	struct sres s = { 0 };
	struct qres q = { 0 };
	char org[37];

	new_org(org);
	ev.org_id = org;
	vh = audit_verify_start(pool, AUDIT_NIL_ORG, vres_cb, &v);
	ok(vh != NULL, "verification started");
	audit_verify_cancel(vh);
	w = audit_write_standalone(pool, &ev, wres_cb, &wr);
	ok(w != NULL, "standalone write started");
	audit_write_cancel(w);
	sh = audit_checkpoint_sign(pool, sres_cb, &s);
	ok(sh != NULL, "signing started");
	audit_sign_cancel(sh);
	run_ms(200);
	ok(v.calls == 0 && wr.calls == 0 && s.calls == 0, "cancelled operations never call back");
	/*
	 * One statement: cancelled while it waited for a connection, it is never
	 * sent; once sent, cancelling drops the callback, not the row. Either way
	 * the chain stays whole.
	 */
	bool sent = admin_is("1", "SELECT count(*) FROM audit_events WHERE org_id = '%s'", org);
	ok(sent || admin_is("0", "SELECT count(*) FROM audit_events WHERE org_id = '%s'", org),
	   "a cancelled write left its row whole or not at all");
	ok(db_query(pool, "SELECT 1", 0, NULL, qres_cb, &q) != NULL &&
	       wait_int(&q.calls, 1, 3000) && q.ev == DB_OK,
	   "pool fine afterwards");
	ok(write_event(pool, org, "scan.created", NULL, NULL) &&
	       admin_is(sent ? "2" : "1", "SELECT max(seq) FROM audit_events WHERE org_id = '%s'",
	                org),
	   "the org's chain goes on after the cancelled write");
}

static void db_tests(void)
{
	const char *const keys[] = { "dbname", "application_name", NULL };
	const char *vals[] = { url, "cs_test_audit_admin", NULL };
	char opts[128];

	admin = PQconnectdbParams(keys, vals, 1);
	if (PQstatus(admin) != CONNECTION_OK) {
		ok(0, "admin connection: %s", PQerrorMessage(admin));
		PQfinish(admin);
		return;
	}
	admin_exec("SET client_min_messages = warning");
	snprintf(schema, sizeof(schema), "cs_test_audit_%ld_%ld", (long)getpid(), (long)time(NULL));
	ok(admin_exec("CREATE SCHEMA %s", schema), "test schema created");
	snprintf(opts, sizeof(opts), "-c search_path=%s", schema);
	setenv("PGOPTIONS", opts, 1);
	ok(db_migrate(url, SRCDIR "/sql") >= 2, "migrations applied into the schema");
	admin_exec("SET search_path = %s", schema);

	base = event_base_new();
	pool = db_pool_new(base, url, 2, 10000);
	pool2 = db_pool_new(base, url, 2, 10000);
	ok(pool != NULL && pool2 != NULL && wait_for(pool_all_up, pool, 5000) &&
	       wait_for(pool_all_up, pool2, 5000),
	   "two pools (two workers) up");

	test_basic();
	test_refusals();
	test_sanitize();
	test_concurrency();
	test_rollback();
	test_tampering();
	test_paging();
	test_checkpoints();
	test_retention();
	test_cancel();

	db_pool_free(pool2);
	db_pool_free(pool);
	run_ms(10);
	event_base_free(base);
	ok(admin_exec("RESET search_path") && admin_exec("DROP SCHEMA %s CASCADE", schema),
	   "test schema dropped");
	PQfinish(admin);
}

int main(void)
{
	uint64_t t0 = cs_now_ms();

	log_set_role("test_audit", -1);
	log_set_level(getenv("CS_TEST_VERBOSE") != NULL ? LOG_LVL_DEBUG : LOG_LVL_FATAL);
	url = getenv("CS_TEST_PGURL");
	if (url == NULL || *url == '\0')
		return tap_skip_all("CS_TEST_PGURL not set");

	ok(make_keys(), "keys generated in %s", keydir);
	test_keys_and_hmac();
	test_catalogue();
	db_tests();
	audit_shutdown();
	remove_keys();
	printf("# finished in %llu ms\n", (unsigned long long)(cs_now_ms() - t0));
	return tap_done();
}
