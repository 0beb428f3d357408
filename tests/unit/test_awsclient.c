/*
 * test_awsclient.c - the AWS client, its XML parser and STS cache against the
 * real fake AWS (tests/fakes/fake_aws.py), started here under Debian's
 * /usr/bin/python3 on loopback over HTTP and HTTPS (a throwaway certificate
 * made with the openssl tool is the client's CA file). The fake checks every
 * signature with botocore, so an accepted call proves the signing; faults
 * (throttling, 5xx, resets, latency, malformed bodies) are injected through
 * its control API. Skipped when python3, botocore or openssl are missing.
 */
#include "config.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <event2/event.h>
#include <jansson.h>

#include "cloudsweep/aws.h"
#include "cloudsweep/config.h"
#include "cloudsweep/log.h"
#include "tap.h"

extern char **environ;

#define PY          "/usr/bin/python3"
#define BASE_KEY    "AKIACLOUDSWEEPTEST01"
#define BASE_SECRET "cloudsweep-test-secret-0123456789abcdef"
#define CUSTOMER    "222222222222"
#define ROLE_ARN    "arn:aws:iam::222222222222:role/CloudSweepScan"
#define OPEN_ARN    "arn:aws:iam::222222222222:role/Misconfigured"
#define EXT_ID      "ext-0123456789"

static struct event_base *base;
static pid_t fake_pid;
static int http_port, https_port;
static char tmpdir[] = "/tmp/cs-awsclient-XXXXXX";
static char ca_path[300];
static const struct aws_credentials base_creds = { BASE_KEY, BASE_SECRET, NULL };

/* --- the fake's control API, over a blocking socket --- */

static char *ctl(const char *method, const char *path, const char *body)
{
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons((uint16_t)http_port) };
	char head[512], *resp = NULL, *p;
	size_t len = 0, cap = 0, blen = body ? strlen(body) : 0;
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	ssize_t n;

	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0)
		goto fail;
	snprintf(head, sizeof(head),
	         "%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
	         "Content-Type: application/json\r\nContent-Length: %zu\r\n\r\n",
	         method, path, blen);
	if (write(fd, head, strlen(head)) < 0 || (blen && write(fd, body, blen) != (ssize_t)blen))
		goto fail;
	for (;;) {
		if (cap - len < 4096) {
			cap = cap ? cap * 2 : 65536;
			resp = realloc(resp, cap + 1);
		}
		n = read(fd, resp + len, cap - len);
		if (n <= 0)
			break;
		len += (size_t)n;
	}
	close(fd);
	if (resp == NULL)
		return NULL;
	resp[len] = '\0';
	p = strstr(resp, "\r\n\r\n");
	if (p == NULL) {
		free(resp);
		return NULL;
	}
	memmove(resp, p + 4, strlen(p + 4) + 1);
	return resp;
fail:
	if (fd >= 0)
		close(fd);
	free(resp);
	return NULL;
}

static void faults(const char *json)
{
	free(ctl("POST", "/__fake/faults", json));
}

/* Calls the fake logged with this action (json_array_size of its log). */
static int fake_count(const char *query)
{
	char path[256];
	char *b;
	json_t *j;
	int n = -1;

	snprintf(path, sizeof(path), "/__fake/calls?%s", query);
	b = ctl("GET", path, NULL);
	j = b ? json_loads(b, 0, NULL) : NULL;
	if (j != NULL)
		n = (int)json_array_size(json_object_get(j, "calls"));
	json_decref(j);
	free(b);
	return n;
}

static int fake_stat(const char *name)
{
	char *b = ctl("GET", "/__fake/stats", NULL);
	json_t *j = b ? json_loads(b, 0, NULL) : NULL;
	int n = j ? (int)json_integer_value(json_object_get(j, name)) : -1;

	json_decref(j);
	free(b);
	return n;
}

static const char seed[] =
    "{\"page_size\": 3, \"accounts\": {"
    "\"111111111111\": {\"access_keys\": [{\"id\": \"" BASE_KEY "\", \"secret\": \"" BASE_SECRET
    "\"}], \"regions\": {\"us-east-1\": {\"volumes\": ["
    "{\"VolumeId\": \"vol-1\"}, {\"VolumeId\": \"vol-2\"}, {\"VolumeId\": \"vol-3\"},"
    "{\"VolumeId\": \"vol-4\"}, {\"VolumeId\": \"vol-5\"}, {\"VolumeId\": \"vol-6\"},"
    "{\"VolumeId\": \"vol-7\"}], \"kms_keys\": [{\"KeyId\": "
    "\"1234abcd-0000-0000-0000-000000000001\", \"Aliases\": [\"alias/cloudsweep\"]}]}}},"
    "\"" CUSTOMER "\": {\"roles\": [{\"name\": \"CloudSweepScan\", \"external_id\": \"" EXT_ID
    "\"}, {\"name\": \"Misconfigured\"}], \"regions\": {\"us-east-1\": {\"volumes\": ["
    "{\"VolumeId\": \"vol-customer\"}]}}}}}";

