//! Starting a claimed job's program. The run directory of a claimed job and
//! the fork of its supervisor (and of the program, which waits at its gate)
//! are made while the claim's transaction is still in flight (`prelaunch`,
//! called in that transaction). The gate opens as soon as the claim is
//! committed (the writer's after-commit hook: `release`), while the commit
//! is still being synced; or when `take` asks for it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::zygote::{Supervisors, Watch};
use super::RunnerConfig;
use crate::db::executions::{Claimed, Run};
use crate::db::{self, Writer};
use crate::domain::{Interpreter, Language};
use crate::supervisor::files::{RunDir, Spec};

/// How long a supervisor may take to start the program and say so.
pub(super) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a job's program could not start.
#[derive(Debug)]
pub(super) struct NotStarted {
    pub error: String,
    /// For want of descriptors or memory (`files::passing`), a moment's
    /// lack: nothing ran, and the job is queued again.
    pub passing: bool,
}

impl From<String> for NotStarted {
    fn from(error: String) -> NotStarted {
        NotStarted {
            error,
            passing: false,
        }
    }
}

impl From<&str> for NotStarted {
    fn from(error: &str) -> NotStarted {
        NotStarted::from(error.to_string())
    }
}

impl NotStarted {
    fn io(what: &str, e: &std::io::Error) -> NotStarted {
        NotStarted {
            error: format!("{what}: {e}"),
            passing: crate::supervisor::files::passing(e),
        }
    }
}

/// Starts supervisors, and opens each program's gate once its claim is committed.
pub struct Launcher {
    config: RunnerConfig,
    pub(super) supervisors: Supervisors,
    /// Jobs being prepared, by execution id.
    prepared: Mutex<HashMap<String, Preparing>>,
}

/// A job's program made ready: forked and waiting at its gate, or past it.
pub(super) struct Ready {
    pub watch: Watch,
    /// The supervisor's first report: `pid <n>`; `error …` or `end` when
    /// nothing was forked to run; empty if none came in time.
    pub first: String,
    /// When the gate opened (the program runs from then); `None` when there
    /// was nothing to open.
    pub opened_at: Option<String>,
}

/// Whether a prepared program may run: `None` until decided, once.
type Gate = watch::Sender<Option<bool>>;

/// A job being prepared: since when, to run what, its gate.
struct Preparing {
    since: Instant,
    run: Arc<Run>,
    gate: Gate,
    task: tokio::task::JoinHandle<Result<Ready, NotStarted>>,
}

/// Decides `gate` unless it is decided already; whether it is open.
fn decide(gate: &Gate, open: bool) -> bool {
    gate.send_if_modified(|state| match state {
        None => {
            *state = Some(open);
            true
        }
        Some(_) => false,
    });
    *gate.borrow() == Some(true)
}

/// The zygote that forks each job's supervisor, started now: at the
/// agent's start, as soon as Python's interpreter is found (with
/// `python`, the zygote's spares start its warm interpreter ahead of their
/// first job), while the database opens and slower probes still run.
pub async fn start_supervisors(
    bin: PathBuf,
    runs_dir: PathBuf,
    python: Option<&Interpreter>,
) -> Supervisors {
    let supervisors = Supervisors::new(bin, runs_dir, python.and_then(warm_ahead));
    supervisors.warm_up().await;
    supervisors
}

impl Launcher {
    pub fn new(config: RunnerConfig, supervisors: Supervisors) -> Arc<Launcher> {
        Arc::new(Launcher {
            supervisors,
            config,
            prepared: Mutex::default(),
        })
    }

    /// Starts the zygote ahead of the first job, if it could not be at the
    /// agent's start (`start_supervisors`).
    pub async fn warm_up(&self) {
        self.supervisors.warm_up().await;
    }

    /// Starts preparing `jobs`, just claimed in a write job of `writer` not
    /// yet committed, and opens their gates once it is. A preparation nobody
    /// takes (its claim was rolled back) is dropped after a while.
    pub fn prelaunch(self: &Arc<Self>, jobs: &[Claimed], writer: &Writer) {
        if jobs.is_empty() {
            return;
        }
        for job in jobs {
            self.prepare_ahead(&job.id, job.run.clone());
        }
        let ids: Vec<String> = jobs.iter().map(|j| j.id.clone()).collect();
        let this = self.clone();
        writer.after_commit(move || this.release(&ids));
    }

