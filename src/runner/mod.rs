//! The runner pool: one claim loop per lane, each with its own concurrency
//! limit; a task per claimed execution that starts the job's supervisor,
//! follows its output into the database, passes kills on, and writes the
//! terminal status (with the callback, in the same transaction).
//!
//! Jobs belong to their supervisors, not to the agent: when the agent stops,
//! they run on; when it starts, `recover` re-attaches to each (see
//! `recover.rs`). Wake-ups are an in-process `Notify` per lane (a submission
//! wakes its lane at once; a freed slot, too, but the loop looks before it
//! claims); a slow tick re-checks the queue only as a safety net.

mod job;
mod launch;
mod recover;
mod registry;
mod runs_dir;
mod tail;
mod zygote;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::db::executions::{self, Claimed, ExecutionRow, Fence, Finish};
use crate::db::{self, Db};
use crate::delivery::{self, Deliverer};
use crate::domain::{seconds_between, Lane, Languages, Status};
use crate::supervisor::files::RunDir;
use job::{Attached, Followed};
use launch::NotStarted;
pub use launch::{start_supervisors, Launcher};
use registry::{Registry, Running, StopReason};
pub use runs_dir::RunsDir;
pub use zygote::Supervisors;

/// What the runner needs to know, fixed at start.
#[derive(Clone, Debug)]
pub struct RunnerConfig {
    /// This agent's boot id: the owner written on every claim.
    pub owner: String,
    pub languages: Languages,
    pub runs_dir: PathBuf,
    /// Whether `runs_dir` is this agent's alone (not a `--runs-dir`, which
    /// may be shared): its sweep then also removes the directories of
    /// executions the database does not know.
    pub runs_dir_private: bool,
    pub max_output_bytes: u64,
    pub kill_grace: Duration,
    pub poll_interval: Duration,
    pub concurrency: [(Lane, usize); 3],
    /// Output per stream in a callback payload.
    pub callback_output_bytes: usize,
    /// Python jobs forked from a warm interpreter (`--warm-python`).
    pub warm_python: bool,
}

/// What the metrics want to know of a job.
struct JobMeta {
    language: String,
    started_at: Option<String>,
}

/// The outcome of a kill request.
#[derive(Debug)]
pub enum KillOutcome {
    /// The row, after the kill (killed, or whatever it ended as meanwhile).
    Done(ExecutionRow),
    /// It had already finished; nothing changed.
    AlreadyFinished(ExecutionRow),
    NotFound,
}

pub struct Runner {
    db: Db,
    /// Woken when a terminal transition queued a callback.
    deliverer: Arc<Deliverer>,
    config: RunnerConfig,
    /// One per lane: a submission wakes its lane's claim loop at once.
    wake: HashMap<Lane, Notify>,
    /// One per lane: a slot freed by a job's end, whose own transaction
    /// found nothing left to claim. The loop looks before it claims.
    freed: HashMap<Lane, Notify>,
    /// One per lane: its concurrency limit, shared by claimed and re-attached jobs.
    permits: HashMap<Lane, Arc<Semaphore>>,
    /// Jobs followed by this agent, by execution id, so a kill can reach them.
    running: Registry,
    /// Execution ids as they reach a terminal status, for waiters (sync runs, kills).
    finished: broadcast::Sender<String>,
    /// Every job task, so shutdown can wait for them to let go.
    tasks: TaskTracker,
    /// Cancelled when the agent stops: loops end, waiters give up.
    stopping: CancellationToken,
    /// Prepares and starts each job's supervisor.
    launcher: Arc<Launcher>,
    /// Times in a row each job's program was abandoned at its gate.
    unstarted: std::sync::Mutex<HashMap<String, u32>>,
}

/// The open-file soft limit this process was started with, before
/// `raise_open_files`.
static STARTED_OPEN_FILES: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

/// Raises this process's open-file soft limit to its hard limit (the agent's
/// connections and database, and the zygote's socket per running job, need
/// more than the common 1,024), once; the limit it had is what programs
/// get (`program_open_files`). Returns the limits before and after.
pub fn raise_open_files() -> Option<(u64, u64)> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    let started = *STARTED_OPEN_FILES.get_or_init(|| soft);
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).ok()?;
    }
    Some((started, hard))
}

