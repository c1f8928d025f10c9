//! `--warm-python`: Python jobs forked from a warm interpreter behave as
//! jobs started cold, save what the one start-up shares.

use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::{
    alive, eventually, hold_write_lock, parent_of, processes_naming, processes_under,
    processes_with, spawn_app_with, TestApp,
};

async fn agent(warm: bool) -> TestApp {
    spawn_app_with(|c| c.warm_python = warm).await
}

/// What a user sees of a sync run, with the code file's own path (a run
/// directory of its execution) written as `main.py`.
async fn seen(app: &TestApp, body: Value) -> Value {
    let (_, out) = app.post_json("/execute", body).await;
    let strip = |s: &Value| {
        let mut text = s.as_str().unwrap_or_default().to_string();
        while let Some(end) = text.find("/main.py\"") {
            let start = text[..end].rfind('"').map_or(0, |q| q + 1);
            text.replace_range(start..end + "/main.py".len(), "main.py");
        }
        text
    };
    json!({
        "status": out["status"],
        "exit_code": out["exit_code"],
        "stdout": strip(&out["stdout"]),
        "stderr": strip(&out["stderr"]),
    })
}

#[tokio::test]
async fn a_warm_python_job_prints_fails_and_ends_as_a_cold_one() {
    let programs = [
        "print(6*7)",
        "print(type(__builtins__).__name__, sorted(globals()))",
        "import os, sys\nprint(sys.argv[0] == __file__, sys.path[0] == os.path.dirname(__file__), __name__, os.path.basename(__file__))",
        "import os\nprint(os.getcwd() == os.environ['PWD'], os.environ['GREETING'], os.environ['PYTHONPATH'] == os.getcwd(), os.getpgid(0) == os.getpid())",
        "import sys\nprint(sys.stdin.read() == '', sys.stdout.write_through, sys.orig_argv[1:] == sys.argv)",
        "def f():\n    raise KeyError('k')\nf()",
        "print(",
        "import sys\nsys.stdout.write('partial')\nsys.exit(3)",
        "raise SystemExit('bye')",
        "import atexit, threading, time\natexit.register(print, 'atexit')\nthreading.Thread(target=lambda: (time.sleep(0.1), print('thread'))).start()\nprint('main')",
        "class A:\n    def __del__(self):\n        print('collected at the end')\na = A()\nprint('made')",
        "raise KeyboardInterrupt",
        "import sys\nsys.exit(256)",
        "import sys\nsys.exit(-1)",
        "import weakref\nclass A:\n    pass\na = A()\nweakref.finalize(a, print, 'finalized')\nprint('made')",
        // Files written and never closed, by `__main__` and by a module of
        // the job's: the interpreter's exit flushes them; the next job reads.
        "f = open('by-main.txt', 'w')\nf.write('from main')",
        "print(open('by-main.txt').read())",
        "open('by_module.py', 'w').write(\"f = open('by-module.txt', 'w')\\nf.write('from a module')\\n\")\nimport by_module",
        "print(open('by-module.txt').read())",
        "import os, signal\nos.kill(os.getpid(), signal.SIGTERM)",
    ];
    let (cold, warm) = (agent(false).await, agent(true).await);
    for code in programs {
        let body = json!({ "code": code, "language": "python", "env": { "GREETING": "hi" } });
        let (c, w) = (seen(&cold, body.clone()).await, seen(&warm, body).await);
        assert_eq!(w, c, "warm and cold differ for {code:?}");
    }
    // Not a vacuous comparison: the programs ran, and their files hold
    // what was never closed.
    let code = "print(6*7, open('by-main.txt').read(), open('by-module.txt').read())";
    let ran = seen(&warm, json!({ "code": code, "language": "python" })).await;
    assert_eq!(ran["stdout"], "42 from main from a module\n", "{ran}");
    cold.stop().await;
    warm.stop().await;
}

async fn hash_of(app: &TestApp, env: Value) -> String {
    let body = json!({ "code": "print(hash('execd'))", "language": "python", "env": env });
    let (_, out) = app.post_json("/execute", body).await;
    assert_eq!(out["status"], "completed", "{out}");
    out["stdout"].as_str().unwrap().to_string()
}

