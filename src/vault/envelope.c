/*
 * envelope.c - envelope encryption of one secret field (see vault.h for the
 * blob format): seal, open, re-wrap, and reading a blob's KEK version.
 *
 * The data key is fresh per seal and only ever exists on this file's
 * stack, wiped before return; the KEK is never seen here (the ring seals
 * and opens under it). Parsing is strict and bounded before any
 * allocation: one canonical spelling per blob, so no altered byte, however
 * harmless it looks, opens. Where the field lives is bound into both GCM
 * operations through length-prefixed associated data, so ("ab", "c") and
 * ("a", "bc") differ.
 */
#include "config.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/err.h>
#include <openssl/rand.h>

#include "cloudsweep/log.h"
#include "cloudsweep/util.h"
#include "cloudsweep/vault.h"

#define VAULT_AAD_DATA "cloudsweep-vault-v1-data"
#define VAULT_AAD_KEK  "cloudsweep-vault-v1-kek"

/* Body offsets (the table in vault.h). */
#define VAULT_OFF_WRAP_NONCE 0
#define VAULT_OFF_WRAPPED    12
#define VAULT_OFF_WRAP_TAG   44
#define VAULT_OFF_DATA_NONCE 60
#define VAULT_OFF_DATA_TAG   72
#define VAULT_OFF_CIPHER     VAULT_BODY_HEADER

/* Longest associated data: the KEK label, a version, three length-prefixed strings. */
#define VAULT_AAD_MAX (sizeof(VAULT_AAD_KEK) + 4 + 3 * (4 + VAULT_BINDING_MAX))

/* Associated data for one field: the secret's and the data key's. */
struct vault_aad {
	unsigned char data[VAULT_AAD_MAX];
	size_t datalen;
	unsigned char kek[VAULT_AAD_MAX];
	size_t keklen;
};

/* A parsed blob. */
struct vault_blob {
	int version;
	unsigned char *body; /* owned */
	size_t bodylen;
};

/* ---- base64 ---- */

static int vault_b64_value(unsigned char c)
{
	if (c >= 'A' && c <= 'Z')
		return c - 'A';
	if (c >= 'a' && c <= 'z')
		return c - 'a' + 26;
	if (c >= '0' && c <= '9')
		return c - '0' + 52;
	if (c == '+')
		return 62;
	if (c == '/')
		return 63;
	return -1;
}

/* Canonical padded base64: the alphabet, '=' only at the end, unused bits zero. */
int vault_b64_decode(const char *s, size_t len, unsigned char *out, size_t cap)
{
	size_t pad = 0;
	int last, n;

	if (len == 0 || len % 4 != 0 || len > INT32_MAX || cap < len / 4 * 3)
		return -1;
	if (s[len - 1] == '=')
		pad = s[len - 2] == '=' ? 2 : 1;
	for (size_t i = 0; i < len - pad; i++)
		if (vault_b64_value((unsigned char)s[i]) == -1)
			return -1;
	/* The bits below the last full byte must be zero, or several spellings decode alike. */
	last = vault_b64_value((unsigned char)s[len - pad - 1]);
	if ((pad == 1 && (last & 0x3) != 0) || (pad == 2 && (last & 0xf) != 0))
		return -1;
	n = EVP_DecodeBlock(out, (const unsigned char *)s, (int)len);
	if (n < 0 || (size_t)n < pad)
		return -1;
	return n - (int)pad;
}

/* Padded base64 into out. */
void vault_b64_encode(const unsigned char *in, size_t len, char *out)
{
	EVP_EncodeBlock((unsigned char *)out, in, (int)len);
}

/* ---- binding and parsing ---- */

static void vault_put_u32(unsigned char *p, uint32_t v)
{
	p[0] = (unsigned char)(v >> 24);
	p[1] = (unsigned char)(v >> 16);
	p[2] = (unsigned char)(v >> 8);
	p[3] = (unsigned char)v;
}

