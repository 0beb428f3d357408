/*
 * client.c - the outbound HTTP(S) client: a keep-alive pool per (scheme,
 * host, port), each connection an explicit state machine
 *
 *   RESOLVING -> CONNECTING -> HANDSHAKE -> IDLE <-> WRITING -> READING
 *                                              \-> CLOSED (from any state)
 *
 * driven from plain libevent events (no bufferevent), like the server side in
 * conn.c: the whole request leaves in one SSL_write and responses are parsed
 * with llhttp as they arrive.
 *
 * Calls never wait on a particular connection. A call sits in its host's
 * queue until an IDLE connection takes it; the dispatcher (one deferred event
 * per host) hands queued calls to idle connections and opens new connections,
 * up to the cap, while more calls wait than connections are being set up.
 * A failed setup fails the oldest waiting call (the attempt was made on its
 * behalf), or every waiting call when no other connection of the host is left
 * to serve them. Each call has one deadline timer, from http_client_request()
 * to its callback.
 *
 * Lifetimes: client_conn_close() is the one teardown; it moves the connection
 * to the client's graveyard, which a deferred event empties once the callback
 * stack has unwound (and http_client_free() empties synchronously, so
 * nothing is left to a loop that may never run again). Calls are freed right
 * after their callback returns, or at cancel.
 */
#include "config.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/queue.h>
#include <sys/socket.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "cloudsweep/client.h"
#include "cloudsweep/log.h"
#include "net_int.h"

#define CLIENT_READ_CHUNK  16384
#define CLIENT_URL_MAX     8192
#define CLIENT_METHOD_MAX  16
#define CLIENT_MAX_HEADERS 256 /* response headers kept per response */
#define CLIENT_MAX_HOSTS   256 /* hosts kept (with their TLS session) once idle */
#define CLIENT_USER_AGENT  "cloudsweep/" PACKAGE_VERSION
#define CLIENT_MSG_MAX     512 /* room for a 253-byte host name and a reason */

enum client_conn_state {
	CLIENT_CONN_RESOLVING,  /* waiting for the host's addresses (c-ares bounds it) */
	CLIENT_CONN_CONNECTING, /* non-blocking connect to one address (connect timeout) */
	CLIENT_CONN_HANDSHAKE,  /* TLS handshake (connect timeout) */
	CLIENT_CONN_IDLE,       /* pooled, no call; watching for EOF (idle timeout) */
	CLIENT_CONN_WRITING,    /* sending a call's request (the call's deadline) */
	CLIENT_CONN_READING,    /* receiving the call's response (the call's deadline) */
	CLIENT_CONN_CLOSED,     /* torn down; freed once the callback stack unwinds */
};

static const char *const client_conn_state_names[] = { "resolving", "connecting", "handshake",
	                                               "idle",      "writing",    "reading",
	                                               "closed" };

enum client_call_state {
	CLIENT_CALL_NEW,    /* being built by http_client_request() */
	CLIENT_CALL_QUEUED, /* in its host's queue, waiting for an idle connection */
	CLIENT_CALL_ACTIVE, /* on a connection: request going out, response coming in */
	CLIENT_CALL_DONE,   /* ended; its callback is running, then it is freed */
};

/* Outcome of one read or write attempt on a connection. */
enum client_io {
	CLIENT_IO_DONE,       /* n bytes moved */
	CLIENT_IO_WANT_READ,  /* wait for readability */
	CLIENT_IO_WANT_WRITE, /* wait for writability */
	CLIENT_IO_EOF,        /* the server closed its side */
	CLIENT_IO_ERROR,      /* the connection is broken; see io_kind/io_err */
};

/* The response being received, accumulated in the call. */
struct client_resp {
	int status;
	struct netbuf hbuf; /* header names and values, each NUL-terminated */
	size_t *hoff;       /* owned; hbuf offsets: name, value, name, value, ... */
	size_t nhoff, hoff_cap;
	size_t field_off, value_off; /* where the name/value being received starts */
	size_t head_bytes;           /* status line and headers (and trailers) so far */
	bool in_field, in_value;
	bool headers_done; /* later header callbacks are trailers: counted, not kept */
	bool interim;      /* a 1xx response is being skipped */
	struct netbuf body;
};

struct client_host;
struct client_conn;

struct http_call {
	struct http_client *client; /* borrowed */
	struct client_host *host;   /* borrowed */
	struct client_conn *conn;   /* borrowed; set while ACTIVE */
	enum client_call_state state;
	http_client_cb cb;
	void *arg;
	struct netbuf wire; /* owned; the whole request, wiped when freed */
	bool head;          /* HEAD: the response has no body */
	bool idempotent;
	bool retried;    /* the one retry is spent */
	bool need_fresh; /* the retry must use a connection that never served a call */
	bool reused;     /* the current attempt went over a reused connection */
	uint64_t seq;    /* arrival order within the host */
	int deadline_ms;
	struct event *ev_deadline; /* owned */
	struct client_resp resp;
	char message[CLIENT_MSG_MAX];
	TAILQ_ENTRY(http_call) link; /* in host->waiting while QUEUED */
};

TAILQ_HEAD(client_call_list, http_call);

struct client_conn {
	struct http_client *client; /* borrowed */
	struct client_host *host;   /* borrowed; not used once CLOSED */
	enum client_conn_state state;
	int fd;
	SSL *ssl;               /* owned; NULL for http:// */
	struct event *ev_r;     /* owned; persistent readability, re-assigned per socket */
	struct event *ev_w;     /* owned; writability on demand, re-assigned per socket */
	struct event *ev_tmo;   /* owned; the timeout of the current state */
	struct dns_query *dnsq; /* owned handle while RESOLVING */
	struct dns_addr addrs[DNS_MAX_ADDRS];
	size_t naddrs, next_addr;
	char addr_text[INET6_ADDRSTRLEN + 8]; /* the address tried or connected */
	char connect_err[128];                /* why the last address failed */
	struct http_call *call;               /* borrowed; the call being served */
	llhttp_t parser;
	size_t wr_off;               /* request bytes written */
	unsigned served;             /* calls handed to this connection */
	bool sent_any;               /* bytes of the current request may have left */
	bool got_any;                /* bytes of the current response arrived */
	bool msg_done;               /* the response is complete */
	bool keep_alive;             /* the server allows another request */
	enum http_client_error perr; /* set by a parser callback that stops parsing */
	char perr_msg[CLIENT_MSG_MAX];
	enum http_client_error io_kind; /* kind of the last CLIENT_IO_ERROR */
	char io_err[CLIENT_MSG_MAX];
	TAILQ_ENTRY(client_conn) link; /* in host->conns, then client->graveyard */
};

TAILQ_HEAD(client_conn_list, client_conn);

struct client_host {
	struct http_client *client; /* borrowed */
	bool tls;
	bool ip_literal;
	char name[256]; /* lowercase host name or IP literal */
	int port;
	char host_header[272];
	SSL_SESSION *session;          /* owned; newest session, offered for resumption */
	struct client_conn_list conns; /* every connection not CLOSED, most recently idle first */
	int nconns;
	struct client_call_list waiting;
	int nwaiting;
	uint64_t next_seq;
	struct event *ev_dispatch; /* owned; deferred dispatch */
	TAILQ_ENTRY(client_host) link;
};

TAILQ_HEAD(client_host_list, client_host);

struct http_client {
	struct event_base *base;  /* borrowed */
	SSL_CTX *ctx;             /* owned */
	struct dns_resolver *dns; /* owned when own_dns, else borrowed */
	bool own_dns;
	struct http_client_options opt;
	struct client_host_list hosts;
	int nhosts;
	struct client_conn_list graveyard; /* closed, not yet freed */
	struct event *ev_reap;             /* owned; frees the graveyard */
	struct http_client_stats stats;
	int in_callback; /* depth of user callbacks on the stack */
	bool freeing;
};

static void client_conn_close(struct client_conn *c, enum http_client_error err,
                              const char *reason);
static void client_conn_advance(struct client_conn *c, short what);
static void client_call_finish(struct http_call *call, enum http_client_error err, const char *fmt,
                               ...) CS_PRINTF(3, 4);
static const llhttp_settings_t client_parse_settings;

