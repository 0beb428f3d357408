-- 010_scans: scan jobs, their units of work (one per AWS account x region),
-- and the waste items they find.
--
-- Units are the job queue: any worker of any instance claims queued (or
-- abandoned) units with scan_claim(), under a lease it must keep renewing;
-- every write a worker makes to a unit names the lease it holds, so a unit
-- whose lease was taken over can never be written by its old owner.
--
-- A scan's status, counters and errors are rolled up from its units by a
-- trigger in the same transaction as the unit change; every real change of a
-- scan row bumps its version and NOTIFYs cs_scan '<id>:<version>', which is
-- what wakes long polls on every worker. New units and finished units NOTIFY
-- cs_scan_work so idle workers claim at once instead of waiting for a poll.

CREATE TABLE scans (
    id                            uuid          PRIMARY KEY DEFAULT gen_random_uuid(),
    org_id                        uuid          NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    created_by                    uuid          REFERENCES users (id) ON DELETE SET NULL,
    status                        text          NOT NULL DEFAULT 'queued'
        CHECK (status IN ('queued', 'running', 'succeeded', 'partial', 'failed')),
    version                       bigint        NOT NULL DEFAULT 1,
    account_ids                   uuid[]        NOT NULL,
    regions                       text[],       -- as requested; NULL: each account's regions
    checks                        text[],       -- as requested; NULL: every check
    settings                      jsonb         NOT NULL DEFAULT '{}',  -- thresholds, defaults merged
    units_total                   integer       NOT NULL DEFAULT 0,
    units_done                    integer       NOT NULL DEFAULT 0,
    api_calls                     bigint        NOT NULL DEFAULT 0,
    items_found                   integer       NOT NULL DEFAULT 0,
    item_counts                   jsonb         NOT NULL DEFAULT '{}',  -- waste items by status
    estimated_monthly_savings_usd numeric(14,2) NOT NULL DEFAULT 0,     -- open + approved items
    errors                        jsonb         NOT NULL DEFAULT '[]',  -- [{unit_id, aws_account_id, region, check, code, message}]
    created_at                    timestamptz   NOT NULL DEFAULT now(),
    started_at                    timestamptz,
    finished_at                   timestamptz,
    updated_at                    timestamptz   NOT NULL DEFAULT now()
);
CREATE INDEX scans_org_idx ON scans (org_id, created_at DESC, id DESC);

CREATE TABLE scan_units (
    id               uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    scan_id          uuid        NOT NULL REFERENCES scans (id) ON DELETE CASCADE,
    org_id           uuid        NOT NULL,  -- copied from the scan for the per-org cap
    aws_account_id   uuid        NOT NULL,
    region           text        NOT NULL,
    status           text        NOT NULL DEFAULT 'queued'
        CHECK (status IN ('queued', 'running', 'succeeded', 'partial', 'failed')),
    lease_owner      text,                  -- "<pid>/<claim uuid>" of the holder, NULL when idle
    lease_expires_at timestamptz,
    attempts         integer     NOT NULL DEFAULT 0,
    heartbeat_at     timestamptz,
    api_calls        bigint      NOT NULL DEFAULT 0,
    items_found      integer     NOT NULL DEFAULT 0,
    errors           jsonb       NOT NULL DEFAULT '[]',  -- [{check, code, message}]
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    UNIQUE (scan_id, aws_account_id, region)
);
CREATE INDEX scan_units_queued_idx ON scan_units (created_at, id) WHERE status = 'queued';
CREATE INDEX scan_units_running_idx ON scan_units (lease_expires_at) WHERE status = 'running';

CREATE TABLE waste_items (
    id                         uuid          PRIMARY KEY DEFAULT gen_random_uuid(),
    org_id                     uuid          NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    scan_id                    uuid          NOT NULL REFERENCES scans (id) ON DELETE CASCADE,
    unit_id                    uuid          REFERENCES scan_units (id) ON DELETE SET NULL,
    aws_account_id             uuid          NOT NULL,
    region                     text          NOT NULL,
    type                       text          NOT NULL,   -- the check that found it
    resource_id                text          NOT NULL,
    details                    jsonb         NOT NULL DEFAULT '{}',
    estimated_monthly_cost_usd numeric(12,2) NOT NULL DEFAULT 0 CHECK (estimated_monthly_cost_usd >= 0),
    status                     text          NOT NULL DEFAULT 'open'
        CHECK (status IN ('open', 'approved', 'cleaned', 'failed', 'dismissed')),
    approved_by                uuid,
    approved_at                timestamptz,
    dismissed_by               uuid,
    dismissed_at               timestamptz,
    outcome                    jsonb,        -- set by cleanup
    aws_request_id             text,
    cleaned_at                 timestamptz,
    created_at                 timestamptz   NOT NULL DEFAULT now(),
    updated_at                 timestamptz   NOT NULL DEFAULT now(),
    UNIQUE (scan_id, aws_account_id, region, type, resource_id)
);
CREATE INDEX waste_items_org_idx ON waste_items (org_id, created_at DESC, id DESC);
CREATE INDEX waste_items_scan_idx ON waste_items (scan_id, status);
CREATE TRIGGER waste_items_touch BEFORE UPDATE ON waste_items
    FOR EACH ROW EXECUTE FUNCTION cs_touch_updated_at();

