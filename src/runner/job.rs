//! One job, from the agent's side: prepare its run directory, start its
//! supervisor (detached, so the job outlives the agent), and follow it —
//! output into the database, kills passed on — until it ends, is lost, or the
//! agent stops and leaves it to its supervisor.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

use super::tail::{Tail, FLUSH_INTERVAL};
use super::zygote::{Supervisors, Watch};
use super::{Runner, RunnerConfig, Running, StopReason};
use crate::db::executions::{self, Claimed, Fence, Finish, Run};
use crate::db::output::Chunk;
use crate::db::{self};
use crate::domain::{Language, Status, Stream};
use crate::supervisor::files::{Ended, Outcome, RunDir, Spec, Started};

/// How long a supervisor may take to start the program and say so.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How a followed job came out.
pub enum Followed {
    /// With the last of its output, for the end's own write.
    Ended(Finish, Vec<Chunk>),
    /// Its supervisor is gone without saying how the job ended.
    Lost(String),
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
}

impl Attached {
    /// Who runs the job: `supervisor.json`, read once (it never changes).
    fn started(&mut self) -> Option<&Started> {
        if self.started.is_none() {
            self.started = self.run.read_started();
        }
        self.started.as_ref()
    }
}

/// Starts supervisors: the run directory of a claimed job and the fork of
/// its supervisor are made while the claim's commit is still in flight
/// (`prelaunch`, called in the claim's transaction); the program then
/// waits at its gate until `start_job` opens it, after the commit.
pub struct Launcher {
    config: RunnerConfig,
    supervisors: Supervisors,
    /// Jobs being prepared, by execution id.
    prepared: Mutex<HashMap<String, Preparing>>,
}

type Prepared = tokio::task::JoinHandle<Result<Watch, String>>;

/// A job being prepared: since when, to run what.
struct Preparing {
    since: Instant,
    run: Run,
    task: Prepared,
}

impl Launcher {
    pub fn new(config: RunnerConfig) -> Arc<Launcher> {
        Arc::new(Launcher {
            supervisors: Supervisors::new(config.supervisor_bin.clone(), config.runs_dir.clone()),
            config,
            prepared: Mutex::default(),
        })
    }

    /// Starts the zygote ahead of the first job.
    pub async fn warm_up(&self) {
        self.supervisors.warm_up().await;
    }

    /// Starts preparing `jobs`, just claimed in a transaction not yet
    /// committed. Nothing runs before `start_job` says go; a preparation
    /// nobody takes (its claim was rolled back) is dropped after a while.
    pub fn prelaunch(self: &Arc<Self>, jobs: &[Claimed]) {
        for job in jobs {
            self.prepare_ahead(&job.id, Run::claimed(job));
        }
    }

    /// Starts preparing execution `id` to run `run`, unless that is under
    /// way already: a submission starts on its own job before its claim,
    /// which then finds it prepared.
    pub fn prepare_ahead(self: &Arc<Self>, id: &str, run: Run) {
        let mut prepared = self.prepared.lock().unwrap();
        let now = Instant::now();
        let stale: Vec<String> = prepared
            .iter()
            .filter(|(_, p)| now.duration_since(p.since) > HANDSHAKE_TIMEOUT)
            .map(|(id, _)| id.clone())
            .collect();
        for id in stale {
            if let Some(old) = prepared.remove(&id) {
                self.dismiss(old.task, None);
            }
        }
        if prepared.get(id).is_some_and(|p| p.run == run) {
            return;
        }
        let this = self.clone();
        let (job_id, job_run) = (id.to_string(), run.clone());
        let task = tokio::spawn(async move { this.prepare(&job_id, &job_run).await });
        let preparing = Preparing {
            since: now,
            run,
            task,
        };
        if let Some(old) = prepared.insert(id.to_string(), preparing) {
            self.dismiss(old.task, None);
        }
    }

    /// The job's supervisor, forked and waiting at the gate: the one
    /// prepared ahead, or a new one.
    async fn take(self: &Arc<Self>, job: &Claimed) -> Result<Watch, String> {
        let prepared = self.prepared.lock().unwrap().remove(&job.id);
        let run = Run::claimed(job);
        match prepared {
            Some(p) if p.run == run => p
                .task
                .await
                .unwrap_or_else(|e| Err(format!("could not start: {e}"))),
            other => {
                if let Some(p) = other {
                    self.dismiss(p.task, None);
                }
                self.prepare(&job.id, &run).await
            }
        }
    }

