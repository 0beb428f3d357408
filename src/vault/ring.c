/*
 * ring.c - the worker's key ring: loaded once at start-up from the key
 * directory and/or CLOUDSWEEP_VAULT_KEKS, reloaded after a rotation.
 */
#include <stdlib.h>
#include <string.h>

#include "cloudsweep/config.h"
#include "cloudsweep/log.h"
#include "cloudsweep/vault.h"
#include "cloudsweep/worker.h"
#include "creds_int.h"

static struct vault_keyring *worker_ring;
static char *worker_dir;

/* The ring from the configured provider; with KMS, prev's versions are reused (may be NULL). */
static struct vault_keyring *ring_load(const struct vault_keyring *prev)
{
	const char *spec = getenv(VAULT_KEKS_ENV);

	/*
	 * vault_provider = kms: every kek-<N>.kms that prev lacks is unwrapped by
	 * KMS Decrypt, synchronously.
	 */
	if (cs_worker != NULL && strcmp(cs_worker->cfg->vault_provider, "kms") == 0)
		return kms_ring_reload(cs_worker->cfg, prev);

	if (worker_dir == NULL && spec == NULL) {
		log_warnx("vault_init", "no key-encryption keys: set vault_key_dir or %s",
		          VAULT_KEKS_ENV);
		return NULL;
	}
	return vault_keyring_load(worker_dir, spec);
}

int vault_worker_init(const struct config *cfg)
{
	free(worker_dir);
	worker_dir = *cfg->vault_key_dir != '\0' ? xstrdup(cfg->vault_key_dir) : NULL;
	vault_keyring_free(worker_ring);
	worker_ring = ring_load(NULL);
	return worker_ring != NULL ? 0 : -1;
}

struct vault_keyring *vault_ring(void)
{
	return worker_ring;
}

const char *vault_key_dir(void)
{
	return worker_dir;
}

int vault_worker_reload(void)
{
	struct vault_keyring *fresh = ring_load(worker_ring);

	if (fresh == NULL)
		return -1;
	vault_keyring_free(worker_ring);
	worker_ring = fresh;
	return 0;
}

void vault_worker_free(void)
{
	vault_keyring_free(worker_ring);
	worker_ring = NULL;
	free(worker_dir);
	worker_dir = NULL;
}
