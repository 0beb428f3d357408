/*
 * parse.c - turns request bytes into struct http_request with llhttp,
 * enforcing the limits as the bytes arrive: target length (414), head size
 * and header count (431), body size by Content-Length or chunked (413),
 * Expect (100-continue or 417). The parser pauses at each complete message
 * so pipelined requests are handed out one at a time. It knows nothing of
 * sockets or TLS, which is what lets the fuzzer drive it directly.
 */
#include "config.h"

#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "cloudsweep/log.h"
#include "net_int.h"

void netbuf_reserve(struct netbuf *b, size_t extra)
{
	if (b->off > 0 && b->off == b->len)
		b->off = b->len = 0;
	if (b->len + extra <= b->cap)
		return;
	if (b->off > 0) {
		memmove(b->data, b->data + b->off, b->len - b->off);
		b->len -= b->off;
		b->off = 0;
		if (b->len + extra <= b->cap)
			return;
	}
	while (b->cap < b->len + extra)
		b->cap = b->cap ? b->cap * 2 : 1024;
	b->data = xrealloc(b->data, b->cap);
}

void netbuf_append(struct netbuf *b, const char *p, size_t n)
{
	if (n == 0)
		return;
	netbuf_reserve(b, n);
	memcpy(b->data + b->len, p, n);
	b->len += n;
}

void netbuf_reset(struct netbuf *b, size_t keep_cap)
{
	b->off = b->len = 0;
	if (b->cap > keep_cap) {
		free(b->data);
		b->data = NULL;
		b->cap = 0;
	}
}

void netbuf_free(struct netbuf *b)
{
	free(b->data);
	memset(b, 0, sizeof(*b));
}

static struct http_parse *parse_of(llhttp_t *p)
{
	return p->data;
}

static int parse_limit(struct http_parse *ps, int status)
{
	ps->error_status = status;
	return HPE_USER;
}

static int on_message_begin(llhttp_t *p)
{
	struct http_parse *ps = parse_of(p);

	if (ps->req == NULL)
		ps->req = http_request_new(ps->conn, ps->router);
	ps->head_bytes = 0;
	ps->in_body = false;
	netbuf_reset(&ps->url, 8192);
	netbuf_reset(&ps->body, 65536);
	return 0;
}

static int on_url(llhttp_t *p, const char *at, size_t len)
{
	struct http_parse *ps = parse_of(p);

	if (netbuf_used(&ps->url) + len > (size_t)ps->cfg->max_url_bytes)
		return parse_limit(ps, 414);
	netbuf_append(&ps->url, at, len);
	return 0;
}

static int parse_head_bytes(struct http_parse *ps, size_t len)
{
	ps->head_bytes += len;
	if (ps->head_bytes > (size_t)ps->cfg->max_header_bytes)
		return parse_limit(ps, 431);
	return 0;
}

static int on_header_field(llhttp_t *p, const char *at, size_t len)
{
	struct http_parse *ps = parse_of(p);

	if (parse_head_bytes(ps, len) != 0)
		return HPE_USER;
	netbuf_append(&ps->hname, at, len);
	return 0;
}

static int on_header_value(llhttp_t *p, const char *at, size_t len)
{
	struct http_parse *ps = parse_of(p);

	if (parse_head_bytes(ps, len) != 0)
		return HPE_USER;
	netbuf_append(&ps->hval, at, len);
	return 0;
}

/* RFC 9110 token characters: what a header name may hold. */
static bool parse_is_token(const char *s, size_t n)
{
	static const char extra[] = "!#$%&'*+-.^_`|~";

	if (n == 0)
		return false;
	for (size_t i = 0; i < n; i++) {
		unsigned char ch = (unsigned char)s[i];

		if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
		      (ch >= '0' && ch <= '9') || (ch != '\0' && strchr(extra, ch) != NULL)))
			return false;
	}
	return true;
}

static int on_header_field_complete(llhttp_t *p)
{
	struct http_parse *ps = parse_of(p);

	/* llhttp tolerates spaces in names; RFC 9112 section 5.1 says reject them. */
	if (!parse_is_token(ps->hname.data ? ps->hname.data + ps->hname.off : "",
	                    netbuf_used(&ps->hname)))
		return parse_limit(ps, 400);
	return 0;
}

static int on_header_value_complete(llhttp_t *p)
{
	struct http_parse *ps = parse_of(p);
	struct http_request *req = ps->req;
	const char *v = ps->hval.data ? ps->hval.data + ps->hval.off : "";
	size_t vlen = netbuf_used(&ps->hval);
	struct http_header *h;

	if (req->nheaders >= ps->cfg->max_headers)
		return parse_limit(ps, 431);
	if (req->nheaders == 0 ||
	    (req->nheaders >= 16 && (req->nheaders & (req->nheaders - 1)) == 0)) {
		/* grow the array in powers of two from the pool */
		size_t cap = req->nheaders == 0 ? 16 : (size_t)req->nheaders * 2;

		h = http_alloc(req, sizeof(*h) * cap);
		if (req->nheaders > 0)
			memcpy(h, req->headers, sizeof(*h) * (size_t)req->nheaders);
		req->headers = h;
	}
	while (vlen > 0 && (v[vlen - 1] == ' ' || v[vlen - 1] == '\t'))
		vlen--;
	while (vlen > 0 && (*v == ' ' || *v == '\t')) {
		v++;
		vlen--;
	}
	h = &req->headers[req->nheaders++];
	h->name = http_strndup(req, ps->hname.data ? ps->hname.data + ps->hname.off : "",
	                       netbuf_used(&ps->hname));
	h->value = http_strndup(req, v, vlen);
	netbuf_reset(&ps->hname, 1024);
	netbuf_reset(&ps->hval, 8192);
	return parse_head_bytes(ps, 4); /* ": " and CRLF */
}

