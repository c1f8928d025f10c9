//! One typed configuration: defaults, then environment variables, then flags,
//! validated once at start. Secrets (`token`, `jwt_secret`) are never printed:
//! `Debug` is written by hand to redact them.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// The `execd` command line.
#[derive(Debug, Parser)]
#[command(
    name = "execd",
    version = crate::VERSION,
    about = "A durable execution agent with a HopX-compatible REST API",
    // `--kill-grace -1` is a bad value, not an unknown flag.
    allow_negative_numbers = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Flags of `serve`, accepted without the subcommand too.
    #[command(flatten)]
    pub serve: Config,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent (the default).
    #[command(allow_negative_numbers = true)]
    Serve(Box<Config>),
    /// The supervisor zygote (started by the agent, not by hand): run
    /// directories come on stdin, and a supervisor is forked for each.
    #[command(hide = true)]
    Supervise { runs_dir: PathBuf },
    #[command(flatten)]
    Client(crate::cli::ClientCommand),
}

/// What the binary was asked to do.
pub enum Mode {
    Serve(Box<Config>),
    Supervise(PathBuf),
    Client(crate::cli::ClientCommand),
}

impl Cli {
    pub fn mode(self) -> Mode {
        match self.command {
            Some(Command::Serve(config)) => Mode::Serve(config),
            Some(Command::Supervise { runs_dir }) => Mode::Supervise(runs_dir),
            Some(Command::Client(command)) => Mode::Client(command),
            None => Mode::Serve(Box::new(self.serve)),
        }
    }

