/*
 * client.c - the async AWS client of a worker: it builds query-protocol and
 * JSON-protocol requests, signs every attempt with SigV4, sends them through
 * the worker's http_client and hands back a parsed answer. Each call is an
 * explicit state machine driven by aws_call_advance():
 *
 *   WAIT_TOKEN -> QUEUED -> SENDING -> DONE
 *        ^                    |
 *        +---- BACKOFF <------+   (retryable answer, attempts and time left)
 *
 * plus DEADLINE from any state. Rate limits come in three layers: a token
 * bucket per (account, service, region, read/write) whose tokens are
 * reserved in arrival order (a bucket may go negative; the call then waits
 * out its own reservation, so waiting calls never race each other), a
 * per-account in-flight cap, and the global in-flight cap. Calls that hold a
 * token wait in their account's queue; the dispatcher serves the accounts
 * with queued calls round-robin, so one account with ten thousand calls
 * queued does not delay another's first call by more than one turn.
 *
 * Lifetimes: a call is freed right after its callback returns, or at
 * cancel; aws_call_cancel() from inside the callback is a no-op. The
 * dispatcher runs from a deferred event, so no callback ever runs inside
 * aws_call(). Credentials are copied into the call and wiped when it ends;
 * request bodies (they may carry KMS plaintext) are wiped too. Nothing here
 * logs parameters, bodies or credentials.
 */
#include "config.h"

#include <ctype.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/queue.h>

#include "cloudsweep/aws.h"
#include "cloudsweep/client.h"
#include "cloudsweep/config.h"
#include "cloudsweep/log.h"

#define AWS_MSG_MAX      512
#define AWS_CODE_MAX     96
#define AWS_REQID_MAX    128
#define AWS_REGION_MAX   32
#define AWS_ACTION_MAX   128
#define AWS_ACCOUNT_MAX  128
#define AWS_BODY_MAX     (1u << 20) /* request bodies we build */
#define AWS_MAP_SWEEP_AT 4096       /* idle accounts/buckets are swept beyond this many */

enum aws_call_state {
	AWS_CALL_WAIT_TOKEN, /* waiting out its rate-limit reservation (ev_timer) */
	AWS_CALL_QUEUED,     /* has its token; in its account's queue for an in-flight slot */
	AWS_CALL_SENDING,    /* its HTTP request is outstanding (http) */
	AWS_CALL_BACKOFF,    /* sleeping before the next attempt (ev_timer) */
	AWS_CALL_DONE,       /* its callback runs; then it is freed */
};

enum aws_call_event {
	AWS_EV_START,    /* aws_call() accepted it, or a backoff ended: take a token */
	AWS_EV_TOKEN,    /* the reservation has been waited out */
	AWS_EV_SLOT,     /* the dispatcher gave it an in-flight slot */
	AWS_EV_DEADLINE, /* the call's deadline passed */
};

/* Service table: protocol, API version, SigV4 signing name, endpoint prefix, SDK id. */
static const struct aws_service_info {
	const char *name;    /* short name for logs */
	const char *signing; /* SigV4 service in the credential scope */
	const char *prefix;  /* endpoint host prefix */
	const char *sdk_id;  /* AWS_ENDPOINT_URL_<sdk_id> */
	const char *version; /* query protocol API version; NULL: JSON protocol */
	const char *target;  /* JSON protocol X-Amz-Target prefix */
} aws_services[AWS_SERVICE_COUNT] = {
	[AWS_EC2] = { "ec2", "ec2", "ec2", "EC2", "2016-11-15", NULL },
	[AWS_STS] = { "sts", "sts", "sts", "STS", "2011-06-15", NULL },
	[AWS_RDS] = { "rds", "rds", "rds", "RDS", "2014-10-31", NULL },
	[AWS_ELB] = { "elb", "elasticloadbalancing", "elasticloadbalancing",
	              "ELASTIC_LOAD_BALANCING", "2012-06-01", NULL },
	[AWS_ELBV2] = { "elbv2", "elasticloadbalancing", "elasticloadbalancing",
	                "ELASTIC_LOAD_BALANCING_V2", "2015-12-01", NULL },
	[AWS_CLOUDWATCH] = { "cloudwatch", "monitoring", "monitoring", "CLOUDWATCH", "2010-08-01",
	                     NULL },
	[AWS_KMS] = { "kms", "kms", "kms", "KMS", NULL, "TrentService" },
};

/* Error codes AWS uses for throttling; all are retried. */
static const char *const aws_throttle_codes[] = {
	"Throttling",
	"ThrottlingException",
	"ThrottledException",
	"RequestLimitExceeded",
	"TooManyRequestsException",
	"RequestThrottled",
	"RequestThrottledException",
	"ProvisionedThroughputExceededException",
	"EC2ThrottledException",
	"SlowDown",
	"PriorRequestNotComplete",
	"BandwidthLimitExceeded",
};

/* A string-keyed hash table entry, embedded first in accounts and buckets. */
struct aws_map_entry {
	char *key; /* owned */
	uint32_t hash;
	struct aws_map_entry *next; /* borrowed; chain */
};

struct aws_map {
	struct aws_map_entry **slots; /* owned array */
	size_t nslots, count;
	size_t sweep_at; /* sweep when count exceeds this; 0: AWS_MAP_SWEEP_AT */
};

/* A token bucket: tokens may go negative (reservations of waiting calls). */
struct aws_bucket {
	struct aws_map_entry e;
	double tokens;
	double rate, burst;
	uint64_t at_us; /* when tokens was last brought up to date */
};

TAILQ_HEAD(aws_call_list, aws_call);

/* One AWS account's share of the client. */
struct aws_account {
	struct aws_map_entry e;
	int in_flight;              /* its calls SENDING */
	int ncalls;                 /* its calls not DONE (they point here) */
	struct aws_call_list queue; /* QUEUED calls, oldest first */
	bool ready;                 /* on client->ready */
	TAILQ_ENTRY(aws_account) link;
};

TAILQ_HEAD(aws_account_list, aws_account);

struct aws_call {
	struct aws_client *client; /* borrowed */
	struct aws_account *acct;  /* borrowed; ncalls keeps it alive */
	enum aws_call_state state;
	enum aws_service service;
	char region[AWS_REGION_MAX + 1];
	char action[AWS_ACTION_MAX + 1];
	char bucket_key[AWS_ACCOUNT_MAX + AWS_REGION_MAX + 32];
	char *url;  /* owned */
	char *host; /* owned; the Host header the HTTP client will send */
	char *path; /* owned; the request path (signed) */
	char *body; /* owned; wiped when freed */
	size_t body_len;
	char *target;                       /* owned; X-Amz-Target, JSON protocol only */
	struct aws_owned_credentials creds; /* owned copy; wiped when freed */
	bool mutating;
	int attempts;
	int deadline_ms;
	uint64_t started_ms;
	struct event *ev_timer;    /* owned; token wait and backoff */
	struct event *ev_deadline; /* owned */
	struct http_call *http;    /* owned handle while SENDING */
	/* the last failed attempt, for the final message */
	enum aws_status last_status;
	bool last_timeout;
	int last_http;
	char last_code[AWS_CODE_MAX];
	char last_msg[AWS_MSG_MAX];
	/* the result being delivered */
	char code[AWS_CODE_MAX];
	char msg[AWS_MSG_MAX];
	char reqid[AWS_REQID_MAX];
	bool in_callback;
	aws_call_cb cb;
	void *arg;
	TAILQ_ENTRY(aws_call) link; /* in acct->queue while QUEUED */
	TAILQ_ENTRY(aws_call) all;  /* in client->calls until freed */
};

