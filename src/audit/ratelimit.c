/*
 * ratelimit.c - shared token buckets with per-worker leases, and login IP
 * blocks (see ratelimit.h for the contract and sql/004_ratelimit.sql for
 * the shared state).
 *
 * The worker keeps one entry per key it has seen lately: for a bucket, the
 * tokens it has leased and until when, a denial it may repeat locally, and
 * its recent demand; for an address, the cached block answer. An entry has
 * at most one query in flight; checks that need it queue on the entry and
 * are served in order when it answers. A check is a small state machine
 * (subject bucket, then global bucket; or block lookup) advanced by one
 * function. Entries that hold nothing worth keeping are swept when the
 * table grows. The limiter is freed only when no callback of its own is on
 * the stack (rl->depth), so a callback may free it.
 */
#include "config.h"

#include <arpa/inet.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>

#include "cloudsweep/config.h"
#include "cloudsweep/db.h"
#include "cloudsweep/log.h"
#include "cloudsweep/ratelimit.h"
#include "cloudsweep/util.h"

#define RL_HASH_SLOTS 4096 /* power of two */
#define RL_ORG_ID_MAX 64
#define RL_IP_MAX     64 /* normalized address text, with "/64" for IPv6 */

static const char rl_sql_take[] =
    "SELECT granted, retry_after_ms FROM rl_take($1, $2::float8, $3::float8, $4::int)";
static const char rl_sql_blocked[] =
    "SELECT ceil(extract(epoch FROM e - clock_timestamp()) * 1000)::bigint "
    "FROM rl_ip_blocked($1::inet) e";
static const char rl_sql_failed[] =
    "SELECT blocked, created, "
    "       ceil(extract(epoch FROM expires_at - clock_timestamp()) * 1000)::bigint "
    "FROM rl_login_failed($1::inet, $2::int, make_interval(secs => $3::float8), "
    "                     make_interval(secs => $4::float8))";
static const char rl_sql_list[] = "SELECT rl_blocks_json($1::int)";
static const char rl_sql_unblock[] = "SELECT rl_unblock($1::inet)";
static const char rl_sql_purge[] =
    "SELECT rl_purge(make_interval(secs => $1::float8), make_interval(secs => $2::float8), "
    "                make_interval(secs => $3::float8))";

enum rl_kind {
	RL_KIND_BUCKET, /* a token bucket lease */
	RL_KIND_BLOCK,  /* a cached login-block answer for an address */
};

/* What asking an entry for a token (or a block answer) gave. */
enum rl_take {
	RL_TAKE_GRANTED,     /* a token spent (or: the address is not blocked) */
	RL_TAKE_DENIED,      /* no token until retry_ms (or: blocked for retry_ms) */
	RL_TAKE_QUEUED,      /* waiting for the entry's query */
	RL_TAKE_UNAVAILABLE, /* Postgres could not answer */
};

enum rl_check_state {
	RL_CHECK_SUBJECT, /* charging the subject's bucket */
	RL_CHECK_GLOBAL,  /* charging the global bucket */
	RL_CHECK_BLOCK,   /* looking up an address's login block */
	RL_CHECK_DONE,    /* the caller has been told */
};

struct rl_check;
TAILQ_HEAD(rl_check_list, rl_check);

struct rl_entry {
	struct rl_entry *next; /* hash chain; NULL for the global bucket */
	struct ratelimit *rl;  /* borrowed */
	enum rl_kind kind;
	char key[RL_KEY_MAX]; /* bucket key, or "block:<ip>" */
	char ip[RL_IP_MAX];   /* RL_KIND_BLOCK: the normalized address */
	double rate;          /* tokens per minute (buckets) */
	double burst;
	int max_lease;
	int tokens;                  /* leased and unspent */
	uint64_t lease_expires_ms;   /* monotonic; tokens are void afterwards */
	uint64_t denied_until_ms;    /* no token in the shared bucket before this */
	uint64_t demand_start_ms;    /* current demand window */
	int demand_cur, demand_prev; /* checks in the current and previous window */
	bool known;                  /* RL_KIND_BLOCK: an answer is cached */
	bool blocked;
	uint64_t blocked_until_ms;
	uint64_t fresh_until_ms; /* the cached answer is trusted until then */
	struct db_query *q;      /* owned: refill or lookup in flight */
	uint64_t q_sent_ms;
	int q_want;
	struct rl_check_list waiters; /* checks served when q answers */
	int serving;                  /* rl_entry_serve frames on the stack: never swept */
};

struct rl_check {
	TAILQ_ENTRY(rl_check) link;
	struct ratelimit *rl;        /* borrowed */
	struct rl_entry *waiting_on; /* borrowed; the entry whose waiters hold it, or NULL */
	enum rl_check_state state;
	rl_check_cb cb;
	void *arg;
};

enum rl_op_kind {
	RL_OP_LOGIN_FAILED, /* rl_login_failed */
	RL_OP_LIST,         /* rl_blocks_json */
	RL_OP_UNBLOCK,      /* rl_unblock */
	RL_OP_PURGE,        /* rl_purge */
};

