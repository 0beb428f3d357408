/*
 * scan.h - scanning AWS accounts for waste: the job queue, the per-worker
 * executor that runs units (one AWS account x region) under a lease, the
 * long poll on a scan's version, waste items and their approval, the price
 * table and the savings report.
 *
 * A scan is split into units stored in Postgres (sql/010_scans.sql). Any
 * worker of any instance claims units with FOR UPDATE SKIP LOCKED, holds a
 * lease it renews every lease/3 (heartbeat) and names that lease on every
 * write, so a unit whose lease a reclaim took over can never be written by
 * its old owner. A unit runs the detectors that implement its checks, at
 * most scan_unit_detectors at once; a detector is one entry of
 * scan_detectors[] driven by callbacks (see struct scan_detector).
 *
 * Scan status and counters are rolled up from the units by the database,
 * which bumps the scan's version and NOTIFYs cs_scan on every change; each
 * worker LISTENs and wakes the long polls it has parked on that scan.
 */
#ifndef CLOUDSWEEP_SCAN_H
#define CLOUDSWEEP_SCAN_H

#include <event2/event.h>
#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>

#include "cloudsweep/config.h"
#include "cloudsweep/db.h"
#include "cloudsweep/util.h"

struct router;

/* ---- checks ---- */

/* One check a scan may request (the waste item type it produces has the same name). */
struct scan_check {
	const char *name;    /* "ebs_unattached", ... */
	const char *service; /* the AWS service it reads: "ec2", "elbv2", "rds", ... */
	const char *summary; /* what it finds, for the documentation */
};

/* The catalogue of checks, scan_checks_count entries. */
extern const struct scan_check scan_checks[];
/* Number of entries in scan_checks[]. */
extern const size_t scan_checks_count;
/* Whether name is a catalogued check. */
bool scan_check_known(const char *name);

/* ---- detectors ---- */

struct scan_unit;
struct aws_credentials;

/*
 * One detector running in one unit. The executor owns it; the detector
 * keeps its own state in `state` and reports through the scan_run_*
 * functions below. After scan_run_done (or after cancel) the run is gone.
 */
struct scan_detector_run {
	const struct scan_detector *det;     /* borrowed; the table entry */
	struct scan_unit *unit;              /* borrowed; the unit this run belongs to */
	const char *org_id;                  /* borrowed from the unit */
	const char *account_id;              /* borrowed from the unit */
	const char *region;                  /* borrowed from the unit */
	const json_t *settings;              /* borrowed; the scan's thresholds (defaults merged) */
	const struct aws_credentials *creds; /* borrowed from the unit; signs its AWS calls */
	void *state;                         /* the detector's own; it frees it in done/cancel */
};

/*
 * A detector: the checks it implements and how to start and stop it.
 * start() begins asynchronous work (AWS calls) and returns 0, or -1 when it
 * cannot start (then the checks are recorded as skipped). It must never
 * call scan_run_done from inside start(). cancel() stops pending work
 * without reporting; the executor calls it when the lease is lost or the
 * worker stops.
 */
struct scan_detector {
	const char *name;          /* "ebs_volumes" */
	const char *service;       /* "ec2" */
	const char *const *checks; /* NULL-terminated check names it implements */
	int (*start)(struct scan_detector_run *run);
	void (*cancel)(struct scan_detector_run *run);
};

/* The detector table (empty until the detectors land), scan_detectors_count entries. */
extern const struct scan_detector scan_detectors[];
/* Number of entries in scan_detectors[]. */
extern const size_t scan_detectors_count;

/* Whether the scan asked for check (detectors skip the checks it did not ask for). */
bool scan_run_wants(const struct scan_detector_run *run, const char *check);
/* Count n AWS API calls made by a run (progress counter). */
void scan_run_api_calls(struct scan_detector_run *run, int n);
/*
 * Record a finding of check `type`. details is stolen (an object or NULL);
 * monthly_usd comes from the price table. Returns 0, or -1 when the unit
 * already holds scan_max_items_per_unit items (the item is dropped).
 */
int scan_run_item(struct scan_detector_run *run, const char *type, const char *resource_id,
                  json_t *details, double monthly_usd);
/* Record that check could not run (throttled, access denied): the unit ends partial. */
void scan_run_skipped(struct scan_detector_run *run, const char *check, const char *code,
                      const char *message);
/* Note something about check that is not a failure (insufficient data); the unit stays ok. */
void scan_run_note(struct scan_detector_run *run, const char *check, const char *code,
                   const char *message);
/* The run finished (status 0, or -1: its remaining checks are recorded as failed). */
void scan_run_done(struct scan_detector_run *run, int status);

