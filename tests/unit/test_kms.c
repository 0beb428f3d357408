/*
 * test_kms.c - the KMS key provider (src/vault/kms.c). The option checks
 * run everywhere; the rest needs a KMS to talk to and runs when
 * CS_TEST_KMS_URL names one (tests/integration/test_kms.py points it at
 * the fake AWS, with CS_TEST_KMS_CA, CS_TEST_KMS_CREDENTIALS,
 * CS_TEST_KMS_KEY_ID and CS_TEST_KMS_REGION): rotate into an empty key
 * directory, load, seal and open, rotate again, load again ("restart") and
 * open the old blob; a blob renamed to another version, a wrong key id and
 * an unreachable KMS are refused.
 */
#include "config.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../../src/vault/creds_int.h"
#include "cloudsweep/config.h"
#include "cloudsweep/log.h"
#include "cloudsweep/util.h"
#include "cloudsweep/vault.h"
#include "tap.h"

static char dir[] = "/tmp/cs-test-kms-XXXXXX";

static struct config *kms_cfg(const char *key_id)
{
	struct config *cfg = config_new();
	char err[256];
	const char *url = getenv("CS_TEST_KMS_URL");
	const char *ca = getenv("CS_TEST_KMS_CA");
	const char *creds = getenv("CS_TEST_KMS_CREDENTIALS");
	const char *region = getenv("CS_TEST_KMS_REGION");
	int rc = 0;

	rc |= config_set(cfg, "vault_provider", "kms", err, sizeof(err));
	rc |= config_set(cfg, "vault_key_dir", dir, err, sizeof(err));
	rc |= config_set(cfg, "vault_kms_key_id", key_id, err, sizeof(err));
	rc |= config_set(cfg, "vault_kms_region", region != NULL ? region : "eu-west-1", err,
	                 sizeof(err));
	rc |= config_set(cfg, "aws_endpoint_url", url != NULL ? url : "", err, sizeof(err));
	rc |= config_set(cfg, "aws_ca_file", ca != NULL ? ca : "", err, sizeof(err));
	rc |= config_set(cfg, "aws_credentials_file", creds != NULL ? creds : "", err, sizeof(err));
	rc |= config_set(cfg, "aws_attempts", "2", err, sizeof(err));
	rc |= config_set(cfg, "aws_deadline_ms", "3000", err, sizeof(err));
	if (rc != 0)
		printf("# config_set: %s\n", err);
	return cfg;
}

static void test_config(void)
{
	struct config *cfg = config_new();
	char err[256];

	ok(kms_config_check(cfg, err, sizeof(err)) == 0, "the file provider needs no KMS options");
	ok(config_set(cfg, "vault_provider", "kms", err, sizeof(err)) == 0, "provider kms set");
	ok(kms_config_check(cfg, err, sizeof(err)) == -1 && strstr(err, "vault_kms_key_id"),
	   "kms without a key id is refused");
	ok(config_set(cfg, "vault_kms_key_id", "alias/cs", err, sizeof(err)) == 0, "key id");
	ok(kms_config_check(cfg, err, sizeof(err)) == -1 && strstr(err, "vault_kms_region"),
	   "kms without a region is refused");
	ok(config_set(cfg, "vault_kms_region", "eu-west-1", err, sizeof(err)) == 0, "region");
	ok(kms_config_check(cfg, err, sizeof(err)) == -1 && strstr(err, "vault_key_dir"),
	   "kms without a key directory is refused");
	ok(config_set(cfg, "vault_key_dir", "/tmp", err, sizeof(err)) == 0, "dir");
	ok(kms_config_check(cfg, err, sizeof(err)) == 0, "complete kms options pass");
	config_free(cfg);
}

static char *file_text(const char *name)
{
	char path[512];
	size_t len;

	snprintf(path, sizeof(path), "%s/%s", dir, name);
	return cs_read_file(path, 65536, &len);
}

