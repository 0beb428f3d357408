/*
 * dns.c - c-ares on the reactor, with a small TTL cache.
 *
 * c-ares tells us which sockets it wants watched through the socket-state
 * callback; each becomes a persistent libevent event whose callback hands
 * the readiness to ares_process_fd(). One timer follows ares_timeout() so
 * retransmissions and timeouts happen without any socket activity.
 *
 * Every name has one cache entry, PENDING while its query is in flight and
 * READY once answered; lookups of a pending name wait on the entry, so a
 * burst of connections to one host costs one query. Answers are handed out
 * from a ready list drained by one event: a callback never runs inside
 * dns_resolve(), even when c-ares answers synchronously from /etc/hosts.
 */
#include "config.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>

#include <ares.h>

#include "cloudsweep/dns.h"
#include "cloudsweep/log.h"

#define DNS_NAME_MAX 253

enum dns_entry_state {
	DNS_ENTRY_PENDING, /* a c-ares query is in flight; lookups wait on it */
	DNS_ENTRY_READY,   /* answered; served until expires_ms */
};

struct dns_query {
	struct dns_resolver *r;  /* borrowed */
	struct dns_entry *entry; /* borrowed; the pending entry waited on, NULL once ready */
	dns_cb cb;
	void *arg;
	enum dns_status status;
	char message[128];
	struct dns_addr addrs[DNS_MAX_ADDRS];
	size_t naddrs;
	bool cached;
	TAILQ_ENTRY(dns_query) link; /* in entry->waiters, or in r->ready */
};

TAILQ_HEAD(dns_query_list, dns_query);

struct dns_entry {
	struct dns_resolver *r; /* borrowed */
	char *name;             /* owned, lowercase */
	enum dns_entry_state state;
	enum dns_status status;
	char message[128];
	struct dns_addr addrs[DNS_MAX_ADDRS];
	size_t naddrs;
	uint64_t expires_ms;           /* monotonic; READY entries only */
	struct dns_query_list waiters; /* lookups waiting for the answer */
	TAILQ_ENTRY(dns_entry) link;   /* in r->entries, most recently used first */
};

TAILQ_HEAD(dns_entry_list, dns_entry);

/* A socket c-ares asked us to watch; the slot and its event are reused. */
struct dns_sock {
	int fd;           /* -1 when the slot is free */
	struct event *ev; /* owned */
};

struct dns_resolver {
	struct event_base *base; /* borrowed */
	ares_channel channel;    /* owned */
	struct dns_options opt;
	struct event *ev_timer;   /* owned; follows ares_timeout() */
	struct event *ev_deliver; /* owned; drains the ready list */
	struct dns_sock *socks;   /* owned array */
	size_t nsocks;
	struct dns_entry_list entries;
	size_t nentries;
	struct dns_query_list ready; /* answered, callbacks not yet run */
	struct dns_stats stats;
	bool destroying;
};

static void dns_sock_cb(evutil_socket_t fd, short what, void *arg);
static void dns_deliver_cb(evutil_socket_t fd, short what, void *arg);

const char *dns_status_name(enum dns_status status)
{
	switch (status) {
	case DNS_OK:
		return "ok";
	case DNS_ERR_NOTFOUND:
		return "not_found";
	case DNS_ERR_TIMEOUT:
		return "timeout";
	case DNS_ERR_FAIL:
		return "failure";
	}
	return "unknown";
}

/* Re-arm the timer from ares_timeout(), or stop it when nothing is pending. */
static void dns_rearm(struct dns_resolver *r)
{
	struct timeval tv, *tvp;

	if (r->destroying)
		return;
	tvp = ares_timeout(r->channel, NULL, &tv);
	if (tvp == NULL) {
		evtimer_del(r->ev_timer);
		return;
	}
	evtimer_add(r->ev_timer, tvp);
}

static void dns_timer_cb(evutil_socket_t fd, short what, void *arg)
{
	struct dns_resolver *r = arg;

	ares_process_fd(r->channel, ARES_SOCKET_BAD, ARES_SOCKET_BAD);
	dns_rearm(r);
}

static void dns_sock_cb(evutil_socket_t fd, short what, void *arg)
{
	struct dns_resolver *r = arg;

	ares_process_fd(r->channel, (what & EV_READ) ? fd : ARES_SOCKET_BAD,
	                (what & EV_WRITE) ? fd : ARES_SOCKET_BAD);
	dns_rearm(r);
}

