/*
 * test_creds.c - TAP tests for the credential store. The validators and the
 * option checks need nothing; creds_load runs against a real PostgreSQL
 * named by CS_TEST_PGURL (skipped when unset) in a schema of its own, with
 * a key ring generated into a private temporary directory. Rows are
 * written the way the API writes them (sealed with the row's binding) and
 * then tampered with on an admin connection the way an intruder with table
 * access would: a flipped byte, or a blob moved to another row, must not
 * open, and no credential.read event is written for a read that failed.
 */
#include "config.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <event2/event.h>
#include <libpq-fe.h>

#include "cloudsweep/audit.h"
#include "cloudsweep/config.h"
#include "cloudsweep/creds.h"
#include "cloudsweep/db.h"
#include "cloudsweep/util.h"
#include "cloudsweep/vault.h"
#include "tap.h"

static struct event_base *base;
static struct db_pool *pool;
static PGconn *admin;
static char dir[] = "/tmp/cs_test_creds_XXXXXX";

static void validators(void)
{
	ok(creds_account_id_valid("123456789012"), "12 digits is an account id");
	ok(!creds_account_id_valid("12345678901") && !creds_account_id_valid("1234567890123") &&
	       !creds_account_id_valid("12345678901a") && !creds_account_id_valid(""),
	   "other lengths and non-digits are not");
	ok(creds_role_arn_valid("arn:aws:iam::123456789012:role/Audit+=,.@-_x"),
	   "a role ARN with every allowed character");
	ok(!creds_role_arn_valid("arn:aws:iam::123456789012:role/") &&
	       !creds_role_arn_valid("arn:aws:iam::123456789012:role/a/b") &&
	       !creds_role_arn_valid("arn:aws:iam::123456789012:user/a") &&
	       !creds_role_arn_valid("arn:aws:iam::12345678901:role/a") &&
	       !creds_role_arn_valid("arn:aws:iam::123456789012:role/a b") &&
	       !creds_role_arn_valid("arn:aws-cn:iam::123456789012:role/a"),
	   "malformed ARNs are refused");
	ok(creds_name_valid("Production (eu) — ✓") && !creds_name_valid("") &&
	       !creds_name_valid("<b>") && !creds_name_valid("it's") && !creds_name_valid("a\"b") &&
	       !creds_name_valid("a\nb"),
	   "names: UTF-8 fine, <>\"' and control characters refused");
	{
		char name[300];

		memset(name, 'x', 255);
		name[255] = '\0';
		ok(creds_name_valid(name), "255 characters is the longest name");
		strcat(name, "x");
		ok(!creds_name_valid(name), "256 is too long");
	}
}

static void options(void)
{
	struct config *cfg = config_new();
	char err[256];

	ok(creds_config_check(cfg, err, sizeof(err)) == 0, "the defaults pass");
	ok(creds_region_allowed("eu-west-1") && !creds_region_allowed("cn-north-1"),
	   "the default allow-list is the commercial regions");
	ok(config_set(cfg, "vault_provider", "kms", err, sizeof(err)) == 0 &&
	       creds_config_check(cfg, err, sizeof(err)) == -1 && strstr(err, "kms") != NULL,
	   "vault_provider kms without its key id is refused, and says so");
	ok(config_set(cfg, "vault_provider", "file", err, sizeof(err)) == 0 &&
	       config_set(cfg, "aws_regions", "us-east-1, eu-west-1", err, sizeof(err)) == 0 &&
	       creds_config_check(cfg, err, sizeof(err)) == 0 &&
	       creds_region_allowed("eu-west-1") && !creds_region_allowed("us-west-2"),
	   "a custom allow-list replaces the default");
	ok(config_set(cfg, "aws_regions", "us-east-1 mars'; --", err, sizeof(err)) == 0 &&
	       creds_config_check(cfg, err, sizeof(err)) == -1,
	   "a malformed region name is refused");
	config_free(cfg);
}

/* ---- the database part ---- */

static bool admin_exec(const char *fmt, ...) CS_PRINTF(1, 2);
static bool admin_exec(const char *fmt, ...)
{
	va_list ap;
	char *sql;
	PGresult *res;
	bool good;

	va_start(ap, fmt);
	if (vasprintf(&sql, fmt, ap) < 0)
		abort();
	va_end(ap);
	res = PQexec(admin, sql);
	good = PQresultStatus(res) == PGRES_COMMAND_OK || PQresultStatus(res) == PGRES_TUPLES_OK;
	if (!good)
		printf("# admin: %s", PQerrorMessage(admin));
	PQclear(res);
	free(sql);
	return good;
}

static long long admin_count(const char *fmt, ...) CS_PRINTF(1, 2);
static long long admin_count(const char *fmt, ...)
{
	va_list ap;
	char *sql;
	PGresult *res;
	long long n = -1;

	va_start(ap, fmt);
	if (vasprintf(&sql, fmt, ap) < 0)
		abort();
	va_end(ap);
	res = PQexec(admin, sql);
	if (PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1)
		n = atoll(PQgetvalue(res, 0, 0));
	PQclear(res);
	free(sql);
	return n;
}

