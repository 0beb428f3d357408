/*
 * log.c - one JSON object per line. Lines are assembled with jansson and
 * written with a single write(2) so lines from several processes sharing
 * the file never interleave.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cloudsweep/log.h"

static const char *log_role = "cloudsweepd";
static int log_worker = -1;
static enum log_level log_min = LOG_LVL_INFO;
static int log_fd = STDERR_FILENO;

static const char *const log_level_names[] = { "debug", "info", "warn", "error", "fatal" };

void log_set_role(const char *role, int worker)
{
	log_role = role;
	log_worker = worker;
}

void log_set_level(enum log_level level)
{
	log_min = level;
}

enum log_level log_get_level(void)
{
	return log_min;
}

int log_level_parse(const char *name)
{
	for (size_t i = 0; i < LOG_LVL_FATAL; i++)
		if (strcmp(name, log_level_names[i]) == 0)
			return (int)i;
	return -1;
}

int log_open(const char *path)
{
	int fd;

	if (path == NULL || *path == '\0') {
		if (log_fd != STDERR_FILENO)
			close(log_fd);
		log_fd = STDERR_FILENO;
		return 0;
	}
	fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640);
	if (fd == -1)
		return -1;
	if (log_fd != STDERR_FILENO)
		close(log_fd);
	log_fd = fd;
	return 0;
}

void log_fields(enum log_level level, const char *event, json_t *fields)
{
	char ts[40];
	char *line;
	json_t *obj;
	size_t len;

	if (level < log_min) {
		json_decref(fields);
		return;
	}
	cs_rfc3339(ts, sizeof(ts), NULL);
	obj = json_object();
	json_object_set_new(obj, "ts", json_string(ts));
	json_object_set_new(obj, "level", json_string(log_level_names[level]));
	json_object_set_new(obj, "role", json_string(log_role));
	if (log_worker >= 0)
		json_object_set_new(obj, "worker", json_integer(log_worker));
	json_object_set_new(obj, "pid", json_integer(getpid()));
	json_object_set_new(obj, "event", json_string(event));
	if (fields != NULL) {
		json_object_update_missing(obj, fields);
		json_decref(fields);
	}
	line = json_dumps(obj, JSON_COMPACT | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(6));
	json_decref(obj);
	if (line == NULL)
		return;
	len = strlen(line);
	line[len] = '\n'; /* replaces the NUL; written with an explicit length */
	while (write(log_fd, line, len + 1) == -1 && errno == EINTR)
		;
	free(line);
}

static void log_vmsg(enum log_level level, const char *event, bool with_errno, const char *fmt,
                     va_list ap)
{
	int saved = errno;
	char msg[1024];
	json_t *f;

	if (level < log_min)
		return;
	vsnprintf(msg, sizeof(msg), fmt, ap);
	f = json_object();
	/* json_stringn_nocheck would accept invalid UTF-8; sanitize instead. */
	json_t *m = json_string(msg);
	if (m == NULL) {
		for (char *p = msg; *p; p++)
			if ((unsigned char)*p >= 0x80)
				*p = '?';
		m = json_string(msg);
	}
	json_object_set_new(f, "msg", m);
	if (with_errno)
		json_object_set_new(f, "error", json_string(strerror(saved)));
	log_fields(level, event, f);
	errno = saved;
}

#define LOG_FN(name, level, with_errno)                      \
	void name(const char *event, const char *fmt, ...)   \
	{                                                    \
		va_list ap;                                  \
		va_start(ap, fmt);                           \
		log_vmsg(level, event, with_errno, fmt, ap); \
		va_end(ap);                                  \
	}

LOG_FN(log_debug, LOG_LVL_DEBUG, false)
LOG_FN(log_info, LOG_LVL_INFO, false)
LOG_FN(log_warn, LOG_LVL_WARN, true)
LOG_FN(log_warnx, LOG_LVL_WARN, false)
LOG_FN(log_errorx, LOG_LVL_ERROR, false)

void fatal(const char *event, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	log_vmsg(LOG_LVL_FATAL, event, true, fmt, ap);
	va_end(ap);
	exit(1);
}

void fatalx(const char *event, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	log_vmsg(LOG_LVL_FATAL, event, false, fmt, ap);
	va_end(ap);
	exit(1);
}
