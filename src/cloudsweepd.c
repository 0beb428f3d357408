/*
 * cloudsweepd.c - command line entry: serve (the default), check the
 * configuration (-n), apply migrations (`migrate`), print the sample
 * configuration (`config-sample`) or the version.
 */
#include "config.h"

#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cloudsweep/alerts.h"
#include "cloudsweep/creds.h"
#include "cloudsweep/db.h"
#include "cloudsweep/http.h"
#include "cloudsweep/log.h"
#include "cloudsweep/net.h"
#include "cloudsweep/worker.h"

#ifndef SYSCONFDIR
#define SYSCONFDIR "/usr/local/etc"
#endif

static void usage(FILE *fp)
{
	fprintf(fp, "usage: cloudsweepd [-dn] [-c file] [-p port] [-w workers] [command]\n"
	            "commands:\n"
	            "  (none)         serve HTTPS\n"
	            "  migrate        apply the SQL migrations in sql_dir and exit\n"
	            "  config-sample  print the documented sample configuration\n"
	            "  routes         print every route with its permission (JSON)\n"
	            "  keys list|rotate|retire N\n"
	            "                 show, add or retire vault key-encryption-key versions\n"
	            "  version        print the version\n"
	            "options:\n"
	            "  -c, --config FILE   configuration file (default " SYSCONFDIR
	            "/cloudsweepd.conf if it exists)\n"
	            "  -n, --check         check the configuration and exit\n"
	            "  -d, --debug         log at debug level\n"
	            "  -p, --port N        listen on port N\n"
	            "  -w, --workers N     number of worker processes (0: one per core)\n");
}

/* `cloudsweepd routes`: the API as the workers serve it, for tests and operators. */
static int print_routes(void)
{
	static struct worker none; /* no reactor, no database: registration only */
	struct router *r = router_new();
	json_t *list = json_array();
	int rc = 0;

	cs_worker = &none;
	http_core_routes(r);
	worker_routes(r);
	for (int i = 0; i < router_count(r); i++) {
		const struct route *rt = router_route(r, i);

		json_array_append_new(list,
		                      json_pack("{s:s, s:s, s:s?, s:b, s:b}", "method", rt->method,
		                                "pattern", rt->pattern, "perm", rt->perm, "public",
		                                (rt->flags & ROUTE_PUBLIC) != 0, "self",
		                                (rt->flags & ROUTE_SELF) != 0));
	}
	if (json_dumpf(list, stdout, JSON_INDENT(1)) == -1 || fputc('\n', stdout) == EOF)
		rc = 1;
	json_decref(list);
	router_free(r);
	return rc;
}

int main(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "config", required_argument, NULL, 'c' },
		{ "check", no_argument, NULL, 'n' },
		{ "debug", no_argument, NULL, 'd' },
		{ "port", required_argument, NULL, 'p' },
		{ "workers", required_argument, NULL, 'w' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	const char *path = NULL, *port = NULL, *workers = NULL, *command = "serve";
	bool check = false, debug = false;
	struct config *cfg;
	char err[512];
	int ch, rc;

	while ((ch = getopt_long(argc, argv, "c:ndp:w:h", longopts, NULL)) != -1) {
		switch (ch) {
		case 'c':
			path = optarg;
			break;
		case 'n':
			check = true;
			break;
		case 'd':
			debug = true;
			break;
		case 'p':
			port = optarg;
			break;
		case 'w':
			workers = optarg;
			break;
		case 'h':
			usage(stdout);
			return 0;
		default:
			usage(stderr);
			return 2;
		}
	}
	if (optind < argc)
		command = argv[optind++];
	if (strcmp(command, "keys") == 0)
		return creds_keys_main(path, debug, argc - optind, argv + optind);
	if (optind < argc) {
		usage(stderr);
		return 2;
	}
	if (strcmp(command, "version") == 0) {
		printf("cloudsweepd %s\n", PACKAGE_VERSION);
		return 0;
	}
	if (strcmp(command, "config-sample") == 0) {
		config_write_sample(stdout);
		return 0;
	}
	if (strcmp(command, "routes") == 0)
		return print_routes();
	if (strcmp(command, "serve") != 0 && strcmp(command, "migrate") != 0) {
		fprintf(stderr, "cloudsweepd: unknown command \"%s\"\n", command);
		usage(stderr);
		return 2;
	}
	if (path == NULL && access(SYSCONFDIR "/cloudsweepd.conf", R_OK) == 0)
		path = SYSCONFDIR "/cloudsweepd.conf";

	cfg = config_load_all(path, port, workers, err, sizeof(err));
	if (cfg == NULL) {
		fprintf(stderr, "cloudsweepd: configuration error: %s\n", err);
		return 1;
	}
	if (debug)
		cfg->log_level_num = LOG_LVL_DEBUG;
	log_set_level((enum log_level)cfg->log_level_num);
	if (log_open(cfg->log_file) == -1) {
		fprintf(stderr, "cloudsweepd: cannot open log_file %s\n", cfg->log_file);
		config_free(cfg);
		return 1;
	}

	if (strcmp(command, "migrate") == 0) {
		char *conninfo = config_db_conninfo(cfg);

		log_set_role("migrate", -1);
		rc = db_migrate(conninfo, cfg->sql_dir);
		cs_free_secret(conninfo);
		config_free(cfg);
		if (rc < 0) {
			fprintf(stderr, "cloudsweepd: migration failed (see log)\n");
			return 1;
		}
		printf("cloudsweepd: %d migration(s) applied\n", rc);
		return 0;
	}

	if (config_check_serving(cfg, err, sizeof(err)) == -1) {
		fprintf(stderr, "cloudsweepd: configuration error: %s\n", err);
		config_free(cfg);
		return 1;
	}
	if (creds_config_check(cfg, err, sizeof(err)) == -1 ||
	    alerts_config_check(cfg, err, sizeof(err)) == -1) {
		fprintf(stderr, "cloudsweepd: configuration error: %s\n", err);
		config_free(cfg);
		return 1;
	}
	if (check) {
		SSL_CTX *ctx = net_tls_server_ctx(cfg->tls_cert_file, cfg->tls_key_file);

		config_free(cfg);
		if (ctx == NULL) {
			fprintf(stderr, "cloudsweepd: TLS certificate or key unusable (see log)\n");
			return 1;
		}
		SSL_CTX_free(ctx);
		printf("cloudsweepd: configuration OK\n");
		return 0;
	}
	rc = master_run(cfg, path);
	config_free(cfg);
	return rc;
}
