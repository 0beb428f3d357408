/*
 * aws_calls.c - benchmark of the AWS client: N DescribeVolumes calls kept C
 * at a time in flight from one reactor against the fake AWS
 * (tests/fakes/fake_aws.py, started here) with L ms of injected latency.
 * Reports calls/s, the client's CPU per call and the peak RSS of this
 * process (the client side only; the fake runs in its own process).
 *
 *   make contrib/bench/aws_calls
 *   ./contrib/bench/aws_calls [-n 10000] [-c 256] [-l 50] [-p 1] [-r 1] [-w 0] [-s]
 *
 * -s: HTTPS; -p N: N fake processes sharing the ports (SO_REUSEPORT), since
 * one Python process verifying every signature is slower than the client.
 * -r R: R bursts of N calls; the heap in use (malloc's count of live bytes)
 * is printed before the first, after each, and after the client is freed,
 * showing whether memory returns to its baseline after a burst; -w S then
 * idles S seconds (past the pool's 30 s idle timeout, the connections close)
 * and prints it again.
 *
 * The latency bound is C / L: 256 / 0.05 s = 5,120 calls/s. The fake is a
 * Python server that verifies every signature with botocore, so over TLS
 * it can still be the bottleneck; its own CPU time is printed too.
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
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <malloc.h>

#include <event2/event.h>
#include <jansson.h>

#include "cloudsweep/aws.h"
#include "cloudsweep/log.h"

extern char **environ;

#define PY     "/usr/bin/python3"
#define KEY    "AKIABENCHMARK0000001"
#define SECRET "bench-secret-0123456789abcdefghijklmnop"

static int http_port, https_port;
static struct event_base *base;
static struct aws_client *client;
static const struct aws_credentials creds = { KEY, SECRET, NULL };
static int total = 10000, conc = 256, issued, done, failed;
static char tmpdir[] = "/tmp/cs-awsbench-XXXXXX";

static char *ctl(const char *method, const char *path, const char *body)
{
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons((uint16_t)http_port) };
	static char resp[65536];
	char head[512];
	size_t len = 0, blen = body ? strlen(body) : 0;
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	ssize_t n;
	char *p;

	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0)
		return NULL;
	snprintf(head, sizeof(head),
	         "%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
	         "Content-Length: %zu\r\n\r\n",
	         method, path, blen);
	if (write(fd, head, strlen(head)) < 0 || (blen && write(fd, body, blen) != (ssize_t)blen)) {
		close(fd);
		return NULL;
	}
	while (len < sizeof(resp) - 1 && (n = read(fd, resp + len, sizeof(resp) - 1 - len)) > 0)
		len += (size_t)n;
	close(fd);
	resp[len] = '\0';
	p = strstr(resp, "\r\n\r\n");
	return p != NULL ? p + 4 : NULL;
}

static pid_t spawn(char *const argv[], int out_fd)
{
	posix_spawn_file_actions_t fa;
	pid_t pid = -1;

	posix_spawn_file_actions_init(&fa);
	if (out_fd >= 0)
		posix_spawn_file_actions_adddup2(&fa, out_fd, 1);
	else
		posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
	posix_spawn_file_actions_addopen(&fa, 2, "/dev/null", O_WRONLY, 0);
	if (posix_spawnp(&pid, argv[0], &fa, NULL, argv, environ) != 0)
		pid = -1;
	posix_spawn_file_actions_destroy(&fa);
	return pid;
}

static void next_call(void);

static void call_cb(const struct aws_result *res, void *arg)
{
	(void)arg;
	done++;
	if (res->status != AWS_OK && failed++ < 5)
		fprintf(stderr, "call failed: %s %s\n", aws_status_name(res->status), res->message);
	if (issued < total)
		next_call();
	if (done == total)
		event_base_loopbreak(base);
}

static void next_call(void)
{
	struct aws_request r = { .service = AWS_EC2,
		                 .region = "us-east-1",
		                 .creds = &creds,
		                 .action = "DescribeVolumes" };

	issued++;
	if (aws_call(client, &r, call_cb, NULL) == NULL) {
		fprintf(stderr, "aws_call refused the request\n");
		exit(1);
	}
}

/* Bytes malloc holds for live allocations (arenas and mmapped blocks). */
static double heap_kib(void)
{
	struct mallinfo2 mi = mallinfo2();

	return (double)(mi.uordblks + mi.hblkhd) / 1024.0;
}

