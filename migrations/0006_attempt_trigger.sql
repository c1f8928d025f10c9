-- An attempt's end is recorded by the statement that ends it.
--
-- The agent ends a running row in one `UPDATE` (status, exit code, error,
-- `completed_at`); this trigger adds the attempt's row in the same statement,
-- which saves the writer a round trip to SQLite per job. A lost attempt is
-- recorded by the agent before its row is re-queued or failed (outcome
-- 'lost'), and that record stands: hence `OR IGNORE`.
CREATE TRIGGER execution_attempt_ended
AFTER UPDATE OF status ON executions
WHEN OLD.status = 'running' AND NEW.status NOT IN ('queued', 'running') AND NEW.attempt > 0
BEGIN
    INSERT OR IGNORE INTO execution_attempts
        (execution_id, attempt, owner, started_at, ended_at, outcome, exit_code, error)
    VALUES (NEW.id, NEW.attempt, NEW.owner, NEW.started_at,
            COALESCE(NEW.completed_at, strftime('%Y-%m-%dT%H:%M:%fZ')),
            NEW.status, NEW.exit_code, NEW.error);
END;
