/*
 * master.c - the master process. It builds what workers share (the TLS
 * context, whose ticket key makes sessions resumable on every worker; one
 * SO_REUSEPORT listener per worker slot, kept open across worker restarts
 * so no queued connection is lost; the metrics map), forks the workers and
 * supervises them with a synchronous signal loop: SIGCHLD restarts a worker
 * that died (with a delay if it dies young), SIGHUP reloads, SIGTERM/SIGINT
 * drain. The master never serves requests and never touches Postgres.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "cloudsweep/log.h"
#include "cloudsweep/net.h"
#include "cloudsweep/worker.h"

#define MASTER_YOUNG_MS         1000 /* a worker dying sooner than this is restarted after a pause */
#define MASTER_RESPAWN_DELAY_MS 1000

struct master_slot {
	pid_t pid;     /* 0 when not running */
	int listen_fd; /* owned by the master while running */
	uint64_t started_ms;
	uint64_t respawn_at_ms; /* when to restart, 0 if no restart is due */
	bool ready;
};

struct master {
	struct config *cfg;      /* borrowed */
	const char *config_path; /* borrowed */
	SSL_CTX *ctx;            /* owned */
	struct metrics_shared *metrics;
	struct master_slot *slots; /* owned */
	int nslots;
	int ready_pipe[2];
	bool announced, stopping;
	uint64_t stop_deadline_ms;
	sigset_t old_mask;
};

static int master_spawn(struct master *m, int id)
{
	struct master_slot *s = &m->slots[id];
	pid_t pid;

	pid = fork();
	if (pid == -1) {
		log_warn("fork", "cannot start worker %d", id);
		s->respawn_at_ms = cs_now_ms() + MASTER_RESPAWN_DELAY_MS;
		return -1;
	}
	if (pid == 0) {
		int rc;

		for (int i = 0; i < m->nslots; i++)
			if (i != id)
				close(m->slots[i].listen_fd);
		close(m->ready_pipe[0]);
		/* A worker does not outlive its master. */
		if (prctl(PR_SET_PDEATHSIG, SIGTERM) == -1 || getppid() == 1)
			_exit(1);
		signal(SIGCHLD, SIG_DFL);
		sigprocmask(SIG_SETMASK, &m->old_mask, NULL);
		rc = worker_run(id, m->cfg, m->config_path, s->listen_fd, m->ctx, m->metrics,
		                m->ready_pipe[1]);
		SSL_CTX_free(m->ctx);
		config_free(m->cfg);
		free(m->slots);
		exit(rc); /* not _exit: sanitizers check for leaks at exit */
	}
	s->pid = pid;
	s->started_ms = cs_now_ms();
	s->respawn_at_ms = 0;
	return 0;
}

static void master_read_ready(struct master *m);

static void master_kill_all(struct master *m, int sig)
{
	for (int i = 0; i < m->nslots; i++)
		if (m->slots[i].pid > 0)
			kill(m->slots[i].pid, sig);
}

static void master_reap(struct master *m)
{
	int status;
	pid_t pid;

	while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
		for (int i = 0; i < m->nslots; i++) {
			struct master_slot *s = &m->slots[i];
			uint64_t now = cs_now_ms();

			if (s->pid != pid)
				continue;
			s->pid = 0;
			if (m->stopping) {
				log_info("worker_stopped", "worker %d (pid %d) exited with %d", i,
				         (int)pid, WIFEXITED(status) ? WEXITSTATUS(status) : -1);
				break;
			}
			if (WIFSIGNALED(status))
				log_warnx("worker_died", "worker %d (pid %d) killed by signal %d",
				          i, (int)pid, WTERMSIG(status));
			else
				log_warnx("worker_died", "worker %d (pid %d) exited with %d", i,
				          (int)pid, WEXITSTATUS(status));
			if (!m->announced && !s->ready) {
				master_kill_all(m, SIGKILL);
				fatalx("startup_failed", "worker %d failed while starting", i);
			}
			__atomic_add_fetch(&m->metrics->worker_restarts, 1, __ATOMIC_RELAXED);
			s->respawn_at_ms = now - s->started_ms < MASTER_YOUNG_MS
			                       ? now + MASTER_RESPAWN_DELAY_MS
			                       : now;
			break;
		}
	}
}

static void master_read_ready(struct master *m)
{
	const char *a = m->cfg->listen_address;
	char url[128];
	unsigned char ids[64];
	ssize_t n;

	while ((n = read(m->ready_pipe[0], ids, sizeof(ids))) > 0)
		for (ssize_t i = 0; i < n; i++)
			if (ids[i] < m->nslots)
				m->slots[ids[i]].ready = true;
	if (m->announced)
		return;
	for (int i = 0; i < m->nslots; i++)
		if (!m->slots[i].ready)
			return;
	snprintf(url, sizeof(url), strchr(a, ':') ? "https://[%s]:%lld" : "https://%s:%lld", a,
	         m->cfg->port);
	m->announced = true;
	log_fields(LOG_LVL_INFO, "ready",
	           json_pack("{s:s,s:s%,s:i,s:i}", "msg", "cloudsweepd is serving", "url", url,
	                     (size_t)strlen(url), "port", (int)m->cfg->port, "workers", m->nslots));
}

