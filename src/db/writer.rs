//! The single writer: one connection, one task, group commits.
//!
//! Every write of the agent is a job sent to this task. The task takes the
//! first job that arrives and every other job already waiting (up to
//! `MAX_BATCH`), runs them in one `BEGIN IMMEDIATE` transaction, each inside
//! its own savepoint (a failing job rolls back alone; a job alone in its
//! transaction needs none: it is rolled back whole), commits once, and only
//! then answers each caller. So a caller that got `Ok` knows its write is on
//! disk, and throughput does not depend on one fsync per write.
//!
//! Writes of one kind that arrive together can also share a job, and so
//! their statements (`write_merged`): each statement is a round trip to
//! SQLite's thread, which costs far more than the statement, so a burst of
//! submissions is stored with one insert for many rows.
//!
//! The commit and its fsync are two steps (the connection runs with
//! `synchronous=NORMAL`, so `COMMIT` writes the WAL frames without syncing
//! them, and a thread of the writer's then syncs the WAL file): what a job
//! asked to run the moment its write is committed (`after_commit`: the start
//! of a claimed program) runs between the two, and every answer after the
//! second. The writer does not wait for the sync: it runs the next batch
//! while the disk syncs the last, and one sync answers every batch committed
//! before it began.
//! An fsync that fails leaves the disk and the page cache disagreeing about
//! what is written; the agent then stops at once, and its restart recovers
//! from what the disk holds.
//!
//! Checkpoints (copying the WAL's pages into the database file, with an
//! fsync of each) run on a connection of their own, `CHECKPOINT_EVERY`
//! after commits (in up to `CHECKPOINT_PASSES` passes), beside the writer
//! rather than inside it: SQLite's automatic checkpoint runs in the
//! connection whose commit crossed the threshold, and so held every write
//! behind two fsyncs and the copy (a job's 10 MiB of output kept its end
//! from being written for 40–50 ms). But the WAL starts over from its
//! beginning only after a checkpoint that left nothing behind, and under
//! steady writes one beside them always does (what was committed while it
//! copied): so once the WAL holds `FOLD_PAGES`, the writer checkpoints that
//! little rest itself between two batches, and the WAL starts over at the
//! next commit. Past
//! `WRITER_CHECKPOINT_PAGES` (readers holding the rest back), the writer
//! checkpoints after its commits, as SQLite would by itself.

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use sqlx::{Connection, SqliteConnection};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// Jobs taken into one transaction at most.
const MAX_BATCH: usize = 512;
/// Jobs waiting for the writer before senders wait too (backpressure).
const QUEUE: usize = 4096;
/// Committed batches waiting for their sync before the writer waits too.
const SYNC_AHEAD: usize = 64;
/// How long after a commit the checkpoint connection checkpoints: at most
/// once per this, and only after commits.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(200);
/// The WAL's size, in pages, past which the writer's own commits checkpoint
/// (SQLite's `wal_autocheckpoint`): about `journal_size_limit`.
pub(super) const WRITER_CHECKPOINT_PAGES: u32 = 16_384;
/// The WAL's size, in pages, from which the writer checkpoints what a
/// checkpoint beside it left, so that the WAL starts over (SQLite's own
/// threshold for a checkpoint: about 4 MiB).
const FOLD_PAGES: i64 = 1_000;
/// Checkpoint passes in a row at most, while each finds much committed
/// since the last (a sixteenth of `FOLD_PAGES`).
const CHECKPOINT_PASSES: usize = 4;

#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    #[error("database error: {0}")]
    Sql(Arc<sqlx::Error>),
    /// The writer stopped, or could not begin a transaction (logged).
    #[error("the database write did not complete")]
    NotDone,
}

impl From<sqlx::Error> for WriteError {
    fn from(e: sqlx::Error) -> Self {
        WriteError::Sql(Arc::new(e))
    }
}

/// Called after the batch's commit with its outcome; answers the caller.
type Reply = Box<dyn FnOnce(Result<(), WriteError>) + Send>;
/// A job: runs its statements on the writer connection, says whether they
/// succeeded (to keep or roll back its savepoint) and how to answer.
type Run = Box<dyn for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, (bool, Reply)> + Send>;

/// A job and whether it needs a savepoint of its own.
struct Job {
    run: Run,
    /// False for a job whose only write is a single statement: SQLite undoes
    /// a failed statement by itself, and two round trips are saved. Such a
    /// job can still fail after its statement did its work (reading what
    /// it returned, say); then the whole batch is rolled back, and every
    /// caller in it told so.
    guarded: bool,
    /// False for a job answered once committed, before the sync: one that
    /// nothing outside the agent acts on until a later write's sync covers
    /// it too (output, before its job's end).
    synced: bool,
}