struct aws_client {
	struct event_base *base;            /* borrowed */
	struct http_client *http;           /* owned */
	struct sigv4_signer *signer;        /* owned */
	struct aws_client_options opt;      /* string pointers cleared; see below */
	char *endpoints[AWS_SERVICE_COUNT]; /* owned; resolved overrides, NULL: default */
	struct aws_map accounts;
	struct aws_map buckets;
	struct aws_account_list ready; /* accounts with queued calls and room in flight */
	struct aws_call_list calls;    /* every call not yet freed */
	struct event *ev_dispatch;     /* owned; deferred dispatch */
	int in_flight;
	uint64_t rng;
	struct aws_client_stats stats;
	struct aws_sts_cache *sts; /* owned by sts.c */
};

static void aws_call_advance(struct aws_call *call, enum aws_call_event ev);
static void aws_call_finish(struct aws_call *call, enum aws_status st, int http_status,
                            const struct aws_xml_node *xml, json_t *json, const char *fmt, ...)
    CS_PRINTF(6, 7);

const char *aws_status_name(enum aws_status st)
{
	static const char *const names[] = { "ok",      "service",  "throttled", "timeout",
		                             "network", "response", "request" };

	return (size_t)st < CS_ARRAY_LEN(names) ? names[st] : "unknown";
}

/* --- small helpers --- */

static uint32_t aws_hash(const char *s)
{
	uint32_t h = 2166136261u;

	for (; *s != '\0'; s++)
		h = (h ^ (unsigned char)*s) * 16777619u;
	return h;
}

static struct aws_map_entry *aws_map_find(const struct aws_map *m, const char *key)
{
	uint32_t h = aws_hash(key);

	if (m->nslots == 0)
		return NULL;
	for (struct aws_map_entry *e = m->slots[h % m->nslots]; e != NULL; e = e->next)
		if (e->hash == h && strcmp(e->key, key) == 0)
			return e;
	return NULL;
}

static void aws_map_insert(struct aws_map *m, struct aws_map_entry *e, const char *key)
{
	e->key = xstrdup(key);
	e->hash = aws_hash(key);
	if (m->count + 1 > m->nslots) {
		size_t n = m->nslots ? m->nslots * 2 : 64;
		struct aws_map_entry **slots = xcalloc(n, sizeof(*slots));

		for (size_t i = 0; i < m->nslots; i++) {
			struct aws_map_entry *x, *next;

			for (x = m->slots[i]; x != NULL; x = next) {
				next = x->next;
				x->next = slots[x->hash % n];
				slots[x->hash % n] = x;
			}
		}
		free(m->slots);
		m->slots = slots;
		m->nslots = n;
	}
	e->next = m->slots[e->hash % m->nslots];
	m->slots[e->hash % m->nslots] = e;
	m->count++;
}

/* Remove (and free) every entry for which drop(entry) is true. */
static void aws_map_sweep(struct aws_map *m, bool (*drop)(struct aws_map_entry *, void *),
                          void *arg)
{
	for (size_t i = 0; i < m->nslots; i++) {
		struct aws_map_entry **pp = &m->slots[i];

		while (*pp != NULL) {
			struct aws_map_entry *e = *pp;

			if (drop(e, arg)) {
				*pp = e->next;
				free(e->key);
				free(e);
				m->count--;
			} else {
				pp = &e->next;
			}
		}
	}
}

/*
 * aws_map_sweep once count exceeds the map's threshold, which then becomes
 * max(AWS_MAP_SWEEP_AT, 2 * count): when little can be dropped the next
 * sweep waits until the map has doubled, so sweeping stays O(1) amortized.
 */
static void aws_map_sweep_due(struct aws_map *m, bool (*drop)(struct aws_map_entry *, void *),
                              void *arg)
{
	if (m->count <= (m->sweep_at != 0 ? m->sweep_at : AWS_MAP_SWEEP_AT))
		return;
	aws_map_sweep(m, drop, arg);
	m->sweep_at = m->count > AWS_MAP_SWEEP_AT / 2 ? 2 * m->count : AWS_MAP_SWEEP_AT;
}

static bool aws_drop_all(struct aws_map_entry *e, void *arg)
{
	(void)e;
	(void)arg;
	return true;
}

static void aws_map_free(struct aws_map *m)
{
	aws_map_sweep(m, aws_drop_all, NULL);
	free(m->slots);
	memset(m, 0, sizeof(*m));
}

/* xorshift64*: jitter needs speed, not secrecy. */
static double aws_random01(struct aws_client *cl)
{
	uint64_t x = cl->rng;

	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	cl->rng = x;
	return (double)((x * 2685821657736338717ULL) >> 11) / 9007199254740992.0;
}

static void aws_arm(struct event *ev, long long ms)
{
	struct timeval tv;

	if (ms < 0)
		ms = 0;
	tv.tv_sec = (time_t)(ms / 1000);
	tv.tv_usec = (suseconds_t)(ms % 1000) * 1000;
	if (event_add(ev, &tv) == -1)
		fatalx("event_add", "cannot arm an AWS call timer");
}

static bool aws_region_ok(const char *r)
{
	size_t n = strlen(r);

	if (n == 0 || n > AWS_REGION_MAX)
		return false;
	for (; *r != '\0'; r++)
		if (!(islower((unsigned char)*r) || isdigit((unsigned char)*r) || *r == '-'))
			return false;
	return true;
}

static bool aws_token_ok(const char *s, size_t max)
{
	size_t n = strlen(s);

	if (n == 0 || n > max)
		return false;
	for (; *s != '\0'; s++)
		if (!(isalnum((unsigned char)*s) || *s == '_' || *s == '-' || *s == '.'))
			return false;
	return true;
}

/* --- endpoints --- */

