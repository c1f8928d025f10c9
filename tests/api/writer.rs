//! The single writer's group commit, against a real database file: a job
//! that fails leaves nothing of its own behind, whether it is alone in its
//! transaction or shares it, and the jobs around it still commit.

use std::time::Duration;

use execd::db::Db;
use tokio_util::sync::CancellationToken;

async fn open(dir: &std::path::Path) -> Db {
    let (db, _writer) = Db::open(&dir.join("execd.db"), CancellationToken::new())
        .await
        .unwrap();
    db.writer
        .write(|c| {
            Box::pin(async move {
                sqlx::query("CREATE TABLE scratch (k TEXT NOT NULL)")
                    .execute(&mut *c)
                    .await
                    .map(drop)
            })
        })
        .await
        .unwrap();
    db
}

/// Writes `k`, then fails when `fail`, after waiting `hold` (the writer is
/// busy meanwhile, so what arrives queues up for the next batch).
async fn put(db: &Db, k: &'static str, fail: bool, hold: Duration) -> bool {
    db.writer
        .write(move |c| {
            Box::pin(async move {
                sqlx::query("INSERT INTO scratch (k) VALUES (?)")
                    .bind(k)
                    .execute(&mut *c)
                    .await?;
                tokio::time::sleep(hold).await;
                match fail {
                    true => Err(sqlx::Error::Protocol(format!("{k} fails"))),
                    false => Ok(()),
                }
            })
        })
        .await
        .is_ok()
}

async fn stored(db: &Db) -> Vec<String> {
    sqlx::query_scalar("SELECT k FROM scratch ORDER BY k")
        .fetch_all(&db.readers)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_failing_write_alone_in_its_transaction_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path()).await;
    assert!(!put(&db, "lone", true, Duration::ZERO).await);
    assert!(put(&db, "after", false, Duration::ZERO).await);
    assert_eq!(stored(&db).await, ["after"]);
}

#[tokio::test]
async fn a_failing_write_in_a_batch_rolls_back_alone() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path()).await;
    // The first write holds the writer; the next three arrive meanwhile and
    // share the following transaction.
    let (first, a, bad, b) = tokio::join!(
        put(&db, "first", false, Duration::from_millis(200)),
        async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            put(&db, "a", false, Duration::ZERO).await
        },
        async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            put(&db, "bad", true, Duration::ZERO).await
        },
        async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            put(&db, "b", false, Duration::ZERO).await
        },
    );
    assert_eq!((first, a, bad, b), (true, true, false, true));
    assert_eq!(stored(&db).await, ["a", "b", "first"]);
}
