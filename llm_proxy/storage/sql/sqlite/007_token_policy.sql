-- Per-token policy and its project defaults (SQLite): JSON text of what the policy
-- narrows (bound header metadata, allowed model globs, an output-token cap, no
-- streaming), NULL when it narrows nothing. The proxy reads it only at reload, into
-- its in-memory token table; nothing queries inside it.

ALTER TABLE projects ADD COLUMN policy TEXT NULL;
ALTER TABLE tokens ADD COLUMN policy TEXT NULL;
