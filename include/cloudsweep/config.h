/*
 * config.h - the daemon's configuration. One table of options (name, type,
 * default, bounds, reloadable, help) drives parsing of the `key = value`
 * file, the CLOUDSWEEP_<KEY> environment overrides, validation, `-n`, the
 * SIGHUP reload and the documented sample file. Secrets come from *_file
 * options or environment variables, never only from the command line.
 */
#ifndef CLOUDSWEEP_CONFIG_H
#define CLOUDSWEEP_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

enum config_type {
	CONFIG_STRING, /* free text */
	CONFIG_PATH,   /* a file or directory path */
	CONFIG_INT,    /* integer within [min, max] */
	CONFIG_LEVEL,  /* log level name */
};

struct config {
	char *listen_address; /* owned */
	long long port;
	long long workers;      /* 0: one per core */
	char *tls_cert_file;    /* owned */
	char *tls_key_file;     /* owned */
	char *db_conninfo;      /* owned; never holds the password */
	char *db_password_file; /* owned */
	long long db_pool_size;
	long long db_query_timeout_ms;
	char *sql_dir;   /* owned */
	char *log_level; /* owned */
	char *log_file;  /* owned; empty: stderr */
	char *pid_file;  /* owned */
	long long max_connections_per_worker;
	long long max_connections_per_ip;
	long long max_url_bytes;
	long long max_header_bytes;
	long long max_headers;
	long long max_body_bytes;
	long long handshake_timeout_ms;
	long long header_timeout_ms;
	long long body_timeout_ms;
	long long idle_timeout_ms;
	long long shutdown_timeout_ms;
	char *metrics_token_file;   /* owned */
	char *jwt_alg;              /* owned */
	char *jwt_secret_file;      /* owned */
	char *jwt_private_key_file; /* owned */
	char *jwt_public_key_file;  /* owned */
	char *jwt_issuer;           /* owned */
	char *jwt_audience;         /* owned */
	long long access_token_ttl_s;
	long long refresh_token_ttl_s;
	long long refresh_grace_s;
	long long argon2_memory_kib;
	long long argon2_iterations;
	long long argon2_parallelism;
	long long auth_threads;
	long long lockout_threshold;
	long long lockout_base_s;
	long long ratelimit_anon_per_min;
	long long ratelimit_user_per_min;
	long long ratelimit_global_per_min;
	long long ratelimit_audit_fold_s;
	long long login_block_threshold;
	long long login_block_window_s;
	long long login_block_duration_s;
	char *audit_hmac_key_file;    /* owned */
	char *audit_signing_key_file; /* owned */
	long long audit_checkpoint_interval_s;
	char *vault_key_dir; /* owned */

	char *alert_rules_file; /* owned; empty: built-in rules */
	long long alert_interval_s;
	char *alert_webhook_url;         /* owned; empty: no webhook */
	char *alert_webhook_secret_file; /* owned */
	char *alert_webhook_ca_file;     /* owned; empty: the system store */
	long long audit_retention_days;
	long long alert_retention_days;
	long long retention_interval_s;
	long long org_limits_refresh_s;
	char *mfa_issuer;                 /* owned; the otpauth URI issuer */
	char *github_client_id;           /* owned; empty: GitHub login off */
	char *github_client_secret_file;  /* owned */
	char *github_web_url;             /* owned */
	char *github_api_url;             /* owned */
	char *github_redirect_url;        /* owned */
	char *github_app_url;             /* owned */
	char *github_webhook_secret_file; /* owned; empty: webhooks refused */
	char *github_ca_file;             /* owned; empty: the system store */
	long long purge_after_days;
	long long purge_interval_s;
	long long aws_max_in_flight;
	long long aws_max_in_flight_per_account;
	long long aws_read_rate, aws_read_burst;
	long long aws_write_rate, aws_write_burst;
	long long aws_attempts;
	long long aws_deadline_ms;
	long long aws_attempt_timeout_ms;
	long long aws_max_response_bytes;
	char *aws_ca_file;          /* owned; empty: AWS_CA_BUNDLE or the system store */
	char *aws_endpoint_url;     /* owned; empty: AWS_ENDPOINT_URL or the real endpoints */
	char *aws_endpoint_urls;    /* owned; "SDK_ID=URL ..." */
	char *aws_credentials_file; /* owned; empty: the environment */
	long long aws_sts_refresh_before_s;
	char *aws_regions; /* owned; the region allow-list */
	long long aws_verify_on_create;
	long long rewrap_batch;
	long long rewrap_interval_s;
	char *vault_provider;   /* owned; "file" or "kms" */
	char *vault_kms_key_id; /* owned; vault_provider = kms */
	char *vault_kms_region; /* owned */
	long long scan_lease_s;
	long long scan_max_attempts;
	long long scan_max_running;
	long long scan_max_running_per_org;
	long long scan_worker_units;
	long long scan_unit_detectors;
	long long scan_max_items_per_unit;
	long long scan_poll_s;
	long long scan_longpoll_max;
	char *scan_prices_file; /* owned */
	long long cleanup_max_items_per_request;
	long long cleanup_max_items_per_day;
	long long cleanup_grace_days;

	/* Derived by config_finish(); secrets are wiped by config_free(). */
	char *db_password;   /* owned secret, or NULL */
	char *metrics_token; /* owned secret, or NULL */
	char *jwt_secret;    /* owned secret, or NULL */
	int log_level_num;
};

struct config_option {
	const char *name;
	enum config_type type;
	const char *defval;
	long long min, max;
	bool reloadable;
	size_t offset;
	const char *help;
};

/* The option table, terminated by an entry with a NULL name. */
extern const struct config_option config_options[];

/* A configuration holding every default. */
struct config *config_new(void);
/* Free a configuration, wiping its secrets. */
void config_free(struct config *cfg);
/* Set one option from text; err names the key on failure. Returns 0 or -1. */
int config_set(struct config *cfg, const char *name, const char *value, char *err, size_t errlen);
/* Parse a `key = value` file. Returns 0 or -1 with err naming file, line and key. */
int config_load_file(struct config *cfg, const char *path, char *err, size_t errlen);
/* Apply CLOUDSWEEP_<KEY> variables from the environment. Returns 0 or -1. */
int config_load_env(struct config *cfg, char *err, size_t errlen);
/* Validate cross-option rules and read secret files. Returns 0 or -1. */
int config_finish(struct config *cfg, char *err, size_t errlen);
/* Check what serving needs beyond config_finish (TLS files readable). Returns 0 or -1. */
int config_check_serving(const struct config *cfg, char *err, size_t errlen);
/*
 * Load defaults, then the file (path may be NULL), then the environment,
 * then the command-line overrides (NULL when absent), then config_finish.
 * NULL with err set on failure.
 */
struct config *config_load_all(const char *path, const char *port, const char *workers, char *err,
                               size_t errlen);
/* The libpq conninfo with the password appended (caller frees with cs_free_secret). */
char *config_db_conninfo(const struct config *cfg);
/* Copy the reloadable options of src into dst (for SIGHUP). */
void config_apply_reloadable(struct config *dst, const struct config *src);
/* Write the documented sample file generated from the table. */
void config_write_sample(FILE *fp);
/* Look an option up by name; NULL if unknown. */
const struct config_option *config_find(const char *name);

#endif
