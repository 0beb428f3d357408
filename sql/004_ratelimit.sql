-- 004_ratelimit: request rate limits and login IP blocks shared by every
-- worker of every instance (see include/cloudsweep/ratelimit.h).
--
-- Token buckets live in rate_buckets, one row per key ("ip:...", "user:...",
-- "global"). rl_take refills a bucket by the time elapsed on the database
-- server's clock (one clock for all instances), grants what it can and
-- debits it in a single INSERT ... ON CONFLICT DO UPDATE, so concurrent
-- callers queue on the row lock and can never grant the same token twice.
-- Workers take small leases of tokens (p_want > 1) and spend them locally.
--
-- Five failed logins from an address within the window block it for a
-- while: rl_login_failed records the failure and creates the block under a
-- per-address transaction-scoped advisory lock, so failures recorded at the
-- same moment by several workers create exactly one block. Blocks lift by
-- time alone (expires_at); rl_purge removes old rows and is optional.
--
-- No foreign keys: these tables mention addresses and opaque keys only.

-- UNLOGGED on purpose: every request may update a bucket, and the state is
-- worth nothing after a crash (the buckets then start full again, as they
-- do after an idle period) or on a promoted standby. Skipping WAL keeps the
-- hot path cheap. fillfactor leaves room for HOT updates of the same row.
CREATE UNLOGGED TABLE rate_buckets (
    key          text             PRIMARY KEY CHECK (length(key) BETWEEN 1 AND 256),
    tokens       double precision NOT NULL,  -- tokens left at updated_at
    updated_at   timestamptz      NOT NULL,
    last_granted integer          NOT NULL DEFAULT 0  -- what the latest rl_take granted
) WITH (fillfactor = 70);

CREATE INDEX rate_buckets_updated_idx ON rate_buckets (updated_at);

-- Tokens in a bucket after refilling from t_then to t_now, capped at burst.
-- A clock that steps back refills nothing rather than draining the bucket.
CREATE FUNCTION rl_refill(p_tokens double precision, p_then timestamptz, p_now timestamptz,
                          p_rate_per_min double precision, p_burst double precision)
RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT least(p_burst,
                 p_tokens + greatest(0, extract(epoch FROM p_now - p_then)) * p_rate_per_min / 60)
$$;

-- Take up to p_want tokens from bucket p_key (created full). granted is what
-- was taken (0..p_want); retry_after_ms is how long until one more token is
-- in the bucket (0 when one is there now), so a caller that got less than it
-- asked for knows when to come back.
CREATE FUNCTION rl_take(p_key text, p_rate_per_min double precision, p_burst double precision,
                        p_want integer)
RETURNS TABLE (granted integer, retry_after_ms integer)
LANGUAGE plpgsql AS $$
DECLARE
    v_tokens double precision;
BEGIN
    IF p_key IS NULL OR p_rate_per_min IS NULL OR p_rate_per_min <= 0
       OR p_burst IS NULL OR p_burst < 1 OR p_want IS NULL OR p_want < 0 OR p_want > 10000 THEN
        RAISE EXCEPTION 'rl_take: invalid arguments' USING ERRCODE = '22023';
    END IF;
    INSERT INTO rate_buckets AS b (key, tokens, updated_at, last_granted)
    VALUES (p_key, p_burst - least(p_want, floor(p_burst)), clock_timestamp(),
            least(p_want, floor(p_burst))::integer)
    ON CONFLICT (key) DO UPDATE SET
        last_granted = least(p_want, floor(rl_refill(b.tokens, b.updated_at,
                                                      excluded.updated_at, p_rate_per_min,
                                                      p_burst)))::integer,
        tokens = rl_refill(b.tokens, b.updated_at, excluded.updated_at, p_rate_per_min, p_burst)
                 - least(p_want, floor(rl_refill(b.tokens, b.updated_at, excluded.updated_at,
                                                 p_rate_per_min, p_burst))),
        updated_at = excluded.updated_at
    RETURNING b.last_granted, b.tokens INTO granted, v_tokens;
    retry_after_ms := CASE WHEN v_tokens >= 1 THEN 0
                           ELSE least(2147483647,
                                      ceil((1 - v_tokens) * 60000 / p_rate_per_min))::integer END;
    RETURN NEXT;
END;
$$;

