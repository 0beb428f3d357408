-- 005_alerts: security alerts evaluated from the audit trail, their webhook
-- delivery state, and the lease that keeps the retention job single.
--
-- Alert rules are configuration (doc/alerts.md): the daemon validates them
-- and hands them to alert_evaluate() as one JSON array. An evaluation looks
-- at each audit event once: alert_marks holds, per organization, the seq of
-- the last event evaluated. That is exact because an organization's chain
-- head stays locked until the appending transaction ends, so its events
-- become visible in seq order and a later seq never shows before an earlier
-- one. One ongoing condition is one alert row: while an alert for a rule and
-- subject is open (its last event lies within the rule's window) further
-- events add to its count instead of raising another.

-- orgs.rate_limit_per_min (003_identity) is the per-organization tier of the
-- user rate limit; the daemon caches it per worker.

CREATE TABLE security_alerts (
    id              uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    org_id          uuid        NOT NULL,  -- the nil org when the events span organizations
    rule            text        NOT NULL CHECK (length(rule) BETWEEN 1 AND 64),
    severity        text        NOT NULL CHECK (severity IN ('low', 'medium', 'high', 'critical')),
    subject         text        NOT NULL CHECK (length(subject) BETWEEN 1 AND 256),
    details         jsonb       NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(details) = 'object'),
    window_start    timestamptz NOT NULL,  -- first event of the condition: part of the key
    first_seen      timestamptz NOT NULL,
    last_seen       timestamptz NOT NULL,
    count           bigint      NOT NULL DEFAULT 1 CHECK (count > 0),
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    delivered_at    timestamptz,           -- webhook answered 2xx
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz,           -- webhook retry backoff; NULL: due now
    CONSTRAINT security_alerts_rule_subject_window_key UNIQUE (rule, subject, window_start)
);

CREATE INDEX security_alerts_org_created_idx ON security_alerts (org_id, created_at DESC, id);
CREATE INDEX security_alerts_open_idx ON security_alerts (rule, subject, last_seen DESC);
CREATE INDEX security_alerts_created_idx ON security_alerts (created_at);
CREATE INDEX security_alerts_undelivered_idx ON security_alerts (created_at)
    WHERE delivered_at IS NULL;

-- Rules count events of a type across organizations within a time window.
CREATE INDEX audit_events_type_time_idx ON audit_events (event_type, occurred_at);

CREATE TABLE alert_marks (
    org_id uuid   PRIMARY KEY,
    seq    bigint NOT NULL  -- every event of the org up to here has been evaluated
);

-- A lease per background job: one holder at a time across workers and
-- instances, for jobs made of many statements on pooled connections (where
-- a session advisory lock cannot be held). A crashed holder's lease lapses.
CREATE TABLE job_leases (
    name   text        PRIMARY KEY,
    holder text        NOT NULL,
    until  timestamptz NOT NULL
);

-- Take (or renew) the lease of job p_name for p_secs; true when held.
CREATE FUNCTION job_lease_take(p_name text, p_holder text, p_secs integer) RETURNS boolean
LANGUAGE sql AS $$
    WITH t AS (
        INSERT INTO job_leases AS l (name, holder, until)
        VALUES (p_name, p_holder, clock_timestamp() + make_interval(secs => p_secs))
        ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, until = excluded.until
        WHERE l.until < clock_timestamp() OR l.holder = excluded.holder
        RETURNING 1)
    SELECT EXISTS (SELECT 1 FROM t)
$$;

-- Give the lease back.
CREATE FUNCTION job_lease_release(p_name text, p_holder text) RETURNS void
LANGUAGE sql AS $$
    UPDATE job_leases SET until = clock_timestamp() WHERE name = p_name AND holder = p_holder
$$;

