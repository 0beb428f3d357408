/*
 * test_alerts.c - TAP tests for the alerts module. Rule parsing and
 * validation, the webhook URL policy and the webhook signature need nothing
 * but jansson and OpenSSL and always run. The SQL evaluator
 * (alert_evaluate in sql/005_alerts.sql) runs against a real PostgreSQL
 * named by CS_TEST_PGURL (skipped when unset), in a schema of its own into
 * which the project's migrations are applied and which is dropped at the
 * end; events are appended with the SQL audit_append, as the daemon does.
 */
#include "config.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>
#include <libpq-fe.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "cloudsweep/alerts.h"
#include "cloudsweep/db.h"
#include "cloudsweep/log.h"
#include "tap.h"

/* Whether text parses; on failure err is checked to contain want (when given). */
static bool parses(const char *text, const char *want_err)
{
	char err[256] = "";
	json_t *r = alerts_rules_parse(text, err, sizeof(err));
	bool good = r != NULL;

	json_decref(r);
	if (!good && want_err != NULL && strstr(err, want_err) == NULL)
		printf("# unexpected error: %s\n", err);
	return good && (want_err == NULL || *want_err == '\0');
}

static bool refused_with(const char *text, const char *want)
{
	char err[256] = "";
	json_t *r = alerts_rules_parse(text, err, sizeof(err));

	if (r != NULL) {
		json_decref(r);
		return false;
	}
	if (strstr(err, want) == NULL) {
		printf("# error was: %s\n", err);
		return false;
	}
	return true;
}

