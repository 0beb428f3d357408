/*
 * threadpool.c - the per-worker thread pool (see threadpool.h for the
 * ownership rules).
 *
 * One mutex guards two lists: jobs waiting for a thread and jobs whose work
 * has finished. A pool thread takes a job off the first, runs it without
 * the lock, puts it on the second and bumps an eventfd; the reactor's event
 * on that eventfd drains the second list and makes the done or cleanup
 * calls. Each job moves through three states under the lock, and a cancel
 * that arrives while the work runs only sets a flag, so the reactor never
 * waits for a pool thread. Pool threads block every signal: signals belong
 * to the reactor's libevent handlers.
 */
#include "config.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/queue.h>
#include <unistd.h>

#include "cloudsweep/log.h"
#include "cloudsweep/threadpool.h"
#include "cloudsweep/util.h"

enum tp_job_state {
	TP_JOB_QUEUED,   /* on tp->pending, waiting for a thread */
	TP_JOB_RUNNING,  /* work is running on a pool thread, on no list */
	TP_JOB_FINISHED, /* on tp->finished, waiting for the reactor */
};

struct tp_job {
	TAILQ_ENTRY(tp_job) entry; /* on pending or finished; under tp->lock */
	struct threadpool *tp;     /* borrowed */
	enum tp_job_state state;   /* under tp->lock */
	bool cancelled;            /* under tp->lock; only the reactor sets it */
	tp_work_fn work;
	tp_done_fn done;
	tp_cleanup_fn cleanup; /* or NULL */
	void *arg;             /* the submitter's; see threadpool.h */
};

TAILQ_HEAD(tp_job_list, tp_job);

struct threadpool {
	struct event_base *base; /* borrowed */
	struct event *ev_done;   /* owned; watches efd */
	int efd;                 /* owned eventfd: pool threads -> reactor */
	pthread_t *threads;      /* owned; nthreads entries */
	int nthreads;
	int max_queued;
	pthread_mutex_t lock;
	pthread_cond_t cond;         /* a job was queued, or the pool stops */
	struct tp_job_list pending;  /* under lock; owned jobs */
	struct tp_job_list finished; /* under lock; owned jobs */
	int nqueued;                 /* under lock */
	int nrunning;                /* under lock */
	bool stopping;               /* under lock */
	uint64_t completed;          /* reactor only */
	uint64_t cancelled;          /* reactor only */
	uint64_t refused;            /* reactor only */
	bool delivering;             /* reactor only: a done/cleanup is on the stack */
	bool freeing;                /* reactor only: threadpool_free has started */
	bool free_deferred;          /* reactor only: threadpool_free ran inside a callback */
};

static void threadpool_release(struct threadpool *tp);
static struct tp_job *threadpool_pop(struct threadpool *tp, struct tp_job_list *list);

/* Tell the reactor a job finished; the eventfd counter cannot overflow in practice. */
static void threadpool_notify(struct threadpool *tp)
{
	uint64_t one = 1;

	for (;;) {
		if (write(tp->efd, &one, sizeof(one)) == (ssize_t)sizeof(one))
			return;
		if (errno != EINTR)
			break;
	}
	/* A lost wake-up would strand done callbacks forever; no safe way to go on. */
	abort();
}

static void *threadpool_thread(void *p)
{
	struct threadpool *tp = p;
	struct tp_job *job;

	if (pthread_mutex_lock(&tp->lock) != 0)
		abort();
	for (;;) {
		while (!tp->stopping && TAILQ_EMPTY(&tp->pending))
			pthread_cond_wait(&tp->cond, &tp->lock);
		if (tp->stopping)
			break;
		job = TAILQ_FIRST(&tp->pending);
		TAILQ_REMOVE(&tp->pending, job, entry);
		tp->nqueued--;
		tp->nrunning++;
		job->state = TP_JOB_RUNNING;
		pthread_mutex_unlock(&tp->lock);

		job->work(job->arg);

		if (pthread_mutex_lock(&tp->lock) != 0)
			abort();
		tp->nrunning--;
		job->state = TP_JOB_FINISHED;
		TAILQ_INSERT_TAIL(&tp->finished, job, entry);
		pthread_mutex_unlock(&tp->lock);
		threadpool_notify(tp);
		if (pthread_mutex_lock(&tp->lock) != 0)
			abort();
	}
	pthread_mutex_unlock(&tp->lock);
	return NULL;
}

