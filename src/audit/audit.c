/*
 * audit.c - the audit writer, chain verifier and checkpoint signer (see
 * audit.h for the contract and sql/002_audit.sql for the chain itself).
 *
 * Appending is one call of the SQL function audit_append in the caller's
 * transaction; this file validates and bounds what goes into it first, so
 * that only catalogued event types are written and no sensitive value goes
 * in clear. Verification and signing are small explicit state machines,
 * each with one database callback that hands the event to one advance
 * function, and a handle the owner may cancel at any time. Keys live only
 * in this file's module state: the HMAC key inside a keyed EVP_MAC context
 * that is re-initialised per value, the Ed25519 key in an EVP_PKEY. Key
 * bytes read from files are wiped as soon as OpenSSL holds them.
 */
#include "config.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>

#include <openssl/bio.h>
#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>

#include "cloudsweep/audit.h"
#include "cloudsweep/db.h"
#include "cloudsweep/http.h"
#include "cloudsweep/log.h"
#include "cloudsweep/util.h"

#define AUDIT_HMAC_PREFIX     "hmac-sha256:"
#define AUDIT_HMAC_KEY_MIN    32    /* bytes of HMAC key required */
#define AUDIT_KEY_FILE_MAX    4096  /* largest HMAC key file read */
#define AUDIT_PEM_FILE_MAX    16384 /* largest signing key file read */
#define AUDIT_DETAILS_DEPTH   16    /* deepest details nesting accepted */
#define AUDIT_SIGN_BATCH      1000  /* heads signed per round trip */
#define AUDIT_ED25519_SIG_LEN 64
#define AUDIT_ED25519_KEY_LEN 32
#define AUDIT_GENESIS_HASH    "0000000000000000000000000000000000000000000000000000000000000000"
#define AUDIT_NPARAMS         11
#define AUDIT_STR_(x)         #x
#define AUDIT_STR(x)          AUDIT_STR_(x)

/* Bounds on free-text columns; longer values are cut at a character boundary. */
#define AUDIT_LEN_ACTOR         128
#define AUDIT_LEN_IP            64
#define AUDIT_LEN_USER_AGENT    512
#define AUDIT_LEN_REQUEST_ID    128
#define AUDIT_LEN_RESOURCE_TYPE 64
#define AUDIT_LEN_RESOURCE_ID   256
#define AUDIT_LEN_ACTION        64

static const char audit_sql_append[] =
    "SELECT id, seq, hash FROM audit_append($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)";

static const char audit_sql_bounds[] =
    "SELECT h.seq, h.hash, "
    "       a.seq, a.hash, audit_rfc3339(a.signed_at), a.signature, a.key_id, "
    "       c.seq, c.hash, audit_rfc3339(c.signed_at), c.signature, c.key_id "
    "FROM (SELECT $1::uuid AS org_id) o "
    "LEFT JOIN audit_chain_heads h ON h.org_id = o.org_id "
    "LEFT JOIN LATERAL (SELECT * FROM audit_checkpoints x WHERE x.org_id = o.org_id "
    "                   AND x.kind = 'retention' ORDER BY x.seq DESC LIMIT 1) a ON true "
    "LEFT JOIN LATERAL (SELECT * FROM audit_checkpoints x WHERE x.org_id = o.org_id "
    "                   AND x.kind = 'head' ORDER BY x.seq DESC LIMIT 1) c ON true";

/* The canonical text travels as bytea so the client encoding cannot alter the hashed bytes. */
static const char audit_sql_page[] =
    "SELECT e.id, e.seq, e.prev_hash, e.hash, convert_to(audit_canonical(e), 'UTF8') "
    "FROM audit_events e WHERE e.org_id = $1 AND e.seq > $2 ORDER BY e.seq LIMIT " AUDIT_STR(
        AUDIT_VERIFY_PAGE_ROWS);

static const char audit_sql_heads[] =
    "SELECT h.org_id, h.seq, h.hash, audit_rfc3339(now()) FROM audit_chain_heads h "
    "WHERE ($1::uuid IS NULL OR h.org_id > $1::uuid) AND h.seq > 0 AND NOT EXISTS (SELECT 1 FROM "
    "audit_checkpoints c "
    "  WHERE c.org_id = h.org_id AND c.kind = 'head' AND c.seq >= h.seq) "
    "ORDER BY h.org_id LIMIT " AUDIT_STR(AUDIT_SIGN_BATCH);

static const char audit_sql_anchor[] =
    "SELECT e.org_id, e.seq, e.hash, audit_rfc3339(now()) FROM audit_events e "
    "WHERE e.org_id = $1 AND e.occurred_at < $2::timestamptz "
    "ORDER BY e.occurred_at DESC, e.seq DESC LIMIT 1";

static const char audit_sql_store[] =
    "WITH ins AS (INSERT INTO audit_checkpoints "
    "  (org_id, kind, seq, hash, signed_at, signature, key_id) "
    "  SELECT u.o, $1, u.s, u.h, u.t::timestamptz, u.sig, $2 "
    "  FROM unnest($3::uuid[], $4::bigint[], $5::text[], $6::text[], $7::text[]) "
    "    AS u(o, s, h, t, sig) "
    "  ON CONFLICT (org_id, kind, seq) DO NOTHING RETURNING 1) "
    "SELECT count(*) FROM ins";

/* ---- the event catalogue (keep doc/audit-events.md in step; the unit test compares) ---- */

