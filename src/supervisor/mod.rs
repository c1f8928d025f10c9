//! The supervisors, one per running job, and the zygote that forks them
//! and hands each its jobs.
//!
//! One supervisor per running job, in the zygote's session (not the
//! agent's), so the job outlives the agent (upgrade, crash, OOM kill). The supervisor owns the program: it
//! starts it in its own process group, copies its output into the run
//! directory up to the cap, enforces the timeout, answers kill requests
//! (SIGUSR1 carrying the program's pid), and writes how it ended
//! (`status.json`) before it takes another job or exits. It is one thread
//! and one `poll` loop (a signalfd for kills and the program's end, the two
//! output pipes, the timeout): a fork of it costs no threads, stacks or
//! arenas, and a supervisor kept for the next job costs no fork at all.

pub mod files;
mod spawn;
mod warm;
mod zygote;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, ExitStatus};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{killpg, SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::unistd::Pid;

use crate::domain::Stream;
use files::{Ended, Outcome, RunDir, Spec, Started};

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
    zygote::serve()
}

/// New output that makes the supervisor tell the agent (`<token> output`)
/// rather than leave it to the agent's next look.
const NUDGE_BYTES: u64 = 1 << 20;

/// The zygote's report for a job it could not fork a supervisor for: out
/// of descriptors or processes for now (the agent queues the job again).
pub const CANNOT_FORK: &str = "error cannot fork a supervisor";

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

/// What a supervisor does once a job is over.
enum After {
    /// Takes another job: this one ended cleanly and is recorded (or was
    /// dropped before it ran).
    Next,
    /// Exits with this code: it was told to stop, or the job could not be
    /// recorded (its complaint went to the run directory's log, where its
    /// stderr now points).
    Exit(u8),
}

/// Blocks the signals a supervisor takes through its signalfd: a kill
/// (SIGUSR1), a stop (SIGTERM) and the program's end (SIGCHLD). Done once,
/// before its first job, so none can slip in unheard; the program starts
/// with an empty mask.
fn listen() -> std::io::Result<SignalFd> {
    let mut mask = SigSet::empty();
    for signal in [Signal::SIGTERM, Signal::SIGUSR1, Signal::SIGCHLD] {
        mask.add(signal);
    }
    mask.thread_block()?;
    Ok(SignalFd::with_flags(
        &mask,
        SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC,
    )?)
}

/// Runs the job of `dir` (`spec`, as JSON) to its end.
fn run(
    dir: RunDir,
    spec: &str,
    reporter: &Reporter,
    gate: OwnedFd,
    signals: &SignalFd,
    warm: &mut Option<warm::Warm>,
) -> After {
    let spec: Spec = match serde_json::from_str(spec) {
        Ok(spec) => spec,
        Err(e) => {
            log_to(&dir);
            eprintln!("execd supervise: a spec that does not parse: {e}");
            reporter.say(&format!("error cannot read the spec: {e}"));
            return After::Exit(2);
        }
    };
    match supervise(&dir, &spec, reporter, gate, signals, warm) {
        Ok(true) => After::Next,
        Ok(false) => After::Exit(0),
        Err(e) => {
            log_to(&dir);
            eprintln!("execd supervise: {e}");
            After::Exit(2)
        }
    }
}

