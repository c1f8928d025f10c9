//! The database: connecting with the pragmas on every connection, the single
//! writer (group commits through one connection), the read-only pool, and —
//! in the submodules — every SQL statement of the agent, per table.
//!
//! Pragmas, chosen on purpose:
//! - `journal_mode=WAL`: readers never block the writer, nor the writer readers.
//! - `synchronous=FULL`, in effect: a write is on disk (WAL fsynced) before
//!   its caller hears of it, so a 200 survives power loss, not only a crash of
//!   the agent. Group commit amortises the fsync over every write that
//!   arrived meanwhile. The writer connection itself runs with
//!   `synchronous=NORMAL` and syncs the WAL after each `COMMIT` (see
//!   `writer`): a claimed program starts between the two. Until that sync
//!   (about a millisecond), readers may see a commit that a power loss would
//!   still undo; no answer, callback or later write acts on it before then.
//! - `foreign_keys=ON`: output chunks cannot outlive their execution.
//! - `auto_vacuum=INCREMENTAL` (at creation): pruned pages go back to the
//!   file system in small steps, without a blocking full VACUUM.
//! - `busy_timeout=5s`: an operator's `sqlite3` session holding a lock briefly
//!   delays the agent instead of failing it. (A write that still fails is
//!   tried again where giving it up would lose something: a job's end.)
//! - `journal_size_limit=64MiB`: a WAL that grew while an operator's long read
//!   held it is cut back after the next checkpoint.
//! - `wal_autocheckpoint`: on the writer, only past about 64 MiB of WAL;
//!   checkpoints run on a connection of their own (see `writer`).

pub mod callbacks;
pub mod executions;
pub mod output;
pub mod retention;
mod writer;

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteAutoVacuum, SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{ConnectOptions, SqlitePool};
use tokio_util::sync::CancellationToken;

pub use writer::{Merged, MergedFn, WriteError, WriteFn, Writer};

/// The migrations in `migrations/`, embedded in the binary and run at start.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Handles to the database: writes go through `writer`, reads through `readers`.
#[derive(Clone)]
pub struct Db {
    pub writer: Writer,
    pub readers: SqlitePool,
    /// Submissions stored as queued, many to a statement.
    pub queued: Merged<executions::Queued, executions::Inserted>,
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot open database {path}: {source}")]
    Connect { path: String, source: sqlx::Error },
    #[error(
        "cannot open database {path}: a newer execd has migrated it (migration {version} is not one this version knows); run that version or a later one"
    )]
    Newer { path: String, version: i64 },
    #[error("cannot migrate database {path}: {source}")]
    Migrate {
        path: String,
        source: sqlx::migrate::MigrateError,
    },
}

fn options(path: &Path) -> SqliteConnectOptions {
    SqliteConnectOptions::from_str("sqlite://")
        .expect("static URL parses")
        .filename(path)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .foreign_keys(true)
        .busy_timeout(Duration::from_secs(5))
        .pragma("journal_size_limit", (64u32 << 20).to_string())
        .log_statements(tracing::log::LevelFilter::Trace)
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_millis(500))
}

impl OpenError {
    /// Whether another process held the database's lock past the busy
    /// timeout (SQLite's `SQLITE_BUSY` or `SQLITE_LOCKED`).
    fn locked(&self) -> bool {
        let source = match self {
            OpenError::Connect { source, .. }
            | OpenError::Migrate {
                source:
                    sqlx::migrate::MigrateError::Execute(source)
                    | sqlx::migrate::MigrateError::ExecuteMigration(source, _),
                ..
            } => source,
            OpenError::Migrate { .. } | OpenError::Newer { .. } => return false,
        };
        let code = source.as_database_error().and_then(|e| e.code());
        // Extended result codes: the primary code is the low byte.
        code.and_then(|c| c.parse::<i32>().ok())
            .is_some_and(|c| matches!(c & 0xff, 5 | 6))
    }
}

impl Db {
    /// Opens (creating if needed) the database at `path`, runs the migrations,
    /// and starts the writer task, which stops when `shutdown` is cancelled and
    /// every queued write is done. While another process (an operator's
    /// `sqlite3`) holds the database's lock, it waits, saying so every busy
    /// timeout: a restart must not fail for a lock held a while. (Dropping
    /// the future ends the wait: the agent does so when asked to stop.)
    pub async fn open(
        path: &Path,
        shutdown: CancellationToken,
    ) -> Result<(Db, tokio::task::JoinHandle<()>), OpenError> {
        loop {
            match Self::open_once(path, shutdown.clone()).await {
                Err(e) if e.locked() => {
                    tracing::warn!(
                        db = %path.display(),
                        "the database is locked by another process; waiting for it"
                    );
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                opened => return opened,
            }
        }
    }

    async fn open_once(
        path: &Path,
        shutdown: CancellationToken,
    ) -> Result<(Db, tokio::task::JoinHandle<()>), OpenError> {
        let shown = path.display().to_string();
        let connect_err = |source| OpenError::Connect {
            path: shown.clone(),
            source,
        };
        // Migrations through a one-off pool: `Migrator::run` on a bare
        // connection makes the future not provably `Send`.
        let migrations = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(
                options(path)
                    .create_if_missing(true)
                    // Takes effect when the file is created: retention gives pages back.
                    .auto_vacuum(SqliteAutoVacuum::Incremental),
            )
            .await
            .map_err(connect_err)?;
        MIGRATOR
            .run(&migrations)
            .await
            .map_err(|source| match source {
                sqlx::migrate::MigrateError::VersionMissing(version) => OpenError::Newer {
                    path: shown.clone(),
                    version,
                },
                source => OpenError::Migrate {
                    path: shown.clone(),
                    source,
                },
            })?;
        migrations.close().await;
        let conn = options(path)
            .synchronous(SqliteSynchronous::Normal)
            .pragma(
                "wal_autocheckpoint",
                writer::WRITER_CHECKPOINT_PAGES.to_string(),
            )
            // Its own statements, and one insert for each number of rows
            // `executions::insert_queued` puts in one.
            .statement_cache_capacity(256)
            .connect()
            .await
            .map_err(connect_err)?;
        let checkpoints = options(path).connect().await.map_err(connect_err)?;
        let readers = SqlitePoolOptions::new()
            .max_connections(8)
            .min_connections(1)
            .connect_with(options(path).read_only(true))
            .await
            .map_err(connect_err)?;
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        let (writer, task) = Writer::start(conn, checkpoints, wal.into(), shutdown);
        let db = Db {
            writer,
            readers,
            queued: Merged::new(executions::insert_queued),
        };
        Ok((db, task))
    }
}

/// Now, as stored: RFC 3339 UTC with microseconds, so text order is time order.
pub fn now() -> String {
    timestamp(chrono::Utc::now())
}

pub fn timestamp(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}
