/*
 * metrics.c - per-worker counters in a shared map, summed into Prometheus
 * text by whichever worker is asked. Each worker writes only its own slot
 * with relaxed atomics, so no locks are taken on the request path.
 */
#include "config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "cloudsweep/log.h"
#include "cloudsweep/metrics.h"

static const int metrics_statuses[METRICS_NSTATUS - 1] = {
	200, 201, 202, 204, 302, 304, 400, 401, 403, 404, 405, 408, 409,
	413, 414, 415, 417, 422, 429, 431, 500, 502, 503, 504, 410,
};

/* Upper bounds of the latency buckets in microseconds (the last is +Inf). */
static const uint64_t metrics_bounds_us[METRICS_NBUCKETS - 1] = {
	250, 500, 1000, 2500, 5000, 10000, 25000, 50000, 100000, 500000, 1000000,
};

struct metrics_shared *metrics_shared_new(void)
{
	void *p = mmap(NULL, sizeof(struct metrics_shared), PROT_READ | PROT_WRITE,
	               MAP_SHARED | MAP_ANONYMOUS, -1, 0);

	if (p == MAP_FAILED)
		fatal("mmap", "cannot map the shared metrics");
	return p;
}

static int metrics_status_index(int status)
{
	for (int i = 0; i < METRICS_NSTATUS - 1; i++)
		if (metrics_statuses[i] == status)
			return i;
	return METRICS_NSTATUS - 1;
}

void metrics_request(struct metrics_slot *s, int route, int status, uint64_t duration_us)
{
	int b = 0;

	if (route < 0 || route >= METRICS_MAX_ROUTES)
		route = 0;
	while (b < METRICS_NBUCKETS - 1 && duration_us > metrics_bounds_us[b])
		b++;
	__atomic_add_fetch(&s->requests[route][metrics_status_index(status)], 1, __ATOMIC_RELAXED);
	__atomic_add_fetch(&s->latency_buckets[route][b], 1, __ATOMIC_RELAXED);
	__atomic_add_fetch(&s->latency_sum_us[route], duration_us, __ATOMIC_RELAXED);
}

void metrics_gauge_add(int64_t *gauge, int64_t delta)
{
	__atomic_add_fetch(gauge, delta, __ATOMIC_RELAXED);
}

void metrics_gauge_set(int64_t *gauge, int64_t value)
{
	__atomic_store_n(gauge, value, __ATOMIC_RELAXED);
}

static uint64_t ld(const uint64_t *p)
{
	return __atomic_load_n(p, __ATOMIC_RELAXED);
}

static int64_t lds(const int64_t *p)
{
	return __atomic_load_n(p, __ATOMIC_RELAXED);
}

static void metrics_gauge(FILE *fp, const char *name, const char *help, int64_t v)
{
	fprintf(fp, "# HELP %s %s\n# TYPE %s gauge\n%s %lld\n", name, help, name, name,
	        (long long)v);
}

