//! The test harness: the real agent on port 0 with a fresh SQLite file in a
//! temp dir, and a client that speaks to it.

use std::time::{Duration, Instant};

use execd::config::Config;
use serde_json::Value;
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

pub const TOKEN: &str = "test-token-0123456789";

pub struct TestApp {
    pub url: String,
    pub client: reqwest::Client,
    pub data_dir: TempDir,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), execd::app::StartError>>>,
}

/// The agent with the test token and short timings.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// The agent with the test token, adjusted by `adjust`.
pub async fn spawn_app_with(adjust: impl FnOnce(&mut Config)) -> TestApp {
    let data_dir = tempfile::tempdir().expect("temp dir");
    let mut config = Config::for_data_dir(data_dir.path());
    config.token = Some(TOKEN.into());
    config.kill_grace_secs = 0.5;
    config.supervisor_bin = Some(env!("CARGO_BIN_EXE_execd").into());
    adjust(&mut config);
    start(config, data_dir).await
}

/// Starts the agent on `config` (its data dir is `data_dir`).
pub async fn start(config: Config, data_dir: TempDir) -> TestApp {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind port 0");
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(execd::app::serve(config, listener, async {
        let _ = rx.await;
    }));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let app = TestApp {
        url,
        client,
        data_dir,
        shutdown: Some(tx),
        task: Some(task),
    };
    // The listener is bound already; wait until the server answers.
    let mut app = app;
    let deadline = Instant::now() + Duration::from_secs(10);
    while app.client.get(app.path("/health")).send().await.is_err() {
        if app.task.as_ref().unwrap().is_finished() {
            let outcome = app.task.take().unwrap().await;
            panic!("agent stopped at start: {outcome:?}");
        }
        assert!(Instant::now() < deadline, "agent did not come up");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    app
}

impl TestApp {
    pub fn path(&self, path: &str) -> String {
        format!("{}{}", self.url, path)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(self.path(path))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("GET")
    }

    pub async fn post(&self, path: &str, body: Value) -> reqwest::Response {
        self.client
            .post(self.path(path))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .await
            .expect("POST")
    }

    /// POSTs and returns the status with the JSON body.
    pub async fn post_json(&self, path: &str, body: Value) -> (u16, Value) {
        let response = self.post(path, body).await;
        let status = response.status().as_u16();
        (status, response.json().await.expect("JSON body"))
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let response = self.get(path).await;
        let status = response.status().as_u16();
        (status, response.json().await.expect("JSON body"))
    }

    /// Submits a background job and returns its process id.
    pub async fn background(&self, body: Value) -> String {
        let (status, out) = self.post_json("/execute/background", body).await;
        assert_eq!(status, 200, "{out}");
        out["process_id"].as_str().unwrap().to_string()
    }

    pub async fn process(&self, id: &str) -> Value {
        let (status, out) = self.get_json(&format!("/execute/processes/{id}")).await;
        assert_eq!(status, 200, "{out}");
        out
    }

    /// Polls the process until `done` holds (bounded by `within`).
    pub async fn wait_for(
        &self,
        id: &str,
        within: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        poll_until(within, || self.process(id), done).await
    }

    /// Waits until the process is in a terminal status.
    pub async fn wait_terminal(&self, id: &str, within: Duration) -> Value {
        self.wait_for(id, within, |p| {
            !matches!(p["status"].as_str(), Some("queued") | Some("running"))
        })
        .await
    }

    /// Kills every job still queued or running, then stops the agent: no
    /// process of a test outlives it.
    pub async fn stop(self) -> TempDir {
        // A kill frees a slot a queued job may take: a few rounds, bounded.
        for _ in 0..5 {
            let mut killed = 0;
            for status in ["queued", "running"] {
                let (_, list) = self
                    .get_json(&format!("/execute/processes?status={status}&limit=1000"))
                    .await;
                for p in list["processes"].as_array().into_iter().flatten() {
                    let id = p["process_id"].as_str().unwrap();
                    killed += 1;
                    let _ = self
                        .client
                        .post(self.path(&format!("/execute/kill/{id}")))
                        .bearer_auth(TOKEN)
                        .send()
                        .await;
                }
            }
            if killed == 0 {
                break;
            }
        }
        self.shutdown().await
    }

    /// Stops the agent gracefully, leaving running jobs to their
    /// supervisors, and returns its data dir.
    pub async fn shutdown(mut self) -> TempDir {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .expect("agent stops within 20 s")
                .expect("agent task")
                .expect("agent stops cleanly");
        }
        std::mem::replace(&mut self.data_dir, tempfile::tempdir().unwrap())
    }

    pub fn db_path(&self) -> std::path::PathBuf {
        self.data_dir.path().join("execd.db")
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        // A failed test never reaches the agent's own stop, which takes its
        // run directories on /dev/shm: they go here instead.
        if std::thread::panicking() {
            if let Ok(target) = std::fs::read_link(self.data_dir.path().join("runs")) {
                let _ = std::fs::remove_dir_all(target);
            }
        }
    }
}

