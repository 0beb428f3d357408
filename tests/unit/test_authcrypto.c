/*
 * test_authcrypto.c - passwords, TOTP and backup codes: the RFC 6238
 * Appendix B SHA-1 vectors, RFC 4648 base32 vectors, the +-1 step window
 * and replay refusal, the exact otpauth URI, argon2id hash / verify /
 * malformed PHC / needs_rehash, the password policy, the dummy hash, the
 * asynchronous wrappers on the thread pool (including cancel), and backup
 * code generation and hashing. Small argon2 parameters except one test at
 * the real defaults.
 */
#include "config.h"

#include <ctype.h>
#include <dirent.h>
#include <event2/event.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "cloudsweep/authcrypto.h"
#include "cloudsweep/log.h"
#include "cloudsweep/threadpool.h"
#include "tap.h"

static const struct password_params small = { 1024, 1, 1 };

static void test_rfc6238(void)
{
	static const struct {
		long long t;
		long code;
	} v[] = {
		{ 59LL, 94287082 },         { 1111111109LL, 7081804 },  { 1111111111LL, 14050471 },
		{ 1234567890LL, 89005924 }, { 2000000000LL, 69279037 }, { 20000000000LL, 65353130 },
	};
	const unsigned char *key = (const unsigned char *)"12345678901234567890";

	for (size_t i = 0; i < CS_ARRAY_LEN(v); i++)
		is_int(totp_hotp(key, 20, (uint64_t)totp_time_step((time_t)v[i].t), 8), v[i].code,
		       "RFC 6238 SHA-1 T=%lld -> %08ld", v[i].t, v[i].code);
	/* RFC 4226 Appendix D: the 6-digit HOTP values for counters 0 and 9. */
	is_int(totp_hotp(key, 20, 0, 6), 755224, "RFC 4226 counter 0");
	is_int(totp_hotp(key, 20, 9, 6), 520489, "RFC 4226 counter 9");
	is_int(totp_hotp(key, 20, 0, 5), -1, "fewer than 6 digits refused");
}

static void test_base32(void)
{
	static const char *const v[][2] = {
		{ "", "" },
		{ "f", "MY======" },
		{ "fo", "MZXQ====" },
		{ "foo", "MZXW6===" },
		{ "foob", "MZXW6YQ=" },
		{ "fooba", "MZXW6YTB" },
		{ "foobar", "MZXW6YTBOI======" },
	};
	unsigned char buf[64];
	char *s, lower[32];
	long n;

	for (size_t i = 0; i < CS_ARRAY_LEN(v); i++) {
		size_t len = strlen(v[i][0]);

		s = totp_base32_encode((const unsigned char *)v[i][0], len, true);
		is_str(s, v[i][1], "base32(\"%s\") = \"%s\"", v[i][0], v[i][1]);
		free(s);
		n = totp_base32_decode(v[i][1], buf, sizeof(buf));
		ok(n == (long)len && memcmp(buf, v[i][0], len) == 0, "decode \"%s\"", v[i][1]);
	}
	s = totp_base32_encode((const unsigned char *)"foobar", 6, false);
	is_str(s, "MZXW6YTBOI", "unpadded encoding");
	free(s);
	snprintf(lower, sizeof(lower), "mzxw 6ytb oi");
	n = totp_base32_decode(lower, buf, sizeof(buf));
	ok(n == 6 && memcmp(buf, "foobar", 6) == 0, "decode ignores case and spaces");
	is_int(totp_base32_decode("MZXW6YTBO", buf, sizeof(buf)), -1, "impossible length refused");
	is_int(totp_base32_decode("MZ", buf, sizeof(buf)), -1, "non-zero trailing bits refused");
	is_int(totp_base32_decode("MY1=====", buf, sizeof(buf)), -1, "digit 1 refused");
	is_int(totp_base32_decode("MY=A", buf, sizeof(buf)), -1, "data after padding refused");
	is_int(totp_base32_decode("MZXW6YTB", buf, 4), -1, "output bound respected");
}

