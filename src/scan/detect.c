/*
 * detect.c - the engine behind every detector (see detect_int.h): queued
 * describes and CloudWatch batches run with bounded concurrency through
 * the worker's AWS client, each response's list converted to JSON, phases
 * run from the event loop so a detector never reports from inside start().
 */
#include "config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <event2/event.h>

#include "cloudsweep/log.h"
#include "detect_int.h"
#include "scan_int.h"

struct det_call {
	struct det_call *next;
	struct det *d; /* borrowed; the owner */
	enum aws_service service;
	char *action, *token, *list, *key; /* owned */
	const char *const *checks;         /* static */
	char **strs;                       /* owned: name, value, name, value, ... */
	size_t nparams, cap;
	json_t *ids; /* CloudWatch: query ids of this batch (owned), or NULL */
	bool started;
	struct aws_pager *pager;
};

static void det_pump(struct det *d);

/* ---- XML to JSON ---- */

static json_t *det_xml_json(const struct aws_xml_node *n)
{
	const struct aws_xml_node *c;
	bool same = true, list;
	size_t nchild = 0;
	size_t len;
	json_t *out;

	if (n->child == NULL)
		return json_stringn(n->text, n->text_len);
	for (c = n->child; c != NULL; c = c->next, nchild++)
		if (strcmp(c->name, n->child->name) != 0)
			same = false;
	len = strlen(n->name);
	list =
	    same && (strcmp(n->child->name, "item") == 0 || strcmp(n->child->name, "member") == 0 ||
	             nchild > 1 || (len > 4 && strcmp(n->name + len - 4, "List") == 0) ||
	             (len > 1 && n->name[len - 1] == 's'));
	if (list) {
		out = json_array();
		for (c = n->child; c != NULL; c = c->next)
			json_array_append_new(out, det_xml_json(c));
		return out;
	}
	out = json_object();
	for (c = n->child; c != NULL; c = c->next)
		json_object_set_new(out, c->name, det_xml_json(c));
	return out;
}

/* ---- calls ---- */

static void det_call_free(struct det_call *c)
{
	size_t i;

	if (c->pager != NULL)
		aws_pager_cancel(c->pager);
	for (i = 0; i < c->nparams * 2; i++)
		free(c->strs[i]);
	free(c->strs);
	free(c->action);
	free(c->token);
	free(c->list);
	free(c->key);
	json_decref(c->ids);
	free(c);
}

static void det_call_unlink(struct det *d, struct det_call *c)
{
	struct det_call **pp, *prev = NULL;

	for (pp = (struct det_call **)&d->calls; *pp != NULL; prev = *pp, pp = &(*pp)->next)
		if (*pp == c) {
			*pp = c->next;
			if (d->calls_tail == c)
				d->calls_tail = prev;
			break;
		}
}

static void det_call_failed(struct det *d, struct det_call *c, const struct aws_result *res)
{
	const char *const *ck;
	char msg[256];

	snprintf(msg, sizeof(msg), "%s: %s", c->action,
	         res->message != NULL && res->message[0] != '\0' ? res->message
	                                                         : aws_status_name(res->status));
	for (ck = c->checks; ck != NULL && *ck != NULL; ck++) {
		if (!scan_run_wants(d->run, *ck) || json_object_get(d->skipped, *ck) != NULL)
			continue;
		json_object_set_new(d->skipped, *ck, json_true());
		scan_run_skipped(d->run, *ck,
		                 res->error_code != NULL && res->error_code[0] != '\0'
		                     ? res->error_code
		                     : aws_status_name(res->status),
		                 msg);
	}
}

/* Store a GetMetricData page: {id: [values]} under the call's key. */
static void det_store_metrics(struct det *d, struct det_call *c, const struct aws_xml_node *root)
{
	const struct aws_xml_node *list = aws_xml_find(root, "*/MetricDataResults");
	json_t *obj = json_object_get(d->data, c->key);
	const struct aws_xml_node *m, *v;

	if (obj == NULL) {
		obj = json_object();
		json_object_set_new(d->data, c->key, obj);
	}
	for (m = list != NULL ? list->child : NULL; m != NULL; m = m->next) {
		const char *id = aws_xml_text(m, "Id");
		const struct aws_xml_node *vals = aws_xml_child(m, "Values");
		json_t *arr;

		if (id == NULL)
			continue;
		arr = json_object_get(obj, id);
		if (arr == NULL) {
			arr = json_array();
			json_object_set_new(obj, id, arr);
		}
		for (v = vals != NULL ? vals->child : NULL; v != NULL; v = v->next)
			json_array_append_new(arr, json_real(strtod(v->text, NULL)));
	}
}

