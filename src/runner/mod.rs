//! The runner pool: one claim loop per lane, each with its own concurrency
//! limit; a task per claimed execution that starts the program, captures its
//! output, enforces its timeout, answers kills, and writes the terminal status.
//!
//! Wake-ups are an in-process `Notify` per lane (a submission wakes its lane at
//! once); a slow tick re-checks the queue only as a safety net.

mod capture;
mod process;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use sqlx::SqliteConnection;
use tokio::sync::{broadcast, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::db::executions::{self, Claimed, ExecutionRow, Fence, Finish};
use crate::db::{self, Db};
use crate::delivery::{self, Deliverer};
use crate::domain::{Lane, Languages, Status, Stream};
use process::Launch;

pub use capture::FLUSH_INTERVAL;

/// What the runner needs to know, fixed at start.
#[derive(Clone, Debug)]
pub struct RunnerConfig {
    /// This agent's boot id: the owner written on every claim.
    pub owner: String,
    pub languages: Languages,
    pub runs_dir: PathBuf,
    pub max_output_bytes: u64,
    pub kill_grace: Duration,
    pub poll_interval: Duration,
    pub concurrency: [(Lane, usize); 3],
    /// Output per stream in a callback payload.
    pub callback_output_bytes: usize,
}

/// Why a running job is being stopped from outside.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StopReason {
    Killed,
    Shutdown,
}