/* --- starting the fake --- */

static int run(char *const argv[])
{
	posix_spawn_file_actions_t fa;
	pid_t pid;
	int st, rc;

	if (posix_spawn_file_actions_init(&fa) != 0)
		return -1;
	posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
	posix_spawn_file_actions_addopen(&fa, 2, "/dev/null", O_WRONLY, 0);
	rc = posix_spawnp(&pid, argv[0], &fa, NULL, argv, environ);
	posix_spawn_file_actions_destroy(&fa);
	if (rc != 0)
		return -1;
	if (waitpid(pid, &st, 0) != pid)
		return -1;
	return WIFEXITED(st) && WEXITSTATUS(st) == 0 ? 0 : -1;
}

static int fake_start(void)
{
	char cert[300], key[300], *line = NULL;
	char fake[] = SRCDIR "/tests/fakes/fake_aws.py";
	posix_spawn_file_actions_t fa;
	int pfd[2];
	size_t cap = 0;
	FILE *fp;
	json_t *j;

	if (mkdtemp(tmpdir) == NULL)
		return -1;
	snprintf(cert, sizeof(cert), "%s/cert.pem", tmpdir);
	snprintf(key, sizeof(key), "%s/key.pem", tmpdir);
	snprintf(ca_path, sizeof(ca_path), "%s", cert);
	{
		char *argv[] = { "openssl",
			         "req",
			         "-x509",
			         "-newkey",
			         "ec",
			         "-pkeyopt",
			         "ec_paramgen_curve:P-256",
			         "-nodes",
			         "-keyout",
			         key,
			         "-out",
			         cert,
			         "-days",
			         "2",
			         "-subj",
			         "/CN=localhost",
			         "-addext",
			         "subjectAltName=DNS:localhost,IP:127.0.0.1",
			         NULL };

		if (run(argv) == -1)
			return -1;
	}
	{
		char *argv[] = { PY,   fake,    "--http-port", "0", "--https-port", "0", "--cert",
			         cert, "--key", key,           NULL };

		if (pipe(pfd) != 0 || posix_spawn_file_actions_init(&fa) != 0)
			return -1;
		posix_spawn_file_actions_adddup2(&fa, pfd[1], 1);
		posix_spawn_file_actions_addclose(&fa, pfd[0]);
		if (posix_spawn(&fake_pid, PY, &fa, NULL, argv, environ) != 0)
			return -1;
		posix_spawn_file_actions_destroy(&fa);
		close(pfd[1]);
	}
	fp = fdopen(pfd[0], "r");
	if (fp == NULL || getline(&line, &cap, fp) <= 0) {
		free(line);
		return -1;
	}
	fclose(fp);
	j = json_loads(line, 0, NULL);
	free(line);
	http_port = (int)json_integer_value(json_object_get(j, "http_port"));
	https_port = (int)json_integer_value(json_object_get(j, "https_port"));
	json_decref(j);
	return http_port > 0 && https_port > 0 ? 0 : -1;
}

static void fake_stop(void)
{
	char path[300];

	if (fake_pid > 0) {
		kill(fake_pid, SIGTERM);
		waitpid(fake_pid, NULL, 0);
	}
	snprintf(path, sizeof(path), "%s/cert.pem", tmpdir);
	unlink(path);
	snprintf(path, sizeof(path), "%s/key.pem", tmpdir);
	unlink(path);
	snprintf(path, sizeof(path), "%s/creds", tmpdir);
	unlink(path);
	rmdir(tmpdir);
}

/* --- driving calls --- */

struct got {
	int done;
	enum aws_status status;
	int http_status, attempts, items;
	char code[96], msg[512], reqid[128], text[256];
};

static void loop_until(const int *done, int want)
{
	uint64_t until = cs_now_ms() + 60000;

	while (*done < want && cs_now_ms() < until)
		event_base_loop(base, EVLOOP_ONCE);
}

static int count_items(const struct aws_xml_node *list)
{
	int n = 0;

	AWS_XML_FOREACH(it, list, "item")
	n++;
	return n;
}

static void got_cb(const struct aws_result *res, void *arg)
{
	struct got *g = arg;
	const char *t;

	g->done++;
	g->status = res->status;
	g->http_status = res->http_status;
	g->attempts = res->attempts;
	snprintf(g->code, sizeof(g->code), "%s", res->error_code);
	snprintf(g->msg, sizeof(g->msg), "%s", res->message);
	snprintf(g->reqid, sizeof(g->reqid), "%s", res->request_id);
	g->items = count_items(aws_xml_child(res->xml, "volumeSet"));
	t = aws_xml_text(res->xml, "volumeSet/item/volumeId");
	snprintf(g->text, sizeof(g->text), "%s", t ? t : "");
}

