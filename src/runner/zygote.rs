//! The agent's end of the supervisor zygote (`execd supervise RUNS_DIR`,
//! see `supervisor`): one long-lived process that forks a supervisor per
//! job. The agent writes job lines and gate commands on its stdin and routes
//! the supervisors' reports, read from its stdout, to the jobs they name.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nix::libc;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{mpsc, Notify};

use crate::supervisor::files::Spec;

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
    // SAFETY: setsid and fcntl are async-signal-safe, and `close_range`
    // is one system call. Its own session: the supervisor does not share
    // the agent's fate (terminal hang-up, group signals). Only its stdin
    // and stdout: a descriptor the agent inherited open (a pipe of the
    // process that started it, say) reaches no supervisor and no job, which
    // would hold it open after the agent is gone.
    unsafe {
        command.pre_exec(|| {
            nix::unistd::setsid()
                .map(drop)
                .map_err(std::io::Error::from)?;
            close_inherited_at_exec();
            Ok(())
        });
    }
    command
}

/// Marks every descriptor above stderr close-on-exec, in the zygote's child
/// before its `exec`. Without `close_range` (Linux before 5.11), one by one
/// up to the open-files limit.
///
/// # Safety
/// Only between `fork` and `exec`: it makes only async-signal-safe calls.
unsafe fn close_inherited_at_exec() {
    // SAFETY: plain system calls on descriptor numbers.
    unsafe {
        let (first, last) = (3 as libc::c_uint, libc::c_uint::MAX);
        if libc::syscall(
            libc::SYS_close_range,
            first,
            last,
            libc::CLOSE_RANGE_CLOEXEC,
        ) == 0
        {
            return;
        }
        let max = libc::sysconf(libc::_SC_OPEN_MAX).clamp(0, 1 << 16) as libc::c_int;
        for fd in 3..max {
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        }
    }
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
    /// Told each zygote first (`warm\t<spec>`, empty without): the spec of
    /// a Python job whose warm interpreter its spares start ahead
    /// (`--warm-python`).
    warm: Option<String>,
}

struct Waiter {
    reports: mpsc::UnboundedSender<String>,
    ended: Arc<Notify>,
    output: Arc<Notify>,
}

/// A job's supervisor as its reports reach the agent. Dropped, it stops
/// listening.
pub struct Watch {
    pub(super) token: u64,
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
    pub(super) async fn next(&mut self) -> String {
        self.reports.recv().await.unwrap_or_default()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.waiting.lock().unwrap().remove(&self.token);
    }
}

impl Supervisors {
    pub fn new(bin: PathBuf, runs_dir: PathBuf, warm: Option<String>) -> Supervisors {
        Supervisors {
            bin,
            runs_dir,
            zygote: tokio::sync::Mutex::new(None),
            next_token: AtomicU64::new(1),
            waiting: Arc::default(),
            warm,
        }
    }

    /// Starts the zygote ahead of the first job.
    pub async fn warm_up(&self) {
        let mut zygote = self.zygote.lock().await;
        if zygote.is_none() {
            match self.spawn().await {
                Ok(z) => *zygote = Some(z),
                Err(e) => tracing::warn!(error = %e, "cannot start the supervisor zygote"),
            }
        }
    }

    /// Has a supervisor forked for the job in `run`, to run `spec`.
    pub(super) async fn launch(&self, run: &Path, spec: &Spec) -> std::io::Result<Watch> {
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
                *zygote = Some(self.spawn().await?);
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
    pub(super) async fn send(&self, token: u64, what: &str) {
        let line = format!("{token} {what}\n");
        if let Some((_, stdin)) = self.zygote.lock().await.as_mut() {
            let _ = stdin.write_all(line.as_bytes()).await;
        }
    }

    /// Starts a zygote and the task that routes its supervisors' reports.
    async fn spawn(&self) -> std::io::Result<(Child, ChildStdin)> {
        let mut child = supervisor_command(&self.bin, &self.runs_dir)
            .spawn()
            .map_err(|e| {
                std::io::Error::other(format!("cannot run {}: {e}", self.bin.display()))
            })?;
        let mut stdin = child.stdin.take().expect("piped");
        // Before any job's line, and always: the zygote forks no spare
        // until it knows whether that spare starts an interpreter ahead.
        // (serde_json escapes every newline.)
        let spec = self.warm.as_deref().unwrap_or_default();
        stdin
            .write_all(format!("warm\t{spec}\n").as_bytes())
            .await?;
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
