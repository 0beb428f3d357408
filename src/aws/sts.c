/*
 * sts.c - STS AssumeRole and the per-worker cache of the temporary
 * credentials it returns. A cache entry is keyed by a SHA-256 over (source
 * identity, role ARN, external id, base access key id) - so a probe with a
 * different external id never meets a cached success - but not by the
 * session name, which only names the purpose. An entry is
 *
 *   PENDING (one AssumeRole in flight, askers wait on it) -> READY -> (stale) PENDING
 *
 * and is dropped, wiped, when the AssumeRole fails or the client goes. Every
 * asker holds a struct aws_sts_wait that can be cancelled; answers from the
 * cache are delivered from a zero timer so callbacks always run from the
 * event loop. Credentials never leave memory and never reach a log line.
 */
#include "config.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>
#include <sys/stat.h>

#include <openssl/evp.h>

#include "cloudsweep/aws.h"
#include "cloudsweep/log.h"

#define STS_CACHE_SWEEP_AT 4096
#define STS_FILE_MAX       65536

enum sts_entry_state {
	STS_ENTRY_PENDING, /* an AssumeRole is in flight; waiters queue on it */
	STS_ENTRY_READY,   /* creds hold temporary credentials */
};

struct aws_sts_wait {
	struct sts_entry *entry;          /* borrowed while waiting on a PENDING entry, else NULL */
	struct aws_sts_cache *cache;      /* borrowed */
	struct event *ev;                 /* owned; delivers a cache hit */
	struct aws_owned_credentials hit; /* owned copy for a cache hit; wiped */
	aws_sts_cb cb;
	void *arg;
	bool in_callback;
	TAILQ_ENTRY(aws_sts_wait) link; /* in entry->waiters, or cache->hits */
};

TAILQ_HEAD(sts_wait_list, aws_sts_wait);

struct sts_entry {
	struct aws_sts_cache *cache; /* borrowed */
	unsigned char key[32];
	enum sts_entry_state state;
	bool cached;                        /* found by lookups (false for no_cache probes) */
	struct aws_owned_credentials creds; /* owned; wiped */
	struct aws_call *call;              /* owned handle while PENDING */
	struct sts_wait_list waiters;
	TAILQ_ENTRY(sts_entry) link;
};

TAILQ_HEAD(sts_entry_list, sts_entry);

struct aws_sts_cache {
	struct aws_client *client; /* borrowed */
	struct sts_entry_list entries;
	struct sts_wait_list hits; /* waiters whose answer is a pending zero timer */
	size_t nentries;
	size_t sweep_at; /* sweep stale entries from this many; 0: STS_CACHE_SWEEP_AT */
	uint64_t calls, hits_total;
};

/* --- credentials --- */

void aws_owned_credentials_clear(struct aws_owned_credentials *c)
{
	cs_free_secret(c->access_key_id);
	cs_free_secret(c->secret_access_key);
	cs_free_secret(c->session_token);
	memset(c, 0, sizeof(*c));
}

struct aws_credentials aws_owned_credentials_view(const struct aws_owned_credentials *c)
{
	struct aws_credentials v = { c->access_key_id, c->secret_access_key, c->session_token };

	return v;
}

static void sts_copy_creds(struct aws_owned_credentials *dst,
                           const struct aws_owned_credentials *src)
{
	dst->access_key_id = xstrdup(src->access_key_id);
	dst->secret_access_key = xstrdup(src->secret_access_key);
	dst->session_token = src->session_token != NULL ? xstrdup(src->session_token) : NULL;
	dst->expiration = src->expiration;
}

