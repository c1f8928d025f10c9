//! Where the run directories live.
//!
//! A job's run directory (its code, who runs it, its output up to the cap,
//! how it ended; see `supervisor/files.rs`) is made at its start and
//! removed once its end is in the database. It only has to outlive the
//! agent, not the machine: after a reboot its program is gone, and its row
//! is settled from the database alone. So by default the directories live
//! in memory: `<data-dir>/runs` is a link to a private directory (mode 0700)
//! on `/dev/shm` when that is a tmpfs that allows `exec` (a Go program runs
//! from its run directory). On this machine's disk, making and
//! removing a directory and its files costs about half a millisecond of
//! CPU per job (ext4 allocating inodes), on tmpfs a tenth of that.
//!
//! `--runs-dir` names a directory instead (on disk, say, where memory is
//! short: a running job's output up to the cap is held there). A real
//! `<data-dir>/runs` left by an earlier agent is kept while it holds any
//! run; an empty one gives way to the link.

use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::domain::Stream;
use crate::supervisor::files::RunDir;

/// The tmpfs the run directories go to by default.
const MEMORY: &str = "/dev/shm";

/// The run directories' place, as prepared at start.
#[derive(Debug)]
pub struct RunsDir {
    /// Where the run directories are made (the link's target, if linked).
    pub path: PathBuf,
    /// `<data-dir>/runs` when it is a link to `path` made by the agent:
    /// both are removed at a stop that leaves no run behind.
    link: Option<PathBuf>,
}

impl RunsDir {
    /// Prepares the place for `data_dir`'s run directories: `configured`
    /// if given, else as the module says. `data_dir` must exist.
    pub fn prepare(data_dir: &Path, configured: Option<&Path>) -> std::io::Result<RunsDir> {
        if let Some(path) = configured {
            // Private when made here, as the in-memory one is: run
            // directories hold code and output. One made by hand is left
            // as it is, but said to be open.
            if !path.exists() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(path)?;
            } else if !std::fs::metadata(path)?.is_dir() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::NotADirectory,
                    "not a directory",
                ));
            } else if std::fs::metadata(path)?.mode() & 0o077 != 0 {
                tracing::warn!(
                    runs_dir = %path.display(),
                    "the runs dir is open to other users: they can read jobs' code and output"
                );
            }
            return Ok(RunsDir {
                path: std::fs::canonicalize(path)?,
                link: None,
            });
        }
        let link = data_dir.join("runs");
        match std::fs::symlink_metadata(&link) {
            Ok(meta) if meta.is_symlink() => {
                let target = std::fs::read_link(&link)?;
                if is_private_dir(&target) {
                    return Ok(RunsDir {
                        path: target,
                        link: Some(link),
                    });
                }
                // Gone with a reboot, or not ours: a new one.
                std::fs::remove_file(&link)?;
            }
            Ok(meta) if meta.is_dir() => {
                if std::fs::read_dir(&link)?.next().is_some() {
                    return Ok(RunsDir {
                        path: link,
                        link: None,
                    });
                }
                std::fs::remove_dir(&link)?;
            }
            Ok(_) => return Err(ErrorKind::AlreadyExists.into()),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        match make_in_memory() {
            Some(target) => {
                std::os::unix::fs::symlink(&target, &link)?;
                Ok(RunsDir {
                    path: target,
                    link: Some(link),
                })
            }
            None => {
                std::fs::create_dir_all(&link)?;
                Ok(RunsDir {
                    path: link,
                    link: None,
                })
            }
        }
    }

    /// Whether the default place would be in memory: `/dev/shm` is a tmpfs
    /// that allows `exec` (Go code is built into its run directory and run
    /// from there, and a container's /dev/shm is often mounted noexec).
    pub fn memory_usable() -> bool {
        let memory = Path::new(MEMORY);
        let tmpfs = nix::sys::statfs::statfs(memory)
            .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC);
        tmpfs
            && nix::sys::statvfs::statvfs(memory)
                .is_ok_and(|fs| !fs.flags().contains(nix::sys::statvfs::FsFlags::ST_NOEXEC))
    }

    /// Whether the run directories are in memory.
    pub fn in_memory(&self) -> bool {
        self.link.is_some()
    }

    /// At a stop: removes the in-memory directory and its link when no run
    /// directory is left (a job still running keeps both, for the next start).
    pub fn release(self) {
        let Some(link) = self.link else { return };
        if std::fs::remove_dir(&self.path).is_ok() {
            let _ = std::fs::remove_file(link);
        }
    }
}

/// Output files past this size are removed on a blocking thread.
const REMOVE_HERE_BYTES: u64 = 1 << 20;