static void master_reload(struct master *m)
{
	struct config *fresh;
	char err[512];

	fresh = config_load_all(m->config_path, NULL, NULL, err, sizeof(err));
	if (fresh == NULL) {
		log_warnx("reload_failed", "keeping the running configuration: %s", err);
		return;
	}
	config_apply_reloadable(m->cfg, fresh);
	config_free(fresh);
	log_set_level((enum log_level)m->cfg->log_level_num);
	if (log_open(m->cfg->log_file) == -1)
		log_warn("reload", "cannot open log_file %s", m->cfg->log_file);
	for (int i = 0; i < m->nslots; i++)
		if (m->slots[i].pid > 0)
			kill(m->slots[i].pid, SIGHUP);
	log_info("reloaded", "configuration reloaded; workers told");
}

static void master_stop(struct master *m)
{
	if (m->stopping)
		return;
	m->stopping = true;
	m->stop_deadline_ms = cs_now_ms() + (uint64_t)m->cfg->shutdown_timeout_ms + 2000;
	/* Close our copies of the listeners so the kernel refuses new connections. */
	for (int i = 0; i < m->nslots; i++) {
		close(m->slots[i].listen_fd);
		m->slots[i].listen_fd = -1;
		if (m->slots[i].pid > 0)
			kill(m->slots[i].pid, SIGTERM);
	}
	log_info("draining", "stopping %d workers", m->nslots);
}

static int master_live(const struct master *m)
{
	int n = 0;

	for (int i = 0; i < m->nslots; i++)
		if (m->slots[i].pid > 0)
			n++;
	return n;
}

static int master_write_pid(const char *path)
{
	FILE *fp;

	if (path == NULL || *path == '\0')
		return 0;
	fp = fopen(path, "we");
	if (fp == NULL)
		return -1;
	fprintf(fp, "%d\n", (int)getpid());
	return fclose(fp);
}

int master_run(struct config *cfg, const char *config_path)
{
	struct master m = { .cfg = cfg, .config_path = config_path };
	sigset_t set;
	long ncpu;

	log_set_role("master", -1);
	ncpu = sysconf(_SC_NPROCESSORS_ONLN);
	m.nslots = cfg->workers > 0 ? (int)cfg->workers : (int)(ncpu > 0 ? ncpu : 1);
	if (m.nslots > METRICS_MAX_WORKERS)
		m.nslots = METRICS_MAX_WORKERS;
	m.ctx = net_tls_server_ctx(cfg->tls_cert_file, cfg->tls_key_file);
	if (m.ctx == NULL)
		return 1;
	m.metrics = metrics_shared_new();
	m.metrics->nworkers = (uint64_t)m.nslots;
	m.slots = xcalloc((size_t)m.nslots, sizeof(*m.slots));
	for (int i = 0; i < m.nslots; i++) {
		m.slots[i].listen_fd = net_listen(cfg->listen_address, (int)cfg->port);
		if (m.slots[i].listen_fd == -1)
			return 1;
	}
	if (pipe2(m.ready_pipe, O_CLOEXEC) == -1)
		fatal("pipe", "ready pipe");
	if (fcntl(m.ready_pipe[0], F_SETFL, O_NONBLOCK) == -1)
		fatal("fcntl", "ready pipe");
	if (master_write_pid(cfg->pid_file) == -1)
		log_warn("pid_file", "cannot write %s", cfg->pid_file);

	signal(SIGPIPE, SIG_IGN);
	sigemptyset(&set);
	sigaddset(&set, SIGCHLD);
	sigaddset(&set, SIGTERM);
	sigaddset(&set, SIGINT);
	sigaddset(&set, SIGHUP);
	sigprocmask(SIG_BLOCK, &set, &m.old_mask);

	log_info("starting", "%d workers on %s:%lld", m.nslots, cfg->listen_address, cfg->port);
	fflush(NULL);
	for (int i = 0; i < m.nslots; i++)
		if (master_spawn(&m, i) == -1) {
			master_kill_all(&m, SIGKILL);
			fatalx("startup_failed", "cannot fork workers");
		}

	for (;;) {
		struct timespec ts = { 0, 100 * 1000 * 1000 };
		siginfo_t info;
		int sig = sigtimedwait(&set, &info, &ts);
		uint64_t now;

		switch (sig) {
		case SIGCHLD:
			master_read_ready(&m); /* a worker may have become ready before dying */
			master_reap(&m);
			break;
		case SIGTERM:
		case SIGINT:
			master_stop(&m);
			break;
		case SIGHUP:
			master_reload(&m);
			break;
		default:
			break;
		}
		master_read_ready(&m);
		now = cs_now_ms();
		if (m.stopping) {
			master_reap(&m);
			if (master_live(&m) == 0)
				break;
			if (now > m.stop_deadline_ms) {
				log_warnx("drain_timeout", "killing %d workers", master_live(&m));
				for (int i = 0; i < m.nslots; i++)
					if (m.slots[i].pid > 0)
						kill(m.slots[i].pid, SIGKILL);
				m.stop_deadline_ms = now + 5000;
			}
			continue;
		}
		for (int i = 0; i < m.nslots; i++)
			if (m.slots[i].pid == 0 && m.slots[i].respawn_at_ms != 0 &&
			    now >= m.slots[i].respawn_at_ms) {
				log_info("worker_restart", "restarting worker %d", i);
				master_spawn(&m, i);
			}
	}
	if (cfg->pid_file != NULL && *cfg->pid_file != '\0')
		unlink(cfg->pid_file);
	close(m.ready_pipe[0]);
	close(m.ready_pipe[1]);
	SSL_CTX_free(m.ctx);
	free(m.slots);
	log_info("stopped", "all workers exited");
	return 0;
}
