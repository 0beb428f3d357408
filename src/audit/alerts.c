/*
 * alerts.c - the alert rules (parsing and validation), the per-worker
 * evaluator that runs them in Postgres over new audit events, and the
 * signed webhook that carries each alert out. The evaluator is one small
 * state machine on a timer: evaluate (alert_evaluate under an advisory
 * lock, so any number of workers and instances may tick), then claim due
 * alerts for the webhook (each claim pushes the alert's next attempt out,
 * which is both the backoff and what keeps two workers from sending the
 * same alert), then wait for the deliveries, then idle until the next tick.
 */
#include "config.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "cloudsweep/alerts.h"
#include "cloudsweep/audit.h"
#include "cloudsweep/client.h"
#include "cloudsweep/config.h"
#include "cloudsweep/log.h"

#define ALERTS_SECRET_MAX 4096

/* ---- rules ---- */

static const char alerts_default_text[] =
    "{\"rules\": [\n"
    "  {\"name\": \"failed_logins_per_ip\", \"severity\": \"high\",\n"
    "   \"types\": [\"auth.login.failed\"], \"group_by\": \"actor_ip\",\n"
    "   \"threshold\": 10, \"window_s\": 300},\n"
    "  {\"name\": \"failed_logins_per_account\", \"severity\": \"high\",\n"
    "   \"types\": [\"auth.login.failed\"], \"group_by\": \"details.email\",\n"
    "   \"threshold\": 5, \"window_s\": 900},\n"
    "  {\"name\": \"refresh_token_reuse\", \"severity\": \"critical\",\n"
    "   \"types\": [\"auth.refresh.reused\"], \"group_by\": \"actor\",\n"
    "   \"threshold\": 1, \"window_s\": 3600},\n"
    "  {\"name\": \"credential_use_outside_hours\", \"severity\": \"medium\",\n"
    "   \"kind\": \"outside_hours\", \"types\": [\"credential.read\"], \"group_by\": \"actor\",\n"
    "   \"hours\": \"07:00-20:00\", \"weekdays\": [1, 2, 3, 4, 5], \"tz_offset\": \"+00:00\",\n"
    "   \"window_s\": 3600},\n"
    "  {\"name\": \"login_from_new_ip\", \"severity\": \"low\", \"kind\": \"new_ip\",\n"
    "   \"types\": [\"auth.login.succeeded\"], \"days\": 30, \"window_s\": 3600},\n"
    "  {\"name\": \"mass_export\", \"severity\": \"high\",\n"
    "   \"types\": [\"user.exported\"], \"group_by\": \"actor\",\n"
    "   \"threshold\": 3, \"window_s\": 3600},\n"
    "  {\"name\": \"permission_denied_burst\", \"severity\": \"medium\",\n"
    "   \"types\": [\"access.permission_denied\"], \"group_by\": \"actor\",\n"
    "   \"threshold\": 20, \"window_s\": 300}\n"
    "]}\n";

const char *alerts_rules_default_text(void)
{
	return alerts_default_text;
}

static bool alerts_ident_ok(const char *s, size_t max, bool dots)
{
	size_t n = strlen(s);

	if (n == 0 || n > max)
		return false;
	for (const char *p = s; *p != '\0'; p++)
		if (!(islower((unsigned char)*p) || isdigit((unsigned char)*p) || *p == '_' ||
		      *p == '-' || (dots && *p == '.')))
			return false;
	return true;
}

/* An integer member within [lo, hi], or def when absent; -1 when present but bad. */
static int alerts_int(json_t *rule, const char *key, long long lo, long long hi, long long def,
                      long long *out)
{
	json_t *v = json_object_get(rule, key);

	if (v == NULL) {
		*out = def;
		return 0;
	}
	if (!json_is_integer(v) || json_integer_value(v) < lo || json_integer_value(v) > hi)
		return -1;
	*out = json_integer_value(v);
	return 0;
}

