//! Scenario 1 (durable submissions under load, against raw SQLite) and
//! scenario 2 (pickup latency of an idle agent).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use serde_json::json;

use crate::agent::{self, random_hex, Agent};
use crate::rawhttp;
use crate::report::{self, histogram, ms_at, thousands, Outcome, Row};
use crate::Ctx;

const CONNECTIONS: usize = 64;
/// Never called: the async lane is paused, so no job ends in scenario 1.
const DEAD_CALLBACK: &str = "http://127.0.0.1:9/callback";

/// What one load connection measured inside the window.
struct Load {
    latency: Histogram<u64>,
    accepted: u64,
    errors: u64,
    first_error: Option<String>,
}

pub async fn submissions(ctx: &Ctx) -> Result<Outcome> {
    let mut out = Outcome::default();
    let (warm, window) = ctx.pick((2.0, 10.0), (0.5, 3.0));
    let (warm, window) = (
        Duration::from_secs_f64(warm),
        Duration::from_secs_f64(window),
    );
    let token = random_hex(16);

    // Runners paused, so the figure is the submit path alone.
    let agent = match Agent::start(
        &ctx.agent,
        &ctx.data_dir("s1"),
        &token,
        &["--async-concurrency", "0"],
    )
    .await
    {
        Ok(agent) => agent,
        Err(e) => {
            // An agent that refuses 0: one runner, held by a long job, so
            // every later submission stays queued just the same.
            out.note(format!(
                "this agent refuses --async-concurrency 0 ({}); the async lane was paused instead with \
                 --async-concurrency 1 and one `sleep 600` job holding its only runner",
                e.to_string().lines().next().unwrap_or_default()
            ));
            let agent = Agent::start(
                &ctx.agent,
                &ctx.data_dir("s1-held"),
                &token,
                &["--async-concurrency", "1"],
            )
            .await?;
            let held = agent
                .post(
                    "/execute/async",
                    &json!({"code": "sleep 600", "language": "bash", "timeout": 900, "callback_url": DEAD_CALLBACK}),
                )
                .await?;
            let id = held["process_id"]
                .as_str()
                .context("process_id")?
                .to_string();
            let deadline = Instant::now() + Duration::from_secs(10);
            while agent.get(&format!("/execute/processes/{id}")).await?["status"] != "running" {
                if Instant::now() > deadline {
                    bail!("the holding job did not start");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            agent
        }
    };

    let host = agent.api.base.trim_start_matches("http://").to_string();
    let body = json!({"code": "print(1)", "language": "python", "callback_url": DEAD_CALLBACK})
        .to_string();
    let request = Arc::new(rawhttp::post_request(
        &host,
        "/execute/async",
        &token,
        &body,
    ));
    let start = Instant::now();
    let measure_from = start + warm;
    let until = measure_from + window;
    let mut tasks = Vec::new();
    for _ in 0..CONNECTIONS {
        let (host, request) = (host.clone(), request.clone());
        tasks.push(tokio::spawn(async move {
            let mut load = Load {
                latency: histogram(),
                accepted: 0,
                errors: 0,
                first_error: None,
            };
            let mut conn = rawhttp::Conn::connect(&host).await?;
            loop {
                let sent = Instant::now();
                if sent >= until {
                    break;
                }
                let (status, body) = conn.round_trip(&request).await?;
                let done = Instant::now();
                if status != 200 {
                    load.errors += 1;
                    load.first_error.get_or_insert_with(|| {
                        format!("{status}: {}", String::from_utf8_lossy(&body))
                    });
                } else if sent >= measure_from && done <= until {
                    // Only requests wholly inside the window count.
                    report::record(&mut load.latency, done - sent);
                    load.accepted += 1;
                }
            }
            anyhow::Ok(load)
        }));
    }
    // CPU used by the agent and by this load process over the window: where
    // the two cores went.
    let pid = agent.pid();
    tokio::time::sleep_until(measure_from.into()).await;
    let (agent_cpu0, own_cpu0) = (
        agent::cpu_seconds(pid).unwrap_or_default().0,
        agent::own_cpu_seconds(),
    );
    let writer0 = agent.api.writer_totals().await.ok();
    tokio::time::sleep_until(until.into()).await;
    let (agent_cpu1, own_cpu1) = (
        agent::cpu_seconds(pid).unwrap_or_default().0,
        agent::own_cpu_seconds(),
    );
    let writer1 = agent.api.writer_totals().await.ok();

    let mut latency = histogram();
    let (mut accepted, mut errors, mut first_error) = (0, 0, None);
    for task in tasks {
        let load = task.await??;
        latency.add(&load.latency)?;
        accepted += load.accepted;
        errors += load.errors;
        first_error = first_error.or(load.first_error);
    }
    let rss_kib = agent::status_kib(pid, "VmHWM").unwrap_or(0);
    let db = agent.db_path();
    // SQLite reuses its WAL file from the start rather than shrink it (the
    // agent's stop empties it): its size now is the most the WAL held.
    let mut wal = db.clone().into_os_string();
    wal.push("-wal");
    let wal_bytes = std::fs::metadata(&wal).map_or(0, |m| m.len());
    let backlog_jobs = other_lane_under_backlog(ctx, &agent).await?;
    agent.stop().await?;
    let stored: i64 = report::open_db_read(&db)?.query_row(
        "SELECT count(*) FROM executions WHERE lane = 'async' AND status = 'queued'",
        [],
        |r| r.get(0),
    )?;

    if let Some(pickup) = other_lane_pickup(&db, backlog_jobs)? {
        out.note(format!(
            "with those {stored} queued in the paused async lane, {backlog_jobs} background bash `true` jobs \
             one at a time: submit → pid known {pickup}"
        ));
    }

    let rate = accepted as f64 / window.as_secs_f64();
    let (p50, p99) = (ms_at(&latency, 0.50), ms_at(&latency, 0.99));
    if errors > 0 {
        out.note(format!(
            "{errors} submissions were not 200; first: {}",
            first_error.unwrap_or_default()
        ));
    }
    let agent_cpu = agent_cpu1 - agent_cpu0;
    let own_cpu = own_cpu1 - own_cpu0;
    out.note(format!(
        "{accepted} accepted in {:.0} s over {CONNECTIONS} connections; {stored} rows queued in the DB afterwards; \
         p50 {p50:.2} ms, p90 {:.2} ms, p99 {p99:.2} ms, max {:.2} ms",
        window.as_secs_f64(),
        ms_at(&latency, 0.90),
        latency.max() as f64 / 1000.0
    ));
    out.note(format!(
        "CPU over the window: agent {:.2} cores ({:.0} µs per submission), load process {:.2} cores; agent peak RSS {} MiB",
        agent_cpu / window.as_secs_f64(),
        agent_cpu * 1e6 / accepted.max(1) as f64,
        own_cpu / window.as_secs_f64(),
        rss_kib / 1024
    ));
    // Where a submission waits once handled: the writer's batches, and
    // the WAL's syncs beside it (each answers every commit before it).
    if let (Some(w0), Some(w1)) = (writer0, writer1) {
        let w = w1 - w0;
        out.note(format!(
            "the writer over the window: {:.0} group commits of {:.1} writes on average, busy {:.0}% of the window \
             ({:.2} ms a commit); {:.0} WAL syncs, {:.2} ms each on average",
            w.commits,
            w.writes / w.commits.max(1.0),
            w.busy * 100.0 / window.as_secs_f64(),
            w.busy * 1e3 / w.commits.max(1.0),
            w.syncs,
            w.syncing * 1e3 / w.syncs.max(1.0),
        ));
    }
    out.note(format!(
        "the WAL file after the window: {:.1} MiB (the most the WAL held: it is reused from its start, not shrunk)",
        wal_bytes as f64 / (1 << 20) as f64
    ));

    // Baseline: one fsynced transaction per row, same disk, same schema.
    let dir = ctx.scratch.join("s1-raw");
    std::fs::create_dir_all(&dir)?;
    let migrations = ctx.repo.join("migrations");
    let raw_window = Duration::from_secs_f64(ctx.pick(5.0, 1.0));
    let pace = Pace {
        window: raw_window,
        most: 1_000_000,
        gap: Duration::ZERO,
        synchronous: "FULL",
    };
    let (rows, commit) =
        tokio::task::spawn_blocking(move || raw_sqlite(&dir, &migrations, pace)).await??;
    let raw_rate = rows as f64 / raw_window.as_secs_f64();
    out.note(format!(
        "raw SQLite: {rows} single-row transactions in {:.0} s; commit p50 {:.2} ms, p99 {:.2} ms \
         (≈ one WAL fsync each)",
        raw_window.as_secs_f64(),
        ms_at(&commit, 0.5),
        ms_at(&commit, 0.99)
    ));
    out.note(format!(
        "the agent accepted {:.1}× what one-transaction-per-row SQLite commits",
        rate / raw_rate
    ));

    let baseline = format!("raw SQLite {} rows/s", thousands(raw_rate));
    out.rows.push(Row::new(
        "1",
        "durable submissions, 64 conns, runners paused",
        format!("{} accepted/s", thousands(rate)),
        "≥ 10,000/s",
        baseline.clone(),
        Some(rate >= 10_000.0 && errors == 0),
    ));
    out.rows.push(Row::new(
        "1",
        "  ↳ submit latency",
        format!("p50 {p50:.2} ms, p99 {p99:.2} ms"),
        "p99 < 25 ms",
        format!("commit p99 {:.2} ms", ms_at(&commit, 0.99)),
        Some(p99 < 25.0),
    ));
    Ok(out)
}

/// A backlog in one lane must not slow another's claims: background jobs,
/// one at a time, while the paused async lane holds every submission of the
/// window. Returns how many ran.
async fn other_lane_under_backlog(ctx: &Ctx, agent: &Agent) -> Result<usize> {
    let n = ctx.pick(20, 5);
    let db = report::open_db_read(&agent.db_path())?;
    for _ in 0..n {
        let v = agent
            .post(
                "/execute/background",
                &json!({"code": "true", "language": "bash"}),
            )
            .await?;
        let id = v["execution_id"].as_str().context("execution_id")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        if !report::wait_one_terminal(&db, id, deadline, Duration::from_millis(5)).await? {
            bail!("background job {id} did not end within 10 s behind the async backlog");
        }
    }
    Ok(n)
}

/// The background jobs' created → spawned p50 and p99, if the agent stamps `spawned_at`.
fn other_lane_pickup(db: &Path, n: usize) -> Result<Option<String>> {
    let db = report::open_db_read(db)?;
    if n == 0 || !report::has_column(&db, "executions", "spawned_at") {
        return Ok(None);
    }
    let mut stmt = db.prepare(
        "SELECT created_at, spawned_at FROM executions WHERE lane = 'background' AND spawned_at IS NOT NULL",
    )?;
    let mut pickup = histogram();
    for row in stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))? {
        let (created, spawned) = row?;
        let us = report::micros_between(&created, &spawned)
            .unwrap_or(0)
            .max(0) as u64;
        report::record(&mut pickup, Duration::from_micros(us));
    }
    Ok(Some(format!(
        "p50 {:.2} ms, p99 {:.2} ms",
        ms_at(&pickup, 0.5),
        ms_at(&pickup, 0.99)
    )))
}

