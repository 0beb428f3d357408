/*
 * sigv4.c - AWS Signature Version 4 (see aws.h for the contract).
 *
 * Signing is four steps: the canonical request (method, canonical URI,
 * canonical query, canonical headers, signed header list, payload hash),
 * the string to sign over its SHA-256, the signing key derived from the
 * secret through the date, region and service, and the HMAC of the string
 * to sign under that key. Every input is checked against the limits in
 * aws.h before anything is allocated for it, so a hostile or broken caller
 * gets -1 rather than unbounded memory use.
 *
 * The HMAC and digest contexts are created once per signer and re-keyed per
 * use. Deriving a signing key costs four HMACs, and a scan signs thousands
 * of requests per account, region and service a day, so derived keys are
 * cached per (secret, date, region, service). The secret itself is never
 * stored: entries are found by an HMAC of it under a random per-signer key,
 * so the cache holds nothing that could be tested against a guessed secret
 * outside this process, and derived keys are wiped on eviction and free.
 */
#include "config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/params.h>

#include "cloudsweep/aws.h"
#include "cloudsweep/log.h"
#include "cloudsweep/util.h"

#define SIGV4_SHA256_LEN 32
#define SIGV4_DATE_LEN   8 /* YYYYMMDD */
#define SIGV4_TERMINATOR "aws4_request"

/* One derived signing key and what it was derived for. */
struct sigv4_cache_entry {
	unsigned char id[SIGV4_SHA256_LEN]; /* HMAC of the secret under the signer's id_key */
	char date[SIGV4_DATE_LEN + 1];      /* YYYYMMDD */
	char region[SIGV4_SCOPE_PART_MAX + 1];
	char service[SIGV4_SCOPE_PART_MAX + 1];
	unsigned char key[SIGV4_SHA256_LEN]; /* the signing key; wiped when the entry goes */
	uint64_t used;                       /* LRU clock of the last use; 0: slot free */
};

struct sigv4_signer {
	EVP_MAC *mac;                           /* owned: HMAC */
	EVP_MAC_CTX *hmac;                      /* owned: SHA-256 set once, re-keyed per use */
	EVP_MD *sha256;                         /* owned */
	EVP_MD_CTX *md;                         /* owned: re-initialised per hash */
	unsigned char id_key[SIGV4_SHA256_LEN]; /* random; keys the cache ids */
	struct sigv4_cache_entry *cache;        /* owned: capacity entries */
	size_t capacity;
	uint64_t clock; /* LRU clock, bumped per use */
	struct sigv4_stats stats;
};

/* A growing string; every caller bounds its input first. */
struct sigv4_buf {
	char *p; /* owned, NUL-terminated once anything was added */
	size_t len;
	size_t cap;
};

/* A caller or signer header on its way into the canonical form. */
struct sigv4_hdr {
	const char *name; /* borrowed; compared and written in lower case */
	size_t name_len;
	const char *value; /* borrowed; trimmed and blank runs collapsed when written */
	size_t order;      /* position in the request, to keep repeated values in order */
};

/* One query parameter, both halves already URI-encoded. */
struct sigv4_param {
	char *name;  /* owned */
	char *value; /* owned */
};

/* Everything the canonical request and string to sign are made of. */
struct sigv4_canon {
	char amz_date[SIGV4_AMZ_DATE_LEN + 1];
	char date[SIGV4_DATE_LEN + 1];
	char payload_hash[SIGV4_HASH_HEX_LEN + 1];
	struct sigv4_buf creq;           /* the canonical request */
	struct sigv4_buf signed_headers; /* "host;x-amz-date" */
	struct sigv4_buf sts;            /* the string to sign */
};

/* ---- small helpers ---- */

static void buf_add(struct sigv4_buf *b, const char *s, size_t n)
{
	if (b->len + n + 1 > b->cap) {
		size_t cap = b->cap ? b->cap : 256;

		while (cap < b->len + n + 1)
			cap *= 2;
		b->p = xrealloc(b->p, cap);
		b->cap = cap;
	}
	memcpy(b->p + b->len, s, n);
	b->len += n;
	b->p[b->len] = '\0';
}

static void buf_adds(struct sigv4_buf *b, const char *s)
{
	buf_add(b, s, strlen(s));
}

static void buf_addc(struct sigv4_buf *b, char c)
{
	buf_add(b, &c, 1);
}