char *metrics_render(const struct metrics_shared *m, const char *const *route_names, int nroutes,
                     size_t *lenp)
{
	int nw = (int)ld(&m->nworkers);
	int64_t open = 0, in_use = 0, waiting = 0, connected = 0;
	uint64_t refused = 0;
	char *buf = NULL;
	FILE *fp;

	if (nw > METRICS_MAX_WORKERS)
		nw = METRICS_MAX_WORKERS;
	fp = open_memstream(&buf, lenp);
	if (fp == NULL)
		fatal("open_memstream", "metrics");

	fprintf(fp, "# HELP cloudsweep_http_requests_total HTTP requests answered, by route and "
	            "status.\n# TYPE cloudsweep_http_requests_total counter\n");
	for (int r = 0; r < nroutes; r++)
		for (int st = 0; st < METRICS_NSTATUS; st++) {
			uint64_t sum = 0;

			for (int w = 0; w < nw; w++)
				sum += ld(&m->slots[w].requests[r][st]);
			if (sum == 0)
				continue;
			if (st == METRICS_NSTATUS - 1)
				fprintf(
				    fp,
				    "cloudsweep_http_requests_total{route=\"%s\",status=\"other\"} "
				    "%llu\n",
				    route_names[r], (unsigned long long)sum);
			else
				fprintf(
				    fp,
				    "cloudsweep_http_requests_total{route=\"%s\",status=\"%d\"} "
				    "%llu\n",
				    route_names[r], metrics_statuses[st], (unsigned long long)sum);
		}

	fprintf(fp, "# HELP cloudsweep_http_request_duration_seconds Time from the first byte of "
	            "a request to its response.\n# TYPE cloudsweep_http_request_duration_seconds "
	            "histogram\n");
	for (int r = 0; r < nroutes; r++) {
		uint64_t cum = 0, sum_us = 0, buckets[METRICS_NBUCKETS] = { 0 };

		for (int w = 0; w < nw; w++) {
			for (int b = 0; b < METRICS_NBUCKETS; b++)
				buckets[b] += ld(&m->slots[w].latency_buckets[r][b]);
			sum_us += ld(&m->slots[w].latency_sum_us[r]);
		}
		for (int b = 0; b < METRICS_NBUCKETS; b++)
			cum += buckets[b];
		if (cum == 0)
			continue;
		cum = 0;
		for (int b = 0; b < METRICS_NBUCKETS; b++) {
			cum += buckets[b];
			if (b < METRICS_NBUCKETS - 1)
				fprintf(
				    fp,
				    "cloudsweep_http_request_duration_seconds_bucket{route=\"%s\","
				    "le=\"%g\"} %llu\n",
				    route_names[r], (double)metrics_bounds_us[b] / 1e6,
				    (unsigned long long)cum);
			else
				fprintf(
				    fp,
				    "cloudsweep_http_request_duration_seconds_bucket{route=\"%s\","
				    "le=\"+Inf\"} %llu\n",
				    route_names[r], (unsigned long long)cum);
		}
		fprintf(fp, "cloudsweep_http_request_duration_seconds_sum{route=\"%s\"} %.6f\n",
		        route_names[r], (double)sum_us / 1e6);
		fprintf(fp, "cloudsweep_http_request_duration_seconds_count{route=\"%s\"} %llu\n",
		        route_names[r], (unsigned long long)cum);
	}

	for (int w = 0; w < nw; w++) {
		open += lds(&m->slots[w].open_connections);
		in_use += lds(&m->slots[w].db_in_use);
		waiting += lds(&m->slots[w].db_waiting);
		connected += lds(&m->slots[w].db_connected);
		refused += ld(&m->slots[w].connections_refused);
	}
	metrics_gauge(fp, "cloudsweep_open_connections", "Open client connections.", open);
	metrics_gauge(fp, "cloudsweep_db_pool_in_use", "Database connections busy.", in_use);
	metrics_gauge(fp, "cloudsweep_db_pool_waiting", "Queries waiting for a connection.",
	              waiting);
	metrics_gauge(fp, "cloudsweep_db_pool_connected", "Database connections up.", connected);
	metrics_gauge(fp, "cloudsweep_workers", "Worker processes.", nw);
	fprintf(fp,
	        "# HELP cloudsweep_connections_refused_total Connections refused by limits.\n"
	        "# TYPE cloudsweep_connections_refused_total counter\n"
	        "cloudsweep_connections_refused_total %llu\n",
	        (unsigned long long)refused);
	fprintf(fp,
	        "# HELP cloudsweep_worker_restarts_total Workers restarted after dying.\n"
	        "# TYPE cloudsweep_worker_restarts_total counter\n"
	        "cloudsweep_worker_restarts_total %llu\n",
	        (unsigned long long)ld(&m->worker_restarts));
	if (fclose(fp) != 0)
		fatal("metrics", "render");
	return buf;
}