/* "HH:MM" into minutes after midnight (24:00 allowed as an end). */
static int alerts_hhmm(const char *s, int *out)
{
	if (strlen(s) != 5 || !isdigit((unsigned char)s[0]) || !isdigit((unsigned char)s[1]) ||
	    s[2] != ':' || !isdigit((unsigned char)s[3]) || !isdigit((unsigned char)s[4]))
		return -1;
	*out = ((s[0] - '0') * 10 + (s[1] - '0')) * 60 + (s[3] - '0') * 10 + (s[4] - '0');
	if ((s[3] - '0') * 10 + (s[4] - '0') > 59 || *out > 24 * 60)
		return -1;
	return 0;
}

#define RULE_FAIL(...)                              \
	do {                                        \
		snprintf(err, errlen, __VA_ARGS__); \
		goto fail;                          \
	} while (0)

static const char *const alerts_keys[] = { "name",     "severity",  "kind",     "types",
	                                   "group_by", "threshold", "window_s", "days",
	                                   "hours",    "weekdays",  "tz_offset" };

/* Validate one rule and return its normalized form, or NULL with err set. */
static json_t *alerts_rule_parse(json_t *in, int idx, char *err, size_t errlen)
{
	json_t *out = NULL, *types, *v;
	const char *key, *name, *sev, *kind = "threshold", *group = NULL;
	long long threshold, window_s, days;
	size_t i;

	if (!json_is_object(in)) {
		snprintf(err, errlen, "rules[%d] is not an object", idx);
		return NULL;
	}
	json_object_foreach (in, key, v) {
		bool known = false;

		for (i = 0; i < CS_ARRAY_LEN(alerts_keys); i++)
			known = known || strcmp(key, alerts_keys[i]) == 0;
		if (!known) {
			snprintf(err, errlen, "rules[%d]: unknown field %.64s", idx, key);
			return NULL;
		}
	}
	name = json_string_value(json_object_get(in, "name"));
	if (name == NULL || !alerts_ident_ok(name, 64, true)) {
		snprintf(err, errlen, "rules[%d].name must be 1-64 of [a-z0-9_.-]", idx);
		return NULL;
	}
	out = json_object();
	sev = json_string_value(json_object_get(in, "severity"));
	if (sev == NULL || (strcmp(sev, "low") != 0 && strcmp(sev, "medium") != 0 &&
	                    strcmp(sev, "high") != 0 && strcmp(sev, "critical") != 0))
		RULE_FAIL("rule %s: severity must be low, medium, high or critical", name);
	if (json_object_get(in, "kind") != NULL) {
		kind = json_string_value(json_object_get(in, "kind"));
		if (kind == NULL ||
		    (strcmp(kind, "threshold") != 0 && strcmp(kind, "new_ip") != 0 &&
		     strcmp(kind, "outside_hours") != 0))
			RULE_FAIL("rule %s: kind must be threshold, new_ip or outside_hours", name);
	}
	types = json_object_get(in, "types");
	if (!json_is_array(types) || json_array_size(types) == 0 ||
	    json_array_size(types) > ALERTS_TYPES_MAX)
		RULE_FAIL("rule %s: types must be an array of 1-%d event types", name,
		          ALERTS_TYPES_MAX);
	json_array_foreach (types, i, v) {
		if (!json_is_string(v) || !audit_event_type_known(json_string_value(v)))
			RULE_FAIL("rule %s: types[%zu] is not a catalogued audit event type", name,
			          i);
	}
	if (json_object_get(in, "group_by") != NULL) {
		group = json_string_value(json_object_get(in, "group_by"));
		if (group == NULL ||
		    !(strcmp(group, "actor_ip") == 0 || strcmp(group, "actor") == 0 ||
		      strcmp(group, "resource_id") == 0 ||
		      (strncmp(group, "details.", 8) == 0 &&
		       alerts_ident_ok(group + 8, 64, false))))
			RULE_FAIL("rule %s: group_by must be actor_ip, actor, resource_id or "
			          "details.<key>",
			          name);
	}
	if (strcmp(kind, "new_ip") == 0) {
		if (group != NULL && strcmp(group, "actor") != 0)
			RULE_FAIL("rule %s: a new_ip rule groups by actor", name);
		group = "actor";
	}
	if (group == NULL)
		RULE_FAIL("rule %s: group_by is required", name);
	if (alerts_int(in, "threshold", 1, 1000000, 1, &threshold) == -1)
		RULE_FAIL("rule %s: threshold must be an integer 1-1000000", name);
	if (strcmp(kind, "threshold") == 0 && json_object_get(in, "threshold") == NULL)
		RULE_FAIL("rule %s: threshold is required", name);
	if (alerts_int(in, "window_s", 1, 30 * 86400, 3600, &window_s) == -1)
		RULE_FAIL("rule %s: window_s must be an integer 1-2592000", name);
	if (strcmp(kind, "threshold") == 0 && json_object_get(in, "window_s") == NULL)
		RULE_FAIL("rule %s: window_s is required", name);
	if (json_object_set_new(out, "name", json_string(name)) == -1 ||
	    json_object_set_new(out, "severity", json_string(sev)) == -1 ||
	    json_object_set_new(out, "kind", json_string(kind)) == -1 ||
	    json_object_set(out, "types", types) == -1 ||
	    json_object_set_new(out, "group_by", json_string(group)) == -1 ||
	    json_object_set_new(out, "threshold", json_integer(threshold)) == -1 ||
	    json_object_set_new(out, "window_s", json_integer(window_s)) == -1)
		RULE_FAIL("out of memory");

	if (strcmp(kind, "new_ip") == 0) {
		if (alerts_int(in, "days", 1, 3650, 30, &days) == -1)
			RULE_FAIL("rule %s: days must be an integer 1-3650", name);
		if (json_object_set_new(out, "days", json_integer(days)) == -1)
			RULE_FAIL("out of memory");
	} else if (json_object_get(in, "days") != NULL) {
		RULE_FAIL("rule %s: days applies to new_ip rules only", name);
	}
	if (strcmp(kind, "outside_hours") == 0) {
		const char *hours = json_string_value(json_object_get(in, "hours"));
		const char *tz = json_string_value(json_object_get(in, "tz_offset"));
		json_t *wd = json_object_get(in, "weekdays"), *norm;
		int start, end, off = 0;
		char buf[6];

		if (hours == NULL || strlen(hours) != 11 || hours[5] != '-')
			RULE_FAIL("rule %s: hours must be \"HH:MM-HH:MM\"", name);
		memcpy(buf, hours, 5);
		buf[5] = '\0';
		if (alerts_hhmm(buf, &start) == -1 || alerts_hhmm(hours + 6, &end) == -1 ||
		    start >= end)
			RULE_FAIL("rule %s: hours must be \"HH:MM-HH:MM\" with start before end",
			          name);
		if (tz != NULL) {
			if (strlen(tz) != 6 || (tz[0] != '+' && tz[0] != '-') ||
			    alerts_hhmm(tz + 1, &off) == -1 || off > 14 * 60)
				RULE_FAIL("rule %s: tz_offset must be \"+HH:MM\" or \"-HH:MM\"",
				          name);
			off = tz[0] == '-' ? -off : off;
		} else if (json_object_get(in, "tz_offset") != NULL) {
			RULE_FAIL("rule %s: tz_offset must be \"+HH:MM\" or \"-HH:MM\"", name);
		}
		norm = json_array();
		if (wd == NULL) {
			for (int d = 1; d <= 5; d++)
				json_array_append_new(norm, json_integer(d));
		} else if (!json_is_array(wd) || json_array_size(wd) > 7) {
			json_decref(norm);
			RULE_FAIL("rule %s: weekdays must be an array of 1 (Monday) to 7", name);
		} else {
			json_array_foreach (wd, i, v) {
				if (!json_is_integer(v) || json_integer_value(v) < 1 ||
				    json_integer_value(v) > 7) {
					json_decref(norm);
					RULE_FAIL(
					    "rule %s: weekdays must be an array of 1 (Monday) "
					    "to 7",
					    name);
				}
				json_array_append(norm, v);
			}
		}
		if (json_object_set_new(out, "weekdays", norm) == -1 ||
		    json_object_set_new(out, "start_min", json_integer(start)) == -1 ||
		    json_object_set_new(out, "end_min", json_integer(end)) == -1 ||
		    json_object_set_new(out, "tz_offset_min", json_integer(off)) == -1 ||
		    json_object_set_new(out, "hours", json_string(hours)) == -1)
			RULE_FAIL("out of memory");
	} else if (json_object_get(in, "hours") != NULL ||
	           json_object_get(in, "weekdays") != NULL ||
	           json_object_get(in, "tz_offset") != NULL) {
		RULE_FAIL(
		    "rule %s: hours, weekdays and tz_offset apply to outside_hours rules only",
		    name);
	}
	return out;
fail:
	json_decref(out);
	return NULL;
}

