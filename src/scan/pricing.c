/*
 * pricing.c - the price table every waste item's estimated monthly cost
 * comes from. The table is data (data/prices.json, with its source and
 * date), validated in full when loaded so that a missing price is a start-up
 * error rather than a silent zero on some item later.
 */
#include "config.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cloudsweep/scan.h"

#define PRICING_MAX_BYTES (4 * 1024 * 1024)

struct pricing {
	json_t *doc;           /* owned; the parsed table */
	const json_t *regions; /* borrowed from doc */
};

static const char *const pricing_ebs_types[] = { "gp2", "gp3", "io1",     "io2",
	                                         "st1", "sc1", "standard" };
static const char *const pricing_hourly_keys[] = {
	[PRICING_PUBLIC_IPV4] = "public_ipv4",
	[PRICING_NAT_GATEWAY] = "nat_gateway",
	[PRICING_ALB] = "alb",
	[PRICING_NLB] = "nlb",
	[PRICING_CLB] = "clb",
};

/* A non-negative number at obj[key], or -1. */
static double pricing_num(const json_t *obj, const char *key)
{
	const json_t *v = json_object_get(obj, key);

	if (!json_is_number(v) || json_number_value(v) < 0 || !isfinite(json_number_value(v)))
		return -1;
	return json_number_value(v);
}

static int pricing_check_region(const char *name, const json_t *r, char *err, size_t errlen)
{
	const json_t *ebs = json_object_get(r, "ebs"), *hourly = json_object_get(r, "hourly");
	size_t i;

	for (i = 0; i < CS_ARRAY_LEN(pricing_ebs_types); i++) {
		const json_t *t = json_object_get(ebs, pricing_ebs_types[i]);

		if (pricing_num(t, "gb_month") < 0) {
			snprintf(err, errlen, "%s: ebs.%s.gb_month is missing", name,
			         pricing_ebs_types[i]);
			return -1;
		}
	}
	if (pricing_num(json_object_get(ebs, "gp3"), "iops_month") < 0 ||
	    pricing_num(json_object_get(ebs, "gp3"), "throughput_mbps_month") < 0 ||
	    pricing_num(json_object_get(ebs, "io1"), "iops_month") < 0 ||
	    !json_is_array(json_object_get(json_object_get(ebs, "io2"), "iops_tiers"))) {
		snprintf(err, errlen, "%s: provisioned IOPS/throughput prices are missing", name);
		return -1;
	}
	if (pricing_num(r, "snapshot_gb_month") < 0) {
		snprintf(err, errlen, "%s: snapshot_gb_month is missing", name);
		return -1;
	}
	for (i = 0; i < CS_ARRAY_LEN(pricing_hourly_keys); i++) {
		if (pricing_num(hourly, pricing_hourly_keys[i]) < 0) {
			snprintf(err, errlen, "%s: hourly.%s is missing", name,
			         pricing_hourly_keys[i]);
			return -1;
		}
	}
	if (!json_is_object(json_object_get(r, "ec2")) ||
	    !json_is_object(json_object_get(r, "rds"))) {
		snprintf(err, errlen, "%s: ec2 or rds prices are missing", name);
		return -1;
	}
	return 0;
}

struct pricing *pricing_load(const char *path, char *err, size_t errlen)
{
	struct pricing *p;
	json_error_t je;
	json_t *doc;
	const json_t *regions, *r;
	const char *name;
	FILE *f = fopen(path, "r");

	if (f == NULL) {
		snprintf(err, errlen, "cannot open %s", path);
		return NULL;
	}
	doc = json_loadf(f, JSON_REJECT_DUPLICATES, &je);
	fclose(f);
	if (doc == NULL) {
		snprintf(err, errlen, "%s:%d: %s", path, je.line, je.text);
		return NULL;
	}
	regions = json_object_get(doc, "regions");
	if (!json_is_string(json_object_get(doc, "source")) ||
	    !json_is_string(json_object_get(doc, "as_of")) || !json_is_object(regions) ||
	    json_object_size(regions) == 0) {
		snprintf(err, errlen, "%s: source, as_of and regions are required", path);
		goto fail;
	}
	json_object_foreach ((json_t *)regions, name, r) {
		if (pricing_check_region(name, r, err, errlen) == -1)
			goto fail;
	}
	p = xcalloc(1, sizeof(*p));
	p->doc = doc;
	p->regions = regions;
	return p;
fail:
	json_decref(doc);
	return NULL;
}

