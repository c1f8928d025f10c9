//! The binary itself: bad configuration fails at start with one clear line.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Runs the binary, killing it if it has not exited within 10 s.
fn run_bounded(command: &mut Command) -> Output {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("execd did not exit: {command:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn bad_configuration_fails_at_start_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    for (args, says) in [
        (
            vec!["--sync-concurrency", "0"],
            "--sync-concurrency must be greater than 0",
        ),
        (
            vec!["--token", "a", "--no-auth"],
            "--no-auth cannot be combined",
        ),
        (
            vec!["--max-timeout=-1"],
            "--max-timeout must be a positive number",
        ),
        // A negative number is a bad value, not an unknown flag.
        (
            vec!["--kill-grace", "-1"],
            "--kill-grace must be zero or more",
        ),
        (
            vec!["--supervisor-bin", "/nonexistent/execd"],
            "--supervisor-bin /nonexistent/execd is not an executable file",
        ),
        // Accepted before: the callback task panicked, and none went out.
        (
            vec!["--callback-concurrency", "18446744073709551615"],
            "--callback-concurrency must be at most",
        ),
        // Accepted before: an idle agent took most of both cores.
        (
            vec!["--poll-interval", "1e-9"],
            "--poll-interval must be at least",
        ),
    ] {
        let out = run_bounded(
            Command::new(env!("CARGO_BIN_EXE_execd"))
                .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
                .arg(dir.path())
                .args(&args)
                .env_remove("EXECD_TOKEN"),
        );
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}

#[test]
fn a_start_that_fails_leaves_no_runs_link_or_directory() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // A working directory that cannot be made, then a database that is a
    // directory: each fails after the data dir is taken.
    let file = dir.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let file = file.to_str().unwrap();
    // A runs dir that is a file was taken: every job then failed.
    for (args, says) in [
        (vec!["--workdir", "/proc/nope/x"], "cannot prepare"),
        (vec!["--runs-dir", file], "not a directory"),
        (vec![], "execd.db"),
    ] {
        if args.is_empty() {
            std::fs::create_dir_all(data.join("execd.db")).unwrap();
        }
        let out = run_bounded(
            Command::new(env!("CARGO_BIN_EXE_execd"))
                .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
                .arg(&data)
                .args(&args)
                .env_remove("EXECD_TOKEN"),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(
            std::fs::symlink_metadata(data.join("runs")).is_err(),
            "{args:?}: a runs link (and its directory in memory) was left"
        );
    }
}

#[tokio::test]
async fn the_cli_says_why_it_had_no_token_and_refuses_an_unused_secret() {
    let app = crate::helpers::spawn_app().await;
    let empty = tempfile::tempdir().unwrap();
    let out = tokio::task::spawn_blocking({
        let (url, empty) = (app.url.clone(), empty.path().to_owned());
        move || {
            run_bounded(
                Command::new(env!("CARGO_BIN_EXE_execd"))
                    .args(["ps", "--url", &url, "--data-dir"])
                    .arg(empty)
                    .env_remove("EXECD_TOKEN"),
            )
        }
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("the agent wants a token"), "{stderr}");
    assert!(
        stderr.contains(&format!("none at {}", empty.path().join("token").display())),
        "{stderr}"
    );

    let script = empty.path().join("job.sh");
    std::fs::write(&script, "echo hi\n").unwrap();
    let out = run_bounded(
        Command::new(env!("CARGO_BIN_EXE_execd"))
            .args([
                "submit",
                "--url",
                &app.url,
                "--token",
                crate::helpers::TOKEN,
                "--callback-secret",
                "s",
            ])
            .arg(&script),
    );
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--callback-url"), "{stderr}");
    let (_, list) = app.get_json("/execute/processes").await;
    assert_eq!(list["count"], 0, "nothing was submitted: {list}");
    app.stop().await;
}

#[test]
fn a_flag_that_does_not_parse_is_refused_by_the_parser() {
    let out =
        run_bounded(Command::new(env!("CARGO_BIN_EXE_execd")).args(["--listen", "not-an-address"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--listen"));
}

#[tokio::test]
async fn the_cli_runs_submits_lists_follows_and_kills() {
    let app = crate::helpers::spawn_app().await;
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("job.py");
    std::fs::write(
        &script,
        "import sys\nprint('from a file')\nprint('oops', file=sys.stderr)\nsys.exit(5)\n",
    )
    .unwrap();
    let script = script.to_str().unwrap().to_string();
    let run = tokio::task::spawn_blocking({
        let (url, script) = (app.url.clone(), script.clone());
        move || {
            Command::new(env!("CARGO_BIN_EXE_execd"))
                .args(["run", &script])
                .env("EXECD_URL", url)
                .env("EXECD_TOKEN", crate::helpers::TOKEN)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert_eq!(String::from_utf8_lossy(&run.stdout), "from a file\n");
    assert_eq!(String::from_utf8_lossy(&run.stderr), "oops\n");
    assert_eq!(
        run.status.code(),
        Some(5),
        "the program's exit code, passed through"
    );

    let piped = {
        let url = app.url.clone();
        tokio::task::spawn_blocking(move || {
            let mut child = Command::new(env!("CARGO_BIN_EXE_execd"))
                .args(["run", "-", "--language", "bash"])
                .env("EXECD_URL", url)
                .env("EXECD_TOKEN", crate::helpers::TOKEN)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(b"echo from stdin")
                .unwrap();
            child.wait_with_output().unwrap()
        })
        .await
        .unwrap()
    };
    assert_eq!(String::from_utf8_lossy(&piped.stdout), "from stdin\n");
    assert_eq!(piped.status.code(), Some(0));

    let submitted = {
        let (url, dir) = (app.url.clone(), dir.path().to_path_buf());
        tokio::task::spawn_blocking(move || {
            let file = dir.join("loop.sh");
            std::fs::write(
                &file,
                "for i in 1 2 3; do echo tick $i; sleep 0.2; done; sleep 60",
            )
            .unwrap();
            Command::new(env!("CARGO_BIN_EXE_execd"))
                .args(["submit", file.to_str().unwrap(), "--name", "ticker"])
                .env("EXECD_URL", url)
                .env("EXECD_TOKEN", crate::helpers::TOKEN)
                .output()
                .unwrap()
        })
        .await
        .unwrap()
    };
    let text = String::from_utf8_lossy(&submitted.stdout).to_string();
    let id = text
        .lines()
        .find_map(|l| l.strip_prefix("process_id"))
        .unwrap()
        .trim()
        .to_string();
    app.wait_for(&id, Duration::from_secs(10), |p| {
        p["stdout"] == "tick 1\ntick 2\ntick 3\n"
    })
    .await;

    let (url, id2) = (app.url.clone(), id.clone());
    let outputs = tokio::task::spawn_blocking(move || {
        let run = |args: &[&str]| {
            Command::new(env!("CARGO_BIN_EXE_execd"))
                .args(args)
                .env("EXECD_URL", &url)
                .env("EXECD_TOKEN", crate::helpers::TOKEN)
                .output()
                .unwrap()
        };
        (
            run(&["ps", "--status", "running"]),
            run(&["ps", "--json"]),
            run(&["logs", &id2]),
            run(&["kill", &id2]),
        )
    })
    .await
    .unwrap();
    let (table, json, logs, kill) = outputs;
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains(&id) && table.contains("ticker") && table.contains("running"),
        "{table}"
    );
    assert!(!table.contains("\x1b["), "no colour when not on a terminal");
    let listed: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(listed["count"], 3);
    assert_eq!(
        String::from_utf8_lossy(&logs.stdout),
        "tick 1\ntick 2\ntick 3\n"
    );
    assert!(kill.status.success());
    assert_eq!(app.process(&id).await["status"], "killed");
    app.stop().await;
}

#[test]
fn the_cli_says_clearly_when_the_agent_is_not_there() {
    let out = run_bounded(Command::new(env!("CARGO_BIN_EXE_execd")).args([
        "ps",
        "--url",
        "http://127.0.0.1:9",
        "--token",
        "x",
    ]));
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot reach the agent at http://127.0.0.1:9"),
        "{stderr}"
    );
}

#[test]
fn execd_token_prints_the_local_token_or_mints_a_jwt() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "local-token-value\n").unwrap();
    let out = run_bounded(
        Command::new(env!("CARGO_BIN_EXE_execd"))
            .args(["token", "--data-dir"])
            .arg(dir.path())
            .env_remove("EXECD_JWT_SECRET"),
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "local-token-value\n");
    // It talks to no agent: the client's --url and --token would do nothing.
    for flag in ["--url", "--token"] {
        let out = run_bounded(Command::new(env!("CARGO_BIN_EXE_execd")).args(["token", flag, "x"]));
        assert_eq!(out.status.code(), Some(2), "{flag}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(flag),
            "{flag}"
        );
    }
    let out = run_bounded(Command::new(env!("CARGO_BIN_EXE_execd")).args([
        "token",
        "--jwt-secret",
        "0123456789abcdef-secret",
    ]));
    let jwt = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let auth = execd::http::Auth::jwt("0123456789abcdef-secret");
    assert!(auth.accepts(&jwt), "{jwt}");
    // What the agent would refuse, or a token dead at birth: an error, not
    // a token (both were minted).
    for (args, says) in [
        (["--jwt-secret", "abc", "--ttl", "1h"], "at least 16 bytes"),
        (
            ["--jwt-secret", "0123456789abcdef-secret", "--ttl", "0s"],
            "--ttl",
        ),
    ] {
        let out = run_bounded(
            Command::new(env!("CARGO_BIN_EXE_execd"))
                .arg("token")
                .args(args),
        );
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(says),
            "{args:?}"
        );
    }
}

/// `execd run` of a file whose extension names no language it knows asks
/// for `--language`; it ran the file as Python.
#[test]
fn execd_run_of_an_unknown_extension_asks_for_the_language() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("job.rb");
    std::fs::write(&file, "puts 1\n").unwrap();
    let out = run_bounded(
        Command::new(env!("CARGO_BIN_EXE_execd"))
            .args(["run", "--url", "http://127.0.0.1:9", "--token", "t"])
            .arg(&file),
    );
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("give --language"), "{stderr}");
}

/// `execd logs --follow` follows a run across a restart of the agent, and
/// prints text that came in pieces whole. At a stop the agent used to send
/// an `end` with the status `running`, and the CLI exited 1 with the run
/// going on; and each network chunk was decoded on its own, so a character
/// split between two came out as U+FFFD.
#[tokio::test]
async fn execd_logs_follow_goes_on_across_a_restart_and_prints_every_character() {
    use crate::crash::{free_port, Agent};
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let agent = Agent::start(data.path(), port, &[]).await;
    let code = "import time\n\
                print('x' + '\u{20ac}' * 400000)\n\
                for i in range(30):\n    print('line', i, flush=True); time.sleep(0.1)";
    let out = agent
        .post(
            "/execute/background",
            serde_json::json!({ "code": code, "language": "python" }),
        )
        .await;
    let id = out["process_id"].as_str().unwrap().to_string();
    // Read as it comes (a pipe left unread would hold the CLI up), and
    // killed if it has not ended within 30 s.
    let follow = tokio::process::Command::new(env!("CARGO_BIN_EXE_execd"))
        .args(["logs", &id, "--follow"])
        .env("EXECD_URL", &agent.url)
        .env("EXECD_TOKEN", crate::helpers::TOKEN)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let follow = tokio::spawn(tokio::time::timeout(
        Duration::from_secs(30),
        follow.wait_with_output(),
    ));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(agent.terminate().success());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let agent = Agent::start(data.path(), port, &[]).await;
    let followed = follow
        .await
        .unwrap()
        .expect("execd logs --follow ended within 30 s")
        .unwrap();
    let mut expected = format!("x{}\n", "\u{20ac}".repeat(400_000));
    for i in 0..30 {
        expected.push_str(&format!("line {i}\n"));
    }
    let printed = String::from_utf8_lossy(&followed.stdout);
    assert!(!printed.contains('\u{fffd}'), "a character was split");
    assert!(
        printed == expected,
        "the text differs: {} bytes",
        printed.len()
    );
    assert_eq!(
        followed.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&followed.stderr)
    );
    assert!(agent.terminate().success());
}

