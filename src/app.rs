//! Start-up and shutdown: directories, auth, interpreters, database, runner,
//! HTTP server — in that order — and the reverse on shutdown.

use std::future::Future;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::db::Db;
use crate::delivery::{Deliverer, DeliveryConfig};
use crate::domain::{Lane, Language, Languages, Limits};
use crate::http::{self, AppState, Auth};
use crate::runner::{Runner, RunnerConfig, RunsDir};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot prepare {path}: {source}")]
    Dir {
        path: String,
        source: std::io::Error,
    },
    #[error("token file {path}: {source}")]
    TokenFile {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Db(#[from] crate::db::OpenError),
    #[error("cannot recover executions of an earlier run: {0}")]
    Recover(crate::runner::RunnerError),
    #[error("another execd (pid {pid}) is already serving the data dir {dir}")]
    Locked { pid: String, dir: String },
}

/// How long a stop waits for the WebSocket streams to say their runs go on.
const STREAMS_GRACE: Duration = Duration::from_secs(2);

fn create_dir(path: &Path) -> Result<(), StartError> {
    std::fs::create_dir_all(path).map_err(|source| StartError::Dir {
        path: path.display().to_string(),
        source,
    })
}

/// Serves the agent on `listener` until `shutdown` completes, then stops
/// claiming, ends running jobs, finishes pending writes and returns.
pub async fn serve(
    mut config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let started = Instant::now();
    config.validate()?;
    // Polled once now, so that a signal's handlers are in place from here
    // on: a stop asked for while the database waits for an operator's lock
    // ends that wait cleanly (it killed the agent outright before).
    let mut shutdown = Box::pin(shutdown);
    if futures::poll!(shutdown.as_mut()).is_ready() {
        tracing::info!("stopped before starting");
        return Ok(());
    }
    if let Some((from, to)) = crate::runner::raise_open_files().filter(|(from, to)| from < to) {
        tracing::info!(from, to, "open-file limit raised (programs keep the first)");
    }
    // Read (and kept) while descriptors are plenty: a first read under a
    // shortage would wait for it on a runtime thread.
    crate::supervisor::files::boot_id();
    // Private when the agent makes it: the database holds what programs
    // and callbacks need (env values, signature secrets, header values).
    if !config.data_dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&config.data_dir)
            .map_err(|source| StartError::Dir {
                path: config.data_dir.display().to_string(),
                source,
            })?;
    }
    // Absolute from here on: programs run in other working directories.
    config.data_dir =
        std::fs::canonicalize(&config.data_dir).map_err(|source| StartError::Dir {
            path: config.data_dir.display().to_string(),
            source,
        })?;
    // Held until serve returns: one agent per data dir.
    let _lock = lock_data_dir(&config.data_dir)?;
    let workdir = config.default_workdir();
    create_dir(&workdir)?;
    let workdir = std::fs::canonicalize(&workdir).unwrap_or(workdir);
    let auth = resolve_auth(&config, listener.local_addr().ok())?;
    // Interpreters are found while the database opens: a shim can take a
    // few hundred milliseconds to say where its interpreter is. Python's is
    // told as soon as found, for the warm interpreter to start meanwhile.
    let (python_found, python) = tokio::sync::oneshot::channel();
    let python_found = std::sync::Mutex::new(Some(python_found));
    let languages = tokio::task::spawn_blocking(move || {
        Languages::detect_then(|found| {
            if found.language == Language::Python {
                if let Some(tell) = python_found.lock().unwrap().take() {
                    let _ = tell.send(found.clone());
                }
            }
        })
    });
    // Past this point a failed start releases the runs dir (a link and a
    // directory in memory, if made now).
    let runs_dir =
        RunsDir::prepare(&config.data_dir, config.runs_dir.as_deref()).map_err(|source| {
            StartError::Dir {
                path: (config.runs_dir.clone())
                    .unwrap_or_else(|| config.data_dir.join("runs"))
                    .display()
                    .to_string(),
                source,
            }
        })?;

    let supervisor_bin = match &config.supervisor_bin {
        Some(path) => path.clone(),
        None => match std::env::current_exe() {
            Ok(path) => path,
            Err(source) => {
                runs_dir.release();
                return Err(StartError::Dir {
                    path: "the execd binary".into(),
                    source,
                });
            }
        },
    };
    // The zygote, and with `--warm-python` the warm interpreter, start
    // while the database opens: a first job sent as soon as `/health`
    // answers finds the interpreter (tens of milliseconds to start) nearer
    // ready. A failed start drops them, and the zygote ends with its stdin.
    let supervisors = tokio::spawn({
        let (bin, runs, warm) = (supervisor_bin, runs_dir.path.clone(), config.warm_python);
        async move {
            let python = match warm {
                true => python.await.ok(),
                false => None,
            };
            crate::runner::start_supervisors(bin, runs, python.as_ref()).await
        }
    });
    let stop_writer = CancellationToken::new();
    if let Err(e) = keep_db_private(&config.db_path()) {
        runs_dir.release();
        return Err(e);
    }
    let db_path = config.db_path();
    let opened = tokio::select! {
        opened = Db::open(&db_path, stop_writer.clone()) => opened,
        () = shutdown.as_mut() => {
            tracing::info!("stopped while waiting for the database; nothing was started");
            supervisors.abort();
            runs_dir.release();
            return Ok(());
        }
    };
    let (db, writer_task) = match opened {
        Ok(opened) => opened,
        Err(e) => {
            runs_dir.release();
            return Err(e.into());
        }
    };
    let languages = languages.await.unwrap_or_default();
    let owner = format!("boot_{}", ulid::Ulid::new().to_string().to_lowercase());
    let deliverer = Deliverer::new(
        db.clone(),
        DeliveryConfig {
            owner: owner.clone(),
            schedule: config.callback_schedule(),
            timeout: Duration::from_secs_f64(config.callback_timeout_secs),
            concurrency: config.callback_concurrency,
            receiver_concurrency: config.callback_receiver_concurrency,
            payload_output_bytes: config.callback_output_bytes,
            poll_interval: config.poll_interval(),
        },
    );
    let stop = CancellationToken::new();
    let supervisors = supervisors
        .await
        .expect("starting the zygote does not panic");
    let runner = Runner::new(
        db.clone(),
        RunnerConfig {
            owner: owner.clone(),
            languages: languages.clone(),
            runs_dir: runs_dir.path.clone(),
            runs_dir_private: config.runs_dir.is_none(),
            max_output_bytes: config.max_output_bytes,
            kill_grace: config.kill_grace(),
            poll_interval: config.poll_interval(),
            concurrency: [
                (Lane::Sync, config.sync_concurrency),
                (Lane::Background, config.background_concurrency),
                (Lane::Async, config.async_concurrency),
            ],
            callback_output_bytes: config.callback_output_bytes,
            warm_python: config.warm_python,
        },
        supervisors,
        deliverer.clone(),
        stop.clone(),
    );
    let recovered = match runner.recover().await {
        Ok(recovered) => recovered,
        Err(e) => {
            runs_dir.release();
            return Err(StartError::Recover(e));
        }
    };
    if recovered.reattached
        + recovered.lost
        + recovered.requeued
        + recovered.unrun
        + recovered.swept
        > 0
    {
        tracing::info!(
            reattached = recovered.reattached,
            lost = recovered.lost,
            requeued = recovered.requeued,
            sync_unrun = recovered.unrun,
            swept = recovered.swept,
            "jobs of an earlier run recovered"
        );
    }
    let runner_task = runner.start();
    let delivery_task = deliverer.start(stop.clone());
    let retention_task = crate::retention::start(
        db.clone(),
        crate::retention::RetentionConfig {
            keep: config.retention,
            keep_dead: config.dead_callback_retention,
            interval: config.retention_interval,
            batch: 500,
        },
        stop.clone(),
    );

    // Read once: it follows the open-file limit unless given.
    let max_connections = config.max_connections();
    let sweeper = runner.clone();
    let readers = db.readers.clone();
    let streams = tokio_util::task::TaskTracker::new();
    let state = AppState::new(http::Inner {
        db,
        runner,
        deliverer,
        callback_output_bytes: config.callback_output_bytes,
        limits: Limits {
            max_code_bytes: config.max_code_bytes,
            max_env_bytes: config.max_env_bytes,
            max_callback_headers_bytes: config.max_callback_headers_bytes,
            max_timeout: Duration::from_secs_f64(config.max_timeout_secs),
            default_workdir: workdir,
            languages: languages.clone(),
        },
        auth,
        list_output_bytes: usize::try_from(config.list_output_bytes).unwrap_or(usize::MAX),
        list_page_output_bytes: usize::try_from(config.list_page_output_bytes)
            .unwrap_or(usize::MAX),
        kill_grace: config.kill_grace(),
        sync_start_within: Duration::from_secs_f64(config.sync_start_within_secs),
        max_body_bytes: config.max_body_bytes,
        max_connections,
        header_timeout: config.header_timeout(),
        body_timeout: config.body_timeout(),
        max_output_bytes: config.max_output_bytes,
        warm_python: config.warm_python,
        started,
        streams: streams.clone(),
    });
    let installed: Vec<_> = languages.iter().map(|i| i.language.as_str()).collect();
    tracing::info!(
        addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        db = %config.db_path().display(),
        runs = %runs_dir.path.display(),
        boot = %owner,
        languages = ?installed,
        startup_ms = started.elapsed().as_secs_f64() * 1e3,
        "execd is serving"
    );

    let signal = stop.clone();
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutting down");
        signal.cancel();
    });
    http::serve(
        listener,
        http::router(state),
        max_connections,
        config.header_timeout(),
        stop.clone(),
    )
    .await;
    // A WebSocket stream sees the stop within its poll and tells its client
    // that the run goes on; bounded, should a client not read.
    if !http::all_ended_within(&streams, STREAMS_GRACE).await {
        tracing::warn!(
            open = streams.len(),
            "WebSocket streams still open at the stop"
        );
    }
    let _ = runner_task.await;
    // A job prepared and never started (its claim not committed when the
    // stop came) leaves its directory: gone now, so that a stop that leaves
    // no running job leaves no run directory.
    if let Err(e) = sweeper.sweep().await {
        tracing::warn!(error = %e, "run directories not swept");
    }
    let _ = delivery_task.await;
    let _ = retention_task.await;
    // The readers close first, so that the writer's connection is the last:
    // SQLite then folds the WAL into the database file and removes it, and
    // the file alone (copied, or read by `sqlite3`) holds everything.
    readers.close().await;
    stop_writer.cancel();
    let _ = writer_task.await;
    runs_dir.release();
    tracing::info!("stopped");
    Ok(())
}