static void test_totp(void)
{
	unsigned char secret[TOTP_SECRET_LEN], back[TOTP_SECRET_LEN];
	time_t now = 1700000015; /* inside a step, so the edges are 15 s away */
	int64_t step = totp_time_step(now), matched = -1;
	char code[48], *b32;
	long c;

	ok(totp_secret_generate(secret) == 0, "secret generated");
	b32 = totp_base32_encode(secret, sizeof(secret), false);
	ok(b32 != NULL && strlen(b32) == TOTP_B32_LEN, "secret is 32 base32 characters");
	ok(totp_base32_decode(b32, back, sizeof(back)) == TOTP_SECRET_LEN &&
	       memcmp(back, secret, sizeof(back)) == 0,
	   "secret round-trips");
	free(b32);

	for (int d = -2; d <= 2; d++) {
		c = totp_code(secret, sizeof(secret), step + d);
		snprintf(code, sizeof(code), "%06ld", c);
		matched = -1;
		if (d >= -1 && d <= 1)
			ok(totp_verify(secret, sizeof(secret), code, now, 0, &matched) == 0 &&
			       matched == step + d,
			   "step %+d accepted", d);
		else
			is_int(totp_verify(secret, sizeof(secret), code, now, 0, &matched), 1,
			       "step %+d refused", d);
	}
	snprintf(code, sizeof(code), "%06ld", totp_code(secret, sizeof(secret), step));
	is_int(totp_verify(secret, sizeof(secret), code, now, step, &matched), 1,
	       "replay of the used step refused");
	is_int(totp_verify(secret, sizeof(secret), code, now, step + 1, &matched), 1,
	       "a step before the last used one refused");
	ok(totp_verify(secret, sizeof(secret), code, now, step - 1, &matched) == 0 &&
	       matched == step,
	   "accepted when only an earlier step was used");
	snprintf(code, sizeof(code), "%03ld %03ld", totp_code(secret, sizeof(secret), step) / 1000,
	         totp_code(secret, sizeof(secret), step) % 1000);
	is_int(totp_verify(secret, sizeof(secret), code, now, 0, &matched), 0,
	       "spaces inside the code ignored");
	is_int(totp_verify(secret, sizeof(secret), "12345", now, 0, &matched), 1,
	       "5 digits refused");
	is_int(totp_verify(secret, sizeof(secret), "1234567", now, 0, &matched), 1,
	       "7 digits refused");
	is_int(totp_verify(secret, sizeof(secret), "12a456", now, 0, &matched), 1,
	       "non-digit refused");
}

static void test_otpauth(void)
{
	char *u;

	u = totp_otpauth_uri("Cloud Sweep", "alice+mfa@example.com", "JBSWY3DPEHPK3PXP");
	is_str(u,
	       "otpauth://totp/Cloud%20Sweep:alice%2Bmfa%40example.com?secret=JBSWY3DPEHPK3PXP"
	       "&issuer=Cloud%20Sweep&algorithm=SHA1&digits=6&period=30",
	       "otpauth URI percent-encodes issuer and account");
	free(u);
	u = totp_otpauth_uri("CloudSweep", "b\xc3\xa9@x.io", "ABC");
	is_str(u,
	       "otpauth://totp/CloudSweep:b%C3%A9%40x.io?secret=ABC&issuer=CloudSweep"
	       "&algorithm=SHA1&digits=6&period=30",
	       "UTF-8 account encoded byte by byte");
	free(u);
	ok(totp_otpauth_uri("Cloud:Sweep", "a@b.c", "ABC") == NULL, "colon in issuer refused");
	ok(totp_otpauth_uri("CloudSweep", "", "ABC") == NULL, "empty account refused");
	ok(totp_otpauth_uri("CloudSweep", "a@b.c", "abc") == NULL, "lower-case secret refused");
	ok(totp_otpauth_uri("CloudSweep", "a@b.c", "ABC=") == NULL, "padded secret refused");
}

