/*
 * keyring.c - the vault's ring of key-encryption keys (see vault.h): loading
 * it from a key directory and/or the environment, creating and retiring
 * versions on disk, and the AES-256-GCM primitive the envelope code calls.
 *
 * This is the only file that ever holds KEK bytes: they are decoded
 * straight into the ring, every buffer they passed through is wiped, and
 * the ring is wiped when freed. Callers never see a KEK, they ask the ring
 * to seal or open under a version (one exception: kms.c's reload copies
 * held versions into the new ring, vault_keyring_kek_copy). The cipher is fetched once per ring and
 * one cipher context is reused (and reset, which also drops the expanded
 * key) for every operation, so a ring belongs to one thread.
 *
 * Key files are opened relative to the directory without following
 * symlinks and checked on the open descriptor (regular file, mode, size),
 * so what is checked is what is read.
 */
#include "config.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include "cloudsweep/log.h"
#include "cloudsweep/util.h"
#include "cloudsweep/vault.h"
#include "creds_int.h"

#define VAULT_KEY_FILE_MAX 128 /* a key file is 32 raw bytes or 44 base64 + newline */
#define VAULT_KEY_B64_LEN  44  /* padded base64 of VAULT_KEY_LEN bytes */
#define VAULT_NAME_MAX     64  /* longest key file name built here */
#define VAULT_ROTATE_TRIES 16  /* versions tried when rotations race */

struct vault_kek {
	int version;
	unsigned char key[VAULT_KEY_LEN];
};

struct vault_keyring {
	struct vault_kek *keks; /* owned, ascending by version, wiped on free */
	size_t nkeks;
	size_t cap;
	EVP_CIPHER *gcm;     /* owned, AES-256-GCM fetched once */
	EVP_CIPHER_CTX *ctx; /* owned, reset after every operation */
};

/* A key file name found in a key directory. */
struct vault_dirent {
	int version;
	bool retired; /* kek-<version>.retired */
};

/* ---- small parsers ---- */

/* A canonical decimal version (1..VAULT_KEK_VERSION_MAX, no leading zero) of len chars, or -1. */
static int vault_version_parse(const char *s, size_t len)
{
	int v = 0;

	if (len == 0 || len > 7 || s[0] == '0')
		return -1;
	for (size_t i = 0; i < len; i++) {
		if (s[i] < '0' || s[i] > '9')
			return -1;
		v = v * 10 + (s[i] - '0');
	}
	return v <= VAULT_KEK_VERSION_MAX ? v : -1;
}