const struct audit_event_type audit_event_types[] = {
	{ "auth.signup", "user", "create", AUDIT_SUCCESS, "email" },
	{ "auth.login.succeeded", "user", "login", AUDIT_SUCCESS, "email" },
	{ "auth.login.failed", "user", "login", AUDIT_DENIED, "email" },
	{ "auth.logout", "session", "logout", AUDIT_SUCCESS, "jti" },
	{ "auth.refresh.succeeded", "session", "refresh", AUDIT_SUCCESS, "jti" },
	{ "auth.refresh.reused", "session", "refresh", AUDIT_DENIED, "jti" },
	{ "auth.sessions.revoked", "user", "revoke", AUDIT_SUCCESS, NULL },
	{ "auth.password.changed", "user", "update", AUDIT_SUCCESS, NULL },
	{ "auth.mfa.enrolled", "user", "enroll", AUDIT_SUCCESS, NULL },
	{ "auth.mfa.activated", "user", "activate", AUDIT_SUCCESS, NULL },
	{ "auth.mfa.used", "user", "verify", AUDIT_SUCCESS, NULL },
	{ "auth.mfa.backup_code_used", "user", "verify", AUDIT_SUCCESS, NULL },
	{ "auth.mfa.disabled", "user", "disable", AUDIT_SUCCESS, NULL },
	{ "auth.mfa.backup_codes_regenerated", "user", "update", AUDIT_SUCCESS, NULL },
	{ "access.permission_denied", NULL, "access", AUDIT_DENIED, NULL },
	{ "access.csrf_failed", NULL, "access", AUDIT_DENIED, NULL },
	{ "access.rate_limited", NULL, "access", AUDIT_DENIED, NULL },
	{ "access.ip_blocked", "ip", "block", AUDIT_SUCCESS, NULL },
	{ "access.ip_unblocked", "ip", "unblock", AUDIT_SUCCESS, NULL },
	{ "webhook.github.rejected", "webhook", "receive", AUDIT_DENIED, NULL },
	{ "org.member.added", "user", "create", AUDIT_SUCCESS, "email" },
	{ "org.member.removed", "user", "delete", AUDIT_SUCCESS, NULL },
	{ "org.member.role_changed", "user", "update", AUDIT_SUCCESS, NULL },
	{ "org.member.invited", "invitation", "create", AUDIT_SUCCESS, "email" },
	{ "org.member.invitation_revoked", "invitation", "delete", AUDIT_SUCCESS, "email" },
	{ "credential.created", "aws_account", "create", AUDIT_SUCCESS, "access_key_id" },
	{ "credential.read", "aws_account", "read", AUDIT_SUCCESS, NULL },
	{ "credential.verified", "aws_account", "verify", AUDIT_SUCCESS, NULL },
	{ "credential.deleted", "aws_account", "delete", AUDIT_SUCCESS, NULL },
	{ "scan.created", "scan", "create", AUDIT_SUCCESS, NULL },
	{ "waste_item.approved", "waste_item", "approve", AUDIT_SUCCESS, NULL },
	{ "waste_item.dismissed", "waste_item", "dismiss", AUDIT_SUCCESS, NULL },
	{ "waste_item.cleaned", "waste_item", "cleanup", AUDIT_SUCCESS, NULL },
	{ "key.rotated", "kek", "rotate", AUDIT_SUCCESS, NULL },
	{ "key.retired", "kek", "retire", AUDIT_SUCCESS, NULL },
	{ "user.updated", "user", "update", AUDIT_SUCCESS, "email" },
	{ "user.exported", "user", "export", AUDIT_SUCCESS, NULL },
	{ "user.deleted", "user", "delete", AUDIT_SUCCESS, NULL },
	{ "user.purged", "user", "purge", AUDIT_SUCCESS, NULL },
};

const size_t audit_event_types_count = CS_ARRAY_LEN(audit_event_types);

/*
 * Details keys that name a secret or personal value: whatever the event
 * type, at any depth, their value must be an audit_hmac() digest.
 */
static const char *const audit_sensitive_keys[] = {
	"password",      "passphrase",  "secret",    "client_secret", "secret_access_key",
	"session_token", "external_id", "token",     "access_token",  "refresh_token",
	"id_token",      "totp",        "totp_code", "backup_code",   "private_key",
	"authorization", "cookie",      "email",     "jti",
};

/* ---- module state: keys and reusable OpenSSL contexts ---- */

static struct {
	bool ready;
	EVP_MAC *mac;
	EVP_MAC_CTX *hmac; /* keyed once by audit_init */
	EVP_MD *sha256;
	EVP_PKEY *sign_key;   /* Ed25519 private key, or NULL */
	EVP_PKEY *verify_key; /* its public half */
	EVP_MD_CTX *sign_ctx; /* re-initialised per signature */
	char *public_pem;     /* owned */
	char key_id[32];
} audit;

/* The catalogue entry for name, or NULL. */
const struct audit_event_type *audit_event_type_find(const char *name)
{
	if (name == NULL)
		return NULL;
	for (size_t i = 0; i < audit_event_types_count; i++)
		if (strcmp(audit_event_types[i].name, name) == 0)
			return &audit_event_types[i];
	return NULL;
}

/* Whether name is catalogued. */
bool audit_event_type_known(const char *name)
{
	return audit_event_type_find(name) != NULL;
}

/* The SQL spelling of a result. */
const char *audit_result_name(enum audit_result r)
{
	switch (r) {
	case AUDIT_DENIED:
		return "denied";
	case AUDIT_ERROR:
		return "error";
	case AUDIT_RESULT_DEFAULT:
	case AUDIT_SUCCESS:
		break;
	}
	return "success";
}

/* ---- small encoding helpers ---- */

static bool audit_is_b64char(unsigned char c)
{
	return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
	       c == '+' || c == '/';
}

/*
 * Decode padded standard base64 of len characters into out (len / 4 * 3
 * bytes of room); the decoded length, or -1 if s is not exactly that.
 */
static int audit_b64_decode(const char *s, size_t len, unsigned char *out)
{
	size_t pad = 0;
	int n;

	if (len == 0 || len % 4 != 0 || len > INT32_MAX)
		return -1;
	if (s[len - 1] == '=')
		pad = s[len - 2] == '=' ? 2 : 1;
	for (size_t i = 0; i < len - pad; i++)
		if (!audit_is_b64char((unsigned char)s[i]))
			return -1;
	n = EVP_DecodeBlock(out, (const unsigned char *)s, (int)len);
	if (n < 0 || (size_t)n < pad)
		return -1;
	return n - (int)pad;
}

/* Base64 of len bytes into a fresh string. */
static char *audit_b64_encode(const unsigned char *in, size_t len)
{
	char *out = xmalloc(4 * ((len + 2) / 3) + 1);

	EVP_EncodeBlock((unsigned char *)out, in, (int)len);
	return out;
}

/* Length of the valid UTF-8 sequence at s, or 0 (never reads past a NUL). */
static size_t audit_utf8_len(const unsigned char *s)
{
	unsigned char c = s[0];

	if (c < 0x80)
		return 1;
	if (c >= 0xc2 && c <= 0xdf)
		return (s[1] & 0xc0) == 0x80 ? 2 : 0;
	if (c >= 0xe0 && c <= 0xef) {
		if ((s[1] & 0xc0) != 0x80 || (s[2] & 0xc0) != 0x80)
			return 0;
		if ((c == 0xe0 && s[1] < 0xa0) || (c == 0xed && s[1] > 0x9f))
			return 0; /* overlong, or a surrogate */
		return 3;
	}
	if (c >= 0xf0 && c <= 0xf4) {
		if ((s[1] & 0xc0) != 0x80 || (s[2] & 0xc0) != 0x80 || (s[3] & 0xc0) != 0x80)
			return 0;
		if ((c == 0xf0 && s[1] < 0x90) || (c == 0xf4 && s[1] > 0x8f))
			return 0; /* overlong, or beyond U+10FFFF */
		return 4;
	}
	return 0;
}

/*
 * A copy of s of at most max bytes, cut at a character boundary, with
 * invalid UTF-8 and control characters replaced by '?'; NULL for NULL.
 */