-- One row per failed login; only the recent ones matter.
CREATE TABLE login_failures (
    ip inet        NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE INDEX login_failures_ip_at_idx ON login_failures (ip, at);
CREATE INDEX login_failures_at_idx ON login_failures (at);

-- Blocks past and present; a block is active while expires_at is ahead.
CREATE TABLE ip_blocks (
    id         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    ip         inet        NOT NULL,
    scope      text        NOT NULL DEFAULT 'login' CHECK (scope IN ('login')),
    blocked_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    expires_at timestamptz NOT NULL,
    reason     text        NOT NULL CHECK (length(reason) <= 200),
    failures   integer     NOT NULL DEFAULT 0,
    CHECK (expires_at >= blocked_at)
);

CREATE INDEX ip_blocks_ip_expires_idx ON ip_blocks (ip, scope, expires_at);
CREATE INDEX ip_blocks_expires_idx ON ip_blocks (expires_at);

-- Expiry of the active login block of p_ip, or NULL.
CREATE FUNCTION rl_ip_blocked(p_ip inet) RETURNS timestamptz
LANGUAGE sql STABLE AS $$
    SELECT max(expires_at) FROM ip_blocks
    WHERE ip = p_ip AND scope = 'login' AND expires_at > clock_timestamp()
$$;

-- Record a failed login from p_ip. When p_threshold failures fall within
-- p_window (counting none from before the latest block ended; failures while
-- blocked are not recorded, which also bounds the table under attack), block the address
-- for p_block. blocked tells whether the address is blocked now, expires_at
-- until when, created whether this call created the block (exactly one call
-- does, so the caller can audit it once).
CREATE FUNCTION rl_login_failed(p_ip inet, p_threshold integer, p_window interval,
                                p_block interval)
RETURNS TABLE (blocked boolean, expires_at timestamptz, created boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_now    timestamptz;
    v_last   timestamptz;
    v_count  integer;
BEGIN
    IF p_ip IS NULL OR p_threshold IS NULL OR p_threshold < 1 OR p_window IS NULL
       OR p_window <= interval '0' OR p_block IS NULL OR p_block <= interval '0' THEN
        RAISE EXCEPTION 'rl_login_failed: invalid arguments' USING ERRCODE = '22023';
    END IF;
    -- Serialize recorders of the same address until commit; every later
    -- statement takes a fresh snapshot and so sees what the previous holder
    -- committed. A hash collision only serializes two unrelated addresses.
    PERFORM pg_advisory_xact_lock(1919117164, hashtext(p_ip::text));
    v_now := clock_timestamp();
    SELECT max(b.expires_at) INTO v_last FROM ip_blocks b
     WHERE b.ip = p_ip AND b.scope = 'login';
    IF v_last > v_now THEN
        -- Already blocked (a login that raced the block): nothing to count.
        blocked := true; expires_at := v_last; created := false;
        RETURN NEXT;
        RETURN;
    END IF;
    INSERT INTO login_failures (ip, at) VALUES (p_ip, v_now);
    -- Failures from before the latest block ended were paid for by it.
    SELECT count(*) INTO v_count FROM login_failures f
     WHERE f.ip = p_ip AND f.at > v_now - p_window
       AND f.at > coalesce(v_last, '-infinity'::timestamptz);
    IF v_count >= p_threshold THEN
        INSERT INTO ip_blocks (ip, scope, blocked_at, expires_at, reason, failures)
        VALUES (p_ip, 'login', v_now, v_now + p_block, 'too_many_failed_logins', v_count)
        RETURNING ip_blocks.expires_at INTO expires_at;
        blocked := true; created := true;
    ELSE
        blocked := false; expires_at := NULL; created := false;
    END IF;
    RETURN NEXT;
END;
$$;

-- Lift the active login blocks of p_ip now (an administrator's decision);
-- the number lifted. The rows stay as history.
CREATE FUNCTION rl_unblock(p_ip inet) RETURNS integer
LANGUAGE sql AS $$
    WITH u AS (
        UPDATE ip_blocks SET expires_at = greatest(blocked_at, clock_timestamp())
        WHERE ip = p_ip AND scope = 'login' AND expires_at > clock_timestamp()
        RETURNING 1)
    SELECT count(*)::integer FROM u
$$;

-- Active blocks as one JSON array, newest first, at most p_limit of them
-- (RFC 3339 UTC times), ready for the admin API.
CREATE FUNCTION rl_blocks_json(p_limit integer) RETURNS json
LANGUAGE sql STABLE AS $$
    SELECT coalesce(json_agg(json_build_object(
               'ip', abbrev(b.ip),
               'scope', b.scope,
               'blocked_at', to_char(b.blocked_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'),
               'expires_at', to_char(b.expires_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'),
               'reason', b.reason,
               'failures', b.failures) ORDER BY b.blocked_at DESC, b.id DESC), '[]'::json)
    FROM (SELECT * FROM ip_blocks
          WHERE expires_at > clock_timestamp()
          ORDER BY blocked_at DESC, id DESC
          LIMIT greatest(0, least(p_limit, 10000))) b
$$;

-- Delete what no longer matters: failures older than p_failures, blocks
-- expired more than p_blocks ago, buckets idle longer than p_buckets (an
-- idle bucket refills to full, which is what a missing row means, provided
-- p_buckets is at least burst / rate for every bucket). Rows deleted.
CREATE FUNCTION rl_purge(p_failures interval, p_blocks interval, p_buckets interval)
RETURNS bigint
LANGUAGE sql AS $$
    WITH f AS (DELETE FROM login_failures WHERE at < clock_timestamp() - p_failures RETURNING 1),
         b AS (DELETE FROM ip_blocks WHERE expires_at < clock_timestamp() - p_blocks RETURNING 1),
         k AS (DELETE FROM rate_buckets WHERE updated_at < clock_timestamp() - p_buckets
               RETURNING 1)
    SELECT (SELECT count(*) FROM f) + (SELECT count(*) FROM b) + (SELECT count(*) FROM k)
$$;