int aws_base_credentials_load(const char *path, struct aws_owned_credentials *out)
{
	memset(out, 0, sizeof(*out));
	if (path != NULL && *path != '\0') {
		size_t len;
		char *buf = cs_read_file(path, STS_FILE_MAX, &len);
		char *save = NULL;
		struct stat st;

		if (buf == NULL) {
			log_warn("aws_credentials", "cannot read %s", path);
			return -1;
		}
		if (stat(path, &st) == 0 && (st.st_mode & 077) != 0)
			log_warnx("aws_credentials", "%s is readable by group or others", path);
		for (char *line = strtok_r(buf, "\n", &save); line != NULL;
		     line = strtok_r(NULL, "\n", &save)) {
			char *eq = strchr(line, '='), *k = line, *v, **slot = NULL;

			while (isspace((unsigned char)*k))
				k++;
			if (*k == '#' || *k == ';' || *k == '[' || eq == NULL)
				continue;
			*eq = '\0';
			cs_rstrip(k);
			v = eq + 1;
			while (isspace((unsigned char)*v))
				v++;
			cs_rstrip(v);
			if (strcmp(k, "aws_access_key_id") == 0)
				slot = &out->access_key_id;
			else if (strcmp(k, "aws_secret_access_key") == 0)
				slot = &out->secret_access_key;
			else if (strcmp(k, "aws_session_token") == 0)
				slot = &out->session_token;
			if (slot != NULL && *v != '\0') {
				cs_free_secret(*slot);
				*slot = xstrdup(v);
			}
		}
		cs_wipe(buf, len);
		free(buf);
	} else {
		const char *id = getenv("AWS_ACCESS_KEY_ID");
		const char *secret = getenv("AWS_SECRET_ACCESS_KEY");
		const char *token = getenv("AWS_SESSION_TOKEN");

		if (id != NULL && *id != '\0' && secret != NULL && *secret != '\0') {
			out->access_key_id = xstrdup(id);
			out->secret_access_key = xstrdup(secret);
			if (token != NULL && *token != '\0')
				out->session_token = xstrdup(token);
		}
	}
	if (out->access_key_id == NULL || out->secret_access_key == NULL) {
		log_info("aws_credentials", "no AWS base credentials (%s)",
		         path != NULL && *path != '\0'
		             ? "aws_access_key_id and aws_secret_access_key "
		               "missing in aws_credentials_file"
		             : "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY unset");
		aws_owned_credentials_clear(out);
		return -1;
	}
	return 0;
}

/* --- the cache --- */

static struct aws_sts_cache *sts_cache_get(struct aws_client *cl)
{
	struct aws_sts_cache **slot = aws_client_sts_slot(cl);

	if (*slot == NULL) {
		*slot = xcalloc(1, sizeof(**slot));
		(*slot)->client = cl;
		TAILQ_INIT(&(*slot)->entries);
		TAILQ_INIT(&(*slot)->hits);
	}
	return *slot;
}

static void sts_wait_free(struct aws_sts_wait *w)
{
	if (w->ev != NULL)
		event_free(w->ev);
	aws_owned_credentials_clear(&w->hit);
	free(w);
}

static void sts_entry_free(struct sts_entry *e)
{
	struct aws_sts_wait *w;

	if (e->call != NULL)
		aws_call_cancel(e->call);
	while ((w = TAILQ_FIRST(&e->waiters)) != NULL) {
		TAILQ_REMOVE(&e->waiters, w, link);
		sts_wait_free(w);
	}
	TAILQ_REMOVE(&e->cache->entries, e, link);
	e->cache->nentries--;
	aws_owned_credentials_clear(&e->creds);
	free(e);
}

void aws_sts_cache_free(struct aws_sts_cache *c)
{
	struct sts_entry *e;
	struct aws_sts_wait *w;

	if (c == NULL)
		return;
	while ((e = TAILQ_FIRST(&c->entries)) != NULL)
		sts_entry_free(e);
	while ((w = TAILQ_FIRST(&c->hits)) != NULL) {
		TAILQ_REMOVE(&c->hits, w, link);
		sts_wait_free(w);
	}
	free(c);
}

void aws_sts_cache_counts(const struct aws_sts_cache *c, uint64_t *calls, uint64_t *hits)
{
	*calls = c != NULL ? c->calls : 0;
	*hits = c != NULL ? c->hits_total : 0;
}

static bool sts_fresh(const struct aws_sts_cache *c, const struct sts_entry *e)
{
	return e->state == STS_ENTRY_READY &&
	       time(NULL) + aws_client_sts_refresh_before(c->client) < e->creds.expiration;
}

/* SHA-256 over length-prefixed fields, so no two tuples share a key. */
static int sts_key(const struct aws_credentials *base, const struct aws_assume_role *role,
                   unsigned char key[32])
{
	const char *f[4] = { role->source_identity, role->role_arn, role->external_id,
		             base->access_key_id };
	EVP_MD_CTX *md = EVP_MD_CTX_new();
	unsigned int n = 0;
	int rc = -1;

	if (md == NULL || EVP_DigestInit_ex(md, EVP_sha256(), NULL) != 1)
		goto out;
	for (size_t i = 0; i < CS_ARRAY_LEN(f); i++) {
		uint32_t len = f[i] != NULL ? (uint32_t)strlen(f[i]) + 1 : 0;

		if (EVP_DigestUpdate(md, &len, sizeof(len)) != 1 ||
		    (len > 0 && EVP_DigestUpdate(md, f[i], len - 1) != 1))
			goto out;
	}
	if (EVP_DigestFinal_ex(md, key, &n) != 1 || n != 32)
		goto out;
	rc = 0;
out:
	EVP_MD_CTX_free(md);
	return rc;
}

