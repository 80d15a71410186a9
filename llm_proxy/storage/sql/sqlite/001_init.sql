-- Initial schema (SQLite).
-- Times are ISO-8601 UTC text in one fixed-width format, 2025-01-31T12:00:00.000000Z,
-- so text comparison and ORDER BY give chronological order.
-- Booleans are 0/1 integers; metadata is a JSON object stored as text.

CREATE TABLE projects (
    id TEXT PRIMARY KEY NOT NULL,
    name TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    metadata TEXT NOT NULL DEFAULT '{}' CHECK (json_type(metadata) = 'object'),
    openai_api_key TEXT NOT NULL,              -- encrypted envelope, never plaintext
    api_key_hint TEXT NOT NULL DEFAULT '',
    is_active INTEGER NOT NULL DEFAULT 1 CHECK (is_active IN (0, 1)),
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    CONSTRAINT projects_name_key UNIQUE (name)
);

CREATE INDEX projects_created_at_idx ON projects (created_at, id);

CREATE TABLE tokens (
    id TEXT PRIMARY KEY NOT NULL,
    token TEXT NOT NULL,                       -- hex HMAC-SHA256 of the token value
    token_hint TEXT NOT NULL,
    project_id TEXT NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    expires_at TEXT NOT NULL,
    is_active INTEGER NOT NULL DEFAULT 1 CHECK (is_active IN (0, 1)),
    request_count INTEGER NOT NULL DEFAULT 0 CHECK (request_count >= 0),
    max_requests INTEGER NULL CHECK (max_requests >= 0),
    rate_limit_per_hour INTEGER NULL CHECK (rate_limit_per_hour >= 0),
    created_at TEXT NOT NULL,
    last_used_at TEXT NULL
);

-- Authentication looks tokens up by hash.
CREATE UNIQUE INDEX tokens_token_key ON tokens (token);
-- Admin pages: one project's tokens, optionally by status, newest first. Its leading
-- column also serves every lookup by project_id (cascade delete, revoke all).
CREATE INDEX tokens_project_status_created_idx
    ON tokens (project_id, is_active, created_at DESC, id);
-- The auth snapshot: active, unexpired tokens.
CREATE INDEX tokens_active_expires_idx ON tokens (is_active, expires_at);
-- Admin pages: all tokens, newest first.
CREATE INDEX tokens_created_at_idx ON tokens (created_at DESC, id);

CREATE TABLE meta (
    key TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);