void pricing_free(struct pricing *p)
{
	if (p == NULL)
		return;
	json_decref(p->doc);
	free(p);
}

const char *pricing_source(const struct pricing *p)
{
	return json_string_value(json_object_get(p->doc, "source"));
}

const char *pricing_as_of(const struct pricing *p)
{
	return json_string_value(json_object_get(p->doc, "as_of"));
}

bool pricing_has_region(const struct pricing *p, const char *region)
{
	return p != NULL && region != NULL && json_object_get(p->regions, region) != NULL;
}

static const json_t *pricing_region(const struct pricing *p, const char *region)
{
	if (p == NULL || region == NULL)
		return NULL;
	return json_object_get(p->regions, region);
}

/* Price of n units over tiers [[upto|null, rate], ...] applied marginally. */
static double pricing_tiered(const json_t *tiers, double n)
{
	double total = 0, below = 0;
	size_t i;
	const json_t *t;

	json_array_foreach (tiers, i, t) {
		const json_t *upto = json_array_get(t, 0);
		double rate = json_number_value(json_array_get(t, 1));
		double top = json_is_number(upto) ? json_number_value(upto) : INFINITY;

		if (n <= below)
			break;
		total += (fmin(n, top) - below) * rate;
		below = top;
	}
	return total;
}

int pricing_ebs_monthly(const struct pricing *p, const char *region, const char *type, double gb,
                        double iops, double throughput_mbps, double *usd)
{
	const json_t *r = pricing_region(p, region), *t;
	double cost;

	t = json_object_get(json_object_get(r, "ebs"), type != NULL ? type : "");
	if (t == NULL || !(gb >= 0) || !(iops >= 0) || !(throughput_mbps >= 0))
		return -1;
	cost = gb * pricing_num(t, "gb_month");
	if (strcmp(type, "gp3") == 0) {
		double inc_iops = pricing_num(t, "iops_included");
		double inc_tp = pricing_num(t, "throughput_included_mbps");

		if (iops > inc_iops)
			cost += (iops - inc_iops) * pricing_num(t, "iops_month");
		if (throughput_mbps > inc_tp)
			cost +=
			    (throughput_mbps - inc_tp) * pricing_num(t, "throughput_mbps_month");
	} else if (strcmp(type, "io1") == 0) {
		cost += iops * pricing_num(t, "iops_month");
	} else if (strcmp(type, "io2") == 0) {
		cost += pricing_tiered(json_object_get(t, "iops_tiers"), iops);
	}
	*usd = cost;
	return 0;
}

int pricing_snapshot_monthly(const struct pricing *p, const char *region, double gb, double *usd)
{
	double rate = pricing_num(pricing_region(p, region), "snapshot_gb_month");

	if (rate < 0 || !(gb >= 0))
		return -1;
	*usd = gb * rate;
	return 0;
}

int pricing_hourly_monthly(const struct pricing *p, const char *region, enum pricing_hourly what,
                           double *usd)
{
	double rate;

	if ((size_t)what >= CS_ARRAY_LEN(pricing_hourly_keys))
		return -1;
	rate = pricing_num(json_object_get(pricing_region(p, region), "hourly"),
	                   pricing_hourly_keys[what]);
	if (rate < 0)
		return -1;
	*usd = rate * PRICING_HOURS_PER_MONTH;
	return 0;
}

int pricing_ec2_monthly(const struct pricing *p, const char *region, const char *instance_type,
                        double *usd)
{
	double rate;

	if (instance_type == NULL)
		return -1;
	rate = pricing_num(json_object_get(pricing_region(p, region), "ec2"), instance_type);
	if (rate < 0)
		return -1;
	*usd = rate * PRICING_HOURS_PER_MONTH;
	return 0;
}

int pricing_rds_monthly(const struct pricing *p, const char *region, const char *engine,
                        const char *instance_class, bool multi_az, double *usd)
{
	const json_t *rds = json_object_get(pricing_region(p, region), "rds");
	double rate;

	if (engine == NULL || instance_class == NULL)
		return -1;
	if (strcmp(engine, "mariadb") == 0)
		engine = "mysql";
	rate = pricing_num(json_object_get(rds, engine), instance_class);
	if (rate < 0)
		return -1;
	*usd = rate * PRICING_HOURS_PER_MONTH * (multi_az ? 2 : 1);
	return 0;
}