const char *aws_client_endpoint(struct aws_client *cl, enum aws_service svc, const char *region,
                                char *buf, size_t len)
{
	const struct aws_service_info *si;

	if ((unsigned)svc >= AWS_SERVICE_COUNT || region == NULL || !aws_region_ok(region)) {
		snprintf(buf, len, "%s", "");
		return buf;
	}
	si = &aws_services[svc];
	if (cl->endpoints[svc] != NULL) {
		size_t n = strlen(cl->endpoints[svc]);

		while (n > 0 && cl->endpoints[svc][n - 1] == '/')
			n--;
		snprintf(buf, len, "%.*s", (int)n, cl->endpoints[svc]);
	} else {
		snprintf(buf, len, "https://%s.%s.amazonaws.com%s", si->prefix, region,
		         strncmp(region, "cn-", 3) == 0 ? ".cn" : "");
	}
	return buf;
}

/* Resolve one service's override: options per service, options global, env per service, env. */
static char *aws_endpoint_resolve(const struct aws_client_options *opt, enum aws_service svc)
{
	const char *v = opt->endpoint_urls[svc];
	char name[96];

	if (v == NULL || *v == '\0')
		v = opt->endpoint_url;
	if ((v == NULL || *v == '\0') && !opt->no_env) {
		snprintf(name, sizeof(name), "AWS_ENDPOINT_URL_%s", aws_services[svc].sdk_id);
		v = getenv(name);
		if (v == NULL || *v == '\0')
			v = getenv("AWS_ENDPOINT_URL");
	}
	return v != NULL && *v != '\0' ? xstrdup(v) : NULL;
}

/* --- rate limits --- */

static struct aws_account *aws_account_get(struct aws_client *cl, const char *name)
{
	struct aws_account *a = (struct aws_account *)(void *)aws_map_find(&cl->accounts, name);

	if (a != NULL)
		return a;
	a = xcalloc(1, sizeof(*a));
	TAILQ_INIT(&a->queue);
	aws_map_insert(&cl->accounts, &a->e, name);
	return a;
}

static bool aws_account_idle(struct aws_map_entry *e, void *arg)
{
	struct aws_account *a = (struct aws_account *)(void *)e;

	(void)arg;
	return a->ncalls == 0;
}

/* Reserve one token of key's bucket; how long to wait (ms) until it is ours. */
static long long aws_bucket_take(struct aws_client *cl, const char *key, bool mutating)
{
	struct aws_bucket *b = (struct aws_bucket *)(void *)aws_map_find(&cl->buckets, key);
	uint64_t now = cs_now_us();

	if (b == NULL) {
		b = xcalloc(1, sizeof(*b));
		b->rate = mutating ? cl->opt.write_rate : cl->opt.read_rate;
		b->burst = mutating ? cl->opt.write_burst : cl->opt.read_burst;
		b->tokens = b->burst;
		b->at_us = now;
		aws_map_insert(&cl->buckets, &b->e, key);
	}
	b->tokens += (double)(now - b->at_us) / 1e6 * b->rate;
	if (b->tokens > b->burst)
		b->tokens = b->burst;
	b->at_us = now;
	b->tokens -= 1.0;
	return b->tokens >= 0 ? 0 : (long long)(-b->tokens / b->rate * 1000.0) + 1;
}

static bool aws_bucket_full(struct aws_map_entry *e, void *arg)
{
	struct aws_bucket *b = (struct aws_bucket *)(void *)e;
	uint64_t now = *(const uint64_t *)arg;

	return b->tokens + (double)(now - b->at_us) / 1e6 * b->rate >= b->burst;
}

static void aws_account_mark_ready(struct aws_client *cl, struct aws_account *a)
{
	if (!a->ready && !TAILQ_EMPTY(&a->queue) &&
	    a->in_flight < cl->opt.max_in_flight_per_account) {
		TAILQ_INSERT_TAIL(&cl->ready, a, link);
		a->ready = true;
	}
	if (a->ready)
		event_active(cl->ev_dispatch, EV_TIMEOUT, 1);
}

static void aws_dispatch_cb(evutil_socket_t fd, short what, void *arg)
{
	struct aws_client *cl = arg;
	struct aws_account *a;

	(void)fd;
	(void)what;
	while (cl->in_flight < cl->opt.max_in_flight && (a = TAILQ_FIRST(&cl->ready)) != NULL) {
		struct aws_call *call = TAILQ_FIRST(&a->queue);

		TAILQ_REMOVE(&cl->ready, a, link);
		a->ready = false;
		if (call == NULL || a->in_flight >= cl->opt.max_in_flight_per_account)
			continue; /* re-marked when one of its calls ends */
		TAILQ_REMOVE(&a->queue, call, link);
		cl->stats.waiting--;
		aws_account_mark_ready(cl, a); /* to the back of the line */
		aws_call_advance(call, AWS_EV_SLOT);
	}
}

/* --- responses --- */

static bool aws_is_throttle(const char *code, int http_status)
{
	if (http_status == 429)
		return true;
	for (size_t i = 0; i < CS_ARRAY_LEN(aws_throttle_codes); i++)
		if (strcmp(code, aws_throttle_codes[i]) == 0)
			return true;
	return false;
}

static bool aws_is_retryable_status(int s)
{
	return s == 429 || s == 500 || s == 502 || s == 503 || s == 504;
}

/* The request id: the header, else the body's. */
static void aws_request_id(struct aws_call *call, const struct http_client_result *res,
                           const struct aws_xml_node *root)
{
	const char *v = http_client_result_header(res, "x-amzn-RequestId");

	if (v == NULL)
		v = http_client_result_header(res, "x-amz-request-id");
	if (v == NULL && root != NULL) {
		v = aws_xml_text(root, "RequestId");
		if (v == NULL)
			v = aws_xml_text(root, "RequestID");
		if (v == NULL)
			v = aws_xml_text(root, "requestId");
		if (v == NULL)
			v = aws_xml_text(root, "ResponseMetadata/RequestId");
	}
	snprintf(call->reqid, sizeof(call->reqid), "%s", v != NULL ? v : "");
}

/* Code and message of an XML error body (EC2's Response/Errors/Error or ErrorResponse/Error). */
static void aws_xml_error(const struct aws_xml_node *root, char *code, size_t codelen, char *msg,
                          size_t msglen)
{
	const struct aws_xml_node *e = aws_xml_find(root, "Errors/Error");
	const char *c, *m;

	if (e == NULL)
		e = aws_xml_child(root, "Error");
	c = aws_xml_text(e, "Code");
	m = aws_xml_text(e, "Message");
	snprintf(code, codelen, "%s", c != NULL ? c : "");
	snprintf(msg, msglen, "%s", m != NULL ? m : "");
}

/* Code and message of a JSON error body ({"__type": "ns#Code", "message": ...}). */
static void aws_json_error(json_t *doc, const struct http_client_result *res, char *code,
                           size_t codelen, char *msg, size_t msglen)
{
	const char *c = json_string_value(json_object_get(doc, "__type"));
	const char *m = json_string_value(json_object_get(doc, "message"));
	const char *h = http_client_result_header(res, "x-amzn-ErrorType");

	if (c == NULL)
		c = json_string_value(json_object_get(doc, "code"));
	if (c == NULL && h != NULL)
		c = h;
	if (m == NULL)
		m = json_string_value(json_object_get(doc, "Message"));
	if (c != NULL && strchr(c, '#') != NULL)
		c = strchr(c, '#') + 1;
	snprintf(code, codelen, "%.*s", (int)(c != NULL ? strcspn(c, ":") : 0), c != NULL ? c : "");
	snprintf(msg, msglen, "%s", m != NULL ? m : "");
}

