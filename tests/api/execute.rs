//! The submitting routes, end to end.

use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::*;

#[tokio::test]
async fn sync_execute_returns_the_programs_output_and_exit_code() {
    let app = spawn_app().await;
    for (language, code) in [
        (
            "python",
            "import sys; print('out'); print('err', file=sys.stderr)",
        ),
        ("javascript", "console.log('out'); console.error('err')"),
        ("bash", "echo out; echo err >&2"),
    ] {
        let (status, out) = app
            .post_json("/execute", json!({ "code": code, "language": language }))
            .await;
        assert_eq!(status, 200, "{out}");
        assert_eq!(out["success"], true, "{out}");
        assert_eq!(out["stdout"], "out\n", "{language}: {out}");
        assert_eq!(out["stderr"], "err\n", "{language}: {out}");
        assert_eq!(out["exit_code"], 0);
        assert_eq!(out["language"], language);
        assert!(out["execution_time"].as_f64().unwrap() > 0.0);
        assert!(out["execution_id"].as_str().unwrap().starts_with("exec_"));
    }
    app.stop().await;
}

/// Whether Go is on PATH. CI installs it, so there its absence fails the
/// test; elsewhere the Go tests say they were skipped.
fn go_installed() -> bool {
    let found = std::process::Command::new("go")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(found || std::env::var_os("CI").is_none(), "CI installs go");
    if !found {
        eprintln!("go is not installed: skipped");
    }
    found
}

#[tokio::test]
async fn go_code_gets_its_own_exit_code_and_output() {
    if !go_installed() {
        return;
    }
    let app = spawn_app().await;
    let code = r#"package main

import (
	"fmt"
	"os"
)

func main() {
	fmt.Println("out", os.Getenv("GREETING"))
	fmt.Fprintln(os.Stderr, "err")
	os.Exit(3)
}
"#;
    let (status, out) = app
        .post_json(
            "/execute",
            json!({ "code": code, "language": "golang", "env": {"GREETING": "hi"}, "timeout": 120 }),
        )
        .await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["success"], false, "{out}");
    assert_eq!(out["exit_code"], 3, "{out}");
    assert_eq!(out["stdout"], "out hi\n", "{out}");
    assert_eq!(out["stderr"], "err\n", "{out}");
    assert_eq!(out["language"], "go");

    // A build error is the program's failure, with go's message.
    let (status, out) = app
        .post_json(
            "/execute",
            json!({ "code": "package main\nfunc main() { undefined() }\n", "language": "go", "timeout": 120 }),
        )
        .await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["success"], false, "{out}");
    assert!(out["exit_code"].as_i64().unwrap() > 0, "{out}");
    assert!(
        out["stderr"]
            .as_str()
            .unwrap()
            .contains("undefined: undefined"),
        "{out}"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_program_that_exits_non_zero_is_failed_not_an_http_error() {
    let app = spawn_app().await;
    let (status, out) = app
        .post_json(
            "/execute",
            json!({ "code": "import sys; print('partial'); sys.exit(3)" }),
        )
        .await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["success"], false);
    assert_eq!(out["status"], "failed");
    assert_eq!(out["exit_code"], 3);
    assert_eq!(out["stdout"], "partial\n");
    let p = app.process(out["execution_id"].as_str().unwrap()).await;
    assert_eq!(p["status"], "failed");
    assert_eq!(p["exit_code"], 3);
    assert_eq!(p["error"], "exited with code 3");
    app.stop().await;
}

#[tokio::test]
async fn a_timeout_is_408_with_the_partial_output_and_status_timeout() {
    let app = spawn_app().await;
    let (status, out) = app
        .post_json(
            "/execute",
            json!({ "code": "echo before; sleep 30; echo after", "language": "bash", "timeout": 1 }),
        )
        .await;
    assert_eq!(status, 408, "{out}");
    assert_eq!(out["code"], "EXECUTION_TIMEOUT");
    assert_eq!(out["details"]["stdout"], "before\n");
    assert_eq!(out["details"]["status"], "timeout");
    let p = app
        .process(out["details"]["process_id"].as_str().unwrap())
        .await;
    assert_eq!(p["status"], "timeout");
    assert_eq!(p["stdout"], "before\n");
    assert!(p["error"].as_str().unwrap().contains("timed out"));
    app.stop().await;
}

