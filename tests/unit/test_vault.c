/*
 * test_vault.c - TAP tests for the vault's key ring and envelope
 * encryption. Nothing but OpenSSL and a private temporary directory: key
 * directories are built there with the modes and names under test, the
 * environment form is parsed from strings. Tampering is exhaustive: every
 * byte of a blob, in its text and in its decoded body, is altered in turn
 * and must not open. Ends with an informational throughput figure.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/evp.h>
#include <openssl/rand.h>

#include "cloudsweep/log.h"
#include "cloudsweep/util.h"
#include "cloudsweep/vault.h"
#include "tap.h"

#define ORG   "6f1c2a3e-0b7d-4e59-9c1a-2b3c4d5e6f70"
#define REC   "0d9e8f7a-6b5c-4d3e-8f2a-1b0c9d8e7f6a"
#define FIELD "secret_access_key"

static char root[] = "/tmp/cs_test_vault_XXXXXX";
static const char secret[] = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";

/* ---- helpers ---- */

static char *b64(const unsigned char *in, size_t len)
{
	char *out = xmalloc(4 * ((len + 2) / 3) + 1);

	EVP_EncodeBlock((unsigned char *)out, in, (int)len);
	return out;
}

/* A fresh subdirectory of root with the given mode; its path (the caller frees). */
static char *mkdir_in_root(const char *name, mode_t mode)
{
	char *path = xasprintf("%s/%s", root, name);

	if (mkdir(path, 0700) == -1 || chmod(path, mode) == -1) {
		printf("# mkdir %s: %s\n", path, strerror(errno));
		exit(1);
	}
	return path;
}

static void write_file(const char *dir, const char *name, const void *data, size_t len, mode_t mode)
{
	char *path = xasprintf("%s/%s", dir, name);
	int fd;

	unlink(path);
	fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0600);
	if (fd == -1 || write(fd, data, len) != (ssize_t)len || fchmod(fd, mode) == -1) {
		printf("# write %s: %s\n", path, strerror(errno));
		exit(1);
	}
	close(fd);
	free(path);
}

static void random_key(unsigned char key[32])
{
	if (RAND_bytes(key, 32) != 1)
		exit(1);
}

/* "1:<b64>" for a random key. */
static char *spec_entry(int version)
{
	unsigned char key[32];
	char *k, *s;

	random_key(key);
	k = b64(key, sizeof(key));
	s = xasprintf("%d:%s", version, k);
	free(k);
	return s;
}

static bool loads_spec(const char *spec)
{
	struct vault_keyring *kr = vault_keyring_load(NULL, spec);
	bool ok_ = kr != NULL;

	vault_keyring_free(kr);
	return ok_;
}

static bool loads_dir(const char *dir)
{
	struct vault_keyring *kr = vault_keyring_load_dir(dir);
	bool ok_ = kr != NULL;

	vault_keyring_free(kr);
	return ok_;
}

/* Whether blob opens for the binding to exactly want. */
static bool opens_to(struct vault_keyring *kr, const char *org, const char *rec, const char *field,
                     const char *blob, const void *want, size_t wantlen)
{
	unsigned char *out = NULL;
	size_t outlen = 0;
	bool ok_;

	if (vault_open(kr, org, rec, field, blob, &out, &outlen) == -1)
		return false;
	ok_ = outlen == wantlen && memcmp(out, want, wantlen) == 0 && out[outlen] == '\0';
	vault_secret_free(out, outlen);
	return ok_;
}

/* Whether blob fails to open, leaving out NULL. */
static bool refused(struct vault_keyring *kr, const char *org, const char *rec, const char *field,
                    const char *blob)
{
	unsigned char *out = (unsigned char *)"sentinel";
	size_t outlen = 99;

	return vault_open(kr, org, rec, field, blob, &out, &outlen) == -1 && out == NULL &&
	       outlen == 0;
}