static char *audit_clean(const char *s, size_t max)
{
	const unsigned char *p = (const unsigned char *)s;
	size_t o = 0, n;
	char *out;

	if (s == NULL)
		return NULL;
	out = xmalloc(max + 1);
	while (*p != '\0') {
		n = audit_utf8_len(p);
		if (n == 0 || (n == 1 && (*p < 0x20 || *p == 0x7f))) {
			if (o + 1 > max)
				break;
			out[o++] = '?';
			p++;
			continue;
		}
		if (o + n > max)
			break;
		memcpy(out + o, p, n);
		o += n;
		p += n;
	}
	out[o] = '\0';
	return out;
}

/* ---- keys ---- */

static void audit_ssl_fail(const char *event, const char *what)
{
	unsigned long e = ERR_peek_last_error();
	char buf[256];

	ERR_error_string_n(e, buf, sizeof(buf));
	log_warnx(event, "%s: %s", what, e != 0 ? buf : "unknown error");
	ERR_clear_error();
}

static void audit_check_mode(const char *path)
{
	struct stat st;

	if (stat(path, &st) == 0 && (st.st_mode & 077) != 0)
		log_warnx("audit_key_permissions", "%s is accessible to group or others", path);
}

/* Never prompt for a passphrase: encrypted keys are refused. */
static int audit_no_passphrase_cb(char *buf, int size, int rwflag, void *u)
{
	return -1;
}

static int audit_load_hmac_key(const char *path)
{
	OSSL_PARAM params[2];
	unsigned char *key = NULL;
	size_t len = 0, tlen, keylen = 0, cap = 0;
	char *buf;
	int n, rc = -1;

	buf = cs_read_file(path, AUDIT_KEY_FILE_MAX, &len);
	if (buf == NULL) {
		log_warn("audit_init_failed", "cannot read HMAC key file %s", path);
		return -1;
	}
	audit_check_mode(path);
	/* Base64 if the whole content (trailing whitespace aside) is padded base64. */
	tlen = len;
	while (tlen > 0 && (buf[tlen - 1] == '\n' || buf[tlen - 1] == '\r' ||
	                    buf[tlen - 1] == ' ' || buf[tlen - 1] == '\t'))
		tlen--;
	cap = tlen / 4 * 3 + 3;
	key = xmalloc(cap);
	n = audit_b64_decode(buf, tlen, key);
	if (n >= AUDIT_HMAC_KEY_MIN) {
		keylen = (size_t)n;
	} else {
		cs_wipe(key, cap);
		free(key);
		cap = len + 1;
		key = xmalloc(cap);
		memcpy(key, buf, len);
		keylen = len;
	}
	cs_wipe(buf, len + 1);
	free(buf);
	if (keylen < AUDIT_HMAC_KEY_MIN) {
		log_warnx("audit_init_failed", "HMAC key in %s is shorter than %d bytes", path,
		          AUDIT_HMAC_KEY_MIN);
		goto fail;
	}

	audit.mac = EVP_MAC_fetch(NULL, "HMAC", NULL);
	if (audit.mac == NULL || (audit.hmac = EVP_MAC_CTX_new(audit.mac)) == NULL) {
		audit_ssl_fail("audit_init_failed", "HMAC unavailable");
		goto fail;
	}
	params[0] = OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, (char *)"SHA256", 0);
	params[1] = OSSL_PARAM_construct_end();
	if (EVP_MAC_init(audit.hmac, key, keylen, params) != 1) {
		audit_ssl_fail("audit_init_failed", "HMAC key setup");
		goto fail;
	}
	rc = 0;
fail:
	cs_wipe(key, cap);
	free(key);
	return rc;
}

static int audit_load_signing_key(const char *path)
{
	unsigned char pub[AUDIT_ED25519_KEY_LEN], md[32];
	size_t len = 0, publen = sizeof(pub);
	char *buf, *pem, hex[17];
	BIO *bio = NULL;
	long pemlen;
	int rc = -1;

	buf = cs_read_file(path, AUDIT_PEM_FILE_MAX, &len);
	if (buf == NULL) {
		log_warn("audit_init_failed", "cannot read signing key file %s", path);
		return -1;
	}
	audit_check_mode(path);
	bio = BIO_new_mem_buf(buf, (int)len);
	if (bio == NULL) {
		audit_ssl_fail("audit_init_failed", "BIO");
		goto fail;
	}
	audit.sign_key = PEM_read_bio_PrivateKey(bio, NULL, audit_no_passphrase_cb, NULL);
	BIO_free(bio);
	bio = NULL;
	if (audit.sign_key == NULL) {
		audit_ssl_fail("audit_init_failed", "signing key file holds no usable private key");
		goto fail;
	}
	if (!EVP_PKEY_is_a(audit.sign_key, "ED25519")) {
		log_warnx("audit_init_failed", "signing key in %s is not an Ed25519 key", path);
		goto fail;
	}
	if (EVP_PKEY_get_raw_public_key(audit.sign_key, pub, &publen) != 1 ||
	    publen != sizeof(pub) ||
	    (audit.verify_key = EVP_PKEY_new_raw_public_key(EVP_PKEY_ED25519, NULL, pub, publen)) ==
	        NULL ||
	    (audit.sign_ctx = EVP_MD_CTX_new()) == NULL) {
		audit_ssl_fail("audit_init_failed", "Ed25519 public key");
		goto fail;
	}
	if (EVP_Digest(pub, publen, md, NULL, audit.sha256, NULL) != 1) {
		audit_ssl_fail("audit_init_failed", "SHA-256");
		goto fail;
	}
	cs_hex(hex, md, 8);
	snprintf(audit.key_id, sizeof(audit.key_id), "ed25519:%s", hex);

	if ((bio = BIO_new(BIO_s_mem())) == NULL ||
	    PEM_write_bio_PUBKEY(bio, audit.verify_key) != 1 ||
	    (pemlen = BIO_get_mem_data(bio, &pem)) <= 0) {
		audit_ssl_fail("audit_init_failed", "public key PEM");
		goto fail;
	}
	audit.public_pem = xstrndup(pem, (size_t)pemlen);
	rc = 0;
fail:
	BIO_free(bio);
	cs_wipe(buf, len + 1);
	free(buf);
	return rc;
}

/* Load the HMAC key and the optional Ed25519 signing key. */
int audit_init(const char *hmac_key_file, const char *signing_key_file)
{
	if (audit.ready)
		audit_shutdown();
	if (hmac_key_file == NULL) {
		log_warnx("audit_init_failed", "no HMAC key file configured");
		return -1;
	}
	audit.sha256 = EVP_MD_fetch(NULL, "SHA256", NULL);
	if (audit.sha256 == NULL) {
		audit_ssl_fail("audit_init_failed", "SHA-256 unavailable");
		goto fail;
	}
	if (audit_load_hmac_key(hmac_key_file) == -1)
		goto fail;
	if (signing_key_file != NULL && audit_load_signing_key(signing_key_file) == -1)
		goto fail;
	audit.ready = true;
	log_info("audit_init", "audit keys loaded%s%s",
	         audit.public_pem != NULL ? ", signing key " : "",
	         audit.public_pem != NULL ? audit.key_id : "");
	return 0;
fail:
	audit_shutdown();
	return -1;
}