#[tokio::test]
async fn env_and_both_spellings_of_the_working_dir_reach_the_program() {
    let app = spawn_app().await;
    let dir = tempfile::tempdir().unwrap();
    let dir_str = std::fs::canonicalize(dir.path())
        .unwrap()
        .to_string_lossy()
        .to_string();
    for field in ["working_dir", "workdir"] {
        let (status, out) = app
            .post_json(
                "/execute",
                json!({
                    "code": "import os; print(os.getcwd()); print(os.environ['GREETING'])",
                    field: dir_str,
                    "env": { "GREETING": "hello there" },
                }),
            )
            .await;
        assert_eq!(status, 200, "{out}");
        assert_eq!(
            out["stdout"],
            format!("{dir_str}\nhello there\n"),
            "{field}"
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn env_values_never_reach_the_disk_of_a_running_job() {
    let app = spawn_app().await;
    let id = app
        .background(json!({
            "code": "echo up; sleep 2",
            "language": "bash",
            "env": { "API_KEY": "do-not-store-7f3a91" },
        }))
        .await;
    app.wait_for(&id, Duration::from_secs(10), |p| p["stdout"] == "up\n")
        .await;
    // While it runs, nothing under the data dir but the database holds the value.
    let mut files = vec![app.data_dir.path().join("runs")];
    let mut seen = 0;
    while let Some(path) = files.pop() {
        if path.is_dir() {
            files.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        } else {
            seen += 1;
            let bytes = std::fs::read(&path).unwrap_or_default();
            assert!(
                !String::from_utf8_lossy(&bytes).contains("do-not-store-7f3a91"),
                "{} holds an env value",
                path.display()
            );
        }
    }
    assert!(seen > 0, "the running job has a run directory");
    app.stop().await;
}

#[tokio::test]
async fn a_configured_runs_dir_holds_the_run_directories() {
    let elsewhere = tempfile::tempdir().unwrap();
    let runs = elsewhere.path().join("runs");
    let wanted = runs.clone();
    let app = spawn_app_with(move |c| c.runs_dir = Some(wanted)).await;
    let (_, out) = app
        .post_json(
            "/execute/background",
            json!({ "code": "echo up; sleep 30", "language": "bash" }),
        )
        .await;
    let id = out["process_id"].as_str().unwrap().to_string();
    let run = out["execution_id"].as_str().unwrap();
    app.wait_for(&id, Duration::from_secs(10), |p| p["stdout"] == "up\n")
        .await;
    assert!(runs.join(run).join("supervisor.json").is_file());
    assert!(!app.data_dir.path().join("runs").exists());
    app.stop().await;
    assert!(runs.is_dir(), "a configured runs dir is kept");
}

#[tokio::test]
async fn the_agents_own_settings_do_not_leak_into_programs() {
    let app = spawn_app().await;
    let (_, out) = app
        .post_json(
            "/execute",
            json!({ "code": "env | grep '^EXECD_' | sort", "language": "bash", "env": {"EXECD_MINE": "1"} }),
        )
        .await;
    // Only the variable the submission set itself, and the job's own id.
    let id = out["execution_id"].as_str().unwrap();
    assert_eq!(
        out["stdout"],
        format!("EXECD_EXECUTION_ID={id}\nEXECD_MINE=1\n"),
        "{out}"
    );
    app.stop().await;
}

#[tokio::test]
async fn commands_run_directly_with_args_and_under_sh_without() {
    let app = spawn_app().await;
    let (status, out) = app
        .post_json(
            "/commands/run",
            json!({ "command": "bash", "args": ["-c", "echo $0-$1", "a", "b"] }),
        )
        .await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["stdout"], "a-b\n");
    assert_eq!(out["command"], "bash");
    assert!(out["pid"].as_i64().unwrap() > 0);
    let (_, out) = app
        .post_json(
            "/commands/run",
            json!({ "command": "echo one | tr a-z A-Z; exit 4" }),
        )
        .await;
    assert_eq!(out["stdout"], "ONE\n");
    assert_eq!(out["exit_code"], 4);
    assert_eq!(out["success"], false);

    let (status, out) = app
        .post_json(
            "/commands/background",
            json!({ "command": "echo bg", "name": "cmd-bg" }),
        )
        .await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["command"], "echo bg");
    assert_eq!(out.get("pid"), Some(&Value::Null), "{out}");
    let p = app
        .wait_terminal(out["process_id"].as_str().unwrap(), Duration::from_secs(10))
        .await;
    assert_eq!(p["stdout"], "bg\n");
    assert!(p["pid"].as_i64().is_some_and(|pid| pid > 0), "{p}");
    assert_eq!(p["name"], "cmd-bg");
    app.stop().await;
}

#[tokio::test]
async fn a_background_submission_answers_at_once_and_runs_to_the_end() {
    let app = spawn_app().await;
    let started = std::time::Instant::now();
    let (status, out) = app
        .post_json(
            "/execute/background",
            json!({ "code": "sleep 1; echo done", "language": "bash", "name": "data-processing" }),
        )
        .await;
    assert_eq!(status, 200, "{out}");
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "answered before the run ended"
    );
    assert!(matches!(out["status"].as_str(), Some("queued" | "running")));
    assert_eq!(out["name"], "data-processing");
    assert!(out["execution_id"].as_str().unwrap().starts_with("exec_"));
    let p = app
        .wait_terminal(out["process_id"].as_str().unwrap(), Duration::from_secs(10))
        .await;
    assert_eq!(p["status"], "completed");
    assert_eq!(p["stdout"], "done\n");
    assert_eq!(p["exit_code"], 0);
    assert!(p["execution_time"].as_f64().unwrap() >= 1.0);
    assert_eq!(p["start_time"], p["started_at"]);
    assert_eq!(p["end_time"], p["completed_at"]);
    app.stop().await;
}