/// Runs one job; whether the supervisor may take another (not once it was
/// told to stop).
fn supervise(
    dir: &RunDir,
    spec: &Spec,
    reporter: &Reporter,
    gate: OwnedFd,
    signals: &SignalFd,
    warm: &mut Option<warm::Warm>,
) -> std::io::Result<bool> {
    // The program reports its pid on a copy of our stdout (its own
    // is the job's pipe by then), closed by its `exec`.
    let report = nix::fcntl::fcntl(1, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(3))?;
    // SAFETY: the fd was just duplicated for us alone.
    let report = unsafe { OwnedFd::from_raw_fd(report) };
    let prefix = format!("{} pid ", reporter.0).into_bytes();
    let gated = spawn::Gated {
        report: report.as_raw_fd(),
        prefix: &prefix,
        gate: gate.as_raw_fd(),
    };
    let execution_id = dir
        .path()
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    // Forked from the warm interpreter when it may be, else started anew.
    let spawned = spawn::environment(spec, execution_id).and_then(|envp| {
        warm::spawn(warm, spec, &gated, &envp).unwrap_or_else(|| spawn::spawn(spec, &gated, &envp))
    });
    drop((report, gate));
    let program = match spawned {
        Ok(program) => program,
        // Dropped by the agent before its start: nothing ran, nothing to say.
        Err(e) if e.raw_os_error() == Some(nix::errno::Errno::ECANCELED as i32) => return Ok(true),
        // Abandoned at its gate: nothing ran, which the agent (or the next
        // one, at its start) reads here, to run the job again.
        Err(e) if e.raw_os_error() == Some(spawn::ABANDONED) => {
            std::fs::create_dir_all(dir.path())?;
            let why = "its program never started: the agent or its zygote went before the go";
            finish(dir, Outcome::Unstarted, None, Some(why.into()))?;
            reporter.say("end");
            return Ok(true);
        }
        Err(e) => {
            let error = format!("could not start {}: {e}", spec.program.display());
            // Before its go, the run directory may not be made yet: the agent
            // makes it while the program is started.
            std::fs::create_dir_all(dir.path())?;
            finish(dir, Outcome::FailedToStart, None, Some(error.clone()))?;
            reporter.say(&format!("error {error}"));
            return Ok(true);
        }
    };
    let started_at = Instant::now();
    let spawn::Program {
        pid,
        stdout,
        stderr,
    } = program;
    let me = std::process::id();
    let started = Started {
        supervisor_pid: me,
        supervisor_start: files::own_start(),
        program_pid: pid,
        program_start: files::start_of(pid),
        boot_id: files::boot_id().to_string(),
    };
    files::write_json_atomic(&dir.started(), &started)?;
    reporter.say("started");

    let mut captures: Vec<Capture> = [stdout, stderr]
        .into_iter()
        .zip([Stream::Stdout, Stream::Stderr])
        .map(|(pipe, stream)| Capture::new(pipe, dir, stream, spec.max_output_bytes))
        .collect();
    // Mapped pages, faulted in as reads fill them: a small job's output
    // touches one, where a `vec!` would zero all sixteen.
    let mut buf = memmap2::MmapMut::map_anon(64 << 10)?;

    let deadline = started_at + Duration::from_millis(spec.timeout_ms);
    let grace = Duration::from_millis(spec.kill_grace_ms);
    // Why we are ending the program, if we are; when SIGKILL follows SIGTERM.
    let mut stopping: Option<Outcome> = None;
    let mut kill_at: Option<Instant> = None;
    let mut status: Option<ExitStatus> = None;
    // Once the program is gone, a grandchild that escaped its group may
    // hold a pipe open: the output is waited for up to this.
    let mut drain_until: Option<Instant> = None;
    let group = Pid::from_raw(pid as i32);
    loop {
        // Every child that ended is reaped at once: the program, and the
        // orphans that come to this subreaper (`cmd &` in a shell makes one
        // each time), which would otherwise hold a pid each as zombies.
        if let Some(exited) = reap(pid) {
            status = Some(exited);
            // Whatever the program left behind, in its group or below
            // this supervisor, goes with it: at once, or, in a stop's
            // grace (the program ended on its SIGTERM), once the grace
            // is over, so its children may finish cleaning up too.
            if kill_at.is_none() {
                kill_job(group, pid);
            }
            drain_until = Some(Instant::now() + Duration::from_secs(2));
        }
        // In the grace, with nothing left below: no need to wait it out.
        if status.is_some() && kill_at.is_some() && descendants(std::process::id()).is_empty() {
            kill_at = None;
        }
        let now = Instant::now();
        let drained = captures.is_empty() || drain_until.is_some_and(|t| now >= t);
        if status.is_some() && kill_at.is_none() && drained {
            break;
        }
        if status.is_none() && stopping.is_none() && now >= deadline {
            stopping = Some(Outcome::Timeout);
            signal_job(group, Signal::SIGTERM);
            kill_at = Some(now + grace);
        }
        if kill_at.is_some_and(|t| now >= t) {
            kill_at = None;
            if let Some(exited) = kill_job(group, pid) {
                status = Some(exited);
                drain_until = Some(Instant::now() + Duration::from_secs(2));
            }
        }
        let wake = [
            (status.is_none() && stopping.is_none()).then_some(deadline),
            kill_at,
            drain_until,
        ]
        .into_iter()
        .flatten()
        .min();
        let timeout = match wake {
            Some(t) => {
                PollTimeout::try_from(t.saturating_duration_since(now).as_millis() as u64 + 1)
                    .unwrap_or(PollTimeout::MAX)
            }
            None => PollTimeout::NONE,
        };
        let mut fds: Vec<PollFd> = std::iter::once(signals.as_fd())
            .chain(captures.iter().map(|c| c.pipe.as_fd()))
            .map(|fd| PollFd::new(fd, PollFlags::POLLIN))
            .collect();
        match nix::poll::poll(&mut fds, timeout) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
        let ready: Vec<bool> = fds
            .iter()
            .map(|fd| fd.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(fds);
        if ready[0] {
            while let Ok(Some(info)) = signals.read_signal() {
                let outcome = match Signal::try_from(info.ssi_signo as i32) {
                    // A kill names its job by the program's pid (`sigqueue`):
                    // one meant for an earlier job of this supervisor is
                    // late, not ours. A plain `kill` means the job running.
                    Ok(Signal::SIGUSR1)
                        if info.ssi_code == nix::libc::SI_QUEUE
                            && info.ssi_ptr != u64::from(pid) =>
                    {
                        continue
                    }
                    Ok(Signal::SIGUSR1) => Outcome::Killed,
                    Ok(Signal::SIGTERM) => Outcome::Terminated,
                    _ => continue,
                };
                if stopping.is_none() && status.is_none() {
                    stopping = Some(outcome);
                    signal_job(group, Signal::SIGTERM);
                    kill_at = Some(Instant::now() + grace);
                }
            }
        }
        let mut at = 0;
        captures.retain_mut(|capture| {
            at += 1;
            !ready[at] || capture.take(&mut buf)
        });
        // Much new output: the agent stores it now, not at its next tick.
        let unreported: u64 = captures.iter().map(|c| c.kept - c.reported).sum();
        if unreported >= NUDGE_BYTES {
            reporter.say("output");
            for capture in &mut captures {
                capture.reported = capture.kept;
            }
        }
    }
    let outcome = stopping.unwrap_or(Outcome::Exited);
    let error = match outcome {
        Outcome::Timeout => Some(format!(
            "timed out after {} s and was killed",
            spec.timeout_ms as f64 / 1000.0
        )),
        Outcome::Killed => Some("killed through the API".to_string()),
        Outcome::Terminated => Some("its supervisor was terminated".to_string()),
        _ => None,
    };
    let go_on = outcome != Outcome::Terminated;
    reap(pid);
    finish(dir, outcome, status, error)?;
    Ok(go_on)
}

/// Sends `signal` to the program's group and to every process below this
/// supervisor, so that a descendant that left the group (`setsid`, `set
/// -m`, a detached child) goes with its job too: orphans come to the
/// supervisor, a child subreaper, so the tree below it holds them all.
fn signal_job(group: Pid, signal: Signal) {
    let _ = killpg(group, signal);
    // Once each: the group's members have had it.
    for pid in descendants(std::process::id()) {
        if files::process_group(pid) != Some(group.as_raw() as u32) {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), signal);
        }
    }
}