/* Free the keys; OpenSSL cleanses key material when freeing its contexts. */
void audit_shutdown(void)
{
	EVP_MAC_CTX_free(audit.hmac);
	EVP_MAC_free(audit.mac);
	EVP_MD_free(audit.sha256);
	EVP_PKEY_free(audit.sign_key);
	EVP_PKEY_free(audit.verify_key);
	EVP_MD_CTX_free(audit.sign_ctx);
	free(audit.public_pem);
	memset(&audit, 0, sizeof(audit));
}

/* The loaded verifying key as PEM, or NULL. */
const char *audit_public_key_pem(void)
{
	return audit.public_pem;
}

/* The loaded key's id, or NULL. */
const char *audit_key_id(void)
{
	return audit.sign_key != NULL ? audit.key_id : NULL;
}

/* ---- HMAC of sensitive values ---- */

/* "hmac-sha256:<hex>" of value, or NULL. */
char *audit_hmac(const char *value)
{
	unsigned char mac[32];
	size_t maclen = 0;
	char *out;

	if (value == NULL || !audit.ready)
		return NULL;
	if (EVP_MAC_init(audit.hmac, NULL, 0, NULL) != 1 ||
	    EVP_MAC_update(audit.hmac, (const unsigned char *)value, strlen(value)) != 1 ||
	    EVP_MAC_final(audit.hmac, mac, &maclen, sizeof(mac)) != 1 || maclen != sizeof(mac)) {
		audit_ssl_fail("audit_hmac_failed", "HMAC-SHA256");
		return NULL;
	}
	out = xmalloc(AUDIT_HMAC_LEN + 1);
	memcpy(out, AUDIT_HMAC_PREFIX, strlen(AUDIT_HMAC_PREFIX));
	cs_hex(out + strlen(AUDIT_HMAC_PREFIX), mac, sizeof(mac));
	return out;
}

/* details[key] = audit_hmac(value). */
int audit_details_set_hmac(json_t *details, const char *key, const char *value)
{
	char *h;
	int rc;

	if (!json_is_object(details) || key == NULL || (h = audit_hmac(value)) == NULL)
		return -1;
	rc = json_object_set_new(details, key, json_string(h)) == 0 ? 0 : -1;
	free(h);
	return rc;
}

/* ---- building an append ---- */

static bool audit_is_hmac_value(const json_t *v)
{
	const char *s = json_string_value(v);

	if (s == NULL || json_string_length(v) != AUDIT_HMAC_LEN ||
	    strncmp(s, AUDIT_HMAC_PREFIX, strlen(AUDIT_HMAC_PREFIX)) != 0)
		return false;
	for (s += strlen(AUDIT_HMAC_PREFIX); *s != '\0'; s++)
		if (!((*s >= '0' && *s <= '9') || (*s >= 'a' && *s <= 'f')))
			return false;
	return true;
}

static bool audit_key_in_list(const char *list, const char *key)
{
	size_t klen = strlen(key);
	const char *p = list, *end;

	while (p != NULL && *p != '\0') {
		end = strchr(p, ',');
		if (end == NULL)
			end = p + strlen(p);
		if ((size_t)(end - p) == klen && strncasecmp(p, key, klen) == 0)
			return true;
		p = *end == ',' ? end + 1 : end;
	}
	return false;
}

static bool audit_key_sensitive(const struct audit_event_type *t, const char *key)
{
	for (size_t i = 0; i < CS_ARRAY_LEN(audit_sensitive_keys); i++)
		if (strcasecmp(audit_sensitive_keys[i], key) == 0)
			return true;
	return audit_key_in_list(t->hmac_keys, key);
}

/* 0 when no sensitive key anywhere in v holds anything but an HMAC; *bad names the offender. */
static int audit_details_check(const struct audit_event_type *t, const json_t *v, int depth,
                               const char **bad)
{
	const char *key;
	json_t *val;
	size_t i;

	if (depth > AUDIT_DETAILS_DEPTH) {
		*bad = "(too deep)";
		return -1;
	}
	if (json_is_object(v)) {
		json_object_foreach ((json_t *)v, key, val) {
			if (audit_key_sensitive(t, key) && !json_is_null(val) &&
			    !audit_is_hmac_value(val)) {
				*bad = key;
				return -1;
			}
			if (audit_details_check(t, val, depth + 1, bad) == -1)
				return -1;
		}
	} else if (json_is_array(v)) {
		json_array_foreach (v, i, val)
			if (audit_details_check(t, val, depth + 1, bad) == -1)
				return -1;
	}
	return 0;
}

/* The eleven text parameters of audit_append, each owned (or NULL for SQL NULL). */
struct audit_params {
	char *v[AUDIT_NPARAMS];
};

static void audit_params_free(struct audit_params *p)
{
	for (int i = 0; i < AUDIT_NPARAMS; i++)
		free(p->v[i]);
}

/* Validate ev and fill p; -1 (logged, p empty) when the event must be refused. */
static int audit_params_build(const struct audit_event *ev, struct audit_params *p)
{
	const struct audit_event_type *t;
	const char *bad = NULL, *type;
	enum audit_result result;
	char *details;

	memset(p, 0, sizeof(*p));
	if (ev == NULL)
		return -1;
	type = ev->event_type != NULL ? ev->event_type : "(null)";
	if ((t = audit_event_type_find(ev->event_type)) == NULL) {
		log_warnx("audit_event_refused", "unknown event type %.64s", type);
		return -1;
	}
	if (ev->org_id != NULL && !cs_uuid_valid(ev->org_id)) {
		log_warnx("audit_event_refused", "event %s: org id is not a UUID", type);
		return -1;
	}
	result = ev->result == AUDIT_RESULT_DEFAULT ? t->result : ev->result;
	if (result != AUDIT_SUCCESS && result != AUDIT_DENIED && result != AUDIT_ERROR) {
		log_warnx("audit_event_refused", "event %s: bad result %d", type, (int)ev->result);
		return -1;
	}
	if (ev->details != NULL) {
		if (!json_is_object(ev->details)) {
			log_warnx("audit_event_refused", "event %s: details is not an object",
			          type);
			return -1;
		}
		if (audit_details_check(t, ev->details, 0, &bad) == -1) {
			log_warnx("audit_event_refused",
			          "event %s: details key %.64s must hold an audit HMAC", type, bad);
			return -1;
		}
		details = json_dumps(ev->details, JSON_COMPACT);
		if (details == NULL || strlen(details) > AUDIT_DETAILS_MAX) {
			log_warnx("audit_event_refused",
			          "event %s: details unserializable or over %d bytes", type,
			          AUDIT_DETAILS_MAX);
			free(details);
			return -1;
		}
	} else {
		details = xstrdup("{}");
	}

	p->v[0] = xstrdup(ev->org_id != NULL ? ev->org_id : AUDIT_NIL_ORG);
	p->v[1] = ev->actor != NULL ? audit_clean(ev->actor, AUDIT_LEN_ACTOR) : xstrdup("system");
	p->v[2] = audit_clean(ev->ip, AUDIT_LEN_IP);
	p->v[3] = audit_clean(ev->user_agent, AUDIT_LEN_USER_AGENT);
	p->v[4] = audit_clean(ev->request_id, AUDIT_LEN_REQUEST_ID);
	p->v[5] = xstrdup(t->name);
	p->v[6] = audit_clean(ev->resource_type != NULL ? ev->resource_type : t->resource_type,
	                      AUDIT_LEN_RESOURCE_TYPE);
	p->v[7] = audit_clean(ev->resource_id, AUDIT_LEN_RESOURCE_ID);
	p->v[8] = audit_clean(ev->action != NULL ? ev->action : t->action, AUDIT_LEN_ACTION);
	p->v[9] = xstrdup(audit_result_name(result));
	p->v[10] = details;
	return 0;
}