struct outcome {
	bool done;
	enum creds_status st;
	struct creds *c;
};

static void load_cb(void *arg, enum creds_status st, struct creds *c)
{
	struct outcome *o = arg;

	o->done = true;
	o->st = st;
	o->c = c;
}

static void tick_cb(evutil_socket_t fd, short what, void *arg)
{
}

static void run_until(const bool *flag, int ms)
{
	uint64_t end = cs_now_ms() + (uint64_t)ms;
	struct timeval tv = { 0, 5000 };
	struct event *ev = event_new(base, -1, EV_PERSIST, tick_cb, NULL);

	event_add(ev, &tv);
	while ((flag == NULL || !*flag) && cs_now_ms() < end)
		event_base_loop(base, EVLOOP_ONCE);
	event_free(ev);
}

static struct outcome load(const char *org, const char *id, const char *purpose)
{
	struct outcome o = { 0 };

	if (creds_load(pool, org, id, purpose, load_cb, &o) == NULL) {
		o.done = true;
		o.st = CREDS_UNAVAILABLE;
		return o;
	}
	run_until(&o.done, 10000);
	return o;
}

/* Insert a role account for org with external id ext, sealed the way the API does. */
static bool insert_role(const char *org, const char *id, const char *account, const char *ext)
{
	char *blob = vault_seal(vault_ring(), org, id, CREDS_FIELD_EXTERNAL_ID, ext, strlen(ext));
	bool good;

	if (blob == NULL)
		return false;
	good = admin_exec("INSERT INTO aws_accounts (id, org_id, account_id, account_name, kind, "
	                  "role_arn, external_id_enc, regions) VALUES ('%s', '%s', '%s', 'T', "
	                  "'role', 'arn:aws:iam::%s:role/R', '%s', '{us-east-1,eu-west-1}')",
	                  id, org, account, account, blob);
	free(blob);
	return good;
}

