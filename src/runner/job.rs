//! One job, from the agent's side: prepare its run directory, start its
//! supervisor (detached, so the job outlives the agent), and follow it —
//! output into the database, kills passed on — until it ends, is lost, or the
//! agent stops and leaves it to its supervisor.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{oneshot, Notify};

use super::tail::{Tail, FLUSH_INTERVAL};
use super::{Runner, Running, StopReason};
use crate::db::executions::{self, Claimed, Fence, Finish};
use crate::db::{self};
use crate::domain::{Language, Status, Stream};
use crate::supervisor::files::{self, Ended, Outcome, RunDir, Spec, Started};

/// How long a supervisor may take to start the program and say so.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How a followed job came out.
pub enum Followed {
    Ended(Finish),
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

impl Runner {
    /// Writes the run directory of `job` and starts its supervisor; returns
    /// once the program runs (its pid stored) or could not start.
    pub(super) async fn start_job(&self, job: &Claimed, fence: &Fence) -> Result<Attached, String> {
        let run = RunDir::new(self.config.runs_dir.join(&job.id));
        let spec = self
            .prepare(job, &run)
            .map_err(|e| format!("could not start: {e}"))?;
        files::write_json_atomic(&run.spec(), &spec)
            .map_err(|e| format!("could not write the job spec: {e}"))?;
        let mut watch = self
            .supervisors
            .launch(run.path())
            .await
            .map_err(|e| format!("could not start a supervisor: {e}"))?;
        let reported = tokio::time::timeout(HANDSHAKE_TIMEOUT, watch.started()).await;
        match reported
            .as_deref()
            .ok()
            .and_then(|line| line.strip_prefix("pid "))
        {
            Some(pid) => {
                let pid: i64 = pid.parse().unwrap_or_default();
                // The program runs from now, whenever the write lands.
                let spawned_at = db::now();
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
            None if reported.is_err() => {
                tracing::warn!("the supervisor did not report the program's start in time");
            }
            None => {}
        }
        // An `error …` line: the supervisor also wrote status.json; follow() reads it.
        Ok(Attached {
            tails: [
                Tail::new(&run, Stream::Stdout, 0, 0),
                Tail::new(&run, Stream::Stderr, 0, 0),
            ],
            run,
            watch: Some(watch),
            started: None,
        })
    }

    /// The spec of `job`, with its code written into the run directory.
    fn prepare(&self, job: &Claimed, run: &RunDir) -> std::io::Result<Spec> {
        // A new attempt starts clean: nothing of an earlier one is mistaken for its own.
        match std::fs::remove_dir_all(run.path()) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        std::fs::create_dir_all(run.path())?;
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
            std::fs::write(&file, &job.code)?;
            let args = language
                .run_args(&file)
                .into_iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect();
            (interpreter.path.clone(), args)
        };
        Ok(Spec {
            program,
            args,
            working_dir: PathBuf::from(&job.working_dir),
            env: serde_json::from_str(&job.env).unwrap_or_default(),
            timeout_ms: u64::try_from(job.timeout_ms).unwrap_or(1),
            kill_grace_ms: self.config.kill_grace.as_millis() as u64,
            max_output_bytes: self.config.max_output_bytes,
        })
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
        // Everything the supervisor wrote before it ended.
        self.pump(fence, &mut job).await;
        match job.run.read_ended() {
            Some(ended) => Followed::Ended(finish_of(&ended)),
            None => {
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

/// `execd supervise RUNS_DIR` (the zygote), detached in its own session, with no
/// `EXECD_*` variables (the agent's token among them is not the job's business).
fn supervisor_command(bin: &Path, runs_dir: &Path) -> Command {
    let mut command = Command::new(bin);
    command
        .arg("supervise")
        .arg(runs_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(false);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("EXECD_") {
            command.env_remove(name);
        }
    }
    // SAFETY: setsid is async-signal-safe. Its own session: the supervisor
    // does not share the agent's fate (terminal hang-up, group signals).
    unsafe {
        command.pre_exec(|| {
            nix::unistd::setsid()
                .map(drop)
                .map_err(std::io::Error::from)
        });
    }
    command
}

/// The agent's end of the zygote (`execd supervise RUNS_DIR`, see
/// `supervisor::zygote`): it asks for a supervisor per job and routes the
/// supervisors' reports (`<token> pid <n>`, `<token> end`) to the jobs. The
/// zygote is started once, and again if it dies; it ends when the agent goes
/// (its stdin closes), and the supervisors it forked carry on.
pub struct Supervisors {
    bin: PathBuf,
    runs_dir: PathBuf,
    zygote: tokio::sync::Mutex<Option<(Child, ChildStdin)>>,
    next_token: AtomicU64,
    /// Jobs whose supervisor may still report, by token.
    waiting: Arc<Mutex<HashMap<u64, Waiter>>>,
}

struct Waiter {
    started: Option<oneshot::Sender<String>>,
    ended: Arc<Notify>,
}

/// A job's supervisor as its reports reach the agent. Dropped, it stops
/// listening.
pub struct Watch {
    token: u64,
    started: Option<oneshot::Receiver<String>>,
    /// Notified once `status.json` is written.
    pub ended: Arc<Notify>,
    waiting: Arc<Mutex<HashMap<u64, Waiter>>>,
}

impl Watch {
    /// The start's report: `pid <n>` or `error <why>` (empty if the
    /// supervisor went without a word).
    async fn started(&mut self) -> String {
        match self.started.take() {
            Some(rx) => rx.await.unwrap_or_default(),
            None => String::new(),
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.waiting.lock().unwrap().remove(&self.token);
    }
}

impl Supervisors {
    pub fn new(bin: PathBuf, runs_dir: PathBuf) -> Supervisors {
        Supervisors {
            bin,
            runs_dir,
            zygote: tokio::sync::Mutex::new(None),
            next_token: AtomicU64::new(1),
            waiting: Arc::default(),
        }
    }

    /// Starts the zygote ahead of the first job.
    pub async fn warm_up(&self) {
        let mut zygote = self.zygote.lock().await;
        if zygote.is_none() {
            match self.spawn() {
                Ok(z) => *zygote = Some(z),
                Err(e) => tracing::warn!(error = %e, "cannot start the supervisor zygote"),
            }
        }
    }

    /// Has a supervisor forked for the job in `run`.
    async fn launch(&self, run: &Path) -> std::io::Result<Watch> {
        let path = run
            .to_str()
            .filter(|p| !p.contains('\n'))
            .ok_or_else(|| std::io::Error::other("the run directory's path is not plain UTF-8"))?;
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let ended = Arc::new(Notify::new());
        self.waiting.lock().unwrap().insert(
            token,
            Waiter {
                started: Some(tx),
                ended: ended.clone(),
            },
        );
        let watch = Watch {
            token,
            started: Some(rx),
            ended,
            waiting: self.waiting.clone(),
        };
        let line = format!("{token} {path}\n");
        let mut zygote = self.zygote.lock().await;
        // A zygote that died, or whose stdin broke, is replaced once.
        for retry in [false, true] {
            let alive = match zygote.as_mut() {
                Some((child, _)) => matches!(child.try_wait(), Ok(None)),
                None => false,
            };
            if !alive {
                *zygote = Some(self.spawn()?);
            }
            let (_, stdin) = zygote.as_mut().expect("just started");
            match stdin.write_all(line.as_bytes()).await {
                Ok(()) => return Ok(watch),
                Err(e) if retry => return Err(e),
                Err(_) => *zygote = None,
            }
        }
        unreachable!("the second try returns")
    }

    /// Starts a zygote and the task that routes its supervisors' reports.
    fn spawn(&self) -> std::io::Result<(Child, ChildStdin)> {
        let mut child = supervisor_command(&self.bin, &self.runs_dir)
            .spawn()
            .map_err(|e| {
                std::io::Error::other(format!("cannot run {}: {e}", self.bin.display()))
            })?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let waiting = self.waiting.clone();
        // Ends when every supervisor of this zygote has closed its stdout.
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                route(&waiting, &line);
            }
        });
        Ok((child, stdin))
    }
}

/// Passes one report line on to the job it names.
fn route(waiting: &Mutex<HashMap<u64, Waiter>>, line: &str) {
    let Some((token, what)) = line.split_once(' ') else {
        return;
    };
    let Ok(token) = token.parse::<u64>() else {
        return;
    };
    let mut waiting = waiting.lock().unwrap();
    let Some(waiter) = waiting.get_mut(&token) else {
        return;
    };
    if what == "end" {
        waiter.ended.notify_one();
    } else if let Some(started) = waiter.started.take() {
        let _ = started.send(what.to_string());
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
