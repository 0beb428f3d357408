/*
 * totp.c - second factors: TOTP (RFC 6238 over RFC 4226 HOTP with
 * HMAC-SHA-1), base32 secrets (RFC 4648), the otpauth:// enrollment URI
 * (Google's Key Uri Format), and single-use backup codes.
 *
 * The HMAC context is fetched once per thread and re-keyed per call, so a
 * login does not pay for an algorithm lookup. Verification computes every
 * candidate in the window and compares each in constant time, without an
 * early exit, and refuses steps already used so a code works only once.
 */
#include "config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include <openssl/rand.h>

#include "cloudsweep/authcrypto.h"
#include "cloudsweep/log.h"
#include "cloudsweep/util.h"

#define TOTP_B32_ALPHABET   "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
#define TOTP_SECRET_B32_MAX 128 /* longest secret accepted in a URI */
#define BACKUP_CODE_GROUP   6   /* symbols before the dash */
#define BACKUP_CODE_NSYM    31  /* strlen(backup_code_alphabet) */
#define BACKUP_CODE_LIMIT   248 /* largest multiple of 31 <= 256: bytes at or above are redrawn */
#define BACKUP_CODE_DOMAIN  "cloudsweep-backup-code-v1"
#define BACKUP_CODE_UID_MAX 128

const char backup_code_alphabet[] = "23456789abcdefghjkmnpqrstuvwxyz";

/* This thread's HMAC-SHA-1 context, re-keyed per call; NULL until first use. */
static _Thread_local EVP_MAC_CTX *totp_mac_ctx;

int totp_secret_generate(unsigned char secret[TOTP_SECRET_LEN])
{
	if (RAND_priv_bytes(secret, TOTP_SECRET_LEN) != 1) {
		log_warnx("totp_secret_failed", "RAND_priv_bytes failed");
		return -1;
	}
	return 0;
}

char *totp_base32_encode(const unsigned char *in, size_t len, bool pad)
{
	size_t nsym = (len * 8 + 4) / 5, total = pad ? (nsym + 7) / 8 * 8 : nsym;
	char *out = xmalloc(total + 1);
	uint32_t acc = 0;
	size_t o = 0;
	int bits = 0;

	for (size_t i = 0; i < len; i++) {
		acc = (acc << 8) | in[i];
		bits += 8;
		while (bits >= 5) {
			bits -= 5;
			out[o++] = TOTP_B32_ALPHABET[(acc >> bits) & 0x1f];
		}
	}
	if (bits > 0)
		out[o++] = TOTP_B32_ALPHABET[(acc << (5 - bits)) & 0x1f];
	while (o < total)
		out[o++] = '=';
	out[o] = '\0';
	return out;
}

/* Value of a base32 symbol in either case, or -1. */
static int totp_b32_value(char c)
{
	if (c >= 'A' && c <= 'Z')
		return c - 'A';
	if (c >= 'a' && c <= 'z')
		return c - 'a';
	if (c >= '2' && c <= '7')
		return c - '2' + 26;
	return -1;
}

long totp_base32_decode(const char *in, unsigned char *out, size_t outmax)
{
	uint32_t acc = 0;
	size_t n = 0, nsym = 0;
	bool padding = false;
	int bits = 0, v;

	for (const char *p = in; *p != '\0'; p++) {
		if (*p == ' ')
			continue;
		if (*p == '=') {
			padding = true;
			continue;
		}
		v = totp_b32_value(*p);
		if (v == -1 || padding)
			return -1;
		nsym++;
		acc = (acc << 5) | (uint32_t)v;
		bits += 5;
		if (bits >= 8) {
			bits -= 8;
			if (n == outmax)
				return -1;
			out[n++] = (unsigned char)(acc >> bits);
		}
		acc &= (1u << bits) - 1;
	}
	/* 1, 3 and 6 leftover symbols cannot come from whole bytes. */
	switch (nsym % 8) {
	case 1:
	case 3:
	case 6:
		return -1;
	default:
		break;
	}
	if (acc != 0)
		return -1;
	return (long)n;
}

