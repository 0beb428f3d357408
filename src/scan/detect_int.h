/*
 * detect_int.h - the small engine the detectors share. A detector is a
 * sequence of phases: each phase queues AWS calls (paginated describes,
 * CloudWatch GetMetricData batches) whose list items are converted to JSON
 * and collected under a key, and once every call of the phase has answered
 * the next phase runs on the collected data. At most DET_IN_FLIGHT calls of
 * one detector run at once. A call that fails (throttled, denied) marks the
 * checks it serves as skipped; later phases test det_skipped() and emit no
 * finding for a skipped check.
 */
#ifndef CLOUDSWEEP_DETECT_INT_H
#define CLOUDSWEEP_DETECT_INT_H

#include <jansson.h>
#include <stdbool.h>
#include <time.h>

#include "cloudsweep/aws.h"
#include "cloudsweep/scan.h"

#define DET_IN_FLIGHT  4   /* AWS calls in flight per detector run */
#define DET_PARAMS_MAX 16  /* parameters of one queued describe */
#define DET_CW_BATCH   500 /* GetMetricData queries per call (AWS's maximum), 7 parameters each */

struct det;

/*
 * Phase function: queue calls with det_fetch / det_metric, or emit items.
 * The phase number is d->phase (0 first). When it queues nothing the
 * detector is done.
 */
typedef void (*det_phase_fn)(struct det *d);

struct det {
	struct scan_detector_run *run; /* borrowed */
	det_phase_fn phase_fn;
	int phase;
	json_t *data;     /* owned: key -> array of converted list items */
	json_t *skipped;  /* owned: check -> true */
	json_t *metrics;  /* owned: queued metric queries not yet sent [{id, ns, name, dim...}] */
	json_t *no_data;  /* owned: check -> [resource ids without datapoints] */
	void *calls;      /* owned list of struct det_call (detect.c) */
	void *calls_tail; /* the last of calls, or NULL */
	int queued, in_flight;
	struct event *ev; /* owned; runs phases from the loop */
	void *state;      /* the detector's own extra state, freed by it in a phase, or NULL */
};

/* Start d's engine for run with phase function fn (from a detector's start). 0 or -1. */
int det_start(struct scan_detector_run *run, det_phase_fn fn);
/* Cancel and free the engine of run (a detector's cancel). */
void det_cancel(struct scan_detector_run *run);

/*
 * Queue a describe of service/action with params (name, value pairs ending
 * in NULL, copied): pages follow token_param (NULL: one call), the children
 * of the element at list_path (from the root, "*" matching the Result
 * element) are appended under key. checks (NULL-terminated, static) are
 * skipped when the call fails.
 */
void det_fetch(struct det *d, enum aws_service service, const char *action, const char *token_param,
               const char *list_path, const char *key, const char *const *checks,
               const char *const *params);
/*
 * Queue one CloudWatch query: daily (period_s) stat of namespace/metric
 * with one dimension, over the last days; results land under key as
 * {id: [values...]} in d->data[key] (an object). Queries are sent in
 * batches of DET_CW_BATCH by det_metrics_flush (called by the engine when
 * the phase function returns).
 */
void det_metric(struct det *d, const char *key, const char *id, const char *ns, const char *metric,
                const char *dim_name, const char *dim_value, const char *stat, int period_s,
                int days, const char *const *checks);

/* Whether check failed to run (an AWS call it needed failed) or was not asked for. */
bool det_skipped(const struct det *d, const char *check);
/* The collected items under key (an array; empty when none). */
json_t *det_list(struct det *d, const char *key);
/* An integer setting of the scan (defaults merged). */
long long det_setting(const struct det *d, const char *name, long long def);
/* The protection tag key of the scan. */
const char *det_protect_tag(const struct det *d);
/* The string at a '/'-separated path of a converted item, or NULL. */
const char *det_str(const json_t *item, const char *path);
/* Whether the item carries the protection tag (EC2 tagSet or RDS TagList). */
bool det_protected(const struct det *d, const json_t *item);
/* Parse an AWS timestamp ("2024-01-01T00:00:00.000Z"); -1 when it is not one. */
time_t det_time(const char *s);
/*
 * Note that resource_id had no datapoints for check: not idle, not enough
 * data. The run reports one note per check when it ends (a count and the
 * first few ids), so a large account does not flood the scan's errors.
 */
void det_no_data(struct det *d, const char *check, const char *resource_id);
/* Record a finding for check (dropped when the check is skipped). */
void det_item(struct det *d, const char *check, const char *resource_id, json_t *details,
              double monthly_usd);

/* The detectors (checks.c builds the table from these). */
extern const char *const detect_ec2_checks[];
int detect_ec2_start(struct scan_detector_run *run);
extern const char *const detect_elb_checks[];
int detect_elb_start(struct scan_detector_run *run);
extern const char *const detect_rds_checks[];
int detect_rds_start(struct scan_detector_run *run);

#endif