static void test_password_sync(void)
{
	const char *pw = "correct horse battery staple";
	struct password_params other = { 2048, 1, 1 };
	char *phc, bad[256];
	const char *dummy;

	phc = password_hash(&small, pw, strlen(pw));
	ok(phc != NULL && strncmp(phc, "$argon2id$v=19$m=1024,t=1,p=1$", 30) == 0,
	   "PHC string format: %s", phc ? phc : "(null)");
	is_int(password_verify(phc, pw, strlen(pw)), 0, "right password matches");
	is_int(password_verify(phc, "correct horse battery stapler", 29), 1, "wrong password");
	is_int(password_verify(phc, pw, strlen(pw) - 1), 1, "prefix of the password");
	ok(!password_needs_rehash(phc, &small), "same params: no rehash");
	ok(password_needs_rehash(phc, &other), "other params: rehash");
	ok(password_needs_rehash(phc, NULL), "defaults differ: rehash");

	is_int(password_verify("", pw, strlen(pw)), -1, "empty PHC malformed");
	is_int(password_verify(NULL, pw, strlen(pw)), -1, "NULL PHC malformed");
	snprintf(bad, sizeof(bad), "%s", phc);
	bad[strlen(bad) - 5] = '\0';
	ok(password_verify(bad, pw, strlen(pw)) != 0, "truncated hash never matches");
	snprintf(bad, sizeof(bad), "$argon2i%s", phc + strlen("$argon2id"));
	is_int(password_verify(bad, pw, strlen(pw)), -1, "argon2i refused");
	snprintf(bad, sizeof(bad), "$argon2id$v=16%s", phc + strlen("$argon2id$v=19"));
	is_int(password_verify(bad, pw, strlen(pw)), -1, "version 16 refused");
	snprintf(bad, sizeof(bad), "$argon2id$v=19$m=4194304%s",
	         phc + strlen("$argon2id$v=19$m=1024"));
	is_int(password_verify(bad, pw, strlen(pw)), -1, "4 GiB memory cost refused");
	snprintf(bad, sizeof(bad), "%s$x", phc);
	is_int(password_verify(bad, pw, strlen(pw)), -1, "trailing field refused");
	ok(password_needs_rehash("garbage", &small), "garbage: rehash");
	free(phc);

	ok(password_hash(&(struct password_params){ 4, 1, 1 }, pw, strlen(pw)) == NULL,
	   "memory below the minimum refused");

	dummy = password_dummy_hash(&small);
	ok(dummy != NULL && password_dummy_hash(&small) == dummy, "dummy hash computed once");
	is_int(password_verify(dummy, pw, strlen(pw)), 1, "dummy matches nothing");
	password_dummy_clear();
}

static void test_password_defaults(void)
{
	const char *pw = "the real defaults, once";
	char *phc = password_hash(NULL, pw, strlen(pw));

	ok(phc != NULL && strncmp(phc, "$argon2id$v=19$m=19456,t=2,p=1$", 31) == 0,
	   "defaults m=19456 t=2 p=1");
	ok(phc != NULL && strlen(phc) == strlen("$argon2id$v=19$m=19456,t=2,p=1$") + 22 + 1 + 43,
	   "16-byte salt and 32-byte hash");
	is_int(password_verify(phc, pw, strlen(pw)), 0, "verifies at the defaults");
	ok(!password_needs_rehash(phc, NULL), "no rehash at the defaults");
	free(phc);
}

/* A string of n copies of the UTF-8 character ch. */
static char *repeat(const char *ch, int n)
{
	size_t len = strlen(ch);
	char *s = calloc(1, len * (size_t)n + 1);

	for (int i = 0; i < n; i++)
		memcpy(s + i * len, ch, len);
	return s;
}

