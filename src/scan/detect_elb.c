/*
 * detect_elb.c - idle load balancers: ALB/NLB (ELBv2) whose target groups
 * have no registered or no healthy target, Classic load balancers with no
 * instance in service, and any load balancer that served fewer than
 * lb_min_requests_per_day requests (NLB: new flows) a day over the last
 * lb_lookback_days. A balancer without datapoints is "insufficient data",
 * not idle.
 */
#include "config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "detect_int.h"
#include "scan_int.h"

static const char *const ck_lb[] = { "lb_idle", NULL };

const char *const detect_elb_checks[] = { "lb_idle", NULL };

/* The CloudWatch dimension of an ELBv2 ARN: "app/name/id" after "loadbalancer/". */
static const char *elb_dimension(const char *arn)
{
	const char *p = arn != NULL ? strstr(arn, ":loadbalancer/") : NULL;

	return p != NULL ? p + strlen(":loadbalancer/") : NULL;
}

static void elb_queue(struct det *d)
{
	int days = (int)det_setting(d, "lb_lookback_days", 7);
	json_t *x;
	size_t k;
	char key[32], id[32];

	json_array_foreach (det_list(d, "tgs"), k, x) {
		const char *arn = det_str(x, "TargetGroupArn");
		const char *const p[] = { "TargetGroupArn", arn, NULL };

		snprintf(key, sizeof(key), "th%zu", k);
		if (arn != NULL)
			det_fetch(d, AWS_ELBV2, "DescribeTargetHealth", NULL,
			          "*/TargetHealthDescriptions", key, ck_lb, p);
	}
	json_array_foreach (det_list(d, "lbs"), k, x) {
		const char *dim = elb_dimension(det_str(x, "LoadBalancerArn"));
		const char *type = det_str(x, "Type");
		bool nlb = type != NULL && strcmp(type, "network") == 0;

		if (dim == NULL)
			continue;
		snprintf(id, sizeof(id), "lb%zu", k);
		det_metric(d, "cw_lb", id, nlb ? "AWS/NetworkELB" : "AWS/ApplicationELB",
		           nlb ? "NewFlowCount" : "RequestCount", "LoadBalancer", dim, "Sum", 86400,
		           days, ck_lb);
	}
	json_array_foreach (det_list(d, "clbs"), k, x) {
		const char *name = det_str(x, "LoadBalancerName");
		const char *const p[] = { "LoadBalancerName", name, NULL };

		if (name == NULL)
			continue;
		snprintf(key, sizeof(key), "ih%zu", k);
		if (json_array_size(json_object_get(x, "Instances")) > 0 ||
		    json_is_object(json_object_get(x, "Instances")))
			det_fetch(d, AWS_ELB, "DescribeInstanceHealth", NULL, "*/InstanceStates",
			          key, ck_lb, p);
		snprintf(id, sizeof(id), "clb%zu", k);
		det_metric(d, "cw_lb", id, "AWS/ELB", "RequestCount", "LoadBalancerName", name,
		           "Sum", 86400, days, ck_lb);
	}
}

/* Total of metric query id and whether it had datapoints. */
static bool elb_requests(struct det *d, const char *id, double *total)
{
	json_t *v = json_object_get(json_object_get(d->data, "cw_lb"), id), *x;
	size_t i;

	*total = 0;
	json_array_foreach (v, i, x)
		*total += json_real_value(x);
	return json_array_size(v) > 0;
}

static void elb_report(struct det *d, const char *id, const char *why, const char *type,
                       enum pricing_hourly price, const char *metric, double per_day)
{
	double usd = 0;
	json_t *det = json_pack("{s:s, s:s}", "why", why, "lb_type", type);

	if (metric != NULL) {
		json_object_set_new(det, "metrics", json_pack("[s]", metric));
		json_object_set_new(det, "requests_per_day", json_real(per_day));
	}
	if (pricing_hourly_monthly(scan_prices(), d->run->region, price, &usd) == -1)
		usd = 0;
	det_item(d, "lb_idle", id, det, usd);
}

static void elb_low_traffic(struct det *d, const char *rid, const char *mid, const char *type,
                            enum pricing_hourly price, const char *metric)
{
	double total, days = (double)det_setting(d, "lb_lookback_days", 7);
	double min = (double)det_setting(d, "lb_min_requests_per_day", 100);

	if (!elb_requests(d, mid, &total)) {
		det_no_data(d, "lb_idle", rid);
		return;
	}
	if (total / days < min)
		elb_report(d, rid, "fewer requests a day than the threshold", type, price, metric,
		           total / days);
}

/*
 * Registered and healthy targets of each ALB/NLB, in one pass over the target
 * groups (LoadBalancerArns is a string or an array). Returns {arn: index}
 * (owned by the caller); the counts of an arn are at its index, the first
 * load balancer carrying it.
 */
