-- 006_mfa: what TOTP enrollment needs beyond the MFA columns of 003_identity.
--
-- users.mfa_secret holds a vault blob (envelope encryption, never the base32
-- secret). A blob is bound to (organization, record, field); a user may belong
-- to several organizations and the one their login picks can change, so the
-- organization the secret was sealed under is kept next to it. A secret with
-- mfa_enabled false is pending: enrolled, not yet confirmed by a first code.

ALTER TABLE users ADD COLUMN mfa_secret_org uuid;  -- the vault binding of mfa_secret
ALTER TABLE users ADD CONSTRAINT users_mfa_secret_org_chk
    CHECK (mfa_secret IS NULL OR mfa_secret_org IS NOT NULL);
ALTER TABLE users ADD CONSTRAINT users_mfa_enabled_chk
    CHECK (NOT mfa_enabled OR mfa_secret IS NOT NULL);
