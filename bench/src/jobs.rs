//! Scenario 3 (trivial jobs end to end, against spawning the interpreter
//! directly) and scenario 4 (one job writing 200 MB to stdout, against the
//! same program writing to /dev/null), plus helpers the callback scenario uses.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::agent::{self, random_hex, Agent, Api, WriterTotals};
use crate::report::{self, median, thousands, Outcome, Row};
use crate::{Ctx, Python};

/// Submits `n` copies of `body` to `route` with `parallel` concurrent
/// requests; returns the execution ids.
pub async fn submit_many(
    api: &Api,
    route: &str,
    body: Value,
    n: usize,
    parallel: usize,
) -> Result<Vec<String>> {
    let next = Arc::new(AtomicUsize::new(0));
    let body = Arc::new(body);
    let mut tasks = Vec::new();
    for _ in 0..parallel {
        let (api, next, body, route) = (api.clone(), next.clone(), body.clone(), route.to_string());
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let v = api.post(&route, &body).await?;
                ids.push(
                    v["execution_id"]
                        .as_str()
                        .context("execution_id")?
                        .to_string(),
                );
            }
            anyhow::Ok(ids)
        }));
    }
    let mut ids = Vec::with_capacity(n);
    for task in tasks {
        ids.extend(task.await??);
    }
    Ok(ids)
}

/// Waits until `n` executions are terminal or `limit` passed; returns when
/// it stopped waiting and how many had ended then. With `slots` (at most
/// that many run at once), it polls every `poll` only once no more than
/// `slots` are unfinished; before, it sleeps half the time the rest but
/// `slots` should take at the rate seen so far (at most 250 ms): a poll
/// costs this process CPU that the agent's jobs share, and the direct loop
/// it is compared with waits for its children without any.
async fn wait_terminal_bounded(
    db: &rusqlite::Connection,
    n: usize,
    slots: Option<usize>,
    poll: Duration,
    limit: Duration,
) -> Result<(Instant, usize)> {
    let start = Instant::now();
    let deadline = start + limit;
    let mut first = None;
    loop {
        // All rows less the unfinished ones: the second count reads only the
        // unfinished rows' entries of the status index, so a poll costs
        // microseconds, not a scan of every finished row.
        let done: i64 = db.query_row(
            "SELECT (SELECT count(*) FROM executions)
                  - (SELECT count(*) FROM executions WHERE status IN ('queued', 'running'))",
            [],
            |r| r.get(0),
        )?;
        let (done, now) = (done as usize, Instant::now());
        if done >= n || now > deadline {
            return Ok((now, done));
        }
        let first = *first.get_or_insert(done);
        let unfinished = n - done;
        let sleep = match slots {
            Some(slots) if unfinished > slots && done > first => {
                let per_job = now.duration_since(start) / (done - first) as u32;
                (per_job * (unfinished - slots) as u32 / 2).clamp(poll, Duration::from_millis(250))
            }
            Some(slots) if unfinished > slots => poll.max(Duration::from_millis(50)),
            _ => poll,
        };
        tokio::time::sleep(sleep.min(deadline.saturating_duration_since(now))).await;
    }
}

/// Waits until at least `n` executions are terminal (polling the database,
/// which costs the agent nothing); returns when it saw them.
pub async fn wait_terminal(
    db: &rusqlite::Connection,
    n: usize,
    poll: Duration,
    limit: Duration,
) -> Result<Instant> {
    let (seen, done) = wait_terminal_bounded(db, n, None, poll, limit).await?;
    if done < n {
        bail!(
            "only {done} of {n} executions ended within {} s",
            limit.as_secs()
        );
    }
    Ok(seen)
}

/// The interpreter the agent resolved for `language`, from `/info`.
pub async fn agent_interpreter(agent: &Agent, language: &str) -> Option<String> {
    let info = agent.get("/info").await.ok()?;
    info["languages"]
        .as_array()?
        .iter()
        .find(|l| l["name"] == language)
        .and_then(|l| l["path"].as_str().map(String::from))
}

