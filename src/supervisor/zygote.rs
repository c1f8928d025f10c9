//! The zygote: the one long-lived process of `execd supervise RUNS_DIR`
//! that forks the supervisors, hands each job to one, and holds each job's
//! gate until the agent says go.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::Signal;
use nix::sys::signalfd::SignalFd;
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

use super::files::RunDir;
use super::{run, After, Reporter};

/// How long the agent is quiet before the zygote forks a spare supervisor.
const SPARE_AFTER: Duration = Duration::from_millis(2);

/// How long a forked supervisor waits for its `go` before giving up.
const GATE_TTL: Duration = Duration::from_secs(60);

/// Supervisors kept waiting for a job once theirs has ended: the lanes'
/// usual concurrency. Past it, a supervisor whose job ends exits.
const MAX_IDLE: usize = 8;

/// Jobs one supervisor runs before it exits and a fresh fork takes over:
/// a bound on whatever a long-lived process could gather.
const JOBS_PER_SUPERVISOR: u32 = 1000;

/// The agent's zygote: started once (detached, in its own session), it
/// forks supervisors and hands each job to one, so a job's start costs
/// neither the `exec` of a new process nor, mostly, a `fork`. It reads
/// lines on stdin:
///
/// - `<token> <run dir>\t<spec>`: hand the job of `run dir` to a
///   supervisor, to run `spec` (JSON: env values never touch the disk). It
///   forks the program at once, which reports `<token> pid <n>` and then
///   waits, before its `exec`, on a gate the zygote holds: the agent can
///   prepare a job while the commit of its claim is still in flight.
/// - `<token> go`: open the gate; the program `exec`s.
/// - `<token> drop`: close it; the program ends unstarted, leaving nothing
///   behind. So does a gate left `GATE_TTL`.
/// - `warm\t<spec>`, the first line: with `--warm-python`, a spare starts
///   the warm interpreter of a Python job of `spec` ahead of its first job
///   (`Pool::spare`); an empty spec, none. No spare is forked before it.
///
/// The supervisors report on the zygote's stdout, which the agent reads:
/// `<token> pid <n>` (from the forked program), `<token> started` once it
/// runs (or `<token> error <why>`), `<token> output` when much new output
/// waits in the run directory, `<token> end` once `status.json` is written.
///
/// Each supervisor is a process of its own, in its own process group (in
/// the zygote's session: all jobs share one scheduling autogroup), with a
/// socket to the zygote: a job comes on it as its line and the reading end
/// of a gate made for it (`SCM_RIGHTS`), and the supervisor says `f` on it
/// once the job is over and recorded, to be handed the next (up to
/// `MAX_IDLE` wait so). With none waiting, the zygote forks a spare once the
/// agent has been quiet for `SPARE_AFTER`. The zygote's end (it ends when
/// the agent closes its stdin) ends no started job: a supervisor waiting
/// for a job exits, one running a job exits after it, and every job still
/// at its gate ends unstarted.
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
    let mut pool = Pool::default();
    let mut line = String::new();
    loop {
        let now = Instant::now();
        pool.gates
            .retain(|_, (_, opened)| now.duration_since(*opened) < GATE_TTL);
        if input.buffer().is_empty() {
            let next_expiry = pool
                .gates
                .values()
                .map(|(_, opened)| (*opened + GATE_TTL).saturating_duration_since(now))
                .min();
            // None waiting: a spare is forked once the agent has been quiet
            // a while, not while the job just handed over is starting; and
            // not before the agent said what it starts ahead.
            let wake = if pool.idle.is_empty() && pool.told {
                Some(next_expiry.map_or(SPARE_AFTER, |left| left.min(SPARE_AFTER)))
            } else {
                next_expiry
            };
            let timeout = wake.map_or(PollTimeout::NONE, |left| {
                PollTimeout::try_from(left.as_millis() as u64 + 1).unwrap_or(PollTimeout::MAX)
            });
            let mut fds: Vec<PollFd> = std::iter::once(input.get_ref().as_fd())
                .chain(pool.busy.iter().map(|s| s.as_fd()))
                .map(|fd| PollFd::new(fd, PollFlags::POLLIN))
                .collect();
            match nix::poll::poll(&mut fds, timeout) {
                Ok(0) => {
                    if pool.idle.is_empty() && pool.told {
                        if let Some(spare) = pool.spare() {
                            pool.idle.push(spare);
                        }
                    }
                    continue;
                }
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return ExitCode::FAILURE,
            }
            let ready: Vec<bool> = fds
                .iter()
                .map(|fd| fd.revents().is_some_and(|r| !r.is_empty()))
                .collect();
            drop(fds);
            pool.take_back(&ready[1..]);
            if !ready[0] {
                continue;
            }
        }
        line.clear();
        match input.read_line(&mut line) {
            Ok(0) | Err(_) => return ExitCode::SUCCESS,
            Ok(_) => {}
        }
        if let Some(spec) = line.trim_end_matches('\n').strip_prefix("warm\t") {
            pool.warm = Some(spec.to_string()).filter(|spec| !spec.is_empty());
            pool.told = true;
            continue;
        }
        let Some((token, what)) = line.trim_end_matches('\n').split_once(' ') else {
            continue;
        };
        match what {
            "go" => {
                if let Some((gate, _)) = pool.gates.remove(token) {
                    let _ = nix::unistd::write(&gate, b"g");
                }
            }
            "drop" => {
                if let Some((gate, _)) = pool.gates.remove(token) {
                    let _ = nix::unistd::write(&gate, b"d");
                }
            }
            job => {
                // `<run dir>\t<spec as JSON>`
                if !job.contains('\t') {
                    Reporter(token.to_string()).say("error no spec");
                    continue;
                }
                match pool.hand(&line) {
                    Some(gate) => {
                        pool.gates.insert(token.to_string(), (gate, Instant::now()));
                    }
                    None => Reporter(token.to_string()).say(super::CANNOT_FORK),
                }
            }
        }
    }
}