/* Hand the string over to the caller (an empty string when nothing was added). */
static char *buf_take(struct sigv4_buf *b)
{
	char *p = b->p != NULL ? b->p : xstrdup("");

	b->p = NULL;
	b->len = b->cap = 0;
	return p;
}

static void buf_free(struct sigv4_buf *b)
{
	free(b->p);
	b->p = NULL;
	b->len = b->cap = 0;
}

static bool is_unreserved(unsigned char c)
{
	return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
	       c == '-' || c == '.' || c == '_' || c == '~';
}

/* RFC 9110 token characters, which header names and methods are made of. */
static bool is_tchar(unsigned char c)
{
	return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
	       (c != '\0' && strchr("!#$%&'*+-.^_`|~", c) != NULL);
}

static bool is_blank(char c)
{
	return c == ' ' || c == '\t';
}

/* A non-empty token of at most max bytes. */
static bool valid_token(const char *s, size_t max)
{
	size_t n;

	if (s == NULL)
		return false;
	for (n = 0; s[n] != '\0'; n++)
		if (n >= max || !is_tchar((unsigned char)s[n]))
			return false;
	return n > 0;
}

/* A non-empty string of at most max bytes made of the characters in set or alphanumerics. */
static bool valid_word(const char *s, size_t max, const char *set)
{
	size_t n;

	if (s == NULL)
		return false;
	for (n = 0; s[n] != '\0'; n++) {
		unsigned char c = (unsigned char)s[n];

		if (n >= max || !((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
		                  (c >= '0' && c <= '9') || strchr(set, c) != NULL))
			return false;
	}
	return n > 0;
}

/* At most max bytes with no control character but HTAB; *lenp gets the length. */
static bool valid_text(const char *s, size_t max, size_t *lenp)
{
	size_t n;

	for (n = 0; s[n] != '\0'; n++) {
		unsigned char c = (unsigned char)s[n];

		if (n >= max || (c < 0x20 && c != '\t') || c == 0x7f)
			return false;
	}
	*lenp = n;
	return true;
}

static void uri_encode_into(struct sigv4_buf *b, const char *in, size_t len, bool keep_slash)
{
	static const char hex[] = "0123456789ABCDEF";
	size_t i;

	for (i = 0; i < len; i++) {
		unsigned char c = (unsigned char)in[i];

		if (is_unreserved(c) || (keep_slash && c == '/')) {
			buf_addc(b, (char)c);
		} else {
			char esc[3] = { '%', hex[c >> 4], hex[c & 15] };

			buf_add(b, esc, 3);
		}
	}
}

static int hexval(unsigned char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

/* Percent-decode len bytes of in into out (room for len bytes); -1 on a broken escape. */
static int pct_decode(const char *in, size_t len, char *out, size_t *outlen)
{
	size_t i, o = 0;

	for (i = 0; i < len; i++) {
		if (in[i] == '%') {
			int hi, lo;

			if (i + 2 >= len)
				return -1;
			hi = hexval((unsigned char)in[i + 1]);
			lo = hexval((unsigned char)in[i + 2]);
			if (hi < 0 || lo < 0)
				return -1;
			out[o++] = (char)(hi << 4 | lo);
			i += 2;
		} else {
			out[o++] = in[i];
		}
	}
	*outlen = o;
	return 0;
}

char *sigv4_uri_encode(const char *in, size_t len, bool keep_slash)
{
	struct sigv4_buf b = { 0 };

	if (in == NULL || len > SIGV4_QUERY_MAX)
		return NULL;
	uri_encode_into(&b, in, len, keep_slash);
	return buf_take(&b);
}

/* ---- OpenSSL primitives ---- */

static int sigv4_hmac(struct sigv4_signer *s, const unsigned char *key, size_t keylen,
                      const void *data, size_t len, unsigned char out[SIGV4_SHA256_LEN])
{
	size_t outlen = 0;

	if (EVP_MAC_init(s->hmac, key, keylen, NULL) != 1 ||
	    EVP_MAC_update(s->hmac, data, len) != 1 ||
	    EVP_MAC_final(s->hmac, out, &outlen, SIGV4_SHA256_LEN) != 1 ||
	    outlen != SIGV4_SHA256_LEN) {
		log_warnx("sigv4_crypto", "HMAC-SHA256 failed");
		return -1;
	}
	return 0;
}

/* Lowercase hex SHA-256 of len bytes of data into hex (SIGV4_HASH_HEX_LEN + 1 bytes). */
static int sigv4_sha256_hex(struct sigv4_signer *s, const void *data, size_t len, char *hex)
{
	unsigned char md[EVP_MAX_MD_SIZE];
	unsigned int mdlen = 0;

	if (EVP_DigestInit_ex(s->md, s->sha256, NULL) != 1 ||
	    (len > 0 && EVP_DigestUpdate(s->md, data, len) != 1) ||
	    EVP_DigestFinal_ex(s->md, md, &mdlen) != 1 || mdlen != SIGV4_SHA256_LEN) {
		log_warnx("sigv4_crypto", "SHA-256 failed");
		return -1;
	}
	cs_hex(hex, md, SIGV4_SHA256_LEN);
	return 0;
}

/* ---- the signer and its key cache ---- */

struct sigv4_signer *sigv4_signer_new(size_t cache_entries)
{
	struct sigv4_signer *s = xcalloc(1, sizeof(*s));
	OSSL_PARAM params[2];

	if (cache_entries == 0)
		cache_entries = SIGV4_CACHE_DEFAULT;
	if (cache_entries > SIGV4_CACHE_MAX)
		cache_entries = SIGV4_CACHE_MAX;
	s->capacity = cache_entries;
	s->cache = xcalloc(s->capacity, sizeof(*s->cache));
	s->stats.capacity = s->capacity;
	cs_random(s->id_key, sizeof(s->id_key));

	params[0] = OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, (char *)"SHA256", 0);
	params[1] = OSSL_PARAM_construct_end();
	if ((s->mac = EVP_MAC_fetch(NULL, "HMAC", NULL)) == NULL ||
	    (s->hmac = EVP_MAC_CTX_new(s->mac)) == NULL ||
	    EVP_MAC_CTX_set_params(s->hmac, params) != 1 ||
	    (s->sha256 = EVP_MD_fetch(NULL, "SHA256", NULL)) == NULL ||
	    (s->md = EVP_MD_CTX_new()) == NULL) {
		log_warnx("sigv4_init", "OpenSSL cannot provide HMAC-SHA256");
		sigv4_signer_free(s);
		return NULL;
	}
	return s;
}

void sigv4_signer_free(struct sigv4_signer *s)
{
	if (s == NULL)
		return;
	if (s->cache != NULL) {
		OPENSSL_cleanse(s->cache, s->capacity * sizeof(*s->cache));
		free(s->cache);
	}
	OPENSSL_cleanse(s->id_key, sizeof(s->id_key));
	EVP_MAC_CTX_free(s->hmac);
	EVP_MAC_free(s->mac);
	EVP_MD_CTX_free(s->md);
	EVP_MD_free(s->sha256);
	free(s);
}

void sigv4_signer_stats(const struct sigv4_signer *s, struct sigv4_stats *st)
{
	*st = s->stats;
}

/* Derive the signing key from scratch: four chained HMACs, intermediates wiped. */
static int sigv4_derive_key(struct sigv4_signer *s, const char *secret, const char *date,
                            const char *region, const char *service,
                            unsigned char key[SIGV4_SHA256_LEN])
{
	unsigned char ksecret[4 + SIGV4_SECRET_MAX], k1[SIGV4_SHA256_LEN], k2[SIGV4_SHA256_LEN],
	    k3[SIGV4_SHA256_LEN];
	size_t slen = strlen(secret);
	int rc = -1;

	memcpy(ksecret, "AWS4", 4);
	memcpy(ksecret + 4, secret, slen);
	if (sigv4_hmac(s, ksecret, 4 + slen, date, strlen(date), k1) == 0 &&
	    sigv4_hmac(s, k1, sizeof(k1), region, strlen(region), k2) == 0 &&
	    sigv4_hmac(s, k2, sizeof(k2), service, strlen(service), k3) == 0 &&
	    sigv4_hmac(s, k3, sizeof(k3), SIGV4_TERMINATOR, strlen(SIGV4_TERMINATOR), key) == 0)
		rc = 0;
	OPENSSL_cleanse(ksecret, sizeof(ksecret));
	OPENSSL_cleanse(k1, sizeof(k1));
	OPENSSL_cleanse(k2, sizeof(k2));
	OPENSSL_cleanse(k3, sizeof(k3));
	return rc;
}

/* The signing key for (secret, date, region, service), from the cache or derived into it. */
static int sigv4_signing_key(struct sigv4_signer *s, const char *secret, const char *date,
                             const char *region, const char *service,
                             unsigned char key[SIGV4_SHA256_LEN])
{
	unsigned char id[SIGV4_SHA256_LEN];
	struct sigv4_cache_entry *e, *slot = NULL;
	size_t i;

	if (sigv4_hmac(s, s->id_key, sizeof(s->id_key), secret, strlen(secret), id) != 0)
		return -1;
	for (i = 0; i < s->capacity; i++) {
		e = &s->cache[i];
		if (e->used == 0) {
			if (slot == NULL || slot->used != 0)
				slot = e;
			continue;
		}
		if (CRYPTO_memcmp(e->id, id, sizeof(id)) == 0 && strcmp(e->date, date) == 0 &&
		    strcmp(e->region, region) == 0 && strcmp(e->service, service) == 0) {
			e->used = ++s->clock;
			memcpy(key, e->key, SIGV4_SHA256_LEN);
			s->stats.hits++;
			return 0;
		}
		if (slot == NULL || (slot->used != 0 && e->used < slot->used))
			slot = e;
	}
	if (sigv4_derive_key(s, secret, date, region, service, key) != 0)
		return -1;
	s->stats.misses++;
	if (slot->used != 0) {
		s->stats.evictions++;
		s->stats.entries--;
	}
	OPENSSL_cleanse(slot, sizeof(*slot));
	memcpy(slot->id, id, sizeof(id));
	memcpy(slot->date, date, SIGV4_DATE_LEN + 1);
	memcpy(slot->region, region, strlen(region) + 1);
	memcpy(slot->service, service, strlen(service) + 1);
	memcpy(slot->key, key, SIGV4_SHA256_LEN);
	slot->used = ++s->clock;
	s->stats.entries++;
	return 0;
}

/* ---- canonical request ---- */

/* Remove "." and ".." segments and empty segments, keeping a trailing slash. */
static void sigv4_normalize_path(const char *path, size_t len, struct sigv4_buf *out)
{
	size_t *starts, *lens, nseg = 0, i = 1, maxseg = 1;
	bool trailing = false;

	for (size_t k = 0; k < len; k++)
		if (path[k] == '/')
			maxseg++;
	starts = xcalloc(maxseg, sizeof(*starts));
	lens = xcalloc(maxseg, sizeof(*lens));
	while (i <= len) {
		size_t j = i;

		while (j < len && path[j] != '/')
			j++;
		if (j == i || (j - i == 1 && path[i] == '.')) {
			trailing = true;
		} else if (j - i == 2 && path[i] == '.' && path[i + 1] == '.') {
			if (nseg > 0)
				nseg--;
			trailing = true;
		} else {
			starts[nseg] = i;
			lens[nseg++] = j - i;
			trailing = false;
		}
		i = j + 1;
	}
	buf_addc(out, '/');
	for (i = 0; i < nseg; i++) {
		if (i > 0)
			buf_addc(out, '/');
		buf_add(out, path + starts[i], lens[i]);
	}
	if (trailing && nseg > 0)
		buf_addc(out, '/');
	free(starts);
	free(lens);
}

static int sigv4_add_path(const struct sigv4_request *req, struct sigv4_buf *creq)
{
	struct sigv4_buf norm = { 0 };
	const char *path = req->path;
	size_t len;

	if (path == NULL || path[0] != '/' || !valid_text(path, SIGV4_PATH_MAX, &len) ||
	    strpbrk(path, "?#\t") != NULL)
		return -1;
	if (!(req->flags & SIGV4_NO_NORMALIZE_PATH)) {
		sigv4_normalize_path(path, len, &norm);
		path = norm.p;
		len = norm.len;
	}
	if (req->flags & SIGV4_NO_DOUBLE_ENCODE)
		buf_add(creq, path, len);
	else
		uri_encode_into(creq, path, len, true);
	buf_addc(creq, '\n');
	buf_free(&norm);
	return 0;
}

static int param_cmp(const void *a, const void *b)
{
	const struct sigv4_param *x = a, *y = b;
	int c = strcmp(x->name, y->name);

	return c != 0 ? c : strcmp(x->value, y->value);
}

static int sigv4_add_query(const struct sigv4_request *req, struct sigv4_buf *creq)
{
	struct sigv4_param *params = NULL;
	const char *q = req->query != NULL ? req->query : "";
	size_t qlen, np = 0, i = 0;
	char *scratch = NULL;
	int rc = -1;

	if (!valid_text(q, SIGV4_QUERY_MAX, &qlen) || strpbrk(q, "#\t") != NULL)
		return -1;
	if (qlen > 0) {
		params = xcalloc(SIGV4_QUERY_PARAMS_MAX, sizeof(*params));
		scratch = xmalloc(qlen + 1);
	}
	while (i < qlen) {
		size_t end = i, eq, dlen;
		struct sigv4_buf enc = { 0 };
		char *name;

		while (end < qlen && q[end] != '&')
			end++;
		if (end == i) {
			i = end + 1;
			continue;
		}
		if (np == SIGV4_QUERY_PARAMS_MAX)
			goto fail;
		for (eq = i; eq < end && q[eq] != '='; eq++)
			;
		if (pct_decode(q + i, eq - i, scratch, &dlen) != 0)
			goto fail;
		uri_encode_into(&enc, scratch, dlen, false);
		name = buf_take(&enc);
		if (eq < end)
			eq++;
		if (pct_decode(q + eq, end - eq, scratch, &dlen) != 0) {
			free(name);
			goto fail;
		}
		uri_encode_into(&enc, scratch, dlen, false);
		params[np].name = name;
		params[np++].value = buf_take(&enc);
		i = end + 1;
	}
	if (np > 0)
		qsort(params, np, sizeof(*params), param_cmp);
	for (i = 0; i < np; i++) {
		if (i > 0)
			buf_addc(creq, '&');
		buf_adds(creq, params[i].name);
		buf_addc(creq, '=');
		buf_adds(creq, params[i].value);
	}
	buf_addc(creq, '\n');
	rc = 0;
fail:
	for (i = 0; i < np; i++) {
		free(params[i].name);
		free(params[i].value);
	}
	free(params);
	free(scratch);
	return rc;
}

static int hdr_cmp(const void *a, const void *b)
{
	const struct sigv4_hdr *x = a, *y = b;
	size_t n = x->name_len < y->name_len ? x->name_len : y->name_len, i;

	for (i = 0; i < n; i++) {
		int cx = (unsigned char)x->name[i], cy = (unsigned char)y->name[i];

		cx = (cx >= 'A' && cx <= 'Z') ? cx + 32 : cx;
		cy = (cy >= 'A' && cy <= 'Z') ? cy + 32 : cy;
		if (cx != cy)
			return cx - cy;
	}
	if (x->name_len != y->name_len)
		return x->name_len < y->name_len ? -1 : 1;
	return x->order < y->order ? -1 : x->order > y->order;
}

static bool hdr_same_name(const struct sigv4_hdr *x, const struct sigv4_hdr *y)
{
	return x->name_len == y->name_len && strncasecmp(x->name, y->name, x->name_len) == 0;
}

static void buf_add_lower(struct sigv4_buf *b, const char *s, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		char c = s[i];

		buf_addc(b, (c >= 'A' && c <= 'Z') ? (char)(c + 32) : c);
	}
}

