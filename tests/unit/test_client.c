/*
 * test_client.c - the outbound HTTP(S) client and its resolver against small
 * blocking servers started in threads of this program on loopback: a TLS
 * server with a throwaway P-256 certificate for "localhost", a second one
 * whose certificate names another host, and a plain HTTP one. Certificates
 * are generated here with OpenSSL and written to a temporary directory as
 * the client's CA bundles. Nothing leaves the machine.
 */
#include "config.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <unistd.h>

#include <event2/event.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "cloudsweep/client.h"
#include "cloudsweep/dns.h"
#include "cloudsweep/log.h"
#include "tap.h"

/* --- certificates --- */

static X509 *make_cert(EVP_PKEY *key, const char *cn, const char *san, long serial)
{
	X509 *x = X509_new();
	X509_NAME *name;
	X509_EXTENSION *ext;
	X509V3_CTX v3;

	if (x == NULL || X509_set_version(x, 2) != 1 ||
	    ASN1_INTEGER_set(X509_get_serialNumber(x), serial) != 1 ||
	    X509_gmtime_adj(X509_getm_notBefore(x), -3600) == NULL ||
	    X509_gmtime_adj(X509_getm_notAfter(x), 86400) == NULL || X509_set_pubkey(x, key) != 1)
		goto fail;
	name = X509_get_subject_name(x);
	if (X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, (const unsigned char *)cn, -1, -1,
	                               0) != 1 ||
	    X509_set_issuer_name(x, name) != 1)
		goto fail;
	X509V3_set_ctx_nodb(&v3);
	X509V3_set_ctx(&v3, x, x, NULL, NULL, 0);
	ext = X509V3_EXT_conf_nid(NULL, &v3, NID_subject_alt_name, san);
	if (ext == NULL || X509_add_ext(x, ext, -1) != 1) {
		X509_EXTENSION_free(ext);
		goto fail;
	}
	X509_EXTENSION_free(ext);
	if (X509_sign(x, key, EVP_sha256()) == 0)
		goto fail;
	return x;
fail:
	X509_free(x);
	return NULL;
}

/* Append cert as PEM to path. */
static int write_pem(const char *path, X509 *cert, const char *mode)
{
	FILE *f = fopen(path, mode);
	int rc;

	if (f == NULL)
		return -1;
	rc = PEM_write_X509(f, cert) == 1 ? 0 : -1;
	if (fclose(f) != 0)
		rc = -1;
	return rc;
}

/* --- the blocking test servers --- */

#define MAX_CONN_THREADS 256

struct srv {
	SSL_CTX *ctx; /* NULL: plain HTTP */
	int lfd;
	int port;
	pthread_t thread;
	atomic_int accepts;
	atomic_bool stop;
	pthread_mutex_t lock;
	pthread_t conns[MAX_CONN_THREADS];
	int nconns;
};

struct srv_conn {
	struct srv *srv;
	int fd;
	SSL *ssl;
};

static int sc_read(struct srv_conn *sc, char *buf, size_t n)
{
	if (sc->ssl != NULL)
		return SSL_read(sc->ssl, buf, (int)n);
	return (int)read(sc->fd, buf, n);
}

static int sc_write(struct srv_conn *sc, const char *buf, size_t n)
{
	if (sc->ssl != NULL)
		return SSL_write(sc->ssl, buf, (int)n) == (int)n ? 0 : -1;
	while (n > 0) {
		ssize_t w = send(sc->fd, buf, n, MSG_NOSIGNAL);

		if (w <= 0)
			return -1;
		buf += w;
		n -= (size_t)w;
	}
	return 0;
}

static int sc_printf(struct srv_conn *sc, const char *fmt, ...) CS_PRINTF(2, 3);
static int sc_printf(struct srv_conn *sc, const char *fmt, ...)
{
	char buf[4096];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	return sc_write(sc, buf, (size_t)n);
}

/* The value of header name in a request head, copied into out. */
static bool head_value(const char *head, const char *name, char *out, size_t outlen)
{
	size_t n = strlen(name);

	for (const char *p = strstr(head, "\r\n"); p != NULL; p = strstr(p + 2, "\r\n")) {
		const char *line = p + 2;

		if (strncasecmp(line, name, n) == 0 && line[n] == ':') {
			const char *v = line + n + 1, *e;

			while (*v == ' ')
				v++;
			e = strstr(v, "\r\n");
			snprintf(out, outlen, "%.*s", (int)(e - v), v);
			return true;
		}
	}
	return false;
}

