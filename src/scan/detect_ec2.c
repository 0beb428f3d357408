/*
 * detect_ec2.c - the EC2 detectors: EBS volumes (unattached, attached to
 * long-stopped instances, gp2 that would be cheaper as gp3), orphaned
 * snapshots, unassociated Elastic IPs, unattached network interfaces, idle
 * NAT gateways and idle instances. Resources carrying the scan's
 * protection tag are never reported. Metrics come from daily CloudWatch
 * datapoints fetched in batches; a resource without datapoints is not
 * idle but "insufficient data", noted in the unit's errors.
 */
#include "config.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "detect_int.h"
#include "scan_int.h"

#define DAY_S 86400
#define MB    (1024.0 * 1024.0)

static const char *const ck_volumes[] = { "ebs_unattached", "ebs_stopped_instance",
	                                  "ebs_gp2_to_gp3", "ebs_snapshot_orphaned", NULL };
static const char *const ck_instances[] = { "ebs_stopped_instance", "ec2_idle", NULL };
static const char *const ck_snapshots[] = { "ebs_snapshot_orphaned", NULL };
static const char *const ck_eip[] = { "eip_unassociated", NULL };
static const char *const ck_eni[] = { "eni_unattached", NULL };
static const char *const ck_nat[] = { "nat_gateway_idle", NULL };
static const char *const ck_ec2_idle[] = { "ec2_idle", NULL };

const char *const detect_ec2_checks[] = { "ebs_unattached",
	                                  "ebs_stopped_instance",
	                                  "ebs_gp2_to_gp3",
	                                  "ebs_snapshot_orphaned",
	                                  "eip_unassociated",
	                                  "eni_unattached",
	                                  "nat_gateway_idle",
	                                  "ec2_idle",
	                                  NULL };

static double ec2_num(const json_t *it, const char *path)
{
	const char *v = det_str(it, path);

	return v != NULL ? strtod(v, NULL) : 0;
}

static bool ec2_any(const struct det *d, const char *const *checks)
{
	for (; *checks != NULL; checks++)
		if (!det_skipped(d, *checks))
			return true;
	return false;
}

/* Monthly cost of a volume as it is. */
static double ec2_volume_cost(const struct det *d, const json_t *v)
{
	double usd = 0;

	if (pricing_ebs_monthly(scan_prices(), d->run->region, det_str(v, "volumeType"),
	                        ec2_num(v, "size"), ec2_num(v, "iops"), ec2_num(v, "throughput"),
	                        &usd) == -1)
		return 0;
	return usd;
}

static json_t *ec2_volume_details(const json_t *v, const char *why)
{
	return json_pack("{s:s, s:s?, s:f, s:s?}", "why", why, "volume_type",
	                 det_str(v, "volumeType"), "size_gib", ec2_num(v, "size"), "created_at",
	                 det_str(v, "createTime"));
}

/* The instances of every reservation, flattened. */
static json_t *ec2_instances(struct det *d)
{
	json_t *out = json_array(), *r, *i;
	size_t k, j;

	json_array_foreach (det_list(d, "reservations"), k, r)
		json_array_foreach (json_object_get(r, "instancesSet"), j, i)
			json_array_append(out, i);
	return out;
}

/* When the instance stopped, from "User initiated (2024-01-01 00:00:00 GMT)"; -1 if unknown. */
static time_t ec2_stopped_at(const json_t *inst)
{
	const char *r = det_str(inst, "reason"), *p;
	struct tm tm = { 0 };

	if (r == NULL || (p = strchr(r, '(')) == NULL ||
	    strptime(p + 1, "%Y-%m-%d %H:%M:%S", &tm) == NULL)
		return -1;
	return timegm(&tm);
}

