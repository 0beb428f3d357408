/*
 * dns.h - asynchronous name resolution with c-ares on a worker's libevent
 * reactor. The c-ares channel reports its sockets through the socket-state
 * callback and they become plain libevent events; one timer follows
 * ares_timeout(). Answers are cached for their TTL (clamped to a floor and a
 * ceiling), concurrent lookups of one name share a single query, IP literals
 * never reach c-ares, and names under ".invalid" fail at once (RFC 6761).
 * "localhost" resolves through /etc/hosts, which c-ares reads first.
 *
 * A lookup returns a handle that can be cancelled until its callback runs;
 * the callback always runs from the event loop, never inside dns_resolve().
 */
#ifndef CLOUDSWEEP_DNS_H
#define CLOUDSWEEP_DNS_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include <event2/event.h>

#include "cloudsweep/util.h"

/* At most this many addresses are kept per answer. */
#define DNS_MAX_ADDRS 16

struct dns_resolver;
struct dns_query;

/* Resolver settings; a zero field takes the default shown. */
struct dns_options {
	int timeout_ms;     /* per try, per server (2000) */
	int tries;          /* tries per server (2) */
	int min_ttl_s;      /* floor applied to answer TTLs, so bursts share one lookup (1) */
	int max_ttl_s;      /* ceiling applied to answer TTLs (300) */
	int negative_ttl_s; /* how long "no such name" is remembered (5) */
	int cache_max;      /* cached names (1024) */
};

enum dns_status {
	DNS_OK = 0,       /* at least one address */
	DNS_ERR_NOTFOUND, /* the name does not exist or has no address */
	DNS_ERR_TIMEOUT,  /* no server answered in time */
	DNS_ERR_FAIL,     /* any other resolver failure */
};

/* One address; the port is left 0 for the caller to fill in. */
struct dns_addr {
	struct sockaddr_storage ss;
	socklen_t len;
};

/* What a lookup found; valid only during the callback. */
struct dns_result {
	enum dns_status status;
	const char *message; /* human-readable failure, "" on success */
	const struct dns_addr *addrs;
	size_t naddrs;
	bool cached; /* answered from the cache (or a literal) without a new query */
};

/* Counters since the resolver was created. */
struct dns_stats {
	uint64_t lookups;    /* dns_resolve() calls */
	uint64_t queries;    /* lookups that went to c-ares */
	uint64_t cache_hits; /* lookups answered from the cache */
	uint64_t coalesced;  /* lookups that joined a query already in flight */
	uint64_t failures;   /* c-ares queries that found nothing or failed */
};

/* Called once per lookup, from the event loop, unless the lookup was cancelled. */
typedef void (*dns_cb)(const struct dns_result *res, void *arg);

/*
 * Create a resolver on base (borrowed) reading /etc/resolv.conf and
 * /etc/hosts; opt may be NULL for defaults. NULL on error (logged).
 */
struct dns_resolver *dns_resolver_new(struct event_base *base, const struct dns_options *opt);

/*
 * Free the resolver. Lookups still pending are dropped without their
 * callbacks; their handles become invalid, so owners cancel them first.
 */
void dns_resolver_free(struct dns_resolver *r);

/*
 * Look up the IPv4 and IPv6 addresses of name (a host name or an IP
 * literal). cb runs exactly once from the event loop unless
 * dns_query_cancel() is called first. Never NULL.
 */
struct dns_query *dns_resolve(struct dns_resolver *r, const char *name, dns_cb cb, void *arg);

/* Cancel a pending lookup: its callback will never run and the handle is freed. */
void dns_query_cancel(struct dns_query *q);

/* Copy the resolver's counters into out. */
void dns_resolver_stats(const struct dns_resolver *r, struct dns_stats *out);

/* A short name for a status ("ok", "not_found", "timeout", "failure"). */
const char *dns_status_name(enum dns_status status);

#endif
