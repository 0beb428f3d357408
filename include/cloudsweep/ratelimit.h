/*
 * ratelimit.h - request rate limits and login IP blocks that hold across
 * every worker of every instance, because their state lives in Postgres
 * (sql/004_ratelimit.sql) and nowhere else.
 *
 * A request is charged to one subject bucket - the client address when
 * anonymous (IPv6 addresses by their /64, which one client usually owns
 * whole), the user when authenticated, at the user's organization's rate
 * when that organization has an override - and then to the global safety
 * bucket. To spare Postgres a round trip per request, a worker takes a small
 * lease of tokens from a bucket (rl_take) and spends it locally. A lease is
 * sized to the worker's recent demand on that key, never more than
 * ratelimit_max_lease() (burst / 10, at most RL_LEASE_CAP, at least 1: so a
 * 10/min bucket asks Postgres on every request), and expires after
 * RL_LEASE_TTL_MS so unspent tokens do not leak into later periods. Every
 * admitted request spent a token debited from the shared bucket, so over any
 * interval of T seconds a key admits at most burst + rate * T / 60 plus the
 * tokens leased but unspent when the interval began: at most
 * workers x ratelimit_max_lease() (over all instances) more than an exact
 * token bucket would. A denial tells when the bucket has its next token;
 * the worker answers further requests for that key locally until then
 * (that cannot over-admit: no token appears sooner). Concurrent checks of
 * one key on one worker wait for one query, never one query each.
 *
 * If Postgres cannot answer, checks answer RL_UNAVAILABLE and the API
 * answers 503 with Retry-After (fail closed).
 *
 * Login blocks: ratelimit_login_failed() records a failed login; the call
 * that reaches the threshold within the window blocks the address for the
 * configured time (exactly one block, whatever the concurrency).
 * ratelimit_ip_blocked() answers from a per-worker cache whose entries live
 * RL_BLOCK_CACHE_MS, so a new block or an administrator's unblock is seen by
 * every worker within that time (plus the query time). Blocks lift by time.
 *
 * Every asynchronous call returns a handle that can be cancelled; after
 * cancellation its callback never runs.
 */
#ifndef CLOUDSWEEP_RATELIMIT_H
#define CLOUDSWEEP_RATELIMIT_H

#include <jansson.h>
#include <stdbool.h>

#include "cloudsweep/db.h"
#include "cloudsweep/util.h"

#define RL_LEASE_CAP           100  /* most tokens a worker leases from one bucket at once */
#define RL_LEASE_TTL_MS        1000 /* unspent leased tokens are dropped after this */
#define RL_BLOCK_CACHE_MS      1000 /* staleness bound of the per-worker block cache */
#define RL_SWEEP_MIN           1024 /* local entries kept before idle ones are swept */
#define RL_KEY_MAX             128  /* longest bucket key ("user:<id>", "ip:<addr>") */
#define RL_BLOCKS_LIST_MAX     1000 /* most active blocks ratelimit_blocks_list returns */
#define RL_UNAVAILABLE_RETRY_S 1    /* Retry-After suggested when Postgres is unreachable */

enum rl_verdict {
	RL_ALLOW,       /* admitted (or: not blocked) */
	RL_LIMITED,     /* 429 rate_limited (or: the address is blocked) */
	RL_UNAVAILABLE, /* Postgres could not answer: 503 unavailable */
};

/* A higher tier for one organization: its users' per-user bucket. */
struct rl_org_override {
	const char *org_id;  /* borrowed; copied by ratelimit_new */
	double rate_per_min; /* > 0 */
	double burst;        /* >= 1; 0 means rate_per_min */
};

/*
 * Settings (the lead's configuration table feeds them). A rate of 0
 * disables that bucket; a burst of 0 means one minute's worth of its rate.
 */
struct ratelimit_config {
	double anon_rate_per_min;           /* per client address; default 10 */
	double anon_burst;                  /* default 0 (= rate) */
	double user_rate_per_min;           /* per authenticated user; default 100 */
	double user_burst;                  /* default 0 (= rate) */
	double global_rate_per_min;         /* whole deployment; default 60000 */
	double global_burst;                /* default 0 (= rate) */
	const struct rl_org_override *orgs; /* borrowed array, copied by ratelimit_new */
	int norgs;
	int block_threshold;  /* failed logins from one address...; default 5 */
	int block_window_s;   /* ...within this many seconds...; default 300 */
	int block_duration_s; /* ...block it this long; default 900 */
	int block_history_s;  /* ratelimit_purge keeps expired blocks this long; default 86400 */
};

/* Who a request is charged to; every pointer borrowed for the call. */
struct rl_subject {
	const char *ip;      /* client address (IPv4 or IPv6 text); required */
	const char *user_id; /* authenticated user, or NULL when anonymous */
	const char *org_id;  /* the user's organization, or NULL */
};