-- Tie units to accounts when the accounts table is there (it comes from another migration).
DO $$
BEGIN
    IF to_regclass('aws_accounts') IS NOT NULL THEN
        ALTER TABLE scan_units ADD CONSTRAINT scan_units_account_fk
            FOREIGN KEY (aws_account_id) REFERENCES aws_accounts (id) ON DELETE CASCADE;
    END IF;
END;
$$;

-- Every real change of a scan is a new version.
CREATE FUNCTION scan_bump_version() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.version := OLD.version + 1;
    NEW.updated_at := now();
    RETURN NEW;
END;
$$;
CREATE TRIGGER scans_version BEFORE UPDATE ON scans
    FOR EACH ROW WHEN (OLD.* IS DISTINCT FROM NEW.*) EXECUTE FUNCTION scan_bump_version();

CREATE FUNCTION scan_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('cs_scan', NEW.id::text || ':' || NEW.version::text);
    RETURN NULL;
END;
$$;
CREATE TRIGGER scans_notify AFTER INSERT OR UPDATE ON scans
    FOR EACH ROW EXECUTE FUNCTION scan_notify();

-- Recompute a scan from its units and items. The scan row is locked first so
-- that the aggregate below (a fresh snapshot in READ COMMITTED) sees every
-- unit change committed by concurrent workers before ours.
CREATE FUNCTION scan_rollup(p_scan uuid) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_total integer;
    v_done integer;
    v_running integer;
    v_failed integer;
    v_partial integer;
    v_calls bigint;
    v_items integer;
    v_status text;
BEGIN
    PERFORM 1 FROM scans WHERE id = p_scan FOR UPDATE;
    SELECT count(*),
           count(*) FILTER (WHERE status IN ('succeeded', 'partial', 'failed')),
           count(*) FILTER (WHERE status = 'running'),
           count(*) FILTER (WHERE status = 'failed'),
           count(*) FILTER (WHERE status = 'partial'),
           coalesce(sum(api_calls), 0), coalesce(sum(items_found), 0)
      INTO v_total, v_done, v_running, v_failed, v_partial, v_calls, v_items
      FROM scan_units WHERE scan_id = p_scan;
    v_status := CASE
        WHEN v_total > 0 AND v_done = v_total THEN
            CASE WHEN v_failed = v_total THEN 'failed'
                 WHEN v_failed > 0 OR v_partial > 0 THEN 'partial'
                 ELSE 'succeeded' END
        WHEN v_running > 0 OR v_done > 0 THEN 'running'
        ELSE 'queued' END;
    UPDATE scans s SET
        status = v_status,
        units_total = v_total,
        units_done = v_done,
        api_calls = v_calls,
        items_found = v_items,
        started_at = CASE WHEN v_status <> 'queued' THEN coalesce(s.started_at, now()) END,
        finished_at = CASE WHEN v_status IN ('succeeded', 'partial', 'failed')
                           THEN coalesce(s.finished_at, now()) END,
        errors = coalesce((SELECT jsonb_agg(e ORDER BY e->>'aws_account_id', e->>'region')
                             FROM (SELECT jsonb_build_object('unit_id', u.id,
                                          'aws_account_id', u.aws_account_id,
                                          'region', u.region) || x AS e
                                     FROM scan_units u, jsonb_array_elements(u.errors) x
                                    WHERE u.scan_id = p_scan LIMIT 200) errs), '[]'),
        item_counts = coalesce((SELECT jsonb_object_agg(w.status, w.n)
                                  FROM (SELECT status, count(*) AS n FROM waste_items
                                         WHERE scan_id = p_scan GROUP BY status) w), '{}'),
        estimated_monthly_savings_usd = coalesce((SELECT sum(estimated_monthly_cost_usd)
                                                    FROM waste_items WHERE scan_id = p_scan
                                                     AND status IN ('open', 'approved')), 0)
    WHERE s.id = p_scan;