/* Decode a blob's body (malloc'ed, *len bytes), or NULL. */
static unsigned char *blob_body(const char *blob, size_t *len)
{
	const char *p = strchr(blob + 3, ':');
	size_t n;
	unsigned char *out;
	int r;

	if (p == NULL)
		return NULL;
	p++;
	n = strlen(p);
	out = xmalloc(n / 4 * 3 + 1);
	r = vault_b64_decode(p, n, out, n / 4 * 3 + 1);
	if (r < 0) {
		free(out);
		return NULL;
	}
	*len = (size_t)r;
	return out;
}

static void quiet(bool on)
{
	log_set_level(on ? LOG_LVL_ERROR : LOG_LVL_INFO);
}

/* ---- key ring: environment form ---- */

static void test_spec(void)
{
	char *e1 = spec_entry(1), *e2 = spec_entry(2), *e7 = spec_entry(7), *s;
	unsigned char key[32];
	char *k;
	struct vault_keyring *kr;

	s = xasprintf("%s,%s", e1, e2);
	kr = vault_keyring_load(NULL, s);
	ok(kr != NULL, "spec: two keys load");
	if (kr != NULL) {
		is_int(vault_keyring_count(kr), 2, "spec: two versions");
		is_int(vault_keyring_current_version(kr), 2, "spec: current is the highest");
		ok(vault_keyring_has_version(kr, 1) && !vault_keyring_has_version(kr, 3),
		   "spec: has_version");
	}
	vault_keyring_free(kr);
	free(s);

	s = xasprintf(" %s ,\n %s\n", e7, e1);
	kr = vault_keyring_load(NULL, s);
	ok(kr != NULL && vault_keyring_current_version(kr) == 7 && vault_keyring_count(kr) == 2,
	   "spec: whitespace around entries, any order, gaps in versions");
	vault_keyring_free(kr);
	free(s);

	setenv(VAULT_KEKS_ENV, e2, 1);
	kr = vault_keyring_load_env();
	ok(kr != NULL && vault_keyring_current_version(kr) == 2, "env: " VAULT_KEKS_ENV " is read");
	vault_keyring_free(kr);
	unsetenv(VAULT_KEKS_ENV);

	quiet(true);
	ok(vault_keyring_load_env() == NULL, "env: unset variable refused");
	s = xasprintf("%s,%s", e1, e1);
	ok(!loads_spec(s), "spec: duplicate version refused");
	free(s);
	s = xasprintf("%s,", e1);
	ok(!loads_spec(s), "spec: empty entry refused");
	free(s);
	ok(!loads_spec(""), "spec: empty refused");
	s = xasprintf("0%s", e1);
	ok(!loads_spec(s), "spec: leading zero in version refused");
	free(s);
	s = xasprintf("0:%s", strchr(e1, ':') + 1);
	ok(!loads_spec(s), "spec: version 0 refused");
	free(s);
	s = xasprintf("10000000:%s", strchr(e1, ':') + 1);
	ok(!loads_spec(s), "spec: version above the maximum refused");
	free(s);
	s = xasprintf("x:%s", strchr(e1, ':') + 1);
	ok(!loads_spec(s), "spec: non-numeric version refused");
	free(s);
	ok(!loads_spec(strchr(e1, ':') + 1), "spec: missing version refused");

	random_key(key);
	k = b64(key, 31);
	s = xasprintf("1:%s", k);
	ok(!loads_spec(s), "spec: 31-byte key refused");
	free(s);
	free(k);
	k = b64(key, 32);
	s = xasprintf("1:%sAAAA", k);
	ok(!loads_spec(s), "spec: key with base64 beyond 32 bytes refused");
	free(s);
	free(k);
	s = xasprintf("1:%.43s", strchr(e1, ':') + 1);
	ok(!loads_spec(s), "spec: unpadded base64 refused");
	free(s);
	s = xasprintf("1:%.42s!=", strchr(e1, ':') + 1);
	ok(!loads_spec(s), "spec: invalid base64 refused");
	free(s);
	quiet(false);

	free(e1);
	free(e2);
	free(e7);
}