/* Serve requests on one connection until the client goes away. */
static void *srv_conn_main(void *arg)
{
	struct srv_conn *sc = arg;
	static char big[100000];
	char buf[65536];
	size_t len = 0;

	memset(big, 'x', sizeof(big));
	if (sc->ssl != NULL && SSL_accept(sc->ssl) != 1)
		goto out;
	for (;;) {
		char method[16], path[256], value[256], body[8192];
		char *end;
		size_t head_len, clen = 0;
		int n;

		while ((end = memmem(buf, len, "\r\n\r\n", 4)) == NULL) {
			if (len == sizeof(buf) - 1)
				goto out;
			n = sc_read(sc, buf + len, sizeof(buf) - 1 - len);
			if (n <= 0)
				goto out;
			len += (size_t)n;
		}
		head_len = (size_t)(end - buf) + 4;
		end[2] = '\0';
		if (sscanf(buf, "%15s %255s", method, path) != 2)
			goto out;
		if (head_value(buf, "Content-Length", value, sizeof(value)))
			clen = strtoul(value, NULL, 10);
		if (clen >= sizeof(body))
			goto out;
		while (len < head_len + clen) {
			n = sc_read(sc, buf + len, sizeof(buf) - 1 - len);
			if (n <= 0)
				goto out;
			len += (size_t)n;
		}
		memcpy(body, buf + head_len, clen);
		body[clen] = '\0';

		if (strcmp(path, "/hello") == 0) {
			sc_printf(sc, "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
			              "Content-Length: 11\r\n\r\nhello world");
		} else if (strcmp(path, "/echo") == 0) {
			char host[256] = "", ua[256] = "", xt[256] = "";

			head_value(buf, "Host", host, sizeof(host));
			head_value(buf, "User-Agent", ua, sizeof(ua));
			head_value(buf, "X-Test", xt, sizeof(xt));
			sc_printf(
			    sc,
			    "HTTP/1.1 201 Created\r\nX-Echo-Method: %s\r\nX-Echo-Host: %s\r\n"
			    "X-Echo-UA: %s\r\nX-Echo-Test: %s\r\nContent-Length: %zu\r\n\r\n%s",
			    method, host, ua, xt, clen, body);
		} else if (strcmp(path, "/chunked") == 0) {
			/* Separate writes, so the client parses chunks across reads. */
			sc_printf(sc, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
			usleep(5000);
			sc_printf(sc, "5\r\nhello\r\n");
			usleep(5000);
			sc_printf(sc, "1\r\n \r\n5\r\nworld\r\n");
			sc_printf(sc, "0\r\nX-Trailer: t\r\n\r\n");
		} else if (strcmp(path, "/head") == 0) {
			sc_printf(sc, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n");
		} else if (strcmp(path, "/nocontent") == 0) {
			sc_printf(sc, "HTTP/1.1 204 No Content\r\n\r\n");
		} else if (strcmp(path, "/continue") == 0) {
			sc_printf(sc, "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n"
			              "Content-Length: 5\r\n\r\nfinal");
		} else if (strcmp(path, "/eof") == 0) {
			sc_printf(sc, "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil eof");
			goto out;
		} else if (strcmp(path, "/drop") == 0) {
			/* Looks keep-alive, then the server drops the connection. */
			sc_printf(sc, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
			goto out;
		} else if (strcmp(path, "/slow") == 0) {
			while (sc_read(sc, buf, sizeof(buf)) > 0)
				; /* never answer; wait for the client to give up */
			goto out;
		} else if (strcmp(path, "/big") == 0) {
			sc_printf(sc, "HTTP/1.1 200 OK\r\nContent-Length: %zu\r\n\r\n",
			          sizeof(big));
			if (sc_write(sc, big, sizeof(big)) != 0)
				goto out;
		} else if (strcmp(path, "/bigchunked") == 0) {
			sc_printf(sc,
			          "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%zx\r\n",
			          sizeof(big));
			if (sc_write(sc, big, sizeof(big)) != 0)
				goto out;
			sc_printf(sc, "\r\n0\r\n\r\n");
		} else if (strcmp(path, "/bighead") == 0) {
			sc_printf(sc,
			          "HTTP/1.1 200 OK\r\nX-Big: %.3000s\r\nContent-Length: 0\r\n\r\n",
			          big);
		} else if (strcmp(path, "/garbage") == 0) {
			sc_printf(sc, "HTTP/1.1 2x0 What\r\n\r\n");
			goto out;
		} else if (strcmp(path, "/delay") == 0) {
			usleep(20000);
			sc_printf(sc, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
		} else {
			sc_printf(sc, "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
		}
		memmove(buf, buf + head_len + clen, len - head_len - clen);
		len -= head_len + clen;
	}
out:
	if (sc->ssl != NULL)
		SSL_free(sc->ssl);
	close(sc->fd);
	free(sc);
	ERR_clear_error();
	return NULL;
}

static void *srv_main(void *arg)
{
	struct srv *s = arg;

	for (;;) {
		struct timeval tv = { .tv_sec = 10 };
		struct srv_conn *sc;
		int fd = accept(s->lfd, NULL, NULL);

		if (fd == -1) {
			if (errno == EINTR)
				continue;
			break;
		}
		if (atomic_load(&s->stop)) {
			close(fd);
			break;
		}
		atomic_fetch_add(&s->accepts, 1);
		/* A safety net: a conversation the client forgot ends by itself. */
		setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
		sc = calloc(1, sizeof(*sc));
		sc->srv = s;
		sc->fd = fd;
		if (s->ctx != NULL) {
			sc->ssl = SSL_new(s->ctx);
			SSL_set_fd(sc->ssl, fd);
		}
		pthread_mutex_lock(&s->lock);
		if (s->nconns == MAX_CONN_THREADS ||
		    pthread_create(&s->conns[s->nconns], NULL, srv_conn_main, sc) != 0) {
			pthread_mutex_unlock(&s->lock);
			SSL_free(sc->ssl);
			close(fd);
			free(sc);
			continue;
		}
		s->nconns++;
		pthread_mutex_unlock(&s->lock);
	}
	return NULL;
}

static int srv_alpn_cb(SSL *ssl, const unsigned char **out, unsigned char *outlen,
                       const unsigned char *in, unsigned int inlen, void *arg)
{
	static const unsigned char protos[] = { 8, 'h', 't', 't', 'p', '/', '1', '.', '1' };

	if (SSL_select_next_proto((unsigned char **)out, outlen, protos, sizeof(protos), in,
	                          inlen) != OPENSSL_NPN_NEGOTIATED)
		return SSL_TLSEXT_ERR_NOACK;
	return SSL_TLSEXT_ERR_OK;
}

static int srv_start(struct srv *s, X509 *cert, EVP_PKEY *key)
{
	struct sockaddr_in sin = { .sin_family = AF_INET };
	socklen_t slen = sizeof(sin);

	memset(s, 0, sizeof(*s));
	pthread_mutex_init(&s->lock, NULL);
	if (cert != NULL) {
		s->ctx = SSL_CTX_new(TLS_server_method());
		if (s->ctx == NULL || SSL_CTX_use_certificate(s->ctx, cert) != 1 ||
		    SSL_CTX_use_PrivateKey(s->ctx, key) != 1)
			return -1;
		SSL_CTX_set_alpn_select_cb(s->ctx, srv_alpn_cb, NULL);
	}
	sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	s->lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (s->lfd == -1 || bind(s->lfd, (struct sockaddr *)&sin, sizeof(sin)) != 0 ||
	    listen(s->lfd, 128) != 0 || getsockname(s->lfd, (struct sockaddr *)&sin, &slen) != 0)
		return -1;
	s->port = ntohs(sin.sin_port);
	return pthread_create(&s->thread, NULL, srv_main, s) == 0 ? 0 : -1;
}

static void srv_stop(struct srv *s)
{
	struct sockaddr_in sin = { .sin_family = AF_INET };
	int fd;

	atomic_store(&s->stop, true);
	/* Wake accept() with one last connection. */
	sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	sin.sin_port = htons((uint16_t)s->port);
	fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd != -1) {
		(void)connect(fd, (struct sockaddr *)&sin, sizeof(sin));
		close(fd);
	}
	pthread_join(s->thread, NULL);
	close(s->lfd);
	for (int i = 0; i < s->nconns; i++)
		pthread_join(s->conns[i], NULL);
	SSL_CTX_free(s->ctx);
	pthread_mutex_destroy(&s->lock);
}

/* --- driving the client --- */

static struct event_base *base;
static int pending;
static bool guard_fired;

struct outcome {
	bool done;
	int ncalls;
	enum http_client_error err;
	int status;
	char *body;
	size_t body_len;
	char message[512];
	char hdr[4][256]; /* values of the headers named in want[] */
	const char *want[4];
	bool reused;
	uint64_t at_ms;
};

static void outcome_clear(struct outcome *o)
{
	free(o->body);
	memset(o, 0, sizeof(*o));
}

static void store_cb(const struct http_client_result *res, void *arg)
{
	struct outcome *o = arg;

	o->done = true;
	o->ncalls++;
	o->err = res->error;
	o->status = res->status;
	o->reused = res->reused;
	o->at_ms = cs_now_ms();
	snprintf(o->message, sizeof(o->message), "%s", res->message);
	free(o->body);
	o->body = malloc(res->body_len + 1);
	memcpy(o->body, res->body, res->body_len + 1);
	o->body_len = res->body_len;
	for (int i = 0; i < 4 && o->want[i] != NULL; i++) {
		const char *v = http_client_result_header(res, o->want[i]);

		snprintf(o->hdr[i], sizeof(o->hdr[i]), "%s", v != NULL ? v : "(none)");
	}
	if (--pending == 0)
		event_base_loopbreak(base);
}

static void guard_cb(evutil_socket_t fd, short what, void *arg)
{
	guard_fired = true;
	event_base_loopbreak(base);
}

/* Run the loop until every pending callback ran, or ms passed. */
static void run(int ms)
{
	struct event *guard = evtimer_new(base, guard_cb, NULL);
	struct timeval tv = { .tv_sec = ms / 1000, .tv_usec = (ms % 1000) * 1000 };

	guard_fired = false;
	evtimer_add(guard, &tv);
	if (pending > 0 || ms > 0)
		event_base_loop(base, 0);
	event_free(guard);
}

/* Run the loop for ms whatever happens (for "must not call back" checks). */
static void run_for(int ms)
{
	int saved = pending;

	pending = 1 << 30; /* nothing breaks the loop early */
	run(ms);
	pending = saved;
}

static struct http_call *get(struct http_client *cl, const char *url, struct outcome *o)
{
	struct http_client_request req = { .method = "GET", .url = url };

	pending++;
	return http_client_request(cl, &req, store_cb, o);
}

/* One GET, run to completion. */
static void get_sync(struct http_client *cl, const char *url, struct outcome *o)
{
	if (get(cl, url, o) == NULL) {
		pending--;
		return;
	}
	run(5000);
}

/* --- the tests --- */

static void test_url_parse(void)
{
	static const struct {
		const char *url;
		int rc;
		bool tls;
		const char *host;
		int port;
		const char *path; /* path + '?' + query as parsed */
	} cases[] = {
		{ "https://api.github.com/user", 0, true, "api.github.com", 443, "/user" },
		{ "https://EC2.US-East-1.amazonaws.com", 0, true, "ec2.us-east-1.amazonaws.com",
		  443, "/" },
		{ "http://localhost:4566/?Action=DescribeRegions&Version=2016-11-15", 0, false,
		  "localhost", 4566, "/?Action=DescribeRegions&Version=2016-11-15" },
		{ "https://[::1]:8443/a/b?x=1", 0, true, "::1", 8443, "/a/b?x=1" },
		{ "https://127.0.0.1/", 0, true, "127.0.0.1", 443, "/" },
		{ "HTTPS://host?q", 0, true, "host", 443, "/?q" },
		{ "https://example.com.:8443/", 0, true, "example.com", 8443, "/" },
		{ "ftp://host/", -1, false, NULL, 0, NULL },
		{ "https://user:pw@host/", -1, false, NULL, 0, NULL },
		{ "https://host/#frag", -1, false, NULL, 0, NULL },
		{ "https://host:0/", -1, false, NULL, 0, NULL },
		{ "https://host:65536/", -1, false, NULL, 0, NULL },
		{ "https://host:/", -1, false, NULL, 0, NULL },
		{ "https:///path", -1, false, NULL, 0, NULL },
		{ "https://ho st/", -1, false, NULL, 0, NULL },
		{ "https://host/a b", -1, false, NULL, 0, NULL },
		{ "https://host/\x7f", -1, false, NULL, 0, NULL },
		{ "https://[fe80::1%eth0]/", -1, false, NULL, 0, NULL },
		{ "https://[::1/", -1, false, NULL, 0, NULL },
		{ "//host/", -1, false, NULL, 0, NULL },
	};

	for (size_t i = 0; i < CS_ARRAY_LEN(cases); i++) {
		struct http_client_url u;
		int rc = http_client_url_parse(cases[i].url, &u);
		char target[512];

		if (cases[i].rc != 0) {
			is_int(rc, -1, "url_parse rejects %s", cases[i].url);
			continue;
		}
		snprintf(target, sizeof(target), "%.*s%s%.*s", (int)u.path_len, u.path,
		         u.query ? "?" : "", u.query ? (int)u.query_len : 0,
		         u.query ? u.query : "");
		ok(rc == 0 && u.tls == cases[i].tls && strcmp(u.host, cases[i].host) == 0 &&
		       u.port == cases[i].port && strcmp(target, cases[i].path) == 0,
		   "url_parse %s -> %s %d %s", cases[i].url, u.host, u.port, target);
	}
}

static void test_invalid_requests(struct http_client *cl)
{
	struct http_client_header crlf[] = { { "X-A", "x\r\nInjected: 1" } };
	struct http_client_header host[] = { { "Host", "evil" } };
	struct http_client_header badname[] = { { "X A", "1" } };
	struct http_client_request req = { .method = "GET", .url = "ftp://localhost/" };
	struct outcome o = { 0 };

	ok(http_client_request(cl, &req, store_cb, &o) == NULL, "ftp:// URL refused");
	req.url = "https://localhost/";
	req.headers = crlf;
	req.nheaders = 1;
	ok(http_client_request(cl, &req, store_cb, &o) == NULL, "CRLF in a header value refused");
	req.headers = host;
	ok(http_client_request(cl, &req, store_cb, &o) == NULL, "caller-set Host refused");
	req.headers = badname;
	ok(http_client_request(cl, &req, store_cb, &o) == NULL, "bad header name refused");
	req.nheaders = 0;
	req.method = "GE T";
	ok(http_client_request(cl, &req, store_cb, &o) == NULL, "bad method refused");
	run_for(20);
	ok(!o.done, "no callback for refused requests");
}

struct dns_outcome {
	bool done;
	enum dns_status status;
	bool cached;
	char first[64];
	size_t naddrs;
};

static void dns_store_cb(const struct dns_result *res, void *arg)
{
	struct dns_outcome *o = arg;

	o->done = true;
	o->status = res->status;
	o->cached = res->cached;
	o->naddrs = res->naddrs;
	if (res->naddrs > 0) {
		const struct sockaddr_storage *ss = &res->addrs[0].ss;

		if (ss->ss_family == AF_INET)
			inet_ntop(AF_INET, &((const struct sockaddr_in *)ss)->sin_addr, o->first,
			          sizeof(o->first));
		else
			inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)ss)->sin6_addr, o->first,
			          sizeof(o->first));
	}
	if (--pending == 0)
		event_base_loopbreak(base);
}

static void test_dns(void)
{
	struct dns_resolver *r = dns_resolver_new(base, NULL);
	struct dns_outcome a = { 0 }, b = { 0 }, c = { 0 }, d = { 0 }, e = { 0 };
	struct dns_query *q;
	struct dns_stats st;

	ok(r != NULL, "resolver created");
	if (r == NULL)
		return;
	pending = 1;
	(void)dns_resolve(r, "localhost", dns_store_cb, &a);
	ok(!a.done, "dns_resolve never calls back synchronously");
	run(3000);
	ok(a.done && a.status == DNS_OK && a.naddrs >= 1, "localhost resolves");
	ok(strcmp(a.first, "127.0.0.1") == 0 || strcmp(a.first, "::1") == 0,
	   "localhost is loopback (%s)", a.first);

	pending = 1;
	(void)dns_resolve(r, "LOCALHOST", dns_store_cb, &b);
	run(3000);
	ok(b.done && b.status == DNS_OK && b.cached, "second lookup comes from the cache");

	pending = 1;
	(void)dns_resolve(r, "no-such-host.invalid", dns_store_cb, &c);
	run(3000);
	ok(c.done && c.status == DNS_ERR_NOTFOUND, "a name under .invalid is not found (%s)",
	   dns_status_name(c.status));

	pending = 1;
	(void)dns_resolve(r, "::1", dns_store_cb, &d);
	run(3000);
	ok(d.done && d.status == DNS_OK && strcmp(d.first, "::1") == 0, "IPv6 literal");

	q = dns_resolve(r, "localhost", dns_store_cb, &e);
	dns_query_cancel(q);
	run_for(30);
	ok(!e.done, "a cancelled lookup never calls back");

	dns_resolver_stats(r, &st);
	ok(st.cache_hits >= 1 && st.queries >= 1, "resolver stats: %llu queries, %llu hits",
	   (unsigned long long)st.queries, (unsigned long long)st.cache_hits);
	dns_resolver_free(r);
}

static void test_basic(struct http_client *cl, struct srv *s, int port)
{
	struct outcome o = { 0 };
	struct http_client_stats st;
	char url[256], host[64];
	struct http_client_header hdrs[] = { { "X-Test", "value 1" },
		                             { "Content-Type", "text/plain" } };
	struct http_client_request post = { .method = "POST",
		                            .url = url,
		                            .headers = hdrs,
		                            .nheaders = 2,
		                            .body = "ping body",
		                            .body_len = 9 };
	int accepts0 = atomic_load(&s->accepts);

	snprintf(url, sizeof(url), "https://localhost:%d/hello", port);
	o.want[0] = "content-type";
	get_sync(cl, url, &o);
	ok(o.done && o.err == HTTP_CLIENT_OK, "GET over TLS succeeds (%s)", o.message);
	is_int(o.status, 200, "status 200");
	is_str(o.body, "hello world", "body");
	is_str(o.hdr[0], "text/plain", "header lookup is case-insensitive");
	ok(!o.reused, "first call opens a connection");

	outcome_clear(&o);
	get_sync(cl, url, &o);
	ok(o.done && o.err == HTTP_CLIENT_OK && o.status == 200, "second GET succeeds");
	ok(o.reused, "second call reuses the pooled connection");
	is_int(atomic_load(&s->accepts) - accepts0, 1, "server accepted one connection for both");
	http_client_stats(cl, &st);
	ok(st.conns_reused >= 1 && st.conns_opened == 1, "stats: %llu opened, %llu reused",
	   (unsigned long long)st.conns_opened, (unsigned long long)st.conns_reused);

	outcome_clear(&o);
	snprintf(url, sizeof(url), "https://localhost:%d/echo", port);
	o.want[0] = "x-echo-method";
	o.want[1] = "x-echo-host";
	o.want[2] = "x-echo-test";
	o.want[3] = "x-echo-ua";
	pending++;
	ok(http_client_request(cl, &post, store_cb, &o) != NULL, "POST issued");
	run(5000);
	ok(o.done && o.err == HTTP_CLIENT_OK && o.status == 201, "POST round trip (%d)", o.status);
	is_str(o.body, "ping body", "POST body echoed");
	is_str(o.hdr[0], "POST", "method sent");
	snprintf(host, sizeof(host), "localhost:%d", port);
	is_str(o.hdr[1], host, "Host header carries the port");
	is_str(o.hdr[2], "value 1", "caller header sent");
	ok(strncmp(o.hdr[3], "cloudsweep/", 11) == 0, "default User-Agent (%s)", o.hdr[3]);

	outcome_clear(&o);
	snprintf(url, sizeof(url), "https://localhost:%d/chunked", port);
	get_sync(cl, url, &o);
	ok(o.done && o.err == HTTP_CLIENT_OK && o.status == 200, "chunked response (%s)",
	   o.message);
	is_str(o.body, "hello world", "chunked body reassembled across reads");
	ok(o.reused, "chunked response kept the connection");

	outcome_clear(&o);
	{
		struct http_client_request head = { .method = "HEAD", .url = url };

		snprintf(url, sizeof(url), "https://localhost:%d/head", port);
		pending++;
		(void)http_client_request(cl, &head, store_cb, &o);
		run(5000);
	}
	ok(o.done && o.err == HTTP_CLIENT_OK && o.status == 200 && o.body_len == 0,
	   "HEAD: Content-Length but no body");

	outcome_clear(&o);
	snprintf(url, sizeof(url), "https://localhost:%d/nocontent", port);
	get_sync(cl, url, &o);
	ok(o.done && o.err == HTTP_CLIENT_OK && o.status == 204 && o.body_len == 0, "204");
	ok(o.reused, "connection still reusable after HEAD and 204");

	outcome_clear(&o);
	snprintf(url, sizeof(url), "https://localhost:%d/continue", port);
	get_sync(cl, url, &o);
	ok(o.done && o.err == HTTP_CLIENT_OK && o.status == 200, "interim 100 is skipped");
	is_str(o.body, "final", "final response after 100");
	outcome_clear(&o);
}

static void test_close_and_resume(struct http_client *cl, int port)
{
	struct outcome o = { 0 };
	struct http_client_stats st0, st;
	char url[256];

	http_client_stats(cl, &st0);
	snprintf(url, sizeof(url), "https://localhost:%d/eof", port);
	get_sync(cl, url, &o);
	ok(o.done && o.err == HTTP_CLIENT_OK && o.status == 200, "body delimited by EOF (%s)",
	   o.message);
	is_str(o.body, "until eof", "EOF-delimited body");

	outcome_clear(&o);
	snprintf(url, sizeof(url), "https://localhost:%d/hello", port);
	get_sync(cl, url, &o);
	ok(o.done && o.err == HTTP_CLIENT_OK && !o.reused, "Connection: close -> new connection");
	http_client_stats(cl, &st);
	ok(st.tls_resumed > st0.tls_resumed, "the new connection resumed the TLS session");
	outcome_clear(&o);
}

/* Issue a follow-up from inside the callback, before the loop can see the server's FIN. */
static struct http_client *retry_client;
static char retry_url[256];
static struct outcome retry_second;

static void retry_first_cb(const struct http_client_result *res, void *arg)
{
	if (get(retry_client, retry_url, &retry_second) == NULL)
		pending--;
	store_cb(res, arg);
}

static void test_stale_retry(struct http_client *cl, int port)
{
	struct outcome first = { 0 };
	struct http_client_request req = { .method = "GET", .url = NULL };
	struct http_client_stats st0, st;
	char url[256];

	http_client_stats(cl, &st0);
	retry_client = cl;
	snprintf(url, sizeof(url), "https://localhost:%d/drop", port);
	snprintf(retry_url, sizeof(retry_url), "https://localhost:%d/hello", port);
	memset(&retry_second, 0, sizeof(retry_second));
	req.url = url;
	pending = 1;
	(void)http_client_request(cl, &req, retry_first_cb, &first);
	run(5000);
	ok(first.done && first.err == HTTP_CLIENT_OK, "keep-alive response, then server drops");
	ok(retry_second.done && retry_second.err == HTTP_CLIENT_OK && retry_second.status == 200,
	   "request on the dropped connection succeeds after one retry (%s)", retry_second.message);
	http_client_stats(cl, &st);
	is_int(st.retries - st0.retries, 1, "retried once on a fresh connection");
	outcome_clear(&first);
	outcome_clear(&retry_second);
}

static void test_tls_failures(struct http_client *cl, struct http_client *untrusting, int port,
                              int other_port)
{
	struct outcome o = { 0 };
	char url[256];

	snprintf(url, sizeof(url), "https://127.0.0.1:%d/hello", port);
	get_sync(cl, url, &o);
	ok(o.done && o.err == HTTP_CLIENT_ERR_TLS_VERIFY,
	   "IP literal not named by the certificate: %s (%s)", http_client_error_name(o.err),
	   o.message);

	outcome_clear(&o);
	snprintf(url, sizeof(url), "https://localhost:%d/hello", other_port);
	get_sync(cl, url, &o);
	ok(o.done && o.err == HTTP_CLIENT_ERR_TLS_VERIFY,
	   "certificate for another host name: %s (%s)", http_client_error_name(o.err), o.message);

	outcome_clear(&o);
	snprintf(url, sizeof(url), "https://localhost:%d/hello", port);
	get_sync(untrusting, url, &o);
	ok(o.done && o.err == HTTP_CLIENT_ERR_TLS_VERIFY, "untrusted CA: %s (%s)",
	   http_client_error_name(o.err), o.message);
	outcome_clear(&o);
}

static void test_failures(struct http_client *cl, int port)
{
	struct outcome o = { 0 };
	struct http_client_request req = { .method = "GET", .deadline_ms = 300 };
	struct sockaddr_in sin = { .sin_family = AF_INET };
	socklen_t slen = sizeof(sin);
	char url[256];
	uint64_t t0;
	int fd;

	snprintf(url, sizeof(url), "https://localhost:%d/slow", port);
	req.url = url;
	pending++;
	t0 = cs_now_ms();
	(void)http_client_request(cl, &req, store_cb, &o);
	run(5000);
	ok(o.done && o.err == HTTP_CLIENT_ERR_TIMEOUT, "silent server hits the deadline: %s",
	   http_client_error_name(o.err));
	ok(o.at_ms - t0 >= 250 && o.at_ms - t0 < 2000, "after about 300 ms (%llu ms)",
	   (unsigned long long)(o.at_ms - t0));

	outcome_clear(&o);
	get_sync(cl, "https://nothing-here.invalid/", &o);
	ok(o.done && o.err == HTTP_CLIENT_ERR_DNS, "DNS failure: %s (%s)",
	   http_client_error_name(o.err), o.message);

	/* A port nobody listens on. */
	sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	fd = socket(AF_INET, SOCK_STREAM, 0);
	bind(fd, (struct sockaddr *)&sin, sizeof(sin));
	getsockname(fd, (struct sockaddr *)&sin, &slen);
	close(fd);
	outcome_clear(&o);
	snprintf(url, sizeof(url), "https://127.0.0.1:%d/", ntohs(sin.sin_port));
	get_sync(cl, url, &o);
	ok(o.done && o.err == HTTP_CLIENT_ERR_CONNECT, "connection refused: %s (%s)",
	   http_client_error_name(o.err), o.message);

	outcome_clear(&o);
	snprintf(url, sizeof(url), "https://localhost:%d/garbage", port);
	get_sync(cl, url, &o);
	ok(o.done && o.err == HTTP_CLIENT_ERR_MALFORMED, "malformed status line: %s (%s)",
	   http_client_error_name(o.err), o.message);
	outcome_clear(&o);
}

static void test_limits(struct http_client *small, int port)
{
	struct outcome o = { 0 };
	char url[256];

	snprintf(url, sizeof(url), "https://localhost:%d/big", port);
	get_sync(small, url, &o);
	ok(o.done && o.err == HTTP_CLIENT_ERR_TOO_LARGE, "Content-Length over the limit: %s (%s)",
	   http_client_error_name(o.err), o.message);

	outcome_clear(&o);
	snprintf(url, sizeof(url), "https://localhost:%d/bigchunked", port);
	get_sync(small, url, &o);
	ok(o.done && o.err == HTTP_CLIENT_ERR_TOO_LARGE, "chunked body over the limit: %s",
	   http_client_error_name(o.err));

	outcome_clear(&o);
	snprintf(url, sizeof(url), "https://localhost:%d/bighead", port);
	get_sync(small, url, &o);
	ok(o.done && o.err == HTTP_CLIENT_ERR_TOO_LARGE, "response head over the limit: %s",
	   http_client_error_name(o.err));

	outcome_clear(&o);
	snprintf(url, sizeof(url), "https://localhost:%d/hello", port);
	get_sync(small, url, &o);
	ok(o.done && o.err == HTTP_CLIENT_OK, "small responses still pass");
	outcome_clear(&o);
}

struct cancel_ctx {
	struct http_call *call;
	struct http_client *cl;
};

static void cancel_later_cb(evutil_socket_t fd, short what, void *arg)
{
	struct cancel_ctx *cc = arg;

	http_call_cancel(cc->call);
}

static void test_cancel(struct http_client *cl, int port)
{
	struct outcome a = { 0 }, b = { 0 };
	struct http_client_stats st;
	struct cancel_ctx cc = { .cl = cl };
	struct event *ev;
	struct timeval tv = { .tv_usec = 100000 };
	struct http_call *call;
	char url[256];

	snprintf(url, sizeof(url), "https://localhost:%d/hello", port);
	call = get(cl, url, &a);
	pending--;
	http_call_cancel(call);
	run_for(150);
	ok(!a.done, "cancelled before dispatch: callback never runs");

	snprintf(url, sizeof(url), "https://localhost:%d/slow", port);
	cc.call = get(cl, url, &b);
	pending--;
	ev = evtimer_new(base, cancel_later_cb, &cc);
	evtimer_add(ev, &tv);
	run_for(300);
	event_free(ev);
	ok(!b.done, "cancelled mid-exchange: callback never runs");
	http_client_stats(cl, &st);
	is_int(st.calls_in_flight, 0, "nothing in flight after cancels");
}

static void test_concurrency(struct http_client *cl, struct srv *s, int port)
{
	enum { N = 50 };
	static struct outcome o[N];
	struct http_client_stats st;
	char url[256];
	int good = 0, accepts0 = atomic_load(&s->accepts);

	snprintf(url, sizeof(url), "https://localhost:%d/delay", port);
	for (int i = 0; i < N; i++)
		(void)get(cl, url, &o[i]);
	http_client_stats(cl, &st);
	is_int(st.calls_in_flight, N, "%d calls in flight", N);
	run(10000);
	for (int i = 0; i < N; i++) {
		if (o[i].done && o[i].err == HTTP_CLIENT_OK && o[i].status == 200)
			good++;
		outcome_clear(&o[i]);
	}
	is_int(good, N, "all %d concurrent calls completed", N);
	ok(atomic_load(&s->accepts) - accepts0 <= 4, "per-host cap of 4 held (%d connections)",
	   atomic_load(&s->accepts) - accepts0);
	http_client_stats(cl, &st);
	ok(st.conns_open <= 4 && st.conns_reused >= N - 4, "stats: %llu open, %llu reused",
	   (unsigned long long)st.conns_open, (unsigned long long)st.conns_reused);
	ok(st.dns_cache_hits >= 1, "DNS cache hits counted (%llu)",
	   (unsigned long long)st.dns_cache_hits);
}

static void test_plain_http(struct http_client *cl, int port)
{
	struct outcome o = { 0 };
	char url[256];

	snprintf(url, sizeof(url), "http://127.0.0.1:%d/hello", port);
	get_sync(cl, url, &o);
	ok(o.done && o.err == HTTP_CLIENT_OK && o.status == 200, "plain http:// for emulators");
	is_str(o.body, "hello world", "plain body");
	outcome_clear(&o);
	get_sync(cl, url, &o);
	ok(o.done && o.reused, "plain connection reused");
	outcome_clear(&o);
}

int main(void)
{
	char dir[] = "/tmp/test_client.XXXXXX", ca[128], ca_other[128];
	EVP_PKEY *key = NULL, *key2 = NULL, *key3 = NULL;
	X509 *cert = NULL, *cert2 = NULL, *cert3 = NULL;
	struct srv s_main, s_other, s_plain;
	struct http_client *cl, *untrusting, *small, *capped;
	struct http_client_stats st;
	struct http_client_options opt = { 0 };
	uint64_t t0 = cs_now_ms();

	signal(SIGPIPE, SIG_IGN);
	log_set_role("test", -1);
	log_set_level(getenv("TEST_CLIENT_DEBUG") ? LOG_LVL_DEBUG : LOG_LVL_ERROR);
	base = event_base_new();

	key = EVP_EC_gen("P-256");
	key2 = EVP_EC_gen("P-256");
	key3 = EVP_EC_gen("P-256");
	cert = key ? make_cert(key, "localhost", "DNS:localhost", 1) : NULL;
	cert2 = key2 ? make_cert(key2, "other.example", "DNS:other.example", 2) : NULL;
	cert3 = key3 ? make_cert(key3, "localhost", "DNS:localhost", 3) : NULL;
	if (cert == NULL || cert2 == NULL || cert3 == NULL || mkdtemp(dir) == NULL)
		return tap_skip_all("cannot generate test certificates");
	snprintf(ca, sizeof(ca), "%s/ca.pem", dir);
	snprintf(ca_other, sizeof(ca_other), "%s/other.pem", dir);
	if (write_pem(ca, cert, "w") != 0 || write_pem(ca, cert2, "a") != 0 ||
	    write_pem(ca_other, cert3, "w") != 0)
		return tap_skip_all("cannot write CA bundles");
	if (srv_start(&s_main, cert, key) != 0 || srv_start(&s_other, cert2, key2) != 0 ||
	    srv_start(&s_plain, NULL, NULL) != 0)
		return tap_skip_all("cannot start loopback servers");

	test_url_parse();
	test_dns();

	opt.ca_file = ca;
	opt.max_conns_per_host = 4;
	cl = http_client_new(base, &opt);
	ok(cl != NULL, "client created with the test CA bundle");
	opt.ca_file = "/nonexistent/ca.pem";
	ok(http_client_new(base, &opt) == NULL, "missing CA bundle is an error");
	opt.ca_file = ca_other;
	untrusting = http_client_new(base, &opt);
	opt.ca_file = ca;
	opt.max_body_bytes = 1000;
	opt.max_header_bytes = 1024;
	small = http_client_new(base, &opt);
	opt.max_body_bytes = 0;
	opt.max_header_bytes = 0;
	capped = http_client_new(base, &opt);
	if (cl == NULL || untrusting == NULL || small == NULL || capped == NULL)
		return tap_done();

	test_invalid_requests(cl);
	test_basic(cl, &s_main, s_main.port);
	test_close_and_resume(cl, s_main.port);
	test_stale_retry(cl, s_main.port);
	test_tls_failures(cl, untrusting, s_main.port, s_other.port);
	test_failures(cl, s_main.port);
	test_limits(small, s_main.port);
	test_cancel(cl, s_main.port);
	test_concurrency(capped, &s_main, s_main.port);
	test_plain_http(cl, s_plain.port);

	http_client_stats(cl, &st);
	is_int(st.calls_in_flight, 0, "no call left in flight");
	ok(st.conns_open >= 1, "idle connections stay pooled (%llu)",
	   (unsigned long long)st.conns_open);
	{
		/* A call still queued when the client is freed never calls back. */
		struct outcome o = { 0 };
		char url[256];

		snprintf(url, sizeof(url), "https://localhost:%d/slow", s_main.port);
		(void)get(cl, url, &o);
		pending--;
		run_for(50);
		http_client_free(cl);
		run_for(20);
		ok(!o.done, "freeing the client cancels its calls silently");
	}
	http_client_free(untrusting);
	http_client_free(small);
	http_client_free(capped);
	run_for(10);
	event_base_free(base);

	srv_stop(&s_main);
	srv_stop(&s_other);
	srv_stop(&s_plain);
	unlink(ca);
	unlink(ca_other);
	rmdir(dir);
	X509_free(cert);
	X509_free(cert2);
	X509_free(cert3);
	EVP_PKEY_free(key);
	EVP_PKEY_free(key2);
	EVP_PKEY_free(key3);
	ok(cs_now_ms() - t0 < 10000, "whole run took %llu ms",
	   (unsigned long long)(cs_now_ms() - t0));
	return tap_done();
}