    /// The serve configuration, whether or not `serve` was spelled out.
    pub fn into_config(self) -> Config {
        match self.mode() {
            Mode::Serve(config) => *config,
            Mode::Supervise(_) | Mode::Client(_) => Cli::parse_from(["execd"]).serve,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Everything the agent needs to run.
#[derive(Clone, Args)]
pub struct Config {
    /// Address to listen on.
    #[arg(long, env = "EXECD_LISTEN", default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,

    /// Directory for the SQLite database (`execd.db`), the token file and run directories.
    #[arg(long, env = "EXECD_DATA_DIR", default_value = "./execd-data")]
    pub data_dir: PathBuf,

    /// Static bearer token clients must send. Compared in constant time.
    #[arg(long, env = "EXECD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// Secret for HS256 JWT bearer tokens, at least 16 bytes (signature, a required `exp` and any `nbf` are checked, with 60 s of leeway).
    #[arg(long, env = "EXECD_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// Serve without authentication. Only for isolated test set-ups.
    #[arg(long, env = "EXECD_NO_AUTH", value_parser = clap::builder::BoolishValueParser::new())]
    pub no_auth: bool,

    /// Concurrent runs of `POST /execute` and `POST /commands/run`.
    #[arg(long, env = "EXECD_SYNC_CONCURRENCY", default_value_t = 16)]
    pub sync_concurrency: usize,

    /// Concurrent background processes (`/execute/background`, `/commands/background`).
    #[arg(long, env = "EXECD_BACKGROUND_CONCURRENCY", default_value_t = 16)]
    pub background_concurrency: usize,

    /// Concurrent async executions (`/execute/async`); the rest wait in the
    /// queue. 0 pauses the lane: submissions are stored and wait.
    #[arg(long, env = "EXECD_ASYNC_CONCURRENCY", default_value_t = 4)]
    pub async_concurrency: usize,

    /// Largest request body accepted, in bytes.
    #[arg(long, env = "EXECD_MAX_BODY_BYTES", default_value_t = 4 << 20)]
    pub max_body_bytes: usize,

    /// Client connections open at once (a WebSocket's until it closes);
    /// past it, new ones wait to be accepted. Default: the open-file limit
    /// less a quarter of it (at least 256) for jobs and the database.
    #[arg(long, env = "EXECD_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,

    /// Longest a client may take to send a request's headers, in seconds;
    /// a connection idle between requests is closed after as long.
    #[arg(
        long = "header-timeout",
        env = "EXECD_HEADER_TIMEOUT",
        default_value_t = 30.0
    )]
    pub header_timeout_secs: f64,

    /// Longest a client may take to send a request's body once its headers
    /// are in, in seconds: past it the answer is a 408 and the connection
    /// is closed.
    #[arg(
        long = "body-timeout",
        env = "EXECD_BODY_TIMEOUT",
        default_value_t = 30.0
    )]
    pub body_timeout_secs: f64,

    /// Largest `code` (or command) accepted, in bytes.
    #[arg(long, env = "EXECD_MAX_CODE_BYTES", default_value_t = 1 << 20)]
    pub max_code_bytes: usize,

    /// Largest `env` accepted (its `NAME=value` strings together), in bytes.
    #[arg(long, env = "EXECD_MAX_ENV_BYTES", default_value_t = 256 << 10)]
    pub max_env_bytes: usize,

    /// Largest `callback_headers` accepted (names and values together), in bytes: receivers refuse larger headers (431), and the callback could never be delivered.
    #[arg(long, env = "EXECD_MAX_CALLBACK_HEADERS_BYTES", default_value_t = 16 << 10)]
    pub max_callback_headers_bytes: usize,

    /// Output stored per stream and execution, in bytes; the rest is dropped and flagged.
    #[arg(long, env = "EXECD_MAX_OUTPUT_BYTES", default_value_t = 10 << 20)]
    pub max_output_bytes: u64,

    /// Largest `timeout` a submission may ask for, in seconds.
    #[arg(
        long = "max-timeout",
        env = "EXECD_MAX_TIMEOUT",
        default_value_t = 86_400.0
    )]
    pub max_timeout_secs: f64,

    /// Run Python jobs in a fork of a warm interpreter (one per supervisor)
    /// instead of starting the interpreter for each: a `print(1)` then
    /// costs a few milliseconds of CPU, not the interpreter's start-up (10
    /// to 50 ms here). Jobs share the warm one's hash seed and the modules
    /// its start-up imported; a job whose start-up would differ (`PYTHON*`,
    /// locale, `HOME` or `TZ` variables, a `sitecustomize` on its
    /// `PYTHONPATH`) starts cold. `--warm-python false` starts every one cold.
    #[arg(
        long,
        env = "EXECD_WARM_PYTHON",
        default_value_t = true,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub warm_python: bool,

    /// Seconds between SIGTERM and SIGKILL when a run is killed or times out.
    #[arg(long = "kill-grace", env = "EXECD_KILL_GRACE", default_value_t = 2.0)]
    pub kill_grace_secs: f64,

    /// Longest a sync run (`POST /execute`, `/commands/run`) waits for a
    /// slot, in seconds. One not started by then is killed unrun and its
    /// request answered 503 `EXECUTION_NOT_STARTED`, so a retry never runs
    /// the code twice.
    #[arg(
        long = "sync-start-within",
        env = "EXECD_SYNC_START_WITHIN",
        default_value_t = 20.0
    )]
    pub sync_start_within_secs: f64,

    /// Where run directories are made. Default: `<data-dir>/runs`, a link to
    /// a private directory on /dev/shm when that is a tmpfs that allows exec
    /// (else a plain directory). Name one on disk where memory is short: a
    /// running job's output up to the cap is held there. Go programs run
    /// from it, so it must not be mounted noexec.
    #[arg(long, env = "EXECD_RUNS_DIR")]
    pub runs_dir: Option<PathBuf>,

    /// Working directory of runs that name none. Created at start. Default: `<data-dir>/workspace`.
    #[arg(long, env = "EXECD_WORKDIR")]
    pub workdir: Option<PathBuf>,

    /// Output shown per stream in the process list (the tail), in bytes; single-process reads show it all.
    #[arg(long, env = "EXECD_LIST_OUTPUT_BYTES", default_value_t = 64 << 10)]
    pub list_output_bytes: u64,

    /// Output shown in one page of the process list, all its rows and streams together, in bytes: where a page's tails would pass it, each is cut shorter.
    #[arg(long, env = "EXECD_LIST_PAGE_OUTPUT_BYTES", default_value_t = 16 << 20)]
    pub list_page_output_bytes: u64,

    /// Seconds between safety-net polls of the queue (wake-ups are normally immediate).
    #[arg(
        long = "poll-interval",
        env = "EXECD_POLL_INTERVAL",
        default_value_t = 2.0
    )]
    pub poll_interval_secs: f64,

    /// Time allowed for one callback attempt (connect, send, response).
    #[arg(
        long = "callback-timeout",
        env = "EXECD_CALLBACK_TIMEOUT",
        default_value_t = 10.0
    )]
    pub callback_timeout_secs: f64,

    /// Callback attempts in flight at once.
    #[arg(long, env = "EXECD_CALLBACK_CONCURRENCY", default_value_t = 64)]
    pub callback_concurrency: usize,

    /// Callback attempts in flight at once to one receiver (scheme, host and port): a dead one holds no more.
    #[arg(
        long,
        env = "EXECD_CALLBACK_RECEIVER_CONCURRENCY",
        default_value_t = 32
    )]
    pub callback_receiver_concurrency: usize,

    /// Delays between callback attempts after the first (immediate) one; when the last fails, the delivery is dead.
    #[arg(
        long,
        env = "EXECD_CALLBACK_RETRY_SCHEDULE",
        default_value = "5s,5m,30m,2h,5h,10h,10h"
    )]
    pub callback_retry_schedule: String,

    /// Each retry delay is scaled by a random factor within ± this fraction.
    #[arg(long, env = "EXECD_CALLBACK_JITTER", default_value_t = 0.1)]
    pub callback_jitter: f64,

    /// Longest `Retry-After` (from a 429 or 503) honoured, in seconds.
    #[arg(
        long = "callback-max-retry-after",
        env = "EXECD_CALLBACK_MAX_RETRY_AFTER",
        default_value_t = 3600.0
    )]
    pub callback_max_retry_after_secs: f64,

    /// Output per stream in a callback payload (the tail), in bytes; the API keeps it all.
    #[arg(long, env = "EXECD_CALLBACK_OUTPUT_BYTES", default_value_t = 1 << 20)]
    pub callback_output_bytes: usize,

    /// Finished executions (with their output and delivered callbacks) are pruned after this age.
    #[arg(long, env = "EXECD_RETENTION", default_value = "7d", value_parser = humantime::parse_duration)]
    pub retention: Duration,

    /// Finished executions whose callback is dead are kept this long.
    #[arg(long, env = "EXECD_DEAD_CALLBACK_RETENTION", default_value = "30d", value_parser = humantime::parse_duration)]
    pub dead_callback_retention: Duration,

    /// How often retention runs.
    #[arg(long, env = "EXECD_RETENTION_INTERVAL", default_value = "10m", value_parser = humantime::parse_duration)]
    pub retention_interval: Duration,

    /// The `execd` binary that supervises each job. Default: this binary.
    #[arg(long, env = "EXECD_SUPERVISOR_BIN")]
    pub supervisor_bin: Option<PathBuf>,

    /// Log format.
    #[arg(long, env = "EXECD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// The most client connections there can be: the kernel's own ceiling on