    /// Drops the preparation of `id`, if any: a job that will not start.
    pub fn forget(self: &Arc<Self>, id: &str) {
        let prepared = self.prepared.lock().unwrap().remove(id);
        if let Some(p) = prepared {
            self.dismiss(p.task, None);
        }
    }

    /// Drops the preparation of `id`, and its run directory: an id that
    /// will never run (its submission was not stored, or was a replay).
    pub fn abandon(self: &Arc<Self>, id: &str) {
        let prepared = self.prepared.lock().unwrap().remove(id);
        if let Some(p) = prepared {
            self.dismiss(p.task, Some(self.config.runs_dir.join(id)));
        }
    }

    /// Drops a preparation: its program never runs. Then removes `dir`, if given.
    fn dismiss(self: &Arc<Self>, task: Prepared, dir: Option<PathBuf>) {
        let this = self.clone();
        tokio::spawn(async move {
            if let Ok(Ok(watch)) = task.await {
                this.supervisors.send(watch.token, "drop").await;
            }
            if let Some(dir) = dir {
                let _ = tokio::fs::remove_dir_all(dir).await;
            }
        });
    }

    /// Makes the run directory of execution `id` and forks its supervisor,
    /// which is handed the spec over the zygote's pipe (env values never
    /// touch the disk); the code file is written meanwhile, before any go.
    async fn prepare(&self, id: &str, job: &Run) -> Result<Watch, String> {
        let run = RunDir::new(self.config.runs_dir.join(id));
        // A new attempt starts clean: nothing of an earlier one is mistaken for its own.
        // On a blocking thread: the runtime's workers are busy with the
        // claim meanwhile.
        let dir = run.path().to_owned();
        let fresh = tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => std::fs::create_dir_all(&dir),
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        let (spec, code) = fresh
            .and_then(|()| self.spec(job, &run))
            .map_err(|e| format!("could not start: {e}"))?;
        let watch = self
            .supervisors
            .launch(run.path(), &spec)
            .await
            .map_err(|e| format!("could not start a supervisor: {e}"))?;
        if let Some(file) = code {
            if let Err(e) = std::fs::write(&file, &job.code) {
                self.supervisors.send(watch.token, "drop").await;
                return Err(format!("could not write the code: {e}"));
            }
        }
        Ok(watch)
    }

    /// The spec of `job`, and the file its code goes to (for a language).
    fn spec(&self, job: &Run, run: &RunDir) -> std::io::Result<(Spec, Option<PathBuf>)> {
        let mut code = None;
        let (program, args) = if job.language == "command" {
            match &job.args {
                Some(json) => (
                    PathBuf::from(&job.code),
                    serde_json::from_str(json).map_err(std::io::Error::other)?,
                ),
                None => (
                    PathBuf::from("/bin/sh"),
                    vec!["-c".to_string(), job.code.clone()],
                ),
            }
        } else {
            let language = Language::from_alias(&job.language).ok_or_else(|| {
                std::io::Error::other(format!("unknown language {}", job.language))
            })?;
            let interpreter = self.config.languages.get(language).ok_or_else(|| {
                std::io::Error::other(format!("{} is not installed", language.as_str()))
            })?;
            let file = run.path().join(language.file_name());
            let args = language
                .run_args(&file)
                .into_iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect();
            code = Some(file);
            (interpreter.path.clone(), args)
        };
        let spec = Spec {
            program,
            args,
            working_dir: PathBuf::from(&job.working_dir),
            env: serde_json::from_str(&job.env).unwrap_or_default(),
            timeout_ms: u64::try_from(job.timeout_ms).unwrap_or(1),
            kill_grace_ms: self.config.kill_grace.as_millis() as u64,
            max_output_bytes: self.config.max_output_bytes,
        };
        Ok((spec, code))
    }
}

