-- Initial schema (PostgreSQL).

CREATE TABLE projects (
    id UUID PRIMARY KEY,
    name TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    metadata JSONB NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(metadata) = 'object'),
    openai_api_key TEXT NOT NULL,              -- encrypted envelope, never plaintext
    api_key_hint TEXT NOT NULL DEFAULT '',
    is_active BOOLEAN NOT NULL DEFAULT true,
    created_at TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL,
    CONSTRAINT projects_name_key UNIQUE (name)
);

CREATE INDEX projects_created_at_idx ON projects (created_at, id);

CREATE TABLE tokens (
    id UUID PRIMARY KEY,
    token TEXT NOT NULL,                       -- hex HMAC-SHA256 of the token value
    token_hint TEXT NOT NULL,
    project_id UUID NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    expires_at TIMESTAMPTZ NOT NULL,
    is_active BOOLEAN NOT NULL DEFAULT true,
    request_count BIGINT NOT NULL DEFAULT 0 CHECK (request_count >= 0),
    max_requests INTEGER NULL CHECK (max_requests >= 0),
    rate_limit_per_hour INTEGER NULL CHECK (rate_limit_per_hour >= 0),
    created_at TIMESTAMPTZ NOT NULL,
    last_used_at TIMESTAMPTZ NULL
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
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