/* ---- key ring: key directory ---- */

static void test_dir(void)
{
	unsigned char key[33];
	char *dir, *k, *s, *path;
	struct vault_keyring *kr;

	random_key(key);
	dir = mkdir_in_root("ring", 0700);
	write_file(dir, "kek-1", key, 32, 0600);
	k = b64(key + 1, 32);
	s = xasprintf("%s\n", k);
	write_file(dir, "kek-2", s, strlen(s), 0400);
	free(s);
	free(k);
	write_file(dir, "README", "not a key", 9, 0644);
	write_file(dir, ".kek-new-abcdef", "junk", 4, 0600);
	kr = vault_keyring_load_dir(dir);
	ok(kr != NULL, "dir: raw and base64 key files load, other names ignored");
	ok(kr != NULL && vault_keyring_count(kr) == 2 && vault_keyring_current_version(kr) == 2,
	   "dir: versions 1 and 2, current 2");
	vault_keyring_free(kr);

	/* A raw key that ends in a newline byte stays raw. */
	key[31] = '\n';
	write_file(dir, "kek-1", key, 32, 0600);
	ok(loads_dir(dir), "dir: raw key ending in a newline byte loads");

	quiet(true);
	write_file(dir, "kek-3", key, 31, 0600);
	ok(!loads_dir(dir), "dir: 31-byte key file refused");
	write_file(dir, "kek-3", key, 33, 0600);
	ok(!loads_dir(dir), "dir: 33-byte key file refused");
	k = b64(key, 31);
	write_file(dir, "kek-3", k, strlen(k), 0600);
	ok(!loads_dir(dir), "dir: base64 of 31 bytes refused");
	free(k);
	write_file(dir, "kek-3", "", 0, 0600);
	ok(!loads_dir(dir), "dir: empty key file refused");

	write_file(dir, "kek-3", key, 32, 0640);
	ok(!loads_dir(dir), "dir: group-readable key file refused");
	write_file(dir, "kek-3", key, 32, 0604);
	ok(!loads_dir(dir), "dir: world-readable key file refused");
	write_file(dir, "kek-3", key, 32, 0600);
	ok(loads_dir(dir), "dir: the same file at 0600 loads");

	path = xasprintf("%s/kek-3", dir);
	unlink(path);
	s = xasprintf("%s/kek-1", dir);
	ok(symlink(s, path) == 0, "dir: symlink created");
	ok(!loads_dir(dir), "dir: symlinked key file refused");
	unlink(path);
	free(s);
	ok(mkdir(path, 0700) == 0 && !loads_dir(dir), "dir: a directory named like a key refused");
	rmdir(path);
	free(path);

	write_file(dir, "kek-01", key, 32, 0600);
	ok(!loads_dir(dir), "dir: kek-01 (leading zero) refused");
	path = xasprintf("%s/kek-01", dir);
	unlink(path);
	free(path);
	write_file(dir, "kek-two", key, 32, 0600);
	ok(!loads_dir(dir), "dir: kek-two refused");
	path = xasprintf("%s/kek-two", dir);
	unlink(path);
	free(path);
	ok(loads_dir(dir), "dir: loads again once the bad names are gone");

	s = spec_entry(2);
	kr = vault_keyring_load(dir, s);
	ok(kr == NULL, "dir + spec: the same version in both refused");
	vault_keyring_free(kr);
	free(s);
	s = spec_entry(9);
	kr = vault_keyring_load(dir, s);
	ok(kr != NULL && vault_keyring_current_version(kr) == 9 && vault_keyring_count(kr) == 3,
	   "dir + spec: combined");
	vault_keyring_free(kr);
	free(s);

	ok(chmod(dir, 0770) == 0 && !loads_dir(dir), "dir: group-writable directory refused");
	ok(chmod(dir, 0700) == 0, "dir: mode restored");
	free(dir);

	dir = mkdir_in_root("empty", 0700);
	ok(!loads_dir(dir), "dir: empty directory refused");
	free(dir);
	ok(!loads_dir("/nonexistent/cs_vault"), "dir: missing directory refused");
	ok(vault_keyring_load(NULL, NULL) == NULL, "no source refused");
	quiet(false);
}

