//! The single writer's group commit, against a real database file: a job
//! that fails leaves nothing of its own behind, whether it is alone in its
//! transaction or shares it, and the jobs around it still commit. What a job
//! asks to run once it is committed runs before its caller hears, and never
//! for a job that was rolled back.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use execd::db::Db;
use tokio_util::sync::CancellationToken;

async fn open(dir: &std::path::Path) -> Db {
    let (db, _writer) = Db::open(&dir.join("execd.db"), CancellationToken::new())
        .await
        .unwrap();
    run_sql(&db, "CREATE TABLE scratch (k TEXT NOT NULL)").await;
    db
}

/// Runs one statement through the writer, which must succeed.
async fn run_sql(db: &Db, sql: &'static str) {
    db.writer
        .write(move |c| Box::pin(async move { sqlx::query(sql).execute(&mut *c).await.map(drop) }))
        .await
        .unwrap();
}

/// Writes `k`, then fails when `fail`, after waiting `hold` (the writer is
/// busy meanwhile, so what arrives queues up for the next batch).
async fn put(db: &Db, k: &'static str, fail: bool, hold: Duration) -> bool {
    put_with(db, k, fail, hold, || {}).await
}

/// `put`, with `during` called inside the write job, after the insert.
async fn put_with(
    db: &Db,
    k: &'static str,
    fail: bool,
    hold: Duration,
    during: impl FnOnce() + Send + 'static,
) -> bool {
    put_as(db, true, k, fail, hold, during).await
}

/// `put_with`, as a guarded job (`write`) or one of one statement
/// (`write_one`: no savepoint of its own), whose failure comes after its
/// statement did its work, as a claim's whose returned row cannot be read.
async fn put_as(
    db: &Db,
    guarded: bool,
    k: &'static str,
    fail: bool,
    hold: Duration,
    during: impl FnOnce() + Send + 'static,
) -> bool {
    db.writer
        .write_as(guarded, move |c| {
            Box::pin(async move {
                sqlx::query("INSERT INTO scratch (k) VALUES (?)")
                    .bind(k)
                    .execute(&mut *c)
                    .await?;
                during();
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

/// Like `put`, with an after-commit hook (after-sync with `synced`) that
/// logs `hook <k>` and whether the row was then in the database at `path`
/// (read on a connection of its own); `heard <k>` is logged when the caller
/// hears back.
async fn put_hooked(
    db: &Db,
    path: &Path,
    k: &'static str,
    fail: bool,
    log: &Arc<Mutex<Vec<String>>>,
    synced: bool,
) {
    let (writer, hook_log, path) = (db.writer.clone(), log.clone(), path.to_owned());
    let ok = put_with(db, k, fail, Duration::ZERO, move || {
        let hook = move || {
            let seen = count_elsewhere(&path, k);
            hook_log
                .lock()
                .unwrap()
                .push(format!("hook {k} seen {seen}"));
        };
        match synced {
            true => writer.after_sync(hook),
            false => writer.after_commit(hook),
        }
    })
    .await;
    log.lock().unwrap().push(format!("heard {k} {ok}"));
}

/// Rows of `k`, as another process would see them: a connection of its
/// own, opened for the read (on a thread of its own: hooks are not async).
fn count_elsewhere(path: &Path, k: &str) -> i64 {
    let (path, k) = (path.display().to_string(), k.to_string());
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(async move {
                use sqlx::Connection;
                let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{path}?mode=ro"))
                    .await
                    .unwrap();
                sqlx::query_scalar("SELECT count(*) FROM scratch WHERE k = ?")
                    .bind(k)
                    .fetch_one(&mut conn)
                    .await
                    .unwrap()
            })
    })
    .join()
    .unwrap()
}

#[tokio::test]
async fn an_after_commit_hook_runs_committed_before_its_caller_hears_and_never_on_rollback() {
    hooks_run_committed_before_the_caller_hears_and_never_on_rollback(false).await;
}

#[tokio::test]
async fn an_after_sync_hook_runs_committed_before_its_caller_hears_and_never_on_rollback() {
    hooks_run_committed_before_the_caller_hears_and_never_on_rollback(true).await;
}

async fn hooks_run_committed_before_the_caller_hears_and_never_on_rollback(synced: bool) {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path()).await;
    let path = dir.path().join("execd.db");
    let log = Arc::new(Mutex::new(Vec::new()));
    // Alone in its transaction, then failing alone, then in a batch of
    // three where the middle one fails.
    put_hooked(&db, &path, "alone", false, &log, synced).await;
    put_hooked(&db, &path, "lone-bad", true, &log, synced).await;
    let hold = put(&db, "hold", false, Duration::from_millis(200));
    let later = async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        tokio::join!(
            put_hooked(&db, &path, "x", false, &log, synced),
            put_hooked(&db, &path, "bad", true, &log, synced),
            put_hooked(&db, &path, "y", false, &log, synced),
        );
    };
    tokio::join!(hold, later);
    let log = log.lock().unwrap().clone();
    let at = |line: &str| log.iter().position(|l| l == line);
    for k in ["alone", "x", "y"] {
        let hook = at(&format!("hook {k} seen 1")).unwrap_or_else(|| panic!("{k}: {log:?}"));
        let heard = at(&format!("heard {k} true")).unwrap_or_else(|| panic!("{k}: {log:?}"));
        assert!(
            hook < heard,
            "{k}: the caller heard before the hook ran: {log:?}"
        );
    }
    for k in ["lone-bad", "bad"] {
        assert!(at(&format!("heard {k} false")).is_some(), "{log:?}");
        assert!(
            !log.iter().any(|l| l.starts_with(&format!("hook {k} "))),
            "the hook of a rolled-back job ran: {log:?}"
        );
    }
    assert_eq!(stored(&db).await, ["alone", "hold", "x", "y"]);
}

/// `put` as a job of one statement.
async fn put_one(db: &Db, k: &'static str, fail: bool) -> bool {
    put_as(db, false, k, fail, Duration::ZERO, || {}).await
}

/// A job of one statement that fails after the statement ran leaves
/// nothing: alone, its transaction is rolled back (it was committed: a
/// claimed row stayed `running` with no program); among others, the whole
/// batch is, and every caller in it is told.
#[tokio::test]
async fn a_one_statement_write_failing_after_its_statement_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path()).await;
    assert!(!put_one(&db, "lone", true).await);
    assert_eq!(stored(&db).await, Vec::<String>::new());
    let (first, a, bad, b) = tokio::join!(
        put(&db, "first", false, Duration::from_millis(200)),
        async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            put(&db, "a", false, Duration::ZERO).await
        },
        async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            put_one(&db, "bad", true).await
        },
        async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            put_one(&db, "b", false).await
        },
    );
    assert!(first);
    assert!(!bad);
    let stored = stored(&db).await;
    assert!(!stored.contains(&"bad".to_string()), "{stored:?}");
    // What a caller was told is what is stored.
    assert_eq!(stored.contains(&"a".to_string()), a, "{stored:?}");
    assert_eq!(stored.contains(&"b".to_string()), b, "{stored:?}");
}