/* Append a length-prefixed string; -1 when missing, empty or too long. */
static int vault_put_str(unsigned char *buf, size_t *len, const char *s)
{
	size_t n;

	if (s == NULL || (n = strnlen(s, VAULT_BINDING_MAX + 1)) == 0 || n > VAULT_BINDING_MAX)
		return -1;
	vault_put_u32(buf + *len, (uint32_t)n);
	memcpy(buf + *len + 4, s, n);
	*len += 4 + n;
	return 0;
}

/* Build both associated data strings for a field and a KEK version; 0 or -1 (bad binding). */
static int vault_aad_build(struct vault_aad *a, const char *org_id, const char *record_id,
                           const char *field, int version)
{
	size_t b = 0;
	unsigned char bind[3 * (4 + VAULT_BINDING_MAX)];

	if (vault_put_str(bind, &b, org_id) == -1 || vault_put_str(bind, &b, record_id) == -1 ||
	    vault_put_str(bind, &b, field) == -1)
		return -1;
	a->datalen = sizeof(VAULT_AAD_DATA) - 1;
	memcpy(a->data, VAULT_AAD_DATA, a->datalen);
	memcpy(a->data + a->datalen, bind, b);
	a->datalen += b;
	a->keklen = sizeof(VAULT_AAD_KEK) - 1;
	memcpy(a->kek, VAULT_AAD_KEK, a->keklen);
	vault_put_u32(a->kek + a->keklen, (uint32_t)version);
	a->keklen += 4;
	memcpy(a->kek + a->keklen, bind, b);
	a->keklen += b;
	return 0;
}

/* Replace the KEK version in already built associated data. */
static void vault_aad_set_version(struct vault_aad *a, int version)
{
	vault_put_u32(a->kek + sizeof(VAULT_AAD_KEK) - 1, (uint32_t)version);
}

/*
 * The version named by "v1:<version>:" at the start of blob, and in *rest
 * what follows the second colon; -1 when that is not how blob starts.
 */
static int vault_blob_header(const char *blob, const char **rest)
{
	const char *p, *colon;
	int v = 0;

	if (blob == NULL || strncmp(blob, VAULT_BLOB_PREFIX, strlen(VAULT_BLOB_PREFIX)) != 0)
		return -1;
	p = blob + strlen(VAULT_BLOB_PREFIX);
	for (colon = p; *colon >= '0' && *colon <= '9' && colon - p < 8; colon++)
		v = v * 10 + (*colon - '0');
	if (*colon != ':' || colon == p || colon - p > 7 || *p == '0' || v > VAULT_KEK_VERSION_MAX)
		return -1;
	*rest = colon + 1;
	return v;
}

/* Parse a blob into b (b->body owned by the caller on success); reason set on failure. */
static int vault_blob_parse(const char *blob, struct vault_blob *b, const char **reason)
{
	const char *rest;
	size_t len;
	int n;

	b->body = NULL;
	if (blob == NULL || strnlen(blob, VAULT_BLOB_MAX + 1) > VAULT_BLOB_MAX) {
		*reason = blob == NULL ? "no blob" : "blob too long";
		return -1;
	}
	if ((b->version = vault_blob_header(blob, &rest)) == -1) {
		*reason = "not a version-1 blob";
		return -1;
	}
	len = strlen(rest);
	if (len < 4 * ((VAULT_BODY_HEADER + 2) / 3) || len % 4 != 0) {
		*reason = "truncated blob";
		return -1;
	}
	b->body = xmalloc(len / 4 * 3);
	n = vault_b64_decode(rest, len, b->body, len / 4 * 3);
	if (n < VAULT_BODY_HEADER || n - VAULT_BODY_HEADER > VAULT_PLAINTEXT_MAX) {
		*reason = n < 0 ? "malformed blob" : "truncated blob";
		free(b->body);
		b->body = NULL;
		return -1;
	}
	b->bodylen = (size_t)n;
	return 0;
}

