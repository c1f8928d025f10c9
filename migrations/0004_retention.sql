-- Retention: finished executions by age, from the index alone.
CREATE INDEX executions_finished ON executions (completed_at)
    WHERE status IN ('completed', 'failed', 'killed', 'timeout');