static bool det_page_cb(const struct aws_result *res, bool last, void *arg)
{
	struct det_call *c = arg;
	struct det *d = c->d;

	scan_run_api_calls(d->run, 1);
	if (res->status != AWS_OK) {
		det_call_failed(d, c, res);
	} else if (c->ids != NULL) {
		det_store_metrics(d, c, res->xml);
	} else {
		const struct aws_xml_node *list = aws_xml_find(res->xml, c->list);
		json_t *arr = det_list(d, c->key);
		const struct aws_xml_node *it;

		for (it = list != NULL ? list->child : NULL; it != NULL; it = it->next)
			json_array_append_new(arr, det_xml_json(it));
	}
	if (!last)
		return true;
	c->pager = NULL; /* the pager frees itself after its last page */
	det_call_unlink(d, c);
	det_call_free(c);
	d->in_flight--;
	event_active(d->ev, EV_TIMEOUT, 1);
	return false;
}

static void det_call_send(struct det *d, struct det_call *c)
{
	struct aws_param *p = xcalloc(c->nparams + 1, sizeof(*p));
	struct aws_request req = { 0 };
	size_t i;

	for (i = 0; i < c->nparams; i++)
		p[i] = (struct aws_param){ c->strs[2 * i], c->strs[2 * i + 1] };
	req.service = c->service;
	req.region = d->run->region;
	req.creds = d->run->creds;
	req.account = d->run->account_id;
	req.action = c->action;
	req.params = p;
	req.nparams = c->nparams;
	c->started = true;
	d->queued--;
	d->in_flight++;
	/* Unpaginated calls go through the pager too, with a token no answer carries. */
	c->pager = aws_paginate(aws_worker_client(), &req,
	                        c->token != NULL ? c->token : "CloudSweepNoToken", det_page_cb, c);
	free(p);
	if (c->pager == NULL) {
		struct aws_result res = { 0 };

		res.status = AWS_ERR_REQUEST;
		res.error_code = "request";
		res.message = "the request could not be built";
		d->in_flight--;
		det_call_failed(d, c, &res);
		det_call_unlink(d, c);
		det_call_free(c);
	}
}

static struct det_call *det_call_new(struct det *d, enum aws_service service, const char *action,
                                     const char *key, const char *const *checks)
{
	struct det_call *c = xcalloc(1, sizeof(*c));

	c->d = d;
	c->service = service;
	c->action = xstrdup(action);
	c->key = xstrdup(key);
	c->checks = checks;
	if (d->calls_tail != NULL)
		((struct det_call *)d->calls_tail)->next = c;
	else
		d->calls = c;
	d->calls_tail = c;
	d->queued++;
	return c;
}

static void det_call_param(struct det_call *c, const char *name, const char *value)
{
	if (c->nparams >= AWS_PARAMS_MAX)
		return;
	if (c->nparams * 2 + 2 > c->cap) {
		c->cap = c->cap == 0 ? 16 : c->cap * 2;
		c->strs = xrealloc(c->strs, c->cap * sizeof(*c->strs));
	}
	c->strs[2 * c->nparams] = xstrdup(name);
	c->strs[2 * c->nparams + 1] = xstrdup(value);
	c->nparams++;
}

void det_fetch(struct det *d, enum aws_service service, const char *action, const char *token_param,
               const char *list_path, const char *key, const char *const *checks,
               const char *const *params)
{
	struct det_call *c;
	size_t i;

	for (i = 0; checks != NULL && checks[i] != NULL; i++)
		if (!det_skipped(d, checks[i]))
			break;
	if (checks != NULL && checks[i] == NULL)
		return; /* every check it serves is skipped already */
	c = det_call_new(d, service, action, key, checks);
	c->token = token_param != NULL ? xstrdup(token_param) : NULL;
	c->list = xstrdup(list_path);
	(void)det_list(d, key);
	for (i = 0;
	     params != NULL && params[i] != NULL && params[i + 1] != NULL && i < 2 * DET_PARAMS_MAX;
	     i += 2)
		det_call_param(c, params[i], params[i + 1]);
}

void det_metric(struct det *d, const char *key, const char *id, const char *ns, const char *metric,
                const char *dim_name, const char *dim_value, const char *stat, int period_s,
                int days, const char *const *checks)
{
	json_t *q = json_pack("{s:s, s:s, s:s, s:s, s:s, s:s, s:s, s:i, s:i}", "key", key, "id", id,
	                      "ns", ns, "metric", metric, "dim", dim_name, "value", dim_value,
	                      "stat", stat, "period", period_s, "days", days);

	if (q == NULL)
		return;
	json_object_set_new(q, "checks", json_integer((json_int_t)(intptr_t)checks));
	json_array_append_new(d->metrics, q);
}