/* item/path -> item for every item of list that has it (the first one wins), borrowed values. */
static json_t *ec2_index(const json_t *list, const char *path)
{
	json_t *idx = json_object(), *it;
	size_t k;

	json_array_foreach (list, k, it) {
		const char *key = det_str(it, path);

		if (key != NULL && json_object_get(idx, key) == NULL)
			json_object_set_nocheck(idx, key, it);
	}
	return idx;
}

static void ec2_volumes(struct det *d, json_t *instances)
{
	time_t now = time(NULL);
	long long stopped_days = det_setting(d, "ebs_stopped_days", 30);
	json_t *v, *inst;
	json_t *by_id = ec2_index(instances, "instanceId"); /* owned; one lookup per volume */
	size_t k;

	json_array_foreach (det_list(d, "volumes"), k, v) {
		const char *id = det_str(v, "volumeId"), *state = det_str(v, "status");
		double cost = ec2_volume_cost(d, v);

		if (id == NULL || det_protected(d, v))
			continue;
		if (state != NULL && strcmp(state, "available") == 0)
			det_item(d, "ebs_unattached", id,
			         ec2_volume_details(v, "the volume is attached to nothing"), cost);
		if (det_str(v, "volumeType") != NULL &&
		    strcmp(det_str(v, "volumeType"), "gp2") == 0) {
			double gb = ec2_num(v, "size"), gp3 = 0;
			double iops = fmin(16000, fmax(3000, 3 * gb));
			double thr = gb > 170 ? 250 : 125;

			if (pricing_ebs_monthly(scan_prices(), d->run->region, "gp3", gb, iops, thr,
			                        &gp3) == 0 &&
			    cost - gp3 > 0.005) {
				json_t *det =
				    ec2_volume_details(v, "gp3 gives the same baseline for less");

				json_object_set_new(det, "gp2_monthly_usd", json_real(cost));
				json_object_set_new(det, "gp3_monthly_usd", json_real(gp3));
				det_item(d, "ebs_gp2_to_gp3", id, det, cost - gp3);
			}
		}
		if (det_skipped(d, "ebs_stopped_instance") || state == NULL ||
		    strcmp(state, "in-use") != 0)
			continue;
		json_t *att = json_array_get(json_object_get(v, "attachmentSet"), 0);
		const char *iid = det_str(att, "instanceId"), *st;
		time_t at;

		inst = iid != NULL ? json_object_get(by_id, iid) : NULL;
		if (inst == NULL || (st = det_str(inst, "instanceState/name")) == NULL ||
		    strcmp(st, "stopped") != 0 || det_protected(d, inst))
			continue;
		at = ec2_stopped_at(inst);
		if (at != -1 && now - at > stopped_days * DAY_S) {
			json_t *det =
			    ec2_volume_details(v, "attached to an instance stopped for long");

			json_object_set_new(det, "instance_id", json_string(iid));
			json_object_set_new(det, "stopped_days",
			                    json_integer((json_int_t)((now - at) / DAY_S)));
			det_item(d, "ebs_stopped_instance", id, det, cost);
		}
	}
	json_decref(by_id);
}

/* The snapshot ids the account's AMIs use, as the keys of an object. */
static json_t *ec2_snapshots_used(struct det *d)
{
	json_t *used = json_object(), *img, *b;
	size_t k, j;

	json_array_foreach (det_list(d, "images"), k, img)
		json_array_foreach (json_object_get(img, "blockDeviceMapping"), j, b) {
			const char *s = det_str(b, "ebs/snapshotId");

			if (s != NULL)
				json_object_set_new_nocheck(used, s, json_true());
		}
	return used;
}

static bool ec2_by_backup(const json_t *s)
{
	json_t *tags = json_object_get(s, "tagSet"), *t;
	const char *desc = det_str(s, "description");
	size_t k;

	if (desc != NULL && strstr(desc, "AWS Backup") != NULL)
		return true;
	json_array_foreach (tags, k, t)
		if (det_str(t, "key") != NULL && strncmp(det_str(t, "key"), "aws:backup:", 11) == 0)
			return true;
	return false;
}

