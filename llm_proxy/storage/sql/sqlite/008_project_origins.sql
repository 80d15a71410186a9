-- Browser origins per project (SQLite). `allowed_origins`: a JSON array of the origins
-- whose pages may use the project's tokens, in their canonical form
-- (`https://app.example.com`, `https://*.example.com`); empty: the server-wide
-- CORS_ALLOWED_ORIGINS apply. `require_origin`: its tokens are refused without an
-- `Origin` header (browser-only tokens). At most 32 origins, as the API checks.

ALTER TABLE projects ADD COLUMN allowed_origins TEXT NOT NULL DEFAULT '[]'
    CHECK (json_type(allowed_origins) = 'array' AND json_array_length(allowed_origins) <= 32);
ALTER TABLE projects ADD COLUMN require_origin INTEGER NOT NULL DEFAULT 0
    CHECK (require_origin IN (0, 1));
