/*
 * test_http.c - router (literal and parameter segments, 404 vs 405 with
 * Allow), percent-decoding, query arguments, the request pool, the wire
 * form of responses (security headers, request id, one buffer) and JSON
 * body validation.
 */
#include "config.h"

#include <stdlib.h>
#include <string.h>

#include "cloudsweep/http.h"
#include "tap.h"

static int handled;

static void h_ok(struct http_request *req)
{
	handled++;
}

static struct http_request *mkreq(const struct router *r, const char *method, const char *path)
{
	struct http_request *req = http_request_new(NULL, r);

	req->method = method;
	req->path = http_strndup(req, path, strlen(path));
	return req;
}

int main(void)
{
	struct router *r = router_new();
	struct http_request *req;
	char allow[128], *wire;
	size_t n;
	json_t *doc;
	int names;

	router_add(r, "GET", "/health", h_ok, 0);
	router_add_perm(r, "GET", "/api/v1/scans/{id}", h_ok, 0, "scans:read");
	router_add_perm(r, "DELETE", "/api/v1/scans/{id}", h_ok, 0, "scans:create");
	router_add_perm(r, "POST", "/api/v1/org/members/{user_id}/role", h_ok, 0, "members:manage");

	req = mkreq(r, "GET", "/api/v1/scans/abc%2Fdef");
	is_int(router_match(r, req, allow, sizeof(allow)), 0, "parameter route matches");
	is_str(http_param(req, "id"), "abc/def", "parameter percent-decoded");
	ok(http_param(req, "i") == NULL && http_param(req, "idx") == NULL, "param names exact");
	http_request_free(req);

	req = mkreq(r, "PUT", "/api/v1/scans/1");
	is_int(router_match(r, req, allow, sizeof(allow)), 405, "wrong method is 405");
	is_str(allow, "GET, DELETE", "Allow lists the methods");
	http_request_free(req);

	req = mkreq(r, "GET", "/api/v1/scans/1/extra");
	is_int(router_match(r, req, allow, sizeof(allow)), 404, "extra segment is 404");
	http_request_free(req);
	req = mkreq(r, "GET", "/api/v1/scans/");
	is_int(router_match(r, req, allow, sizeof(allow)), 404, "empty parameter is 404");
	http_request_free(req);
	req = mkreq(r, "GET", "/api/v1/scans/%zz");
	is_int(router_match(r, req, allow, sizeof(allow)), 404, "bad escape is 404");
	http_request_free(req);
	req = mkreq(r, "GET", "/api/v1/scans/a%00b");
	is_int(router_match(r, req, allow, sizeof(allow)), 404, "NUL escape is refused");
	http_request_free(req);
	req = mkreq(r, "HEAD", "/health");
	is_int(router_match(r, req, allow, sizeof(allow)), 0, "HEAD matches GET");
	http_request_free(req);
	req = mkreq(r, "POST", "/api/v1/org/members/u1/role");
	ok(router_match(r, req, allow, sizeof(allow)) == 0 &&
	       strcmp(http_param(req, "user_id"), "u1") == 0,
	   "parameter in the middle");
	http_request_free(req);
	ok(router_route_names(r, &names)[0] != NULL && names == 5, "route names for metrics");

	req = mkreq(r, "GET", "/x");
	req->query = http_strndup(req, "a=1&b=x%20y+z&flag&c=%zz", 24);
	is_str(http_query_arg(req, "b"), "x y z", "query arg decoded");
	is_str(http_query_arg(req, "flag"), "", "flag without value");
	ok(http_query_arg(req, "c") == NULL, "malformed query value is NULL");
	ok(http_query_arg(req, "zz") == NULL, "absent arg is NULL");
	for (int i = 0; i < 1000; i++)
		memset(http_alloc(req, 100), 0xab, 100);
	ok(1, "pool grows across chunks");

	strcpy(req->request_id, "req-1");
	http_add_header(req, "Retry-After", "2");
	http_add_header(req, "Bad", "x\r\nInjected: 1");
	wire = http_build_response(req, 503, "application/json", "{}", 2, &n);
	ok(strncmp(wire, "HTTP/1.1 503 Service Unavailable\r\n", 34) == 0, "status line");
	ok(memmem(wire, n, "X-Request-Id: req-1\r\n", 21) != NULL, "request id header");
	ok(memmem(wire, n, "Strict-Transport-Security: max-age=31536000; includeSubDomains\r\n",
	          64) != NULL,
	   "HSTS");
	ok(memmem(wire, n, "X-Content-Type-Options: nosniff", 31) &&
	       memmem(wire, n, "X-Frame-Options: DENY", 21) &&
	       memmem(wire, n, "Content-Security-Policy: default-src 'self'", 43) &&
	       memmem(wire, n, "Referrer-Policy: strict-origin-when-cross-origin", 48),
	   "security headers");
	ok(memmem(wire, n, "Retry-After: 2\r\n", 16) != NULL, "extra header");
	ok(memmem(wire, n, "Injected", 8) == NULL, "CRLF in a header value is refused");
	ok(memmem(wire, n, "Content-Length: 2\r\n", 19) && n > 2 &&
	       memcmp(wire + n - 6, "\r\n\r\n{}", 6) == 0,
	   "length and body");
	free(wire);
	http_request_free(req);

	req = mkreq(r, "POST", "/x");
	req->headers = http_alloc(req, sizeof(struct http_header));
	req->nheaders = 1;
	req->headers[0].name = "content-type";
	req->headers[0].value = "application/json; charset=utf-8";
	req->body = "{\"a\": [1, {\"b\": null}]}";
	req->body_len = strlen(req->body);
	doc = http_json_body(req);
	ok(doc != NULL && json_is_array(json_object_get(doc, "a")), "JSON object body");
	json_decref(doc);
	http_request_free(req);

	{
		static const char *bad[] = { "{\"a\":1,\"a\":2}", "[1,2]", "{\"a\":", "nul" };

		for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
			req = mkreq(r, "POST", "/x");
			req->headers = http_alloc(req, sizeof(struct http_header));
			req->nheaders = 1;
			req->headers[0].name = "Content-Type";
			req->headers[0].value = "application/json";
			req->body = (char *)bad[i];
			req->body_len = strlen(bad[i]);
			ok(http_json_body(req) == NULL && req->status == 400,
			   "bad body %zu refused", i);
			http_request_free(req);
		}
	}
	{
		char deep[200];

		memset(deep, '[', 100);
		memset(deep + 100, ']', 100);
		req = mkreq(r, "POST", "/x");
		req->headers = http_alloc(req, sizeof(struct http_header));
		req->nheaders = 1;
		req->headers[0].name = "Content-Type";
		req->headers[0].value = "application/json";
		req->body = http_alloc(req, 210);
		sprintf(req->body, "{\"a\":%.*s}", 200, deep);
		req->body_len = strlen(req->body);
		ok(http_json_body(req) == NULL && req->status == 400, "deep nesting refused");
		http_request_free(req);
	}
	router_free(r);
	is_int(handled, 0, "no handler ran during matching");
	return tap_done();
}