static json_t *elb_targets(struct det *d, size_t *registered, size_t *healthy)
{
	json_t *lbs = det_list(d, "lbs"), *index = json_object(), *lb, *tg, *th;
	size_t n = json_array_size(lbs), k, j, i;
	size_t *last = xcalloc(n + 1, sizeof(*last)); /* 1 + the last tg counted for an index */
	char key[32];

	json_array_foreach (lbs, k, lb) {
		const char *arn = det_str(lb, "LoadBalancerArn");

		if (arn != NULL && json_object_get(index, arn) == NULL)
			json_object_set_new(index, arn, json_integer((json_int_t)k));
	}
	json_array_foreach (det_list(d, "tgs"), j, tg) {
		json_t *arns = json_object_get(tg, "LoadBalancerArns");
		size_t narns = json_is_string(arns) ? 1 : json_array_size(arns);
		size_t reg = 0, ok = 0;

		snprintf(key, sizeof(key), "th%zu", j);
		json_array_foreach (det_list(d, key), i, th) {
			const char *st = det_str(th, "TargetHealth/State");

			reg++;
			if (st != NULL && strcmp(st, "healthy") == 0)
				ok++;
		}
		for (i = 0; i < narns; i++) {
			json_t *v = json_is_string(arns) ? arns : json_array_get(arns, i);
			json_t *ix = json_string_value(v) != NULL
			                 ? json_object_get(index, json_string_value(v))
			                 : NULL;

			if (ix == NULL)
				continue;
			k = (size_t)json_integer_value(ix);
			if (last[k] == j + 1) /* the arn is listed twice */
				continue;
			last[k] = j + 1;
			registered[k] += reg;
			healthy[k] += ok;
		}
	}
	free(last);
	return index;
}

static void elb_judge(struct det *d)
{
	json_t *lb, *th, *index;
	size_t k, i, nlbs = json_array_size(det_list(d, "lbs"));
	size_t *reg = xcalloc(nlbs + 1, sizeof(*reg)), *ok = xcalloc(nlbs + 1, sizeof(*ok));
	char key[32], id[32];

	index = elb_targets(d, reg, ok);
	json_array_foreach (det_list(d, "lbs"), k, lb) {
		const char *arn = det_str(lb, "LoadBalancerArn"), *type = det_str(lb, "Type");
		bool nlb = type != NULL && strcmp(type, "network") == 0;
		enum pricing_hourly price = nlb ? PRICING_NLB : PRICING_ALB;
		size_t registered, healthy, x;

		if (arn == NULL || det_protected(d, lb))
			continue;
		x = (size_t)json_integer_value(json_object_get(index, arn));
		registered = reg[x];
		healthy = ok[x];
		if (registered == 0) {
			elb_report(d, arn, "no registered targets", nlb ? "network" : "application",
			           price, NULL, 0);
			continue;
		}
		if (healthy == 0) {
			elb_report(d, arn, "no healthy targets", nlb ? "network" : "application",
			           price, NULL, 0);
			continue;
		}
		snprintf(id, sizeof(id), "lb%zu", k);
		elb_low_traffic(d, arn, id, nlb ? "network" : "application", price,
		                nlb ? "NewFlowCount" : "RequestCount");
	}
	json_decref(index);
	free(reg);
	free(ok);
	json_array_foreach (det_list(d, "clbs"), k, lb) {
		const char *name = det_str(lb, "LoadBalancerName");
		size_t inservice = 0;

		if (name == NULL || det_protected(d, lb))
			continue;
		snprintf(key, sizeof(key), "ih%zu", k);
		json_array_foreach (det_list(d, key), i, th)
			if (det_str(th, "State") != NULL &&
			    strcmp(det_str(th, "State"), "InService") == 0)
				inservice++;
		if (json_array_size(det_list(d, key)) == 0) {
			elb_report(d, name, "no registered instances", "classic", PRICING_CLB, NULL,
			           0);
			continue;
		}
		if (inservice == 0) {
			elb_report(d, name, "no healthy instances", "classic", PRICING_CLB, NULL,
			           0);
			continue;
		}
		snprintf(id, sizeof(id), "clb%zu", k);
		elb_low_traffic(d, name, id, "classic", PRICING_CLB, "RequestCount");
	}
}

static void elb_phase(struct det *d)
{
	switch (d->phase) {
	case 0:
		det_fetch(d, AWS_ELBV2, "DescribeLoadBalancers", "Marker", "*/LoadBalancers", "lbs",
		          ck_lb, NULL);
		det_fetch(d, AWS_ELBV2, "DescribeTargetGroups", "Marker", "*/TargetGroups", "tgs",
		          ck_lb, NULL);
		det_fetch(d, AWS_ELB, "DescribeLoadBalancers", "Marker",
		          "*/LoadBalancerDescriptions", "clbs", ck_lb, NULL);
		return;
	case 1:
		if (!det_skipped(d, "lb_idle"))
			elb_queue(d);
		return;
	case 2:
		if (!det_skipped(d, "lb_idle"))
			elb_judge(d);
		return;
	default:
		return;
	}
}

int detect_elb_start(struct scan_detector_run *run)
{
	return det_start(run, elb_phase);
}