struct rl_op {
	TAILQ_ENTRY(rl_op) link;
	struct ratelimit *rl; /* borrowed */
	enum rl_op_kind kind;
	struct db_query *q; /* owned until it answers */
	rl_login_cb login_cb;
	rl_list_cb list_cb;
	rl_count_cb count_cb;
	void *arg;
	char ip[RL_IP_MAX];
};
TAILQ_HEAD(rl_op_list, rl_op);

struct rl_org {
	char org_id[RL_ORG_ID_MAX];
	double rate;
	double burst;
};

struct ratelimit {
	struct db_pool *pool; /* borrowed */
	struct ratelimit_config cfg;
	struct rl_org *orgs; /* owned copy of cfg.orgs */
	int norgs;
	struct rl_entry *slots[RL_HASH_SLOTS]; /* owned entries */
	int nentries;
	int sweep_at;            /* sweep idle entries when nentries reaches this */
	struct rl_entry *global; /* owned; NULL when disabled */
	struct rl_op_list ops;   /* owned pending operations */
	int depth;               /* own callbacks on the stack */
	bool dying;              /* ratelimit_free called; free once depth is 0 */
};

static enum rl_take rl_entry_take(struct rl_entry *e, struct rl_check *c, long long *retry_ms);
static void rl_entry_serve(struct rl_entry *e, bool failed);

/* ---- small helpers ---- */

/* Retry-After seconds for a wait of ms: rounded up, at least 1. */
int ratelimit_retry_after_s(long long ms)
{
	if (ms <= 1000)
		return 1;
	if (ms >= (long long)INT_MAX * 1000 - 999)
		return INT_MAX;
	return (int)((ms + 999) / 1000);
}

/* Largest lease for a bucket of this burst. */
int ratelimit_max_lease(double burst)
{
	double l = floor(burst / 10);

	if (!(l >= 1))
		return 1;
	return l > RL_LEASE_CAP ? RL_LEASE_CAP : (int)l;
}

/* Fill cfg with the documented defaults. */
void ratelimit_config_defaults(struct ratelimit_config *cfg)
{
	memset(cfg, 0, sizeof(*cfg));
	cfg->anon_rate_per_min = 10;
	cfg->user_rate_per_min = 100;
	cfg->global_rate_per_min = 60000;
	cfg->block_threshold = 5;
	cfg->block_window_s = 300;
	cfg->block_duration_s = 900;
	cfg->block_history_s = 86400;
}

void ratelimit_config_from(struct ratelimit_config *rc, const struct config *cfg,
                           long long user_rate_per_min)
{
	ratelimit_config_defaults(rc);
	rc->anon_rate_per_min = (double)cfg->ratelimit_anon_per_min;
	rc->user_rate_per_min = (double)user_rate_per_min;
	rc->global_rate_per_min = (double)cfg->ratelimit_global_per_min;
	rc->block_threshold = (int)cfg->login_block_threshold;
	rc->block_window_s = (int)cfg->login_block_window_s;
	rc->block_duration_s = (int)cfg->login_block_duration_s;
}

/*
 * The address as the limiter keys it: IPv4 (also IPv4-mapped IPv6) as is,
 * IPv6 as its /64 network, since one client is normally given a whole /64.
 */
static int rl_ip_norm(const char *ip, char *out, size_t len)
{
	struct in_addr a4;
	struct in6_addr a6;
	char buf[INET6_ADDRSTRLEN];

	if (ip == NULL)
		return -1;
	if (inet_pton(AF_INET, ip, &a4) == 1) {
		if (inet_ntop(AF_INET, &a4, out, (socklen_t)len) == NULL)
			return -1;
		return 0;
	}
	if (inet_pton(AF_INET6, ip, &a6) != 1)
		return -1;
	if (IN6_IS_ADDR_V4MAPPED(&a6)) {
		memcpy(&a4, &a6.s6_addr[12], sizeof(a4));
		if (inet_ntop(AF_INET, &a4, out, (socklen_t)len) == NULL)
			return -1;
		return 0;
	}
	memset(&a6.s6_addr[8], 0, 8);
	if (inet_ntop(AF_INET6, &a6, buf, sizeof(buf)) == NULL)
		return -1;
	if ((size_t)snprintf(out, len, "%s/64", buf) >= len)
		return -1;
	return 0;
}

static uint64_t rl_hash(const char *key)
{
	uint64_t h = 14695981039346656037ULL;

	for (const unsigned char *p = (const unsigned char *)key; *p != '\0'; p++) {
		h ^= *p;
		h *= 1099511628211ULL;
	}
	return h;
}

/* A burst of 0 means one minute's worth of the rate. */
static double rl_burst(double rate, double burst)
{
	return burst > 0 ? burst : rate;
}

/* ---- entries ---- */

static void rl_entry_init(struct rl_entry *e, struct ratelimit *rl, enum rl_kind kind,
                          const char *key)
{
	e->rl = rl;
	e->kind = kind;
	snprintf(e->key, sizeof(e->key), "%s", key);
	TAILQ_INIT(&e->waiters);
}