/// Removes a finished job's run directory. The usual one (a few small files)
/// goes at once, on the calling thread: a trip to the blocking pool (two
/// thread wake-ups) costs more than its unlinks. Freeing a large output
/// file can take milliseconds (about 15 ms for 100 MiB in memory), so a
/// directory holding one goes to the blocking pool.
pub async fn remove_run(run: &RunDir) {
    let size = |stream| std::fs::metadata(run.output(stream)).map_or(0, |m| m.len());
    let large = size(Stream::Stdout) + size(Stream::Stderr) > REMOVE_HERE_BYTES;
    let dir = run.path().to_owned();
    let _ = match large {
        false => std::fs::remove_dir_all(&dir),
        true => tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e))),
    };
}

/// A new private directory on the tmpfs, or `None` where there is none to use.
fn make_in_memory() -> Option<PathBuf> {
    if !RunsDir::memory_usable() {
        return None;
    }
    let memory = Path::new(MEMORY);
    let name = format!(
        "execd-runs-{}",
        ulid::Ulid::new().to_string().to_lowercase()
    );
    let target = memory.join(name);
    // `create` fails on an existing path: nobody else's directory is taken.
    match std::fs::DirBuilder::new().mode(0o700).create(&target) {
        Ok(()) => Some(target),
        Err(e) => {
            tracing::warn!(error = %e, dir = %target.display(), "cannot use memory for run directories; using the data dir");
            None
        }
    }
}

/// A directory (not a link) of this user's that nobody else may enter.
fn is_private_dir(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|meta| {
        meta.is_dir()
            && meta.uid() == nix::unistd::geteuid().as_raw()
            && meta.permissions().mode() & 0o077 == 0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_data_dir_links_its_runs_into_memory_and_a_stop_without_runs_removes_both() {
        if !RunsDir::memory_usable() {
            return;
        }
        let data = tempfile::tempdir().unwrap();
        let runs = RunsDir::prepare(data.path(), None).unwrap();
        assert!(runs.in_memory());
        assert!(runs.path.starts_with(MEMORY));
        let link = data.path().join("runs");
        assert_eq!(std::fs::read_link(&link).unwrap(), runs.path);
        let mode = std::fs::metadata(&runs.path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let path = runs.path.clone();
        runs.release();
        assert!(!path.exists());
        assert!(std::fs::symlink_metadata(&link).is_err());
    }

    #[test]
    fn a_restart_keeps_the_runs_of_the_last_start_and_a_reboot_gets_new_ones() {
        if !RunsDir::memory_usable() {
            return;
        }
        let data = tempfile::tempdir().unwrap();
        let first = RunsDir::prepare(data.path(), None).unwrap();
        std::fs::create_dir(first.path.join("job")).unwrap();
        let path = first.path.clone();
        first.release();
        assert!(path.join("job").is_dir(), "a run left keeps its directory");
        let again = RunsDir::prepare(data.path(), None).unwrap();
        assert_eq!(again.path, path);
        // A reboot empties /dev/shm: the link then points nowhere.
        std::fs::remove_dir_all(&path).unwrap();
        let rebooted = RunsDir::prepare(data.path(), None).unwrap();
        assert_ne!(rebooted.path, path);
        assert!(rebooted.path.is_dir());
        rebooted.release();
    }

    #[test]
    fn a_linked_directory_others_may_enter_is_not_used() {
        if !RunsDir::memory_usable() {
            return;
        }
        let data = tempfile::tempdir().unwrap();
        let first = RunsDir::prepare(data.path(), None).unwrap();
        let path = first.path.clone();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
        let second = RunsDir::prepare(data.path(), None).unwrap();
        assert_ne!(second.path, path);
        std::fs::remove_dir(&path).unwrap();
        second.release();
    }

    #[test]
    fn a_runs_dir_on_disk_is_kept_while_it_holds_a_run_and_replaced_once_empty() {
        let data = tempfile::tempdir().unwrap();
        let on_disk = data.path().join("runs");
        std::fs::create_dir_all(on_disk.join("job")).unwrap();
        let kept = RunsDir::prepare(data.path(), None).unwrap();
        assert_eq!(kept.path, on_disk);
        assert!(!kept.in_memory());
        kept.release();
        assert!(on_disk.join("job").is_dir());
        std::fs::remove_dir(on_disk.join("job")).unwrap();
        let next = RunsDir::prepare(data.path(), None).unwrap();
        assert_eq!(next.in_memory(), RunsDir::memory_usable());
        next.release();
    }

    #[test]
    fn a_configured_runs_dir_is_made_and_used_as_it_is() {
        let data = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let wanted = elsewhere.path().join("runs-here");
        let runs = RunsDir::prepare(data.path(), Some(&wanted)).unwrap();
        assert_eq!(runs.path, std::fs::canonicalize(&wanted).unwrap());
        let mode = std::fs::metadata(&wanted).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "private when made here (it was 0755)");
        assert!(!runs.in_memory());
        assert!(!data.path().join("runs").exists());
        runs.release();
        assert!(wanted.is_dir(), "a configured directory is never removed");
    }
}
