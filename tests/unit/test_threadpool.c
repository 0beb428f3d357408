/*
 * test_threadpool.c - the per-worker thread pool: results come back on the
 * reactor thread, many jobs complete, a full queue refuses, cancellation
 * before, during and after the work never calls done and never leaks (the
 * ASan build checks the leak part), and freeing with jobs pending or from
 * inside a done callback releases every job through its cleanup.
 */
#include "config.h"

#include <event2/event.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <time.h>

#include "cloudsweep/log.h"
#include "cloudsweep/threadpool.h"
#include "tap.h"

/* A gate pool threads wait on until the test opens it. */
struct gate {
	pthread_mutex_t lock;
	pthread_cond_t cond;
	bool open;
};

static struct gate gate = { PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, false };

static void gate_set(bool open)
{
	pthread_mutex_lock(&gate.lock);
	gate.open = open;
	pthread_cond_broadcast(&gate.cond);
	pthread_mutex_unlock(&gate.lock);
}

static void gate_wait(void)
{
	pthread_mutex_lock(&gate.lock);
	while (!gate.open)
		pthread_cond_wait(&gate.cond, &gate.lock);
	pthread_mutex_unlock(&gate.lock);
}

/* What every test job records; heap-allocated so ASan sees a leak if nobody frees it. */
struct job_arg {
	int id;
	bool gated;       /* work waits for the gate */
	long input;       /* work computes input * input */
	long output;      /* written by work */
	pthread_t worker; /* thread that ran work */
};

static struct event_base *base;
static struct threadpool *pool;
static pthread_t reactor;
static int ndone, ncleanup, want_done, want_cleanup;
static bool done_on_reactor = true, cleanup_on_reactor = true, work_off_reactor = true;
static bool results_right = true;
static bool free_in_done;

static void job_work(void *p)
{
	struct job_arg *a = p;

	if (a->gated)
		gate_wait();
	a->worker = pthread_self();
	a->output = a->input * a->input;
}

static void job_done(void *p)
{
	struct job_arg *a = p;

	if (!pthread_equal(pthread_self(), reactor))
		done_on_reactor = false;
	if (pthread_equal(a->worker, reactor))
		work_off_reactor = false;
	if (a->output != a->input * a->input)
		results_right = false;
	free(a);
	ndone++;
	if (free_in_done) {
		free_in_done = false;
		threadpool_free(pool);
		pool = NULL;
	}
	if (ndone >= want_done && ncleanup >= want_cleanup)
		event_base_loopbreak(base);
}

static void job_cleanup(void *p)
{
	if (!pthread_equal(pthread_self(), reactor))
		cleanup_on_reactor = false;
	free(p);
	ncleanup++;
	if (ndone >= want_done && ncleanup >= want_cleanup)
		event_base_loopbreak(base);
}

static struct job_arg *job_new(int id, bool gated)
{
	struct job_arg *a = calloc(1, sizeof(*a));

	a->id = id;
	a->gated = gated;
	a->input = id + 1;
	return a;
}

static struct tp_job *submit(int id, bool gated)
{
	struct job_arg *a = job_new(id, gated);
	struct tp_job *j = threadpool_submit(pool, job_work, job_done, job_cleanup, a);

	if (j == NULL)
		free(a);
	return j;
}

static void timeout_cb(evutil_socket_t fd, short what, void *arg)
{
	*(bool *)arg = true;
	event_base_loopbreak(base);
}

/* Run the reactor until the wanted callbacks happened or 10 s passed; false on timeout. */
static bool run_until(int done, int cleanup)
{
	struct timeval tv = { 10, 0 };
	bool timed_out = false;
	struct event *t = evtimer_new(base, timeout_cb, &timed_out);

	want_done = done;
	want_cleanup = cleanup;
	if (ndone < done || ncleanup < cleanup) {
		evtimer_add(t, &tv);
		event_base_dispatch(base);
	}
	event_free(t);
	return !timed_out && ndone >= done && ncleanup >= cleanup;
}

/* Wait (without the reactor) until the pool reports these counts; false after 10 s. */
static bool wait_stats(int queued, int running)
{
	struct timespec ms = { 0, 1000000 };
	struct threadpool_stats st;

	for (int i = 0; i < 10000; i++) {
		threadpool_stats(pool, &st);
		if (st.queued == queued && st.running == running)
			return true;
		nanosleep(&ms, NULL);
	}
	return false;
}

static void reset(void)
{
	ndone = ncleanup = 0;
	gate_set(false);
}

