/*
 * threadpool.h - a tiny per-worker thread pool for CPU-heavy jobs (argon2id,
 * RSA signing) that must not stall the reactor.
 *
 * A job's work function runs on a pool thread; its result goes back to the
 * reactor through an eventfd watched by a libevent event, and the done
 * function runs there, on the thread that runs the event_base. The reactor
 * only ever takes the queue mutex for a few instructions, never while a job
 * runs, so it never waits on the pool. The queue is bounded: when it is
 * full, threadpool_submit refuses the job and the caller answers 503/429
 * rather than queue without bound.
 *
 * Ownership of a job's arg:
 *   - From threadpool_submit until the pool gives arg back, work(arg) may
 *     use it from a pool thread at any time; the reactor must not touch
 *     what work uses (keep the inputs and outputs of work in arg, nothing
 *     shared).
 *   - The pool gives arg back exactly once, always on the reactor thread:
 *     either done(arg) (the work ran and nobody cancelled), or cleanup(arg)
 *     (the job was cancelled, or dropped by threadpool_free). Whichever runs
 *     owns arg from then on and normally frees it.
 *   - threadpool_cancel(job): done will never run. If the work had not
 *     started, or had already finished, cleanup(arg) runs inside the cancel
 *     call; if the work is running, cancel returns at once and cleanup(arg)
 *     runs on the reactor once the work returns. Either way the owner that
 *     cancels must not use arg again, and arg must not point back at the
 *     owner (or cleanup must not follow such a pointer).
 *   - The job handle is valid until done or cleanup is called; do not
 *     cancel a job from inside its own done or cleanup, nor twice.
 * A NULL cleanup means arg needs no release (e.g. it is static); even then
 * the owner must keep what work uses alive until the work has returned.
 */
#ifndef CLOUDSWEEP_THREADPOOL_H
#define CLOUDSWEEP_THREADPOOL_H

#include <event2/event.h>
#include <stdint.h>

#include "cloudsweep/util.h"

#define THREADPOOL_MAX_THREADS 64

struct threadpool;
struct tp_job;

/* Runs on a pool thread; must not touch the reactor or anything it owns. */
typedef void (*tp_work_fn)(void *arg);
/* Runs on the reactor after work returned, unless the job was cancelled. */
typedef void (*tp_done_fn)(void *arg);
/* Runs on the reactor instead of done when the job is cancelled or dropped. */
typedef void (*tp_cleanup_fn)(void *arg);

/* Counters for /metrics (a snapshot). */
struct threadpool_stats {
	int nthreads;       /* pool threads */
	int queued;         /* jobs waiting for a thread */
	int running;        /* jobs whose work is running */
	uint64_t completed; /* done callbacks made */
	uint64_t cancelled; /* jobs cancelled or dropped (cleanup called) */
	uint64_t refused;   /* submissions refused because the queue was full */
};

/*
 * Start nthreads (1..THREADPOOL_MAX_THREADS) threads whose results are
 * delivered on base; at most max_queued (>= 1) jobs wait for a thread.
 * Returns NULL (logged) when the eventfd, the event or a thread cannot be
 * created.
 */
struct threadpool *threadpool_new(struct event_base *base, int nthreads, int max_queued);

/*
 * Queue work(arg), then done(arg) on the reactor. Never calls anything
 * before returning. Returns the job handle, or NULL when the queue is full
 * or the pool is shutting down (nothing is called then; arg stays the
 * caller's).
 */
struct tp_job *threadpool_submit(struct threadpool *tp, tp_work_fn work, tp_done_fn done,
                                 tp_cleanup_fn cleanup, void *arg) CS_WUR;

/* Cancel a job: done never runs; cleanup runs now or once the running work returns. */
void threadpool_cancel(struct tp_job *job);

/* Current counters. */
void threadpool_stats(struct threadpool *tp, struct threadpool_stats *st);

/*
 * Stop the pool: jobs not started are dropped, running work is waited for
 * (this joins the threads, so call it at shutdown only), and every job not
 * yet delivered gets its cleanup instead of done. NULL is fine.
 */
void threadpool_free(struct threadpool *tp);

#endif
