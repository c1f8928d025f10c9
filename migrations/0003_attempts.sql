-- Restart safety: attempts, and output kept per attempt.

-- When the program actually started (its pid became known); `started_at` is
-- when the row was claimed.
ALTER TABLE executions ADD COLUMN spawned_at TEXT;
-- How many attempts a submission allows when its process is lost (default 1:
-- code with side effects is never re-run silently).
ALTER TABLE executions ADD COLUMN max_attempts INTEGER NOT NULL DEFAULT 1 CHECK (max_attempts >= 1);

-- One row per ended attempt of an execution.
CREATE TABLE execution_attempts (
    execution_id  TEXT NOT NULL REFERENCES executions (id) ON DELETE CASCADE,
    attempt       INTEGER NOT NULL,
    owner         TEXT,
    started_at    TEXT,
    ended_at      TEXT NOT NULL,
    -- The status this attempt ended with, or 'lost' when it was re-queued.
    outcome       TEXT NOT NULL,
    exit_code     INTEGER,
    error         TEXT,
    PRIMARY KEY (execution_id, attempt)
) WITHOUT ROWID;

-- Output chunks gain the attempt they belong to (SQLite cannot change a
-- primary key in place: rebuild the table).
CREATE TABLE output_chunks_new (
    execution_id  TEXT NOT NULL REFERENCES executions (id) ON DELETE CASCADE,
    attempt       INTEGER NOT NULL DEFAULT 1,
    stream        TEXT NOT NULL CHECK (stream IN ('stdout', 'stderr')),
    seq           INTEGER NOT NULL,
    data          BLOB NOT NULL,
    created_at    TEXT NOT NULL,
    PRIMARY KEY (execution_id, attempt, stream, seq)
) WITHOUT ROWID;
INSERT INTO output_chunks_new (execution_id, attempt, stream, seq, data, created_at)
    SELECT c.execution_id, MAX(e.attempt, 1), c.stream, c.seq, c.data, c.created_at
      FROM output_chunks c JOIN executions e ON e.id = c.execution_id;
DROP TABLE output_chunks;
ALTER TABLE output_chunks_new RENAME TO output_chunks;