/// The open-file soft limit programs run with: the one the agent was
/// started with, once it raised its own.
fn program_open_files() -> Option<u64> {
    STARTED_OPEN_FILES.get().copied()
}

/// Times in a row a job whose program was abandoned at its gate is queued
/// again before it is lost instead.
const UNSTARTED_TRIES: u32 = 10;

/// How long a job that could not start for want of descriptors or memory
/// keeps its slot before it is queued again (at most `UNSTARTED_TRIES`
/// times in a row).
const PASSING_PAUSE: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error(transparent)]
    Read(#[from] sqlx::Error),
    #[error(transparent)]
    Write(#[from] db::WriteError),
}

impl Runner {
    /// A runner whose jobs' supervisors `supervisors` forks (see
    /// `start_supervisors`).
    pub fn new(
        db: Db,
        config: RunnerConfig,
        supervisors: Supervisors,
        deliverer: Arc<Deliverer>,
        stopping: CancellationToken,
    ) -> Arc<Runner> {
        let launcher = Launcher::new(config.clone(), supervisors);
        Arc::new(Runner {
            db,
            deliverer,
            wake: Lane::ALL.into_iter().map(|l| (l, Notify::new())).collect(),
            freed: Lane::ALL.into_iter().map(|l| (l, Notify::new())).collect(),
            permits: config
                .concurrency
                .into_iter()
                .map(|(lane, n)| (lane, Arc::new(Semaphore::new(n))))
                .collect(),
            config,
            running: Registry::default(),
            finished: broadcast::channel(1024).0,
            tasks: TaskTracker::new(),
            stopping,
            launcher,
            unstarted: std::sync::Mutex::default(),
        })
    }

    /// What wakes a live reader of job `id` (output stored, or its end),
    /// while this agent follows the job.
    pub fn stored_signal(&self, id: &str) -> Option<Arc<tokio::sync::Notify>> {
        self.running.get(id).map(|running| running.stored.clone())
    }

    /// Whether the agent is stopping.
    pub fn is_stopping(&self) -> bool {
        self.stopping.is_cancelled()
    }

    /// Starts the claim loops. When the agent stops they take no more work,
    /// and every followed job is let go (its output flushed) to its supervisor.
    pub fn start(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let runner = self.clone();
        tokio::spawn(async move { runner.launcher.warm_up().await });
        let loops = TaskTracker::new();
        for lane in Lane::ALL {
            loops.spawn(self.clone().claim_loop(lane));
        }
        loops.close();
        let runner = self.clone();
        tokio::spawn(async move {
            loops.wait().await;
            runner.let_go().await;
        })
    }

    /// Wakes the claim loop of `lane`: it has queued work.
    pub fn wake(&self, lane: Lane) {
        self.wake[&lane].notify_one();
    }

    /// Tells the claim loop of `lane` that a slot is free. A job's end claims
    /// the lane's next job in its own transaction; when that found none (or
    /// the write failed), only a submission that raced with it (queued while
    /// the slot was held) can be waiting, so the loop reads before it
    /// claims: a lane that runs out of work makes no empty write (and sync)
    /// per job.
    fn freed(&self, lane: Lane) {
        self.freed[&lane].notify_one();
    }

    async fn claim_loop(self: Arc<Self>, lane: Lane) {
        let mut tick = tokio::time::interval(self.config.poll_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Whether to read the queue before claiming: after a tick or a freed
        // slot, not after a submission's wake.
        let mut look = false;
        loop {
            // The safety tick looks before it claims: an idle agent writes
            // (and syncs) nothing. No slot is held while it looks: a
            // submission meanwhile takes one itself (its own claim, in its
            // insert's transaction).
            let room = self.permits[&lane].available_permits() > 0;
            let go = room && (!look || self.has_queued(lane).await);
            let mut held: Vec<_> = if go {
                std::iter::from_fn(|| self.try_permit(lane)).collect()
            } else {
                Vec::new()
            };
            if !held.is_empty() {
                let free = held.len();
                match self.claim(lane, free).await {
                    Ok(jobs) => {
                        let full = jobs.len() == free;
                        for job in jobs {
                            let permit = held.pop().expect("a permit per claimed job");
                            self.launch(lane, job, permit);
                        }
                        if full {
                            continue;
                        }
                    }
                    Err(e) => tracing::error!(error = %e, lane = lane.as_str(), "claim failed"),
                }
            }
            // Not held while waiting: a submission takes a free slot itself,
            // claiming in its insert's own transaction.
            drop(held);
            look = tokio::select! {
                () = self.stopping.cancelled() => break,
                () = self.wake[&lane].notified() => false,
                () = self.freed[&lane].notified() => true,
                _ = tick.tick() => true,
            };
        }
    }

    /// Whether `lane` has a queued execution (a read; true if it fails, so
    /// that the claim goes ahead).
    async fn has_queued(&self, lane: Lane) -> bool {
        executions::has_queued(&self.db.readers, lane)
            .await
            .unwrap_or(true)
    }

    /// Claims up to `limit` queued executions of `lane` in one statement.
    pub async fn claim(&self, lane: Lane, limit: usize) -> Result<Vec<Claimed>, db::WriteError> {
        let owner = self.config.owner.clone();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let launcher = self.launcher.clone();
        let writer = self.db.writer.clone();
        let running = self.running.clone();
        self.db
            .writer
            .write_one(move |c| {
                Box::pin(async move {
                    let jobs = executions::claim(c, lane, limit, &owner, &db::now()).await?;
                    running.register_on_commit(&jobs, &writer);
                    launcher.prelaunch(&jobs, &writer);
                    Ok(jobs)
                })
            })
            .await
    }

    /// What prepares a claimed job's start while its claim commits: call
    /// `prelaunch` with what a claim returned, in the claim's transaction.
    pub fn launcher(&self) -> Arc<Launcher> {
        self.launcher.clone()
    }

    /// A free slot of `lane`, unless the agent is stopping. A submission
    /// that gets one claims in its insert's own transaction (one commit, no
    /// hand-over to the claim loop) and then `launch`es what it claimed.
    pub fn try_permit(&self, lane: Lane) -> Option<OwnedSemaphorePermit> {
        if self.stopping.is_cancelled() {
            return None;
        }
        self.permits[&lane].clone().try_acquire_owned().ok()
    }

    /// This agent's owner id, written on every claim.
    pub fn owner(&self) -> &str {
        &self.config.owner
    }

    /// Runs a claimed job in the slot `permit` holds.
    pub fn launch(self: &Arc<Self>, lane: Lane, job: Claimed, permit: OwnedSemaphorePermit) {
        // Registered before the task starts, so a kill arriving meanwhile finds it.
        let handle = self.register(&job.id);
        self.tasks
            .spawn(self.clone().run_job(lane, job, handle, permit));
    }

    /// The stop switch of execution `id`, registered now unless it was at
    /// its claim's commit.
    fn register(&self, id: &str) -> Arc<Running> {
        self.running.handle(id)
    }

    /// Runs a claimed job and then, while the lane has queued work, the next
    /// one claimed in the same transaction as this one's end: the slot does
    /// not sit idle waiting for a wake-up and a claim of its own.
    async fn run_job(
        self: Arc<Self>,
        lane: Lane,
        mut job: Claimed,
        mut handle: Arc<Running>,
        permit: OwnedSemaphorePermit,
    ) {
        while let Some((next, next_handle)) = self.run_one(lane, job, &handle).await {
            job = next;
            handle = next_handle;
        }
        drop(permit);
        self.freed(lane);
    }

    #[tracing::instrument(skip_all, fields(execution_id = %job.id, lane = lane.as_str()))]
    async fn run_one(
        &self,
        lane: Lane,
        job: Claimed,
        handle: &Running,
    ) -> Option<(Claimed, Arc<Running>)> {
        let fence = Fence {
            id: job.id.clone(),
            owner: self.config.owner.clone(),
            attempt: job.attempt,
        };
        // Killed between the claim and the start: never run it, unless its
        // gate is open already (then it is followed, and the kill passed on).
        // (A job the agent's shutdown caught there starts all the same, and
        // is let go to its supervisor like every running job: it was claimed.)
        let killed = *handle.reason.lock().unwrap() == StopReason::Killed;
        let followed = if handle.stop.is_cancelled() && killed && self.launcher.forget(&job.id) {
            Followed::Ended(
                Finish {
                    status: Status::Killed,
                    exit_code: None,
                    error: Some("killed before it started".into()),
                    completed_at: db::now(),
                },
                Vec::new(),
                None,
            )
        } else {
            match self.start_job(&job).await {
                Ok(attached) => self.follow(&fence, attached, handle).await,
                // Nothing ran: queued again once the moment may have passed.
                Err(NotStarted {
                    error,
                    passing: true,
                }) => {
                    tokio::time::sleep(PASSING_PAUSE).await;
                    Followed::Unstarted(error)
                }
                Err(NotStarted { error, .. }) => Followed::Ended(
                    Finish {
                        status: Status::Failed,
                        exit_code: None,
                        error: Some(error),
                        completed_at: db::now(),
                    },
                    Vec::new(),
                    None,
                ),
            }
        };
        let meta = JobMeta {
            language: job.run.language.clone(),
            started_at: Some(job.started_at.clone()),
        };
        let chain = !self.stopping.is_cancelled();
        self.conclude(lane, &fence, meta, followed, chain).await
    }

    /// Follows a job re-attached after a restart, as `run_job` does.
    async fn run_attached(
        self: Arc<Self>,
        lane: Lane,
        fence: Fence,
        attached: Attached,
        meta: JobMeta,
        handle: Arc<Running>,
        permit: Option<OwnedSemaphorePermit>,
    ) {
        let followed = self.follow(&fence, attached, &handle).await;
        self.conclude(lane, &fence, meta, followed, false).await;
        drop(permit);
        self.wake(lane);
    }

    /// Writes how a followed job came out, and tidies its run directory once
    /// that is on disk. `meta` is for the run-time metric. With `chain`, the
    /// end's transaction also claims the lane's next queued job, returned.
    async fn conclude(
        &self,
        lane: Lane,
        fence: &Fence,
        meta: JobMeta,
        followed: Followed,
        chain: bool,
    ) -> Option<(Claimed, Arc<Running>)> {
        let mut next = None;
        let requeued = matches!(followed, Followed::Unstarted(_));
        let written = match followed {
            Followed::Detached => {
                self.running.remove(&fence.id);
                return None;
            }
            Followed::Ended(finish, output, spawned) => {
                tracing::info!(status = %finish.status, exit_code = ?finish.exit_code, "execution finished");
                if let Some(secs) =
                    seconds_between(meta.started_at.as_deref(), Some(&finish.completed_at))
                {
                    let labels = crate::metrics::RunLabels {
                        language: meta.language,
                        status: finish.status.to_string(),
                    };
                    crate::metrics::get()
                        .run_seconds
                        .get_or_create(&labels)
                        .observe(secs);
                }
                let output = Arc::new(output);
                self.until_written(|| {
                    let (fence, finish) = (fence.clone(), finish.clone());
                    let (output, spawned) = (output.clone(), spawned.clone());
                    let owner = self.config.owner.clone();
                    let launcher = self.launcher.clone();
                    let writer = self.db.writer.clone();
                    let running = self.running.clone();
                    self.end(lane.has_callbacks(), move |c| {
                        Box::pin(async move {
                            // The next job first: its preparation overlaps
                            // the rest of this transaction.
                            let next = match chain {
                                true => executions::claim(c, lane, 1, &owner, &db::now()).await?,
                                false => Vec::new(),
                            };
                            running.register_on_commit(&next, &writer);
                            launcher.prelaunch(&next, &writer);
                            let spawned = spawned.as_ref().map(|s| (s.pid, s.at.as_str()));
                            let ended =
                                executions::finish(c, &fence, &finish, spawned, &output).await?;
                            Ok((if ended { vec![fence.id] } else { vec![] }, next))
                        })
                    })
                })
                .await
                .map(|(ended, claimed)| {
                    // Registered at once, so a kill arriving meanwhile finds it.
                    next = claimed.into_iter().next().map(|job| {
                        let handle = self.register(&job.id);
                        (job, handle)
                    });
                    !ended.is_empty()
                })
            }
            Followed::Lost(error) => {
                self.until_written(|| self.lose(lane, fence, error.clone()))
                    .await
            }
            Followed::Unstarted(error) => self.unstart(lane, fence, error).await,
        };
        match written {
            Ok(true) if requeued => {}
            Ok(true) => {
                runs_dir::remove_run(&RunDir::new(self.config.runs_dir.join(&fence.id))).await;
            }
            Ok(false) => tracing::warn!("status not written: the execution is no longer ours"),
            Err(e) => tracing::error!(error = %e, "status not written"),
        }
        self.running.remove(&fence.id);
        if !requeued {
            self.unstarted.lock().unwrap().remove(&fence.id);
        }
        next
    }

    /// Runs the write `attempt` makes until it is written: a job's end must
    /// not be given up on while the database is locked or full for a while
    /// (its row would show it running until the next start). Gives up only
    /// when the agent stops: its run directory is kept, and the next start
    /// records the end from it.
    pub(crate) async fn until_written<T, F, Fut>(&self, mut attempt: F) -> Result<T, db::WriteError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, db::WriteError>>,
    {
        let mut pause = Duration::from_millis(100);
        loop {
            match attempt().await {
                Ok(value) => return Ok(value),
                Err(e) if self.stopping.is_cancelled() => return Err(e),
                Err(e) => tracing::error!(error = %e, "status not written; trying again"),
            }
            tokio::select! {
                () = self.stopping.cancelled() => {}
                () = tokio::time::sleep(pause) => {}
            }
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    }

    /// Queues again a job whose program never passed its gate, its attempt
    /// uncounted: nothing of it ran. Only a few times in a row: one that
    /// keeps being abandoned there is lost instead, with why.
    async fn unstart(
        &self,
        lane: Lane,
        fence: &Fence,
        error: String,
    ) -> Result<bool, db::WriteError> {
        let tries = {
            let mut unstarted = self.unstarted.lock().unwrap();
            let tries = unstarted.entry(fence.id.clone()).or_default();
            *tries += 1;
            *tries
        };
        if tries > UNSTARTED_TRIES {
            self.unstarted.lock().unwrap().remove(&fence.id);
            return self.lose(lane, fence, error).await;
        }
        // Its run directory goes first: once queued, it is prepared anew.
        runs_dir::remove_run(&RunDir::new(self.config.runs_dir.join(&fence.id))).await;
        let unclaimed = self
            .until_written(|| {
                let unclaim = fence.clone();
                self.db.writer.write_one(move |c| {
                    Box::pin(async move { executions::unclaim(c, &unclaim).await })
                })
            })
            .await?;
        if unclaimed {
            tracing::warn!(execution_id = %fence.id, %error, "queued again: its program never started");
            self.wake(lane);
        }
        Ok(unclaimed)
    }

    /// Resolves a job whose process is gone: queued again when it has
    /// attempts left, else failed (with its callback).
    async fn lose(&self, lane: Lane, fence: &Fence, error: String) -> Result<bool, db::WriteError> {
        tracing::warn!(execution_id = %fence.id, %error, "process lost");
        let fence = fence.clone();
        let (_, outcome) = self
            .end(lane.has_callbacks(), move |c| {
                Box::pin(async move {
                    let outcome = executions::lose(c, &fence, &error, &db::now()).await?;
                    let ended = match outcome {
                        Some(Status::Failed) => vec![fence.id],
                        _ => vec![],
                    };
                    Ok((ended, outcome))
                })
            })
            .await?;
        if outcome == Some(Status::Queued) {
            self.wake(lane);
        }
        Ok(outcome.is_some())
    }

    /// Waits until the execution `id` is terminal, `timeout` passes, or the
    /// agent stops, and returns its row as it is then (`None`: no such execution).
    pub async fn wait_terminal(
        &self,
        id: &str,
        timeout: Duration,
    ) -> Result<Option<ExecutionRow>, sqlx::Error> {
        let mut finished = self.finished.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let row = executions::get(&self.db.readers, id).await?;
            let Some(row) = row else { return Ok(None) };
            if row.status.parse::<Status>().is_ok_and(Status::is_terminal)
                || self.stopping.is_cancelled()
            {
                return Ok(Some(row));
            }
            // Re-read when this execution finishes, when we may have missed it
            // (lagged), or at least every second as a safety net.
            let wait_until = deadline.min(tokio::time::Instant::now() + Duration::from_secs(1));
            loop {
                tokio::select! {
                    () = self.stopping.cancelled() => break,
                    got = tokio::time::timeout_at(wait_until, finished.recv()) => match got {
                        Ok(Ok(done)) if done != row.id => continue,
                        Ok(Err(broadcast::error::RecvError::Closed)) => return Ok(Some(row)),
                        _ => break,
                    }
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return executions::get(&self.db.readers, id).await;
            }
        }
    }

    /// Kills execution `id`: a queued one at once, a running one through its
    /// supervisor (SIGTERM to the group, grace, SIGKILL), waiting until its
    /// status is written.
    pub async fn kill(&self, id: &str) -> Result<KillOutcome, RunnerError> {
        let Some(row) = executions::get(&self.db.readers, id).await? else {
            return Ok(KillOutcome::NotFound);
        };
        if row.status.parse::<Status>().is_ok_and(Status::is_terminal) {
            return Ok(KillOutcome::AlreadyFinished(row));
        }
        let exec_id = row.id.clone();
        let stop = |running: &Running| {
            *running.reason.lock().unwrap() = StopReason::Killed;
            running.stop.cancel();
        };
        // A running job is signalled at once, with no write first: its end
        // is recorded by its own task (which waits for a locked or full
        // database as long as it must).
        match self
            .running
            .get(&exec_id)
            .filter(|_| row.status == "running")
        {
            Some(running) => stop(&running),
            None => {
                let killed_queued = self
                    .kill_queued(&row, "killed before it started".into())
                    .await?;
                if !killed_queued {
                    if let Some(running) = self.running.get(&exec_id) {
                        stop(&running);
                    }
                }
            }
        }
        let wait = self.config.kill_grace + Duration::from_secs(5);
        match self.wait_terminal(&exec_id, wait).await? {
            Some(row) => Ok(KillOutcome::Done(row)),
            None => Ok(KillOutcome::NotFound),
        }
    }

    /// Kills `row` if it is still queued, with `error` as the reason (and
    /// its callback, in the same transaction). False when it is not queued.
    pub async fn kill_queued(
        &self,
        row: &ExecutionRow,
        error: String,
    ) -> Result<bool, db::WriteError> {
        let exec_id = row.id.clone();
        let (killed, ()) = self
            .end(row.callback_url.is_some(), move |c| {
                Box::pin(async move {
                    let killed = executions::kill_queued(c, &exec_id, &error, &db::now()).await?;
                    Ok((if killed { vec![exec_id] } else { vec![] }, ()))
                })
            })
            .await?;
        Ok(!killed.is_empty())
    }

    /// Lets go of every followed job (output flushed), leaving it to its
    /// supervisor, and waits for the job tasks to end.
    async fn let_go(&self) {
        let running = self.running.all();
        for job in running {
            // A kill asked for before the stop (its switch is thrown
            // already) is carried out, and the stop waits for it; any other
            // job is let go.
            let mut reason = job.reason.lock().unwrap();
            if !job.stop.is_cancelled() {
                *reason = StopReason::Shutdown;
            }
            drop(reason);
            job.stop.cancel();
        }
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Writes a terminal transition (`change` returns the executions it
    /// ended) and, in the same transaction, the callback of each async one,
    /// handed to the deliverer as soon as the transaction is synced; then
    /// wakes the waiters. Without `callbacks` (a lane that has none), no
    /// callback is looked for.
    /// `change` may return a value of its own beside the ids.
    async fn end<T, F>(
        &self,
        callbacks: bool,
        change: F,
    ) -> Result<(Vec<String>, T), db::WriteError>
    where
        T: Send + 'static,
        F: db::WriteFn<(Vec<String>, T)>,
    {
        let cap = self.config.callback_output_bytes;
        let lease = self.deliverer.lease();
        let deliverer = self.deliverer.clone();
        let writer = self.db.writer.clone();
        let (ended, value) = self
            .db
            .writer
            .write(move |c| {
                Box::pin(async move {
                    let (ended, value) = change(&mut *c).await?;
                    let mut due = Vec::new();
                    for id in ended.iter().filter(|_| callbacks) {
                        due.extend(delivery::enqueue(c, id, cap, lease.clone()).await?);
                    }
                    // Handed over the moment the end is durable; or, left
                    // unleased, claimed from the database.
                    writer.after_sync(move || match lease {
                        Some(_) => deliverer.dispatch(due),
                        None if !due.is_empty() => deliverer.wake(),
                        None => {}
                    });
                    Ok((ended, value))
                })
            })
            .await?;
        for id in &ended {
            let _ = self.finished.send(id.clone());
        }
        Ok((ended, value))
    }
}
