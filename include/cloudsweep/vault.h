/*
 * vault.h - the vault: envelope encryption of secret fields under a ring of
 * versioned key-encryption keys (this part), and later the credential store
 * and the STS temporary-credential cache built on it.
 *
 * Every secret field (an external id, a secret access key, ...) is sealed
 * on its own: a fresh 256-bit data key and a fresh 96-bit nonce encrypt it
 * with AES-256-GCM, the data key is wrapped by the current key-encryption
 * key (KEK) with AES-256-GCM under its own nonce, and both ciphertexts are
 * bound to where the field lives (organization id, record id, field name)
 * as associated data, so a blob copied to another row, organization or
 * column does not open. The result is one self-describing ASCII string
 * stored in a TEXT column; the database only ever holds ciphertext.
 *
 * KEKs are 256-bit keys with a version number 1, 2, ...; the highest loaded
 * version is "current" and seals, every loaded version opens. Rotation adds
 * version N+1 on disk (vault_keyring_rotate); workers reload the ring and
 * seal with it at once, older blobs keep opening, and a background job moves
 * them to the new version with vault_rewrap, which unwraps only the data key
 * and never sees the secret. Once no stored blob names an old version
 * (vault_blob_kek_version, or the SQL below), vault_keyring_retire takes it
 * out of service.
 *
 * Key material lives in the key ring only: it is read into the ring, never
 * logged, wiped from every temporary buffer, and wiped again by
 * vault_keyring_free. Plaintext secrets handed back by vault_open are the
 * caller's to wipe (vault_secret_free). A key ring keeps one reusable
 * OpenSSL cipher context, so it belongs to one thread at a time: each
 * worker loads its own.
 *
 * Blob format, version 1 (all of it ASCII, no whitespace):
 *
 *     "v1:" <kek version, decimal, no leading zero> ":" <base64 body>
 *
 * The base64 is standard, padded and canonical (unused bits zero). The
 * body, 88 bytes plus the length of the secret, is:
 *
 *     offset  size  content
 *          0    12  wrap nonce
 *         12    32  data key encrypted under the KEK (AES-256-GCM)
 *         44    16  wrap tag
 *         60    12  data nonce
 *         72    16  data tag
 *         88     n  secret encrypted under the data key (AES-256-GCM)
 *
 * With B = u32be(len org) org u32be(len record) record u32be(len field)
 * field (lengths in bytes, big-endian), the associated data is
 * "cloudsweep-vault-v1-data" B for the secret and
 * "cloudsweep-vault-v1-kek" u32be(kek version) B for the data key. The KEK
 * version is thereby authenticated; the data ciphertext does not depend on
 * it, which is what lets vault_rewrap change only the first 60 bytes.
 *
 * Rows still on an old version are found in SQL without decrypting:
 *     WHERE secret_col LIKE 'v1:' || $version || ':%'
 * (or split_part(secret_col, ':', 2)::int < $current).
 *
 * Key directory (provider "file"): one file per version named kek-<N>
 * (decimal, no leading zero) holding 32 raw bytes or their padded base64
 * (a trailing newline is fine), mode 0600 (0400) or the ring is refused.
 * Retired versions are renamed kek-<N>.retired and are no longer loaded;
 * their numbers are never reused. Other names not starting with "kek-"
 * (README, editor backups, dot files) are ignored; a malformed "kek-" name
 * is an error, so a typo cannot silently drop a key. For containers the
 * keys may instead (or also) come from the environment variable
 * CLOUDSWEEP_VAULT_KEKS = "1:<base64>,2:<base64>".
 */
#ifndef CLOUDSWEEP_VAULT_H
#define CLOUDSWEEP_VAULT_H

#include <stdbool.h>
#include <stddef.h>

#include "cloudsweep/util.h"

#define VAULT_KEY_LEN         32      /* bytes of a KEK and of a data key (AES-256) */
#define VAULT_NONCE_LEN       12      /* bytes of a GCM nonce */
#define VAULT_TAG_LEN         16      /* bytes of a GCM tag */
#define VAULT_KEK_VERSION_MAX 9999999 /* highest KEK version accepted */
#define VAULT_BINDING_MAX     256     /* longest org id, record id or field name, in bytes */
#define VAULT_PLAINTEXT_MAX   65536   /* largest secret sealed */
#define VAULT_BLOB_PREFIX     "v1:"   /* how every version-1 blob starts */
#define VAULT_BODY_HEADER     88      /* body bytes in front of the ciphertext */
#define VAULT_KEKS_ENV        "CLOUDSWEEP_VAULT_KEKS" /* environment form of the key ring */
#define VAULT_KEK_FILE_PREFIX "kek-"                  /* key file names: kek-<version> */
#define VAULT_RETIRED_SUFFIX  ".retired" /* a retired key file: kek-<version>.retired */