/// The zygote's supervisors and the gates of jobs not yet let go.
#[derive(Default)]
struct Pool {
    /// The writing end of each job's gate, by token, while the job waits
    /// for its `go`: closed, the program ends unstarted.
    gates: HashMap<String, (OwnedFd, Instant)>,
    /// Supervisors waiting for a job; the last freed is handed the next
    /// (its pages are the warmest).
    idle: Vec<UnixStream>,
    /// Supervisors running a job, until they say `f`.
    busy: Vec<UnixStream>,
    /// The spec of a Python job whose warm interpreter a spare starts
    /// ahead of its first job (`warm\t<spec>`).
    warm: Option<String>,
    /// Whether the agent's first line (`warm\t…`) was read.
    told: bool,
}

impl Pool {
    /// Gives the job `line` (`<token> <run dir>\t<spec>`) to a waiting
    /// supervisor, or to one forked for it, with a gate made for it; the
    /// gate's writing end.
    fn hand(&mut self, line: &str) -> Option<OwnedFd> {
        loop {
            let (supervisor, fresh) = match self.idle.pop() {
                Some(idle) => (idle, false),
                None => (self.fork(None)?, true),
            };
            // Made after any fork: no other supervisor holds its writing end.
            let (gate_out, gate_in) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).ok()?;
            if send_job(&supervisor, line, gate_out).is_ok() {
                self.busy.push(supervisor);
                return Some(gate_in);
            }
            // It died waiting (killed by someone): the next one. A fresh
            // one that cannot take a job means none can.
            if fresh {
                return None;
            }
        }
    }

    /// Supervisors whose sockets polled `ready` (as `busy` is ordered): free
    /// again (`f`), they wait for a job, or exit if enough already wait (their
    /// socket closed); gone, they are forgotten.
    fn take_back(&mut self, ready: &[bool]) {
        let busy = std::mem::take(&mut self.busy);
        for (supervisor, &ready) in busy.into_iter().zip(ready) {
            if !ready {
                self.busy.push(supervisor);
                continue;
            }
            let mut said = [0u8; 1];
            let free = matches!((&supervisor).read(&mut said), Ok(1)) && said == *b"f";
            if free && self.idle.len() < MAX_IDLE {
                self.idle.push(supervisor);
            }
        }
    }

    /// Forks a spare supervisor, to wait for the next job. With `--warm-python`,
    /// when it is the only supervisor (the zygote's first, or the first
    /// after all went), it starts its warm interpreter now: the agent's
    /// first Python job does not wait for it. One its first job does not
    /// use goes with that job, so an agent that runs no Python keeps none.
    fn spare(&mut self) -> Option<UnixStream> {
        let warm = self.warm.clone().filter(|_| self.busy.is_empty());
        self.fork(warm.as_deref())
    }

    /// Forks a supervisor: in its own process group, stdin on /dev/null, it waits
    /// on its socket for jobs (or for the zygote to go: it then exits),
    /// after starting the warm interpreter of a job of `warm`, if given.
    fn fork(&mut self, warm: Option<&str>) -> Option<UnixStream> {
        let (ours, theirs) = UnixStream::pair().ok()?;
        // SAFETY: the zygote has one thread, so the child may run any code.
        match unsafe { nix::unistd::fork() } {
            Ok(nix::unistd::ForkResult::Child) => {
                // Nothing of the others: a gate, or another supervisor's
                // socket, must close when the zygote closes it.
                self.gates.clear();
                self.idle.clear();
                self.busy.clear();
                drop(ours);
                // SAFETY: as above, SIG_DFL runs no code of ours.
                unsafe {
                    let _ = nix::sys::signal::signal(
                        Signal::SIGCHLD,
                        nix::sys::signal::SigHandler::SigDfl,
                    );
                }
                // A process group of its own (a signal to the zygote's
                // reaches no job), in the zygote's session: every job shares
                // the session's scheduling autogroup, so under load the
                // agent gets the CPU share of one session against all of
                // them, not of one against each.
                let _ = nix::unistd::setpgid(
                    nix::unistd::Pid::from_raw(0),
                    nix::unistd::Pid::from_raw(0),
                );
                if let Ok(null) = File::open("/dev/null") {
                    let _ = nix::unistd::dup2(null.as_raw_fd(), 0);
                }
                let code = work(theirs, warm);
                // Nothing is buffered (reports and complaints are written as
                // they come): no exit handlers to run, no pages of theirs to copy.
                // SAFETY: ends this process; nothing of it is left to run.
                unsafe { nix::libc::_exit(i32::from(code)) };
            }
            Ok(nix::unistd::ForkResult::Parent { .. }) => Some(ours),
            Err(_) => None,
        }
    }
}

