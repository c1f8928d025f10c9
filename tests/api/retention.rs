//! Retention under churn: finished executions go, the file stays bounded,
//! and executions whose callback still waits are kept.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::helpers::*;

/// Sizes of the database file and its write-ahead log.
fn db_bytes(app: &TestApp) -> (u64, u64) {
    let size = |f: &str| {
        std::fs::metadata(app.data_dir.path().join(f))
            .map(|m| m.len())
            .unwrap_or(0)
    };
    (size("execd.db"), size("execd.db-wal"))
}

async fn wait_count(app: &TestApp, query: &str, count: usize, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let (_, list) = app
            .get_json(&format!("/execute/processes?limit=1000{query}"))
            .await;
        if list["count"].as_u64() == Some(count as u64) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} listed, wanted {count}",
            list["count"]
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_database_file_stays_bounded_under_churn_while_waiting_callbacks_are_kept() {
    let app = spawn_app_with(|c| {
        c.retention = Duration::from_secs(2);
        c.retention_interval = Duration::from_millis(200);
        c.background_concurrency = 4;
        c.callback_retry_schedule = "1h".into();
    })
    .await;
    // A callback that will not get through for an hour: its execution stays.
    let (_, kept) = app
        .post_json(
            "/execute/async",
            json!({ "code": "echo keep", "language": "bash", "callback_url": "http://127.0.0.1:9/x" }),
        )
        .await;
    let kept = kept["execution_id"].as_str().unwrap().to_string();
    let mut sizes = Vec::new();
    for _round in 0..8 {
        let mut ids = Vec::new();
        for _ in 0..20 {
            // 150 KB of output each: 3 MB a round, 24 MB in all.
            ids.push(
                app.background(json!({ "code": "import sys; sys.stdout.write('x' * 150_000)" }))
                    .await,
            );
        }
        for id in &ids {
            let p = app.wait_terminal(id, Duration::from_secs(30)).await;
            assert_eq!(p["status"], "completed");
        }
        // All pruned but the one whose callback waits, and the newest.
        wait_count(&app, "&status=completed", 2, Duration::from_secs(10)).await;
        sizes.push(db_bytes(&app));
    }
    let written: u64 = 8 * 20 * 150_000;
    let (last, last_wal) = *sizes.last().unwrap();
    assert!(
        // The log alone may hold a few MiB between checkpoints.
        last + last_wal < written / 2,
        "the files hold {} bytes after {written} bytes of output: {sizes:?}",
        last + last_wal
    );
    // The main file lags the log's checkpoints (a checkpoint may copy in a
    // round's output just before its pruning): it must come back to the
    // size of the early rounds, not keep what it took.
    let early = sizes[..4].iter().map(|s| s.0).max().unwrap();
    let mut late = db_bytes(&app).0;
    for _ in 0..100 {
        if late <= early + (1 << 20) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        late = db_bytes(&app).0;
    }
    assert!(
        late <= early + (1 << 20),
        "the database levels off: {late} bytes, after {sizes:?}"
    );
    let p = app.process(&kept).await;
    assert_eq!(
        p["callback"]["status"], "failed",
        "kept while its callback waits: {p}"
    );
    app.stop().await;
}

/// A list cursor never pages to a row newer than itself: retention keeps
/// the newest execution, whose `seq` SQLite would otherwise give again to
/// the next one. (With everything pruned, a new job took the number of a
/// cursor handed out before, and showed on the "older" page.)
#[tokio::test]
async fn a_cursor_handed_out_before_a_pruning_never_pages_to_a_newer_row() {
    let app = spawn_app_with(|c| {
        c.retention = Duration::from_secs(1);
        c.retention_interval = Duration::from_millis(200);
    })
    .await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let (_, out) = app
            .post_json("/execute", json!({ "code": "true", "language": "bash" }))
            .await;
        ids.push(out["execution_id"].as_str().unwrap().to_string());
    }
    let (_, page) = app.get_json("/execute/processes?limit=1").await;
    let cursor = page["next_cursor"].as_str().unwrap().to_string();
    // Pruned, all but the newest.
    wait_count(&app, "", 1, Duration::from_secs(10)).await;
    let (_, out) = app
        .post_json("/execute", json!({ "code": "true", "language": "bash" }))
        .await;
    let newer = out["execution_id"].as_str().unwrap().to_string();
    let (_, older) = app
        .get_json(&format!("/execute/processes?cursor={cursor}"))
        .await;
    let shown: Vec<&str> = older["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["execution_id"].as_str().unwrap())
        .collect();
    assert!(
        !shown.contains(&newer.as_str()),
        "a newer row on an older page: {shown:?}"
    );
    app.stop().await;
}

/// A dead callback is kept its retention from when it died, not from when
/// its execution finished: retries that outlast that retention left the
/// operator nothing to look at.
#[tokio::test]
async fn a_dead_callback_is_kept_its_retention_from_its_death() {
    let app = spawn_app_with(|c| {
        c.retention = Duration::from_millis(500);
        c.retention_interval = Duration::from_millis(200);
        c.dead_callback_retention = Duration::from_secs(3);
        c.callback_retry_schedule = "2s".into();
        c.callback_jitter = 0.0;
        c.poll_interval_secs = 0.2;
    })
    .await;
    let (_, out) = app
        .post_json(
            "/execute/async",
            json!({ "code": "echo x", "language": "bash", "callback_url": "http://127.0.0.1:9/x" }),
        )
        .await;
    let id = out["execution_id"].as_str().unwrap().to_string();
    let path = format!("/execute/processes/{id}/callback");
    poll_until(
        Duration::from_secs(10),
        || async { app.get_json(&path).await.1 },
        |info| info["callback"]["status"] == "dead",
    )
    .await;
    // Not the newest, which is always kept.
    let newer = app.background(json!({ "code": "print(1)" })).await;
    app.wait_terminal(&newer, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (status, info) = app.get_json(&path).await;
    assert_eq!(status, 200, "pruned 2 s after its callback died: {info}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while app.get_json(&path).await.0 != 404 {
        assert!(Instant::now() < deadline, "kept past its retention");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.stop().await;
}