/* Decide what to do after a failed attempt: retry later, or finish now. */
static void aws_call_failed(struct aws_call *call, enum aws_status st, int http_status,
                            const char *label, const char *code, const char *msg, bool retryable,
                            const struct aws_xml_node *xml, json_t *json)
{
	struct aws_client *cl = call->client;
	long long remaining, sleep_ms, cap;

	call->last_status = st;
	call->last_http = http_status;
	snprintf(call->last_code, sizeof(call->last_code), "%s", code);
	snprintf(call->last_msg, sizeof(call->last_msg), "%s", msg);
	if (!retryable) {
		aws_call_finish(call, st, http_status, xml, json, "%s", msg);
		return;
	}
	if (call->attempts >= cl->opt.attempts) {
		aws_call_finish(call, st, http_status, xml, json, "%s after %d attempt%s%s%s",
		                *code != '\0' ? code : label, call->attempts,
		                call->attempts == 1 ? "" : "s", *msg ? ": " : "", msg);
		return;
	}
	cap = (long long)cl->opt.backoff_base_ms << (call->attempts < 20 ? call->attempts - 1 : 20);
	if (cap > cl->opt.backoff_max_ms)
		cap = cl->opt.backoff_max_ms;
	sleep_ms = (long long)(aws_random01(cl) * (double)cap);
	remaining =
	    (long long)(call->started_ms + (uint64_t)call->deadline_ms) - (long long)cs_now_ms();
	if (sleep_ms > remaining)
		sleep_ms = remaining; /* the deadline fires first and says what happened */
	log_debug("aws_retry", "service=%s action=%s attempt=%d error=%s sleep_ms=%lld",
	          aws_services[call->service].name, call->action, call->attempts,
	          *code ? code : msg, sleep_ms);
	call->state = AWS_CALL_BACKOFF;
	aws_arm(call->ev_timer, sleep_ms);
}

static void aws_http_cb(const struct http_client_result *res, void *arg)
{
	struct aws_call *call = arg;
	struct aws_client *cl = call->client;
	struct aws_xml_doc *doc = NULL;
	json_t *json = NULL;
	const struct aws_xml_node *root = NULL;
	char code[AWS_CODE_MAX] = "", msg[AWS_MSG_MAX] = "", err[256];
	bool query = aws_services[call->service].version != NULL;
	bool secret = call->service == AWS_STS; /* its answers hold temporary credentials */

	call->http = NULL;
	cl->in_flight--;
	cl->stats.in_flight--;
	call->acct->in_flight--;
	aws_account_mark_ready(cl, call->acct);
	if (cl->in_flight < cl->opt.max_in_flight && !TAILQ_EMPTY(&cl->ready))
		event_active(cl->ev_dispatch, EV_TIMEOUT, 1);

	if (res->error != HTTP_CLIENT_OK) {
		enum aws_status st = AWS_ERR_NETWORK;
		bool retry = true;

		call->last_timeout = res->error == HTTP_CLIENT_ERR_TIMEOUT;
		if (res->error == HTTP_CLIENT_ERR_TIMEOUT)
			st = AWS_ERR_TIMEOUT;
		else if (res->error == HTTP_CLIENT_ERR_TOO_LARGE)
			st = AWS_ERR_RESPONSE, retry = false;
		else if (res->error == HTTP_CLIENT_ERR_TLS_VERIFY)
			retry = false;
		aws_call_failed(call, st, 0, http_client_error_name(res->error), "", res->message,
		                retry, NULL, NULL);
		return;
	}
	call->last_timeout = false;
	if (res->body_len > 0 || res->status / 100 == 2) {
		if (query) {
			doc = aws_xml_parse(res->body, res->body_len, err, sizeof(err));
			root = aws_xml_root(doc);
		} else {
			json_error_t jerr;

			json = json_loadb(res->body_len > 0 ? res->body : "{}",
			                  res->body_len > 0 ? res->body_len : 2,
			                  JSON_REJECT_DUPLICATES, &jerr);
			if (json == NULL || !json_is_object(json)) {
				snprintf(err, sizeof(err), "invalid JSON: %s",
				         json ? "not an object" : jerr.text);
				json_decref(json);
				json = NULL;
			}
		}
	}
	aws_request_id(call, res, root);
	if (res->status / 100 == 2) {
		if (root == NULL && json == NULL)
			aws_call_failed(call, AWS_ERR_RESPONSE, res->status, "response", "", err,
			                false, NULL, NULL);
		else
			aws_call_finish(call, AWS_OK, res->status, root, json, "%s", "");
		goto out;
	}
	if (root != NULL)
		aws_xml_error(root, code, sizeof(code), msg, sizeof(msg));
	else if (json != NULL)
		aws_json_error(json, res, code, sizeof(code), msg, sizeof(msg));
	if (*msg == '\0')
		snprintf(msg, sizeof(msg), "HTTP %d", res->status);
	if (aws_is_throttle(code, res->status)) {
		cl->stats.throttled++;
		aws_call_failed(call, AWS_ERR_THROTTLED, res->status, "Throttling", code, msg, true,
		                root, json);
	} else {
		bool retry = aws_is_retryable_status(res->status);

		aws_call_failed(call, retry ? AWS_ERR_THROTTLED : AWS_ERR_SERVICE, res->status,
		                "HTTP error", code, msg, retry, root, json);
	}
out:
	/* call is gone by now; only secret answers are wiped, not every page. */
	if (secret)
		aws_xml_free_secret(doc);
	else
		aws_xml_free(doc);
	json_decref(json);
}

/* --- the call --- */

static void aws_call_timer_cb(evutil_socket_t fd, short what, void *arg)
{
	struct aws_call *call = arg;

	(void)fd;
	(void)what;
	aws_call_advance(call, call->state == AWS_CALL_BACKOFF ? AWS_EV_START : AWS_EV_TOKEN);
}

static void aws_call_deadline_cb(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	aws_call_advance(arg, AWS_EV_DEADLINE);
}

