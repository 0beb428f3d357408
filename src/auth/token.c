/*
 * token.c - access tokens. libjwt signs and checks signatures; everything a
 * signature does not cover is checked here, and checked first: the header's
 * alg must be exactly the configured one before libjwt sees the token (so
 * "none", and an HS256 token forged with an RS256 public key as its HMAC
 * secret, never reach signature code), then iss, aud, exp, iat and the shape
 * of every claim the rest of the daemon relies on.
 */
#include "config.h"

#include <errno.h>
#include <string.h>

#include <jansson.h>
#include <jwt.h>
#include <openssl/evp.h>

#include "cloudsweep/auth.h"
#include "cloudsweep/log.h"

#define AUTH_TOKEN_MAX 4096 /* longer bearer strings are refused unread */

static struct {
	jwt_alg_t alg;
	const char *alg_name; /* static */
	unsigned char *sign;  /* owned secret: HS key or private PEM */
	size_t sign_len;
	unsigned char *verify; /* owned: HS key or public PEM */
	size_t verify_len;
	char *iss, *aud; /* owned */
	bool loaded;
} keys;

static unsigned char *auth_read_key(const char *path, size_t *lenp, char *err, size_t errlen)
{
	char *s = cs_read_file(path, 65536, lenp);

	if (s == NULL)
		snprintf(err, errlen, "cannot read %s: %s", path, strerror(errno));
	return (unsigned char *)s;
}

int auth_keys_load(const struct config *cfg, char *err, size_t errlen)
{
	auth_keys_free();
	keys.alg_name = strcmp(cfg->jwt_alg, "RS256") == 0   ? "RS256"
	                : strcmp(cfg->jwt_alg, "ES256") == 0 ? "ES256"
	                                                     : "HS256";
	keys.alg = jwt_str_alg(keys.alg_name);
	if (keys.alg == JWT_ALG_HS256) {
		if (cfg->jwt_secret == NULL || strlen(cfg->jwt_secret) < 32) {
			snprintf(
			    err, errlen,
			    "a JWT secret of at least 32 bytes is required (jwt_secret_file or "
			    "CLOUDSWEEP_JWT_SECRET)");
			return -1;
		}
		keys.sign = (unsigned char *)xstrdup(cfg->jwt_secret);
		keys.sign_len = strlen(cfg->jwt_secret);
		keys.verify = (unsigned char *)xstrdup(cfg->jwt_secret);
		keys.verify_len = keys.sign_len;
	} else {
		keys.sign = auth_read_key(cfg->jwt_private_key_file, &keys.sign_len, err, errlen);
		if (keys.sign == NULL)
			return -1;
		keys.verify =
		    auth_read_key(cfg->jwt_public_key_file, &keys.verify_len, err, errlen);
		if (keys.verify == NULL)
			return -1;
	}
	keys.iss = xstrdup(cfg->jwt_issuer);
	keys.aud = xstrdup(cfg->jwt_audience);
	keys.loaded = true;
	return 0;
}

void auth_keys_free(void)
{
	if (keys.sign != NULL)
		cs_wipe(keys.sign, keys.sign_len);
	if (keys.verify != NULL)
		cs_wipe(keys.verify, keys.verify_len);
	free(keys.sign);
	free(keys.verify);
	free(keys.iss);
	free(keys.aud);
	memset(&keys, 0, sizeof(keys));
}

char *auth_token_issue(const struct auth_claims *c)
{
	jwt_t *jwt = NULL;
	char *tok = NULL;

	if (!keys.loaded || jwt_new(&jwt) != 0)
		return NULL;
	if (jwt_add_grant(jwt, "iss", keys.iss) != 0 || jwt_add_grant(jwt, "aud", keys.aud) != 0 ||
	    jwt_add_grant(jwt, "sub", c->sub) != 0 || jwt_add_grant(jwt, "org", c->org) != 0 ||
	    jwt_add_grant(jwt, "role", c->role) != 0 || jwt_add_grant(jwt, "sid", c->sid) != 0 ||
	    jwt_add_grant(jwt, "jti", c->jti) != 0 || jwt_add_grant_int(jwt, "iat", c->iat) != 0 ||
	    jwt_add_grant_int(jwt, "exp", c->exp) != 0 ||
	    jwt_set_alg(jwt, keys.alg, keys.sign, (int)keys.sign_len) != 0)
		goto fail;
	tok = jwt_encode_str(jwt);
fail:
	jwt_free(jwt);
	return tok;
}

