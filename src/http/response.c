/*
 * response.c - the request object and its pool, and the one way out of a
 * request: http_respond() builds status line, headers and body in a single
 * buffer, records metrics and the access-log line, and hands the bytes to
 * the connection. http_error() writes the API's error shape through it.
 */
#include "config.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "cloudsweep/http.h"
#include "cloudsweep/log.h"
#include "cloudsweep/net.h"
#include "cloudsweep/worker.h"

#define HTTP_POOL_CHUNK 4096

struct http_pool_chunk {
	struct http_pool_chunk *next;
	size_t used, cap;
	max_align_t data[];
};

void *http_alloc(struct http_request *req, size_t n)
{
	struct http_pool_chunk *ch = req->pool;
	const size_t align = sizeof(max_align_t);
	void *p;

	n = (n + align - 1) & ~(align - 1);
	if (ch == NULL || ch->cap - ch->used < n) {
		size_t cap = n > HTTP_POOL_CHUNK ? n : HTTP_POOL_CHUNK;

		ch = xmalloc(sizeof(*ch) + cap);
		ch->used = 0;
		ch->cap = cap;
		if (n > HTTP_POOL_CHUNK / 2 && req->pool != NULL) {
			/* A big block goes behind the current chunk, which keeps filling. */
			ch->next = req->pool->next;
			req->pool->next = ch;
		} else {
			ch->next = req->pool;
			req->pool = ch;
		}
	}
	p = (char *)ch->data + ch->used;
	ch->used += n;
	return p;
}

char *http_strndup(struct http_request *req, const char *s, size_t len)
{
	char *p = http_alloc(req, len + 1);

	memcpy(p, s, len);
	p[len] = '\0';
	return p;
}

struct http_request *http_request_new(struct conn *conn, const struct router *router)
{
	struct http_request *req = xcalloc(1, sizeof(*req));

	req->conn = conn;
	req->router = router;
	req->start_us = cs_now_us();
	req->keep_alive = true;
	return req;
}

void http_request_free(struct http_request *req)
{
	struct http_pool_chunk *ch, *next;

	if (req == NULL)
		return;
	for (ch = req->pool; ch != NULL; ch = next) {
		next = ch->next;
		free(ch);
	}
	free(req);
}

const char *http_header(const struct http_request *req, const char *name)
{
	for (int i = 0; i < req->nheaders; i++)
		if (strcasecmp(req->headers[i].name, name) == 0)
			return req->headers[i].value;
	return NULL;
}