/* Sign and send one attempt. */
static void aws_call_send(struct aws_call *call)
{
	struct aws_client *cl = call->client;
	const struct aws_service_info *si = &aws_services[call->service];
	struct aws_credentials cred = aws_owned_credentials_view(&call->creds);
	const char *ctype = si->version != NULL ? "application/x-www-form-urlencoded; charset=utf-8"
	                                        : "application/x-amz-json-1.1";
	struct sigv4_header sh[3] = { { "Host", call->host },
		                      { "Content-Type", ctype },
		                      { "X-Amz-Target", call->target } };
	struct sigv4_request sr = {
		.method = "POST",
		.path = call->path,
		.headers = sh,
		.nheaders = call->target != NULL ? 3 : 2,
		.payload = call->body,
		.payload_len = call->body_len,
		.region = call->region,
		.service = si->signing,
		.now = time(NULL),
	};
	struct sigv4_result sig;
	struct http_client_header hh[3 + SIGV4_ADD_MAX];
	struct http_client_request hr = { 0 };
	long long remaining =
	    (long long)(call->started_ms + (uint64_t)call->deadline_ms) - (long long)cs_now_ms();
	size_t nh = 0;

	if (sigv4_sign(cl->signer, &cred, &sr, &sig) == -1) {
		aws_call_finish(
		    call, AWS_ERR_REQUEST, 0, NULL, NULL, "%s",
		    "the request could not be signed (credentials or parameters invalid)");
		return;
	}
	hh[nh++] = (struct http_client_header){ "Content-Type", ctype };
	if (call->target != NULL)
		hh[nh++] = (struct http_client_header){ "X-Amz-Target", call->target };
	for (size_t i = 0; i < sig.nheaders; i++)
		hh[nh++] = (struct http_client_header){ sig.headers[i].name, sig.headers[i].value };
	hr.method = "POST";
	hr.url = call->url;
	hr.headers = hh;
	hr.nheaders = nh;
	hr.body = call->body;
	hr.body_len = call->body_len;
	hr.deadline_ms =
	    (int)(remaining < cl->opt.attempt_timeout_ms ? remaining : cl->opt.attempt_timeout_ms);
	if (hr.deadline_ms < 1)
		hr.deadline_ms = 1;
	hr.idempotent = !call->mutating;
	call->http = http_client_request(cl->http, &hr, aws_http_cb, call);
	sigv4_result_clear(&sig);
	if (call->http == NULL) {
		aws_call_finish(call, AWS_ERR_REQUEST, 0, NULL, NULL, "%s",
		                "the HTTP client refused the request (endpoint URL invalid?)");
		return;
	}
	call->attempts++;
	cl->stats.attempts++;
	if (call->attempts > 1)
		cl->stats.retries++;
	call->state = AWS_CALL_SENDING;
	cl->in_flight++;
	call->acct->in_flight++;
	if (++cl->stats.in_flight > cl->stats.max_in_flight)
		cl->stats.max_in_flight = cl->stats.in_flight;
}

/* Leave whatever the call is waiting on (timer, queue, HTTP request). */
static void aws_call_detach(struct aws_call *call)
{
	struct aws_client *cl = call->client;

	event_del(call->ev_timer);
	event_del(call->ev_deadline);
	switch (call->state) {
	case AWS_CALL_QUEUED:
		TAILQ_REMOVE(&call->acct->queue, call, link);
		cl->stats.waiting--;
		break;
	case AWS_CALL_WAIT_TOKEN:
		cl->stats.waiting--;
		break;
	case AWS_CALL_SENDING:
		if (call->http != NULL) {
			http_call_cancel(call->http);
			call->http = NULL;
			cl->in_flight--;
			cl->stats.in_flight--;
			call->acct->in_flight--;
			aws_account_mark_ready(cl, call->acct);
			event_active(cl->ev_dispatch, EV_TIMEOUT, 1);
		}
		break;
	case AWS_CALL_BACKOFF:
	case AWS_CALL_DONE:
		break;
	}
}

static void aws_call_free(struct aws_call *call)
{
	struct aws_client *cl = call->client;

	call->acct->ncalls--;
	TAILQ_REMOVE(&cl->calls, call, all);
	aws_map_sweep_due(&cl->accounts, aws_account_idle, NULL);
	event_free(call->ev_timer);
	event_free(call->ev_deadline);
	if (call->body != NULL)
		cs_wipe(call->body, call->body_len);
	free(call->body);
	free(call->url);
	free(call->host);
	free(call->path);
	free(call->target);
	aws_owned_credentials_clear(&call->creds);
	free(call);
}

static void aws_call_finish(struct aws_call *call, enum aws_status st, int http_status,
                            const struct aws_xml_node *xml, json_t *json, const char *fmt, ...)
{
	struct aws_result r = { 0 };
	va_list ap;

	aws_call_detach(call);
	call->state = AWS_CALL_DONE;
	va_start(ap, fmt);
	vsnprintf(call->msg, sizeof(call->msg), fmt, ap);
	va_end(ap);
	if (st == AWS_OK)
		call->code[0] = '\0';
	else
		snprintf(call->code, sizeof(call->code), "%s", call->last_code);
	if (st != AWS_OK)
		call->client->stats.failed++;
	r.status = st;
	r.http_status = http_status;
	r.error_code = call->code;
	r.message = call->msg;
	r.request_id = call->reqid;
	r.attempts = call->attempts;
	r.xml = xml;
	r.json = json;
	if (st == AWS_ERR_SERVICE) {
		struct aws_credentials view = aws_owned_credentials_view(&call->creds);

		/* Assumed credentials AWS no longer takes leave the STS cache now. */
		aws_sts_credentials_rejected(call->client, &view, &r);
	}
	call->in_callback = true;
	call->cb(&r, call->arg);
	aws_call_free(call);
}

static void aws_call_advance(struct aws_call *call, enum aws_call_event ev)
{
	struct aws_client *cl = call->client;
	long long wait;

	if (ev == AWS_EV_DEADLINE) {
		if (call->last_http != 0 || *call->last_code != '\0')
			aws_call_finish(
			    call, AWS_ERR_TIMEOUT, 0, NULL, NULL,
			    "deadline of %d ms passed after %d attempt%s (last: HTTP %d %s)",
			    call->deadline_ms, call->attempts, call->attempts == 1 ? "" : "s",
			    call->last_http, call->last_code);
		else if (call->attempts > 0 && *call->last_msg != '\0')
			aws_call_finish(call, AWS_ERR_TIMEOUT, 0, NULL, NULL,
			                "deadline of %d ms passed after %d attempt%s (last: %s)",
			                call->deadline_ms, call->attempts,
			                call->attempts == 1 ? "" : "s", call->last_msg);
		else
			aws_call_finish(call, AWS_ERR_TIMEOUT, 0, NULL, NULL,
			                "deadline of %d ms passed after %d attempt%s",
			                call->deadline_ms, call->attempts,
			                call->attempts == 1 ? "" : "s");
		return;
	}
	switch (call->state) {
	case AWS_CALL_BACKOFF: /* AWS_EV_START: the sleep is over */
	case AWS_CALL_WAIT_TOKEN:
		if (ev == AWS_EV_START) {
			cl->stats.waiting++;
			wait = aws_bucket_take(cl, call->bucket_key, call->mutating);
			if (wait > 0) {
				call->state = AWS_CALL_WAIT_TOKEN;
				aws_arm(call->ev_timer, wait);
				return;
			}
		}
		/* the token is ours: queue for a slot */
		call->state = AWS_CALL_QUEUED;
		TAILQ_INSERT_TAIL(&call->acct->queue, call, link);
		aws_account_mark_ready(cl, call->acct);
		return;
	case AWS_CALL_QUEUED: /* AWS_EV_SLOT */
		aws_call_send(call);
		return;
	case AWS_CALL_SENDING:
	case AWS_CALL_DONE:
		return;
	}
}

