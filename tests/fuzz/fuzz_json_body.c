/*
 * fuzz_json_body.c - libFuzzer target for JSON request bodies: the input is
 * the body of a POST that goes through the real parser, the body checks
 * every handler relies on (media type, JSON, duplicate keys, nesting, an
 * object at the top) and then the field validation of the identity
 * handlers (bounded strings, email normalization, password policy), the
 * way a signup or login would run it.
 */
#include "config.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cloudsweep/authcrypto.h"
#include "cloudsweep/config.h"
#include "cloudsweep/http.h"
#include "cloudsweep/log.h"
#include "../../src/auth/auth_int.h"
#include "../../src/net/net_int.h"

#define FUZZ_BODY_MAX 65536

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void fuzz_handler(struct http_request *req)
{
}

/* The identity handlers' field checks, stopping at the first answer. */
static void check_fields(struct http_request *req, json_t *body)
{
	const char *email, *pw, *why;
	char norm[256];

	email = auth_body_str(req, body, "email", 254, true);
	if (email == NULL)
		return;
	if (auth_email_normalize(email, norm, sizeof(norm)) == 0 && strlen(norm) >= sizeof(norm))
		abort();
	pw = auth_body_str(req, body, "password", PASSWORD_MAX_BYTES, true);
	if (pw == NULL)
		return;
	(void)password_policy_check(pw, strlen(pw), norm, &why);
	(void)auth_body_str(req, body, "org_name", 255, false);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static struct config *cfg;
	static struct router *router;
	struct http_parse ps;
	char head[256];
	enum parse_result pr;
	size_t used = 0;
	int hlen;

	if (cfg == NULL) {
		char err[128];

		log_set_level(LOG_LVL_FATAL);
		cfg = config_new();
		config_set(cfg, "max_body_bytes", "65536", err, sizeof(err));
		router = router_new();
		router_add_perm(router, "POST", "/api/v1/auth/signup", fuzz_handler, ROUTE_PUBLIC,
		                NULL);
	}
	if (size > FUZZ_BODY_MAX)
		return 0;
	hlen = snprintf(head, sizeof(head),
	                "POST /api/v1/auth/signup HTTP/1.1\r\nHost: x\r\n"
	                "Content-Type: application/json\r\nContent-Length: %zu\r\n\r\n",
	                size);
	http_parse_init(&ps, cfg, router, NULL);
	pr = http_parse_feed(&ps, head, (size_t)hlen, &used);
	if (pr == PARSE_MORE && size > 0)
		pr = http_parse_feed(&ps, (const char *)data, size, &used);
	if (pr == PARSE_REQUEST) {
		struct http_request *req = http_parse_take(&ps);
		json_t *body = http_json_body(req);

		if (body != NULL) {
			check_fields(req, body);
			auth_body_free(body);
		}
		http_request_free(req);
	}
	http_parse_free(&ps);
	return 0;
}
