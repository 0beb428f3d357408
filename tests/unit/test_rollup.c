/*
 * test_rollup.c - the STS cache drops credentials AWS rejected: against the
 * fake AWS (tests/fakes/fake_aws.py, plain HTTP on loopback) a role is
 * assumed and cached; an ordinary error leaves the entry, a rejection of
 * the cached key (InvalidClientTokenId and friends) drops it so the next
 * assume calls STS again. Skipped when python3 or botocore are missing.
 */
#include "config.h"

#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <event2/event.h>
#include <jansson.h>

#include "cloudsweep/aws.h"
#include "cloudsweep/log.h"
#include "tap.h"

extern char **environ;

#define PY          "/usr/bin/python3"
#define BASE_KEY    "AKIACLOUDSWEEPTEST01"
#define BASE_SECRET "cloudsweep-test-secret-0123456789abcdef"
#define ROLE_ARN    "arn:aws:iam::222222222222:role/CloudSweepScan"
#define EXT_ID      "ext-0123456789"

static const char seed[] =
    "{\"accounts\": {\"111111111111\": {\"access_keys\": [{\"id\": \"" BASE_KEY
    "\", \"secret\": \"" BASE_SECRET "\"}]}, \"222222222222\": {\"roles\": [{\"name\": "
    "\"CloudSweepScan\", \"external_id\": \"" EXT_ID "\"}]}}}";

static struct event_base *base;
static pid_t fake_pid;
static char tmpdir[] = "/tmp/cs-rollup-XXXXXX";
static char seed_path[300];

static int fake_start(int *port)
{
	char fake[] = SRCDIR "/tests/fakes/fake_aws.py";
	char *argv[] = { PY, fake, "--http-port", "0", "--seed", seed_path, NULL };
	posix_spawn_file_actions_t fa;
	char *line = NULL;
	size_t cap = 0;
	int pfd[2];
	FILE *fp;
	json_t *j;

	if (mkdtemp(tmpdir) == NULL)
		return -1;
	snprintf(seed_path, sizeof(seed_path), "%s/seed.json", tmpdir);
	fp = fopen(seed_path, "w");
	if (fp == NULL || fputs(seed, fp) == EOF || fclose(fp) != 0)
		return -1;
	if (pipe(pfd) != 0 || posix_spawn_file_actions_init(&fa) != 0)
		return -1;
	posix_spawn_file_actions_adddup2(&fa, pfd[1], 1);
	posix_spawn_file_actions_addclose(&fa, pfd[0]);
	if (posix_spawn(&fake_pid, PY, &fa, NULL, argv, environ) != 0)
		return -1;
	posix_spawn_file_actions_destroy(&fa);
	close(pfd[1]);
	fp = fdopen(pfd[0], "r");
	if (fp == NULL || getline(&line, &cap, fp) <= 0) {
		free(line);
		return -1;
	}
	fclose(fp);
	j = json_loads(line, 0, NULL);
	free(line);
	*port = (int)json_integer_value(json_object_get(j, "http_port"));
	json_decref(j);
	return *port > 0 ? 0 : -1;
}

static void fake_stop(void)
{
	if (fake_pid > 0) {
		kill(fake_pid, SIGTERM);
		waitpid(fake_pid, NULL, 0);
	}
	unlink(seed_path);
	rmdir(tmpdir);
}

struct assumed {
	int done;
	enum aws_status status;
	struct aws_owned_credentials creds;
};

static void assume_cb(const struct aws_result *res, const struct aws_credentials *creds, time_t exp,
                      void *arg)
{
	struct assumed *a = arg;

	a->done++;
	a->status = res->status;
	aws_owned_credentials_clear(&a->creds);
	if (creds != NULL) {
		a->creds.access_key_id = xstrdup(creds->access_key_id);
		a->creds.secret_access_key = xstrdup(creds->secret_access_key);
		a->creds.session_token = xstrdup(creds->session_token);
		a->creds.expiration = exp;
	}
}

