/*
 * server.c - the listener side of a worker: the TLS 1.3 server context,
 * SO_REUSEPORT listening sockets, accepting with per-worker and per-IP
 * connection limits, and draining on shutdown.
 */
#include "config.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <openssl/err.h>

#include "cloudsweep/log.h"
#include "cloudsweep/worker.h"
#include "net_int.h"

#define SERVER_ACCEPT_BATCH 64

static int server_alpn_cb(SSL *ssl, const unsigned char **out, unsigned char *outlen,
                          const unsigned char *in, unsigned int inlen, void *arg)
{
	static const unsigned char ours[] = "\x08http/1.1";

	if (SSL_select_next_proto((unsigned char **)out, outlen, ours, sizeof(ours) - 1, in,
	                          inlen) != OPENSSL_NPN_NEGOTIATED)
		return SSL_TLSEXT_ERR_ALERT_FATAL; /* no_application_protocol */
	return SSL_TLSEXT_ERR_OK;
}

SSL_CTX *net_tls_server_ctx(const char *cert_file, const char *key_file)
{
	SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());

	if (ctx == NULL)
		goto fail;
	if (SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION) != 1 ||
	    SSL_CTX_set_max_proto_version(ctx, TLS1_3_VERSION) != 1)
		goto fail;
	if (SSL_CTX_use_certificate_chain_file(ctx, cert_file) != 1) {
		log_errorx("tls_cert", "cannot load certificate chain %s: %s", cert_file,
		           ERR_reason_error_string(ERR_peek_last_error()));
		goto fail_quiet;
	}
	if (SSL_CTX_use_PrivateKey_file(ctx, key_file, SSL_FILETYPE_PEM) != 1 ||
	    SSL_CTX_check_private_key(ctx) != 1) {
		log_errorx("tls_key", "cannot load private key %s: %s", key_file,
		           ERR_reason_error_string(ERR_peek_last_error()));
		goto fail_quiet;
	}
	if (SSL_CTX_set1_groups_list(ctx, "X25519:P-256:P-384") != 1)
		goto fail;
	/* Stateless tickets; the key is made before fork, so every worker resumes every session. */
	SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
	SSL_CTX_set_num_tickets(ctx, 1);
	SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS | SSL_MODE_ENABLE_PARTIAL_WRITE |
	                          SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
	SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_CIPHER_SERVER_PREFERENCE);
	SSL_CTX_set_alpn_select_cb(ctx, server_alpn_cb, NULL);
	return ctx;
fail:
	log_errorx("tls_ctx", "cannot set up TLS: %s",
	           ERR_reason_error_string(ERR_peek_last_error()));
fail_quiet:
	ERR_clear_error();
	SSL_CTX_free(ctx);
	return NULL;
}

int net_listen(const char *addr, int port)
{
	struct sockaddr_storage ss;
	socklen_t sslen;
	int fd, one = 1;

	memset(&ss, 0, sizeof(ss));
	if (inet_pton(AF_INET, addr, &((struct sockaddr_in *)&ss)->sin_addr) == 1) {
		struct sockaddr_in *sin = (struct sockaddr_in *)&ss;

		sin->sin_family = AF_INET;
		sin->sin_port = htons((uint16_t)port);
		sslen = sizeof(*sin);
	} else if (inet_pton(AF_INET6, addr, &((struct sockaddr_in6 *)&ss)->sin6_addr) == 1) {
		struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&ss;

		sin6->sin6_family = AF_INET6;
		sin6->sin6_port = htons((uint16_t)port);
		sslen = sizeof(*sin6);
	} else {
		log_errorx("listen", "listen_address %s is not an IP literal", addr);
		return -1;
	}
	fd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd == -1) {
		log_warn("listen", "socket");
		return -1;
	}
	if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) == -1 ||
	    setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) == -1) {
		log_warn("listen", "setsockopt");
		goto fail;
	}
	if (bind(fd, (struct sockaddr *)&ss, sslen) == -1) {
		log_warn("listen", "bind %s:%d", addr, port);
		goto fail;
	}
	if (listen(fd, 4096) == -1) {
		log_warn("listen", "listen %s:%d", addr, port);
		goto fail;
	}
	return fd;
fail:
	close(fd);
	return -1;
}

static unsigned server_ip_hash(const char *ip)
{
	unsigned h = 2166136261u;

	for (; *ip; ip++)
		h = (h ^ (unsigned char)*ip) * 16777619u;
	return h % NET_IP_BUCKETS;
}

/* Count one more connection for ip; NULL when the per-IP limit is reached. */
static struct ip_slot *server_ip_acquire(struct server *s, const char *ip)
{
	unsigned h = server_ip_hash(ip);
	struct ip_slot *e;

	for (e = s->ips[h]; e != NULL; e = e->next)
		if (strcmp(e->ip, ip) == 0)
			break;
	if (e == NULL) {
		e = xcalloc(1, sizeof(*e));
		snprintf(e->ip, sizeof(e->ip), "%s", ip);
		e->next = s->ips[h];
		s->ips[h] = e;
	}
	if (e->count >= s->cfg->max_connections_per_ip)
		return NULL;
	e->count++;
	return e;
}