/// Makes the database files their user's alone, whatever the data dir's
/// mode (one made by hand, or by an image's `mkdir`, is often 0755): they
/// hold env values and signature secrets. The file is made here if new, so
/// SQLite finds it private and gives its WAL and shared-memory files the
/// same mode.
fn keep_db_private(db: &Path) -> Result<(), StartError> {
    use std::os::unix::fs::PermissionsExt;
    let io_err = |path: &Path, source| StartError::Dir {
        path: path.display().to_string(),
        source,
    };
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(db)
        .map_err(|e| io_err(db, e))?;
    let with_suffix = |suffix: &str| {
        let mut path = db.as_os_str().to_owned();
        path.push(suffix);
        std::path::PathBuf::from(path)
    };
    for path in [db.to_path_buf(), with_suffix("-wal"), with_suffix("-shm")] {
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if meta.permissions().mode() & 0o077 != 0 {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| io_err(&path, e))?;
        }
    }
    Ok(())
}

/// Takes the data dir's lock (`execd.lock`, an exclusive `flock`), so a
/// second agent on the same data dir exits at once instead of racing the
/// first. The lock goes with the process, however it ends.
fn lock_data_dir(dir: &Path) -> Result<Flock<std::fs::File>, StartError> {
    let path = dir.join("execd.lock");
    let io_err = |source| StartError::Dir {
        path: path.display().to_string(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(&path)
        .map_err(io_err)?;
    let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => lock,
        Err((file, _)) => {
            let pid = std::io::read_to_string(&file).unwrap_or_default();
            return Err(StartError::Locked {
                pid: pid.trim().to_string(),
                dir: dir.display().to_string(),
            });
        }
    };
    lock.set_len(0).map_err(io_err)?;
    lock.write_all(std::process::id().to_string().as_bytes())
        .map_err(io_err)?;
    Ok(lock)
}

/// The auth mode of `config`; with no token or secret, the token kept in the
/// data dir (generated on first start, mode 0600).
fn resolve_auth(config: &Config, addr: Option<std::net::SocketAddr>) -> Result<Auth, StartError> {
    if config.no_auth {
        tracing::warn!(
            "authentication is disabled (--no-auth): anyone who reaches this port can run code"
        );
        return Ok(Auth::Disabled);
    }
    if let Some(token) = &config.token {
        return Ok(Auth::Token(token.clone()));
    }
    if let Some(secret) = &config.jwt_secret {
        return Ok(Auth::jwt(secret));
    }
    let path = config.token_path();
    let token = read_or_create_token(&path).map_err(|source| StartError::TokenFile {
        path: path.display().to_string(),
        source,
    })?;
    let url = addr.map_or_else(|| "http://127.0.0.1:7070".into(), |a| format!("http://{a}"));
    // The token itself is never printed; the line reads it from its file.
    let try_it = format!(
        "curl -s -H \"Authorization: Bearer $(cat {})\" {url}/info",
        path.display()
    );
    tracing::info!(token_file = %path.display(), %try_it, "clients authenticate with the token in the token file");
    // For a person at a terminal; JSON logs are one object per line.
    if config.log_format == crate::config::LogFormat::Text {
        eprintln!("\n  Try it:  {try_it}\n");
    }
    Ok(Auth::Token(token))
}

fn read_or_create_token(path: &Path) -> std::io::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(token) if !token.trim().is_empty() => return Ok(token.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let token = hex::encode(rand::random::<[u8; 32]>());
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(token.as_bytes())?;
    file.sync_all()?;
    Ok(token)
}
