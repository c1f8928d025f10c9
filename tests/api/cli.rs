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
fn a_flag_that_does_not_parse_is_refused_by_the_parser() {
    let out =
        run_bounded(Command::new(env!("CARGO_BIN_EXE_execd")).args(["--listen", "not-an-address"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--listen"));
}