static void test_policy(void)
{
	static const struct {
		const char *ch;
		int n;
		int want;
	} v[] = {
		{ "a", 11, -1 },
		{ "a", 12, 0 },
		{ "a", 128, 0 },
		{ "a", 129, -1 },
		{ "\xc3\xa9", 11, -1 },
		{ "\xc3\xa9", 12, 0 },
		{ "\xe2\x82\xac", 128, 0 },
		{ "\xe2\x82\xac", 129, -1 },
		{ "\xf0\x9f\x98\x80", 12, 0 },
		{ "\xf0\x9f\x98\x80", 128, 0 },
		{ "\xf0\x9f\x98\x80", 129, -1 },
	};
	static const char *const invalid[] = {
		"abcdefghijk\xc3\x28",          /* bad continuation */
		"abcdefghijkl\xc0\xaf",         /* overlong '/' */
		"abcdefghijkl\xed\xa0\x80",     /* surrogate */
		"abcdefghijkl\xf4\x90\x80\x80", /* above U+10FFFF */
		"abcdefghijkl\xe2\x82",         /* truncated */
	};
	const char *why = NULL;
	char *s;

	for (size_t i = 0; i < CS_ARRAY_LEN(v); i++) {
		s = repeat(v[i].ch, v[i].n);
		why = NULL;
		is_int(password_policy_check(s, strlen(s), "a@b.c", &why), v[i].want,
		       "%d x %zu-byte character: %s", v[i].n, strlen(v[i].ch),
		       v[i].want == 0 ? "accepted" : "refused");
		ok(v[i].want == 0 ? why == NULL : why != NULL, "reason %s", why ? why : "(none)");
		free(s);
	}
	for (size_t i = 0; i < CS_ARRAY_LEN(invalid); i++)
		is_int(password_policy_check(invalid[i], strlen(invalid[i]), NULL, &why), -1,
		       "invalid UTF-8 #%zu refused (%s)", i, why);
	is_int(password_policy_check("abcdefghijkl\0mn", 15, NULL, &why), -1, "NUL refused");
	is_int(
	    password_policy_check("Alice.Sweep@Example.COM", 23, "alice.sweep@example.com", &why),
	    -1, "email in another case refused (%s)", why);
	is_int(
	    password_policy_check("alice.sweep@example.com!", 24, "alice.sweep@example.com", &why),
	    0, "email plus a character is fine");
}

/* Asynchronous wrappers. */
static struct event_base *base;
static pthread_t reactor;
static int ncalls, last_result = 99;
static char *last_phc;
static bool on_reactor = true;

static void hash_cb(void *arg, const char *phc)
{
	on_reactor &= pthread_equal(pthread_self(), reactor) != 0;
	free(last_phc);
	last_phc = phc != NULL ? strdup(phc) : NULL;
	ncalls++;
	event_base_loopbreak(base);
}

static void verify_cb(void *arg, int result)
{
	on_reactor &= pthread_equal(pthread_self(), reactor) != 0;
	last_result = result;
	ncalls++;
	event_base_loopbreak(base);
}

static void never_cb(void *arg, int result)
{
	ncalls += 1000;
}

static void run(void)
{
	struct timeval tv = { 10, 0 };

	event_base_loopexit(base, &tv);
	event_base_dispatch(base);
}

static void wait_idle(struct threadpool *tp, uint64_t cancelled)
{
	struct threadpool_stats st;
	struct timespec ms = { 0, 1000000 };

	for (int i = 0; i < 10000; i++) {
		event_base_loop(base, EVLOOP_NONBLOCK);
		threadpool_stats(tp, &st);
		if (st.queued == 0 && st.running == 0 && st.cancelled >= cancelled)
			return;
		nanosleep(&ms, NULL);
	}
}

static void block_work(void *arg)
{
	struct timespec t = { 0, 50 * 1000000 };

	nanosleep(&t, NULL);
}

static void block_done(void *arg)
{
}

