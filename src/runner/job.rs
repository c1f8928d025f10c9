//! One job, from the agent's side: prepare its run directory, start its
//! supervisor (detached, so the job outlives the agent), and follow it —
//! output into the database, kills passed on — until it ends, is lost, or the
//! agent stops and leaves it to its supervisor.

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

use super::launch::{NotStarted, Ready, HANDSHAKE_TIMEOUT};
use super::tail::{Tail, FLUSH_INTERVAL};
use super::zygote::Watch;
use super::{Runner, Running, StopReason};
use crate::db::executions::{self, Claimed, Fence, Finish};
use crate::db::output::Chunk;
use crate::domain::{Status, Stream};
use crate::supervisor::files::{self, Ended, Outcome, RunDir, Started};

/// How long a silent job's pid may wait for a write to go with (its first
/// output's, or its end's) before it is stored alone: a silent job shorter
/// than this is two commits (its insert and its end), and the API shows a
/// silent running job's pid within about this delay.
const PID_DELAY: std::time::Duration = std::time::Duration::from_secs(1);

/// How a followed job came out.
pub enum Followed {
    /// With the last of its output and, unless stored already, its
    /// program's pid: all for the end's own write.
    Ended(Finish, Vec<Chunk>, Option<Spawned>),
    /// Its supervisor is gone without saying how the job ended.
    Lost(String),
    /// Its program never passed its gate, abandoned there (the zygote
    /// went): nothing ran, and the job may run again.
    Unstarted(String),
    /// The agent is stopping; the supervisor carries on.
    Detached,
}

/// A job's supervisor as the agent holds it.
pub struct Attached {
    pub run: RunDir,
    /// The supervisor's reports, when this agent started it (its end wakes
    /// us at once); `None` for one adopted after a restart (followed by
    /// polling the run directory).
    pub watch: Option<Watch>,
    pub tails: [Tail; 2],
    /// Who runs the job, once read from the run directory.
    pub started: Option<Started>,
    /// The program's pid, known but not stored yet: it goes with the job's
    /// first stored output or its end, or alone at the first tick after
    /// `pid_due`, whichever comes first.
    pub unstored: Option<Spawned>,
    /// When an unstored pid is stored even with nothing to go with.
    pub pid_due: std::time::Instant,
}

/// A started program: its pid, and when its gate opened.
#[derive(Clone)]
pub struct Spawned {
    pub pid: i64,
    pub at: String,
}

impl Attached {
    /// Who runs the job: `supervisor.json`, read once (it never changes);
    /// an error when that cannot be told now (`files::passing`).
    fn started(&mut self) -> std::io::Result<Option<&Started>> {
        if self.started.is_none() {
            self.started = self.run.read_started()?;
        }
        Ok(self.started.as_ref())
    }
}

