/*
 * client.h - the one outbound HTTP(S) client of a worker: GitHub OAuth, alert
 * webhooks and AWS API calls all go through it, hundreds at a time, from the
 * worker's single libevent reactor. A call resolves the host with c-ares
 * (cached, see dns.h), connects without blocking (IPv4 and IPv6, addresses in
 * order), verifies the server certificate and host name over TLS 1.2+ with
 * ALPN http/1.1 and per-host session resumption, writes the whole request in
 * one SSL_write, and parses the response with llhttp under size limits and one
 * deadline that covers queueing, connecting and the exchange. Connections are
 * kept alive in a pool per (scheme, host, port) with a cap; calls beyond the
 * cap wait in a per-host queue. A pooled connection found closed by the server
 * is replaced and the call retried once when that is safe. Every call returns
 * a handle; http_call_cancel() guarantees its callback never runs. Callbacks
 * always run from the event loop, never inside http_client_request().
 *
 * Nothing here logs request headers, bodies, query strings or response
 * contents: they carry tokens and signatures. Request and response buffers
 * are wiped when a call ends. The process must ignore SIGPIPE (the master
 * does), since TLS writes go through write(2).
 */
#ifndef CLOUDSWEEP_CLIENT_H
#define CLOUDSWEEP_CLIENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <event2/event.h>

#include "cloudsweep/dns.h"
#include "cloudsweep/util.h"

struct http_client;
struct http_call;

/* Client settings; a zero field takes the default shown. */
struct http_client_options {
	const char *ca_file;     /* PEM bundle of trusted CAs; NULL: the system store */
	int max_conns_per_host;  /* connections per (scheme, host, port) (8) */
	int idle_timeout_ms;     /* an unused pooled connection is closed after this (30000) */
	int connect_timeout_ms;  /* TCP connect per address, and the TLS handshake (5000) */
	int deadline_ms;         /* default per-call deadline, queueing included (30000) */
	size_t max_body_bytes;   /* largest response body accepted (16 MiB) */
	size_t max_header_bytes; /* largest response head (status line + headers) (64 KiB) */
	struct dns_resolver *resolver; /* borrowed; NULL: the client creates its own */
};

/* One header of a request or a response. */
struct http_client_header {
	const char *name;
	const char *value;
};

/*
 * A request. Everything is copied by http_client_request(), so the caller may
 * free it as soon as that returns.
 */
struct http_client_request {
	const char *method; /* "GET", "POST", ...; HEAD responses have no body */
	const char *url;    /* https://host[:port]/path?query, or http:// for local emulators */
	const struct http_client_header *headers; /* Host, Content-Length, Transfer-Encoding and
	                                             Connection are set by the client */
	size_t nheaders;
	const void *body; /* may be NULL when body_len is 0 */
	size_t body_len;
	int deadline_ms; /* 0: the client's default */
	bool idempotent; /* safe to send twice even though it is not GET/HEAD/PUT/DELETE/OPTIONS
	                    (e.g. AWS query-protocol Describe* calls, which are POSTs) */
};

enum http_client_error {
	HTTP_CLIENT_OK = 0,         /* a response arrived (any status) */
	HTTP_CLIENT_ERR_DNS,        /* the host name did not resolve */
	HTTP_CLIENT_ERR_CONNECT,    /* no address accepted a TCP connection in time */
	HTTP_CLIENT_ERR_TLS,        /* the TLS handshake or a TLS record failed */
	HTTP_CLIENT_ERR_TLS_VERIFY, /* the certificate chain or host name did not verify */
	HTTP_CLIENT_ERR_TIMEOUT,    /* the call's deadline passed */
	HTTP_CLIENT_ERR_RESET,      /* the server closed or reset before the response ended */
	HTTP_CLIENT_ERR_TOO_LARGE,  /* the response head or body exceeded its limit */
	HTTP_CLIENT_ERR_MALFORMED,  /* the response was not valid HTTP/1.1 */
};