/* Append name=value (URL-encoded) to the form body. */
static int aws_form_add(char **body, size_t *len, size_t *cap, const char *name, const char *value)
{
	char *n = sigv4_uri_encode(name, strlen(name), false);
	char *v = sigv4_uri_encode(value, strlen(value), false);
	size_t need = (n ? strlen(n) : 0) + (v ? strlen(v) : 0) + 3;
	int rc = -1;

	if (n == NULL || v == NULL || *len + need > AWS_BODY_MAX)
		goto out;
	if (*len + need > *cap) {
		/* Not xrealloc: the old buffer may hold the ExternalId and must be wiped. */
		size_t ncap = (*len + need) * 2;
		char *nb = xmalloc(ncap);

		memcpy(nb, *body, *len);
		cs_wipe(*body, *cap);
		free(*body);
		*body = nb;
		*cap = ncap;
	}
	*len += (size_t)snprintf(*body + *len, *cap - *len, "%s%s=%s", *len ? "&" : "", n, v);
	rc = 0;
out:
	cs_free_secret(n);
	cs_free_secret(v);
	return rc;
}

struct aws_call *aws_call(struct aws_client *cl, const struct aws_request *req, aws_call_cb cb,
                          void *arg)
{
	const struct aws_service_info *si;
	struct aws_call *call;
	struct http_client_url u;
	char ep[1024];
	const char *acct, *why = NULL;
	size_t cap = 256;

	if ((unsigned)req->service >= AWS_SERVICE_COUNT || req->region == NULL ||
	    !aws_region_ok(req->region) || req->action == NULL ||
	    !aws_token_ok(req->action, AWS_ACTION_MAX) || req->creds == NULL ||
	    req->creds->access_key_id == NULL || req->creds->secret_access_key == NULL ||
	    req->nparams > AWS_PARAMS_MAX || cb == NULL) {
		log_warnx("aws_call", "invalid request (service, region, action or credentials)");
		return NULL;
	}
	si = &aws_services[req->service];
	acct = req->account != NULL ? req->account : req->creds->access_key_id;
	if (strlen(acct) > AWS_ACCOUNT_MAX) {
		log_warnx("aws_call", "invalid request (account key too long)");
		return NULL;
	}
	aws_client_endpoint(cl, req->service, req->region, ep, sizeof(ep) - 1);
	call = xcalloc(1, sizeof(*call));
	call->client = cl;
	call->service = req->service;
	call->mutating = req->mutating;
	snprintf(call->region, sizeof(call->region), "%s", req->region);
	snprintf(call->action, sizeof(call->action), "%s", req->action);
	snprintf(call->bucket_key, sizeof(call->bucket_key), "%s/%s/%s/%c", acct, si->signing,
	         req->region, req->mutating ? 'w' : 'r');
	call->url = xasprintf("%s/", ep);
	if (http_client_url_parse(call->url, &u) == -1 || u.query != NULL) {
		why = "endpoint URL invalid";
		goto fail;
	}
	call->path = xstrndup(u.path, u.path_len);
	if (u.port == (u.tls ? 443 : 80))
		call->host = xasprintf(strchr(u.host, ':') ? "[%s]" : "%s", u.host);
	else
		call->host = xasprintf(strchr(u.host, ':') ? "[%s]:%d" : "%s:%d", u.host, u.port);
	if (si->version != NULL) {
		call->body = xmalloc(cap);
		if (aws_form_add(&call->body, &call->body_len, &cap, "Action", req->action) == -1 ||
		    aws_form_add(&call->body, &call->body_len, &cap, "Version",
		                 req->version != NULL ? req->version : si->version) == -1) {
			why = "parameters too large";
			goto fail;
		}
		for (size_t i = 0; i < req->nparams; i++)
			if (req->params[i].name == NULL || req->params[i].value == NULL ||
			    aws_form_add(&call->body, &call->body_len, &cap, req->params[i].name,
			                 req->params[i].value) == -1) {
				why = "parameters invalid or too large";
				goto fail;
			}
	} else {
		const char *b = req->json_body != NULL ? req->json_body : "{}";

		if (strlen(b) > AWS_BODY_MAX) {
			why = "body too large";
			goto fail;
		}
		call->body = xstrdup(b);
		call->body_len = strlen(b);
		call->target = xasprintf("%s.%s", si->target, req->action);
	}
	call->creds.access_key_id = xstrdup(req->creds->access_key_id);
	call->creds.secret_access_key = xstrdup(req->creds->secret_access_key);
	if (req->creds->session_token != NULL)
		call->creds.session_token = xstrdup(req->creds->session_token);
	call->deadline_ms = req->deadline_ms > 0 ? req->deadline_ms : cl->opt.deadline_ms;
	call->started_ms = cs_now_ms();
	call->cb = cb;
	call->arg = arg;
	call->ev_timer = evtimer_new(cl->base, aws_call_timer_cb, call);
	call->ev_deadline = evtimer_new(cl->base, aws_call_deadline_cb, call);
	if (call->ev_timer == NULL || call->ev_deadline == NULL)
		fatalx("evtimer_new", "cannot create AWS call timers");
	call->acct = aws_account_get(cl, acct);
	call->acct->ncalls++;
	TAILQ_INSERT_TAIL(&cl->calls, call, all);
	cl->stats.calls++;
	aws_arm(call->ev_deadline, call->deadline_ms);
	call->state = AWS_CALL_WAIT_TOKEN;
	{
		uint64_t now = cs_now_us();

		aws_map_sweep_due(&cl->buckets, aws_bucket_full, &now);
	}
	aws_call_advance(call, AWS_EV_START);
	return call;
fail:
	log_warnx("aws_call", "invalid request to %s: %s", si->name, why);
	if (call->body != NULL)
		cs_wipe(call->body, call->body_len);
	free(call->body);
	free(call->url);
	free(call->host);
	free(call->path);
	free(call->target);
	free(call);
	return NULL;
}

void aws_call_cancel(struct aws_call *call)
{
	if (call == NULL || call->in_callback)
		return;
	aws_call_detach(call);
	call->state = AWS_CALL_DONE;
	aws_call_free(call);
}

/* --- the client --- */

struct aws_client *aws_client_new(struct event_base *base, const struct aws_client_options *opt)
{
	struct aws_client *cl = xcalloc(1, sizeof(*cl));
	struct aws_client_options o = { 0 };
	struct http_client_options ho = { 0 };

