/*
 * detect_rds.c - RDS instances with no connections over rds_idle_days
 * (the daily maximum of DatabaseConnections is 0 on every day with data)
 * and stopped instances, which AWS starts again after 7 days. An instance
 * without datapoints is "insufficient data", not idle.
 */
#include "config.h"

#include <stdio.h>
#include <string.h>

#include "detect_int.h"
#include "scan_int.h"

static const char *const ck_rds[] = { "rds_idle", "rds_stopped", NULL };
static const char *const ck_idle[] = { "rds_idle", NULL };

const char *const detect_rds_checks[] = { "rds_idle", "rds_stopped", NULL };

static double rds_cost(const struct det *d, const json_t *db)
{
	const char *engine = det_str(db, "Engine"), *multi = det_str(db, "MultiAZ");
	double usd = 0;

	if (engine == NULL)
		return 0;
	if (strncmp(engine, "aurora-", 7) == 0)
		engine += 7;
	if (pricing_rds_monthly(scan_prices(), d->run->region, engine,
	                        det_str(db, "DBInstanceClass"),
	                        multi != NULL && strcmp(multi, "true") == 0, &usd) == -1)
		return 0;
	return usd;
}

static void rds_phase(struct det *d)
{
	int days = (int)det_setting(d, "rds_idle_days", 7);
	json_t *db;
	size_t k;
	char id[32];

	switch (d->phase) {
	case 0:
		det_fetch(d, AWS_RDS, "DescribeDBInstances", "Marker", "*/DBInstances", "dbs",
		          ck_rds, NULL);
		return;
	case 1:
		json_array_foreach (det_list(d, "dbs"), k, db) {
			const char *name = det_str(db, "DBInstanceIdentifier");
			const char *st = det_str(db, "DBInstanceStatus");

			if (name == NULL || st == NULL || det_protected(d, db))
				continue;
			if (strcmp(st, "stopped") == 0) {
				det_item(d, "rds_stopped", name,
				         json_pack("{s:s, s:s?, s:s?}", "why",
				                   "stopped; AWS starts it again after 7 days",
				                   "instance_class", det_str(db, "DBInstanceClass"),
				                   "engine", det_str(db, "Engine")),
				         rds_cost(d, db));
				continue;
			}
			if (strcmp(st, "available") != 0 || det_skipped(d, "rds_idle"))
				continue;
			snprintf(id, sizeof(id), "db%zu", k);
			det_metric(d, "cw_rds", id, "AWS/RDS", "DatabaseConnections",
			           "DBInstanceIdentifier", name, "Maximum", 86400, days, ck_idle);
		}
		return;
	case 2:
		if (det_skipped(d, "rds_idle"))
			return;
		json_array_foreach (det_list(d, "dbs"), k, db) {
			const char *name = det_str(db, "DBInstanceIdentifier");
			const char *st = det_str(db, "DBInstanceStatus");
			json_t *vals, *v;
			double max = 0;
			size_t i;

			if (name == NULL || st == NULL || strcmp(st, "available") != 0 ||
			    det_protected(d, db))
				continue;
			snprintf(id, sizeof(id), "db%zu", k);
			vals = json_object_get(json_object_get(d->data, "cw_rds"), id);
			if (json_array_size(vals) == 0) {
				det_no_data(d, "rds_idle", name);
				continue;
			}
			json_array_foreach (vals, i, v)
				if (json_real_value(v) > max)
					max = json_real_value(v);
			if (max > 0)
				continue;
			det_item(d, "rds_idle", name,
			         json_pack("{s:s, s:I, s:s?, s:[s]}", "why", "no connections",
			                   "days", (json_int_t)days, "instance_class",
			                   det_str(db, "DBInstanceClass"), "metrics",
			                   "DatabaseConnections"),
			         rds_cost(d, db));
		}
		return;
	default:
		return;
	}
}

int detect_rds_start(struct scan_detector_run *run)
{
	return det_start(run, rds_phase);
}
