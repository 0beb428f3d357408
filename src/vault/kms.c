/*
 * kms.c - the AWS KMS key provider (vault_provider = kms). Each KEK version
 * lives in the key directory as kek-<N>.kms: the base64 CiphertextBlob of a
 * KMS GenerateDataKey (KeySpec AES_256) whose EncryptionContext names the
 * version, so a blob renamed to another version does not open. Loading
 * asks KMS to Decrypt every file and hands the plaintext keys to the ring
 * loader; rotation asks for a new data key and publishes only its
 * ciphertext. These run before (or beside) the worker's reactor, so each
 * call runs a private event loop with its own AWS client until the answer
 * comes; plaintext keys are wiped as soon as the ring holds them.
 */
#include "config.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include <event2/event.h>
#include <jansson.h>

#include "cloudsweep/aws.h"
#include "cloudsweep/config.h"
#include "cloudsweep/log.h"
#include "cloudsweep/util.h"
#include "cloudsweep/vault.h"
#include "creds_int.h"

#define KMS_SUFFIX     ".kms"
#define KMS_BLOB_MAX   8192                     /* bytes of a kek-<N>.kms file */
#define KMS_VERSIONS   1024                     /* most KEK versions loaded */
#define KMS_CONTEXT    "cloudsweep-kek-version" /* EncryptionContext key naming the version */
#define KMS_B64_KEYLEN (4 * ((VAULT_KEY_LEN + 2) / 3))

/* One synchronous KMS call: the answer, copied out of the callback. */
struct kms_sync {
	struct event_base *base; /* borrowed */
	bool done;
	enum aws_status status;
	char code[64];
	char message[256];
	json_t *json; /* owned reference to the answer, or NULL */
};

static void kms_sync_cb(const struct aws_result *res, void *arg)
{
	struct kms_sync *s = arg;

	s->done = true;
	s->status = res->status;
	snprintf(s->code, sizeof(s->code), "%s", res->error_code);
	snprintf(s->message, sizeof(s->message), "%s", res->message);
	if (res->status == AWS_OK && res->json != NULL)
		s->json = json_incref(res->json);
	event_base_loopbreak(s->base);
}

/* The KMS endpoint override of aws_endpoint_urls ("KMS=URL ..."), copied into buf. */
static const char *kms_endpoint(const struct config *cfg, char *buf, size_t len)
{
	char *list = xstrdup(cfg->aws_endpoint_urls), *save = NULL, *tok;
	const char *out = NULL;

	for (tok = strtok_r(list, " \t,", &save); tok != NULL; tok = strtok_r(NULL, " \t,", &save))
		if (strncasecmp(tok, "KMS=", 4) == 0) {
			snprintf(buf, len, "%s", tok + 4);
			out = buf;
		}
	free(list);
	return out;
}

/*
 * Run one KMS action with body (a JSON document) on a private loop and
 * return the answer (json_decref), or NULL (logged without secrets).
 */