static void test_rules(void)
{
	json_t *d = alerts_rules_default(), *r;
	char err[256];
	static const struct {
		const char *json, *why, *err;
	} bad[] = {
		{ "nope", "not JSON", "not valid JSON" },
		{ "{\"rules\": {}}", "rules not an array", "array" },
		{ "{\"rules\": [], \"x\": 1}", "extra top-level member", "one member" },
		{ "[{\"severity\":\"high\",\"types\":[\"auth.login.failed\"],\"group_by\":"
		  "\"actor\","
		  "\"threshold\":1,\"window_s\":60}]",
		  "missing name", "name" },
		{ "[{\"name\":\"Bad Name\",\"severity\":\"high\",\"types\":[\"auth.login.failed\"],"
		  "\"group_by\":\"actor\",\"threshold\":1,\"window_s\":60}]",
		  "name with spaces", "name" },
		{ "[{\"name\":\"a\",\"severity\":\"urgent\",\"types\":[\"auth.login.failed\"],"
		  "\"group_by\":\"actor\",\"threshold\":1,\"window_s\":60}]",
		  "unknown severity", "severity" },
		{ "[{\"name\":\"a\",\"severity\":\"low\",\"types\":[\"no.such.event\"],"
		  "\"group_by\":\"actor\",\"threshold\":1,\"window_s\":60}]",
		  "uncatalogued event type", "catalogued" },
		{ "[{\"name\":\"a\",\"severity\":\"low\",\"types\":[],"
		  "\"group_by\":\"actor\",\"threshold\":1,\"window_s\":60}]",
		  "no event types", "types" },
		{ "[{\"name\":\"a\",\"severity\":\"low\",\"types\":[\"auth.login.failed\"],"
		  "\"group_by\":\"details.Bad Key\",\"threshold\":1,\"window_s\":60}]",
		  "bad details key", "group_by" },
		{ "[{\"name\":\"a\",\"severity\":\"low\",\"types\":[\"auth.login.failed\"],"
		  "\"group_by\":\"actor\",\"threshold\":0,\"window_s\":60}]",
		  "threshold 0", "threshold" },
		{ "[{\"name\":\"a\",\"severity\":\"low\",\"types\":[\"auth.login.failed\"],"
		  "\"group_by\":\"actor\",\"window_s\":60}]",
		  "threshold missing", "threshold" },
		{ "[{\"name\":\"a\",\"severity\":\"low\",\"types\":[\"auth.login.failed\"],"
		  "\"group_by\":\"actor\",\"threshold\":1,\"window_s\":0}]",
		  "window 0", "window_s" },
		{ "[{\"name\":\"a\",\"severity\":\"low\",\"types\":[\"auth.login.failed\"],"
		  "\"group_by\":\"actor\",\"threshold\":1,\"window_s\":60,\"colour\":1}]",
		  "unknown field", "unknown field" },
		{ "[{\"name\":\"a\",\"severity\":\"low\",\"kind\":\"sometimes\","
		  "\"types\":[\"auth.login.failed\"],\"group_by\":\"actor\"}]",
		  "unknown kind", "kind" },
		{ "[{\"name\":\"a\",\"severity\":\"low\",\"kind\":\"outside_hours\","
		  "\"types\":[\"credential.read\"],\"group_by\":\"actor\",\"hours\":\"20:00-07:"
		  "00\"}]",
		  "hours backwards", "hours" },
		{ "[{\"name\":\"a\",\"severity\":\"low\",\"kind\":\"outside_hours\","
		  "\"types\":[\"credential.read\"],\"group_by\":\"actor\",\"hours\":\"07:00-20:"
		  "00\","
		  "\"weekdays\":[0]}]",
		  "weekday 0", "weekdays" },
		{ "[{\"name\":\"a\",\"severity\":\"low\",\"kind\":\"outside_hours\","
		  "\"types\":[\"credential.read\"],\"group_by\":\"actor\",\"hours\":\"07:00-20:"
		  "00\","
		  "\"tz_offset\":\"+15:00\"}]",
		  "offset beyond +14:00", "tz_offset" },
		{ "[{\"name\":\"a\",\"severity\":\"low\",\"kind\":\"new_ip\","
		  "\"types\":[\"auth.login.succeeded\"],\"group_by\":\"actor_ip\"}]",
		  "new_ip grouped by address", "new_ip" },
		{ "[{\"name\":\"a\",\"severity\":\"low\",\"types\":[\"auth.login.failed\"],"
		  "\"group_by\":\"actor\",\"threshold\":1,\"window_s\":60,\"days\":3}]",
		  "days on a threshold rule", "days" },
		{ "[{\"name\":\"a\",\"severity\":\"low\",\"types\":[\"auth.login.failed\"],"
		  "\"group_by\":\"actor\",\"threshold\":1,\"window_s\":60},"
		  "{\"name\":\"a\",\"severity\":\"high\",\"types\":[\"auth.login.failed\"],"
		  "\"group_by\":\"actor_ip\",\"threshold\":1,\"window_s\":60}]",
		  "duplicate names", "two rules" },
	};

	ok(d != NULL && json_array_size(d) == 7, "the built-in defaults parse: 7 rules");
	for (size_t i = 0; i < json_array_size(d); i++) {
		json_t *rule = json_array_get(d, i);
		const char *name = json_string_value(json_object_get(rule, "name"));

		if (strcmp(name, "failed_logins_per_ip") == 0)
			ok(json_integer_value(json_object_get(rule, "threshold")) == 10 &&
			       json_integer_value(json_object_get(rule, "window_s")) == 300,
			   "default: 10 failed logins per IP in 5 minutes");
		if (strcmp(name, "credential_use_outside_hours") == 0)
			ok(json_integer_value(json_object_get(rule, "start_min")) == 7 * 60 &&
			       json_integer_value(json_object_get(rule, "end_min")) == 20 * 60 &&
			       json_integer_value(json_object_get(rule, "tz_offset_min")) == 0 &&
			       json_array_size(json_object_get(rule, "weekdays")) == 5,
			   "default: business hours 07:00-20:00 Mon-Fri UTC normalized");
		if (strcmp(name, "login_from_new_ip") == 0)
			ok(json_integer_value(json_object_get(rule, "days")) == 30 &&
			       strcmp(json_string_value(json_object_get(rule, "group_by")),
			              "actor") == 0,
			   "default: new IP looks back 30 days per user");
	}
	json_decref(d);

	ok(parses("{\"rules\": []}", NULL), "an empty rule set is valid");
	r = alerts_rules_parse("[{\"name\":\"x\",\"severity\":\"low\",\"kind\":\"outside_hours\","
	                       "\"types\":[\"credential.read\"],\"group_by\":\"resource_id\","
	                       "\"hours\":\"09:30-17:00\",\"weekdays\":[6,7],"
	                       "\"tz_offset\":\"-05:30\"}]",
	                       err, sizeof(err));
	ok(r != NULL &&
	       json_integer_value(json_object_get(json_array_get(r, 0), "tz_offset_min")) == -330 &&
	       json_integer_value(json_object_get(json_array_get(r, 0), "start_min")) == 570 &&
	       json_integer_value(json_object_get(json_array_get(r, 0), "threshold")) == 1,
	   "outside_hours: offset, start and default threshold normalized");
	json_decref(r);
	for (size_t i = 0; i < CS_ARRAY_LEN(bad); i++)
		ok(refused_with(bad[i].json, bad[i].err), "refused: %s", bad[i].why);
}