/*
 * The outcome of a call, handed to its callback. Every pointer is valid only
 * during the callback; copy what must outlive it.
 */
struct http_client_result {
	enum http_client_error error;
	const char *message;                      /* failure description; "" on success */
	int status;                               /* HTTP status when error is HTTP_CLIENT_OK */
	const struct http_client_header *headers; /* in the order received */
	size_t nheaders;
	const char *body; /* NUL-terminated for convenience; body_len bytes */
	size_t body_len;
	bool reused; /* the response came over a connection that served an earlier call */
};

/* Called exactly once per call from the event loop, unless the call was cancelled. */
typedef void (*http_client_cb)(const struct http_client_result *res, void *arg);

/* Counters and gauges for metrics. */
struct http_client_stats {
	uint64_t calls_in_flight; /* gauge: issued, callback not yet run */
	uint64_t calls_total;     /* calls issued */
	uint64_t calls_failed;    /* calls that ended with an error */
	uint64_t conns_open;      /* gauge: connections resolving, connecting or established */
	uint64_t conns_opened;    /* connections established (TCP, and TLS when https) */
	uint64_t conns_reused;    /* calls sent over a connection that served an earlier call */
	uint64_t tls_resumed;     /* TLS handshakes that resumed a cached session */
	uint64_t retries;         /* calls retried after a pooled connection turned out closed */
	uint64_t dns_cache_hits;  /* lookups answered from the resolver's cache */
};

/* A parsed request URL; the pointers point into the URL string given to the parser. */
struct http_client_url {
	bool tls;         /* https */
	bool ip_literal;  /* the host is an IPv4 or IPv6 address */
	char host[256];   /* lowercase; an IPv6 literal without its brackets */
	int port;         /* explicit, or 443 / 80 */
	const char *path; /* starts with '/'; "/" (static) when the URL has none */
	size_t path_len;
	const char *query; /* after '?', NULL when absent */
	size_t query_len;
};

/*
 * Create a client on base (borrowed). opt may be NULL for defaults; the CA
 * file is read now. NULL on error (logged).
 */
struct http_client *http_client_new(struct event_base *base, const struct http_client_options *opt);

/*
 * Free the client: pending calls are cancelled (their callbacks never run),
 * connections are closed and cached TLS sessions dropped. Must not be called
 * from inside one of the client's callbacks.
 */
void http_client_free(struct http_client *client);

/*
 * Start a call. cb(res, arg) runs once from the event loop when the response
 * has arrived or the call failed. Returns the call's handle, valid until the
 * callback returns or http_call_cancel(); NULL when the request is invalid
 * (malformed URL, scheme other than http/https, bad method or header) - then
 * cb never runs. The reason is logged, the URL is not (it may hold secrets).
 */
struct http_call *http_client_request(struct http_client *client,
                                      const struct http_client_request *req, http_client_cb cb,
                                      void *arg);

/*
 * Cancel a call: its callback will never run and the handle is freed. A
 * connection in the middle of the call's exchange is closed. Calling it from
 * inside the call's own callback is a no-op.
 */
void http_call_cancel(struct http_call *call);

/* The value of the first response header named name (case-insensitive), or NULL. */
const char *http_client_result_header(const struct http_client_result *res, const char *name);

/* Copy the client's counters (and the resolver's cache hits) into out. */
void http_client_stats(const struct http_client *client, struct http_client_stats *out);

/* A short name for an error kind ("ok", "dns", "connect", "tls", "tls_verify", ...). */
const char *http_client_error_name(enum http_client_error err);

/*
 * Parse an absolute http:// or https:// URL: no user info, no fragment, a
 * host name or IP literal ([v6] in brackets), an optional port, and a
 * path/query of visible ASCII. 0 on success, -1 when it is not acceptable.
 */
int http_client_url_parse(const char *url, struct http_client_url *out) CS_WUR;

#endif