/// A running job's stop switch.
struct Running {
    /// Cancelled to stop the job; `reason` says why.
    stop: CancellationToken,
    reason: Mutex<StopReason>,
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
    /// Jobs running in this agent, by execution id, so a kill can reach them.
    running: Mutex<HashMap<String, Arc<Running>>>,
    /// Execution ids as they reach a terminal status, for waiters (sync runs, kills).
    finished: broadcast::Sender<String>,
    /// Every job task, so shutdown can wait for them.
    tasks: TaskTracker,
}

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error(transparent)]
    Read(#[from] sqlx::Error),
    #[error(transparent)]
    Write(#[from] db::WriteError),
}

impl Runner {
    pub fn new(db: Db, config: RunnerConfig, deliverer: Arc<Deliverer>) -> Arc<Runner> {
        Arc::new(Runner {
            db,
            deliverer,
            wake: Lane::ALL.into_iter().map(|l| (l, Notify::new())).collect(),
            config,
            running: Mutex::new(HashMap::new()),
            finished: broadcast::channel(1024).0,
            tasks: TaskTracker::new(),
        })
    }

    pub fn languages(&self) -> &Languages {
        &self.config.languages
    }

    /// Starts the claim loops. They stop taking work when `shutdown` is
    /// cancelled; `drain` then stops the running jobs and waits for them.
    pub fn start(self: &Arc<Self>, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        let loops = TaskTracker::new();
        for (lane, concurrency) in self.config.concurrency {
            loops.spawn(self.clone().claim_loop(lane, concurrency, shutdown.clone()));
        }
        loops.close();
        let runner = self.clone();
        tokio::spawn(async move {
            loops.wait().await;
            runner.drain().await;
        })
    }

    /// Wakes the claim loop of `lane`.
    pub fn wake(&self, lane: Lane) {
        self.wake[&lane].notify_one();
    }

    async fn claim_loop(
        self: Arc<Self>,
        lane: Lane,
        concurrency: usize,
        shutdown: CancellationToken,
    ) {
        let permits = Arc::new(Semaphore::new(concurrency));
        let mut tick = tokio::time::interval(self.config.poll_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let free = permits.available_permits();
            if free > 0 && !shutdown.is_cancelled() {
                match self.claim(lane, free).await {
                    Ok(jobs) => {
                        let full = jobs.len() == free;
                        for job in jobs {
                            let permit = permits
                                .clone()
                                .try_acquire_owned()
                                .expect("a permit per claimed job");
                            // Registered before the task starts, so a kill
                            // arriving meanwhile finds it.
                            let handle = self.register(&job.id);
                            self.tasks
                                .spawn(self.clone().run_job(lane, job, handle, permit));
                        }
                        if full {
                            continue;
                        }
                    }
                    Err(e) => tracing::error!(error = %e, lane = lane.as_str(), "claim failed"),
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = self.wake[&lane].notified() => {}
                _ = tick.tick() => {}
            }
        }
    }

    /// Claims up to `limit` queued executions of `lane` in one statement.
    pub async fn claim(&self, lane: Lane, limit: usize) -> Result<Vec<Claimed>, db::WriteError> {
        let owner = self.config.owner.clone();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.db
            .writer
            .write(move |c| {
                Box::pin(async move { executions::claim(c, lane, limit, &owner, &db::now()).await })
            })
            .await
    }

    fn register(&self, id: &str) -> Arc<Running> {
        let handle = Arc::new(Running {
            stop: CancellationToken::new(),
            reason: Mutex::new(StopReason::Killed),
        });
        self.running
            .lock()
            .unwrap()
            .insert(id.to_string(), handle.clone());
        handle
    }

    #[tracing::instrument(skip_all, fields(execution_id = %job.id, lane = lane.as_str()))]
    async fn run_job(
        self: Arc<Self>,
        lane: Lane,
        job: Claimed,
        handle: Arc<Running>,
        permit: OwnedSemaphorePermit,
    ) {
        let fence = Fence {
            id: job.id.clone(),
            owner: self.config.owner.clone(),
            attempt: job.attempt,
        };
        let run_dir = self.config.runs_dir.join(&job.id);
        let finish = self.execute(&job, &fence, &handle, &run_dir).await;
        let _ = tokio::fs::remove_dir_all(&run_dir).await;
        tracing::info!(status = %finish.status, exit_code = ?finish.exit_code, "execution finished");
        let written = {
            let fence = fence.clone();
            self.end(move |c| {
                Box::pin(async move {
                    let ended = executions::finish(c, &fence, &finish).await?;
                    Ok(if ended { vec![fence.id] } else { vec![] })
                })
            })
            .await
        };
        match written {
            Ok(ended) if ended.is_empty() => {
                tracing::warn!("terminal status not written: the execution is no longer ours")
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "terminal status not written"),
        }
        self.running.lock().unwrap().remove(&job.id);
        drop(permit);
        self.wake(lane);
    }

    /// Runs the program of `job` to its end and says how it ended.
    async fn execute(
        &self,
        job: &Claimed,
        fence: &Fence,
        handle: &Running,
        run_dir: &std::path::Path,
    ) -> Finish {
        let failed = |error: String| Finish {
            status: Status::Failed,
            exit_code: None,
            error: Some(error),
            completed_at: db::now(),
        };
        if handle.stop.is_cancelled() {
            // Stopped between the claim and the start: never run it.
            return Finish {
                status: Status::Killed,
                exit_code: None,
                error: Some("killed before it started".into()),
                completed_at: db::now(),
            };
        }
        let mut launch = match self.launch(job, run_dir) {
            Ok(launch) => launch,
            Err(e) => return failed(format!("could not start: {e}")),
        };
        launch.working_dir = PathBuf::from(&job.working_dir);
        launch.env = serde_json::from_str(&job.env).unwrap_or_default();
        let mut child = match launch.spawn() {
            Ok(child) => child,
            Err(e) => return failed(format!("could not start {}: {e}", launch.program.display())),
        };
        let pid = child.id().expect("a child that was just spawned has a pid");
        tracing::debug!(pid, "program started");
        {
            let fence = fence.clone();
            let pid = i64::from(pid);
            let stored = self
                .db
                .writer
                .write(move |c| Box::pin(async move { executions::set_pid(c, &fence, pid).await }))
                .await;
            if let Err(e) = stored {
                tracing::error!(error = %e, "pid not stored");
            }
        }
        let cap = self.config.max_output_bytes;
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let captures = [
            tokio::spawn(capture::capture(
                stdout,
                Stream::Stdout,
                fence.clone(),
                self.db.writer.clone(),
                cap,
            )),
            tokio::spawn(capture::capture(
                stderr,
                Stream::Stderr,
                fence.clone(),
                self.db.writer.clone(),
                cap,
            )),
        ];

        let timeout = Duration::from_millis(u64::try_from(job.timeout_ms).unwrap_or(1));
        let grace = self.config.kill_grace;
        let (status, exit, error) = tokio::select! {
            exit = child.wait() => (None, exit, None),
            () = tokio::time::sleep(timeout) => {
                let exit = process::terminate(&mut child, pid, grace).await;
                let secs = timeout.as_secs_f64();
                (Some(Status::Timeout), exit, Some(format!("timed out after {secs} s and was killed")))
            }
            () = handle.stop.cancelled() => {
                let exit = process::terminate(&mut child, pid, grace).await;
                match *handle.reason.lock().unwrap() {
                    StopReason::Killed => (Some(Status::Killed), exit, Some("killed through the API".to_string())),
                    StopReason::Shutdown => (Some(Status::Failed), exit, Some("the agent shut down while it ran".to_string())),
                }
            }
        };
        // Anything the program left behind in its group goes with it.
        process::signal_group(pid, nix::sys::signal::Signal::SIGKILL);
        // A grandchild that escaped the group may hold the pipes open: bound the wait.
        for capture in captures {
            let abort = capture.abort_handle();
            if tokio::time::timeout(Duration::from_secs(2), capture)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        let (exit_code, signal_error) = match exit {
            Ok(exit) => {
                let (code, why) = process::describe_exit(exit);
                (Some(code), why)
            }
            Err(e) => (None, Some(format!("could not wait for the program: {e}"))),
        };
        let status = status.unwrap_or_else(|| match (exit_code, &signal_error) {
            (Some(code), None) => Status::from_exit_code(code as i32),
            _ => Status::Failed,
        });
        let error = error
            .or(signal_error)
            .or_else(|| match (status, exit_code) {
                (Status::Failed, Some(code)) => Some(format!("exited with code {code}")),
                _ => None,
            });
        Finish {
            status,
            exit_code,
            error,
            completed_at: db::now(),
        }
    }

    fn launch(
        &self,
        job: &Claimed,
        run_dir: &std::path::Path,
    ) -> Result<Launch, process::LaunchError> {
        if job.language == "command" {
            let args = match &job.args {
                Some(json) => Some(
                    serde_json::from_str::<Vec<String>>(json)
                        .map_err(|e| process::LaunchError::BadRow(format!("args: {e}")))?,
                ),
                None => None,
            };
            return Ok(Launch::command(&job.code, args));
        }
        Launch::code(&self.config.languages, &job.language, &job.code, run_dir)
    }

    /// Waits until the execution `id` is terminal, or `timeout` passes, and
    /// returns its row as it is then (`None` when there is no such execution).
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
            if row.status.parse::<Status>().is_ok_and(Status::is_terminal) {
                return Ok(Some(row));
            }
            // Re-read when this execution finishes, when we may have missed it
            // (lagged), or at least every second as a safety net.
            let wait_until = deadline.min(tokio::time::Instant::now() + Duration::from_secs(1));
            loop {
                match tokio::time::timeout_at(wait_until, finished.recv()).await {
                    Ok(Ok(done)) if done != row.id => continue,
                    Ok(Err(broadcast::error::RecvError::Closed)) => return Ok(Some(row)),
                    _ => break,
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return executions::get(&self.db.readers, id).await;
            }
        }
    }

    /// Kills execution `id`: a queued one at once, a running one through its
    /// group (SIGTERM, grace, SIGKILL), waiting until its status is written.
    pub async fn kill(&self, id: &str) -> Result<KillOutcome, RunnerError> {
        let Some(row) = executions::get(&self.db.readers, id).await? else {
            return Ok(KillOutcome::NotFound);
        };
        if row.status.parse::<Status>().is_ok_and(Status::is_terminal) {
            return Ok(KillOutcome::AlreadyFinished(row));
        }
        let exec_id = row.id.clone();
        let killed_queued = {
            let exec_id = exec_id.clone();
            self.end(move |c| {
                Box::pin(async move {
                    let killed = executions::kill_queued(c, &exec_id, &db::now()).await?;
                    Ok(if killed { vec![exec_id] } else { vec![] })
                })
            })
            .await?
        };
        if !killed_queued.is_empty() {
            // Done: its status and callback are written.
        } else if let Some(running) = self.running.lock().unwrap().get(&exec_id) {
            *running.reason.lock().unwrap() = StopReason::Killed;
            running.stop.cancel();
        }
        let wait = self.config.kill_grace + Duration::from_secs(5);
        match self.wait_terminal(&exec_id, wait).await? {
            Some(row) => Ok(KillOutcome::Done(row)),
            None => Ok(KillOutcome::NotFound),
        }
    }

    /// Stops every running job (recorded as failed: the agent shut down) and
    /// waits for their status to be written.
    async fn drain(&self) {
        let running: Vec<_> = self.running.lock().unwrap().values().cloned().collect();
        for job in running {
            *job.reason.lock().unwrap() = StopReason::Shutdown;
            job.stop.cancel();
        }
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Resolves rows left `running` by an earlier boot of the agent: their
    /// programs died with it, so they are failed with a clear error.
    pub async fn recover(&self) -> Result<usize, db::WriteError> {
        let owner = self.config.owner.clone();
        let lost = self
            .end(move |c| {
                Box::pin(async move { executions::fail_lost(c, &owner, &db::now()).await })
            })
            .await?;
        Ok(lost.len())
    }

    /// Writes a terminal transition (`change` returns the executions it
    /// ended) and, in the same transaction, the callback of each async one;
    /// then wakes the waiters and the deliverer.
    async fn end<F>(&self, change: F) -> Result<Vec<String>, db::WriteError>
    where
        F: for<'c> FnOnce(
                &'c mut SqliteConnection,
            ) -> BoxFuture<'c, Result<Vec<String>, sqlx::Error>>
            + Send
            + 'static,
    {
        let cap = self.config.callback_output_bytes;
        let (ended, queued) = self
            .db
            .writer
            .write(move |c| {
                Box::pin(async move {
                    let ended = change(&mut *c).await?;
                    let mut queued = false;
                    for id in &ended {
                        queued |= delivery::enqueue(c, id, cap).await?;
                    }
                    Ok((ended, queued))
                })
            })
            .await?;
        if queued {
            self.deliverer.wake();
        }
        for id in &ended {
            let _ = self.finished.send(id.clone());
        }
        Ok(ended)
    }
}
