//! Restart safety with the real binary: jobs outlive the agent, are followed
//! again after a restart, and nothing is left running forever — or at all.

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

use crate::crash::{free_port, Agent};
use crate::helpers::{
    alive, eventually, hold_write_lock, poll_until, processes_under, sqlite3, TOKEN,
};
use crate::receiver::{Reply, TestReceiver};

/// Polls the agent until the execution satisfies `done` (bounded).
async fn wait_until(
    agent: &Agent,
    id: &str,
    within: Duration,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let path = format!("/execute/processes/{id}");
    poll_until(within, || agent.get(&path), done).await
}

/// Submits background `body` and waits until its stdout is `printed`: the
/// submission's answer, and the process as it was then.
async fn running_and_printed(agent: &Agent, body: Value, printed: &str) -> (Value, Value) {
    running_until(agent, body, |stdout| stdout == printed).await
}

/// Submits background `body` and waits until its stdout begins with
/// `first` (it prints on): the submission's answer, and the process then.
async fn running_and_begun(agent: &Agent, body: Value, first: &str) -> (Value, Value) {
    running_until(agent, body, |stdout| stdout.starts_with(first)).await
}

async fn running_until(
    agent: &Agent,
    body: Value,
    printed: impl Fn(&str) -> bool,
) -> (Value, Value) {
    let out = agent.post("/execute/background", body).await;
    let id = out["process_id"].as_str().unwrap().to_string();
    let p = wait_until(agent, &id, Duration::from_secs(10), |p| {
        p["stdout"].as_str().is_some_and(&printed)
    })
    .await;
    (out, p)
}

/// An execution's recorded attempts, `attempt:outcome` a line, read with `sqlite3`.
fn attempts(data: &Path, exec_id: &str) -> String {
    sqlite3(
        &data.join("execd.db"),
        &format!(
            "SELECT attempt || ':' || outcome FROM execution_attempts WHERE execution_id = '{exec_id}' ORDER BY attempt"
        ),
    )
}

fn terminal(p: &Value) -> bool {
    !matches!(p["status"].as_str(), Some("queued" | "running"))
}

/// Waits (20 s at most) for job `id` to end, checks that it completed with
/// `stdout`, stops the agent, and checks that nothing of `data` runs on.
async fn ends_completed(agent: Agent, data: &Path, id: &str, stdout: &str) {
    let p = wait_until(&agent, id, Duration::from_secs(20), terminal).await;
    assert_eq!(p["status"], "completed", "{p}");
    assert_eq!(p["stdout"], stdout, "every line once and in order: {p}");
    assert!(agent.terminate().success());
    assert_nothing_left(data).await;
}