json_t *alerts_rules_parse(const char *text, char *err, size_t errlen)
{
	json_error_t jerr;
	json_t *doc, *rules, *out = NULL, *rule, *norm;
	size_t i;

	doc = json_loads(text, JSON_REJECT_DUPLICATES, &jerr);
	if (doc == NULL) {
		snprintf(err, errlen, "not valid JSON (line %d: %s)", jerr.line, jerr.text);
		return NULL;
	}
	rules = json_is_array(doc) ? doc : json_object_get(doc, "rules");
	if (json_is_object(doc) && json_object_size(doc) != 1)
		RULE_FAIL("the rules file holds one member, \"rules\"");
	if (!json_is_array(rules) || json_array_size(rules) > ALERTS_RULES_MAX)
		RULE_FAIL("rules must be an array of at most %d rules", ALERTS_RULES_MAX);
	out = json_array();
	json_array_foreach (rules, i, rule) {
		norm = alerts_rule_parse(rule, (int)i, err, errlen);
		if (norm == NULL)
			goto fail;
		for (size_t j = 0; j < json_array_size(out); j++)
			if (strcmp(
			        json_string_value(json_object_get(json_array_get(out, j), "name")),
			        json_string_value(json_object_get(norm, "name"))) == 0) {
				json_decref(norm);
				RULE_FAIL("two rules are named %s",
				          json_string_value(json_object_get(rule, "name")));
			}
		json_array_append_new(out, norm);
	}
	json_decref(doc);
	return out;
fail:
	json_decref(out);
	json_decref(doc);
	return NULL;
}