static void ec2_snapshots(struct det *d)
{
	time_t now = time(NULL);
	long long min_days = det_setting(d, "snapshot_min_age_days", 30);
	json_t *s, *used, *volumes;
	size_t k;

	if (det_skipped(d, "ebs_snapshot_orphaned"))
		return;
	used = ec2_snapshots_used(d);                            /* owned */
	volumes = ec2_index(det_list(d, "volumes"), "volumeId"); /* owned */
	json_array_foreach (det_list(d, "snapshots"), k, s) {
		const char *id = det_str(s, "snapshotId"), *vol = det_str(s, "volumeId");
		time_t started = det_time(det_str(s, "startTime"));
		double usd = 0;

		if (id == NULL || det_protected(d, s) || started == -1 ||
		    now - started <= min_days * DAY_S || json_object_get(used, id) != NULL ||
		    ec2_by_backup(s))
			continue;
		if (vol != NULL && json_object_get(volumes, vol) != NULL)
			continue;
		if (pricing_snapshot_monthly(scan_prices(), d->run->region,
		                             ec2_num(s, "volumeSize"), &usd) == -1)
			usd = 0;
		det_item(d, "ebs_snapshot_orphaned", id,
		         json_pack("{s:s, s:s?, s:f, s:i}", "why",
		                   "the source volume is gone and no AMI or AWS Backup uses it",
		                   "volume_id", vol, "size_gib", ec2_num(s, "volumeSize"),
		                   "age_days", (json_int_t)((now - started) / DAY_S)),
		         usd);
	}
	json_decref(used);
	json_decref(volumes);
}

static void ec2_addresses_enis(struct det *d)
{
	json_t *a;
	size_t k;

	json_array_foreach (det_list(d, "addresses"), k, a) {
		const char *id = det_str(a, "allocationId");
		double usd = 0;

		if (id == NULL)
			id = det_str(a, "publicIp");
		if (id == NULL || det_protected(d, a) || det_str(a, "associationId") != NULL ||
		    det_str(a, "instanceId") != NULL || det_str(a, "networkInterfaceId") != NULL)
			continue;
		if (pricing_hourly_monthly(scan_prices(), d->run->region, PRICING_PUBLIC_IPV4,
		                           &usd) == -1)
			usd = 0;
		det_item(d, "eip_unassociated", id,
		         json_pack("{s:s, s:s?}", "why", "the address is associated with nothing",
		                   "public_ip", det_str(a, "publicIp")),
		         usd);
	}
	json_array_foreach (det_list(d, "enis"), k, a) {
		const char *id = det_str(a, "networkInterfaceId"), *st = det_str(a, "status");

		if (id == NULL || det_protected(d, a) || st == NULL ||
		    strcmp(st, "available") != 0 || json_object_get(a, "attachment") != NULL)
			continue;
		det_item(d, "eni_unattached", id,
		         json_pack("{s:s, s:s?, s:s?}", "why",
		                   "the interface is attached to nothing", "subnet_id",
		                   det_str(a, "subnetId"), "description",
		                   det_str(a, "description")),
		         0);
	}
}

/* Values of metric query id, or NULL when CloudWatch returned no datapoints. */
static json_t *ec2_values(struct det *d, const char *key, const char *id)
{
	json_t *v = json_object_get(json_object_get(d->data, key), id);

	return json_array_size(v) > 0 ? v : NULL;
}