/* Longest blob vault_open accepts: prefix, version, colon, base64 of the largest body. */
#define VAULT_BLOB_MAX (3 + 7 + 1 + 4 * ((VAULT_BODY_HEADER + VAULT_PLAINTEXT_MAX + 2) / 3))

struct vault_keyring;

/* ---- the worker's key ring ---- */

struct config;
/* Load this worker's ring from cfg->vault_key_dir and/or VAULT_KEKS_ENV; 0 or -1 (logged). */
int vault_worker_init(const struct config *cfg) CS_WUR;
/* The worker's ring (NULL before vault_worker_init). */
struct vault_keyring *vault_ring(void);
/* The key directory in use, or NULL when the keys come from the environment only. */
const char *vault_key_dir(void);
/* Reload the ring (after a rotation or retirement); the old ring stays on failure. 0 or -1. */
int vault_worker_reload(void) CS_WUR;
/* Wipe and free the worker's ring. */
void vault_worker_free(void);

/* ---- the key ring ---- */

/*
 * Load the key ring from a key directory and/or an environment-style
 * specification ("1:<base64>,2:<base64>", whitespace around entries
 * allowed); either may be NULL but not both. Refused, with a log line that
 * names the file or entry but never key material: a key that is not
 * exactly 32 bytes (raw, or padded base64 in a file; padded base64 in the
 * specification), a version outside 1..VAULT_KEK_VERSION_MAX or spelled
 * with a leading zero, the same version twice (also across the two
 * sources), a key file readable or writable by group or others, a key
 * file that is not a regular file (symlinks are not followed), a malformed
 * kek- name, and an empty ring. Returns the ring (vault_keyring_free), or
 * NULL.
 */
struct vault_keyring *vault_keyring_load(const char *dir, const char *spec);
/* vault_keyring_load(dir, NULL). */
struct vault_keyring *vault_keyring_load_dir(const char *dir);
/* vault_keyring_load(NULL, getenv(VAULT_KEKS_ENV)); NULL (logged) when the variable is unset. */
struct vault_keyring *vault_keyring_load_env(void);
/* Wipe every key and release the ring and its OpenSSL objects; NULL is fine. */
void vault_keyring_free(struct vault_keyring *kr);

/* The version that seals: the highest loaded. */
int vault_keyring_current_version(const struct vault_keyring *kr);
/* Whether version is loaded (blobs naming it can be opened). */
bool vault_keyring_has_version(const struct vault_keyring *kr, int version);
/* Number of loaded versions. */
size_t vault_keyring_count(const struct vault_keyring *kr);

/*
 * Create the next version in the key directory dir (which must exist):
 * one above every version present, retired ones included, with 32 bytes
 * from RAND_priv_bytes written as base64 to a private temporary file
 * (O_EXCL, mode 0600, fsync) and published under its final name with
 * link(2), which fails rather than overwrite, so two concurrent rotations
 * get two versions. The directory is fsynced. Running rings are unchanged
 * until reloaded. Used by `cloudsweepd keys rotate` and the admin API.
 * Returns the new version, or -1 (logged).
 */
int vault_keyring_rotate(const char *dir) CS_WUR;

/*
 * Take version out of service in dir by renaming kek-<version> to
 * kek-<version>.retired (kept so that a mistake can be undone by renaming
 * it back; delete it once backups no longer need it). blobs_in_use is how
 * many stored blobs still name the version (vault_blob_kek_version, or the
 * SQL in the comment at the top), as counted by the caller. Refused when
 * that is not 0, when version is the current (highest active) one, or when
 * no active file holds it. Rings loaded earlier keep the key until
 * reloaded. Returns 0, or -1 (logged).
 */
int vault_keyring_retire(const char *dir, int version, long long blobs_in_use) CS_WUR;

/* ---- envelope encryption of one secret field ---- */