/* The value with surrounding blanks trimmed and inner runs of blanks as one space. */
static void buf_add_trimmed(struct sigv4_buf *b, const char *v)
{
	bool pending = false, any = false;

	for (; *v != '\0'; v++) {
		if (is_blank(*v)) {
			pending = true;
			continue;
		}
		if (pending && any)
			buf_addc(b, ' ');
		buf_addc(b, *v);
		pending = false;
		any = true;
	}
}

static int sigv4_add_headers(const struct aws_credentials *cred, const struct sigv4_request *req,
                             struct sigv4_canon *c)
{
	struct sigv4_hdr *h;
	size_t n = 0, i, len;
	bool host = false;

	if (req->nheaders > SIGV4_HEADERS_MAX || (req->nheaders > 0 && req->headers == NULL))
		return -1;
	h = xcalloc(req->nheaders + SIGV4_ADD_MAX, sizeof(*h));
	for (i = 0; i < req->nheaders; i++) {
		const char *name = req->headers[i].name, *value = req->headers[i].value;

		if (!valid_token(name, SIGV4_HEADER_NAME_MAX) || value == NULL ||
		    !valid_text(value, SIGV4_HEADER_VALUE_MAX, &len))
			goto fail;
		if (strcasecmp(name, "authorization") == 0 || strcasecmp(name, "x-amz-date") == 0 ||
		    strcasecmp(name, "x-amz-security-token") == 0 ||
		    ((req->flags & SIGV4_CONTENT_SHA256) &&
		     strcasecmp(name, "x-amz-content-sha256") == 0))
			goto fail;
		if (strcasecmp(name, "host") == 0)
			host = true;
		h[n++] = (struct sigv4_hdr){ name, strlen(name), value, i };
	}
	if (!host)
		goto fail;
	h[n++] = (struct sigv4_hdr){ "x-amz-date", 10, c->amz_date, i++ };
	if (cred->session_token != NULL && !(req->flags & SIGV4_TOKEN_UNSIGNED))
		h[n++] = (struct sigv4_hdr){ "x-amz-security-token", 20, cred->session_token, i++ };
	if (req->flags & SIGV4_CONTENT_SHA256)
		h[n++] = (struct sigv4_hdr){ "x-amz-content-sha256", 20, c->payload_hash, i++ };
	qsort(h, n, sizeof(*h), hdr_cmp);
	for (i = 0; i < n; i++) {
		if (i > 0 && hdr_same_name(&h[i - 1], &h[i])) {
			buf_addc(&c->creq, ',');
		} else {
			if (i > 0) {
				buf_addc(&c->creq, '\n');
				buf_addc(&c->signed_headers, ';');
			}
			buf_add_lower(&c->creq, h[i].name, h[i].name_len);
			buf_addc(&c->creq, ':');
			buf_add_lower(&c->signed_headers, h[i].name, h[i].name_len);
		}
		buf_add_trimmed(&c->creq, h[i].value);
	}
	buf_adds(&c->creq, "\n\n");
	buf_add(&c->creq, c->signed_headers.p, c->signed_headers.len);
	buf_addc(&c->creq, '\n');
	free(h);
	return 0;
fail:
	free(h);
	return -1;
}

