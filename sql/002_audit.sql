-- 002_audit: the tamper-evident audit trail.
--
-- Every organization has its own hash chain: each event stores the SHA-256
-- of the previous event's hash, a newline and the event's canonical text
-- (audit_canonical), so editing any column, deleting a row or re-ordering
-- rows breaks the chain that `GET /api/v1/audit/verify` recomputes.
-- Events that belong to no organization (failed logins of unknown emails,
-- anonymous rate limiting) use the nil UUID as their org_id and form one
-- chain of their own. audit_chain_heads holds each chain's last position;
-- audit_append locks that row, so writers of one organization are
-- serialized until their transaction commits, whatever worker or instance
-- they run in, and an event rolled back with its action leaves no gap.
-- audit_checkpoints holds Ed25519 signatures (made by the daemon, which
-- alone has the key) over chain heads, and retention anchors: signed
-- positions before which retention may delete events while verification
-- still starts from a trusted hash.
--
-- There are deliberately no foreign keys to users or organizations: audit
-- rows must outlive the accounts they mention.

CREATE TABLE audit_events (
    id            uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    org_id        uuid        NOT NULL,
    seq           bigint      NOT NULL CHECK (seq > 0),  -- position in the org's chain, from 1
    occurred_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    actor         text        NOT NULL,                  -- 'system' or a user id
    actor_ip      text,
    user_agent    text,
    request_id    text,
    event_type    text        NOT NULL,                  -- see doc/audit-events.md
    resource_type text,
    resource_id   text,
    action        text        NOT NULL,
    result        text        NOT NULL CHECK (result IN ('success', 'denied', 'error')),
    details       jsonb       NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(details) = 'object'),
    prev_hash     text        NOT NULL,                  -- hash of the event at seq - 1
    hash          text        NOT NULL,
    CONSTRAINT audit_events_org_seq_key UNIQUE (org_id, seq)
);

-- Listing (newest first, keyset on occurred_at and id) and its filters.
CREATE INDEX audit_events_org_time_idx ON audit_events (org_id, occurred_at DESC, id);
CREATE INDEX audit_events_org_type_idx ON audit_events (org_id, event_type, occurred_at DESC);
CREATE INDEX audit_events_org_actor_idx ON audit_events (org_id, actor, occurred_at DESC);

CREATE TABLE audit_chain_heads (
    org_id uuid   PRIMARY KEY,
    seq    bigint NOT NULL,  -- 0 before the first event
    hash   text   NOT NULL   -- 64 zeros before the first event
);

CREATE TABLE audit_checkpoints (
    id        bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    org_id    uuid        NOT NULL,
    kind      text        NOT NULL CHECK (kind IN ('head', 'retention')),
    seq       bigint      NOT NULL,
    hash      text        NOT NULL,
    signed_at timestamptz NOT NULL,
    signature text        NOT NULL,  -- base64 Ed25519 over org_id|seq|hash|signed_at
    key_id    text        NOT NULL,
    CONSTRAINT audit_checkpoints_org_kind_seq_key UNIQUE (org_id, kind, seq)
);

-- RFC 3339 UTC with microseconds: the form in which signed_at is signed,
-- and the one the API shows, so a client can check a signature as served.
CREATE FUNCTION audit_rfc3339(ts timestamptz) RETURNS text
LANGUAGE sql STABLE STRICT PARALLEL SAFE AS $$
    SELECT to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
$$;

-- The canonical text of an event: every column except hash, as one JSON
-- array. JSON strings make the encoding unambiguous whatever the values
-- hold (newlines, separators, NULL), jsonb renders details the same way
-- every time (keys sorted, fixed spacing), and the time is an integer of
-- epoch microseconds so no session setting (TimeZone, DateStyle) can
-- change it. Used both when appending and when verifying.
CREATE FUNCTION audit_canonical(e audit_events) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT jsonb_build_array(
        'cs-audit-v1',
        e.id, e.org_id, e.seq,
        (extract(epoch FROM e.occurred_at) * 1000000)::bigint,
        e.actor, e.actor_ip, e.user_agent, e.request_id,
        e.event_type, e.resource_type, e.resource_id, e.action, e.result,
        e.details, e.prev_hash)::text
