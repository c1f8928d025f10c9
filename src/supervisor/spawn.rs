//! Starting the program the way `posix_spawn` does: a `clone` that shares
//! the supervisor's memory and suspends the supervisor until the program
//! `exec`s or gives up. `std::process::Command` forks whenever a `pre_exec`
//! step is asked for, and ours is needed (the pid report, the gate): that
//! copied the supervisor's page tables for each job, took copy-on-write
//! faults on both sides, and tore the copy down again at the `exec`.
//!
//! What the child does between the `clone` and the `exec` is what `std`
//! does, in the same order (standard streams, working directory, process
//! group, signal mask, then our steps, then `execvp` with the job's
//! environment), on memory prepared before the `clone`: it shares our
//! memory, so it allocates nothing and only makes system calls.

use std::ffi::{CString, OsStr, OsString};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::sync::atomic::{AtomicI32, Ordering};

use nix::libc;
use nix::sched::CloneFlags;

use super::files::{self, Spec};

/// The stack the child runs on until its `exec`, beyond what the arguments
/// take: our few calls, and glibc's `execvp` (a `PATH` buffer of at most
/// `PATH_MAX`). For a script without `#!`, `execvp` copies the argument
/// vector onto the stack too: `STACK_PER_ARG` more per argument. Untouched
/// pages cost nothing (they are mapped as they are touched).
const STACK_BYTES: usize = 64 << 10;
const STACK_PER_ARG: usize = 2 * std::mem::size_of::<usize>();

/// The started program: its pid (also its process group) and the reading
/// ends of its stdout and stderr.
pub(super) struct Program {
    pub pid: u32,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// What the program's start needs before it runs: where to report its pid
/// (`report`, a line starting with `prefix`) and the gate to wait at.
pub(super) struct Gated<'a> {
    pub report: RawFd,
    pub prefix: &'a [u8],
    pub gate: RawFd,
}

/// Starts `spec`'s program, stdin on /dev/null and its output on two new
/// pipes, in a process group of its own; it reports its pid and waits at
/// the gate before its `exec`. Nothing ran on `ECANCELED` (the agent
/// dropped it) or on `ABANDONED` (no `go` can come: the agent or the
/// zygote went first).
/// The errno of a program abandoned at its gate (see `spawn`).
pub(super) const ABANDONED: i32 = libc::ECONNABORTED;