/// A background submission answers as its row is: `running` with its
/// `start_time` when it took a free slot (claimed in its insert's own
/// transaction), `queued` with none when every slot was busy.
#[tokio::test]
async fn a_background_answer_says_whether_it_runs_and_since_when() {
    let app = spawn_app_with(|c| c.background_concurrency = 1).await;
    // The claim loop's first look at the queue, at start, holds the slot
    // for a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, first) = app
        .post_json(
            "/execute/background",
            json!({ "code": "sleep 2", "language": "bash" }),
        )
        .await;
    let (_, second) = app
        .post_json(
            "/execute/background",
            json!({ "code": "true", "language": "bash" }),
        )
        .await;
    assert_eq!(first["status"], "running", "{first}");
    let p = app.process(first["process_id"].as_str().unwrap()).await;
    assert_eq!(first["start_time"], p["started_at"], "{first} {p}");
    assert_eq!(second["status"], "queued", "{second}");
    assert_eq!(second["start_time"], Value::Null, "{second}");
    let p = app.process(second["process_id"].as_str().unwrap()).await;
    assert_eq!(p["start_time"], Value::Null, "{p}");
    app.stop().await;
}

#[tokio::test]
async fn an_async_submission_is_stored_with_its_callback_and_the_secret_never_shown() {
    let app = spawn_app().await;
    let (status, out) = app
        .post_json(
            "/execute/async",
            json!({
                "code": "print('async')",
                "callback_url": "http://127.0.0.1:9/hook",
                "callback_headers": { "X-Trace": "t1" },
                "callback_signature_secret": "very-secret-value",
            }),
        )
        .await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["status"], "queued");
    assert_eq!(out["callback_url"], "http://127.0.0.1:9/hook");
    let id = out["execution_id"].as_str().unwrap().to_string();
    let p = app.wait_terminal(&id, Duration::from_secs(10)).await;
    assert_eq!(p["stdout"], "async\n");
    let (_, list) = app.get_json("/execute/processes").await;
    for body in [p.to_string(), list.to_string(), out.to_string()] {
        assert!(!body.contains("very-secret-value"));
    }
    // Stored for delivery, though.
    let db = app.db_path();
    let stored = sqlite3(
        &db,
        &format!("SELECT callback_secret, callback_headers FROM executions WHERE id = '{id}'"),
    );
    assert!(
        stored.contains("very-secret-value") && stored.contains("X-Trace"),
        "{stored}"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_repeated_idempotency_key_returns_the_first_execution_without_running_again() {
    let app = spawn_app().await;
    let marker = tempfile::tempdir().unwrap();
    let file = marker.path().join("runs");
    let body =
        json!({ "code": format!("echo x >> {}; echo ran", file.display()), "language": "bash" });
    let send = |body: serde_json::Value| {
        app.client
            .post(app.path("/execute"))
            .bearer_auth(TOKEN)
            .header("Idempotency-Key", "key-1")
            .json(&body)
            .send()
    };
    let first: serde_json::Value = send(body.clone()).await.unwrap().json().await.unwrap();
    let second: serde_json::Value = send(body.clone()).await.unwrap().json().await.unwrap();
    assert_eq!(first["execution_id"], second["execution_id"]);
    assert_eq!(second["stdout"], "ran\n");
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        "x\n",
        "the code ran once"
    );
    let other = send(json!({ "code": "echo other", "language": "bash" }))
        .await
        .unwrap();
    assert_eq!(other.status(), 409);
    let other: serde_json::Value = other.json().await.unwrap();
    assert_eq!(other["code"], "IDEMPOTENCY_KEY_REUSED");
    // A replay started preparing a job of its own (it had a free slot):
    // that was dropped, and left no run directory behind.
    let runs = app.data_dir.path().join("runs");
    let empty = || std::fs::read_dir(&runs).is_ok_and(|mut d| d.next().is_none());
    assert!(
        eventually(Duration::from_secs(5), empty).await,
        "run directories left: {:?}",
        std::fs::read_dir(&runs).map(|d| d.count())
    );
    app.stop().await;
}