/* Nothing in e is worth keeping: no query, no waiter, no live lease, denial or answer. */
static bool rl_entry_idle(const struct rl_entry *e, uint64_t now)
{
	if (e->q != NULL || !TAILQ_EMPTY(&e->waiters) || e->serving > 0)
		return false;
	if (e->kind == RL_KIND_BLOCK)
		return !e->known || now >= e->fresh_until_ms;
	return (e->tokens == 0 || now >= e->lease_expires_ms) && now >= e->denied_until_ms &&
	       now >= e->demand_start_ms + 2 * RL_LEASE_TTL_MS;
}

static void rl_sweep(struct ratelimit *rl)
{
	uint64_t now = cs_now_ms();
	struct rl_entry **pp, *e;

	for (int i = 0; i < RL_HASH_SLOTS; i++) {
		pp = &rl->slots[i];
		while ((e = *pp) != NULL) {
			if (rl_entry_idle(e, now)) {
				*pp = e->next;
				free(e);
				rl->nentries--;
			} else {
				pp = &e->next;
			}
		}
	}
	rl->sweep_at = rl->nentries * 2 > RL_SWEEP_MIN ? rl->nentries * 2 : RL_SWEEP_MIN;
}

/* The entry for key, created when missing. */
static struct rl_entry *rl_entry_get(struct ratelimit *rl, enum rl_kind kind, const char *key)
{
	size_t slot = rl_hash(key) & (RL_HASH_SLOTS - 1);
	struct rl_entry *e;

	for (e = rl->slots[slot]; e != NULL; e = e->next)
		if (strcmp(e->key, key) == 0)
			return e;
	if (rl->nentries >= rl->sweep_at)
		rl_sweep(rl);
	e = xcalloc(1, sizeof(*e));
	rl_entry_init(e, rl, kind, key);
	e->next = rl->slots[slot];
	rl->slots[slot] = e;
	rl->nentries++;
	return e;
}

/* Count a check against the demand windows the lease size follows. */
static void rl_demand_note(struct rl_entry *e, uint64_t now)
{
	if (now >= e->demand_start_ms + RL_LEASE_TTL_MS) {
		e->demand_prev = now < e->demand_start_ms + 2 * RL_LEASE_TTL_MS ? e->demand_cur : 0;
		e->demand_cur = 0;
		e->demand_start_ms = now;
	}
	e->demand_cur++;
}

/*
 * Lease size: what this worker used of the key in the last lease period,
 * or what is waiting now, within [1, max_lease], so an occasional request
 * does not take (and waste) tokens others could use.
 */
static int rl_lease_size(const struct rl_entry *e)
{
	int want = e->demand_prev > e->demand_cur ? e->demand_prev : e->demand_cur;
	int nwait = 0;
	const struct rl_check *c;

	TAILQ_FOREACH (c, &e->waiters, link) {
		if (++nwait >= e->max_lease)
			break;
	}
	if (nwait > want)
		want = nwait;
	if (want < 1)
		want = 1;
	return want > e->max_lease ? e->max_lease : want;
}

static void rl_entry_db_cb(void *arg, enum db_event ev, const PGresult *res);

/* Send e's refill or lookup; -1 when the pool cannot take it. */
static int rl_entry_query(struct rl_entry *e)
{
	char rate[32], burst[32], want[16];
	const char *p[4];

	e->q_sent_ms = cs_now_ms();
	if (e->kind == RL_KIND_BLOCK) {
		p[0] = e->ip;
		e->q = db_query_prepared(e->rl->pool, "rl_ip_blocked", 1, p, rl_entry_db_cb, e);
	} else {
		e->q_want = rl_lease_size(e);
		snprintf(rate, sizeof(rate), "%.17g", e->rate);
		snprintf(burst, sizeof(burst), "%.17g", e->burst);
		snprintf(want, sizeof(want), "%d", e->q_want);
		p[0] = e->key;
		p[1] = rate;
		p[2] = burst;
		p[3] = want;
		e->q = db_query_prepared(e->rl->pool, "rl_take", 4, p, rl_entry_db_cb, e);
	}
	return e->q != NULL ? 0 : -1;
}

/* Answer from e's local state, or queue c on e's query (sending it if needed). */
static enum rl_take rl_entry_take(struct rl_entry *e, struct rl_check *c, long long *retry_ms)
{
	uint64_t now = cs_now_ms();

	if (e->rl->dying)
		return RL_TAKE_UNAVAILABLE;
	if (e->kind == RL_KIND_BLOCK) {
		if (e->known && now < e->fresh_until_ms) {
			if (e->blocked && now < e->blocked_until_ms) {
				*retry_ms = (long long)(e->blocked_until_ms - now);
				return RL_TAKE_DENIED;
			}
			return RL_TAKE_GRANTED;
		}
	} else {
		rl_demand_note(e, now);
		if (e->tokens > 0 && now < e->lease_expires_ms) {
			e->tokens--;
			return RL_TAKE_GRANTED;
		}
		if (now < e->denied_until_ms) {
			*retry_ms = (long long)(e->denied_until_ms - now);
			return RL_TAKE_DENIED;
		}
	}
	TAILQ_INSERT_TAIL(&e->waiters, c, link);
	c->waiting_on = e;
	if (e->q == NULL && rl_entry_query(e) == -1) {
		TAILQ_REMOVE(&e->waiters, c, link);
		c->waiting_on = NULL;
		return RL_TAKE_UNAVAILABLE;
	}
	return RL_TAKE_QUEUED;
}