/* How many of this process's threads run at nice n (/proc/self/task/<tid>/stat, field 19). */
static int threads_at_nice(int n)
{
	DIR *d = opendir("/proc/self/task");
	struct dirent *e;
	int count = 0;

	while (d != NULL && (e = readdir(d)) != NULL) {
		char path[288], buf[1024], *p;
		FILE *f;
		int nice;

		if (e->d_name[0] == '.')
			continue;
		snprintf(path, sizeof(path), "/proc/self/task/%s/stat", e->d_name);
		if ((f = fopen(path, "r")) == NULL)
			continue;
		p = fgets(buf, sizeof(buf), f) != NULL ? strrchr(buf, ')') : NULL;
		fclose(f);
		/* After ")": state, then fields 4..18, then nice (field 19). */
		if (p != NULL &&
		    sscanf(p + 2,
		           "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %*u %*u "
		           "%*d %*d %*d %d",
		           &nice) == 1 &&
		    nice == n)
			count++;
	}
	if (d != NULL)
		closedir(d);
	return count;
}

static void test_password_async(void)
{
	char pw[] = "asynchronous password";
	struct threadpool *tp;
	struct threadpool_stats st;
	struct password_job *j;
	struct tp_job *blocker;

	base = event_base_new();
	reactor = pthread_self();
	tp = threadpool_new(base, 1, 4);

	ok(password_hash_start(tp, &small, pw, strlen(pw), hash_cb, NULL) != NULL, "hash queued");
	run();
	ok(ncalls == 1 && last_phc != NULL && password_verify(last_phc, pw, strlen(pw)) == 0,
	   "async hash verifies");
	ok(getpriority(PRIO_PROCESS, 0) == 0 && threads_at_nice(10) == 1,
	   "the hashing thread runs at nice 10, the reactor at 0");
	ok(password_verify_start(tp, last_phc, pw, strlen(pw), verify_cb, NULL) != NULL,
	   "verify queued");
	run();
	ok(ncalls == 2 && last_result == 0, "async verify matches");
	ok(password_verify_start(tp, last_phc, "nope", 4, verify_cb, NULL) != NULL,
	   "wrong verify queued");
	run();
	ok(ncalls == 3 && last_result == 1, "async verify mismatch");
	ok(password_verify_start(tp, "$argon2id$bogus", pw, strlen(pw), verify_cb, NULL) != NULL,
	   "malformed verify queued");
	run();
	ok(ncalls == 4 && last_result == -1, "async verify malformed");
	ok(on_reactor, "callbacks ran on the reactor thread");

	/* Cancel before run: a blocker holds the only thread. */
	blocker = threadpool_submit(tp, block_work, block_done, NULL, NULL);
	ok(blocker != NULL, "blocker queued");
	j = password_verify_start(tp, last_phc, pw, strlen(pw), never_cb, NULL);
	ok(j != NULL, "verify queued behind the blocker");
	password_cancel(j);
	/* Cancel while running (or still queued: either way no callback, no leak). */
	j = password_verify_start(tp, last_phc, pw, strlen(pw), never_cb, NULL);
	password_cancel(j);
	wait_idle(tp, 2);
	threadpool_stats(tp, &st);
	ok(st.cancelled == 2 && ncalls == 4, "cancelled jobs never call back");

	/* Full queue: the start refuses without calling back. */
	blocker = threadpool_submit(tp, block_work, block_done, NULL, NULL);
	for (int i = 0; i < 10000; i++) {
		threadpool_stats(tp, &st);
		if (st.running == 1)
			break;
		nanosleep(&(struct timespec){ 0, 100000 }, NULL);
	}
	ok(blocker != NULL && st.running == 1, "blocker running");
	for (int i = 0; i < 4; i++)
		j = password_verify_start(tp, last_phc, pw, strlen(pw), never_cb, NULL);
	ok(j != NULL, "queue filled");
	ok(password_verify_start(tp, last_phc, pw, strlen(pw), never_cb, NULL) == NULL,
	   "full queue refuses the job");
	/* Freeing the pool drops the queued jobs (wiping their copies) without callbacks. */
	threadpool_free(tp);
	is_int(ncalls, 4, "free drops queued jobs without callbacks");
	free(last_phc);
	event_base_free(base);
}

