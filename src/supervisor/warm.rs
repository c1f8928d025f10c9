//! Python jobs forked from a warm interpreter (`--warm-python`).
//!
//! Most of a trivial Python job is the interpreter's own start-up (10–50
//! ms of CPU on the project's machine, most of it `site`). With the flag
//! (on by default), a supervisor starts the job's interpreter once, with the job's flags, on
//! `warm_python.py`, and has it fork a started copy of itself for each
//! Python job whose start-up would be the same (`Warm::fits`). The copy
//! takes the job's descriptors, directory, environment, `sys.argv` and
//! `sys.path`, reports its pid and waits at the gate as the cold program
//! does, and runs the code as `__main__`. It comes to the supervisor as its
//! child (its forking parent exits at once, and the supervisor is a child
//! subreaper), so waiting, timeouts, kills and the run directory are the
//! cold program's. What differs is what the one start-up shares: the hash
//! seed, and the modules the interpreter and this server had imported.
//!
//! The copy is forked ahead, before its job comes (a spare, forked again
//! each time one takes a job), so a job's start waits for no fork: two
//! forks of an interpreter, 1–3 ms on the project's machine. The spare is
//! this supervisor's child while it waits, and no part of any job: its
//! forking parent says its pid on the socket first (`not_a_job`).

use std::ffi::{CString, OsString};
use std::io::{IoSlice, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};

use nix::libc;
use nix::sys::socket::{
    sendmsg, socketpair, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType,
};

use super::files::Spec;
use super::spawn::{Gated, Program, ABANDONED};

/// The server, run with `-c`.
const SERVER: &str = include_str!("warm_python.py");

/// The most of a job's message (its environment, mostly) sent to the warm
/// interpreter: one datagram, well within a socket's buffer. A job with
/// more starts cold.
const MAX_MESSAGE: usize = 64 << 10;

/// The pid of this supervisor's warm interpreter, if it has one.
static SERVER_PID: AtomicU32 = AtomicU32::new(0);

/// The supervisor's end of its warm interpreter's socket (-1: none), on
/// which the spares' pids come.
static SERVER_SOCKET: AtomicI32 = AtomicI32::new(-1);

/// The spare waiting for the next job, once its pid came (0: none known).
static SPARE_PID: AtomicU32 = AtomicU32::new(0);

/// The last spare that took a job: its pid may still come after the job
/// was sent, from a spare that was still being forked.
static TAKEN_PID: AtomicU32 = AtomicU32::new(0);

/// Whether `pid`, a child of this supervisor, is no part of any job: its
/// warm interpreter (and, below it, the spare it is forking), or the spare
/// waiting for the next job (`descendants` passes them by).
pub(super) fn not_a_job(pid: u32) -> bool {
    if pid == SERVER_PID.load(Ordering::Relaxed) {
        return true;
    }
    heard_of_spares();
    pid == SPARE_PID.load(Ordering::Relaxed)
}

/// Reads the spares' pids that came since the last look; the latest is the
/// one waiting (each came before its spare was this supervisor's child).
fn heard_of_spares() {
    let socket = SERVER_SOCKET.load(Ordering::Relaxed);
    if socket < 0 {
        return;
    }
    let mut said = [0u8; 16];
    while let Ok(n @ 1..) = nix::sys::socket::recv(socket, &mut said, MsgFlags::MSG_DONTWAIT) {
        let spare = std::str::from_utf8(&said[..n])
            .ok()
            .and_then(|p| p.parse().ok());
        if let Some(spare) = spare.filter(|&p| p != TAKEN_PID.load(Ordering::Relaxed)) {
            SPARE_PID.store(spare, Ordering::Relaxed);
        }
    }
}

/// A supervisor's warm interpreter.
pub(super) struct Warm {
    pid: u32,
    jobs: OwnedFd,
    program: PathBuf,
    /// The interpreter's flags, before the code's file.
    flags: Vec<String>,
    /// What of its environment its start-up read (`startup`).
    startup: Vec<CString>,
    /// Whether it has forked a job.
    used: bool,
}

/// Variables that change what the interpreter's start-up does, besides
/// `PYTHONPATH` (which the fork puts on `sys.path` itself).
fn read_at_startup(pair: &CString) -> bool {
    let name = pair
        .as_bytes()
        .split(|&b| b == b'=')
        .next()
        .unwrap_or_default();
    (name.starts_with(b"PYTHON") && name != b"PYTHONPATH")
        || name.starts_with(b"LC_")
        || [&b"LANG"[..], b"LANGUAGE", b"HOME", b"TZ"].contains(&name)
}

fn startup(envp: &[CString]) -> Vec<CString> {
    envp.iter()
        .filter(|p| read_at_startup(p))
        .cloned()
        .collect()
}