/* ---- checks ---- */

static void rl_enter(struct ratelimit *rl)
{
	rl->depth++;
}

static void rl_destroy(struct ratelimit *rl);

/* Leave a section entered with rl_enter; completes a deferred free. */
static void rl_leave(struct ratelimit *rl)
{
	if (--rl->depth == 0 && rl->dying)
		rl_destroy(rl);
}

static void rl_check_finish(struct rl_check *c, enum rl_verdict v, long long retry_ms)
{
	int retry_s = v == RL_ALLOW         ? 0
	              : v == RL_UNAVAILABLE ? RL_UNAVAILABLE_RETRY_S
	                                    : ratelimit_retry_after_s(retry_ms);

	c->state = RL_CHECK_DONE;
	c->cb(c->arg, v, retry_s);
	free(c);
}

/*
 * Move c on with what its current entry answered. True when c is finished
 * (and freed), false while it waits on an entry.
 */
static bool rl_check_advance(struct rl_check *c, enum rl_take t, long long retry_ms)
{
	struct ratelimit *rl = c->rl;

	for (;;) {
		if (t == RL_TAKE_QUEUED)
			return false;
		if (t == RL_TAKE_UNAVAILABLE) {
			rl_check_finish(c, RL_UNAVAILABLE, 0);
			return true;
		}
		if (t == RL_TAKE_DENIED) {
			rl_check_finish(c, RL_LIMITED, retry_ms);
			return true;
		}
		switch (c->state) {
		case RL_CHECK_SUBJECT:
			c->state = RL_CHECK_GLOBAL;
			if (rl->global == NULL) {
				rl_check_finish(c, RL_ALLOW, 0);
				return true;
			}
			t = rl_entry_take(rl->global, c, &retry_ms);
			break;
		case RL_CHECK_GLOBAL:
		case RL_CHECK_BLOCK:
			rl_check_finish(c, RL_ALLOW, 0);
			return true;
		case RL_CHECK_DONE:
			return true;
		}
	}
}

/* Answer cb at once (no handle) with v. */
static struct rl_check *rl_answer_now(rl_check_cb cb, void *arg, enum rl_verdict v)
{
	cb(arg, v, v == RL_UNAVAILABLE ? RL_UNAVAILABLE_RETRY_S : 0);
	return NULL;
}

/* Charge s's bucket, then the global one. */
struct rl_check *ratelimit_check(struct ratelimit *rl, const struct rl_subject *s, rl_check_cb cb,
                                 void *arg)
{
	char ip[RL_IP_MAX], key[RL_KEY_MAX];
	struct rl_entry *e = NULL;
	struct rl_check *c;
	double rate, burst;
	enum rl_take t;
	long long retry_ms = 0;
	bool done;

	if (cb == NULL)
		return NULL;
	if (rl == NULL || rl->dying || s == NULL)
		return rl_answer_now(cb, arg, RL_UNAVAILABLE);
	if (s->user_id != NULL) {
		rate = rl->cfg.user_rate_per_min;
		burst = rl->cfg.user_burst;
		for (int i = 0; s->org_id != NULL && i < rl->norgs; i++)
			if (strcmp(rl->orgs[i].org_id, s->org_id) == 0) {
				rate = rl->orgs[i].rate;
				burst = rl->orgs[i].burst;
				break;
			}
		if ((size_t)snprintf(key, sizeof(key), "user:%s", s->user_id) >= sizeof(key)) {
			log_warnx("ratelimit_bad_subject", "user id too long");
			return rl_answer_now(cb, arg, RL_UNAVAILABLE);
		}
	} else {
		rate = rl->cfg.anon_rate_per_min;
		burst = rl->cfg.anon_burst;
		if (rl_ip_norm(s->ip, ip, sizeof(ip)) == -1) {
			log_warnx("ratelimit_bad_subject", "not an IP address");
			return rl_answer_now(cb, arg, RL_UNAVAILABLE);
		}
		snprintf(key, sizeof(key), "ip:%s", ip);
	}

	c = xcalloc(1, sizeof(*c));
	c->rl = rl;
	c->cb = cb;
	c->arg = arg;
	c->state = RL_CHECK_SUBJECT;
	rl_enter(rl);
	if (rate > 0) {
		e = rl_entry_get(rl, RL_KIND_BUCKET, key);
		/* The same user may come with another organization's tier. */
		e->rate = rate;
		e->burst = rl_burst(rate, burst);
		e->max_lease = ratelimit_max_lease(e->burst);
		t = rl_entry_take(e, c, &retry_ms);
	} else {
		t = RL_TAKE_GRANTED; /* no subject bucket: straight to the global one */
	}
	done = rl_check_advance(c, t, retry_ms);
	rl_leave(rl);
	return done ? NULL : c;
}

