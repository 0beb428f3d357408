/*
 * alerts.h - security alerts raised from the audit trail, their optional
 * signed webhook, the retention job, and the administrators' endpoints for
 * blocks and alerts.
 *
 * Rules are configuration, not code: a JSON file (option alert_rules_file,
 * format in doc/alerts.md) or the built-in defaults. alerts_rules_parse()
 * validates a rule set and normalizes it into the form the SQL evaluator
 * alert_evaluate() (sql/005_alerts.sql) takes; evaluation runs in Postgres
 * over the audit events not looked at yet, under an advisory lock so one
 * evaluator runs at a time across workers and instances. Each new alert is
 * a security_alerts row and one "security_alert" log line; with a webhook
 * configured, each is POSTed as JSON signed with HMAC-SHA256 over
 * "<timestamp>.<body>" (headers X-CloudSweep-Timestamp and
 * X-CloudSweep-Signature: sha256=<hex>), retried with backoff until a 2xx.
 *
 * Retention (retention.c) signs a retention anchor per organization with
 * audit_anchor_sign(), prunes the audit events before it in batches, and
 * deletes old alerts and rate-limit rows; one run at a time through a
 * lease row (job_leases).
 */
#ifndef CLOUDSWEEP_ALERTS_H
#define CLOUDSWEEP_ALERTS_H

#include <event2/event.h>
#include <jansson.h>
#include <stddef.h>

#include "cloudsweep/db.h"
#include "cloudsweep/util.h"

#define ALERTS_RULES_MAX     64   /* rules in one set */
#define ALERTS_TYPES_MAX     16   /* event types one rule watches */
#define ALERTS_BATCH         5000 /* audit events evaluated per run */
#define ALERTS_DELIVER_BATCH 20   /* alerts claimed for the webhook per run */
#define ALERTS_MAX_ATTEMPTS  10   /* webhook attempts before an alert is given up */
#define RETENTION_BATCH      1000 /* rows deleted per statement */
#define RETENTION_ORGS_MAX   1000 /* organizations pruned per run */

struct config;
struct router;

/*
 * Validate the rule set in text (JSON: {"rules": [...]}, or the array
 * alone) and return it normalized for alert_evaluate (a new reference:
 * every rule with kind, group_by, threshold and window_s filled in), or
 * NULL with the reason in err.
 */
json_t *alerts_rules_parse(const char *text, char *err, size_t errlen);
/* The built-in default rules, normalized (a new reference). */
json_t *alerts_rules_default(void);
/* The built-in default rules as JSON text (static), as documented in doc/alerts.md. */
const char *alerts_rules_default_text(void);
/*
 * Whether url may receive alerts: https, or http to a loopback address
 * (127.0.0.0/8, ::1, localhost). 0 or -1 with the reason in err.
 */
int alerts_webhook_url_check(const char *url, char *err, size_t errlen) CS_WUR;
/*
 * The signature header value "sha256=<hex>" of HMAC-SHA256(key, ts "." body)
 * into out (72 bytes). 0 or -1.
 */
int alerts_webhook_sign(const unsigned char *key, size_t keylen, const char *ts, const char *body,
                        size_t body_len, char out[72]) CS_WUR;

/* Whether the alert options (rules file, webhook) are usable: 0, or -1 with err filled. */
int alerts_config_check(const struct config *cfg, char *err, size_t errlen) CS_WUR;
/*
 * Start this worker's alert evaluator, webhook sender and retention job
 * on pool (borrowed), from cfg (borrowed; must outlive the worker). 0 or
 * -1 (logged: bad rules file, webhook settings).
 */
int alerts_worker_init(struct event_base *base, const struct config *cfg,
                       struct db_pool *pool) CS_WUR;
/* Stop the timers and cancel whatever is pending; frees everything. */
void alerts_worker_free(void);
/* Register the admin endpoints (ip-blocks, alerts). */
void alerts_routes(struct router *r);

/* Start the retention job's timer (retention.c; called by alerts_worker_init). */
void retention_start(struct event_base *base, const struct config *cfg, struct db_pool *pool);
/* Stop it, cancelling a run in progress. */
void retention_stop(void);

#endif