/* Queue the append of ev in the caller's transaction. */
struct db_query *audit_write(struct db_tx *tx, const struct audit_event *ev, db_cb cb, void *arg)
{
	struct audit_params p;
	struct db_query *q;

	if (tx == NULL || audit_params_build(ev, &p) == -1)
		return NULL;
	q = db_tx_query(tx, audit_sql_append, AUDIT_NPARAMS, (const char *const *)p.v, cb, arg);
	if (q == NULL)
		log_warnx("audit_write_failed", "event %s: transaction takes no more queries",
		          p.v[5]);
	audit_params_free(&p);
	return q;
}

void audit_event_from_request(struct audit_event *ev, struct http_request *req, const char *org,
                              const char *actor, const char *type)
{
	memset(ev, 0, sizeof(*ev));
	ev->org_id = org;
	ev->actor = actor;
	ev->ip = req->client_ip;
	ev->user_agent = http_header(req, "User-Agent");
	ev->request_id = req->request_id;
	ev->event_type = type;
}

int audit_op_write(struct http_op *op, struct audit_event *ev, json_t *details)
{
	struct db_query *q = NULL;

	ev->details = details;
	if (details != NULL)
		q = audit_write(op->tx, ev, http_op_db_cb, op);
	json_decref(details);
	ev->details = NULL;
	if (q == NULL) {
		http_op_fail(op, 500, "internal", "the audit trail refused the event");
		return -1;
	}
	http_op_track(op, q);
	return 0;
}

/* ---- standalone writes ---- */

/*
 * One statement is one implicit transaction: the append commits at its own
 * Sync (the pool reports a failed commit as DB_ERROR), and the chain head
 * stays locked only while the statement runs, never across a round trip.
 */
struct audit_write {
	struct db_query *q; /* the append, until it answers */
	audit_write_cb cb;
	void *arg;
	bool in_cb;          /* the caller's callback is running */
	char event_type[64]; /* for logs */
};

static void audit_write_cb_db(void *arg, enum db_event ev, const PGresult *res)
{
	struct audit_write *w = arg;
	const char *state;
	char id[37] = "";
	int status = -1;

	w->q = NULL;
	if (ev == DB_OK && PQntuples(res) == 1) {
		snprintf(id, sizeof(id), "%s", PQgetvalue(res, 0, 0));
		status = 0;
	} else {
		state = ev == DB_ERROR ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
		log_warnx("audit_write_failed", "event %s: append failed (%s)", w->event_type,
		          state != NULL      ? state
		          : ev == DB_TIMEOUT ? "timeout"
		          : ev == DB_OK      ? "no row"
		                             : "unavailable");
	}
	w->in_cb = true;
	w->cb(w->arg, status, status == 0 ? id : NULL);
	free(w);
}

/* Append ev in a transaction of its own. */
struct audit_write *audit_write_standalone(struct db_pool *pool, const struct audit_event *ev,
                                           audit_write_cb cb, void *arg)
{
	struct audit_params p;
	struct audit_write *w;

	if (pool == NULL || cb == NULL || audit_params_build(ev, &p) == -1)
		return NULL;
	w = xcalloc(1, sizeof(*w));
	w->cb = cb;
	w->arg = arg;
	snprintf(w->event_type, sizeof(w->event_type), "%s", p.v[5]);
	w->q = db_query(pool, audit_sql_append, AUDIT_NPARAMS, (const char *const *)p.v,
	                audit_write_cb_db, w);
	audit_params_free(&p);
	if (w->q == NULL) {
		log_warnx("audit_write_failed", "event %s: database unavailable", w->event_type);
		free(w);
		return NULL;
	}
	return w;
}

/* Forget a standalone write. */
void audit_write_cancel(struct audit_write *w)
{
	if (w == NULL || w->in_cb)
		return;
	db_query_cancel(w->q);
	free(w);
}

/* ---- verification ---- */

enum audit_verify_state {
	AUDIT_VERIFY_SNAPSHOT, /* BEGIN + SET TRANSACTION sent; waiting for the latter */
	AUDIT_VERIFY_BOUNDS,   /* head, latest anchor and latest head checkpoint in flight */
	AUDIT_VERIFY_PAGE,     /* a page of events in seq order in flight */
	AUDIT_VERIFY_DONE,     /* the caller has been told */
};

struct audit_verify {
	enum audit_verify_state state;
	struct db_tx *tx; /* owned: the read-only snapshot */
	audit_verify_cb cb;
	void *arg;
	EVP_MD_CTX *md;
	char org_id[37];
	long long head_seq; /* chain head as of the snapshot */
	char head_hash[AUDIT_HASH_LEN + 1];
	bool have_cp; /* a signed head checkpoint lies ahead on the chain */
	long long cp_seq;
	char cp_hash[AUDIT_HASH_LEN + 1];
	long long last_seq; /* last event accepted (or the anchor) */
	char last_hash[AUDIT_HASH_LEN + 1];
	char last_id[37]; /* id of the last event accepted, "" for the anchor or genesis */
	struct audit_verify_result r;
	bool in_cb;
};

static void audit_verify_cb_db(void *arg, enum db_event ev, const PGresult *res);

static void audit_verify_free(struct audit_verify *v)
{
	db_tx_rollback(v->tx);
	EVP_MD_CTX_free(v->md);
	free(v);
}

