/*
 * tap.h - a tiny TAP producer for the unit tests: each check prints
 * "ok N - name" or "not ok N - name", and tap_done() prints the plan and
 * returns the exit status for main.
 */
#ifndef CLOUDSWEEP_TAP_H
#define CLOUDSWEEP_TAP_H

#include <stdio.h>
#include <string.h>

static int tap_n, tap_failed;

#define ok(cond, ...)                                                                   \
	do {                                                                            \
		int ok_ = !!(cond);                                                     \
		tap_n++;                                                                \
		if (!ok_)                                                               \
			tap_failed++;                                                   \
		printf("%sok %d - ", ok_ ? "" : "not ", tap_n);                         \
		printf(__VA_ARGS__);                                                    \
		printf("\n");                                                           \
		if (!ok_)                                                               \
			printf("#   failed at %s:%d: %s\n", __FILE__, __LINE__, #cond); \
		fflush(stdout);                                                         \
	} while (0)

#define is_int(got, want, ...) ok((long long)(got) == (long long)(want), __VA_ARGS__)
#define is_str(got, want, ...) ok((got) != NULL && strcmp((got), (want)) == 0, __VA_ARGS__)

/* Skip the whole program with a reason (prints a 1..0 plan). */
static inline int tap_skip_all(const char *why)
{
	printf("1..0 # SKIP %s\n", why);
	return 0;
}

/* Print the plan; exit status for main. */
static inline int tap_done(void)
{
	printf("1..%d\n", tap_n);
	return tap_failed ? 1 : 0;
}

#endif
