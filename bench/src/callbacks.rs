//! Scenario 5: callbacks of 2,000 async jobs to a loopback receiver, against
//! a plain HTTP client posting the same bodies to the same receiver.

use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;
use serde_json::json;
use tokio::sync::watch;

use crate::agent::{cpu_seconds, machine_cpu_seconds, own_cpu_seconds, random_hex, Agent};
use crate::jobs::{agent_interpreter, spawn_directly, submit_many, wait_terminal};
use crate::report::{self, epoch_secs, micros_between, quantile, thousands, Outcome, Row};
use crate::Ctx;

/// The receiver: counts every POST and answers 200 — at once while `open`,
/// else when it opens (phase B holds the first attempts to build a backlog).
struct Receiver {
    /// Requests come in (answered or held).
    arrived: AtomicU64,
    /// Requests answered.
    count: AtomicU64,
    open: watch::Sender<bool>,
}

async fn hook(State(receiver): State<Arc<Receiver>>, _body: axum::body::Bytes) -> StatusCode {
    receiver.arrived.fetch_add(1, Ordering::Relaxed);
    let mut open = receiver.open.subscribe();
    let _ = open.wait_for(|open| *open).await;
    receiver.count.fetch_add(1, Ordering::Relaxed);
    StatusCode::OK
}

const AGENT_FLAGS: [&str; 6] = [
    "--async-concurrency",
    "8",
    "--callback-concurrency",
    "64",
    "--callback-retry-schedule",
    "1s",
];