json_t *alerts_rules_default(void)
{
	char err[256];
	json_t *r = alerts_rules_parse(alerts_default_text, err, sizeof(err));

	if (r == NULL)
		fatalx("alerts_defaults", "the built-in alert rules are invalid: %s", err);
	return r;
}

/* ---- webhook helpers ---- */

int alerts_webhook_url_check(const char *url, char *err, size_t errlen)
{
	struct http_client_url u;
	struct in_addr a4;

	if (http_client_url_parse(url, &u) == -1) {
		snprintf(err, errlen, "alert_webhook_url is not an http(s) URL");
		return -1;
	}
	if (u.tls)
		return 0;
	if (strcmp(u.host, "localhost") == 0 || strcmp(u.host, "::1") == 0 ||
	    (inet_pton(AF_INET, u.host, &a4) == 1 && (ntohl(a4.s_addr) >> 24) == 127))
		return 0;
	snprintf(err, errlen, "alert_webhook_url must be https (http only to a loopback address)");
	return -1;
}

int alerts_webhook_sign(const unsigned char *key, size_t keylen, const char *ts, const char *body,
                        size_t body_len, char out[72])
{
	unsigned char mac[EVP_MAX_MD_SIZE];
	unsigned int maclen = 0;
	size_t tslen = strlen(ts);
	/* The timestamp is bound in: the signed message is "<ts>.<body>". */
	char *msg = xmalloc(tslen + 1 + body_len);
	int rc = -1;

	memcpy(msg, ts, tslen);
	msg[tslen] = '.';
	memcpy(msg + tslen + 1, body, body_len);
	if (HMAC(EVP_sha256(), key, (int)keylen, (const unsigned char *)msg, tslen + 1 + body_len,
	         mac, &maclen) == NULL ||
	    maclen != 32)
		goto fail;
	memcpy(out, "sha256=", 7);
	cs_hex(out + 7, mac, 32);
	rc = 0;
fail:
	free(msg);
	cs_wipe(mac, sizeof(mac));
	return rc;
}

/* ---- the evaluator ---- */

enum alerts_state {
	ALERTS_IDLE,       /* waiting for the next tick */
	ALERTS_EVALUATING, /* alert_evaluate running */
	ALERTS_CLAIMING,   /* alert_claim_delivery running */
	ALERTS_DELIVERING, /* webhook calls in flight */
};