static void sigv4_canon_free(struct sigv4_canon *c)
{
	buf_free(&c->creq);
	buf_free(&c->signed_headers);
	buf_free(&c->sts);
}

/* Check everything that is not canonicalized piecewise, then build the canonical request and the
 * string to sign into c. */
static int sigv4_build(struct sigv4_signer *s, const struct aws_credentials *cred,
                       const struct sigv4_request *req, struct sigv4_canon *c)
{
	char hash[SIGV4_HASH_HEX_LEN + 1];
	struct tm tm;
	size_t len;

	memset(c, 0, sizeof(*c));
	if (s == NULL || cred == NULL || req == NULL ||
	    !valid_word(cred->access_key_id, SIGV4_KEY_ID_MAX, "") ||
	    cred->secret_access_key == NULL ||
	    !valid_text(cred->secret_access_key, SIGV4_SECRET_MAX, &len) || len == 0 ||
	    (cred->session_token != NULL &&
	     (!valid_text(cred->session_token, SIGV4_TOKEN_MAX, &len) || len == 0)) ||
	    !valid_token(req->method, SIGV4_METHOD_MAX) ||
	    !valid_word(req->region, SIGV4_SCOPE_PART_MAX, "-") ||
	    !valid_word(req->service, SIGV4_SCOPE_PART_MAX, "-_.") ||
	    (req->payload == NULL && req->payload_len > 0) ||
	    (req->payload_hash != NULL && !valid_word(req->payload_hash, SIGV4_HASH_HEX_LEN, "-")))
		return -1;
	if (gmtime_r(&req->now, &tm) == NULL || tm.tm_year < 70 || tm.tm_year > 9999 - 1900 ||
	    strftime(c->amz_date, sizeof(c->amz_date), "%Y%m%dT%H%M%SZ", &tm) != SIGV4_AMZ_DATE_LEN)
		return -1;
	memcpy(c->date, c->amz_date, SIGV4_DATE_LEN);
	c->date[SIGV4_DATE_LEN] = '\0';
	if (req->payload_hash != NULL)
		snprintf(c->payload_hash, sizeof(c->payload_hash), "%s", req->payload_hash);
	else if (sigv4_sha256_hex(s, req->payload, req->payload_len, c->payload_hash) != 0)
		return -1;

	buf_adds(&c->creq, req->method);
	buf_addc(&c->creq, '\n');
	if (sigv4_add_path(req, &c->creq) != 0 || sigv4_add_query(req, &c->creq) != 0 ||
	    sigv4_add_headers(cred, req, c) != 0)
		goto fail;
	buf_adds(&c->creq, c->payload_hash);

	if (sigv4_sha256_hex(s, c->creq.p, c->creq.len, hash) != 0)
		goto fail;
	buf_adds(&c->sts, SIGV4_ALGORITHM "\n");
	buf_adds(&c->sts, c->amz_date);
	buf_addc(&c->sts, '\n');
	buf_adds(&c->sts, c->date);
	buf_addc(&c->sts, '/');
	buf_adds(&c->sts, req->region);
	buf_addc(&c->sts, '/');
	buf_adds(&c->sts, req->service);
	buf_adds(&c->sts, "/" SIGV4_TERMINATOR "\n");
	buf_adds(&c->sts, hash);
	return 0;
fail:
	sigv4_canon_free(c);
	return -1;
}