/// The jobs of one warm interpreter share its hash seed (a cold start draws
/// its own), which shows they were forked from it; a job whose start-up
/// reads a variable the warm one did not see starts cold, with it.
#[tokio::test]
async fn warm_jobs_share_one_start_up_and_a_job_whose_start_up_differs_starts_cold() {
    let cold = agent(false).await;
    let drawn = [
        hash_of(&cold, json!({})).await,
        hash_of(&cold, json!({})).await,
    ];
    assert_ne!(drawn[0], drawn[1], "a cold start draws its own seed");
    let seeded = hash_of(&cold, json!({ "PYTHONHASHSEED": "7" })).await;

    let warm = agent(true).await;
    let first = hash_of(&warm, json!({})).await;
    assert_eq!(hash_of(&warm, json!({ "OTHER": "x" })).await, first);
    assert_eq!(
        hash_of(&warm, json!({ "PYTHONHASHSEED": "7" })).await,
        seeded
    );
    assert_eq!(hash_of(&warm, json!({})).await, first);
    cold.stop().await;
    warm.stop().await;
}

/// A warm job's timeout ends it and what it started, as a cold one's does;
/// the warm interpreter is no part of the job and serves the next.
#[tokio::test]
async fn a_warm_job_times_out_with_its_children_and_the_next_job_is_still_warm() {
    let warm = agent(true).await;
    let before = hash_of(&warm, json!({})).await;
    let code = "import subprocess, time\np = subprocess.Popen(['sleep', '30'])\nprint(p.pid, flush=True)\ntime.sleep(30)";
    let (status, out) = warm
        .post_json(
            "/execute",
            json!({ "code": code, "language": "python", "timeout": 1 }),
        )
        .await;
    assert_eq!(status, 408, "{out}");
    let child: i64 = out["details"]["stdout"]
        .as_str()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("no child pid: {out}"));
    assert!(
        crate::helpers::eventually(Duration::from_secs(5), || !alive(child)).await,
        "the job's child outlived its timeout"
    );
    assert_eq!(hash_of(&warm, json!({})).await, before);
    warm.stop().await;
}

/// One job's `env` values reach no other job: not its `os.environ`, and not
/// the environment its process shows (`/proc/<pid>/environ`, the one the
/// warm interpreter started with).
#[tokio::test]
async fn a_warm_jobs_env_values_show_in_no_other_job() {
    let warm = agent(true).await;
    let first = json!({ "code": "print(1)", "language": "python", "env": { "WARM_SECRET": "first-job-value" } });
    let (_, out) = warm.post_json("/execute", first).await;
    assert_eq!(out["stdout"], "1\n", "{out}");
    let code = "import os\nprint('first-job-value' in open('/proc/self/environ').read(), os.environ.get('WARM_SECRET'), os.environ['EXECD_EXECUTION_ID'] in open('/proc/self/environ').read())";
    let (_, out) = warm
        .post_json("/execute", json!({ "code": code, "language": "python" }))
        .await;
    assert_eq!(out["stdout"], "False None False\n", "{out}");
    warm.stop().await;
}

/// A `sitecustomize` on a job's `PYTHONPATH` (its working directory is on
/// it) runs at a started interpreter's start-up: such a job starts cold, so
/// it runs there too.
#[tokio::test]
async fn a_job_with_a_sitecustomize_on_its_path_starts_cold_and_runs_it() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("sitecustomize.py"), "print('customized')\n").unwrap();
    let warm = agent(true).await;
    let body = json!({ "code": "print('job')", "language": "python",
                       "working_dir": dir.path().to_str().unwrap() });
    let (_, out) = warm.post_json("/execute", body).await;
    assert_eq!(out["stdout"], "customized\njob\n", "{out}");
    warm.stop().await;
}

/// The warm interpreters of `app`'s supervisors (they name its runs dir),
/// each the leader of its process group.
fn interpreters(app: &TestApp) -> Vec<u32> {
    warm_processes(app, true)
}

/// The copies of them forked ahead, waiting for a job in their
/// interpreter's process group.
fn spares(app: &TestApp) -> Vec<u32> {
    warm_processes(app, false)
}

fn warm_processes(app: &TestApp, leaders: bool) -> Vec<u32> {
    let runs = std::fs::read_link(app.data_dir.path().join("runs")).unwrap();
    let supervisors = processes_under(&runs);
    let group = |pid: u32| nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(pid as i32)));
    processes_naming("execd's warm Python")
        .into_iter()
        .filter(|pid| parent_of(i64::from(*pid)).is_some_and(|p| supervisors.contains(&(p as u32))))
        .filter(|&pid| group(pid).is_ok_and(|g| (g.as_raw() as u32 == pid) == leaders))
        .collect()
}