/* c-ares' socket-state callback: watch, re-watch or forget one socket. */
static void dns_sock_state_cb(void *data, ares_socket_t fd, int readable, int writable)
{
	struct dns_resolver *r = data;
	struct dns_sock *slot = NULL, *free_slot = NULL;
	short what = (short)((readable ? EV_READ : 0) | (writable ? EV_WRITE : 0));

	for (size_t i = 0; i < r->nsocks; i++) {
		if (r->socks[i].fd == fd)
			slot = &r->socks[i];
		else if (r->socks[i].fd == -1 && free_slot == NULL)
			free_slot = &r->socks[i];
	}
	if (slot == NULL && what == 0)
		return;
	if (slot == NULL) {
		if (free_slot == NULL) {
			r->socks = xrealloc(r->socks, (r->nsocks + 1) * sizeof(*r->socks));
			free_slot = &r->socks[r->nsocks++];
			free_slot->ev = event_new(r->base, -1, 0, dns_sock_cb, r);
			if (free_slot->ev == NULL)
				fatalx("event_new", "cannot create a DNS socket event");
		}
		slot = free_slot;
	}
	/* The event may be the one running right now; it is re-assigned, never freed here. */
	event_del(slot->ev);
	if (what == 0) {
		slot->fd = -1;
		return;
	}
	slot->fd = fd;
	if (event_assign(slot->ev, r->base, fd, (short)(what | EV_PERSIST), dns_sock_cb, r) != 0 ||
	    event_add(slot->ev, NULL) != 0)
		fatalx("event_add", "cannot watch a DNS socket");
}

struct dns_resolver *dns_resolver_new(struct event_base *base, const struct dns_options *opt)
{
	struct dns_resolver *r = xcalloc(1, sizeof(*r));
	struct ares_options ao;
	char lookups[] = "fb"; /* /etc/hosts first, then DNS */
	int rc;

	if (opt != NULL)
		r->opt = *opt;
	if (r->opt.timeout_ms <= 0)
		r->opt.timeout_ms = 2000;
	if (r->opt.tries <= 0)
		r->opt.tries = 2;
	if (r->opt.min_ttl_s <= 0)
		r->opt.min_ttl_s = 1;
	if (r->opt.max_ttl_s <= 0)
		r->opt.max_ttl_s = 300;
	if (r->opt.max_ttl_s < r->opt.min_ttl_s)
		r->opt.max_ttl_s = r->opt.min_ttl_s;
	if (r->opt.negative_ttl_s <= 0)
		r->opt.negative_ttl_s = 5;
	if (r->opt.cache_max <= 0)
		r->opt.cache_max = 1024;
	r->base = base;
	TAILQ_INIT(&r->entries);
	TAILQ_INIT(&r->ready);

	rc = ares_library_init(ARES_LIB_INIT_ALL);
	if (rc != ARES_SUCCESS) {
		log_errorx("dns_init", "ares_library_init: %s", ares_strerror(rc));
		free(r);
		return NULL;
	}
	memset(&ao, 0, sizeof(ao));
	ao.timeout = r->opt.timeout_ms;
	ao.tries = r->opt.tries;
	ao.lookups = lookups;
	ao.sock_state_cb = dns_sock_state_cb;
	ao.sock_state_cb_data = r;
	rc = ares_init_options(&r->channel, &ao,
	                       ARES_OPT_TIMEOUTMS | ARES_OPT_TRIES | ARES_OPT_LOOKUPS |
	                           ARES_OPT_SOCK_STATE_CB);
	if (rc != ARES_SUCCESS) {
		log_errorx("dns_init", "ares_init_options: %s", ares_strerror(rc));
		ares_library_cleanup();
		free(r);
		return NULL;
	}
	r->ev_timer = evtimer_new(base, dns_timer_cb, r);
	r->ev_deliver = event_new(base, -1, 0, dns_deliver_cb, r);
	if (r->ev_timer == NULL || r->ev_deliver == NULL)
		fatalx("event_new", "cannot create resolver events");
	return r;
}

static void dns_entry_free(struct dns_entry *e)
{
	TAILQ_REMOVE(&e->r->entries, e, link);
	e->r->nentries--;
	free(e->name);
	free(e);
}

void dns_resolver_free(struct dns_resolver *r)
{
	struct dns_entry *e;
	struct dns_query *q;

	if (r == NULL)
		return;
	r->destroying = true;
	while ((q = TAILQ_FIRST(&r->ready)) != NULL) {
		TAILQ_REMOVE(&r->ready, q, link);
		free(q);
	}
	TAILQ_FOREACH (e, &r->entries, link) {
		while ((q = TAILQ_FIRST(&e->waiters)) != NULL) {
			TAILQ_REMOVE(&e->waiters, q, link);
			free(q);
		}
	}
	/* Pending queries call back with ARES_EDESTRUCTION; the entries outlive that. */
	ares_destroy(r->channel);
	while ((e = TAILQ_FIRST(&r->entries)) != NULL)
		dns_entry_free(e);
	for (size_t i = 0; i < r->nsocks; i++)
		event_free(r->socks[i].ev);
	free(r->socks);
	event_free(r->ev_timer);
	event_free(r->ev_deliver);
	ares_library_cleanup();
	free(r);
}