END;
$$;

CREATE FUNCTION scan_unit_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM scan_rollup(NEW.scan_id);
    IF NEW.status IN ('succeeded', 'partial', 'failed') THEN
        PERFORM pg_notify('cs_scan_work', '');  -- capacity freed: claim the next units
    END IF;
    RETURN NULL;
END;
$$;
CREATE TRIGGER scan_units_rollup AFTER UPDATE ON scan_units FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status OR OLD.api_calls <> NEW.api_calls
          OR OLD.items_found <> NEW.items_found OR OLD.errors IS DISTINCT FROM NEW.errors)
    EXECUTE FUNCTION scan_unit_changed();

CREATE FUNCTION scan_units_queued() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('cs_scan_work', '');
    RETURN NULL;
END;
$$;
CREATE TRIGGER scan_units_work AFTER INSERT ON scan_units
    FOR EACH STATEMENT EXECUTE FUNCTION scan_units_queued();

CREATE FUNCTION waste_item_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM scan_rollup(NEW.scan_id);
    RETURN NULL;
END;
$$;
CREATE TRIGGER waste_items_rollup AFTER UPDATE ON waste_items FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION waste_item_changed();

-- Claim up to p_want units for lease owner p_owner, within the global and
-- per-organization caps on running units. Units whose lease ran out are taken
-- over (attempts + 1); those abandoned p_max_attempts times fail instead.
-- Claimers are serialized by a transaction-scoped advisory lock so the caps
-- hold exactly; SKIP LOCKED steps over units a lease holder is writing.
CREATE FUNCTION scan_claim(p_owner text, p_lease_s integer, p_want integer,
                           p_global_cap integer, p_org_cap integer, p_max_attempts integer)
RETURNS TABLE (unit_id uuid, scan_id uuid, org_id uuid, aws_account_id uuid, region text,
               attempts integer, checks text[], settings jsonb)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_running integer;
    v_room integer;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('cloudsweep.scan_claim'));
    UPDATE scan_units u SET status = 'failed', finished_at = now(), lease_owner = NULL,
           lease_expires_at = NULL,
           errors = u.errors || jsonb_build_array(jsonb_build_object(
               'check', NULL, 'code', 'abandoned',
               'message', format('the unit was abandoned %s times by workers that stopped',
                                 u.attempts)))
     WHERE u.status = 'running' AND u.lease_expires_at < now()
       AND u.attempts >= p_max_attempts;
    SELECT count(*) INTO v_running FROM scan_units u
     WHERE u.status = 'running' AND u.lease_expires_at >= now();
    v_room := least(p_want, p_global_cap - v_running);
    IF v_room <= 0 THEN
        RETURN;
    END IF;
    RETURN QUERY
    WITH busy AS (
        SELECT u.org_id, count(*) AS n FROM scan_units u
         WHERE u.status = 'running' AND u.lease_expires_at >= now() GROUP BY u.org_id
    ), ranked AS (
        SELECT u.id, u.org_id, u.created_at,
               row_number() OVER (PARTITION BY u.org_id ORDER BY u.created_at, u.id) AS rn
          FROM scan_units u
         WHERE u.status = 'queued' OR (u.status = 'running' AND u.lease_expires_at < now())
    ), cand AS (
        SELECT r.id FROM ranked r LEFT JOIN busy b ON b.org_id = r.org_id
         WHERE r.rn <= p_org_cap - coalesce(b.n, 0)
         ORDER BY r.created_at, r.id LIMIT v_room
    ), locked AS (
        SELECT u.id FROM scan_units u
         WHERE u.id IN (SELECT c.id FROM cand c)
           AND (u.status = 'queued' OR (u.status = 'running' AND u.lease_expires_at < now()))
           FOR UPDATE SKIP LOCKED
    )
    UPDATE scan_units u SET status = 'running', lease_owner = p_owner,
           lease_expires_at = now() + make_interval(secs => p_lease_s),
           attempts = u.attempts + 1, heartbeat_at = now(),
           started_at = coalesce(u.started_at, now())
      FROM locked l, scans s
     WHERE u.id = l.id AND s.id = u.scan_id
    RETURNING u.id, u.scan_id, u.org_id, u.aws_account_id, u.region, u.attempts, s.checks,
              s.settings;
END;
$$;