/// Says so when the agent runs another Python than the baseline.
async fn check_same_python(agent: &Agent, python: &Path, out: &mut Outcome) {
    // Both as real paths: the agent keeps the path its python3 gives.
    let real = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let theirs = agent_interpreter(agent, "python").await;
    let ours = real(python);
    if theirs.as_deref().map(|p| real(Path::new(p))) != Some(ours.clone()) {
        out.note(format!(
            "the agent runs python {:?}, the baseline {}: figures are not like for like",
            theirs,
            ours.display()
        ));
    }
}

pub async fn trivial(ctx: &Ctx) -> Result<Outcome> {
    let mut out = Outcome::default();
    // What one job's supervision costs the machine, apart from the agent.
    let (bin, runs, count) = (
        ctx.agent.bin.clone(),
        ctx.data_dir("s3-zygote"),
        ctx.pick(2000, 200),
    );
    let supervision =
        match tokio::task::spawn_blocking(move || supervisor_path(&bin, &runs, count)).await? {
            Ok((note, cost)) => {
                out.note(note);
                Some(cost)
            }
            Err(e) => {
                out.note(format!("the supervisor path alone was not measured: {e:#}"));
                None
            }
        };
    let named = ctx.pythons.len() > 1;
    // As the agent ships (each job forked from a started interpreter), then
    // with `--warm-python false` (each job starts its interpreter).
    for warm in [true, false] {
        for (i, python) in ctx.pythons.iter().enumerate() {
            trivial_with(ctx, python, named.then_some(i), warm, supervision, &mut out).await?;
        }
    }
    Ok(out)
}

