-- When each token was revoked (SQLite), so retention can delete revoked tokens a fixed
-- time after their revocation (TOKEN_RETENTION_DAYS). Set by triggers, so a revocation
-- by any process or by hand is dated; NULL while the token is active. Tokens revoked
-- before this migration are dated now: their retention starts today.

ALTER TABLE tokens ADD COLUMN revoked_at TEXT NULL;
UPDATE tokens SET revoked_at = strftime('%Y-%m-%dT%H:%M:%f000Z', 'now')
WHERE is_active = 0;
-- The purge finds revoked tokens by it; active tokens (NULL) stay out of the index.
CREATE INDEX tokens_revoked_at_idx ON tokens (revoked_at) WHERE revoked_at IS NOT NULL;

CREATE TRIGGER tokens_insert_revoked AFTER INSERT ON tokens
WHEN NEW.is_active = 0 AND NEW.revoked_at IS NULL BEGIN
    UPDATE tokens SET revoked_at = strftime('%Y-%m-%dT%H:%M:%f000Z', 'now')
    WHERE id = NEW.id;
END;
-- Only a change of is_active: revoking again keeps the first date, reactivating (by
-- hand) clears it.
CREATE TRIGGER tokens_update_revoked AFTER UPDATE OF is_active ON tokens
WHEN NEW.is_active <> OLD.is_active BEGIN
    UPDATE tokens
    SET revoked_at = CASE WHEN NEW.is_active = 0
        THEN strftime('%Y-%m-%dT%H:%M:%f000Z', 'now') END
    WHERE id = NEW.id;
END;
