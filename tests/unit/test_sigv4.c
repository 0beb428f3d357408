/*
 * test_sigv4.c - TAP tests for AWS Signature Version 4 signing. Every
 * vector of AWS's published SigV4 test suite (the copy under
 * tests/data/aws-sigv4-testsuite, taken from aws-c-auth) is parsed from its
 * raw request.txt and context.json, signed, and compared byte for byte with
 * the suite's canonical request, string to sign, signature and the headers
 * of its signed request. The suite's "normalize": false vectors are signed
 * with SIGV4_NO_NORMALIZE_PATH, "sign_body" with SIGV4_CONTENT_SHA256 and
 * "omit_session_token" with SIGV4_TOKEN_UNSIGNED.
 *
 * Deliberately not checked: the suite's query-*.txt files (pre-signed URLs,
 * X-Amz-Signature in the query string), because this module only signs
 * through the Authorization header; they are not copied into the tree.
 *
 * Then the S3 GET Object example from the S3 documentation (SIGV4_S3, a
 * different secret and scope), the signing-key cache (hits, misses, LRU
 * eviction, identical signatures), and the refusal of malformed or
 * oversized input. Nothing here needs a network or a database.
 */
#include "config.h"

#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include <jansson.h>

#include "cloudsweep/aws.h"
#include "cloudsweep/log.h"
#include "cloudsweep/util.h"
#include "tap.h"

#define SUITE_DIR     SRCDIR "/tests/data/aws-sigv4-testsuite/v4"
#define SUITE_VECTORS 38 /* directories in the copied suite */
#define FILE_MAX      (1024 * 1024)

static struct sigv4_signer *signer;

/* One request.txt taken apart; pointers point into the file's text or into folded[]. */
struct vector_req {
	char *method;
	char *path;
	char *query;
	struct sigv4_header headers[SIGV4_HEADERS_MAX];
	size_t nheaders;
	char *folded[SIGV4_HEADERS_MAX]; /* owned: values joined from continuation lines */
	size_t nfolded;
	char *body;
	size_t body_len;
};

static char *read_text(const char *dir, const char *name, size_t *lenp)
{
	char path[1024];
	size_t len;
	char *s;

	snprintf(path, sizeof(path), "%s/%s", dir, name);
	s = cs_read_file(path, FILE_MAX, &len);
	if (s != NULL && lenp != NULL)
		*lenp = len;
	return s;
}

static void vector_req_free(struct vector_req *r)
{
	for (size_t i = 0; i < r->nfolded; i++)
		free(r->folded[i]);
	r->nfolded = 0;
}

/*
 * Parse a raw HTTP request, cutting text up in place: the request target
 * may hold spaces (the suite writes paths unencoded), header lines are
 * "Name:value", a line starting with a blank continues the previous value
 * (obs-fold, replaced by one space as RFC 9112 lets a recipient do), and
 * the body follows the blank line.
 */
static int parse_request(char *text, size_t len, struct vector_req *r)
{
	char *line = text, *end = text + len, *nl, *sp1, *sp2, *q;

	memset(r, 0, sizeof(*r));
	nl = strchr(line, '\n');
	if (nl == NULL)
		return -1;
	*nl = '\0';
	sp1 = strchr(line, ' ');
	sp2 = strrchr(line, ' ');
	if (sp1 == NULL || sp2 == sp1)
		return -1;
	*sp1 = *sp2 = '\0';
	r->method = line;
	r->path = sp1 + 1;
	q = strchr(r->path, '?');
	if (q != NULL) {
		*q = '\0';
		r->query = q + 1;
	}
	line = nl + 1;
	while (line < end) {
		char *colon;

		nl = memchr(line, '\n', (size_t)(end - line));
		if (nl != NULL)
			*nl = '\0';
		if (*line == '\0') {
			r->body = nl != NULL ? nl + 1 : end;
			r->body_len = (size_t)(end - r->body);
			break;
		}
		if ((*line == ' ' || *line == '\t') && r->nheaders > 0) {
			struct sigv4_header *h = &r->headers[r->nheaders - 1];

			if (r->nfolded == SIGV4_HEADERS_MAX)
				return -1;
			r->folded[r->nfolded] = xasprintf("%s %s", h->value, line);
			h->value = r->folded[r->nfolded++];
		} else {
			colon = strchr(line, ':');
			if (colon == NULL || r->nheaders == SIGV4_HEADERS_MAX)
				return -1;
			*colon = '\0';
			r->headers[r->nheaders].name = line;
			r->headers[r->nheaders++].value = colon + 1;
		}
		if (nl == NULL)
			break;
		line = nl + 1;
	}
	return 0;
}

