//! The per-job supervisor, and the zygote that forks one per job.
//!
//! One supervisor per job, in its own session, so the job outlives the agent
//! (upgrade, crash, OOM kill). The supervisor owns the program: it starts it
//! in its own process group, copies its output into the run directory up to
//! the cap, enforces the timeout, answers kill requests (SIGUSR1), and writes
//! how it ended (`status.json`) before it exits. It is plain blocking code
//! with a few threads: nothing here needs a runtime.

pub mod files;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, ExitCode, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::domain::Stream;
use files::{Ended, Outcome, RunDir, Spec, Started};

/// What the supervisor's main loop waits for.
enum Event {
    Exited(std::io::Result<ExitStatus>),
    Signal(i32),
}

/// `execd supervise RUNS_DIR`: the agent's zygote (RUNS_DIR only names it,
/// for whoever lists processes).
pub fn main(_runs_dir: &Path) -> ExitCode {
    // The agent's terminal and pipes are not ours to die of.
    for signal in [Signal::SIGHUP, Signal::SIGINT, Signal::SIGPIPE] {
        // SAFETY: installing SIG_IGN runs no code of ours in a handler.
        unsafe {
            let _ = nix::sys::signal::signal(signal, nix::sys::signal::SigHandler::SigIgn);
        }
    }
    zygote()
}

/// The agent's zygote: started once (detached, in its own session), it reads
/// `<token> <run dir>` lines on stdin and forks a supervisor for each, so a
/// job's start costs a `fork` of a small idle process, not the `exec` of a
/// new one. The supervisors report on the zygote's stdout, which the agent
/// reads: `<token> pid <n>` (or `<token> error <why>`) once the program runs,
/// `<token> end` once `status.json` is written. Each supervisor is a process
/// of its own, in its own session: the zygote's end (it ends when the agent
/// closes its stdin) ends no job.
fn zygote() -> ExitCode {
    // SAFETY: SIG_IGN runs no code of ours. Forked supervisors are reaped
    // by the kernel: the zygote waits for none of them.
    unsafe {
        let _ = nix::sys::signal::signal(Signal::SIGCHLD, nix::sys::signal::SigHandler::SigIgn);
    }
    // A report must never block a supervisor: one the agent does not take
    // in time is dropped (the agent also watches the run directory).
    let stdout = std::io::stdout();
    if let Ok(flags) = nix::fcntl::fcntl(stdout.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL) {
        let flags = nix::fcntl::OFlag::from_bits_retain(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        let _ = nix::fcntl::fcntl(stdout.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags));
    }
    let mut line = String::new();
    loop {
        line.clear();
        match std::io::stdin().read_line(&mut line) {
            Ok(0) | Err(_) => return ExitCode::SUCCESS,
            Ok(_) => {}
        }
        let Some((token, path)) = line.trim_end_matches('\n').split_once(' ') else {
            continue;
        };
        // SAFETY: the zygote has one thread, so the child may run any code.
        match unsafe { nix::unistd::fork() } {
            Ok(nix::unistd::ForkResult::Child) => {
                // SAFETY: as above, SIG_DFL runs no code of ours.
                unsafe {
                    let _ = nix::sys::signal::signal(
                        Signal::SIGCHLD,
                        nix::sys::signal::SigHandler::SigDfl,
                    );
                }
                let _ = nix::unistd::setsid();
                if let Ok(null) = File::open("/dev/null") {
                    let _ = nix::unistd::dup2(null.as_raw_fd(), 0);
                }
                let code = run(RunDir::new(path), &Reporter(token.to_string()));
                std::process::exit(i32::from(code));
            }
            Ok(nix::unistd::ForkResult::Parent { .. }) => {}
            Err(e) => Reporter(token.to_string()).say(&format!("error cannot fork: {e}")),
        }
    }
}

/// How a supervisor tells the agent how its job goes: lines on the
/// zygote's stdout (shared by every supervisor), each naming the job by its
/// token.
struct Reporter(String);

