/*
 * test_scan.c - the scan module's pure parts: the shipped price table loads
 * and covers the allow-listed regions, monthly costs follow the 730-hour
 * month and the EBS rules (gp3 baseline, io2 tiers), broken tables are
 * refused, and the check catalogue answers. With CS_TEST_PGURL, the job
 * queue's SQL in a schema of its own: claims within the global and per-org
 * caps, lease checks on heartbeat and finish, reclaim of lapsed leases,
 * units abandoned too often, the status roll-up and version bumps.
 */
#include "config.h"

#include <libpq-fe.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cloudsweep/db.h"
#include "cloudsweep/log.h"
#include "cloudsweep/scan.h"
#include "../../src/scan/scan_int.h"
#include "tap.h"

#define NEAR(a, b) (fabs((a) - (b)) < 1e-6)

static const char *const regions[] = { "us-east-1",      "us-east-2",     "us-west-1",
	                               "us-west-2",      "eu-west-1",     "eu-central-1",
	                               "ap-southeast-1", "ap-northeast-1" };

static struct pricing *load_text(const char *text, char *err, size_t errlen)
{
	char path[] = "/tmp/test_scan_pricesXXXXXX";
	int fd = mkstemp(path);
	FILE *f = fdopen(fd, "w");
	struct pricing *p;

	fputs(text, f);
	fclose(f);
	p = pricing_load(path, err, errlen);
	remove(path);
	return p;
}

static PGconn *db;

/* The first value of a query's first row (static buffer), or NULL on error. */
static const char *q1(const char *sql, int n, const char *const *params)
{
	static char buf[4096];
	PGresult *res = PQexecParams(db, sql, n, NULL, params, NULL, NULL, 0);
	const char *out = NULL;

	if (PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) > 0) {
		snprintf(buf, sizeof(buf), "%s", PQgetvalue(res, 0, 0));
		out = buf;
	} else if (PQresultStatus(res) == PGRES_COMMAND_OK) {
		out = "";
	} else {
		printf("# %s", PQerrorMessage(db));
	}
	PQclear(res);
	return out;
}

static bool is(const char *want, const char *sql)
{
	const char *got = q1(sql, 0, NULL);

	if (got == NULL || strcmp(got, want) != 0)
		printf("# got %s want %s from %s\n", got != NULL ? got : "(error)", want, sql);
	return got != NULL && strcmp(got, want) == 0;
}

/* Claim for owner; the number of units claimed (all columns must come back). */
static int claim(const char *owner, const char *want, const char *gcap, const char *ocap)
{
	const char *p[6] = { owner, "30", want, gcap, ocap, "3" };
	PGresult *res = PQexecParams(db, SCAN_CLAIM_SQL, 6, NULL, p, NULL, NULL, 0);
	int n = PQresultStatus(res) == PGRES_TUPLES_OK ? PQntuples(res) : -1;

	if (n < 0)
		printf("# claim: %s", PQerrorMessage(db));
	else if (n > 0 && PQnfields(res) != 8)
		n = -2;
	PQclear(res);
	return n;
}

static const char *finish(const char *unit, const char *owner, const char *status,
                          const char *errors, const char *items)
{
	const char *p[7] = { unit, owner, status, "5", "0", errors, items };

	return q1(SCAN_FINISH_SQL, 7, p);
}

