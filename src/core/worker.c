/*
 * worker.c - one worker process: builds its reactor, database pool, router
 * and server, reports readiness to the master, and runs until SIGTERM has
 * drained it (or the shutdown bound has passed). SIGHUP re-reads the
 * configuration file and applies the reloadable options.
 */
#include "config.h"

#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cloudsweep/alerts.h"
#include "cloudsweep/audit.h"
#include "cloudsweep/auth.h"
#include "cloudsweep/creds.h"
#include "cloudsweep/aws.h"
#include "cloudsweep/db.h"
#include "cloudsweep/http.h"
#include "cloudsweep/log.h"
#include "cloudsweep/net.h"
#include "cloudsweep/scan.h"
#include "cloudsweep/privacy.h"
#include "cloudsweep/vault.h"
#include "cloudsweep/worker.h"
#include "../auth/auth_int.h" /* auth_github_init */

struct worker *cs_worker;

static void worker_settle_cb(evutil_socket_t fd, short what, void *arg);

/*
 * Stop once the database work the connections left behind is answered too
 * (audit rows of refusals, folded 429s, scan units handed back), looking
 * again every 10 ms; the shutdown deadline still bounds the wait.
 */
static void worker_settle(struct worker *w)
{
	struct timeval tv = { 0, 10000 };
	struct db_pool_stats st;

	if (w->db != NULL) {
		db_pool_stats(w->db, &st);
		if (st.connected > 0 && st.in_use + st.waiting > 0 &&
		    event_base_once(w->base, -1, EV_TIMEOUT, worker_settle_cb, w, &tv) == 0)
			return;
	}
	event_base_loopbreak(w->base);
}

static void worker_settle_cb(evutil_socket_t fd, short what, void *arg)
{
	worker_settle(arg);
}

static void worker_drained_cb(void *arg)
{
	struct worker *w = arg;

	struct timeval now = { 0, 0 };

	log_info("worker_drained", "all connections finished");
	/* From the next loop pass: the other SIGTERM handlers queue their work first. */
	if (event_base_once(w->base, -1, EV_TIMEOUT, worker_settle_cb, w, &now) == -1)
		event_base_loopbreak(w->base);
}

static void worker_deadline_cb(evutil_socket_t fd, short what, void *arg)
{
	struct worker *w = arg;

	log_warnx("worker_shutdown_timeout", "%d connections still open; exiting",
	          server_connections(w->server));
	event_base_loopbreak(w->base);
}

static void worker_term_cb(evutil_socket_t sig, short what, void *arg)
{
	struct worker *w = arg;
	struct timeval tv;

	if (w->draining)
		return;
	w->draining = true;
	log_info("worker_draining", "stop accepting, finishing %d connections",
	         server_connections(w->server));
	tv.tv_sec = w->cfg->shutdown_timeout_ms / 1000;
	tv.tv_usec = (w->cfg->shutdown_timeout_ms % 1000) * 1000;
	evtimer_add(w->ev_deadline, &tv);
	server_drain(w->server, worker_drained_cb, w);
}

static void worker_hup_cb(evutil_socket_t sig, short what, void *arg)
{
	struct worker *w = arg;
	struct config *fresh;
	char err[512];

	fresh = config_load_all(w->config_path, NULL, NULL, err, sizeof(err));
	if (fresh == NULL) {
		log_warnx("reload_failed", "keeping the running configuration: %s", err);
		return;
	}
	config_apply_reloadable(w->cfg, fresh);
	config_free(fresh);
	log_set_level((enum log_level)w->cfg->log_level_num);
	if (log_open(w->cfg->log_file) == -1)
		log_warn("reload", "cannot open log_file %s", w->cfg->log_file);
	log_info("reloaded", "configuration reloaded");
}

static void worker_tick_cb(evutil_socket_t fd, short what, void *arg)
{
	struct worker *w = arg;
	struct db_pool_stats st;

	if (w->db == NULL)
		return;
	db_pool_stats(w->db, &st);
	metrics_gauge_set(&w->slot->db_in_use, st.in_use);
	metrics_gauge_set(&w->slot->db_waiting, st.waiting);
	metrics_gauge_set(&w->slot->db_connected, st.connected);
}

static void worker_checkpoint_done_cb(void *arg, int status, int nsigned)
{
	struct worker *w = arg;

	w->checkpoint = NULL;
	if (status != 0)
		log_warnx("audit_checkpoint", "signing the audit chain heads failed");
	else if (nsigned > 0)
		log_info("audit_checkpoint", "signed %d chain heads", nsigned);
}

/* Sign the audit chain heads that advanced; concurrent workers store each checkpoint once. */
static void worker_checkpoint_cb(evutil_socket_t fd, short what, void *arg)
{
	struct worker *w = arg;

	if (w->checkpoint == NULL)
		w->checkpoint = audit_checkpoint_sign(w->db, worker_checkpoint_done_cb, w);
}

void worker_routes(struct router *r)
{
	auth_routes(r);
	alerts_routes(r);
	creds_routes(r);
	scan_routes(r);
}

int worker_run(int id, struct config *cfg, const char *config_path, int listen_fd, SSL_CTX *ctx,
               struct metrics_shared *metrics, int ready_fd)
{
	struct worker *w = xcalloc(1, sizeof(*w));
	struct timeval second = { 1, 0 };
	unsigned char idbyte = (unsigned char)id;

