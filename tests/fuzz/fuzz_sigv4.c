/*
 * fuzz_sigv4.c - libFuzzer target for SigV4 signing (src/aws/sigv4.c). The
 * input is split into a request the way a caller would describe one: a
 * first byte of flags, four bytes of signing time, then newline-separated
 * method, path, query, region, service, secret and "Name:value" header
 * lines up to an empty line, and the rest as the body. The request goes
 * through canonicalization and signing with a small key cache (so eviction
 * runs too); both must agree on accepting it, and a signature must show up
 * in the Authorization value.
 */
#include "config.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cloudsweep/aws.h"
#include "cloudsweep/log.h"
#include "cloudsweep/util.h"

#define FUZZ_FIELDS 6 /* method, path, query, region, service, secret */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Cut the next line off *p (up to end) in place; NULL when the input is used up. */
static char *next_line(char **p, char *end)
{
	char *line = *p, *nl;

	if (line >= end)
		return NULL;
	nl = memchr(line, '\n', (size_t)(end - line));
	if (nl == NULL) {
		*p = end;
		return line;
	}
	*nl = '\0';
	*p = nl + 1;
	return line;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static struct sigv4_signer *signer;
	struct sigv4_header headers[SIGV4_HEADERS_MAX + 2];
	struct aws_credentials cred = { "AKIDEXAMPLE", NULL, NULL };
	struct sigv4_request req = { 0 };
	struct sigv4_result res;
	char *buf, *p, *end, *field[FUZZ_FIELDS], *line, *creq = NULL, *sts = NULL, *enc;
	uint32_t t;
	size_t i;
	int rc_sign, rc_canon;

	if (signer == NULL) {
		log_set_level(LOG_LVL_FATAL);
		signer = sigv4_signer_new(4);
		if (signer == NULL)
			abort();
	}
	if (size < 5)
		return 0;
	/* one extra byte so the last line is always NUL-terminated */
	buf = xmalloc(size);
	memcpy(buf, data + 5, size - 5);
	buf[size - 5] = '\0';
	p = buf;
	end = buf + (size - 5);
	memcpy(&t, data + 1, sizeof(t));

	for (i = 0; i < FUZZ_FIELDS; i++)
		field[i] = next_line(&p, end);
	req.method = field[0];
	req.path = field[1];
	req.query = field[2];
	req.region = field[3] != NULL ? field[3] : "us-east-1";
	req.service = field[4] != NULL ? field[4] : "ec2";
	cred.secret_access_key = field[5] != NULL ? field[5] : "secret";
	if (data[0] & 0x10)
		cred.session_token = "FQoGZXIvYXdzEXAMPLETOKEN==";
	if (data[0] & 0x20)
		req.payload_hash = SIGV4_UNSIGNED_PAYLOAD;
	req.flags = data[0] & 0x0f;
	req.now = (time_t)t;
	/* headers until an empty line; a few more than allowed so the limit is hit too */
	while (req.nheaders < CS_ARRAY_LEN(headers) && (line = next_line(&p, end)) != NULL &&
	       *line != '\0') {
		char *colon = strchr(line, ':');

		headers[req.nheaders].name = line;
		headers[req.nheaders].value = colon != NULL ? colon + 1 : NULL;
		if (colon != NULL)
			*colon = '\0';
		req.nheaders++;
	}
	req.headers = headers;
	req.payload = p < end ? p : NULL;
	req.payload_len = p < end ? (size_t)(end - p) : 0;

	rc_canon = sigv4_canonical(signer, &cred, &req, &creq, &sts);
	rc_sign = sigv4_sign(signer, &cred, &req, &res);
	if (rc_canon != rc_sign)
		abort();
	if (rc_sign == 0) {
		if (creq == NULL || sts == NULL || res.authorization == NULL ||
		    strstr(res.authorization, res.signature) == NULL || res.nheaders < 2 ||
		    res.nheaders > SIGV4_ADD_MAX)
			abort();
	} else if (creq != NULL || sts != NULL || res.authorization != NULL) {
		abort();
	}
	sigv4_result_clear(&res);
	free(creq);
	free(sts);

	enc = sigv4_uri_encode((const char *)data, size, (data[0] & 0x40) != 0);
	if (enc == NULL && size <= SIGV4_QUERY_MAX)
		abort();
	free(enc);
	free(buf);
	return 0;
}