static void parse_split_target(struct http_request *req)
{
	char *q = strchr(req->target, '?');

	if (q != NULL) {
		req->path = http_strndup(req, req->target, (size_t)(q - req->target));
		req->query = http_strndup(req, q + 1, strlen(q + 1));
	} else {
		req->path = req->target;
	}
}

static int on_headers_complete(llhttp_t *p)
{
	struct http_parse *ps = parse_of(p);
	struct http_request *req = ps->req;
	const char *expect;
	bool has_body;

	req->method = llhttp_method_name(p->method);
	req->target = http_strndup(req, ps->url.data ? ps->url.data + ps->url.off : "",
	                           netbuf_used(&ps->url));
	if (*req->target != '/')
		return parse_limit(ps, 400); /* absolute-form and '*' are not served here */
	parse_split_target(req);

	has_body =
	    (p->flags & F_CHUNKED) || ((p->flags & F_CONTENT_LENGTH) && p->content_length > 0);
	if ((p->flags & F_CONTENT_LENGTH) && p->content_length > (uint64_t)ps->cfg->max_body_bytes)
		return parse_limit(ps, 413);
	expect = http_header(req, "Expect");
	if (expect != NULL && has_body) {
		if (strcasecmp(expect, "100-continue") != 0)
			return parse_limit(ps, 417);
		ps->continue_due = true;
	}
	ps->in_body = has_body;
	return 0;
}

static int on_body(llhttp_t *p, const char *at, size_t len)
{
	struct http_parse *ps = parse_of(p);

	if (netbuf_used(&ps->body) + len > (size_t)ps->cfg->max_body_bytes)
		return parse_limit(ps, 413);
	netbuf_append(&ps->body, at, len);
	return 0;
}

static int on_message_complete(llhttp_t *p)
{
	struct http_parse *ps = parse_of(p);
	struct http_request *req = ps->req;

	req->keep_alive = llhttp_should_keep_alive(p);
	req->body_len = netbuf_used(&ps->body);
	req->body =
	    http_strndup(req, ps->body.data ? ps->body.data + ps->body.off : "", req->body_len);
	ps->in_body = false;
	return HPE_PAUSED;
}

static const llhttp_settings_t parse_settings = {
	.on_message_begin = on_message_begin,
	.on_url = on_url,
	.on_header_field = on_header_field,
	.on_header_value = on_header_value,
	.on_header_field_complete = on_header_field_complete,
	.on_header_value_complete = on_header_value_complete,
	.on_headers_complete = on_headers_complete,
	.on_body = on_body,
	.on_message_complete = on_message_complete,
};

void http_parse_init(struct http_parse *ps, const struct config *cfg, const struct router *router,
                     struct conn *conn)
{
	memset(ps, 0, sizeof(*ps));
	ps->cfg = cfg;
	ps->router = router;
	ps->conn = conn;
	llhttp_init(&ps->parser, HTTP_REQUEST, &parse_settings);
	ps->parser.data = ps;
}

enum parse_result http_parse_feed(struct http_parse *ps, const char *data, size_t len,
                                  size_t *consumed)
{
	llhttp_errno_t err = llhttp_execute(&ps->parser, data, len);

	if (err == HPE_OK) {
		*consumed = len;
		return PARSE_MORE;
	}
	if (err == HPE_PAUSED) {
		*consumed = (size_t)(llhttp_get_error_pos(&ps->parser) - data);
		llhttp_resume(&ps->parser);
		return PARSE_REQUEST;
	}
	*consumed = 0;
	if (ps->error_status == 0)
		ps->error_status = 400;
	return PARSE_ERROR;
}

struct http_request *http_parse_take(struct http_parse *ps)
{
	struct http_request *req = ps->req;

	ps->req = NULL;
	return req;
}

void http_parse_trim(struct http_parse *ps)
{
	if (ps->req != NULL)
		return; /* mid-message: the buffers are in use */
	netbuf_free(&ps->url);
	netbuf_free(&ps->hname);
	netbuf_free(&ps->hval);
	netbuf_free(&ps->body);
}

void http_parse_free(struct http_parse *ps)
{
	http_request_free(ps->req);
	ps->req = NULL;
	netbuf_free(&ps->url);
	netbuf_free(&ps->hname);
	netbuf_free(&ps->hval);
	netbuf_free(&ps->body);
}