	log_set_role("worker", id);
	w->id = id;
	w->cfg = cfg;
	w->config_path = config_path;
	w->metrics = metrics;
	w->slot = &metrics->slots[id];
	/* Counters survive a restart of this slot; gauges start over. */
	metrics_gauge_set(&w->slot->open_connections, 0);
	w->slot->pid = (uint64_t)getpid();
	cs_worker = w;

	w->base = event_base_new();
	if (w->base == NULL)
		fatalx("event_base_new", "cannot create the reactor");
	if (*cfg->db_conninfo != '\0') {
		char *conninfo = config_db_conninfo(cfg);

		w->db = db_pool_new(w->base, conninfo, (int)cfg->db_pool_size,
		                    (int)cfg->db_query_timeout_ms);
		cs_free_secret(conninfo);
	}
	w->router = router_new();
	router_use(w->router, http_mw_db_gate);
	http_core_routes(w->router);
	if (w->db != NULL) {
		if (audit_init(*cfg->audit_hmac_key_file != '\0' ? cfg->audit_hmac_key_file : NULL,
		               *cfg->audit_signing_key_file != '\0' ? cfg->audit_signing_key_file
		                                                    : NULL) == -1)
			fatalx("audit_init", "cannot load the audit keys (audit_hmac_key_file)");
		if (vault_worker_init(cfg) == -1)
			fatalx("vault_init", "cannot load the vault key ring (vault_key_dir)");
		if (auth_worker_init(w->base, cfg, w->db) == -1)
			fatalx("auth_init", "cannot start authentication");
		router_use(w->router, auth_mw_authenticate);
		router_use(w->router, auth_mw_ratelimit);
		if (alerts_worker_init(w->base, cfg, w->db) == -1)
			fatalx("alerts_init", "cannot start security alerts (alert_* options)");
		if (auth_github_init(w->base, cfg) == -1)
			fatalx("github_init", "cannot start GitHub sign-in (github_* options)");
		privacy_purge_start(w->base, cfg, w->db);
		if (aws_worker_init(w->base, cfg) == -1)
			fatalx("aws_init", "cannot start the AWS client (aws_* options)");
		if (creds_worker_init(w->base, cfg, w->db) == -1)
			fatalx("creds_init", "cannot start the credential store (aws_regions)");
		if (scan_worker_init(w->base, cfg, w->db) == -1)
			fatalx("scan_init", "cannot start scanning (scan_prices_file)");
		worker_routes(w->router);
		w->ev_checkpoint = event_new(w->base, -1, EV_PERSIST, worker_checkpoint_cb, w);
		if (w->ev_checkpoint == NULL)
			fatalx("worker_events", "cannot create the checkpoint timer");
		if (audit_key_id() != NULL) {
			struct timeval ck = { (time_t)cfg->audit_checkpoint_interval_s, 0 };

			event_add(w->ev_checkpoint, &ck);
		}
	}
	w->server = server_new(w->base, listen_fd, ctx, cfg, w->router);

	w->ev_term = evsignal_new(w->base, SIGTERM, worker_term_cb, w);
	w->ev_int = evsignal_new(w->base, SIGINT, worker_term_cb, w);
	w->ev_hup = evsignal_new(w->base, SIGHUP, worker_hup_cb, w);
	w->ev_tick = event_new(w->base, -1, EV_PERSIST, worker_tick_cb, w);
	w->ev_deadline = evtimer_new(w->base, worker_deadline_cb, w);
	if (w->ev_term == NULL || w->ev_int == NULL || w->ev_hup == NULL || w->ev_tick == NULL ||
	    w->ev_deadline == NULL || event_add(w->ev_term, NULL) == -1 ||
	    event_add(w->ev_int, NULL) == -1 || event_add(w->ev_hup, NULL) == -1 ||
	    event_add(w->ev_tick, &second) == -1)
		fatalx("worker_events", "cannot install signal and timer events");

	if (write(ready_fd, &idbyte, 1) != 1)
		log_warn("worker_ready", "cannot tell the master");
	close(ready_fd);
	log_debug("worker_started", "serving");

	if (event_base_dispatch(w->base) == -1)
		log_warnx("event_loop", "the reactor failed");

	server_free(w->server);
	if (w->checkpoint != NULL)
		audit_sign_cancel(w->checkpoint);
	if (w->db != NULL) {
		alerts_worker_free();
		auth_github_free();
		privacy_purge_stop();
		aws_worker_free();
		creds_worker_free();
		scan_worker_free();
		auth_worker_free();
		vault_worker_free();
		audit_shutdown();
		db_pool_free(w->db);
		w->db = NULL; /* the tick below must not reach the freed pool */
	}
	event_del(w->ev_tick);
	if (w->ev_checkpoint != NULL)
		event_free(w->ev_checkpoint);
	/* Run the deferred frees the teardown scheduled. */
	event_base_loop(w->base, EVLOOP_NONBLOCK);
	router_free(w->router);
	event_free(w->ev_term);
	event_free(w->ev_int);
	event_free(w->ev_hup);
	event_free(w->ev_tick);
	event_free(w->ev_deadline);
	event_base_free(w->base);
	metrics_gauge_set(&w->slot->open_connections, 0);
	metrics_gauge_set(&w->slot->db_in_use, 0);
	metrics_gauge_set(&w->slot->db_waiting, 0);
	metrics_gauge_set(&w->slot->db_connected, 0);
	cs_worker = NULL;
	free(w);
	log_info("worker_exit", "drained");
	return 0;
}