/* ---- public entry points ---- */

int sigv4_canonical(struct sigv4_signer *s, const struct aws_credentials *cred,
                    const struct sigv4_request *req, char **creqp, char **stsp)
{
	struct sigv4_canon c;

	if (creqp != NULL)
		*creqp = NULL;
	if (stsp != NULL)
		*stsp = NULL;
	if (sigv4_build(s, cred, req, &c) != 0)
		return -1;
	if (creqp != NULL)
		*creqp = buf_take(&c.creq);
	if (stsp != NULL)
		*stsp = buf_take(&c.sts);
	sigv4_canon_free(&c);
	return 0;
}

int sigv4_sign(struct sigv4_signer *s, const struct aws_credentials *cred,
               const struct sigv4_request *req, struct sigv4_result *out)
{
	unsigned char key[SIGV4_SHA256_LEN], sig[SIGV4_SHA256_LEN];
	struct sigv4_buf auth = { 0 };
	struct sigv4_canon c;

	memset(out, 0, sizeof(*out));
	if (sigv4_build(s, cred, req, &c) != 0)
		return -1;
	if (sigv4_signing_key(s, cred->secret_access_key, c.date, req->region, req->service, key) !=
	        0 ||
	    sigv4_hmac(s, key, sizeof(key), c.sts.p, c.sts.len, sig) != 0) {
		OPENSSL_cleanse(key, sizeof(key));
		sigv4_canon_free(&c);
		return -1;
	}
	OPENSSL_cleanse(key, sizeof(key));
	cs_hex(out->signature, sig, sizeof(sig));
	memcpy(out->amz_date, c.amz_date, sizeof(out->amz_date));
	memcpy(out->payload_hash, c.payload_hash, sizeof(out->payload_hash));

	buf_adds(&auth, SIGV4_ALGORITHM " Credential=");
	buf_adds(&auth, cred->access_key_id);
	buf_addc(&auth, '/');
	buf_adds(&auth, c.date);
	buf_addc(&auth, '/');
	buf_adds(&auth, req->region);
	buf_addc(&auth, '/');
	buf_adds(&auth, req->service);
	buf_adds(&auth, "/" SIGV4_TERMINATOR ", SignedHeaders=");
	buf_add(&auth, c.signed_headers.p, c.signed_headers.len);
	buf_adds(&auth, ", Signature=");
	buf_adds(&auth, out->signature);
	out->authorization = buf_take(&auth);
	sigv4_canon_free(&c);

	out->headers[out->nheaders++] = (struct sigv4_header){ "X-Amz-Date", out->amz_date };
	if (cred->session_token != NULL)
		out->headers[out->nheaders++] =
		    (struct sigv4_header){ "X-Amz-Security-Token", cred->session_token };
	if (req->flags & SIGV4_CONTENT_SHA256)
		out->headers[out->nheaders++] =
		    (struct sigv4_header){ "X-Amz-Content-Sha256", out->payload_hash };
	out->headers[out->nheaders++] =
	    (struct sigv4_header){ "Authorization", out->authorization };
	return 0;
}

void sigv4_result_clear(struct sigv4_result *out)
{
	if (out == NULL)
		return;
	free(out->authorization);
	memset(out, 0, sizeof(*out));
}