/// The directories of the job's `PYTHONPATH`, a relative one from its
/// working directory (as its interpreter would take it).
fn python_path(spec: &Spec) -> Vec<PathBuf> {
    spec.env
        .get("PYTHONPATH")
        .map(|p| {
            std::env::split_paths(p)
                .map(|dir| spec.working_dir.join(dir))
                .collect()
        })
        .unwrap_or_default()
}

/// The code's file and the flags before it, if `spec` is one the warm
/// interpreter may run at all: the interpreter, its flags, then the file.
fn script(spec: &Spec) -> Option<(&[String], &str)> {
    let (file, flags) = spec.args.split_last()?;
    (spec.warm && !file.starts_with('-')).then_some((flags, file.as_str()))
}

/// Whether `dirs` hold a `sitecustomize` or `usercustomize`: a job's own
/// start-up would have run it, where the warm interpreter's did not, so
/// such a job starts cold.
fn customizes(dirs: &[PathBuf]) -> bool {
    dirs.iter().any(|dir| {
        ["sitecustomize", "usercustomize"]
            .iter()
            .any(|module| dir.join(format!("{module}.py")).exists() || dir.join(module).is_dir())
    })
}

impl Warm {
    /// Starts the interpreter of `spec` with `flags` on the server, for
    /// jobs whose environment reads at start-up as `envp` does.
    fn start(spec: &Spec, flags: &[String], envp: &[CString]) -> std::io::Result<Warm> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        let mut command = std::process::Command::new(&spec.program);
        command
            .args(flags)
            .arg("-c")
            .arg(SERVER)
            .env_clear()
            .current_dir("/")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        // The supervisor's own environment (the agent's, less `EXECD_*`)
        // and only what of the job's its start-up reads: no job's values
        // show in another's `/proc/<pid>/environ`, which is the one the
        // process started with.
        command.envs(std::env::vars_os());
        for pair in startup(envp) {
            let bytes = pair.as_bytes();
            if let Some(at) = bytes.iter().position(|&b| b == b'=') {
                command.env(
                    OsString::from_vec(bytes[..at].to_vec()),
                    OsString::from_vec(bytes[at + 1..].to_vec()),
                );
            }
        }
        let fd = theirs.as_raw_fd();
        let open_files = spec.open_files;
        // SAFETY: the supervisor has one thread; these are plain system calls.
        unsafe {
            command.pre_exec(move || {
                // (`dup2` onto itself would leave it close-on-exec.)
                let moved = if fd == 3 {
                    libc::fcntl(fd, libc::F_SETFD, 0)
                } else {
                    libc::dup2(fd, 3)
                };
                if moved < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::setpgid(0, 0);
                if let Some(soft) = open_files {
                    let mut limit: libc::rlimit = std::mem::zeroed();
                    if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
                        limit.rlim_cur = soft.min(limit.rlim_max);
                        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
                    }
                }
                super::spawn::default_signals();
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = command.spawn()?;
        drop(theirs);
        SERVER_PID.store(child.id(), Ordering::Relaxed);
        SERVER_SOCKET.store(ours.as_raw_fd(), Ordering::Relaxed);
        SPARE_PID.store(0, Ordering::Relaxed);
        Ok(Warm {
            pid: child.id(),
            jobs: ours,
            program: spec.program.clone(),
            flags: flags.to_vec(),
            startup: startup(envp),
            used: false,
        })
    }

    /// Whether a job of `spec` with `flags` and its whole environment
    /// `envp` would start as this interpreter did.
    fn fits(&self, spec: &Spec, flags: &[String], envp: &[CString]) -> bool {
        spec.program == self.program
            && flags == self.flags.as_slice()
            && startup(envp) == self.startup
    }

    /// Whether its interpreter is still there to fork.
    fn alive(&self) -> bool {
        SERVER_PID.load(Ordering::Relaxed) == self.pid
    }

    /// Starts the program of `spec` on the code's `file` (environment
    /// `envp`) in the spare copy (forked ahead; the next spare, if it was
    /// still being forked), as `spawn::spawn` starts it: stdin on /dev/null and its
    /// output on two new pipes, in a process group of its own; it reports
    /// its pid and waits at the gate. `Err(None)`: the interpreter could not
    /// be asked (it is gone), and nothing ran.
    fn spawn(
        &self,
        spec: &Spec,
        file: &str,
        gated: &Gated,
        envp: &[CString],
    ) -> Result<Program, Option<std::io::Error>> {
        let pipe =
            || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(std::io::Error::from);
        let prepared = (|| {
            let null = std::fs::File::open("/dev/null")?;
            Ok::<_, std::io::Error>((null, pipe()?, pipe()?, pipe()?))
        })();
        let (null, (out_r, out_w), (err_r, err_w), (started_r, started_w)) =
            prepared.map_err(Some)?;
        let mut message = format!("{}", std::process::id()).into_bytes();
        for field in [
            spec.working_dir.as_os_str().as_bytes(),
            file.as_bytes(),
            gated.prefix,
        ]
        .into_iter()
        .chain(envp.iter().map(|p| p.as_bytes()))
        {
            message.push(0);
            message.extend_from_slice(field);
        }
        let fds = [
            null.as_raw_fd(),
            out_w.as_raw_fd(),
            err_w.as_raw_fd(),
            gated.report,
            gated.gate,
            started_w.as_raw_fd(),
        ];
        // The spare's pid, if it came, read before this job goes to it.
        heard_of_spares();
        sendmsg::<()>(
            self.jobs.as_raw_fd(),
            &[IoSlice::new(&message)],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map_err(|_| None)?;
        // The spare takes it: no longer spared by `not_a_job`.
        SPARE_PID.store(0, Ordering::Relaxed);
        drop((null, out_w, err_w, started_w));
        // As the cold start blocks in its `clone` until the `exec`: the
        // fork's word once past its gate, or why it did not get there.
        let mut said = Vec::new();
        std::fs::File::from(started_r)
            .read_to_end(&mut said)
            .map_err(Some)?;
        let error = |errno: i32| Err(Some(std::io::Error::from_raw_os_error(errno)));
        match said.split_first() {
            Some((b'r', pid)) => match std::str::from_utf8(pid).ok().and_then(|p| p.parse().ok()) {
                Some(pid) => {
                    TAKEN_PID.store(pid, Ordering::Relaxed);
                    Ok(Program {
                        pid,
                        stdout: out_r,
                        stderr: err_r,
                    })
                }
                None => error(libc::EPROTO),
            },
            Some((b'c', _)) => error(libc::ECANCELED),
            Some((b'a', _)) => error(ABANDONED),
            Some((b'e', errno)) => {
                let errno = std::str::from_utf8(errno).ok().and_then(|e| e.parse().ok());
                let e = std::io::Error::from_raw_os_error(errno.unwrap_or(libc::EIO));
                let dir = spec.working_dir.display();
                let why = format!("cannot enter its working directory {dir}: {e}");
                Err(Some(std::io::Error::new(e.kind(), why)))
            }
            _ => Err(Some(std::io::Error::other(
                "the warm interpreter went before the program started",
            ))),
        }
    }
}

impl Drop for Warm {
    fn drop(&mut self) {
        // Its socket closes with us, and it and its spare exit; `reap`
        // takes the spare.
        ended(self.pid);
        let _ = SERVER_SOCKET.compare_exchange(
            self.jobs.as_raw_fd(),
            -1,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }
}

/// Forgets the warm interpreter or spare `pid` once it has ended (reaped).
pub(super) fn ended(pid: u32) {
    let _ = SERVER_PID.compare_exchange(pid, 0, Ordering::Relaxed, Ordering::Relaxed);
    let _ = SPARE_PID.compare_exchange(pid, 0, Ordering::Relaxed, Ordering::Relaxed);
}

/// A spare supervisor's warm interpreter, started ahead of its first job,
/// for jobs of `spec` (JSON: a job's spec with no `env` of its own).
pub(super) fn ahead(spec: &str) -> Option<Warm> {
    let spec: Spec = serde_json::from_str(spec).ok()?;
    let (flags, _) = script(&spec)?;
    let envp = super::spawn::environment(&spec, "").ok()?;
    Warm::start(&spec, flags, &envp).ok()
}

/// Starts the program of `spec` warm when it may be, keeping (or making)
/// the supervisor's warm interpreter in `warm`; `None` when it must start
/// cold. One started ahead and not used by the first job goes with it.
pub(super) fn spawn(
    warm: &mut Option<Warm>,
    spec: &Spec,
    gated: &Gated,
    envp: &[CString],
) -> Option<std::io::Result<Program>> {
    let Some((flags, file)) = script(spec) else {
        if warm.as_ref().is_some_and(|w| !w.used) {
            *warm = None;
        }
        return None;
    };
    let size: usize = envp.iter().map(|p| p.as_bytes().len() + 1).sum();
    if size > MAX_MESSAGE || customizes(&python_path(spec)) {
        return None;
    }
    if warm.as_ref().is_some_and(|w| !w.alive()) {
        *warm = None;
    }
    if warm.is_none() {
        *warm = Warm::start(spec, flags, envp).ok();
    }
    let server = warm.as_mut()?;
    if !server.fits(spec, flags, envp) {
        return None;
    }
    match server.spawn(spec, file, gated, envp) {
        Ok(program) => {
            server.used = true;
            Some(Ok(program))
        }
        Err(Some(e)) => Some(Err(e)),
        // Gone before it could be asked: cold this time, a new one next.
        Err(None) => {
            *warm = None;
            None
        }
    }
}
