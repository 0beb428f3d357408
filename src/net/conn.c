/*
 * conn.c - the client connection state machine of the HTTPS server.
 *
 * SSL_read/SSL_write are driven directly from plain libevent events (no
 * bufferevent), so that a whole response leaves in one SSL_write and one
 * TLS record and no epoll_ctl is paid per write. Input is parsed with
 * llhttp; the parser is paused at each complete message so pipelined
 * requests are served strictly one after another, while bytes of the next
 * request wait in the input buffer. Every state has its limit and timeout;
 * see enum conn_state in net_int.h.
 */
#include "config.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/err.h>

#include "cloudsweep/log.h"
#include "cloudsweep/worker.h"
#include "net_int.h"

#define CONN_READ_CHUNK       16384
#define CONN_IN_MAX_PIPELINED 65536 /* buffered bytes of later requests while one is served */

static const char *const conn_state_names[] = { "handshake",  "idle",    "head",  "body",
	                                        "dispatched", "writing", "closed" };

static void conn_read_cb(evutil_socket_t fd, short what, void *arg);
static void conn_write_cb(evutil_socket_t fd, short what, void *arg);
static void conn_timeout_cb(evutil_socket_t fd, short what, void *arg);
static void conn_advance(struct conn *c);
static void conn_fail(struct conn *c, int status);

/*
 * A keep-alive connection that has been idle this long gives its buffers back, so ten
 * thousand parked clients cost little more than their TLS state; busy connections keep
 * theirs and never pay for allocation.
 */
#define CONN_IDLE_TRIM_MS 2000

static void conn_trim(struct conn *c)
{
	if (netbuf_used(&c->in) == 0)
		netbuf_reset(&c->in, 0);
	if (netbuf_used(&c->out) == 0)
		netbuf_reset(&c->out, 0);
	http_parse_trim(&c->parse);
	c->idle_trimmed = true;
}

/* Arm the timeout that belongs to state s, or none. */
static void conn_arm_timeout(struct conn *c, long long ms)
{
	struct timeval tv;

	if (ms <= 0) {
		evtimer_del(c->ev_tmo);
		return;
	}
	tv.tv_sec = ms / 1000;
	tv.tv_usec = (ms % 1000) * 1000;
	evtimer_add(c->ev_tmo, &tv);
}

/* The one place a connection changes state; each state brings its timeout. */
static void conn_set_state(struct conn *c, enum conn_state s)
{
	const struct config *cfg = c->srv->cfg;

	if (c->state == s)
		return;
	c->state = s;
	switch (s) {
	case CONN_HANDSHAKE:
		conn_arm_timeout(c, cfg->handshake_timeout_ms);
		break;
	case CONN_IDLE:
		/* Two phases: after CONN_IDLE_TRIM_MS the buffers go, at idle_timeout_ms the conn.
		 */
		c->idle_trimmed = false;
		conn_arm_timeout(c, cfg->idle_timeout_ms > CONN_IDLE_TRIM_MS
		                        ? CONN_IDLE_TRIM_MS
		                        : cfg->idle_timeout_ms);
		break;
	case CONN_HEAD:
		conn_arm_timeout(c, cfg->header_timeout_ms);
		break;
	case CONN_BODY:
		conn_arm_timeout(c, cfg->body_timeout_ms);
		break;
	case CONN_DISPATCHED:
		conn_arm_timeout(c, 0);
		break;
	case CONN_WRITING:
		conn_arm_timeout(c, cfg->idle_timeout_ms);
		break;
	case CONN_CLOSED:
		break;
	}
}

/* --- connection life --- */