static void test_backup_codes(void)
{
	char codes[BACKUP_CODE_COUNT][BACKUP_CODE_SIZE], messy[32];
	char *h1, *h2, *h3;
	bool format = true, alphabet = true, unique = true, uniform = true;
	int counts[256] = { 0 }, total = 0;

	ok(backup_codes_generate(BACKUP_CODE_COUNT, codes) == 0, "10 codes generated");
	for (int i = 0; i < BACKUP_CODE_COUNT; i++) {
		format &= strlen(codes[i]) == 13 && codes[i][6] == '-';
		for (int k = 0; k < 13; k++)
			if (k != 6 && strchr(backup_code_alphabet, codes[i][k]) == NULL)
				alphabet = false;
		for (int k = 0; k < i; k++)
			unique &= strcmp(codes[i], codes[k]) != 0;
	}
	ok(format, "each code is xxxxxx-xxxxxx (%s)", codes[0]);
	ok(alphabet, "only alphabet symbols");
	ok(unique, "codes are distinct");
	is_int(strlen(backup_code_alphabet), 31, "31 symbols");
	ok(strpbrk(backup_code_alphabet, "0O1lI") == NULL, "no 0/O/1/l/I in the alphabet");

	for (int round = 0; round < 40; round++) {
		if (backup_codes_generate(BACKUP_CODE_COUNT, codes) != 0)
			uniform = false;
		for (int i = 0; i < BACKUP_CODE_COUNT; i++)
			for (int k = 0; codes[i][k] != '\0'; k++)
				if (codes[i][k] != '-') {
					counts[(unsigned char)codes[i][k]]++;
					total++;
				}
	}
	/* 4800 symbols over 31: about 155 each, standard deviation about 12. */
	for (const char *p = backup_code_alphabet; *p != '\0'; p++)
		uniform &= counts[(unsigned char)*p] > 80 && counts[(unsigned char)*p] < 230;
	ok(uniform && total == 4800, "every symbol drawn about equally often");

	h1 = backup_code_hash("user-1", codes[0]);
	snprintf(messy, sizeof(messy), " %.3s %.3s%.6s ", codes[0], codes[0] + 3, codes[0] + 7);
	for (char *p = messy; *p != '\0'; p++)
		*p = (char)toupper((unsigned char)*p);
	h2 = backup_code_hash("user-1", messy);
	h3 = backup_code_hash("user-2", codes[0]);
	ok(h1 != NULL && strlen(h1) == 64, "hash is 64 hex digits");
	ok(h1 != NULL && h2 != NULL && strcmp(h1, h2) == 0,
	   "case, dashes and spaces normalized (\"%s\")", messy);
	ok(h1 != NULL && h3 != NULL && strcmp(h1, h3) != 0, "bound to the user");
	free(h1);
	free(h2);
	free(h3);
	ok(backup_code_hash("user-1", "abcdef-ghjkm") == NULL, "11 symbols refused");
	ok(backup_code_hash("user-1", "abcdef-ghjkmnp") == NULL, "13 symbols refused");
	ok(backup_code_hash("user-1", "abcdef-ghjkm0") == NULL, "ambiguous symbol refused");
	ok(backup_code_hash(NULL, "abcdef-ghjkmn") == NULL, "no user refused");
}

int main(void)
{
	log_set_level(LOG_LVL_ERROR);
	test_rfc6238();
	test_base32();
	test_totp();
	test_otpauth();
	test_password_sync();
	test_password_defaults();
	test_policy();
	test_password_async();
	test_backup_codes();
	totp_shutdown();
	return tap_done();
}