static void test_webhook(void)
{
	char err[128], sig[72], want[72];
	unsigned char mac[32];
	unsigned int len = 0;
	const unsigned char key[] = "0123456789abcdef0123456789abcdef";
	const char *body = "{\"rule\":\"x\"}";

	ok(alerts_webhook_url_check("https://hooks.example.com/a", err, sizeof(err)) == 0,
	   "https webhook accepted");
	ok(alerts_webhook_url_check("http://127.0.0.1:9000/h", err, sizeof(err)) == 0 &&
	       alerts_webhook_url_check("http://localhost/h", err, sizeof(err)) == 0 &&
	       alerts_webhook_url_check("http://[::1]:8080/h", err, sizeof(err)) == 0,
	   "http to loopback accepted");
	ok(alerts_webhook_url_check("http://hooks.example.com/a", err, sizeof(err)) == -1 &&
	       alerts_webhook_url_check("http://10.0.0.1/a", err, sizeof(err)) == -1,
	   "plain http elsewhere refused");
	ok(alerts_webhook_url_check("ftp://x/", err, sizeof(err)) == -1 &&
	       alerts_webhook_url_check("https://user@x/", err, sizeof(err)) == -1,
	   "other schemes and user info refused");

	ok(alerts_webhook_sign(key, 32, "1700000000", body, strlen(body), sig) == 0,
	   "signature computed");
	HMAC(EVP_sha256(), key, 32, (const unsigned char *)"1700000000.{\"rule\":\"x\"}", 23, mac,
	     &len);
	memcpy(want, "sha256=", 7);
	cs_hex(want + 7, mac, 32);
	is_str(sig, want, "signature is HMAC-SHA256 over \"<ts>.<body>\"");
	ok(alerts_webhook_sign(key, 32, "1700000001", body, strlen(body), sig) == 0 &&
	       strcmp(sig, want) != 0,
	   "the timestamp is bound into the signature");
}

/* ---- the SQL evaluator ---- */

static PGconn *pg;
static char schema[64];

static PGresult *q(const char *fmt, ...) CS_PRINTF(1, 2);
static PGresult *q(const char *fmt, ...)
{
	char sql[4096];
	va_list ap;
	PGresult *res;

	va_start(ap, fmt);
	vsnprintf(sql, sizeof(sql), fmt, ap);
	va_end(ap);
	res = PQexec(pg, sql);
	if (PQresultStatus(res) != PGRES_TUPLES_OK && PQresultStatus(res) != PGRES_COMMAND_OK)
		printf("# %s: %s", sql, PQerrorMessage(pg));
	return res;
}