#[tokio::test]
async fn output_that_is_not_utf8_is_stored_and_shown_with_replacement_characters() {
    let app = spawn_app().await;
    let (status, out) = app
        .post_json(
            "/execute",
            json!({ "code": "printf 'a\\xff\\xfeb\\n'; printf '\\xe2\\x82' >&2", "language": "bash" }),
        )
        .await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["stdout"], "a\u{fffd}\u{fffd}b\n");
    assert_eq!(out["stderr"], "\u{fffd}");
    app.stop().await;
}

/// Scrapes at the same time each show the database as it is: the gauges
/// of one are not mixed with another's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_scrapes_of_metrics_each_show_every_execution_once() {
    let app = spawn_app().await;
    for _ in 0..3 {
        let (status, _) = app
            .post_json("/execute", json!({ "code": "true", "language": "bash" }))
            .await;
        assert_eq!(status, 200);
    }
    let scrape = || async {
        let text = app.get("/metrics").await.text().await.unwrap();
        let executions: i64 = text
            .lines()
            .filter(|l| l.starts_with("execd_executions{"))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<i64>().unwrap())
            .sum();
        let lanes = text
            .lines()
            .filter(|l| l.starts_with("execd_queue_depth{"))
            .count();
        (executions, lanes)
    };
    for _ in 0..50 {
        let seen = futures::future::join_all((0..16).map(|_| scrape())).await;
        assert!(seen.iter().all(|s| *s == (3, 3)), "{seen:?}");
    }
    app.stop().await;
}

