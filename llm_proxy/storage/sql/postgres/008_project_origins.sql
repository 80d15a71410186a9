-- Browser origins per project (PostgreSQL). `allowed_origins`: a JSON array of the
-- origins whose pages may use the project's tokens, in their canonical form
-- (`https://app.example.com`, `https://*.example.com`); empty: the server-wide
-- CORS_ALLOWED_ORIGINS apply. `require_origin`: its tokens are refused without an
-- `Origin` header (browser-only tokens). At most 32 origins, as the API checks. JSON,
-- as in SQLite, so both backends read and write the column alike.

ALTER TABLE projects ADD COLUMN allowed_origins JSONB NOT NULL DEFAULT '[]'
    CHECK (
        jsonb_typeof(allowed_origins) = 'array'
        AND jsonb_array_length(allowed_origins) <= 32
    );
ALTER TABLE projects ADD COLUMN require_origin BOOLEAN NOT NULL DEFAULT false;