/* Report status/ok/reason to the caller once, end the snapshot and free v. */
static void audit_verify_finish(struct audit_verify *v, int status, bool ok, const char *reason,
                                const char *bad_id)
{
	json_t *f;

	v->state = AUDIT_VERIFY_DONE;
	v->r.status = status;
	v->r.ok = status == 0 && ok;
	v->r.reason = reason;
	snprintf(v->r.first_bad_event_id, sizeof(v->r.first_bad_event_id), "%s",
	         bad_id != NULL ? bad_id : "");
	if (status == 0 && !ok) {
		f = json_pack("{s:s, s:s, s:s, s:I}", "org_id", v->org_id, "reason", reason,
		              "first_bad_event_id", v->r.first_bad_event_id, "events_checked",
		              (json_int_t)v->r.events_checked);
		log_fields(LOG_LVL_WARN, "audit_chain_broken", f);
	} else if (status == -1) {
		log_warnx("audit_verify_failed", "org %s: %s", v->org_id, reason);
	}
	db_tx_rollback(v->tx);
	v->tx = NULL;
	v->in_cb = true;
	v->cb(v->arg, &v->r);
	audit_verify_free(v);
}

static bool audit_verify_page(struct audit_verify *v)
{
	char after[24];
	const char *p[2] = { v->org_id, after };

	snprintf(after, sizeof(after), "%lld", v->last_seq);
	v->state = AUDIT_VERIFY_PAGE;
	return db_tx_query(v->tx, audit_sql_page, 2, p, audit_verify_cb_db, v) != NULL;
}

/* Take the head, anchor and checkpoint from the bounds row; false when v was finished. */
static bool audit_verify_bounds(struct audit_verify *v, const PGresult *res)
{
	struct audit_checkpoint cp;

	if (PQntuples(res) != 1 || PQnfields(res) != 12) {
		audit_verify_finish(v, -1, false, "bad_bounds_result", NULL);
		return false;
	}
	if (!PQgetisnull(res, 0, 0)) {
		v->head_seq = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
		snprintf(v->head_hash, sizeof(v->head_hash), "%s", PQgetvalue(res, 0, 1));
	}
	if (!PQgetisnull(res, 0, 2)) {
		cp = (struct audit_checkpoint){
			.org_id = v->org_id,
			.seq = strtoll(PQgetvalue(res, 0, 2), NULL, 10),
			.hash = PQgetvalue(res, 0, 3),
			.signed_at = PQgetvalue(res, 0, 4),
			.signature = PQgetvalue(res, 0, 5),
			.key_id = PQgetvalue(res, 0, 6),
		};
		if (audit_checkpoint_verify(&cp) == -1) {
			audit_verify_finish(v, 0, false,
			                    audit.verify_key != NULL ? "anchor_signature_invalid"
			                                             : "no_verify_key",
			                    NULL);
			return false;
		}
		v->last_seq = cp.seq;
		snprintf(v->last_hash, sizeof(v->last_hash), "%s", cp.hash);
	}
	if (!PQgetisnull(res, 0, 7)) {
		cp = (struct audit_checkpoint){
			.org_id = v->org_id,
			.seq = strtoll(PQgetvalue(res, 0, 7), NULL, 10),
			.hash = PQgetvalue(res, 0, 8),
			.signed_at = PQgetvalue(res, 0, 9),
			.signature = PQgetvalue(res, 0, 10),
			.key_id = PQgetvalue(res, 0, 11),
		};
		if (audit_checkpoint_verify(&cp) == -1) {
			audit_verify_finish(v, 0, false,
			                    audit.verify_key != NULL
			                        ? "checkpoint_signature_invalid"
			                        : "no_verify_key",
			                    NULL);
			return false;
		}
		/* A checkpoint at or before the anchor covers only pruned events. */
		if (cp.seq > v->last_seq) {
			v->have_cp = true;
			v->cp_seq = cp.seq;
			snprintf(v->cp_hash, sizeof(v->cp_hash), "%s", cp.hash);
		}
	}
	return true;
}

/* SHA-256(prev "\n" canonical) as hex into out; -1 on an OpenSSL failure. */
static int audit_verify_hash(struct audit_verify *v, const char *prev, const unsigned char *canon,
                             size_t len, char out[AUDIT_HASH_LEN + 1])
{
	unsigned char md[32];
	unsigned int mdlen = 0;

	if (EVP_DigestInit_ex(v->md, audit.sha256, NULL) != 1 ||
	    EVP_DigestUpdate(v->md, prev, strlen(prev)) != 1 ||
	    EVP_DigestUpdate(v->md, "\n", 1) != 1 || EVP_DigestUpdate(v->md, canon, len) != 1 ||
	    EVP_DigestFinal_ex(v->md, md, &mdlen) != 1 || mdlen != sizeof(md)) {
		ERR_clear_error();
		return -1;
	}
	cs_hex(out, md, sizeof(md));
	return 0;
}

/*
 * Check one page of events against the chain so far. Returns the reason
 * for the first bad event (its id in *bad_id), NULL when all matched, or
 * "internal" on a local failure.
 */
static const char *audit_verify_rows(struct audit_verify *v, const PGresult *res,
                                     const char **bad_id)
{
	char hash[AUDIT_HASH_LEN + 1];
	const char *reason = NULL;
	unsigned char *canon;
	size_t clen = 0;
	long long seq;

	for (int i = 0; i < PQntuples(res); i++) {
		*bad_id = PQgetvalue(res, i, 0);
		seq = strtoll(PQgetvalue(res, i, 1), NULL, 10);
		v->r.events_checked++;
		if (seq > v->head_seq)
			return "beyond_head";
		if (seq != v->last_seq + 1)
			return "seq_gap";
		if (strcmp(PQgetvalue(res, i, 2), v->last_hash) != 0)
			return "prev_hash_mismatch";
		if (PQgetisnull(res, i, 4))
			return "hash_mismatch";
		canon = PQunescapeBytea((const unsigned char *)PQgetvalue(res, i, 4), &clen);
		if (canon == NULL)
			return "internal";
		if (audit_verify_hash(v, v->last_hash, canon, clen, hash) == -1)
			reason = "internal";
		else if (strcmp(hash, PQgetvalue(res, i, 3)) != 0)
			reason = "hash_mismatch";
		else if (v->have_cp && seq == v->cp_seq && strcmp(hash, v->cp_hash) != 0)
			reason = "checkpoint_mismatch";
		PQfreemem(canon);
		if (reason != NULL)
			return reason;
		v->last_seq = seq;
		memcpy(v->last_hash, hash, sizeof(hash));
		snprintf(v->last_id, sizeof(v->last_id), "%s", *bad_id);
	}
	*bad_id = NULL;
	return NULL;
}

/* The chain ended: it must end at the head and pass through the checkpoint. */
static void audit_verify_end(struct audit_verify *v)
{
	if (v->have_cp && v->cp_seq > v->last_seq) {
		audit_verify_finish(v, 0, false, "checkpoint_missing", NULL);
		return;
	}
	if (v->last_seq != v->head_seq) {
		audit_verify_finish(v, 0, false, "head_mismatch", NULL);
		return;
	}
	if (strcmp(v->last_hash, v->head_hash) != 0) {
		/* The last event was rewritten with a consistent hash, or the head edited. */
		audit_verify_finish(v, 0, false, "head_mismatch",
		                    v->last_id[0] != '\0' ? v->last_id : NULL);
		return;
	}
	audit_verify_finish(v, 0, true, "ok", NULL);
}