/// What runs once the write job that asked for it is committed (or synced).
type Hook = Box<dyn FnOnce() + Send>;

/// Hooks asked for by the jobs of the batch being written.
#[derive(Default)]
struct Hooks {
    /// Run after `COMMIT`, before the sync.
    commit: Vec<Hook>,
    /// Run after the sync, before the callers are answered.
    sync: Vec<Hook>,
    /// Writes done by the batch's merged jobs beyond one each (for the
    /// writes-per-commit metric, which counts every caller's write).
    merged: usize,
}

/// A committed batch, for the sync thread: its hooks, then its callers.
type Committed = (Vec<Hook>, Vec<Reply>);

/// A write job's statements, run on the writer's connection in its
/// transaction.
pub trait WriteFn<T>:
    for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, Result<T, sqlx::Error>> + Send + 'static
{
}

impl<T, F> WriteFn<T> for F where
    F: for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, Result<T, sqlx::Error>>
        + Send
        + 'static
{
}

/// A handle to the writer task; cheap to clone.
#[derive(Clone)]
pub struct Writer {
    /// Jobs for the writer task. Bounded, so a flood of writes slows its
    /// producers instead of growing memory.
    jobs: mpsc::Sender<Job>,
    /// Hooks asked for by the jobs of the batch being written.
    hooks: Arc<Mutex<Hooks>>,
}

impl Writer {
    /// Starts the writer task on `conn` (opened with `synchronous=NORMAL`
    /// and `wal_autocheckpoint` at `WRITER_CHECKPOINT_PAGES`) for the
    /// database whose WAL file is `wal`, and the checkpoints on `checkpoints`.
    pub(super) fn start(
        conn: SqliteConnection,
        checkpoints: SqliteConnection,
        wal: PathBuf,
        shutdown: CancellationToken,
    ) -> (Writer, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let hooks = Arc::new(Mutex::new(Hooks::default()));
        let task = tokio::spawn(run(conn, checkpoints, rx, hooks.clone(), wal, shutdown));
        (Writer { jobs: tx, hooks }, task)
    }

    /// Runs `hook` as soon as the write job this is called from is committed,
    /// before its commit is synced to disk and before any caller is answered.
    /// Call it only from inside a write job's closure. If that job or its
    /// batch is rolled back, `hook` is dropped without running.
    pub fn after_commit(&self, hook: impl FnOnce() + Send + 'static) {
        self.hooks.lock().unwrap().commit.push(Box::new(hook));
    }

    /// Runs `hook` as soon as the write job this is called from is durable
    /// (its commit synced), on the thread that synced, before its caller is
    /// answered: what another task would otherwise do only once woken by
    /// the answer. Same rules as `after_commit`.
    pub fn after_sync(&self, hook: impl FnOnce() + Send + 'static) {
        self.hooks.lock().unwrap().sync.push(Box::new(hook));
    }

    /// Runs `f` in the next group commit and returns its result once committed.
    pub async fn write<T, F>(&self, f: F) -> Result<T, WriteError>
    where
        T: Send + 'static,
        F: WriteFn<T>,
    {
        self.write_as(true, f).await
    }

    /// Like `write`, for a job whose only write is one statement (reads
    /// around it are fine): it runs without a savepoint of its own.
    pub async fn write_one<T, F>(&self, f: F) -> Result<T, WriteError>
    where
        T: Send + 'static,
        F: WriteFn<T>,
    {
        self.write_as(false, f).await
    }

    /// `write` when `guarded` (the job may write more than once), else
    /// `write_one`: for a job that knows which only when it runs.
    pub async fn write_as<T, F>(&self, guarded: bool, f: F) -> Result<T, WriteError>
    where
        T: Send + 'static,
        F: WriteFn<T>,
    {
        self.submit(guarded, true, f).await
    }

    /// Like `write`, but answered as soon as it is committed, before its
    /// sync: for a write that nothing outside the agent acts on before a
    /// later write, whose own sync covers this one too (the WAL is synced in
    /// order). A job's output, say, whose end comes after it: the output
    /// of a program writing fast is stored while the last of it syncs.
    /// (A sync that fails stops the agent: no commit answered here is
    /// later undone while it runs.)
    pub async fn write_committed<T, F>(&self, f: F) -> Result<T, WriteError>
    where
        T: Send + 'static,
        F: WriteFn<T>,
    {
        self.submit(true, false, f).await
    }