void dns_resolver_stats(const struct dns_resolver *r, struct dns_stats *out)
{
	*out = r->stats;
}

static void dns_deliver_cb(evutil_socket_t fd, short what, void *arg)
{
	struct dns_resolver *r = arg;
	struct dns_query *q;

	/* Callbacks may cancel other ready queries or start new ones; both are fine here. */
	while ((q = TAILQ_FIRST(&r->ready)) != NULL) {
		struct dns_result res = {
			.status = q->status,
			.message = q->message,
			.addrs = q->addrs,
			.naddrs = q->naddrs,
			.cached = q->cached,
		};

		TAILQ_REMOVE(&r->ready, q, link);
		q->cb(&res, q->arg);
		free(q);
	}
}

/* Move a query to the ready list with the given answer. */
static void dns_query_ready(struct dns_query *q, enum dns_status status, const char *message,
                            const struct dns_addr *addrs, size_t naddrs)
{
	struct dns_resolver *r = q->r;

	q->entry = NULL;
	q->status = status;
	if (snprintf(q->message, sizeof(q->message), "%s", message) >= (int)sizeof(q->message))
		log_debug("dns_message", "resolver message truncated");
	q->naddrs = naddrs;
	if (naddrs > 0)
		memcpy(q->addrs, addrs, naddrs * sizeof(*addrs));
	TAILQ_INSERT_TAIL(&r->ready, q, link);
	event_active(r->ev_deliver, EV_TIMEOUT, 1);
}

void dns_query_cancel(struct dns_query *q)
{
	if (q == NULL)
		return;
	if (q->entry != NULL)
		TAILQ_REMOVE(&q->entry->waiters, q, link); /* the query itself keeps running */
	else
		TAILQ_REMOVE(&q->r->ready, q, link);
	free(q);
}

/* Parse an IP literal into one address; false when name is not one. */
static bool dns_literal(const char *name, struct dns_addr *a)
{
	struct sockaddr_in *sin = (struct sockaddr_in *)&a->ss;
	struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&a->ss;

	memset(a, 0, sizeof(*a));
	if (inet_pton(AF_INET, name, &sin->sin_addr) == 1) {
		sin->sin_family = AF_INET;
		a->len = sizeof(*sin);
		return true;
	}
	memset(a, 0, sizeof(*a));
	if (inet_pton(AF_INET6, name, &sin6->sin6_addr) == 1) {
		sin6->sin6_family = AF_INET6;
		a->len = sizeof(*sin6);
		return true;
	}
	return false;
}

/* RFC 6761 6.4: "invalid" and names under it never resolve. */
static bool dns_is_invalid_tld(const char *name)
{
	size_t n = strlen(name);

	if (n > 0 && name[n - 1] == '.')
		n--;
	if (n == 7 && strncmp(name, "invalid", 7) == 0)
		return true;
	return n > 8 && strncmp(name + n - 8, ".invalid", 8) == 0;
}

static void dns_addrinfo_cb(void *arg, int status, int timeouts, struct ares_addrinfo *ai)
{
	struct dns_entry *e = arg;
	struct dns_resolver *r = e->r;
	struct dns_query *q;
	long long ttl = -1;

	if (status == ARES_EDESTRUCTION || r->destroying) {
		ares_freeaddrinfo(ai);
		return; /* dns_resolver_free() frees the entries */
	}
	e->naddrs = 0;
	if (status == ARES_SUCCESS && ai != NULL) {
		for (struct ares_addrinfo_node *n = ai->nodes;
		     n != NULL && e->naddrs < DNS_MAX_ADDRS; n = n->ai_next) {
			struct dns_addr *a = &e->addrs[e->naddrs];

			if ((n->ai_family != AF_INET && n->ai_family != AF_INET6) ||
			    n->ai_addrlen > sizeof(a->ss))
				continue;
			memset(a, 0, sizeof(*a));
			memcpy(&a->ss, n->ai_addr, n->ai_addrlen);
			a->len = n->ai_addrlen;
			e->naddrs++;
			if (ttl < 0 || n->ai_ttl < ttl)
				ttl = n->ai_ttl;
		}
	}
	ares_freeaddrinfo(ai);

	if (e->naddrs > 0) {
		e->status = DNS_OK;
		e->message[0] = '\0';
		if (ttl < r->opt.min_ttl_s)
			ttl = r->opt.min_ttl_s;
		if (ttl > r->opt.max_ttl_s)
			ttl = r->opt.max_ttl_s;
	} else {
		r->stats.failures++;
		switch (status) {
		case ARES_SUCCESS:
		case ARES_ENOTFOUND:
		case ARES_ENODATA:
		case ARES_ENONAME:
			e->status = DNS_ERR_NOTFOUND;
			ttl = r->opt.negative_ttl_s;
			break;
		case ARES_ETIMEOUT:
			e->status = DNS_ERR_TIMEOUT;
			ttl = 0; /* ask again next time */
			break;
		default:
			e->status = DNS_ERR_FAIL;
			ttl = 0;
			break;
		}
		snprintf(e->message, sizeof(e->message), "cannot resolve %s: %s", e->name,
		         status == ARES_SUCCESS ? "no address" : ares_strerror(status));
		log_debug("dns_fail", "%s (%d timeouts)", e->message, timeouts);
	}
	e->state = DNS_ENTRY_READY;
	e->expires_ms = cs_now_ms() + (uint64_t)ttl * 1000;
	while ((q = TAILQ_FIRST(&e->waiters)) != NULL) {
		TAILQ_REMOVE(&e->waiters, q, link);
		dns_query_ready(q, e->status, e->message, e->addrs, e->naddrs);
	}
}

