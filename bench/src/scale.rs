//! Scenario 6: 100,000 finished executions in the database: start-up, idle
//! memory, and the first page of the process list.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::agent::{self, random_hex, Agent};
use crate::report::{self, histogram, ms_at, thousands, Outcome, Row};
use crate::Ctx;

pub async fn scale(ctx: &Ctx) -> Result<Outcome> {
    let mut out = Outcome::default();
    let n: i64 = ctx.pick(100_000, 20_000);
    let requests = ctx.pick(200, 50);
    let data = ctx.data_dir("s6");
    let token = random_hex(16);

    // First start creates the schema (and is the empty-database start-up).
    let agent = Agent::start(&ctx.agent, &data, &token, &[]).await?;
    let empty_startup = agent.startup;
    let empty_rss = agent::status_kib(agent.pid(), "VmRSS").unwrap_or(0);
    agent.stop().await?;

    let db = data.join("execd.db");
    let t = Instant::now();
    tokio::task::spawn_blocking(move || fill(&db, n)).await??;
    out.note(format!(
        "{} finished rows inserted in {:.2} s",
        thousands(n as f64),
        t.elapsed().as_secs_f64()
    ));

    let agent = Agent::start(&ctx.agent, &data, &token, &[]).await?;
    let startup = agent.startup;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_kib = agent::status_kib(agent.pid(), "VmRSS").unwrap_or(0);
    // The agent's processes beside it at the same moment: the zygote, a
    // spare supervisor and (`--warm-python`) its warm interpreter.
    let mut below: Vec<(String, u32, u64)> = Vec::new();
    for (pid, comm) in agent::descendants(agent.pid()) {
        let kib = agent::status_kib(pid, "VmRSS").unwrap_or(0);
        match below.iter_mut().find(|(c, _, _)| *c == comm) {
            Some(entry) => {
                entry.1 += 1;
                entry.2 += kib;
            }
            None => below.push((comm, 1, kib)),
        }
    }
    let below_kib: u64 = below.iter().map(|(_, _, kib)| kib).sum();
    out.note(format!(
        "idle, the processes under the agent (VmRSS each, shared pages counted in each): {}; \
         with the agent {:.1} MB in all",
        if below.is_empty() {
            "none".to_string()
        } else {
            below
                .iter()
                .map(|(comm, n, kib)| format!("{comm} ×{n} {:.1} MB", *kib as f64 * 1024.0 / 1e6))
                .collect::<Vec<_>>()
                .join(", ")
        },
        (idle_kib + below_kib) as f64 * 1024.0 / 1e6
    ));

    let url = format!("{}/execute/processes?limit=100", agent.api.base);
    let mut latency = histogram();
    let mut size = 0;
    for i in 0..requests {
        let t = Instant::now();
        let response = agent
            .api
            .client
            .get(&url)
            .bearer_auth(&agent.api.token)
            .send()
            .await?;
        if !response.status().is_success() {
            bail!("list: {}", response.status());
        }
        let body = response.bytes().await?;
        report::record(&mut latency, t.elapsed());
        if i == 0 {
            let v: serde_json::Value = serde_json::from_slice(&body)?;
            let count = v["processes"].as_array().map_or(0, Vec::len);
            if count != 100 {
                out.note(format!("the list returned {count} processes, not 100"));
            }
            size = body.len();
        }
    }
    let cpu = agent::cpu_seconds(agent.pid()).unwrap_or_default().0;
    agent.stop().await?;

    let (p50, p99) = (ms_at(&latency, 0.5), ms_at(&latency, 0.99));
    out.note(format!(
        "list of 100: p50 {p50:.2} ms, p99 {p99:.2} ms, {} B per response; agent CPU {:.2} s in all",
        thousands(size as f64),
        cpu
    ));
    out.note(format!(
        "start-up on an empty data dir {:.0} ms (RSS {:.1} MB right after); with the rows {:.0} ms",
        empty_startup.as_secs_f64() * 1e3,
        empty_rss as f64 * 1024.0 / 1e6,
        startup.as_secs_f64() * 1e3
    ));
    out.note(interpreter_probe_cost());
    let mb = idle_kib as f64 * 1024.0 / 1e6;
    out.rows.push(Row::new(
        "6",
        &format!(
            "{} finished executions: GET /execute/processes?limit=100",
            thousands(n as f64)
        ),
        format!("p50 {p50:.2} ms, p99 {p99:.2} ms"),
        "p50 < 20 ms",
        "–".into(),
        Some(p50 < 20.0),
    ));
    out.rows.push(Row::new(
        "6",
        "  ↳ start-up (spawn → /health 200)",
        format!("{:.0} ms", startup.as_secs_f64() * 1e3),
        "< 1 s",
        format!("empty DB {:.0} ms", empty_startup.as_secs_f64() * 1e3),
        Some(startup < Duration::from_secs(1)),
    ));
    out.rows.push(Row::new(
        "6",
        "  ↳ idle RSS (VmRSS after 2 s)",
        format!("{mb:.1} MB"),
        "< 30 MB",
        "–".into(),
        Some(mb < 30.0),
    ));
    Ok(out)
}

