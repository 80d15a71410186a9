-- Per-project and per-token caps on calls in flight (SQLite). NULL: the process-wide
-- default (PROJECT_MAX_CONCURRENT, TOKEN_MAX_CONCURRENT) applies.

ALTER TABLE projects ADD COLUMN max_concurrent INTEGER NULL CHECK (max_concurrent >= 1);
ALTER TABLE tokens ADD COLUMN max_concurrent INTEGER NULL CHECK (max_concurrent >= 1);