const char *http_client_error_name(enum http_client_error err)
{
	switch (err) {
	case HTTP_CLIENT_OK:
		return "ok";
	case HTTP_CLIENT_ERR_DNS:
		return "dns";
	case HTTP_CLIENT_ERR_CONNECT:
		return "connect";
	case HTTP_CLIENT_ERR_TLS:
		return "tls";
	case HTTP_CLIENT_ERR_TLS_VERIFY:
		return "tls_verify";
	case HTTP_CLIENT_ERR_TIMEOUT:
		return "timeout";
	case HTTP_CLIENT_ERR_RESET:
		return "reset";
	case HTTP_CLIENT_ERR_TOO_LARGE:
		return "too_large";
	case HTTP_CLIENT_ERR_MALFORMED:
		return "malformed";
	}
	return "unknown";
}

static void client_arm(struct event *ev, long long ms)
{
	struct timeval tv;

	if (ms <= 0) {
		evtimer_del(ev);
		return;
	}
	tv.tv_sec = ms / 1000;
	tv.tv_usec = (ms % 1000) * 1000;
	evtimer_add(ev, &tv);
}

/* --- hosts and dispatch --- */

static void client_host_kick(struct client_host *h)
{
	event_active(h->ev_dispatch, EV_TIMEOUT, 1);
}

/* The one place a call changes state; keeps the host's queue in step. */
static void client_call_set_state(struct http_call *call, enum client_call_state s)
{
	struct client_host *h = call->host;

	if (call->state == s)
		return;
	if (call->state == CLIENT_CALL_QUEUED) {
		TAILQ_REMOVE(&h->waiting, call, link);
		h->nwaiting--;
	}
	call->state = s;
	if (s == CLIENT_CALL_QUEUED) {
		if (call->retried)
			TAILQ_INSERT_HEAD(&h->waiting, call, link); /* it has waited its turn */
		else
			TAILQ_INSERT_TAIL(&h->waiting, call, link);
		h->nwaiting++;
		client_host_kick(h);
	}
}

/* The one place a connection changes state; each state brings its timeout. */
static void client_conn_set_state(struct client_conn *c, enum client_conn_state s)
{
	const struct http_client_options *opt = &c->client->opt;

	if (c->state == s)
		return;
	c->state = s;
	switch (s) {
	case CLIENT_CONN_RESOLVING:
		client_arm(c->ev_tmo, 0);
		break;
	case CLIENT_CONN_CONNECTING:
		client_arm(c->ev_tmo, opt->connect_timeout_ms);
		break;
	case CLIENT_CONN_HANDSHAKE:
		client_arm(c->ev_tmo, opt->connect_timeout_ms);
		break;
	case CLIENT_CONN_IDLE:
		client_arm(c->ev_tmo, opt->idle_timeout_ms);
		/* Most recently idle first: the others age out under the idle timeout. */
		TAILQ_REMOVE(&c->host->conns, c, link);
		TAILQ_INSERT_HEAD(&c->host->conns, c, link);
		break;
	case CLIENT_CONN_WRITING:
	case CLIENT_CONN_READING:
		client_arm(c->ev_tmo, 0);
		break; /* the call's deadline rules */
	case CLIENT_CONN_CLOSED:
		client_arm(c->ev_tmo, 0);
		break;
	}
}

static bool client_conn_in_setup(const struct client_conn *c)
{
	return c->state == CLIENT_CONN_RESOLVING || c->state == CLIENT_CONN_CONNECTING ||
	       c->state == CLIENT_CONN_HANDSHAKE;
}

static void client_conn_read_cb(evutil_socket_t fd, short what, void *arg);
static void client_conn_write_cb(evutil_socket_t fd, short what, void *arg);
static void client_conn_timeout_cb(evutil_socket_t fd, short what, void *arg);
static void client_conn_dns_cb(const struct dns_result *res, void *arg);

/* Open a new connection for host h; it starts by resolving (never synchronously). */
static void client_conn_new(struct client_host *h)
{
	struct http_client *cl = h->client;
	struct client_conn *c = xcalloc(1, sizeof(*c));

	c->client = cl;
	c->host = h;
	c->fd = -1;
	c->state = CLIENT_CONN_RESOLVING;
	c->ev_r = event_new(cl->base, -1, 0, client_conn_read_cb, c);
	c->ev_w = event_new(cl->base, -1, 0, client_conn_write_cb, c);
	c->ev_tmo = evtimer_new(cl->base, client_conn_timeout_cb, c);
	if (c->ev_r == NULL || c->ev_w == NULL || c->ev_tmo == NULL)
		fatalx("event_new", "cannot create client connection events");
	TAILQ_INSERT_TAIL(&h->conns, c, link);
	h->nconns++;
	cl->stats.conns_open++;
	c->dnsq = dns_resolve(cl->dns, h->name, client_conn_dns_cb, c);
}

/* Give call to the idle connection c; the write happens from the event loop. */
static void client_conn_assign(struct client_conn *c, struct http_call *call)
{
	struct client_resp *r = &call->resp;

	client_call_set_state(call, CLIENT_CALL_ACTIVE);
	call->conn = c;
	call->reused = c->served > 0;
	if (call->reused)
		c->client->stats.conns_reused++;
	c->call = call;
	c->served++;
	c->wr_off = 0;
	c->sent_any = c->got_any = c->msg_done = c->keep_alive = false;
	c->perr = HTTP_CLIENT_OK;
	c->perr_msg[0] = '\0';
	/* A retried call may carry part of an earlier response. */
	netbuf_reset(&r->hbuf, 0);
	netbuf_reset(&r->body, 0);
	r->nhoff = 0;
	llhttp_init(&c->parser, HTTP_RESPONSE, &client_parse_settings);
	c->parser.data = c;
	client_conn_set_state(c, CLIENT_CONN_WRITING);
	event_active(c->ev_w, EV_WRITE, 1);
}

/* Hand waiting calls to idle connections and open connections for the rest. */
static void client_host_dispatch(struct client_host *h)
{
	struct http_client *cl = h->client;
	struct client_conn *c, *victim = NULL;
	struct http_call *call;
	int pending = 0;
	bool fresh_waits = false;

	TAILQ_FOREACH (c, &h->conns, link) {
		if (client_conn_in_setup(c)) {
			pending++;
			continue;
		}
		if (c->state != CLIENT_CONN_IDLE)
			continue;
		TAILQ_FOREACH (call, &h->waiting, link) {
			if (!call->need_fresh || c->served == 0)
				break;
		}
		if (call != NULL)
			client_conn_assign(c, call);
		else if (victim == NULL)
			victim = c;
	}
	if (h->nwaiting == 0)
		return;
	TAILQ_FOREACH (call, &h->waiting, link) {
		if (call->need_fresh)
			fresh_waits = true;
	}
	/* A retry needing a fresh connection must not starve behind pooled ones at the cap. */
	if (fresh_waits && pending == 0 && h->nconns >= cl->opt.max_conns_per_host &&
	    victim != NULL)
		client_conn_close(victim, HTTP_CLIENT_OK, "making room for a fresh connection");
	while (h->nwaiting > pending && h->nconns < cl->opt.max_conns_per_host) {
		client_conn_new(h);
		pending++;
	}
}

static void client_host_dispatch_cb(evutil_socket_t fd, short what, void *arg)
{
	client_host_dispatch(arg);
}

/* The host entry for u, created on first use. */
static struct client_host *client_host_get(struct http_client *cl, const struct http_client_url *u)
{
	struct client_host *h;
	bool v6 = strchr(u->host, ':') != NULL;

	TAILQ_FOREACH (h, &cl->hosts, link) {
		if (h->tls == u->tls && h->port == u->port && strcmp(h->name, u->host) == 0)
			return h;
	}
	h = xcalloc(1, sizeof(*h));
	h->client = cl;
	h->tls = u->tls;
	h->ip_literal = u->ip_literal;
	h->port = u->port;
	snprintf(h->name, sizeof(h->name), "%s", u->host);
	if (u->port == (u->tls ? 443 : 80))
		snprintf(h->host_header, sizeof(h->host_header), v6 ? "[%s]" : "%s", u->host);
	else
		snprintf(h->host_header, sizeof(h->host_header), v6 ? "[%s]:%d" : "%s:%d", u->host,
		         u->port);
	TAILQ_INIT(&h->conns);
	TAILQ_INIT(&h->waiting);
	h->ev_dispatch = event_new(cl->base, -1, 0, client_host_dispatch_cb, h);
	if (h->ev_dispatch == NULL)
		fatalx("event_new", "cannot create a host dispatch event");
	TAILQ_INSERT_HEAD(&cl->hosts, h, link);
	if (++cl->nhosts > CLIENT_MAX_HOSTS)
		event_active(cl->ev_reap, EV_TIMEOUT, 1); /* evict unused hosts from the loop */
	return h;
}