/// Scenario 3 with one interpreter; `named` (its index) when there are
/// several, so its rows and notes say which; `warm`: as the agent ships
/// (`--warm-python`), else with `--warm-python false`. `supervision`: what
/// one job's supervision costs the machine (ms of CPU), measured alone before.
async fn trivial_with(
    ctx: &Ctx,
    python: &Python,
    named: Option<usize>,
    warm: bool,
    supervision: Option<f64>,
    out: &mut Outcome,
) -> Result<()> {
    let n = ctx.pick(2000, 200);
    let rounds = ctx.pick(4, 2);
    // Each side at each concurrency stops at this bound (a busy machine, a
    // slow interpreter; a share of it per round); the rate is then over the
    // jobs done by then.
    let limit = Duration::from_secs(ctx.pick(100, 30));
    let mut which = match named {
        Some(_) => format!(", {}", python.path.display()),
        None => String::new(),
    };
    if !warm {
        which.push_str(", --warm-python false");
    }
    for c in [2usize, 4] {
        let token = random_hex(16);
        let mut flags = vec!["--background-concurrency".to_string(), c.to_string()];
        if !warm {
            flags.extend(["--warm-python".into(), "false".into()]);
        }
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let agent = Agent::start(
            &python.agent,
            &ctx.data_dir(&format!("s3-c{c}-{}-{warm}", named.unwrap_or(0))),
            &token,
            &flags,
        )
        .await?;
        if c == 2 {
            check_same_python(&agent, &python.path, out).await;
        }
        let db = report::open_db_read(&agent.db_path())?;
        let pid = agent.pid();
        // In rounds, the two sides taking turns (direct first, then the
        // agent first, …): the machine's speed drifts by more than the gap
        // measured, so each side gets as much of each part of the run.
        let batch = n / rounds;
        let (mut direct, mut direct_done, mut direct_cpu, mut direct_machine) =
            (Duration::ZERO, 0, 0.0, 0.0);
        let (mut wall, mut done, mut submitted, mut agent_cpu, mut machine) =
            (Duration::ZERO, 0, Duration::ZERO, 0.0, 0.0);
        // Over the agent's turns: its writer, and this process (the load).
        let (mut writer, mut harness_cpu) = (Some(WriterTotals::default()), 0.0);
        for round in 0..rounds {
            for agent_turn in [round % 2 == 1, round % 2 == 0] {
                if !agent_turn {
                    // The agent is alive but idle; this process's children
                    // CPU time counts only the interpreters reaped here.
                    let python = python.path.clone();
                    let machine0 = agent::machine_cpu_seconds();
                    let (spawned, took, cpu) = tokio::task::spawn_blocking(move || {
                        direct_spawns(&python, batch, c, limit / rounds as u32)
                    })
                    .await??;
                    direct_machine += agent::machine_cpu_seconds() - machine0;
                    (direct, direct_done, direct_cpu) =
                        (direct + took, direct_done + spawned, direct_cpu + cpu);
                    continue;
                }
                let writer0 = agent.api.writer_totals().await.ok();
                let harness0 = agent::cpu_seconds(std::process::id()).unwrap_or_default().0;
                let cpu0 = agent::cpu_seconds(pid).unwrap_or_default().0;
                let machine0 = agent::machine_cpu_seconds();
                let start = Instant::now();
                let body = json!({"code": "print(1)", "language": "python"});
                submit_many(&agent.api, "/execute/background", body, batch, 8).await?;
                let sent = start.elapsed();
                let (end, ended) = wait_terminal_bounded(
                    &db,
                    done + batch,
                    Some(c),
                    Duration::from_millis(10),
                    (limit / rounds as u32).saturating_sub(sent),
                )
                .await?;
                agent_cpu += agent::cpu_seconds(pid).unwrap_or_default().0 - cpu0;
                machine += agent::machine_cpu_seconds() - machine0;
                harness_cpu +=
                    agent::cpu_seconds(std::process::id()).unwrap_or_default().0 - harness0;
                writer = match (writer, writer0, agent.api.writer_totals().await.ok()) {
                    (Some(sum), Some(before), Some(after)) => Some(sum + (after - before)),
                    _ => None,
                };
                (wall, done, submitted) = (wall + (end - start), ended, submitted + sent);
            }
        }
        let direct_rate = direct_done as f64 / direct.as_secs_f64();
        if direct_done < n {
            out.note(format!(
                "C={c}{which}: direct spawns stopped at the {} s bound after {direct_done} of {n}",
                limit.as_secs()
            ));
        }
        if done < n {
            out.note(format!(
                "C={c}{which}: the agent run stopped at the {} s bound after {done} of {n} jobs",
                limit.as_secs()
            ));
        }
        agent.stop().await?;
        let ok: i64 = db.query_row(
            "SELECT count(*) FROM executions WHERE status = 'completed' AND stdout_bytes = 2",
            [],
            |r| r.get(0),
        )?;
        if ok as usize != done {
            out.note(format!(
                "C={c}{which}: only {ok} of {done} ended jobs completed with their 2 bytes of output"
            ));
        }
        let rate = done as f64 / wall.as_secs_f64();
        let ratio = rate / direct_rate;
        out.note(format!(
            "C={c}{which}, in {rounds} rounds each: agent {done} jobs in {:.2} s (submitted in {:.2} s), agent CPU {:.2} ms/job, machine CPU {:.2} ms/job (everything: agent, supervisors, interpreters, this harness); \
             direct {direct_done} in {:.2} s, interpreters {:.2} ms/spawn, machine CPU {:.2} ms/spawn",
            wall.as_secs_f64(),
            submitted.as_secs_f64(),
            agent_cpu * 1e3 / done.max(1) as f64,
            machine * 1e3 / done.max(1) as f64,
            direct.as_secs_f64(),
            direct_cpu * 1e3 / direct_done.max(1) as f64,
            direct_machine * 1e3 / direct_done.max(1) as f64,
        ));
        out.note(format!("C={c}{which}: {}", timeline(&db, c, wall)?));
        // Forked jobs skip the interpreter's start-up that the budget
        // sets the agent's overhead against.
        if !warm {
            out.note(format!(
                "C={c}{which}: {}",
                Budget {
                    cores: std::thread::available_parallelism().map_or(1, |n| n.get()) as f64,
                    direct: (direct, direct_done, direct_machine),
                    agent: (wall, done, machine),
                    agent_cpu,
                    supervision,
                }
            ));
        }
        let per_job = |x: f64| x / done.max(1) as f64;
        out.note(match writer {
            Some(w) => format!(
                "C={c}{which}, per job over the agent's turns: the writer's group commits {:.2} ({:.2} writes), syncs of the WAL {:.2}; this harness's own CPU {:.2} ms (its HTTP client and its database poll)",
                per_job(w.commits),
                per_job(w.writes),
                per_job(w.syncs),
                per_job(harness_cpu) * 1e3,
            ),
            None => format!(
                "C={c}{which}: this harness's own CPU {:.2} ms/job over the agent's turns (no writer metrics)",
                per_job(harness_cpu) * 1e3
            ),
        });
        out.rows.push(Row::new(
            "3",
            &format!(
                "{} × python print(1), concurrency {c}{which}",
                thousands(n as f64)
            ),
            format!("{rate:.0} jobs/s ({ratio:.2}× direct)"),
            "≥ 0.95× direct",
            format!("direct spawn {direct_rate:.0}/s"),
            Some(ratio >= 0.95 && ok as usize == done),
        ));
    }
    Ok(())
}