/* The header lines a signed request added to the request, compared with what the signer added. */
static bool added_headers_match(const char *signed_req, const struct sigv4_result *res)
{
	static const char *const added[] = { "x-amz-date", "x-amz-security-token",
		                             "x-amz-content-sha256", "authorization" };
	char *copy = xstrdup(signed_req), *save = NULL, *line;
	size_t found = 0;
	bool good = true;

	for (line = strtok_r(copy, "\n", &save); line != NULL; line = strtok_r(NULL, "\n", &save)) {
		char *colon = strchr(line, ':');
		bool ours = false;

		if (colon == NULL)
			continue;
		*colon = '\0';
		for (size_t i = 0; i < CS_ARRAY_LEN(added); i++)
			if (strcasecmp(line, added[i]) == 0)
				ours = true;
		if (!ours)
			continue;
		found++;
		for (size_t i = 0; i < res->nheaders; i++) {
			if (strcasecmp(res->headers[i].name, line) == 0) {
				if (strcmp(res->headers[i].value, colon + 1) != 0) {
					printf("# %s: got '%s' want '%s'\n", line,
					       res->headers[i].value, colon + 1);
					good = false;
				}
				break;
			}
			if (i + 1 == res->nheaders)
				good = false;
		}
	}
	free(copy);
	return good && found == res->nheaders;
}

static void show_diff(const char *what, const char *got, const char *want)
{
	if (got != NULL && want != NULL && strcmp(got, want) == 0)
		return;
	printf("# %s got:\n# %s\n# %s want:\n# %s\n", what, got ? got : "(null)", what,
	       want ? want : "(null)");
}

static time_t parse_time(const char *s)
{
	struct tm tm;

	memset(&tm, 0, sizeof(tm));
	if (s == NULL || strptime(s, "%Y-%m-%dT%H:%M:%SZ", &tm) == NULL)
		return (time_t)-1;
	return timegm(&tm);
}

static void run_vector(const char *name)
{
	char dir[512], *reqtext, *ctxtext, *creq_want, *sts_want, *sig_want, *signed_want;
	char *creq = NULL, *sts = NULL;
	struct sigv4_request req = { 0 };
	struct aws_credentials cred = { 0 };
	struct sigv4_result res = { 0 };
	struct vector_req vr;
	json_t *ctx, *c;
	json_error_t jerr;
	size_t len = 0;
	int rc;

	snprintf(dir, sizeof(dir), "%s/%s", SUITE_DIR, name);
	reqtext = read_text(dir, "request.txt", &len);
	ctxtext = read_text(dir, "context.json", NULL);
	creq_want = read_text(dir, "header-canonical-request.txt", NULL);
	sts_want = read_text(dir, "header-string-to-sign.txt", NULL);
	sig_want = read_text(dir, "header-signature.txt", NULL);
	signed_want = read_text(dir, "header-signed-request.txt", NULL);
	if (reqtext == NULL || ctxtext == NULL || creq_want == NULL || sts_want == NULL ||
	    sig_want == NULL || signed_want == NULL) {
		ok(0, "%s: vector files readable", name);
		goto out;
	}
	cs_rstrip(sig_want);
	if (parse_request(reqtext, len, &vr) != 0) {
		vector_req_free(&vr);
		ok(0, "%s: request.txt parses", name);
		goto out;
	}
	ctx = json_loads(ctxtext, 0, &jerr);
	c = json_object_get(ctx, "credentials");
	cred.access_key_id = json_string_value(json_object_get(c, "access_key_id"));
	cred.secret_access_key = json_string_value(json_object_get(c, "secret_access_key"));
	cred.session_token = json_string_value(json_object_get(c, "token"));
	req.method = vr.method;
	req.path = vr.path;
	req.query = vr.query;
	req.headers = vr.headers;
	req.nheaders = vr.nheaders;
	req.payload = vr.body;
	req.payload_len = vr.body_len;
	req.region = json_string_value(json_object_get(ctx, "region"));
	req.service = json_string_value(json_object_get(ctx, "service"));
	req.now = parse_time(json_string_value(json_object_get(ctx, "timestamp")));
	if (json_is_false(json_object_get(ctx, "normalize")))
		req.flags |= SIGV4_NO_NORMALIZE_PATH;
	if (json_is_true(json_object_get(ctx, "sign_body")))
		req.flags |= SIGV4_CONTENT_SHA256;
	if (json_is_true(json_object_get(ctx, "omit_session_token")))
		req.flags |= SIGV4_TOKEN_UNSIGNED;

	rc = sigv4_canonical(signer, &cred, &req, &creq, &sts);
	show_diff("canonical request", creq, creq_want);
	is_str(creq, creq_want, "%s: canonical request", name);
	show_diff("string to sign", sts, sts_want);
	is_str(sts, sts_want, "%s: string to sign", name);
	rc |= sigv4_sign(signer, &cred, &req, &res);
	is_int(rc, 0, "%s: signs", name);
	show_diff("signature", res.signature, sig_want);
	is_str(res.signature, sig_want, "%s: signature", name);
	ok(rc == 0 && added_headers_match(signed_want, &res),
	   "%s: added headers and Authorization match the signed request", name);
	sigv4_result_clear(&res);
	json_decref(ctx);
	vector_req_free(&vr);
out:
	free(creq);
	free(sts);
	free(reqtext);
	free(ctxtext);
	free(creq_want);
	free(sts_want);
	free(sig_want);
	free(signed_want);
}

