//! A database written by an earlier version of the agent, opened by this one.

use std::time::Duration;

use execd::config::Config;
use serde_json::json;
use sqlx::sqlite::{SqliteAutoVacuum, SqliteConnectOptions};
use sqlx::ConnectOptions;

use crate::helpers::{self, TOKEN};

/// The schema as it was before output chunks moved to a rowid table.
const BEFORE_ROWID_CHUNKS: &[&str] = &[
    "0001_executions.sql",
    "0002_callbacks.sql",
    "0003_attempts.sql",
    "0004_retention.sql",
];

#[tokio::test]
async fn an_upgraded_database_reads_its_old_output_the_same_and_gives_the_old_pages_back() {
    let data_dir = tempfile::tempdir().unwrap();
    let old = tempfile::tempdir().unwrap();
    for name in BEFORE_ROWID_CHUNKS {
        let from = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
        std::fs::copy(from.join(name), old.path().join(name)).unwrap();
    }
    let mut conn = SqliteConnectOptions::new()
        .filename(data_dir.path().join("execd.db"))
        .create_if_missing(true)
        .auto_vacuum(SqliteAutoVacuum::Incremental)
        .connect()
        .await
        .unwrap();
    sqlx::migrate::Migrator::new(old.path())
        .await
        .unwrap()
        .run_direct(&mut conn)
        .await
        .unwrap();
    // Finished just now, so retention leaves it alone.
    let now = execd::db::now();
    sqlx::raw_sql(&format!(
        "INSERT INTO executions (id, process_id, lane, language, code, working_dir, timeout_ms,
                                 status, exit_code, created_at, started_at, completed_at,
                                 attempt, stdout_bytes, stderr_bytes)
         VALUES ('exec_old', 'proc_old', 'background', 'bash', 'echo', '/tmp', 1000,
                 'completed', 0, '{now}', '{now}', '{now}', 1, 12, 4);
         INSERT INTO output_chunks (execution_id, attempt, stream, seq, data, created_at) VALUES
           ('exec_old', 1, 'stdout', 1, CAST('world!' AS BLOB), '{now}'),
           ('exec_old', 1, 'stderr', 0, CAST('oops' AS BLOB), '{now}'),
           ('exec_old', 1, 'stdout', 0, CAST('hello ' AS BLOB), '{now}');
         INSERT INTO executions (id, process_id, lane, language, code, working_dir, timeout_ms,
                                 status, exit_code, created_at, started_at, completed_at,
                                 attempt, stdout_bytes)
         VALUES ('exec_big', 'proc_big', 'background', 'bash', 'echo', '/tmp', 1000,
                 'completed', 0, '{now}', '{now}', '{now}', 1, 8388608);
         INSERT INTO output_chunks (execution_id, attempt, stream, seq, data, created_at)
           VALUES ('exec_big', 1, 'stdout', 0, randomblob(8388608), '{now}');",
    ))
    .execute(&mut conn)
    .await
    .unwrap();
    drop(conn);

    let mut config = Config::for_data_dir(data_dir.path());
    config.token = Some(TOKEN.into());
    config.supervisor_bin = Some(env!("CARGO_BIN_EXE_execd").into());
    let app = helpers::start(config, data_dir).await;

    let old = app.process("proc_old").await;
    assert_eq!(old["stdout"], "hello world!", "{old}");
    assert_eq!(old["stderr"], "oops", "{old}");

    // The old table's 8 MiB of pages, freed by the upgrade's copy, go back
    // to the file system: the file holds the output once, not twice.
    let db_path = app.db_path();
    let free = || async {
        let mut c = SqliteConnectOptions::new()
            .filename(&db_path)
            .read_only(true)
            .connect()
            .await
            .unwrap();
        let free: i64 = sqlx::query_scalar("PRAGMA freelist_count")
            .fetch_one(&mut c)
            .await
            .unwrap();
        json!(free)
    };
    helpers::poll_until(Duration::from_secs(10), free, |n| *n == 0).await;
    // The file is cut at the checkpoint that follows, a moment later
    // (its size in bytes, for 8 MiB of output).
    let size = || async { json!(std::fs::metadata(&db_path).unwrap().len()) };
    helpers::poll_until(Duration::from_secs(10), size, |n| {
        n.as_u64().is_some_and(|n| n < 12 << 20)
    })
    .await;

    // New output is stored and read in order next to the old.
    let id = app
        .background(
            json!({ "language": "bash", "code": "printf 'one '; printf 'two' >&2; printf three" }),
        )
        .await;
    let new = app.wait_terminal(&id, Duration::from_secs(10)).await;
    assert_eq!(new["status"], "completed", "{new}");
    assert_eq!(new["stdout"], "one three", "{new}");
    assert_eq!(new["stderr"], "two", "{new}");

    // A chunk's place in its stream stays unique, as the old key kept it.
    let mut conn = SqliteConnectOptions::new()
        .filename(app.db_path())
        .connect()
        .await
        .unwrap();
    let duplicate = sqlx::query(
        "INSERT INTO output_chunks (execution_id, attempt, stream, seq, data, created_at)
         VALUES ('exec_old', 1, 'stdout', 0, x'00', '2026-01-01T00:00:02.000000Z')",
    )
    .execute(&mut conn)
    .await;
    let refused = duplicate.expect_err("a second chunk 0 of the same stream was stored");
    assert!(refused.to_string().contains("UNIQUE"), "{refused}");
    drop(conn);
    app.stop().await;
}

#[tokio::test]
async fn a_database_a_newer_agent_migrated_is_refused_saying_so() {
    let app = helpers::spawn_app().await;
    let data_dir = app.stop().await;
    let db = data_dir.path().join("execd.db");
    helpers::sqlite3(
        &db,
        "INSERT INTO _sqlx_migrations (version, description, installed_on, success, checksum, execution_time)
         VALUES (9999, 'from the future', CURRENT_TIMESTAMP, 1, x'00', 0)",
    );
    let mut config = Config::for_data_dir(data_dir.path());
    config.token = Some(TOKEN.into());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let refused = execd::app::serve(config, listener, std::future::pending()).await;
    let error = refused.expect_err("a newer schema").to_string();
    assert!(error.contains("a newer execd has migrated it"), "{error}");
    assert!(error.contains("9999"), "{error}");
    assert!(!data_dir.path().join("runs").exists(), "a runs link left");
}
