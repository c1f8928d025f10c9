//! Callback delivery against real receivers on 127.0.0.1.

use std::io::BufRead;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

use crate::helpers::*;
use crate::receiver::{Received, Reply, TestReceiver};

/// An agent whose retries come quickly.
async fn fast_retrying_app(schedule: &str) -> TestApp {
    let schedule = schedule.to_string();
    spawn_app_with(move |c| {
        c.callback_retry_schedule = schedule;
        c.callback_jitter = 0.0;
        c.poll_interval_secs = 0.2;
    })
    .await
}

/// Submits an async execution and returns its execution id.
async fn submit_async(app: &TestApp, body: Value) -> String {
    let (status, out) = app.post_json("/execute/async", body).await;
    assert_eq!(status, 200, "{out}");
    out["execution_id"].as_str().unwrap().to_string()
}

async fn callback_info(app: &TestApp, id: &str) -> Value {
    let (status, out) = app
        .get_json(&format!("/execute/processes/{id}/callback"))
        .await;
    assert_eq!(status, 200, "{out}");
    out
}

/// Waits until the execution's latest delivery has `status`.
async fn wait_callback_status(app: &TestApp, id: &str, status: &str, within: Duration) -> Value {
    poll_until(
        within,
        || callback_info(app, id),
        |info| info["callback"]["status"] == status,
    )
    .await
}

/// Asks for a new delivery of execution `id`'s callback.
async fn redeliver(app: &TestApp, id: &str) -> (u16, Value) {
    app.post_json(
        &format!("/execute/processes/{id}/callback/redeliver"),
        json!({}),
    )
    .await
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

/// Verifies both signatures of a received callback the way a receiver would.
fn verify(received: &Received, secret: &str) {
    let body = &received.body;
    let hopx = received
        .header("x-hopx-signature")
        .expect("X-HopX-Signature");
    assert_eq!(
        hopx,
        format!("sha256={}", hex::encode(hmac(secret.as_bytes(), body)))
    );

    let id = received.header("webhook-id").expect("webhook-id");
    let ts = received
        .header("webhook-timestamp")
        .expect("webhook-timestamp");
    let key = match secret.strip_prefix("whsec_") {
        Some(b64) => BASE64.decode(b64).unwrap(),
        None => secret.as_bytes().to_vec(),
    };
    let signed = [id.as_bytes(), b".", ts.as_bytes(), b".", body].concat();
    let expected = format!("v1,{}", BASE64.encode(hmac(&key, &signed)));
    assert_eq!(received.header("webhook-signature").unwrap(), expected);
    let now = chrono::Utc::now().timestamp();
    let ts: i64 = ts.parse().unwrap();
    assert!(
        (now - ts).abs() < 60,
        "webhook-timestamp is the attempt's time"
    );
    assert_eq!(received.header("x-hopx-timestamp").unwrap(), ts.to_string());
}

#[tokio::test]
async fn a_callback_arrives_once_with_both_signatures_verifying_against_the_raw_body() {
    let app = spawn_app().await;
    let receiver = TestReceiver::start().await;
    for secret in [
        "plain-secret-value",
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    ] {
        let id = submit_async(
            &app,
            json!({
                "code": "import sys\nprint('hello from async')\nprint('and a warning', file=sys.stderr)",
                "callback_url": receiver.url("/hooks/execd"),
                "callback_headers": { "X-Tenant": "acme", "Authorization": "Bearer receiver-token",
                                      "User-Agent": "acme-hooks/2" },
                "callback_signature_secret": secret,
            }),
        )
        .await;
        let info = wait_callback_status(&app, &id, "delivered", Duration::from_secs(10)).await;
        let got: Vec<Received> = receiver
            .received()
            .into_iter()
            .filter(|r| r.json()["execution_id"] == id.as_str())
            .collect();
        assert_eq!(got.len(), 1, "exactly once");
        let r = &got[0];
        verify(r, secret);
        assert_eq!(r.path, "/hooks/execd");
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.header("x-tenant"), Some("acme"));
        assert_eq!(r.header("authorization"), Some("Bearer receiver-token"));
        assert_eq!(
            r.header("user-agent"),
            Some("acme-hooks/2"),
            "the caller's own"
        );
        assert_eq!(
            r.header("webhook-id"),
            info["callback"]["webhook_id"].as_str()
        );
        let body = r.json();
        assert_eq!(body["status"], "completed");
        assert_eq!(body["success"], true);
        assert_eq!(body["stdout"], "hello from async\n");
        assert_eq!(body["stderr"], "and a warning\n");
        assert_eq!(body["exit_code"], 0);
        for field in [
            "process_id",
            "execution_time",
            "started_at",
            "completed_at",
            "timestamp",
            "error",
        ] {
            assert!(body.get(field).is_some(), "{field}");
        }
        let p = app.process(&id).await;
        assert_eq!(p["callback"]["status"], "delivered");
        assert_eq!(p["callback"]["attempts"], 1);
    }
    app.stop().await;
}