void conn_start(struct server *srv, int fd, const char *ip_text, struct ip_slot *ip)
{
	struct conn *c = xcalloc(1, sizeof(*c));

	c->srv = srv;
	c->fd = fd;
	c->ip = ip;
	snprintf(c->ip_text, sizeof(c->ip_text), "%s", ip_text);
	c->state = CONN_CLOSED; /* so the first conn_set_state arms the handshake timer */
	c->ssl = SSL_new(srv->ctx);
	if (c->ssl == NULL || SSL_set_fd(c->ssl, fd) != 1) {
		log_warnx("tls_new_failed", "cannot create TLS session");
		SSL_free(c->ssl);
		close(fd);
		free(c);
		server_conn_gone(srv, NULL);
		return;
	}
	SSL_set_accept_state(c->ssl);
	http_parse_init(&c->parse, srv->cfg, srv->router, c);
	c->ev_r = event_new(srv->base, fd, EV_READ | EV_PERSIST, conn_read_cb, c);
	c->ev_w = event_new(srv->base, fd, EV_WRITE, conn_write_cb, c);
	c->ev_tmo = evtimer_new(srv->base, conn_timeout_cb, c);
	if (c->ev_r == NULL || c->ev_w == NULL || c->ev_tmo == NULL)
		fatalx("event_new", "cannot create connection events");
	TAILQ_INSERT_TAIL(&srv->conns, c, link);
	event_add(c->ev_r, NULL);
	conn_set_state(c, CONN_HANDSHAKE);
	conn_advance(c); /* the ClientHello is often already here */
}

static void conn_free_cb(evutil_socket_t fd, short what, void *arg)
{
	struct conn *c = arg;

	event_free(c->ev_r);
	event_free(c->ev_w);
	event_free(c->ev_tmo);
	SSL_free(c->ssl);
	netbuf_free(&c->in);
	netbuf_free(&c->out);
	free(c);
}

void conn_close(struct conn *c, const char *reason)
{
	struct server *srv = c->srv;

	if (c->state == CONN_CLOSED)
		return;
	log_debug("conn_close", "%s: %s in state %s", c->ip_text, reason,
	          conn_state_names[c->state]);
	conn_set_state(c, CONN_CLOSED);
	event_del(c->ev_r);
	event_del(c->ev_w);
	event_del(c->ev_tmo);
	if (c->req != NULL) {
		struct http_request *req = c->req;

		c->req = NULL;
		if (!req->responded && req->cancel != NULL)
			req->cancel(req, req->cancel_arg);
		http_request_free(req);
	}
	http_parse_free(&c->parse);
	/* One non-blocking close_notify attempt; a peer that is gone gets nothing more. */
	if (SSL_is_init_finished(c->ssl))
		(void)SSL_shutdown(c->ssl);
	ERR_clear_error();
	close(c->fd);
	c->fd = -1;
	TAILQ_REMOVE(&srv->conns, c, link);
	/* Free after the callback stack unwinds: callers may still hold c. */
	if (event_base_once(srv->base, -1, EV_TIMEOUT, conn_free_cb, c, NULL) == -1)
		fatalx("event_base_once", "cannot schedule a connection free");
	server_conn_gone(srv, c);
}

bool conn_is_idle(const struct conn *c)
{
	return (c->state == CONN_IDLE && netbuf_used(&c->in) == 0) || c->state == CONN_HANDSHAKE;
}

bool conn_draining(const struct conn *c)
{
	return c->srv->draining;
}

/* Classify an SSL_* failure: 1 want read, 2 want write, -1 dead. */
static int conn_ssl_want(struct conn *c, int rv, const char **why)
{
	int err = SSL_get_error(c->ssl, rv);

	switch (err) {
	case SSL_ERROR_WANT_READ:
		return 1;
	case SSL_ERROR_WANT_WRITE:
		return 2;
	case SSL_ERROR_ZERO_RETURN:
		*why = "client closed";
		break;
	case SSL_ERROR_SYSCALL:
		*why = errno ? strerror(errno) : "client went away";
		break;
	default:
		*why = "TLS error";
		log_debug("tls_error", "%s: %s", c->ip_text,
		          ERR_reason_error_string(ERR_peek_error()));
		break;
	}
	ERR_clear_error();
	return -1;
}

/* Write what is pending in c->out; 0 when drained, 1 when blocked, -1 when closed. */
static int conn_try_write(struct conn *c)
{
	const char *why = NULL;

	while (netbuf_used(&c->out) > 0) {
		size_t n = netbuf_used(&c->out);
		int rv =
		    SSL_write(c->ssl, c->out.data + c->out.off, n > INT32_MAX ? INT32_MAX : (int)n);

		if (rv > 0) {
			c->out.off += (size_t)rv;
			continue;
		}
		switch (conn_ssl_want(c, rv, &why)) {
		case 1:
			return 1; /* the read event will call us again */
		case 2:
			event_add(c->ev_w, NULL);
			return 1;
		default:
			conn_close(c, why);
			return -1;
		}
	}
	netbuf_reset(&c->out, 65536);
	return 0;
}