/// What `read` finds, once it can tell: the run directory and `/proc`
/// cannot be read while the agent is out of descriptors or memory (a flood
/// of connections), and that says nothing of the job. Tried again, backing
/// off to a second, for as long as it takes.
pub(super) async fn settled<T>(mut read: impl FnMut() -> std::io::Result<T>) -> T {
    let mut wait = std::time::Duration::from_millis(10);
    let mut said = false;
    loop {
        match read() {
            Ok(found) => return found,
            Err(e) => {
                if !said {
                    tracing::warn!(error = %e, "a run directory cannot be read now; trying again");
                    said = true;
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(std::time::Duration::from_secs(1));
            }
        }
    }
}

impl Runner {
    /// Starts the job's program (prepared while its claim committed, its
    /// gate opened once it was): returns once it runs (its pid known, to be
    /// stored by `follow`) or could not start.
    pub(super) async fn start_job(&self, job: &Claimed) -> Result<Attached, NotStarted> {
        let Ready {
            mut watch,
            first,
            opened_at,
        } = self.launcher.take(job).await?;
        let run = RunDir::new(self.config.runs_dir.join(&job.id));
        let attached = |watch: Watch| Attached {
            tails: [
                Tail::new(&run, Stream::Stdout, 0, 0),
                Tail::new(&run, Stream::Stderr, 0, 0),
            ],
            run: run.clone(),
            watch: Some(watch),
            started: None,
            unstored: None,
            pid_due: std::time::Instant::now() + PID_DELAY,
        };
        // Nothing was forked to run (`error …` or `end`): status.json tells,
        // or follow() finds the job lost. Otherwise the program runs since
        // its gate opened (its pid known, its `exec` under way).
        let Some(spawned_at) = opened_at else {
            if first == crate::supervisor::CANNOT_FORK {
                // The zygote is out of descriptors or processes for now.
                return Err(NotStarted {
                    error: "could not start: the zygote could not fork a supervisor".into(),
                    passing: true,
                });
            }
            return Ok(attached(watch));
        };
        let Some(pid) = first
            .strip_prefix("pid ")
            .and_then(|pid| pid.parse::<i64>().ok())
        else {
            tracing::warn!("the supervisor did not report the program's pid in time");
            return Ok(attached(watch));
        };
        // `started` once it has `exec`ed and `supervisor.json` is written;
        // `error …` (with status.json written) if it could not start.
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, watch.next()).await {
            Ok(line) if line == "started" => {
                tracing::info!(pid, "execution started");
                let mut job = attached(watch);
                job.unstored = Some(Spawned {
                    pid,
                    at: spawned_at,
                });
                return Ok(job);
            }
            Ok(_) => {}
            Err(_) => tracing::warn!("the supervisor did not report the program's start in time"),
        }
        Ok(attached(watch))
    }

    /// Stores the program's pid, if it is not stored yet.
    async fn store_pid(&self, fence: &Fence, job: &mut Attached) {
        let Some(spawned) = job.unstored.take() else {
            return;
        };
        let (fence, Spawned { pid, at }) = (fence.clone(), spawned.clone());
        let stored = self
            .db
            .writer
            .write_one(move |c| {
                Box::pin(async move { executions::set_pid(c, &fence, pid, &at).await })
            })
            .await;
        if let Err(e) = stored {
            // Kept for the next try, or for the end's own write.
            tracing::error!(error = %e, "pid not stored yet");
            job.unstored = Some(spawned);
        }
    }

    /// Follows a job until it ends, is lost, or the agent stops.
    pub(super) async fn follow(
        &self,
        fence: &Fence,
        mut job: Attached,
        handle: &Running,
    ) -> Followed {
        // A job this agent started is looked at after a tick (its end and
        // its output wake us before); one adopted after a restart, at once.
        let first = tokio::time::Instant::now()
            + if job.watch.is_some() {
                FLUSH_INTERVAL
            } else {
                std::time::Duration::ZERO
            };
        let mut tick = tokio::time::interval_at(first, FLUSH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut kill_sent = false;
        loop {
            let supervisor_end = async {
                match &job.watch {
                    Some(watch) => watch.ended.notified().await,
                    None => std::future::pending().await,
                }
            };
            let output_waiting = async {
                match &job.watch {
                    Some(watch) => watch.output.notified().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                () = handle.stop.cancelled(), if !kill_sent => {
                    let reason = *handle.reason.lock().unwrap();
                    match reason {
                        StopReason::Shutdown => {
                            // The pid with the last output, or alone.
                            self.pump(fence, &mut job, handle, false).await;
                            self.store_pid(fence, &mut job).await;
                            return Followed::Detached;
                        }
                        StopReason::Killed => {
                            kill_sent = true;
                            match job.started() {
                                Ok(Some(started)) if started.supervisor_alive() => {
                                    let _ = started.request_kill();
                                }
                                // Asked again shortly.
                                Err(_) => {
                                    tokio::time::sleep(FLUSH_INTERVAL).await;
                                    kill_sent = false;
                                }
                                Ok(_) => break,
                            }
                        }
                    }
                }
                () = supervisor_end => break,
                () = output_waiting => self.pump(fence, &mut job, handle, false).await,
                _ = tick.tick() => {
                    self.pump(fence, &mut job, handle, false).await;
                    // Without a report (adopted; or the supervisor was
                    // killed before it could say so), the run directory
                    // tells; what cannot be read now tells nothing yet.
                    let gone = job
                        .started()
                        .is_ok_and(|started| !started.is_some_and(Started::supervisor_alive));
                    if job.run.ended().exists() || gone {
                        break;
                    }
                }
            }
        }
        let ended = settled(|| job.run.read_ended()).await;
        let never_started = ended.is_none() && settled(|| Ok(job.started()?.is_none())).await;
        match ended {
            Some(ended) if ended.outcome == Outcome::Unstarted => {
                Followed::Unstarted(ended.error.unwrap_or_default())
            }
            Some(ended) => {
                // Everything the supervisor wrote before it ended: the last
                // of it is stored with the end, in one commit.
                let writer = &self.db.writer;
                let [out, err] = &mut job.tails;
                let (mut rest, err_rest) =
                    tokio::join!(out.rest(fence, writer), err.rest(fence, writer));
                rest.extend(err_rest);
                Followed::Ended(finish_of(&ended), rest, job.unstored.take())
            }
            // No supervisor recorded a start (it writes supervisor.json as
            // soon as its program has `exec`ed): the job line never reached
            // one (its zygote died first), or its program was abandoned at
            // its gate unrecorded. Nothing ran.
            None if never_started => Followed::Unstarted(
                "its program never started: its zygote went before the go".into(),
            ),
            None => {
                // The program is gone: all it wrote is stored, the start
                // of a character it never finished too.
                self.pump(fence, &mut job, handle, true).await;
                self.store_pid(fence, &mut job).await;
                kill_leftovers(&job.run);
                Followed::Lost("the process was lost: its supervisor ended without recording how the job ended".into())
            }
        }
    }

    /// Stores the new output, and with its first write the program's pid
    /// if that is not stored yet (the API shows it before the output); with
    /// no new output, the pid alone once it is due. `gone`: as `Tail::pump`.
    /// Live readers waiting on `handle` are woken when anything was stored.
    async fn pump(&self, fence: &Fence, job: &mut Attached, handle: &Running, gone: bool) {
        // Both streams get it: whichever stores output first writes it (both
        // do, once, when both have output in the same pump). Deciding here
        // which has output would race with the program printing.
        if let Some(spawned) = job.unstored.take() {
            for tail in &mut job.tails {
                tail.along = Some(spawned.clone());
            }
        }
        let writer = &self.db.writer;
        let [out, err] = &mut job.tails;
        let before = (out.stored(), err.stored());
        tokio::join!(out.pump(fence, writer, gone), err.pump(fence, writer, gone));
        if (out.stored(), err.stored()) != before {
            handle.stored.notify_waiters();
        }
        // Neither stored output: kept for the next write or the end, or
        // stored alone once due.
        if let (Some(spawned), Some(_)) = (out.along.take(), err.along.take()) {
            job.unstored = Some(spawned);
            if std::time::Instant::now() >= job.pid_due {
                self.store_pid(fence, job).await;
            }
        }
    }
}

/// Kills whatever is left of a job whose supervisor is gone: nothing of a
/// job may run on unsupervised. Only what is found to be the job's own:
/// the program's pid, and so its group id, may have been reused by now.
pub fn kill_leftovers(run: &RunDir) {
    let id = run.path().file_name().map(|id| id.to_string_lossy());
    let Ok(Some(started)) = run.read_started() else {
        // Who ran it is not known here (its run directory is elsewhere:
        // `--runs-dir` changed at a restart): what carries its mark is
        // its own, whenever it started.
        if let Some(id) = id {
            for pid in files::marked(&id, 0) {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
        }
        return;
    };
    let leftovers = started.leftovers();
    if !leftovers.is_empty() {
        // The group is the job's: one signal takes a member forked since too.
        let _ = killpg(Pid::from_raw(started.program_pid as i32), Signal::SIGKILL);
    }
    // And what left the group (`setsid`, a daemon), by its environment's mark.
    let marked = match (started.boot_id == files::boot_id(), id) {
        (true, Some(id)) => files::marked(&id, started.program_start),
        _ => Vec::new(),
    };
    for pid in leftovers.into_iter().chain(marked) {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
}

/// The terminal status of a job from how its supervisor saw it end.
pub fn finish_of(ended: &Ended) -> Finish {
    let signal_text = |sig: i32| {
        Signal::try_from(sig)
            .map(|s| s.as_str().to_string())
            .unwrap_or_else(|_| sig.to_string())
    };
    // The shell's convention for a death by signal: 128 + N.
    let exit_code = match (ended.exit_code, ended.signal) {
        (Some(code), _) => Some(i64::from(code)),
        (None, Some(sig)) => Some(128 + i64::from(sig)),
        (None, None) => None,
    };
    let (status, error) = match ended.outcome {
        Outcome::Exited => match (ended.exit_code, ended.signal) {
            (Some(code), _) => (
                Status::from_exit_code(code),
                (code != 0).then(|| format!("exited with code {code}")),
            ),
            (None, Some(sig)) => (
                Status::Failed,
                Some(format!("terminated by signal {}", signal_text(sig))),
            ),
            (None, None) => (Status::Failed, Some("ended without an exit status".into())),
        },
        Outcome::Timeout => (Status::Timeout, ended.error.clone()),
        Outcome::Killed => (Status::Killed, ended.error.clone()),
        Outcome::Terminated | Outcome::FailedToStart | Outcome::Unstarted => {
            (Status::Failed, ended.error.clone())
        }
    };
    Finish {
        status,
        exit_code,
        error,
        completed_at: ended.ended_at.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ended(outcome: Outcome, exit_code: Option<i32>, signal: Option<i32>) -> Ended {
        Ended {
            outcome,
            exit_code,
            signal,
            error: Some("why".into()),
            ended_at: "t".into(),
        }
    }

    #[test]
    fn how_a_job_ended_maps_to_the_status_of_the_contract() {
        let f = finish_of(&ended(Outcome::Exited, Some(0), None));
        assert_eq!(
            (f.status, f.exit_code, f.error),
            (Status::Completed, Some(0), None)
        );
        let f = finish_of(&ended(Outcome::Exited, Some(3), None));
        assert_eq!(
            (f.status, f.error.as_deref()),
            (Status::Failed, Some("exited with code 3"))
        );
        let f = finish_of(&ended(Outcome::Exited, None, Some(9)));
        assert_eq!((f.status, f.exit_code), (Status::Failed, Some(137)));
        assert_eq!(f.error.as_deref(), Some("terminated by signal SIGKILL"));
        assert_eq!(
            finish_of(&ended(Outcome::Timeout, None, Some(15))).status,
            Status::Timeout
        );
        assert_eq!(
            finish_of(&ended(Outcome::Killed, None, Some(15))).status,
            Status::Killed
        );
        let f = finish_of(&ended(Outcome::FailedToStart, None, None));
        assert_eq!((f.status, f.exit_code), (Status::Failed, None));
    }
}
