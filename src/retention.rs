//! Retention: finished executions, with their output, callbacks and attempts,
//! are pruned after a configurable age, in small batches (each its own short
//! write, so submissions are never held up for long), and the freed pages
//! are given back to the file system. Executions whose callback is dead are
//! kept longer; those whose callback is still waiting are never pruned.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::db::{self, retention, Db};

#[derive(Clone, Debug)]
pub struct RetentionConfig {
    /// Finished executions older than this go.
    pub keep: Duration,
    /// Finished executions whose callback is dead go after this.
    pub keep_dead: Duration,
    /// How often to look.
    pub interval: Duration,
    /// Executions deleted per write.
    pub batch: i64,
}

/// Pages given back per write: a few MiB, so no one write takes long.
const VACUUM_PAGES: i64 = 2048;

/// Prunes everything due now, batch by batch, then gives the free pages
/// back; returns how many executions went.
pub async fn run_once(db: &Db, config: &RetentionConfig) -> Result<u64, db::WriteError> {
    let mut total = 0;
    loop {
        let now = chrono::Utc::now();
        let cutoff = db::timestamp(now - config.keep);
        let dead_cutoff = db::timestamp(now - config.keep_dead);
        let batch = config.batch;
        let pruned = db
            .writer
            .write(move |c| {
                Box::pin(async move { retention::prune(c, &cutoff, &dead_cutoff, batch).await })
            })
            .await?;
        total += pruned;
        if pruned < config.batch as u64 {
            break;
        }
        tokio::task::yield_now().await;
    }
    give_back(db).await?;
    Ok(total)
}

/// Returns the free pages (left by a prune, or by a migration that rebuilt a
/// table) to the file system, `VACUUM_PAGES` per write.
async fn give_back(db: &Db) -> Result<(), db::WriteError> {
    let mut before = i64::MAX;
    loop {
        let free = retention::free_pages(&db.readers).await?;
        // Nothing left, or nothing given back (a file made without
        // `auto_vacuum` keeps its free pages for later writes).
        if free == 0 || free >= before {
            return Ok(());
        }
        before = free;
        db.writer
            .write(|c| Box::pin(async move { retention::vacuum(c, VACUUM_PAGES).await }))
            .await?;
        tokio::task::yield_now().await;
    }
}

/// Runs `run_once` every `interval` until `shutdown`.
pub fn start(
    db: Db,
    config: RetentionConfig,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(config.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            match run_once(&db, &config).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(executions = n, "pruned finished executions"),
                Err(e) => tracing::error!(error = %e, "retention failed"),
            }
        }
    })
}