/* Assume the role once more; the number of AssumeRole calls sent so far. */
static uint64_t assume(struct aws_client *cl, struct assumed *a)
{
	static const struct aws_credentials base_creds = { BASE_KEY, BASE_SECRET, NULL };
	struct aws_assume_role role = { .role_arn = ROLE_ARN,
		                        .external_id = EXT_ID,
		                        .session_name = "scan",
		                        .source_identity = "org-1" };
	struct aws_client_stats st;
	int want = a->done + 1;
	uint64_t until = cs_now_ms() + 60000;

	if (aws_sts_assume_role(cl, &base_creds, "us-east-1", &role, assume_cb, a) == NULL)
		return 0;
	while (a->done < want && cs_now_ms() < until)
		event_base_loop(base, EVLOOP_ONCE);
	aws_client_stats(cl, &st);
	return st.sts_calls;
}

static void test_rejections(int port)
{
	static const char *const codes[] = { "InvalidClientTokenId", "ExpiredToken", "AuthFailure",
		                             "UnrecognizedClientException",
		                             "ExpiredTokenException" };
	struct aws_client_options o = { 0 };
	struct assumed a = { 0 };
	struct aws_result res = { .status = AWS_ERR_SERVICE, .http_status = 403, .message = "" };
	struct aws_credentials view, other = { "ASIAOTHERKEY", "x", "y" };
	struct aws_client *cl;
	char url[64], key[128];
	uint64_t calls;

	snprintf(url, sizeof(url), "http://127.0.0.1:%d", port);
	o.endpoint_url = url;
	o.no_env = true;
	cl = aws_client_new(base, &o);
	calls = assume(cl, &a);
	ok(calls == 1 && a.status == AWS_OK, "the role is assumed (%llu calls)",
	   (unsigned long long)calls);
	is_int((int)assume(cl, &a), 1, "the second assume is a cache hit");

	view = aws_owned_credentials_view(&a.creds);
	res.error_code = "AccessDenied";
	aws_sts_credentials_rejected(cl, &view, &res);
	is_int((int)assume(cl, &a), 1, "AccessDenied keeps the cached credentials");
	res.error_code = "InvalidClientTokenId";
	aws_sts_credentials_rejected(cl, &other, &res);
	is_int((int)assume(cl, &a), 1, "a rejection of other credentials keeps them");
	res.status = AWS_ERR_THROTTLED;
	view = aws_owned_credentials_view(&a.creds);
	aws_sts_credentials_rejected(cl, &view, &res);
	is_int((int)assume(cl, &a), 1, "only an error answer of AWS counts");
	res.status = AWS_ERR_SERVICE;
	aws_sts_credentials_rejected(NULL, &view, &res);
	aws_sts_credentials_rejected(cl, NULL, &res);
	aws_sts_credentials_rejected(cl, &view, NULL);
	ok(1, "NULL arguments are ignored");
	for (size_t i = 0; i < sizeof(codes) / sizeof(codes[0]); i++) {
		snprintf(key, sizeof(key), "%s", a.creds.access_key_id);
		view = aws_owned_credentials_view(&a.creds);
		res.error_code = codes[i];
		aws_sts_credentials_rejected(cl, &view, &res);
		is_int((int)assume(cl, &a), (int)(2 + i), "%s drops the cached credentials",
		       codes[i]);
		ok(a.status == AWS_OK && strcmp(key, a.creds.access_key_id) != 0,
		   "fresh credentials after %s", codes[i]);
	}
	aws_owned_credentials_clear(&a.creds);
	aws_client_free(cl);
}

int main(void)
{
	int port = 0;

	signal(SIGPIPE, SIG_IGN);
	log_set_level(LOG_LVL_ERROR);
	unsetenv("AWS_ENDPOINT_URL");
	unsetenv("AWS_CA_BUNDLE");
	if (access(PY, X_OK) != 0 || system(PY " -c 'import botocore' 2>/dev/null") != 0) {
		printf("# python3-botocore missing: skipped\n");
		return tap_done();
	}
	base = event_base_new();
	if (fake_start(&port) == -1) {
		ok(0, "the fake AWS starts");
		fake_stop();
		event_base_free(base);
		return tap_done();
	}
	test_rejections(port);
	fake_stop();
	event_base_free(base);
	return tap_done();
}