static void client_host_free(struct client_host *h)
{
	TAILQ_REMOVE(&h->client->hosts, h, link);
	h->client->nhosts--;
	SSL_SESSION_free(h->session);
	event_free(h->ev_dispatch);
	free(h);
}

/* --- teardown --- */

static void client_conn_free(struct client_conn *c)
{
	event_free(c->ev_r);
	event_free(c->ev_w);
	event_free(c->ev_tmo);
	SSL_free(c->ssl);
	free(c);
}

/* Free closed connections, and forget unused hosts beyond the limit. */
static void client_reap(struct http_client *cl)
{
	struct client_conn *c;
	struct client_host *h, *next;

	while ((c = TAILQ_FIRST(&cl->graveyard)) != NULL) {
		TAILQ_REMOVE(&cl->graveyard, c, link);
		client_conn_free(c);
	}
	for (h = TAILQ_LAST(&cl->hosts, client_host_list);
	     h != NULL && cl->nhosts > CLIENT_MAX_HOSTS; h = next) {
		next = TAILQ_PREV(h, client_host_list, link);
		if (h->nconns == 0 && h->nwaiting == 0)
			client_host_free(h);
	}
}

static void client_reap_cb(evutil_socket_t fd, short what, void *arg)
{
	client_reap(arg);
}

/* Stop watching and close the current socket, keeping the connection. */
static void client_conn_drop_socket(struct client_conn *c)
{
	event_del(c->ev_r);
	event_del(c->ev_w);
	if (c->fd != -1)
		close(c->fd);
	c->fd = -1;
}

/* Whether call may go out again after its reused connection turned out closed. */
static bool client_call_may_retry(const struct http_call *call, const struct client_conn *c,
                                  enum http_client_error err)
{
	if (call->retried || !call->reused || c->got_any || err != HTTP_CLIENT_ERR_RESET)
		return false;
	return call->idempotent || !c->sent_any;
}

/* Queue call again, ahead of the others, for a fresh connection. */
static void client_call_retry(struct http_call *call)
{
	call->client->stats.retries++;
	call->retried = true;
	call->need_fresh = true;
	client_call_set_state(call, CLIENT_CALL_QUEUED);
}

/*
 * Fail waiting calls after a connection could not be set up: the oldest one,
 * or all those queued so far when no connection of the host is left.
 */
static void client_host_fail_waiting(struct client_host *h, enum http_client_error err,
                                     const char *reason)
{
	uint64_t limit = h->next_seq;
	struct http_call *call;
	char msg[CLIENT_MSG_MAX];

	snprintf(msg, sizeof(msg), "%s", reason);
	if (h->nconns > 0) {
		if ((call = TAILQ_FIRST(&h->waiting)) != NULL)
			client_call_finish(call, err, "%s", msg);
		return;
	}
	/* Calls queued by these callbacks get a connection attempt of their own. */
	while ((call = TAILQ_FIRST(&h->waiting)) != NULL && call->seq < limit && h->nconns == 0)
		client_call_finish(call, err, "%s", msg);
}

/*
 * The one teardown of a connection: logs once, cancels the lookup, closes the
 * socket, then settles its call (retry or fail with err/reason) and, for a
 * failed setup, the waiting calls. The memory is freed from the event loop.
 */
static void client_conn_close(struct client_conn *c, enum http_client_error err, const char *reason)
{
	struct http_client *cl = c->client;
	struct client_host *h = c->host;
	struct http_call *call = c->call;
	bool setup = client_conn_in_setup(c);

	if (c->state == CLIENT_CONN_CLOSED)
		return;
	log_debug("client_conn_close", "%s:%d [%s]: %s in state %s", h->name, h->port,
	          c->addr_text[0] ? c->addr_text : "-", reason, client_conn_state_names[c->state]);
	client_conn_set_state(c, CLIENT_CONN_CLOSED);
	event_del(c->ev_tmo);
	if (c->dnsq != NULL) {
		dns_query_cancel(c->dnsq);
		c->dnsq = NULL;
	}
	if (c->ssl != NULL) {
		SSL_set_app_data(c->ssl, NULL);
		/* One non-blocking close_notify attempt on an established session. */
		if (c->fd != -1 && SSL_is_init_finished(c->ssl))
			(void)SSL_shutdown(c->ssl);
		ERR_clear_error();
	}
	client_conn_drop_socket(c);
	TAILQ_REMOVE(&h->conns, c, link);
	h->nconns--;
	cl->stats.conns_open--;
	TAILQ_INSERT_TAIL(&cl->graveyard, c, link);
	event_active(cl->ev_reap, EV_TIMEOUT, 1);
	c->call = NULL;
	if (cl->freeing)
		return;

	if (call != NULL) {
		call->conn = NULL;
		if (err == HTTP_CLIENT_OK)
			err = HTTP_CLIENT_ERR_RESET;
		if (client_call_may_retry(call, c, err)) {
			log_debug("client_retry", "%s:%d: retrying on a fresh connection", h->name,
			          h->port);
			client_call_retry(call);
		} else {
			client_call_finish(call, err, "%s", reason);
		}
	}
	if (setup && err != HTTP_CLIENT_OK)
		client_host_fail_waiting(h, err, reason);
	client_host_kick(h); /* replace the connection if calls still wait */
}

/* --- calls --- */

static void client_resp_free(struct client_resp *r)
{
	if (r->hbuf.data != NULL)
		cs_wipe(r->hbuf.data, r->hbuf.cap);
	if (r->body.data != NULL)
		cs_wipe(r->body.data, r->body.cap);
	netbuf_free(&r->hbuf);
	netbuf_free(&r->body);
	free(r->hoff);
	r->hoff = NULL;
}

static void client_call_free(struct http_call *call)
{
	if (call->wire.data != NULL)
		cs_wipe(call->wire.data, call->wire.cap); /* Authorization, signed bodies */
	netbuf_free(&call->wire);
	client_resp_free(&call->resp);
	event_free(call->ev_deadline);
	free(call);
}

/* End a call: detach it, run its callback once, free it. */
static void client_call_finish(struct http_call *call, enum http_client_error err, const char *fmt,
                               ...)
{
	struct http_client *cl = call->client;
	struct http_client_result res;
	struct http_client_header *hdrs = NULL;
	struct client_resp *r = &call->resp;
	va_list ap;

	if (call->state == CLIENT_CALL_DONE)
		return;
	client_call_set_state(call, CLIENT_CALL_DONE);
	evtimer_del(call->ev_deadline);
	va_start(ap, fmt);
	vsnprintf(call->message, sizeof(call->message), fmt, ap);
	va_end(ap);

	memset(&res, 0, sizeof(res));
	res.error = err;
	res.message = err == HTTP_CLIENT_OK ? "" : call->message;
	res.reused = call->reused;
	res.body = "";
	if (err == HTTP_CLIENT_OK) {
		size_t n = r->nhoff / 2;

		res.status = r->status;
		if (n > 0) {
			hdrs = xcalloc(n, sizeof(*hdrs));
			for (size_t i = 0; i < n; i++) {
				hdrs[i].name = r->hbuf.data + r->hoff[2 * i];
				hdrs[i].value = r->hbuf.data + r->hoff[2 * i + 1];
			}
		}
		res.headers = hdrs;
		res.nheaders = n;
		netbuf_append(&r->body, "", 1);
		res.body = r->body.data + r->body.off;
		res.body_len = netbuf_used(&r->body) - 1;
	} else {
		cl->stats.calls_failed++;
		log_debug("client_call_failed", "%s:%d: %s: %s", call->host->name, call->host->port,
		          http_client_error_name(err), call->message);
	}
	cl->stats.calls_in_flight--;
	cl->in_callback++;
	call->cb(&res, call->arg);
	cl->in_callback--;
	free(hdrs);
	client_call_free(call);
}