static struct aws_client *client_new(bool tls_ca, int attempts, int deadline_ms, int max_in_flight)
{
	struct aws_client_options o = { 0 };
	char url[128];
	struct aws_client *cl;

	snprintf(url, sizeof(url), tls_ca ? "https://127.0.0.1:%d" : "http://127.0.0.1:%d",
	         tls_ca ? https_port : http_port);
	o.endpoint_url = url;
	o.ca_file = tls_ca ? ca_path : NULL;
	o.no_env = true;
	o.attempts = attempts;
	o.deadline_ms = deadline_ms;
	o.attempt_timeout_ms = deadline_ms;
	o.backoff_base_ms = 10;
	o.backoff_max_ms = 200;
	o.max_in_flight = max_in_flight;
	o.max_in_flight_per_account = max_in_flight;
	o.read_rate = 100000;
	o.read_burst = 100000;
	cl = aws_client_new(base, &o);
	return cl;
}

static void describe(struct aws_client *cl, const struct aws_credentials *cr, struct got *g,
                     int deadline_ms)
{
	struct aws_request r = { .service = AWS_EC2,
		                 .region = "us-east-1",
		                 .creds = cr,
		                 .action = "DescribeVolumes",
		                 .deadline_ms = deadline_ms };
	int want = g->done + 1;

	if (aws_call(cl, &r, got_cb, g) == NULL) {
		g->done++;
		g->status = AWS_ERR_REQUEST;
		return;
	}
	loop_until(&g->done, want);
}

/* --- tests --- */

static void test_xml(void)
{
	static const char doc[] =
	    "<?xml version=\"1.0\"?>\n<R xmlns=\"urn:x\"><a><item><v>1</v></item>"
	    "<other/><item><v>2</v></item><item><v>3 &amp; 4</v></item></a>"
	    "<b> t </b></R>";
	char err[256];
	struct aws_xml_doc *d = aws_xml_parse(doc, sizeof(doc) - 1, err, sizeof(err));
	const struct aws_xml_node *root = aws_xml_root(d);
	char *deep;
	int n = 0;

	ok(d != NULL, "a namespaced document parses");
	is_str(root ? root->name : "", "R", "namespace dropped from names");
	AWS_XML_FOREACH(it, aws_xml_child(root, "a"), "item")
	n++;
	is_int(n, 3, "item lists are walked, other siblings skipped");
	is_str(aws_xml_text(root, "a/item/v"), "1", "paths find the first match");
	is_str(aws_xml_text(root, "*/item/v"), "1", "* matches any name");
	is_str(aws_xml_text(root, "b"), " t ", "leaf text kept verbatim");
	ok(aws_xml_text(root, "a/missing") == NULL, "missing paths are NULL");
	aws_xml_free(d);

	d = aws_xml_parse("<!DOCTYPE x [<!ENTITY a \"aaaa\">]><x>&a;</x>", 41, err, sizeof(err));
	ok(d == NULL && strstr(err, "DOCTYPE") != NULL, "DOCTYPE refused: %s", err);
	d = aws_xml_parse("<a><b></a>", 10, err, sizeof(err));
	ok(d == NULL && strstr(err, "invalid XML") != NULL, "malformed XML refused: %s", err);
	deep = malloc(AWS_XML_MAX_DEPTH * 7 + 8);
	deep[0] = '\0';
	for (int i = 0; i <= AWS_XML_MAX_DEPTH; i++)
		strcat(deep, "<a>");
	for (int i = 0; i <= AWS_XML_MAX_DEPTH; i++)
		strcat(deep, "</a>");
	d = aws_xml_parse(deep, strlen(deep), err, sizeof(err));
	ok(d == NULL && strstr(err, "deeply") != NULL, "depth bounded: %s", err);
	free(deep);
}

static void test_endpoints(void)
{
	struct aws_client_options o = { 0 };
	struct aws_client *cl;
	char buf[256];

	setenv("AWS_ENDPOINT_URL", "http://env-all:1", 1);
	setenv("AWS_ENDPOINT_URL_ELASTIC_LOAD_BALANCING_V2", "http://env-elbv2:2/", 1);
	cl = aws_client_new(base, &o);
	is_str(aws_client_endpoint(cl, AWS_ELBV2, "eu-west-1", buf, sizeof(buf)),
	       "http://env-elbv2:2", "AWS_ENDPOINT_URL_<SDK ID> overrides one service");
	is_str(aws_client_endpoint(cl, AWS_EC2, "eu-west-1", buf, sizeof(buf)), "http://env-all:1",
	       "AWS_ENDPOINT_URL overrides the rest");
	aws_client_free(cl);
	o.endpoint_urls[AWS_EC2] = "http://cfg-ec2:3";
	cl = aws_client_new(base, &o);
	is_str(aws_client_endpoint(cl, AWS_EC2, "eu-west-1", buf, sizeof(buf)), "http://cfg-ec2:3",
	       "configuration wins over the environment");
	aws_client_free(cl);
	unsetenv("AWS_ENDPOINT_URL");
	unsetenv("AWS_ENDPOINT_URL_ELASTIC_LOAD_BALANCING_V2");
	o.endpoint_urls[AWS_EC2] = NULL;
	cl = aws_client_new(base, &o);
	is_str(aws_client_endpoint(cl, AWS_EC2, "eu-west-1", buf, sizeof(buf)),
	       "https://ec2.eu-west-1.amazonaws.com", "default: the regional endpoint");
	is_str(aws_client_endpoint(cl, AWS_CLOUDWATCH, "us-east-2", buf, sizeof(buf)),
	       "https://monitoring.us-east-2.amazonaws.com", "CloudWatch's endpoint prefix");
	is_str(aws_client_endpoint(cl, AWS_STS, "cn-north-1", buf, sizeof(buf)),
	       "https://sts.cn-north-1.amazonaws.com.cn", "China regions");
	aws_client_free(cl);
}