/* "v1:<version>:<base64 body>" as a fresh string. */
static char *vault_blob_format(int version, const unsigned char *body, size_t len)
{
	size_t b64 = 4 * ((len + 2) / 3);
	char *out = xmalloc(strlen(VAULT_BLOB_PREFIX) + 8 + b64 + 1);
	int n;

	n = sprintf(out, VAULT_BLOB_PREFIX "%d:", version);
	vault_b64_encode(body, len, out + n);
	return out;
}

/* ---- the public operations ---- */

/* Seal one field. */
char *vault_seal(struct vault_keyring *kr, const char *org_id, const char *record_id,
                 const char *field, const void *plaintext, size_t len)
{
	unsigned char dk[VAULT_KEY_LEN], *body = NULL;
	struct vault_aad aad;
	char *blob = NULL;
	int version;

	if (kr == NULL || (plaintext == NULL && len > 0) || len > VAULT_PLAINTEXT_MAX) {
		log_warnx("vault_seal_failed", "bad arguments");
		return NULL;
	}
	version = vault_keyring_current_version(kr);
	if (vault_aad_build(&aad, org_id, record_id, field, version) == -1) {
		log_warnx("vault_seal_failed", "org id, record id and field must be 1 to %d bytes",
		          VAULT_BINDING_MAX);
		return NULL;
	}
	body = xmalloc(VAULT_BODY_HEADER + len);
	if (RAND_priv_bytes(dk, sizeof(dk)) != 1 ||
	    RAND_bytes(body + VAULT_OFF_WRAP_NONCE, VAULT_NONCE_LEN) != 1 ||
	    RAND_bytes(body + VAULT_OFF_DATA_NONCE, VAULT_NONCE_LEN) != 1) {
		log_warnx("vault_seal_failed", "no random bytes");
		ERR_clear_error();
		goto fail;
	}
	if (vault_keyring_gcm_seal(kr, dk, body + VAULT_OFF_DATA_NONCE, aad.data, aad.datalen,
	                           plaintext, len, body + VAULT_OFF_CIPHER,
	                           body + VAULT_OFF_DATA_TAG) == -1 ||
	    vault_keyring_kek_seal(kr, version, body + VAULT_OFF_WRAP_NONCE, aad.kek, aad.keklen,
	                           dk, VAULT_KEY_LEN, body + VAULT_OFF_WRAPPED,
	                           body + VAULT_OFF_WRAP_TAG) == -1) {
		log_warnx("vault_seal_failed", "encryption failed");
		goto fail;
	}
	blob = vault_blob_format(version, body, VAULT_BODY_HEADER + len);
fail:
	cs_wipe(dk, sizeof(dk));
	free(body);
	return blob;
}

/*
 * Parse a blob and unwrap its data key into dk; on failure *reason says
 * why (never with data). b->body is the caller's on success.
 */
static int vault_unwrap(struct vault_keyring *kr, const char *org_id, const char *record_id,
                        const char *field, const char *blob, struct vault_blob *b,
                        struct vault_aad *aad, unsigned char dk[VAULT_KEY_LEN], const char **reason)
{
	if (vault_blob_parse(blob, b, reason) == -1)
		return -1;
	if (vault_aad_build(aad, org_id, record_id, field, b->version) == -1) {
		*reason = "bad org id, record id or field";
		goto fail;
	}
	if (!vault_keyring_has_version(kr, b->version)) {
		*reason = "unknown or retired key-encryption key version";
		goto fail;
	}
	if (vault_keyring_kek_open(kr, b->version, b->body + VAULT_OFF_WRAP_NONCE, aad->kek,
	                           aad->keklen, b->body + VAULT_OFF_WRAPPED, VAULT_KEY_LEN, dk,
	                           b->body + VAULT_OFF_WRAP_TAG) == -1) {
		*reason = "data key does not authenticate (altered, or sealed for another field)";
		goto fail;
	}
	return 0;
fail:
	free(b->body);
	b->body = NULL;
	return -1;
}