static void client_call_deadline_cb(evutil_socket_t fd, short what, void *arg)
{
	struct http_call *call = arg;
	struct client_conn *c = call->conn;

	if (c != NULL) {
		/* Half an exchange cannot be reused: the connection goes too. */
		c->call = NULL;
		call->conn = NULL;
		client_conn_close(c, HTTP_CLIENT_OK, "call deadline passed");
		client_call_finish(call, HTTP_CLIENT_ERR_TIMEOUT,
		                   "no complete response within %d ms", call->deadline_ms);
		return;
	}
	client_call_finish(call, HTTP_CLIENT_ERR_TIMEOUT, "no connection to %s:%d within %d ms",
	                   call->host->name, call->host->port, call->deadline_ms);
}

/* --- socket and TLS I/O --- */

/* Classify a failed SSL_read/SSL_write/SSL_do_handshake. */
static enum client_io client_conn_ssl_io(struct client_conn *c, int rv)
{
	int err = SSL_get_error(c->ssl, rv);
	unsigned long e;

	switch (err) {
	case SSL_ERROR_WANT_READ:
		return CLIENT_IO_WANT_READ;
	case SSL_ERROR_WANT_WRITE:
		return CLIENT_IO_WANT_WRITE;
	case SSL_ERROR_ZERO_RETURN:
		ERR_clear_error();
		return CLIENT_IO_EOF;
	case SSL_ERROR_SYSCALL:
		ERR_clear_error();
		if (errno == 0)
			return CLIENT_IO_EOF;
		c->io_kind = HTTP_CLIENT_ERR_RESET;
		snprintf(c->io_err, sizeof(c->io_err), "%s:%d: %s", c->host->name, c->host->port,
		         strerror(errno));
		return CLIENT_IO_ERROR;
	default:
		e = ERR_peek_last_error();
		c->io_kind = HTTP_CLIENT_ERR_TLS;
		snprintf(c->io_err, sizeof(c->io_err), "TLS with %s:%d failed: %s", c->host->name,
		         c->host->port, e ? ERR_reason_error_string(e) : "unknown");
		ERR_clear_error();
		return CLIENT_IO_ERROR;
	}
}

/* Read up to cap bytes. */
static enum client_io client_conn_recv(struct client_conn *c, char *buf, size_t cap, size_t *n)
{
	ssize_t rv;

	if (c->ssl != NULL) {
		int r;

		errno = 0;
		r = SSL_read(c->ssl, buf, (int)cap);
		if (r > 0) {
			*n = (size_t)r;
			return CLIENT_IO_DONE;
		}
		return client_conn_ssl_io(c, r);
	}
	rv = recv(c->fd, buf, cap, 0);
	if (rv > 0) {
		*n = (size_t)rv;
		return CLIENT_IO_DONE;
	}
	if (rv == 0)
		return CLIENT_IO_EOF;
	if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
		return CLIENT_IO_WANT_READ;
	c->io_kind = HTTP_CLIENT_ERR_RESET;
	snprintf(c->io_err, sizeof(c->io_err), "%s:%d: %s", c->host->name, c->host->port,
	         strerror(errno));
	return CLIENT_IO_ERROR;
}

/* Write up to len bytes; records in sent_any whether bytes may have left. */
static enum client_io client_conn_send(struct client_conn *c, const char *buf, size_t len,
                                       size_t *n)
{
	ssize_t rv;

	if (c->ssl != NULL) {
		int r;
		enum client_io io;

		errno = 0;
		r = SSL_write(c->ssl, buf, len > INT32_MAX ? INT32_MAX : (int)len);
		if (r > 0) {
			c->sent_any = true;
			*n = (size_t)r;
			return CLIENT_IO_DONE;
		}
		io = client_conn_ssl_io(c, r);
		if (io == CLIENT_IO_WANT_READ || io == CLIENT_IO_WANT_WRITE)
			c->sent_any = true; /* part of a record may be in the kernel */
		return io;
	}
	rv = send(c->fd, buf, len, MSG_NOSIGNAL);
	if (rv >= 0) {
		c->sent_any = c->sent_any || rv > 0;
		*n = (size_t)rv;
		return CLIENT_IO_DONE;
	}
	if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
		return CLIENT_IO_WANT_WRITE;
	c->io_kind = HTTP_CLIENT_ERR_RESET;
	snprintf(c->io_err, sizeof(c->io_err), "%s:%d: %s", c->host->name, c->host->port,
	         strerror(errno));
	return CLIENT_IO_ERROR;
}

/* --- connection setup --- */

static void client_conn_ready(struct client_conn *c)
{
	c->client->stats.conns_opened++;
	client_conn_set_state(c, CLIENT_CONN_IDLE);
	client_host_kick(c->host);
}

static void client_conn_handshake(struct client_conn *c)
{
	struct client_host *h = c->host;
	const unsigned char *alpn = NULL;
	unsigned int alpn_len = 0;
	char why[CLIENT_MSG_MAX];
	long vr;
	int rv;

	errno = 0;
	rv = SSL_do_handshake(c->ssl);
	if (rv == 1) {
		SSL_get0_alpn_selected(c->ssl, &alpn, &alpn_len);
		if (alpn_len > 0 && !(alpn_len == 8 && memcmp(alpn, "http/1.1", 8) == 0)) {
			snprintf(why, sizeof(why),
			         "%s:%d selected an ALPN protocol other than http/1.1", h->name,
			         h->port);
			client_conn_close(c, HTTP_CLIENT_ERR_TLS, why);
			return;
		}
		if (SSL_session_reused(c->ssl))
			c->client->stats.tls_resumed++;
		client_conn_ready(c);
		return;
	}
	switch (client_conn_ssl_io(c, rv)) {
	case CLIENT_IO_WANT_READ:
		return;
	case CLIENT_IO_WANT_WRITE:
		event_add(c->ev_w, NULL);
		return;
	case CLIENT_IO_EOF:
		snprintf(why, sizeof(why), "TLS handshake with %s:%d: connection closed", h->name,
		         h->port);
		client_conn_close(c, HTTP_CLIENT_ERR_TLS, why);
		return;
	default:
		break;
	}
	vr = SSL_get_verify_result(c->ssl);
	if (vr != X509_V_OK) {
		snprintf(why, sizeof(why), "certificate of %s:%d did not verify: %s", h->name,
		         h->port, X509_verify_cert_error_string(vr));
		log_warnx("client_tls_verify", "%s", why);
		client_conn_close(c, HTTP_CLIENT_ERR_TLS_VERIFY, why);
		return;
	}
	client_conn_close(c, c->io_kind, c->io_err);
}

