//! Fenced writes, against the real database layer: once another owner has
//! taken a row over, a stale runner's writes change nothing.

use execd::db::executions::{self, Fence, Finish};
use execd::db::output::{self, Chunk};
use execd::db::{self, Db};
use execd::domain::{new_ids, Lane, Status, Stream};
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn a_stale_writer_changes_nothing_after_the_row_was_taken_over() {
    let dir = tempfile::tempdir().unwrap();
    let stop = CancellationToken::new();
    let (db, writer) = Db::open(&dir.path().join("execd.db"), stop.clone())
        .await
        .unwrap();
    let submission = crate::helpers::background_submission(dir.path());
    let (exec_id, process_id) = new_ids();
    db.writer
        .write(move |c| {
            Box::pin(async move {
                executions::insert(
                    c,
                    &exec_id,
                    &process_id,
                    &submission,
                    None,
                    &db::now(),
                    None,
                )
                .await
            })
        })
        .await
        .unwrap();
    let claimed = db
        .writer
        .write(|c| {
            Box::pin(async move {
                executions::claim(c, Lane::Background, 1, "boot_a", &db::now()).await
            })
        })
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    let (id, attempt) = (claimed[0].id.clone(), claimed[0].attempt);
    let stale = Fence {
        id: id.clone(),
        owner: "boot_a".into(),
        attempt,
    };
    let taken = {
        let id = id.clone();
        db.writer
            .write(move |c| {
                Box::pin(async move { executions::adopt(c, &id, attempt, "boot_b").await })
            })
            .await
            .unwrap()
    };
    assert!(taken);

    let chunk = Chunk {
        stream: Stream::Stdout,
        seq: 0,
        data: b"stale output".to_vec(),
        truncated: false,
    };
    let finish = Finish {
        status: Status::Completed,
        exit_code: Some(0),
        error: None,
        completed_at: db::now(),
    };
    let f = stale.clone();
    let wrote = db
        .writer
        .write(move |c| {
            Box::pin(async move {
                Ok([
                    output::append(c, &f, std::slice::from_ref(&chunk), &db::now()).await?,
                    executions::set_pid(c, &f, 4242, &db::now()).await?,
                    executions::finish(c, &f, &finish, None, &[]).await?,
                    executions::lose(c, &f, "stale", &db::now())
                        .await?
                        .is_some(),
                ])
            })
        })
        .await
        .unwrap();
    assert_eq!(wrote, [false; 4], "every stale write was refused");
    let row = executions::get(&db.readers, &id).await.unwrap().unwrap();
    assert_eq!(row.status, "running");
    assert_eq!(
        (row.pid, row.exit_code, row.error.as_deref()),
        (None, None, None)
    );
    assert!(output::read(&db.readers, &id, attempt, Stream::Stdout, 0)
        .await
        .unwrap()
        .is_empty());

    // The owner that took it over can.
    let owner = Fence {
        owner: "boot_b".into(),
        ..stale
    };
    let done = db
        .writer
        .write(move |c| {
            Box::pin(async move {
                let finish = Finish {
                    status: Status::Completed,
                    exit_code: Some(0),
                    error: None,
                    completed_at: db::now(),
                };
                executions::finish(c, &owner, &finish, None, &[]).await
            })
        })
        .await
        .unwrap();
    assert!(done);
    assert_eq!(
        executions::get(&db.readers, &id)
            .await
            .unwrap()
            .unwrap()
            .status,
        "completed"
    );
    stop.cancel();
    writer.await.unwrap();
}