/* Log a refused blob: who it was for and why, never its content. */
static void vault_refused(const char *event, const char *org_id, const char *record_id,
                          const char *field, int version, const char *reason)
{
	bool ids = org_id != NULL && record_id != NULL && field != NULL &&
	           strnlen(org_id, VAULT_BINDING_MAX + 1) <= VAULT_BINDING_MAX &&
	           strnlen(record_id, VAULT_BINDING_MAX + 1) <= VAULT_BINDING_MAX &&
	           strnlen(field, VAULT_BINDING_MAX + 1) <= VAULT_BINDING_MAX;

	if (ids)
		log_warnx(event, "org %s record %s field %s (key version %d): %s", org_id,
		          record_id, field, version, reason);
	else
		log_warnx(event, "%s", reason);
}

/* Open one field. */
int vault_open(struct vault_keyring *kr, const char *org_id, const char *record_id,
               const char *field, const char *blob, unsigned char **out, size_t *outlen)
{
	unsigned char dk[VAULT_KEY_LEN], *pt = NULL;
	const char *reason = "bad arguments";
	struct vault_blob b = { 0 };
	struct vault_aad aad;
	size_t n;
	int rc = -1;

	if (out == NULL || outlen == NULL)
		return -1;
	*out = NULL;
	*outlen = 0;
	if (kr == NULL)
		goto fail;
	if (vault_unwrap(kr, org_id, record_id, field, blob, &b, &aad, dk, &reason) == -1)
		goto fail;
	n = b.bodylen - VAULT_BODY_HEADER;
	pt = xmalloc(n + 1);
	if (vault_keyring_gcm_open(kr, dk, b.body + VAULT_OFF_DATA_NONCE, aad.data, aad.datalen,
	                           b.body + VAULT_OFF_CIPHER, n, pt,
	                           b.body + VAULT_OFF_DATA_TAG) == -1) {
		reason = "secret does not authenticate (altered, or sealed for another field)";
		free(pt); /* already wiped by the failed open */
		goto fail;
	}
	pt[n] = '\0';
	*out = pt;
	*outlen = n;
	rc = 0;
fail:
	if (rc == -1)
		vault_refused("vault_open_failed", org_id, record_id, field,
		              vault_blob_kek_version(blob), reason);
	cs_wipe(dk, sizeof(dk));
	free(b.body);
	return rc;
}

/* Move a blob's data key to the current KEK. */
char *vault_rewrap(struct vault_keyring *kr, const char *org_id, const char *record_id,
                   const char *field, const char *blob)
{
	unsigned char dk[VAULT_KEY_LEN];
	const char *reason = "bad arguments";
	struct vault_blob b = { 0 };
	struct vault_aad aad;
	char *nblob = NULL;
	int version;

	if (kr == NULL)
		goto fail;
	if (vault_unwrap(kr, org_id, record_id, field, blob, &b, &aad, dk, &reason) == -1)
		goto fail;
	version = vault_keyring_current_version(kr);
	vault_aad_set_version(&aad, version);
	if (RAND_bytes(b.body + VAULT_OFF_WRAP_NONCE, VAULT_NONCE_LEN) != 1) {
		reason = "no random bytes";
		ERR_clear_error();
		goto fail;
	}
	if (vault_keyring_kek_seal(kr, version, b.body + VAULT_OFF_WRAP_NONCE, aad.kek, aad.keklen,
	                           dk, VAULT_KEY_LEN, b.body + VAULT_OFF_WRAPPED,
	                           b.body + VAULT_OFF_WRAP_TAG) == -1) {
		reason = "encryption failed";
		goto fail;
	}
	nblob = vault_blob_format(version, b.body, b.bodylen);
fail:
	if (nblob == NULL)
		vault_refused("vault_rewrap_failed", org_id, record_id, field,
		              vault_blob_kek_version(blob), reason);
	cs_wipe(dk, sizeof(dk));
	free(b.body);
	return nblob;
}

/* The version in a blob's prefix. */
int vault_blob_kek_version(const char *blob)
{
	const char *rest;

	return vault_blob_header(blob, &rest);
}

/* Wipe and free a plaintext from vault_open. */
void vault_secret_free(unsigned char *secret, size_t len)
{
	if (secret == NULL)
		return;
	cs_wipe(secret, len);
	free(secret);
}