int64_t totp_time_step(time_t now)
{
	if (now < 0)
		return 0;
	return (int64_t)now / TOTP_PERIOD;
}

/* The thread's HMAC-SHA-1 context, created on first use; NULL on failure (logged). */
static EVP_MAC_CTX *totp_mac(void)
{
	OSSL_PARAM params[2];
	EVP_MAC *mac;

	if (totp_mac_ctx != NULL)
		return totp_mac_ctx;
	mac = EVP_MAC_fetch(NULL, "HMAC", NULL);
	if (mac == NULL) {
		log_warnx("totp_hmac_failed", "EVP_MAC_fetch(HMAC) failed");
		return NULL;
	}
	totp_mac_ctx = EVP_MAC_CTX_new(mac);
	EVP_MAC_free(mac);
	if (totp_mac_ctx == NULL) {
		log_warnx("totp_hmac_failed", "EVP_MAC_CTX_new failed");
		return NULL;
	}
	params[0] = OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, (char *)"SHA1", 0);
	params[1] = OSSL_PARAM_construct_end();
	if (EVP_MAC_CTX_set_params(totp_mac_ctx, params) != 1) {
		log_warnx("totp_hmac_failed", "cannot select SHA-1");
		EVP_MAC_CTX_free(totp_mac_ctx);
		totp_mac_ctx = NULL;
	}
	return totp_mac_ctx;
}

void totp_shutdown(void)
{
	EVP_MAC_CTX_free(totp_mac_ctx);
	totp_mac_ctx = NULL;
}

long totp_hotp(const unsigned char *secret, size_t len, uint64_t counter, int digits)
{
	static const long pow10[] = {
		1, 10, 100, 1000, 10000, 100000, 1000000, 10000000, 100000000
	};
	unsigned char msg[8], md[EVP_MAX_MD_SIZE];
	EVP_MAC_CTX *ctx;
	size_t mdlen = 0;
	uint32_t bin;
	unsigned off;

	if (secret == NULL || len == 0 || digits < 6 || digits > 8)
		return -1;
	ctx = totp_mac();
	if (ctx == NULL)
		return -1;
	for (int i = 7; i >= 0; i--) {
		msg[i] = (unsigned char)(counter & 0xff);
		counter >>= 8;
	}
	if (EVP_MAC_init(ctx, secret, len, NULL) != 1 ||
	    EVP_MAC_update(ctx, msg, sizeof(msg)) != 1 ||
	    EVP_MAC_final(ctx, md, &mdlen, sizeof(md)) != 1 || mdlen != 20) {
		log_warnx("totp_hmac_failed", "HMAC-SHA-1 failed");
		return -1;
	}
	/* RFC 4226 section 5.3: dynamic truncation. */
	off = md[19] & 0x0f;
	bin = ((uint32_t)(md[off] & 0x7f) << 24) | ((uint32_t)md[off + 1] << 16) |
	      ((uint32_t)md[off + 2] << 8) | (uint32_t)md[off + 3];
	cs_wipe(md, sizeof(md));
	return (long)(bin % (uint32_t)pow10[digits]);
}

long totp_code(const unsigned char *secret, size_t len, int64_t step)
{
	if (step < 0)
		return -1;
	return totp_hotp(secret, len, (uint64_t)step, TOTP_DIGITS);
}