static void test_worker(void)
{
	struct config *cfg = config_new();
	char err[256], buf[256];

	ok(config_set(cfg, "aws_endpoint_urls", "EC2=http://cfg-ec2:1 kms=http://cfg-kms:2", err,
	              sizeof(err)) == 0 &&
	       config_set(cfg, "aws_credentials_file", "", err, sizeof(err)) == 0,
	   "aws_* options set");
	ok(aws_worker_init(base, cfg) == 0 && aws_worker_client() != NULL,
	   "the worker's client starts from the options");
	is_str(aws_client_endpoint(aws_worker_client(), AWS_KMS, "us-east-1", buf, sizeof(buf)),
	       "http://cfg-kms:2", "aws_endpoint_urls reaches the client");
	ok(aws_worker_base_credentials() == NULL, "no base credentials in the environment");
	aws_worker_free();
	ok(aws_worker_client() == NULL, "the worker's client is freed");
	ok(config_set(cfg, "aws_credentials_file", "/nonexistent/creds", err, sizeof(err)) == 0 &&
	       aws_worker_init(base, cfg) == -1 && aws_worker_client() == NULL,
	   "an unreadable aws_credentials_file is refused");
	ok(config_set(cfg, "aws_endpoint_urls", "S3=http://x:1", err, sizeof(err)) == 0 &&
	       aws_worker_init(base, cfg) == -1,
	   "an unknown service in aws_endpoint_urls is refused");
	config_free(cfg);
}

static void test_base_credentials(void)
{
	struct aws_owned_credentials c;
	char path[300];
	FILE *fp;

	snprintf(path, sizeof(path), "%s/creds", tmpdir);
	fp = fopen(path, "w");
	fprintf(fp, "[default]\n# comment\naws_access_key_id = AKIAFILE\n"
	            "aws_secret_access_key=s3cret \n");
	fclose(fp);
	ok(aws_base_credentials_load(path, &c) == 0 && strcmp(c.access_key_id, "AKIAFILE") == 0 &&
	       strcmp(c.secret_access_key, "s3cret") == 0 && c.session_token == NULL,
	   "base credentials from a file");
	aws_owned_credentials_clear(&c);
	setenv("AWS_ACCESS_KEY_ID", "AKIAENV", 1);
	setenv("AWS_SECRET_ACCESS_KEY", "envsecret", 1);
	setenv("AWS_SESSION_TOKEN", "envtoken", 1);
	ok(aws_base_credentials_load("", &c) == 0 && strcmp(c.access_key_id, "AKIAENV") == 0 &&
	       strcmp(c.session_token, "envtoken") == 0,
	   "base credentials from the environment");
	aws_owned_credentials_clear(&c);
	unsetenv("AWS_ACCESS_KEY_ID");
	ok(aws_base_credentials_load("", &c) == -1 && c.access_key_id == NULL,
	   "missing base credentials are an error");
	unsetenv("AWS_SECRET_ACCESS_KEY");
	unsetenv("AWS_SESSION_TOKEN");
}

