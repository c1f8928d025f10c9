//! The real binary, killed with SIGKILL: nothing accepted is lost.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::helpers::TOKEN;
use crate::receiver::{Reply, TestReceiver};

/// The `execd` binary running as a child process.
pub struct Agent {
    child: Child,
    pub url: String,
    client: reqwest::Client,
    /// `<data dir>/runs`, the link to its run directories on /dev/shm.
    runs: std::path::PathBuf,
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Agent {
    pub async fn start(data_dir: &Path, port: u16, extra: &[&str]) -> Agent {
        Agent::start_with(data_dir, port, extra, |_| {}).await
    }

    /// `start`, with the command adjusted first (its environment, say).
    pub async fn start_with(
        data_dir: &Path,
        port: u16,
        extra: &[&str],
        adjust: impl FnOnce(&mut Command),
    ) -> Agent {
        let mut command = Command::new(env!("CARGO_BIN_EXE_execd"));
        adjust(&mut command);
        let child = command
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--token",
                TOKEN,
                "--data-dir",
            ])
            .arg(data_dir)
            .args(extra)
            .env("EXECD_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start execd");
        let agent = Agent {
            child,
            url: format!("http://127.0.0.1:{port}"),
            client: reqwest::Client::new(),
            runs: data_dir.join("runs"),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while agent
            .client
            .get(format!("{}/health", agent.url))
            .send()
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "execd did not come up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        agent
    }

    pub async fn post(&self, path: &str, body: Value) -> Value {
        let response = self
            .client
            .post(format!("{}{path}", self.url))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success(), "{}", response.status());
        response.json().await.unwrap()
    }

    pub async fn get(&self, path: &str) -> Value {
        serde_json::from_str(&self.get_text(path).await).unwrap()
    }

    pub async fn get_text(&self, path: &str) -> String {
        let response = self
            .client
            .get(format!("{}{path}", self.url))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        response.text().await.unwrap()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The agent's resident memory now (`VmRSS`), in kB.
    pub fn rss_kb(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap()
    }

    /// Waits (10 s at most) until execution `id`'s callback is delivered.
    pub async fn wait_delivered(&self, id: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let info = self.get(&format!("/execute/processes/{id}/callback")).await;
            if info["callback"]["status"] == "delivered" {
                return;
            }
            assert!(Instant::now() < deadline, "{info}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, and the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        self.child.wait().unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A failed test never gets to the stop or restart that would take
        // its run directories on /dev/shm: they go here instead.
        if std::thread::panicking() {
            if let Ok(target) = std::fs::read_link(&self.runs) {
                let _ = std::fs::remove_dir_all(target);
            }
        }
    }
}

#[tokio::test]
async fn a_callback_cut_off_by_kill_9_is_delivered_after_restart() {
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let flags = [
        "--callback-retry-schedule",
        "200ms,200ms,200ms",
        "--callback-timeout",
        "30",
    ];
    let receiver = TestReceiver::start().await;
    // The first POST hangs: it is in flight when the agent dies.
    receiver.script(vec![Reply::Hang(Duration::from_secs(60))]);

    let agent = Agent::start(data.path(), port, &flags).await;
    let out = agent
        .post(
            "/execute/async",
            json!({ "code": "echo crash-safe", "language": "bash",
                    "callback_url": receiver.url("/cb"), "callback_signature_secret": "k" }),
        )
        .await;
    let id = out["execution_id"].as_str().unwrap().to_string();
    receiver.wait_for(1, Duration::from_secs(10)).await;
    agent.kill9();

    let agent = Agent::start(data.path(), port, &flags).await;
    let got = receiver.wait_for(2, Duration::from_secs(10)).await;
    assert_eq!(got[0].body, got[1].body, "the frozen payload, again");
    assert_eq!(got[0].header("webhook-id"), got[1].header("webhook-id"));
    assert_eq!(got[1].json()["execution_id"], id.as_str());
    assert_eq!(got[1].json()["stdout"], "crash-safe\n");
    agent.wait_delivered(&id).await;
    assert!(agent.terminate().success(), "a clean exit on SIGTERM");
}

/// With `--log-format json` every line of the log is a JSON object (the
/// "Try it" line was plain text), and at `EXECD_LOG=trace` no env value of
/// a job is logged (the WebSocket library logged whole frames).
#[tokio::test]
async fn json_logs_at_trace_are_json_and_hold_no_env_value() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let data = tempfile::tempdir().unwrap();
    let log_path = data.path().join("log");
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_execd"))
        .args([
            "serve",
            "--log-format",
            "json",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .arg("--data-dir")
        .arg(data.path().join("d"))
        .env("EXECD_LOG", "trace")
        .env_remove("EXECD_TOKEN")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.get(format!("{url}/health")).send().await.is_err() {
        assert!(Instant::now() < deadline, "execd did not come up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let token = std::fs::read_to_string(data.path().join("d").join("token")).unwrap();
    let mut socket = crate::helpers::open_stream(&url, token.trim()).await;
    let frame = json!({ "type": "execute", "code": "echo $A_SECRET | wc -c", "language": "bash",
                        "env": { "A_SECRET": "ENV_VALUE_IN_TRACE" } });
    socket
        .send(Message::Text(frame.to_string().into()))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut completed = false;
    while let Ok(Some(Ok(message))) = tokio::time::timeout_at(deadline, socket.next()).await {
        if let Message::Text(text) = message {
            completed |= text.contains("\"complete\"");
        }
    }
    assert!(completed, "the run completed");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::SIGTERM,
    )
    .unwrap();
    let _ = tokio::task::spawn_blocking(move || child.wait()).await;
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.lines().count() > 10, "a trace log: {log}");
    assert!(
        !log.contains("ENV_VALUE_IN_TRACE"),
        "an env value was logged"
    );
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        assert!(
            serde_json::from_str::<Value>(line).is_ok(),
            "not JSON: {line}"
        );
    }
}
