-- Output chunks move to a rowid table, their key to an index of its own.
--
-- In a WITHOUT ROWID table a row is a key: every seek compares the key it
-- looks for with whole rows, and a row holding a chunk of up to 1 MiB spills
-- into overflow pages that SQLite reads back in full for each comparison.
-- Storing one chunk read about 40 MiB of old chunks. Here the index holds
-- only the key columns, and a chunk's bytes are read when its row is.
CREATE TABLE output_chunks_new (
    id            INTEGER PRIMARY KEY,
    execution_id  TEXT NOT NULL REFERENCES executions (id) ON DELETE CASCADE,
    attempt       INTEGER NOT NULL DEFAULT 1,
    stream        TEXT NOT NULL CHECK (stream IN ('stdout', 'stderr')),
    seq           INTEGER NOT NULL,
    -- Raw bytes as the program wrote them; not necessarily UTF-8.
    data          BLOB NOT NULL,
    created_at    TEXT NOT NULL
);
INSERT INTO output_chunks_new (execution_id, attempt, stream, seq, data, created_at)
    SELECT execution_id, attempt, stream, seq, data, created_at
      FROM output_chunks ORDER BY execution_id, attempt, stream, seq;
DROP TABLE output_chunks;
ALTER TABLE output_chunks_new RENAME TO output_chunks;
CREATE UNIQUE INDEX output_chunks_key ON output_chunks (execution_id, attempt, stream, seq);
