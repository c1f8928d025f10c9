//! The supervisor zygote (`execd supervise RUNS_DIR`) driven as the agent
//! drives it: a job's program is forked at once but runs only on `go`, so
//! the agent can prepare a job while the commit of its claim is in flight.
//! A job dropped (its claim rolled back), or still at its gate when the
//! zygote goes (the agent died before its commit landed), never runs.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use execd::supervisor::files::{self, Spec};

use crate::helpers::{alive, eventually, processes_under};

/// A zygote and the report lines of its supervisors.
struct Zygote {
    child: Child,
    stdin: Option<ChildStdin>,
    reports: mpsc::Receiver<String>,
}

impl Zygote {
    fn start(runs: &Path) -> Zygote {
        let mut child = Command::new(env!("CARGO_BIN_EXE_execd"))
            .arg("supervise")
            .arg(runs)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, reports) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut zygote = Zygote {
            stdin: child.stdin.take(),
            child,
            reports,
        };
        // The agent's first line: no interpreter started ahead.
        zygote.say("warm\t");
        zygote
    }

    fn say(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(format!("{line}\n").as_bytes()).unwrap();
        stdin.flush().unwrap();
    }

    /// Runs the job `line` as `token` through its start to its end, as the
    /// agent drives it (job line, pid report, `go`, `started`, `end`).
    fn run_job(&mut self, token: &str, line: &str) {
        self.say(&format!("{token} {line}"));
        pid_of(&self.next(), token);
        self.say(&format!("{token} go"));
        assert_eq!(self.next(), format!("{token} started"));
        assert_eq!(self.next(), format!("{token} end"));
    }

    /// The next report line, within 10 s.
    fn next(&self) -> String {
        self.reports
            .recv_timeout(Duration::from_secs(10))
            .expect("a report within 10 s")
    }
}

impl Drop for Zygote {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A job line for the zygote (`<run dir>\t<spec>`) whose program creates
/// `marker` when it runs, and its run directory.
fn job(runs: &Path, name: &str, marker: &Path) -> (String, PathBuf) {
    let script = format!("echo ran > '{}'", marker.display());
    job_running(
        runs,
        name,
        "/bin/sh",
        &["-c", &script],
        &runs.join(name),
        &[],
    )
}

fn pid_of(report: &str, token: &str) -> i64 {
    report
        .strip_prefix(&format!("{token} pid "))
        .unwrap_or_else(|| panic!("expected `{token} pid <n>`, got {report:?}"))
        .parse()
        .unwrap()
}

#[tokio::test]
async fn a_program_is_forked_at_once_but_runs_only_on_go() {
    let tmp = tempfile::tempdir().unwrap();
    let marker = tmp.path().join("ran");
    let mut zygote = Zygote::start(tmp.path());
    let (line, dir) = job(tmp.path(), "a", &marker);

    zygote.say(&format!("1 {line}"));
    let pid = pid_of(&zygote.next(), "1");
    // Forked, waiting at its gate: alive, and nothing of the program yet.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(alive(pid), "the forked program waits at its gate");
    assert!(!marker.exists(), "the program ran before go");
    assert!(!dir.join("supervisor.json").exists());

    zygote.say("1 go");
    assert_eq!(zygote.next(), "1 started");
    assert_eq!(zygote.next(), "1 end");
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "ran\n");
    let ended = files::RunDir::new(&dir)
        .read_ended()
        .unwrap()
        .expect("status.json");
    assert_eq!(ended.exit_code, Some(0), "{ended:?}");
}

#[tokio::test]
async fn a_dropped_job_never_runs_and_leaves_no_status() {
    let tmp = tempfile::tempdir().unwrap();
    let marker = tmp.path().join("ran");
    let mut zygote = Zygote::start(tmp.path());
    let (line, dir) = job(tmp.path(), "b", &marker);

    zygote.say(&format!("7 {line}"));
    let pid = pid_of(&zygote.next(), "7");
    zygote.say("7 drop");
    assert_eq!(zygote.next(), "7 end");
    assert!(
        eventually(Duration::from_secs(5), || !alive(pid)).await,
        "the dropped program is gone"
    );
    assert!(!marker.exists(), "a dropped job ran");
    assert!(!dir.join("status.json").exists());
    assert!(!dir.join("supervisor.json").exists());
    // A `go` that comes too late opens nothing.
    zygote.say("7 go");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!marker.exists(), "a dropped job ran on a late go");
}

