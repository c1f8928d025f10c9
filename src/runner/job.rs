//! One job, from the agent's side: prepare its run directory, start its
//! supervisor (detached, so the job outlives the agent), and follow it —
//! output into the database, kills passed on — until it ends, is lost, or the
//! agent stops and leaves it to its supervisor.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{mpsc, Notify};

use super::tail::{Tail, FLUSH_INTERVAL};
use super::{Runner, RunnerConfig, Running, StopReason};
use crate::db::executions::{self, Claimed, Fence, Finish};
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
    /// Jobs being prepared, by execution id, since when.
    prepared: Mutex<HashMap<String, (Instant, Prepared)>>,
}

type Prepared = tokio::task::JoinHandle<Result<Watch, String>>;

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
        let mut prepared = self.prepared.lock().unwrap();
        let now = Instant::now();
        let stale: Vec<String> = prepared
            .iter()
            .filter(|(_, (since, _))| now.duration_since(*since) > HANDSHAKE_TIMEOUT)
            .map(|(id, _)| id.clone())
            .collect();
        for id in stale {
            if let Some((_, old)) = prepared.remove(&id) {
                self.dismiss(old);
            }
        }
        for job in jobs {
            let this = self.clone();
            let job = job.clone();
            let id = job.id.clone();
            let task = tokio::spawn(async move { this.prepare(&job).await });
            if let Some((_, old)) = prepared.insert(id, (now, task)) {
                self.dismiss(old);
            }
        }
    }

    /// The job's supervisor, forked and waiting at the gate: the one
    /// prepared ahead, or a new one.
    async fn take(&self, job: &Claimed) -> Result<Watch, String> {
        let prepared = self.prepared.lock().unwrap().remove(&job.id);
        match prepared {
            Some((_, task)) => task
                .await
                .unwrap_or_else(|e| Err(format!("could not start: {e}"))),
            None => self.prepare(job).await,
        }
    }

    /// Drops the preparation of `id`, if any: a job that will not start.
    pub fn forget(self: &Arc<Self>, id: &str) {
        let prepared = self.prepared.lock().unwrap().remove(id);
        if let Some((_, task)) = prepared {
            self.dismiss(task);
        }
    }

    /// Drops a preparation: its program never runs.
    fn dismiss(self: &Arc<Self>, task: Prepared) {
        let this = self.clone();
        tokio::spawn(async move {
            if let Ok(Ok(watch)) = task.await {
                this.supervisors.send(watch.token, "drop").await;
            }
        });
    }

    /// Makes the run directory of `job` and forks its supervisor, which is
    /// handed the spec over the zygote's pipe (env values never touch the
    /// disk); the code file is written meanwhile, before any go.
    async fn prepare(&self, job: &Claimed) -> Result<Watch, String> {
        let run = RunDir::new(self.config.runs_dir.join(&job.id));
        // A new attempt starts clean: nothing of an earlier one is mistaken for its own.
        let fresh = match std::fs::remove_dir_all(run.path()) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => std::fs::create_dir_all(run.path()),
        };
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
    fn spec(&self, job: &Claimed, run: &RunDir) -> std::io::Result<(Spec, Option<PathBuf>)> {
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
/// `supervisor::zygote`): it asks for a supervisor per job, opens or drops
/// its gate (`<token> go`, `<token> drop`), and routes the reports
/// (`<token> pid <n>`, `started`, `error <why>`, `output`, `end`) to the jobs. The
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
    reports: mpsc::UnboundedSender<String>,
    ended: Arc<Notify>,
    output: Arc<Notify>,
}

/// A job's supervisor as its reports reach the agent. Dropped, it stops
/// listening.
pub struct Watch {
    token: u64,
    reports: mpsc::UnboundedReceiver<String>,
    /// Notified once `status.json` is written.
    pub ended: Arc<Notify>,
    /// Notified when much new output waits in the run directory.
    pub output: Arc<Notify>,
    waiting: Arc<Mutex<HashMap<u64, Waiter>>>,
}

impl Watch {
    /// The next report: `pid <n>`, `started`, `error <why>`, `end` (empty
    /// if the supervisor's zygote went without a word).
    async fn next(&mut self) -> String {
        self.reports.recv().await.unwrap_or_default()
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

    /// Has a supervisor forked for the job in `run`, to run `spec`.
    async fn launch(&self, run: &Path, spec: &Spec) -> std::io::Result<Watch> {
        let path = run
            .to_str()
            .filter(|p| !p.contains(['\n', '\t']))
            .ok_or_else(|| std::io::Error::other("the run directory's path is not plain UTF-8"))?;
        // One line: serde_json escapes every newline.
        let spec = serde_json::to_string(spec)?;
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        let ended = Arc::new(Notify::new());
        let output = Arc::new(Notify::new());
        self.waiting.lock().unwrap().insert(
            token,
            Waiter {
                reports: tx,
                ended: ended.clone(),
                output: output.clone(),
            },
        );
        let watch = Watch {
            token,
            reports: rx,
            ended,
            output,
            waiting: self.waiting.clone(),
        };
        let line = format!("{token} {path}\t{spec}\n");
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

    /// Tells the zygote `<token> <what>` (`go`, `drop`) about a job it
    /// forked. A zygote that died took the job's gate with it: nothing to tell.
    async fn send(&self, token: u64, what: &str) {
        let line = format!("{token} {what}\n");
        if let Some((_, stdin)) = self.zygote.lock().await.as_mut() {
            let _ = stdin.write_all(line.as_bytes()).await;
        }
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
    match what {
        "output" => waiter.output.notify_one(),
        "end" => {
            waiter.ended.notify_one();
            let _ = waiter.reports.send(what.to_string());
        }
        _ => {
            let _ = waiter.reports.send(what.to_string());
        }
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