/// `code` in `language` run by `app`, as `/execute` answers.
async fn run(app: &TestApp, language: &str, code: &str) -> Value {
    let (_, out) = app
        .post_json("/execute", json!({ "code": code, "language": language }))
        .await;
    out
}

/// A warm agent once its interpreter started ahead, and that one's spare
/// copy, wait for a job.
async fn warm_and_ready() -> TestApp {
    let warm = agent(true).await;
    let ready = || interpreters(&warm).len() == 1 && spares(&warm).len() == 1;
    assert!(
        eventually(Duration::from_secs(10), ready).await,
        "not started ahead: interpreters {:?}, spares {:?}",
        interpreters(&warm),
        spares(&warm)
    );
    warm
}

/// An idle agent has one warm interpreter started ahead, before any job:
/// its first Python jobs are forked from that one (they share its hash
/// seed), not from one started for them.
#[tokio::test]
async fn the_first_python_job_is_forked_from_an_interpreter_started_ahead() {
    let warm = warm_and_ready().await;
    let ahead = interpreters(&warm);
    let first = run(&warm, "python", "print(hash('x'))").await;
    let second = run(&warm, "python", "print(hash('x'))").await;
    assert_eq!(first["status"], "completed", "{first}");
    assert_eq!(first["stdout"], second["stdout"]);
    assert_eq!(interpreters(&warm), ahead, "the one started ahead ran them");
    warm.stop().await;

    let cold = agent(false).await;
    let out = run(&cold, "python", "print(1)").await;
    assert_eq!(out["stdout"], "1\n", "{out}");
    assert_eq!(interpreters(&cold), Vec::<u32>::new());
    cold.stop().await;
}

/// A Python job runs in the copy of the interpreter forked ahead of it,
/// which waited as a spare: its start waits for no fork. Once it is taken,
/// the next spare is forked, and the job's end (which kills whatever the
/// job left below the supervisor) leaves it be.
#[tokio::test]
async fn a_python_job_runs_in_the_copy_forked_ahead_and_the_next_is_forked_for_the_next_job() {
    let warm = warm_and_ready().await;
    let interpreter = interpreters(&warm);
    let mut spare = spares(&warm);
    for _ in 0..3 {
        let out = run(&warm, "python", "import os\nprint(os.getpid())").await;
        assert_eq!(out["stdout"], format!("{}\n", spare[0]), "{out}");
        assert!(
            eventually(Duration::from_secs(5), || {
                let next = spares(&warm);
                next.len() == 1 && next != spare
            })
            .await,
            "no next spare: {:?}",
            spares(&warm)
        );
        spare = spares(&warm);
        assert_eq!(interpreters(&warm), interpreter);
    }
    // A job that leaves a child behind: the child goes at the job's end,
    // the spare stays, and runs the next job.
    let code = "import subprocess\np = subprocess.Popen(['sleep', '30'], start_new_session=True)\nprint(p.pid)";
    let out = run(&warm, "python", code).await;
    let child: i64 = out["stdout"].as_str().unwrap().trim().parse().unwrap();
    assert!(
        eventually(Duration::from_secs(5), || !alive(child)).await,
        "the job's child outlived it"
    );
    let spare = spares(&warm);
    assert_eq!(spare.len(), 1, "{spare:?}");
    let out = run(&warm, "python", "import os\nprint(os.getpid())").await;
    assert_eq!(out["stdout"], format!("{}\n", spare[0]), "{out}");
    warm.stop().await;
}