/* ---- envelope ---- */

static void test_roundtrip(struct vault_keyring *kr)
{
	unsigned char bin[256], *big;
	char *blob, *blob2, *enc, *p;
	size_t bodylen = 0;
	unsigned char *body;
	bool found = false;

	blob = vault_seal(kr, ORG, REC, FIELD, secret, strlen(secret));
	ok(blob != NULL, "seal returns a blob");
	if (blob == NULL)
		return;
	ok(strncmp(blob, "v1:1:", 5) == 0, "blob starts with v1:<version>:");
	is_int(vault_blob_kek_version(blob), 1, "blob names KEK version 1");
	ok(opens_to(kr, ORG, REC, FIELD, blob, secret, strlen(secret)), "round trip");
	is_int(strlen(blob), 5 + 4 * ((VAULT_BODY_HEADER + strlen(secret) + 2) / 3),
	       "blob length as documented");

	/* The blob holds neither the secret nor its base64, at any alignment. */
	ok(strstr(blob, secret) == NULL, "blob does not contain the plaintext");
	for (size_t off = 0; off < 3; off++) {
		enc = b64((const unsigned char *)secret + off, strlen(secret) - off);
		enc[strlen(enc) - 4] = '\0'; /* the last group depends on what follows */
		if (strstr(blob, enc) != NULL)
			found = true;
		free(enc);
	}
	ok(!found, "blob does not contain the plaintext's base64");
	body = blob_body(blob, &bodylen);
	ok(body != NULL && bodylen == VAULT_BODY_HEADER + strlen(secret), "body decodes");
	found = false;
	for (size_t i = 0; body != NULL && i + 8 <= bodylen; i++)
		if (memcmp(body + i, secret, 8) == 0)
			found = true;
	ok(!found, "decoded body holds no 8 bytes of the plaintext");
	free(body);

	blob2 = vault_seal(kr, ORG, REC, FIELD, secret, strlen(secret));
	ok(blob2 != NULL && strcmp(blob, blob2) != 0, "two seals of the same plaintext differ");
	ok(opens_to(kr, ORG, REC, FIELD, blob2, secret, strlen(secret)), "the second opens too");
	free(blob2);
	free(blob);

	blob = vault_seal(kr, ORG, REC, FIELD, "", 0);
	ok(blob != NULL && opens_to(kr, ORG, REC, FIELD, blob, "", 0), "empty secret round trip");
	free(blob);
	for (size_t i = 0; i < sizeof(bin); i++)
		bin[i] = (unsigned char)i;
	blob = vault_seal(kr, ORG, REC, FIELD, bin, sizeof(bin));
	ok(blob != NULL && opens_to(kr, ORG, REC, FIELD, blob, bin, sizeof(bin)),
	   "binary secret with NUL bytes round trip");
	free(blob);
	big = xmalloc(VAULT_PLAINTEXT_MAX + 1);
	memset(big, 'x', VAULT_PLAINTEXT_MAX + 1);
	blob = vault_seal(kr, ORG, REC, FIELD, big, VAULT_PLAINTEXT_MAX);
	ok(blob != NULL && strlen(blob) <= VAULT_BLOB_MAX &&
	       opens_to(kr, ORG, REC, FIELD, blob, big, VAULT_PLAINTEXT_MAX),
	   "largest secret round trip");
	free(blob);
	quiet(true);
	ok(vault_seal(kr, ORG, REC, FIELD, big, VAULT_PLAINTEXT_MAX + 1) == NULL,
	   "secret above the maximum refused");
	free(big);
	ok(vault_seal(kr, "", REC, FIELD, secret, 3) == NULL, "empty org refused");
	ok(vault_seal(kr, ORG, NULL, FIELD, secret, 3) == NULL, "NULL record refused");
	p = xmalloc(VAULT_BINDING_MAX + 2);
	memset(p, 'f', VAULT_BINDING_MAX + 1);
	p[VAULT_BINDING_MAX + 1] = '\0';
	ok(vault_seal(kr, ORG, REC, p, secret, 3) == NULL, "overlong field name refused");
	p[VAULT_BINDING_MAX] = '\0';
	blob = vault_seal(kr, ORG, REC, p, secret, 3);
	ok(blob != NULL && opens_to(kr, ORG, REC, p, blob, secret, 3),
	   "field name of the maximum length works");
	free(blob);
	free(p);
	ok(vault_seal(kr, ORG, REC, FIELD, NULL, 3) == NULL, "NULL plaintext refused");
	quiet(false);
}