static void ec2_queue_metrics(struct det *d, json_t *instances)
{
	int days = (int)det_setting(d, "ec2_lookback_days", 14);
	int nat_days = (int)det_setting(d, "nat_idle_days", 30);
	json_t *i;
	size_t k;
	char id[32];

	if (!det_skipped(d, "ec2_idle"))
		json_array_foreach (instances, k, i) {
			const char *iid = det_str(i, "instanceId"),
			           *st = det_str(i, "instanceState/name");

			if (iid == NULL || st == NULL || strcmp(st, "running") != 0 ||
			    det_protected(d, i))
				continue;
			snprintf(id, sizeof(id), "cpu%zu", k);
			det_metric(d, "cw_ec2", id, "AWS/EC2", "CPUUtilization", "InstanceId", iid,
			           "Average", DAY_S, days, ck_ec2_idle);
			snprintf(id, sizeof(id), "nin%zu", k);
			det_metric(d, "cw_ec2", id, "AWS/EC2", "NetworkIn", "InstanceId", iid,
			           "Sum", DAY_S, days, ck_ec2_idle);
			snprintf(id, sizeof(id), "nout%zu", k);
			det_metric(d, "cw_ec2", id, "AWS/EC2", "NetworkOut", "InstanceId", iid,
			           "Sum", DAY_S, days, ck_ec2_idle);
		}
	if (!det_skipped(d, "nat_gateway_idle"))
		json_array_foreach (det_list(d, "nats"), k, i) {
			const char *nid = det_str(i, "natGatewayId"), *st = det_str(i, "state");

			if (nid == NULL || st == NULL || strcmp(st, "available") != 0 ||
			    det_protected(d, i))
				continue;
			snprintf(id, sizeof(id), "nat%zu", k);
			det_metric(d, "cw_nat", id, "AWS/NATGateway", "BytesOutToDestination",
			           "NatGatewayId", nid, "Sum", DAY_S, nat_days, ck_nat);
			snprintf(id, sizeof(id), "natin%zu", k);
			det_metric(d, "cw_nat", id, "AWS/NATGateway", "BytesInFromSource",
			           "NatGatewayId", nid, "Sum", DAY_S, nat_days, ck_nat);
		}
}

static void ec2_idle(struct det *d, json_t *instances)
{
	double cpu_max = (double)det_setting(d, "ec2_cpu_percent", 10);
	double net_max = (double)det_setting(d, "ec2_network_mb", 5) * MB;
	long long need = det_setting(d, "ec2_idle_days", 4);
	json_t *i;
	size_t k, n;
	char id[3][32];

	if (det_skipped(d, "ec2_idle"))
		return;
	json_array_foreach (instances, k, i) {
		const char *iid = det_str(i, "instanceId"), *st = det_str(i, "instanceState/name");
		json_t *cpu, *nin, *nout;
		long long idle = 0;
		double usd = 0;

		if (iid == NULL || st == NULL || strcmp(st, "running") != 0 || det_protected(d, i))
			continue;
		snprintf(id[0], sizeof(id[0]), "cpu%zu", k);
		snprintf(id[1], sizeof(id[1]), "nin%zu", k);
		snprintf(id[2], sizeof(id[2]), "nout%zu", k);
		cpu = ec2_values(d, "cw_ec2", id[0]);
		nin = ec2_values(d, "cw_ec2", id[1]);
		nout = ec2_values(d, "cw_ec2", id[2]);
		if (cpu == NULL) {
			det_no_data(d, "ec2_idle", iid);
			continue;
		}
		for (n = 0; n < json_array_size(cpu); n++) {
			double net = json_real_value(json_array_get(nin, n)) +
			             json_real_value(json_array_get(nout, n));

			if (json_real_value(json_array_get(cpu, n)) <= cpu_max && net <= net_max)
				idle++;
		}
		if (idle < need)
			continue;
		if (pricing_ec2_monthly(scan_prices(), d->run->region, det_str(i, "instanceType"),
		                        &usd) == -1)
			usd = 0;
		det_item(d, "ec2_idle", iid,
		         json_pack("{s:s, s:s?, s:I, s:I, s:[sss]}", "why",
		                   "low CPU and network use on enough days", "instance_type",
		                   det_str(i, "instanceType"), "idle_days", (json_int_t)idle,
		                   "days_with_data", (json_int_t)json_array_size(cpu), "metrics",
		                   "CPUUtilization", "NetworkIn", "NetworkOut"),
		         usd);
	}
}