/// The interpreter started ahead goes when the first job is not a Python
/// one: an agent that runs no Python keeps none waiting. One started for a
/// Python job stays.
#[tokio::test]
async fn an_agent_that_runs_no_python_keeps_no_interpreter_waiting() {
    let warm = agent(true).await;
    assert!(eventually(Duration::from_secs(10), || interpreters(&warm).len() == 1).await);
    for _ in 0..3 {
        let out = run(&warm, "bash", "echo hi").await;
        assert_eq!(out["stdout"], "hi\n", "{out}");
    }
    assert!(
        eventually(Duration::from_secs(10), || interpreters(&warm).is_empty()).await,
        "still waiting: {:?}",
        interpreters(&warm)
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(interpreters(&warm), Vec::<u32>::new());
    let out = run(&warm, "python", "print(1)").await;
    assert_eq!(out["stdout"], "1\n", "{out}");
    let started = interpreters(&warm);
    assert_eq!(started.len(), 1);
    let out = run(&warm, "bash", "echo hi").await;
    assert_eq!(out["stdout"], "hi\n", "{out}");
    assert_eq!(interpreters(&warm), started);
    warm.stop().await;
}

/// An agent started while an operator's `sqlite3` holds the database's
/// lock (for `secs` seconds), its processes marked in their environment.
struct LockedStart {
    data: tempfile::TempDir,
    lock: std::process::Child,
    agent: std::process::Child,
    mark: String,
}

impl LockedStart {
    async fn new(secs: u32) -> LockedStart {
        let data = tempfile::tempdir().unwrap();
        let lock = hold_write_lock(&data.path().join("execd.db"), secs);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mark = ulid::Ulid::new().to_string();
        let agent = std::process::Command::new(env!("CARGO_BIN_EXE_execd"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data.path())
            .env("WARM_START_MARK", &mark)
            .env_remove("EXECD_TOKEN")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        LockedStart {
            data,
            lock,
            agent,
            mark,
        }
    }

    /// Processes started with the mark in their environment, as the agent was.
    fn marked(&self) -> Vec<u32> {
        processes_with("environ", &format!("WARM_START_MARK={}", self.mark))
    }

    /// Whether the agent's warm interpreter runs.
    fn warm(&self) -> bool {
        let interpreters = processes_naming("execd's warm Python");
        self.marked().iter().any(|pid| interpreters.contains(pid))
    }

    fn lock_held(&mut self) -> bool {
        self.lock.try_wait().unwrap().is_none()
    }

    /// Once the agent is gone: nothing marked may be left running.
    async fn nothing_left(self) {
        assert!(
            eventually(Duration::from_secs(5), || self.marked().is_empty()).await,
            "left running: {:?}",
            self.marked()
        );
        let mut lock = self.lock;
        tokio::task::spawn_blocking(move || lock.wait().unwrap())
            .await
            .unwrap();
    }
}

/// The interpreter is started ahead while the database opens (here it
/// waits for an operator's lock), not once it is open: a first job sent as
/// soon as the agent answers finds it nearer ready. It goes with an agent
/// killed in that wait, as with one killed later.
#[tokio::test]
async fn the_interpreter_starts_while_the_database_opens_and_goes_with_an_agent_killed_meanwhile() {
    let mut start = LockedStart::new(6).await;
    let started_ahead = eventually(Duration::from_secs(4), || start.warm()).await;
    let lock_held = start.lock_held();
    start.agent.kill().unwrap();
    start.agent.wait().unwrap();
    // Its runs directory in memory, which the next start here would sweep.
    if let Ok(runs) = std::fs::read_link(start.data.path().join("runs")) {
        let _ = std::fs::remove_dir_all(runs);
    }
    assert!(started_ahead, "no interpreter while the database waited");
    assert!(lock_held, "the lock was let go before the interpreter ran");
    start.nothing_left().await;
}

/// SIGTERM while the database waits for an operator's lock stops the agent
/// cleanly: it exits 0 at once, not when the lock goes, its zygote and warm
/// interpreter go with it, and it leaves no runs directory in memory.
#[tokio::test]
async fn sigterm_while_the_database_waits_for_a_lock_stops_the_agent_cleanly() {
    let mut start = LockedStart::new(8).await;
    // Waiting for the lock by then: the interpreter starts meanwhile.
    let waiting = eventually(Duration::from_secs(4), || start.warm()).await;
    let runs = std::fs::read_link(start.data.path().join("runs"));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(start.agent.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let mut exited = None;
    for _ in 0..60 {
        exited = start.agent.try_wait().unwrap();
        if exited.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let lock_held = start.lock_held();
    if exited.is_none() {
        start.agent.kill().unwrap();
        start.agent.wait().unwrap();
    }
    let runs_left = runs.as_ref().is_ok_and(|dir| dir.exists());
    if let Ok(dir) = &runs {
        let _ = std::fs::remove_dir_all(dir);
    }
    assert!(waiting, "the agent was not waiting for the database");
    let exited = exited.expect("the agent still ran 3 s after SIGTERM");
    assert!(lock_held, "the lock went before the agent stopped");
    assert_eq!(exited.code(), Some(0), "{exited:?}");
    assert!(runs.is_ok(), "no runs link was made");
    assert!(!runs_left, "its runs directory was left: {runs:?}");
    start.nothing_left().await;
}
