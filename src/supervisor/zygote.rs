//! The zygote: the one long-lived process of `execd supervise RUNS_DIR`
//! that forks a supervisor per job and holds each job's gate until the
//! agent says go.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::Signal;

use super::files::RunDir;
use super::{run, Reporter};

/// How long the agent is quiet before the zygote forks a spare supervisor.
const SPARE_AFTER: Duration = Duration::from_millis(2);

/// How long a forked supervisor waits for its `go` before giving up.
const GATE_TTL: Duration = Duration::from_secs(60);

/// The agent's zygote: started once (detached, in its own session), it
/// forks a supervisor per job, so a job's start costs a `fork` of a small
/// idle process, not the `exec` of a new one. It reads lines on stdin:
///
/// - `<token> <run dir>\t<spec>`: fork a supervisor for the job of `run
///   dir`, to run `spec` (JSON: env values never touch the disk). It
///   forks the program at once, which reports `<token> pid <n>` and then
///   waits, before its `exec`, on a gate the zygote holds: the agent can
///   prepare a job while the commit of its claim is still in flight.
/// - `<token> go`: open the gate; the program `exec`s.
/// - `<token> drop`: close it; the program ends unstarted, and so does its
///   supervisor, leaving nothing behind. So does a gate left `GATE_TTL`.
///
/// The supervisors report on the zygote's stdout, which the agent reads:
/// `<token> pid <n>` (from the forked program), `<token> started` once it
/// runs (or `<token> error <why>`), `<token> output` when much new output
/// waits in the run directory, `<token> end` once `status.json` is written.
///
/// The fork is made ahead: between jobs the zygote keeps one spare
/// supervisor, forked and in its own session, waiting on a pipe for its
/// job's line. A job is handed to the spare, and the next spare forked once
/// the agent has been quiet for `SPARE_AFTER`. Each supervisor is a process of its own, in its own session:
/// the zygote's end (it ends when the agent closes its stdin) ends no
/// started job, and every job still at its gate ends unstarted.
pub(super) fn serve() -> ExitCode {
    // Read once here, so no supervisor reads it again.
    super::files::boot_id();
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
    // Read through a buffer of ours, so a line already read is never left
    // waiting on `poll` (std's stdin would keep one of its own).
    let Ok(input) = std::io::stdin().as_fd().try_clone_to_owned() else {
        return ExitCode::FAILURE;
    };
    let mut input = BufReader::new(File::from(input));
    let mut gates: HashMap<String, (OwnedFd, Instant)> = HashMap::new();
    let mut spare: Option<Spare> = None;
    let mut line = String::new();
    loop {
        let now = Instant::now();
        gates.retain(|_, (_, opened)| now.duration_since(*opened) < GATE_TTL);
        if input.buffer().is_empty() {
            let next_expiry = gates
                .values()
                .map(|(_, opened)| (*opened + GATE_TTL).saturating_duration_since(now))
                .min();
            // No spare: one is forked once the agent has been quiet a while,
            // not while the job just handed over is starting.
            let wake = match spare {
                None => Some(next_expiry.map_or(SPARE_AFTER, |left| left.min(SPARE_AFTER))),
                Some(_) => next_expiry,
            };
            let timeout = wake.map_or(PollTimeout::NONE, |left| {
                PollTimeout::try_from(left.as_millis() as u64 + 1).unwrap_or(PollTimeout::MAX)
            });
            let mut fds = [PollFd::new(input.get_ref().as_fd(), PollFlags::POLLIN)];
            match nix::poll::poll(&mut fds, timeout) {
                Ok(0) => {
                    if spare.is_none() {
                        spare = fork_spare(&mut gates);
                    }
                    continue;
                }
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return ExitCode::FAILURE,
            }
        }
        line.clear();
        match input.read_line(&mut line) {
            Ok(0) | Err(_) => return ExitCode::SUCCESS,
            Ok(_) => {}
        }
        let Some((token, what)) = line.trim_end_matches('\n').split_once(' ') else {
            continue;
        };
        match what {
            "go" => {
                if let Some((gate, _)) = gates.remove(token) {
                    let _ = nix::unistd::write(&gate, b"g");
                }
            }
            "drop" => {
                gates.remove(token);
            }
            job => {
                // `<run dir>\t<spec as JSON>`
                if !job.contains('\t') {
                    Reporter(token.to_string()).say("error no spec");
                    continue;
                }
                let Some(ready) = spare.take().or_else(|| fork_spare(&mut gates)) else {
                    Reporter(token.to_string()).say("error cannot fork a supervisor");
                    continue;
                };
                if let Some(gate) = ready.hand(&line) {
                    gates.insert(token.to_string(), (gate, Instant::now()));
                }
            }
        }
    }
}

/// A supervisor forked ahead of its job, waiting for the job's line.
struct Spare {
    /// Where its job's line goes.
    line: File,
    /// The writing end of its program's gate.
    gate: OwnedFd,
}

impl Spare {
    /// Gives the spare its job (`<token> <run dir>\t<spec>`); the job's gate.
    fn hand(self, line: &str) -> Option<OwnedFd> {
        let mut to = self.line;
        // A write error means the spare died before its job: the job's
        // supervisor never reports, and the agent finds it lost.
        to.write_all(line.as_bytes()).ok()?;
        Some(self.gate)
    }
}

/// Forks a spare supervisor: in its own session, stdin on /dev/null, it
/// waits for its job's line (or for the zygote to go: it then exits).
fn fork_spare(gates: &mut HashMap<String, (OwnedFd, Instant)>) -> Option<Spare> {
    let (line_out, line_in) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).ok()?;
    let (gate_out, gate_in) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).ok()?;
    // SAFETY: the zygote has one thread, so the child may run any code.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Child) => {
            // Only its own gate: another job's must close when the zygote closes it.
            gates.clear();
            drop((line_in, gate_in));
            // SAFETY: as above, SIG_DFL runs no code of ours.
            unsafe {
                let _ =
                    nix::sys::signal::signal(Signal::SIGCHLD, nix::sys::signal::SigHandler::SigDfl);
            }
            let _ = nix::unistd::setsid();
            if let Ok(null) = File::open("/dev/null") {
                let _ = nix::unistd::dup2(null.as_raw_fd(), 0);
            }
            let mut job = String::new();
            let _ = BufReader::new(File::from(line_out)).read_line(&mut job);
            let job = job.trim_end_matches('\n');
            let Some((token, (path, spec))) = job
                .split_once(' ')
                .and_then(|(token, job)| Some((token, job.split_once('\t')?)))
            else {
                // No job: the zygote went, or dropped its spare.
                // SAFETY: ends this process; nothing of it is left to run.
                unsafe { nix::libc::_exit(0) };
            };
            let code = run(
                RunDir::new(path),
                spec,
                &Reporter(token.to_string()),
                gate_out,
            );
            // Nothing is buffered (reports and complaints are written as they
            // come): no exit handlers to run, no pages of theirs to copy.
            // SAFETY: as above.
            unsafe { nix::libc::_exit(i32::from(code)) };
        }
        Ok(nix::unistd::ForkResult::Parent { .. }) => Some(Spare {
            line: File::from(line_in),
            gate: gate_in,
        }),
        Err(_) => None,
    }
}