/// Where the machine's time per job went in the agent's turns beyond the
/// direct loop's, against what 0.95× allows: core time per job is the
/// cores × the wall / the jobs, so it counts idle cores too.
struct Budget {
    cores: f64,
    /// Each side's wall, jobs done and machine CPU seconds.
    direct: (Duration, usize, f64),
    agent: (Duration, usize, f64),
    /// The agent process's CPU seconds.
    agent_cpu: f64,
    /// One job's supervision, ms of CPU (measured alone).
    supervision: Option<f64>,
}

impl std::fmt::Display for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Milliseconds per job: of core time, and of the machine's CPU.
        let per_job = |(wall, jobs, cpu): (Duration, usize, f64)| {
            let jobs = jobs.max(1) as f64;
            (
                self.cores * wall.as_secs_f64() * 1e3 / jobs,
                cpu * 1e3 / jobs,
            )
        };
        let (direct, direct_cpu) = per_job(self.direct);
        let (agent, agent_machine) = per_job(self.agent);
        let own = self.agent_cpu * 1e3 / self.agent.1.max(1) as f64;
        let cpu = agent_machine - direct_cpu;
        let idle = (agent - agent_machine) - (direct - direct_cpu);
        write!(
            f,
            "0.95× allows {:.2} ms of core time per job beyond the direct loop's {direct:.2} ms \
             ({:.0} cores × wall / jobs); the agent's turns took {:.2} ms more: the agent's own CPU {own:.2}",
            direct / 0.95 - direct,
            self.cores,
            agent - direct,
        )?;
        match self.supervision {
            Some(s) => write!(
                f,
                ", the supervision {s:.2} (measured alone, above), the rest of the machine's CPU {:.2} \
                 (interpreters, zygote, this harness, the kernel's threads), idle cores {idle:.2}; \
                 the supervision alone caps the ratio at {:.3}× with this interpreter",
                cpu - own - s,
                direct / (direct + s),
            ),
            None => write!(
                f,
                ", the rest of the machine's CPU {:.2}, idle cores {idle:.2}",
                cpu - own
            ),
        }
    }
}

/// Where a job's time went, from the rows: medians of each step, and how
/// busy the lane's `c` slots were (claimed → completed, summed, over c × wall).
fn timeline(db: &rusqlite::Connection, c: usize, wall: Duration) -> Result<String> {
    let spawned_col = report::has_column(db, "executions", "spawned_at");
    let sql = format!(
        "SELECT created_at, started_at, {}, completed_at FROM executions WHERE completed_at IS NOT NULL",
        if spawned_col { "spawned_at" } else { "started_at" }
    );
    let mut stmt = db.prepare(&sql)?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, Option<String>>(1)?,
            r.get::<_, Option<String>>(2)?,
            r.get::<_, String>(3)?,
        ))
    })?;
    let (mut spawn, mut run, mut busy) = (Vec::new(), Vec::new(), 0.0);
    for row in rows {
        let (_, started, spawned, completed) = row?;
        let (Some(started), Some(spawned)) = (started, spawned) else {
            continue;
        };
        let ms = |a: &str, b: &str| report::micros_between(a, b).unwrap_or(0) as f64 / 1000.0;
        spawn.push(ms(&started, &spawned));
        run.push(ms(&spawned, &completed));
        busy += ms(&started, &completed) / 1000.0;
    }
    let slots = busy / (c as f64 * wall.as_secs_f64());
    Ok(format!(
        "median claimed→{} {:.2} ms, then →completed {:.1} ms; lane slots busy {:.0}% of the wall",
        if spawned_col {
            "spawned"
        } else {
            "claimed (no spawned_at)"
        },
        median(spawn),
        median(run),
        slots * 100.0
    ))
}

