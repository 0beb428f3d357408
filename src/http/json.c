/*
 * json.c - JSON request bodies: media type, size (already bounded by the
 * connection), nesting depth and duplicate keys are checked before a
 * handler sees the document; failures answer 400 invalid_request.
 */
#include "config.h"

#include <string.h>
#include <strings.h>

#include "cloudsweep/http.h"

#define HTTP_JSON_MAX_DEPTH 32

static int http_json_depth(json_t *v, int depth)
{
	const char *key;
	json_t *child;
	size_t i;
	int max = depth;

	if (depth > HTTP_JSON_MAX_DEPTH)
		return depth;
	if (json_is_object(v)) {
		json_object_foreach (v, key, child) {
			int d = http_json_depth(child, depth + 1);
			if (d > max)
				max = d;
		}
	} else if (json_is_array(v)) {
		json_array_foreach (v, i, child) {
			int d = http_json_depth(child, depth + 1);
			if (d > max)
				max = d;
		}
	}
	return max;
}

json_t *http_json_body(struct http_request *req)
{
	const char *ct = http_header(req, "Content-Type");
	json_error_t jerr;
	json_t *doc;

	if (ct == NULL || strncasecmp(ct, "application/json", 16) != 0 ||
	    (ct[16] != '\0' && ct[16] != ';' && ct[16] != ' ')) {
		http_error(req, 415, "unsupported_media_type",
		           "request body must be application/json");
		return NULL;
	}
	doc = json_loadb(req->body, req->body_len, JSON_REJECT_DUPLICATES, &jerr);
	if (doc == NULL) {
		http_error(req, 400, "invalid_request", "body is not valid JSON: %s at offset %d",
		           jerr.text, jerr.position);
		return NULL;
	}
	if (!json_is_object(doc)) {
		json_decref(doc);
		http_error(req, 400, "invalid_request", "body must be a JSON object");
		return NULL;
	}
	if (http_json_depth(doc, 1) > HTTP_JSON_MAX_DEPTH) {
		json_decref(doc);
		http_error(req, 400, "invalid_request", "body is nested too deeply");
		return NULL;
	}
	return doc;
}