/* "2026-11-23T13:32:08Z" or with fractional seconds → UTC seconds; 0 if malformed. */
static time_t sts_parse_time(const char *s)
{
	struct tm tm = { 0 };
	int n = 0;

	if (s == NULL || sscanf(s, "%4d-%2d-%2dT%2d:%2d:%2d%n", &tm.tm_year, &tm.tm_mon,
	                        &tm.tm_mday, &tm.tm_hour, &tm.tm_min, &tm.tm_sec, &n) != 6)
		return 0;
	tm.tm_year -= 1900;
	tm.tm_mon -= 1;
	return timegm(&tm);
}

/* Deliver res (and creds on success) to every waiter of e, oldest first. */
static void sts_entry_deliver(struct sts_entry *e, const struct aws_result *res)
{
	struct aws_credentials view = aws_owned_credentials_view(&e->creds);
	struct aws_sts_wait *w;

	while ((w = TAILQ_FIRST(&e->waiters)) != NULL) {
		TAILQ_REMOVE(&e->waiters, w, link);
		w->entry = NULL;
		w->in_callback = true;
		w->cb(res, res->status == AWS_OK ? &view : NULL, e->creds.expiration, w->arg);
		sts_wait_free(w);
	}
}

static void sts_assume_cb(const struct aws_result *res, void *arg)
{
	struct sts_entry *e = arg;
	const struct aws_xml_node *c = aws_xml_find(res->xml, "AssumeRoleResult/Credentials");
	const char *id = aws_xml_text(c, "AccessKeyId");
	const char *secret = aws_xml_text(c, "SecretAccessKey");
	const char *token = aws_xml_text(c, "SessionToken");
	time_t exp = sts_parse_time(aws_xml_text(c, "Expiration"));
	struct aws_result bad = *res;

	e->call = NULL;
	if (res->status == AWS_OK && (id == NULL || secret == NULL || token == NULL || exp == 0)) {
		bad.status = AWS_ERR_RESPONSE;
		bad.message = "AssumeRole answered without complete credentials";
		res = &bad;
	}
	if (res->status != AWS_OK) {
		log_info("aws_assume_role", "AssumeRole failed: %s %s (request id %s)",
		         aws_status_name(res->status), res->error_code, res->request_id);
		sts_entry_deliver(e, res);
		sts_entry_free(e);
		return;
	}
	aws_owned_credentials_clear(&e->creds);
	e->creds.access_key_id = xstrdup(id);
	e->creds.secret_access_key = xstrdup(secret);
	e->creds.session_token = xstrdup(token);
	e->creds.expiration = exp;
	e->state = STS_ENTRY_READY;
	sts_entry_deliver(e, res);
	if (!e->cached)
		sts_entry_free(e);
}

static void sts_hit_cb(evutil_socket_t fd, short what, void *arg)
{
	struct aws_sts_wait *w = arg;
	struct aws_credentials view = aws_owned_credentials_view(&w->hit);
	struct aws_result r = { .status = AWS_OK,
		                .http_status = 200,
		                .error_code = "",
		                .message = "",
		                .request_id = "" };

	(void)fd;
	(void)what;
	TAILQ_REMOVE(&w->cache->hits, w, link);
	w->in_callback = true;
	w->cb(&r, &view, w->hit.expiration, w->arg);
	sts_wait_free(w);
}

static bool sts_session_name_ok(const char *s)
{
	size_t n = s != NULL ? strlen(s) : 0;

	if (n < 2 || n > 64)
		return false;
	for (; *s != '\0'; s++)
		if (!(isalnum((unsigned char)*s) || strchr("_+=,.@-", *s) != NULL))
			return false;
	return true;
}

/* Start the AssumeRole that fills e. */
static int sts_entry_start(struct sts_entry *e, const struct aws_credentials *base,
                           const char *region, const struct aws_assume_role *role)
{
	struct aws_param p[5];
	struct aws_request req = { 0 };
	char dur[16];
	size_t n = 0;

	snprintf(dur, sizeof(dur), "%d", role->duration_s > 0 ? role->duration_s : 3600);
	p[n++] = (struct aws_param){ "RoleArn", role->role_arn };
	p[n++] = (struct aws_param){ "RoleSessionName", role->session_name };
	p[n++] = (struct aws_param){ "DurationSeconds", dur };
	if (role->external_id != NULL)
		p[n++] = (struct aws_param){ "ExternalId", role->external_id };
	if (role->source_identity != NULL)
		p[n++] = (struct aws_param){ "SourceIdentity", role->source_identity };
	req.service = AWS_STS;
	req.region = region;
	req.creds = base;
	req.action = "AssumeRole";
	req.params = p;
	req.nparams = n;
	e->state = STS_ENTRY_PENDING;
	e->call = aws_call(e->cache->client, &req, sts_assume_cb, e);
	if (e->call == NULL)
		return -1;
	e->cache->calls++;
	return 0;
}