static void db_tests(const char *url)
{
	char schema[64], opts[128], unit[64];
	const char *got;
	const char *org = "11111111-1111-1111-1111-111111111111";
	const char *org2 = "22222222-2222-2222-2222-222222222222";

	db = PQconnectdb(url);
	if (PQstatus(db) != CONNECTION_OK) {
		ok(0, "connection: %s", PQerrorMessage(db));
		return;
	}
	q1("SET client_min_messages = warning", 0, NULL);
	snprintf(schema, sizeof(schema), "cs_test_scan_%ld_%ld", (long)getpid(), (long)time(NULL));
	snprintf(opts, sizeof(opts), "CREATE SCHEMA %s", schema);
	ok(q1(opts, 0, NULL) != NULL, "schema %s created", schema);
	snprintf(opts, sizeof(opts), "-c search_path=%s", schema);
	setenv("PGOPTIONS", opts, 1);
	ok(db_migrate(url, SRCDIR "/sql") >= 3, "migrations applied into the schema");
	snprintf(opts, sizeof(opts), "SET search_path = %s", schema);
	q1(opts, 0, NULL);
	/* Two orgs, a scan of 3 units for the first and 2 for the second. */
	ok(is("", "INSERT INTO orgs (id, name) VALUES ('11111111-1111-1111-1111-111111111111', "
	          "'a'), ('22222222-2222-2222-2222-222222222222', 'b')") &&
	       is("",
	          "INSERT INTO scans (id, org_id, account_ids, units_total) VALUES "
	          "('aaaaaaaa-0000-0000-0000-000000000001', '11111111-1111-1111-1111-111111111111',"
	          " '{}', 3), ('aaaaaaaa-0000-0000-0000-000000000002', "
	          "'22222222-2222-2222-2222-222222222222', '{}', 2)") &&
	       is("", "ALTER TABLE scan_units DROP CONSTRAINT IF EXISTS scan_units_account_fk") &&
	       is("",
	          "INSERT INTO scan_units (scan_id, org_id, aws_account_id, region) SELECT "
	          "'aaaaaaaa-0000-0000-0000-000000000001', '11111111-1111-1111-1111-111111111111', "
	          "gen_random_uuid(), r FROM unnest('{us-east-1,us-east-2,us-west-2}'::text[]) "
	          "r") &&
	       is("",
	          "INSERT INTO scan_units (scan_id, org_id, aws_account_id, region) SELECT "
	          "'aaaaaaaa-0000-0000-0000-000000000002', '22222222-2222-2222-2222-222222222222', "
	          "gen_random_uuid(), r FROM unnest('{us-east-1,eu-west-1}'::text[]) r"),
	   "two scans with five units");
	(void)org;
	(void)org2;
	is_int(claim("w1/a", "10", "100", "1"), 2, "the per-org cap lets one unit of each org run");
	is_int(claim("w2/a", "10", "100", "1"), 0, "a second claimer gets nothing while both run");
	is_int(claim("w2/b", "10", "3", "10"), 1, "the global cap bounds what is left");
	ok(is("running",
	      "SELECT status FROM scans WHERE id = 'aaaaaaaa-0000-0000-0000-000000000001'"),
	   "a running unit makes the scan running");
	snprintf(unit, sizeof(unit), "%s",
	         q1("SELECT id FROM scan_units WHERE lease_owner = 'w1/a' AND org_id = "
	            "'11111111-1111-1111-1111-111111111111'",
	            0, NULL));
	{
		const char *p[4] = { unit, "w9/x", "30", "1" };

		got = q1(SCAN_HEARTBEAT_SQL, 4, p);

		is_str(got, "0", "a heartbeat under another lease is refused");
		p[1] = "w1/a";
		got = q1(SCAN_HEARTBEAT_SQL, 4, p);
		is_str(got, "1", "the holder's heartbeat renews the lease");
	}
	got = finish(unit, "w9/x", "succeeded", "[]", "[]");
	is_str(got, "0", "a finish under another lease is refused");
	got = finish(unit, "w1/a", "partial",
	             "[{\"check\": \"ec2_idle\", \"code\": \"throttled\", \"message\": \"m\"}]",
	             "[{\"type\": \"ebs_unattached\", \"resource_id\": \"vol-1\", \"details\": "
	             "{\"size_gb\": 100}, \"cost\": 8.004}, {\"type\": \"eip_unassociated\", "
	             "\"resource_id\": \"eip-1\", \"cost\": 3.65}]");
	is_str(got, "1", "the holder finishes the unit");
	got = finish(unit, "w1/a", "succeeded", "[]", "[]");
	is_str(got, "0", "a unit finishes only once");
	ok(is("2", "SELECT count(*) FROM waste_items WHERE unit_id = (SELECT id FROM scan_units "
	           "WHERE status = 'partial')") &&
	       is("11.65", "SELECT estimated_monthly_savings_usd FROM scans WHERE id = "
	                   "'aaaaaaaa-0000-0000-0000-000000000001'") &&
	       is("{\"open\": 2}", "SELECT item_counts FROM scans WHERE id = "
	                           "'aaaaaaaa-0000-0000-0000-000000000001'") &&
	       is("ec2_idle", "SELECT errors->0->>'check' FROM scans WHERE id = "
	                      "'aaaaaaaa-0000-0000-0000-000000000001'"),
	   "items, savings, item counts and errors roll up to the scan");
	/* A worker dies: its lease lapses, another takes the unit over. */
	ok(is("", "UPDATE scan_units SET lease_expires_at = now() - interval '1 second' WHERE "
	          "lease_owner = 'w1/a'"),
	   "the other org's lease lapses");
	is_int(claim("w3/a", "10", "100", "2"), 3,
	       "the lapsed unit is taken over with the queued ones, within the caps");
	ok(is("2", "SELECT attempts FROM scan_units WHERE lease_owner = 'w3/a' AND org_id = "
	           "'22222222-2222-2222-2222-222222222222' AND attempts > 1"),
	   "the takeover counts an attempt");
	ok(is("", "UPDATE scan_units SET lease_expires_at = now() - interval '1 second', "
	          "attempts = 3 WHERE lease_owner = 'w3/a' AND org_id = "
	          "'22222222-2222-2222-2222-222222222222' AND attempts = 2"),
	   "abandoned a third time");
	is_int(claim("w4/a", "10", "100", "5"), 0, "a unit abandoned too often is not claimed");
	ok(is("failed", "SELECT status FROM scan_units WHERE org_id = "
	                "'22222222-2222-2222-2222-222222222222' AND attempts = 3") &&
	       is("abandoned", "SELECT errors->0->>'code' FROM scans WHERE id = "
	                       "'aaaaaaaa-0000-0000-0000-000000000002'"),
	   "it fails, and the scan names it");
	/* Finish the rest: scan 1 partial (one unit partial), scan 2 partial (one failed). */
	{
		PGresult *res = PQexec(db, "SELECT id, lease_owner FROM scan_units WHERE status = "
		                           "'running'");
		int i;

		for (i = 0; i < PQntuples(res); i++)
			finish(PQgetvalue(res, i, 0), PQgetvalue(res, i, 1), "succeeded", "[]",
			       "[]");
		PQclear(res);
	}
	ok(is("partial", "SELECT status FROM scans WHERE id = "
	                 "'aaaaaaaa-0000-0000-0000-000000000001'") &&
	       is("partial", "SELECT status FROM scans WHERE id = "
	                     "'aaaaaaaa-0000-0000-0000-000000000002'") &&
	       is("2", "SELECT count(*) FROM scans WHERE finished_at IS NOT NULL AND "
	               "units_done = units_total"),
	   "both scans end partial, finished");
	{
		const char *v = q1("SELECT version FROM scans WHERE id = "
		                   "'aaaaaaaa-0000-0000-0000-000000000001'",
		                   0, NULL);
		long long before = v != NULL ? atoll(v) : -1;

		q1("UPDATE scans SET status = status WHERE id = "
		   "'aaaaaaaa-0000-0000-0000-000000000001'",
		   0, NULL);
		v = q1(
		    "SELECT version FROM scans WHERE id = 'aaaaaaaa-0000-0000-0000-000000000001'",
		    0, NULL);
		ok(v != NULL && atoll(v) == before,
		   "an update that changes nothing keeps the version");
		q1("UPDATE waste_items SET status = 'approved' WHERE resource_id = 'vol-1'", 0,
		   NULL);
		v = q1(
		    "SELECT version FROM scans WHERE id = 'aaaaaaaa-0000-0000-0000-000000000001'",
		    0, NULL);
		ok(v != NULL && atoll(v) == before + 1,
		   "approving an item is a new version of the scan");
	}
	snprintf(opts, sizeof(opts), "DROP SCHEMA %s CASCADE", schema);
	ok(q1("RESET search_path", 0, NULL) != NULL && q1(opts, 0, NULL) != NULL,
	   "test schema dropped");
	PQfinish(db);
}

