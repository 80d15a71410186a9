-- Change markers for the proxy's incremental token-table reload (SQLite).
-- Every insert or update of a token or project stamps the row with the next value of
-- one counter, and every delete leaves a tombstone in `deletions` stamped the same way,
-- so a reader asks "what changed at or after mark M". SQLite has one writer at a time
-- and the counter is bumped inside the writing transaction, so commits happen in mark
-- order: nothing committed later can carry a smaller mark than one already visible.

CREATE TABLE change_counter (
    id INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
    seq INTEGER NOT NULL
);
INSERT INTO change_counter (id, seq) VALUES (1, 0);

ALTER TABLE tokens ADD COLUMN change_seq INTEGER NOT NULL DEFAULT 0;
ALTER TABLE projects ADD COLUMN change_seq INTEGER NOT NULL DEFAULT 0;
CREATE INDEX tokens_change_seq_idx ON tokens (change_seq, id);
CREATE INDEX projects_change_seq_idx ON projects (change_seq, id);

-- Tombstones: an incremental reload cannot see a deleted row. Purged after a day.
CREATE TABLE deletions (
    kind TEXT NOT NULL CHECK (kind IN ('token', 'project')),
    id TEXT NOT NULL,
    change_seq INTEGER NOT NULL,
    deleted_at TEXT NOT NULL
);
CREATE INDEX deletions_change_seq_idx ON deletions (change_seq, id);
CREATE INDEX deletions_deleted_at_idx ON deletions (deleted_at);

-- The inner UPDATE changes change_seq, so the WHEN clause stops any recursion.
CREATE TRIGGER tokens_insert_mark AFTER INSERT ON tokens BEGIN
    UPDATE change_counter SET seq = seq + 1 WHERE id = 1;
    UPDATE tokens SET change_seq = (SELECT seq FROM change_counter WHERE id = 1)
    WHERE id = NEW.id;
END;
CREATE TRIGGER tokens_update_mark AFTER UPDATE ON tokens
WHEN NEW.change_seq = OLD.change_seq BEGIN
    UPDATE change_counter SET seq = seq + 1 WHERE id = 1;
    UPDATE tokens SET change_seq = (SELECT seq FROM change_counter WHERE id = 1)
    WHERE id = NEW.id;
END;
CREATE TRIGGER projects_insert_mark AFTER INSERT ON projects BEGIN
    UPDATE change_counter SET seq = seq + 1 WHERE id = 1;
    UPDATE projects SET change_seq = (SELECT seq FROM change_counter WHERE id = 1)
    WHERE id = NEW.id;
END;
CREATE TRIGGER projects_update_mark AFTER UPDATE ON projects
WHEN NEW.change_seq = OLD.change_seq BEGIN
    UPDATE change_counter SET seq = seq + 1 WHERE id = 1;
    UPDATE projects SET change_seq = (SELECT seq FROM change_counter WHERE id = 1)
    WHERE id = NEW.id;
END;
-- Cascaded deletes (a project's tokens) fire these too.
CREATE TRIGGER tokens_delete_mark AFTER DELETE ON tokens BEGIN
    UPDATE change_counter SET seq = seq + 1 WHERE id = 1;
    INSERT INTO deletions (kind, id, change_seq, deleted_at)
    SELECT 'token', OLD.id, seq, strftime('%Y-%m-%dT%H:%M:%f000Z', 'now')
    FROM change_counter WHERE id = 1;
END;
CREATE TRIGGER projects_delete_mark AFTER DELETE ON projects BEGIN
    UPDATE change_counter SET seq = seq + 1 WHERE id = 1;
    INSERT INTO deletions (kind, id, change_seq, deleted_at)
    SELECT 'project', OLD.id, seq, strftime('%Y-%m-%dT%H:%M:%f000Z', 'now')
    FROM change_counter WHERE id = 1;
END;