    /// Starts preparing execution `id` to run `run`, unless that is under
    /// way already: a submission starts on its own job before its claim,
    /// which then finds it prepared.
    pub fn prepare_ahead(self: &Arc<Self>, id: &str, run: Run) {
        let mut prepared = self.prepared.lock().unwrap();
        let now = Instant::now();
        // Never taken, never released: a claim rolled back, most likely.
        let stale: Vec<String> = prepared
            .iter()
            .filter(|(_, p)| now.duration_since(p.since) > HANDSHAKE_TIMEOUT)
            .filter(|(_, p)| !decide(&p.gate, false))
            .map(|(id, _)| id.clone())
            .collect();
        for id in stale {
            if let Some(old) = prepared.remove(&id) {
                dismiss(old, None);
            }
        }
        // Under way already for this run, or released (then it is the one
        // that runs, and its claimant takes it).
        if let Some(p) = prepared.get(id) {
            if *p.run == run || decide(&p.gate, false) {
                return;
            }
        }
        let (gate, open) = watch::channel(None);
        let this = self.clone();
        let (job_id, run) = (id.to_string(), Arc::new(run));
        let job_run = run.clone();
        let task = tokio::spawn(async move { this.ready(&job_id, &job_run, open).await });
        let preparing = Preparing {
            since: now,
            run,
            gate,
            task,
        };
        if let Some(old) = prepared.insert(id.to_string(), preparing) {
            dismiss(old, None);
        }
    }

    /// Opens the gates of `ids`: their claims are committed.
    fn release(&self, ids: &[String]) {
        let prepared = self.prepared.lock().unwrap();
        for id in ids {
            if let Some(p) = prepared.get(id) {
                decide(&p.gate, true);
            }
        }
    }

    /// The job's program, past its gate (or with nothing to open): the one
    /// prepared ahead, or a new one.
    pub(super) async fn take(self: &Arc<Self>, job: &Claimed) -> Result<Ready, NotStarted> {
        let prepared = self.prepared.lock().unwrap().remove(&job.id);
        let run = &job.run;
        match prepared {
            Some(p) if *p.run == *run => {
                decide(&p.gate, true);
                p.task
                    .await
                    .unwrap_or_else(|e| Err(format!("could not start: {e}").into()))
            }
            other => {
                if let Some(old) = other.filter(|p| !decide(&p.gate, false)) {
                    dismiss(old, None);
                }
                let (_gate, open) = watch::channel(Some(true));
                self.ready(&job.id, run, open).await
            }
        }
    }

    /// Drops the preparation of `id`: a job that will not start. False if
    /// its gate is open already (its claim was committed and released): the
    /// program runs, and is to be taken and followed like any other.
    pub fn forget(&self, id: &str) -> bool {
        let mut prepared = self.prepared.lock().unwrap();
        match prepared.get(id) {
            Some(p) if decide(&p.gate, false) => false,
            Some(_) => {
                dismiss(prepared.remove(id).expect("just seen"), None);
                true
            }
            None => true,
        }
    }

    /// Drops the preparation of `id`, and its run directory: an id that
    /// will never run (its submission was not stored, or was a replay), so
    /// never released either.
    pub fn abandon(&self, id: &str) {
        let prepared = self.prepared.lock().unwrap().remove(id);
        if let Some(p) = prepared {
            decide(&p.gate, false);
            dismiss(p, Some(self.config.runs_dir.join(id)));
        }
    }

    /// Prepares the job and waits at its gate until it is decided: opens
    /// it (`go`, even without a pid report: one lost on a full pipe must not
    /// leave the program waiting) or drops it.
    async fn ready(
        &self,
        id: &str,
        run: &Run,
        mut gate: watch::Receiver<Option<bool>>,
    ) -> Result<Ready, NotStarted> {
        let mut watch = self.prepare(id, run).await?;
        let first = tokio::time::timeout(HANDSHAKE_TIMEOUT, watch.next())
            .await
            .unwrap_or_default();
        if first.starts_with("error ") || first == "end" {
            return Ok(Ready {
                watch,
                first,
                opened_at: None,
            });
        }
        let open = gate
            .wait_for(Option::is_some)
            .await
            .is_ok_and(|state| *state == Some(true));
        if !open {
            self.supervisors.send(watch.token, "drop").await;
            return Err("dropped before it started".into());
        }
        self.supervisors.send(watch.token, "go").await;
        Ok(Ready {
            watch,
            first,
            opened_at: Some(db::now()),
        })
    }