/* Whether ip is blocked from the login endpoints. */
struct rl_check *ratelimit_ip_blocked(struct ratelimit *rl, const char *ip, rl_check_cb cb,
                                      void *arg)
{
	char norm[RL_IP_MAX], key[RL_KEY_MAX];
	struct rl_entry *e;
	struct rl_check *c;
	long long retry_ms = 0;
	enum rl_take t;
	bool done;

	if (cb == NULL)
		return NULL;
	if (rl == NULL || rl->dying)
		return rl_answer_now(cb, arg, RL_UNAVAILABLE);
	if (rl_ip_norm(ip, norm, sizeof(norm)) == -1) {
		log_warnx("ratelimit_bad_subject", "not an IP address");
		return rl_answer_now(cb, arg, RL_UNAVAILABLE);
	}
	snprintf(key, sizeof(key), "block:%s", norm);
	c = xcalloc(1, sizeof(*c));
	c->rl = rl;
	c->cb = cb;
	c->arg = arg;
	c->state = RL_CHECK_BLOCK;
	rl_enter(rl);
	e = rl_entry_get(rl, RL_KIND_BLOCK, key);
	snprintf(e->ip, sizeof(e->ip), "%s", norm);
	t = rl_entry_take(e, c, &retry_ms);
	done = rl_check_advance(c, t, retry_ms);
	rl_leave(rl);
	return done ? NULL : c;
}

/* Forget a pending check. */
void ratelimit_check_cancel(struct rl_check *c)
{
	if (c == NULL || c->state == RL_CHECK_DONE)
		return;
	/* A refill in flight stays: its tokens serve the next checks of the key. */
	if (c->waiting_on != NULL)
		TAILQ_REMOVE(&c->waiting_on->waiters, c, link);
	free(c);
}

/* ---- an entry's query answered ---- */

static bool rl_int_field(const PGresult *res, int col, long long *out)
{
	char *end;

	if (PQntuples(res) != 1 || PQnfields(res) <= col || PQgetisnull(res, 0, col))
		return false;
	*out = strtoll(PQgetvalue(res, 0, col), &end, 10);
	return *end == '\0';
}

/* Store what e's query answered; false when it failed. */
static bool rl_entry_store(struct rl_entry *e, enum db_event ev, const PGresult *res)
{
	uint64_t now = cs_now_ms();
	long long granted, retry_ms;
	const char *state;

	if (ev != DB_OK) {
		state = ev == DB_ERROR ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
		log_warnx("ratelimit_db_failed", "%s: %s",
		          e->kind == RL_KIND_BLOCK ? "block lookup" : "bucket refill",
		          state != NULL      ? state
		          : ev == DB_TIMEOUT ? "timeout"
		                             : "unavailable");
		if (e->kind == RL_KIND_BLOCK)
			e->known = false;
		return false;
	}
	if (e->kind == RL_KIND_BLOCK) {
		if (PQntuples(res) != 1)
			goto bad;
		e->known = true;
		/* From the send time: the answer is never older than RL_BLOCK_CACHE_MS. */
		e->fresh_until_ms = e->q_sent_ms + RL_BLOCK_CACHE_MS;
		e->blocked = rl_int_field(res, 0, &retry_ms) && retry_ms > 0;
		e->blocked_until_ms = e->blocked ? now + (uint64_t)retry_ms : 0;
		return true;
	}
	if (!rl_int_field(res, 0, &granted) || !rl_int_field(res, 1, &retry_ms) || granted < 0 ||
	    granted > e->q_want || retry_ms < 0)
		goto bad;
	e->tokens = (int)granted;
	/* From the send time, so no token is held longer than the TTL after it was taken. */
	e->lease_expires_ms = e->q_sent_ms + RL_LEASE_TTL_MS;
	e->denied_until_ms = granted < e->q_want ? now + (uint64_t)retry_ms : 0;
	return true;
bad:
	log_warnx("ratelimit_db_failed", "unexpected result shape");
	return false;
}

/* Serve e's waiters in order from what e now holds, re-querying when more are needed. */
static void rl_entry_serve(struct rl_entry *e, bool failed)
{
	uint64_t now;
	struct rl_check *c;
	enum rl_take t;
	long long retry_ms;

	e->serving++;
	while ((c = TAILQ_FIRST(&e->waiters)) != NULL) {
		now = cs_now_ms();
		retry_ms = 0;
		if (failed || e->rl->dying) {
			t = RL_TAKE_UNAVAILABLE;
		} else if (e->kind == RL_KIND_BLOCK) {
			if (!e->known) {
				if (e->q != NULL)
					break;
				if (rl_entry_query(e) == -1) {
					failed = true;
					continue;
				}
				break;
			}
			t = e->blocked && now < e->blocked_until_ms ? RL_TAKE_DENIED
			                                            : RL_TAKE_GRANTED;
			retry_ms = t == RL_TAKE_DENIED ? (long long)(e->blocked_until_ms - now) : 0;
		} else if (e->tokens > 0) {
			/* Waiters spend the tokens fetched for them even if the lease just ran out.
			 */
			e->tokens--;
			t = RL_TAKE_GRANTED;
		} else if (now < e->denied_until_ms) {
			t = RL_TAKE_DENIED;
			retry_ms = (long long)(e->denied_until_ms - now);
		} else if (e->q != NULL) {
			break; /* a check started from a callback sent the next refill */
		} else {
			if (rl_entry_query(e) == -1)
				failed = true;
			else
				break;
			continue;
		}
		TAILQ_REMOVE(&e->waiters, c, link);
		c->waiting_on = NULL;
		rl_check_advance(c, t, retry_ms);
	}
	e->serving--;
}