	if (opt != NULL)
		o = *opt;
	for (int s = 0; s < AWS_SERVICE_COUNT; s++)
		cl->endpoints[s] = aws_endpoint_resolve(&o, (enum aws_service)s);
	ho.ca_file = o.ca_file != NULL && *o.ca_file != '\0' ? o.ca_file : NULL;
	if (ho.ca_file == NULL && !o.no_env) {
		const char *env = getenv("AWS_CA_BUNDLE");

		ho.ca_file = env != NULL && *env != '\0' ? env : NULL;
	}
#define AWS_DEF(f, d) \
	if (o.f <= 0) \
		o.f = (d);
	AWS_DEF(max_in_flight, AWS_DEFAULT_MAX_IN_FLIGHT)
	AWS_DEF(max_in_flight_per_account, AWS_DEFAULT_MAX_IN_FLIGHT_ACCOUNT)
	AWS_DEF(read_rate, AWS_DEFAULT_READ_RATE)
	AWS_DEF(read_burst, AWS_DEFAULT_READ_BURST)
	AWS_DEF(write_rate, AWS_DEFAULT_WRITE_RATE)
	AWS_DEF(write_burst, AWS_DEFAULT_WRITE_BURST)
	AWS_DEF(attempts, AWS_DEFAULT_ATTEMPTS)
	AWS_DEF(deadline_ms, AWS_DEFAULT_DEADLINE_MS)
	AWS_DEF(attempt_timeout_ms, AWS_DEFAULT_ATTEMPT_TIMEOUT_MS)
	AWS_DEF(backoff_base_ms, AWS_DEFAULT_BACKOFF_BASE_MS)
	AWS_DEF(backoff_max_ms, AWS_DEFAULT_BACKOFF_MAX_MS)
	AWS_DEF(max_response_bytes, AWS_DEFAULT_MAX_RESPONSE)
	AWS_DEF(sts_refresh_before_s, AWS_DEFAULT_STS_REFRESH_S)
#undef AWS_DEF
	if (o.read_burst < 1)
		o.read_burst = 1;
	if (o.write_burst < 1)
		o.write_burst = 1;
	/* One connection per call in flight: AWS answers each connection in order. */
	ho.max_conns_per_host = o.max_in_flight;
	ho.deadline_ms = o.deadline_ms;
	ho.max_body_bytes = o.max_response_bytes;
	cl->base = base;
	cl->http = http_client_new(base, &ho);
	cl->signer = sigv4_signer_new(0);
	o.ca_file = NULL;
	o.endpoint_url = NULL;
	memset(o.endpoint_urls, 0, sizeof(o.endpoint_urls));
	cl->opt = o;
	TAILQ_INIT(&cl->ready);
	TAILQ_INIT(&cl->calls);
	cs_random(&cl->rng, sizeof(cl->rng));
	cl->rng |= 1;
	cl->ev_dispatch = event_new(base, -1, 0, aws_dispatch_cb, cl);
	if (cl->http == NULL || cl->signer == NULL || cl->ev_dispatch == NULL) {
		log_warnx("aws_client", "cannot create the AWS client");
		aws_client_free(cl);
		return NULL;
	}
	return cl;
}

void aws_client_free(struct aws_client *cl)
{
	struct aws_call *call;

	if (cl == NULL)
		return;
	/* The STS cache cancels its own AssumeRole calls; then nothing should be left. */
	aws_sts_cache_free(cl->sts);
	cl->sts = NULL;
	while ((call = TAILQ_FIRST(&cl->calls)) != NULL)
		aws_call_cancel(call); /* no callback runs; their owners are going away too */
	if (cl->ev_dispatch != NULL)
		event_free(cl->ev_dispatch);
	http_client_free(cl->http);
	sigv4_signer_free(cl->signer);
	aws_map_free(&cl->accounts);
	aws_map_free(&cl->buckets);
	for (int s = 0; s < AWS_SERVICE_COUNT; s++)
		free(cl->endpoints[s]);
	free(cl);
}

void aws_client_stats(const struct aws_client *cl, struct aws_client_stats *out)
{
	*out = cl->stats;
	aws_sts_cache_counts(cl->sts, &out->sts_calls, &out->sts_cache_hits);
}

struct aws_sts_cache **aws_client_sts_slot(struct aws_client *cl)
{
	return &cl->sts;
}

struct event_base *aws_client_base(struct aws_client *cl)
{
	return cl->base;
}

int aws_client_sts_refresh_before(const struct aws_client *cl)
{
	return cl->opt.sts_refresh_before_s;
}

/* --- pagination --- */

struct aws_pager {
	struct aws_client *client; /* borrowed */
	struct aws_call *call;     /* owned handle of the page being fetched */
	struct aws_request req;    /* params points at params below */
	struct aws_param *params;  /* owned array: the caller's, then the token slot */
	char **strings;            /* owned copies of every string req and params use */
	size_t nstrings;
	struct aws_credentials creds;
	char *token_param; /* owned */
	char *token;       /* owned; the token being sent, or NULL on the first page */
	aws_page_cb cb;
	void *arg;
	bool in_callback, cancelled;
};

static const char *aws_pager_keep(struct aws_pager *p, const char *s)
{
	if (s == NULL)
		return NULL;
	p->strings = xrealloc(p->strings, (p->nstrings + 1) * sizeof(*p->strings));
	p->strings[p->nstrings] = xstrdup(s);
	return p->strings[p->nstrings++];
}

static void aws_pager_free(struct aws_pager *p)
{
	for (size_t i = 0; i < p->nstrings; i++)
		cs_free_secret(p->strings[i]);
	free(p->strings);
	free(p->params);
	free(p->token_param);
	free(p->token);
	free(p);
}

/* The next token in a page: Next<param> or <param>, at the root or under its *Result. */
static const char *aws_pager_find_token(const struct aws_pager *p, const struct aws_result *res)
{
	char next[160];

	snprintf(next, sizeof(next), "Next%s", p->token_param);
	if (res->json != NULL) {
		const char *v = json_string_value(json_object_get(res->json, next));

		return v != NULL ? v
		                 : json_string_value(json_object_get(res->json, p->token_param));
	}
	if (res->xml == NULL)
		return NULL;
	for (const struct aws_xml_node *c = res->xml->child; c != NULL; c = c->next) {
		size_t n = strlen(c->name);
		const struct aws_xml_node *scope = c;

		if (!(n > 6 && strcmp(c->name + n - 6, "Result") == 0))
			scope = NULL;
		if (strcasecmp(c->name, next) == 0 || strcasecmp(c->name, p->token_param) == 0)
			return c->text;
		for (const struct aws_xml_node *g = scope != NULL ? scope->child : NULL; g != NULL;
		     g = g->next)
			if (strcasecmp(g->name, next) == 0 ||
			    strcasecmp(g->name, p->token_param) == 0)
				return g->text;
	}
	return NULL;
}

