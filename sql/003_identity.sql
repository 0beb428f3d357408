-- 003_identity: users, organizations and memberships, login sessions (refresh
-- token families), spent and live refresh tokens, revocations that every worker
-- must honour within a second, MFA state and backup codes.
--
-- Secrets are never stored in clear: passwords as argon2id PHC strings,
-- refresh tokens and backup codes as SHA-256 digests (they carry 256 and 50+
-- bits of entropy, so a fast hash cannot be brute-forced), TOTP secrets
-- encrypted by the daemon before they reach this table.

CREATE TABLE orgs (
    id                 uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    name               text        NOT NULL CHECK (length(name) BETWEEN 1 AND 255),
    rate_limit_per_min integer     CHECK (rate_limit_per_min > 0),  -- a higher tier, or NULL
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now()
);
CREATE TRIGGER orgs_touch BEFORE UPDATE ON orgs
    FOR EACH ROW EXECUTE FUNCTION cs_touch_updated_at();

CREATE TABLE users (
    id                uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    email             text        NOT NULL CHECK (email = lower(email) AND length(email) <= 254),
    name              text        NOT NULL DEFAULT '' CHECK (length(name) <= 255),
    password_hash     text,                          -- NULL: GitHub-only account
    github_id         bigint      UNIQUE,
    github_login      text,
    mfa_secret        text,                          -- encrypted; NULL until enrolled
    mfa_enabled       boolean     NOT NULL DEFAULT false,
    mfa_last_step     bigint      NOT NULL DEFAULT 0,  -- last TOTP step accepted (replay guard)
    pw_failures       integer     NOT NULL DEFAULT 0,
    pw_locked_until   timestamptz,
    mfa_failures      integer     NOT NULL DEFAULT 0,
    mfa_locked_until  timestamptz,
    last_login_at     timestamptz,
    deleted_at        timestamptz,                   -- soft delete: login refused from then on
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX users_email_idx ON users (email) WHERE deleted_at IS NULL;
CREATE TRIGGER users_touch BEFORE UPDATE ON users
    FOR EACH ROW EXECUTE FUNCTION cs_touch_updated_at();

CREATE TABLE memberships (
    org_id     uuid        NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    user_id    uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role       text        NOT NULL CHECK (role IN ('viewer', 'member', 'admin', 'owner')),
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, user_id)
);
CREATE INDEX memberships_user_idx ON memberships (user_id);

-- One login: the family every rotated refresh token of it belongs to.
CREATE TABLE sessions (
    id           uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id      uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    org_id       uuid        NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    method       text        NOT NULL CHECK (method IN ('password', 'github')),
    ip           text,
    user_agent   text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    revoked_at   timestamptz,
    revoke_reason text
);
CREATE INDEX sessions_user_idx ON sessions (user_id, created_at DESC);

CREATE TABLE refresh_tokens (
    token_hash   bytea       PRIMARY KEY,            -- SHA-256 of the opaque token
    session_id   uuid        NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    issued_at    timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    spent_at     timestamptz,                        -- rotated: presenting it again is reuse
    successor    bytea                               -- hash of the token that replaced it
);
CREATE INDEX refresh_tokens_session_idx ON refresh_tokens (session_id);

-- Revocations every worker mirrors in memory: a single access token (jti),
-- a whole session (sid), or every token of a user issued before a moment.
CREATE TABLE revocations (
    id         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind       text        NOT NULL CHECK (kind IN ('jti', 'sid', 'user')),
    value      uuid        NOT NULL,
    revoked_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    expires_at timestamptz NOT NULL                  -- after this no token it covers is valid
);
CREATE INDEX revocations_expiry_idx ON revocations (expires_at);

-- Announce a revocation to every worker of every instance.
CREATE FUNCTION cs_revocations_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('cs_revoke', NEW.id::text);
    RETURN NEW;
END;
$$;
CREATE TRIGGER revocations_notify AFTER INSERT ON revocations
    FOR EACH ROW EXECUTE FUNCTION cs_revocations_notify();

CREATE TABLE backup_codes (
    user_id   uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    code_hash text        NOT NULL,
    used_at   timestamptz,
    PRIMARY KEY (user_id, code_hash)
);