/* The TCP connection is up: start TLS, or go idle for http://. */
static void client_conn_connected(struct client_conn *c)
{
	struct http_client *cl = c->client;
	struct client_host *h = c->host;

	event_del(c->ev_w);
	if (event_add(c->ev_r, NULL) != 0)
		fatalx("event_add", "cannot watch a client connection");
	if (!h->tls) {
		client_conn_ready(c);
		return;
	}
	c->ssl = SSL_new(cl->ctx);
	if (c->ssl == NULL || SSL_set_fd(c->ssl, c->fd) != 1 ||
	    SSL_set1_host(c->ssl, h->name) != 1 ||
	    (!h->ip_literal && SSL_set_tlsext_host_name(c->ssl, h->name) != 1)) {
		ERR_clear_error();
		client_conn_close(c, HTTP_CLIENT_ERR_TLS, "cannot set up a TLS session");
		return;
	}
	SSL_set_hostflags(c->ssl, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
	SSL_set_connect_state(c->ssl);
	SSL_set_app_data(c->ssl, c);
	if (h->session != NULL && SSL_SESSION_is_resumable(h->session) &&
	    SSL_set_session(c->ssl, h->session) != 1)
		ERR_clear_error(); /* a full handshake then */
	client_conn_set_state(c, CLIENT_CONN_HANDSHAKE);
	client_conn_handshake(c);
}

/* Point the connection's events at a new socket. */
static void client_conn_bind_socket(struct client_conn *c, int fd)
{
	struct event_base *base = c->client->base;

	c->fd = fd;
	if (event_assign(c->ev_r, base, fd, EV_READ | EV_PERSIST, client_conn_read_cb, c) != 0 ||
	    event_assign(c->ev_w, base, fd, EV_WRITE, client_conn_write_cb, c) != 0)
		fatalx("event_assign", "cannot set up client connection events");
}

/* Try the next address; when none is left, the connection fails. */
static void client_conn_connect_next(struct client_conn *c)
{
	struct client_host *h = c->host;
	char why[CLIENT_MSG_MAX];

	while (c->next_addr < c->naddrs) {
		struct dns_addr *a = &c->addrs[c->next_addr++];
		struct sockaddr_in *sin = (struct sockaddr_in *)&a->ss;
		struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&a->ss;
		char ip[INET6_ADDRSTRLEN];
		int fd, one = 1;

		if (a->ss.ss_family == AF_INET) {
			sin->sin_port = htons((uint16_t)h->port);
			inet_ntop(AF_INET, &sin->sin_addr, ip, sizeof(ip));
			snprintf(c->addr_text, sizeof(c->addr_text), "%s:%d", ip, h->port);
		} else {
			sin6->sin6_port = htons((uint16_t)h->port);
			inet_ntop(AF_INET6, &sin6->sin6_addr, ip, sizeof(ip));
			snprintf(c->addr_text, sizeof(c->addr_text), "[%s]:%d", ip, h->port);
		}
		fd = socket(a->ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
		if (fd == -1) {
			snprintf(c->connect_err, sizeof(c->connect_err), "%s: socket: %s",
			         c->addr_text, strerror(errno));
			continue;
		}
		if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) == -1)
			log_warn("client_nodelay", "%s", c->addr_text);
		client_conn_bind_socket(c, fd);
		if (connect(fd, (struct sockaddr *)&a->ss, a->len) == 0) {
			client_conn_connected(c);
			return;
		}
		if (errno == EINPROGRESS) {
			client_conn_set_state(c, CLIENT_CONN_CONNECTING);
			client_arm(c->ev_tmo, c->client->opt.connect_timeout_ms); /* per address */
			if (event_add(c->ev_w, NULL) != 0)
				fatalx("event_add", "cannot watch a connecting socket");
			return;
		}
		snprintf(c->connect_err, sizeof(c->connect_err), "%s: %s", c->addr_text,
		         strerror(errno));
		client_conn_drop_socket(c);
	}
	snprintf(why, sizeof(why), "cannot connect to %s:%d: %s", h->name, h->port,
	         c->connect_err[0] ? c->connect_err : "no address");
	client_conn_close(c, HTTP_CLIENT_ERR_CONNECT, why);
}

/* The socket became writable while connecting: connected, or on to the next address. */
static void client_conn_connect_done(struct client_conn *c)
{
	int err = 0;
	socklen_t len = sizeof(err);

	if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) == -1)
		err = errno;
	if (err == 0) {
		client_conn_connected(c);
		return;
	}
	snprintf(c->connect_err, sizeof(c->connect_err), "%s: %s", c->addr_text, strerror(err));
	client_conn_drop_socket(c);
	client_conn_connect_next(c);
}

static void client_conn_dns_cb(const struct dns_result *res, void *arg)
{
	struct client_conn *c = arg;

	c->dnsq = NULL; /* the resolver frees the handle after this returns */
	if (res->status != DNS_OK) {
		client_conn_close(c, HTTP_CLIENT_ERR_DNS, res->message);
		return;
	}
	c->naddrs = res->naddrs > DNS_MAX_ADDRS ? DNS_MAX_ADDRS : res->naddrs;
	memcpy(c->addrs, res->addrs, c->naddrs * sizeof(c->addrs[0]));
	c->next_addr = 0;
	client_conn_connect_next(c);
}

/* --- the exchange --- */

/* The response is complete: the connection goes back to the pool or closes, then the callback. */
static void client_conn_complete(struct client_conn *c, bool extra)
{
	struct http_call *call = c->call;

	c->call = NULL;
	call->conn = NULL;
	if (c->keep_alive && !extra) {
		client_conn_set_state(c, CLIENT_CONN_IDLE);
		client_host_kick(c->host);
	} else {
		client_conn_close(c, HTTP_CLIENT_OK,
		                  extra ? "bytes after the response"
		                        : "server closes the connection");
	}
	client_call_finish(call, HTTP_CLIENT_OK, "%s", "");
}

/* Feed response bytes to the parser; 1 when the connection left READING. */
static int client_conn_feed(struct client_conn *c, const char *buf, size_t n)
{
	llhttp_errno_t e = llhttp_execute(&c->parser, buf, n);
	char why[CLIENT_MSG_MAX];

	if (e == HPE_OK)
		return 0;
	if (e == HPE_PAUSED && c->msg_done) {
		const char *pos = llhttp_get_error_pos(&c->parser);

		client_conn_complete(c, pos != NULL && pos < buf + n);
		return 1;
	}
	if (c->perr != HTTP_CLIENT_OK) {
		client_conn_close(c, c->perr, c->perr_msg);
		return 1;
	}
	snprintf(why, sizeof(why), "malformed response from %s:%d: %s (%s)", c->host->name,
	         c->host->port, llhttp_errno_name(e), llhttp_get_error_reason(&c->parser));
	client_conn_close(c, HTTP_CLIENT_ERR_MALFORMED, why);
	return 1;
}

/* The server closed while a response was due. */
static void client_conn_eof(struct client_conn *c)
{
	char why[CLIENT_MSG_MAX];

	if (c->got_any) {
		(void)llhttp_finish(&c->parser); /* completes a body delimited by EOF */
		if (c->msg_done) {
			c->keep_alive = false;
			client_conn_complete(c, false);
			return;
		}
		if (c->perr != HTTP_CLIENT_OK) {
			client_conn_close(c, c->perr, c->perr_msg);
			return;
		}
	}
	snprintf(why, sizeof(why), "%s:%d closed the connection %s", c->host->name, c->host->port,
	         c->got_any ? "in the middle of the response" : "before responding");
	client_conn_close(c, HTTP_CLIENT_ERR_RESET, why);
}

static void client_conn_read(struct client_conn *c)
{
	char buf[CLIENT_READ_CHUNK];

	for (;;) {
		size_t n = 0;

		switch (client_conn_recv(c, buf, sizeof(buf), &n)) {
		case CLIENT_IO_DONE:
			c->got_any = true;
			if (client_conn_feed(c, buf, n) != 0)
				return;
			break;
		case CLIENT_IO_WANT_READ:
			return;
		case CLIENT_IO_WANT_WRITE:
			event_add(c->ev_w, NULL);
			return;
		case CLIENT_IO_EOF:
			client_conn_eof(c);
			return;
		case CLIENT_IO_ERROR:
			client_conn_close(c, c->io_kind, c->io_err);
			return;
		}
	}
}

static void client_conn_write(struct client_conn *c)
{
	struct http_call *call = c->call;

	while (c->wr_off < call->wire.len) {
		size_t n = 0;

		switch (client_conn_send(c, call->wire.data + c->wr_off, call->wire.len - c->wr_off,
		                         &n)) {
		case CLIENT_IO_DONE:
			c->wr_off += n;
			break;
		case CLIENT_IO_WANT_READ:
			return;
		case CLIENT_IO_WANT_WRITE:
			event_add(c->ev_w, NULL);
			return;
		case CLIENT_IO_EOF:
			snprintf(c->io_err, sizeof(c->io_err), "%s:%d closed the connection",
			         c->host->name, c->host->port);
			client_conn_close(c, HTTP_CLIENT_ERR_RESET, c->io_err);
			return;
		case CLIENT_IO_ERROR:
			client_conn_close(c, c->io_kind, c->io_err);
			return;
		}
	}
	client_conn_set_state(c, CLIENT_CONN_READING);
}