/// SIGKILL to the job, again while anything is left below this supervisor
/// (a process that forks and leaves its group as fast as it can outruns
/// one pass), a bounded number of times; how the program `pid` ended, if
/// it was reaped meanwhile.
fn kill_job(group: Pid, pid: u32) -> Option<ExitStatus> {
    let mut program = None;
    for _ in 0..KILL_PASSES {
        signal_job(group, Signal::SIGKILL);
        // Zombies are still listed until reaped.
        program = program.or(reap(pid));
        if descendants(std::process::id()).is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    program
}

/// Passes of `kill_job` at most.
const KILL_PASSES: usize = 100;

/// Every process below `root`, by the kernel's lists of children (one
/// small read where there are none, as after most programs).
fn descendants(root: u32) -> Vec<u32> {
    let mut found = Vec::new();
    let mut next = vec![root];
    while let Some(pid) = next.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let Ok(list) = std::fs::read_to_string(task.path().join("children")) else {
                continue;
            };
            for child in list.split_whitespace().filter_map(|c| c.parse().ok()) {
                if !warm::not_a_job(child) && !found.contains(&child) {
                    found.push(child);
                    next.push(child);
                }
            }
        }
    }
    found
}

/// Reaps every child of this supervisor that has ended (the program, and
/// the job's orphans that came here); how the program `pid` ended, if it
/// was among them.
fn reap(pid: u32) -> Option<ExitStatus> {
    let mut program = None;
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes only to `status`.
        let reaped = unsafe { nix::libc::waitpid(-1, &mut status, nix::libc::WNOHANG) };
        if reaped <= 0 {
            return program;
        }
        if reaped as u32 == pid {
            program = Some(ExitStatus::from_raw(status));
        }
        warm::ended(reaped as u32);
    }
}