static void rl_entry_db_cb(void *arg, enum db_event ev, const PGresult *res)
{
	struct rl_entry *e = arg;
	struct ratelimit *rl = e->rl;
	bool stored;

	e->q = NULL;
	rl_enter(rl);
	stored = rl_entry_store(e, ev, res);
	rl_entry_serve(e, !stored);
	rl_leave(rl);
}

/* ---- one-shot operations ---- */

static void rl_op_db_cb(void *arg, enum db_event ev, const PGresult *res);

static struct rl_op *rl_op_new(struct ratelimit *rl, enum rl_op_kind kind, void *arg)
{
	struct rl_op *op = xcalloc(1, sizeof(*op));

	op->rl = rl;
	op->kind = kind;
	op->arg = arg;
	return op;
}

/* Tell op's caller it failed (status -1 / RL_UNAVAILABLE). */
static void rl_op_fail_cb(struct rl_op *op)
{
	switch (op->kind) {
	case RL_OP_LOGIN_FAILED:
		op->login_cb(op->arg, RL_UNAVAILABLE, RL_UNAVAILABLE_RETRY_S, false);
		break;
	case RL_OP_LIST:
		op->list_cb(op->arg, -1, NULL);
		break;
	case RL_OP_UNBLOCK:
	case RL_OP_PURGE:
		op->count_cb(op->arg, -1, 0);
		break;
	}
}

/* Answer op's caller with a failure at once and free op; NULL for the caller to return. */
static struct rl_op *rl_op_fail_now(struct rl_op *op)
{
	struct ratelimit *rl = op->rl;

	rl_enter(rl);
	rl_op_fail_cb(op);
	free(op);
	rl_leave(rl);
	return NULL;
}

/* Send op's query (sql is a statement name when prepared); on failure answer at once. */
static struct rl_op *rl_op_send(struct rl_op *op, bool prepared, const char *sql, int n,
                                const char *const *p)
{
	struct ratelimit *rl = op->rl;

	if (rl->dying)
		return rl_op_fail_now(op);
	op->q = prepared ? db_query_prepared(rl->pool, sql, n, p, rl_op_db_cb, op)
	                 : db_query(rl->pool, sql, n, p, rl_op_db_cb, op);
	if (op->q == NULL)
		return rl_op_fail_now(op);
	TAILQ_INSERT_TAIL(&rl->ops, op, link);
	return op;
}

/* A failed login from ip: the block cache learns at once what the database decided. */
static void rl_op_login_done(struct rl_op *op, const PGresult *res)
{
	struct ratelimit *rl = op->rl;
	char key[RL_KEY_MAX];
	long long ms = 0;
	struct rl_entry *e;
	bool blocked, created;

	if (PQntuples(res) != 1 || PQnfields(res) != 3) {
		log_warnx("ratelimit_db_failed", "unexpected result shape");
		rl_op_fail_cb(op);
		return;
	}
	blocked = strcmp(PQgetvalue(res, 0, 0), "t") == 0;
	created = strcmp(PQgetvalue(res, 0, 1), "t") == 0;
	blocked = blocked && rl_int_field(res, 2, &ms) && ms > 0;
	if (blocked) {
		snprintf(key, sizeof(key), "block:%s", op->ip);
		e = rl_entry_get(rl, RL_KIND_BLOCK, key);
		snprintf(e->ip, sizeof(e->ip), "%s", op->ip);
		if (e->q == NULL) {
			e->known = true;
			e->blocked = true;
			e->blocked_until_ms = cs_now_ms() + (uint64_t)ms;
			e->fresh_until_ms = cs_now_ms() + RL_BLOCK_CACHE_MS;
		}
		if (created)
			log_info("ratelimit_ip_blocked", "address %s blocked from login for %d s",
			         op->ip, ratelimit_retry_after_s(ms));
	}
	op->login_cb(op->arg, blocked ? RL_LIMITED : RL_ALLOW,
	             blocked ? ratelimit_retry_after_s(ms) : 0, blocked && created);
}