/// Inserts `n` finished executions with one statement (plus 1 KiB of stdout
/// on every tenth), the way the agent stores them, then checkpoints the WAL.
fn fill(db: &std::path::Path, n: i64) -> Result<()> {
    let conn = rusqlite::Connection::open(db)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let spawned = report::has_column(&conn, "executions", "spawned_at");
    let (extra_col, extra_val) = if spawned {
        (
            ", spawned_at",
            ", strftime('%Y-%m-%dT%H:%M:%f', t, '+0.02 seconds') || '000Z'",
        )
    } else {
        ("", "")
    };
    let sql = format!(
        "INSERT INTO executions
            (id, process_id, lane, language, code, working_dir, env, timeout_ms, status, pid, exit_code,
             created_at, started_at, completed_at, owner, attempt{extra_col})
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1),
              s(i, t) AS (SELECT i, datetime('now', '-3 days', printf('+%d seconds', i)) FROM n)
         SELECT printf('exec_01BENCH%020d', i), printf('proc_01BENCH%020d', i), 'async', 'python', 'print(1)',
                '/tmp', '{{}}', 60000, 'completed', 1000 + i % 30000, 0,
                strftime('%Y-%m-%dT%H:%M:%f', t) || '000Z',
                strftime('%Y-%m-%dT%H:%M:%f', t, '+0.01 seconds') || '000Z',
                strftime('%Y-%m-%dT%H:%M:%f', t, '+0.05 seconds') || '000Z',
                'bench', 1{extra_val}
           FROM s"
    );
    let tx = conn.unchecked_transaction()?;
    tx.execute(&sql, [n])?;
    tx.execute(
        "INSERT INTO output_chunks (execution_id, stream, seq, data, created_at)
         SELECT id, 'stdout', 0, CAST(replace(hex(zeroblob(512)), '00', 'ab') AS BLOB), completed_at
           FROM executions WHERE seq % 10 = 0",
        [],
    )?;
    tx.execute(
        "UPDATE executions SET stdout_bytes = 1024 WHERE seq % 10 = 0",
        [],
    )?;
    tx.commit()?;
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    Ok(())
}

/// The agent resolves every interpreter at start (through shims); this times
/// the same probes from here, to show how much of start-up they can be.
fn interpreter_probe_cost() -> String {
    let probes: [(&str, &[&str]); 4] = [
        ("python3", &["-c", "import sys; print(sys.executable)"]),
        ("python3", &["--version"]),
        ("node", &["-p", "process.execPath"]),
        ("go", &["version"]),
    ];
    let mut parts = Vec::new();
    for (program, args) in probes {
        let t = Instant::now();
        let ran = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if ran.is_ok() {
            parts.push(format!(
                "`{program} {}` {:.0} ms",
                args.join(" "),
                t.elapsed().as_secs_f64() * 1e3
            ));
        }
    }
    let shim = which("python3").is_some_and(|p| p.to_string_lossy().contains("shims"));
    format!(
        "interpreter probes as the agent runs them at start (PATH python3 is {}a shim): {}",
        if shim { "" } else { "not " },
        parts.join(", ")
    )
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_string_lossy()
        .split(':')
        .map(|d| PathBuf::from(d).join(name))
        .find(|p| p.is_file())
}
