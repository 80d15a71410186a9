-- The audit trail (SQLite): management and admin actions and refused sign-ins,
-- written in batches by the audit recorder, read by /manage/audit and the admin audit
-- page, deleted after AUDIT_RETENTION_DAYS. No foreign keys: the trail outlives the
-- projects and tokens it names (and names ids that never existed, when refused).
-- Times are fixed-width ISO-8601 UTC text, so text order is time order.

CREATE TABLE audit_events (
    id TEXT PRIMARY KEY NOT NULL,              -- inserts are idempotent on it
    ts TEXT NOT NULL,
    action TEXT NOT NULL,
    actor TEXT NOT NULL,
    outcome TEXT NOT NULL,
    client_ip TEXT NULL,
    request_id TEXT NULL,
    project_id TEXT NULL,
    token_id TEXT NULL,
    reason TEXT NULL,
    metadata TEXT NOT NULL DEFAULT '{}'        -- a JSON object, never a secret
);

-- Listings are newest first, filtered by one of these (the id breaks ties).
CREATE INDEX audit_events_ts_idx ON audit_events (ts, id);
CREATE INDEX audit_events_action_ts_idx ON audit_events (action, ts);
CREATE INDEX audit_events_actor_ts_idx ON audit_events (actor, ts);
CREATE INDEX audit_events_outcome_ts_idx ON audit_events (outcome, ts);
CREATE INDEX audit_events_project_ts_idx ON audit_events (project_id, ts);
CREATE INDEX audit_events_token_ts_idx ON audit_events (token_id, ts);
