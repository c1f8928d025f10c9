//! The agent under test as a child process: started on a free loopback port
//! and a data dir of ours, waited for on `/health`, stopped with SIGTERM (and
//! killed if the harness panics or returns early: `Drop`), plus what `/proc`
//! says about it (memory, CPU time, its child processes).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// How to start the agent: the binary, and what every start has in common.
#[derive(Clone, Debug)]
pub struct AgentCmd {
    pub bin: PathBuf,
    /// Prepended to PATH, so the agent resolves `python3` to the interpreter
    /// the baselines use (scenarios that compare against a direct spawn).
    pub path_prefix: Option<PathBuf>,
}

/// The agent's API: cheap to clone into concurrent submitters.
#[derive(Clone)]
pub struct Api {
    pub client: reqwest::Client,
    /// `http://127.0.0.1:<port>`
    pub base: String,
    pub token: String,
}

pub struct Agent {
    child: Child,
    pub api: Api,
    pub data_dir: PathBuf,
    log: PathBuf,
    /// Spawn → first 200 from `/health`.
    pub startup: Duration,
}

impl Agent {
    /// Starts `execd serve` on `data_dir` with `extra` flags and waits until
    /// `/health` answers 200. The token is reused when the same `data_dir`
    /// is started again (pass it in `token`).
    pub async fn start(
        cmd: &AgentCmd,
        data_dir: &Path,
        token: &str,
        extra: &[&str],
    ) -> Result<Agent> {
        let port = free_port()?;
        let listen = format!("127.0.0.1:{port}");
        let log = data_dir.with_extension("log");
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("agent log {}", log.display()))?;
        let mut command = Command::new(&cmd.bin);
        command
            .arg("serve")
            .args(["--listen", &listen])
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--token", token])
            .args(extra)
            .env("EXECD_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        if let Some(prefix) = &cmd.path_prefix {
            let path = std::env::var_os("PATH").unwrap_or_default();
            let mut joined = prefix.clone().into_os_string();
            joined.push(":");
            joined.push(path);
            command.env("PATH", joined);
        }
        let spawned = Instant::now();
        let child = command
            .spawn()
            .with_context(|| format!("cannot start the agent {}", cmd.bin.display()))?;
        let client = reqwest::Client::builder()
            .http1_only()
            .timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(128)
            .build()?;
        let mut agent = Agent {
            child,
            api: Api {
                client,
                base: format!("http://{listen}"),
                token: token.to_string(),
            },
            data_dir: data_dir.to_path_buf(),
            log,
            startup: Duration::ZERO,
        };
        // Poll often: start-up is itself a figure (scenario 6). A refused
        // connection comes back at once, so this costs little.
        let health = format!("{}/health", agent.api.base);
        let deadline = spawned + Duration::from_secs(30);
        loop {
            if let Some(status) = agent.child.try_wait()? {
                bail!(
                    "the agent exited during start-up ({status}): {}",
                    agent.log_tail()
                );
            }
            let ok = agent
                .api
                .client
                .get(&health)
                .timeout(Duration::from_millis(500))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                agent.startup = spawned.elapsed();
                return Ok(agent);
            }
            if Instant::now() > deadline {
                bail!(
                    "the agent did not answer /health within 30 s: {}",
                    agent.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("execd.db")
    }

    /// The last lines the agent logged, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(8)..].join("\n")
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<Value> {
        self.api.post(path, body).await
    }

    pub async fn get(&self, path: &str) -> Result<Value> {
        self.api.get(path).await
    }

    /// SIGTERM, then up to 20 s for a clean exit (running jobs are ended and
    /// pending writes finished), then SIGKILL.
    pub async fn stop(mut self) -> Result<()> {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) on our own child's pid; no memory involved.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    eprintln!("  (agent exited with {status} after SIGTERM)");
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("the agent did not stop within 20 s of SIGTERM; killed");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Api {
    pub async fn post(&self, path: &str, body: &Value) -> Result<Value> {
        let response = self
            .client
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await?;
        let status = response.status();
        let text = response.text().await?;
        if !status.is_success() {
            bail!("POST {path}: {status}: {text}");
        }
        Ok(serde_json::from_str(&text)?)
    }

    pub async fn get(&self, path: &str) -> Result<Value> {
        Ok(serde_json::from_str(&self.get_text(path).await?)?)
    }

    /// The body of a GET, as text (`/metrics`).
    pub async fn get_text(&self, path: &str) -> Result<String> {
        let response = self
            .client
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await?;
        let status = response.status();
        let text = response.text().await?;
        if !status.is_success() {
            bail!("GET {path}: {status}: {text}");
        }
        Ok(text)
    }

    /// The agent's group commits so far, from `/metrics`.
    pub async fn writer_totals(&self) -> Result<WriterTotals> {
        let text = self.get_text("/metrics").await?;
        let value = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
                .with_context(|| format!("{name} in /metrics"))
        };
        Ok(WriterTotals {
            commits: value("execd_db_commit_seconds_count")?,
            writes: value("execd_db_write_batch_size_sum")?,
            busy: value("execd_db_commit_seconds_sum")?,
            // Absent from builds that synced inside the writer's commit.
            syncs: value("execd_db_wal_sync_seconds_count").unwrap_or(0.0),
            syncing: value("execd_db_wal_sync_seconds_sum").unwrap_or(0.0),
        })
    }
}

/// Totals of the agent's writer, as `/metrics` counts them.
#[derive(Clone, Copy, Debug, Default)]
pub struct WriterTotals {
    /// Group commits.
    pub commits: f64,
    /// Writes in them.
    pub writes: f64,
    /// Seconds the writer spent on them, `BEGIN` to `COMMIT`.
    pub busy: f64,
    /// Syncs of the WAL (each makes every commit before it durable).
    pub syncs: f64,
    /// Seconds spent syncing, beside the writer.
    pub syncing: f64,
}

impl std::ops::Add for WriterTotals {
    type Output = WriterTotals;
    fn add(self, more: WriterTotals) -> WriterTotals {
        WriterTotals {
            commits: self.commits + more.commits,
            writes: self.writes + more.writes,
            busy: self.busy + more.busy,
            syncs: self.syncs + more.syncs,
            syncing: self.syncing + more.syncing,
        }
    }
}

impl std::ops::Sub for WriterTotals {
    type Output = WriterTotals;
    fn sub(self, earlier: WriterTotals) -> WriterTotals {
        WriterTotals {
            commits: self.commits - earlier.commits,
            writes: self.writes - earlier.writes,
            busy: self.busy - earlier.busy,
            syncs: self.syncs - earlier.syncs,
            syncing: self.syncing - earlier.syncing,
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // After `stop` the child is reaped and this is a no-op; on an early
        // return or a panic it makes sure no agent outlives the harness.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A port that was free a moment ago (bound and released; loopback only).
pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// A random hex string (token), from the kernel's generator.
pub fn random_hex(bytes: usize) -> String {
    use std::io::Read;
    let mut buf = vec![0u8; bytes];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut buf);
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// A field of `/proc/<pid>/status` in KiB (`VmRSS`, `VmHWM`).
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Fields of `/proc/<pid>/stat` after the command name (index 0 = state).
fn stat_fields(pid: &str) -> Option<(String, Vec<String>)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text[open + 1..close].to_string();
    let rest = text[close + 1..]
        .split_whitespace()
        .map(String::from)
        .collect();
    Some((comm, rest))
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf reads a constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// CPU seconds of a process: (its own user+system, its reaped children's).
pub fn cpu_seconds(pid: u32) -> Option<(f64, f64)> {
    let (_, f) = stat_fields(&pid.to_string())?;
    // After the name: state(0) ppid(1) … utime(11) stime(12) cutime(13) cstime(14).
    let n = |i: usize| f.get(i)?.parse::<f64>().ok();
    let ticks = clock_ticks();
    Some(((n(11)? + n(12)?) / ticks, (n(13)? + n(14)?) / ticks))
}

/// CPU seconds the whole machine spent busy (all cores, every process:
/// user, nice, system, irq, softirq, steal of `/proc/stat`).
pub fn machine_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(cpu) = stat.lines().next() else {
        return 0.0;
    };
    let f: Vec<f64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let busy: f64 = [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| f.get(i)).sum();
    busy / clock_ticks()
}

/// CPU seconds of this harness process (all its threads).
pub fn own_cpu_seconds() -> f64 {
    cpu_seconds(std::process::id()).map_or(0.0, |(own, _)| own)
}

/// Every live descendant of `pid`: (pid, command name).
pub fn descendants(pid: u32) -> Vec<(u32, String)> {
    let mut parent_of = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            if let Some((comm, f)) = stat_fields(&name) {
                if let (Ok(p), Some(Ok(pp))) =
                    (name.parse::<u32>(), f.get(1).map(|s| s.parse::<u32>()))
                {
                    parent_of.push((p, pp, comm));
                }
            }
        }
    }
    let mut found = Vec::new();
    let mut frontier = vec![pid];
    while let Some(parent) = frontier.pop() {
        for (p, pp, comm) in &parent_of {
            if *pp == parent {
                found.push((*p, comm.clone()));
                frontier.push(*p);
            }
        }
    }
    found
}
