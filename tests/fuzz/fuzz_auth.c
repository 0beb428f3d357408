/*
 * fuzz_auth.c - libFuzzer target for what an unauthenticated client controls
 * in authentication: the access token and the Cookie header.
 *
 * The first input byte picks how the rest is used:
 *   0  the rest is a token as sent, verified as it is;
 *   1  the rest is "<header JSON>\n<payload JSON>": both are base64url
 *      encoded and signed with the real key, so claim validation past a
 *      good signature is reached (a naive fuzzer never forges an HMAC);
 *   2  the rest is a Cookie header value, searched for cs_access and
 *      cs_csrf, and a found cs_access value is verified as a token.
 * A token that verifies must have well-formed claims.
 */
#include "config.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "cloudsweep/auth.h"
#include "cloudsweep/config.h"
#include "cloudsweep/log.h"

#define FUZZ_SECRET  "fuzz-secret-fuzz-secret-fuzz-secret-0123456789"
#define FUZZ_NOW     1790000000
#define FUZZ_MAX_TOK 16384

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void b64url(char *out, const unsigned char *in, size_t len)
{
	static const char a[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
	size_t i, o = 0;

	for (i = 0; i + 2 < len; i += 3) {
		uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8 | in[i + 2];

		out[o++] = a[v >> 18 & 63];
		out[o++] = a[v >> 12 & 63];
		out[o++] = a[v >> 6 & 63];
		out[o++] = a[v & 63];
	}
	if (len - i == 1) {
		uint32_t v = (uint32_t)in[i] << 16;

		out[o++] = a[v >> 18 & 63];
		out[o++] = a[v >> 12 & 63];
	} else if (len - i == 2) {
		uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8;

		out[o++] = a[v >> 18 & 63];
		out[o++] = a[v >> 12 & 63];
		out[o++] = a[v >> 6 & 63];
	}
	out[o] = '\0';
}

static void check_verify(const char *tok)
{
	struct auth_claims c;

	if (auth_token_verify(tok, FUZZ_NOW, &c) == 0) {
		if (strlen(c.sub) != 36 || strlen(c.org) != 36 || strlen(c.jti) != 36 ||
		    auth_role_parse(c.role) == AUTH_ROLE_NONE || c.iat > c.exp)
			abort();
	}
}

/* header "." payload, signed with HS256 under the fuzz key. */
static void check_signed(const uint8_t *data, size_t size)
{
	const uint8_t *nl = memchr(data, '\n', size);
	size_t hlen = nl != NULL ? (size_t)(nl - data) : size;
	size_t plen = nl != NULL ? size - hlen - 1 : 0;
	unsigned char mac[EVP_MAX_MD_SIZE];
	unsigned int maclen = 0;
	char *tok;
	size_t n;

	if (size > FUZZ_MAX_TOK)
		return;
	tok = malloc(2 * size + 64);
	if (tok == NULL)
		return;
	b64url(tok, data, hlen);
	n = strlen(tok);
	tok[n++] = '.';
	b64url(tok + n, nl != NULL ? nl + 1 : data, plen);
	n += strlen(tok + n);
	if (HMAC(EVP_sha256(), FUZZ_SECRET, (int)strlen(FUZZ_SECRET), (unsigned char *)tok, n, mac,
	         &maclen) != NULL) {
		tok[n++] = '.';
		b64url(tok + n, mac, maclen);
		check_verify(tok);
	}
	free(tok);
}

static void check_cookie(const char *h)
{
	size_t len;
	const char *v = auth_cookie_find(h, "cs_access", &len);

	if (v != NULL) {
		char *tok;

		if (v < h || v + len > h + strlen(h))
			abort();
		tok = strndup(v, len);
		if (tok != NULL)
			check_verify(tok);
		free(tok);
	}
	v = auth_cookie_find(h, "cs_csrf", &len);
	if (v != NULL && v + len > h + strlen(h))
		abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static bool ready;
	char *s;

	if (!ready) {
		struct config *cfg;
		char err[256];

		log_set_level(LOG_LVL_FATAL);
		cfg = config_new();
		cfg->jwt_secret = strdup(FUZZ_SECRET);
		if (auth_keys_load(cfg, err, sizeof(err)) == -1)
			abort();
		config_free(cfg); /* the keys are copies */
		ready = true;
	}
	if (size == 0)
		return 0;
	if (data[0] % 3 == 1) {
		check_signed(data + 1, size - 1);
		return 0;
	}
	s = strndup((const char *)data + 1, size - 1);
	if (s == NULL)
		return 0;
	if (data[0] % 3 == 0)
		check_verify(s);
	else
		check_cookie(s);
	free(s);
	return 0;
}
