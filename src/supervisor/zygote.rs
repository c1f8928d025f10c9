//! The zygote: the one long-lived process of `execd supervise RUNS_DIR`
//! that forks a supervisor per job and holds each job's gate until the
//! agent says go.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::Signal;

use super::files::RunDir;
use super::{run, Reporter};

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
/// waits in the run directory, `<token> end` once `status.json` is written. Each supervisor is a process of its own, in its own session:
/// the zygote's end (it ends when the agent closes its stdin) ends no
/// started job, and every job still at its gate ends unstarted.
pub(super) fn serve() -> ExitCode {
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
    let mut line = String::new();
    loop {
        let now = Instant::now();
        gates.retain(|_, (_, opened)| now.duration_since(*opened) < GATE_TTL);
        if input.buffer().is_empty() {
            let next_expiry = gates
                .values()
                .map(|(_, opened)| (*opened + GATE_TTL).saturating_duration_since(now))
                .min();
            let timeout = match next_expiry {
                Some(left) => {
                    PollTimeout::try_from(left.as_millis() as u64 + 1).unwrap_or(PollTimeout::MAX)
                }
                None => PollTimeout::NONE,
            };
            let mut fds = [PollFd::new(input.get_ref().as_fd(), PollFlags::POLLIN)];
            match nix::poll::poll(&mut fds, timeout) {
                Ok(0) => continue,
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
                let Some((path, spec)) = job.split_once('\t') else {
                    Reporter(token.to_string()).say("error no spec");
                    continue;
                };
                if let Some(gate) = fork_supervisor(token, path, spec, &mut gates) {
                    gates.insert(token.to_string(), (gate, Instant::now()));
                }
            }
        }
    }
}

/// Forks the supervisor of the job in `path`; returns the gate's writing end.
fn fork_supervisor(
    token: &str,
    path: &str,
    spec: &str,
    gates: &mut HashMap<String, (OwnedFd, Instant)>,
) -> Option<OwnedFd> {
    let reporter = Reporter(token.to_string());
    let (gate_out, gate_in) = match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
        Ok(pipe) => pipe,
        Err(e) => {
            reporter.say(&format!("error cannot make a pipe: {e}"));
            return None;
        }
    };
    // SAFETY: the zygote has one thread, so the child may run any code.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Child) => {
            // Only its own gate: another job's must close when the zygote closes it.
            gates.clear();
            drop(gate_in);
            // SAFETY: as above, SIG_DFL runs no code of ours.
            unsafe {
                let _ =
                    nix::sys::signal::signal(Signal::SIGCHLD, nix::sys::signal::SigHandler::SigDfl);
            }
            let _ = nix::unistd::setsid();
            if let Ok(null) = File::open("/dev/null") {
                let _ = nix::unistd::dup2(null.as_raw_fd(), 0);
            }
            let code = run(RunDir::new(path), spec, &reporter, gate_out);
            std::process::exit(i32::from(code));
        }
        Ok(nix::unistd::ForkResult::Parent { .. }) => Some(gate_in),
        Err(e) => {
            reporter.say(&format!("error cannot fork: {e}"));
            None
        }
    }
}
