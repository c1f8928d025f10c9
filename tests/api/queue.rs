//! A submission that finds a free slot is stored claimed, in the insert's
//! own statement, against the real database layer: only when no older
//! submission waits in its lane, so it never runs ahead of one.

use execd::db::executions::{self, ClaimAs, Inserted};
use execd::db::{self, Db};
use execd::domain::{new_ids, Lane};
use tokio_util::sync::CancellationToken;

use crate::helpers::background_submission;

/// Stores a background submission, claimed by `boot_a` at `now` if `claim`;
/// its id and how it was stored.
async fn store(db: &Db, workdir: &std::path::Path, claim: bool, now: &str) -> (String, Inserted) {
    let submission = background_submission(workdir);
    let (id, process_id) = new_ids();
    let stored_as = id.to_string();
    let now = now.to_string();
    let inserted = db
        .writer
        .write(move |c| {
            Box::pin(async move {
                let claim_as = claim.then_some(ClaimAs {
                    owner: "boot_a",
                    now: &now,
                });
                executions::insert(c, &id, &process_id, &submission, None, &db::now(), claim_as)
                    .await
            })
        })
        .await
        .unwrap();
    (stored_as, inserted)
}

#[tokio::test]
async fn a_submission_is_stored_claimed_only_when_no_older_one_waits_in_its_lane() {
    let dir = tempfile::tempdir().unwrap();
    let stop = CancellationToken::new();
    let (db, writer) = Db::open(&dir.path().join("execd.db"), stop.clone())
        .await
        .unwrap();
    let now = db::now();

    // An empty lane: stored running, claimed as the claim would leave it.
    let (a, inserted) = store(&db, dir.path(), true, &now).await;
    let Inserted::New(Some(job)) = inserted else {
        panic!("not stored claimed: {inserted:?}");
    };
    assert_eq!(
        (job.id.as_str(), job.attempt, job.started_at.as_str()),
        (a.as_str(), 1, now.as_str())
    );
    assert_eq!(job.run.code, "echo hi");
    let row = executions::get(&db.readers, &a).await.unwrap().unwrap();
    assert_eq!(
        (row.status.as_str(), row.attempt, row.started_at.as_deref()),
        ("running", 1, Some(now.as_str()))
    );

    // One queued without a free slot; the next one has a slot, but the
    // queued one is older: it is stored queued too.
    let (b, inserted) = store(&db, dir.path(), false, &now).await;
    assert!(matches!(inserted, Inserted::New(None)), "{inserted:?}");
    let (c, inserted) = store(&db, dir.path(), true, &now).await;
    assert!(matches!(inserted, Inserted::New(None)), "{inserted:?}");
    let row = executions::get(&db.readers, &c).await.unwrap().unwrap();
    assert_eq!(
        (row.status.as_str(), row.attempt, row.started_at),
        ("queued", 0, None)
    );

    // The claim takes them oldest first.
    let claimed = db
        .writer
        .write(|c| {
            Box::pin(async move {
                executions::claim(c, Lane::Background, 2, "boot_a", &db::now()).await
            })
        })
        .await
        .unwrap();
    let ids: Vec<&str> = claimed.iter().map(|j| j.id.as_str()).collect();
    assert_eq!(ids, [b.as_str(), c.as_str()]);

    stop.cancel();
    writer.await.unwrap();
}