static bool exec_ok(const char *sql)
{
	PGresult *res = q("%s", sql);
	bool good =
	    PQresultStatus(res) == PGRES_TUPLES_OK || PQresultStatus(res) == PGRES_COMMAND_OK;

	PQclear(res);
	return good;
}

static long long scalar(const char *sql)
{
	PGresult *res = q("%s", sql);
	long long v = -1;

	if (PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1 &&
	    !PQgetisnull(res, 0, 0))
		v = atoll(PQgetvalue(res, 0, 0));
	PQclear(res);
	return v;
}

/* Append n events of type for org with actor, ip and details. */
static void append(int n, const char *org, const char *actor, const char *ip, const char *type,
                   const char *details)
{
	for (int i = 0; i < n; i++) {
		PGresult *res =
		    q("SELECT audit_append('%s', %s, '%s', NULL, NULL, '%s', NULL, NULL, "
		      "'x', 'success', '%s')",
		      org, actor, ip, type, details);

		PQclear(res);
	}
}

/* Run the evaluator with rules; the number of alerts it raised, or -1. */
static long long evaluate(const char *rules)
{
	char sql[4096];

	snprintf(sql, sizeof(sql), "SELECT count(*) FROM alert_evaluate('%s'::jsonb, 5000)", rules);
	return scalar(sql);
}

static void test_evaluator(void)
{
	const char *org = "11111111-1111-1111-1111-111111111111";
	const char *nil = "00000000-0000-0000-0000-000000000000";
	json_t *d = alerts_rules_default();
	char *rules = json_dumps(d, JSON_COMPACT);
	char sql[512];

	json_decref(d);
	ok(evaluate(rules) == 0, "nothing to evaluate: no alert");

	append(9, nil, "NULL", "10.9.9.9", "auth.login.failed", "{\"email\":\"hmac-sha256:aa\"}");
	ok(evaluate(rules) == 1, "9 failed logins on one account from one IP: the per-account "
	                         "alert, the per-IP one not yet");
	append(1, nil, "NULL", "10.9.9.9", "auth.login.failed", "{\"email\":\"hmac-sha256:bb\"}");
	ok(evaluate(rules) == 1, "the 10th from the IP raises the per-IP alert");
	ok(scalar("SELECT count FROM security_alerts WHERE rule = 'failed_logins_per_ip' AND "
	          "subject = '10.9.9.9'") == 10,
	   "per-IP alert counts 10 events");
	append(3, nil, "NULL", "10.9.9.9", "auth.login.failed", "{\"email\":\"hmac-sha256:cc\"}");
	ok(evaluate(rules) == 0, "the ongoing condition raises no second alert");
	ok(scalar("SELECT count FROM security_alerts WHERE rule = 'failed_logins_per_ip'") == 13 &&
	       scalar("SELECT count(*) FROM security_alerts WHERE rule = 'failed_logins_per_ip'") ==
	           1,
	   "one row per rule and subject, its count grown to 13");
	ok(scalar("SELECT count(*) FROM security_alerts WHERE rule = 'failed_logins_per_account' "
	          "AND subject = 'hmac-sha256:aa'") == 1,
	   "per-account alert keyed by the email HMAC");

	append(1, org, "'u1'", "10.1.1.1", "auth.login.succeeded", "{}");
	ok(evaluate(rules) == 0, "a user's first login is no new-IP alert (no history)");
	append(1, org, "'u1'", "10.1.1.1", "auth.login.succeeded", "{}");
	ok(evaluate(rules) == 0, "a login from a known address: no alert");
	append(1, org, "'u1'", "10.2.2.2", "auth.login.succeeded", "{}");
	ok(evaluate(rules) == 1 &&
	       scalar("SELECT count(*) FROM security_alerts WHERE rule = 'login_from_new_ip' AND "
	              "subject = 'u1' AND details->>'ip' = '10.2.2.2' AND org_id = "
	              "'11111111-1111-1111-1111-111111111111'") == 1,
	   "a login from a new address raises login_from_new_ip in the user's org");

	append(1, org, "'u2'", "10.1.1.1", "auth.refresh.reused", "{\"jti\":\"hmac-sha256:dd\"}");
	ok(evaluate(rules) == 1 && scalar("SELECT count(*) FROM security_alerts WHERE rule = "
	                                  "'refresh_token_reuse' AND severity = 'critical'") == 1,
	   "one refresh reuse raises a critical alert");
	append(3, org, "'u3'", "10.1.1.1", "user.exported", "{}");
	ok(evaluate(rules) == 1, "three exports within the hour raise mass_export");
	append(19, org, "'u4'", "10.1.1.1", "access.permission_denied", "{}");
	ok(evaluate(rules) == 0, "19 permission denials: no alert");
	append(1, org, "'u4'", "10.1.1.1", "access.permission_denied", "{}");
	ok(evaluate(rules) == 1, "the 20th raises permission_denied_burst");

	/* Business hours that exclude every moment: each credential read is outside. */
	snprintf(sql, sizeof(sql),
	         "[{\"name\":\"oh\",\"severity\":\"medium\",\"kind\":\"outside_hours\","
	         "\"types\":[\"credential.read\"],\"group_by\":\"actor\",\"threshold\":1,"
	         "\"window_s\":3600,\"weekdays\":[],\"start_min\":0,\"end_min\":1,"
	         "\"tz_offset_min\":0,\"hours\":\"00:00-00:01\"}]");
	append(1, org, "'u5'", "10.1.1.1", "credential.read", "{}");
	ok(evaluate(sql) == 1, "a credential read outside business hours raises an alert");
	append(1, org, "'u5'", "10.1.1.1", "scan.created", "{}");
	ok(evaluate(rules) == 0, "a rerun looks at the new events only");
	ok(scalar("SELECT count(*) FROM alert_marks") == 2, "a high-water mark per organization");
	ok(scalar("SELECT count(*) FROM alert_claim_delivery(100, 10)") ==
	       scalar("SELECT count(*) FROM security_alerts"),
	   "every alert is due for the webhook once");
	ok(scalar("SELECT count(*) FROM alert_claim_delivery(100, 10)") == 0,
	   "a claimed alert waits out its backoff");
	free(rules);
}