int totp_verify(const unsigned char *secret, size_t len, const char *code, time_t now,
                int64_t last_used_step, int64_t *matched_step)
{
	char given[TOTP_DIGITS], want[TOTP_DIGITS];
	int64_t step = totp_time_step(now), found = 0;
	unsigned accepted = 0, ok;
	size_t n = 0;
	long c;

	if (code == NULL)
		return 1;
	for (const char *p = code; *p != '\0'; p++) {
		if (*p == ' ')
			continue;
		if (*p < '0' || *p > '9' || n == TOTP_DIGITS)
			return 1;
		given[n++] = *p;
	}
	if (n != TOTP_DIGITS)
		return 1;
	for (int64_t s = step - TOTP_WINDOW; s <= step + TOTP_WINDOW; s++) {
		c = totp_code(secret, len, s);
		if (c < 0)
			return -1;
		for (int d = TOTP_DIGITS - 1; d >= 0; d--, c /= 10)
			want[d] = (char)('0' + c % 10);
		/* Every candidate is compared; a used step can match but never be accepted. */
		ok = (unsigned)cs_consttime_eq(want, given, TOTP_DIGITS) &
		     (unsigned)(s > last_used_step);
		if (ok && !accepted)
			found = s;
		accepted |= ok;
	}
	cs_wipe(want, sizeof(want));
	cs_wipe(given, sizeof(given));
	if (!accepted)
		return 1;
	if (matched_step != NULL)
		*matched_step = found;
	return 0;
}

/* Append the RFC 3986 percent-encoding of s (all but unreserved characters) to out at *o. */
static void totp_pct_encode(char *out, size_t *o, const char *s)
{
	static const char hex[] = "0123456789ABCDEF";

	for (const unsigned char *p = (const unsigned char *)s; *p != '\0'; p++) {
		if ((*p >= 'A' && *p <= 'Z') || (*p >= 'a' && *p <= 'z') ||
		    (*p >= '0' && *p <= '9') || *p == '-' || *p == '.' || *p == '_' || *p == '~') {
			out[(*o)++] = (char)*p;
		} else {
			out[(*o)++] = '%';
			out[(*o)++] = hex[*p >> 4];
			out[(*o)++] = hex[*p & 0x0f];
		}
	}
}

/* Whether a label part is usable in a Key Uri: non-empty, bounded, no colon. */
static bool totp_label_ok(const char *s)
{
	size_t len;

	if (s == NULL)
		return false;
	len = strnlen(s, TOTP_LABEL_MAX + 1);
	return len > 0 && len <= TOTP_LABEL_MAX && strchr(s, ':') == NULL;
}

char *totp_otpauth_uri(const char *issuer, const char *account, const char *secret_b32)
{
	static const char tail[] = "&algorithm=SHA1&digits=6&period=30";
	size_t slen, o = 0, cap;
	char *out;

	if (!totp_label_ok(issuer) || !totp_label_ok(account) || secret_b32 == NULL)
		return NULL;
	slen = strnlen(secret_b32, TOTP_SECRET_B32_MAX + 1);
	if (slen == 0 || slen > TOTP_SECRET_B32_MAX ||
	    strspn(secret_b32, TOTP_B32_ALPHABET) != slen)
		return NULL;
	/* Each label byte takes at most three characters; the issuer appears twice. */
	cap = strlen("otpauth://totp/") + 3 * (2 * strlen(issuer) + strlen(account)) +
	      strlen(":?secret=&issuer=") + slen + sizeof(tail);
	out = xmalloc(cap);
	memcpy(out, "otpauth://totp/", strlen("otpauth://totp/"));
	o = strlen("otpauth://totp/");
	totp_pct_encode(out, &o, issuer);
	out[o++] = ':';
	totp_pct_encode(out, &o, account);
	memcpy(out + o, "?secret=", strlen("?secret="));
	o += strlen("?secret=");
	memcpy(out + o, secret_b32, slen);
	o += slen;
	memcpy(out + o, "&issuer=", strlen("&issuer="));
	o += strlen("&issuer=");
	totp_pct_encode(out, &o, issuer);
	memcpy(out + o, tail, sizeof(tail));
	return out;
}