/* Give a job's arg back (done or cleanup) and free the job; reactor only. */
static void threadpool_deliver(struct threadpool *tp, struct tp_job *job, bool cancelled)
{
	bool nested = tp->delivering;

	tp->delivering = true;
	if (cancelled) {
		tp->cancelled++;
		if (job->cleanup != NULL)
			job->cleanup(job->arg);
	} else {
		tp->completed++;
		job->done(job->arg);
	}
	free(job);
	tp->delivering = nested;
}

static void threadpool_done_cb(evutil_socket_t fd, short what, void *p)
{
	struct threadpool *tp = p;
	struct tp_job *job;
	uint64_t n;
	bool cancelled;

	if (read(tp->efd, &n, sizeof(n)) == -1 && errno != EAGAIN && errno != EINTR)
		log_warn("threadpool_eventfd", "read");
	tp->delivering = true;
	while (!tp->free_deferred && (job = threadpool_pop(tp, &tp->finished)) != NULL) {
		/* Only the reactor sets cancelled, so reading it unlocked here is safe. */
		cancelled = job->cancelled;
		threadpool_deliver(tp, job, cancelled);
	}
	tp->delivering = false;
	if (tp->free_deferred)
		threadpool_release(tp);
}

/* Stop and join the first n threads. */
static void threadpool_join(struct threadpool *tp, int n)
{
	pthread_mutex_lock(&tp->lock);
	tp->stopping = true;
	pthread_cond_broadcast(&tp->cond);
	pthread_mutex_unlock(&tp->lock);
	for (int i = 0; i < n; i++)
		pthread_join(tp->threads[i], NULL);
}

struct threadpool *threadpool_new(struct event_base *base, int nthreads, int max_queued)
{
	struct threadpool *tp;
	sigset_t all, old;
	int started = 0, rc;

	if (nthreads < 1 || nthreads > THREADPOOL_MAX_THREADS || max_queued < 1) {
		log_warnx("threadpool_new", "bad size: %d threads, %d queued", nthreads,
		          max_queued);
		return NULL;
	}
	tp = xcalloc(1, sizeof(*tp));
	tp->base = base;
	tp->nthreads = nthreads;
	tp->max_queued = max_queued;
	tp->efd = -1;
	TAILQ_INIT(&tp->pending);
	TAILQ_INIT(&tp->finished);
	if (pthread_mutex_init(&tp->lock, NULL) != 0) {
		log_warnx("threadpool_new", "pthread_mutex_init failed");
		free(tp);
		return NULL;
	}
	if (pthread_cond_init(&tp->cond, NULL) != 0) {
		log_warnx("threadpool_new", "pthread_cond_init failed");
		pthread_mutex_destroy(&tp->lock);
		free(tp);
		return NULL;
	}
	tp->threads = xcalloc((size_t)nthreads, sizeof(*tp->threads));
	tp->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (tp->efd == -1) {
		log_warn("threadpool_new", "eventfd");
		goto fail;
	}
	tp->ev_done = event_new(base, tp->efd, EV_READ | EV_PERSIST, threadpool_done_cb, tp);
	if (tp->ev_done == NULL || event_add(tp->ev_done, NULL) == -1) {
		log_warnx("threadpool_new", "cannot watch the eventfd");
		goto fail;
	}

	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, &old);
	for (; started < nthreads; started++) {
		rc = pthread_create(&tp->threads[started], NULL, threadpool_thread, tp);
		if (rc != 0) {
			pthread_sigmask(SIG_SETMASK, &old, NULL);
			log_warnx("threadpool_new", "pthread_create: %s", strerror(rc));
			goto fail;
		}
	}
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	log_info("threadpool_started", "threads=%d max_queued=%d", nthreads, max_queued);
	return tp;
