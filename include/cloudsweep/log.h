/*
 * log.h - structured logging: one JSON object per line on stderr (or a
 * file), with timestamp, level, process role/worker number, an event name
 * and fields. log_warn appends strerror(errno); log_warnx does not; fatal
 * and fatalx exit. Secrets never reach a log line: callers pass only
 * identifiers, never passwords, tokens, keys or credentials.
 */
#ifndef CLOUDSWEEP_LOG_H
#define CLOUDSWEEP_LOG_H

#include <jansson.h>
#include <stdbool.h>

#include "cloudsweep/util.h"

enum log_level {
	LOG_LVL_DEBUG = 0,
	LOG_LVL_INFO,
	LOG_LVL_WARN,
	LOG_LVL_ERROR,
	LOG_LVL_FATAL,
};

/* Set the process role ("master", "worker", "migrate", ...) and worker number (-1 for none). */
void log_set_role(const char *role, int worker);
/* Set the minimum level written. */
void log_set_level(enum log_level level);
/* Parse "debug", "info", "warn", "error"; -1 if unknown. */
int log_level_parse(const char *name);
/* Current minimum level. */
enum log_level log_get_level(void);
/* Redirect output to a file (append); NULL means stderr. Returns 0 or -1. */
int log_open(const char *path) CS_WUR;

/* Debug message. */
void log_debug(const char *event, const char *fmt, ...) CS_PRINTF(2, 3);
/* Informational message. */
void log_info(const char *event, const char *fmt, ...) CS_PRINTF(2, 3);
/* Warning with strerror(errno) appended. */
void log_warn(const char *event, const char *fmt, ...) CS_PRINTF(2, 3);
/* Warning without errno. */
void log_warnx(const char *event, const char *fmt, ...) CS_PRINTF(2, 3);
/* Error without errno. */
void log_errorx(const char *event, const char *fmt, ...) CS_PRINTF(2, 3);
/* Log with strerror(errno) and exit(1). */
CS_NORETURN void fatal(const char *event, const char *fmt, ...) CS_PRINTF(2, 3);
/* Log and exit(1). */
CS_NORETURN void fatalx(const char *event, const char *fmt, ...) CS_PRINTF(2, 3);

/*
 * Write one line made of the given fields plus ts/level/role/worker/event.
 * Takes ownership of fields (may be NULL).
 */
void log_fields(enum log_level level, const char *event, json_t *fields);

#endif