pub async fn callbacks(ctx: &Ctx) -> Result<Outcome> {
    let mut out = Outcome::default();
    let n = ctx.pick(2000, 200);
    let receiver = Arc::new(Receiver {
        arrived: AtomicU64::new(0),
        count: AtomicU64::new(0),
        open: watch::channel(true).0,
    });
    let count = &receiver.count;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    let app = Router::new()
        .route("/hook", post(hook))
        .with_state(receiver.clone());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let token = random_hex(16);
    let agent = Agent::start(&ctx.agent, &ctx.data_dir("s5"), &token, &AGENT_FLAGS).await?;
    let db = report::open_db_read(&agent.db_path())?;
    let writer0 = agent.api.writer_totals().await?;
    let bash = agent_interpreter(&agent, "bash")
        .await
        .context("the agent's /info names no bash")?;
    let machine0 = machine_cpu_seconds();
    let agent_cpu0 = cpu_seconds(agent.pid()).unwrap_or_default().0;
    let own_cpu0 = own_cpu_seconds();
    let start = Instant::now();
    let body = json!({"code": "true", "language": "bash", "callback_url": url});
    submit_many(&agent.api, "/execute/async", body.clone(), n, 8).await?;
    let deadline = start + Duration::from_secs(120);
    while count.load(Ordering::Relaxed) < n as u64 {
        if Instant::now() > deadline {
            bail!(
                "only {} of {n} callbacks arrived within 120 s",
                count.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let wall = start.elapsed();
    let agent_machine = machine_cpu_seconds() - machine0;
    let agent_cpu = cpu_seconds(agent.pid()).unwrap_or_default().0 - agent_cpu0;
    let own_cpu = own_cpu_seconds() - own_cpu0;
    let writer1 = agent.api.writer_totals().await?;
    wait_terminal(&db, n, Duration::from_millis(10), Duration::from_secs(10)).await?;
    // Let the last attempts be recorded before stopping.
    tokio::time::sleep(Duration::from_millis(200)).await;
    agent.stop().await?;
    let received = count.load(Ordering::Relaxed);

    // First attempts against their callbacks' creation (same transaction as
    // the completion).
    let mut first = Vec::new();
    let mut events = Vec::new(); // (time, +1 queued / −1 first attempt started)
    {
        let mut stmt = db.prepare(
            "SELECT c.created_at, a.started_at FROM callbacks c \
             JOIN callback_attempts a ON a.callback_id = c.id AND a.attempt = 1",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        for row in rows {
            let (created, started) = row?;
            if let Some(us) = micros_between(&created, &started) {
                first.push(us as f64 / 1000.0);
            }
            events.push((created, 1i64));
            events.push((started, -1));
        }
    }
    first.sort_by(f64::total_cmp);
    // Most deliveries waiting for their first attempt at any moment: ~0 means
    // delivery kept up with completions.
    events.sort();
    let backlog = events
        .iter()
        .scan(0i64, |level, (_, d)| {
            *level += d;
            Some(*level)
        })
        .max()
        .unwrap_or(0);
    // Delivered attempts over the span from the first attempt's start to the
    // last attempt's end.
    let (mut delivered, mut attempts, mut begin, mut end) = (0u64, 0u64, f64::MAX, f64::MIN);
    {
        let mut stmt =
            db.prepare("SELECT started_at, duration_ms, outcome FROM callback_attempts")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, f64>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?;
        for row in rows {
            let (started, ms, outcome) = row?;
            attempts += 1;
            if outcome == "delivered" {
                delivered += 1;
            }
            if let Some(t) = epoch_secs(&started) {
                begin = begin.min(t);
                end = end.max(t + ms / 1000.0);
            }
        }
    }
    let rate = delivered as f64 / (end - begin).max(1e-6);
    let (c_first, c_last): (String, String) = db.query_row(
        "SELECT min(completed_at), max(completed_at) FROM executions WHERE lane = 'async'",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let completions =
        n as f64 / (micros_between(&c_first, &c_last).unwrap_or(1).max(1) as f64 / 1e6);
    let (payload, payload_len): (String, i64) = db.query_row(
        "SELECT payload, length(payload) FROM callbacks LIMIT 1",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let (p50, p99) = (quantile(&first, 0.5), quantile(&first, 0.99));
    out.note(format!(
        "{n} async bash `true` jobs, 8 runners: all {received} callbacks received {:.2} s after the first submit; \
         {delivered} delivered of {attempts} attempts; jobs completed at {completions:.0}/s over the same run; \
         most callbacks waiting for a first attempt at once: {backlog}",
        wall.as_secs_f64()
    ));
    out.note(format!(
        "completion → first attempt p50 {p50:.2} ms, p90 {:.2} ms, p99 {p99:.2} ms; payload {payload_len} B",
        quantile(&first, 0.9)
    ));
    // The writer's share of the run: a first attempt waits for the commit
    // and the sync of its job's end, so a writer busy all the time means
    // batches, and waits, grow.
    let w = writer1 - writer0;
    let secs = wall.as_secs_f64();
    out.note(format!(
        "the writer over the same run: {:.0} group commits of {:.1} writes on average, busy {:.2} s of {secs:.2} s ({:.0}%), {:.2} ms per commit (BEGIN to COMMIT), {:.2} ms of writer time per job; beside it {:.0} syncs of the WAL, {:.2} ms each",
        w.commits,
        w.writes / w.commits.max(1.0),
        w.busy,
        100.0 * w.busy / secs,
        1e3 * w.busy / w.commits.max(1.0),
        1e3 * w.busy / n as f64,
        w.syncs,
        1e3 * w.syncing / w.syncs.max(1.0),
    ));
    if backlog <= 8 && rate < 2000.0 {
        out.note(
            "deliveries kept pace with completions (no backlog): the deliveries/s figure is bounded by \
             the job completion rate here, not by the delivery loop",
        );
    }
    out.note(format!(
        "CPU per job over the same run: the agent {:.2} ms, this harness (submissions, receiver, polls) {:.2} ms, \
         the whole machine {:.2} ms",
        agent_cpu * 1e3 / n as f64,
        own_cpu * 1e3 / n as f64,
        agent_machine * 1e3 / n as f64,
    ));
    let (ceiling, ceiling_note) = ceiling(ctx, Path::new(&bash), n, completions)?;
    out.note(ceiling_note);

    // Phase B, the delivery loop's own capacity: the receiver holds the first
    // attempts until every job has ended, so the outbox fills; then it opens
    // and the time to deliver them all is the drain rate.
    count.store(0, Ordering::Relaxed);
    receiver.arrived.store(0, Ordering::Relaxed);
    receiver.open.send_replace(false);
    let mut flags = AGENT_FLAGS.to_vec();
    flags.extend(["--callback-timeout", "120"]);
    let agent = Agent::start(&ctx.agent, &ctx.data_dir("s5-drain"), &token, &flags).await?;
    let db = report::open_db_read(&agent.db_path())?;
    submit_many(&agent.api, "/execute/async", body, n, 8).await?;
    wait_terminal(&db, n, Duration::from_millis(10), Duration::from_secs(100)).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let held = receiver.arrived.load(Ordering::Relaxed);
    let queued = count_where(&db, "SELECT count(*) FROM callbacks")?;
    let release = chrono::Utc::now().timestamp_micros() as f64 / 1e6;
    receiver.open.send_replace(true);
    let deadline = Instant::now() + Duration::from_secs(60);
    while count.load(Ordering::Relaxed) < n as u64 {
        if Instant::now() > deadline {
            bail!(
                "drain: only {} of {n} callbacks arrived within 60 s",
                count.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    agent.stop().await?;
    let mut last_end = release;
    let mut drained = 0u64;
    {
        let mut stmt = db.prepare(
            "SELECT started_at, duration_ms FROM callback_attempts WHERE outcome = 'delivered'",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, f64>(1)?)))?;
        for row in rows {
            let (started, ms) = row?;
            drained += 1;
            if let Some(t) = epoch_secs(&started) {
                last_end = last_end.max(t + ms / 1000.0);
            }
        }
    }
    let drain = drained as f64 / (last_end - release).max(1e-6);
    out.note(format!(
        "drain: {queued} callbacks queued while the receiver held the first {held} attempts; \
         released, all {drained} delivered in {:.0} ms",
        (last_end - release) * 1e3
    ));

    // Baseline: the same bodies, 64 at once, from a plain client.
    count.store(0, Ordering::Relaxed);
    let client = reqwest::Client::builder().http1_only().build()?;
    let next = Arc::new(AtomicUsize::new(0));
    let payload = Arc::new(payload);
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (client, next, payload, url) =
            (client.clone(), next.clone(), payload.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let r = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(payload.as_bytes().to_vec())
                    .send()
                    .await?;
                if !r.status().is_success() {
                    bail!("receiver answered {}", r.status());
                }
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let plain = n as f64 / t.elapsed().as_secs_f64();
    server.abort();

    out.rows.push(Row::new(
        "5",
        &format!(
            "callbacks: {} completions → loopback receiver",
            thousands(n as f64)
        ),
        format!("{} deliveries/s", thousands(rate)),
        "≥ 2,000/s",
        format!(
            "plain client {} posts/s; the jobs spawned directly {}/s",
            thousands(plain),
            thousands(ceiling)
        ),
        Some(rate >= 2000.0 && delivered as usize >= n),
    ));
    out.rows.push(Row::new(
        "5",
        "  ↳ completion → first attempt",
        format!("p50 {p50:.2} ms, p99 {p99:.2} ms"),
        "p50 < 5 ms",
        "–".into(),
        Some(p50 < 5.0),
    ));
    out.rows.push(Row::new(
        "5",
        &format!(
            "  ↳ outbox drain: {} queued callbacks, receiver released",
            thousands(n as f64)
        ),
        format!("{} deliveries/s", thousands(drain)),
        "≥ 2,000/s",
        format!("plain client {} posts/s", thousands(plain)),
        Some(drain >= 2000.0 && drained as usize >= n),
    ));
    Ok(out)
}

/// The ceiling of the first figure: the same jobs' programs (bash running a
/// file that holds `true`, as the agent runs them) spawned directly, as many
/// at once as the agent's runners, with no agent alive. No agent that runs
/// each job as a process of its own completes jobs faster, and each
/// callback follows its job's completion.
/// Returns the direct rate and the note.
fn ceiling(ctx: &Ctx, bash: &Path, n: usize, completions: f64) -> Result<(f64, String)> {
    let dir = ctx.data_dir("s5-direct");
    std::fs::create_dir_all(&dir)?;
    let script = dir.join("main.sh");
    std::fs::write(&script, "true\n")?;
    let machine0 = machine_cpu_seconds();
    let (done, took, _) = spawn_directly(
        bash,
        &[script.as_os_str()],
        b"",
        n,
        8,
        Duration::from_secs(60),
    )?;
    let machine = machine_cpu_seconds() - machine0;
    let direct = done as f64 / took.as_secs_f64();
    let note = format!(
        "the ceiling: the same {done} programs ({} on a file holding `true`) spawned directly, 8 at once, \
         output captured, no agent alive: {direct:.0}/s, machine CPU {:.2} ms each; the agent's jobs \
         completed at {:.2}× that. An agent that runs each job as a process completes none faster, and \
         each callback follows its job's completion: with these jobs, on this machine, deliveries/s \
         cannot pass {direct:.0}",
        bash.display(),
        machine * 1e3 / done.max(1) as f64,
        completions / direct,
    );
    Ok((direct, note))
}

fn count_where(db: &rusqlite::Connection, sql: &str) -> Result<i64> {
    Ok(db.query_row(sql, [], |r| r.get(0))?)
}