static void audit_verify_advance(struct audit_verify *v, enum db_event ev, const PGresult *res)
{
	const char *reason, *bad_id = NULL;

	if (v->state == AUDIT_VERIFY_DONE)
		return;
	if (ev != DB_OK) {
		audit_verify_finish(v, -1, false,
		                    ev == DB_TIMEOUT ? "timeout"
		                    : ev == DB_ERROR ? "query_failed"
		                                     : "unavailable",
		                    NULL);
		return;
	}
	switch (v->state) {
	case AUDIT_VERIFY_SNAPSHOT:
		v->state = AUDIT_VERIFY_BOUNDS; /* the bounds query is already queued */
		break;
	case AUDIT_VERIFY_BOUNDS:
		if (!audit_verify_bounds(v, res))
			return;
		if (!audit_verify_page(v))
			audit_verify_finish(v, -1, false, "unavailable", NULL);
		break;
	case AUDIT_VERIFY_PAGE:
		reason = audit_verify_rows(v, res, &bad_id);
		if (reason != NULL && strcmp(reason, "internal") == 0) {
			audit_verify_finish(v, -1, false, reason, NULL);
		} else if (reason != NULL) {
			audit_verify_finish(v, 0, false, reason, bad_id);
		} else if (PQntuples(res) == AUDIT_VERIFY_PAGE_ROWS) {
			if (!audit_verify_page(v))
				audit_verify_finish(v, -1, false, "unavailable", NULL);
		} else {
			audit_verify_end(v);
		}
		break;
	case AUDIT_VERIFY_DONE:
		break;
	}
}

static void audit_verify_cb_db(void *arg, enum db_event ev, const PGresult *res)
{
	audit_verify_advance(arg, ev, res);
}

/* Recompute org_id's chain. */
struct audit_verify *audit_verify_start(struct db_pool *pool, const char *org_id,
                                        audit_verify_cb cb, void *arg)
{
	const char *p[1];
	struct audit_verify *v;

	if (pool == NULL || cb == NULL || !cs_uuid_valid(org_id))
		return NULL;
	if (!audit.ready) {
		log_warnx("audit_verify_failed", "audit_init has not run");
		return NULL;
	}
	v = xcalloc(1, sizeof(*v));
	v->cb = cb;
	v->arg = arg;
	v->state = AUDIT_VERIFY_SNAPSHOT;
	for (int i = 0; i < 36; i++)
		v->org_id[i] =
		    (char)(org_id[i] >= 'A' && org_id[i] <= 'F' ? org_id[i] + 32 : org_id[i]);
	memcpy(v->head_hash, AUDIT_GENESIS_HASH, sizeof(v->head_hash));
	memcpy(v->last_hash, AUDIT_GENESIS_HASH, sizeof(v->last_hash));
	v->r.reason = "running";
	if ((v->md = EVP_MD_CTX_new()) == NULL)
		fatalx("oom", "EVP_MD_CTX_new");
	p[0] = v->org_id;
	v->tx = db_tx_begin(pool, NULL, NULL);
	if (v->tx == NULL ||
	    db_tx_query(v->tx, "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY", 0,
	                NULL, audit_verify_cb_db, v) == NULL ||
	    db_tx_query(v->tx, audit_sql_bounds, 1, p, audit_verify_cb_db, v) == NULL) {
		audit_verify_free(v);
		return NULL;
	}
	return v;
}

/* Stop a verification. */
void audit_verify_cancel(struct audit_verify *v)
{
	if (v == NULL || v->in_cb)
		return;
	audit_verify_free(v);
}

/* The API's view of a result. */
json_t *audit_verify_result_json(const struct audit_verify_result *r)
{
	return json_pack("{s:b, s:I, s:s?}", "ok", r->ok, "events_checked",
	                 (json_int_t)r->events_checked, "first_bad_event_id",
	                 r->first_bad_event_id[0] != '\0' ? r->first_bad_event_id : NULL);
}

/* ---- checkpoints ---- */

static char *audit_cp_message(const char *org_id, long long seq, const char *hash,
                              const char *signed_at)
{
	return xasprintf("%s|%lld|%s|%s", org_id, seq, hash, signed_at);
}

/* Base64 Ed25519 signature of msg, or NULL. */
static char *audit_sign_message(const char *msg)
{
	unsigned char sig[AUDIT_ED25519_SIG_LEN];
	size_t siglen = sizeof(sig);

	if (EVP_MD_CTX_reset(audit.sign_ctx) != 1 ||
	    EVP_DigestSignInit(audit.sign_ctx, NULL, NULL, NULL, audit.sign_key) != 1 ||
	    EVP_DigestSign(audit.sign_ctx, sig, &siglen, (const unsigned char *)msg, strlen(msg)) !=
	        1 ||
	    siglen != sizeof(sig)) {
		audit_ssl_fail("audit_sign_failed", "Ed25519 signature");
		return NULL;
	}
	return audit_b64_encode(sig, siglen);
}

/* Check cp's signature with the loaded key. */
int audit_checkpoint_verify(const struct audit_checkpoint *cp)
{
	unsigned char sig[AUDIT_ED25519_SIG_LEN + 3];
	EVP_MD_CTX *ctx;
	char *msg;
	int n, rc = -1;

	if (cp == NULL || audit.verify_key == NULL || cp->org_id == NULL || cp->hash == NULL ||
	    cp->signed_at == NULL || cp->signature == NULL || cp->key_id == NULL)
		return -1;
	if (strcmp(cp->key_id, audit.key_id) != 0 ||
	    strlen(cp->signature) != 4 * ((AUDIT_ED25519_SIG_LEN + 2) / 3))
		return -1;
	n = audit_b64_decode(cp->signature, strlen(cp->signature), sig);
	if (n != AUDIT_ED25519_SIG_LEN)
		return -1;
	if ((ctx = EVP_MD_CTX_new()) == NULL)
		fatalx("oom", "EVP_MD_CTX_new");
	msg = audit_cp_message(cp->org_id, cp->seq, cp->hash, cp->signed_at);
	if (EVP_DigestVerifyInit(ctx, NULL, NULL, NULL, audit.verify_key) == 1 &&
	    EVP_DigestVerify(ctx, sig, AUDIT_ED25519_SIG_LEN, (const unsigned char *)msg,
	                     strlen(msg)) == 1)
		rc = 0;
	ERR_clear_error();
	EVP_MD_CTX_free(ctx);
	free(msg);
	return rc;
}

enum audit_sign_state {
	AUDIT_SIGN_SELECT, /* reading the next batch of positions to sign */
	AUDIT_SIGN_STORE,  /* storing the signed batch */
	AUDIT_SIGN_DONE,   /* the caller has been told */
};