fail:
	threadpool_join(tp, started);
	threadpool_release(tp);
	return NULL;
}

struct tp_job *threadpool_submit(struct threadpool *tp, tp_work_fn work, tp_done_fn done,
                                 tp_cleanup_fn cleanup, void *arg)
{
	struct tp_job *job;

	pthread_mutex_lock(&tp->lock);
	if (tp->stopping || tp->nqueued >= tp->max_queued) {
		pthread_mutex_unlock(&tp->lock);
		tp->refused++;
		return NULL;
	}
	job = xcalloc(1, sizeof(*job));
	job->tp = tp;
	job->state = TP_JOB_QUEUED;
	job->work = work;
	job->done = done;
	job->cleanup = cleanup;
	job->arg = arg;
	TAILQ_INSERT_TAIL(&tp->pending, job, entry);
	tp->nqueued++;
	pthread_cond_signal(&tp->cond);
	pthread_mutex_unlock(&tp->lock);
	return job;
}

void threadpool_cancel(struct tp_job *job)
{
	struct threadpool *tp = job->tp;

	pthread_mutex_lock(&tp->lock);
	switch (job->state) {
	case TP_JOB_QUEUED:
		TAILQ_REMOVE(&tp->pending, job, entry);
		tp->nqueued--;
		break;
	case TP_JOB_RUNNING:
		/* The thread puts it on finished when work returns; delivery sees the flag. */
		job->cancelled = true;
		pthread_mutex_unlock(&tp->lock);
		return;
	case TP_JOB_FINISHED:
		TAILQ_REMOVE(&tp->finished, job, entry);
		break;
	}
	pthread_mutex_unlock(&tp->lock);
	threadpool_deliver(tp, job, true);
	if (tp->free_deferred && !tp->delivering)
		threadpool_release(tp);
}

void threadpool_stats(struct threadpool *tp, struct threadpool_stats *st)
{
	memset(st, 0, sizeof(*st));
	pthread_mutex_lock(&tp->lock);
	st->queued = tp->nqueued;
	st->running = tp->nrunning;
	pthread_mutex_unlock(&tp->lock);
	st->nthreads = tp->nthreads;
	st->completed = tp->completed;
	st->cancelled = tp->cancelled;
	st->refused = tp->refused;
}

/* Release what threadpool_new built; the threads are already joined. */
static void threadpool_release(struct threadpool *tp)
{
	if (tp->ev_done != NULL)
		event_free(tp->ev_done);
	if (tp->efd != -1)
		close(tp->efd);
	pthread_cond_destroy(&tp->cond);
	pthread_mutex_destroy(&tp->lock);
	free(tp->threads);
	free(tp);
}

/* Pop the first job of list under the lock, or NULL. */
static struct tp_job *threadpool_pop(struct threadpool *tp, struct tp_job_list *list)
{
	struct tp_job *job;

	pthread_mutex_lock(&tp->lock);
	job = TAILQ_FIRST(list);
	if (job != NULL) {
		TAILQ_REMOVE(list, job, entry);
		if (list == &tp->pending)
			tp->nqueued--;
	}
	pthread_mutex_unlock(&tp->lock);
	return job;
}

void threadpool_free(struct threadpool *tp)
{
	struct tp_job *job;

	if (tp == NULL || tp->freeing)
		return;
	tp->freeing = true;
	/*
	 * Once stopping is set no thread starts another job. Jobs stay on the
	 * pool's lists until delivered, so a cleanup may still cancel another job.
	 */
	threadpool_join(tp, 0);
	while ((job = threadpool_pop(tp, &tp->pending)) != NULL)
		threadpool_deliver(tp, job, true);
	threadpool_join(tp, tp->nthreads);
	while ((job = threadpool_pop(tp, &tp->finished)) != NULL)
		threadpool_deliver(tp, job, true);
	if (tp->delivering) {
		/* Called from a done or cleanup: free the pool once that call unwinds. */
		tp->free_deferred = true;
		return;
	}
	threadpool_release(tp);
}
