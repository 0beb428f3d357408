-- 007_github: sign-in with GitHub (OAuth authorization-code flow with PKCE) and
-- the GitHub webhook receiver.
--
-- A GitHub account is linked to a CloudSweep user by GitHub's numeric user id,
-- never by email alone. The OAuth `state` is stored only as a SHA-256 digest,
-- together with the digest of the browser-binding cookie it was issued with;
-- the row is deleted when the callback consumes it (single use) and is dead
-- after ten minutes anyway. The PKCE verifier lives here for those ten minutes
-- at most: alone it is useless (the exchange also needs the one-time code and
-- the app's client secret). Webhook deliveries are recorded once by their
-- X-GitHub-Delivery id, so a replayed delivery has no effect.

CREATE TABLE github_identities (
    github_id  bigint      PRIMARY KEY CHECK (github_id > 0),
    user_id    uuid        NOT NULL UNIQUE REFERENCES users (id) ON DELETE CASCADE,
    login      text        NOT NULL CHECK (length(login) BETWEEN 1 AND 100),
    linked_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE github_oauth_states (
    state_hash    bytea       PRIMARY KEY,            -- SHA-256 of the state parameter
    binding_hash  bytea       NOT NULL,               -- SHA-256 of the cs_oauth cookie value
    code_verifier text        NOT NULL,               -- PKCE verifier (43 base64url chars)
    link_user_id  uuid        REFERENCES users (id) ON DELETE CASCADE, -- link, not login
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL
);
CREATE INDEX github_oauth_states_expiry_idx ON github_oauth_states (expires_at);

CREATE TABLE github_deliveries (
    delivery_id    text        PRIMARY KEY CHECK (length(delivery_id) BETWEEN 1 AND 100),
    event          text        NOT NULL CHECK (length(event) BETWEEN 1 AND 100),
    action         text        CHECK (length(action) <= 100),
    github_user_id bigint,                             -- the payload's sender, when any
    received_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX github_deliveries_received_idx ON github_deliveries (received_at);