/// The client commands say what is wrong with where they were sent: a
/// `--url` without a scheme ("builder error" before), or something that
/// answers but is not the agent (it printed empty ids and exited 0).
#[test]
fn the_cli_refuses_a_url_without_a_scheme_and_a_server_that_is_not_the_agent() {
    use std::io::{Read, Write};
    let out = run_bounded(Command::new(env!("CARGO_BIN_EXE_execd")).args([
        "kill",
        "proc_x",
        "--url",
        "127.0.0.1:7070",
        "--token",
        "t",
    ]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--url") && stderr.contains("http://"),
        "{stderr}"
    );

    // A plain HTTP server that answers 200 "ok" to anything, for a while.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming().take(4).flatten() {
            let mut stream = stream;
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
        }
    });
    let out = run_bounded(
        Command::new(env!("CARGO_BIN_EXE_execd"))
            .args(["kill", "proc_x", "--url", &url, "--token", "t"]),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("not JSON"), "{stderr}");
}

/// An operator can tell which build runs: the commit is in `--version` and
/// `/info` (every version said 0.1.0).
#[tokio::test]
async fn the_version_names_the_commit_built() {
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("git");
    let head = String::from_utf8(head.stdout).unwrap().trim().to_string();
    assert_eq!(head.len(), 12, "not a git checkout?");
    let out = run_bounded(Command::new(env!("CARGO_BIN_EXE_execd")).arg("--version"));
    let printed = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(
        printed,
        format!("execd {} ({head})", env!("CARGO_PKG_VERSION"))
    );
    let app = crate::helpers::spawn_app().await;
    let (_, info) = app.get_json("/info").await;
    assert_eq!(info["commit"], head.as_str(), "{info}");
    app.stop().await;
}