impl Reporter {
    /// One line, in one write (atomic on a pipe); never fails the job.
    fn say(&self, what: &str) {
        let line = format!("{} {what}\n", self.0);
        let _ = nix::unistd::write(std::io::stdout(), line.as_bytes());
    }
}

/// Runs the job of `dir` to its end; the process's exit code.
fn run(dir: RunDir, reporter: &Reporter) -> u8 {
    // Complaints go to the run directory's log from here on.
    if let Ok(log) = File::options().create(true).append(true).open(dir.log()) {
        let _ = nix::unistd::dup2(log.as_raw_fd(), 2);
    }
    let spec = match dir.read_spec() {
        Ok(spec) => spec,
        Err(e) => {
            eprintln!("execd supervise: cannot read {}: {e}", dir.spec().display());
            reporter.say(&format!("error cannot read the spec: {e}"));
            return 2;
        }
    };
    let code = match supervise(&dir, &spec, reporter) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("execd supervise: {e}");
            2
        }
    };
    // `status.json` is written (or cannot be): the agent may read it.
    reporter.say("end");
    code
}

fn supervise(dir: &RunDir, spec: &Spec, reporter: &Reporter) -> std::io::Result<()> {
    let (events, inbox) = mpsc::channel();
    // Signals first, so a kill request cannot slip in before we listen.
    let mut signals = signal_hook::iterator::Signals::new([
        libc_sig(Signal::SIGTERM),
        libc_sig(Signal::SIGUSR1),
    ])?;
    let signal_events = events.clone();
    std::thread::spawn(move || {
        for signal in signals.forever() {
            if signal_events.send(Event::Signal(signal)).is_err() {
                break;
            }
        }
    });

    let mut command = Command::new(&spec.program);
    command
        .args(&spec.args)
        .current_dir(&spec.working_dir)
        .envs(&spec.env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    // SAFETY: prctl and sigaction are async-signal-safe. If the supervisor
    // dies, the program gets SIGKILL instead of running on unsupervised.
    // The signals the supervisor ignores are the program's own business
    // again (an ignored disposition would survive the exec).
    unsafe {
        command.pre_exec(|| {
            for signal in [
                Signal::SIGHUP,
                Signal::SIGINT,
                Signal::SIGPIPE,
                Signal::SIGCHLD,
            ] {
                nix::sys::signal::signal(signal, nix::sys::signal::SigHandler::SigDfl)?;
            }
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            let error = format!("could not start {}: {e}", spec.program.display());
            finish(dir, Outcome::FailedToStart, None, Some(error.clone()))?;
            reporter.say(&format!("error {error}"));
            return Ok(());
        }
    };
    let started_at = Instant::now();
    let pid = child.id();
    let me = std::process::id();
    let started = Started {
        supervisor_pid: me,
        supervisor_start: files::process_start(me).unwrap_or_default(),
        program_pid: pid,
        program_start: files::process_start(pid).unwrap_or_default(),
        boot_id: files::boot_id().to_string(),
    };
    files::write_json_atomic(&dir.started(), &started)?;
    reporter.say(&format!("pid {pid}"));

    // Both pipes as plain files: one copy loop for either.
    let pipes = [
        (
            child
                .stdout
                .take()
                .map(|p| File::from(std::os::fd::OwnedFd::from(p))),
            Stream::Stdout,
        ),
        (
            child
                .stderr
                .take()
                .map(|p| File::from(std::os::fd::OwnedFd::from(p))),
            Stream::Stderr,
        ),
    ];
    let copies: Vec<_> = pipes
        .into_iter()
        .filter_map(|(pipe, stream)| {
            let pipe = pipe?;
            let out = File::options()
                .create(true)
                .append(true)
                .open(dir.output(stream))
                .ok()?;
            let marker = dir.truncated_marker(stream);
            let cap = spec.max_output_bytes;
            let (done_tx, done_rx) = mpsc::channel::<()>();
            std::thread::spawn(move || {
                copy_capped(pipe, out, cap, &marker);
                let _ = done_tx.send(());
            });
            Some(done_rx)
        })
        .collect();
    let exit_events = events.clone();
    std::thread::spawn(move || {
        let _ = exit_events.send(Event::Exited(child.wait()));
    });
    drop(events);

    let deadline = started_at + Duration::from_millis(spec.timeout_ms);
    let grace = Duration::from_millis(spec.kill_grace_ms);
    let left = deadline.saturating_duration_since(Instant::now());
    let (outcome, status) = match inbox.recv_timeout(left) {
        Ok(Event::Exited(status)) => (Outcome::Exited, status.ok()),
        Ok(Event::Signal(s)) if s == libc_sig(Signal::SIGUSR1) => {
            (Outcome::Killed, stop(pid, grace, &inbox))
        }
        Ok(Event::Signal(_)) => (Outcome::Terminated, stop(pid, grace, &inbox)),
        Err(mpsc::RecvTimeoutError::Timeout) => (Outcome::Timeout, stop(pid, grace, &inbox)),
        Err(mpsc::RecvTimeoutError::Disconnected) => (Outcome::Exited, None),
    };
    // Whatever the program left behind in its group goes with it.
    let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
    // A grandchild that escaped the group may hold a pipe open: bound the wait.
    for done in copies {
        let _ = done.recv_timeout(Duration::from_secs(2));
    }
    let error = match outcome {
        Outcome::Timeout => Some(format!(
            "timed out after {} s and was killed",
            spec.timeout_ms as f64 / 1000.0
        )),
        Outcome::Killed => Some("killed through the API".to_string()),
        Outcome::Terminated => Some("its supervisor was terminated".to_string()),
        _ => None,
    };
    finish(dir, outcome, status, error)
}

fn libc_sig(signal: Signal) -> i32 {
    signal as i32
}

/// Ends the program's group: SIGTERM, up to `grace` for it to exit, SIGKILL.
fn stop(pid: u32, grace: Duration, inbox: &mpsc::Receiver<Event>) -> Option<ExitStatus> {
    let group = Pid::from_raw(pid as i32);
    let _ = killpg(group, Signal::SIGTERM);
    let until = Instant::now() + grace;
    loop {
        match inbox.recv_timeout(until.saturating_duration_since(Instant::now())) {
            Ok(Event::Exited(status)) => return status.ok(),
            Ok(Event::Signal(_)) => continue,
            Err(mpsc::RecvTimeoutError::Timeout) => break,
            Err(mpsc::RecvTimeoutError::Disconnected) => return None,
        }
    }
    let _ = killpg(group, Signal::SIGKILL);
    loop {
        match inbox.recv() {
            Ok(Event::Exited(status)) => return status.ok(),
            Ok(Event::Signal(_)) => continue,
            Err(_) => return None,
        }
    }
}

/// Copies `pipe` into `out` up to `cap` bytes; past it, reads and drops (so
/// the program never blocks on a full pipe) and leaves `marker`.
fn copy_capped(mut pipe: File, mut out: File, cap: u64, marker: &Path) {
    // A larger pipe: fewer wake-ups for a program that writes a lot.
    let _ = nix::fcntl::fcntl(
        pipe.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETPIPE_SZ(1 << 20),
    );
    let mut buf = vec![0u8; 1 << 20];
    let mut kept = 0u64;
    let mut dropped = false;
    loop {
        let n = match pipe.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        let room = cap.saturating_sub(kept).min(n as u64) as usize;
        if room > 0 {
            if out.write_all(&buf[..room]).is_err() {
                break;
            }
            kept += room as u64;
        }
        if room < n && !dropped {
            dropped = true;
            let _ = File::create(marker);
        }
    }
}

/// Writes `status.json`: the last thing the supervisor does.
fn finish(
    dir: &RunDir,
    outcome: Outcome,
    status: Option<ExitStatus>,
    error: Option<String>,
) -> std::io::Result<()> {
    let ended = Ended {
        outcome,
        exit_code: status.and_then(|s| s.code()),
        signal: status.and_then(|s| s.signal()),
        error,
        ended_at: crate::db::now(),
    };
    files::write_json_atomic(&dir.ended(), &ended)
}