static void test_many(void)
{
	struct threadpool_stats st;
	int n = 500, submitted = 0;

	reset();
	pool = threadpool_new(base, 4, n);
	ok(pool != NULL, "pool with 4 threads");
	for (int i = 0; i < n; i++)
		submitted += submit(i, false) != NULL;
	is_int(submitted, n, "%d jobs accepted", n);
	ok(run_until(n, 0), "all %d jobs delivered", n);
	ok(done_on_reactor, "every done ran on the reactor thread");
	ok(work_off_reactor, "every work ran on a pool thread");
	ok(results_right, "every result was computed");
	threadpool_stats(pool, &st);
	ok(st.completed == (uint64_t)n && st.queued == 0 && st.running == 0 && st.nthreads == 4,
	   "stats: completed %llu, queued %d, running %d", (unsigned long long)st.completed,
	   st.queued, st.running);
	threadpool_free(pool);
	pool = NULL;
}

static void test_queue_full(void)
{
	struct threadpool_stats st;

	reset();
	pool = threadpool_new(base, 1, 2);
	ok(submit(0, true) != NULL, "first job runs and blocks");
	ok(wait_stats(0, 1), "first job is running");
	ok(submit(1, false) != NULL && submit(2, false) != NULL, "two jobs queue");
	ok(submit(3, false) == NULL, "a third queued job is refused");
	threadpool_stats(pool, &st);
	ok(st.queued == 2 && st.running == 1 && st.refused == 1, "stats: 2 queued, 1 running");
	gate_set(true);
	ok(run_until(3, 0), "the accepted jobs complete");
	ok(submit(4, false) != NULL, "room again once the queue drained");
	ok(run_until(4, 0), "and it completes");
	threadpool_free(pool);
	pool = NULL;
}

static void test_cancel(void)
{
	struct event_base *b = base;
	struct threadpool_stats st;
	struct tp_job *blocker, *queued, *finished;

	reset();
	pool = threadpool_new(b, 1, 8);
	blocker = submit(0, true);
	ok(wait_stats(0, 1), "blocker running");

	queued = submit(1, false);
	threadpool_cancel(queued);
	is_int(ncleanup, 1, "cancel before run: cleanup at once");
	ok(wait_stats(0, 1), "cancelled job left the queue");

	threadpool_cancel(blocker);
	is_int(ncleanup, 1, "cancel during run: cleanup waits for the work");
	gate_set(true);
	ok(run_until(0, 2), "cleanup after the running work returned");
	is_int(ndone, 0, "no done for cancelled jobs");
	ok(cleanup_on_reactor, "cleanup ran on the reactor thread");

	finished = submit(2, false);
	ok(wait_stats(0, 0), "job finished, not yet delivered");
	threadpool_cancel(finished);
	is_int(ncleanup, 3, "cancel after the work finished: cleanup at once");
	event_base_loop(b, EVLOOP_NONBLOCK);
	is_int(ndone, 0, "no done after cancel");
	threadpool_stats(pool, &st);
	ok(st.cancelled == 3 && st.completed == 0, "stats: 3 cancelled");
	threadpool_free(pool);
	pool = NULL;
}

static void *open_gate_later(void *unused)
{
	struct timespec t = { 0, 100 * 1000000 };

	nanosleep(&t, NULL);
	gate_set(true);
	return NULL;
}

static void test_free_pending(void)
{
	pthread_t opener;

	reset();
	pool = threadpool_new(base, 2, 16);
	submit(0, true);
	submit(1, true);
	ok(wait_stats(0, 2), "two jobs running");
	for (int i = 2; i < 6; i++)
		submit(i, false);
	/* Opened late, so free must wait for the running work. */
	pthread_create(&opener, NULL, open_gate_later, NULL);
	threadpool_free(pool);
	pool = NULL;
	pthread_join(opener, NULL);
	is_int(ncleanup, 6, "free: every job released through cleanup");
	is_int(ndone, 0, "free: no done callback");
}

static void test_free_in_done(void)
{
	reset();
	pool = threadpool_new(base, 1, 16);
	for (int i = 0; i < 4; i++)
		submit(i, false);
	free_in_done = true;
	ok(run_until(1, 3), "free from a done callback releases the rest");
	is_int(ndone, 1, "only the first done ran");
	ok(pool == NULL, "pool freed after the callback unwound");
	event_base_loop(base, EVLOOP_NONBLOCK);
}

int main(void)
{
	log_set_level(LOG_LVL_WARN);
	reactor = pthread_self();
	base = event_base_new();
	ok(threadpool_new(base, 0, 1) == NULL, "zero threads refused");
	test_many();
	test_queue_full();
	test_cancel();
	test_free_pending();
	test_free_in_done();
	event_base_free(base);
	return tap_done();
}