int backup_codes_generate(size_t n, char (*out)[BACKUP_CODE_SIZE])
{
	unsigned char rnd[64];
	size_t used = sizeof(rnd);
	int rc = -1;

	for (size_t i = 0; i < n; i++) {
		size_t o = 0;

		for (int k = 0; k < BACKUP_CODE_SYMBOLS; k++) {
			unsigned char b;

			/* Bytes >= 248 are redrawn so each of the 31 symbols is equally likely. */
			do {
				if (used == sizeof(rnd)) {
					if (RAND_priv_bytes(rnd, sizeof(rnd)) != 1) {
						log_warnx("backup_codes_failed",
						          "RAND_priv_bytes failed");
						goto fail;
					}
					used = 0;
				}
				b = rnd[used++];
			} while (b >= BACKUP_CODE_LIMIT);
			if (k == BACKUP_CODE_GROUP)
				out[i][o++] = '-';
			out[i][o++] = backup_code_alphabet[b % BACKUP_CODE_NSYM];
		}
		out[i][o] = '\0';
		/* A repeat (chance about 2^-53 per pair) would leave the user one code short. */
		for (size_t j = 0; j < i; j++) {
			if (strcmp(out[i], out[j]) == 0) {
				i--;
				break;
			}
		}
	}
	rc = 0;
fail:
	cs_wipe(rnd, sizeof(rnd));
	if (rc == -1)
		cs_wipe(out, n * sizeof(*out));
	return rc;
}

/*
 * A fast hash is enough here, unlike for passwords: each code is 12
 * symbols drawn uniformly from 31 (about 59.5 bits), not chosen by a human,
 * so a stolen table cannot be attacked with a dictionary. Binding the user
 * id in makes the search per user (one table leak does not let a single
 * guess be tested against every user's codes), leaving about 2^56 SHA-256
 * computations per user on average even with ten live codes, and a code
 * is worth nothing without the user's password. An unsalted deterministic
 * value keeps the (user_id, hash) lookup a plain index probe, and spending
 * it stays a single UPDATE ... WHERE used_at IS NULL.
 */
char *backup_code_hash(const char *user_id, const char *code)
{
	char norm[BACKUP_CODE_SYMBOLS];
	unsigned char md[32];
	unsigned int mdlen = 0;
	EVP_MD_CTX *ctx = NULL;
	char *hex = NULL;
	size_t n = 0;
	int ok;

	if (user_id == NULL || code == NULL || user_id[0] == '\0' ||
	    strnlen(user_id, BACKUP_CODE_UID_MAX + 1) > BACKUP_CODE_UID_MAX)
		return NULL;
	for (const char *p = code; *p != '\0'; p++) {
		char c = *p;

		if (c == '-' || c == ' ')
			continue;
		if (c >= 'A' && c <= 'Z')
			c = (char)(c - 'A' + 'a');
		if (c == '\0' || strchr(backup_code_alphabet, c) == NULL || n == sizeof(norm))
			goto out;
		norm[n++] = c;
	}
	if (n != sizeof(norm))
		goto out;
	ctx = EVP_MD_CTX_new();
	if (ctx == NULL) {
		log_warnx("backup_code_hash_failed", "EVP_MD_CTX_new failed");
		goto out;
	}
	/* The NUL after each part keeps the fields from running into each other. */
	ok = EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) == 1 &&
	     EVP_DigestUpdate(ctx, BACKUP_CODE_DOMAIN, sizeof(BACKUP_CODE_DOMAIN)) == 1 &&
	     EVP_DigestUpdate(ctx, user_id, strlen(user_id) + 1) == 1 &&
	     EVP_DigestUpdate(ctx, norm, sizeof(norm)) == 1 &&
	     EVP_DigestFinal_ex(ctx, md, &mdlen) == 1 && mdlen == sizeof(md);
	if (!ok) {
		log_warnx("backup_code_hash_failed", "SHA-256 failed");
		goto out;
	}
	hex = xmalloc(BACKUP_CODE_HASH_LEN + 1);
	cs_hex(hex, md, sizeof(md));
out:
	EVP_MD_CTX_free(ctx);
	cs_wipe(norm, sizeof(norm));
	return hex;
}