/*
 * Seal len bytes of plaintext (at most VAULT_PLAINTEXT_MAX; 0 is allowed)
 * for field `field` of record `record_id` in organization `org_id` (each
 * 1..VAULT_BINDING_MAX bytes), under the current KEK. Returns the blob
 * (the caller frees it; it holds no secret), or NULL (logged) on bad
 * arguments or an OpenSSL failure. Two seals of the same value differ.
 */
char *vault_seal(struct vault_keyring *kr, const char *org_id, const char *record_id,
                 const char *field, const void *plaintext, size_t len);

/*
 * Open a blob sealed for (org_id, record_id, field). On success *out is a
 * fresh allocation of *outlen bytes followed by a NUL byte (so a text
 * secret is a C string) that the caller wipes and frees with
 * vault_secret_free. Fails closed with -1, *out NULL, on anything that does
 * not check out: malformed or truncated blob, non-canonical encoding,
 * unknown or retired KEK version, wrong org/record/field, any altered
 * byte. Failures are logged with the ids and a reason, never with data.
 */
int vault_open(struct vault_keyring *kr, const char *org_id, const char *record_id,
               const char *field, const char *blob, unsigned char **out, size_t *outlen) CS_WUR;

/*
 * Re-wrap a blob's data key under the current KEK without decrypting the
 * secret: only the data key is unwrapped (and wiped), the secret's nonce,
 * tag and ciphertext are carried over unchanged. The binding must be the
 * blob's own. Returns the new blob (the caller frees it), or NULL (logged)
 * when the blob does not unwrap. A blob already on the current version is
 * re-wrapped all the same (under a fresh nonce).
 */
char *vault_rewrap(struct vault_keyring *kr, const char *org_id, const char *record_id,
                   const char *field, const char *blob);

/*
 * The KEK version a blob names, read from its text prefix without any key
 * (not a proof that the blob is intact), or -1 when it is not a version-1
 * blob.
 */
int vault_blob_kek_version(const char *blob);

/* Wipe and free a plaintext returned by vault_open; NULL is fine. */
void vault_secret_free(unsigned char *secret, size_t len);

/* ---- used between the vault's own files only ---- */

/* Decode canonical padded base64 of len characters into out (cap bytes); the length, or -1. */
int vault_b64_decode(const char *s, size_t len, unsigned char *out, size_t cap) CS_WUR;
/* Encode len bytes as padded base64 into out (4 * ((len + 2) / 3) + 1 bytes, NUL included). */
void vault_b64_encode(const unsigned char *in, size_t len, char *out);

/*
 * AES-256-GCM of len bytes (at most VAULT_PLAINTEXT_MAX) under the KEK of
 * the given version, with the ring's reusable cipher context: seal writes
 * out[len] and tag; open checks tag and writes out[len] only when it
 * verifies. 0, or -1 (unknown version, OpenSSL failure, tag mismatch).
 */
int vault_keyring_kek_seal(struct vault_keyring *kr, int version,
                           const unsigned char nonce[VAULT_NONCE_LEN], const unsigned char *aad,
                           size_t aadlen, const unsigned char *in, size_t len, unsigned char *out,
                           unsigned char tag[VAULT_TAG_LEN]) CS_WUR;
/* The opening half of vault_keyring_kek_seal. */
int vault_keyring_kek_open(struct vault_keyring *kr, int version,
                           const unsigned char nonce[VAULT_NONCE_LEN], const unsigned char *aad,
                           size_t aadlen, const unsigned char *in, size_t len, unsigned char *out,
                           const unsigned char tag[VAULT_TAG_LEN]) CS_WUR;
/* As vault_keyring_kek_seal, under a caller's data key instead of a KEK. */
int vault_keyring_gcm_seal(struct vault_keyring *kr, const unsigned char key[VAULT_KEY_LEN],
                           const unsigned char nonce[VAULT_NONCE_LEN], const unsigned char *aad,
                           size_t aadlen, const unsigned char *in, size_t len, unsigned char *out,
                           unsigned char tag[VAULT_TAG_LEN]) CS_WUR;
/* As vault_keyring_kek_open, under a caller's data key instead of a KEK. */
int vault_keyring_gcm_open(struct vault_keyring *kr, const unsigned char key[VAULT_KEY_LEN],
                           const unsigned char nonce[VAULT_NONCE_LEN], const unsigned char *aad,
                           size_t aadlen, const unsigned char *in, size_t len, unsigned char *out,
                           const unsigned char tag[VAULT_TAG_LEN]) CS_WUR;

#endif