static void test_tamper(struct vault_keyring *kr)
{
	static const char alphabet[] =
	    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
	struct vault_keyring *kr2;
	char *blob, *copy, *enc, *t;
	unsigned char *body;
	size_t len, bodylen = 0, opened = 0, opened2 = 0, opened3 = 0, opened4 = 0;

	blob = vault_seal(kr, ORG, REC, FIELD, secret, strlen(secret));
	if (blob == NULL) {
		ok(0, "seal for tampering");
		return;
	}
	len = strlen(blob);
	copy = xstrdup(blob);
	quiet(true);

	/* Every position, flipped bit by bit and replaced by the next base64 character. */
	for (size_t i = 0; i < len; i++) {
		for (int bit = 0; bit < 8; bit++) {
			copy[i] = (char)(blob[i] ^ (1 << bit));
			if (copy[i] != '\0' && !refused(kr, ORG, REC, FIELD, copy))
				opened++;
		}
		t = strchr(alphabet, blob[i]);
		copy[i] = t != NULL ? alphabet[(t - alphabet + 1) % 64] : 'A';
		if (!refused(kr, ORG, REC, FIELD, copy))
			opened2++;
		copy[i] = blob[i];
	}
	ok(opened == 0, "every single-bit flip of every text byte fails to open (%zu opened)",
	   opened);
	ok(opened2 == 0, "every text byte replaced by another base64 character fails (%zu opened)",
	   opened2);

	/* Every byte of the decoded body, re-encoded canonically. */
	body = blob_body(blob, &bodylen);
	ok(body != NULL, "body decoded for tampering");
	for (size_t i = 0; body != NULL && i < bodylen; i++) {
		body[i] ^= 0x01;
		enc = b64(body, bodylen);
		t = xasprintf("v1:1:%s", enc);
		if (!refused(kr, ORG, REC, FIELD, t))
			opened3++;
		free(t);
		free(enc);
		body[i] ^= 0x01;
	}
	ok(opened3 == 0, "every flipped byte of the decoded body fails to open (%zu opened)",
	   opened3);
	free(body);

	/* Every truncation. */
	for (size_t i = 0; i < len; i++) {
		copy[i] = '\0';
		if (!refused(kr, ORG, REC, FIELD, copy))
			opened4++;
		copy[i] = blob[i];
	}
	ok(opened4 == 0, "every truncation fails to open (%zu opened)", opened4);
	ok(strcmp(copy, blob) == 0 && opens_to(kr, ORG, REC, FIELD, copy, secret, strlen(secret)),
	   "the untouched blob still opens");

	/* Moved to another place. */
	ok(refused(kr, "7f1c2a3e-0b7d-4e59-9c1a-2b3c4d5e6f70", REC, FIELD, blob),
	   "another org fails");
	ok(refused(kr, ORG, "1d9e8f7a-6b5c-4d3e-8f2a-1b0c9d8e7f6a", FIELD, blob),
	   "another record fails");
	ok(refused(kr, ORG, REC, "external_id", blob), "another field fails");
	ok(refused(kr, REC, ORG, FIELD, blob), "org and record swapped fails");
	free(blob);
	blob = vault_seal(kr, ORG, "ab", "c", secret, strlen(secret));
	ok(blob != NULL && refused(kr, ORG, "a", "bc", blob) &&
	       opens_to(kr, ORG, "ab", "c", blob, secret, strlen(secret)),
	   "(\"ab\",\"c\") does not open as (\"a\",\"bc\")");

	/* Garbage. */
	ok(refused(kr, ORG, REC, FIELD, NULL), "NULL blob fails");
	ok(refused(kr, ORG, REC, FIELD, ""), "empty blob fails");
	ok(refused(kr, ORG, REC, FIELD, "v1:"), "bare prefix fails");
	ok(refused(kr, ORG, REC, FIELD, "v1:1:"), "no body fails");
	ok(refused(kr, ORG, REC, FIELD, "hello world"), "text fails");
	t = xasprintf("v2%s", blob + 2);
	ok(refused(kr, ORG, "ab", "c", t), "format version 2 fails");
	free(t);
	t = xasprintf("v1:01%s", blob + 4);
	ok(refused(kr, ORG, "ab", "c", t), "version with a leading zero fails");
	free(t);
	t = xasprintf("v1:9%s", blob + 4);
	ok(refused(kr, ORG, "ab", "c", t), "unknown KEK version fails");
	free(t);
	t = xasprintf("%s\n", blob);
	ok(refused(kr, ORG, "ab", "c", t), "trailing newline fails");
	free(t);
	t = xasprintf("%sAAAA", blob);
	ok(refused(kr, ORG, "ab", "c", t), "appended base64 fails");
	free(t);
	t = xasprintf(" %s", blob);
	ok(refused(kr, ORG, "ab", "c", t), "leading space fails");
	free(t);
	t = xmalloc(VAULT_BLOB_MAX + 2);
	memcpy(t, "v1:1:", 5);
	memset(t + 5, 'A', VAULT_BLOB_MAX - 4);
	t[VAULT_BLOB_MAX + 1] = '\0';
	ok(refused(kr, ORG, REC, FIELD, t), "overlong blob fails");
	free(t);
	free(blob);

	/* Two versions holding the same key: only the authenticated version tells them apart. */
	t = xasprintf("1:%s,2:%s", "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
	              "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=");
	kr2 = vault_keyring_load(NULL, t);
	free(t);
	blob = kr2 != NULL ? vault_seal(kr2, ORG, REC, FIELD, secret, strlen(secret)) : NULL;
	ok(blob != NULL && strncmp(blob, "v1:2:", 5) == 0 &&
	       opens_to(kr2, ORG, REC, FIELD, blob, secret, strlen(secret)),
	   "same key under versions 1 and 2: sealed with 2");
	if (blob != NULL)
		blob[3] = '1';
	ok(blob != NULL && refused(kr2, ORG, REC, FIELD, blob),
	   "same key: the blob relabelled as version 1 fails (version is authenticated)");
	vault_keyring_free(kr2);

	is_int(vault_blob_kek_version("v1:12:AAAA"), 12, "kek version of a well-formed prefix");
	is_int(vault_blob_kek_version("v1:012:AAAA"), -1, "kek version: leading zero");
	is_int(vault_blob_kek_version("v1:12"), -1, "kek version: no second colon");
	is_int(vault_blob_kek_version("v1:123456789:A"), -1, "kek version: too many digits");
	is_int(vault_blob_kek_version(NULL), -1, "kek version: NULL");
	quiet(false);
	free(blob);
	free(copy);
}

