-- 011_scan_rollup: incremental scan progress.
--
-- 010 recomputed a scan from all of its units and items, under the scan row's
-- lock, on every unit write (heartbeats included) and every item change, so
-- every worker serialized on the scan row for work that grew with the scan.
-- Now:
--   * heartbeats never touch the scan (a unit's api_calls reach the scan when
--     the unit finishes);
--   * a unit claimed from the queue makes a queued scan running;
--   * a unit finishing adds its deltas (units_done, api_calls, items_found,
--     item counts, savings of its items, its errors up to 200 in all) to the
--     scan in one UPDATE; the unit that finishes the scan recounts it from
--     scratch instead (the final status, totals and errors in their order);
--   * a finished unit that changes again (never done by the executor) and a
--     scan status transition are recounted by scan_rollup() from 010;
--   * an item status change recounts the items of its scan once per statement.
-- Every real change of a scan still bumps its version and NOTIFYs cs_scan
-- (the triggers of 010 on scans are unchanged).

DROP TRIGGER scan_units_rollup ON scan_units;
DROP TRIGGER waste_items_rollup ON waste_items;
DROP FUNCTION scan_unit_changed();
DROP FUNCTION waste_item_changed();

-- A finishing unit sums its own items.
CREATE INDEX waste_items_unit_idx ON waste_items (unit_id);

-- Per-status counts plus per-status deltas; statuses that reach 0 disappear,
-- as they do in the recount.
CREATE FUNCTION scan_counts_add(p_counts jsonb, p_delta jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce(jsonb_object_agg(k, n) FILTER (WHERE n <> 0), '{}')
      FROM (SELECT k, sum(v::bigint) AS n
              FROM (SELECT key AS k, value AS v FROM jsonb_each_text(p_counts)
                    UNION ALL
                    SELECT key, value FROM jsonb_each_text(p_delta)) x
             GROUP BY k) y;
$$;

CREATE FUNCTION scan_unit_progress() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_was_done boolean := OLD.status IN ('succeeded', 'partial', 'failed');
    v_done boolean := NEW.status IN ('succeeded', 'partial', 'failed');
    v_units_done integer;
    v_units_total integer;
    v_counts jsonb;
    v_usd numeric;
BEGIN
    IF v_done AND NOT v_was_done THEN
        -- Lock the scan first: whoever brings units_done to units_total then
        -- sees every other finished unit committed (a fresh snapshot below).
        SELECT units_done, units_total INTO v_units_done, v_units_total
          FROM scans WHERE id = NEW.scan_id FOR UPDATE;
        IF v_units_done + 1 >= v_units_total THEN
            PERFORM scan_rollup(NEW.scan_id);
        ELSE
            SELECT coalesce(jsonb_object_agg(w.status, w.n), '{}'), coalesce(sum(w.usd), 0)
              INTO v_counts, v_usd
              FROM (SELECT status, count(*) AS n,
                           sum(estimated_monthly_cost_usd)
                               FILTER (WHERE status IN ('open', 'approved')) AS usd
                      FROM waste_items WHERE unit_id = NEW.id GROUP BY status) w;
            UPDATE scans s SET
                status = CASE WHEN s.status = 'queued' THEN 'running' ELSE s.status END,
                started_at = coalesce(s.started_at, now()),
                units_done = s.units_done + 1,
                api_calls = s.api_calls + NEW.api_calls,
                items_found = s.items_found + NEW.items_found,
                item_counts = CASE WHEN v_counts = '{}' THEN s.item_counts
                                   ELSE scan_counts_add(s.item_counts, v_counts) END,
                estimated_monthly_savings_usd = s.estimated_monthly_savings_usd + v_usd,
                errors = CASE WHEN jsonb_array_length(NEW.errors) = 0
                                   OR jsonb_array_length(s.errors) >= 200 THEN s.errors
                              ELSE s.errors || coalesce((
                                  SELECT jsonb_agg(jsonb_build_object(
                                             'unit_id', NEW.id,
                                             'aws_account_id', NEW.aws_account_id,
                                             'region', NEW.region) || x.e ORDER BY x.i)
                                    FROM jsonb_array_elements(NEW.errors)
                                         WITH ORDINALITY AS x(e, i)
                                   WHERE x.i <= 200 - jsonb_array_length(s.errors)), '[]')
                         END
             WHERE s.id = NEW.scan_id;
        END IF;
        PERFORM pg_notify('cs_scan_work', '');  -- capacity freed: claim the next units
    ELSIF v_was_done THEN
        PERFORM scan_rollup(NEW.scan_id);  -- a finished unit changed: recount
    ELSIF NEW.status = 'running' THEN
        -- Only a queued scan changes; a running one is not even locked.
        UPDATE scans SET status = 'running', started_at = coalesce(started_at, now())
         WHERE id = NEW.scan_id AND status = 'queued';
    END IF;
    RETURN NULL;
END;
$$;
CREATE TRIGGER scan_units_progress AFTER UPDATE ON scan_units FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status
          OR (OLD.status IN ('succeeded', 'partial', 'failed')
              AND (OLD.api_calls <> NEW.api_calls OR OLD.items_found <> NEW.items_found
                   OR OLD.errors IS DISTINCT FROM NEW.errors)))
    EXECUTE FUNCTION scan_unit_progress();

-- Item status changes (approvals, dismissals, cleanups: people's actions, not
-- the scan's hot path) recount the scan's items, once per scan per statement,
-- with waste_items_scan_idx, as 010 did.
CREATE FUNCTION waste_items_progress() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE scans s SET
        item_counts = coalesce((SELECT jsonb_object_agg(w.status, w.n)
                                  FROM (SELECT status, count(*) AS n FROM waste_items
                                         WHERE scan_id = s.id GROUP BY status) w), '{}'),
        estimated_monthly_savings_usd = coalesce((SELECT sum(estimated_monthly_cost_usd)
                                                    FROM waste_items WHERE scan_id = s.id
                                                     AND status IN ('open', 'approved')), 0)
      FROM (SELECT DISTINCT n.scan_id FROM new_items n JOIN old_items o ON o.id = n.id
             WHERE o.status IS DISTINCT FROM n.status ORDER BY n.scan_id) d
     WHERE s.id = d.scan_id;
    RETURN NULL;
END;
$$;
CREATE TRIGGER waste_items_progress AFTER UPDATE ON waste_items
    REFERENCING OLD TABLE AS old_items NEW TABLE AS new_items
    FOR EACH STATEMENT EXECUTE FUNCTION waste_items_progress();