static double tv_s(struct timeval tv)
{
	return (double)tv.tv_sec + (double)tv.tv_usec / 1e6;
}

int main(int argc, char **argv)
{
	char cert[300], key[300], url[64], seed_path[300], faults_path[300], *line = NULL;
	char fake[] = SRCDIR "/tests/fakes/fake_aws.py";
	struct aws_client_options o = { 0 };
	struct rusage ru0, ru1, ruc;
	int latency = 50, ch, pfd[2], st;
	bool tls = false;
	size_t cap = 0;
	uint64_t t0 = 0, t1;
	pid_t fake_pids[16];
	int nfakes = 1, rounds = 1, idle_s = 0;
	double heap_idle = -1;
	double heap0, heap_rounds[8];
	FILE *fp;
	json_t *j;

	while ((ch = getopt(argc, argv, "n:c:l:p:r:w:s")) != -1) {
		switch (ch) {
		case 'w':
			idle_s = atoi(optarg);
			break;
		case 'r':
			rounds = atoi(optarg);
			if (rounds < 1 || rounds > 8)
				rounds = 1;
			break;
		case 'n':
			total = atoi(optarg);
			break;
		case 'c':
			conc = atoi(optarg);
			break;
		case 'l':
			latency = atoi(optarg);
			break;
		case 'p':
			nfakes = atoi(optarg);
			if (nfakes < 1 || nfakes > 16)
				nfakes = 1;
			break;
		case 's':
			tls = true;
			break;
		default:
			fprintf(stderr, "usage: aws_calls [-n calls] [-c concurrency] [-l ms] [-p "
			                "fakes] [-s]\n");
			return 2;
		}
	}
	signal(SIGPIPE, SIG_IGN);
	log_set_level(LOG_LVL_ERROR);
	if (mkdtemp(tmpdir) == NULL)
		return 1;
	snprintf(cert, sizeof(cert), "%s/cert.pem", tmpdir);
	snprintf(key, sizeof(key), "%s/key.pem", tmpdir);
	{
		char *a[] = { "openssl",
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
			      "subjectAltName=IP:127.0.0.1",
			      NULL };
		pid_t p = spawn(a, -1);

		if (p < 0 || waitpid(p, &st, 0) != p || st != 0) {
			fprintf(stderr, "openssl failed\n");
			return 1;
		}
	}
	snprintf(seed_path, sizeof(seed_path), "%s/seed.json", tmpdir);
	snprintf(faults_path, sizeof(faults_path), "%s/faults.json", tmpdir);
	fp = fopen(seed_path, "w");
	if (fp == NULL)
		return 1;
	fprintf(fp,
	        "{\"accounts\": {\"111111111111\": {\"access_keys\": [{\"id\": \"%s\", "
	        "\"secret\": \"%s\"}], \"regions\": {\"us-east-1\": {\"volumes\": "
	        "[{\"VolumeId\": \"vol-1\"}, {\"VolumeId\": \"vol-2\"}]}}}}}",
	        KEY, SECRET);
	fclose(fp);
	fp = fopen(faults_path, "w");
	if (fp == NULL)
		return 1;
	fprintf(fp, "{\"faults\": [{\"type\": \"latency\", \"ms\": %d}]}", latency);
	fclose(fp);
	/* The first fake picks the ports; the others share them (SO_REUSEPORT). */
	for (int i = 0; i < nfakes; i++) {
		char hp[16], sp[16];
		char *a[] = { PY,       fake,      "--http-port", hp,          "--https-port",
			      sp,       "--cert",  cert,          "--key",     key,
			      "--seed", seed_path, "--faults",    faults_path, "--reuse-port",
			      NULL };

		snprintf(hp, sizeof(hp), "%d", http_port);
		snprintf(sp, sizeof(sp), "%d", https_port);
		if (pipe(pfd) != 0)
			return 1;
		fake_pids[i] = spawn(a, pfd[1]);
		close(pfd[1]);
		fp = fdopen(pfd[0], "r");
		if (fake_pids[i] < 0 || fp == NULL || getline(&line, &cap, fp) <= 0) {
			fprintf(stderr, "the fake did not start\n");
			return 1;
		}
		fclose(fp);
		j = json_loads(line, 0, NULL);
		http_port = (int)json_integer_value(json_object_get(j, "http_port"));
		https_port = (int)json_integer_value(json_object_get(j, "https_port"));
		json_decref(j);
	}
	free(line);

	base = event_base_new();
	snprintf(url, sizeof(url), "%s://127.0.0.1:%d", tls ? "https" : "http",
	         tls ? https_port : http_port);
	o.endpoint_url = url;
	o.ca_file = tls ? cert : NULL;
	o.no_env = true;
	o.max_in_flight = conc;
	o.max_in_flight_per_account = conc;
	o.read_rate = 1e9;
	o.read_burst = 1e9;
	o.deadline_ms = 120000;
	o.attempt_timeout_ms = 120000;
	client = aws_client_new(base, &o);
	if (client == NULL)
		return 1;

	heap0 = heap_kib();
	for (int r = 0; r < rounds; r++) {
		issued = done = 0;
		if (r == rounds - 1) {
			getrusage(RUSAGE_SELF, &ru0);
			t0 = cs_now_us();
		}
		for (int i = 0; i < conc && issued < total; i++)
			next_call();
		event_base_dispatch(base);
		heap_rounds[r] = heap_kib();
	}
	t1 = cs_now_us();
	getrusage(RUSAGE_SELF, &ru1);
	{
		struct aws_client_stats s;
		double secs = (double)(t1 - t0) / 1e6;
		double cpu = tv_s(ru1.ru_utime) - tv_s(ru0.ru_utime) + tv_s(ru1.ru_stime) -
		             tv_s(ru0.ru_stime);
		char *stats = ctl("GET", "/__fake/stats", NULL);

		aws_client_stats(client, &s);
		printf("calls=%d failed=%d concurrency=%d latency_ms=%d %s\n", done, failed, conc,
		       latency, tls ? "https" : "http");
		printf("wall_s=%.2f calls_per_s=%.0f bound_calls_per_s=%.0f (%.0f%%)\n", secs,
		       done / secs, conc * 1000.0 / latency,
		       100.0 * (done / secs) / (conc * 1000.0 / latency));
		printf("client_cpu_s=%.2f cpu_us_per_call=%.1f peak_rss_mib=%.1f\n", cpu,
		       cpu * 1e6 / done, ru1.ru_maxrss / 1024.0);
		printf("client_max_in_flight=%llu attempts=%llu fakes=%d one_fake=%s\n",
		       (unsigned long long)s.max_in_flight, (unsigned long long)s.attempts, nfakes,
		       stats ? stats : "?");
	}
	if (idle_s > 0) {
		struct timeval tv = { .tv_sec = idle_s };

		event_base_loopexit(base, &tv);
		event_base_dispatch(base);
		heap_idle = heap_kib();
	}
	aws_client_free(client);
	printf("heap_kib baseline=%.0f", heap0);
	for (int r = 0; r < rounds; r++)
		printf(" after_burst_%d=%.0f", r + 1, heap_rounds[r]);
	if (heap_idle >= 0)
		printf(" after_idle_%ds=%.0f", idle_s, heap_idle);
	printf(" client_freed=%.0f\n", heap_kib());
	event_base_free(base);
	for (int i = 0; i < nfakes; i++)
		kill(fake_pids[i], SIGTERM);
	for (int i = 0; i < nfakes; i++)
		waitpid(fake_pids[i], NULL, 0);
	getrusage(RUSAGE_CHILDREN, &ruc);
	printf("fake_cpu_s=%.2f\n", tv_s(ruc.ru_utime) + tv_s(ruc.ru_stime));
	unlink(cert);
	unlink(key);
	unlink(seed_path);
	unlink(faults_path);
	rmdir(tmpdir);
	return failed == 0 ? 0 : 1;
}
