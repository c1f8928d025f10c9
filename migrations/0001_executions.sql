-- One row per submission. Written by the agent's single writer connection;
-- read by the API and by operators with sqlite3, so every column is readable:
-- status as text, timestamps as RFC 3339 UTC text, ids with prefixes.
CREATE TABLE executions (
    -- Insertion order: the queue order and the listing cursor.
    seq               INTEGER PRIMARY KEY,
    id                TEXT NOT NULL UNIQUE,           -- exec_<ulid>
    process_id        TEXT NOT NULL UNIQUE,           -- proc_<ulid>
    -- Which runner lane runs it: sync runs and background processes never
    -- wait behind a queue of long async jobs.
    lane              TEXT NOT NULL CHECK (lane IN ('sync', 'background', 'async')),
    name              TEXT,
    -- python | javascript | bash | go | command
    language          TEXT NOT NULL,
    -- The program text; for language 'command', the command line.
    code              TEXT NOT NULL,
    -- For language 'command' with explicit arguments: a JSON array of strings.
    args              TEXT,
    working_dir       TEXT NOT NULL,
    -- JSON object of extra environment variables. Never returned by the API.
    env               TEXT NOT NULL DEFAULT '{}',
    timeout_ms        INTEGER NOT NULL CHECK (timeout_ms > 0),
    status            TEXT NOT NULL DEFAULT 'queued'
                      CHECK (status IN ('queued', 'running', 'completed', 'failed', 'killed', 'timeout')),
    pid               INTEGER,
    exit_code         INTEGER,
    error             TEXT,
    created_at        TEXT NOT NULL,
    started_at        TEXT,
    completed_at      TEXT,
    -- Claim fencing: the boot id of the agent that claimed the row and the
    -- attempt number it claimed; every later write checks both.
    owner             TEXT,
    attempt           INTEGER NOT NULL DEFAULT 0,
    -- Bytes of output stored per stream, and whether more was dropped.
    stdout_bytes      INTEGER NOT NULL DEFAULT 0,
    stderr_bytes      INTEGER NOT NULL DEFAULT 0,
    stdout_truncated  INTEGER NOT NULL DEFAULT 0 CHECK (stdout_truncated IN (0, 1)),
    stderr_truncated  INTEGER NOT NULL DEFAULT 0 CHECK (stderr_truncated IN (0, 1)),
    -- Async executions only. The secret is never returned by the API.
    callback_url      TEXT,
    callback_headers  TEXT,
    callback_secret   TEXT,
    -- Idempotency-Key header of the submitting request, with a hash of the
    -- request it came with, so a repeat returns the first execution.
    idempotency_key   TEXT UNIQUE,
    request_hash      TEXT
);

-- The claim: the oldest queued rows of one lane, from the index alone.
CREATE INDEX executions_queue ON executions (lane, seq) WHERE status = 'queued';
-- Listing by status, newest first.
CREATE INDEX executions_status ON executions (status, seq);
CREATE INDEX executions_name ON executions (name, seq) WHERE name IS NOT NULL;

-- Output as it arrives, in chunks with a sequence number per stream, so a
-- running job's output is visible while it runs and no row grows without bound.
CREATE TABLE output_chunks (
    execution_id  TEXT NOT NULL REFERENCES executions (id) ON DELETE CASCADE,
    stream        TEXT NOT NULL CHECK (stream IN ('stdout', 'stderr')),
    seq           INTEGER NOT NULL,
    -- Raw bytes as the program wrote them; not necessarily UTF-8.
    data          BLOB NOT NULL,
    created_at    TEXT NOT NULL,
    PRIMARY KEY (execution_id, stream, seq)
) WITHOUT ROWID;