    async fn submit<T, F>(&self, guarded: bool, synced: bool, f: F) -> Result<T, WriteError>
    where
        T: Send + 'static,
        F: WriteFn<T>,
    {
        let (reply_tx, reply_rx) = oneshot::channel();
        let run: Run = Box::new(move |conn| {
            Box::pin(async move {
                let result = f(conn).await;
                let ok = result.is_ok();
                let reply: Reply = Box::new(move |commit| {
                    let _ = reply_tx.send(settle(result, &commit));
                });
                (ok, reply)
            })
        });
        let job = Job {
            run,
            guarded,
            synced,
        };
        self.jobs.send(job).await.map_err(|_| WriteError::NotDone)?;
        reply_rx.await.map_err(|_| WriteError::NotDone)?
    }
}

/// What a caller hears: its statements' result, unless the batch's commit
/// failed.
fn settle<T>(
    result: Result<T, sqlx::Error>,
    commit: &Result<(), WriteError>,
) -> Result<T, WriteError> {
    match (result, commit) {
        (Ok(value), Ok(())) => Ok(value),
        (Err(e), _) => Err(WriteError::from(e)),
        (Ok(_), Err(e)) => Err(e.clone()),
    }
}

/// The statements of a merged write: given every item waiting, in order,
/// one outcome per item, in the same order. An item that fails must leave
/// nothing written (a statement that fails is undone by SQLite alone):
/// the job is never rolled back for it.
pub type MergedFn<I, O> =
    for<'c> fn(&'c mut SqliteConnection, Vec<I>) -> BoxFuture<'c, Vec<Result<O, sqlx::Error>>>;

/// A caller's item, and where its outcome goes.
type Waiting<I, O> = (I, oneshot::Sender<Result<O, WriteError>>);

/// Writes of one kind that wait together for one write job: see
/// `Writer::write_merged`. Cheap to clone.
pub struct Merged<I, O> {
    inner: Arc<MergedInner<I, O>>,
}

impl<I, O> Clone for Merged<I, O> {
    fn clone(&self) -> Self {
        Merged {
            inner: self.inner.clone(),
        }
    }
}

struct MergedInner<I, O> {
    /// Items whose job is queued and has not run yet. One job at most is
    /// queued for them: the caller that found this empty queued it.
    waiting: Mutex<Vec<Waiting<I, O>>>,
    run: MergedFn<I, O>,
}

impl<I, O> Merged<I, O> {
    pub fn new(run: MergedFn<I, O>) -> Self {
        Merged {
            inner: Arc::new(MergedInner {
                waiting: Mutex::new(Vec::new()),
                run,
            }),
        }
    }
}

/// The merged job's hold on the items waiting: a job dropped unrun (the
/// writer stopped, or could not begin its transaction) answers them
/// `NotDone` rather than leave them waiting for a job no longer queued.
struct MergedTake<I, O>(Option<Arc<MergedInner<I, O>>>);

impl<I, O> MergedTake<I, O> {
    /// The items waiting, taken away (once).
    fn take(&mut self) -> Option<Vec<Waiting<I, O>>> {
        let inner = self.0.take()?;
        let waiting = std::mem::take(&mut *inner.waiting.lock().unwrap());
        Some(waiting)
    }
}

impl<I, O> Drop for MergedTake<I, O> {
    fn drop(&mut self) {
        // Dropping the senders answers their callers.
        drop(self.take());
    }
}

