/*
 * worker.h - one worker process: a single-threaded libevent reactor that
 * owns its listener, TLS context, Postgres pool and caches, and the master
 * that forks, supervises, reloads and drains the workers.
 */
#ifndef CLOUDSWEEP_WORKER_H
#define CLOUDSWEEP_WORKER_H

#include <event2/event.h>
#include <stdbool.h>

#include <openssl/ssl.h>

#include "cloudsweep/config.h"
#include "cloudsweep/metrics.h"

struct worker {
	int id;
	struct event_base *base;                 /* owned */
	struct config *cfg;                      /* owned; replaced on SIGHUP */
	const char *config_path;                 /* borrowed; NULL when there is no file */
	struct server *server;                   /* owned */
	struct router *router;                   /* owned */
	struct db_pool *db;                      /* owned; NULL without a database */
	struct metrics_shared *metrics;          /* shared map */
	struct metrics_slot *slot;               /* this worker's slot in metrics */
	struct event *ev_term, *ev_hup, *ev_int; /* owned */
	struct event *ev_tick;                   /* owned; refreshes gauges */
	struct event *ev_deadline;               /* owned; shutdown bound */
	struct event *ev_checkpoint;             /* owned; signs audit chain heads */
	struct audit_sign *checkpoint;           /* pending signing run, or NULL */
	bool draining;
};

/* The worker of this process (NULL in the master). */
extern struct worker *cs_worker;

/*
 * Run worker id on listen_fd with the shared TLS context until drained;
 * writes its id as one byte to ready_fd once it serves. Returns the exit status.
 */
struct router;
/*
 * Register every API route (identity, alerts and admin, vault, scanning) on
 * r: the one table the workers serve and `cloudsweepd routes` prints. The
 * core routes (/health, /ready, /metrics) are http_core_routes'.
 */
void worker_routes(struct router *r);

int worker_run(int id, struct config *cfg, const char *config_path, int listen_fd, SSL_CTX *ctx,
               struct metrics_shared *metrics, int ready_fd);

/* Run the master: fork and supervise the workers; returns the exit status. */
int master_run(struct config *cfg, const char *config_path);

#endif