static int name_cmp(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Every vector directory, in name order so the TAP output is stable. */
static void test_suite(void)
{
	char *names[128];
	size_t n = 0;
	struct dirent *de;
	DIR *d = opendir(SUITE_DIR);

	if (d == NULL) {
		ok(0, "test suite directory %s opens", SUITE_DIR);
		return;
	}
	while ((de = readdir(d)) != NULL && n < CS_ARRAY_LEN(names))
		if (de->d_name[0] != '.')
			names[n++] = xstrdup(de->d_name);
	closedir(d);
	is_int(n, SUITE_VECTORS, "the suite holds %d vectors", SUITE_VECTORS);
	qsort(names, n, sizeof(names[0]), name_cmp);
	for (size_t i = 0; i < n; i++) {
		run_vector(names[i]);
		free(names[i]);
	}
}

/* The GET Object example of the S3 documentation ("Signature Calculations for the Authorization
 * Header: Transferring Payload in a Single Chunk"). */
static void test_s3_example(void)
{
	static const struct sigv4_header hdrs[] = {
		{ "Host", "examplebucket.s3.amazonaws.com" },
		{ "Range", "bytes=0-9" },
	};
	struct aws_credentials cred = { "AKIAIOSFODNN7EXAMPLE",
		                        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", NULL };
	struct sigv4_request req = {
		.method = "GET",
		.path = "/test.txt",
		.headers = hdrs,
		.nheaders = CS_ARRAY_LEN(hdrs),
		.region = "us-east-1",
		.service = "s3",
		.now = parse_time("2013-05-24T00:00:00Z"),
		.flags = SIGV4_S3,
	};
	struct sigv4_result res;
	char *sts = NULL;

	if (sigv4_canonical(signer, &cred, &req, NULL, &sts) != 0)
		sts = NULL;
	is_str(sts,
	       "AWS4-HMAC-SHA256\n20130524T000000Z\n20130524/us-east-1/s3/aws4_request\n"
	       "7344ae5b7ee6c3e7e6b0fe0640412a37625d1fbfff95c48bbb2dc43964946972",
	       "S3 example: string to sign");
	free(sts);
	is_int(sigv4_sign(signer, &cred, &req, &res), 0, "S3 example: signs");
	is_str(res.signature, "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41",
	       "S3 example: signature");
	is_int(res.nheaders, 3, "S3 example: X-Amz-Date, X-Amz-Content-Sha256, Authorization");
	is_str(res.headers[1].name, "X-Amz-Content-Sha256", "S3 example: content hash header");
	is_str(res.headers[1].value,
	       "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
	       "S3 example: content hash of the empty body");
	sigv4_result_clear(&res);

	/* S3 takes the path verbatim: no dot removal, no second encoding */
	req.path = "/a/./b%20c//d";
	req.payload_hash = SIGV4_UNSIGNED_PAYLOAD;
	{
		char *creq = NULL;

		if (sigv4_canonical(signer, &cred, &req, &creq, NULL) != 0)
			creq = NULL;
		ok(creq != NULL && strncmp(creq, "GET\n/a/./b%20c//d\n\n", 19) == 0,
		   "S3 path is signed verbatim");
		ok(creq != NULL && strlen(creq) > 16 &&
		       strcmp(creq + strlen(creq) - 16, SIGV4_UNSIGNED_PAYLOAD) == 0,
		   "UNSIGNED-PAYLOAD is the signed payload hash");
		ok(creq != NULL && strstr(creq, "x-amz-content-sha256:UNSIGNED-PAYLOAD\n") != NULL,
		   "and the X-Amz-Content-Sha256 value");
		free(creq);
	}
}

static const struct sigv4_header host_only[] = { { "Host", "ec2.us-east-1.amazonaws.com" } };

static struct sigv4_request basic_request(const char *region, time_t now)
{
	struct sigv4_request req = {
		.method = "POST",
		.path = "/",
		.headers = host_only,
		.nheaders = 1,
		.payload = "Action=DescribeInstances&Version=2016-11-15",
		.payload_len = 43,
		.region = region,
		.service = "ec2",
		.now = now,
	};

	return req;
}

static void test_cache(void)
{
	struct sigv4_signer *s = sigv4_signer_new(2), *fresh = sigv4_signer_new(2);
	struct aws_credentials a = { "AKIDA", "secret-a", NULL }, b = { "AKIDB", "secret-b", NULL };
	time_t day = parse_time("2024-03-01T10:00:00Z");
	struct sigv4_request req = basic_request("us-east-1", day);
	struct sigv4_result r1, r2, r3;
	struct sigv4_stats st;

	ok(s != NULL && fresh != NULL, "signers created");
	is_int(sigv4_sign(s, &a, &req, &r1), 0, "first signature");
	is_int(sigv4_sign(s, &a, &req, &r2), 0, "second signature");
	is_str(r1.signature, r2.signature, "a cached key signs identically");
	is_int(sigv4_sign(fresh, &a, &req, &r3), 0, "signature from a fresh signer");
	is_str(r1.signature, r3.signature, "the cached key equals a freshly derived one");
	sigv4_result_clear(&r3);
	sigv4_signer_stats(s, &st);
	ok(st.misses == 1 && st.hits == 1 && st.entries == 1 && st.capacity == 2,
	   "one miss then one hit (misses %llu hits %llu)", (unsigned long long)st.misses,
	   (unsigned long long)st.hits);

	/* later the same day: same key; the next day: a new one */
	req.now = day + 3600;
	is_int(sigv4_sign(s, &a, &req, &r3), 0, "later the same day");
	sigv4_result_clear(&r3);
	sigv4_signer_stats(s, &st);
	is_int(st.hits, 2, "the same day hits the cache");
	req.now = day + 86400;
	is_int(sigv4_sign(s, &a, &req, &r3), 0, "the next day");
	sigv4_result_clear(&r3);
	sigv4_signer_stats(s, &st);
	ok(st.misses == 2 && st.entries == 2, "the next day derives a new key");

	/* another secret misses, and evicts the least recently used entry (day one) */
	req.now = day;
	is_int(sigv4_sign(s, &b, &req, &r3), 0, "another secret");
	ok(strcmp(r3.signature, r1.signature) != 0, "another secret signs differently");
	sigv4_result_clear(&r3);
	sigv4_signer_stats(s, &st);
	ok(st.misses == 3 && st.evictions == 1 && st.entries == 2, "LRU eviction at capacity");
	is_int(sigv4_sign(s, &a, &req, &r3), 0, "the evicted key again");
	is_str(r3.signature, r1.signature, "a re-derived key signs identically");
	sigv4_result_clear(&r3);
	sigv4_signer_stats(s, &st);
	ok(st.misses == 4 && st.evictions == 2, "the evicted key was derived again");

	/* another region is another key */
	req = basic_request("eu-west-1", day);
	is_int(sigv4_sign(s, &a, &req, &r3), 0, "another region");
	ok(strcmp(r3.signature, r1.signature) != 0, "another region signs differently");
	sigv4_result_clear(&r3);
	sigv4_signer_stats(s, &st);
	is_int(st.misses, 5, "another region misses");

	sigv4_result_clear(&r1);
	sigv4_result_clear(&r2);
	sigv4_result_clear(&r2);
	sigv4_signer_free(s);
	sigv4_signer_free(fresh);
	sigv4_signer_free(NULL);
}

/* Sign once with one field spoiled; whether it was refused with a cleared result. */
static bool refused(const struct aws_credentials *cred, const struct sigv4_request *req)
{
	struct sigv4_result res;
	char *creq = (char *)1, *sts = (char *)1;
	int rc = sigv4_sign(signer, cred, req, &res);
	int rc2 = sigv4_canonical(signer, cred, req, &creq, &sts);
	bool cleared = res.authorization == NULL && res.nheaders == 0;

	sigv4_result_clear(&res);
	free(rc2 == 0 ? creq : NULL);
	free(rc2 == 0 ? sts : NULL);
	return rc == -1 && rc2 == -1 && cleared && creq == NULL && sts == NULL;
}

static void test_limits(void)
{
	struct aws_credentials cred = { "AKIDEXAMPLE", "secret", NULL }, bad;
	time_t now = parse_time("2024-03-01T10:00:00Z");
	struct sigv4_request req = basic_request("us-east-1", now), r;
	struct sigv4_header many[SIGV4_HEADERS_MAX + 1], two[2];
	char *big = xmalloc(SIGV4_QUERY_MAX + 2);
	struct sigv4_result res;

	is_int(sigv4_sign(signer, &cred, &req, &res), 0, "the baseline request signs");
	sigv4_result_clear(&res);

	r = req, r.method = "GE T";
	ok(refused(&cred, &r), "a method that is not a token");
	r = req, r.method = NULL;
	ok(refused(&cred, &r), "no method");
	r = req, r.path = "relative";
	ok(refused(&cred, &r), "a path without a leading slash");
	r = req, r.path = "/a\r\nX-Evil: 1";
	ok(refused(&cred, &r), "CR LF in the path");
	r = req, r.path = "/a?b";
	ok(refused(&cred, &r), "'?' in the path");
	memset(big, 'a', SIGV4_QUERY_MAX + 1);
	big[0] = '/';
	big[SIGV4_PATH_MAX + 1] = '\0';
	r = req, r.path = big;
	ok(refused(&cred, &r), "a path over SIGV4_PATH_MAX");
	big[SIGV4_PATH_MAX] = '\0';
	r = req, r.path = big;
	ok(!refused(&cred, &r), "a path of exactly SIGV4_PATH_MAX");
	memset(big, 'a', SIGV4_QUERY_MAX + 1);
	big[SIGV4_QUERY_MAX + 1] = '\0';
	r = req, r.path = "/", r.query = big;
	ok(refused(&cred, &r), "a query over SIGV4_QUERY_MAX");
	for (size_t i = 0; i < SIGV4_QUERY_MAX; i += 2)
		big[i] = 'a', big[i + 1] = '&';
	big[SIGV4_QUERY_MAX] = '\0';
	ok(refused(&cred, &r), "more than SIGV4_QUERY_PARAMS_MAX parameters");
	r.query = "a=%zz";
	ok(refused(&cred, &r), "a broken percent escape");
	r.query = "a=%4";
	ok(refused(&cred, &r), "a truncated percent escape");
	r.query = "a=1#frag";
	ok(refused(&cred, &r), "'#' in the query");

	for (size_t i = 0; i < CS_ARRAY_LEN(many); i++)
		many[i] = (struct sigv4_header){ "Host", "h" };
	r = req, r.headers = many, r.nheaders = CS_ARRAY_LEN(many);
	ok(refused(&cred, &r), "more than SIGV4_HEADERS_MAX headers");
	r.nheaders = SIGV4_HEADERS_MAX;
	ok(!refused(&cred, &r), "exactly SIGV4_HEADERS_MAX headers");
	r = req, r.headers = NULL, r.nheaders = 0;
	ok(refused(&cred, &r), "no Host header");
	two[0] = host_only[0];
	r = req, r.headers = two, r.nheaders = 2;
	two[1] = (struct sigv4_header){ "X-Test", "a\r\nInjected: 1" };
	ok(refused(&cred, &r), "CR LF in a header value");
	two[1] = (struct sigv4_header){ "X Test", "a" };
	ok(refused(&cred, &r), "a header name that is not a token");
	two[1] = (struct sigv4_header){ "X-Test", NULL };
	ok(refused(&cred, &r), "a header without a value");
	two[1] = (struct sigv4_header){ "authorization", "x" };
	ok(refused(&cred, &r), "a caller Authorization header");
	two[1] = (struct sigv4_header){ "X-AMZ-Date", "20240101T000000Z" };
	ok(refused(&cred, &r), "a caller X-Amz-Date header");
	two[1] = (struct sigv4_header){ "X-Amz-Security-Token", "t" };
	ok(refused(&cred, &r), "a caller X-Amz-Security-Token header");
	two[1] = (struct sigv4_header){ "X-Amz-Content-Sha256", "UNSIGNED-PAYLOAD" };
	ok(!refused(&cred, &r), "a caller X-Amz-Content-Sha256 header without the flag");
	r.flags = SIGV4_CONTENT_SHA256;
	ok(refused(&cred, &r), "a caller X-Amz-Content-Sha256 header with the flag");
	memset(big, 'v', SIGV4_HEADER_VALUE_MAX + 1);
	big[SIGV4_HEADER_VALUE_MAX + 1] = '\0';
	two[1] = (struct sigv4_header){ "X-Test", big };
	r.flags = 0;
	ok(refused(&cred, &r), "a header value over SIGV4_HEADER_VALUE_MAX");

	r = req, r.region = "us east";
	ok(refused(&cred, &r), "a region with a space");
	r = req, r.service = "";
	ok(refused(&cred, &r), "an empty service");
	r = req, r.region = "us-east-1/x";
	ok(refused(&cred, &r), "a region with a slash");
	r = req, r.payload = NULL;
	ok(refused(&cred, &r), "a payload length without a payload");
	r = req, r.payload_hash = "not a hash";
	ok(refused(&cred, &r), "a malformed payload hash");
	r = req, r.now = (time_t)-1;
	ok(refused(&cred, &r), "a time before 1970");
	r = req, r.now = (time_t)INT64_MAX;
	ok(refused(&cred, &r), "a time gmtime cannot represent");

	bad = cred, bad.access_key_id = "AKID/EXAMPLE";
	ok(refused(&bad, &req), "an access key id with a slash");
	bad = cred, bad.secret_access_key = "";
	ok(refused(&bad, &req), "an empty secret");
	memset(big, 's', SIGV4_SECRET_MAX + 1);
	big[SIGV4_SECRET_MAX + 1] = '\0';
	bad = cred, bad.secret_access_key = big;
	ok(refused(&bad, &req), "a secret over SIGV4_SECRET_MAX");
	bad = cred, bad.session_token = "tok\nen";
	ok(refused(&bad, &req), "a session token with a newline");
	ok(refused(NULL, &req), "no credentials");
	free(big);
}

static void test_encoding(void)
{
	char *e;

	e = sigv4_uri_encode("a b/c~d+e%", 10, true);
	is_str(e, "a%20b/c~d%2Be%25", "URI encoding keeps unreserved characters and '/'");
	free(e);
	e = sigv4_uri_encode("a/b\xe1\x88\xb4", 6, false);
	is_str(e, "a%2Fb%E1%88%B4", "URI encoding of '/' and UTF-8 in upper-case hex");
	free(e);
	ok(sigv4_uri_encode("", SIGV4_QUERY_MAX + 1, false) == NULL, "oversized input refused");
}

/* Query parameters and header values that the suite does not cover. */
static void test_canonical_details(void)
{
	static const struct sigv4_header hdrs[] = {
		{ "Host", "sts.amazonaws.com" },
		{ "X-B", "\t two \t  words\t" },
		{ "x-a", "" },
	};
	struct aws_credentials cred = { "AKIDEXAMPLE", "secret", "token" };
	struct sigv4_request req = {
		.method = "GET",
		.path = "/a/b/../c/./d/",
		.query = "b=2&a=%2b+&&a=1&c&b=1=x",
		.headers = hdrs,
		.nheaders = CS_ARRAY_LEN(hdrs),
		.region = "us-east-1",
		.service = "sts",
		.now = parse_time("2024-03-01T10:00:00Z"),
	};
	char *creq = NULL;

	if (sigv4_canonical(signer, &cred, &req, &creq, NULL) != 0)
		creq = NULL;
	is_str(creq,
	       "GET\n/a/c/d/\na=%2B%2B&a=1&b=1%3Dx&b=2&c=\n"
	       "host:sts.amazonaws.com\nx-a:\nx-amz-date:20240301T100000Z\n"
	       "x-amz-security-token:token\nx-b:two words\n\n"
	       "host;x-a;x-amz-date;x-amz-security-token;x-b\n"
	       "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
	       "query sorting and re-encoding, blank trimming, dot segments");
	free(creq);
}

int main(void)
{
	log_set_level(LOG_LVL_FATAL);
	signer = sigv4_signer_new(0);
	if (signer == NULL)
		return tap_skip_all("OpenSSL has no HMAC-SHA256");
	test_suite();
	test_s3_example();
	test_cache();
	test_limits();
	test_encoding();
	test_canonical_details();
	sigv4_signer_free(signer);
	return tap_done();
}