/// How the raw-SQLite baseline paces its commits.
struct Pace {
    /// Stop after this long…
    window: Duration,
    /// …or this many commits.
    most: u64,
    /// Idle time before each commit (zero: back to back).
    gap: Duration,
    /// `FULL` as the agent's commits are made durable; `NORMAL` for a commit
    /// without its fsync, as the agent's is when a claimed program's gate opens.
    synchronous: &'static str,
}

/// One `BEGIN IMMEDIATE; INSERT; COMMIT` per row, paced by `pace`, into a
/// fresh WAL file (`synchronous` as `pace` says) created with the agent's own migrations;
/// the row is what the agent stores for a submission. Returns the rows and
/// the per-commit latency.
fn raw_sqlite(dir: &Path, migrations: &Path, pace: Pace) -> Result<(u64, Histogram<u64>)> {
    let conn = rusqlite::Connection::open(dir.join("raw.db"))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", pace.synchronous)?;
    let mut files: Vec<_> = std::fs::read_dir(migrations)
        .with_context(|| format!("migrations in {}", migrations.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .collect();
    files.sort();
    for file in files {
        conn.execute_batch(&std::fs::read_to_string(&file)?)
            .with_context(|| format!("applying {}", file.display()))?;
    }
    let mut insert = conn.prepare(
        "INSERT INTO executions (id, process_id, lane, language, code, working_dir, env, timeout_ms, \
         created_at, callback_url, callback_headers) VALUES (?1, ?2, 'async', 'python', 'print(1)', \
         '/tmp/execd-bench/workspace', '{}', 300000, ?3, ?4, '{}')",
    )?;
    let mut commit = histogram();
    let start = Instant::now();
    let mut n: u64 = 0;
    while start.elapsed() < pace.window && n < pace.most {
        n += 1;
        if !pace.gap.is_zero() {
            std::thread::sleep(pace.gap);
        }
        let ulid = format!("01BENCH{n:019}");
        let t = Instant::now();
        conn.execute_batch("BEGIN IMMEDIATE")?;
        insert.execute(rusqlite::params![
            format!("exec_{ulid}"),
            format!("proc_{ulid}"),
            chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            DEAD_CALLBACK,
        ])?;
        conn.execute_batch("COMMIT")?;
        report::record(&mut commit, t.elapsed());
    }
    Ok((n, commit))
}

/// Scenario 2: one submission at a time to an idle agent; pickup is the time
/// from the row's `created_at` to its `spawned_at` (the program's pid known).
pub async fn pickup(ctx: &Ctx) -> Result<Outcome> {
    let mut out = Outcome::default();
    let n = ctx.pick(200, 30);
    let token = random_hex(16);
    let agent = Agent::start(&ctx.agent, &ctx.data_dir("s2"), &token, &[]).await?;
    let db = report::open_db_read(&agent.db_path())?;
    let spawned_col = report::has_column(&db, "executions", "spawned_at");
    let mut submit = histogram();
    for _ in 0..n {
        let t = Instant::now();
        let v = agent
            .post(
                "/execute/background",
                &json!({"code": "true", "language": "bash"}),
            )
            .await?;
        report::record(&mut submit, t.elapsed());
        let id = v["execution_id"]
            .as_str()
            .context("execution_id")?
            .to_string();
        // Leave the agent alone while it picks the job up (no polling in the
        // measured interval), then wait for the end so the next one finds it idle.
        tokio::time::sleep(Duration::from_millis(30)).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        if !report::wait_one_terminal(&db, &id, deadline, Duration::from_millis(5)).await? {
            bail!("job {id} did not end within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    agent.stop().await?;

    let spawned = if spawned_col {
        "spawned_at"
    } else {
        "started_at"
    };
    if !spawned_col {
        out.note("this agent has no executions.spawned_at: pickup measured to started_at (the claim) instead");
    }
    let sql = format!(
        "SELECT created_at, started_at, {spawned} FROM executions WHERE lane = 'background'"
    );
    let mut stmt = db.prepare(&sql)?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, Option<String>>(1)?,
            r.get::<_, Option<String>>(2)?,
        ))
    })?;
    let (mut pickup, mut claim, mut spawn) = (histogram(), histogram(), histogram());
    for row in rows {
        let (created, started, spawned) = row?;
        let (Some(started), Some(spawned)) = (started, spawned) else {
            continue;
        };
        let us = |a: &str, b: &str| {
            Duration::from_micros(report::micros_between(a, b).unwrap_or(0).max(0) as u64)
        };
        report::record(&mut pickup, us(&created, &spawned));
        report::record(&mut claim, us(&created, &started));
        report::record(&mut spawn, us(&started, &spawned));
    }
    if pickup.len() < n as u64 {
        out.note(format!(
            "only {} of {n} jobs have both timestamps",
            pickup.len()
        ));
    }
    let (p50, p99) = (ms_at(&pickup, 0.5), ms_at(&pickup, 0.99));
    out.note(format!(
        "{n} jobs (bash `true`, background lane): created→claimed (started_at) p50 {:.2} ms p99 {:.2} ms; \
         claimed→{spawned} p50 {:.2} ms p99 {:.2} ms; HTTP submit p50 {:.2} ms p99 {:.2} ms",
        ms_at(&claim, 0.5),
        ms_at(&claim, 0.99),
        ms_at(&spawn, 0.5),
        ms_at(&spawn, 0.99),
        ms_at(&submit, 0.5),
        ms_at(&submit, 0.99),
    ));
    // What one commit costs on an idle machine, as the pickup's commit does:
    // the same file settings and row, one commit 30 ms after the last.
    // And the same transaction without its fsync, 30 ms after the last and
    // back to back: what an idle machine adds to every step of a pickup.
    let mut commits = Vec::new();
    for (name, gap, synchronous) in [
        ("s2-raw", 30, "FULL"),
        ("s2-raw-idle", 30, "NORMAL"),
        ("s2-raw-busy", 0, "NORMAL"),
    ] {
        let dir = ctx.scratch.join(name);
        std::fs::create_dir_all(&dir)?;
        let migrations = ctx.repo.join("migrations");
        let pace = Pace {
            window: Duration::from_secs(30),
            most: n as u64,
            gap: Duration::from_millis(gap),
            synchronous,
        };
        let (_, commit) =
            tokio::task::spawn_blocking(move || raw_sqlite(&dir, &migrations, pace)).await??;
        commits.push(commit);
    }
    out.note(format!(
        "raw SQLite, one single-row commit 30 ms after the last (as an idle agent's): p50 {:.2} ms, p99 {:.2} ms",
        ms_at(&commits[0], 0.5),
        ms_at(&commits[0], 0.99),
    ));
    out.note(format!(
        "the same transaction without its fsync (BEGIN IMMEDIATE, INSERT, COMMIT in this process): \
         p50 {:.3} ms 30 ms after the last, {:.3} ms back to back: an idle machine is {:.1}× slower at it",
        ms_at(&commits[1], 0.5),
        ms_at(&commits[2], 0.5),
        ms_at(&commits[1], 0.5) / ms_at(&commits[2], 0.5).max(1e-6),
    ));
    out.rows.push(Row::new(
        "2",
        "pickup: idle agent, submit → pid known",
        format!("p50 {p50:.2} ms, p99 {p99:.2} ms"),
        "p50 < 1 ms, p99 < 5 ms",
        "–".into(),
        Some(p50 < 1.0 && p99 < 5.0),
    ));
    Ok(out)
}