-- The value an event is grouped by: 'actor_ip', 'actor' (never 'system'),
-- 'resource_id' or 'details.<key>'. NULL when the event has none.
CREATE FUNCTION alert_group_key(p_group text, p_actor text, p_ip text, p_resource text,
                                p_details jsonb)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN p_group = 'actor_ip' THEN nullif(p_ip, '')
        WHEN p_group = 'actor' THEN nullif(p_actor, 'system')
        WHEN p_group = 'resource_id' THEN nullif(p_resource, '')
        WHEN p_group LIKE 'details.%' THEN nullif(p_details ->> substr(p_group, 9), '')
    END
$$;

-- Whether a moment falls outside business hours: the time shifted by
-- p_offset_min minutes from UTC must be on one of p_days (ISO: Monday 1)
-- between p_start_min and p_end_min minutes after midnight.
CREATE FUNCTION alert_outside_hours(p_at timestamptz, p_offset_min integer, p_days integer[],
                                    p_start_min integer, p_end_min integer)
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    WITH l AS (SELECT (p_at AT TIME ZONE 'UTC') + make_interval(mins => p_offset_min) AS t)
    SELECT NOT (extract(isodow FROM l.t)::integer = ANY (p_days)
                AND extract(hour FROM l.t) * 60 + extract(minute FROM l.t) >= p_start_min
                AND extract(hour FROM l.t) * 60 + extract(minute FROM l.t) < p_end_min)
    FROM l
$$;

-- Add a hit to the open alert of (rule, subject), or raise a new one when
-- p_n reaches the threshold. The new alert's id, or NULL.
CREATE FUNCTION alert_note(p_rule jsonb, p_subject text, p_org uuid, p_first timestamptz,
                           p_last timestamptz, p_n bigint, p_new bigint, p_details jsonb)
RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
    v_window interval := make_interval(secs => (p_rule ->> 'window_s')::integer);
    v_id     uuid;
BEGIN
    UPDATE security_alerts a
       SET count = a.count + greatest(p_new, 1), last_seen = greatest(a.last_seen, p_last),
           details = a.details || p_details,
           org_id = CASE WHEN a.org_id = p_org THEN a.org_id
                         ELSE '00000000-0000-0000-0000-000000000000'::uuid END
     WHERE a.id = (SELECT o.id FROM security_alerts o
                    WHERE o.rule = p_rule ->> 'name' AND o.subject = p_subject
                      AND o.last_seen > p_last - v_window
                    ORDER BY o.last_seen DESC LIMIT 1);
    IF FOUND OR p_n < (p_rule ->> 'threshold')::bigint THEN
        RETURN NULL;
    END IF;
    INSERT INTO security_alerts (org_id, rule, severity, subject, details, window_start,
                                 first_seen, last_seen, count)
    VALUES (p_org, p_rule ->> 'name', p_rule ->> 'severity', p_subject, p_details, p_first,
            p_first, p_last, p_n)
    ON CONFLICT ON CONSTRAINT security_alerts_rule_subject_window_key DO NOTHING
    RETURNING id INTO v_id;
    RETURN v_id;
END;
$$;

