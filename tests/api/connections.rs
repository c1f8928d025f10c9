//! Client connections: how many, how long they may idle, and a body too
//! large by its own account.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::helpers::*;

fn connect(app: &TestApp) -> TcpStream {
    let stream = TcpStream::connect(app.url.trim_start_matches("http://")).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
}

/// Reads until the server closes the connection (or 10 s pass): the time taken.
fn closed_after(mut stream: TcpStream) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
    }
    start.elapsed()
}

#[tokio::test]
async fn a_connection_idle_before_or_between_requests_is_closed_after_the_header_timeout() {
    let app = spawn_app_with(|c| c.header_timeout_secs = 0.5).await;
    let silent = connect(&app);
    let mut kept_alive = connect(&app);
    // Blocking reads, off the runtime the agent runs on.
    let (silent, kept_alive) = tokio::task::spawn_blocking(move || {
        kept_alive
            .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut head = [0u8; 12];
        kept_alive.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"HTTP/1.1 200");
        (closed_after(silent), closed_after(kept_alive))
    })
    .await
    .unwrap();
    assert!(silent < Duration::from_secs(3), "silent: open {silent:?}");
    assert!(
        kept_alive < Duration::from_secs(3),
        "idle keep-alive: open {kept_alive:?}"
    );
    app.stop().await;
}

/// A new client is not served (in 0.7 s): the agent is at its connection limit.
async fn assert_held_back(app: &TestApp) {
    let waiting = reqwest::Client::new()
        .get(app.path("/health"))
        .timeout(Duration::from_millis(700))
        .send()
        .await;
    assert!(waiting.is_err(), "served past the limit: {waiting:?}");
}

#[tokio::test]
async fn connections_past_the_limit_wait_and_are_served_once_one_closes() {
    let app = spawn_app_with(|c| c.max_connections = Some(3)).await;
    let held: Vec<TcpStream> = (0..3).map(|_| connect(&app)).collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_held_back(&app).await;
    drop(held);
    let served = reqwest::Client::new()
        .get(app.path("/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(served.status(), 200);
    let (status, info) = app.get_json("/info").await;
    assert_eq!(status, 200);
    assert_eq!(info["limits"]["max_connections"], 3, "{info}");
    app.stop().await;
}

#[tokio::test]
async fn a_body_declared_past_the_limit_is_refused_before_it_is_sent() {
    let app = spawn_app_with(|c| c.max_body_bytes = 1 << 20).await;
    for route in ["POST /execute", "DELETE /execute/kill"] {
        refused_before_it_is_sent(&app, route).await;
    }
    app.stop().await;
}

/// Writes `request` (its head and as much of its body as given), then reads
/// the answer's head and JSON body (or what came within 10 s).
async fn answer_to(mut stream: TcpStream, request: String) -> (TcpStream, String) {
    tokio::task::spawn_blocking(move || {
        stream.write_all(request.as_bytes()).unwrap();
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = stream.read(&mut buf) {
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&answer);
            if text.contains("\r\n\r\n") && text.ends_with('}') {
                break;
            }
        }
        (stream, String::from_utf8_lossy(&answer).into_owned())
    })
    .await
    .unwrap()
}

/// The JSON body of an answer read by `answer_to`.
fn body_of(answer: &str) -> Value {
    serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap_or_default())
        .unwrap_or_else(|e| panic!("no JSON body ({e}): {answer}"))
}

async fn refused_before_it_is_sent(app: &TestApp, route: &str) {
    let started = Instant::now();
    let request = format!(
        "{route} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: 100000000\r\n\r\n"
    );
    let (_, answer) = answer_to(connect(app), request).await;
    assert!(started.elapsed() < Duration::from_secs(5), "{answer}");
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    let body = body_of(&answer);
    assert_eq!(body["code"], "PAYLOAD_TOO_LARGE", "{body}");
    assert_eq!(body["details"]["limit"], json!(1 << 20));
    let (_, list) = app.get_json("/execute/processes").await;
    assert_eq!(list["count"], 0, "nothing stored: {list}");
}

/// A client that stalls in the middle of its body is answered 408 with the
/// error body once `--body-timeout` has passed, and its connection closed:
/// it does not hold a connection (of `--max-connections`) for as long as it
/// likes. Nothing of it is stored, and other clients are served meanwhile.
#[tokio::test]
async fn a_body_stalled_past_the_body_timeout_is_answered_408_and_its_connection_closed() {
    let app = spawn_app_with(|c| c.body_timeout_secs = 1.0).await;
    let request = format!(
        "POST /execute/background HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"code\": "
    );
    let started = Instant::now();
    let stalled = tokio::spawn(answer_to(connect(&app), request));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, _) = app.get_json("/health").await;
    assert_eq!(status, 200, "another client is served meanwhile");
    let (stream, answer) = stalled.await.unwrap();
    let waited = started.elapsed();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "answered after {waited:?}"
    );
    let body = body_of(&answer);
    assert_eq!(body["code"], "REQUEST_TIMEOUT", "{body}");
    assert_eq!(body["details"]["timeout"], json!(1.0), "{body}");
    let closed = tokio::task::spawn_blocking(move || closed_after(stream))
        .await
        .unwrap();
    assert!(
        closed < Duration::from_secs(3),
        "open {closed:?} after the 408"
    );
    let (_, list) = app.get_json("/execute/processes").await;
    assert_eq!(list["count"], 0, "nothing stored: {list}");
    app.stop().await;
}

