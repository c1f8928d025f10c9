//! Recovery at start: every execution left `running` by an earlier boot of
//! the agent is taken over (its owner changes, so the old boot's writes no
//! longer land) and then, within the start-up:
//! - re-attached, when its supervisor still runs or has recorded the end:
//!   output written meanwhile is picked up from the stored offset, kills work,
//!   and the status and callback follow as usual;
//! - queued again, its attempt not counted, when its program never started
//!   (its run directory holds no `supervisor.json`: the agent stopped while
//!   the program waited at its gate);
//! - resolved as lost otherwise (the machine rebooted, the supervisor was
//!   killed): whatever is left of the program is killed, the output its
//!   supervisor copied is stored, and the execution is queued again if it
//!   has attempts left, else failed with its callback.
//!
//! Then every sync run still queued is killed unrun (its caller went with
//! the earlier agent), and the run directories no job will use are removed
//! (`sweep`, also run at a stop).

use std::sync::Arc;

use super::job::{kill_leftovers, settled, Attached, Spawned};
use super::tail::Tail;
use super::{JobMeta, Runner, RunnerError};
use crate::db::executions::{self, Fence};
use crate::db::output;
use crate::domain::{Lane, Status, Stream};
use crate::supervisor::files::{Outcome, RunDir, Started};

/// How old a claim must be before the absence of its `supervisor.json`
/// means that its program never started.
const UNSTARTED_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// Who runs the job of `run` (its `supervisor.json`). If it is missing, it
/// is read again once the claim (made at `claimed_at`) is `UNSTARTED_AFTER`
/// old: a supervisor writes it just after its program's `exec`, so a gate
/// opened just before the agent stopped is not taken for a program that
/// never started.
async fn settled_started(run: &RunDir, claimed_at: Option<&str>) -> Option<Started> {
    let started = settled(|| run.read_started()).await;
    if started.is_some() || !run.path().is_dir() {
        return started;
    }
    let age = crate::domain::seconds_between(claimed_at, Some(&crate::db::now())).unwrap_or(0.0);
    let wait = UNSTARTED_AFTER.saturating_sub(std::time::Duration::from_secs_f64(age.max(0.0)));
    if wait.is_zero() {
        return None;
    }
    tokio::time::sleep(wait).await;
    settled(|| run.read_started()).await
}

/// What recovery found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    pub reattached: usize,
    pub lost: usize,
    /// Claimed, their programs never started: queued again.
    pub requeued: usize,
    /// Sync runs still queued, killed unrun: their callers are gone.
    pub unrun: usize,
    /// Run directories removed by `sweep`.
    pub swept: usize,
}