/// `n` runs of `python -c 'print(1)'` with `parallel` workers, output
/// captured, stopping at `limit`; returns the runs done, the wall time and
/// the interpreters' CPU seconds.
fn direct_spawns(
    python: &Path,
    n: usize,
    parallel: usize,
    limit: Duration,
) -> Result<(usize, Duration, f64)> {
    let args = ["-c", "print(1)"].map(std::ffi::OsStr::new);
    spawn_directly(python, &args, b"1\n", n, parallel, limit)
}

/// `n` runs of `program args`, `parallel` at a time, stdin on /dev/null and
/// output captured (each must print `expect`), stopping at `limit`;
/// returns the runs done, the wall time and the programs' CPU seconds.
pub fn spawn_directly(
    program: &Path,
    args: &[&std::ffi::OsStr],
    expect: &[u8],
    n: usize,
    parallel: usize,
    limit: Duration,
) -> Result<(usize, Duration, f64)> {
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let cpu0 = children_cpu_seconds();
    let start = Instant::now();
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..parallel)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    while start.elapsed() < limit && next.fetch_add(1, Ordering::Relaxed) < n {
                        let output = Command::new(program)
                            .args(args)
                            .stdin(Stdio::null())
                            .output()?;
                        if output.stdout != expect {
                            bail!(
                                "{} printed {:?}",
                                program.display(),
                                String::from_utf8_lossy(&output.stdout)
                            );
                        }
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(())
                })
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().expect("worker panicked"))
    })?;
    Ok((
        done.into_inner(),
        start.elapsed(),
        children_cpu_seconds() - cpu0,
    ))
}

/// The agent's zygote (`execd supervise`) driven directly, as the agent
/// drives it, with `n` jobs of `/bin/true` one after the other (run
/// directory, job line, pid report, `go`, `started`, `end`, the directory
/// removed), against `n` direct spawns of `/bin/true`: the machine's CPU
/// per job of each, and so what a job's supervisor process costs.
/// Returns the note and the supervision's cost (ms of CPU per job).
fn supervisor_path(bin: &Path, runs: &Path, n: usize) -> Result<(String, f64)> {
    use std::io::{BufRead, BufReader, Write};
    std::fs::create_dir_all(runs)?;
    let machine0 = agent::machine_cpu_seconds();
    let start = Instant::now();
    for _ in 0..n {
        let status = Command::new("/bin/true").stdin(Stdio::null()).status()?;
        if !status.success() {
            bail!("/bin/true: {status}");
        }
    }
    let direct = (agent::machine_cpu_seconds() - machine0, start.elapsed());

    let mut zygote = Command::new(bin)
        .arg("supervise")
        .arg(runs)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {} supervise", bin.display()))?;
    let mut to = zygote.stdin.take().context("zygote stdin")?;
    let mut from = BufReader::new(zygote.stdout.take().context("zygote stdout")?);
    // The agent's first line: no interpreter started ahead (a zygote forks
    // no spare before it).
    writeln!(to, "warm\t")?;
    // Its spare supervisor forked, as between an idle agent's jobs.
    std::thread::sleep(Duration::from_millis(100));
    let mut line = String::new();
    let mut expect = |from: &mut BufReader<_>, what: &str| -> Result<()> {
        line.clear();
        from.read_line(&mut line)?;
        if !line.starts_with(what) {
            bail!("the zygote said {line:?}, not {what:?}");
        }
        Ok(())
    };
    let machine0 = agent::machine_cpu_seconds();
    let start = Instant::now();
    for i in 0..n {
        let dir = runs.join(i.to_string());
        std::fs::create_dir(&dir)?;
        let spec = json!({
            "program": "/bin/true", "args": [], "working_dir": dir, "env": {},
            "timeout_ms": 10_000, "kill_grace_ms": 1_000, "max_output_bytes": 1 << 20,
        });
        writeln!(to, "{i} {}\t{spec}", dir.display())?;
        expect(&mut from, &format!("{i} pid "))?;
        writeln!(to, "{i} go")?;
        expect(&mut from, &format!("{i} started"))?;
        expect(&mut from, &format!("{i} end"))?;
        std::fs::remove_dir_all(&dir)?;
    }
    let supervised = (agent::machine_cpu_seconds() - machine0, start.elapsed());
    drop(to);
    let _ = zygote.wait();
    let per_job =
        |(cpu, wall): (f64, Duration)| (cpu * 1e3 / n as f64, wall.as_secs_f64() * 1e3 / n as f64);
    let ((s_cpu, s_wall), (d_cpu, d_wall)) = (per_job(supervised), per_job(direct));
    let cost = s_cpu - d_cpu;
    let note = format!(
        "the supervisor path alone ({n} × /bin/true through the agent's zygote, driven directly, one at a time): \
         machine CPU {s_cpu:.2} ms/job, wall {s_wall:.2} ms/job; /bin/true spawned directly: {d_cpu:.2} ms, {d_wall:.2} ms; \
         so a job's supervision costs {cost:.2} ms of CPU"
    );
    Ok((note, cost))
}

