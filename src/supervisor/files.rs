//! The run directory: the files through which the agent and a job's
//! supervisor talk, so that either can die and the other carries on.
//!
//! `<data-dir>/runs/<execution id>/`
//! - `main.<ext>`       the code
//! - `supervisor.json`  who runs it: supervisor and program pid, start time, machine boot
//! - `stdout`, `stderr` the output, up to the cap (made with its first byte); `<stream>.truncated` once output is dropped
//! - `status.json`      how it ended (written atomically by the supervisor, last)
//! - `supervisor.log`   the supervisor's own complaints, if it has any
//!
//! What to run (`Spec`) is not among them: the agent hands it to the
//! supervisor over the zygote's pipe, so env values never touch the disk.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::domain::Stream;

/// What the supervisor runs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Spec {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub working_dir: PathBuf,
    /// Added to the supervisor's environment (which has no `EXECD_*` variables).
    pub env: BTreeMap<String, String>,
    /// From the program's start; enforced by the supervisor, agent or no agent.
    pub timeout_ms: u64,
    pub kill_grace_ms: u64,
    /// Bytes kept per stream.
    pub max_output_bytes: u64,
    /// The program's open-file soft limit: the one the agent was started
    /// with (it raises its own to the hard limit, for connections and the
    /// zygote's sockets; programs keep what they would have had).
    #[serde(default)]
    pub open_files: Option<u64>,
    /// A Python job the supervisor may fork from its warm interpreter
    /// (`--warm-python`; `warm`), when its start-up would be the same.
    #[serde(default)]
    pub warm: bool,
}

/// Who runs the job, identified beyond the pid (pids are reused).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Started {
    pub supervisor_pid: u32,
    /// Start time of the supervisor in clock ticks since boot (`/proc/<pid>/stat`).
    pub supervisor_start: u64,
    /// The program's pid, which is also its process group id.
    pub program_pid: u32,
    pub program_start: u64,
    /// `/proc/sys/kernel/random/boot_id`: after a reboot nothing here is alive.
    pub boot_id: String,
}

/// How the job ended, as the supervisor saw it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The program exited (or died of a signal it did not get from us).
    Exited,
    /// It outlived its timeout and was killed.
    Timeout,
    /// It was killed on request (SIGUSR1 to the supervisor, carrying the
    /// program's pid).
    Killed,
    /// The supervisor was told to stop (SIGTERM) and took the program with it.
    Terminated,
    /// The program could not be started.
    FailedToStart,
    /// The program never passed its gate, and no `go` could come: the agent
    /// or the zygote went first. Nothing ran; the job may run again.
    Unstarted,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ended {
    pub outcome: Outcome,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub error: Option<String>,
    pub ended_at: String,
}

/// Paths of one run directory.
#[derive(Clone, Debug)]
pub struct RunDir(PathBuf);

impl RunDir {
    pub fn new(path: impl Into<PathBuf>) -> RunDir {
        RunDir(path.into())
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn started(&self) -> PathBuf {
        self.0.join("supervisor.json")
    }

    pub fn ended(&self) -> PathBuf {
        self.0.join("status.json")
    }

    pub fn log(&self) -> PathBuf {
        self.0.join("supervisor.log")
    }

    pub fn output(&self, stream: Stream) -> PathBuf {
        self.0.join(stream.as_str())
    }

    pub fn truncated_marker(&self, stream: Stream) -> PathBuf {
        self.0.join(format!("{}.truncated", stream.as_str()))
    }

    /// `supervisor.json`, if there; an error when it cannot be told now
    /// (see `passing`).
    pub fn read_started(&self) -> std::io::Result<Option<Started>> {
        read_json(&self.started())
    }

    /// `status.json`, if there; an error when it cannot be told now.
    pub fn read_ended(&self) -> std::io::Result<Option<Ended>> {
        read_json(&self.ended())
    }
}

/// Whether a failed read says nothing of what is there: the process is out
/// of descriptors or memory for a while (a flood of connections). A job
/// must not be taken for lost, or for never started, on such a read.
pub fn passing(e: &std::io::Error) -> bool {
    use nix::libc::{EAGAIN, EINTR, EMFILE, ENFILE, ENOBUFS, ENOMEM};
    matches!(
        e.raw_os_error(),
        Some(EMFILE | ENFILE | ENOMEM | ENOBUFS | EAGAIN | EINTR)
    )
}

/// What a read found: `None` when it failed for any reason but one that
/// says nothing (`passing`), which stays an error.
fn told<T>(read: std::io::Result<T>) -> std::io::Result<Option<T>> {
    match read {
        Ok(found) => Ok(Some(found)),
        Err(e) if passing(&e) => Err(e),
        Err(_) => Ok(None),
    }
}

/// The file at `path` as JSON: `None` when it is missing or unreadable as
/// such (they are written whole, by a rename); an error when it cannot be
/// told now (`passing`).
fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> std::io::Result<Option<T>> {
    Ok(told(std::fs::read(path))?.and_then(|bytes| serde_json::from_slice(&bytes).ok()))
}

/// `read` until it can tell, for a few seconds at most, in a process
/// without a runtime (a supervisor at its start); then what it says, or
/// the default.
fn settled_blocking<T: Default>(mut read: impl FnMut() -> std::io::Result<T>) -> T {
    for _ in 0..200 {
        match read() {
            Ok(found) => return found,
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(25)),
        }
    }
    T::default()
}

