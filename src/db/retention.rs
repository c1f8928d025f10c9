//! SQL of retention: pruning finished executions (their output, callbacks
//! and attempts go with them, by cascade) and giving the space back.

use sqlx::{SqliteConnection, SqlitePool};

/// Deletes up to `batch` executions that finished before `cutoff`, keeping
/// any whose callback is still waiting, and any whose callback died after
/// `dead_cutoff` (a dead callback is kept longer, from its death, for an
/// operator to look at: its retries may have outlasted the cutoff). The newest execution is always kept: its `seq`
/// would be given to the next one, and a list cursor handed out before
/// would then page to a newer row. Returns how many were deleted.
pub async fn prune(
    conn: &mut SqliteConnection,
    cutoff: &str,
    dead_cutoff: &str,
    batch: i64,
) -> Result<u64, sqlx::Error> {
    let done = sqlx::query!(
        r#"DELETE FROM executions WHERE seq IN (
             SELECT e.seq FROM executions e
              WHERE e.status IN ('completed', 'failed', 'killed', 'timeout')
                AND e.completed_at < ?1
                AND e.seq < (SELECT MAX(seq) FROM executions)
                AND NOT EXISTS (SELECT 1 FROM callbacks c
                                 WHERE c.execution_id = e.id AND c.status IN ('pending', 'failed'))
                AND NOT EXISTS (SELECT 1 FROM callbacks c
                                 WHERE c.execution_id = e.id AND c.status = 'dead'
                                   AND c.updated_at >= ?2)
              LIMIT ?3)"#,
        cutoff,
        dead_cutoff,
        batch,
    )
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected())
}

/// Returns up to `pages` free pages to the file system
/// (`auto_vacuum = INCREMENTAL` is set when the database is created).
pub async fn vacuum(conn: &mut SqliteConnection, pages: i64) -> Result<(), sqlx::Error> {
    // A pragma with an argument cannot be bound as a parameter.
    let sql = format!("PRAGMA incremental_vacuum({pages})");
    sqlx::query(&sql).execute(&mut *conn).await?;
    Ok(())
}

/// Pages of the database file that hold nothing.
pub async fn free_pages(pool: &SqlitePool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("PRAGMA freelist_count")
        .fetch_one(pool)
        .await
}