static void test_kms(void)
{
	const char *key_id = getenv("CS_TEST_KMS_KEY_ID");
	struct config *cfg = kms_cfg(key_id != NULL ? key_id : "alias/cloudsweep");
	struct vault_keyring *kr;
	unsigned char *pt = NULL;
	size_t len = 0;
	char *blob1, *blob2, *text, path[512], path2[512];
	struct stat st;

	kr = kms_ring_load(cfg);
	ok(kr == NULL, "an empty key directory gives no ring");
	is_int(kms_rotate(cfg), 1, "the first rotation creates version 1");
	snprintf(path, sizeof(path), "%s/kek-1.kms", dir);
	ok(stat(path, &st) == 0 && (st.st_mode & 077) == 0, "kek-1.kms exists, mode 0600");
	text = file_text("kek-1.kms");
	ok(text != NULL && strlen(text) > 60, "it holds the wrapped key");
	free(text);
	kr = kms_ring_load(cfg);
	ok(kr != NULL && vault_keyring_current_version(kr) == 1, "the ring loads version 1");
	blob1 = kr != NULL ? vault_seal(kr, "org", "rec", "field", "secret-one", 10) : NULL;
	ok(blob1 != NULL && vault_blob_kek_version(blob1) == 1, "sealed under version 1");
	vault_keyring_free(kr);

	is_int(kms_rotate(cfg), 2, "the second rotation creates version 2");
	kr = kms_ring_load(cfg); /* a restart */
	ok(kr != NULL && vault_keyring_current_version(kr) == 2 && vault_keyring_count(kr) == 2,
	   "after a restart both versions load, 2 seals");
	ok(kr != NULL && blob1 != NULL &&
	       vault_open(kr, "org", "rec", "field", blob1, &pt, &len) == 0 && len == 10 &&
	       memcmp(pt, "secret-one", 10) == 0,
	   "the version-1 blob still opens");
	vault_secret_free(pt, len);
	blob2 = kr != NULL ? vault_seal(kr, "org", "rec", "field", "secret-two", 10) : NULL;
	ok(blob2 != NULL && vault_blob_kek_version(blob2) == 2, "new writes use version 2");
	vault_keyring_free(kr);

	/* A wrapped key moved to another version number does not open (EncryptionContext). */
	text = file_text("kek-1.kms");
	snprintf(path2, sizeof(path2), "%s/kek-3.kms", dir);
	{
		FILE *fp = fopen(path2, "w");

		if (fp != NULL) {
			fputs(text != NULL ? text : "", fp);
			fclose(fp);
		}
	}
	free(text);
	ok(kms_ring_load(cfg) == NULL, "kek-1's blob renamed kek-3 is refused");
	ok(unlink(path2) == 0, "removed again");
	config_free(cfg);

	cfg = kms_cfg("alias/not-there");
	ok(kms_ring_load(cfg) == NULL, "an unknown KMS key is refused");
	ok(kms_rotate(cfg) == -1, "and cannot rotate");
	config_free(cfg);

	cfg = kms_cfg(key_id != NULL ? key_id : "alias/cloudsweep");
	{
		char err[256];

		ok(config_set(cfg, "aws_endpoint_url", "https://127.0.0.1:1", err, sizeof(err)) ==
		       0,
		   "point at a closed port");
	}
	ok(kms_ring_load(cfg) == NULL, "an unreachable KMS gives no ring (and returns)");
	config_free(cfg);
	free(blob1);
	free(blob2);
}

int main(void)
{
	log_set_role("test", -1);
	test_config();
	if (getenv("CS_TEST_KMS_URL") == NULL) {
		printf("# CS_TEST_KMS_URL unset: KMS round trips skipped\n");
		return tap_done();
	}
	if (mkdtemp(dir) == NULL) {
		printf("Bail out! mkdtemp: %s\n", strerror(errno));
		return 1;
	}
	test_kms();
	{
		char cmd[600];

		snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
		if (system(cmd) != 0)
			printf("# could not remove %s\n", dir);
	}
	return tap_done();
}