/* ---- rotation ---- */

static bool file_mode_is(const char *dir, const char *name, mode_t mode)
{
	char *path = xasprintf("%s/%s", dir, name);
	struct stat st;
	bool r = lstat(path, &st) == 0 && S_ISREG(st.st_mode) && (st.st_mode & 07777) == mode;

	free(path);
	return r;
}

static bool exists(const char *dir, const char *name)
{
	char *path = xasprintf("%s/%s", dir, name);
	bool r = access(path, F_OK) == 0;

	free(path);
	return r;
}

static void test_rotation(void)
{
	struct vault_keyring *kr, *kr2;
	char *dir, *b1, *b2, *rw, *again;
	unsigned char *body1 = NULL, *bodyrw = NULL;
	size_t len1 = 0, lenrw = 0;
	int v;

	dir = mkdir_in_root("rotate", 0700);
	quiet(true);
	ok(vault_keyring_load_dir(dir) == NULL, "rotate: empty ring refused before the first key");
	quiet(false);
	is_int(vault_keyring_rotate(dir), 1, "rotate: the first key is version 1");
	ok(file_mode_is(dir, "kek-1", 0600), "rotate: kek-1 written at 0600");
	kr = vault_keyring_load_dir(dir);
	ok(kr != NULL && vault_keyring_current_version(kr) == 1, "rotate: ring at version 1");
	if (kr == NULL)
		return;
	b1 = vault_seal(kr, ORG, REC, FIELD, secret, strlen(secret));
	is_int(vault_blob_kek_version(b1), 1, "rotate: old blob on version 1");

	v = vault_keyring_rotate(dir);
	is_int(v, 2, "rotate: next version is 2");
	ok(file_mode_is(dir, "kek-2", 0600), "rotate: kek-2 written at 0600");
	is_int(vault_keyring_current_version(kr), 1, "rotate: a loaded ring is unchanged");
	kr2 = vault_keyring_load_dir(dir);
	ok(kr2 != NULL && vault_keyring_current_version(kr2) == 2, "rotate: reload picks it up");
	if (kr2 == NULL)
		return;
	vault_keyring_free(kr);
	kr = kr2;

	ok(opens_to(kr, ORG, REC, FIELD, b1, secret, strlen(secret)),
	   "rotate: old blob still opens");
	b2 = vault_seal(kr, ORG, REC, FIELD, secret, strlen(secret));
	is_int(vault_blob_kek_version(b2), 2, "rotate: new blob uses version 2");
	ok(opens_to(kr, ORG, REC, FIELD, b2, secret, strlen(secret)), "rotate: new blob opens");

	rw = vault_rewrap(kr, ORG, REC, FIELD, b1);
	ok(rw != NULL, "rewrap: returns a blob");
	is_int(vault_blob_kek_version(rw), 2, "rewrap: moved to version 2");
	ok(rw != NULL && opens_to(kr, ORG, REC, FIELD, rw, secret, strlen(secret)),
	   "rewrap: opens to the same secret");
	body1 = blob_body(b1, &len1);
	bodyrw = rw != NULL ? blob_body(rw, &lenrw) : NULL;
	ok(body1 != NULL && bodyrw != NULL && len1 == lenrw &&
	       memcmp(body1 + 60, bodyrw + 60, len1 - 60) == 0 && memcmp(body1, bodyrw, 60) != 0,
	   "rewrap: data nonce, tag and ciphertext untouched, only the wrapped key changes");
	free(body1);
	free(bodyrw);
	quiet(true);
	ok(vault_rewrap(kr, ORG, REC, "external_id", b1) == NULL,
	   "rewrap: refused for another field");
	ok(vault_rewrap(kr, ORG, REC, FIELD, "v1:1:garbage") == NULL, "rewrap: garbage refused");
	quiet(false);
	again = rw != NULL ? vault_rewrap(kr, ORG, REC, FIELD, rw) : NULL;
	ok(again != NULL && vault_blob_kek_version(again) == 2 &&
	       opens_to(kr, ORG, REC, FIELD, again, secret, strlen(secret)),
	   "rewrap: a current blob re-wraps in place");
	free(again);

	quiet(true);
	ok(vault_keyring_retire(dir, 1, 1) == -1 && exists(dir, "kek-1"),
	   "retire: refused while a blob uses the version");
	ok(vault_keyring_retire(dir, 2, 0) == -1 && exists(dir, "kek-2"),
	   "retire: the current version refused");
	ok(vault_keyring_retire(dir, 5, 0) == -1, "retire: unknown version refused");
	quiet(false);
	ok(vault_keyring_retire(dir, 1, 0) == 0, "retire: version 1 once unused");
	ok(!exists(dir, "kek-1") && file_mode_is(dir, "kek-1.retired", 0600),
	   "retire: kek-1 renamed kek-1.retired");
	quiet(true);
	ok(vault_keyring_retire(dir, 1, 0) == -1, "retire: already retired refused");
	quiet(false);
	ok(opens_to(kr, ORG, REC, FIELD, b1, secret, strlen(secret)),
	   "retire: a loaded ring keeps the key until reloaded");
	kr2 = vault_keyring_load_dir(dir);
	ok(kr2 != NULL && vault_keyring_count(kr2) == 1 && !vault_keyring_has_version(kr2, 1),
	   "retire: reload drops version 1");
	if (kr2 != NULL) {
		vault_keyring_free(kr);
		kr = kr2;
	}
	quiet(true);
	ok(refused(kr, ORG, REC, FIELD, b1), "retire: a blob left on version 1 no longer opens");
	quiet(false);
	ok(rw != NULL && opens_to(kr, ORG, REC, FIELD, rw, secret, strlen(secret)),
	   "retire: the re-wrapped blob opens");
	is_int(vault_keyring_rotate(dir), 3, "rotate: never reuses a retired number");
	is_int(vault_keyring_rotate(dir), 4, "rotate: again");

	quiet(true);
	ok(chmod(dir, 0777) == 0 && vault_keyring_rotate(dir) == -1,
	   "rotate: world-writable directory refused");
	ok(chmod(dir, 0700) == 0, "rotate: mode restored");
	ok(vault_keyring_rotate("/nonexistent/cs_vault") == -1, "rotate: missing directory");
	quiet(false);

	free(b1);
	free(b2);
	free(rw);
	vault_keyring_free(kr);
	free(dir);
}