/* Read what the socket has into c->in; 0 ok, -1 closed. */
static int conn_read_some(struct conn *c)
{
	const char *why = NULL;
	size_t cap = c->state == CONN_DISPATCHED || c->state == CONN_WRITING
	                 ? CONN_IN_MAX_PIPELINED
	                 : (size_t)c->srv->cfg->max_header_bytes + CONN_READ_CHUNK;

	for (;;) {
		int rv;

		if (netbuf_used(&c->in) >= cap && c->state != CONN_BODY) {
			/* Enough buffered; resume when the parser catches up. */
			event_del(c->ev_r);
			c->read_paused = true;
			return 0;
		}
		netbuf_reserve(&c->in, CONN_READ_CHUNK);
		rv = SSL_read(c->ssl, c->in.data + c->in.len, CONN_READ_CHUNK);
		if (rv > 0) {
			c->in.len += (size_t)rv;
			if (c->state == CONN_BODY)
				return 0; /* parse what we have before reading more */
			continue;
		}
		switch (conn_ssl_want(c, rv, &why)) {
		case 1:
			if (c->state == CONN_IDLE && c->idle_trimmed && netbuf_used(&c->in) == 0)
				netbuf_reset(&c->in, 0); /* a long-idle conn holds no read buffer */
			return 0;
		case 2:
			event_add(c->ev_w, NULL);
			return 0;
		default:
			conn_close(c, why);
			return -1;
		}
	}
}

/* Re-enable reading after the input buffer drained, and pick up bytes OpenSSL holds. */
static void conn_resume_read(struct conn *c)
{
	if (!c->read_paused)
		return;
	c->read_paused = false;
	event_add(c->ev_r, NULL);
	event_active(c->ev_r, EV_READ, 1);
}

/* Answer a parse or limit failure and close after writing. */
static void conn_fail(struct conn *c, int status)
{
	static const struct {
		int status;
		const char *code, *msg;
	} errs[] = {
		{ 400, "bad_request", "malformed HTTP request" },
		{ 408, "request_timeout", "the request was not received in time" },
		{ 413, "payload_too_large", "request body exceeds the limit" },
		{ 414, "uri_too_long", "request target exceeds the limit" },
		{ 417, "expectation_failed", "unsupported Expect header" },
		{ 431, "headers_too_large", "request headers exceed the limit" },
	};
	const char *code = "bad_request", *msg = "malformed HTTP request";

	for (size_t i = 0; i < CS_ARRAY_LEN(errs); i++)
		if (errs[i].status == status) {
			code = errs[i].code;
			msg = errs[i].msg;
		}
	if (c->req == NULL)
		c->req = http_parse_take(&c->parse);
	if (c->req == NULL)
		c->req = http_request_new(c, c->srv->router);
	snprintf(c->req->client_ip, sizeof(c->req->client_ip), "%s", c->ip_text);
	if (c->req->method == NULL)
		c->req->method = "-";
	c->req->keep_alive = false;
	c->close_after_write = true;
	netbuf_reset(&c->in, 0);
	conn_set_state(c, CONN_DISPATCHED);
	http_error(c->req, status, code, "%s", msg);
}

/* Feed buffered input to the parser until a request completes or input runs out. */
static void conn_parse(struct conn *c)
{
	while (netbuf_used(&c->in) > 0 &&
	       (c->state == CONN_IDLE || c->state == CONN_HEAD || c->state == CONN_BODY)) {
		size_t used = 0;
		enum parse_result pr;

		if (c->state == CONN_IDLE)
			conn_set_state(c, CONN_HEAD);
		pr = http_parse_feed(&c->parse, c->in.data + c->in.off, netbuf_used(&c->in), &used);
		c->in.off += used;
		if (c->parse.continue_due) {
			c->parse.continue_due = false;
			netbuf_append(&c->out, "HTTP/1.1 100 Continue\r\n\r\n", 25);
			event_add(c->ev_w, NULL);
		}
		switch (pr) {
		case PARSE_MORE:
			if (c->parse.in_body)
				conn_set_state(c, CONN_BODY);
			break;
		case PARSE_REQUEST:
			c->req = http_parse_take(&c->parse);
			snprintf(c->req->client_ip, sizeof(c->req->client_ip), "%s", c->ip_text);
			conn_set_state(c, CONN_DISPATCHED);
			http_dispatch(c->req);
			return;
		case PARSE_ERROR:
			conn_fail(c, c->parse.error_status);
			return;
		}
	}
	if (netbuf_used(&c->in) == 0)
		netbuf_reset(&c->in, 65536);
}