/* Readable while pooled: TLS tickets are fine; EOF or stray bytes retire the connection. */
static void client_conn_idle_read(struct client_conn *c)
{
	char buf[512];
	size_t n = 0;

	switch (client_conn_recv(c, buf, sizeof(buf), &n)) {
	case CLIENT_IO_DONE:
		client_conn_close(c, HTTP_CLIENT_OK, "bytes while idle");
		return;
	case CLIENT_IO_WANT_READ:
		return;
	case CLIENT_IO_WANT_WRITE:
		event_add(c->ev_w, NULL);
		return;
	case CLIENT_IO_EOF:
		client_conn_close(c, HTTP_CLIENT_OK, "closed by the server while idle");
		return;
	case CLIENT_IO_ERROR:
		client_conn_close(c, HTTP_CLIENT_OK, c->io_err);
		return;
	}
}

/* Move the connection forward after any readiness; each state knows what it waits for. */
static void client_conn_advance(struct client_conn *c, short what)
{
	switch (c->state) {
	case CLIENT_CONN_RESOLVING:
		break;
	case CLIENT_CONN_CONNECTING:
		if (what & EV_WRITE)
			client_conn_connect_done(c);
		break;
	case CLIENT_CONN_HANDSHAKE:
		client_conn_handshake(c);
		break;
	case CLIENT_CONN_IDLE:
		client_conn_idle_read(c);
		break;
	case CLIENT_CONN_WRITING:
		client_conn_write(c);
		break; /* READING now waits for the response */
	case CLIENT_CONN_READING:
		client_conn_read(c);
		break;
	case CLIENT_CONN_CLOSED:
		break;
	}
}

static void client_conn_read_cb(evutil_socket_t fd, short what, void *arg)
{
	client_conn_advance(arg, EV_READ);
}

static void client_conn_write_cb(evutil_socket_t fd, short what, void *arg)
{
	client_conn_advance(arg, EV_WRITE);
}

static void client_conn_timeout_cb(evutil_socket_t fd, short what, void *arg)
{
	struct client_conn *c = arg;
	char why[CLIENT_MSG_MAX];

	switch (c->state) {
	case CLIENT_CONN_CONNECTING:
		snprintf(c->connect_err, sizeof(c->connect_err), "%s: timed out after %d ms",
		         c->addr_text, c->client->opt.connect_timeout_ms);
		client_conn_drop_socket(c);
		client_conn_connect_next(c);
		break;
	case CLIENT_CONN_HANDSHAKE:
		snprintf(why, sizeof(why), "TLS handshake with %s:%d timed out", c->host->name,
		         c->host->port);
		client_conn_close(c, HTTP_CLIENT_ERR_TLS, why);
		break;
	case CLIENT_CONN_IDLE:
		client_conn_close(c, HTTP_CLIENT_OK, "idle timeout");
		break;
	default:
		break;
	}
}

/* OpenSSL hands over each new session (TLS 1.3 tickets arrive after the handshake). */
static int client_new_session_cb(SSL *ssl, SSL_SESSION *sess)
{
	struct client_conn *c = SSL_get_app_data(ssl);

	if (c == NULL || c->state == CLIENT_CONN_CLOSED)
		return 0;
	SSL_SESSION_free(c->host->session);
	c->host->session = sess; /* we keep the reference */
	return 1;
}

/* --- response parsing --- */

static struct client_conn *client_conn_of(llhttp_t *p)
{
	return p->data;
}

static int client_parse_fail(struct client_conn *c, enum http_client_error err, const char *fmt,
                             ...) CS_PRINTF(3, 4);

static int client_parse_fail(struct client_conn *c, enum http_client_error err, const char *fmt,
                             ...)
{
	va_list ap;

	c->perr = err;
	va_start(ap, fmt);
	vsnprintf(c->perr_msg, sizeof(c->perr_msg), fmt, ap);
	va_end(ap);
	return HPE_USER;
}

static int client_head_bytes(struct client_conn *c, size_t n)
{
	struct client_resp *r = &c->call->resp;
	size_t max = c->client->opt.max_header_bytes;

	r->head_bytes += n;
	if (r->head_bytes > max)
		return client_parse_fail(c, HTTP_CLIENT_ERR_TOO_LARGE,
		                         "response head from %s:%d exceeds %zu bytes",
		                         c->host->name, c->host->port, max);
	return 0;
}

static int client_on_message_begin(llhttp_t *p)
{
	struct client_resp *r = &client_conn_of(p)->call->resp;

	/* After a 1xx, the final response starts over. */
	netbuf_reset(&r->hbuf, 65536);
	netbuf_reset(&r->body, 65536);
	r->nhoff = 0;
	r->head_bytes = 0;
	r->in_field = r->in_value = r->headers_done = r->interim = false;
	return 0;
}

static int client_on_status(llhttp_t *p, const char *at, size_t len)
{
	return client_head_bytes(client_conn_of(p), len);
}

static int client_on_header_field(llhttp_t *p, const char *at, size_t len)
{
	struct client_conn *c = client_conn_of(p);
	struct client_resp *r = &c->call->resp;

	if (client_head_bytes(c, len) != 0)
		return HPE_USER;
	if (r->headers_done)
		return 0; /* a trailer */
	if (!r->in_field) {
		r->in_field = true;
		r->field_off = r->hbuf.len;
	}
	netbuf_append(&r->hbuf, at, len);
	return 0;
}

static int client_on_header_field_complete(llhttp_t *p)
{
	struct client_resp *r = &client_conn_of(p)->call->resp;

	if (r->headers_done)
		return 0;
	if (!r->in_field)
		r->field_off = r->hbuf.len;
	netbuf_append(&r->hbuf, "", 1);
	r->in_field = false;
	return 0;
}

static int client_on_header_value(llhttp_t *p, const char *at, size_t len)
{
	struct client_conn *c = client_conn_of(p);
	struct client_resp *r = &c->call->resp;

	if (client_head_bytes(c, len) != 0)
		return HPE_USER;
	if (r->headers_done)
		return 0;
	if (!r->in_value) {
		r->in_value = true;
		r->value_off = r->hbuf.len;
	}
	netbuf_append(&r->hbuf, at, len);
	return 0;
}

static int client_on_header_value_complete(llhttp_t *p)
{
	struct client_conn *c = client_conn_of(p);
	struct client_resp *r = &c->call->resp;

	if (client_head_bytes(c, 4) != 0) /* ": " and CRLF */
		return HPE_USER;
	if (r->headers_done)
		return 0;
	if (!r->in_value)
		r->value_off = r->hbuf.len;
	while (r->hbuf.len > r->value_off &&
	       (r->hbuf.data[r->hbuf.len - 1] == ' ' || r->hbuf.data[r->hbuf.len - 1] == '\t'))
		r->hbuf.len--;
	netbuf_append(&r->hbuf, "", 1);
	r->in_value = false;
	if (r->nhoff / 2 >= CLIENT_MAX_HEADERS)
		return client_parse_fail(c, HTTP_CLIENT_ERR_TOO_LARGE,
		                         "response from %s:%d has more than %d headers",
		                         c->host->name, c->host->port, CLIENT_MAX_HEADERS);
	if (r->nhoff + 2 > r->hoff_cap) {
		r->hoff_cap = r->hoff_cap ? r->hoff_cap * 2 : 32;
		r->hoff = xrealloc(r->hoff, r->hoff_cap * sizeof(*r->hoff));
	}
	r->hoff[r->nhoff++] = r->field_off;
	r->hoff[r->nhoff++] = r->value_off;
	return 0;
}

static int client_on_headers_complete(llhttp_t *p)
{
	struct client_conn *c = client_conn_of(p);
	struct http_call *call = c->call;
	struct client_resp *r = &call->resp;
	size_t max = c->client->opt.max_body_bytes;

	r->status = p->status_code;
	if (r->status == 101)
		return client_parse_fail(c, HTTP_CLIENT_ERR_MALFORMED,
		                         "%s:%d switched protocols unasked", c->host->name,
		                         c->host->port);
	if (r->status >= 100 && r->status < 200) {
		r->interim = true; /* 100 Continue, 103 Early Hints: the real answer follows */
		return 0;
	}
	r->headers_done = true;
	if (call->head)
		return 1; /* no body, whatever Content-Length says */
	if ((p->flags & F_CONTENT_LENGTH) && p->content_length > max)
		return client_parse_fail(c, HTTP_CLIENT_ERR_TOO_LARGE,
		                         "response body from %s:%d exceeds %zu bytes",
		                         c->host->name, c->host->port, max);
	return 0;
}