static void db_tests(const char *url)
{
	char opts[128];

	pg = PQconnectdb(url);
	if (PQstatus(pg) != CONNECTION_OK) {
		ok(0, "connection: %s", PQerrorMessage(pg));
		PQfinish(pg);
		return;
	}
	ok(exec_ok("SET client_min_messages = warning"), "connected");
	snprintf(schema, sizeof(schema), "cs_test_alerts_%ld_%ld", (long)getpid(),
	         (long)time(NULL));
	PQclear(q("CREATE SCHEMA %s", schema));
	snprintf(opts, sizeof(opts), "-c search_path=%s", schema);
	setenv("PGOPTIONS", opts, 1);
	ok(db_migrate(url, SRCDIR "/sql") >= 5, "migrations applied into the schema");
	PQclear(q("SET search_path = %s", schema));
	test_evaluator();
	PQclear(q("RESET search_path"));
	snprintf(opts, sizeof(opts), "DROP SCHEMA %s CASCADE", schema);
	ok(exec_ok(opts), "test schema dropped");
	PQfinish(pg);
}

int main(void)
{
	const char *url;

	log_set_role("test_alerts", -1);
	log_set_level(getenv("CS_TEST_VERBOSE") != NULL ? LOG_LVL_DEBUG : LOG_LVL_FATAL);
	test_rules();
	test_webhook();
	url = getenv("CS_TEST_PGURL");
	if (url == NULL || *url == '\0')
		printf("# CS_TEST_PGURL not set: evaluator tests skipped\n");
	else
		db_tests(url);
	return tap_done();
}
