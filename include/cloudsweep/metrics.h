/*
 * metrics.h - counters every worker keeps for /metrics. The master maps one
 * shared anonymous region before forking; each worker writes only its own
 * slot (no locks), and whichever worker answers /metrics sums all slots, so
 * the numbers cover the whole instance. Routes are numbered by the router in
 * registration order, identical in every worker.
 */
#ifndef CLOUDSWEEP_METRICS_H
#define CLOUDSWEEP_METRICS_H

#include <stdint.h>

#include "cloudsweep/util.h"

#define METRICS_MAX_WORKERS 256
#define METRICS_MAX_ROUTES  128
#define METRICS_NSTATUS     26
#define METRICS_NBUCKETS    12

struct metrics_slot {
	uint64_t requests[METRICS_MAX_ROUTES][METRICS_NSTATUS];
	uint64_t latency_buckets[METRICS_MAX_ROUTES][METRICS_NBUCKETS]; /* cumulative at render */
	uint64_t latency_sum_us[METRICS_MAX_ROUTES];
	int64_t open_connections;
	int64_t db_in_use;
	int64_t db_waiting;
	int64_t db_connected;
	uint64_t connections_refused;
	uint64_t pid;
};

struct metrics_shared {
	uint64_t worker_restarts;
	uint64_t nworkers;
	struct metrics_slot slots[METRICS_MAX_WORKERS];
};

/* Map the shared region (master, before fork). Fatal on failure. */
struct metrics_shared *metrics_shared_new(void);
/* Record one finished request on a worker's slot. */
void metrics_request(struct metrics_slot *s, int route, int status, uint64_t duration_us);
/* Add delta to a gauge. */
void metrics_gauge_add(int64_t *gauge, int64_t delta);
/* Set a gauge. */
void metrics_gauge_set(int64_t *gauge, int64_t value);
/* Render all slots as Prometheus text; route_names[i] names route i (nroutes entries). Caller
 * frees. */
char *metrics_render(const struct metrics_shared *m, const char *const *route_names, int nroutes,
                     size_t *lenp);

#endif
