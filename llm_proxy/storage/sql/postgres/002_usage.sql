-- Per-request usage events (PostgreSQL), written in batches by the usage recorder and
-- read by the admin pages. No foreign keys: history outlives deleted projects and
-- tokens.

CREATE TABLE usage_events (
    event_id TEXT PRIMARY KEY,                 -- inserts are idempotent on it
    ts TIMESTAMPTZ NOT NULL,
    project_id UUID NULL,
    token_id UUID NULL,
    endpoint TEXT NOT NULL,
    method TEXT NOT NULL,
    model TEXT NULL,
    status_code INTEGER NOT NULL,
    duration_ms DOUBLE PRECISION NOT NULL,
    prompt_tokens INTEGER NULL,
    completion_tokens INTEGER NULL,
    total_tokens INTEGER NULL,
    usage_source TEXT NULL
);

CREATE INDEX usage_events_project_ts_idx ON usage_events (project_id, ts);
CREATE INDEX usage_events_token_ts_idx ON usage_events (token_id, ts);
CREATE INDEX usage_events_ts_idx ON usage_events (ts);