#[tokio::test]
async fn jobs_still_at_their_gate_never_run_once_the_zygote_goes() {
    let tmp = tempfile::tempdir().unwrap();
    let mut zygote = Zygote::start(tmp.path());
    let started_marker = tmp.path().join("started");
    let waiting_marker = tmp.path().join("waiting");
    let (started, _) = job(tmp.path(), "c", &started_marker);
    let (waiting, waiting_dir) = job(tmp.path(), "d", &waiting_marker);

    zygote.run_job("1", &started);
    zygote.say(&format!("2 {waiting}"));
    let pid = pid_of(&zygote.next(), "2");

    // The agent goes before its commit landed: the zygote's stdin closes.
    drop(zygote.stdin.take());
    assert_eq!(zygote.next(), "2 end");
    assert!(eventually(Duration::from_secs(5), || !alive(pid)).await);
    assert!(started_marker.exists());
    assert!(!waiting_marker.exists(), "a job ran without its go");
    // Said so, for the agent (or the next one) to run it again; an explicit
    // drop leaves nothing (above).
    let ended = files::RunDir::new(&waiting_dir)
        .read_ended()
        .unwrap()
        .expect("status.json");
    assert_eq!(ended.outcome, files::Outcome::Unstarted, "{ended:?}");
}

/// A program whose pid report finds no reader (the agent was killed while
/// the zygote still had job lines to hand over) is abandoned at its gate,
/// unstarted. It used to die there of SIGPIPE, recorded as a run that
/// failed (exit 141), never to run.
#[tokio::test]
async fn a_program_whose_report_has_no_reader_is_abandoned_unstarted() {
    let tmp = tempfile::tempdir().unwrap();
    let marker = tmp.path().join("ran");
    let (line, dir) = job(tmp.path(), "e", &marker);
    let mut child = Command::new(env!("CARGO_BIN_EXE_execd"))
        .arg("supervise")
        .arg(tmp.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // The agent is gone: nothing reads the reports.
    drop(child.stdout.take());
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(format!("3 {line}\n").as_bytes()).unwrap();
    stdin.flush().unwrap();
    let ended = dir.join("status.json");
    let written = eventually(Duration::from_secs(10), || ended.exists()).await;
    drop(stdin);
    let _ = child.wait();
    assert!(written, "no status.json");
    let ended = files::RunDir::new(&dir).read_ended().unwrap().unwrap();
    assert_eq!(ended.outcome, files::Outcome::Unstarted, "{ended:?}");
    assert!(!marker.exists(), "it ran without a go");
}

#[tokio::test]
async fn jobs_back_to_back_each_get_a_supervisor_and_the_spare_leaves_with_the_zygote() {
    let tmp = tempfile::tempdir().unwrap();
    let mut zygote = Zygote::start(tmp.path());
    let zygote_pid = i64::from(zygote.child.id());
    // Quiet for a while: the zygote has forked its spare supervisor.
    assert!(
        eventually(Duration::from_secs(5), || processes_under(tmp.path()).len()
            == 2)
        .await,
        "the zygote and its spare: {:?}",
        processes_under(tmp.path())
    );
    // Two jobs at once: the first goes to the spare, the second to a fork
    // made then.
    let markers = [tmp.path().join("one"), tmp.path().join("two")];
    let (one, _) = job(tmp.path(), "e", &markers[0]);
    let (two, _) = job(tmp.path(), "f", &markers[1]);
    zygote.say(&format!("1 {one}\n2 {two}"));
    let mut pids = [zygote.next(), zygote.next()];
    pids.sort();
    let pids = [pid_of(&pids[0], "1"), pid_of(&pids[1], "2")];
    assert_ne!(pids[0], pids[1]);
    zygote.say("1 go\n2 go");
    let mut reports: Vec<String> = (0..4).map(|_| zygote.next()).collect();
    reports.sort();
    assert_eq!(reports, ["1 end", "1 started", "2 end", "2 started"]);
    assert!(markers.iter().all(|m| m.exists()), "both jobs ran");

    // The agent goes: the zygote ends, and its spare with it.
    drop(zygote.stdin.take());
    assert!(
        eventually(Duration::from_secs(5), || processes_under(tmp.path())
            .is_empty())
        .await,
        "left behind: {:?} (zygote {zygote_pid})",
        processes_under(tmp.path())
    );
}

/// A job line for the zygote running `program` with `args` in `working_dir`.
fn job_running(
    runs: &Path,
    name: &str,
    program: &str,
    args: &[&str],
    working_dir: &Path,
    env: &[(&str, &str)],
) -> (String, PathBuf) {
    let dir = runs.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let spec = Spec {
        program: program.into(),
        args: args.iter().map(|a| a.to_string()).collect(),
        working_dir: working_dir.to_path_buf(),
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        timeout_ms: 10_000,
        kill_grace_ms: 1_000,
        max_output_bytes: 1 << 20,
        open_files: None,
        warm: false,
    };
    let line = format!(
        "{}\t{}",
        dir.display(),
        serde_json::to_string(&spec).unwrap()
    );
    (line, dir)
}

#[tokio::test]
async fn a_program_starts_clean_found_on_its_own_path_and_one_that_cannot_start_says_why() {
    let tmp = tempfile::tempdir().unwrap();
    let mut zygote = Zygote::start(tmp.path());
    // A bare name is looked up on the job's PATH, as `execvp` does; the
    // program runs in its working directory, in a process group of its
    // own, with no signal blocked or ignored (the supervisor blocks and
    // ignores some of its own), its stderr on a stream of its own.
    let bin = tmp.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::write(
        bin.join("probe"),
        "#!/bin/sh\npwd\necho \"$$ $(cut -d' ' -f5 /proc/$$/stat)\"\necho oops >&2\nexec grep -E '^Sig(Blk|Ign)' /proc/self/status\n",
    )
    .unwrap();
    std::fs::set_permissions(
        bin.join("probe"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let path = format!("{}:/usr/bin:/bin", bin.display());
    let (line, dir) = job_running(tmp.path(), "g", "probe", &[], &work, &[("PATH", &path)]);
    zygote.say(&format!("1 {line}"));
    let pid = pid_of(&zygote.next(), "1");
    zygote.say("1 go");
    assert_eq!(zygote.next(), "1 started");
    assert_eq!(zygote.next(), "1 end");
    let stdout = std::fs::read_to_string(dir.join("stdout")).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], work.display().to_string(), "{stdout}");
    assert_eq!(lines[1], format!("{pid} {pid}"), "its own group: {stdout}");
    let mask = |line: &str| u64::from_str_radix(line.split('\t').nth(1).unwrap(), 16).unwrap();
    assert_eq!(mask(lines[2]), 0, "a signal blocked: {stdout}");
    // What the supervisor ignores (SIGHUP 1, SIGINT 2, SIGPIPE 13, SIGCHLD
    // 17; bit n-1 for signal n) is not ignored by the program.
    for signal in [1, 2, 13, 17] {
        assert_eq!(
            mask(lines[3]) & (1 << (signal - 1)),
            0,
            "{signal} ignored: {stdout}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(dir.join("stderr")).unwrap(),
        "oops\n"
    );

    // A script without `#!` runs under /bin/sh, as `execvp` does it, with
    // every one of its many arguments (the shell's argument vector is
    // copied on the stack the program starts on).
    std::fs::write(bin.join("count"), "echo $#\n").unwrap();
    std::fs::set_permissions(
        bin.join("count"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let many = vec!["x"; 20_000];
    let (line, dir) = job_running(tmp.path(), "h", "count", &many, &work, &[("PATH", &path)]);
    zygote.run_job("4", &line);
    assert_eq!(
        std::fs::read_to_string(dir.join("stdout")).unwrap(),
        "20000\n"
    );

    // Nothing to run (found out at the `exec`, after the go), or nowhere
    // to run it (before the pid is reported): an error, an end.
    let missing = tmp.path().join("no-such-program");
    for (token, program, cwd) in [
        ("5", missing.to_str().unwrap(), work.clone()),
        ("6", "/bin/true", tmp.path().join("no-such-dir")),
    ] {
        let (line, dir) = job_running(tmp.path(), token, program, &[], &cwd, &[]);
        if token == "6" {
            // The agent makes the run directory while the program starts:
            // a start that fails first makes it itself, to say why.
            std::fs::remove_dir(&dir).unwrap();
        }
        zygote.say(&format!("{token} {line}"));
        let mut report = zygote.next();
        if token == "5" {
            pid_of(&report, token);
            zygote.say(&format!("{token} go"));
            report = zygote.next();
        }
        assert!(
            report.starts_with(&format!("{token} error could not start "))
                && report.ends_with("No such file or directory (os error 2)"),
            "{report}"
        );
        assert_eq!(zygote.next(), format!("{token} end"));
        let ended = files::RunDir::new(&dir)
            .read_ended()
            .unwrap()
            .expect("status.json");
        assert_eq!(ended.outcome, files::Outcome::FailedToStart, "{ended:?}");
        assert!(!dir.join("stdout").exists(), "no output, no file");
    }
}

#[tokio::test]
async fn a_supervisor_takes_the_next_job_and_ignores_a_kill_meant_for_its_last() {
    let tmp = tempfile::tempdir().unwrap();
    let mut zygote = Zygote::start(tmp.path());
    // The first job's environment has a value of its own.
    let (first, first_dir) = job_running(
        tmp.path(),
        "i",
        "/bin/sh",
        &["-c", "echo \"$FOO\""],
        tmp.path(),
        &[("FOO", "first")],
    );
    zygote.run_job("1", &first);
    let first = files::RunDir::new(&first_dir)
        .read_started()
        .unwrap()
        .unwrap();

    let (second, second_dir) = job_running(
        tmp.path(),
        "j",
        "/bin/sh",
        &["-c", "echo \"up ${FOO-unset}\"; sleep 30"],
        tmp.path(),
        &[],
    );
    zygote.say(&format!("2 {second}"));
    let pid = pid_of(&zygote.next(), "2");
    zygote.say("2 go");
    assert_eq!(zygote.next(), "2 started");
    let second = files::RunDir::new(&second_dir)
        .read_started()
        .unwrap()
        .unwrap();
    assert_eq!(
        second.supervisor_pid, first.supervisor_pid,
        "the second job went to the first one's supervisor"
    );
    assert_eq!(
        std::fs::read_to_string(first_dir.join("stdout")).unwrap(),
        "first\n"
    );
    // Nothing of the first job's environment is left for the second.
    assert!(
        eventually(Duration::from_secs(5), || std::fs::read_to_string(
            second_dir.join("stdout")
        )
        .is_ok_and(|out| out == "up unset\n"))
        .await,
        "{:?}",
        std::fs::read_to_string(second_dir.join("stdout"))
    );

    // A kill of the first job that comes late reaches the same process: it
    // names a program that is gone, and the second job runs on.
    first.request_kill().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(alive(pid), "a late kill of the last job killed this one");
    assert!(second_dir.join("status.json").metadata().is_err());

    // Its own kill ends it.
    second.request_kill().unwrap();
    assert_eq!(zygote.next(), "2 end");
    let ended = files::RunDir::new(&second_dir)
        .read_ended()
        .unwrap()
        .unwrap();
    assert_eq!(ended.outcome, files::Outcome::Killed, "{ended:?}");

    // Told to stop while it waits for a job, the supervisor goes; the
    // next job gets another.
    let supervisor = i64::from(second.supervisor_pid);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(supervisor as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(
        eventually(Duration::from_secs(5), || !alive(supervisor)).await,
        "an idle supervisor outlived SIGTERM"
    );
    let marker = tmp.path().join("ran-too");
    let (third, third_dir) = job(tmp.path(), "k", &marker);
    zygote.run_job("3", &third);
    assert!(marker.exists());
    let third = files::RunDir::new(&third_dir)
        .read_started()
        .unwrap()
        .unwrap();
    assert_ne!(i64::from(third.supervisor_pid), supervisor);
}

/// (process group, session) of `pid`, from /proc.
fn group_and_session(stat: &str) -> (i64, i64) {
    // After the `(comm)`: state, ppid, pgrp, session.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    (fields[2].parse().unwrap(), fields[3].parse().unwrap())
}

/// Supervisors share the zygote's session, and so one scheduling autogroup
/// for all jobs (with a session each, the agent got one share against each
/// job's under load, and its callbacks waited 4× longer); each still has a
/// process group of its own, and so does its program.
#[tokio::test]
async fn jobs_share_the_zygotes_session_each_in_a_process_group_of_its_own() {
    let runs = tempfile::tempdir().unwrap();
    let out = runs.path().join("ids");
    let script = format!(
        "cat /proc/$$/stat /proc/$PPID/stat > '{}'; echo $PPID >> '{}'",
        out.display(),
        out.display()
    );
    let (line, _) = job_running(
        runs.path(),
        "j",
        "/bin/sh",
        &["-c", &script],
        runs.path(),
        &[],
    );
    let mut zygote = Zygote::start(runs.path());
    zygote.say(&format!("t1 {line}"));
    let program = pid_of(&zygote.next(), "t1");
    zygote.say("t1 go");
    assert_eq!(zygote.next(), "t1 started");
    assert_eq!(zygote.next(), "t1 end");
    let text = std::fs::read_to_string(&out).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let supervisor: i64 = lines[2].parse().unwrap();
    let zygote_stat = std::fs::read_to_string(format!("/proc/{}/stat", zygote.child.id())).unwrap();
    let (zygote_group, zygote_session) = group_and_session(&zygote_stat);
    assert_eq!(
        group_and_session(lines[0]),
        (program, zygote_session),
        "the program"
    );
    assert_eq!(
        group_and_session(lines[1]),
        (supervisor, zygote_session),
        "the supervisor"
    );
    assert_ne!(supervisor, zygote_group);
}
