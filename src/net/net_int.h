/*
 * net_int.h - what server.c and conn.c share inside net/: the server and
 * connection structures. Nothing outside net/ includes this file.
 */
#ifndef CLOUDSWEEP_NET_INT_H
#define CLOUDSWEEP_NET_INT_H

#include <sys/queue.h>

#include <llhttp.h>

#include "cloudsweep/net.h"

enum conn_state {
	CONN_HANDSHAKE,  /* TLS handshake in progress (handshake timeout) */
	CONN_IDLE,       /* between requests, nothing buffered (idle timeout) */
	CONN_HEAD,       /* reading a request head (header timeout, a total bound) */
	CONN_BODY,       /* reading a request body (body timeout) */
	CONN_DISPATCHED, /* a handler owns the request; parsing is paused */
	CONN_WRITING,    /* flushing a response */
	CONN_CLOSED,     /* torn down; freed once the callback stack unwinds */
};

/* A growable byte buffer; [off, len) holds the live bytes. */
struct netbuf {
	char *data; /* owned */
	size_t off, len, cap;
};

static inline size_t netbuf_used(const struct netbuf *b)
{
	return b->len - b->off;
}
/* Make room for extra more bytes. */
void netbuf_reserve(struct netbuf *b, size_t extra);
/* Append n bytes. */
void netbuf_append(struct netbuf *b, const char *p, size_t n);
/* Empty the buffer, releasing its memory when it grew beyond keep_cap. */
void netbuf_reset(struct netbuf *b, size_t keep_cap);
/* Release the buffer's memory. */
void netbuf_free(struct netbuf *b);

/* The request parser: llhttp plus the request being assembled and the limits. */
struct http_parse {
	llhttp_t parser;
	const struct config *cfg;    /* borrowed; limits */
	const struct router *router; /* borrowed; given to new requests */
	struct conn *conn;           /* borrowed; given to new requests, may be NULL */
	struct http_request *req;    /* owned until taken */
	struct netbuf url;           /* request target being assembled */
	struct netbuf hname;         /* header name being assembled */
	struct netbuf hval;          /* header value being assembled */
	struct netbuf body;          /* body being assembled */
	size_t head_bytes;           /* bytes of the current head counted so far */
	int error_status;            /* the answer to a limit or syntax failure */
	bool in_body;                /* headers done, body bytes expected */
	bool continue_due;           /* a 100 Continue must be sent */
};

enum parse_result {
	PARSE_MORE,    /* every byte consumed; a request is not complete yet */
	PARSE_REQUEST, /* a request is complete (take it); *consumed bytes used */
	PARSE_ERROR,   /* answer error_status and close */
};

/* Set up a parser; cfg supplies the limits. */
void http_parse_init(struct http_parse *ps, const struct config *cfg, const struct router *router,
                     struct conn *conn);
/* Parse up to len bytes, stopping after a complete request. */
enum parse_result http_parse_feed(struct http_parse *ps, const char *data, size_t len,
                                  size_t *consumed);
/* Take ownership of the request being assembled (may be NULL). */
struct http_request *http_parse_take(struct http_parse *ps);
/* Between requests: give the assembly buffers back so an idle connection is small. */
void http_parse_trim(struct http_parse *ps);
/* Free the parser's buffers and any request it still owns. */
void http_parse_free(struct http_parse *ps);

struct ip_slot;

struct conn {
	struct server *srv; /* borrowed */
	int fd;
	SSL *ssl;             /* owned */
	struct event *ev_r;   /* owned; persistent read readiness */
	struct event *ev_w;   /* owned; write readiness, armed on demand */
	struct event *ev_tmo; /* owned; the timeout of the current state */
	enum conn_state state;
	struct http_parse parse;  /* the request being received */
	struct http_request *req; /* owned; the request being served */
	struct netbuf in;         /* received, not yet parsed */
	struct netbuf out;        /* response bytes not yet written */
	int resp_status;          /* status of the response being written */
	bool close_after_write;
	bool read_paused;   /* input buffer full: read event disabled */
	bool idle_trimmed;  /* idle long enough that the buffers were released */
	struct ip_slot *ip; /* borrowed; this client's entry in the per-IP table */
	char ip_text[64];
	TAILQ_ENTRY(conn) link;
};

TAILQ_HEAD(conn_list, conn);

struct ip_slot {
	char ip[64];
	int count;
	struct ip_slot *next;
};

#define NET_IP_BUCKETS 1024

struct server {
	struct event_base *base;  /* borrowed */
	const struct config *cfg; /* borrowed */
	struct router *router;    /* borrowed */
	SSL_CTX *ctx;             /* borrowed; shared by all workers */
	int listen_fd;
	struct event *ev_accept; /* owned */
	struct event *ev_resume; /* owned; re-enables accept after EMFILE */
	struct conn_list conns;
	int nconns;
	bool draining;
	void (*drained_cb)(void *);
	void *drained_arg;
	struct ip_slot *ips[NET_IP_BUCKETS]; /* owned */
};

/* Start serving an accepted socket (server.c calls it). */
void conn_start(struct server *srv, int fd, const char *ip_text, struct ip_slot *ip);
/* Tear a connection down once; reason is logged at debug level. */
void conn_close(struct conn *c, const char *reason);
/* True when the connection sits between requests with nothing buffered. */
bool conn_is_idle(const struct conn *c);
/* Called by conn.c when a connection is gone, to update counters. */
void server_conn_gone(struct server *srv, struct conn *c);

#endif