-- Evaluate p_rules (validated by the daemon) over at most p_batch audit
-- events not evaluated yet, advance the marks past them, and return the
-- alerts raised. Only one evaluation runs at a time (a transaction-scoped
-- advisory lock): a concurrent caller returns nothing at once.
CREATE FUNCTION alert_evaluate(p_rules jsonb, p_batch integer)
RETURNS TABLE (id uuid, org_id uuid, rule text, severity text, subject text, count bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_ids   uuid[];
    v_rule  jsonb;
    v_types text[];
    v_group text;
    v_win   interval;
    v_nil   CONSTANT uuid := '00000000-0000-0000-0000-000000000000';
    c       record;
    v_id    uuid;
BEGIN
    IF NOT pg_try_advisory_xact_lock(1634496627, 1) THEN
        RETURN;
    END IF;
    -- Ordering by seq across organizations keeps, for each of them, a
    -- prefix of its unevaluated events: the marks can jump to their end.
    SELECT array_agg(n.id) INTO v_ids FROM (
        SELECT e.id FROM audit_chain_heads h
        LEFT JOIN alert_marks m ON m.org_id = h.org_id
        CROSS JOIN LATERAL (
            SELECT e.id, e.seq FROM audit_events e
             WHERE e.org_id = h.org_id AND e.seq > coalesce(m.seq, 0)
             ORDER BY e.seq LIMIT p_batch) e
        WHERE h.seq > coalesce(m.seq, 0)
        ORDER BY e.seq LIMIT p_batch) n;
    IF v_ids IS NULL THEN
        RETURN;
    END IF;

    FOR v_rule IN SELECT r.value FROM jsonb_array_elements(p_rules) r LOOP
        v_types := ARRAY(SELECT jsonb_array_elements_text(v_rule -> 'types'));
        v_group := v_rule ->> 'group_by';
        v_win := make_interval(secs => (v_rule ->> 'window_s')::integer);
        IF v_rule ->> 'kind' = 'threshold' THEN
            FOR c IN
                WITH cand AS (
                    SELECT alert_group_key(v_group, e.actor, e.actor_ip, e.resource_id, e.details) AS subject,
                           max(e.occurred_at) AS t_last, count(*) AS n_new
                      FROM audit_events e
                     WHERE e.id = ANY (v_ids) AND e.event_type = ANY (v_types)
                     GROUP BY 1)
                SELECT cand.subject, cand.t_last, cand.n_new, w.n, w.t_first, w.org
                  FROM cand CROSS JOIN LATERAL (
                      SELECT count(*) AS n, min(e.occurred_at) AS t_first,
                             CASE WHEN count(DISTINCT e.org_id) = 1
                                  THEN (array_agg(e.org_id))[1] ELSE v_nil END AS org
                        FROM audit_events e
                       WHERE e.event_type = ANY (v_types)
                         AND e.occurred_at > cand.t_last - v_win
                         AND e.occurred_at <= cand.t_last
                         AND alert_group_key(v_group, e.actor, e.actor_ip, e.resource_id, e.details)
                             = cand.subject) w
                 WHERE cand.subject IS NOT NULL
            LOOP
                v_id := alert_note(v_rule, left(c.subject, 256), c.org, c.t_first, c.t_last,
                                   c.n, c.n_new,
                                   jsonb_build_object('events_in_window', c.n,
                                                      'window_s', v_rule -> 'window_s',
                                                      'event_types', v_rule -> 'types'));
                IF v_id IS NOT NULL THEN
                    RETURN QUERY SELECT a.id, a.org_id, a.rule, a.severity, a.subject, a.count
                                   FROM security_alerts a WHERE a.id = v_id;
                END IF;
            END LOOP;
        ELSIF v_rule ->> 'kind' = 'new_ip' THEN
            -- A user's event from an address none of their earlier events in
            -- the lookback came from, provided they have earlier events at all.
            FOR c IN
                SELECT e.actor AS subject, e.org_id AS org, min(e.occurred_at) AS t_first,
                       max(e.occurred_at) AS t_last, count(*) AS n,
                       (array_agg(e.actor_ip ORDER BY e.occurred_at DESC))[1] AS ip
                  FROM audit_events e
                 WHERE e.id = ANY (v_ids) AND e.event_type = ANY (v_types)
                   AND e.actor <> 'system' AND e.actor_ip IS NOT NULL
                   AND EXISTS (
                       SELECT 1 FROM audit_events p
                        WHERE p.org_id = e.org_id AND p.actor = e.actor
                          AND p.event_type = ANY (v_types)
                          AND p.occurred_at < e.occurred_at
                          AND p.occurred_at > e.occurred_at
                              - make_interval(days => (v_rule ->> 'days')::integer))
                   AND NOT EXISTS (
                       SELECT 1 FROM audit_events p
                        WHERE p.org_id = e.org_id AND p.actor = e.actor
                          AND p.event_type = ANY (v_types) AND p.actor_ip = e.actor_ip
                          AND p.occurred_at < e.occurred_at
                          AND p.occurred_at > e.occurred_at
                              - make_interval(days => (v_rule ->> 'days')::integer))
                 GROUP BY e.actor, e.org_id
            LOOP
                v_id := alert_note(v_rule, left(c.subject, 256), c.org, c.t_first, c.t_last,
                                   c.n, c.n, jsonb_build_object('ip', c.ip,
                                                                'lookback_days',
                                                                v_rule -> 'days'));
                IF v_id IS NOT NULL THEN
                    RETURN QUERY SELECT a.id, a.org_id, a.rule, a.severity, a.subject, a.count
                                   FROM security_alerts a WHERE a.id = v_id;
                END IF;
            END LOOP;
        ELSIF v_rule ->> 'kind' = 'outside_hours' THEN
            FOR c IN
                SELECT alert_group_key(v_group, e.actor, e.actor_ip, e.resource_id, e.details) AS subject,
                       min(e.occurred_at) AS t_first, max(e.occurred_at) AS t_last,
                       count(*) AS n,
                       CASE WHEN count(DISTINCT e.org_id) = 1
                            THEN (array_agg(e.org_id))[1] ELSE v_nil END AS org
                  FROM audit_events e
                 WHERE e.id = ANY (v_ids) AND e.event_type = ANY (v_types)
                   AND alert_outside_hours(
                           e.occurred_at, (v_rule ->> 'tz_offset_min')::integer,
                           ARRAY(SELECT jsonb_array_elements_text(v_rule -> 'weekdays'))::integer[],
                           (v_rule ->> 'start_min')::integer, (v_rule ->> 'end_min')::integer)
                 GROUP BY 1
            LOOP
                CONTINUE WHEN c.subject IS NULL;
                v_id := alert_note(v_rule, left(c.subject, 256), c.org, c.t_first, c.t_last,
                                   c.n, c.n, jsonb_build_object('events', c.n,
                                                                'hours', v_rule -> 'hours'));
                IF v_id IS NOT NULL THEN
                    RETURN QUERY SELECT a.id, a.org_id, a.rule, a.severity, a.subject, a.count
                                   FROM security_alerts a WHERE a.id = v_id;
                END IF;
            END LOOP;
        END IF;
    END LOOP;

    INSERT INTO alert_marks AS m (org_id, seq)
    SELECT e.org_id, max(e.seq) FROM audit_events e WHERE e.id = ANY (v_ids) GROUP BY e.org_id
    ON CONFLICT (org_id) DO UPDATE SET seq = greatest(m.seq, excluded.seq);
END;
$$;

-- Claim up to p_limit alerts due for webhook delivery: each claim pushes
-- the alert's next attempt out by an exponential backoff, so concurrent
-- workers never send the same alert at once and failures are retried.
-- Alerts older than a day, or tried p_max_attempts times, are given up.
CREATE FUNCTION alert_claim_delivery(p_limit integer, p_max_attempts integer)
RETURNS TABLE (id uuid, payload text)
LANGUAGE sql AS $$
    WITH due AS (
        SELECT a.id FROM security_alerts a
         WHERE a.delivered_at IS NULL AND a.attempts < p_max_attempts
           AND a.created_at > clock_timestamp() - interval '1 day'
           AND (a.next_attempt_at IS NULL OR a.next_attempt_at <= clock_timestamp())
         ORDER BY a.created_at LIMIT p_limit
         FOR UPDATE SKIP LOCKED),
    claimed AS (
        UPDATE security_alerts a
           SET attempts = a.attempts + 1,
               next_attempt_at = clock_timestamp()
                   + make_interval(secs => least(3600, 2 * power(2, a.attempts)))
          FROM due WHERE a.id = due.id
        RETURNING a.*)
    SELECT c.id, json_build_object(
               'id', c.id, 'org_id', c.org_id, 'rule', c.rule, 'severity', c.severity,
               'subject', c.subject, 'count', c.count, 'details', c.details,
               'first_seen', audit_rfc3339(c.first_seen),
               'last_seen', audit_rfc3339(c.last_seen),
               'created_at', audit_rfc3339(c.created_at))::text
      FROM claimed c
$$;