static void test_calls(void)
{
	struct aws_client *cl = client_new(false, 5, 10000, 16);
	struct aws_client *tls = client_new(true, 5, 10000, 16);
	struct aws_credentials bad = { BASE_KEY, "wrong-secret", NULL };
	struct aws_client_options o = { 0 };
	struct aws_client *untrusted;
	char url[64];
	struct got g = { 0 };

	describe(cl, &base_creds, &g, 0);
	ok(g.status == AWS_OK && g.http_status == 200, "http: signed DescribeVolumes accepted (%s)",
	   g.msg);
	is_int(g.items, 3, "first page of volumes parsed");
	ok(*g.reqid != '\0', "request id reported");
	ok(fake_count("action=DescribeVolumes") >= 1, "the fake verified the call");

	describe(tls, &base_creds, &g, 0);
	ok(g.status == AWS_OK && g.items == 3, "https with the CA file: accepted (%s)", g.msg);

	snprintf(url, sizeof(url), "https://127.0.0.1:%d", https_port);
	o.endpoint_url = url;
	o.no_env = true;
	untrusted = aws_client_new(base, &o);
	describe(untrusted, &base_creds, &g, 0);
	ok(g.status == AWS_ERR_NETWORK && g.attempts == 1,
	   "https without the CA: refused, not retried (%s)", g.msg);
	aws_client_free(untrusted);

	describe(cl, &bad, &g, 0);
	ok(g.status == AWS_ERR_SERVICE && strcmp(g.code, "SignatureDoesNotMatch") == 0 &&
	       g.http_status == 403 && g.attempts == 1,
	   "a bad signature: SignatureDoesNotMatch, 403, not retried (%s)", g.code);
	ok(strstr(g.msg, "wrong-secret") == NULL, "the secret is not in the message");

	faults("{\"faults\": [{\"type\": \"throttle\", \"count\": 3}]}");
	describe(cl, &base_creds, &g, 0);
	ok(g.status == AWS_OK && g.attempts == 4, "throttled 3 times, then success on attempt %d",
	   g.attempts);

	faults("{\"faults\": [{\"type\": \"throttle\"}]}");
	describe(cl, &base_creds, &g, 0);
	ok(g.status == AWS_ERR_THROTTLED && g.attempts == 5 &&
	       strncmp(g.msg, "RequestLimitExceeded after 5 attempts", 37) == 0,
	   "a throttling storm: %s", g.msg);

	faults("{\"faults\": [{\"type\": \"error\", \"status\": 500}]}");
	{
		struct aws_client *many = client_new(false, 1000, 1500, 16);

		describe(many, &base_creds, &g, 0);
		ok(g.status == AWS_ERR_TIMEOUT && strstr(g.msg, "HTTP 500 InternalError") != NULL,
		   "500 until the deadline: %s", g.msg);
		aws_client_free(many);
	}

	faults("{\"faults\": [{\"type\": \"reset\"}]}");
	describe(cl, &base_creds, &g, 0);
	ok(g.status == AWS_ERR_NETWORK && g.attempts == 5 && strstr(g.msg, "after 5 attempts"),
	   "resets: %s", g.msg);

	faults("{\"faults\": [{\"type\": \"reset\", \"count\": 2}]}");
	describe(cl, &base_creds, &g, 0);
	ok(g.status == AWS_OK && g.attempts == 3, "two resets, then success");

	faults("{\"faults\": [{\"type\": \"latency\", \"ms\": 3000}]}");
	describe(cl, &base_creds, &g, 800);
	ok(g.status == AWS_ERR_TIMEOUT && strstr(g.msg, "deadline of 800 ms"),
	   "latency beyond the deadline: %s", g.msg);

	faults("{\"faults\": [{\"type\": \"malformed\"}]}");
	describe(cl, &base_creds, &g, 0);
	ok(g.status == AWS_ERR_RESPONSE && strstr(g.msg, "invalid XML") && g.attempts == 1,
	   "a malformed body: %s", g.msg);

	faults("{\"faults\": [{\"type\": \"truncated\", \"count\": 1}]}");
	describe(cl, &base_creds, &g, 0);
	ok(g.status == AWS_OK && g.attempts == 2, "a truncated body is retried (%s)", g.msg);
	faults("{\"faults\": []}");

	/* cancel: no callback, nothing leaks */
	{
		struct aws_request r = { .service = AWS_EC2,
			                 .region = "us-east-1",
			                 .creds = &base_creds,
			                 .action = "DescribeVolumes" };
		struct aws_call *c;
		int before;

		faults("{\"faults\": [{\"type\": \"latency\", \"ms\": 300}]}");
		before = g.done;
		c = aws_call(cl, &r, got_cb, &g);
		event_base_loop(base, EVLOOP_NONBLOCK);
		aws_call_cancel(c);
		describe(cl, &base_creds, &g, 0);
		is_int(g.done, before + 1, "a cancelled call never calls back");
		faults("{\"faults\": []}");
	}

	/* invalid input is refused at once */
	{
		struct aws_request r = { .service = AWS_EC2,
			                 .region = "US EAST",
			                 .creds = &base_creds,
			                 .action = "DescribeVolumes" };

		ok(aws_call(cl, &r, got_cb, &g) == NULL, "an invalid region is refused");
	}
	aws_client_free(cl);
	aws_client_free(tls);
}

struct kms_got {
	int done;
	enum aws_status status;
	char code[96];
	bool has_plain, has_blob;
};

static void kms_cb(const struct aws_result *res, void *arg)
{
	struct kms_got *k = arg;

	k->done++;
	k->status = res->status;
	snprintf(k->code, sizeof(k->code), "%s", res->error_code);
	k->has_plain = json_string_value(json_object_get(res->json, "Plaintext")) != NULL;
	k->has_blob = json_string_value(json_object_get(res->json, "CiphertextBlob")) != NULL;
}