impl Runner {
    /// Starts the job's program (prepared while its claim committed): opens
    /// its gate and returns once it runs (its pid stored) or could not start.
    pub(super) async fn start_job(&self, job: &Claimed, fence: &Fence) -> Result<Attached, String> {
        let mut watch = self.launcher.take(job).await?;
        let run = RunDir::new(self.config.runs_dir.join(&job.id));
        let attached = |watch: Watch| Attached {
            tails: [
                Tail::new(&run, Stream::Stdout, 0, 0),
                Tail::new(&run, Stream::Stderr, 0, 0),
            ],
            run: run.clone(),
            watch: Some(watch),
            started: None,
        };
        // `pid <n>` from the forked program at its gate; `error …` or `end`
        // when nothing was forked to run (status.json tells, or follow()
        // finds the job lost).
        let reported = tokio::time::timeout(HANDSHAKE_TIMEOUT, watch.next()).await;
        let first = reported.as_deref().unwrap_or("");
        if first.starts_with("error ") || first == "end" {
            return Ok(attached(watch));
        }
        // Go even without a pid: a report lost on a full pipe must not leave
        // the program waiting at its gate.
        self.launcher.supervisors.send(watch.token, "go").await;
        // The program runs from now (its pid known, its `exec` under way).
        let spawned_at = db::now();
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
                let fence = fence.clone();
                let stored = self
                    .db
                    .writer
                    .write_one(move |c| {
                        Box::pin(
                            async move { executions::set_pid(c, &fence, pid, &spawned_at).await },
                        )
                    })
                    .await;
                if let Err(e) = stored {
                    tracing::error!(error = %e, "pid not stored");
                }
                tracing::info!(pid, "execution started");
            }
            Ok(_) => {}
            Err(_) => tracing::warn!("the supervisor did not report the program's start in time"),
        }
        Ok(attached(watch))
    }

    /// Follows a job until it ends, is lost, or the agent stops.
    pub(super) async fn follow(
        &self,
        fence: &Fence,
        mut job: Attached,
        handle: &Running,
    ) -> Followed {
        let mut tick = tokio::time::interval(FLUSH_INTERVAL);
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
                            self.pump(fence, &mut job).await;
                            return Followed::Detached;
                        }
                        StopReason::Killed => {
                            kill_sent = true;
                            match job.started() {
                                Some(started) if started.supervisor_alive() => {
                                    let _ = kill(Pid::from_raw(started.supervisor_pid as i32), Signal::SIGUSR1);
                                }
                                _ => break,
                            }
                        }
                    }
                }
                () = supervisor_end => break,
                () = output_waiting => self.pump(fence, &mut job).await,
                _ = tick.tick() => {
                    self.pump(fence, &mut job).await;
                    // Without a report (adopted; or the supervisor was
                    // killed before it could say so), the run directory tells.
                    if job.run.ended().exists() || !job.started().is_some_and(Started::supervisor_alive) {
                        break;
                    }
                }
            }
        }
        match job.run.read_ended() {
            Some(ended) => {
                // Everything the supervisor wrote before it ended: the last
                // of it is stored with the end, in one commit.
                let writer = &self.db.writer;
                let [out, err] = &mut job.tails;
                let (mut rest, err_rest) =
                    tokio::join!(out.rest(fence, writer), err.rest(fence, writer));
                rest.extend(err_rest);
                Followed::Ended(finish_of(&ended), rest)
            }
            None => {
                self.pump(fence, &mut job).await;
                kill_leftovers(&job.run);
                Followed::Lost("the process was lost: its supervisor ended without recording how the job ended".into())
            }
        }
    }

    async fn pump(&self, fence: &Fence, job: &mut Attached) {
        let writer = &self.db.writer;
        let [out, err] = &mut job.tails;
        tokio::join!(out.pump(fence, writer), err.pump(fence, writer));
    }
}

/// Kills whatever is left of a job whose supervisor is gone: nothing of a
/// job may run on unsupervised.
pub fn kill_leftovers(run: &RunDir) {
    if let Some(started) = run.read_started() {
        let _ = killpg(Pid::from_raw(started.program_pid as i32), Signal::SIGKILL);
        for pid in started.leftovers() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
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
        Outcome::Terminated | Outcome::FailedToStart => (Status::Failed, ended.error.clone()),
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