struct aws_sts_wait *aws_sts_assume_role(struct aws_client *cl, const struct aws_credentials *base,
                                         const char *region, const struct aws_assume_role *role,
                                         aws_sts_cb cb, void *arg)
{
	struct aws_sts_cache *c;
	struct aws_sts_wait *w;
	struct sts_entry *e = NULL;
	unsigned char key[32];

	if (base == NULL || base->access_key_id == NULL || base->secret_access_key == NULL ||
	    role == NULL || role->role_arn == NULL || strncmp(role->role_arn, "arn:", 4) != 0 ||
	    !sts_session_name_ok(role->session_name) || cb == NULL ||
	    (role->duration_s != 0 && (role->duration_s < 900 || role->duration_s > 43200)) ||
	    sts_key(base, role, key) == -1) {
		log_warnx("aws_assume_role", "invalid AssumeRole request");
		return NULL;
	}
	c = sts_cache_get(cl);
	w = xcalloc(1, sizeof(*w));
	w->cache = c;
	w->cb = cb;
	w->arg = arg;
	if (!role->no_cache)
		TAILQ_FOREACH (e, &c->entries, link)
			if (e->cached && memcmp(e->key, key, sizeof(key)) == 0)
				break;
	if (e != NULL && sts_fresh(c, e)) {
		c->hits_total++;
		sts_copy_creds(&w->hit, &e->creds);
		w->ev = evtimer_new(aws_client_base(cl), sts_hit_cb, w);
		TAILQ_INSERT_TAIL(&c->hits, w, link);
		event_active(w->ev, EV_TIMEOUT, 1);
		return w;
	}
	if (e != NULL && e->state == STS_ENTRY_PENDING) {
		c->hits_total++; /* coalesced: no second AssumeRole */
		w->entry = e;
		TAILQ_INSERT_TAIL(&e->waiters, w, link);
		return w;
	}
	if (e == NULL) {
		e = xcalloc(1, sizeof(*e));
		e->cache = c;
		memcpy(e->key, key, sizeof(key));
		TAILQ_INIT(&e->waiters);
		if (c->nentries >= (c->sweep_at != 0 ? c->sweep_at : STS_CACHE_SWEEP_AT)) {
			struct sts_entry *x, *next;

			for (x = TAILQ_FIRST(&c->entries); x != NULL; x = next) {
				next = TAILQ_NEXT(x, link);
				if (x->state == STS_ENTRY_READY && !sts_fresh(c, x))
					sts_entry_free(x);
			}
			/* Little dropped: wait until the cache has doubled (O(1) amortized). */
			c->sweep_at = c->nentries > STS_CACHE_SWEEP_AT / 2 ? 2 * c->nentries
			                                                   : STS_CACHE_SWEEP_AT;
		}
		e->cached = !role->no_cache;
		TAILQ_INSERT_TAIL(&c->entries, e, link);
		c->nentries++;
	}
	w->entry = e;
	TAILQ_INSERT_TAIL(&e->waiters, w, link);
	if (sts_entry_start(e, base, region, role) == -1) {
		TAILQ_REMOVE(&e->waiters, w, link);
		sts_wait_free(w);
		sts_entry_free(e);
		return NULL;
	}
	return w;
}

/* AWS's answers that mean the credentials a request was signed with are no good. */
static const char *const sts_rejections[] = {
	"InvalidClientTokenId",        "ExpiredToken",          "AuthFailure",
	"UnrecognizedClientException", "ExpiredTokenException",
};

void aws_sts_credentials_rejected(struct aws_client *cl, const struct aws_credentials *creds,
                                  const struct aws_result *res)
{
	struct aws_sts_cache *c = cl != NULL ? *aws_client_sts_slot(cl) : NULL;
	struct sts_entry *e, *next;
	bool rejected = false;

	if (c == NULL || creds == NULL || creds->access_key_id == NULL || res == NULL ||
	    res->status != AWS_ERR_SERVICE || res->error_code == NULL)
		return;
	for (size_t i = 0; i < CS_ARRAY_LEN(sts_rejections); i++)
		if (strcmp(res->error_code, sts_rejections[i]) == 0)
			rejected = true;
	if (!rejected)
		return;
	for (e = TAILQ_FIRST(&c->entries); e != NULL; e = next) {
		next = TAILQ_NEXT(e, link);
		if (e->state == STS_ENTRY_READY && e->creds.access_key_id != NULL &&
		    strcmp(e->creds.access_key_id, creds->access_key_id) == 0) {
			log_info("aws_assume_role",
			         "AWS rejected cached role credentials (%s); dropped them",
			         res->error_code);
			sts_entry_free(e);
		}
	}
}

void aws_sts_wait_cancel(struct aws_sts_wait *w)
{
	if (w == NULL || w->in_callback)
		return;
	if (w->entry != NULL)
		TAILQ_REMOVE(&w->entry->waiters, w, link);
	else
		TAILQ_REMOVE(&w->cache->hits, w, link);
	sts_wait_free(w);
}