static json_t *kms_call(const struct config *cfg, const char *action, json_t *body)
{
	struct aws_client_options o = { 0 };
	struct aws_owned_credentials base = { 0 };
	struct aws_credentials view;
	struct aws_request req = { 0 };
	struct aws_client *cl = NULL;
	struct kms_sync s = { 0 };
	char url[1024];
	char *doc = NULL;

	s.base = event_base_new();
	if (s.base == NULL) {
		log_warnx("kms", "cannot create an event loop for KMS");
		return NULL;
	}
	o.attempts = (int)cfg->aws_attempts;
	o.deadline_ms = (int)cfg->aws_deadline_ms;
	o.attempt_timeout_ms = (int)cfg->aws_attempt_timeout_ms;
	o.ca_file = cfg->aws_ca_file;
	o.endpoint_url = cfg->aws_endpoint_url;
	o.endpoint_urls[AWS_KMS] = kms_endpoint(cfg, url, sizeof(url));
	if (aws_base_credentials_load(cfg->aws_credentials_file, &base) == -1) {
		log_warnx("kms", "KMS needs AWS credentials (aws_credentials_file or the "
		                 "environment)");
		goto out;
	}
	cl = aws_client_new(s.base, &o);
	doc = json_dumps(body, JSON_COMPACT);
	if (cl == NULL || doc == NULL)
		goto out;
	view = aws_owned_credentials_view(&base);
	req.service = AWS_KMS;
	req.region = cfg->vault_kms_region;
	req.creds = &view;
	req.action = action;
	req.json_body = doc;
	req.mutating = false;
	if (aws_call(cl, &req, kms_sync_cb, &s) == NULL)
		goto out;
	while (!s.done)
		if (event_base_loop(s.base, EVLOOP_ONCE) != 0)
			break; /* an error, or nothing left to wait for */
	if (s.done && s.status != AWS_OK)
		log_warnx("kms", "KMS %s with key %s failed: %s %s %s", action,
		          cfg->vault_kms_key_id, aws_status_name(s.status), s.code, s.message);
out:
	free(doc);
	aws_client_free(cl);
	aws_owned_credentials_clear(&base);
	event_base_free(s.base);
	return s.json;
}

/* The EncryptionContext that binds a blob to its version. */
static json_t *kms_context(int version)
{
	char v[16];

	snprintf(v, sizeof(v), "%d", version);
	return json_pack("{s:s}", KMS_CONTEXT, v);
}

int kms_config_check(const struct config *cfg, char *err, size_t errlen)
{
	if (strcmp(cfg->vault_provider, "kms") != 0)
		return 0;
	if (*cfg->vault_kms_key_id == '\0' || strlen(cfg->vault_kms_key_id) > 2048) {
		snprintf(err, errlen, "vault_kms_key_id: required with vault_provider = kms");
		return -1;
	}
	if (*cfg->vault_kms_region == '\0' || strlen(cfg->vault_kms_region) > 63) {
		snprintf(err, errlen, "vault_kms_region: required with vault_provider = kms");
		return -1;
	}
	if (*cfg->vault_key_dir == '\0') {
		snprintf(err, errlen,
		         "vault_key_dir: required with vault_provider = kms (it holds "
		         "the kek-<N>.kms files)");
		return -1;
	}
	return 0;
}

/*
 * The version of a key directory entry: kek-<N>.kms gives N with *kms set,
 * other kek- names (kek-<N>, any .retired) give N too so that numbers are
 * never reused; 0 for names that are not KEK files, -1 for malformed ones.
 */
static int kms_dirent_version(const char *name, bool *kms)
{
	const char *p = name + strlen(VAULT_KEK_FILE_PREFIX);
	long v = 0;

	*kms = false;
	if (strncmp(name, VAULT_KEK_FILE_PREFIX, strlen(VAULT_KEK_FILE_PREFIX)) != 0)
		return 0;
	if (*p < '1' || *p > '9')
		return -1;
	for (; *p >= '0' && *p <= '9'; p++) {
		v = v * 10 + (*p - '0');
		if (v > VAULT_KEK_VERSION_MAX)
			return -1;
	}
	if (strcmp(p, KMS_SUFFIX) == 0)
		*kms = true;
	else if (*p != '\0' && strcmp(p, VAULT_RETIRED_SUFFIX) != 0 &&
	         strcmp(p, KMS_SUFFIX VAULT_RETIRED_SUFFIX) != 0)
		return -1;
	return (int)v;
}