/// A WebSocket keeps its connection's place among `--max-connections`
/// while it is open: streams got past the limit and took descriptors
/// running jobs needed.
#[tokio::test]
async fn an_open_websocket_counts_against_the_connection_limit() {
    use futures::SinkExt;
    let app = spawn_app_with(|c| c.max_connections = Some(2)).await;
    let mut sockets = Vec::new();
    for _ in 0..2 {
        let mut socket = open_stream(&app.url, TOKEN).await;
        let frame = json!({ "type": "execute", "code": "sleep 3", "language": "bash" });
        socket
            .send(tokio_tungstenite::tungstenite::Message::Text(
                frame.to_string().into(),
            ))
            .await
            .unwrap();
        sockets.push(socket);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_held_back(&app).await;
    drop(sockets);
    let served = reqwest::Client::new()
        .get(app.path("/health"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap();
    assert_eq!(served.status(), 200);
    app.stop().await;
}

/// A client that stalls in the middle of its body does not hold a stop up.
#[tokio::test]
async fn a_stop_is_not_held_by_a_client_stalled_in_its_body() {
    let app = spawn_app().await;
    let mut stream = connect(&app);
    let request = format!(
        "POST /execute HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"code\": "
    );
    stream.write_all(request.as_bytes()).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopping = Instant::now();
    tokio::time::timeout(Duration::from_secs(15), app.stop())
        .await
        .expect("the stop waited for the stalled client");
    assert!(
        stopping.elapsed() < Duration::from_secs(8),
        "stopped after {:?}",
        stopping.elapsed()
    );
    drop(stream);
}

/// CPU time (user + system) of process `pid` so far, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15; fields[0] is field 3.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// An agent on `data` running the background bash job `code` (for up to
/// 60 s), and its process id.
async fn running(data: &std::path::Path, code: &str) -> (crate::crash::Agent, String) {
    let agent = crate::crash::Agent::start(data, crate::crash::free_port(), &[]).await;
    let out = agent
        .post(
            "/execute/background",
            json!({ "code": code, "language": "bash", "timeout": 60 }),
        )
        .await;
    let id = out["process_id"].as_str().unwrap().to_string();
    (agent, id)
}

/// A live reader of process `id`'s output (SSE), its answer's head read.
async fn follow(
    client: &reqwest::Client,
    agent: &crate::crash::Agent,
    id: &str,
) -> reqwest::Response {
    let response = client
        .get(format!(
            "{}/execute/processes/{id}/logs?follow=true",
            agent.url
        ))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response
}

/// Live readers of a running job that prints nothing wait to be woken by
/// its output, its end or the agent's stop: 200 of them asked the database
/// twice every 50 ms each, half a core (1,000: 163 %), and slowed every
/// other request; then once a second each, 100 still cost 6–8 % of a core
/// (a debug build).
#[tokio::test]
async fn idle_live_readers_of_a_silent_job_cost_next_to_nothing_and_still_see_its_output() {
    let data = tempfile::tempdir().unwrap();
    let (agent, id) = running(data.path(), "sleep 8; echo late").await;
    // What the agent spends on the running job with no reader.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = cpu_ticks(agent.pid());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let alone = cpu_ticks(agent.pid()) - before;
    let client = reqwest::Client::new();
    let mut readers = Vec::new();
    for _ in 0..200 {
        readers.push(follow(&client, &agent, &id).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = cpu_ticks(agent.pid());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let spent = cpu_ticks(agent.pid()) - before;
    // Clock ticks are hundredths of a second. Asking once a second, the 200
    // readers added 20-30 to the job's own 3-4 (a debug build, alone);
    // woken only, nothing.
    assert!(
        spent < alone + 8,
        "{spent} ticks in 2 s with 200 idle readers, {alone} without"
    );
    // And each sees the output when it comes, and the end.
    let last = readers.pop().unwrap();
    let body = tokio::time::timeout(Duration::from_secs(10), last.text())
        .await
        .expect("the stream ends with the job")
        .unwrap();
    assert!(body.contains("late"), "{body}");
    drop(readers);
    assert!(agent.terminate().success());
}

/// A stop of the agent lets a live reader of a silent job go at once (its
/// stream closes without `end`, the run goes on): readers wake for it, not
/// at their next look of last resort, seconds later.
#[tokio::test]
async fn a_stop_lets_a_live_reader_of_a_silent_job_go_at_once() {
    let data = tempfile::tempdir().unwrap();
    let (agent, id) = running(data.path(), "echo early; sleep 30").await;
    let mut reader = follow(&reqwest::Client::new(), &agent, &id).await;
    // Its output read, the reader waits on a silent job.
    let mut body = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !body.contains("early") && Instant::now() < deadline {
        let chunk = tokio::time::timeout(Duration::from_secs(10), reader.chunk())
            .await
            .expect("the first output")
            .unwrap()
            .expect("more of the stream");
        body.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(body.contains("early"), "{body}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopping = Instant::now();
    let stopped = tokio::task::spawn_blocking(move || agent.terminate());
    let rest = tokio::time::timeout(Duration::from_secs(10), async {
        let mut rest = String::new();
        while let Ok(Some(chunk)) = reader.chunk().await {
            rest.push_str(&String::from_utf8_lossy(&chunk));
        }
        rest
    })
    .await
    .expect("the stream closes at the stop");
    let closed = stopping.elapsed();
    assert!(stopped.await.unwrap().success());
    assert!(
        closed < Duration::from_secs(3),
        "the stream closed {closed:?} after the stop"
    );
    assert!(!rest.contains("event: end"), "{rest}");
    // The run went on; the next agent ends it.
    let agent = crate::crash::Agent::start(data.path(), crate::crash::free_port(), &[]).await;
    agent.post(&format!("/execute/kill/{id}"), json!({})).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut p = agent.get(&format!("/execute/processes/{id}")).await;
    while p["status"] == "running" && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        p = agent.get(&format!("/execute/processes/{id}")).await;
    }
    assert_eq!(p["status"], "killed", "{p}");
    assert!(agent.terminate().success());
}