/// Sends the supervisor's complaints (its stderr) to the run directory's
/// log, which exists only once there is one.
fn log_to(dir: &RunDir) {
    let _ = std::fs::create_dir_all(dir.path());
    if let Ok(log) = File::options().create(true).append(true).open(dir.log()) {
        let _ = nix::unistd::dup2(log.as_raw_fd(), 2);
    }
}

/// `<prefix><pid>\n` into `buf`, without allocating (the forked child of
/// a threaded process may not); returns its length.
fn pid_line(prefix: &[u8], pid: u32, buf: &mut [u8; 64]) -> usize {
    let mut digits = [0u8; 10];
    let mut at = digits.len();
    let mut rest = pid;
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    let digits = &digits[at..];
    let n = prefix.len().min(buf.len() - digits.len() - 1);
    buf[..n].copy_from_slice(&prefix[..n]);
    buf[n..n + digits.len()].copy_from_slice(digits);
    buf[n + digits.len()] = b'\n';
    n + digits.len() + 1
}

/// One of the program's output pipes, copied into its file in the run
/// directory up to the cap; past it, drained into /dev/null by `splice`
/// (no copy through us), so the program never blocks on a full pipe.
struct Capture {
    pipe: File,
    /// The stream's file, made when its first byte comes: most jobs write
    /// nothing to one of their streams, and a file made and removed for
    /// nothing costs an inode (on ext4 without a journal, a scan past the
    /// recently freed ones).
    out: Option<File>,
    path: PathBuf,
    cap: u64,
    kept: u64,
    /// `kept` when the agent was last told of new output.
    reported: u64,
    marker: PathBuf,
    marked: bool,
    /// Where output past the cap goes (opened when it first comes).
    null: Option<File>,
}

impl Capture {
    fn new(pipe: OwnedFd, dir: &RunDir, stream: Stream, cap: u64) -> Capture {
        // A larger pipe: fewer wake-ups for a program that writes a lot.
        let _ = nix::fcntl::fcntl(
            pipe.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETPIPE_SZ(1 << 20),
        );
        Capture {
            pipe: File::from(pipe),
            out: None,
            path: dir.output(stream),
            cap,
            kept: 0,
            reported: 0,
            marker: dir.truncated_marker(stream),
            marked: false,
            null: None,
        }
    }

    /// Takes what the pipe has (it polled readable); false once it is done.
    fn take(&mut self, buf: &mut [u8]) -> bool {
        if self.kept >= self.cap {
            if self.null.is_none() {
                self.null = File::options().write(true).open("/dev/null").ok();
            }
            if let Some(null) = &self.null {
                let spliced = nix::fcntl::splice(
                    self.pipe.as_fd(),
                    None,
                    null.as_fd(),
                    None,
                    1 << 20,
                    nix::fcntl::SpliceFFlags::empty(),
                );
                return match spliced {
                    Ok(0) => false,
                    Ok(_) => {
                        self.mark();
                        true
                    }
                    Err(nix::errno::Errno::EINTR | nix::errno::Errno::EAGAIN) => true,
                    Err(_) => false,
                };
            }
        }
        let n = match self.pipe.read(buf) {
            Ok(0) => return false,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return true,
            Err(_) => return false,
        };
        let room = self.cap.saturating_sub(self.kept).min(n as u64) as usize;
        if room > 0 {
            let out = match &mut self.out {
                Some(out) => out,
                None => match File::options().create(true).append(true).open(&self.path) {
                    Ok(file) => self.out.insert(file),
                    Err(_) => return false,
                },
            };
            if out.write_all(&buf[..room]).is_err() {
                return false;
            }
            self.kept += room as u64;
        }
        if room < n {
            self.mark();
        }
        true
    }

    /// Leaves the truncation marker, once output was dropped.
    fn mark(&mut self) {
        if !self.marked {
            self.marked = true;
            let _ = File::create(&self.marker);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pid_report_is_one_whole_line() {
        let mut buf = [0u8; 64];
        let n = pid_line(b"18446744073709551615 pid ", 4_194_304, &mut buf);
        assert_eq!(&buf[..n], b"18446744073709551615 pid 4194304\n");
        let n = pid_line(b"7 pid ", 0, &mut buf);
        assert_eq!(&buf[..n], b"7 pid 0\n");
    }
}