impl Writer {
    /// Runs `item` with every other item of `merged` waiting, in one write
    /// job (one call of its statements), and returns its own outcome once
    /// committed and synced. Where `write` makes each caller's statement a
    /// round trip to SQLite's thread of its own (about 40 µs of CPU here),
    /// the items of a burst share one statement. The caller that finds none
    /// waiting queues the job; it takes whatever waits when it runs, and the
    /// next caller queues the next. A caller that gives up waiting (its
    /// request dropped) takes nothing away from the others.
    pub async fn write_merged<I, O>(&self, merged: &Merged<I, O>, item: I) -> Result<O, WriteError>
    where
        I: Send + 'static,
        O: Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let first = {
            let mut waiting = merged.inner.waiting.lock().unwrap();
            waiting.push((item, tx));
            waiting.len() == 1
        };
        if first {
            let job = merged_job(MergedTake(Some(merged.inner.clone())), self.hooks.clone());
            match self.jobs.try_send(job) {
                Ok(()) => {}
                // Queued by a task of its own, so that this caller giving up
                // does not leave the others with no job.
                Err(mpsc::error::TrySendError::Full(job)) => {
                    let jobs = self.jobs.clone();
                    tokio::spawn(async move { jobs.send(job).await });
                }
                // Dropped: the writer stopped, and every waiting item hears so.
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        rx.await.map_err(|_| WriteError::NotDone)?
    }
}

/// The write job of `Writer::write_merged`: takes the items waiting as it
/// runs, and answers each with its outcome after the sync.
fn merged_job<I, O>(mut take: MergedTake<I, O>, hooks: Arc<Mutex<Hooks>>) -> Job
where
    I: Send + 'static,
    O: Send + 'static,
{
    let statements = take.0.as_ref().expect("taken only when run").run;
    let run: Run = Box::new(move |conn| {
        Box::pin(async move {
            let waiting = take.take().expect("a job runs once");
            let (items, senders): (Vec<I>, Vec<_>) = waiting.into_iter().unzip();
            hooks.lock().unwrap().merged += items.len().saturating_sub(1);
            let outcomes = statements(conn, items).await;
            let reply: Reply = Box::new(move |commit| {
                for (sender, outcome) in senders.into_iter().zip(outcomes) {
                    let _ = sender.send(settle(outcome, &commit));
                }
            });
            // Each item that failed left nothing: nothing to roll back.
            (true, reply)
        })
    });
    Job {
        run,
        guarded: false,
        synced: true,
    }
}

#[tracing::instrument(name = "db_writer", skip_all)]
async fn run(
    mut conn: SqliteConnection,
    checkpoints: SqliteConnection,
    mut rx: mpsc::Receiver<Job>,
    hooks: Arc<Mutex<Hooks>>,
    wal: PathBuf,
    shutdown: CancellationToken,
) {
    let (committed, syncer) = WalSync::start(wal.clone());
    let wrote = Arc::new(tokio::sync::Notify::new());
    let fold = Arc::new(AtomicBool::new(false));
    let checkpoints_done = CancellationToken::new();
    let checkpointer = tokio::spawn(checkpoint(
        checkpoints,
        wrote.clone(),
        fold.clone(),
        checkpoints_done.clone(),
    ));
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        let first = tokio::select! {
            biased;
            job = rx.recv() => job,
            () = shutdown.cancelled() => {
                // Take no new jobs; finish the ones already queued.
                rx.close();
                rx.recv().await
            }
        };
        let Some(first) = first else { break };
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        // What the checkpoint beside the writer left (the commits made
        // while it copied): a few pages, and the WAL starts over at the
        // next commit.
        if fold.swap(false, Ordering::Relaxed) {
            checkpoint_passive(&mut conn, "the writer's rest").await;
        }
        commit_batch(&mut conn, &mut batch, &hooks, &committed).await;
        wrote.notify_one();
    }
    // Before the last checkpoint, which must not find this one under way.
    checkpoints_done.cancel();
    if checkpointer.await.is_err() {
        tracing::error!("the checkpoint task panicked");
    }
    if let Err(e) = final_checkpoint(&mut conn).await {
        tracing::warn!(error = %e, "the final checkpoint failed");
    }
    if let Err(e) = conn.close().await {
        tracing::warn!(error = %e, "closing the writer connection failed");
    }
    // Closed last, the connection removed the WAL.
    match std::fs::metadata(&wal).map(|m| m.len()) {
        Ok(0) => tracing::warn!(
            "an empty WAL is left: another connection had the database open at the stop; execd.db alone is whole"
        ),
        Ok(bytes) => tracing::warn!(
            bytes,
            "the WAL is left with commits a reader's open transaction held at the stop: copy execd.db with its -wal, or start the agent to fold them in"
        ),
        Err(_) => {}
    }
    // The last commits' callers are answered once their sync is done.
    drop(committed);
    if syncer.await.is_err() {
        tracing::error!("the WAL sync thread panicked");
    }
    tracing::debug!("database writer stopped");
}