static void test_kms(void)
{
	struct aws_client *cl = client_new(true, 5, 10000, 16);
	struct aws_request r = { .service = AWS_KMS,
		                 .region = "us-east-1",
		                 .creds = &base_creds,
		                 .action = "GenerateDataKey",
		                 .json_body =
		                     "{\"KeyId\": \"alias/cloudsweep\", \"KeySpec\": \"AES_256\"}",
		                 .mutating = true };
	struct kms_got k = { 0 };

	ok(aws_call(cl, &r, kms_cb, &k) != NULL, "KMS call started");
	loop_until(&k.done, 1);
	ok(k.status == AWS_OK && k.has_plain && k.has_blob,
	   "KMS GenerateDataKey over the JSON protocol (%s)", k.code);
	r.json_body = "{\"KeyId\": \"alias/missing\", \"KeySpec\": \"AES_256\"}";
	aws_call(cl, &r, kms_cb, &k);
	loop_until(&k.done, 2);
	ok(k.status == AWS_ERR_SERVICE && strcmp(k.code, "NotFoundException") == 0,
	   "KMS errors parsed from __type (%s)", k.code);
	faults("{\"faults\": [{\"type\": \"throttle\", \"count\": 1}]}");
	r.json_body = "{\"KeyId\": \"alias/cloudsweep\", \"KeySpec\": \"AES_256\"}";
	aws_call(cl, &r, kms_cb, &k);
	loop_until(&k.done, 3);
	ok(k.status == AWS_OK, "KMS ThrottlingException retried");
	faults("{\"faults\": []}");
	aws_client_free(cl);
}

struct pages {
	int done, pages, items;
	enum aws_status status;
};

static bool page_cb(const struct aws_result *res, bool last, void *arg)
{
	struct pages *p = arg;

	p->pages++;
	p->status = res->status;
	p->items += count_items(aws_xml_child(res->xml, "volumeSet"));
	if (last)
		p->done++;
	return true;
}

static bool page_stop_cb(const struct aws_result *res, bool last, void *arg)
{
	struct pages *p = arg;

	(void)res;
	(void)last;
	p->pages++;
	p->done++;
	return false;
}

static void test_pagination(void)
{
	struct aws_client *cl = client_new(false, 5, 10000, 16);
	struct aws_request r = { .service = AWS_EC2,
		                 .region = "us-east-1",
		                 .creds = &base_creds,
		                 .action = "DescribeVolumes" };
	struct pages p = { 0 };

	ok(aws_paginate(cl, &r, "NextToken", page_cb, &p) != NULL, "pager started");
	loop_until(&p.done, 1);
	ok(p.status == AWS_OK && p.pages == 3 && p.items == 7, "7 volumes over %d pages (%d items)",
	   p.pages, p.items);
	memset(&p, 0, sizeof(p));
	ok(aws_paginate(cl, &r, "NextToken", page_stop_cb, &p) != NULL, "second pager");
	loop_until(&p.done, 1);
	for (int i = 0; i < 20; i++)
		event_base_loop(base, EVLOOP_NONBLOCK);
	is_int(p.pages, 1, "a pager stops when told");
	aws_client_free(cl);
}

struct assumed {
	int done;
	enum aws_status status;
	char code[96], key[64];
	struct aws_owned_credentials creds;
};

static void assume_cb(const struct aws_result *res, const struct aws_credentials *creds, time_t exp,
                      void *arg)
{
	struct assumed *a = arg;

	a->done++;
	a->status = res->status;
	snprintf(a->code, sizeof(a->code), "%s", res->error_code);
	aws_owned_credentials_clear(&a->creds);
	if (creds != NULL) {
		snprintf(a->key, sizeof(a->key), "%s", creds->access_key_id);
		a->creds.access_key_id = xstrdup(creds->access_key_id);
		a->creds.secret_access_key = xstrdup(creds->secret_access_key);
		a->creds.session_token = xstrdup(creds->session_token);
		a->creds.expiration = exp;
	}
}