/* ---- throughput (informational) ---- */

static void test_throughput(struct vault_keyring *kr)
{
	uint64_t start, elapsed;
	unsigned char *out;
	size_t outlen;
	int n = 0, failed = 0;
	char *blob;

	start = cs_now_us();
	do {
		for (int i = 0; i < 500; i++, n++) {
			blob = vault_seal(kr, ORG, REC, FIELD, secret, strlen(secret));
			if (blob == NULL ||
			    vault_open(kr, ORG, REC, FIELD, blob, &out, &outlen) == -1) {
				failed++;
			} else {
				vault_secret_free(out, outlen);
			}
			free(blob);
		}
		elapsed = cs_now_us() - start;
	} while (elapsed < 500000);
	ok(failed == 0, "throughput loop: every seal/open succeeded");
	printf("# seal/open per second: %.0f (%d pairs of a %zu-byte secret in %.3f s)\n",
	       (double)n * 1e6 / (double)elapsed, n, strlen(secret), (double)elapsed / 1e6);
}

/* Remove everything under root (one level of subdirectories). */
static void cleanup(void)
{
	char *cmd = xasprintf("rm -rf '%s'", root);

	if (system(cmd) != 0)
		printf("# could not remove %s\n", root);
	free(cmd);
}

int main(void)
{
	struct vault_keyring *kr;
	char *e1;

	log_set_role("test", -1);
	if (mkdtemp(root) == NULL) {
		printf("Bail out! mkdtemp: %s\n", strerror(errno));
		return 1;
	}
	test_spec();
	test_dir();

	e1 = spec_entry(1);
	kr = vault_keyring_load(NULL, e1);
	free(e1);
	ok(kr != NULL, "ring for the envelope tests");
	if (kr != NULL) {
		test_roundtrip(kr);
		test_tamper(kr);
		test_throughput(kr);
	}
	vault_keyring_free(kr);
	test_rotation();
	cleanup();
	return tap_done();
}