async fn commit_batch(
    conn: &mut SqliteConnection,
    batch: &mut Vec<Job>,
    hooks: &Mutex<Hooks>,
    committed: &mpsc::Sender<Committed>,
) {
    let size = batch.len();
    let started = std::time::Instant::now();
    let mut replies = Vec::with_capacity(size);
    // Answered once committed, before the sync.
    let mut unsynced = Vec::new();
    let begun = sqlx::query("BEGIN IMMEDIATE").execute(&mut *conn).await;
    if let Err(e) = begun {
        // Run nothing; dropping a job answers its caller with `NotDone`.
        tracing::error!(error = %e, size, "cannot begin a write transaction");
        batch.clear();
        return;
    }
    // A job alone in its batch needs no savepoint: if it fails, the whole
    // transaction is rolled back (two statements fewer on an idle agent).
    let alone = size == 1;
    let mut failed_alone = false;
    // An unguarded job that failed among others: what its statement did
    // cannot be undone alone.
    let mut failed_unguarded = false;
    for job in batch.drain(..) {
        // The hooks this job asks for, dropped if its writes are undone.
        let asked_before = {
            let hooks = hooks.lock().unwrap();
            (hooks.commit.len(), hooks.sync.len())
        };
        let (ok, reply) = if !job.guarded || alone {
            let (ok, reply) = (job.run)(conn).await;
            failed_alone |= alone && !ok;
            failed_unguarded |= !alone && !ok;
            (ok, reply)
        } else {
            let _ = sqlx::query("SAVEPOINT job").execute(&mut *conn).await;
            let (ok, reply) = (job.run)(conn).await;
            if !ok {
                let _ = sqlx::query("ROLLBACK TO job").execute(&mut *conn).await;
            }
            let _ = sqlx::query("RELEASE job").execute(&mut *conn).await;
            (ok, reply)
        };
        if !ok {
            let mut hooks = hooks.lock().unwrap();
            hooks.commit.truncate(asked_before.0);
            hooks.sync.truncate(asked_before.1);
        }
        match job.synced {
            true => replies.push(reply),
            false => unsynced.push(reply),
        }
    }
    let asked = std::mem::take(&mut *hooks.lock().unwrap());
    let outcome = if failed_alone {
        let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
        Ok(())
    } else if failed_unguarded {
        tracing::error!(
            size,
            "a write failed after its statement ran; the whole batch is rolled back"
        );
        let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
        Err(WriteError::NotDone)
    } else {
        match sqlx::query("COMMIT").execute(&mut *conn).await {
            Ok(_) => Ok(()),
            Err(e) => {
                tracing::error!(error = %e, size, "group commit failed; rolling back");
                let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
                Err(WriteError::from(e))
            }
        }
    };
    let metrics = crate::metrics::get();
    metrics.db_batch_size.observe((size + asked.merged) as f64);
    metrics
        .db_commit_seconds
        .observe(started.elapsed().as_secs_f64());
    tracing::trace!(
        size,
        elapsed_us = started.elapsed().as_micros() as u64,
        "group commit"
    );
    if outcome.is_ok() && !failed_alone {
        for hook in asked.commit {
            hook();
        }
        for reply in unsynced {
            reply(Ok(()));
        }
        // Answered once synced, while this task runs the next batch.
        if committed.send((asked.sync, replies)).await.is_err() {
            // The sync thread is gone (it stops the agent when a sync
            // fails); dropping the replies answers `NotDone`.
            tracing::error!("no WAL sync thread; callers not answered");
        }
        return;
    }
    for reply in replies.into_iter().chain(unsynced) {
        reply(outcome.clone());
    }
}

/// Checkpoints on `conn`, a connection of its own, `CHECKPOINT_EVERY`
/// after a commit (`wrote`), without waiting for readers or the writer
/// (`PASSIVE`: what a reader still reads stays in the WAL for the next),
/// and asks the writer to `fold` the rest in once the WAL holds
/// `FOLD_PAGES`; until `done`, then closes `conn`.
async fn checkpoint(
    mut conn: SqliteConnection,
    wrote: Arc<tokio::sync::Notify>,
    fold: Arc<AtomicBool>,
    done: CancellationToken,
) {
    loop {
        tokio::select! {
            () = done.cancelled() => break,
            () = wrote.notified() => {}
        }
        tokio::select! {
            () = done.cancelled() => break,
            () = tokio::time::sleep(CHECKPOINT_EVERY) => {}
        }
        // Again while the last pass left much behind (what was committed
        // while it copied), so that what the writer folds in is little.
        let mut seen = 0;
        for _ in 0..CHECKPOINT_PASSES {
            // Another checkpoint under way (an operator's, or the writer's
            // own): the next commit asks again.
            let Some(wal) = checkpoint_passive(&mut conn, "beside the writer").await else {
                seen = 0;
                break;
            };
            let new = wal - seen;
            seen = wal;
            if new < FOLD_PAGES / 16 {
                break;
            }
        }
        if seen >= FOLD_PAGES {
            fold.store(true, Ordering::Relaxed);
        }
    }
    if let Err(e) = conn.close().await {
        tracing::warn!(error = %e, "closing the checkpoint connection failed");
    }
}

