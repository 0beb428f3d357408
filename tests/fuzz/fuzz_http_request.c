/*
 * fuzz_http_request.c - libFuzzer target for the request path: bytes go
 * through the real parser (src/net/parse.c) in chunks whose sizes the input
 * chooses, every complete request is routed, its query arguments and
 * parameters decoded and its body validated as JSON, and the response
 * bytes built, exactly as a connection would.
 */
#include "config.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cloudsweep/config.h"
#include "cloudsweep/http.h"
#include "cloudsweep/log.h"
#include "../../src/net/net_int.h"

static void fuzz_handler(struct http_request *req)
{
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static struct config *cfg;
	static struct router *router;
	struct http_parse ps;
	size_t off = 1, chunk;

	if (cfg == NULL) {
		char err[128];

		log_set_level(LOG_LVL_FATAL);
		cfg = config_new();
		config_set(cfg, "max_url_bytes", "512", err, sizeof(err));
		config_set(cfg, "max_header_bytes", "2048", err, sizeof(err));
		config_set(cfg, "max_headers", "20", err, sizeof(err));
		config_set(cfg, "max_body_bytes", "4096", err, sizeof(err));
		router = router_new();
		router_add_perm(router, "GET", "/api/v1/scans/{id}", fuzz_handler, 0, "scans:read");
		router_add_perm(router, "POST", "/api/v1/scans", fuzz_handler, 0, "scans:create");
		http_core_routes(router);
	}
	if (size == 0)
		return 0;
	chunk = (size_t)(data[0] % 64) + 1;
	http_parse_init(&ps, cfg, router, NULL);
	while (off < size) {
		size_t n = size - off < chunk ? size - off : chunk, used = 0;
		enum parse_result pr = http_parse_feed(&ps, (const char *)data + off, n, &used);

		if (pr == PARSE_ERROR)
			break;
		off += used;
		if (pr == PARSE_REQUEST) {
			struct http_request *req = http_parse_take(&ps);
			char allow[128], *wire;
			size_t wlen;

			if (router_match(router, req, allow, sizeof(allow)) == 0)
				(void)http_param(req, "id");
			(void)http_query_arg(req, "cursor");
			(void)http_query_arg(req, "limit");
			if (req->body_len > 0) {
				json_t *doc = http_json_body(req);

				json_decref(doc);
			}
			req->responded = false;
			wire = http_build_response(req, 200, "application/json", "{}", 2, &wlen);
			free(wire);
			http_request_free(req);
		}
	}
	http_parse_free(&ps);
	return 0;
}