/// Rows of `k` in the database file alone, as a copy of `execd.db` made
/// without its `-wal` holds them: opened immutable, so nothing of the WAL
/// is read (0 too before the table itself is there).
async fn count_in_file_alone(dir: &Path, k: &str) -> i64 {
    use sqlx::{ConnectOptions, Connection};
    let copy = dir.join("copy.db");
    std::fs::copy(dir.join("execd.db"), &copy).unwrap();
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&copy)
        .immutable(true)
        .connect()
        .await
        .unwrap();
    let count = sqlx::query_scalar("SELECT count(*) FROM scratch WHERE k = ?")
        .bind(k)
        .fetch_one(&mut conn)
        .await
        .unwrap_or(0);
    conn.close().await.unwrap();
    count
}

/// A commit reaches the database file itself within seconds of its write,
/// though the WAL is far short of SQLite's own threshold for a checkpoint
/// (1,000 pages): a checkpoint runs beside the writer after commits.
#[tokio::test]
async fn a_commit_reaches_the_database_file_itself_within_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path()).await;
    assert!(put(&db, "late", false, Duration::ZERO).await);
    let mut found = 0;
    // Bounded: 6 s at most.
    for _ in 0..60 {
        found = count_in_file_alone(dir.path(), "late").await;
        if found == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        found, 1,
        "the commit is in execd.db itself, not only in its WAL"
    );
    assert_eq!(stored(&db).await, vec!["late".to_string()]);
}

