-- When each token was revoked (PostgreSQL), so retention can delete revoked tokens a
-- fixed time after their revocation (TOKEN_RETENTION_DAYS). Set by a trigger, so a
-- revocation by any process or by hand is dated; NULL while the token is active.
-- Tokens revoked before this migration are dated now: their retention starts today.

ALTER TABLE tokens ADD COLUMN revoked_at TIMESTAMPTZ NULL;
UPDATE tokens SET revoked_at = now() WHERE NOT is_active;
-- The purge finds revoked tokens by it; active tokens (NULL) stay out of the index.
CREATE INDEX tokens_revoked_at_idx ON tokens (revoked_at) WHERE revoked_at IS NOT NULL;

-- Revoking again keeps the first date; reactivating (by hand) clears it.
CREATE FUNCTION mark_revocation() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.is_active THEN
        NEW.revoked_at := NULL;
    ELSIF TG_OP = 'INSERT' OR OLD.is_active THEN
        NEW.revoked_at := coalesce(NEW.revoked_at, now());
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER tokens_mark_revocation BEFORE INSERT OR UPDATE OF is_active ON tokens
    FOR EACH ROW EXECUTE FUNCTION mark_revocation();
