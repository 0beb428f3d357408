/*
 * revoke.c - the per-worker mirror of the revocations table. A revocation
 * is announced with NOTIFY cs_revoke (a trigger sends it), which makes the
 * worker fetch new rows at once; a poll every AUTH_REVOKE_POLL_MS catches
 * what a lost notification or a listener reconnect would miss. Entries live
 * until the tokens they cover have expired. If no poll has succeeded for
 * AUTH_REVOKE_STALE_MS the mirror reports itself stale and the middleware
 * refuses tokens (503) rather than risk accepting a revoked one.
 *
 * The set is an open-addressing hash table keyed by kind and UUID text.
 */
#include "config.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <event2/event.h>

#include "cloudsweep/auth.h"
#include "cloudsweep/log.h"

struct revoke_entry {
	char key[40]; /* "j:" or "s:" + uuid; empty: free slot */
	long long expires_at;
};

static struct {
	struct db_pool *pool;        /* borrowed */
	struct event *ev_poll;       /* owned */
	struct db_subscription *sub; /* owned */
	struct db_query *q;          /* pending poll, or NULL */
	bool again;                  /* a NOTIFY arrived while polling */
	long long last_id;           /* highest revocation id seen */
	uint64_t fresh_at_ms;        /* when the last poll succeeded */
	struct revoke_entry *slots;  /* owned; nslots entries */
	size_t nslots, used;
	bool started;
	bool primed; /* the first poll succeeded; until then poll every 50 ms */
} rv;

static uint64_t revoke_hash(const char *s)
{
	uint64_t h = 1469598103934665603ULL; /* FNV-1a */

	for (; *s != '\0'; s++)
		h = (h ^ (unsigned char)*s) * 1099511628211ULL;
	return h;
}

static void revoke_insert_slot(struct revoke_entry *slots, size_t n, const char *key, long long exp)
{
	size_t i = revoke_hash(key) & (n - 1);

	while (slots[i].key[0] != '\0' && strcmp(slots[i].key, key) != 0)
		i = (i + 1) & (n - 1);
	if (slots[i].key[0] == '\0') {
		snprintf(slots[i].key, sizeof(slots[i].key), "%s", key);
		slots[i].expires_at = exp;
		rv.used++;
	} else if (exp > slots[i].expires_at) {
		slots[i].expires_at = exp;
	}
}

/* Rebuild the table, dropping expired entries, with room to grow. */
static void revoke_rehash(size_t want)
{
	long long now = (long long)time(NULL);
	struct revoke_entry *old = rv.slots;
	size_t oldn = rv.nslots, n = 64;

	while (n < want * 2)
		n *= 2;
	rv.slots = xcalloc(n, sizeof(*rv.slots));
	rv.nslots = n;
	rv.used = 0;
	for (size_t i = 0; i < oldn; i++)
		if (old[i].key[0] != '\0' && old[i].expires_at + AUTH_CLOCK_SKEW_S >= now)
			revoke_insert_slot(rv.slots, n, old[i].key, old[i].expires_at);
	free(old);
}

void auth_revoke_note(const char *kind, const char *id, long long expires_at)
{
	char key[40];

	snprintf(key, sizeof(key), "%c:%s", kind[0], id);
	if ((rv.used + 1) * 2 > rv.nslots)
		revoke_rehash(rv.used + 1);
	revoke_insert_slot(rv.slots, rv.nslots, key, expires_at);
}

static bool revoke_has(char kind, const char *id)
{
	char key[40];
	size_t i;

	if (rv.nslots == 0 || id == NULL)
		return false;
	snprintf(key, sizeof(key), "%c:%s", kind, id);
	i = revoke_hash(key) & (rv.nslots - 1);
	while (rv.slots[i].key[0] != '\0') {
		if (strcmp(rv.slots[i].key, key) == 0)
			return true;
		i = (i + 1) & (rv.nslots - 1);
	}
	return false;
}

bool auth_revoked(const char *jti, const char *sid)
{
	return revoke_has('j', jti) || revoke_has('s', sid);
}

bool auth_revoke_fresh(void)
{
	if (!rv.started)
		return false;
	return cs_now_ms() - rv.fresh_at_ms <= AUTH_REVOKE_STALE_MS;
}

static void revoke_poll(void);

static void revoke_poll_cb(void *arg, enum db_event ev, const PGresult *res)
{
	int n;

	rv.q = NULL;
	if (ev != DB_OK) {
		log_warnx("revoke_poll",
		          "cannot read revocations; tokens are refused until it can");
		return;
	}
	n = PQntuples(res);
	for (int i = 0; i < n; i++) {
		long long id = strtoll(PQgetvalue(res, i, 0), NULL, 10);

		auth_revoke_note(PQgetvalue(res, i, 1), PQgetvalue(res, i, 2),
		                 strtoll(PQgetvalue(res, i, 3), NULL, 10));
		if (id > rv.last_id)
			rv.last_id = id;
	}
	rv.fresh_at_ms = cs_now_ms();
	if (!rv.primed) {
		/* Loaded once: from now on the regular poll is enough. */
		struct timeval tv = { 0, AUTH_REVOKE_POLL_MS * 1000 };

		rv.primed = true;
		event_add(rv.ev_poll, &tv);
	}
	if (n == 1000 || rv.again) {
		rv.again = false;
		revoke_poll();
	}
}

static void revoke_poll(void)
{
	char last[32];
	const char *params[1] = { last };

	if (rv.q != NULL) {
		rv.again = true;
		return;
	}
	snprintf(last, sizeof(last), "%lld", rv.last_id);
	rv.q =
	    db_query_prepared(rv.pool, "auth_revocations_since", 1, params, revoke_poll_cb, NULL);
}

static void revoke_tick_cb(evutil_socket_t fd, short what, void *arg)
{
	revoke_poll();
}

static void revoke_notify_cb(void *arg, const char *channel, const char *payload)
{
	revoke_poll();
}

void auth_revoke_start(struct event_base *base, struct db_pool *pool)
{
	struct timeval tv = { 0, 50 * 1000 };

	rv.pool = pool;
	rv.started = true;
	revoke_rehash(0);
	db_pool_prepare(
	    pool, "auth_revocations_since",
	    "SELECT id, kind, value, extract(epoch FROM expires_at)::bigint "
	    "FROM revocations WHERE id > $1 AND expires_at > now() - interval '1 minute' "
	    "ORDER BY id LIMIT 1000",
	    1);
	rv.sub = db_subscribe(pool, "cs_revoke", revoke_notify_cb, NULL);
	rv.ev_poll = event_new(base, -1, EV_PERSIST, revoke_tick_cb, NULL);
	if (rv.ev_poll == NULL || event_add(rv.ev_poll, &tv) == -1)
		fatalx("revoke", "cannot start the revocation poll");
	revoke_poll();
}

void auth_revoke_stop(void)
{
	if (rv.q != NULL)
		db_query_cancel(rv.q);
	if (rv.sub != NULL)
		db_unsubscribe(rv.sub);
	if (rv.ev_poll != NULL)
		event_free(rv.ev_poll);
	free(rv.slots);
	memset(&rv, 0, sizeof(rv));
}