static void server_ip_release(struct server *s, struct ip_slot *ip)
{
	struct ip_slot **pp;

	if (--ip->count > 0)
		return;
	for (pp = &s->ips[server_ip_hash(ip->ip)]; *pp != NULL; pp = &(*pp)->next)
		if (*pp == ip) {
			*pp = ip->next;
			free(ip);
			return;
		}
}

void server_conn_gone(struct server *srv, struct conn *c)
{
	if (c != NULL && c->ip != NULL)
		server_ip_release(srv, c->ip);
	srv->nconns--;
	if (cs_worker != NULL)
		metrics_gauge_add(&cs_worker->slot->open_connections, -1);
	if (srv->draining && srv->nconns == 0 && srv->drained_cb != NULL) {
		void (*cb)(void *) = srv->drained_cb;

		srv->drained_cb = NULL;
		cb(srv->drained_arg);
	}
}

static void server_refuse(struct server *s, int fd, const char *why, const char *ip)
{
	log_debug("conn_refused", "%s: %s", ip, why);
	if (cs_worker != NULL)
		cs_worker->slot->connections_refused++;
	close(fd);
}

static void server_resume_cb(evutil_socket_t fd, short what, void *arg)
{
	struct server *s = arg;

	if (!s->draining)
		event_add(s->ev_accept, NULL);
}

static void server_accept_cb(evutil_socket_t lfd, short what, void *arg)
{
	struct server *s = arg;

	for (int i = 0; i < SERVER_ACCEPT_BATCH; i++) {
		struct sockaddr_storage ss;
		socklen_t sslen = sizeof(ss);
		char ip[64] = "?";
		struct ip_slot *slot;
		int fd, one = 1;

		fd = accept4(lfd, (struct sockaddr *)&ss, &sslen, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd == -1) {
			if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR ||
			    errno == ECONNABORTED)
				return;
			if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS ||
			    errno == ENOMEM) {
				struct timeval tv = { 0, 100000 };

				log_warn("accept", "pausing accept for 100 ms");
				event_del(s->ev_accept);
				evtimer_add(s->ev_resume, &tv);
				return;
			}
			log_warn("accept", "accept failed");
			return;
		}
		if (ss.ss_family == AF_INET)
			inet_ntop(AF_INET, &((struct sockaddr_in *)&ss)->sin_addr, ip, sizeof(ip));
		else if (ss.ss_family == AF_INET6)
			inet_ntop(AF_INET6, &((struct sockaddr_in6 *)&ss)->sin6_addr, ip,
			          sizeof(ip));
		if (s->nconns >= s->cfg->max_connections_per_worker) {
			server_refuse(s, fd, "worker connection limit", ip);
			continue;
		}
		slot = server_ip_acquire(s, ip);
		if (slot == NULL) {
			server_refuse(s, fd, "per-IP connection limit", ip);
			continue;
		}
		(void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
		s->nconns++;
		if (cs_worker != NULL)
			metrics_gauge_add(&cs_worker->slot->open_connections, 1);
		conn_start(s, fd, ip, slot);
	}
}

struct server *server_new(struct event_base *base, int listen_fd, SSL_CTX *ctx,
                          const struct config *cfg, struct router *router)
{
	struct server *s = xcalloc(1, sizeof(*s));

	s->base = base;
	s->cfg = cfg;
	s->router = router;
	s->ctx = ctx;
	s->listen_fd = listen_fd;
	TAILQ_INIT(&s->conns);
	s->ev_accept = event_new(base, listen_fd, EV_READ | EV_PERSIST, server_accept_cb, s);
	s->ev_resume = evtimer_new(base, server_resume_cb, s);
	if (s->ev_accept == NULL || s->ev_resume == NULL || event_add(s->ev_accept, NULL) == -1)
		fatalx("server_new", "cannot watch the listener");
	return s;
}

void server_set_config(struct server *s, const struct config *cfg)
{
	s->cfg = cfg;
}

int server_connections(const struct server *s)
{
	return s->nconns;
}

void server_drain(struct server *s, void (*done_cb)(void *), void *arg)
{
	struct conn *c, *next;

	s->draining = true;
	s->drained_cb = done_cb;
	s->drained_arg = arg;
	event_del(s->ev_accept);
	evtimer_del(s->ev_resume);
	if (s->listen_fd != -1) {
		close(s->listen_fd);
		s->listen_fd = -1;
	}
	for (c = TAILQ_FIRST(&s->conns); c != NULL; c = next) {
		next = TAILQ_NEXT(c, link);
		if (conn_is_idle(c))
			conn_close(c, "draining");
	}
	if (s->nconns == 0 && s->drained_cb != NULL) {
		s->drained_cb = NULL;
		done_cb(arg);
	}
}

void server_free(struct server *s)
{
	struct conn *c;

	if (s == NULL)
		return;
	s->drained_cb = NULL;
	while ((c = TAILQ_FIRST(&s->conns)) != NULL)
		conn_close(c, "server shutting down");
	event_free(s->ev_accept);
	event_free(s->ev_resume);
	if (s->listen_fd != -1)
		close(s->listen_fd);
	for (int i = 0; i < NET_IP_BUCKETS; i++)
		while (s->ips[i] != NULL) {
			struct ip_slot *e = s->ips[i];

			s->ips[i] = e->next;
			free(e);
		}
	free(s);
}