#[tokio::test]
async fn without_a_secret_the_callback_carries_no_signature() {
    let app = spawn_app().await;
    let receiver = TestReceiver::start().await;
    let id = submit_async(
        &app,
        json!({ "code": "exit 2", "language": "bash", "callback_url": receiver.url("/") }),
    )
    .await;
    wait_callback_status(&app, &id, "delivered", Duration::from_secs(10)).await;
    let r = &receiver.received()[0];
    assert!(r.header("x-hopx-signature").is_none() && r.header("webhook-signature").is_none());
    assert!(
        r.header("webhook-id")
            .is_some_and(|id| id.starts_with("msg_")),
        "the idempotency key, unsigned"
    );
    assert!(r.header("x-hopx-timestamp").is_some());
    assert_eq!(r.json()["status"], "failed");
    assert_eq!(r.json()["success"], false);
    assert_eq!(r.json()["exit_code"], 2);
    app.stop().await;
}

#[tokio::test]
async fn a_receiver_that_fails_twice_then_succeeds_gets_one_success_after_three_attempts() {
    let app = fast_retrying_app("50ms,50ms,50ms,50ms").await;
    let receiver = TestReceiver::start().await;
    receiver.script(vec![Reply::Status(500), Reply::Status(502)]);
    let id = submit_async(
        &app,
        json!({ "code": "echo x", "language": "bash", "callback_url": receiver.url("/"), "callback_signature_secret": "s" }),
    )
    .await;
    let info = wait_callback_status(&app, &id, "delivered", Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = receiver.received();
    assert_eq!(got.len(), 3, "two failures and one success, nothing after");
    let ids: Vec<_> = got
        .iter()
        .map(|r| r.header("webhook-id").unwrap().to_string())
        .collect();
    assert!(
        ids.iter().all(|i| *i == ids[0]),
        "webhook-id is stable across attempts"
    );
    assert_eq!(got[0].body, got[2].body, "the same bytes on every attempt");
    let outcomes: Vec<_> = info["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["outcome"].clone())
        .collect();
    assert_eq!(
        outcomes,
        vec![
            json!("http_status"),
            json!("http_status"),
            json!("delivered")
        ]
    );
    assert_eq!(info["attempts"][0]["http_status"], 500);
    assert_eq!(info["callback"]["attempts"], 3);
    app.stop().await;
}

#[tokio::test]
async fn a_receiver_that_is_down_and_comes_back_gets_the_callback() {
    let app = fast_retrying_app("200ms,200ms,200ms,200ms,200ms,200ms,200ms,200ms,200ms").await;
    let down = TestReceiver::start().await;
    let addr = down.addr;
    down.stop();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let id = submit_async(
        &app,
        json!({ "code": "echo back", "language": "bash", "callback_url": format!("http://{addr}/cb") }),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let info = callback_info(&app, &id).await;
        if info["attempts"].as_array().is_some_and(|a| !a.is_empty()) {
            assert_eq!(info["attempts"][0]["outcome"], "connect", "{info}");
            assert_eq!(info["callback"]["status"], "failed");
            break;
        }
        assert!(Instant::now() < deadline, "no attempt recorded: {info}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let receiver = TestReceiver::start_on(addr).await;
    wait_callback_status(&app, &id, "delivered", Duration::from_secs(10)).await;
    assert_eq!(receiver.received().len(), 1);
    assert_eq!(receiver.received()[0].json()["stdout"], "back\n");
    app.stop().await;
}

#[tokio::test]
async fn a_slow_receiver_is_timed_out_and_retried() {
    let schedule = "100ms,100ms".to_string();
    let app = spawn_app_with(move |c| {
        c.callback_retry_schedule = schedule;
        c.callback_timeout_secs = 0.3;
    })
    .await;
    let receiver = TestReceiver::start().await;
    receiver.script(vec![Reply::Hang(Duration::from_secs(3))]);
    let id = submit_async(
        &app,
        json!({ "code": "echo slow", "language": "bash", "callback_url": receiver.url("/") }),
    )
    .await;
    let info = wait_callback_status(&app, &id, "delivered", Duration::from_secs(10)).await;
    assert_eq!(info["attempts"][0]["outcome"], "timeout", "{info}");
    assert!(info["attempts"][0]["duration_ms"].as_f64().unwrap() < 1500.0);
    assert_eq!(info["attempts"][1]["outcome"], "delivered");
    app.stop().await;
}

#[tokio::test]
async fn a_redirect_is_a_failure_and_is_not_followed() {
    let app = fast_retrying_app("50ms,50ms").await;
    let receiver = TestReceiver::start().await;
    receiver.script(vec![Reply::With(
        302,
        vec![("location", receiver.url("/elsewhere"))],
    )]);
    let id = submit_async(
        &app,
        json!({ "code": "echo r", "language": "bash", "callback_url": receiver.url("/cb") }),
    )
    .await;
    let info = wait_callback_status(&app, &id, "delivered", Duration::from_secs(10)).await;
    assert_eq!(info["attempts"][0]["outcome"], "redirect");
    assert_eq!(info["attempts"][0]["http_status"], 302);
    assert!(
        receiver.received().iter().all(|r| r.path == "/cb"),
        "/elsewhere never requested"
    );
    app.stop().await;
}

/// The contract: a 2xx ends a delivery, anything else is retried. A 410
/// too: the receiver is asked again, and a later 200 delivers.
#[tokio::test]
async fn a_410_is_retried_like_any_other_status() {
    let app = fast_retrying_app("50ms,50ms,50ms").await;
    let receiver = TestReceiver::start().await;
    receiver.script(vec![Reply::Status(410), Reply::Status(410)]);
    let id = submit_async(
        &app,
        json!({ "code": "echo g", "language": "bash", "callback_url": receiver.url("/") }),
    )
    .await;
    let info = wait_callback_status(&app, &id, "delivered", Duration::from_secs(10)).await;
    assert_eq!(receiver.received().len(), 3);
    let agent = receiver.received()[0]
        .header("user-agent")
        .map(str::to_string);
    assert!(
        agent.is_some_and(|a| a.starts_with("execd/")),
        "ours by default"
    );
    let outcomes: Vec<_> = info["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["outcome"].as_str().unwrap(), a["http_status"].as_i64()))
        .collect();
    assert_eq!(
        outcomes,
        [
            ("http_status", Some(410)),
            ("http_status", Some(410)),
            ("delivered", Some(200))
        ]
    );
    app.stop().await;
}

#[tokio::test]
async fn a_delivery_is_dead_when_the_schedule_runs_out() {
    let app = fast_retrying_app("30ms,30ms").await;
    let receiver = TestReceiver::start().await;
    receiver.default_reply(Reply::Status(503));
    let id = submit_async(
        &app,
        json!({ "code": "echo d", "language": "bash", "callback_url": receiver.url("/") }),
    )
    .await;
    let info = wait_callback_status(&app, &id, "dead", Duration::from_secs(10)).await;
    assert_eq!(info["callback"]["attempts"], 3);
    assert_eq!(info["callback"]["last_status"], 503);
    assert_eq!(receiver.received().len(), 3);
    app.stop().await;
}

#[tokio::test]
async fn retry_after_on_429_is_honoured_and_clamped() {
    let app = spawn_app_with(|c| {
        c.callback_retry_schedule = "10ms,10ms".into();
        c.callback_max_retry_after_secs = 2.0;
    })
    .await;
    let receiver = TestReceiver::start().await;
    receiver.script(vec![
        Reply::With(429, vec![("retry-after", "1".into())]),
        Reply::With(503, vec![("retry-after", "86400".into())]),
    ]);
    let id = submit_async(
        &app,
        json!({ "code": "echo w", "language": "bash", "callback_url": receiver.url("/") }),
    )
    .await;
    wait_callback_status(&app, &id, "delivered", Duration::from_secs(15)).await;
    let got = receiver.received();
    assert_eq!(got.len(), 3);
    let first_gap = got[1].at - got[0].at;
    let second_gap = got[2].at - got[1].at;
    assert!(
        first_gap >= Duration::from_millis(900),
        "Retry-After: 1 waited {first_gap:?}"
    );
    assert!(
        second_gap >= Duration::from_millis(1800) && second_gap < Duration::from_secs(5),
        "Retry-After: 86400 clamped to 2 s, waited {second_gap:?}"
    );
    app.stop().await;
}

#[tokio::test]
async fn one_slow_receiver_does_not_delay_callbacks_to_others() {
    let app = spawn_app_with(|c| {
        c.callback_timeout_secs = 5.0;
        c.async_concurrency = 16;
    })
    .await;
    let slow = TestReceiver::start().await;
    slow.default_reply(Reply::Hang(Duration::from_secs(4)));
    let fast = TestReceiver::start().await;
    for _ in 0..12 {
        submit_async(
            &app,
            json!({ "code": "echo s", "language": "bash", "callback_url": slow.url("/") }),
        )
        .await;
    }
    slow.wait_for(12, Duration::from_secs(10)).await;
    let started = Instant::now();
    let id = submit_async(
        &app,
        json!({ "code": "echo f", "language": "bash", "callback_url": fast.url("/") }),
    )
    .await;
    wait_callback_status(&app, &id, "delivered", Duration::from_secs(3)).await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    app.stop().await;
}

/// Submits a job whose callback goes to a new, healthy receiver, and
/// asserts that it arrives within 2 s; gives the execution id.
async fn a_healthy_callback_goes_out_at_once(app: &TestApp) -> String {
    let fast = TestReceiver::start().await;
    let started = Instant::now();
    let id = submit_async(
        app,
        json!({ "code": "true", "language": "bash", "callback_url": fast.url("/") }),
    )
    .await;
    fast.wait_for(1, Duration::from_secs(10)).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the healthy receiver's callback waited {:?}",
        started.elapsed()
    );
    id
}

/// A receiver that never answers holds at most its share of the attempt
/// slots (`--callback-receiver-concurrency`): another receiver's callback,
/// queued behind a backlog of the dead one's, goes out at once. With one
/// global pool, it waited for whole rounds of timeouts.
#[tokio::test]
async fn a_dead_receiver_holds_only_its_share_of_the_callback_slots() {
    let app = spawn_app_with(|c| {
        c.callback_concurrency = 4;
        c.callback_receiver_concurrency = 2;
        c.callback_timeout_secs = 3.0;
        c.async_concurrency = 8;
    })
    .await;
    let dead = TestReceiver::start().await;
    dead.default_reply(Reply::Hang(Duration::from_secs(6)));
    let mut ids = Vec::new();
    for _ in 0..8 {
        let id = submit_async(
            &app,
            json!({ "code": "true", "language": "bash", "callback_url": dead.url("/") }),
        )
        .await;
        ids.push(id);
    }
    for id in &ids {
        app.wait_terminal(id, Duration::from_secs(10)).await;
    }
    dead.wait_for(2, Duration::from_secs(5)).await;
    let id = a_healthy_callback_goes_out_at_once(&app).await;
    assert_eq!(dead.received().len(), 2, "the dead receiver's share");
    wait_callback_status(&app, &id, "delivered", Duration::from_secs(5)).await;
    app.stop().await;
}

/// Receivers that never answer can fill every slot between them, each
/// within its share: the last quarter of the slots is kept for receivers
/// with fewer than four attempts in flight, so a healthy receiver's
/// callback still goes out at once. Two dead receivers took all 64 slots,
/// and healthy ones waited a whole timeout.
#[tokio::test]
async fn dead_receivers_together_leave_slots_for_a_healthy_one() {
    let app = spawn_app_with(|c| {
        c.callback_concurrency = 16;
        c.callback_receiver_concurrency = 8;
        c.callback_timeout_secs = 4.0;
        c.async_concurrency = 8;
    })
    .await;
    let dead = [TestReceiver::start().await, TestReceiver::start().await];
    for receiver in &dead {
        receiver.default_reply(Reply::Hang(Duration::from_secs(8)));
    }
    let mut ids = Vec::new();
    for receiver in &dead {
        for _ in 0..10 {
            let body =
                json!({ "code": "true", "language": "bash", "callback_url": receiver.url("/") });
            ids.push(submit_async(&app, body).await);
        }
    }
    for id in &ids {
        app.wait_terminal(id, Duration::from_secs(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let taken: usize = dead.iter().map(|r| r.received().len()).sum();
    assert_eq!(taken, 12, "the dead receivers' attempts in flight");
    a_healthy_callback_goes_out_at_once(&app).await;
    app.stop().await;
}

/// Completions whose callbacks cannot go out (a receiver that never
/// answers) are not all held in memory with their payloads: past a bound
/// they wait in the database, unleased, and are claimed from there. With
/// 100 payloads of 1 MiB held, the agent measured 157 MB here; 67 MB with
/// 16 MiB of them held.
#[tokio::test]
async fn a_backlog_of_callbacks_waits_in_the_database_not_in_memory() {
    let dead = TestReceiver::start().await;
    dead.default_reply(Reply::Hang(Duration::from_secs(60)));
    let dir = tempfile::tempdir().unwrap();
    let port = crate::crash::free_port();
    let agent = crate::crash::Agent::start(
        dir.path(),
        port,
        &[
            "--callback-concurrency",
            "1",
            "--callback-timeout",
            "60",
            "--async-concurrency",
            "2",
        ],
    )
    .await;
    let code = "head -c 1048576 /dev/zero | tr '\\0' a";
    let mut ids = Vec::new();
    for _ in 0..100 {
        let out = agent
            .post(
                "/execute/async",
                json!({ "code": code, "language": "bash", "callback_url": dead.url("/") }),
            )
            .await;
        ids.push(out["execution_id"].as_str().unwrap().to_string());
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    for id in &ids {
        loop {
            let p = agent.get(&format!("/execute/processes/{id}")).await;
            if p["status"] == "completed" {
                assert_eq!(p["stdout"].as_str().unwrap().len(), 1 << 20);
                break;
            }
            assert!(Instant::now() < deadline, "{p}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let rss_kb = agent.rss_kb();
    assert!(
        rss_kb < 110 * 1024,
        "the agent holds {rss_kb} kB with 100 callbacks of 1 MiB waiting"
    );
    let unleased = sqlite3(
        &dir.path().join("execd.db"),
        "SELECT count(*) FROM callbacks WHERE status = 'pending' AND lease_owner IS NULL",
    );
    assert!(
        unleased.trim().parse::<u32>().unwrap() >= 50,
        "{unleased} waiting in the database"
    );
    agent.terminate();
}

#[tokio::test]
async fn payload_output_is_capped_keeping_the_tail_while_the_api_keeps_it_all() {
    let app = spawn_app_with(|c| c.callback_output_bytes = 100).await;
    let receiver = TestReceiver::start().await;
    let id = submit_async(
        &app,
        json!({ "code": "import sys\nsys.stdout.write('0123456789' * 100 + 'END')", "callback_url": receiver.url("/") }),
    )
    .await;
    wait_callback_status(&app, &id, "delivered", Duration::from_secs(10)).await;
    let body = receiver.received()[0].json();
    let stdout = body["stdout"].as_str().unwrap();
    assert_eq!(stdout.len(), 100);
    assert!(stdout.ends_with("789END"), "{stdout}");
    assert_eq!(body["stdout_truncated"], true);
    assert_eq!(body["stderr_truncated"], false);
    assert_eq!(
        app.process(&id).await["stdout"].as_str().unwrap().len(),
        1003
    );
    app.stop().await;
}

#[tokio::test]
async fn redeliver_queues_a_new_delivery_of_a_finished_execution() {
    let app = spawn_app().await;
    let receiver = TestReceiver::start().await;
    let id = submit_async(
        &app,
        json!({ "code": "echo again", "language": "bash", "callback_url": receiver.url("/"), "callback_signature_secret": "k" }),
    )
    .await;
    wait_callback_status(&app, &id, "delivered", Duration::from_secs(10)).await;
    let (status, out) = redeliver(&app, &id).await;
    assert_eq!(status, 200, "{out}");
    let got = receiver.wait_for(2, Duration::from_secs(10)).await;
    verify(&got[1], "k");
    assert_ne!(
        got[0].header("webhook-id"),
        got[1].header("webhook-id"),
        "a new delivery"
    );
    assert_eq!(got[1].json()["stdout"], "again\n");
    let info = wait_callback_status(&app, &id, "delivered", Duration::from_secs(10)).await;
    assert_eq!(info["deliveries"].as_array().unwrap().len(), 2);

    let (_, sync) = app
        .post_json("/execute", json!({ "code": "echo s", "language": "bash" }))
        .await;
    let (status, err) = redeliver(&app, sync["execution_id"].as_str().unwrap()).await;
    assert_eq!(
        (status, err["code"].as_str()),
        (400, Some("INVALID_REQUEST"))
    );
    app.stop().await;
}

/// Deliveries reach the loop without its safety-net poll (a minute here):
/// a first attempt is handed over with the completion, a retry is claimed
/// when it falls due, and a redelivery at once.
#[tokio::test]
async fn no_attempt_waits_for_the_poll() {
    let app = spawn_app_with(|c| {
        c.callback_retry_schedule = "100ms,100ms".into();
        c.callback_jitter = 0.0;
        c.poll_interval_secs = 60.0;
    })
    .await;
    let receiver = TestReceiver::start().await;
    receiver.script(vec![Reply::Status(500)]);
    let id = submit_async(
        &app,
        json!({ "code": "echo due", "language": "bash", "callback_url": receiver.url("/") }),
    )
    .await;
    let got = receiver.wait_for(2, Duration::from_secs(5)).await;
    assert_eq!(got[0].header("webhook-id"), got[1].header("webhook-id"));
    wait_callback_status(&app, &id, "delivered", Duration::from_secs(5)).await;
    let (status, out) = redeliver(&app, &id).await;
    assert_eq!(status, 200, "{out}");
    let got = receiver.wait_for(3, Duration::from_secs(5)).await;
    assert_ne!(got[1].header("webhook-id"), got[2].header("webhook-id"));
    app.stop().await;
}

#[tokio::test]
async fn killed_and_timed_out_async_executions_send_their_callback_too() {
    let app = spawn_app_with(|c| c.async_concurrency = 1).await;
    let receiver = TestReceiver::start().await;
    let cb = receiver.url("/");
    let slow = submit_async(
        &app,
        json!({ "code": "sleep 60", "language": "bash", "timeout": 1, "callback_url": cb }),
    )
    .await;
    let queued = submit_async(
        &app,
        json!({ "code": "echo never", "language": "bash", "callback_url": cb }),
    )
    .await;
    let (status, _) = app
        .post_json(&format!("/execute/kill/{queued}"), json!({}))
        .await;
    assert_eq!(status, 200);
    wait_callback_status(&app, &queued, "delivered", Duration::from_secs(10)).await;
    wait_callback_status(&app, &slow, "delivered", Duration::from_secs(10)).await;
    let by_id = |id: &str| {
        receiver
            .received()
            .into_iter()
            .map(|r| r.json())
            .find(|b| b["execution_id"] == id)
            .unwrap()
    };
    assert_eq!(by_id(&queued)["status"], "killed");
    assert_eq!(by_id(&slow)["status"], "timeout");
    assert_eq!(by_id(&slow)["success"], false);
    app.stop().await;
}

#[tokio::test]
async fn in_the_happy_path_each_execution_is_delivered_exactly_once() {
    let app = spawn_app_with(|c| c.async_concurrency = 8).await;
    let receiver = TestReceiver::start().await;
    let mut ids = Vec::new();
    for i in 0..40 {
        ids.push(
            submit_async(
                &app,
                json!({ "code": format!("echo {i}"), "language": "bash", "callback_url": receiver.url("/") }),
            )
            .await,
        );
    }
    receiver.wait_for(40, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = receiver.received();
    assert_eq!(got.len(), 40, "no duplicates");
    for id in &ids {
        assert_eq!(
            got.iter()
                .filter(|r| r.json()["execution_id"] == id.as_str())
                .count(),
            1
        );
    }
    app.stop().await;
}

/// A delivery waiting its turn, or in flight, is POSTed once however long it
/// waits. Its lease's end (the callback timeout and 30 s after its insert)
/// used to free it: a backlog behind a slow receiver outlived it, and the
/// next claim took the rows still waiting or in flight and POSTed them a
/// second time at once. Here the leases' ends are moved into the past
/// while the receiver holds the first two, rather than waited for.
#[tokio::test]
async fn a_delivery_held_past_its_leases_end_is_posted_once() {
    let app = spawn_app_with(|c| {
        c.callback_concurrency = 2;
        c.callback_retry_schedule = "1h".into();
        c.poll_interval_secs = 0.1;
    })
    .await;
    let receiver = TestReceiver::start().await;
    receiver.default_reply(Reply::Hang(Duration::from_millis(800)));
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(
            submit_async(
                &app,
                json!({ "code": format!("echo {i}"), "language": "bash", "callback_url": receiver.url("/") }),
            )
            .await,
        );
    }
    receiver.wait_for(2, Duration::from_secs(10)).await;
    // Off the runtime: the agent runs on it, and a write of its in flight
    // holds the lock `sqlite3` waits for (it failed "database is locked").
    let db = app.db_path();
    tokio::task::spawn_blocking(move || {
        sqlite3(
            &db,
            "UPDATE callbacks SET lease_until = '2000-01-01T00:00:00.000000Z' WHERE lease_owner IS NOT NULL",
        )
    })
    .await
    .unwrap();
    for id in &ids {
        wait_callback_status(&app, id, "delivered", Duration::from_secs(10)).await;
    }
    // Time for a second POST of the last, were one coming.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut hooks: Vec<String> = receiver
        .received()
        .iter()
        .map(|r| r.header("webhook-id").unwrap().to_string())
        .collect();
    hooks.sort();
    hooks.dedup();
    assert_eq!(receiver.received().len(), 3, "each POSTed once");
    assert_eq!(hooks.len(), 3);
    app.stop().await;
}

/// A redelivery asked for while an attempt is in flight is not lost: should
/// that attempt fail, the next is due at once, not at the schedule's next
/// step (an hour here). It used to answer "due now", and the failed
/// attempt's record then put the retry an hour away.
#[tokio::test]
async fn a_redelivery_during_an_attempt_makes_its_retry_due_at_once() {
    let app = spawn_app_with(|c| {
        c.callback_retry_schedule = "1h".into();
        c.callback_jitter = 0.0;
        c.callback_timeout_secs = 0.5;
    })
    .await;
    let receiver = TestReceiver::start().await;
    receiver.script(vec![
        Reply::Hang(Duration::from_secs(3)),
        Reply::Status(200),
    ]);
    let id = submit_async(
        &app,
        json!({ "code": "echo x", "language": "bash", "callback_url": receiver.url("/") }),
    )
    .await;
    receiver.wait_for(1, Duration::from_secs(10)).await;
    let (status, out) = redeliver(&app, &id).await;
    assert_eq!(status, 200, "{out}");
    assert!(
        out["message"].as_str().unwrap().contains("under way"),
        "{out}"
    );
    let info = wait_callback_status(&app, &id, "delivered", Duration::from_secs(5)).await;
    assert_eq!(info["attempts"][0]["outcome"], "timeout", "{info}");
    assert_eq!(info["deliveries"].as_array().unwrap().len(), 1, "{info}");
    let got = receiver.received();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].header("webhook-id"), got[1].header("webhook-id"));
    app.stop().await;
}

/// A receiver behind HTTPS with a certificate from a private CA (a company's
/// own) gets its callback when the machine trusts that CA: the system's
/// store and `SSL_CERT_FILE` are read, beside the built-in roots. Only the
/// built-in roots were: every attempt failed `UnknownIssuer` until dead.
#[tokio::test]
async fn a_receiver_with_a_private_ca_is_trusted_through_the_system_store() {
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path();
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(tls)
            .output()
            .expect("run openssl");
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=execd test CA",
            ],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req"][..],
            &ec,
            &[
                "-keyout",
                "srv.key",
                "-out",
                "srv.csr",
                "-subj",
                "/CN=127.0.0.1",
            ],
        ]
        .concat(),
    );
    std::fs::write(tls.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "srv.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "srv.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
    // One POST answered 200, then it exits; 30 s at most.
    let script = r#"
import http.server, ssl, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
        print("got", self.path, flush=True)
    def log_message(self, *a): pass
s = http.server.HTTPServer(("127.0.0.1", 0), H)
c = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); c.load_cert_chain("srv.pem", "srv.key")
s.socket = c.wrap_socket(s.socket, server_side=True)
s.timeout = 30
print(s.server_address[1], flush=True)
s.handle_request()
"#;
    let mut receiver = std::process::Command::new("python3")
        .args(["-c", script])
        .current_dir(tls)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(receiver.stdout.take().unwrap()).lines();
    let port: u16 = lines.next().unwrap().unwrap().trim().parse().unwrap();
    let agent_port = crate::crash::free_port();
    let data = tls.join("data");
    let ca = tls.join("ca.pem");
    let agent = crate::crash::Agent::start_with(&data, agent_port, &[], |c| {
        c.env("SSL_CERT_FILE", &ca);
    })
    .await;
    let out = agent
        .post(
            "/execute/async",
            json!({ "code": "true", "language": "bash", "callback_url": format!("https://127.0.0.1:{port}/hook") }),
        )
        .await;
    let got = tokio::task::spawn_blocking(move || {
        let line = lines.next().and_then(Result::ok);
        let _ = receiver.wait();
        line
    })
    .await
    .unwrap();
    assert_eq!(got.as_deref(), Some("got /hook"));
    agent
        .wait_delivered(out["execution_id"].as_str().unwrap())
        .await;
    agent.terminate();
}

/// A retry scheduled before the wall clock went back (an NTP step, a VM
/// restored from a snapshot) is due now: it waited out the hour the clock
/// went back, for a delay of five minutes.
#[tokio::test]
async fn a_retry_scheduled_before_the_clock_went_back_is_not_held_for_the_jump() {
    let app = fast_retrying_app("5m").await;
    let receiver = TestReceiver::start().await;
    receiver.script(vec![Reply::Status(500), Reply::Status(200)]);
    let id = submit_async(
        &app,
        json!({ "code": "echo x", "language": "bash", "callback_url": receiver.url("/") }),
    )
    .await;
    wait_callback_status(&app, &id, "failed", Duration::from_secs(10)).await;
    // As the row reads after the clock went back an hour: written "an
    // hour from now", the retry five minutes after that.
    sqlite3(
        &app.db_path(),
        &format!(
            "UPDATE callbacks SET
                updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '+1 hour'),
                next_attempt_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '+1 hour', '+5 minutes')
              WHERE execution_id = '{id}'"
        ),
    );
    let info = wait_callback_status(&app, &id, "delivered", Duration::from_secs(10)).await;
    assert_eq!(info["attempts"].as_array().unwrap().len(), 2, "{info}");
    assert_eq!(receiver.received().len(), 2);
    app.stop().await;
}