/// Fetches with `fetch` every 20 ms until `done` holds for what it got, and
/// returns that; fails the test with the last value after `within`.
pub async fn poll_until<F, Fut>(
    within: Duration,
    mut fetch: F,
    done: impl Fn(&Value) -> bool,
) -> Value
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Value>,
{
    let deadline = Instant::now() + within;
    loop {
        let value = fetch().await;
        if done(&value) {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "not reached within {within:?}: {value}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether a process with this pid is alive (and not a zombie).
pub fn alive(pid: i64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .chars()
                .next();
            state != Some('Z')
        }
        Err(_) => false,
    }
}

/// Polls `condition` every 20 ms until true or `within` passes.
pub async fn eventually(within: Duration, condition: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    condition()
}

/// Live processes whose command line mentions `dir` (the zygote and the
/// supervisors name the runs dir; programs their code file there).
pub fn processes_under(dir: &std::path::Path) -> Vec<u32> {
    processes_naming(&dir.to_string_lossy())
}

/// Live processes whose command line mentions `needle`.
pub fn processes_naming(needle: &str) -> Vec<u32> {
    processes_with("cmdline", needle)
}

/// Live processes whose `/proc/<pid>/<file>` (`cmdline`, `environ`)
/// holds `needle`.
pub fn processes_with(file: &str, needle: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/{file}"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
                && alive(i64::from(*pid))
        })
        .collect()
}

/// Runs `sql` on the database file `db` with the `sqlite3` command, as an
/// operator would, and gives what it prints. It waits up to 5 s for the
/// agent's writer (without it, a write that meets a commit fails at once:
/// "database is locked").
pub fn sqlite3(db: &std::path::Path, sql: &str) -> String {
    let out = std::process::Command::new("sqlite3")
        .args(["-cmd", ".timeout 5000"])
        .arg(db)
        .arg(sql)
        .output()
        .expect("run sqlite3");
    assert!(
        out.status.success(),
        "sqlite3 {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An operator's `sqlite3` holding the database's write lock for `secs`
/// seconds (it waits up to 5 s to get it); wait for the child to know it
/// is released.
pub fn hold_write_lock(db: &std::path::Path, secs: u32) -> std::process::Child {
    std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            r#"(echo "BEGIN IMMEDIATE;"; sleep {secs}; echo "COMMIT;") | sqlite3 -cmd ".timeout 5000" "$0""#
        ))
        .arg(db)
        .spawn()
        .expect("run sqlite3")
}

/// A background `echo hi` submission, parsed as the API parses one, for
/// tests of the database layer; it runs in `workdir`.
pub fn background_submission(workdir: &std::path::Path) -> execd::domain::Submission {
    use execd::domain::{ExecuteIn, Lane, Languages, Limits, Submission};
    let limits = Limits {
        max_code_bytes: 1000,
        max_env_bytes: 1 << 16,
        max_callback_headers_bytes: 1 << 14,
        max_timeout: Duration::from_secs(60),
        default_workdir: workdir.to_path_buf(),
        languages: Languages::detect(),
    };
    let input = ExecuteIn {
        code: Some("echo hi".into()),
        language: Some("bash".into()),
        ..Default::default()
    };
    Submission::parse(input, Lane::Background, &limits).unwrap()
}

/// The supervisor of the running program `pid`: its parent.
pub fn supervisor_of_program(pid: i64) -> i32 {
    parent_of(pid).expect("the program runs")
}

/// The parent of the live process `pid`.
pub fn parent_of(pid: i64) -> Option<i32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let ppid = status.lines().find_map(|l| l.strip_prefix("PPid:"));
    ppid?.trim().parse().ok()
}

/// A WebSocket to `/execute/stream` of the agent at `url` (`http://…`),
/// authenticated with `token`.
pub async fn open_stream(
    url: &str,
    token: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = (url.replace("http://", "ws://") + "/execute/stream")
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    tokio_tungstenite::connect_async(request).await.unwrap().0
}