static void aws_pager_page_cb(const struct aws_result *res, void *arg);

static int aws_pager_fetch(struct aws_pager *p)
{
	if (p->token != NULL) {
		p->params[p->req.nparams - 1] = (struct aws_param){ p->token_param, p->token };
	}
	p->call = aws_call(p->client, &p->req, aws_pager_page_cb, p);
	return p->call != NULL ? 0 : -1;
}

static void aws_pager_page_cb(const struct aws_result *res, void *arg)
{
	struct aws_pager *p = arg;
	const char *tok = res->status == AWS_OK ? aws_pager_find_token(p, res) : NULL;
	bool last = tok == NULL || *tok == '\0' || (p->token != NULL && strcmp(tok, p->token) == 0);
	bool more;

	p->call = NULL;
	if (!last) {
		free(p->token);
		p->token = xstrdup(tok);
	}
	p->in_callback = true;
	more = p->cb(res, last, p->arg);
	p->in_callback = false;
	if (last || !more || p->cancelled) {
		aws_pager_free(p);
		return;
	}
	if (p->req.nparams == 0 ||
	    p->params[p->req.nparams - 1].name != p->token_param) /* first token: add a slot */
		p->req.nparams++;
	if (aws_pager_fetch(p) == -1) {
		struct aws_result r = { .status = AWS_ERR_REQUEST,
			                .error_code = "",
			                .message = "the next page could not be requested",
			                .request_id = "" };

		p->cb(&r, true, p->arg);
		aws_pager_free(p);
	}
}

struct aws_pager *aws_paginate(struct aws_client *cl, const struct aws_request *req,
                               const char *token_param, aws_page_cb cb, void *arg)
{
	struct aws_pager *p;

	if (token_param == NULL || !aws_token_ok(token_param, 64) || cb == NULL ||
	    req->creds == NULL || req->nparams > AWS_PARAMS_MAX - 1)
		return NULL;
	p = xcalloc(1, sizeof(*p));
	p->client = cl;
	p->cb = cb;
	p->arg = arg;
	p->token_param = xstrdup(token_param);
	p->req = *req;
	p->params = xcalloc(req->nparams + 1, sizeof(*p->params));
	for (size_t i = 0; i < req->nparams; i++) {
		p->params[i].name = aws_pager_keep(p, req->params[i].name);
		p->params[i].value = aws_pager_keep(p, req->params[i].value);
	}
	p->req.params = p->params;
	p->req.region = aws_pager_keep(p, req->region);
	p->req.account = aws_pager_keep(p, req->account);
	p->req.action = aws_pager_keep(p, req->action);
	p->req.version = aws_pager_keep(p, req->version);
	p->req.json_body = aws_pager_keep(p, req->json_body);
	p->creds.access_key_id = aws_pager_keep(p, req->creds->access_key_id);
	p->creds.secret_access_key = aws_pager_keep(p, req->creds->secret_access_key);
	p->creds.session_token = aws_pager_keep(p, req->creds->session_token);
	p->req.creds = &p->creds;
	if (aws_pager_fetch(p) == -1) {
		aws_pager_free(p);
		return NULL;
	}
	return p;
}

void aws_pager_cancel(struct aws_pager *p)
{
	if (p == NULL)
		return;
	if (p->in_callback) {
		p->cancelled = true;
		return;
	}
	aws_call_cancel(p->call);
	aws_pager_free(p);
}

/* --- the worker's client --- */

static struct aws_client *aws_worker;
static struct aws_owned_credentials aws_worker_base;
static struct aws_credentials aws_worker_base_view;
static bool aws_worker_has_base;

/* Parse "SDK_ID=URL SDK_ID=URL" into per-service overrides (pointers into buf). */
static int aws_parse_endpoints(char *buf, const char *urls[AWS_SERVICE_COUNT])
{
	for (char *tok = strtok(buf, " \t,"); tok != NULL; tok = strtok(NULL, " \t,")) {
		char *eq = strchr(tok, '=');
		int s;

		if (eq == NULL)
			return -1;
		*eq = '\0';
		for (s = 0; s < AWS_SERVICE_COUNT; s++)
			if (strcasecmp(tok, aws_services[s].sdk_id) == 0)
				break;
		if (s == AWS_SERVICE_COUNT) {
			log_warnx("aws_init", "aws_endpoint_urls: unknown service \"%.40s\"", tok);
			return -1;
		}
		urls[s] = eq + 1;
	}
	return 0;
}

int aws_worker_init(struct event_base *base, const struct config *cfg)
{
	struct aws_client_options o = { 0 };
	char *urls = xstrdup(cfg->aws_endpoint_urls);
	int rc = -1;

	o.max_in_flight = (int)cfg->aws_max_in_flight;
	o.max_in_flight_per_account = (int)cfg->aws_max_in_flight_per_account;
	o.read_rate = (double)cfg->aws_read_rate;
	o.read_burst = (double)cfg->aws_read_burst;
	o.write_rate = (double)cfg->aws_write_rate;
	o.write_burst = (double)cfg->aws_write_burst;
	o.attempts = (int)cfg->aws_attempts;
	o.deadline_ms = (int)cfg->aws_deadline_ms;
	o.attempt_timeout_ms = (int)cfg->aws_attempt_timeout_ms;
	o.max_response_bytes = (size_t)cfg->aws_max_response_bytes;
	o.sts_refresh_before_s = (int)cfg->aws_sts_refresh_before_s;
	o.ca_file = cfg->aws_ca_file;
	o.endpoint_url = cfg->aws_endpoint_url;
	if (aws_parse_endpoints(urls, o.endpoint_urls) == -1)
		goto out;
	aws_worker = aws_client_new(base, &o);
	if (aws_worker == NULL)
		goto out;
	aws_worker_has_base =
	    aws_base_credentials_load(cfg->aws_credentials_file, &aws_worker_base) == 0;
	if (!aws_worker_has_base && *cfg->aws_credentials_file != '\0') {
		/* a configured file that cannot be used is an error; the environment may be empty
		 */
		aws_client_free(aws_worker);
		aws_worker = NULL;
		goto out;
	}
	if (aws_worker_has_base)
		aws_worker_base_view = aws_owned_credentials_view(&aws_worker_base);
	rc = 0;
out:
	free(urls);
	return rc;
}

void aws_worker_free(void)
{
	aws_client_free(aws_worker);
	aws_worker = NULL;
	aws_owned_credentials_clear(&aws_worker_base);
	memset(&aws_worker_base_view, 0, sizeof(aws_worker_base_view));
	aws_worker_has_base = false;
}

struct aws_client *aws_worker_client(void)
{
	return aws_worker;
}

const struct aws_credentials *aws_worker_base_credentials(void)
{
	return aws_worker_has_base ? &aws_worker_base_view : NULL;
}
