-- How long the response cache may keep a project's answers, in seconds (PostgreSQL).
-- NULL: only what a client asks for (Cache-Control: max-age); 0: never cached.

ALTER TABLE projects ADD COLUMN cache_ttl_seconds INTEGER NULL
    CHECK (cache_ttl_seconds >= 0);
