/*
 * privacy.h - the background half of account deletion. DELETE /api/v1/me
 * only marks an account deleted (login refused, sessions revoked); the
 * purge job hard-deletes its personal data purge_after_days later: email,
 * name, password hash, GitHub link, MFA secret and backup codes, sessions
 * and memberships. The user row stays as a tombstone holding nothing
 * personal, so the random user id that audit rows name stays a pseudonym
 * and the audit chain, which is never touched, still verifies.
 *
 * Every worker runs the job on a timer; a transaction-scoped advisory lock
 * lets only one of them (across all instances) work at a time, in batches,
 * and each batch commits together with its user.purged audit events.
 */
#ifndef CLOUDSWEEP_PRIVACY_H
#define CLOUDSWEEP_PRIVACY_H

#include <event2/event.h>

#include "cloudsweep/config.h"
#include "cloudsweep/db.h"

#define PRIVACY_PURGE_BATCH   100 /* accounts scrubbed per transaction */
#define PRIVACY_PURGE_FIRST_S 30  /* first run after start-up, at most this many seconds */

/*
 * Start this worker's purge timer: every cfg->purge_interval_s seconds
 * (the first run sooner), accounts deleted more than cfg->purge_after_days
 * ago are purged. cfg and pool are borrowed and must outlive the job.
 */
void privacy_purge_start(struct event_base *base, const struct config *cfg, struct db_pool *pool);
/* Stop the timer and cancel a run in progress (its transaction rolls back). */
void privacy_purge_stop(void);

#endif