static bool vault_is_space(char c)
{
	return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

/* Decode exactly VAULT_KEY_LEN bytes from 44 characters of padded base64; 0 or -1. */
static int vault_key_from_b64(const char *s, size_t len, unsigned char key[VAULT_KEY_LEN])
{
	unsigned char tmp[VAULT_KEY_B64_LEN / 4 * 3];
	int n;

	if (len != VAULT_KEY_B64_LEN)
		return -1;
	n = vault_b64_decode(s, len, tmp, sizeof(tmp));
	if (n == VAULT_KEY_LEN)
		memcpy(key, tmp, VAULT_KEY_LEN);
	cs_wipe(tmp, sizeof(tmp));
	return n == VAULT_KEY_LEN ? 0 : -1;
}

/*
 * A key file's content, as audit_init reads its key: padded base64 when the
 * whole content (trailing whitespace aside) is that, else the raw bytes;
 * either way exactly VAULT_KEY_LEN bytes. 0 or -1.
 */
static int vault_key_from_file(const char *buf, size_t len, unsigned char key[VAULT_KEY_LEN])
{
	size_t tlen = len;

	while (tlen > 0 && vault_is_space(buf[tlen - 1]))
		tlen--;
	if (vault_key_from_b64(buf, tlen, key) == 0)
		return 0;
	if (len != VAULT_KEY_LEN)
		return -1;
	memcpy(key, buf, VAULT_KEY_LEN);
	return 0;
}

/*
 * Classify a directory entry: 1 and *e filled for kek-<N> or
 * kek-<N>.retired, 0 for a name that is none of the ring's business, -1
 * for a malformed kek- name.
 */
static int vault_dirent_parse(const char *name, struct vault_dirent *e)
{
	size_t plen = strlen(VAULT_KEK_FILE_PREFIX), slen = strlen(VAULT_RETIRED_SUFFIX);
	size_t len = strlen(name);

	if (strncmp(name, VAULT_KEK_FILE_PREFIX, plen) != 0)
		return 0;
	e->retired = len > plen + slen && strcmp(name + len - slen, VAULT_RETIRED_SUFFIX) == 0;
	if (e->retired)
		len -= slen;
	e->version = vault_version_parse(name + plen, len - plen);
	return e->version == -1 ? -1 : 1;
}

/*
 * List the kek- files of the open directory dfd into *out (owned by the
 * caller; *n entries). -1 (logged) on a read error or a malformed name.
 */
static int vault_dir_scan(int dfd, const char *dir, struct vault_dirent **out, size_t *n)
{
	struct vault_dirent *v = NULL, e;
	size_t cnt = 0, cap = 0;
	struct dirent *de;
	DIR *d;
	int fd, r;

	*out = NULL;
	*n = 0;
	fd = dup(dfd);
	if (fd == -1 || (d = fdopendir(fd)) == NULL) {
		log_warn("vault_keyring_failed", "cannot read key directory %s", dir);
		if (fd != -1)
			close(fd);
		return -1;
	}
	rewinddir(d);
	for (;;) {
		errno = 0;
		if ((de = readdir(d)) == NULL)
			break;
		r = vault_dirent_parse(de->d_name, &e);
		if (r == 0)
			continue;
		if (r == -1) {
			log_warnx(
			    "vault_keyring_failed",
			    "%s/%s: key files must be named kek-<version> with a version from 1 "
			    "to %d without leading zeros",
			    dir, de->d_name, VAULT_KEK_VERSION_MAX);
			goto fail;
		}
		if (cnt == cap) {
			cap = cap == 0 ? 8 : cap * 2;
			v = xrealloc(v, cap * sizeof(*v));
		}
		v[cnt++] = e;
	}
	if (errno != 0) {
		log_warn("vault_keyring_failed", "cannot read key directory %s", dir);
		goto fail;
	}
	closedir(d);
	*out = v;
	*n = cnt;
	return 0;
fail:
	closedir(d);
	free(v);
	return -1;
}

/*
 * Open a key directory. Refused when group or others may write to it (they
 * could plant a key that would become current); a warning when they may
 * read or list it.
 */
static int vault_dir_open(const char *dir)
{
	struct stat st;
	int dfd;

	dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (dfd == -1) {
		log_warn("vault_keyring_failed", "cannot open key directory %s", dir);
		return -1;
	}
	if (fstat(dfd, &st) == -1) {
		log_warn("vault_keyring_failed", "cannot stat key directory %s", dir);
		close(dfd);
		return -1;
	}
	if ((st.st_mode & 022) != 0) {
		log_warnx("vault_keyring_failed",
		          "key directory %s is writable by group or others; chmod 700 it", dir);
		close(dfd);
		return -1;
	}
	if ((st.st_mode & 077) != 0)
		log_warnx("vault_key_permissions",
		          "key directory %s is accessible to group or others", dir);
	return dfd;
}

/* ---- the ring ---- */

static struct vault_kek *vault_keyring_find(const struct vault_keyring *kr, int version)
{
	for (size_t i = 0; i < kr->nkeks; i++)
		if (kr->keks[i].version == version)
			return &kr->keks[i];
	return NULL;
}

/* Add a key in version order; -1 (logged, naming where) when the version is already there. */
static int vault_keyring_add(struct vault_keyring *kr, int version,
                             const unsigned char key[VAULT_KEY_LEN], const char *where)
{
	struct vault_kek *nk;
	size_t i;

	if (vault_keyring_find(kr, version) != NULL) {
		log_warnx("vault_keyring_failed", "%s: key-encryption key version %d given twice",
		          where, version);
		return -1;
	}
	if (kr->nkeks == kr->cap) {
		/* Grow by copying so no stale copy of a key is left in freed memory. */
		size_t ncap = kr->cap == 0 ? 4 : kr->cap * 2;

		nk = xcalloc(ncap, sizeof(*nk));
		if (kr->nkeks > 0)
			memcpy(nk, kr->keks, kr->nkeks * sizeof(*nk));
		cs_wipe(kr->keks, kr->cap * sizeof(*kr->keks));
		free(kr->keks);
		kr->keks = nk;
		kr->cap = ncap;
	}
	for (i = kr->nkeks; i > 0 && kr->keks[i - 1].version > version; i--)
		kr->keks[i] = kr->keks[i - 1];
	kr->keks[i].version = version;
	memcpy(kr->keks[i].key, key, VAULT_KEY_LEN);
	kr->nkeks++;
	return 0;
}

/* Read and add one key file of the open directory dfd; -1 (logged) when refused. */
static int vault_keyring_add_file(struct vault_keyring *kr, int dfd, const char *dir,
                                  const char *name, int version)
{
	unsigned char key[VAULT_KEY_LEN];
	char buf[VAULT_KEY_FILE_MAX + 1], where[PATH_MAX + VAULT_NAME_MAX];
	struct stat st;
	size_t len = 0;
	ssize_t r;
	int fd, rc = -1;

	snprintf(where, sizeof(where), "%s/%s", dir, name);
	fd = openat(dfd, name, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK);
	if (fd == -1) {
		log_warn("vault_keyring_failed", "cannot open key file %s", where);
		return -1;
	}
	if (fstat(fd, &st) == -1) {
		log_warn("vault_keyring_failed", "cannot stat key file %s", where);
		goto fail;
	}
	if (!S_ISREG(st.st_mode)) {
		log_warnx("vault_keyring_failed", "key file %s is not a regular file", where);
		goto fail;
	}
	if ((st.st_mode & 077) != 0) {
		log_warnx("vault_key_permissions",
		          "key file %s is accessible to group or others; refused (chmod 600 it)",
		          where);
		goto fail;
	}
	if (st.st_size > VAULT_KEY_FILE_MAX) {
		log_warnx("vault_keyring_failed", "key file %s does not hold a %d-byte key", where,
		          VAULT_KEY_LEN);
		goto fail;
	}
	while (len < VAULT_KEY_FILE_MAX + 1 &&
	       (r = read(fd, buf + len, VAULT_KEY_FILE_MAX + 1 - len)) != 0) {
		if (r == -1) {
			if (errno == EINTR)
				continue;
			log_warn("vault_keyring_failed", "cannot read key file %s", where);
			goto fail;
		}
		len += (size_t)r;
	}
	if (len > VAULT_KEY_FILE_MAX || vault_key_from_file(buf, len, key) == -1) {
		log_warnx("vault_keyring_failed",
		          "key file %s does not hold a %d-byte key (raw, or padded base64)", where,
		          VAULT_KEY_LEN);
		goto fail;
	}
	rc = vault_keyring_add(kr, version, key, where);
fail:
	cs_wipe(key, sizeof(key));
	cs_wipe(buf, sizeof(buf));
	close(fd);
	return rc;
}

/* Add every active key of a key directory; -1 (logged) when any is refused. */
static int vault_keyring_add_dir(struct vault_keyring *kr, const char *dir)
{
	struct vault_dirent *ents = NULL;
	char name[VAULT_NAME_MAX];
	size_t n = 0;
	int dfd, rc = -1;

	if ((dfd = vault_dir_open(dir)) == -1)
		return -1;
	if (vault_dir_scan(dfd, dir, &ents, &n) == -1)
		goto fail;
	for (size_t i = 0; i < n; i++) {
		if (ents[i].retired)
			continue;
		snprintf(name, sizeof(name), VAULT_KEK_FILE_PREFIX "%d", ents[i].version);
		if (vault_keyring_add_file(kr, dfd, dir, name, ents[i].version) == -1)
			goto fail;
	}
	rc = 0;
fail:
	free(ents);
	close(dfd);
	return rc;
}

/* Add the keys of a "1:<base64>,2:<base64>" specification; -1 (logged) when any is refused. */
static int vault_keyring_add_spec(struct vault_keyring *kr, const char *spec)
{
	unsigned char key[VAULT_KEY_LEN];
	const char *p = spec, *end, *colon, *s, *e;
	char where[64];
	int version, n = 0, rc = -1;

	for (;;) {
		n++;
		snprintf(where, sizeof(where), "%s entry %d", VAULT_KEKS_ENV, n);
		end = strchr(p, ',');
		if (end == NULL)
			end = p + strlen(p);
		s = p;
		e = end;
		while (s < e && vault_is_space(*s))
			s++;
		while (e > s && vault_is_space(e[-1]))
			e--;
		colon = memchr(s, ':', (size_t)(e - s));
		if (colon == NULL) {
			log_warnx("vault_keyring_failed", "%s: expected <version>:<base64 key>",
			          where);
			goto fail;
		}
		version = vault_version_parse(s, (size_t)(colon - s));
		if (version == -1) {
			log_warnx("vault_keyring_failed",
			          "%s: the version must be from 1 to %d without leading zeros",
			          where, VAULT_KEK_VERSION_MAX);
			goto fail;
		}
		if (vault_key_from_b64(colon + 1, (size_t)(e - colon - 1), key) == -1) {
			log_warnx("vault_keyring_failed",
			          "%s: the key must be %d bytes in padded base64", where,
			          VAULT_KEY_LEN);
			goto fail;
		}
		if (vault_keyring_add(kr, version, key, where) == -1)
			goto fail;
		if (*end == '\0')
			break;
		p = end + 1;
	}
	rc = 0;
fail:
	cs_wipe(key, sizeof(key));
	return rc;
}

/* Load the ring from a directory and/or a specification. */
struct vault_keyring *vault_keyring_load(const char *dir, const char *spec)
{
	struct vault_keyring *kr;

	if (dir == NULL && spec == NULL) {
		log_warnx("vault_keyring_failed", "no key directory and no %s", VAULT_KEKS_ENV);
		return NULL;
	}
	kr = xcalloc(1, sizeof(*kr));
	kr->gcm = EVP_CIPHER_fetch(NULL, "AES-256-GCM", NULL);
	kr->ctx = EVP_CIPHER_CTX_new();
	if (kr->gcm == NULL || kr->ctx == NULL) {
		log_warnx("vault_keyring_failed", "AES-256-GCM unavailable");
		ERR_clear_error();
		goto fail;
	}
	if (dir != NULL && vault_keyring_add_dir(kr, dir) == -1)
		goto fail;
	if (spec != NULL && vault_keyring_add_spec(kr, spec) == -1)
		goto fail;
	if (kr->nkeks == 0) {
		log_warnx("vault_keyring_failed",
		          "no key-encryption key found in %s (create one with `cloudsweepd keys "
		          "rotate`)",
		          dir != NULL ? dir : VAULT_KEKS_ENV);
		goto fail;
	}
	log_info("vault_keyring_loaded", "%zu key-encryption keys, current version %d", kr->nkeks,
	         vault_keyring_current_version(kr));
	return kr;
fail:
	vault_keyring_free(kr);
	return NULL;
}

/* Load from a key directory only. */
struct vault_keyring *vault_keyring_load_dir(const char *dir)
{
	if (dir == NULL) {
		log_warnx("vault_keyring_failed", "no key directory");
		return NULL;
	}
	return vault_keyring_load(dir, NULL);
}

/* Load from CLOUDSWEEP_VAULT_KEKS only. */
struct vault_keyring *vault_keyring_load_env(void)
{
	const char *spec = getenv(VAULT_KEKS_ENV);

	if (spec == NULL) {
		log_warnx("vault_keyring_failed", "%s is not set", VAULT_KEKS_ENV);
		return NULL;
	}
	return vault_keyring_load(NULL, spec);
}

/* Wipe and release. */
void vault_keyring_free(struct vault_keyring *kr)
{
	if (kr == NULL)
		return;
	cs_wipe(kr->keks, kr->cap * sizeof(*kr->keks));
	free(kr->keks);
	EVP_CIPHER_CTX_free(kr->ctx);
	EVP_CIPHER_free(kr->gcm);
	cs_wipe(kr, sizeof(*kr));
	free(kr);
}

/* The highest loaded version. */
int vault_keyring_current_version(const struct vault_keyring *kr)
{
	return kr->nkeks > 0 ? kr->keks[kr->nkeks - 1].version : -1;
}

/* Whether version is loaded. */
bool vault_keyring_has_version(const struct vault_keyring *kr, int version)
{
	return vault_keyring_find(kr, version) != NULL;
}

/* Number of loaded versions. */
size_t vault_keyring_count(const struct vault_keyring *kr)
{
	return kr->nkeks;
}

/* Copy version's KEK into key (the caller wipes it); 0, or -1 when it is not loaded. */
int vault_keyring_kek_copy(const struct vault_keyring *kr, int version,
                           unsigned char key[VAULT_KEY_LEN])
{
	const struct vault_kek *k = kr != NULL ? vault_keyring_find(kr, version) : NULL;

	if (k == NULL)
		return -1;
	memcpy(key, k->key, VAULT_KEY_LEN);
	return 0;
}

/* ---- AES-256-GCM with the ring's context ---- */

/*
 * One AES-256-GCM operation. On a failed open whatever was decrypted before
 * the tag check is wiped; the context is reset either way so the expanded
 * key does not outlive the call.
 */
static int vault_gcm(struct vault_keyring *kr, int enc, const unsigned char *key,
                     const unsigned char *nonce, const unsigned char *aad, size_t aadlen,
                     const unsigned char *in, size_t len, unsigned char *out, unsigned char *tag)
{
	unsigned char fin[VAULT_TAG_LEN];
	int n, rc = -1;

	if (len > VAULT_PLAINTEXT_MAX || aadlen > INT_MAX)
		return -1;
	if (EVP_CipherInit_ex2(kr->ctx, kr->gcm, key, nonce, enc, NULL) != 1)
		goto fail;
	if (aadlen > 0 && EVP_CipherUpdate(kr->ctx, NULL, &n, aad, (int)aadlen) != 1)
		goto fail;
	if (len > 0 && EVP_CipherUpdate(kr->ctx, out, &n, in, (int)len) != 1)
		goto fail;
	if (!enc && EVP_CIPHER_CTX_ctrl(kr->ctx, EVP_CTRL_GCM_SET_TAG, VAULT_TAG_LEN, tag) != 1)
		goto fail;
	if (EVP_CipherFinal_ex(kr->ctx, fin, &n) != 1)
		goto fail;
	if (enc && EVP_CIPHER_CTX_ctrl(kr->ctx, EVP_CTRL_GCM_GET_TAG, VAULT_TAG_LEN, tag) != 1)
		goto fail;
	rc = 0;
fail:
	if (EVP_CIPHER_CTX_reset(kr->ctx) != 1)
		rc = -1;
	if (rc == -1) {
		if (!enc && len > 0)
			cs_wipe(out, len);
		ERR_clear_error();
	}
	return rc;
}

/* Seal under a KEK version. */
int vault_keyring_kek_seal(struct vault_keyring *kr, int version,
                           const unsigned char nonce[VAULT_NONCE_LEN], const unsigned char *aad,
                           size_t aadlen, const unsigned char *in, size_t len, unsigned char *out,
                           unsigned char tag[VAULT_TAG_LEN])
{
	struct vault_kek *k = vault_keyring_find(kr, version);

	if (k == NULL)
		return -1;
	return vault_gcm(kr, 1, k->key, nonce, aad, aadlen, in, len, out, tag);
}

/* Open under a KEK version. */
int vault_keyring_kek_open(struct vault_keyring *kr, int version,
                           const unsigned char nonce[VAULT_NONCE_LEN], const unsigned char *aad,
                           size_t aadlen, const unsigned char *in, size_t len, unsigned char *out,
                           const unsigned char tag[VAULT_TAG_LEN])
{
	struct vault_kek *k = vault_keyring_find(kr, version);

	if (k == NULL)
		return -1;
	/* Only read: OpenSSL's SET_TAG copies the tag. */
	return vault_gcm(kr, 0, k->key, nonce, aad, aadlen, in, len, out, (unsigned char *)tag);
}

/* Seal under a data key. */
int vault_keyring_gcm_seal(struct vault_keyring *kr, const unsigned char key[VAULT_KEY_LEN],
                           const unsigned char nonce[VAULT_NONCE_LEN], const unsigned char *aad,
                           size_t aadlen, const unsigned char *in, size_t len, unsigned char *out,
                           unsigned char tag[VAULT_TAG_LEN])
{
	return vault_gcm(kr, 1, key, nonce, aad, aadlen, in, len, out, tag);
}

/* Open under a data key. */
int vault_keyring_gcm_open(struct vault_keyring *kr, const unsigned char key[VAULT_KEY_LEN],
                           const unsigned char nonce[VAULT_NONCE_LEN], const unsigned char *aad,
                           size_t aadlen, const unsigned char *in, size_t len, unsigned char *out,
                           const unsigned char tag[VAULT_TAG_LEN])
{
	return vault_gcm(kr, 0, key, nonce, aad, aadlen, in, len, out, (unsigned char *)tag);
}

/* ---- rotation and retirement on disk ---- */

/* Write all of buf to fd; 0 or -1 (errno set). */
static int vault_write_all(int fd, const char *buf, size_t len)
{
	ssize_t w;

	while (len > 0) {
		w = write(fd, buf, len);
		if (w == -1) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		buf += w;
		len -= (size_t)w;
	}
	return 0;
}

/* Create the next version in dir. */
int vault_keyring_rotate(const char *dir)
{
	unsigned char key[VAULT_KEY_LEN];
	char text[VAULT_KEY_B64_LEN + 2], tmp[PATH_MAX], path[PATH_MAX];
	struct vault_dirent *ents = NULL;
	size_t n = 0;
	int dfd, fd = -1, version = 0, rc = -1;
	bool linked = false;

	tmp[0] = '\0';
	if (dir == NULL || (dfd = vault_dir_open(dir)) == -1)
		return -1;
	if (vault_dir_scan(dfd, dir, &ents, &n) == -1)
		goto fail;
	for (size_t i = 0; i < n; i++)
		if (ents[i].version > version)
			version = ents[i].version;

	if (RAND_priv_bytes(key, sizeof(key)) != 1) {
		log_warnx("vault_rotate_failed", "no random bytes");
		ERR_clear_error();
		goto fail;
	}
	vault_b64_encode(key, sizeof(key), text);
	text[VAULT_KEY_B64_LEN] = '\n';
	text[VAULT_KEY_B64_LEN + 1] = '\0';

	/* Dot files are ignored by loaders, so a half-written key is never seen. */
	if ((size_t)snprintf(tmp, sizeof(tmp), "%s/.kek-new-XXXXXX", dir) >= sizeof(tmp)) {
		log_warnx("vault_rotate_failed", "key directory path too long");
		tmp[0] = '\0';
		goto fail;
	}
	fd = mkostemp(tmp, O_CLOEXEC);
	if (fd == -1) {
		log_warn("vault_rotate_failed", "cannot create a key file in %s", dir);
		tmp[0] = '\0';
		goto fail;
	}
	if (fchmod(fd, 0600) == -1 || vault_write_all(fd, text, VAULT_KEY_B64_LEN + 1) == -1 ||
	    fsync(fd) == -1) {
		log_warn("vault_rotate_failed", "cannot write a key file in %s", dir);
		goto fail;
	}
	/* link(2) publishes atomically and never replaces: a racing rotation takes the next number.
	 */
	for (int tries = 0; tries < VAULT_ROTATE_TRIES && !linked; tries++) {
		if (++version > VAULT_KEK_VERSION_MAX) {
			log_warnx("vault_rotate_failed", "no key-encryption key version left");
			goto fail;
		}
		snprintf(path, sizeof(path), "%s/" VAULT_KEK_FILE_PREFIX "%d", dir, version);
		if (link(tmp, path) == 0)
			linked = true;
		else if (errno != EEXIST) {
			log_warn("vault_rotate_failed", "cannot create %s", path);
			goto fail;
		}
	}
	if (!linked) {
		log_warnx("vault_rotate_failed", "concurrent rotations in %s; try again", dir);
		goto fail;
	}
	if (fsync(dfd) == -1) {
		log_warn("vault_rotate_failed", "cannot sync key directory %s", dir);
		goto fail;
	}
	log_info("vault_kek_rotated", "created key-encryption key version %d in %s", version, dir);
	rc = version;
fail:
	if (fd != -1)
		close(fd);
	if (tmp[0] != '\0')
		(void)unlink(tmp);
	cs_wipe(key, sizeof(key));
	cs_wipe(text, sizeof(text));
	free(ents);
	close(dfd);
	return rc;
}

/* Retire version in dir. */
int vault_keyring_retire(const char *dir, int version, long long blobs_in_use)
{
	struct vault_dirent *ents = NULL;
	char name[VAULT_NAME_MAX], rname[VAULT_NAME_MAX];
	int dfd, current = -1, rc = -1;
	size_t n = 0;
	bool found = false;

	if (dir == NULL || version < 1 || version > VAULT_KEK_VERSION_MAX) {
		log_warnx("vault_retire_refused", "no such key-encryption key version");
		return -1;
	}
	if (blobs_in_use != 0) {
		log_warnx(
		    "vault_retire_refused",
		    "key-encryption key version %d still protects %lld stored secrets; re-wrap "
		    "them first",
		    version, blobs_in_use);
		return -1;
	}
	if ((dfd = vault_dir_open(dir)) == -1)
		return -1;
	if (vault_dir_scan(dfd, dir, &ents, &n) == -1)
		goto fail;
	for (size_t i = 0; i < n; i++) {
		if (ents[i].retired)
			continue;
		if (ents[i].version > current)
			current = ents[i].version;
		if (ents[i].version == version)
			found = true;
	}
	if (!found) {
		log_warnx("vault_retire_refused", "no active key-encryption key version %d in %s",
		          version, dir);
		goto fail;
	}
	if (version == current) {
		log_warnx("vault_retire_refused",
		          "key-encryption key version %d is the current one; rotate first",
		          version);
		goto fail;
	}
	snprintf(name, sizeof(name), VAULT_KEK_FILE_PREFIX "%d", version);
	snprintf(rname, sizeof(rname), VAULT_KEK_FILE_PREFIX "%d" VAULT_RETIRED_SUFFIX, version);
	/* link + unlink rather than rename: an existing .retired file is never overwritten. */
	if (linkat(dfd, name, dfd, rname, 0) == -1) {
		log_warn("vault_retire_failed", "cannot create %s/%s", dir, rname);
		goto fail;
	}
	if (unlinkat(dfd, name, 0) == -1) {
		log_warn("vault_retire_failed", "cannot remove %s/%s", dir, name);
		goto fail;
	}
	if (fsync(dfd) == -1) {
		log_warn("vault_retire_failed", "cannot sync key directory %s", dir);
		goto fail;
	}
	log_info("vault_kek_retired", "key-encryption key version %d retired in %s", version, dir);
	rc = 0;
fail:
	free(ents);
	close(dfd);
	return rc;
}