static int client_on_body(llhttp_t *p, const char *at, size_t len)
{
	struct client_conn *c = client_conn_of(p);
	struct client_resp *r = &c->call->resp;
	size_t max = c->client->opt.max_body_bytes;

	if (netbuf_used(&r->body) + len > max)
		return client_parse_fail(c, HTTP_CLIENT_ERR_TOO_LARGE,
		                         "response body from %s:%d exceeds %zu bytes",
		                         c->host->name, c->host->port, max);
	netbuf_append(&r->body, at, len);
	return 0;
}

static int client_on_message_complete(llhttp_t *p)
{
	struct client_conn *c = client_conn_of(p);

	if (c->call->resp.interim)
		return 0;
	c->msg_done = true;
	c->keep_alive = llhttp_should_keep_alive(p);
	return HPE_PAUSED;
}

static const llhttp_settings_t client_parse_settings = {
	.on_message_begin = client_on_message_begin,
	.on_status = client_on_status,
	.on_header_field = client_on_header_field,
	.on_header_field_complete = client_on_header_field_complete,
	.on_header_value = client_on_header_value,
	.on_header_value_complete = client_on_header_value_complete,
	.on_headers_complete = client_on_headers_complete,
	.on_body = client_on_body,
	.on_message_complete = client_on_message_complete,
};

/* --- URLs and requests --- */

static bool client_is_tchar(int ch)
{
	return isalnum(ch) || (ch != 0 && strchr("!#$%&'*+-.^_`|~", ch) != NULL);
}

static bool client_is_token(const char *s, size_t max)
{
	size_t n = 0;

	for (; s[n] != '\0'; n++) {
		if (n >= max || !client_is_tchar((unsigned char)s[n]))
			return false;
	}
	return n > 0;
}

/* Visible ASCII only: anything else must arrive percent-encoded. */
static bool client_is_visible(const char *s, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		unsigned char ch = (unsigned char)s[i];

		if (ch <= 0x20 || ch >= 0x7f || ch == '#')
			return false;
	}
	return true;
}

int http_client_url_parse(const char *url, struct http_client_url *out)
{
	const char *p, *auth_end, *host_b, *host_e;
	size_t n;
	unsigned char v6[16];
	struct in_addr v4;

	memset(out, 0, sizeof(*out));
	if (url == NULL || strlen(url) > CLIENT_URL_MAX)
		return -1;
	if (strncasecmp(url, "https://", 8) == 0) {
		out->tls = true;
		out->port = 443;
		p = url + 8;
	} else if (strncasecmp(url, "http://", 7) == 0) {
		out->port = 80;
		p = url + 7;
	} else {
		return -1;
	}
	auth_end = p + strcspn(p, "/?#");
	if (*auth_end == '#' || memchr(p, '@', (size_t)(auth_end - p)) != NULL)
		return -1; /* fragments and user info have no place in an API call */
	if (*p == '[') {
		host_b = p + 1;
		host_e = memchr(host_b, ']', (size_t)(auth_end - host_b));
		if (host_e == NULL)
			return -1;
		p = host_e + 1;
	} else {
		host_b = p;
		host_e = memchr(p, ':', (size_t)(auth_end - p));
		if (host_e == NULL)
			host_e = auth_end;
		p = host_e;
	}
	n = (size_t)(host_e - host_b);
	if (n > 1 && host_b[n - 1] == '.' && host_b[-1] != '[')
		n--; /* "example.com." is example.com for SNI and certificate checks */
	if (n == 0 || n > 253)
		return -1;
	for (size_t i = 0; i < n; i++)
		out->host[i] = (char)tolower((unsigned char)host_b[i]);
	out->host[n] = '\0';
	if (host_b != url && host_b[-1] == '[') {
		if (inet_pton(AF_INET6, out->host, v6) != 1)
			return -1; /* zone ids are not accepted */
		out->ip_literal = true;
	} else {
		if (out->host[0] == '.' || out->host[0] == '-')
			return -1;
		for (size_t i = 0; i < n; i++) {
			char ch = out->host[i];

			if (!isalnum((unsigned char)ch) && ch != '.' && ch != '-' && ch != '_')
				return -1;
		}
		out->ip_literal = inet_pton(AF_INET, out->host, &v4) == 1;
	}
	if (p < auth_end) {
		long port = 0;

		if (*p++ != ':' || p == auth_end || auth_end - p > 5)
			return -1;
		for (; p < auth_end; p++) {
			if (!isdigit((unsigned char)*p))
				return -1;
			port = port * 10 + (*p - '0');
		}
		if (port < 1 || port > 65535)
			return -1;
		out->port = (int)port;
	}
	p = auth_end;
	if (*p == '/') {
		out->path = p;
		out->path_len = strcspn(p, "?");
		p += out->path_len;
	} else {
		out->path = "/";
		out->path_len = 1;
	}
	if (*p == '?') {
		out->query = p + 1;
		out->query_len = strlen(p + 1);
	}
	if (!client_is_visible(out->path, out->path_len) ||
	    (out->query != NULL && !client_is_visible(out->query, out->query_len)))
		return -1;
	return 0;
}

/* Validate the method and headers; the reason for a refusal goes to *why. */
static int client_request_check(const struct http_client_request *req, const char **why)
{
	static const char *const reserved[] = { "host", "content-length", "transfer-encoding",
		                                "connection" };

	if (req->method == NULL || !client_is_token(req->method, CLIENT_METHOD_MAX)) {
		*why = "bad method";
		return -1;
	}
	if (req->body_len > 0 && req->body == NULL) {
		*why = "body_len without a body";
		return -1;
	}
	for (size_t i = 0; i < req->nheaders; i++) {
		const struct http_client_header *hd = &req->headers[i];

		if (hd->name == NULL || hd->value == NULL || !client_is_token(hd->name, 256)) {
			*why = "bad header name";
			return -1;
		}
		for (const char *v = hd->value; *v != '\0'; v++) {
			unsigned char ch = (unsigned char)*v;

			if ((ch < 0x20 && ch != '\t') || ch == 0x7f) {
				*why = "control character in a header value";
				return -1;
			}
		}
		for (size_t j = 0; j < CS_ARRAY_LEN(reserved); j++) {
			if (strcasecmp(hd->name, reserved[j]) == 0) {
				*why = "header set by the client itself";
				return -1;
			}
		}
	}
	return 0;
}

static bool client_method_idempotent(const char *m)
{
	return strcmp(m, "GET") == 0 || strcmp(m, "HEAD") == 0 || strcmp(m, "PUT") == 0 ||
	       strcmp(m, "DELETE") == 0 || strcmp(m, "OPTIONS") == 0 || strcmp(m, "TRACE") == 0;
}

/* Lay out the whole request in one buffer: it leaves in one SSL_write. */
static void client_build_wire(struct netbuf *w, const struct http_client_request *req,
                              const struct http_client_url *u, const struct client_host *h)
{
	bool has_ua = false;
	size_t need = 64 + strlen(req->method) + u->path_len + u->query_len +
	              strlen(h->host_header) + sizeof(CLIENT_USER_AGENT) + req->body_len;
	char num[32];

	for (size_t i = 0; i < req->nheaders; i++)
		need += strlen(req->headers[i].name) + strlen(req->headers[i].value) + 4;
	netbuf_reserve(w, need);
	netbuf_append(w, req->method, strlen(req->method));
	netbuf_append(w, " ", 1);
	netbuf_append(w, u->path, u->path_len);
	if (u->query != NULL) {
		netbuf_append(w, "?", 1);
		netbuf_append(w, u->query, u->query_len);
	}
	netbuf_append(w, " HTTP/1.1\r\nHost: ", 17);
	netbuf_append(w, h->host_header, strlen(h->host_header));
	netbuf_append(w, "\r\n", 2);
	for (size_t i = 0; i < req->nheaders; i++) {
		const struct http_client_header *hd = &req->headers[i];

		if (strcasecmp(hd->name, "user-agent") == 0)
			has_ua = true;
		netbuf_append(w, hd->name, strlen(hd->name));
		netbuf_append(w, ": ", 2);
		netbuf_append(w, hd->value, strlen(hd->value));
		netbuf_append(w, "\r\n", 2);
	}
	if (!has_ua) /* GitHub's API refuses requests without one */
		netbuf_append(w, "User-Agent: " CLIENT_USER_AGENT "\r\n",
		              sizeof("User-Agent: " CLIENT_USER_AGENT "\r\n") - 1);
	if (req->body_len > 0 || strcmp(req->method, "POST") == 0 ||
	    strcmp(req->method, "PUT") == 0 || strcmp(req->method, "PATCH") == 0) {
		int k = snprintf(num, sizeof(num), "%zu", req->body_len);

		netbuf_append(w, "Content-Length: ", 16);
		netbuf_append(w, num, (size_t)k);
		netbuf_append(w, "\r\n", 2);
	}
	netbuf_append(w, "\r\n", 2);
	if (req->body_len > 0)
		netbuf_append(w, req->body, req->body_len);
}