static void det_iso(time_t t, char *buf, size_t len)
{
	struct tm tm;

	gmtime_r(&t, &tm);
	strftime(buf, len, "%Y-%m-%dT%H:%M:%SZ", &tm);
}

_Static_assert(DET_CW_BATCH * 7 + 5 <= AWS_PARAMS_MAX, "a full GetMetricData batch fits a call");

/* Turn the queued metric queries into GetMetricData calls of up to DET_CW_BATCH queries. */
static void det_metrics_flush(struct det *d)
{
	size_t i, n = json_array_size(d->metrics);
	struct det_call *c = NULL;
	time_t now = time(NULL) / 86400 * 86400;
	char start[32], end[32], name[96], num[24];
	int nq = 0, days = -1, qn;

	for (i = 0; i < n; i++) {
		json_t *q = json_array_get(d->metrics, i);
		int qd = (int)json_integer_value(json_object_get(q, "days"));
		const char *key = json_string_value(json_object_get(q, "key"));

		if (c == NULL || nq == DET_CW_BATCH || qd != days || strcmp(c->key, key) != 0) {
			c = det_call_new(d, AWS_CLOUDWATCH, "GetMetricData", key,
			                 (const char *const *)(intptr_t)json_integer_value(
			                     json_object_get(q, "checks")));
			c->token = xstrdup("NextToken");
			c->list = xstrdup("*/MetricDataResults");
			c->ids = json_array();
			days = qd;
			nq = 0;
			det_iso(now - (time_t)qd * 86400, start, sizeof(start));
			det_iso(now, end, sizeof(end));
			det_call_param(c, "StartTime", start);
			det_call_param(c, "EndTime", end);
			det_call_param(c, "ScanBy", "TimestampAscending");
			det_call_param(c, "MaxDatapoints", "100800"); /* AWS's largest page */
		}
		qn = ++nq;
#define DET_Q(suffix, value)                                                                \
	do {                                                                                \
		snprintf(name, sizeof(name), "MetricDataQueries.member.%d.%s", qn, suffix); \
		det_call_param(c, name, value);                                             \
	} while (0)
		DET_Q("Id", json_string_value(json_object_get(q, "id")));
		DET_Q("MetricStat.Metric.Namespace", json_string_value(json_object_get(q, "ns")));
		DET_Q("MetricStat.Metric.MetricName",
		      json_string_value(json_object_get(q, "metric")));
		DET_Q("MetricStat.Metric.Dimensions.member.1.Name",
		      json_string_value(json_object_get(q, "dim")));
		DET_Q("MetricStat.Metric.Dimensions.member.1.Value",
		      json_string_value(json_object_get(q, "value")));
		snprintf(num, sizeof(num), "%d",
		         (int)json_integer_value(json_object_get(q, "period")));
		DET_Q("MetricStat.Period", num);
		DET_Q("MetricStat.Stat", json_string_value(json_object_get(q, "stat")));
#undef DET_Q
		json_array_append(c->ids, json_object_get(q, "id"));
		if (json_object_get(d->data, key) == NULL)
			json_object_set_new(d->data, key, json_object());
	}
	json_array_clear(d->metrics);
}

/* ---- phases ---- */

#define DET_NO_DATA_IDS 10 /* ids named in an insufficient-data note */

static void det_finish(struct det *d, int status)
{
	struct scan_detector_run *run = d->run;
	const char *check;
	json_t *ids;

	json_object_foreach (d->no_data, check, ids) {
		char msg[1024];
		size_t i, n = json_array_size(ids);
		int off;

		off = snprintf(msg, sizeof(msg),
		               "%zu resources without datapoints, not judged idle:", n);
		for (i = 0; i < n && i < DET_NO_DATA_IDS && off > 0 && (size_t)off < sizeof(msg);
		     i++)
			off += snprintf(msg + off, sizeof(msg) - (size_t)off, " %s",
			                json_string_value(json_array_get(ids, i)));
		if (n > DET_NO_DATA_IDS && off > 0 && (size_t)off < sizeof(msg))
			snprintf(msg + off, sizeof(msg) - (size_t)off, " ...");
		scan_run_note(run, check, "insufficient_data", msg);
	}

	det_cancel(run);
	scan_run_done(run, status);
}

/* Send what the bound allows; run the next phase when the current one is over. */
static void det_pump(struct det *d)
{
	struct det_call *c;

	for (c = d->calls; c != NULL && d->in_flight < DET_IN_FLIGHT;) {
		struct det_call *next = c->next;

		if (!c->started)
			det_call_send(d, c);
		c = next;
	}
	if (d->in_flight > 0 || d->queued > 0)
		return;
	d->phase_fn(d);
	d->phase++;
	det_metrics_flush(d);
	if (d->queued == 0) {
		det_finish(d, 0);
		return;
	}
	event_active(d->ev, EV_TIMEOUT, 1);
}