/// CPU seconds of this process's reaped children.
fn children_cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(usage.ru_utime) + t(usage.ru_stime)
}

/// The median wall of `runs` runs of the big-output program with its stdout
/// on a pipe that `drain` empties.
fn piped_runs(
    python: &Path,
    runs: usize,
    drain: impl Fn(std::process::ChildStdout) -> Result<()>,
) -> Result<f64> {
    let mut walls = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let mut child = Command::new(python)
            .args(["-c", BIG_OUTPUT])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()?;
        drain(child.stdout.take().context("stdout")?)?;
        child.wait()?;
        walls.push(t.elapsed().as_secs_f64());
    }
    Ok(median(walls))
}

/// 3,200 writes of 64 KiB: 209,715,200 bytes.
const BIG_OUTPUT: &str =
    "import sys\nb = b'x'*65536\nfor _ in range(3200): sys.stdout.buffer.write(b)";

pub async fn output(ctx: &Ctx) -> Result<Outcome> {
    let mut out = Outcome::default();
    let runs = ctx.pick(3, 1);

    let mut direct = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let status = Command::new(&ctx.python)
            .args(["-c", BIG_OUTPUT])
            .stdin(Stdio::null())
            .stdout(Stdio::from(
                std::fs::OpenOptions::new().write(true).open("/dev/null")?,
            ))
            .status()?;
        if !status.success() {
            bail!("the program failed on its own: {status}");
        }
        direct.push(t.elapsed().as_secs_f64());
    }
    let direct = median(direct);
    // Context: the same program into a plain pipe reader (64 KiB reads,
    // discarded), the least any capturing agent pays for the pipe.
    let piped = piped_runs(&ctx.python, runs, |mut stdout| {
        let mut buf = vec![0u8; 64 << 10];
        while std::io::Read::read(&mut stdout, &mut buf)? > 0 {}
        Ok(())
    })?;
    // The floor for any agent that captures stdout through a pipe: a 1 MiB
    // pipe drained by `splice` into /dev/null (no copy to user space).
    let spliced = piped_runs(&ctx.python, runs, |stdout| {
        let null = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
        // SAFETY: plain syscalls on fds this closure owns.
        unsafe {
            libc::fcntl(stdout.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20);
            while libc::splice(
                stdout.as_raw_fd(),
                std::ptr::null_mut(),
                null.as_raw_fd(),
                std::ptr::null_mut(),
                1 << 20,
                0,
            ) > 0
            {}
        }
        Ok(())
    })?;

    let token = random_hex(16);
    let agent = Agent::start(&ctx.agent_same_python, &ctx.data_dir("s4"), &token, &[]).await?;
    check_same_python(&agent, &ctx.python, &mut out).await;
    let cap = agent.get("/info").await?["limits"]["max_output_bytes"]
        .as_u64()
        .context("limits.max_output_bytes")?;
    let db = report::open_db_read(&agent.db_path())?;
    let spawned_col = report::has_column(&db, "executions", "spawned_at");

    // Memory of the agent and of every process under it, sampled while the
    // jobs run (a job's processes are gone by the time it is terminal).
    let sampler = Sampler::start(agent.pid());
    let cpu0 = agent::cpu_seconds(agent.pid()).unwrap_or_default().0;
    let mut walls = Vec::new();
    let mut last_id = String::new();
    let mut stored_ok = true;
    for _ in 0..runs {
        let t = Instant::now();
        let v = agent
            .post(
                "/execute/background",
                &json!({"code": BIG_OUTPUT, "language": "python", "timeout": 120}),
            )
            .await?;
        let id = v["execution_id"]
            .as_str()
            .context("execution_id")?
            .to_string();
        let deadline = t + Duration::from_secs(120);
        // Poll the status alone (cheap); read the stored output once it ended.
        if !report::wait_one_terminal(&db, &id, deadline, Duration::from_millis(2)).await? {
            bail!("the 200 MB job did not end within 120 s");
        }
        let wall = t.elapsed().as_secs_f64();
        let (status, bytes, truncated, chunk_bytes, created, spawned, completed) = db.query_row(
            &format!(
                "SELECT status, stdout_bytes, stdout_truncated, \
                   (SELECT coalesce(sum(length(data)), 0) FROM output_chunks WHERE execution_id = e.id AND stream = 'stdout'), \
                   created_at, {}, completed_at FROM executions e WHERE id = ?1",
                if spawned_col { "spawned_at" } else { "started_at" }
            ),
            [&id],
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, bool>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, Option<String>>(5)?,
                    r.get::<_, Option<String>>(6)?,
                ))
            },
        )?;
        walls.push(wall);
        let us = |a: &str, b: &Option<String>| {
            b.as_deref()
                .and_then(|b| report::micros_between(a, b))
                .map_or(f64::NAN, |u| u as f64 / 1000.0)
        };
        let spawned_at = spawned.clone().unwrap_or_default();
        out.note(format!(
            "run: wall {:.0} ms = created→{} {:.1} ms + program in agent {:.0} ms + end seen {:.1} ms later; \
             status {status}, {bytes} B counted, {chunk_bytes} B in chunks, truncated {truncated}",
            wall * 1e3,
            if spawned_col { "spawned" } else { "started" },
            us(&created, &spawned),
            us(&spawned_at, &completed),
            wall * 1e3 - us(&created, &completed),
        ));
        stored_ok &=
            status == "completed" && bytes as u64 == cap && chunk_bytes as u64 == cap && truncated;
        last_id = id;
    }
    // Peak memory of the runs, read before the check below (which makes the
    // agent build a 10 MiB response and would count it).
    let (agent_peak, children) = sampler.stop();
    let agent_cpu = agent::cpu_seconds(agent.pid()).unwrap_or_default().0 - cpu0;
    out.note(format!(
        "agent CPU {:.0} ms per 200 MB job; the program into a plain 64 KiB pipe reader: {:.0} ms \
         ({:.1}× /dev/null); into a 1 MiB pipe drained by splice into /dev/null, the floor of any \
         pipe capture: {:.0} ms ({:.1}× /dev/null)",
        agent_cpu * 1e3 / runs as f64,
        piped * 1e3,
        piped / direct,
        spliced * 1e3,
        spliced / direct,
    ));
    let agent_hwm = agent::status_kib(agent.pid(), "VmHWM")
        .unwrap_or(0)
        .max(agent_peak);
    // The API's view of the last run agrees with the table.
    let process = agent.get(&format!("/execute/processes/{last_id}")).await?;
    let api_ok = process["stdout_truncated"] == true
        && process["stdout"].as_str().map(str::len) == Some(cap as usize);
    stored_ok &= api_ok;
    let after_get = agent::status_kib(agent.pid(), "VmHWM").unwrap_or(0);
    // And four at once, as clients reading the same output would.
    let path = format!("/execute/processes/{last_id}");
    let four = tokio::join!(
        agent.get(&path),
        agent.get(&path),
        agent.get(&path),
        agent.get(&path)
    );
    for got in [four.0, four.1, four.2, four.3] {
        stored_ok &= got?["stdout"].as_str().map(str::len) == Some(cap as usize);
    }
    let after_four = agent::status_kib(agent.pid(), "VmHWM").unwrap_or(0);
    out.note(format!(
        "agent VmHWM {:.1} MB after the runs; {:.1} MB after one GET of the 10 MiB process, \
         {:.1} MB after four more at once",
        agent_hwm as f64 * 1024.0 / 1e6,
        after_get as f64 * 1024.0 / 1e6,
        after_four as f64 * 1024.0 / 1e6
    ));
    agent.stop().await?;

    let wall = median(walls);
    let ratio = wall / direct;
    let mb = |kib: u64| kib as f64 * 1024.0 / 1e6;
    // Per command name: the job's program and any helper the agent runs
    // per job (a supervisor process, if it has one).
    let under = if children.is_empty() {
        "none sampled".to_string()
    } else {
        children
            .iter()
            .map(|(comm, kib)| format!("{comm} {:.1} MB", mb(*kib)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    out.note(format!(
        "processes under the agent (peak VmHWM seen): {under}"
    ));
    if !api_ok {
        out.note("GET /execute/processes/{id} did not show the capped stdout with stdout_truncated: true");
    }
    out.rows.push(Row::new(
        "4",
        "one job writing 200 MB to stdout",
        format!("wall {:.0} ms ({ratio:.2}× direct)", wall * 1e3),
        "≤ 1.3× direct",
        format!("direct to /dev/null {:.0} ms", direct * 1e3),
        Some(ratio <= 1.3),
    ));
    out.rows.push(Row::new(
        "4",
        "  ↳ agent peak RSS (VmHWM)",
        format!("{:.1} MB (under it: {under})", mb(agent_hwm)),
        "< 100 MB",
        "–".into(),
        Some(mb(agent_hwm) < 100.0),
    ));
    out.rows.push(Row::new(
        "4",
        "  ↳ output stored up to the cap",
        format!(
            "{} B stored, truncated flagged: {}",
            thousands(cap as f64),
            if stored_ok { "yes" } else { "NO" }
        ),
        "= cap, flagged",
        "–".into(),
        Some(stored_ok),
    ));
    Ok(out)
}

/// Peak VmRSS of the root; peak VmHWM per command name below it.
type Peaks = (u64, Vec<(String, u64)>);

/// Samples memory of a process tree every 10 ms on its own thread.
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
    seen: Arc<Mutex<Peaks>>,
}

impl Sampler {
    fn start(pid: u32) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let seen: Arc<Mutex<Peaks>> = Arc::default();
        let thread = {
            let (stop, seen) = (stop.clone(), seen.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let rss = agent::status_kib(pid, "VmRSS").unwrap_or(0);
                    let kids: Vec<_> = agent::descendants(pid)
                        .into_iter()
                        .filter_map(|(p, comm)| Some((comm, agent::status_kib(p, "VmHWM")?)))
                        .collect();
                    let mut seen = seen.lock().unwrap();
                    seen.0 = seen.0.max(rss);
                    for (comm, kib) in kids {
                        match seen.1.iter_mut().find(|(c, _)| *c == comm) {
                            Some(entry) => entry.1 = entry.1.max(kib),
                            None => seen.1.push((comm, kib)),
                        }
                    }
                    drop(seen);
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
        };
        Sampler { stop, thread, seen }
    }

    fn stop(self) -> Peaks {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        let seen = self.seen.lock().unwrap();
        (seen.0, seen.1.clone())
    }
}