/* Drop the least recently used answered entries beyond the cache size. */
static void dns_cache_trim(struct dns_resolver *r)
{
	struct dns_entry *e = TAILQ_LAST(&r->entries, dns_entry_list), *prev;

	while (e != NULL && r->nentries > (size_t)r->opt.cache_max) {
		prev = TAILQ_PREV(e, dns_entry_list, link);
		if (e->state == DNS_ENTRY_READY)
			dns_entry_free(e); /* pending ones are referenced by c-ares */
		e = prev;
	}
}

struct dns_query *dns_resolve(struct dns_resolver *r, const char *name, dns_cb cb, void *arg)
{
	struct dns_query *q = xcalloc(1, sizeof(*q));
	struct ares_addrinfo_hints hints;
	struct dns_entry *e;
	struct dns_addr lit;
	char lname[DNS_NAME_MAX + 2];
	size_t n = strlen(name);

	q->r = r;
	q->cb = cb;
	q->arg = arg;
	r->stats.lookups++;

	if (dns_literal(name, &lit)) {
		q->cached = true;
		dns_query_ready(q, DNS_OK, "", &lit, 1);
		return q;
	}
	if (n == 0 || n > DNS_NAME_MAX + 1) {
		dns_query_ready(q, DNS_ERR_NOTFOUND, "invalid host name", NULL, 0);
		return q;
	}
	for (size_t i = 0; i <= n; i++)
		lname[i] = (char)tolower((unsigned char)name[i]);
	if (dns_is_invalid_tld(lname)) {
		char msg[DNS_NAME_MAX + 64];

		snprintf(msg, sizeof(msg), "cannot resolve %s: reserved name (RFC 6761)", lname);
		dns_query_ready(q, DNS_ERR_NOTFOUND, msg, NULL, 0);
		return q;
	}

	TAILQ_FOREACH (e, &r->entries, link) {
		if (strcmp(e->name, lname) == 0)
			break;
	}
	if (e != NULL && e->state == DNS_ENTRY_READY && cs_now_ms() >= e->expires_ms) {
		dns_entry_free(e);
		e = NULL;
	}
	if (e != NULL) {
		TAILQ_REMOVE(&r->entries, e, link);
		TAILQ_INSERT_HEAD(&r->entries, e, link);
		if (e->state == DNS_ENTRY_READY) {
			r->stats.cache_hits++;
			q->cached = true;
			dns_query_ready(q, e->status, e->message, e->addrs, e->naddrs);
		} else {
			r->stats.coalesced++;
			q->entry = e;
			TAILQ_INSERT_TAIL(&e->waiters, q, link);
		}
		return q;
	}

	e = xcalloc(1, sizeof(*e));
	e->r = r;
	e->name = xstrdup(lname);
	e->state = DNS_ENTRY_PENDING;
	TAILQ_INIT(&e->waiters);
	TAILQ_INSERT_HEAD(&r->entries, e, link);
	r->nentries++;
	q->entry = e;
	TAILQ_INSERT_TAIL(&e->waiters, q, link);
	dns_cache_trim(r);

	memset(&hints, 0, sizeof(hints));
	hints.ai_family = AF_UNSPEC;
	hints.ai_socktype = SOCK_STREAM;
	r->stats.queries++;
	/* May call back before returning (from /etc/hosts); q is already waiting on e. */
	ares_getaddrinfo(r->channel, e->name, NULL, &hints, dns_addrinfo_cb, e);
	dns_rearm(r);
	return q;
}
