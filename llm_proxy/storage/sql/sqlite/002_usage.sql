-- Per-request usage events (SQLite), written in batches by the usage recorder and
-- read by the admin pages. Times use the fixed-width UTC text of 001_init.sql.
-- No foreign keys: history outlives deleted projects and tokens.

CREATE TABLE usage_events (
    event_id TEXT PRIMARY KEY NOT NULL,        -- inserts are idempotent on it
    ts TEXT NOT NULL,
    project_id TEXT NULL,
    token_id TEXT NULL,
    endpoint TEXT NOT NULL,
    method TEXT NOT NULL,
    model TEXT NULL,
    status_code INTEGER NOT NULL,
    duration_ms REAL NOT NULL,
    prompt_tokens INTEGER NULL,
    completion_tokens INTEGER NULL,
    total_tokens INTEGER NULL,
    usage_source TEXT NULL
);

CREATE INDEX usage_events_project_ts_idx ON usage_events (project_id, ts);
CREATE INDEX usage_events_token_ts_idx ON usage_events (token_id, ts);
CREATE INDEX usage_events_ts_idx ON usage_events (ts);