struct audit_sign {
	enum audit_sign_state state;
	struct db_pool *pool;
	struct db_query *q; /* in flight; cancelled by audit_sign_cancel */
	audit_sign_cb cb;
	void *arg;
	bool anchor;     /* one retention anchor rather than every head */
	char org_id[37]; /* anchor: the organization */
	char *before;    /* anchor: cut-off time (owned) */
	char after[37];  /* heads: last org id of the previous batch, "" at first */
	int batch;       /* rows in the batch being stored */
	int nsigned;
	bool in_cb;
};

static void audit_sign_cb_db(void *arg, enum db_event ev, const PGresult *res);

static void audit_sign_finish(struct audit_sign *s, int status)
{
	s->state = AUDIT_SIGN_DONE;
	s->q = NULL;
	if (status == 0 && s->nsigned > 0)
		log_info("audit_checkpoints_signed", "%d %s checkpoint(s) signed", s->nsigned,
		         s->anchor ? "retention" : "head");
	s->in_cb = true;
	s->cb(s->arg, status, s->nsigned);
	free(s->before);
	free(s);
}

static bool audit_sign_select(struct audit_sign *s)
{
	const char *p[2];

	s->state = AUDIT_SIGN_SELECT;
	if (s->anchor) {
		p[0] = s->org_id;
		p[1] = s->before;
		s->q = db_query(s->pool, audit_sql_anchor, 2, p, audit_sign_cb_db, s);
	} else {
		p[0] = s->after[0] != '\0' ? s->after : NULL;
		s->q = db_query(s->pool, audit_sql_heads, 1, p, audit_sign_cb_db, s);
	}
	return s->q != NULL;
}

/* Append "elem" (quoted) to a Postgres array literal under construction. */
static void audit_array_add(char **arr, size_t *len, const char *elem)
{
	size_t n = strlen(elem);

	*arr = xrealloc(*arr, *len + n + 4);
	(*arr)[*len] = *len == 0 ? '{' : ',';
	(*len)++;
	(*arr)[(*len)++] = '"';
	memcpy(*arr + *len, elem, n);
	*len += n;
	(*arr)[(*len)++] = '"';
	(*arr)[*len] = '\0';
}

/* Sign every row of res and queue their insert; false on failure (nothing queued). */
static bool audit_sign_store(struct audit_sign *s, const PGresult *res)
{
	char *arr[5] = { NULL }, *msg, *sig;
	size_t len[5] = { 0 };
	const char *p[7];
	bool done = false;
	int n = PQntuples(res);

	for (int i = 0; i < n; i++) {
		const char *org = PQgetvalue(res, i, 0), *seq = PQgetvalue(res, i, 1);
		const char *hash = PQgetvalue(res, i, 2), *at = PQgetvalue(res, i, 3);

		msg = audit_cp_message(org, strtoll(seq, NULL, 10), hash, at);
		sig = audit_sign_message(msg);
		free(msg);
		if (sig == NULL)
			goto out;
		audit_array_add(&arr[0], &len[0], org);
		audit_array_add(&arr[1], &len[1], seq);
		audit_array_add(&arr[2], &len[2], hash);
		audit_array_add(&arr[3], &len[3], at);
		audit_array_add(&arr[4], &len[4], sig);
		free(sig);
		snprintf(s->after, sizeof(s->after), "%s", org);
	}
	for (int i = 0; i < 5; i++) {
		arr[i] = xrealloc(arr[i], len[i] + 2);
		arr[i][len[i]++] = '}';
		arr[i][len[i]] = '\0';
	}
	p[0] = s->anchor ? "retention" : "head";
	p[1] = audit.key_id;
	for (int i = 0; i < 5; i++)
		p[i + 2] = arr[i];
	s->batch = n;
	s->state = AUDIT_SIGN_STORE;
	s->q = db_query(s->pool, audit_sql_store, 7, p, audit_sign_cb_db, s);
	done = s->q != NULL;
out:
	for (int i = 0; i < 5; i++)
		free(arr[i]);
	return done;
}

static void audit_sign_advance(struct audit_sign *s, enum db_event ev, const PGresult *res)
{
	s->q = NULL;
	if (s->state == AUDIT_SIGN_DONE)
		return;
	if (ev != DB_OK) {
		log_warnx("audit_sign_failed", "%s checkpoints: database %s",
		          s->anchor ? "retention" : "head",
		          ev == DB_ERROR ? "error" : "unavailable");
		audit_sign_finish(s, -1);
		return;
	}
	switch (s->state) {
	case AUDIT_SIGN_SELECT:
		if (PQntuples(res) == 0)
			audit_sign_finish(s, 0);
		else if (!audit_sign_store(s, res))
			audit_sign_finish(s, -1);
		break;
	case AUDIT_SIGN_STORE:
		s->nsigned += PQntuples(res) == 1 ? atoi(PQgetvalue(res, 0, 0)) : 0;
		if (s->anchor || s->batch < AUDIT_SIGN_BATCH)
			audit_sign_finish(s, 0);
		else if (!audit_sign_select(s))
			audit_sign_finish(s, -1);
		break;
	case AUDIT_SIGN_DONE:
		break;
	}
}

static void audit_sign_cb_db(void *arg, enum db_event ev, const PGresult *res)
{
	audit_sign_advance(arg, ev, res);
}

static struct audit_sign *audit_sign_new(struct db_pool *pool, audit_sign_cb cb, void *arg)
{
	struct audit_sign *s;

	if (pool == NULL || cb == NULL)
		return NULL;
	if (audit.sign_key == NULL) {
		log_warnx("audit_sign_failed", "no signing key loaded");
		return NULL;
	}
	s = xcalloc(1, sizeof(*s));
	s->pool = pool;
	s->cb = cb;
	s->arg = arg;
	return s;
}

/* Sign every chain head that advanced since its last checkpoint. */
struct audit_sign *audit_checkpoint_sign(struct db_pool *pool, audit_sign_cb cb, void *arg)
{
	struct audit_sign *s = audit_sign_new(pool, cb, arg);

	if (s == NULL)
		return NULL;
	if (!audit_sign_select(s)) {
		free(s);
		return NULL;
	}
	return s;
}

/* Sign a retention anchor at org_id's last event before `before`. */
struct audit_sign *audit_anchor_sign(struct db_pool *pool, const char *org_id, const char *before,
                                     audit_sign_cb cb, void *arg)
{
	struct audit_sign *s;

	if (!cs_uuid_valid(org_id) || before == NULL)
		return NULL;
	if ((s = audit_sign_new(pool, cb, arg)) == NULL)
		return NULL;
	s->anchor = true;
	snprintf(s->org_id, sizeof(s->org_id), "%s", org_id);
	s->before = xstrdup(before);
	if (!audit_sign_select(s)) {
		free(s->before);
		free(s);
		return NULL;
	}
	return s;
}

/* Stop a signing run. */
void audit_sign_cancel(struct audit_sign *s)
{
	if (s == NULL || s->in_cb)
		return;
	db_query_cancel(s->q);
	free(s->before);
	free(s);
}