static void test_sts(void)
{
	struct aws_client *cl = client_new(false, 5, 10000, 16);
	struct aws_assume_role role = { .role_arn = ROLE_ARN,
		                        .external_id = EXT_ID,
		                        .session_name = "scan",
		                        .source_identity = "org-1" };
	struct assumed a = { 0 }, b = { 0 };
	struct aws_client_stats st;
	struct got g = { 0 };
	struct aws_credentials view;
	int calls0 = fake_count("action=AssumeRole");

	ok(aws_sts_assume_role(cl, &base_creds, "us-east-1", &role, assume_cb, &a) != NULL &&
	       aws_sts_assume_role(cl, &base_creds, "us-east-1", &role, assume_cb, &b) != NULL,
	   "two concurrent assumes");
	loop_until(&b.done, 1);
	ok(a.status == AWS_OK && b.status == AWS_OK && strncmp(a.key, "ASIA", 4) == 0 &&
	       strcmp(a.key, b.key) == 0,
	   "AssumeRole: both got the same temporary credentials");
	is_int(fake_count("action=AssumeRole") - calls0, 1, "one AssumeRole for two assumes");
	ok(a.creds.expiration > time(NULL) + 3000, "expiration parsed");
	view = aws_owned_credentials_view(&a.creds);
	describe(cl, &view, &g, 0);
	ok(g.status == AWS_OK && strcmp(g.text, "vol-customer") == 0,
	   "the temporary credentials (with session token) reach the customer's account");

	role.session_name = "verify"; /* the purpose does not split the cache */
	aws_sts_assume_role(cl, &base_creds, "us-east-1", &role, assume_cb, &a);
	loop_until(&a.done, 2);
	ok(a.status == AWS_OK && strcmp(a.key, b.key) == 0, "a cache hit");
	is_int(fake_count("action=AssumeRole") - calls0, 1, "still one AssumeRole");
	aws_client_stats(cl, &st);
	ok(st.sts_calls == 1 && st.sts_cache_hits == 2, "stats: %llu calls, %llu hits",
	   (unsigned long long)st.sts_calls, (unsigned long long)st.sts_cache_hits);

	role.external_id = "ext-wrong-value";
	role.no_cache = true;
	aws_sts_assume_role(cl, &base_creds, "us-east-1", &role, assume_cb, &a);
	loop_until(&a.done, 3);
	ok(a.status == AWS_ERR_SERVICE && strcmp(a.code, "AccessDenied") == 0,
	   "wrong external id: AccessDenied surfaced (%s)", a.code);
	role.role_arn = OPEN_ARN;
	aws_sts_assume_role(cl, &base_creds, "us-east-1", &role, assume_cb, &a);
	loop_until(&a.done, 4);
	ok(a.status == AWS_OK, "a role that ignores the external id accepts the wrong one");
	is_int(fake_count("action=AssumeRole") - calls0, 3, "probes bypass the cache");

	aws_owned_credentials_clear(&a.creds);
	aws_owned_credentials_clear(&b.creds);
	aws_client_free(cl);

	/* refresh near expiry: 900 s credentials with an 898 s margin are stale in 2 s */
	{
		struct aws_client_options o = { 0 };
		char url[64];
		struct aws_client *c2;
		struct aws_assume_role r2 = { .role_arn = ROLE_ARN,
			                      .external_id = EXT_ID,
			                      .duration_s = 900,
			                      .session_name = "scan" };
		char first[64];

		snprintf(url, sizeof(url), "http://127.0.0.1:%d", http_port);
		o.endpoint_url = url;
		o.no_env = true;
		o.sts_refresh_before_s = 898;
		c2 = aws_client_new(base, &o);
		memset(&a, 0, sizeof(a));
		aws_sts_assume_role(c2, &base_creds, "us-east-1", &r2, assume_cb, &a);
		loop_until(&a.done, 1);
		snprintf(first, sizeof(first), "%s", a.key);
		aws_sts_assume_role(c2, &base_creds, "us-east-1", &r2, assume_cb, &a);
		loop_until(&a.done, 2);
		ok(strcmp(first, a.key) == 0, "fresh credentials come from the cache");
		sleep(3);
		aws_sts_assume_role(c2, &base_creds, "us-east-1", &r2, assume_cb, &a);
		loop_until(&a.done, 3);
		ok(a.status == AWS_OK && strcmp(first, a.key) != 0,
		   "credentials near expiry are renewed");
		aws_owned_credentials_clear(&a.creds);
		aws_client_free(c2);
	}
}

static void test_concurrency(void)
{
	struct aws_client *cl = client_new(false, 5, 20000, 4);
	struct aws_request r = { .service = AWS_EC2,
		                 .region = "us-east-1",
		                 .creds = &base_creds,
		                 .action = "DescribeVolumes" };
	struct got g[40];
	struct aws_client_stats st;
	int done = 0, okc = 0;

	memset(g, 0, sizeof(g));
	free(ctl("DELETE", "/__fake/calls", NULL));
	faults("{\"faults\": [{\"type\": \"latency\", \"ms\": 100}]}");
	for (int i = 0; i < 40; i++)
		aws_call(cl, &r, got_cb, &g[i]);
	for (uint64_t until = cs_now_ms() + 60000; done < 40 && cs_now_ms() < until;) {
		event_base_loop(base, EVLOOP_ONCE);
		done = 0;
		for (int i = 0; i < 40; i++)
			done += g[i].done;
	}
	for (int i = 0; i < 40; i++)
		okc += g[i].status == AWS_OK && g[i].done == 1;
	is_int(okc, 40, "40 calls under a cap of 4 all succeed");
	aws_client_stats(cl, &st);
	ok(st.max_in_flight == 4, "client: at most %llu in flight",
	   (unsigned long long)st.max_in_flight);
	ok(fake_stat("max_in_flight") <= 4 && fake_stat("max_in_flight") >= 2,
	   "the fake saw at most 4 at once (%d)", fake_stat("max_in_flight"));
	faults("{\"faults\": []}");
	aws_client_free(cl);
}

