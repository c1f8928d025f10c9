//! The per-job supervisor: `execd supervise RUN_DIR`.
//!
//! The agent starts one per job, detached in its own session, so the job
//! outlives the agent (upgrade, crash, OOM kill). The supervisor owns the
//! program: it starts it in its own process group, copies its output into the
//! run directory up to the cap, enforces the timeout, answers kill requests
//! (SIGUSR1), and writes how it ended (`status.json`) before it exits. It is
//! plain blocking code with a few threads: nothing here needs a runtime.
//!
//! The handshake: the first line on the supervisor's stdout is `pid <n>` once
//! the program runs (or `error <why>`); then stdout goes to /dev/null, so the
//! agent may die at any time without harming the supervisor.

pub mod files;

use std::fs::File;
use std::io::{Read, Write};
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

/// Runs the job of `run_dir` to its end. Exit code 0 once `status.json` is
/// written; 2 when the run directory is unusable.
pub fn main(run_dir: &Path) -> ExitCode {
    // `-`: a warm supervisor, started ahead of need; its job's run directory
    // comes on stdin. End of input (the agent went away) means no job.
    let run_dir = if run_dir == Path::new("-") {
        let mut line = String::new();
        match std::io::stdin().read_line(&mut line) {
            Ok(n) if n > 0 && !line.trim().is_empty() => {
                std::path::PathBuf::from(line.trim_end_matches('\n'))
            }
            _ => return ExitCode::SUCCESS,
        }
    } else {
        run_dir.to_path_buf()
    };
    let dir = RunDir::new(run_dir);
    // Complaints go to the run directory's log from here on.
    if let Ok(log) = File::options().create(true).append(true).open(dir.log()) {
        use std::os::fd::AsRawFd;
        let _ = nix::unistd::dup2(log.as_raw_fd(), 2);
    }
    let spec = match dir.read_spec() {
        Ok(spec) => spec,
        Err(e) => {
            eprintln!("execd supervise: cannot read {}: {e}", dir.spec().display());
            let _ = handshake(&format!("error cannot read the spec: {e}"));
            return ExitCode::from(2);
        }
    };
    // The agent's terminal and pipes are not ours to die of.
    for signal in [Signal::SIGHUP, Signal::SIGINT, Signal::SIGPIPE] {
        // SAFETY: installing SIG_IGN runs no code of ours in a handler.
        unsafe {
            let _ = nix::sys::signal::signal(signal, nix::sys::signal::SigHandler::SigIgn);
        }
    }
    match supervise(&dir, &spec) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("execd supervise: {e}");
            ExitCode::from(2)
        }
    }
}

fn supervise(dir: &RunDir, spec: &Spec) -> std::io::Result<()> {
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
    // SAFETY: prctl is async-signal-safe. If the supervisor dies, the
    // program gets SIGKILL instead of running on unsupervised.
    unsafe {
        command.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            let error = format!("could not start {}: {e}", spec.program.display());
            finish(dir, Outcome::FailedToStart, None, Some(error.clone()))?;
            let _ = handshake(&format!("error {error}"));
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
        boot_id: files::boot_id(),
    };
    files::write_json_atomic(&dir.started(), &started)?;
    let _ = handshake(&format!("pid {pid}"));

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
    use std::os::fd::AsRawFd;
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

/// Tells the agent how the start went, then lets go of stdout for good.
fn handshake(line: &str) -> std::io::Result<()> {
    let mut stdout = std::io::stdout().lock();
    let result = writeln!(stdout, "{line}").and_then(|()| stdout.flush());
    // The agent may die at any time; later writes must not fail with EPIPE.
    if let Ok(null) = File::options().write(true).open("/dev/null") {
        use std::os::fd::AsRawFd;
        let _ = nix::unistd::dup2(null.as_raw_fd(), 1);
    }
    result
}
