-- 012: the daily cleanup cap holds across concurrent requests.
--
-- A cleanup claims each item (outcome.in_progress) before its first change in
-- AWS. The claim now also enforces cleanup_max_items_per_day: claims of one
-- organization are serialized by a transaction-scoped advisory lock, and the
-- count is taken after the lock is held (each statement of a volatile
-- function sees a fresh snapshot in READ COMMITTED), so requests racing on
-- several workers or instances never act on more than p_cap items of an
-- organization in 24 hours. An item counts once however often it is tried.
--
-- Answers 'claimed', 'limit' (the cap is reached) or 'busy' (another request
-- holds a live claim, or the item is no longer approved). A claim older than
-- 10 minutes (a worker that died mid-action) may be taken over.
CREATE FUNCTION cleanup_claim(p_item uuid, p_org uuid, p_by text, p_cap integer)
RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_used bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('cloudsweep.cleanup_claim'), hashtext(p_org::text));
    SELECT count(*) INTO v_used FROM waste_items
     WHERE org_id = p_org AND id <> p_item AND outcome ? 'attempted_at'
       AND (outcome->>'attempted_at')::timestamptz > now() - interval '1 day';
    IF v_used >= p_cap THEN
        RETURN 'limit';
    END IF;
    UPDATE waste_items
       SET outcome = jsonb_build_object('in_progress', true, 'by', p_by,
                                        'attempted_at', audit_rfc3339(now()))
     WHERE id = p_item AND org_id = p_org AND status = 'approved'
       AND NOT coalesce(outcome->>'in_progress' = 'true'
                        AND (outcome->>'attempted_at')::timestamptz
                            > now() - interval '10 minutes', false);
    RETURN CASE WHEN FOUND THEN 'claimed' ELSE 'busy' END;
END;
$$;