/* ---- AWS sessions ---- */

struct aws_owned_credentials;
struct scan_session;

/*
 * The outcome of a session: status 0 with creds (the caller owns the struct
 * and its strings: aws_owned_credentials_clear, then free), or -1 with
 * error_code ("account_not_found", "unavailable", "credentials_error",
 * "no_base_credentials", AWS's code such as "AccessDenied") and a message
 * that holds no secret, and creds NULL. The session is gone once cb runs.
 */
typedef void (*scan_session_cb)(void *arg, int status, const char *error_code,
                                const char *error_message,
                                struct aws_owned_credentials *creds /* caller owns */);

/*
 * Credentials to call AWS in region for account aws_account_uuid of org_id:
 * creds_load(purpose) (audited credential.read; purpose as creds_load takes
 * it: a scan id, "scan:<id>", "cleanup:<item id>"), then for a role
 * aws_sts_assume_role through the worker's STS cache (RoleSessionName = the
 * purpose's kind, SourceIdentity = org_id), for a key pair the keys. cb
 * always runs from the event loop. NULL (no callback) on bad arguments or
 * when the database pool is unavailable.
 */
struct scan_session *scan_session_start(struct db_pool *pool, const char *org_id,
                                        const char *aws_account_uuid, const char *purpose,
                                        const char *region, scan_session_cb cb, void *arg);
/* Forget a pending session: cb never runs. */
void scan_session_cancel(struct scan_session *s);

/* ---- pricing ---- */

#define PRICING_HOURS_PER_MONTH 730.0

struct pricing;

/* Resources priced by the hour. */
enum pricing_hourly {
	PRICING_PUBLIC_IPV4, /* an idle public IPv4 address */
	PRICING_NAT_GATEWAY, /* a NAT gateway, processing excluded */
	PRICING_ALB,         /* an application load balancer, LCUs excluded */
	PRICING_NLB,         /* a network load balancer, NLCUs excluded */
	PRICING_CLB,         /* a classic load balancer, data excluded */
};

/*
 * Load the price table (data/prices.json): every region must define every
 * EBS type, snapshots and the hourly resources. Returns NULL with a reason
 * in err on error.
 */
struct pricing *pricing_load(const char *path, char *err, size_t errlen);
/* Free a table; NULL is fine. */
void pricing_free(struct pricing *p);
/* The table's "source" and "as_of" strings (borrowed). */
const char *pricing_source(const struct pricing *p);
const char *pricing_as_of(const struct pricing *p);
/* Whether the table prices region. */
bool pricing_has_region(const struct pricing *p, const char *region);
/*
 * Monthly USD of an EBS volume of type (gp2, gp3, io1, io2, st1, sc1,
 * standard) with gb GiB, provisioned iops and throughput (MB/s; gp3 only,
 * billed above the included baseline). 0, or -1 when unknown.
 */
int pricing_ebs_monthly(const struct pricing *p, const char *region, const char *type, double gb,
                        double iops, double throughput_mbps, double *usd) CS_WUR;
/* Monthly USD of gb GiB of snapshot storage; 0 or -1. */
int pricing_snapshot_monthly(const struct pricing *p, const char *region, double gb,
                             double *usd) CS_WUR;
/* Monthly USD (730 hours) of an hourly resource; 0 or -1. */
int pricing_hourly_monthly(const struct pricing *p, const char *region, enum pricing_hourly what,
                           double *usd) CS_WUR;
/* Monthly USD of an on-demand Linux EC2 instance type ("m5.large"); 0 or -1. */
int pricing_ec2_monthly(const struct pricing *p, const char *region, const char *instance_type,
                        double *usd) CS_WUR;
/*
 * Monthly USD of an on-demand RDS instance: engine "postgres" or "mysql"
 * (mariadb priced as mysql), class "db.t3.micro"; multi-AZ doubles it. 0 or -1.
 */
int pricing_rds_monthly(const struct pricing *p, const char *region, const char *engine,
                        const char *instance_class, bool multi_az, double *usd) CS_WUR;

/* ---- the worker ---- */

/* The worker's price table (NULL before scan_worker_init). */
const struct pricing *scan_prices(void);

/* Register the scan, waste-item, cleanup and report routes. */
void scan_routes(struct router *r);
/*
 * Start scanning on this worker: load the price table, LISTEN cs_scan (long
 * polls) and cs_scan_work (claims), and arm the slow reclaim poll. 0 or -1
 * (logged).
 */
int scan_worker_init(struct event_base *base, const struct config *cfg,
                     struct db_pool *pool) CS_WUR;
/* Stop: cancel running units (their leases lapse), answer parked polls, free everything. */
void scan_worker_free(void);

#endif