/* Move the connection forward after any I/O readiness. */
static void conn_advance(struct conn *c)
{
	const char *why = NULL;
	int rv;

	switch (c->state) {
	case CONN_HANDSHAKE:
		rv = SSL_do_handshake(c->ssl);
		if (rv == 1) {
			conn_set_state(c, CONN_IDLE);
			break; /* fall through to reading below */
		}
		switch (conn_ssl_want(c, rv, &why)) {
		case 1:
			return;
		case 2:
			event_add(c->ev_w, NULL);
			return;
		default:
			conn_close(c, why ? why : "handshake failed");
			return;
		}
	case CONN_WRITING:
		if (conn_try_write(c) != 0)
			return;
		/* The response is out: the request is done. */
		if (c->req != NULL) {
			http_request_free(c->req);
			c->req = NULL;
		}
		if (c->close_after_write || c->srv->draining) {
			conn_close(c, "response complete, closing");
			return;
		}
		conn_set_state(c, CONN_IDLE);
		conn_parse(c);
		if (c->state != CONN_IDLE && c->state != CONN_HEAD && c->state != CONN_BODY)
			return;
		break;
	case CONN_CLOSED:
		return;
	default:
		break;
	}

	/* IDLE, HEAD, BODY: read and parse; DISPATCHED: buffer the next request. */
	if (netbuf_used(&c->out) > 0 && conn_try_write(c) == -1)
		return; /* a pending 100 Continue */
	if (conn_read_some(c) == -1)
		return;
	if (c->state == CONN_DISPATCHED)
		return;
	conn_parse(c);
	if (c->state == CONN_IDLE && c->srv->draining) {
		conn_close(c, "draining");
		return;
	}
	if (c->state == CONN_IDLE || c->state == CONN_HEAD || c->state == CONN_BODY) {
		if (c->read_paused)
			conn_resume_read(c);
		else if (SSL_pending(c->ssl) > 0)
			event_active(c->ev_r, EV_READ, 1);
	}
}

static void conn_read_cb(evutil_socket_t fd, short what, void *arg)
{
	conn_advance(arg);
}

static void conn_write_cb(evutil_socket_t fd, short what, void *arg)
{
	struct conn *c = arg;

	if (c->state == CONN_WRITING || c->state == CONN_HANDSHAKE) {
		conn_advance(c);
		return;
	}
	/* An interim response (100 Continue) or a TLS record the read side needed. */
	if (conn_try_write(c) == 0 && c->state != CONN_DISPATCHED)
		conn_advance(c);
}

static void conn_timeout_cb(evutil_socket_t fd, short what, void *arg)
{
	struct conn *c = arg;

	switch (c->state) {
	case CONN_HEAD:
	case CONN_BODY:
		conn_fail(c, 408);
		break;
	case CONN_HANDSHAKE:
		conn_close(c, "handshake timeout");
		break;
	case CONN_IDLE:
		if (!c->idle_trimmed && c->srv->cfg->idle_timeout_ms > CONN_IDLE_TRIM_MS) {
			conn_trim(c);
			conn_arm_timeout(c, c->srv->cfg->idle_timeout_ms - CONN_IDLE_TRIM_MS);
			break;
		}
		conn_close(c, "idle timeout");
		break;
	case CONN_WRITING:
		conn_close(c, "write timeout");
		break;
	default:
		break;
	}
}

void conn_send_response(struct conn *c, struct http_request *req, const char *data, size_t len,
                        int status)
{
	if (c->state == CONN_CLOSED)
		return;
	netbuf_append(&c->out, data, len);
	c->resp_status = status;
	if (!req->keep_alive)
		c->close_after_write = true;
	conn_set_state(c, CONN_WRITING);
	/* Write from the event loop, after the handler's stack has unwound. */
	event_active(c->ev_w, EV_WRITE, 1);
}