/// After a test: no supervisor or program of its data dir is left.
async fn assert_nothing_left(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !processes_under(dir).is_empty() {
        assert!(
            Instant::now() < deadline,
            "left running: {:?}",
            processes_under(dir)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A 20 s job printing a numbered line every 100 ms; the agent is stopped
/// with `signal` at 5 s and restarted at 8 s.
async fn a_long_job_survives(signal: Signal) {
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let receiver = TestReceiver::start().await;
    let agent = Agent::start(data.path(), port, &[]).await;
    let code = "for i in $(seq 1 200); do echo \"line $i\"; sleep 0.1; done; exit 7";
    let out = agent
        .post(
            "/execute/async",
            json!({ "code": code, "language": "bash", "timeout": 120, "callback_url": receiver.url("/cb") }),
        )
        .await;
    let id = out["execution_id"].as_str().unwrap().to_string();
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before = agent.get(&format!("/execute/processes/{id}")).await;
    let pid = before["pid"].as_i64().unwrap();
    if signal == Signal::SIGKILL {
        agent.kill9();
    } else {
        let stopping = Instant::now();
        assert!(agent.terminate().success());
        assert!(
            stopping.elapsed() < Duration::from_secs(5),
            "SIGTERM exit took {:?}",
            stopping.elapsed()
        );
    }
    assert!(alive(pid), "the job runs on without the agent");
    tokio::time::sleep(Duration::from_secs(8).saturating_sub(started.elapsed())).await;

    let agent = Agent::start(data.path(), port, &[]).await;
    let p = wait_until(&agent, &id, Duration::from_secs(40), terminal).await;
    assert_eq!(p["status"], "failed", "{p}");
    assert_eq!(p["exit_code"], 7);
    let expected: String = (1..=200).map(|i| format!("line {i}\n")).collect();
    assert_eq!(p["stdout"], expected, "every line once and in order");
    let got = receiver.wait_for(1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.received().len(), 1, "the callback arrives once");
    assert_eq!(got[0].json()["stdout"], expected);
    assert_eq!(got[0].json()["exit_code"], 7);
    assert!(agent.terminate().success());
    assert_nothing_left(data.path()).await;
}

#[tokio::test]
async fn a_long_job_survives_sigkill_of_the_agent_with_all_its_output_and_one_callback() {
    a_long_job_survives(Signal::SIGKILL).await;
}

#[tokio::test]
async fn a_long_job_survives_sigterm_of_the_agent_with_all_its_output_and_one_callback() {
    a_long_job_survives(Signal::SIGTERM).await;
}

#[tokio::test]
async fn a_restart_waits_for_a_database_lock_another_process_holds_and_takes_its_job_back() {
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let agent = Agent::start(data.path(), port, &[]).await;
    let code = "echo before; sleep 8; echo after";
    let body = json!({ "code": code, "language": "bash", "timeout": 60 });
    let (out, _) = running_and_printed(&agent, body, "before\n").await;
    let id = out["process_id"].as_str().unwrap().to_string();
    agent.kill9();
    // Longer than the busy timeout (5 s): the restart exited "database is
    // locked".
    let mut lock = hold_write_lock(&data.path().join("execd.db"), 7);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let agent = Agent::start(data.path(), port, &[]).await;
    tokio::task::spawn_blocking(move || lock.wait().unwrap())
        .await
        .unwrap();
    ends_completed(agent, data.path(), &id, "before\nafter\n").await;
}

#[tokio::test]
async fn a_timeout_that_passes_while_the_agent_is_down_is_enforced_on_time() {
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let agent = Agent::start(data.path(), port, &["--kill-grace", "0.5"]).await;
    let (out, p) = running_and_printed(
        &agent,
        json!({ "code": "echo started; sleep 60", "language": "bash", "timeout": 2 }),
        "started\n",
    )
    .await;
    let id = out["process_id"].as_str().unwrap().to_string();
    let pid = p["pid"].as_i64().unwrap();
    agent.kill9();
    // Timeout 2 s plus the grace; the agent is not there to enforce it.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert!(!alive(pid), "killed on time by its supervisor");
    let agent = Agent::start(data.path(), port, &[]).await;
    let p = wait_until(&agent, &id, Duration::from_secs(5), terminal).await;
    assert_eq!(p["status"], "timeout", "{p}");
    assert_eq!(p["stdout"], "started\n");
    assert!(agent.terminate().success());
    assert_nothing_left(data.path()).await;
}

/// The supervisor of the job `id` in `data`.
fn supervisor_of(data: &Path, exec_id: &str) -> (u32, u32) {
    let started: Value = serde_json::from_slice(
        &std::fs::read(data.join("runs").join(exec_id).join("supervisor.json")).unwrap(),
    )
    .unwrap();
    (
        started["supervisor_pid"].as_u64().unwrap() as u32,
        started["program_pid"].as_u64().unwrap() as u32,
    )
}

#[tokio::test]
async fn a_job_whose_supervisor_was_killed_is_failed_within_a_second_of_the_next_start() {
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let receiver = TestReceiver::start().await;
    let agent = Agent::start(data.path(), port, &[]).await;
    let pidfile = data.path().join("grandchild.pid");
    let code = format!("sleep 300 & echo $! > {}; echo up; wait", pidfile.display());
    let out = agent
        .post(
            "/execute/async",
            json!({ "code": code, "language": "bash", "callback_url": receiver.url("/") }),
        )
        .await;
    let id = out["execution_id"].as_str().unwrap().to_string();
    wait_until(&agent, &id, Duration::from_secs(10), |p| {
        p["stdout"] == "up\n"
    })
    .await;
    let grandchild: i64 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    agent.kill9();
    let (supervisor, program) = supervisor_of(data.path(), &id);
    kill(Pid::from_raw(supervisor as i32), Signal::SIGKILL).unwrap();

    let restarted = Instant::now();
    let agent = Agent::start(data.path(), port, &[]).await;
    let p = wait_until(&agent, &id, Duration::from_secs(1), terminal).await;
    assert!(
        restarted.elapsed() < Duration::from_secs(2),
        "{:?}",
        restarted.elapsed()
    );
    assert_eq!(p["status"], "failed");
    assert!(p["error"].as_str().unwrap().contains("lost"), "{p}");
    assert_eq!(
        attempts(data.path(), &id),
        "1:lost\n",
        "failed because lost"
    );
    assert_eq!(p["stdout"], "up\n", "output up to the loss is kept");
    let callback = receiver.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(callback[0].json()["status"], "failed");
    assert!(
        !alive(i64::from(program)) && !alive(grandchild),
        "nothing of the job runs on"
    );
    assert!(agent.terminate().success());
    assert_nothing_left(data.path()).await;
}

/// Output the supervisor wrote while the agent was down is stored even when
/// the supervisor is gone by the restart: the job is lost, its output not.
#[tokio::test]
async fn output_written_while_the_agent_was_down_is_kept_when_the_job_is_lost() {
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let receiver = TestReceiver::start().await;
    let agent = Agent::start(data.path(), port, &[]).await;
    let gate = data.path().join("go-on");
    let code = format!(
        "echo up; while [ ! -e {} ]; do sleep 0.05; done; echo while-down; echo err >&2; sleep 300",
        gate.display()
    );
    let out = agent
        .post(
            "/execute/async",
            json!({ "code": code, "language": "bash", "callback_url": receiver.url("/") }),
        )
        .await;
    let id = out["execution_id"].as_str().unwrap().to_string();
    wait_until(&agent, &id, Duration::from_secs(10), |p| {
        p["stdout"] == "up\n"
    })
    .await;
    agent.kill9();
    // The program prints on with no agent; its supervisor copies it.
    std::fs::write(&gate, "").unwrap();
    let run = data.path().join("runs").join(&id);
    let printed = crate::helpers::eventually(Duration::from_secs(5), || {
        std::fs::read_to_string(run.join("stderr")).is_ok_and(|e| e == "err\n")
    })
    .await;
    assert!(printed, "the supervisor did not copy the output");
    let (supervisor, _) = supervisor_of(data.path(), &id);
    kill(Pid::from_raw(supervisor as i32), Signal::SIGKILL).unwrap();

    let agent = Agent::start(data.path(), port, &[]).await;
    let p = wait_until(&agent, &id, Duration::from_secs(2), terminal).await;
    assert_eq!(p["status"], "failed");
    assert!(p["error"].as_str().unwrap().contains("lost"), "{p}");
    assert_eq!(p["stdout"], "up\nwhile-down\n", "{p}");
    assert_eq!(p["stderr"], "err\n", "{p}");
    let callback = receiver.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(callback[0].json()["stdout"], "up\nwhile-down\n");
    assert!(agent.terminate().success());
    assert_nothing_left(data.path()).await;
}

/// A job whose claim committed but whose program never started (the agent
/// was killed while it waited at its gate: its run directory holds its code
/// and no `supervisor.json`) is not lost: it is queued again, without an
/// attempt counted, and runs once.
#[tokio::test]
async fn a_job_claimed_but_never_started_runs_after_the_restart() {
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let receiver = TestReceiver::start().await;
    // The async lane paused, so the submission stays queued.
    let agent = Agent::start(data.path(), port, &["--async-concurrency", "0"]).await;
    let out = agent
        .post(
            "/execute/async",
            json!({ "code": "echo ran", "language": "bash", "callback_url": receiver.url("/") }),
        )
        .await;
    let id = out["execution_id"].as_str().unwrap().to_string();
    agent.kill9();
    // As a killed agent leaves a claim whose program never passed its gate.
    sqlite3(
        &data.path().join("execd.db"),
        &format!(
            "UPDATE executions SET status = 'running', owner = 'boot_gone', attempt = 1,
                    started_at = strftime('%Y-%m-%dT%H:%M:%fZ') WHERE id = '{id}'"
        ),
    );
    let run = data.path().join("runs").join(&id);
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(run.join("main.sh"), "echo ran").unwrap();

    let agent = Agent::start(data.path(), port, &[]).await;
    let p = wait_until(&agent, &id, Duration::from_secs(10), terminal).await;
    assert_eq!(p["status"], "completed", "{p}");
    assert_eq!(p["stdout"], "ran\n");
    assert_eq!(attempts(data.path(), &id), "1:completed\n");
    let callback = receiver.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(callback[0].json()["status"], "completed");
    assert!(agent.terminate().success());
    assert_nothing_left(data.path()).await;
}

#[tokio::test]
async fn a_lost_job_with_attempts_left_is_queued_again_and_each_attempt_is_recorded() {
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let agent = Agent::start(data.path(), port, &[]).await;
    let marker = data.path().join("attempts");
    let code = format!(
        "echo x >> {m}; if [ $(wc -l < {m}) -lt 2 ]; then echo first; sleep 300; fi; echo second; sleep 0.5",
        m = marker.display()
    );
    let (out, _) = running_and_printed(
        &agent,
        json!({ "code": code, "language": "bash", "max_attempts": 2 }),
        "first\n",
    )
    .await;
    let id = out["process_id"].as_str().unwrap().to_string();
    let exec_id = out["execution_id"].as_str().unwrap().to_string();
    agent.kill9();
    let (supervisor, _) = supervisor_of(data.path(), &exec_id);
    kill(Pid::from_raw(supervisor as i32), Signal::SIGKILL).unwrap();

    let agent = Agent::start(data.path(), port, &[]).await;
    let p = wait_until(&agent, &id, Duration::from_secs(10), |p| {
        p["stdout"] == "second\n" || terminal(p)
    })
    .await;
    // While the second attempt runs, the first's loss is not its error.
    assert_eq!(
        (&p["status"], &p["error"]),
        (&json!("running"), &Value::Null),
        "{p}"
    );
    let p = wait_until(&agent, &id, Duration::from_secs(10), terminal).await;
    assert_eq!(p["status"], "completed", "{p}");
    assert_eq!(p["attempt"], 2);
    assert_eq!(p["stdout"], "second\n", "the output of the attempt shown");
    assert_eq!(attempts(data.path(), &exec_id), "1:lost\n2:completed\n");
    assert!(agent.terminate().success());
    assert_nothing_left(data.path()).await;
}

#[tokio::test]
async fn kill_works_on_a_job_re_attached_after_a_restart() {
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let agent = Agent::start(data.path(), port, &[]).await;
    let (out, p) = running_and_printed(
        &agent,
        json!({ "code": "echo up; sleep 300", "language": "bash" }),
        "up\n",
    )
    .await;
    let id = out["process_id"].as_str().unwrap().to_string();
    let pid = p["pid"].as_i64().unwrap();
    agent.kill9();
    let agent = Agent::start(data.path(), port, &[]).await;
    let killed = agent.post(&format!("/execute/kill/{id}"), json!({})).await;
    assert_eq!(killed["status"], "killed", "{killed}");
    assert!(!alive(pid));
    assert!(agent.terminate().success());
    assert_nothing_left(data.path()).await;
}

#[tokio::test]
async fn a_pid_not_yet_stored_when_the_agent_died_is_stored_after_the_restart() {
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let agent = Agent::start(data.path(), port, &[]).await;
    // The program says its pid in the workspace; the agent is killed at
    // once, before the job's first tick (50 ms) would have stored it.
    let said = data.path().join("workspace").join("pid");
    let out = agent
        .post(
            "/execute/background",
            json!({ "code": "echo $$ > pid.tmp && mv pid.tmp pid; sleep 300", "language": "bash" }),
        )
        .await;
    let id = out["process_id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    let pid = loop {
        if let Some(pid) = std::fs::read_to_string(&said)
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok())
        {
            break pid;
        }
        assert!(Instant::now() < deadline, "the program did not start");
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    agent.kill9();
    let agent = Agent::start(data.path(), port, &[]).await;
    let p = wait_until(&agent, &id, Duration::from_secs(10), |p| {
        p["pid"].as_i64().is_some()
    })
    .await;
    assert_eq!(p["pid"], pid, "{p}");
    assert_eq!(p["status"], "running", "{p}");
    assert!(p["started_at"].is_string(), "{p}");
    let killed = agent.post(&format!("/execute/kill/{id}"), json!({})).await;
    assert_eq!(killed["status"], "killed", "{killed}");
    assert!(agent.terminate().success());
    assert_nothing_left(data.path()).await;
}

/// The agent's supervisor zygote: its child running `execd supervise`.
fn zygote_of(agent: u32) -> Option<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let parent = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
            String::from_utf8_lossy(&cmdline).contains("supervise") && parent == Some(agent)
        })
}