/// A write answered once committed (`write_committed`, a job's output) is
/// answered while the sync of an earlier commit is still under way (here
/// held up by that commit's after-sync hook), and is in the database by
/// then; a write answered once synced waits for that sync.
#[tokio::test]
async fn a_write_answered_on_commit_does_not_wait_for_the_sync() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path()).await;
    let path = dir.path().join("execd.db");
    // The sync thread runs this hook, and so syncs nothing more, until released.
    let (release, held) = std::sync::mpsc::channel::<()>();
    let writer = db.writer.clone();
    let first = tokio::spawn({
        let db = db.clone();
        async move {
            put_with(&db, "first", false, Duration::ZERO, move || {
                writer.after_sync(move || {
                    let _ = held.recv_timeout(Duration::from_secs(20));
                })
            })
            .await
        }
    });
    // `first` is committed once its row can be read elsewhere.
    let committed = async {
        while count_elsewhere(&path, "first") == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), committed)
        .await
        .expect("the first write is committed");
    let on_commit = db.writer.write_committed(|c| {
        Box::pin(async move {
            sqlx::query("INSERT INTO scratch (k) VALUES ('output')")
                .execute(&mut *c)
                .await
                .map(drop)
        })
    });
    let answered = tokio::time::timeout(Duration::from_secs(10), on_commit).await;
    assert!(
        matches!(answered, Ok(Ok(()))),
        "answered while the sync is held up: {answered:?}"
    );
    assert_eq!(count_elsewhere(&path, "output"), 1);
    // A synced write waits for the sync the hook holds up.
    let synced = put(&db, "synced", false, Duration::ZERO);
    tokio::pin!(synced);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut synced)
            .await
            .is_err(),
        "a synced write was answered while the sync was held up"
    );
    release.send(()).unwrap();
    assert!(synced.await);
    assert!(first.await.unwrap());
    assert_eq!(stored(&db).await, ["first", "output", "synced"]);
}

/// The WAL stays bounded under writes that never pause: a checkpoint
/// beside the writer always leaves behind what was committed while it
/// copied, and the WAL starts over only once nothing is left, so the
/// writer folds that rest in itself. (Without it, the WAL grew to 64 MiB.)
#[tokio::test]
async fn the_wal_stays_bounded_under_writes_that_never_pause() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path()).await;
    let wal = dir.path().join("execd.db-wal");
    run_sql(&db, "CREATE TABLE blobs (b BLOB NOT NULL)").await;
    let mut largest = 0;
    // 48 MiB in 64 KiB rows, one write after the other.
    for _ in 0..768 {
        run_sql(&db, "INSERT INTO blobs (b) VALUES (randomblob(65536))").await;
        largest = largest.max(std::fs::metadata(&wal).map_or(0, |m| m.len()));
    }
    assert!(
        largest < 24 << 20,
        "the WAL grew to {largest} bytes under 48 MiB of writes"
    );
}

/// How many items each call of `put_many` was given.
static CALLS: Mutex<Vec<usize>> = Mutex::new(Vec::new());

/// A merged write's statements: one insert for all the keys it is given.
fn put_many<'c>(
    c: &'c mut sqlx::SqliteConnection,
    keys: Vec<&'static str>,
) -> futures::future::BoxFuture<'c, Vec<Result<usize, sqlx::Error>>> {
    Box::pin(async move {
        CALLS.lock().unwrap().push(keys.len());
        let mut insert = sqlx::QueryBuilder::new("INSERT INTO scratch (k) ");
        insert.push_values(&keys, |mut row, k| {
            row.push_bind(*k);
        });
        let result = insert.build().execute(&mut *c).await;
        (0..keys.len())
            .map(|i| match &result {
                Ok(_) => Ok(i),
                Err(e) => Err(sqlx::Error::Protocol(e.to_string())),
            })
            .collect()
    })
}

#[tokio::test]
async fn merged_writes_arriving_while_the_writer_is_busy_share_one_call_and_each_hears_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path()).await;
    let merged = execd::db::Merged::new(put_many);
    const KEYS: [&str; 5] = ["m1", "m2", "m3", "m4", "m5"];
    let (first, answers) = tokio::join!(
        put(&db, "first", false, Duration::from_millis(200)),
        async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            futures::future::join_all(KEYS.map(|k| db.writer.write_merged(&merged, k))).await
        },
    );
    assert!(first);
    let answers: Vec<usize> = answers.into_iter().map(Result::unwrap).collect();
    assert_eq!(
        answers,
        [0, 1, 2, 3, 4],
        "each caller hears its own item's outcome"
    );
    assert_eq!(*CALLS.lock().unwrap(), [5], "one call for the five");
    assert_eq!(stored(&db).await, ["first", "m1", "m2", "m3", "m4", "m5"]);
}

#[tokio::test]
async fn a_merged_write_after_the_writer_stopped_is_answered_not_done() {
    let dir = tempfile::tempdir().unwrap();
    let stop = CancellationToken::new();
    let (db, writer) = Db::open(&dir.path().join("execd.db"), stop.clone())
        .await
        .unwrap();
    stop.cancel();
    writer.await.unwrap();
    let merged = execd::db::Merged::new(put_many);
    let answer = tokio::time::timeout(
        Duration::from_secs(5),
        db.writer.write_merged(&merged, "late"),
    )
    .await
    .expect("answered, not left waiting");
    assert!(
        matches!(answer, Err(execd::db::WriteError::NotDone)),
        "{answer:?}"
    );
}