$$;

-- Append one event to its organization's chain and return its id, seq and
-- hash. Must run in the caller's transaction (READ COMMITTED): the head row
-- stays locked until that transaction ends, which is what keeps the chain
-- linear when many workers and instances append at once.
CREATE FUNCTION audit_append(
    p_org_id        uuid,
    p_actor         text,
    p_actor_ip      text,
    p_user_agent    text,
    p_request_id    text,
    p_event_type    text,
    p_resource_type text,
    p_resource_id   text,
    p_action        text,
    p_result        text,
    p_details       jsonb)
RETURNS TABLE (id uuid, seq bigint, hash text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_head audit_chain_heads%ROWTYPE;
    v_ev   audit_events%ROWTYPE;
BEGIN
    IF p_org_id IS NULL OR p_event_type IS NULL OR p_event_type = '' THEN
        RAISE EXCEPTION 'audit_append: org_id and event_type are required'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    -- Create the head on first use; a concurrent creator makes us wait for
    -- its commit and then do nothing. Then lock it.
    INSERT INTO audit_chain_heads AS h (org_id, seq, hash)
    VALUES (p_org_id, 0, repeat('0', 64))
    ON CONFLICT (org_id) DO NOTHING;
    SELECT h.* INTO STRICT v_head
    FROM audit_chain_heads h WHERE h.org_id = p_org_id FOR UPDATE;

    v_ev.id            := gen_random_uuid();
    v_ev.org_id        := p_org_id;
    v_ev.seq           := v_head.seq + 1;
    v_ev.occurred_at   := clock_timestamp();  -- taken under the lock: time follows seq
    v_ev.actor         := coalesce(p_actor, 'system');
    v_ev.actor_ip      := p_actor_ip;
    v_ev.user_agent    := p_user_agent;
    v_ev.request_id    := p_request_id;
    v_ev.event_type    := p_event_type;
    v_ev.resource_type := p_resource_type;
    v_ev.resource_id   := p_resource_id;
    v_ev.action        := p_action;
    v_ev.result        := p_result;
    v_ev.details       := coalesce(p_details, '{}'::jsonb);
    v_ev.prev_hash     := v_head.hash;
    v_ev.hash          := encode(sha256(convert_to(
                              v_ev.prev_hash || E'\n' || audit_canonical(v_ev), 'UTF8')), 'hex');

    INSERT INTO audit_events (id, org_id, seq, occurred_at, actor, actor_ip, user_agent,
                              request_id, event_type, resource_type, resource_id, action,
                              result, details, prev_hash, hash)
    VALUES (v_ev.id, v_ev.org_id, v_ev.seq, v_ev.occurred_at, v_ev.actor, v_ev.actor_ip,
            v_ev.user_agent, v_ev.request_id, v_ev.event_type, v_ev.resource_type,
            v_ev.resource_id, v_ev.action, v_ev.result, v_ev.details, v_ev.prev_hash,
            v_ev.hash);
    UPDATE audit_chain_heads h SET seq = v_ev.seq, hash = v_ev.hash
    WHERE h.org_id = p_org_id;

    RETURN QUERY SELECT v_ev.id, v_ev.seq, v_ev.hash;
END;
$$;

-- Retention: delete at most p_limit of the org's events at or before its
-- latest retention anchor (oldest first) and return how many went. Call it
-- in a loop until it returns 0; verification starts from the anchor, so the
-- chain stays checkable while the batches run.
CREATE FUNCTION audit_prune(p_org_id uuid, p_limit integer) RETURNS bigint
LANGUAGE sql AS $$
    WITH anchor AS (
        SELECT max(c.seq) AS seq FROM audit_checkpoints c
        WHERE c.org_id = p_org_id AND c.kind = 'retention'
    ), doomed AS (
        SELECT e.id FROM audit_events e, anchor a
        WHERE e.org_id = p_org_id AND e.seq <= a.seq
        ORDER BY e.seq LIMIT p_limit
    ), gone AS (
        DELETE FROM audit_events e USING doomed d WHERE e.id = d.id RETURNING 1
    )
    SELECT count(*) FROM gone
$$;