/* Decode base64url (no padding) into a NUL-terminated malloc'd string, or NULL. */
static char *auth_b64url_decode(const char *s, size_t len)
{
	size_t padded = (len + 3) / 4 * 4;
	char *tmp, *out;
	int n;

	if (len == 0 || len > AUTH_TOKEN_MAX || len % 4 == 1)
		return NULL;
	tmp = xmalloc(padded + 1);
	for (size_t i = 0; i < len; i++) {
		char ch = s[i];

		if (ch == '-')
			ch = '+';
		else if (ch == '_')
			ch = '/';
		else if (ch == '+' || ch == '/' || ch == '=')
			goto fail;
		tmp[i] = ch;
	}
	for (size_t i = len; i < padded; i++)
		tmp[i] = '=';
	tmp[padded] = '\0';
	out = xmalloc(padded / 4 * 3 + 1);
	n = EVP_DecodeBlock((unsigned char *)out, (unsigned char *)tmp, (int)padded);
	if (n < 0) {
		free(out);
		goto fail;
	}
	n -= (int)(padded - len); /* EVP_DecodeBlock counts the padding as zero bytes */
	out[n] = '\0';
	free(tmp);
	return out;
fail:
	free(tmp);
	return NULL;
}

/* The header must be a JSON object whose alg is exactly ours. */
static bool auth_header_ok(const char *tok)
{
	const char *dot = strchr(tok, '.');
	char *hdr;
	json_t *doc;
	const char *alg;
	bool ok;

	if (dot == NULL)
		return false;
	hdr = auth_b64url_decode(tok, (size_t)(dot - tok));
	if (hdr == NULL)
		return false;
	doc = json_loads(hdr, JSON_REJECT_DUPLICATES, NULL);
	free(hdr);
	alg = json_string_value(json_object_get(doc, "alg"));
	ok = json_is_object(doc) && alg != NULL && strcmp(alg, keys.alg_name) == 0 &&
	     json_object_get(doc, "crit") == NULL;
	json_decref(doc);
	return ok;
}

static int auth_copy_uuid(char dst[37], jwt_t *jwt, const char *grant)
{
	const char *v = jwt_get_grant(jwt, grant);

	if (!cs_uuid_valid(v))
		return -1;
	memcpy(dst, v, 37);
	return 0;
}

int auth_token_verify(const char *tok, time_t now, struct auth_claims *out)
{
	jwt_t *jwt = NULL;
	const char *v;
	int rc = -1;

	memset(out, 0, sizeof(*out));
	if (!keys.loaded || tok == NULL || strlen(tok) > AUTH_TOKEN_MAX || !auth_header_ok(tok))
		return -1;
	if (jwt_decode(&jwt, tok, keys.verify, (int)keys.verify_len) != 0 || jwt == NULL)
		return -1;
	if (jwt_get_alg(jwt) != keys.alg)
		goto fail;
	v = jwt_get_grant(jwt, "iss");
	if (v == NULL || strcmp(v, keys.iss) != 0)
		goto fail;
	v = jwt_get_grant(jwt, "aud");
	if (v == NULL || strcmp(v, keys.aud) != 0)
		goto fail;
	errno = 0;
	out->exp = jwt_get_grant_int(jwt, "exp");
	if (errno != 0 || out->exp <= 0 || (long long)now > out->exp + AUTH_CLOCK_SKEW_S)
		goto fail;
	errno = 0;
	out->iat = jwt_get_grant_int(jwt, "iat");
	if (errno != 0 || out->iat <= 0 || out->iat > (long long)now + AUTH_CLOCK_SKEW_S ||
	    out->iat > out->exp)
		goto fail;
	if (auth_copy_uuid(out->sub, jwt, "sub") == -1 ||
	    auth_copy_uuid(out->org, jwt, "org") == -1 ||
	    auth_copy_uuid(out->sid, jwt, "sid") == -1 ||
	    auth_copy_uuid(out->jti, jwt, "jti") == -1)
		goto fail;
	v = jwt_get_grant(jwt, "role");
	if (auth_role_parse(v) == AUTH_ROLE_NONE)
		goto fail;
	snprintf(out->role, sizeof(out->role), "%s", v);
	rc = 0;
fail:
	jwt_free(jwt);
	if (rc == -1)
		memset(out, 0, sizeof(*out));
	return rc;
}
