//! Starting a program in its own session and process group, and ending the
//! whole group: SIGTERM, a grace period, SIGKILL. No grandchild outlives its job.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use crate::domain::{Interpreter, Language, Languages};

/// What to execute, resolved from a claimed row.
#[derive(Debug)]
pub struct Launch {
    pub program: PathBuf,
    pub args: Vec<std::ffi::OsString>,
    pub working_dir: PathBuf,
    pub env: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("language {0} is not installed on this agent")]
    NotInstalled(String),
    #[error("cannot write the program file {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("the stored row is not valid: {0}")]
    BadRow(String),
}

impl Launch {
    /// Code in a language: written to a file in `run_dir`, run by the interpreter.
    pub fn code(
        languages: &Languages,
        language: &str,
        code: &str,
        run_dir: &Path,
    ) -> Result<Launch, LaunchError> {
        let language = Language::from_alias(language)
            .ok_or_else(|| LaunchError::BadRow(format!("language {language}")))?;
        let Interpreter { path, .. } = languages
            .get(language)
            .ok_or_else(|| LaunchError::NotInstalled(language.as_str().into()))?;
        let file = run_dir.join(language.file_name());
        let write = std::fs::create_dir_all(run_dir).and_then(|()| std::fs::write(&file, code));
        write.map_err(|source| LaunchError::Write {
            path: file.display().to_string(),
            source,
        })?;
        Ok(Launch {
            program: path.clone(),
            args: language.run_args(&file),
            working_dir: PathBuf::new(),
            env: BTreeMap::new(),
        })
    }

    /// A command: executed directly with `args`, or under `/bin/sh -c` without.
    pub fn command(command: &str, args: Option<Vec<String>>) -> Launch {
        let (program, args) = match args {
            Some(args) => (
                PathBuf::from(command),
                args.into_iter().map(Into::into).collect(),
            ),
            None => (PathBuf::from("/bin/sh"), vec!["-c".into(), command.into()]),
        };
        Launch {
            program,
            args,
            working_dir: PathBuf::new(),
            env: BTreeMap::new(),
        }
    }

    /// Starts the program in a new session (so its own process group, whose
    /// id is its pid), with piped stdout and stderr and no stdin.
    pub fn spawn(&self) -> std::io::Result<Child> {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .current_dir(&self.working_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(false);
        // The agent's own settings (its token among them) are not the program's business.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("EXECD_") {
                cmd.env_remove(name);
            }
        }
        cmd.envs(&self.env);
        // SAFETY: setsid is async-signal-safe and touches no memory of ours.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid()
                    .map(drop)
                    .map_err(std::io::Error::from)
            });
        }
        cmd.spawn()
    }
}

/// Sends `signal` to the process group `pgid`; a group already gone is fine.
pub fn signal_group(pgid: u32, signal: Signal) {
    if let Ok(pgid) = i32::try_from(pgid) {
        let _ = killpg(Pid::from_raw(pgid), signal);
    }
}

/// Ends the group led by `child`: SIGTERM, up to `grace` for the leader to
/// exit, then SIGKILL to the whole group. Returns the leader's exit status.
pub async fn terminate(
    child: &mut Child,
    pgid: u32,
    grace: Duration,
) -> std::io::Result<ExitStatus> {
    signal_group(pgid, Signal::SIGTERM);
    let status = match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => status,
        Err(_) => {
            signal_group(pgid, Signal::SIGKILL);
            child.wait().await
        }
    };
    // Whatever else is left of the group goes too.
    signal_group(pgid, Signal::SIGKILL);
    status
}

/// Exit code and, for a signal death, a sentence, with the shell's 128+N convention.
pub fn describe_exit(status: ExitStatus) -> (i64, Option<String>) {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => (i64::from(code), None),
        (None, Some(sig)) => {
            let name = Signal::try_from(sig)
                .map(|s| s.as_str().to_string())
                .unwrap_or_else(|_| sig.to_string());
            (
                128 + i64::from(sig),
                Some(format!("terminated by signal {name}")),
            )
        }
        (None, None) => (-1, Some("ended without an exit status".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn a_signal_death_reads_like_the_shell_shows_it() {
        let (code, error) = describe_exit(ExitStatus::from_raw(9));
        assert_eq!(code, 137);
        assert_eq!(error.as_deref(), Some("terminated by signal SIGKILL"));
        assert_eq!(describe_exit(ExitStatus::from_raw(3 << 8)), (3, None));
    }

    #[test]
    fn a_command_without_args_runs_under_sh() {
        let launch = Launch::command("echo hi | wc -c", None);
        assert_eq!(launch.program, PathBuf::from("/bin/sh"));
        assert_eq!(launch.args, vec!["-c", "echo hi | wc -c"]);
    }
}