/* --- public API --- */

struct http_client *http_client_new(struct event_base *base, const struct http_client_options *opt)
{
	struct http_client *cl = xcalloc(1, sizeof(*cl));
	static const unsigned char alpn[] = { 8, 'h', 't', 't', 'p', '/', '1', '.', '1' };
	unsigned long e;

	if (opt != NULL)
		cl->opt = *opt;
	if (cl->opt.max_conns_per_host <= 0)
		cl->opt.max_conns_per_host = 8;
	if (cl->opt.idle_timeout_ms <= 0)
		cl->opt.idle_timeout_ms = 30000;
	if (cl->opt.connect_timeout_ms <= 0)
		cl->opt.connect_timeout_ms = 5000;
	if (cl->opt.deadline_ms <= 0)
		cl->opt.deadline_ms = 30000;
	if (cl->opt.max_body_bytes == 0)
		cl->opt.max_body_bytes = 16u << 20;
	if (cl->opt.max_header_bytes == 0)
		cl->opt.max_header_bytes = 64u << 10;
	cl->opt.ca_file = NULL; /* read below, not kept */
	cl->base = base;
	TAILQ_INIT(&cl->hosts);
	TAILQ_INIT(&cl->graveyard);

	cl->ctx = SSL_CTX_new(TLS_client_method());
	if (cl->ctx == NULL)
		goto fail_tls;
	if (SSL_CTX_set_min_proto_version(cl->ctx, TLS1_2_VERSION) != 1)
		goto fail_tls;
	SSL_CTX_set_verify(cl->ctx, SSL_VERIFY_PEER, NULL);
	if (opt != NULL && opt->ca_file != NULL) {
		if (SSL_CTX_load_verify_locations(cl->ctx, opt->ca_file, NULL) != 1) {
			e = ERR_peek_last_error();
			log_errorx("client_ca", "cannot load CA bundle %s: %s", opt->ca_file,
			           e ? ERR_reason_error_string(e) : "unknown error");
			goto fail;
		}
	} else if (SSL_CTX_set_default_verify_paths(cl->ctx) != 1) {
		goto fail_tls;
	}
	if (SSL_CTX_set_alpn_protos(cl->ctx, alpn, sizeof(alpn)) != 0) /* 0 is success here */
		goto fail_tls;
	/* EOF without close_notify is an ordinary close for HTTP; lengths catch truncation. */
	SSL_CTX_set_options(cl->ctx, SSL_OP_IGNORE_UNEXPECTED_EOF | SSL_OP_NO_RENEGOTIATION);
	SSL_CTX_set_session_cache_mode(cl->ctx,
	                               SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
	SSL_CTX_sess_set_new_cb(cl->ctx, client_new_session_cb);

	if (opt != NULL && opt->resolver != NULL) {
		cl->dns = opt->resolver;
	} else {
		cl->dns = dns_resolver_new(base, NULL);
		if (cl->dns == NULL)
			goto fail;
		cl->own_dns = true;
	}
	cl->ev_reap = event_new(base, -1, 0, client_reap_cb, cl);
	if (cl->ev_reap == NULL)
		fatalx("event_new", "cannot create the client reaper");
	return cl;

fail_tls:
	e = ERR_peek_last_error();
	log_errorx("client_tls", "cannot set up the client TLS context: %s",
	           e ? ERR_reason_error_string(e) : "unknown error");
fail:
	ERR_clear_error();
	SSL_CTX_free(cl->ctx);
	free(cl);
	return NULL;
}

void http_client_free(struct http_client *cl)
{
	struct client_host *h;
	struct client_conn *c;
	struct http_call *call;

	if (cl == NULL)
		return;
	if (cl->in_callback > 0)
		fatalx("http_client_free", "called from inside a client callback");
	cl->freeing = true;
	TAILQ_FOREACH (h, &cl->hosts, link) {
		while ((call = TAILQ_FIRST(&h->waiting)) != NULL) {
			client_call_set_state(call, CLIENT_CALL_DONE);
			cl->stats.calls_in_flight--;
			client_call_free(call);
		}
		while ((c = TAILQ_FIRST(&h->conns)) != NULL) {
			if ((call = c->call) != NULL) {
				c->call = NULL;
				client_call_set_state(call, CLIENT_CALL_DONE);
				cl->stats.calls_in_flight--;
				client_call_free(call);
			}
			client_conn_close(c, HTTP_CLIENT_OK, "client freed");
		}
	}
	client_reap(cl);
	while ((h = TAILQ_FIRST(&cl->hosts)) != NULL)
		client_host_free(h);
	if (cl->own_dns)
		dns_resolver_free(cl->dns);
	event_free(cl->ev_reap);
	SSL_CTX_free(cl->ctx);
	free(cl);
}

struct http_call *http_client_request(struct http_client *cl, const struct http_client_request *req,
                                      http_client_cb cb, void *arg)
{
	struct http_client_url u;
	struct client_host *h;
	struct http_call *call;
	const char *why = NULL;

	if (http_client_url_parse(req->url, &u) != 0) {
		log_warnx("client_request_invalid", "unacceptable URL (http:// or https:// only)");
		return NULL;
	}
	if (client_request_check(req, &why) != 0) {
		log_warnx("client_request_invalid", "%s:%d: %s", u.host, u.port, why);
		return NULL;
	}
	h = client_host_get(cl, &u);
	call = xcalloc(1, sizeof(*call));
	call->client = cl;
	call->host = h;
	call->state = CLIENT_CALL_NEW;
	call->cb = cb;
	call->arg = arg;
	call->head = strcmp(req->method, "HEAD") == 0;
	call->idempotent = req->idempotent || client_method_idempotent(req->method);
	call->seq = h->next_seq++;
	call->deadline_ms = req->deadline_ms > 0 ? req->deadline_ms : cl->opt.deadline_ms;
	client_build_wire(&call->wire, req, &u, h);
	call->ev_deadline = evtimer_new(cl->base, client_call_deadline_cb, call);
	if (call->ev_deadline == NULL)
		fatalx("event_new", "cannot create a call deadline");
	client_arm(call->ev_deadline, call->deadline_ms);
	cl->stats.calls_total++;
	cl->stats.calls_in_flight++;
	client_call_set_state(call, CLIENT_CALL_QUEUED); /* dispatched from the loop */
	return call;
}

void http_call_cancel(struct http_call *call)
{
	struct http_client *cl;
	struct client_conn *c;

	if (call == NULL || call->state == CLIENT_CALL_DONE)
		return;
	cl = call->client;
	c = call->conn;
	client_call_set_state(call, CLIENT_CALL_DONE);
	cl->stats.calls_in_flight--;
	if (c != NULL) {
		c->call = NULL;
		call->conn = NULL;
		client_conn_close(c, HTTP_CLIENT_OK, "call cancelled");
	}
	client_call_free(call);
}

const char *http_client_result_header(const struct http_client_result *res, const char *name)
{
	for (size_t i = 0; i < res->nheaders; i++) {
		if (strcasecmp(res->headers[i].name, name) == 0)
			return res->headers[i].value;
	}
	return NULL;
}

void http_client_stats(const struct http_client *cl, struct http_client_stats *out)
{
	struct dns_stats ds;

	*out = cl->stats;
	dns_resolver_stats(cl->dns, &ds);
	out->dns_cache_hits = ds.cache_hits;
}