/* The active kek-<N>.kms versions of dir, ascending, into v (cap); the count, or -1. */
static int kms_dir_versions(const char *dir, int *v, int cap, int *highest)
{
	DIR *d = opendir(dir);
	struct dirent *e;
	int n = 0;

	*highest = 0;
	if (d == NULL) {
		log_warn("kms", "cannot open the key directory %s", dir);
		return -1;
	}
	while ((e = readdir(d)) != NULL) {
		bool kms;
		int ver = kms_dirent_version(e->d_name, &kms);

		if (ver == -1) {
			log_warnx("kms", "%s: malformed key file name \"%.64s\"", dir, e->d_name);
			closedir(d);
			return -1;
		}
		if (ver > *highest)
			*highest = ver;
		if (ver > 0 && kms && n < cap)
			v[n++] = ver;
	}
	closedir(d);
	for (int i = 1; i < n; i++)
		for (int j = i; j > 0 && v[j - 1] > v[j]; j--) {
			int t = v[j];

			v[j] = v[j - 1];
			v[j - 1] = t;
		}
	return n;
}

/* Unwrap kek-<version>.kms into key; 0 or -1 (logged). */
static int kms_unwrap(const struct config *cfg, int version, unsigned char key[VAULT_KEY_LEN])
{
	char path[4096];
	char *blob;
	size_t len;
	json_t *body, *ans;
	const char *pt;
	unsigned char buf[VAULT_KEY_LEN + 4];
	int n = -1;

	snprintf(path, sizeof(path), "%s/%s%d%s", cfg->vault_key_dir, VAULT_KEK_FILE_PREFIX,
	         version, KMS_SUFFIX);
	blob = cs_read_file(path, KMS_BLOB_MAX, &len);
	if (blob == NULL) {
		log_warn("kms", "cannot read %s", path);
		return -1;
	}
	cs_rstrip(blob);
	body = json_pack("{s:s, s:s, s:o}", "CiphertextBlob", blob, "KeyId", cfg->vault_kms_key_id,
	                 "EncryptionContext", kms_context(version));
	free(blob);
	ans = body != NULL ? kms_call(cfg, "Decrypt", body) : NULL;
	json_decref(body);
	pt = json_string_value(json_object_get(ans, "Plaintext"));
	if (pt != NULL) {
		n = vault_b64_decode(pt, strlen(pt), buf, sizeof(buf));
		cs_wipe((char *)pt, strlen(pt));
	}
	json_decref(ans);
	if (n != VAULT_KEY_LEN) {
		if (ans != NULL)
			log_warnx("kms", "%s did not unwrap to a %d-byte key", path, VAULT_KEY_LEN);
		cs_wipe(buf, sizeof(buf));
		return -1;
	}
	memcpy(key, buf, VAULT_KEY_LEN);
	cs_wipe(buf, sizeof(buf));
	return 0;
}

struct vault_keyring *kms_ring_load(const struct config *cfg)
{
	return kms_ring_reload(cfg, NULL);
}

struct vault_keyring *kms_ring_reload(const struct config *cfg, const struct vault_keyring *prev)
{
	int versions[KMS_VERSIONS], highest, n, unwrapped = 0;
	size_t cap, used = 0;
	char *spec;
	struct vault_keyring *kr = NULL;

	n = kms_dir_versions(cfg->vault_key_dir, versions, KMS_VERSIONS, &highest);
	if (n <= 0) {
		if (n == 0)
			log_warnx("kms",
			          "no kek-<N>.kms in %s: run `cloudsweepd keys rotate` first",
			          cfg->vault_key_dir);
		return NULL;
	}
	cap = (size_t)n * (KMS_B64_KEYLEN + 16) + 1;
	spec = xcalloc(1, cap);
	for (int i = 0; i < n; i++) {
		unsigned char key[VAULT_KEY_LEN];
		char b64[KMS_B64_KEYLEN + 1];

		/* A version the ring already holds is reused: no KMS round trip. */
		if (vault_keyring_kek_copy(prev, versions[i], key) == -1) {
			if (kms_unwrap(cfg, versions[i], key) == -1)
				goto out;
			unwrapped++;
		}
		vault_b64_encode(key, sizeof(key), b64);
		used += (size_t)snprintf(spec + used, cap - used, "%s%d:%s", i > 0 ? "," : "",
		                         versions[i], b64);
		cs_wipe(key, sizeof(key));
		cs_wipe(b64, sizeof(b64));
	}
	kr = vault_keyring_load(NULL, spec);
	if (kr != NULL)
		log_info("kms", "%d key-encryption key(s), %d unwrapped with KMS key %s", n,
		         unwrapped, cfg->vault_kms_key_id);
out:
	cs_wipe(spec, cap);
	free(spec);
	return kr;
}

