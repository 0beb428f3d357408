/*
 * test_config.c - the option table: defaults, file parsing, environment
 * overrides, range and type errors naming the key, reloadable options, and
 * that the shipped sample documents every option.
 */
#include "config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cloudsweep/config.h"
#include "cloudsweep/util.h"
#include "tap.h"

static char *write_tmp(const char *text)
{
	static char path[64];
	FILE *fp;
	int fd;

	strcpy(path, "/tmp/cs_test_config_XXXXXX");
	fd = mkstemp(path);
	fp = fdopen(fd, "w");
	fputs(text, fp);
	fclose(fp);
	return path;
}

int main(void)
{
	struct config *cfg = config_new(), *other;
	char err[256] = "", *path, line[512];
	FILE *fp;
	int missing = 0;

	is_int(cfg->port, 8443, "default port");
	is_int(cfg->max_body_bytes, 1048576, "default body limit 1 MiB");
	is_str(cfg->listen_address, "127.0.0.1", "default listen address");

	path = write_tmp("# comment\nport = 9443\n  log_level=debug  \nlisten_address = \"::1\"\n");
	ok(config_load_file(cfg, path, err, sizeof(err)) == 0, "file parses: %s", err);
	unlink(path);
	is_int(cfg->port, 9443, "port from file");
	is_str(cfg->log_level, "debug", "level from file, trimmed");
	is_str(cfg->listen_address, "::1", "quotes removed");

	path = write_tmp("bogus_key = 1\n");
	ok(config_load_file(cfg, path, err, sizeof(err)) == -1 && strstr(err, "bogus_key"),
	   "unknown key named: %s", err);
	unlink(path);
	path = write_tmp("port = 80x\n");
	ok(config_load_file(cfg, path, err, sizeof(err)) == -1 && strstr(err, "port") &&
	       strstr(err, ":1:"),
	   "bad integer names key and line: %s", err);
	unlink(path);
	ok(config_set(cfg, "port", "70000", err, sizeof(err)) == -1 && strstr(err, "range"),
	   "out of range refused: %s", err);
	ok(config_set(cfg, "log_level", "loud", err, sizeof(err)) == -1, "bad level refused");

	setenv("CLOUDSWEEP_MAX_HEADERS", "42", 1);
	ok(config_load_env(cfg, err, sizeof(err)) == 0 && cfg->max_headers == 42,
	   "environment overrides");
	setenv("CLOUDSWEEP_WORKERS", "many", 1);
	ok(config_load_env(cfg, err, sizeof(err)) == -1 && strstr(err, "CLOUDSWEEP_WORKERS"),
	   "bad environment value named: %s", err);
	unsetenv("CLOUDSWEEP_WORKERS");
	unsetenv("CLOUDSWEEP_MAX_HEADERS");

	ok(config_set(cfg, "db_conninfo", "host=x password=hunter2", err, sizeof(err)) == 0 &&
	       config_finish(cfg, err, sizeof(err)) == -1 && strstr(err, "password"),
	   "a password in db_conninfo is refused");
	config_set(cfg, "db_conninfo", "host=x", err, sizeof(err));
	path = write_tmp("it's\\secret\n");
	config_set(cfg, "db_password_file", path, err, sizeof(err));
	ok(config_finish(cfg, err, sizeof(err)) == 0, "secret file read");
	unlink(path);
	{
		char *ci = config_db_conninfo(cfg);

		ok(strstr(ci, "password='it\\'s\\\\secret'") != NULL, "password quoted for libpq");
		cs_free_secret(ci);
	}
	ok(config_check_serving(cfg, err, sizeof(err)) == -1 && strstr(err, "tls_cert_file"),
	   "serving needs a certificate: %s", err);

	other = config_new();
	config_set(other, "max_headers", "7", err, sizeof(err));
	config_set(other, "port", "1234", err, sizeof(err));
	config_apply_reloadable(cfg, other);
	ok(cfg->max_headers == 7 && cfg->port == 9443, "reload applies only reloadable options");
	config_free(other);
	config_free(cfg);

	fp = fopen(SRCDIR "/etc/cloudsweepd.conf.sample", "r");
	ok(fp != NULL, "sample file present");
	for (const struct config_option *o = config_options; fp != NULL && o->name; o++) {
		bool found = false;

		rewind(fp);
		while (fgets(line, sizeof(line), fp))
			if (line[0] == '#' && strncmp(line + 1, o->name, strlen(o->name)) == 0 &&
			    line[1 + strlen(o->name)] == ' ')
				found = true;
		if (!found) {
			printf("# %s is not documented in the sample\n", o->name);
			missing++;
		}
	}
	if (fp)
		fclose(fp);
	is_int(missing, 0, "every option is in etc/cloudsweepd.conf.sample");
	return tap_done();
}