enum alerts_event {
	ALERTS_TICK,    /* the timer fired */
	ALERTS_DB_DONE, /* the pending query answered */
	ALERTS_SENT,    /* a webhook call ended */
};

struct alerts_delivery {
	struct http_call *call; /* owned until it calls back */
	char id[37];
};

static struct {
	struct db_pool *pool; /* borrowed */
	struct event *ev;     /* owned; the evaluation timer */
	struct db_query *q;   /* pending query, or NULL */
	enum alerts_state state;
	char *rules;           /* owned; normalized rules as JSON text */
	char *webhook_url;     /* owned; NULL: no webhook */
	unsigned char *secret; /* owned; wiped at free */
	size_t secret_len;
	struct http_client *client; /* owned; NULL without a webhook */
	struct alerts_delivery deliveries[ALERTS_DELIVER_BATCH];
	int ndeliveries; /* slots used in deliveries[] */
	int inflight;    /* of them still waiting */
	bool running;
} alerts_g;

static void alerts_advance(enum alerts_event ev, const PGresult *res);

static void alerts_db_cb(void *arg, enum db_event ev, const PGresult *res)
{
	alerts_g.q = NULL;
	if (ev != DB_OK) {
		log_warnx("alerts_query_failed", "%s",
		          res != NULL ? PQresultErrorMessage(res) : "database unavailable");
		alerts_g.state = ALERTS_IDLE;
		return;
	}
	alerts_advance(ALERTS_DB_DONE, res);
}

static void alerts_mark_cb(void *arg, enum db_event ev, const PGresult *res)
{
	if (ev != DB_OK)
		log_warnx("alert_delivery_not_recorded", "the alert was delivered; marking failed");
}

static void alerts_sent_cb(const struct http_client_result *res, void *arg)
{
	struct alerts_delivery *d = arg;

	d->call = NULL;
	if (res->error == HTTP_CLIENT_OK && res->status >= 200 && res->status < 300) {
		const char *p[1] = { d->id };

		if (db_query(
		        alerts_g.pool,
		        "UPDATE security_alerts SET delivered_at = clock_timestamp() WHERE id = $1",
		        1, p, alerts_mark_cb, NULL) == NULL)
			log_warnx("alert_delivery_not_recorded", "the database is unavailable");
	} else {
		log_warnx("alert_webhook_failed", "alert %s: %s %d; retried with backoff", d->id,
		          http_client_error_name(res->error), res->status);
	}
	alerts_advance(ALERTS_SENT, NULL);
}

static void alerts_send(const char *id, const char *payload)
{
	struct alerts_delivery *d = &alerts_g.deliveries[alerts_g.ndeliveries];
	struct http_client_header h[3];
	struct http_client_request rq;
	char ts[32], sig[72];

	snprintf(ts, sizeof(ts), "%lld", (long long)time(NULL));
	if (alerts_webhook_sign(alerts_g.secret, alerts_g.secret_len, ts, payload, strlen(payload),
	                        sig) == -1) {
		log_warnx("alert_webhook_failed", "cannot sign alert %s", id);
		return;
	}
	snprintf(d->id, sizeof(d->id), "%s", id);
	h[0] = (struct http_client_header){ "Content-Type", "application/json" };
	h[1] = (struct http_client_header){ "X-CloudSweep-Timestamp", ts };
	h[2] = (struct http_client_header){ "X-CloudSweep-Signature", sig };
	memset(&rq, 0, sizeof(rq));
	rq.method = "POST";
	rq.url = alerts_g.webhook_url;
	rq.headers = h;
	rq.nheaders = 3;
	rq.body = payload;
	rq.body_len = strlen(payload);
	rq.deadline_ms = 10000;
	d->call = http_client_request(alerts_g.client, &rq, alerts_sent_cb, d);
	if (d->call == NULL) {
		log_warnx("alert_webhook_failed", "the request for alert %s was refused", id);
		return;
	}
	alerts_g.ndeliveries++;
	alerts_g.inflight++;
}