#[tokio::test]
async fn jobs_outlive_the_supervisor_zygote_and_a_killed_zygote_is_replaced() {
    let data = tempfile::tempdir().unwrap();
    let agent = Agent::start(data.path(), free_port(), &[]).await;
    let (out, _) = running_and_printed(
        &agent,
        json!({ "code": "echo up; sleep 1; echo done", "language": "bash" }),
        "up\n",
    )
    .await;
    let id = out["execution_id"].as_str().unwrap().to_string();
    let zygote = zygote_of(agent.pid()).expect("the agent has a supervisor zygote");
    kill(Pid::from_raw(zygote as i32), Signal::SIGKILL).unwrap();

    let p = wait_until(&agent, &id, Duration::from_secs(10), terminal).await;
    assert_eq!(p["status"], "completed", "{p}");
    assert_eq!(p["stdout"], "up\ndone\n");
    // The next job gets a new zygote.
    let out = agent
        .post(
            "/execute",
            json!({ "code": "echo again", "language": "bash" }),
        )
        .await;
    assert_eq!(out["stdout"], "again\n", "{out}");
    let next = zygote_of(agent.pid()).expect("a new zygote");
    assert_ne!(next, zygote);
    assert!(agent.terminate().success());
    assert_nothing_left(data.path()).await;
}