int main(void)
{
	char err[256];
	struct pricing *p = pricing_load(SRCDIR "/data/prices.json", err, sizeof(err));
	double usd = -1;
	size_t i;

	ok(p != NULL, "the shipped price table loads (%s)", p == NULL ? err : "ok");
	if (p == NULL)
		return tap_done();
	ok(pricing_source(p) != NULL && pricing_as_of(p) != NULL, "it names its source and date");
	for (i = 0; i < CS_ARRAY_LEN(regions); i++)
		ok(pricing_has_region(p, regions[i]), "region %s is priced", regions[i]);
	ok(!pricing_has_region(p, "xx-nowhere-1"), "an unknown region is not");

	ok(pricing_ebs_monthly(p, "us-east-1", "gp2", 100, 0, 0, &usd) == 0 && NEAR(usd, 10.0),
	   "gp2 100 GiB in us-east-1 is $10.00 (%f)", usd);
	ok(pricing_ebs_monthly(p, "us-east-1", "gp3", 100, 3000, 125, &usd) == 0 && NEAR(usd, 8.0),
	   "gp3 at its baseline costs only its GiB (%f)", usd);
	ok(pricing_ebs_monthly(p, "us-east-1", "gp3", 100, 4000, 225, &usd) == 0 &&
	       NEAR(usd, 8.0 + 1000 * 0.005 + 100 * 0.04),
	   "gp3 IOPS and throughput above the baseline are billed (%f)", usd);
	ok(pricing_ebs_monthly(p, "us-east-1", "io1", 100, 1000, 0, &usd) == 0 &&
	       NEAR(usd, 12.5 + 65.0),
	   "io1 bills GiB and provisioned IOPS (%f)", usd);
	ok(pricing_ebs_monthly(p, "us-east-1", "io2", 0, 40000, 0, &usd) == 0 &&
	       NEAR(usd, 32000 * 0.065 + 8000 * 0.0455),
	   "io2 IOPS are tiered (%f)", usd);
	ok(pricing_ebs_monthly(p, "us-east-1", "sc1", 1000, 0, 0, &usd) == 0 && NEAR(usd, 15.0),
	   "sc1 (%f)", usd);
	ok(pricing_ebs_monthly(p, "us-east-1", "gp9", 1, 0, 0, &usd) == -1,
	   "an unknown type fails");
	ok(pricing_ebs_monthly(p, "us-east-1", "gp2", -1, 0, 0, &usd) == -1,
	   "a negative size fails");
	ok(pricing_snapshot_monthly(p, "us-east-1", 200, &usd) == 0 && NEAR(usd, 10.0),
	   "snapshots per GB-month (%f)", usd);
	ok(pricing_hourly_monthly(p, "us-east-1", PRICING_PUBLIC_IPV4, &usd) == 0 &&
	       NEAR(usd, 0.005 * 730),
	   "an idle IPv4 address is 730 hours a month (%f)", usd);
	ok(pricing_hourly_monthly(p, "us-east-1", PRICING_NAT_GATEWAY, &usd) == 0 &&
	       NEAR(usd, 0.045 * 730),
	   "NAT gateway (%f)", usd);
	ok(pricing_hourly_monthly(p, "eu-west-1", PRICING_ALB, &usd) == 0 && usd > 0, "ALB (%f)",
	   usd);
	ok(pricing_hourly_monthly(p, "eu-west-1", PRICING_CLB, &usd) == 0 && usd > 0, "CLB (%f)",
	   usd);
	ok(pricing_ec2_monthly(p, "us-east-1", "m5.large", &usd) == 0 && NEAR(usd, 0.096 * 730),
	   "EC2 m5.large (%f)", usd);
	ok(pricing_ec2_monthly(p, "us-east-1", "z9.huge", &usd) == -1, "an unknown class fails");
	ok(pricing_rds_monthly(p, "us-east-1", "postgres", "db.t3.micro", false, &usd) == 0 &&
	       NEAR(usd, 0.018 * 730),
	   "RDS postgres db.t3.micro (%f)", usd);
	ok(pricing_rds_monthly(p, "us-east-1", "postgres", "db.t3.micro", true, &usd) == 0 &&
	       NEAR(usd, 2 * 0.018 * 730),
	   "multi-AZ doubles it (%f)", usd);
	ok(pricing_rds_monthly(p, "us-east-1", "mariadb", "db.t3.micro", false, &usd) == 0 &&
	       NEAR(usd, 0.017 * 730),
	   "mariadb is priced as mysql (%f)", usd);
	ok(pricing_hourly_monthly(p, "xx-nowhere-1", PRICING_NLB, &usd) == -1,
	   "an unknown region fails");
	pricing_free(p);

	ok(pricing_load("/nonexistent/prices.json", err, sizeof(err)) == NULL,
	   "a missing file fails");
	ok(load_text("{\"source\":\"x\",\"as_of\":\"y\",\"regions\":{\"r\":{}}}", err,
	             sizeof(err)) == NULL,
	   "a region without prices is refused (%s)", err);
	ok(load_text("{not json", err, sizeof(err)) == NULL, "bad JSON is refused");

	ok(scan_check_known("ebs_unattached") && scan_check_known("ec2_idle"), "known checks");
	ok(!scan_check_known("bitcoin_miner") && !scan_check_known(NULL), "unknown checks");
	ok(scan_detectors_count == 3, "three detector families: EC2, load balancers, RDS");
	log_set_level(LOG_LVL_FATAL);
	if (getenv("CS_TEST_PGURL") != NULL && *getenv("CS_TEST_PGURL") != '\0')
		db_tests(getenv("CS_TEST_PGURL"));
	else
		printf("# CS_TEST_PGURL not set: the job queue's SQL is not tested\n");
	return tap_done();
}