/* One JSON log line per new alert. */
static void alerts_log_new(const PGresult *res)
{
	for (int i = 0; i < PQntuples(res); i++) {
		json_t *f =
		    json_pack("{s:s, s:s, s:s, s:s, s:s, s:s}", "msg", "security alert raised",
		              "alert_id", PQgetvalue(res, i, 0), "org_id", PQgetvalue(res, i, 1),
		              "rule", PQgetvalue(res, i, 2), "severity", PQgetvalue(res, i, 3),
		              "subject", PQgetvalue(res, i, 4));

		if (f == NULL)
			continue;
		if (json_object_set_new(f, "count", json_integer(atoll(PQgetvalue(res, i, 5)))) ==
		    -1)
			log_warnx("security_alert", "cannot add the count");
		log_fields(LOG_LVL_WARN, "security_alert", f);
	}
}

static void alerts_claim(void)
{
	char lim[16], max[16];
	const char *p[2] = { lim, max };

	snprintf(lim, sizeof(lim), "%d", ALERTS_DELIVER_BATCH);
	snprintf(max, sizeof(max), "%d", ALERTS_MAX_ATTEMPTS);
	alerts_g.state = ALERTS_CLAIMING;
	alerts_g.q = db_query_prepared(alerts_g.pool, "alert_claim", 2, p, alerts_db_cb, NULL);
	if (alerts_g.q == NULL)
		alerts_g.state = ALERTS_IDLE;
}

/* The one function that moves the evaluator. */
static void alerts_advance(enum alerts_event ev, const PGresult *res)
{
	switch (alerts_g.state) {
	case ALERTS_IDLE: {
		char batch[16];
		const char *p[2] = { alerts_g.rules, batch };

		if (ev != ALERTS_TICK)
			return;
		snprintf(batch, sizeof(batch), "%d", ALERTS_BATCH);
		alerts_g.state = ALERTS_EVALUATING;
		alerts_g.q =
		    db_query_prepared(alerts_g.pool, "alert_evaluate", 2, p, alerts_db_cb, NULL);
		if (alerts_g.q == NULL)
			alerts_g.state = ALERTS_IDLE; /* the database is down: next tick */
		return;
	}
	case ALERTS_EVALUATING:
		if (ev != ALERTS_DB_DONE)
			return;
		alerts_log_new(res);
		if (alerts_g.client == NULL) {
			alerts_g.state = ALERTS_IDLE;
			return;
		}
		alerts_claim();
		return;
	case ALERTS_CLAIMING:
		if (ev != ALERTS_DB_DONE)
			return;
		alerts_g.ndeliveries = 0;
		alerts_g.inflight = 0;
		for (int i = 0; i < PQntuples(res) && i < ALERTS_DELIVER_BATCH; i++)
			alerts_send(PQgetvalue(res, i, 0), PQgetvalue(res, i, 1));
		alerts_g.state = alerts_g.inflight > 0 ? ALERTS_DELIVERING : ALERTS_IDLE;
		return;
	case ALERTS_DELIVERING:
		if (ev != ALERTS_SENT)
			return;
		if (--alerts_g.inflight == 0)
			alerts_g.state = ALERTS_IDLE;
		return;
	}
}

static void alerts_tick_cb(evutil_socket_t fd, short what, void *arg)
{
	alerts_advance(ALERTS_TICK, NULL);
}

int alerts_config_check(const struct config *cfg, char *err, size_t errlen)
{
	char why[256];
	json_t *rules;
	size_t len;
	char *text;

	if (*cfg->alert_webhook_url != '\0') {
		if (alerts_webhook_url_check(cfg->alert_webhook_url, err, errlen) == -1)
			return -1;
		if (*cfg->alert_webhook_secret_file == '\0') {
			snprintf(err, errlen, "alert_webhook_url needs alert_webhook_secret_file");
			return -1;
		}
	}
	if (*cfg->alert_rules_file == '\0')
		return 0;
	text = cs_read_file(cfg->alert_rules_file, 1 << 20, &len);
	if (text == NULL) {
		snprintf(err, errlen, "alert_rules_file: cannot read %s", cfg->alert_rules_file);
		return -1;
	}
	rules = alerts_rules_parse(text, why, sizeof(why));
	free(text);
	if (rules == NULL) {
		snprintf(err, errlen, "alert_rules_file: %s", why);
		return -1;
	}
	json_decref(rules);
	return 0;
}

