/*
 * migrate.c - apply the SQL migrations in a directory, blocking. Files are
 * named NNN_name.sql and applied in numeric order; each one runs together
 * with the insert of its schema_migrations row in a single transaction, so
 * a failing file leaves no trace and the next run retries it. A session
 * advisory lock serializes concurrent runners (several hosts starting at
 * once): the second waits, then finds the files already recorded. Because
 * every file runs inside BEGIN/COMMIT, a file must not contain transaction
 * control or statements that refuse to run in a transaction block (such
 * as CREATE INDEX CONCURRENTLY). Only for the `migrate` command and tests:
 * never call this on a worker's reactor.
 */
#include "config.h"

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libpq-fe.h>

#include "cloudsweep/db.h"
#include "cloudsweep/log.h"
#include "cloudsweep/util.h"

#define MIGRATE_LOCK_KEY "7233630264425640549" /* pg_advisory_lock key of every runner */
#define MIGRATE_FILE_MAX (16 * 1024 * 1024)    /* largest migration file read */
#define MIGRATE_APP_NAME "cloudsweepd-migrate"

struct migration {
	unsigned long long num; /* numeric version, for ordering */
	char *version;          /* the digits as written: the schema_migrations key */
	char *name;             /* the part after the underscore, without .sql */
	char *file;             /* the file name */
};

static void migrate_notice_cb(void *arg, const char *message)
{
	char buf[256];

	snprintf(buf, sizeof(buf), "%s", message);
	cs_rstrip(buf);
	log_debug("db_migrate_notice", "%s", buf);
}

/* Split "NNN_name.sql" into m; false for any other file name. */
static bool migration_parse(const char *file, struct migration *m)
{
	size_t len = strlen(file), digits = 0, i;

	while (file[digits] >= '0' && file[digits] <= '9')
		digits++;
	if (digits == 0 || digits > 18 || file[digits] != '_' || len < digits + 6 ||
	    strcmp(file + len - 4, ".sql") != 0)
		return false;
	for (i = digits + 1; i < len - 4; i++) {
		char ch = file[i];

		if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
		      (ch >= '0' && ch <= '9') || ch == '_' || ch == '-'))
			return false;
	}
	m->num = strtoull(file, NULL, 10);
	m->version = xstrndup(file, digits);
	m->name = xstrndup(file + digits + 1, len - digits - 5);
	m->file = xstrdup(file);
	return true;
}

static int migration_cmp(const void *a, const void *b)
{
	const struct migration *x = a, *y = b;

	if (x->num != y->num)
		return x->num < y->num ? -1 : 1;
	return strcmp(x->file, y->file);
}

static void migrations_free(struct migration *list, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		free(list[i].version);
		free(list[i].name);
		free(list[i].file);
	}
	free(list);
}

/* Read sqldir into a sorted array; -1 on error or duplicate version numbers. */
static int migrations_scan(const char *sqldir, struct migration **listp, size_t *np)
{
	struct migration *list = NULL, m;
	size_t n = 0, cap = 0;
	struct dirent *de;
	DIR *dir;

	dir = opendir(sqldir);
	if (dir == NULL) {
		log_warn("db_migrate_failed", "cannot open migrations directory %s", sqldir);
		return -1;
	}
	while ((errno = 0, de = readdir(dir)) != NULL) {
		if (!migration_parse(de->d_name, &m))
			continue;
		if (n == cap) {
			cap = cap == 0 ? 16 : cap * 2;
			list = xrealloc(list, cap * sizeof(*list));
		}
		list[n++] = m;
	}
	if (errno != 0) {
		log_warn("db_migrate_failed", "cannot read migrations directory %s", sqldir);
		goto fail;
	}
	closedir(dir);
	dir = NULL;
	if (n > 1)
		qsort(list, n, sizeof(*list), migration_cmp);
	for (size_t i = 1; i < n; i++) {
		if (list[i].num == list[i - 1].num) {
			log_errorx("db_migrate_failed", "migrations %s and %s share a version",
			           list[i - 1].file, list[i].file);
			goto fail;
		}
	}
	*listp = list;
	*np = n;
	return 0;
fail:
	if (dir != NULL)
		closedir(dir);
	migrations_free(list, n);
	return -1;
}

/* Run one command; 0 when it succeeded. */
static int migrate_exec(PGconn *pg, const char *what, const char *sql, int nparams,
                        const char *const *params)
{
	ExecStatusType st;
	PGresult *res;
	char buf[512];

	if (nparams > 0)
		res = PQexecParams(pg, sql, nparams, NULL, params, NULL, NULL, 0);
	else
		res = PQexec(pg, sql);
	st = PQresultStatus(res);
	if (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK || st == PGRES_EMPTY_QUERY) {
		PQclear(res);
		return 0;
	}
	snprintf(buf, sizeof(buf), "%s",
	         res != NULL ? PQresultErrorMessage(res) : PQerrorMessage(pg));
	cs_rstrip(buf);
	log_errorx("db_migrate_failed", "%s: %s", what, buf);
	PQclear(res);
	return -1;
}