static int http_hexval(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

char *http_pct_decode(struct http_request *req, const char *s, size_t len, bool form)
{
	char *out = http_alloc(req, len + 1), *o = out;

	for (size_t i = 0; i < len; i++) {
		if (s[i] == '%') {
			int hi, lo;

			if (i + 2 >= len)
				return NULL;
			hi = http_hexval(s[i + 1]);
			lo = http_hexval(s[i + 2]);
			if (hi < 0 || lo < 0)
				return NULL;
			if (hi == 0 && lo == 0)
				return NULL; /* no NUL bytes inside strings */
			*o++ = (char)(hi << 4 | lo);
			i += 2;
		} else if (form && s[i] == '+') {
			*o++ = ' ';
		} else {
			*o++ = s[i];
		}
	}
	*o = '\0';
	return out;
}

const char *http_query_arg(struct http_request *req, const char *name)
{
	const char *p = req->query;
	size_t nlen = strlen(name);

	while (p != NULL && *p != '\0') {
		const char *amp = strchr(p, '&');
		size_t plen = amp ? (size_t)(amp - p) : strlen(p);

		if (plen >= nlen && strncmp(p, name, nlen) == 0 &&
		    (plen == nlen || p[nlen] == '=')) {
			if (plen == nlen)
				return "";
			return http_pct_decode(req, p + nlen + 1, plen - nlen - 1, true);
		}
		p = amp ? amp + 1 : NULL;
	}
	return NULL;
}

void http_set_cancel(struct http_request *req, http_cancel_fn fn, void *arg)
{
	req->cancel = fn;
	req->cancel_arg = arg;
}

void http_add_header(struct http_request *req, const char *name, const char *value)
{
	size_t n = strlen(name) + strlen(value) + 4;
	char *buf;

	if (strpbrk(name, "\r\n:") != NULL || strpbrk(value, "\r\n") != NULL) {
		log_warnx("bad_header", "refusing a response header with CR/LF");
		return;
	}
	buf = http_alloc(req, req->resp_headers_len + n + 1);
	if (req->resp_headers_len > 0)
		memcpy(buf, req->resp_headers, req->resp_headers_len);
	snprintf(buf + req->resp_headers_len, n + 1, "%s: %s\r\n", name, value);
	req->resp_headers = buf;
	req->resp_headers_len += n;
}

const char *http_reason(int status)
{
	switch (status) {
	case 100:
		return "Continue";
	case 200:
		return "OK";
	case 201:
		return "Created";
	case 202:
		return "Accepted";
	case 204:
		return "No Content";
	case 302:
		return "Found";
	case 304:
		return "Not Modified";
	case 400:
		return "Bad Request";
	case 401:
		return "Unauthorized";
	case 403:
		return "Forbidden";
	case 404:
		return "Not Found";
	case 405:
		return "Method Not Allowed";
	case 408:
		return "Request Timeout";
	case 409:
		return "Conflict";
	case 410:
		return "Gone";
	case 413:
		return "Content Too Large";
	case 414:
		return "URI Too Long";
	case 415:
		return "Unsupported Media Type";
	case 417:
		return "Expectation Failed";
	case 422:
		return "Unprocessable Content";
	case 429:
		return "Too Many Requests";
	case 431:
		return "Request Header Fields Too Large";
	case 500:
		return "Internal Server Error";
	case 502:
		return "Bad Gateway";
	case 503:
		return "Service Unavailable";
	case 504:
		return "Gateway Timeout";
	default:
		return "Unknown";
	}
}

/* The Date header value, formatted once per second. */
static const char *http_date(void)
{
	static char buf[40];
	static time_t last;
	time_t now = time(NULL);
	struct tm tm;

	if (now != last) {
		gmtime_r(&now, &tm);
		strftime(buf, sizeof(buf), "%a, %d %b %Y %H:%M:%S GMT", &tm);
		last = now;
	}
	return buf;
}

char *http_build_response(struct http_request *req, int status, const char *content_type,
                          const char *body, size_t len, size_t *lenp)
{
	static const char security_headers[] =
	    "X-Content-Type-Options: nosniff\r\n"
	    "X-Frame-Options: DENY\r\n"
	    "Strict-Transport-Security: max-age=31536000; includeSubDomains\r\n"
	    "Content-Security-Policy: default-src 'self'\r\n"
	    "Referrer-Policy: strict-origin-when-cross-origin\r\n"
	    "Cache-Control: no-store\r\n";
	bool close = !req->keep_alive || (req->conn != NULL && conn_draining(req->conn));
	bool head = req->method != NULL && strcmp(req->method, "HEAD") == 0;
	size_t cap = 512 + sizeof(security_headers) + req->resp_headers_len + len;
	char *buf = xmalloc(cap);
	int n;

	n = snprintf(buf, cap,
	             "HTTP/1.1 %d %s\r\n"
	             "Date: %s\r\n"
	             "Content-Length: %zu\r\n"
	             "%s%s%s"
	             "Connection: %s\r\n"
	             "X-Request-Id: %s\r\n"
	             "%s",
	             status, http_reason(status), http_date(), len,
	             content_type ? "Content-Type: " : "", content_type ? content_type : "",
	             content_type ? "\r\n" : "", close ? "close" : "keep-alive", req->request_id,
	             security_headers);
	if (req->resp_headers_len > 0) {
		memcpy(buf + n, req->resp_headers, req->resp_headers_len);
		n += (int)req->resp_headers_len;
	}
	memcpy(buf + n, "\r\n", 2);
	n += 2;
	if (!head && len > 0) {
		memcpy(buf + n, body, len);
		n += (int)len;
	}
	if (close)
		req->keep_alive = false;
	*lenp = (size_t)n;
	return buf;
}

/* One access-log line: no query string, no header values, no body. */
static void http_access_log(struct http_request *req, int status, size_t bytes, uint64_t dur_us)
{
	json_t *f;

	if (log_get_level() > LOG_LVL_INFO)
		return;
	f = json_object();
	json_object_set_new(f, "request_id", json_string(req->request_id));
	json_object_set_new(f, "ip", json_string(req->client_ip));
	json_object_set_new(f, "method", json_string(req->method ? req->method : "-"));
	json_object_set_new(f, "path", json_string(req->path ? req->path : "-"));
	if (json_object_get(f, "path") == NULL) /* not UTF-8 */
		json_object_set_new(f, "path", json_string("(invalid utf-8)"));
	if (req->route != NULL)
		json_object_set_new(f, "route", json_string(req->route->pattern));
	json_object_set_new(f, "status", json_integer(status));
	json_object_set_new(f, "bytes", json_integer((json_int_t)bytes));
	json_object_set_new(f, "duration_ms", json_real((double)dur_us / 1000.0));
	log_fields(LOG_LVL_INFO, "access", f);
}

void http_respond(struct http_request *req, int status, const char *content_type, const char *body,
                  size_t len)
{
	uint64_t dur_us;
	size_t n;
	char *wire;

	if (req->responded) {
		log_warnx("double_response", "request %s answered twice", req->request_id);
		return;
	}
	req->responded = true;
	req->status = status;
	if (req->request_id[0] == '\0')
		cs_uuid4(req->request_id);
	wire = http_build_response(req, status, content_type, body, len, &n);
	dur_us = cs_now_us() - req->start_us;
	if (cs_worker != NULL)
		metrics_request(cs_worker->slot, req->route ? req->route->index : 0, status,
		                dur_us);
	http_access_log(req, status, len, dur_us);
	if (req->conn != NULL)
		conn_send_response(req->conn, req, wire, n, status);
	free(wire);
}

void http_respond_json(struct http_request *req, int status, json_t *doc)
{
	char *body = json_dumps(doc, JSON_COMPACT);

	json_decref(doc);
	if (body == NULL) {
		http_respond(req, 500, "application/json",
		             "{\"error\":{\"code\":\"internal\",\"message\":\"cannot encode\"}}",
		             55);
		return;
	}
	http_respond(req, status, "application/json", body, strlen(body));
	free(body);
}

void http_error(struct http_request *req, int status, const char *code, const char *fmt, ...)
{
	char msg[512];
	va_list ap;
	json_t *doc;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (req->request_id[0] == '\0')
		cs_uuid4(req->request_id);
	doc = json_pack("{s:{s:s,s:s},s:s}", "error", "code", code, "message", msg, "request_id",
	                req->request_id);
	if (doc == NULL) /* msg was not UTF-8 */
		doc = json_pack("{s:{s:s,s:s},s:s}", "error", "code", code, "message",
		                http_reason(status), "request_id", req->request_id);
	if (status == 503)
		http_add_header(req, "Retry-After", "2");
	http_respond_json(req, status, doc);
}