/* Write data to a private temporary file in dir and link it to name; 0 or -1 (logged). */
static int kms_publish(const char *dir, const char *name, const char *data)
{
	char tmp[4096], path[4096];
	size_t len = strlen(data), off = 0;
	unsigned char rnd[8];
	char hex[17];
	int fd, dfd, rc = -1;

	cs_random(rnd, sizeof(rnd));
	cs_hex(hex, rnd, sizeof(rnd));
	snprintf(tmp, sizeof(tmp), "%s/.kms-tmp-%s", dir, hex);
	snprintf(path, sizeof(path), "%s/%s", dir, name);
	fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
	if (fd == -1) {
		log_warn("kms", "cannot create %s", tmp);
		return -1;
	}
	while (off < len) {
		ssize_t w = write(fd, data + off, len - off);

		if (w == -1 && errno == EINTR)
			continue;
		if (w <= 0) {
			log_warn("kms", "cannot write %s", tmp);
			goto out;
		}
		off += (size_t)w;
	}
	if (fsync(fd) == -1) {
		log_warn("kms", "cannot sync %s", tmp);
		goto out;
	}
	/* link(2) fails rather than overwrite: two rotations get two versions. */
	if (link(tmp, path) == -1) {
		log_warn("kms", "cannot publish %s", path);
		goto out;
	}
	rc = 0;
	dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (dfd != -1) {
		if (fsync(dfd) == -1)
			log_warn("kms", "cannot sync the key directory %s", dir);
		close(dfd);
	}
out:
	close(fd);
	if (unlink(tmp) == -1)
		log_warn("kms", "cannot remove %s", tmp);
	return rc;
}

int kms_rotate(const struct config *cfg)
{
	int versions[KMS_VERSIONS], highest, version;
	json_t *body, *ans;
	const char *blob, *pt;
	char name[64];
	char *line;
	int rc = -1;

	if (kms_dir_versions(cfg->vault_key_dir, versions, KMS_VERSIONS, &highest) == -1)
		return -1;
	if (highest >= VAULT_KEK_VERSION_MAX) {
		log_warnx("kms", "no key version left after %d", highest);
		return -1;
	}
	version = highest + 1;
	body = json_pack("{s:s, s:s, s:o}", "KeyId", cfg->vault_kms_key_id, "KeySpec", "AES_256",
	                 "EncryptionContext", kms_context(version));
	ans = body != NULL ? kms_call(cfg, "GenerateDataKey", body) : NULL;
	json_decref(body);
	/* Only the wrapped copy is kept: the plaintext is wiped unused. */
	pt = json_string_value(json_object_get(ans, "Plaintext"));
	if (pt != NULL)
		cs_wipe((char *)pt, strlen(pt));
	blob = json_string_value(json_object_get(ans, "CiphertextBlob"));
	if (blob == NULL || *blob == '\0' || strlen(blob) > KMS_BLOB_MAX - 2) {
		if (ans != NULL)
			log_warnx("kms", "GenerateDataKey answered without a CiphertextBlob");
		json_decref(ans);
		return -1;
	}
	snprintf(name, sizeof(name), "%s%d%s", VAULT_KEK_FILE_PREFIX, version, KMS_SUFFIX);
	line = xasprintf("%s\n", blob);
	if (kms_publish(cfg->vault_key_dir, name, line) == 0)
		rc = version;
	free(line);
	json_decref(ans);
	if (rc != -1)
		log_info("kms", "key-encryption key version %d created, wrapped by KMS key %s",
		         version, cfg->vault_kms_key_id);
	return rc;
}