/// Writes `value` as JSON to `path` atomically (temp file, rename), readable
/// by the owner only: a reader sees the old file or the whole new one. No
/// fsync: these files matter while processes live, and a power loss takes
/// the processes too (the database alone must survive that).
pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(&serde_json::to_vec(value).map_err(std::io::Error::other)?)?;
    std::fs::rename(&tmp, path)
}

/// The start time of process `pid` in clock ticks since boot, if it is alive
/// (a zombie is not); an error when that cannot be told now (`passing`).
pub fn process_start(pid: u32) -> std::io::Result<Option<u64>> {
    let Some(stat) = told(std::fs::read_to_string(format!("/proc/{pid}/stat")))? else {
        return Ok(None);
    };
    // The command name may hold spaces and parentheses: fields follow the last ')'.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return Ok(None);
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is the state (field 3), so field 22 (starttime) is fields[19].
    if fields.first() == Some(&"Z") || fields.first() == Some(&"X") {
        return Ok(None);
    }
    Ok(fields.get(19).and_then(|start| start.parse().ok()))
}

/// The start time of `pid`, a process of ours, tried for a few seconds
/// while it cannot be told; 0 if it is gone.
pub fn start_of(pid: u32) -> u64 {
    settled_blocking(|| process_start(pid)).unwrap_or_default()
}

/// This process's start time, read once per process: a supervisor runs many
/// jobs, and a forked one (a new pid) reads its own.
pub fn own_start() -> u64 {
    static OWN: std::sync::Mutex<(u32, u64)> = std::sync::Mutex::new((0, 0));
    let me = std::process::id();
    let mut own = OWN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if own.0 != me {
        *own = (me, start_of(me));
    }
    own.1
}

/// Set in every program's environment to its execution's id, and so in
/// that of everything it starts: what is left of a job whose supervisor is
/// gone is found by it, even a process that left the job's group.
pub const EXECUTION_ID_VAR: &str = "EXECD_EXECUTION_ID";

/// Processes whose environment marks them as `execution_id`'s and that
/// started no earlier than `since` (clock ticks since boot). Those of other
/// users cannot be read, and are not ours.
pub fn marked(execution_id: &str, since: u64) -> Vec<u32> {
    let mark = format!("{EXECUTION_ID_VAR}={execution_id}");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|var| var == mark.as_bytes()))
                && matches!(process_start(*pid), Ok(Some(start)) if start >= since)
        })
        .collect()
}

/// The process group of `pid`, read from `/proc/<pid>/stat`.
pub fn process_group(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    fields.get(2)?.parse().ok()
}

/// This boot of the machine (read once: it does not change while we run).
pub fn boot_id() -> &'static str {
    static BOOT_ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BOOT_ID.get_or_init(|| {
        settled_blocking(|| {
            let id = told(std::fs::read_to_string("/proc/sys/kernel/random/boot_id"))?;
            Ok(id.map(|id| id.trim().to_string()).unwrap_or_default())
        })
    })
}

impl Started {
    /// Whether the supervisor named here is still running (same boot, same
    /// pid, same start time). When that cannot be told now, it is taken to
    /// be: a job is never given up on a read that says nothing.
    pub fn supervisor_alive(&self) -> bool {
        self.boot_id == boot_id()
            && process_start(self.supervisor_pid)
                .map_or(true, |start| start == Some(self.supervisor_start))
    }

    /// Asks the supervisor to kill this job: SIGUSR1 carrying the program's
    /// pid, so a supervisor that has moved on to another job ignores it.
    pub fn request_kill(&self) -> std::io::Result<()> {
        let value = nix::libc::sigval {
            sival_ptr: self.program_pid as usize as *mut nix::libc::c_void,
        };
        // SAFETY: sigqueue only reads its arguments.
        let sent =
            unsafe { nix::libc::sigqueue(self.supervisor_pid as i32, nix::libc::SIGUSR1, value) };
        if sent == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// Pids of processes still in the program's group that started no
    /// earlier than the program. While any member lives, the group id cannot
    /// be reused, so these are the job's own leftovers. None when the
    /// program's pid now names another process: every member is gone, the
    /// id was freed and reused, and a group of that id is someone else's.
    pub fn leftovers(&self) -> Vec<u32> {
        if self.boot_id != boot_id() {
            return Vec::new();
        }
        if matches!(process_start(self.program_pid), Ok(Some(start)) if start != self.program_start)
        {
            return Vec::new();
        }
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                process_group(*pid) == Some(self.program_pid)
                    && matches!(process_start(*pid), Ok(Some(start)) if start >= self.program_start)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_a_start_time_and_a_group() {
        let me = std::process::id();
        assert!(process_start(me).unwrap().is_some());
        assert_eq!(own_start(), process_start(me).unwrap().unwrap());
        assert!(process_group(me).is_some());
        assert_eq!(process_start(u32::MAX).unwrap(), None);
    }

    #[test]
    fn json_files_are_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::new(dir.path());
        let ended = Ended {
            outcome: Outcome::Timeout,
            exit_code: None,
            signal: Some(15),
            error: None,
            ended_at: "t".into(),
        };
        write_json_atomic(&run.ended(), &ended).unwrap();
        assert_eq!(run.read_ended().unwrap(), Some(ended));
        assert!(!run.ended().with_extension("tmp").exists());
    }
}