#[tokio::test]
async fn metrics_show_executions_queues_callbacks_and_database_writes() {
    let app = spawn_app().await;
    let (status, _) = app
        .post_json("/execute", json!({ "code": "echo m", "language": "bash" }))
        .await;
    assert_eq!(status, 200);
    let response = app.get("/metrics").await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    for needle in [
        r#"execd_executions{language="bash",status="completed"} 1"#,
        r#"execd_queue_depth{lane="async"} 0"#,
        r#"execd_running{lane="sync"} 0"#,
        "execd_execution_duration_seconds_count{",
        "execd_db_write_batch_size_count",
        "execd_db_commit_seconds_bucket",
        "execd_db_wal_sync_seconds_bucket",
        "execd_http_requests_total{",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
    let anonymous = app.client.get(app.path("/metrics")).send().await.unwrap();
    assert_eq!(
        anonymous.status(),
        401,
        "metrics need the token like every route but /health"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_program_starts_with_no_signal_ignored_so_ctrl_c_style_interrupts_work() {
    let app = spawn_app().await;
    let (status, out) = app
        .post_json(
            "/execute",
            json!({
                "code": "import signal; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)",
                "language": "python",
            }),
        )
        .await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(
        out["stdout"], "True\n",
        "SIGINT must reach Python's handler: {out}"
    );
    let (_, out) = app
        .post_json(
            "/execute",
            json!({ "code": "grep SigIgn /proc/self/status", "language": "bash" }),
        )
        .await;
    let mask = out["stdout"]
        .as_str()
        .unwrap()
        .trim()
        .trim_start_matches("SigIgn:");
    let mask = u64::from_str_radix(mask.trim(), 16).unwrap();
    // SIGHUP 1, SIGINT 2, SIGPIPE 13, SIGCHLD 17: bit n-1 for signal n.
    for signal in [1, 2, 13, 17] {
        assert_eq!(
            mask & (1 << (signal - 1)),
            0,
            "signal {signal} ignored: {out}"
        );
    }
    app.stop().await;
}

/// Code runs from a file in its run directory, yet finds the modules and
/// packages of its working directory, as it would run from there: a
/// Python module, a Node package under `node_modules`. Neither was found.
#[tokio::test]
async fn code_finds_the_modules_of_its_working_directory() {
    let app = spawn_app().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("mymod.py"), "X = 42\n").unwrap();
    let package = dir.path().join("node_modules").join("fakepkg");
    std::fs::create_dir_all(&package).unwrap();
    std::fs::write(package.join("index.js"), "module.exports = 43;\n").unwrap();
    let workdir = dir.path().to_str().unwrap();
    let (_, out) = app
        .post_json(
            "/execute",
            json!({ "code": "import mymod\nprint(mymod.X)", "language": "python", "workdir": workdir }),
        )
        .await;
    assert_eq!(out["stdout"], "42\n", "{out}");
    let (_, out) = app
        .post_json(
            "/execute",
            json!({ "code": "console.log(require('fakepkg'))", "language": "javascript", "workdir": workdir }),
        )
        .await;
    assert_eq!(out["stdout"], "43\n", "{out}");
    app.stop().await;
}

/// A program that writes files named as the run's own beside its code
/// (`status.json`, `stdout`) runs on unharmed: the code is in a directory
/// of its own. The agent took such a `status.json` for the job's end.
#[tokio::test]
async fn a_program_writing_beside_its_code_does_not_touch_the_runs_own_files() {
    let app = spawn_app().await;
    let code = "import pathlib, time\nhere = pathlib.Path(__file__).parent\n(here / 'status.json').write_text('{}')\n(here / 'stdout').write_text('x')\nfor i in range(3):\n    print(i, flush=True)\n    time.sleep(0.2)";
    let (_, out) = app
        .post_json("/execute", json!({ "code": code, "language": "python" }))
        .await;
    assert_eq!(
        (out["stdout"].as_str(), out["exit_code"].as_i64()),
        (Some("0\n1\n2\n"), Some(0)),
        "{out}"
    );
    app.stop().await;
}

/// `/info` shows each limit as configured, `--max-env-bytes` among them.
#[tokio::test]
async fn info_shows_the_limits_as_configured() {
    let app = spawn_app_with(|c| {
        c.max_code_bytes = 1234;
        c.max_env_bytes = 5678;
        c.body_timeout_secs = 7.5;
        c.warm_python = true;
    })
    .await;
    let (status, info) = app.get_json("/info").await;
    assert_eq!(status, 200);
    assert_eq!(info["warm_python"], true, "{info}");
    let limits = &info["limits"];
    assert_eq!(
        (
            limits["max_code_bytes"].as_u64(),
            limits["max_env_bytes"].as_u64(),
            limits["body_timeout"].as_f64()
        ),
        (Some(1234), Some(5678), Some(7.5)),
        "{info}"
    );
    app.stop().await;
}

/// Sends `n` async submissions at once, as many clients would; each is
/// `body(i)`, with `Idempotency-Key` `key(i)` if any. Gives each one's
/// status and answer, in order.
async fn burst(
    app: &TestApp,
    n: usize,
    body: impl Fn(usize) -> Value,
    key: impl Fn(usize) -> Option<&'static str>,
) -> Vec<(u16, Value)> {
    let sends = (0..n).map(|i| {
        let mut request = app
            .client
            .post(app.path("/execute/async"))
            .bearer_auth(TOKEN)
            .json(&body(i));
        if let Some(key) = key(i) {
            request = request.header("Idempotency-Key", key);
        }
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap())
        }
    });
    futures::future::join_all(sends).await
}