/// open files (`nr_open`) is 1,048,576 by default.
const MAX_CONNECTIONS: usize = 1 << 20;

/// A configuration value that cannot work.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(String);

impl Config {
    /// Checks every value once, so the rest of the agent can trust them.
    pub fn validate(&self) -> Result<(), ConfigError> {
        // A year: no job or wait needs more, and a larger time overflows
        // the clocks it is added to.
        const MAX_SECONDS: f64 = 366.0 * 24.0 * 3600.0;
        const MAX_CONCURRENCY: usize = 100_000;
        const MIN_POLL_INTERVAL: f64 = 0.05;
        let bad = |m: &str| Err(ConfigError(m.to_string()));
        if self.token.is_some() && self.jwt_secret.is_some() {
            return bad("give --token or --jwt-secret, not both");
        }
        if self.no_auth && (self.token.is_some() || self.jwt_secret.is_some()) {
            return bad("--no-auth cannot be combined with --token or --jwt-secret");
        }
        if self.token.as_deref().is_some_and(str::is_empty) {
            return bad("--token must not be empty");
        }
        if self.token.as_deref().is_some_and(|t| t.trim() != t) {
            // A client's token is read without them: this one could never match.
            return bad(
                "--token must not begin or end with whitespace (a newline read from a file?)",
            );
        }
        if self.jwt_secret.as_deref().is_some_and(|s| s.len() < 16) {
            return bad("--jwt-secret must be at least 16 bytes");
        }
        for (name, value) in [
            ("--sync-concurrency", self.sync_concurrency),
            ("--background-concurrency", self.background_concurrency),
            ("--max-body-bytes", self.max_body_bytes),
            ("--max-code-bytes", self.max_code_bytes),
            ("--max-env-bytes", self.max_env_bytes),
            (
                "--max-callback-headers-bytes",
                self.max_callback_headers_bytes,
            ),
        ] {
            if value == 0 {
                return Err(ConfigError(format!("{name} must be greater than 0")));
            }
        }
        if self.max_code_bytes > self.max_body_bytes {
            return bad("--max-code-bytes must not exceed --max-body-bytes");
        }
        // In seconds: positive (or, for the last two, zero too), and at most
        // MAX_SECONDS.
        for (name, value, zero) in [
            ("--max-timeout", self.max_timeout_secs, false),
            ("--poll-interval", self.poll_interval_secs, false),
            ("--callback-timeout", self.callback_timeout_secs, false),
            (
                "--callback-max-retry-after",
                self.callback_max_retry_after_secs,
                true,
            ),
            ("--kill-grace", self.kill_grace_secs, true),
            ("--sync-start-within", self.sync_start_within_secs, false),
            ("--header-timeout", self.header_timeout_secs, false),
            ("--body-timeout", self.body_timeout_secs, false),
        ] {
            let low = if zero { value >= 0.0 } else { value > 0.0 };
            if !(value.is_finite() && low && value <= MAX_SECONDS) {
                let least = if zero {
                    "zero or more"
                } else {
                    "a positive number of"
                };
                return Err(ConfigError(format!(
                    "{name} must be {least} seconds, at most {MAX_SECONDS} (a year)"
                )));
            }
        }
        if self
            .max_connections
            .is_some_and(|n| n == 0 || n > MAX_CONNECTIONS)
        {
            return Err(ConfigError(format!(
                "--max-connections must be from 1 to {MAX_CONNECTIONS}"
            )));
        }
        if self.callback_concurrency == 0 {
            return bad("--callback-concurrency must be greater than 0");
        }
        if self.callback_receiver_concurrency == 0 {
            return bad("--callback-receiver-concurrency must be greater than 0");
        }
        // A slot is a semaphore permit (tokio's limit is 2^61), and each
        // one a process or a connection: far past what a machine holds.
        for (name, value) in [
            ("--sync-concurrency", self.sync_concurrency),
            ("--background-concurrency", self.background_concurrency),
            ("--async-concurrency", self.async_concurrency),
            ("--callback-concurrency", self.callback_concurrency),
            (
                "--callback-receiver-concurrency",
                self.callback_receiver_concurrency,
            ),
        ] {
            if value > MAX_CONCURRENCY {
                return Err(ConfigError(format!(
                    "{name} must be at most {MAX_CONCURRENCY}"
                )));
            }
        }
        // The safety-net poll is slow by design; a fast one makes an idle
        // agent spin.
        if self.poll_interval_secs < MIN_POLL_INTERVAL {
            return Err(ConfigError(format!(
                "--poll-interval must be at least {MIN_POLL_INTERVAL} seconds"
            )));
        }
        if !(0.0..1.0).contains(&self.callback_jitter) {
            return bad("--callback-jitter must be at least 0 and below 1");
        }
        match crate::delivery::schedule::parse_delays(&self.callback_retry_schedule) {
            Err(e) => return Err(ConfigError(format!("--callback-retry-schedule: {e}"))),
            Ok(delays) if delays.iter().any(|d| d.as_secs_f64() > MAX_SECONDS) => {
                return bad("--callback-retry-schedule: each delay must be at most a year");
            }
            Ok(_) => {}
        }
        // Subtracted from now at every pruning: past a century of days the
        // date overflows, and the retention task would stop for good.
        const MAX_RETENTION: Duration = Duration::from_secs(100 * 366 * 24 * 3600);
        for (name, value) in [
            ("--retention", self.retention),
            ("--dead-callback-retention", self.dead_callback_retention),
            ("--retention-interval", self.retention_interval),
        ] {
            if value > MAX_RETENTION {
                return Err(ConfigError(format!("{name} must be at most 100 years")));
            }
        }
        if self.retention_interval.is_zero() {
            return bad("--retention-interval must be more than 0");
        }
        if let Some(bin) = &self.supervisor_bin {
            use std::os::unix::fs::PermissionsExt;
            let runnable = std::fs::metadata(bin)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
            if !runnable {
                return Err(ConfigError(format!(
                    "--supervisor-bin {} is not an executable file",
                    bin.display()
                )));
            }
        }
        Ok(())
    }

    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("execd.db")
    }

    pub fn token_path(&self) -> PathBuf {
        self.data_dir.join("token")
    }

    pub fn default_workdir(&self) -> PathBuf {
        self.workdir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("workspace"))
    }

    pub fn kill_grace(&self) -> Duration {
        Duration::from_secs_f64(self.kill_grace_secs)
    }

    pub fn poll_interval(&self) -> Duration {
        Duration::from_secs_f64(self.poll_interval_secs)
    }

    pub fn header_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.header_timeout_secs)
    }

    pub fn body_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.body_timeout_secs)
    }

    /// `--max-connections`, or the open-file limit less a reserve for the
    /// database, the runner and callbacks (a quarter of it, and at least
    /// 256), and at least 16.
    pub fn max_connections(&self) -> usize {
        self.max_connections.unwrap_or_else(|| {
            let (soft, _) =
                nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                    .unwrap_or((1024, 1024));
            let reserve = (soft / 4).max(256);
            usize::try_from(soft.saturating_sub(reserve))
                .unwrap_or(usize::MAX)
                .clamp(16, MAX_CONNECTIONS)
        })
    }

    /// The callback retry schedule (validated by `validate`).
    pub fn callback_schedule(&self) -> crate::delivery::schedule::Schedule {
        crate::delivery::schedule::Schedule {
            delays: crate::delivery::schedule::parse_delays(&self.callback_retry_schedule)
                .unwrap_or_default(),
            jitter: self.callback_jitter,
            max_retry_after: Duration::from_secs_f64(self.callback_max_retry_after_secs),
        }
    }

    /// A configuration for tests and embedding: defaults, a data dir, no flags read.
    pub fn for_data_dir(data_dir: impl Into<PathBuf>) -> Self {
        let mut config = Cli::parse_from(["execd"]).into_config();
        config.data_dir = data_dir.into();
        config
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redact = |s: &Option<String>| s.as_ref().map(|_| "<redacted>");
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("data_dir", &self.data_dir)
            .field("token", &redact(&self.token))
            .field("jwt_secret", &redact(&self.jwt_secret))
            .field("no_auth", &self.no_auth)
            .field("sync_concurrency", &self.sync_concurrency)
            .field("background_concurrency", &self.background_concurrency)
            .field("async_concurrency", &self.async_concurrency)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_connections", &self.max_connections)
            .field("header_timeout_secs", &self.header_timeout_secs)
            .field("body_timeout_secs", &self.body_timeout_secs)
            .field("max_code_bytes", &self.max_code_bytes)
            .field("max_env_bytes", &self.max_env_bytes)
            .field(
                "max_callback_headers_bytes",
                &self.max_callback_headers_bytes,
            )
            .field("max_output_bytes", &self.max_output_bytes)
            .field("max_timeout_secs", &self.max_timeout_secs)
            .field("kill_grace_secs", &self.kill_grace_secs)
            .field("warm_python", &self.warm_python)
            .field("sync_start_within_secs", &self.sync_start_within_secs)
            .field("runs_dir", &self.runs_dir)
            .field("workdir", &self.workdir)
            .field("list_output_bytes", &self.list_output_bytes)
            .field("list_page_output_bytes", &self.list_page_output_bytes)
            .field("poll_interval_secs", &self.poll_interval_secs)
            .field("callback_timeout_secs", &self.callback_timeout_secs)
            .field("callback_concurrency", &self.callback_concurrency)
            .field(
                "callback_receiver_concurrency",
                &self.callback_receiver_concurrency,
            )
            .field("callback_retry_schedule", &self.callback_retry_schedule)
            .field("callback_jitter", &self.callback_jitter)
            .field(
                "callback_max_retry_after_secs",
                &self.callback_max_retry_after_secs,
            )
            .field("callback_output_bytes", &self.callback_output_bytes)
            .field("retention", &self.retention)
            .field("dead_callback_retention", &self.dead_callback_retention)
            .field("retention_interval", &self.retention_interval)
            .field("supervisor_bin", &self.supervisor_bin)
            .field("log_format", &self.log_format)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_match_the_readme() {
        let config = Config::for_data_dir("/tmp/x");
        config.validate().unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:7070");
        assert_eq!(config.max_output_bytes, 10 << 20);
    }

    #[test]
    fn python_jobs_are_warm_unless_turned_off() {
        let warm = |args: &[&str]| {
            let argv = std::iter::once("execd").chain(args.iter().copied());
            Cli::parse_from(argv).into_config().warm_python
        };
        if std::env::var_os("EXECD_WARM_PYTHON").is_none() {
            assert!(warm(&[]));
        }
        assert!(warm(&["--warm-python"]));
        assert!(!warm(&["--warm-python", "false"]));
        assert!(!warm(&["--warm-python=0"]));
    }

    #[test]
    fn debug_output_never_shows_secrets() {
        let mut config = Config::for_data_dir("/tmp/x");
        config.token = Some("super-secret-token".into());
        assert!(!format!("{config:?}").contains("super-secret"));
    }

    #[test]
    fn times_past_a_year_are_rejected_not_a_panic_later() {
        let valid = |adjust: fn(&mut Config)| {
            let mut config = Config::for_data_dir("/tmp/x");
            adjust(&mut config);
            config.validate().is_ok()
        };
        assert!(valid(|c| c.max_timeout_secs = 366.0 * 86400.0));
        assert!(!valid(|c| c.max_timeout_secs = 1e19));
        assert!(!valid(|c| c.kill_grace_secs = 1e20));
        assert!(valid(|c| c.kill_grace_secs = 0.0));
        assert!(!valid(|c| c.callback_timeout_secs = f64::INFINITY));
        assert!(!valid(|c| c.callback_max_retry_after_secs = 1e30));
        assert!(!valid(|c| c.poll_interval_secs = 0.0));
        assert!(!valid(|c| c.poll_interval_secs = 1e-9));
        assert!(valid(|c| c.poll_interval_secs = 0.05));
        assert!(!valid(|c| c.callback_retry_schedule = "5s,2y".into()));
    }

    /// A huge slot count passed validation and then panicked (a lane at
    /// start; the callback semaphore in a task, and no callback went out).
    #[test]
    fn concurrency_past_what_a_machine_holds_is_rejected() {
        for adjust in [
            (|c: &mut Config| c.sync_concurrency = usize::MAX) as fn(&mut Config),
            |c| c.background_concurrency = 1 << 61,
            |c| c.async_concurrency = usize::MAX,
            |c| c.callback_concurrency = usize::MAX,
        ] {
            let mut config = Config::for_data_dir("/tmp/x");
            adjust(&mut config);
            assert!(config.validate().is_err(), "{config:?}");
        }
        let mut config = Config::for_data_dir("/tmp/x");
        config.callback_concurrency = 100_000;
        config.validate().unwrap();
    }

    #[test]
    fn conflicting_auth_flags_are_rejected() {
        let mut config = Config::for_data_dir("/tmp/x");
        config.token = Some("a".into());
        config.no_auth = true;
        assert!(config.validate().is_err());
    }

    /// Clients' tokens are read trimmed: one with whitespace around it
    /// would lock every client out, so it is refused at the start.
    #[test]
    fn a_token_with_whitespace_around_it_is_rejected() {
        for token in ["tok\n", " tok", "tok "] {
            let mut config = Config::for_data_dir("/tmp/x");
            config.token = Some(token.into());
            let error = config.validate().unwrap_err().to_string();
            assert!(error.contains("whitespace"), "{token:?}: {error}");
        }
    }
}
