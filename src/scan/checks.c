/*
 * checks.c - the catalogue of checks a scan may request and the table of
 * detectors that implement them. Defaults follow AWS Trusted Advisor's
 * thresholds; a scan may override them (scan_settings_defaults). A check
 * with no detector in the table is accepted and simply not run yet.
 */
#include "config.h"

#include <string.h>

#include "cloudsweep/scan.h"
#include "detect_int.h"
#include "scan_int.h"

const struct scan_check scan_checks[] = {
	{ "ebs_unattached", "ec2", "EBS volumes in the available state" },
	{ "ebs_stopped_instance", "ec2", "EBS volumes of instances stopped for long" },
	{ "ebs_gp2_to_gp3", "ec2", "gp2 volumes that would be cheaper as gp3" },
	{ "ebs_snapshot_orphaned", "ec2",
	  "old snapshots of deleted volumes used by no AMI or AWS Backup" },
	{ "eip_unassociated", "ec2", "Elastic IPs with no association" },
	{ "eni_unattached", "ec2", "network interfaces attached to nothing" },
	{ "nat_gateway_idle", "ec2", "NAT gateways that processed no bytes" },
	{ "lb_idle", "elbv2", "ALB/NLB/CLB with no (healthy) targets or almost no requests" },
	{ "rds_idle", "rds", "RDS instances with no connections" },
	{ "rds_stopped", "rds", "stopped RDS instances (AWS restarts them after 7 days)" },
	{ "ec2_idle", "ec2", "EC2 instances with low CPU and network use" },
};
const size_t scan_checks_count = CS_ARRAY_LEN(scan_checks);

bool scan_check_known(const char *name)
{
	size_t i;

	for (i = 0; name != NULL && i < scan_checks_count; i++)
		if (strcmp(scan_checks[i].name, name) == 0)
			return true;
	return false;
}

/* One entry per detector; each runs in every unit that asked for one of its checks. */
const struct scan_detector scan_detectors[] = {
	{ "ec2", "ec2", detect_ec2_checks, detect_ec2_start, det_cancel },
	{ "elb", "elbv2", detect_elb_checks, detect_elb_start, det_cancel },
	{ "rds", "rds", detect_rds_checks, detect_rds_start, det_cancel },
};
const size_t scan_detectors_count = CS_ARRAY_LEN(scan_detectors);

/* Thresholds a scan may override, with their defaults and bounds. */
const struct scan_setting scan_settings[] = {
	{ "protect_tag", SCAN_SETTING_STRING, 0, 0, 0, "cloudsweep:protect" },
	{ "ebs_stopped_days", SCAN_SETTING_INT, 30, 1, 3650, NULL },
	{ "snapshot_min_age_days", SCAN_SETTING_INT, 30, 1, 3650, NULL },
	{ "lb_min_requests_per_day", SCAN_SETTING_INT, 100, 0, 100000000, NULL },
	{ "lb_lookback_days", SCAN_SETTING_INT, 7, 1, 90, NULL },
	{ "rds_idle_days", SCAN_SETTING_INT, 7, 1, 90, NULL },
	{ "ec2_cpu_percent", SCAN_SETTING_INT, 10, 1, 100, NULL },
	{ "ec2_network_mb", SCAN_SETTING_INT, 5, 0, 1000000, NULL },
	{ "ec2_idle_days", SCAN_SETTING_INT, 4, 1, 14, NULL },
	{ "ec2_lookback_days", SCAN_SETTING_INT, 14, 1, 90, NULL },
	{ "nat_idle_days", SCAN_SETTING_INT, 30, 1, 90, NULL },
};
const size_t scan_settings_count = CS_ARRAY_LEN(scan_settings);