/// A `PASSIVE` checkpoint on `conn` (`by` says whose, in the log): the
/// pages in the WAL as it began, or `None` if it could not run.
async fn checkpoint_passive(conn: &mut SqliteConnection, by: &str) -> Option<i64> {
    let started = std::time::Instant::now();
    // busy, WAL pages, pages in the database file.
    let result = sqlx::query_as::<_, (i64, i64, i64)>("PRAGMA wal_checkpoint(PASSIVE)")
        .fetch_one(conn)
        .await;
    match result {
        Ok((busy, wal, copied)) => {
            tracing::trace!(
                by,
                busy,
                wal,
                copied,
                elapsed_us = started.elapsed().as_micros() as u64,
                "checkpoint"
            );
            Some(wal)
        }
        Err(e) => {
            tracing::debug!(by, error = %e, "checkpoint not done");
            None
        }
    }
}

/// Everything into the database file and the WAL emptied, whatever else
/// may still have the database open: closing the last connection removes
/// the WAL too, but only if it is the last. Without waiting: a reader's
/// open transaction keeps the frames it reads, and the stop goes on.
async fn final_checkpoint(conn: &mut SqliteConnection) -> Result<(), sqlx::Error> {
    sqlx::query("PRAGMA busy_timeout = 0")
        .execute(&mut *conn)
        .await?;
    sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(conn)
        .await?;
    Ok(())
}

/// Makes the WAL's committed frames durable: the fsync `synchronous=FULL`
/// would do inside `COMMIT`, done on a thread of its own after it, so the
/// writer runs the next batch meanwhile. One sync covers every commit made
/// before it starts: the thread takes all the batches waiting, syncs once,
/// and answers their callers.
struct WalSync {
    wal: PathBuf,
    /// The WAL file, opened at the first sync (SQLite creates it).
    file: Option<File>,
}

impl WalSync {
    /// Starts the sync thread; send it each committed batch's replies.
    fn start(wal: PathBuf) -> (mpsc::Sender<Committed>, tokio::task::JoinHandle<()>) {
        // A few batches ahead at most: past that the writer waits for the disk.
        let (tx, rx) = mpsc::channel(SYNC_AHEAD);
        let sync = WalSync { wal, file: None };
        (tx, tokio::task::spawn_blocking(move || sync.run(rx)))
    }

    fn run(mut self, mut committed: mpsc::Receiver<Committed>) {
        let mut waiting = Vec::new();
        while let Some(batch) = committed.blocking_recv() {
            waiting.push(batch);
            while let Ok(batch) = committed.try_recv() {
                waiting.push(batch);
            }
            let started = std::time::Instant::now();
            self.sync();
            crate::metrics::get()
                .db_sync_seconds
                .observe(started.elapsed().as_secs_f64());
            for (hooks, replies) in waiting.drain(..) {
                for hook in hooks {
                    hook();
                }
                for reply in replies {
                    reply(Ok(()));
                }
            }
        }
    }

    /// Syncs the WAL file, or stops the agent if that fails.
    fn sync(&mut self) {
        let file = match &self.file {
            Some(file) => file,
            None => match self.open() {
                Ok(file) => self.file.insert(file),
                Err(e) => fatal(&self.wal, &e),
            },
        };
        if let Err(e) = file.sync_data() {
            fatal(&self.wal, &e);
        }
    }

    /// Opens the WAL file, and syncs its directory once, so the file's own
    /// entry is durable too.
    fn open(&self) -> std::io::Result<File> {
        let file = File::open(&self.wal)?;
        if let Some(dir) = self.wal.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        Ok(file)
    }
}

/// A commit that cannot be made durable: nothing written since can be
/// trusted to be on disk, so the agent stops before answering anyone.
fn fatal(wal: &std::path::Path, e: &std::io::Error) -> ! {
    tracing::error!(error = %e, wal = %wal.display(), "cannot sync the database's WAL; stopping");
    eprintln!("execd: cannot sync {}: {e}; stopping", wal.display());
    std::process::exit(70);
}