static int alerts_load_rules(const struct config *cfg)
{
	char err[256];
	json_t *rules;

	if (*cfg->alert_rules_file == '\0') {
		rules = alerts_rules_default();
	} else {
		size_t len;
		char *text = cs_read_file(cfg->alert_rules_file, 1 << 20, &len);

		if (text == NULL) {
			log_warn("alerts_init", "cannot read alert_rules_file");
			return -1;
		}
		rules = alerts_rules_parse(text, err, sizeof(err));
		free(text);
		if (rules == NULL) {
			log_warnx("alerts_init", "alert_rules_file: %s", err);
			return -1;
		}
	}
	alerts_g.rules = json_dumps(rules, JSON_COMPACT);
	json_decref(rules);
	return alerts_g.rules != NULL ? 0 : -1;
}

static int alerts_load_webhook(struct event_base *base, const struct config *cfg)
{
	struct http_client_options o;
	char err[256];
	char *secret;
	size_t len;

	if (*cfg->alert_webhook_url == '\0')
		return 0;
	if (alerts_webhook_url_check(cfg->alert_webhook_url, err, sizeof(err)) == -1) {
		log_warnx("alerts_init", "%s", err);
		return -1;
	}
	if (*cfg->alert_webhook_secret_file == '\0') {
		log_warnx("alerts_init", "alert_webhook_url needs alert_webhook_secret_file");
		return -1;
	}
	secret = cs_read_file(cfg->alert_webhook_secret_file, ALERTS_SECRET_MAX, &len);
	if (secret == NULL) {
		log_warn("alerts_init", "cannot read alert_webhook_secret_file");
		return -1;
	}
	cs_rstrip(secret);
	len = strlen(secret);
	if (len < 16) {
		cs_free_secret(secret);
		log_warnx("alerts_init", "the alert webhook secret must be at least 16 bytes");
		return -1;
	}
	alerts_g.secret = (unsigned char *)secret;
	alerts_g.secret_len = len;
	memset(&o, 0, sizeof(o));
	o.ca_file = *cfg->alert_webhook_ca_file != '\0' ? cfg->alert_webhook_ca_file : NULL;
	o.max_conns_per_host = 2;
	alerts_g.client = http_client_new(base, &o);
	if (alerts_g.client == NULL)
		return -1;
	alerts_g.webhook_url = xstrdup(cfg->alert_webhook_url);
	return 0;
}

int alerts_worker_init(struct event_base *base, const struct config *cfg, struct db_pool *pool)
{
	struct timeval tv = { (time_t)cfg->alert_interval_s, 0 };

	memset(&alerts_g, 0, sizeof(alerts_g));
	alerts_g.pool = pool;
	if (alerts_load_rules(cfg) == -1 || alerts_load_webhook(base, cfg) == -1)
		goto fail;
	if (db_pool_prepare(pool, "alert_evaluate",
	                    "SELECT id, org_id, rule, severity, subject, count "
	                    "FROM alert_evaluate($1::jsonb, $2::int)",
	                    2) == -1 ||
	    db_pool_prepare(pool, "alert_claim",
	                    "SELECT id, payload FROM alert_claim_delivery($1::int, $2::int)",
	                    2) == -1)
		goto fail;
	alerts_g.ev = event_new(base, -1, EV_PERSIST, alerts_tick_cb, NULL);
	if (alerts_g.ev == NULL || event_add(alerts_g.ev, &tv) == -1)
		goto fail;
	alerts_g.running = true;
	retention_start(base, cfg, pool);
	return 0;
fail:
	alerts_worker_free();
	return -1;
}

void alerts_worker_free(void)
{
	if (alerts_g.running)
		retention_stop();
	if (alerts_g.ev != NULL)
		event_free(alerts_g.ev);
	if (alerts_g.q != NULL)
		db_query_cancel(alerts_g.q);
	for (int i = 0; i < alerts_g.ndeliveries; i++)
		if (alerts_g.deliveries[i].call != NULL)
			http_call_cancel(alerts_g.deliveries[i].call);
	if (alerts_g.client != NULL)
		http_client_free(alerts_g.client);
	if (alerts_g.secret != NULL)
		cs_free_secret((char *)alerts_g.secret);
	free(alerts_g.rules);
	free(alerts_g.webhook_url);
	memset(&alerts_g, 0, sizeof(alerts_g));
}