/// Submissions that find no free slot share their insert with the others
/// arriving meanwhile: each still gets a row of its own and counts as a
/// write in the metrics, and a key sent many times in the same burst makes
/// one execution, which every repeat of the same request is answered with.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_queued_submissions_stores_each_once_and_one_execution_per_key() {
    let app = spawn_app_with(|c| c.async_concurrency = 0).await;
    let body = |i: usize| {
        let code = if i % 4 == 0 {
            "echo same".to_string()
        } else {
            format!("echo {i}")
        };
        json!({ "code": code, "language": "bash", "callback_url": "http://127.0.0.1:9/hook" })
    };
    let key = |i: usize| (i % 4 == 0).then_some("same-key");
    let writes = || async {
        let text = app.get("/metrics").await.text().await.unwrap();
        text.lines()
            .find_map(|l| {
                l.strip_prefix("execd_db_write_batch_size_sum ")?
                    .parse::<f64>()
                    .ok()
            })
            .unwrap()
    };
    let before = writes().await;
    // An operator's `sqlite3` holds the write lock meanwhile, so that the
    // whole burst waits for one write.
    let mut lock = hold_write_lock(&app.db_path(), 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let answers = burst(&app, 200, body, key).await;
    assert!(lock.wait().unwrap().success());
    // Each submission counts as a write, merged or not.
    let written = writes().await - before;
    assert!(written >= 200.0, "writes counted: {written}");
    let mut fresh = std::collections::HashSet::new();
    let mut keyed = std::collections::HashSet::new();
    for (i, (status, out)) in answers.iter().enumerate() {
        assert_eq!(*status, 200, "submission {i}: {out}");
        assert_eq!(out["status"], "queued", "submission {i}: {out}");
        let id = out["execution_id"].as_str().unwrap().to_string();
        match key(i) {
            Some(_) => keyed.insert(id),
            None => fresh.insert(id),
        };
    }
    assert_eq!(
        fresh.len(),
        150,
        "each unkeyed submission its own execution"
    );
    assert_eq!(keyed.len(), 1, "one execution for the key: {keyed:?}");
    let stored = sqlite3(
        &app.db_path(),
        "SELECT count(*), count(DISTINCT code), sum(idempotency_key IS NOT NULL) FROM executions WHERE status = 'queued'",
    );
    assert_eq!(stored.trim(), "151|151|1");
    let keyed = keyed.into_iter().next().unwrap();
    let (status, out) = app.get_json(&format!("/execute/processes/{keyed}")).await;
    assert_eq!(
        (status, out["status"].as_str()),
        (200, Some("queued")),
        "{out}"
    );
    app.stop().await;
}

/// A submission the database refuses (here an operator's trigger) fails
/// alone, with the error body and nothing stored, while those that shared
/// its insert are stored and answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_submission_the_database_refuses_fails_alone_among_those_stored_with_it() {
    let app = spawn_app_with(|c| c.async_concurrency = 0).await;
    sqlite3(
        &app.db_path(),
        "CREATE TRIGGER refuse BEFORE INSERT ON executions WHEN NEW.name = 'refused' \
         BEGIN SELECT RAISE(ABORT, 'refused by the operator'); END;",
    );
    let body = |i: usize| {
        let name = if i % 25 == 7 {
            "refused".to_string()
        } else {
            format!("job-{i}")
        };
        json!({ "code": "true", "language": "bash", "name": name, "callback_url": "http://127.0.0.1:9/hook" })
    };
    let answers = burst(&app, 100, body, |_| None).await;
    for (i, (status, out)) in answers.iter().enumerate() {
        if i % 25 == 7 {
            assert_eq!(*status, 503, "submission {i}: {out}");
            assert_eq!(out["code"], "DATABASE_UNAVAILABLE", "{out}");
        } else {
            assert_eq!(*status, 200, "submission {i}: {out}");
        }
    }
    let stored = sqlite3(
        &app.db_path(),
        "SELECT count(*), count(DISTINCT name), sum(name = 'refused') FROM executions",
    );
    assert_eq!(stored.trim(), "96|96|0");
    // The agent goes on storing once the operator drops the trigger.
    sqlite3(&app.db_path(), "DROP TRIGGER refuse");
    let answers = burst(
        &app,
        4,
        |_| json!({ "code": "true", "language": "bash", "name": "refused", "callback_url": "http://127.0.0.1:9/hook" }),
        |_| None,
    )
    .await;
    assert!(
        answers.iter().all(|(status, _)| *status == 200),
        "{answers:?}"
    );
    app.stop().await;
}