struct ratelimit;
struct rl_check;
struct rl_op;

/*
 * Outcome of a check. retry_after_s is 0 for RL_ALLOW, the Retry-After value
 * for RL_LIMITED (>= 1) and RL_UNAVAILABLE_RETRY_S for RL_UNAVAILABLE.
 */
typedef void (*rl_check_cb)(void *arg, enum rl_verdict v, int retry_after_s);
/*
 * Outcome of ratelimit_login_failed: RL_LIMITED when the address is blocked
 * now (retry_after_s until the block lifts), with new_block true for the one
 * call that created the block (audit access.ip_blocked then); RL_ALLOW when
 * not blocked; RL_UNAVAILABLE when it could not be recorded.
 */
typedef void (*rl_login_cb)(void *arg, enum rl_verdict v, int retry_after_s, bool new_block);
/*
 * Outcome of ratelimit_blocks_list: status 0 and a borrowed array of
 * {ip, scope, blocked_at, expires_at, reason, failures} (newest first;
 * json_incref to keep it), or -1 and NULL.
 */
typedef void (*rl_list_cb)(void *arg, int status, json_t *blocks);
/* Outcome of ratelimit_unblock / ratelimit_purge: status 0 and a row count, or -1. */
typedef void (*rl_count_cb)(void *arg, int status, long long count);

/* Fill cfg with the defaults above. */
void ratelimit_config_defaults(struct ratelimit_config *cfg);

struct config;
/* The defaults, then the daemon's configured rates and login block, with users at user_rate. */
void ratelimit_config_from(struct ratelimit_config *rc, const struct config *cfg,
                           long long user_rate_per_min);

/*
 * A limiter for one worker on pool (borrowed; it must outlive the limiter).
 * Registers its prepared statements on the pool. NULL when cfg is invalid
 * (negative rates, burst < 1 after defaults, bad org override, block
 * settings < 1), logged.
 */
struct ratelimit *ratelimit_new(struct db_pool *pool, const struct ratelimit_config *cfg);
/*
 * Free the limiter. Pending checks and operations are answered with
 * RL_UNAVAILABLE (status -1) first. Safe from inside one of its callbacks
 * (the free then happens once the callback stack unwinds).
 */
void ratelimit_free(struct ratelimit *rl);

/* Largest lease taken from a bucket of this burst: min(RL_LEASE_CAP, burst / 10), >= 1. */
int ratelimit_max_lease(double burst);
/* Retry-After in whole seconds for a wait of ms milliseconds: rounded up, at least 1. */
int ratelimit_retry_after_s(long long ms);

/*
 * Charge one request to s's bucket and then to the global bucket. cb runs
 * exactly once unless the check is cancelled. When the answer is known at
 * once (a leased token, a cached denial, Postgres down, bad subject) cb runs
 * before this returns and the result is NULL; otherwise the pending handle
 * is returned and cb runs later.
 */
struct rl_check *ratelimit_check(struct ratelimit *rl, const struct rl_subject *s, rl_check_cb cb,
                                 void *arg);
/*
 * Whether ip is blocked from the login endpoints (RL_LIMITED with the seconds
 * left, RL_ALLOW, or RL_UNAVAILABLE). Same calling convention as
 * ratelimit_check; answers from the cache when it can.
 */
struct rl_check *ratelimit_ip_blocked(struct ratelimit *rl, const char *ip, rl_check_cb cb,
                                      void *arg);
/* Forget a pending check: its callback will not run. The handle is invalid afterwards. */
void ratelimit_check_cancel(struct rl_check *c);

/*
 * Record a failed login from ip and block it when the threshold is reached.
 * Returns a handle, or NULL after calling cb with RL_UNAVAILABLE (pool down
 * or bad address).
 */
struct rl_op *ratelimit_login_failed(struct ratelimit *rl, const char *ip, rl_login_cb cb,
                                     void *arg);
/* The active blocks for the admin API. NULL after cb(-1) when the pool is down. */
struct rl_op *ratelimit_blocks_list(struct ratelimit *rl, rl_list_cb cb, void *arg);
/* Lift ip's active blocks now (count lifted). NULL after cb(-1) on failure. */
struct rl_op *ratelimit_unblock(struct ratelimit *rl, const char *ip, rl_count_cb cb, void *arg);
/*
 * Delete old failures, blocks expired longer than block_history_s and idle
 * buckets (count deleted); for a periodic job. NULL after cb(-1) on failure.
 */
struct rl_op *ratelimit_purge(struct ratelimit *rl, rl_count_cb cb, void *arg);
/* Forget a pending operation: its callback will not run. The handle is invalid afterwards. */
void ratelimit_op_cancel(struct rl_op *op);

#endif