static void ec2_nat_idle(struct det *d)
{
	json_t *g, *v;
	size_t k, j;
	char id[2][32];

	if (det_skipped(d, "nat_gateway_idle"))
		return;
	json_array_foreach (det_list(d, "nats"), k, g) {
		const char *nid = det_str(g, "natGatewayId"), *st = det_str(g, "state");
		json_t *out, *in;
		double bytes = 0, usd = 0;

		if (nid == NULL || st == NULL || strcmp(st, "available") != 0 ||
		    det_protected(d, g))
			continue;
		snprintf(id[0], sizeof(id[0]), "nat%zu", k);
		snprintf(id[1], sizeof(id[1]), "natin%zu", k);
		out = ec2_values(d, "cw_nat", id[0]);
		in = ec2_values(d, "cw_nat", id[1]);
		if (out == NULL && in == NULL) {
			det_no_data(d, "nat_gateway_idle", nid);
			continue;
		}
		json_array_foreach (out, j, v)
			bytes += json_real_value(v);
		json_array_foreach (in, j, v)
			bytes += json_real_value(v);
		if (bytes > 0)
			continue;
		if (pricing_hourly_monthly(scan_prices(), d->run->region, PRICING_NAT_GATEWAY,
		                           &usd) == -1)
			usd = 0;
		det_item(d, "nat_gateway_idle", nid,
		         json_pack("{s:s, s:I, s:[ss]}", "why", "no bytes processed", "days",
		                   (json_int_t)det_setting(d, "nat_idle_days", 30), "metrics",
		                   "BytesOutToDestination", "BytesInFromSource"),
		         usd);
	}
}

static void ec2_phase(struct det *d)
{
	static const char *const p_self[] = { "Owner.1", "self", NULL };
	static const char *const p_images[] = {
		"Owner.1", "self", "IncludeDisabled", "true", "IncludeDeprecated", "true", NULL
	};
	json_t *instances;

	switch (d->phase) {
	case 0:
		if (ec2_any(d, ck_volumes))
			det_fetch(d, AWS_EC2, "DescribeVolumes", "NextToken", "volumeSet",
			          "volumes", ck_volumes, NULL);
		if (ec2_any(d, ck_instances))
			det_fetch(d, AWS_EC2, "DescribeInstances", "NextToken", "reservationSet",
			          "reservations", ck_instances, NULL);
		if (ec2_any(d, ck_snapshots)) {
			det_fetch(d, AWS_EC2, "DescribeSnapshots", "NextToken", "snapshotSet",
			          "snapshots", ck_snapshots, p_self);
			det_fetch(d, AWS_EC2, "DescribeImages", "NextToken", "imagesSet", "images",
			          ck_snapshots, p_images);
		}
		if (ec2_any(d, ck_eip))
			det_fetch(d, AWS_EC2, "DescribeAddresses", NULL, "addressesSet",
			          "addresses", ck_eip, NULL);
		if (ec2_any(d, ck_eni))
			det_fetch(d, AWS_EC2, "DescribeNetworkInterfaces", "NextToken",
			          "networkInterfaceSet", "enis", ck_eni, NULL);
		if (ec2_any(d, ck_nat))
			det_fetch(d, AWS_EC2, "DescribeNatGateways", "NextToken", "natGatewaySet",
			          "nats", ck_nat, NULL);
		return;
	case 1:
		instances = ec2_instances(d);
		ec2_volumes(d, instances);
		ec2_snapshots(d);
		ec2_addresses_enis(d);
		ec2_queue_metrics(d, instances);
		json_decref(instances);
		return;
	case 2:
		instances = ec2_instances(d);
		ec2_idle(d, instances);
		ec2_nat_idle(d);
		json_decref(instances);
		return;
	default:
		return;
	}
}

int detect_ec2_start(struct scan_detector_run *run)
{
	return det_start(run, ec2_phase);
}