#[tokio::test]
async fn run_directories_live_in_memory_outlive_a_restart_and_go_with_the_last_job() {
    if !execd::runner::RunsDir::memory_usable() {
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let go = data.path().join("workspace").join("go");
    let agent = Agent::start(data.path(), port, &[]).await;
    let code = format!(
        "echo up; while [ ! -e {} ]; do sleep 0.01; done; echo done",
        go.display()
    );
    let (out, _) =
        running_and_printed(&agent, json!({ "code": code, "language": "bash" }), "up\n").await;
    let id = out["process_id"].as_str().unwrap().to_string();
    let run = out["execution_id"].as_str().unwrap().to_string();
    let link = data.path().join("runs");
    let memory = std::fs::read_link(&link).expect("<data-dir>/runs is a link");
    assert!(memory.starts_with("/dev/shm"), "{}", memory.display());
    assert!(memory.join(&run).join("supervisor.json").is_file());
    // A stop with a job running keeps its run directory for the next start.
    assert!(agent.terminate().success());
    assert!(memory.join(&run).is_dir());
    let agent = Agent::start(data.path(), port, &[]).await;
    assert_eq!(std::fs::read_link(&link).unwrap(), memory);
    std::fs::write(&go, "").unwrap();
    let p = wait_until(&agent, &id, Duration::from_secs(10), terminal).await;
    assert_eq!(p["status"], "completed", "{p}");
    assert_eq!(p["stdout"], "up\ndone\n", "{p}");
    // Once no run is left, a stop takes the memory back.
    assert!(agent.terminate().success());
    assert!(!memory.exists(), "{} left", memory.display());
    assert!(std::fs::symlink_metadata(&link).is_err());
    assert_nothing_left(data.path()).await;
}

#[tokio::test]
async fn a_running_jobs_first_output_never_shows_without_its_pid() {
    let data = tempfile::tempdir().unwrap();
    let agent = Agent::start(data.path(), free_port(), &[]).await;
    // Printing at once races the agent's first look at the output files.
    for _ in 0..12 {
        let (out, p) = running_and_printed(
            &agent,
            json!({ "code": "echo started; sleep 30", "language": "bash" }),
            "started\n",
        )
        .await;
        let id = out["process_id"].as_str().unwrap().to_string();
        assert!(p["pid"].as_i64().is_some_and(|pid| pid > 0), "{p}");
        let killed = agent.post(&format!("/execute/kill/{id}"), json!({})).await;
        assert_eq!(killed["status"], "killed", "{killed}");
    }
    assert!(agent.terminate().success());
    assert_nothing_left(data.path()).await;
}

/// The writer's group commits so far, from `/metrics`.
async fn commits(agent: &Agent) -> u64 {
    agent
        .get_text("/metrics")
        .await
        .lines()
        .find_map(|l| l.strip_prefix("execd_db_write_batch_size_count "))
        .and_then(|n| n.trim().parse().ok())
        .expect("the commit count in /metrics")
}

#[tokio::test]
async fn a_short_job_after_idle_polls_is_two_commits_its_insert_and_its_end() {
    let data = tempfile::tempdir().unwrap();
    // The claim loops' safety ticks (each a look at the queue) run between jobs.
    let agent = Agent::start(data.path(), free_port(), &["--poll-interval", "0.05"]).await;
    for _ in 0..4 {
        // Idle ticks, and the look after the last job freed its slot.
        tokio::time::sleep(Duration::from_millis(250)).await;
        let before = commits(&agent).await;
        // Silent: output could be stored while it runs, in a commit of its own.
        let out = agent
            .post("/execute", json!({ "code": "true", "language": "bash" }))
            .await;
        assert_eq!(out["exit_code"], 0, "{out}");
        tokio::time::sleep(Duration::from_millis(250)).await;
        // The insert claims in its own transaction (the idle loop holds no
        // slot), and a job's end that leaves the lane empty makes no claim
        // of its own.
        assert_eq!(commits(&agent).await - before, 2, "commits for one job");
    }
    assert!(agent.terminate().success());
    assert_nothing_left(data.path()).await;
}

#[tokio::test]
async fn an_idle_agent_writes_nothing_yet_picks_up_work_its_polls_find() {
    let data = tempfile::tempdir().unwrap();
    let receiver = TestReceiver::start().await;
    let agent = Agent::start(
        data.path(),
        free_port(),
        &["--poll-interval", "0.05", "--callback-retry-schedule", "1s"],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = commits(&agent).await;
    // Twenty polls of each lane's claim loop and of the delivery loop.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(commits(&agent).await, before, "an idle agent committed");
    // A callback that fails once is retried by the delivery loop's poll.
    receiver.script(vec![Reply::Status(500)]);
    let out = agent
        .post(
            "/execute/async",
            json!({ "code": "echo hi", "language": "bash", "callback_url": receiver.url("/cb") }),
        )
        .await;
    let got = receiver.wait_for(2, Duration::from_secs(10)).await;
    assert_eq!(got[1].json()["execution_id"], out["execution_id"]);
    assert!(agent.terminate().success());
    assert_nothing_left(data.path()).await;
}

#[tokio::test]
async fn a_start_removes_the_run_directories_no_job_will_use_and_keeps_a_running_ones() {
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    // The async lane paused: its submission stays queued.
    let flags = ["--async-concurrency", "0"];
    let agent = Agent::start(data.path(), port, &flags).await;
    let done = agent
        .post("/execute", json!({ "code": "true", "language": "bash" }))
        .await;
    let queued = agent
        .post(
            "/execute/async",
            json!({ "code": "true", "language": "bash", "callback_url": "http://127.0.0.1:9/cb" }),
        )
        .await;
    let (running, _) = running_and_printed(
        &agent,
        json!({ "code": "echo up; sleep 30", "language": "bash" }),
        "up\n",
    )
    .await;
    agent.kill9();
    // What an agent stopped at the wrong moment leaves: the directory of a
    // job prepared and never started, of one whose end was written first,
    // and of a submission prepared before its insert committed (an
    // execution this database does not know).
    let runs = data.path().join("runs");
    let exec_id = |v: &Value| v["execution_id"].as_str().unwrap().to_string();
    let stray = [
        exec_id(&done),
        exec_id(&queued),
        "exec_01abcdefghjkmnpqrstvwxyz0".to_string(),
    ];
    for id in &stray {
        std::fs::create_dir_all(runs.join(id)).unwrap();
        std::fs::write(runs.join(id).join("main.sh"), "true").unwrap();
    }
    let running_dir = runs.join(exec_id(&running));
    assert!(running_dir.is_dir());

    let agent = Agent::start(data.path(), port, &flags).await;
    for id in &stray {
        assert!(!runs.join(id).exists(), "{id}'s run directory is left");
    }
    // The running job is followed again: its directory stays while it runs.
    let id = running["process_id"].as_str().unwrap();
    let p = agent.get(&format!("/execute/processes/{id}")).await;
    assert_eq!(p["status"], "running", "{p}");
    assert!(running_dir.is_dir());
    let killed = agent.post(&format!("/execute/kill/{id}"), json!({})).await;
    assert_eq!(killed["status"], "killed", "{killed}");
    assert!(agent.terminate().success());
    assert_nothing_left(data.path()).await;
}

/// A `--runs-dir` may be shared with other agents: a directory of an
/// execution this database does not know is left alone there, at start and
/// at a stop.
#[tokio::test]
async fn a_shared_runs_dir_keeps_the_directories_of_executions_this_database_does_not_know() {
    let data = tempfile::tempdir().unwrap();
    let shared = tempfile::tempdir().unwrap();
    let other = shared.path().join("exec_01abcdefghjkmnpqrstvwxyz0");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("main.sh"), "true").unwrap();
    let runs_dir = shared.path().to_str().unwrap();
    let agent = Agent::start(data.path(), free_port(), &["--runs-dir", runs_dir]).await;
    let done = agent
        .post("/execute", json!({ "code": "true", "language": "bash" }))
        .await;
    assert_eq!(done["status"], "completed", "{done}");
    assert!(other.is_dir(), "removed at start");
    assert!(agent.terminate().success());
    assert!(other.is_dir(), "removed at a stop");
}

#[tokio::test]
async fn a_stop_removes_the_run_directory_of_a_job_never_started_and_then_the_runs_link() {
    if !execd::runner::RunsDir::memory_usable() {
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let agent = Agent::start(data.path(), free_port(), &[]).await;
    let done = agent
        .post("/execute", json!({ "code": "true", "language": "bash" }))
        .await;
    // As a job prepared when the stop came leaves it (its claim never
    // committed): only its code.
    let link = data.path().join("runs");
    let memory = std::fs::read_link(&link).expect("runs is a link into memory");
    let stray = memory.join(done["execution_id"].as_str().unwrap());
    std::fs::create_dir(&stray).unwrap();
    std::fs::write(stray.join("main.sh"), "true").unwrap();
    assert!(agent.terminate().success());
    assert!(!memory.exists(), "{} left", memory.display());
    assert!(
        std::fs::symlink_metadata(&link).is_err(),
        "the runs link left"
    );
}

/// A clean stop folds the WAL into the database file: `execd.db` alone,
/// copied once the agent has stopped, holds every execution.
#[tokio::test]
async fn a_clean_stop_leaves_the_database_whole_in_its_file_and_no_wal() {
    let data = tempfile::tempdir().unwrap();
    let agent = Agent::start(data.path(), free_port(), &[]).await;
    let done = agent
        .post(
            "/execute",
            json!({ "code": "echo kept", "language": "bash" }),
        )
        .await;
    assert_eq!(done["status"], "completed");
    assert!(agent.terminate().success());
    // Both gone; should a connection outlive the writer's (the agent then
    // warns), the final checkpoint still leaves the WAL empty.
    let size = |name| std::fs::metadata(data.path().join(name)).map(|m| m.len());
    let (wal, shm) = (size("execd.db-wal"), size("execd.db-shm"));
    assert!(
        (wal.is_err() && shm.is_err()) || matches!(wal, Ok(0)),
        "left after a clean stop: WAL {wal:?}, shm {shm:?}"
    );
    assert_eq!(status_in_the_file_alone(data.path(), &done), "completed");
}

/// The status of `execution` in a copy of `execd.db` alone, as an operator
/// copies it.
fn status_in_the_file_alone(data: &Path, execution: &Value) -> String {
    let copy = tempfile::tempdir().unwrap();
    std::fs::copy(data.join("execd.db"), copy.path().join("execd.db")).unwrap();
    sqlite3(
        &copy.path().join("execd.db"),
        &format!(
            "SELECT status FROM executions WHERE id = '{}'",
            execution["execution_id"].as_str().unwrap()
        ),
    )
    .trim()
    .to_string()
}

/// An operator's read-only connection (Python's sqlite3), open on the
/// database: its process, and its first line (the executions it counts).
fn operator_connection(db: &Path, in_a_transaction: bool) -> (std::process::Child, String) {
    let uri = format!("file:{}?mode=ro", db.display());
    let mut reader = std::process::Command::new("python3")
        .args([
            "-c",
            "import sqlite3, sys\n\
             c = sqlite3.connect(sys.argv[1], uri=True, isolation_level=None)\n\
             if sys.argv[2] == 'txn': c.execute('BEGIN')\n\
             print(c.execute('SELECT count(*) FROM executions').fetchone()[0], flush=True)\n\
             sys.stdin.read()",
            &uri,
            if in_a_transaction { "txn" } else { "idle" },
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(reader.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    (reader, line.trim().to_string())
}

/// An operator's connection open across the stop: the agent's writer is
/// then not the last to close, so SQLite does not fold the WAL in on its
/// own; the final checkpoint does, and the WAL is left empty. A read
/// transaction left open does not hold the stop up (a checkpoint that
/// waited for it would take the busy timeout, 5 s).
#[tokio::test]
async fn a_stop_while_an_operator_has_the_database_open_still_leaves_it_whole_in_its_file() {
    for in_a_transaction in [false, true] {
        let data = tempfile::tempdir().unwrap();
        let agent = Agent::start(data.path(), free_port(), &[]).await;
        let done = agent
            .post(
                "/execute",
                json!({ "code": "echo kept", "language": "bash" }),
            )
            .await;
        assert_eq!(done["status"], "completed");
        let db = data.path().join("execd.db");
        let (mut reader, counted) = operator_connection(&db, in_a_transaction);
        assert_eq!(counted, "1", "the operator's connection reads");
        let stopping = Instant::now();
        assert!(agent.terminate().success());
        let took = stopping.elapsed();
        assert!(took < Duration::from_secs(3), "the stop took {took:?}");
        if !in_a_transaction {
            let wal = std::fs::metadata(data.path().join("execd.db-wal")).map(|m| m.len());
            assert!(matches!(wal, Ok(0) | Err(_)), "WAL {wal:?} bytes");
            assert_eq!(status_in_the_file_alone(data.path(), &done), "completed");
        }
        drop(reader.stdin.take());
        reader.wait().unwrap();
    }
}

/// A lost job keeps every byte it wrote, the start of a character it never
/// finished too: while a program runs, such bytes wait for the rest of
/// their character, but a lost program writes no more (they were dropped,
/// both when the agent saw the loss and when its restart found it).
#[tokio::test]
async fn a_lost_job_keeps_the_start_of_a_character_it_never_finished() {
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let agent = Agent::start(data.path(), port, &[]).await;
    let code = "import sys, time\n\
                sys.stdout.buffer.write(b'ab\\xe2\\x82'); sys.stdout.flush()\n\
                time.sleep(300)";
    let mut ids = Vec::new();
    for _ in 0..2 {
        let out = agent
            .post(
                "/execute/background",
                json!({ "code": code, "language": "python" }),
            )
            .await;
        let id = out["execution_id"].as_str().unwrap().to_string();
        wait_until(&agent, &id, Duration::from_secs(10), |p| {
            p["stdout"] == "ab"
        })
        .await;
        ids.push(id);
    }
    // Lost while the agent runs.
    let (supervisor, _) = supervisor_of(data.path(), &ids[0]);
    kill(Pid::from_raw(supervisor as i32), Signal::SIGKILL).unwrap();
    assert_lost_with_all_it_wrote(&agent, &ids[0]).await;
    // Lost while the agent is down: its restart finds it.
    agent.kill9();
    let (supervisor, _) = supervisor_of(data.path(), &ids[1]);
    kill(Pid::from_raw(supervisor as i32), Signal::SIGKILL).unwrap();
    let agent = Agent::start(data.path(), port, &[]).await;
    assert_lost_with_all_it_wrote(&agent, &ids[1]).await;
    let db = data.path().join("execd.db");
    assert_eq!(
        sqlite3(&db, "SELECT stdout_bytes FROM executions ORDER BY seq"),
        "4\n4\n"
    );
    assert!(agent.terminate().success());
    assert_nothing_left(data.path()).await;
}

async fn assert_lost_with_all_it_wrote(agent: &Agent, id: &str) {
    let p = wait_until(agent, id, Duration::from_secs(5), terminal).await;
    assert_eq!(p["status"], "failed", "{p}");
    assert!(p["error"].as_str().unwrap().contains("lost"), "{p}");
    assert_eq!(p["stdout"], "ab\u{fffd}", "{p}");
}

/// A WebSocket run (`/execute/stream`) cut off by a stop of the agent ends
/// with a `SHUTTING_DOWN` error frame that names the execution, as a sync
/// request waiting then is answered; the run goes on and is found after the
/// restart. The client used to get a bare close, or `INTERNAL_ERROR` from a
/// read on the closing database, and no id. A ping before the execute frame
/// is answered, not taken for the end (it closed the socket).
#[tokio::test]
async fn a_stream_cut_off_by_a_stop_names_its_run_which_goes_on() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let agent = Agent::start(data.path(), port, &[]).await;
    let mut socket = crate::helpers::open_stream(&agent.url, TOKEN).await;
    socket
        .send(Message::Ping(b"hi".to_vec().into()))
        .await
        .unwrap();
    let code = "for i in $(seq 1 20); do echo line-$i; sleep 0.1; done";
    let frame = json!({ "type": "execute", "code": code, "language": "bash" });
    socket
        .send(Message::Text(frame.to_string().into()))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut frames: Vec<Value> = Vec::new();
    let mut stopped = None;
    let mut running = Some(agent);
    while let Ok(Some(Ok(message))) = tokio::time::timeout_at(deadline, socket.next()).await {
        match message {
            Message::Text(text) => frames.push(serde_json::from_str(&text).unwrap()),
            Message::Close(_) => break,
            _ => continue,
        }
        if frames.last().unwrap()["type"] == "stdout" {
            if let Some(agent) = running.take() {
                stopped = Some(agent.terminate());
            }
        }
    }
    assert!(stopped.expect("a stdout frame before the stop").success());
    let last = frames.last().unwrap();
    assert_eq!(last["type"], "error", "{frames:?}");
    assert_eq!(last["code"], "SHUTTING_DOWN", "{last}");
    let id = last["execution_id"].as_str().unwrap().to_string();
    assert!(last["process_id"].as_str().unwrap().starts_with("proc_"));

    let agent = Agent::start(data.path(), port, &[]).await;
    let lines: String = (1..=20).map(|i| format!("line-{i}\n")).collect();
    ends_completed(agent, data.path(), &id, &lines).await;
}

/// A callback POST in flight when the agent is stopped may end and is
/// recorded: a receiver that answers within the stop's grace gets it once.
/// The stop used to drop it unrecorded, and the restart POSTed it again.
#[tokio::test]
async fn a_callback_in_flight_at_a_stop_is_finished_and_not_sent_again() {
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let receiver = TestReceiver::start().await;
    receiver.default_reply(Reply::Hang(Duration::from_millis(800)));
    let agent = Agent::start(data.path(), port, &[]).await;
    let out = agent
        .post(
            "/execute/async",
            json!({ "code": "echo done", "language": "bash", "callback_url": receiver.url("/") }),
        )
        .await;
    let id = out["execution_id"].as_str().unwrap().to_string();
    receiver.wait_for(1, Duration::from_secs(10)).await;
    let stopping = Instant::now();
    // Waited for off the runtime, which serves the receiver meanwhile.
    let stopped = tokio::task::spawn_blocking(move || agent.terminate());
    assert!(stopped.await.unwrap().success());
    let took = stopping.elapsed();
    assert!(took < Duration::from_secs(5), "the stop took {took:?}");
    let agent = Agent::start(data.path(), port, &[]).await;
    let path = format!("/execute/processes/{id}/callback");
    let info = poll_until(
        Duration::from_secs(5),
        || agent.get(&path),
        |info| info["callback"]["status"] == "delivered",
    )
    .await;
    assert_eq!(info["attempts"].as_array().unwrap().len(), 1, "{info}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        receiver.received().len(),
        1,
        "POSTed again after the restart"
    );
    assert!(agent.terminate().success());
    assert_nothing_left(data.path()).await;
}

/// The agent as a child process with `nofile` descriptors at most.
async fn agent_with_few_descriptors(data: &Path, port: u16, nofile: u64, extra: &[&str]) -> Agent {
    agent_with_open_files(data, port, (nofile, nofile), extra).await
}

/// The agent as a child process with open-file limits `(soft, hard)`.
async fn agent_with_open_files(
    data: &Path,
    port: u16,
    (soft, hard): (u64, u64),
    extra: &[&str],
) -> Agent {
    Agent::start_with(data, port, extra, move |command| {
        use std::os::unix::process::CommandExt;
        let limit = nix::libc::rlimit {
            rlim_cur: soft,
            rlim_max: hard,
        };
        // SAFETY: setrlimit is async-signal-safe and reads only `limit`.
        unsafe {
            command.pre_exec(move || {
                if nix::libc::setrlimit(nix::libc::RLIMIT_NOFILE, &limit) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    })
    .await
}

#[tokio::test]
async fn a_running_job_is_not_taken_for_lost_while_the_agent_is_out_of_descriptors() {
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    // Connections past the descriptors (the default keeps them below).
    let agent =
        agent_with_few_descriptors(data.path(), port, 128, &["--max-connections", "1000"]).await;
    let code = "for i in $(seq 1 40); do echo \"line $i\"; sleep 0.1; done";
    let body = json!({ "code": code, "language": "bash", "timeout": 60 });
    let (out, _) = running_and_begun(&agent, body, "line 1\n").await;
    let id = out["process_id"].as_str().unwrap().to_string();
    // Idle connections until the agent has no descriptor left, held for
    // a second and a half of the job's four.
    let flood: Vec<std::net::TcpStream> = (0..200)
        .filter_map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).ok())
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    drop(flood);
    let expected: String = (1..=40).map(|i| format!("line {i}\n")).collect();
    ends_completed(agent, data.path(), &id, &expected).await;
}

#[tokio::test]
async fn a_sync_run_still_queued_when_the_agent_died_is_killed_unrun_at_the_restart() {
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let agent = Agent::start(data.path(), port, &["--sync-concurrency", "1"]).await;
    let marker = data.path().join("ran");
    let post = |code: String| {
        let url = format!("{}/execute", agent.url);
        tokio::spawn(async move {
            let body = json!({ "code": code, "language": "bash", "timeout": 30 });
            let client = reqwest::Client::new();
            let _ = client.post(url).bearer_auth(TOKEN).json(&body).send().await;
        })
    };
    let busy = post("sleep 2".into());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let waiting = post(format!("touch {}", marker.display()));
    let db = data.path().join("execd.db");
    let deadline = Instant::now() + Duration::from_secs(10);
    let queued = loop {
        let ids = sqlite3(&db, "SELECT id FROM executions WHERE status = 'queued'");
        if !ids.trim().is_empty() {
            break ids;
        }
        assert!(Instant::now() < deadline, "the second run was not queued");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    agent.kill9();
    let (_, _) = (busy.await, waiting.await);
    // Its caller's connection went with the agent: nobody waits for it.
    let agent = Agent::start(data.path(), port, &["--sync-concurrency", "1"]).await;
    let p = wait_until(&agent, queued.trim(), Duration::from_secs(10), terminal).await;
    assert_eq!(p["status"], "killed", "{p}");
    assert!(p["error"].as_str().unwrap().contains("not started"), "{p}");
    // Long enough for it to have run after the first.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!marker.exists(), "a run nobody waited for ran");
    assert!(agent.terminate().success());
    assert_nothing_left(data.path()).await;
}

#[tokio::test]
async fn a_job_lost_to_a_moved_runs_dir_is_killed_not_left_running_beside_its_retry() {
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let agent = Agent::start(data.path(), port, &[]).await;
    let code = "for i in $(seq 1 300); do echo \"line $i\"; sleep 0.1; done";
    let body = json!({ "code": code, "language": "bash", "timeout": 60, "max_attempts": 2 });
    let (out, first) = running_and_begun(&agent, body, "line 1\n").await;
    let id = out["process_id"].as_str().unwrap().to_string();
    let pid = first["pid"].as_i64().unwrap();
    let supervisor = crate::helpers::supervisor_of_program(pid);
    assert!(agent.terminate().success());
    let before = std::fs::read_link(data.path().join("runs")).unwrap();
    // Restarted with its run directories elsewhere: the first attempt's
    // cannot be followed, and must not run on beside the second.
    let moved = data.path().join("moved-runs");
    let agent = Agent::start(data.path(), port, &["--runs-dir", moved.to_str().unwrap()]).await;
    assert!(
        eventually(Duration::from_secs(3), || !alive(pid)).await,
        "the first attempt runs on"
    );
    let again = wait_until(&agent, &id, Duration::from_secs(10), |p| p["attempt"] == 2).await;
    assert_eq!(again["status"], "running", "{again}");
    agent.post(&format!("/execute/kill/{id}"), json!({})).await;
    wait_until(&agent, &id, Duration::from_secs(10), terminal).await;
    assert!(agent.terminate().success());
    assert_nothing_left(data.path()).await;
    // The first place is no agent's now (in memory, it outlives the test),
    // once the first attempt's supervisor is gone: one still ending would
    // make its run directory again, for its complaint that the first was
    // removed under it.
    eventually(Duration::from_secs(10), || !alive(i64::from(supervisor))).await;
    std::fs::remove_dir_all(before).unwrap();
}

#[tokio::test]
async fn a_job_that_cannot_start_for_want_of_descriptors_runs_once_they_are_back() {
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let agent =
        agent_with_few_descriptors(data.path(), port, 128, &["--max-connections", "1000"]).await;
    // The agent's client keeps its connection from the start-up's polls.
    let flood: Vec<std::net::TcpStream> = (0..200)
        .filter_map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).ok())
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = agent
        .post(
            "/execute/background",
            json!({ "code": "echo ran", "language": "bash", "timeout": 60 }),
        )
        .await;
    let id = out["process_id"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    drop(flood);
    ends_completed(agent, data.path(), &id, "ran\n").await;
}

/// The agent raises its open-file soft limit to the hard one (a common soft
/// 1,024 left room for few connections and running jobs), and its programs
/// keep the limit it was started with.
#[tokio::test]
async fn the_agent_raises_its_open_file_limit_and_programs_keep_the_one_it_was_given() {
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let agent = agent_with_open_files(data.path(), port, (256, 4096), &[]).await;
    let info = agent.get("/info").await;
    assert_eq!(info["limits"]["max_connections"], 3072, "{info}");
    let out = agent
        .post(
            "/execute/background",
            json!({ "code": "ulimit -Sn; ulimit -Hn", "language": "bash" }),
        )
        .await;
    let id = out["process_id"].as_str().unwrap().to_string();
    let p = wait_until(&agent, &id, Duration::from_secs(10), terminal).await;
    assert_eq!(p["stdout"], "256\n4096\n", "{p}");
    assert!(agent.terminate().success());
}