/* One account with a long queue does not hold back another's first call. */
static void test_fairness(void)
{
	struct aws_client *cl = client_new(false, 5, 30000, 2);
	struct aws_request r = { .service = AWS_EC2,
		                 .region = "us-east-1",
		                 .creds = &base_creds,
		                 .action = "DescribeVolumes",
		                 .account = "big" };
	struct got g[20], small = { 0 };
	int big_done = 0;

	memset(g, 0, sizeof(g));
	faults("{\"faults\": [{\"type\": \"latency\", \"ms\": 50}]}");
	for (int i = 0; i < 20; i++)
		aws_call(cl, &r, got_cb, &g[i]);
	r.account = "small";
	aws_call(cl, &r, got_cb, &small);
	loop_until(&small.done, 1);
	for (int i = 0; i < 20; i++)
		big_done += g[i].done;
	ok(small.status == AWS_OK && big_done <= 4,
	   "a second account is served after at most a turn (%d of 20 done before)", big_done);
	for (int i = 0; i < 20; i++)
		loop_until(&g[i].done, 1);
	faults("{\"faults\": []}");
	aws_client_free(cl);
}

static void test_dns_failure(void)
{
	struct aws_client_options o = { 0 };
	struct aws_client *cl;
	struct got g = { 0 };

	o.endpoint_url = "http://nothing-here.invalid:8080";
	o.no_env = true;
	o.attempts = 2;
	o.backoff_base_ms = 10;
	cl = aws_client_new(base, &o);
	describe(cl, &base_creds, &g, 0);
	ok(g.status == AWS_ERR_NETWORK && g.attempts == 2 && strncmp(g.msg, "dns after 2", 11) == 0,
	   "a name that does not resolve: %s", g.msg);
	aws_client_free(cl);
}

static void test_rate_limit(void)
{
	struct aws_client_options o = { 0 };
	struct aws_request r = { .service = AWS_EC2,
		                 .region = "us-east-1",
		                 .creds = &base_creds,
		                 .action = "DescribeVolumes" };
	struct got g[30];
	char url[64];
	struct aws_client *cl;
	uint64_t t0;
	int done = 0;

	snprintf(url, sizeof(url), "http://127.0.0.1:%d", http_port);
	o.endpoint_url = url;
	o.no_env = true;
	o.read_rate = 20;
	o.read_burst = 10;
	cl = aws_client_new(base, &o);
	memset(g, 0, sizeof(g));
	t0 = cs_now_ms();
	for (int i = 0; i < 30; i++)
		aws_call(cl, &r, got_cb, &g[i]);
	for (uint64_t until = cs_now_ms() + 60000; done < 30 && cs_now_ms() < until;) {
		event_base_loop(base, EVLOOP_ONCE);
		done = 0;
		for (int i = 0; i < 30; i++)
			done += g[i].done;
	}
	/* 10 at once, then 20 more at 20/s: never sooner than ~1 s (a lower bound only) */
	ok(done == 30 && cs_now_ms() - t0 >= 900, "the token bucket paces the calls");
	aws_client_free(cl);
}

int main(void)
{
	char *check[] = { PY, "-c", "import botocore", NULL };
	char *ossl[] = { "openssl", "version", NULL };

	signal(SIGPIPE, SIG_IGN);
	log_set_level(LOG_LVL_ERROR);
	/* the developer's own AWS settings must not leak into the tests */
	unsetenv("AWS_ACCESS_KEY_ID");
	unsetenv("AWS_SECRET_ACCESS_KEY");
	unsetenv("AWS_SESSION_TOKEN");
	unsetenv("AWS_ENDPOINT_URL");
	unsetenv("AWS_CA_BUNDLE");
	base = event_base_new();
	test_xml();
	test_endpoints();
	test_worker();
	if (access(PY, X_OK) != 0 || run(check) == -1 || run(ossl) == -1) {
		event_base_free(base);
		printf("# python3-botocore or openssl missing: fake AWS tests skipped\n");
		return tap_done();
	}
	if (fake_start() == -1) {
		ok(0, "the fake AWS starts");
		fake_stop();
		return tap_done();
	}
	free(ctl("POST", "/__fake/reset", seed));
	test_base_credentials();
	test_calls();
	test_pagination();
	test_kms();
	test_sts();
	test_concurrency();
	test_rate_limit();
	test_fairness();
	test_dns_failure();
	fake_stop();
	event_base_free(base);
	return tap_done();
}