static void det_ev_cb(evutil_socket_t fd, short what, void *arg)
{
	det_pump(arg);
}

int det_start(struct scan_detector_run *run, det_phase_fn fn)
{
	struct det *d;

	if (aws_worker_client() == NULL || run->creds == NULL)
		return -1;
	d = xcalloc(1, sizeof(*d));
	d->run = run;
	d->phase_fn = fn;
	d->data = json_object();
	d->skipped = json_object();
	d->metrics = json_array();
	d->no_data = json_object();
	d->ev = event_new(scan_g.base, -1, 0, det_ev_cb, d);
	if (d->ev == NULL) {
		json_decref(d->data);
		json_decref(d->skipped);
		json_decref(d->metrics);
		json_decref(d->no_data);
		free(d);
		return -1;
	}
	run->state = d;
	event_active(d->ev, EV_TIMEOUT, 1);
	return 0;
}

void det_cancel(struct scan_detector_run *run)
{
	struct det *d = run->state;

	if (d == NULL)
		return;
	run->state = NULL;
	while (d->calls != NULL) {
		struct det_call *c = d->calls;

		d->calls = c->next;
		det_call_free(c);
	}
	d->calls_tail = NULL;
	event_free(d->ev);
	json_decref(d->data);
	json_decref(d->skipped);
	json_decref(d->metrics);
	json_decref(d->no_data);
	free(d->state);
	free(d);
}

/* ---- helpers for the detectors ---- */

bool det_skipped(const struct det *d, const char *check)
{
	return !scan_run_wants(d->run, check) || json_object_get(d->skipped, check) != NULL;
}

json_t *det_list(struct det *d, const char *key)
{
	json_t *a = json_object_get(d->data, key);

	if (a == NULL) {
		a = json_array();
		json_object_set_new(d->data, key, a);
	}
	return a;
}

long long det_setting(const struct det *d, const char *name, long long def)
{
	json_t *v = json_object_get(d->run->settings, name);

	return json_is_integer(v) ? (long long)json_integer_value(v) : def;
}

const char *det_protect_tag(const struct det *d)
{
	const char *v = json_string_value(json_object_get(d->run->settings, "protect_tag"));

	return v != NULL ? v : "cloudsweep:protect";
}

const char *det_str(const json_t *item, const char *path)
{
	const char *p = path;

	/* Hot: called for every field of every resource, so no copy of each part. */
	while (item != NULL && *p != '\0') {
		size_t n = strcspn(p, "/");

		item = json_object_getn(item, p, n);
		p += p[n] == '/' ? n + 1 : n;
	}
	return json_string_value(item);
}

bool det_protected(const struct det *d, const json_t *item)
{
	static const char *const sets[] = { "tagSet", "TagList", "Tags" };
	const char *tag = det_protect_tag(d);
	size_t i, j;

	for (i = 0; i < CS_ARRAY_LEN(sets); i++) {
		json_t *s = json_object_get(item, sets[i]), *t;

		if (json_is_object(s)) /* one tag, not recognised as a list */
			s = json_object_size(s) == 1 ? json_object_iter_value(json_object_iter(s))
			                             : s;
		if (json_is_object(s)) {
			const char *k =
			    det_str(s, "key") != NULL ? det_str(s, "key") : det_str(s, "Key");

			if (k != NULL && strcmp(k, tag) == 0)
				return true;
			continue;
		}
		json_array_foreach (s, j, t) {
			const char *k =
			    det_str(t, "key") != NULL ? det_str(t, "key") : det_str(t, "Key");

			if (k != NULL && strcmp(k, tag) == 0)
				return true;
		}
	}
	return false;
}

time_t det_time(const char *s)
{
	struct tm tm = { 0 };
	const char *end;

	if (s == NULL)
		return -1;
	end = strptime(s, "%Y-%m-%dT%H:%M:%S", &tm);
	if (end == NULL)
		return -1;
	return timegm(&tm);
}

void det_item(struct det *d, const char *check, const char *resource_id, json_t *details,
              double monthly_usd)
{
	if (det_skipped(d, check) || resource_id == NULL) {
		json_decref(details);
		return;
	}
	if (details == NULL)
		details = json_object();
	json_object_set_new(details, "region", json_string(d->run->region));
	if (scan_run_item(d->run, check, resource_id, details, monthly_usd < 0 ? 0 : monthly_usd) ==
	    -1)
		log_debug("scan_item_dropped", "%s %s", check, resource_id);
}

void det_no_data(struct det *d, const char *check, const char *resource_id)
{
	json_t *a = json_object_get(d->no_data, check);

	if (a == NULL) {
		a = json_array();
		json_object_set_new(d->no_data, check, a);
	}
	json_array_append_new(a, json_string(resource_id));
}