pub(super) fn spawn(spec: &Spec, gated: &Gated, envp: &[CString]) -> std::io::Result<Program> {
    // The program is also its own `argv[0]`.
    let argv_owned: Vec<CString> = std::iter::once(cstring(spec.program.as_os_str()))
        .chain(spec.args.iter().map(|a| cstring(OsStr::new(a))))
        .collect::<std::io::Result<_>>()?;
    let program = &argv_owned[0];
    let argv = null_terminated(&argv_owned);
    let envp = null_terminated(envp);
    let cwd = cstring(spec.working_dir.as_os_str())?;
    let null = std::fs::File::open("/dev/null")?;
    let (out_r, out_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let (err_r, err_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let mut line = [0u8; 64];
    let failed = AtomicI32::new(0);
    // The program's open-file limit, made here: the child allocates nothing.
    let open_files = spec.open_files.map(|soft| {
        let hard = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map_or(soft, |(_, hard)| hard);
        libc::rlimit {
            rlim_cur: soft.min(hard),
            rlim_max: hard,
        }
    });
    // Pages of its own, mapped as they are touched: a `vec!` would zero
    // (and fault in) all of it first.
    let mut stack = memmap2::MmapMut::map_anon(STACK_BYTES + STACK_PER_ARG * argv.len())?;

    let (null_fd, out_fd, err_fd) = (null.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd());
    let child = Box::new(|| -> isize {
        // SAFETY: the child shares our memory and runs while we are
        // suspended; it only makes system calls on what was prepared above.
        let errno: Result<(), i32> = unsafe {
            before_exec(
                [null_fd, out_fd, err_fd],
                &cwd,
                gated,
                &mut line,
                envp.as_ptr(),
                open_files.as_ref(),
            )
            .and_then(|()| {
                libc::execvp(program.as_ptr(), argv.as_ptr());
                Err(nix::errno::Errno::last_raw())
            })
        };
        failed.store(errno.err().unwrap_or(libc::EINVAL), Ordering::Relaxed);
        127
    });
    // SAFETY: `environ` is only read and written by this one thread; the
    // child may point it at the job's environment before its `exec`, and it
    // is put back below, before anything else runs here.
    let saved_environ = unsafe { libc::environ };
    // SAFETY: CLONE_VM | CLONE_VFORK: the child runs on `stack`, and we
    // are suspended until it has exec'd or exited, so nothing it touches
    // changes under it and it outlives none of what it borrows.
    let cloned = unsafe {
        nix::sched::clone(
            child,
            &mut stack,
            CloneFlags::CLONE_VM | CloneFlags::CLONE_VFORK,
            Some(libc::SIGCHLD),
        )
    };
    // SAFETY: as above; the child is gone or exec'd.
    unsafe { libc::environ = saved_environ };
    let pid = cloned?;
    drop((out_w, err_w, null));
    let errno = failed.load(Ordering::Relaxed);
    if errno != 0 {
        // It never exec'd: reap it, and say why.
        let _ = nix::sys::wait::waitpid(pid, None);
        let e = std::io::Error::from_raw_os_error(errno.abs());
        if errno < 0 {
            let dir = spec.working_dir.display();
            let why = format!("cannot enter its working directory {dir}: {e}");
            return Err(std::io::Error::new(e.kind(), why));
        }
        return Err(e);
    }
    Ok(Program {
        pid: pid.as_raw() as u32,
        stdout: out_r,
        stderr: err_r,
    })
}

/// The child's steps before its `exec`; the errno that stopped them (negated
/// when it was entering the working directory).
///
/// # Safety
/// Only in the child of `spawn`'s `clone`.
unsafe fn before_exec(
    [stdin, stdout, stderr]: [RawFd; 3],
    cwd: &CString,
    gated: &Gated,
    line: &mut [u8; 64],
    envp: *const *const libc::c_char,
    open_files: Option<&libc::rlimit>,
) -> Result<(), i32> {
    let check = |r: libc::c_int| {
        if r < 0 {
            Err(nix::errno::Errno::last_raw())
        } else {
            Ok(())
        }
    };
    check(libc::dup2(stdin, 0))?;
    check(libc::dup2(stdout, 1))?;
    check(libc::dup2(stderr, 2))?;
    // Negative: the working directory, not the program, is what failed.
    check(libc::chdir(cwd.as_ptr())).map_err(|errno| -errno)?;
    check(libc::setpgid(0, 0))?;
    if let Some(limit) = open_files {
        check(libc::setrlimit(libc::RLIMIT_NOFILE, limit))?;
    }
    check(default_signals())?;
    // If the supervisor dies, the program gets SIGKILL instead of running
    // on unsupervised.
    check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL))?;
    let n = super::pid_line(gated.prefix, libc::getpid() as u32, line);
    // A full pipe loses the report (the agent opens the gate without it);
    // a pipe with no reader means the agent is gone, and no `go` will come.
    if libc::write(gated.report, line.as_ptr().cast(), n) < 0
        && nix::errno::Errno::last_raw() == libc::EPIPE
    {
        return Err(ABANDONED);
    }
    let mut byte = 0u8;
    loop {
        match libc::read(gated.gate, (&mut byte as *mut u8).cast(), 1) {
            1 if byte == b'g' => break,
            // Dropped by the agent: its claim did not hold, or it was killed.
            1 => return Err(libc::ECANCELED),
            r if r < 0 && nix::errno::Errno::last_raw() == libc::EINTR => continue,
            // Closed without a word: the zygote is gone, or gave up waiting.
            _ => return Err(ABANDONED),
        }
    }
    if libc::signal(libc::SIGPIPE, libc::SIG_DFL) == libc::SIG_ERR {
        return Err(nix::errno::Errno::last_raw());
    }
    libc::environ = envp as *mut *mut libc::c_char;
    Ok(())
}

/// The supervisor's blocked signals (its signalfd's) and ignored ones are
/// the program's own business again: an ignored disposition would survive
/// the `exec`. Every signal at its default, whatever the agent inherited
/// ignored (`nohup`, a shell's `&`), but SIGPIPE, which the caller sets
/// once past the gate: the pid report must fail, not kill, when no agent
/// reads it any more. (Those that cannot be set, SIGKILL, SIGSTOP and
/// glibc's own, fail.) Dispositions are the child's own copy (no
/// CLONE_SIGHAND); the mask is per thread. `sigprocmask`'s result.
///
/// # Safety
/// Only in a child before its `exec`.
pub(super) unsafe fn default_signals() -> libc::c_int {
    // SAFETY: plain system calls on our own signal state.
    unsafe {
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        let masked = libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        for signal in 1..=64 {
            if signal != libc::SIGPIPE {
                libc::signal(signal, libc::SIG_DFL);
            }
        }
        masked
    }
}

/// The program's environment: the supervisor's, with the job's values on
/// top, and its execution's id (`files::EXECUTION_ID_VAR`).
pub(super) fn environment(spec: &Spec, execution_id: &str) -> std::io::Result<Vec<CString>> {
    let mut vars: std::collections::BTreeMap<OsString, OsString> = std::env::vars_os().collect();
    for (key, value) in &spec.env {
        vars.insert(key.into(), value.into());
    }
    vars.insert(files::EXECUTION_ID_VAR.into(), execution_id.into());
    // The shell's idea of where it is: the job's working directory, not the
    // agent's; and nothing of the agent's own shell.
    vars.insert("PWD".into(), spec.working_dir.clone().into_os_string());
    vars.remove(OsStr::new("OLDPWD"));
    vars.remove(OsStr::new("_"));
    vars.into_iter()
        .map(|(key, value)| {
            let mut pair = key.into_vec();
            pair.push(b'=');
            pair.extend(value.into_vec());
            cstring(OsStr::from_bytes(&pair))
        })
        .collect()
}

fn cstring(s: &OsStr) -> std::io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "a program, argument, variable or directory with a NUL byte",
        )
    })
}

/// The pointers of `strings`, then a null one: an `argv` or `envp`.
fn null_terminated(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}