    /// Has a supervisor forked for execution `id`, handed the spec over the
    /// zygote's pipe (env values never touch the disk), and makes the run
    /// directory and its code file while the supervisor starts the program:
    /// both are there before any go.
    async fn prepare(&self, id: &str, job: &Run) -> Result<Watch, NotStarted> {
        let run = RunDir::new(self.config.runs_dir.join(id));
        // A new attempt starts clean: nothing of an earlier one is mistaken
        // for its own. Removed before the supervisor can write there.
        if run.path().exists() {
            let dir = run.path().to_owned();
            tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(dir) {
                // Gone meanwhile (an earlier agent's sweep, say): as wanted.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                removed => removed,
            })
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))
            .map_err(|e| NotStarted::io("could not start", &e))?;
        }
        let (spec, code) = self
            .spec(job, &run)
            .map_err(|e| NotStarted::io("could not start", &e))?;
        let watch = self
            .supervisors
            .launch(run.path(), &spec)
            .await
            .map_err(|e| NotStarted::io("could not start a supervisor", &e))?;
        // Here, not on a blocking thread: a `mkdir` and a small write cost
        // less than the trip there and back (two thread wake-ups).
        let made = std::fs::create_dir_all(run.path());
        let written = made.and_then(|()| match code {
            Some(file) => {
                std::fs::create_dir_all(file.parent().unwrap_or(run.path()))?;
                std::fs::write(file, &job.code)
            }
            None => Ok(()),
        });
        if let Err(e) = written {
            self.supervisors.send(watch.token, "drop").await;
            return Err(NotStarted::io("could not write the code", &e));
        }
        Ok(watch)
    }

    /// The spec of `job`, and the file its code goes to (for a language).
    fn spec(&self, job: &Run, run: &RunDir) -> std::io::Result<(Spec, Option<PathBuf>)> {
        let mut code = None;
        if let Some(why) = &job.unreadable {
            return Err(std::io::Error::other(why.clone()));
        }
        // Stored by a submission as an object of strings; one edited by
        // hand into anything else fails the job, rather than run it
        // without its environment. (Never quoted: values may be secret.)
        let mut env: std::collections::BTreeMap<String, String> = serde_json::from_str(&job.env)
            .map_err(|_| std::io::Error::other("the stored env is not a JSON object of strings"))?;
        let mut warm = false;
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
            // In a directory of its own: a program that writes beside its
            // code (`status.json`, `stdout`) never touches the run's own files.
            let file = run.path().join("code").join(language.file_name());
            let command = language.command(&interpreter.path, &file);
            if let Some((var, dir)) = language.module_path(Path::new(&job.working_dir)) {
                // First, before what the job or the agent's environment says.
                let dir = dir.to_string_lossy().into_owned();
                let rest = env.get(var).cloned().or_else(|| std::env::var(var).ok());
                let value = match rest.filter(|r| !r.is_empty()) {
                    Some(rest) => format!("{dir}:{rest}"),
                    None => dir,
                };
                env.insert(var.to_string(), value);
            }
            code = Some(file);
            warm = self.config.warm_python && language == Language::Python;
            command
        };
        let spec = Spec {
            program,
            args,
            working_dir: PathBuf::from(&job.working_dir),
            env,
            timeout_ms: u64::try_from(job.timeout_ms).unwrap_or(1),
            kill_grace_ms: self.config.kill_grace.as_millis() as u64,
            max_output_bytes: self.config.max_output_bytes,
            open_files: super::program_open_files(),
            warm,
        };
        Ok((spec, code))
    }
}

/// The spec (JSON) of a Python job with no `env` of its own, run by
/// `interpreter`, whose warm interpreter the zygote's spares start ahead of
/// their first job: one forked for a job starts as this one does.
fn warm_ahead(interpreter: &Interpreter) -> Option<String> {
    let (program, args) = Language::Python.command(&interpreter.path, Path::new("/dev/null"));
    let spec = Spec {
        program,
        args,
        working_dir: PathBuf::from("/"),
        env: Default::default(),
        timeout_ms: 1,
        kill_grace_ms: 0,
        max_output_bytes: 0,
        open_files: super::program_open_files(),
        warm: true,
    };
    serde_json::to_string(&spec).ok()
}

/// Lets a decided preparation finish (its task drops the program), then
/// removes `dir`, if given.
fn dismiss(p: Preparing, dir: Option<PathBuf>) {
    tokio::spawn(async move {
        let _ = p.task.await;
        if let Some(dir) = dir {
            let _ = tokio::fs::remove_dir_all(dir).await;
        }
    });
}
