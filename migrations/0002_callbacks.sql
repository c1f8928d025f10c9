-- The transactional outbox of callbacks. A row is inserted in the same
-- transaction as the terminal status of an async execution, with its payload
-- frozen; the delivery loop claims due rows with a lease and records every
-- attempt, so a delivery cut off by a crash is retried after restart.
CREATE TABLE callbacks (
    -- msg_<ulid>: sent as `webhook-id`, the same on every attempt of this delivery.
    id               TEXT PRIMARY KEY,
    execution_id     TEXT NOT NULL REFERENCES executions (id) ON DELETE CASCADE,
    url              TEXT NOT NULL,
    -- JSON object of the caller's extra headers.
    headers          TEXT NOT NULL DEFAULT '{}',
    -- The exact body sent on every attempt.
    payload          TEXT NOT NULL,
    -- pending: no attempt failed yet; failed: retrying after a failure;
    -- delivered: a 2xx came back; dead: no more attempts (schedule exhausted, or 410).
    status           TEXT NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'failed', 'delivered', 'dead')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  TEXT,
    -- The agent boot holding the row while it POSTs, until when.
    lease_owner      TEXT,
    lease_until      TEXT,
    last_status      INTEGER,
    last_error       TEXT,
    created_at       TEXT NOT NULL,
    updated_at       TEXT NOT NULL,
    delivered_at     TEXT
);

-- Due deliveries, from the index alone.
CREATE INDEX callbacks_due ON callbacks (next_attempt_at) WHERE status IN ('pending', 'failed');
CREATE INDEX callbacks_execution ON callbacks (execution_id, created_at);

-- One row per POST.
CREATE TABLE callback_attempts (
    callback_id    TEXT NOT NULL REFERENCES callbacks (id) ON DELETE CASCADE,
    attempt        INTEGER NOT NULL,
    started_at     TEXT NOT NULL,
    duration_ms    REAL NOT NULL,
    http_status    INTEGER,
    -- delivered | http_status | redirect | gone | timeout | connect | dns | request
    outcome        TEXT NOT NULL,
    error          TEXT,
    -- The first few KiB of the response body.
    response_body  TEXT,
    PRIMARY KEY (callback_id, attempt)
) WITHOUT ROWID;