/// Sends a supervisor its job's line with the reading end of its gate.
fn send_job(to: &UnixStream, line: &str, gate: OwnedFd) -> std::io::Result<()> {
    let fds = [gate.as_raw_fd()];
    let sent = sendmsg::<()>(
        to.as_raw_fd(),
        &[IoSlice::new(line.as_bytes())],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )?;
    // The gate went with the first byte; the rest of a long line follows.
    let mut to = to;
    to.write_all(&line.as_bytes()[sent..])
}

/// A supervisor's life: the jobs the zygote hands it, one at a time, until
/// the zygote lets it go (its socket closes), it is told to stop, a job
/// could not be recorded, or it has run `JOBS_PER_SUPERVISOR`; its exit code.
fn work(zygote: UnixStream, warm: Option<&str>) -> u8 {
    let Ok(signals) = super::listen() else {
        return 2;
    };
    // A job's orphans come here, not to init: its end takes them too
    // (`signal_job`).
    let _ = nix::sys::prctl::set_child_subreaper(true);
    // Started now for a spare, or with its first Python job that may use
    // one (`--warm-python`).
    let mut warm = warm.and_then(super::warm::ahead);
    for done in 1..=JOBS_PER_SUPERVISOR {
        let Some((job, gate)) = next_job(&zygote, &signals) else {
            return 0;
        };
        let job = job.trim_end_matches('\n');
        let Some((token, (path, spec))) = job
            .split_once(' ')
            .and_then(|(token, job)| Some((token, job.split_once('\t')?)))
        else {
            return 2;
        };
        let reporter = Reporter(token.to_string());
        let after = run(
            RunDir::new(path),
            spec,
            &reporter,
            gate,
            &signals,
            &mut warm,
        );
        // Free before the agent hears of the end: the next job can come to
        // this supervisor rather than to a fork.
        let freed = matches!(after, After::Next)
            && done < JOBS_PER_SUPERVISOR
            && (&zygote).write_all(b"f").is_ok();
        reporter.say("end");
        match after {
            After::Exit(code) => return code,
            After::Next if !freed => return 0,
            After::Next => {}
        }
    }
    0
}

/// Waits for the next job: its line and its gate; `None` once the zygote
/// has gone or let this supervisor go, or it is told to stop. Kills that
/// come while it waits are late (their job is over) and dropped.
fn next_job(zygote: &UnixStream, signals: &SignalFd) -> Option<(String, OwnedFd)> {
    loop {
        let mut fds = [
            PollFd::new(zygote.as_fd(), PollFlags::POLLIN),
            PollFd::new(signals.as_fd(), PollFlags::POLLIN),
        ];
        match nix::poll::poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return None,
        }
        let [job_ready, signalled] = fds.map(|fd| fd.revents().is_some_and(|r| !r.is_empty()));
        if signalled {
            while let Ok(Some(info)) = signals.read_signal() {
                if info.ssi_signo == Signal::SIGTERM as u32 {
                    return None;
                }
            }
        }
        if job_ready {
            break;
        }
    }
    // One buffer for every read: most lines fit in it at once.
    let mut chunk = [0u8; 4 << 10];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let (n, gate) = {
        let mut iov = [IoSliceMut::new(&mut chunk)];
        let msg = recvmsg::<()>(
            zygote.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .ok()?;
        let gate = msg.cmsgs().ok()?.find_map(|c| match c {
            ControlMessageOwned::ScmRights(fds) => fds.first().copied(),
            _ => None,
        });
        (msg.bytes, gate)
    };
    // None at the zygote's end (nothing read, so no gate either).
    // SAFETY: the fd was just received, and is ours alone.
    let gate = unsafe { OwnedFd::from_raw_fd(gate?) };
    let mut line = chunk[..n].to_vec();
    // A long line comes in pieces after the first.
    let mut reader = zygote;
    while line.last() != Some(&b'\n') {
        match reader.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(got) => line.extend_from_slice(&chunk[..got]),
        }
    }
    String::from_utf8(line).ok().map(|line| (line, gate))
}