impl Runner {
    pub async fn recover(self: &Arc<Self>) -> Result<Recovered, RunnerError> {
        let mut recovered = Recovered::default();
        for row in executions::running(&self.db.readers).await? {
            let lane = match row.lane.as_str() {
                "sync" => Lane::Sync,
                "background" => Lane::Background,
                _ => Lane::Async,
            };
            let owner = self.config.owner.clone();
            let (id, attempt) = (row.id.clone(), row.attempt);
            let adopted = self
                .db
                .writer
                .write_one(move |c| {
                    Box::pin(async move { executions::adopt(c, &id, attempt, &owner).await })
                })
                .await?;
            if !adopted {
                continue;
            }
            let fence = Fence {
                id: row.id.clone(),
                owner: self.config.owner.clone(),
                attempt: row.attempt,
            };
            let run = RunDir::new(self.config.runs_dir.join(&row.id));
            let started = settled_started(&run, row.started_at.as_deref()).await;
            let unstarted = match settled(|| run.read_ended()).await {
                // Abandoned at its gate, its supervisor says.
                Some(ended) => ended.outcome == Outcome::Unstarted,
                None => run.path().is_dir(),
            };
            if started.is_none() && unstarted {
                // Claimed, and its program never passed its gate (the agent
                // stopped before its go; an unopened gate ends the program
                // unstarted): nothing of it ran, so it is queued again.
                let unclaimed = self
                    .db
                    .writer
                    .write_one(move |c| {
                        Box::pin(async move { executions::unclaim(c, &fence).await })
                    })
                    .await?;
                if unclaimed {
                    tracing::info!(execution_id = %row.id, "queued again: its program never started");
                    recovered.requeued += 1;
                }
                continue;
            }
            let alive = started.as_ref().is_some_and(|s| s.supervisor_alive());
            // Output is picked up from the stored offset.
            let next = |stream| output::next_seq(&self.db.readers, &row.id, row.attempt, stream);
            let mut tails = [
                Tail::new(
                    &run,
                    Stream::Stdout,
                    row.stdout_bytes as u64,
                    next(Stream::Stdout).await?,
                ),
                Tail::new(
                    &run,
                    Stream::Stderr,
                    row.stderr_bytes as u64,
                    next(Stream::Stderr).await?,
                ),
            ];
            if !(alive || run.ended().exists()) {
                kill_leftovers(&run);
                // What the supervisor copied before it went (the agent was
                // down meanwhile) is stored before the job is resolved.
                let [out, err] = &mut tails;
                tokio::join!(
                    out.pump(&fence, &self.db.writer, true),
                    err.pump(&fence, &self.db.writer, true)
                );
                let error = "the process was lost: its supervisor is gone (the machine restarted, or it was killed)";
                // Its run directory goes with the sweep below.
                self.lose(lane, &fence, error.to_string()).await?;
                recovered.lost += 1;
                continue;
            }
            let handle = self.register(&row.id);
            // Counts against its lane's limit; a job over the limit (the limit
            // was lowered) still runs on.
            let permit = self.permits[&lane].clone().try_acquire_owned().ok();
            // The pid, if the agent stopped before storing it; when the
            // program started is then known to the claim's precision.
            let unstored = match (&started, row.pid) {
                (Some(started), None) => Some(Spawned {
                    pid: i64::from(started.program_pid),
                    at: row.started_at.clone().unwrap_or_else(crate::db::now),
                }),
                _ => None,
            };
            let attached = Attached {
                run,
                watch: None,
                tails,
                started,
                unstored,
                // Stored at the first look, which is at once.
                pid_due: std::time::Instant::now(),
            };
            tracing::info!(execution_id = %row.id, "re-attached to a running job");
            let meta = JobMeta {
                language: row.language.clone(),
                started_at: row.started_at.clone(),
            };
            self.tasks.spawn(
                self.clone()
                    .run_attached(lane, fence, attached, meta, handle, permit),
            );
            recovered.reattached += 1;
        }
        // A sync run's caller waits on the agent that took it: one still
        // queued (or queued again above) would start with nobody to hear,
        // and the caller's retry would run the code twice. As at a stop,
        // it is killed unrun.
        let unrun = self
            .db
            .writer
            .write_one(|c| {
                Box::pin(async move {
                    let why =
                        "not started: the agent stopped first, and its caller's request with it";
                    executions::kill_queued_sync(c, why, &crate::db::now()).await
                })
            })
            .await?;
        recovered.unrun = usize::try_from(unrun).unwrap_or(usize::MAX);
        recovered.swept = self.sweep().await?;
        Ok(recovered)
    }

    /// Removes the run directories of this database's executions that are
    /// not running: a job prepared and never started (the agent stopped
    /// while the program waited at its gate), one lost at recovery, or one
    /// whose end was written but not its directory's removal. In a runs
    /// directory of this agent's alone, also one of an execution the
    /// database does not know, with no live supervisor: a submission
    /// prepares its job before its insert commits, and an agent killed in
    /// between leaves it. (A `--runs-dir` may be shared: there, such a
    /// directory may be another agent's, and is left alone.) Called where
    /// nothing is being prepared: at start before the runner starts, at a
    /// stop after it has stopped.
    pub async fn sweep(&self) -> Result<usize, RunnerError> {
        let Ok(entries) = std::fs::read_dir(&self.config.runs_dir) else {
            return Ok(0);
        };
        let mut swept = 0;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(id) = name.to_str().filter(|n| n.starts_with("exec_")) else {
                continue;
            };
            let unused = match executions::get(&self.db.readers, id).await? {
                Some(row) => row.status != Status::Running.as_str(),
                None => {
                    // One that cannot be read now is left for the next sweep.
                    self.config.runs_dir_private
                        && RunDir::new(entry.path())
                            .read_started()
                            .is_ok_and(|started| !started.is_some_and(|s| s.supervisor_alive()))
                }
            };
            if unused && std::fs::remove_dir_all(entry.path()).is_ok() {
                tracing::info!(execution_id = %id, "removed the run directory of a job not running");
                swept += 1;
            }
        }
        Ok(swept)
    }
}