static void db_part(const char *url)
{
	char schema[64], opts[128], org[37], org2[37], a1[37], a2[37], a3[37], scan[37];
	char keypath[300], purpose[64];
	struct config *cfg;
	struct outcome o;
	FILE *fp;

	admin = PQconnectdb(url);
	if (PQstatus(admin) != CONNECTION_OK) {
		ok(0, "admin connection: %s", PQerrorMessage(admin));
		return;
	}
	admin_exec("SET client_min_messages = warning");
	snprintf(schema, sizeof(schema), "cs_test_creds_%ld_%ld", (long)getpid(), (long)time(NULL));
	ok(admin_exec("CREATE SCHEMA %s", schema), "test schema created");
	snprintf(opts, sizeof(opts), "-c search_path=%s", schema);
	setenv("PGOPTIONS", opts, 1);
	ok(db_migrate(url, SRCDIR "/sql") >= 9, "migrations applied into the schema");
	admin_exec("SET search_path = %s", schema);

	/* Keys: a KEK ring in a private directory, an audit HMAC key. */
	ok(mkdtemp(dir) != NULL && vault_keyring_rotate(dir) == 1, "a key ring with version 1");
	snprintf(keypath, sizeof(keypath), "%s/audit_hmac", dir);
	fp = fopen(keypath, "w");
	fputs("MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\n", fp);
	fclose(fp);
	chmod(keypath, 0600);
	ok(audit_init(keypath, NULL) == 0, "audit keys loaded");
	cfg = config_new();
	free(cfg->vault_key_dir);
	cfg->vault_key_dir = xstrdup(dir);
	ok(vault_worker_init(cfg) == 0, "worker ring loaded");

	base = event_base_new();
	pool = db_pool_new(base, url, 2, 10000);
	{
		bool up = false;
		uint64_t end = cs_now_ms() + 5000;

		while (!up && cs_now_ms() < end) {
			run_until(NULL, 20);
			up = db_pool_ready(pool);
		}
		ok(up, "pool up");
	}

	cs_uuid4(org);
	cs_uuid4(org2);
	cs_uuid4(a1);
	cs_uuid4(a2);
	cs_uuid4(a3);
	cs_uuid4(scan);
	ok(admin_exec("INSERT INTO orgs (id, name) VALUES ('%s', 'A'), ('%s', 'B')", org, org2),
	   "two organizations");
	ok(insert_role(org, a1, "111111111111", "first-external-id") &&
	       insert_role(org, a2, "222222222222", "second-external-id") &&
	       insert_role(org, a3, "333333333333", "third-external-id"),
	   "three sealed accounts stored");
	is_int(admin_count("SELECT count(*) FROM aws_accounts a WHERE row_to_json(a)::text LIKE "
	                   "'%%external-id%%'"),
	       0, "no column holds an external id in clear");

	o = load(org, a1, scan);
	ok(o.st == CREDS_OK && o.c != NULL, "creds_load opens the account");
	if (o.c != NULL) {
		is_str(o.c->external_id, "first-external-id", "the external id round-trips");
		is_str(o.c->role_arn, "arn:aws:iam::111111111111:role/R", "with its role ARN");
		ok(o.c->kind == CREDS_ROLE && o.c->nregions == 2 &&
		       strcmp(o.c->regions[1], "eu-west-1") == 0 && o.c->key_version == 1,
		   "kind, regions and key version");
	}
	creds_free(o.c);
	is_int(admin_count("SELECT count(*) FROM audit_events WHERE event_type = 'credential.read' "
	                   "AND resource_id = '%s' AND details->>'purpose' = 'scan' AND "
	                   "details->>'scan_id' = '%s' AND actor = 'system'",
	                   a1, scan),
	       1, "credential.read written with the purpose and scan id");

	o = load(org2, a1, "verify");
	ok(o.st == CREDS_NOT_FOUND && o.c == NULL, "another organization's account is not found");
	snprintf(purpose, sizeof(purpose), "cleanup:%s", scan);
	o = load(org, a2, purpose);
	ok(o.st == CREDS_OK && o.c != NULL && strcmp(o.c->external_id, "second-external-id") == 0,
	   "a cleanup read");
	creds_free(o.c);
	ok(creds_load(pool, org, a2, "because", load_cb, &o) == NULL &&
	       creds_load(pool, org, "not-a-uuid", "verify", load_cb, &o) == NULL,
	   "a bad purpose or id is refused without a callback");

	/* An intruder flips one character of a blob: it must not open. */
	ok(admin_exec("UPDATE aws_accounts SET external_id_enc = overlay(external_id_enc PLACING "
	              "CASE WHEN substr(external_id_enc, 40, 1) = 'A' THEN 'B' ELSE 'A' END "
	              "FROM 40 FOR 1) WHERE id = '%s'",
	              a2),
	   "a byte of account 2 flipped");
	o = load(org, a2, "verify");
	ok(o.st == CREDS_ERROR && o.c == NULL, "the altered blob does not open");
	/* ... or moves a blob to another row. */
	ok(admin_exec("UPDATE aws_accounts SET external_id_enc = (SELECT external_id_enc FROM "
	              "aws_accounts WHERE id = '%s') WHERE id = '%s'",
	              a1, a3),
	   "account 1's blob copied over account 3's");
	o = load(org, a3, "verify");
	ok(o.st == CREDS_ERROR && o.c == NULL, "a blob swapped between rows does not open");
	is_int(admin_count("SELECT count(*) FROM audit_events WHERE event_type = 'credential.read' "
	                   "AND resource_id IN ('%s', '%s') AND details->>'purpose' = 'verify'",
	                   a2, a3),
	       0, "failed reads write no credential.read");

	/* Cancelled before anything came back: no callback, no audit row. */
	{
		struct outcome c = { 0 };
		struct creds_load *l = creds_load(pool, org, a1, "verify", load_cb, &c);

		creds_load_cancel(l);
		run_until(NULL, 300);
		ok(!c.done, "a cancelled load never calls back");
	}

	/* A rotation on disk is picked up when a blob names the new version. */
	ok(vault_keyring_rotate(dir) == 2, "version 2 created on disk");
	{
		struct vault_keyring *fresh = vault_keyring_load_dir(dir);
		char *blob =
		    vault_seal(fresh, org, a2, CREDS_FIELD_EXTERNAL_ID, "rotated-ext-id", 14);

		ok(blob != NULL &&
		       admin_exec("UPDATE aws_accounts SET external_id_enc = '%s' WHERE "
		                  "id = '%s'",
		                  blob, a2),
		   "account 2 re-sealed by another worker under version 2");
		free(blob);
		vault_keyring_free(fresh);
	}
	ok(vault_keyring_current_version(vault_ring()) == 1, "this worker still has version 1");
	o = load(org, a2, "verify");
	ok(o.st == CREDS_OK && o.c != NULL && strcmp(o.c->external_id, "rotated-ext-id") == 0 &&
	       o.c->key_version == 2,
	   "the ring reloads for a blob on a newer version, then opens it");
	creds_free(o.c);
	ok(vault_keyring_current_version(vault_ring()) == 2, "now it seals with version 2");
	is_int(admin_count("SELECT count(*) FROM vault_blob_counts() WHERE version = 1"), 1,
	       "vault_blob_counts sees the rest on version 1");

	db_pool_free(pool);
	run_until(NULL, 10);
	event_base_free(base);
	vault_worker_free();
	audit_shutdown();
	config_free(cfg);
	{
		char cmd[400];

		snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
		ok(system(cmd) == 0, "key directory removed");
	}
	ok(admin_exec("RESET search_path") && admin_exec("DROP SCHEMA %s CASCADE", schema),
	   "test schema dropped");
	PQfinish(admin);
}

int main(void)
{
	const char *url = getenv("CS_TEST_PGURL");

	validators();
	options();
	if (url == NULL || *url == '\0')
		printf("# CS_TEST_PGURL unset: database tests skipped\n");
	else
		db_part(url);
	return tap_done();
}