static void rl_op_db_cb(void *arg, enum db_event ev, const PGresult *res)
{
	struct rl_op *op = arg;
	struct ratelimit *rl = op->rl;
	json_error_t jerr;
	json_t *blocks;
	long long n;

	op->q = NULL;
	TAILQ_REMOVE(&rl->ops, op, link);
	rl_enter(rl);
	if (ev != DB_OK) {
		log_warnx("ratelimit_db_failed", "operation %d: %s", (int)op->kind,
		          ev == DB_ERROR     ? PQresultErrorField(res, PG_DIAG_SQLSTATE)
		          : ev == DB_TIMEOUT ? "timeout"
		                             : "unavailable");
		rl_op_fail_cb(op);
		goto out;
	}
	switch (op->kind) {
	case RL_OP_LOGIN_FAILED:
		rl_op_login_done(op, res);
		break;
	case RL_OP_LIST:
		blocks = NULL;
		if (PQntuples(res) == 1 && !PQgetisnull(res, 0, 0))
			blocks = json_loads(PQgetvalue(res, 0, 0), 0, &jerr);
		if (blocks == NULL || !json_is_array(blocks)) {
			log_warnx("ratelimit_db_failed", "block list is not a JSON array");
			json_decref(blocks);
			op->list_cb(op->arg, -1, NULL);
			break;
		}
		op->list_cb(op->arg, 0, blocks);
		json_decref(blocks);
		break;
	case RL_OP_UNBLOCK:
	case RL_OP_PURGE:
		if (rl_int_field(res, 0, &n))
			op->count_cb(op->arg, 0, n);
		else
			op->count_cb(op->arg, -1, 0);
		break;
	}
out:
	free(op);
	rl_leave(rl);
}

/* Record a failed login from ip. */
struct rl_op *ratelimit_login_failed(struct ratelimit *rl, const char *ip, rl_login_cb cb,
                                     void *arg)
{
	char thr[16], win[16], dur[16];
	const char *p[4];
	struct rl_op *op;

	if (rl == NULL || cb == NULL)
		return NULL;
	op = rl_op_new(rl, RL_OP_LOGIN_FAILED, arg);
	op->login_cb = cb;
	if (rl_ip_norm(ip, op->ip, sizeof(op->ip)) == -1) {
		log_warnx("ratelimit_bad_subject", "not an IP address");
		return rl_op_fail_now(op);
	}
	snprintf(thr, sizeof(thr), "%d", rl->cfg.block_threshold);
	snprintf(win, sizeof(win), "%d", rl->cfg.block_window_s);
	snprintf(dur, sizeof(dur), "%d", rl->cfg.block_duration_s);
	p[0] = op->ip;
	p[1] = thr;
	p[2] = win;
	p[3] = dur;
	return rl_op_send(op, true, "rl_login_failed", 4, p);
}

/* The active blocks as JSON. */
struct rl_op *ratelimit_blocks_list(struct ratelimit *rl, rl_list_cb cb, void *arg)
{
	char lim[16];
	const char *p[1] = { lim };
	struct rl_op *op;

	if (rl == NULL || cb == NULL)
		return NULL;
	op = rl_op_new(rl, RL_OP_LIST, arg);
	op->list_cb = cb;
	snprintf(lim, sizeof(lim), "%d", RL_BLOCKS_LIST_MAX);
	return rl_op_send(op, false, rl_sql_list, 1, p);
}

/* Lift ip's active blocks. */
struct rl_op *ratelimit_unblock(struct ratelimit *rl, const char *ip, rl_count_cb cb, void *arg)
{
	const char *p[1];
	struct rl_op *op;

	if (rl == NULL || cb == NULL)
		return NULL;
	op = rl_op_new(rl, RL_OP_UNBLOCK, arg);
	op->count_cb = cb;
	if (rl_ip_norm(ip, op->ip, sizeof(op->ip)) == -1) {
		log_warnx("ratelimit_bad_subject", "not an IP address");
		return rl_op_fail_now(op);
	}
	p[0] = op->ip;
	return rl_op_send(op, false, rl_sql_unblock, 1, p);
}

/* Seconds after which an idle bucket of this rate and burst is full again. */
static double rl_full_after_s(double rate, double burst)
{
	return rate > 0 ? rl_burst(rate, burst) / rate * 60 : 0;
}

/* Delete old failures, old blocks and idle buckets. */
struct rl_op *ratelimit_purge(struct ratelimit *rl, rl_count_cb cb, void *arg)
{
	const struct ratelimit_config *k;
	char fail_s[32], block_s[32], bucket_s[32];
	const char *p[3] = { fail_s, block_s, bucket_s };
	double idle = 3600, t;
	struct rl_op *op;

	if (rl == NULL || cb == NULL)
		return NULL;
	k = &rl->cfg;
	t = rl_full_after_s(k->anon_rate_per_min, k->anon_burst);
	idle = t > idle ? t : idle;
	t = rl_full_after_s(k->user_rate_per_min, k->user_burst);
	idle = t > idle ? t : idle;
	t = rl_full_after_s(k->global_rate_per_min, k->global_burst);
	idle = t > idle ? t : idle;
	for (int i = 0; i < rl->norgs; i++) {
		t = rl_full_after_s(rl->orgs[i].rate, rl->orgs[i].burst);
		idle = t > idle ? t : idle;
	}
	op = rl_op_new(rl, RL_OP_PURGE, arg);
	op->count_cb = cb;
	/* Failures older than the window can no longer count toward a block. */
	snprintf(fail_s, sizeof(fail_s), "%d", k->block_window_s);
	snprintf(block_s, sizeof(block_s), "%d", k->block_history_s);
	snprintf(bucket_s, sizeof(bucket_s), "%.0f", ceil(idle));
	return rl_op_send(op, false, rl_sql_purge, 3, p);
}