/* 1 if version is recorded, 0 if not, -1 on error. */
static int migrate_applied(PGconn *pg, const char *version)
{
	const char *params[1] = { version };
	PGresult *res;
	int r;

	res = PQexecParams(pg, "SELECT 1 FROM schema_migrations WHERE version = $1", 1, NULL,
	                   params, NULL, NULL, 0);
	if (PQresultStatus(res) != PGRES_TUPLES_OK) {
		char buf[256];

		snprintf(buf, sizeof(buf), "%s", PQresultErrorMessage(res));
		cs_rstrip(buf);
		log_errorx("db_migrate_failed", "schema_migrations: %s", buf);
		PQclear(res);
		return -1;
	}
	r = PQntuples(res) > 0;
	PQclear(res);
	return r;
}

/* Apply one file with its record in one transaction. */
static int migrate_apply(PGconn *pg, const char *sqldir, const struct migration *m)
{
	const char *params[2] = { m->version, m->name };
	char *path, *sql;

	path = xasprintf("%s/%s", sqldir, m->file);
	sql = cs_read_file(path, MIGRATE_FILE_MAX, NULL);
	if (sql == NULL) {
		log_warn("db_migrate_failed", "cannot read %s", path);
		free(path);
		return -1;
	}
	free(path);
	if (migrate_exec(pg, m->file, "BEGIN", 0, NULL) != 0)
		goto fail;
	if (migrate_exec(pg, m->file, sql, 0, NULL) != 0 ||
	    migrate_exec(pg, m->file,
	                 "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", 2,
	                 params) != 0 ||
	    migrate_exec(pg, m->file, "COMMIT", 0, NULL) != 0) {
		PQclear(PQexec(pg, "ROLLBACK"));
		goto fail;
	}
	free(sql);
	log_info("db_migration_applied", "%s", m->file);
	return 0;
fail:
	free(sql);
	return -1;
}

/* Apply pending migrations from sqldir; the number applied, or -1. */
int db_migrate(const char *conninfo, const char *sqldir)
{
	const char *const keys[] = { "dbname", "fallback_application_name", NULL };
	const char *const vals[] = { conninfo, MIGRATE_APP_NAME, NULL };
	struct migration *list = NULL;
	size_t n = 0;
	PGconn *pg = NULL;
	bool locked = false;
	int applied = 0, r;
	char buf[256];

	if (conninfo == NULL || sqldir == NULL)
		return -1;
	if (migrations_scan(sqldir, &list, &n) != 0)
		return -1;
	pg = PQconnectdbParams(keys, vals, 1);
	if (pg == NULL || PQstatus(pg) != CONNECTION_OK) {
		snprintf(buf, sizeof(buf), "%s", pg != NULL ? PQerrorMessage(pg) : "out of memory");
		cs_rstrip(buf);
		log_errorx("db_connect_failed", "migrate: %s", buf);
		goto fail;
	}
	PQsetNoticeProcessor(pg, migrate_notice_cb, NULL);
	if (migrate_exec(pg, "advisory lock", "SELECT pg_advisory_lock(" MIGRATE_LOCK_KEY ")", 0,
	                 NULL) != 0)
		goto fail;
	locked = true;
	if (migrate_exec(pg, "schema_migrations",
	                 "CREATE TABLE IF NOT EXISTS schema_migrations ("
	                 "version text PRIMARY KEY, name text NOT NULL, "
	                 "applied_at timestamptz NOT NULL DEFAULT now())",
	                 0, NULL) != 0)
		goto fail;
	for (size_t i = 0; i < n; i++) {
		if ((r = migrate_applied(pg, list[i].version)) < 0)
			goto fail;
		if (r == 1)
			continue;
		if (migrate_apply(pg, sqldir, &list[i]) != 0)
			goto fail;
		applied++;
	}
	migrate_exec(pg, "advisory unlock", "SELECT pg_advisory_unlock(" MIGRATE_LOCK_KEY ")", 0,
	             NULL);
	PQfinish(pg);
	migrations_free(list, n);
	log_info("db_migrate_done", "%d migration(s) applied", applied);
	return applied;
fail:
	if (locked)
		PQclear(PQexec(pg, "SELECT pg_advisory_unlock(" MIGRATE_LOCK_KEY ")"));
	PQfinish(pg);
	migrations_free(list, n);
	return -1;
}
