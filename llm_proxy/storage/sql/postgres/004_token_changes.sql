-- Change markers for the proxy's incremental token-table reload (PostgreSQL).
-- Every insert or update of a token or project stamps the row with the id of the
-- writing transaction, and every delete leaves a tombstone in `deletions` stamped the
-- same way, so a reader asks "what changed at or after mark M".
--
-- Why a transaction id and not a clock or a sequence: both are taken before commit,
-- and commits do not happen in that order, so a row committed later can carry a
-- smaller timestamp or sequence value than one a reader has already seen, and would
-- be missed. A reader's mark is instead the xmin of its snapshot: every transaction
-- with a smaller id has finished, so any row not yet visible to the reader was written
-- by a transaction whose id is >= that mark, and the next read "change_seq >= mark"
-- finds it. The overlap re-read each time is what transactions still running at the
-- previous read wrote: small, and bounded by the oldest writing transaction.
-- xid8 values are 64-bit and never wrap; they fit in a BIGINT.

ALTER TABLE tokens ADD COLUMN change_seq BIGINT NOT NULL DEFAULT 0;
ALTER TABLE projects ADD COLUMN change_seq BIGINT NOT NULL DEFAULT 0;
CREATE INDEX tokens_change_seq_idx ON tokens (change_seq, id);
CREATE INDEX projects_change_seq_idx ON projects (change_seq, id);

-- Tombstones: an incremental reload cannot see a deleted row. Purged after a day.
CREATE TABLE deletions (
    kind TEXT NOT NULL CHECK (kind IN ('token', 'project')),
    id UUID NOT NULL,
    change_seq BIGINT NOT NULL,
    deleted_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX deletions_change_seq_idx ON deletions (change_seq, id);
CREATE INDEX deletions_deleted_at_idx ON deletions (deleted_at);

CREATE FUNCTION mark_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.change_seq := pg_current_xact_id()::text::bigint;
    RETURN NEW;
END
$$;

-- TG_ARGV[0] names the kind of row deleted.
CREATE FUNCTION record_deletion() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO deletions (kind, id, change_seq)
    VALUES (TG_ARGV[0], OLD.id, pg_current_xact_id()::text::bigint);
    RETURN OLD;
END
$$;

CREATE TRIGGER tokens_mark_change BEFORE INSERT OR UPDATE ON tokens
    FOR EACH ROW EXECUTE FUNCTION mark_change();
CREATE TRIGGER projects_mark_change BEFORE INSERT OR UPDATE ON projects
    FOR EACH ROW EXECUTE FUNCTION mark_change();
-- Cascaded deletes (a project's tokens) fire these too.
CREATE TRIGGER tokens_record_deletion AFTER DELETE ON tokens
    FOR EACH ROW EXECUTE FUNCTION record_deletion('token');
CREATE TRIGGER projects_record_deletion AFTER DELETE ON projects
    FOR EACH ROW EXECUTE FUNCTION record_deletion('project');