/* Forget a pending operation. */
void ratelimit_op_cancel(struct rl_op *op)
{
	if (op == NULL)
		return;
	db_query_cancel(op->q);
	TAILQ_REMOVE(&op->rl->ops, op, link);
	free(op);
}

/* ---- life cycle ---- */

static bool rl_rate_ok(double rate, double burst)
{
	return isfinite(rate) && isfinite(burst) && rate >= 0 && burst >= 0 &&
	       (rate == 0 || rl_burst(rate, burst) >= 1) && rate <= 1e9 && burst <= 1e9;
}

static void rl_prepare(struct db_pool *pool, const char *name, const char *sql, int n)
{
	/* -1 means another limiter on this pool registered the same statement already. */
	if (db_pool_prepare(pool, name, sql, n) == -1)
		log_debug("ratelimit_prepare", "statement %s already registered", name);
}

/* A limiter for one worker. */
struct ratelimit *ratelimit_new(struct db_pool *pool, const struct ratelimit_config *cfg)
{
	struct ratelimit *rl;

	if (pool == NULL || cfg == NULL || !rl_rate_ok(cfg->anon_rate_per_min, cfg->anon_burst) ||
	    !rl_rate_ok(cfg->user_rate_per_min, cfg->user_burst) ||
	    !rl_rate_ok(cfg->global_rate_per_min, cfg->global_burst) || cfg->norgs < 0 ||
	    (cfg->norgs > 0 && cfg->orgs == NULL) || cfg->block_threshold < 1 ||
	    cfg->block_window_s < 1 || cfg->block_duration_s < 1 || cfg->block_history_s < 0)
		goto invalid;
	for (int i = 0; i < cfg->norgs; i++)
		if (cfg->orgs[i].org_id == NULL || strlen(cfg->orgs[i].org_id) >= RL_ORG_ID_MAX ||
		    !rl_rate_ok(cfg->orgs[i].rate_per_min, cfg->orgs[i].burst) ||
		    cfg->orgs[i].rate_per_min <= 0)
			goto invalid;

	rl = xcalloc(1, sizeof(*rl));
	rl->pool = pool;
	rl->cfg = *cfg;
	rl->cfg.orgs = NULL;
	rl->sweep_at = RL_SWEEP_MIN;
	TAILQ_INIT(&rl->ops);
	if (cfg->norgs > 0) {
		rl->orgs = xcalloc((size_t)cfg->norgs, sizeof(*rl->orgs));
		for (int i = 0; i < cfg->norgs; i++) {
			snprintf(rl->orgs[i].org_id, sizeof(rl->orgs[i].org_id), "%s",
			         cfg->orgs[i].org_id);
			rl->orgs[i].rate = cfg->orgs[i].rate_per_min;
			rl->orgs[i].burst = cfg->orgs[i].burst;
		}
		rl->norgs = cfg->norgs;
	}
	if (cfg->global_rate_per_min > 0) {
		rl->global = xcalloc(1, sizeof(*rl->global));
		rl_entry_init(rl->global, rl, RL_KIND_BUCKET, "global");
		rl->global->rate = cfg->global_rate_per_min;
		rl->global->burst = rl_burst(cfg->global_rate_per_min, cfg->global_burst);
		rl->global->max_lease = ratelimit_max_lease(rl->global->burst);
	}
	rl_prepare(pool, "rl_take", rl_sql_take, 4);
	rl_prepare(pool, "rl_ip_blocked", rl_sql_blocked, 1);
	rl_prepare(pool, "rl_login_failed", rl_sql_failed, 4);
	return rl;
invalid:
	log_warnx("ratelimit_config_invalid", "rate limit settings out of range");
	return NULL;
}

/* Answer every check waiting on e with RL_UNAVAILABLE and drop e's query. */
static void rl_entry_shutdown(struct rl_entry *e)
{
	db_query_cancel(e->q);
	e->q = NULL;
	rl_entry_serve(e, true);
}

static void rl_destroy(struct ratelimit *rl)
{
	struct rl_entry *e, *next;

	for (int i = 0; i < RL_HASH_SLOTS; i++)
		for (e = rl->slots[i]; e != NULL; e = next) {
			next = e->next;
			free(e);
		}
	free(rl->global);
	free(rl->orgs);
	free(rl);
}

/* Free the limiter, answering what is pending first. */
void ratelimit_free(struct ratelimit *rl)
{
	struct rl_entry *e;
	struct rl_op *op;

	if (rl == NULL || rl->dying)
		return;
	rl->dying = true;
	rl_enter(rl);
	for (int i = 0; i < RL_HASH_SLOTS; i++)
		for (e = rl->slots[i]; e != NULL; e = e->next)
			rl_entry_shutdown(e);
	if (rl->global != NULL)
		rl_entry_shutdown(rl->global);
	while ((op = TAILQ_FIRST(&rl->ops)) != NULL) {
		TAILQ_REMOVE(&rl->ops, op, link);
		db_query_cancel(op->q);
		rl_op_fail_cb(op);
		free(op);
	}
	rl_leave(rl);
}
