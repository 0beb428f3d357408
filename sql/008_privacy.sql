-- 008_privacy: invitations to an organization, email changes awaiting
-- re-verification, and the tombstone state of accounts whose personal data
-- was purged.
--
-- Invitation and verification tokens are 256-bit random strings stored only
-- as their SHA-256 (hex): a fast hash is enough for that much entropy, and
-- a database dump reveals no usable token. An account deleted by its user
-- keeps its row (deleted_at set) until the purge job scrubs the personal
-- columns and sets purged_at; the row then stays as a tombstone so the
-- user id that audit rows name keeps pointing at something that holds
-- nothing personal.

CREATE TABLE org_invitations (
    id          uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    org_id      uuid        NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    email       text        NOT NULL CHECK (email = lower(email) AND length(email) <= 254),
    role        text        NOT NULL CHECK (role IN ('viewer', 'member', 'admin', 'owner')),
    token_hash  text        NOT NULL UNIQUE,             -- hex SHA-256 of the invite token
    invited_by  uuid        REFERENCES users (id) ON DELETE SET NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    accepted_at timestamptz
);
-- One open invitation per address and organization: inviting again replaces it.
CREATE UNIQUE INDEX org_invitations_open_idx ON org_invitations (org_id, email)
    WHERE accepted_at IS NULL;

ALTER TABLE users
    ADD COLUMN pending_email            text CHECK (pending_email = lower(pending_email)
                                                    AND length(pending_email) <= 254),
    ADD COLUMN pending_email_token_hash text,      -- hex SHA-256 of the verification token
    ADD COLUMN pending_email_expires_at timestamptz,
    ADD COLUMN purged_at                timestamptz;  -- personal data hard-deleted

-- The purge job's scan: deleted accounts not yet purged, oldest first.
CREATE INDEX users_purge_idx ON users (deleted_at) WHERE deleted_at IS NOT NULL
    AND purged_at IS NULL;
