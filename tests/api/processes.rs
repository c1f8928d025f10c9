//! The process list, one process, live output and kills.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::helpers::*;

#[tokio::test]
async fn output_is_visible_while_the_job_still_runs() {
    let app = spawn_app().await;
    let id = app
        .background(
            json!({ "code": "import time\nprint('first')\ntime.sleep(30)\nprint('second')" }),
        )
        .await;
    let p = app
        .wait_for(&id, Duration::from_secs(10), |p| p["stdout"] == "first\n")
        .await;
    assert_eq!(p["status"], "running");
    assert!(p["pid"].as_i64().unwrap() > 0);
    assert!(p["exit_code"].is_null());
    assert!(p["execution_time"].as_f64().is_some());
    app.stop().await;
}

#[tokio::test]
async fn a_silent_job_shows_its_pid_within_about_a_second_and_keeps_it_when_it_ends() {
    let app = spawn_app().await;
    // Running and silent: the pid waits for nothing to go with, not forever.
    let id = app
        .background(json!({ "code": "sleep 30", "language": "bash" }))
        .await;
    let p = app
        .wait_for(&id, Duration::from_secs(5), |p| !p["pid"].is_null())
        .await;
    assert_eq!(p["status"], "running", "{p}");
    assert!(p["spawned_at"].is_string(), "{p}");
    assert!(alive(p["pid"].as_i64().unwrap()));
    let (status, _) = app
        .post_json(&format!("/execute/kill/{id}"), json!({}))
        .await;
    assert_eq!(status, 200);
    // Short and silent: its pid goes with its end.
    let id = app
        .background(json!({ "code": "sleep 0.2", "language": "bash" }))
        .await;
    let p = app.wait_terminal(&id, Duration::from_secs(10)).await;
    assert_eq!(p["status"], "completed", "{p}");
    assert!(p["pid"].as_i64().unwrap() > 0, "{p}");
    assert!(p["spawned_at"].is_string(), "{p}");
    app.stop().await;
}

#[tokio::test]
async fn a_line_printed_by_a_running_job_shows_up_within_a_few_hundred_ms() {
    let app = spawn_app().await;
    let marker = tempfile::tempdir().unwrap();
    let go = marker.path().join("go");
    let id = app
        .background(json!({
            "language": "bash",
            "code": format!("while [ ! -e {} ]; do sleep 0.01; done; echo tick; sleep 30", go.display()),
        }))
        .await;
    app.wait_for(&id, Duration::from_secs(10), |p| p["status"] == "running")
        .await;
    std::fs::write(&go, "").unwrap();
    let printed = Instant::now();
    app.wait_for(&id, Duration::from_secs(5), |p| p["stdout"] == "tick\n")
        .await;
    // A generous bound: the flush interval is 50 ms.
    assert!(
        printed.elapsed() < Duration::from_millis(1500),
        "{:?}",
        printed.elapsed()
    );
    app.stop().await;
}

#[tokio::test]
async fn the_list_is_newest_first_and_filters_by_status_and_name_with_a_cursor() {
    let app = spawn_app().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let (_, out) = app
            .post_json(
                "/execute",
                json!({ "code": format!("exit {}", i % 2), "language": "bash", "name": format!("job-{}", i % 2) }),
            )
            .await;
        ids.push(out["process_id"].as_str().unwrap().to_string());
    }
    let (status, list) = app.get_json("/execute/processes").await;
    assert_eq!(status, 200);
    let listed: Vec<&str> = list["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["process_id"].as_str().unwrap())
        .collect();
    let newest_first: Vec<&str> = ids.iter().rev().map(String::as_str).collect();
    assert_eq!(listed, newest_first);
    assert_eq!(list["count"], 5);
    assert!(list["timestamp"].is_string());

    let (_, failed) = app.get_json("/execute/processes?status=failed").await;
    assert_eq!(failed["count"], 2);
    assert!(failed["processes"]
        .as_array()
        .unwrap()
        .iter()
        .all(|p| p["status"] == "failed"));
    let (_, named) = app.get_json("/execute/processes?name=job-0").await;
    assert_eq!(named["count"], 3);

    let (_, page1) = app.get_json("/execute/processes?limit=2").await;
    assert_eq!(page1["count"], 2);
    let cursor = page1["next_cursor"].as_str().unwrap().to_string();
    let (_, page2) = app
        .get_json(&format!("/execute/processes?limit=2&cursor={cursor}"))
        .await;
    let (_, page2_by_offset) = app.get_json("/execute/processes?limit=2&offset=2").await;
    let ids_of = |v: &Value| -> Vec<String> {
        v["processes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["process_id"].to_string())
            .collect()
    };
    assert_eq!(ids_of(&page2), ids_of(&page2_by_offset));
    assert_eq!(
        ids_of(&page2),
        vec![format!("{:?}", ids[2]), format!("{:?}", ids[1])]
    );
    app.stop().await;
}

#[tokio::test]
async fn one_process_is_found_by_either_id_and_an_unknown_one_is_404() {
    let app = spawn_app().await;
    let (_, out) = app
        .post_json("/execute", json!({ "code": "echo x", "language": "bash" }))
        .await;
    let by_exec = app.process(out["execution_id"].as_str().unwrap()).await;
    let by_proc = app.process(out["process_id"].as_str().unwrap()).await;
    assert_eq!(by_exec["process_id"], by_proc["process_id"]);
    let (status, err) = app.get_json("/execute/processes/proc_nope").await;
    assert_eq!(status, 404);
    assert_eq!(err["code"], "PROCESS_NOT_FOUND");
    app.stop().await;
}

#[tokio::test]
async fn output_beyond_the_cap_is_dropped_and_flagged() {
    let app = spawn_app_with(|c| c.max_output_bytes = 1000).await;
    let (status, out) = app
        .post_json(
            "/execute",
            json!({ "code": "import sys\nsys.stdout.write('x' * 5000)\nsys.stderr.write('short')" }),
        )
        .await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["stdout"].as_str().unwrap().len(), 1000);
    assert_eq!(out["stdout_truncated"], true);
    assert_eq!(out["stderr"], "short");
    assert_eq!(out["stderr_truncated"], false);
    assert_eq!(out["success"], true, "the program itself is unaffected");

    // Exactly the cap is all of it: nothing dropped, nothing flagged.
    let (_, out) = app
        .post_json(
            "/execute",
            json!({ "code": "import sys\nsys.stdout.write('y' * 1000)" }),
        )
        .await;
    assert_eq!(out["stdout"].as_str().unwrap().len(), 1000, "{out}");
    assert_eq!(out["stdout_truncated"], false);

    // Far past the cap, in many writes: drained to the end, the program never blocks.
    let (_, out) = app
        .post_json(
            "/execute",
            json!({ "code": "import sys\nfor _ in range(64): sys.stdout.write('z' * 65536); sys.stdout.flush()\nprint('done', file=sys.stderr)" }),
        )
        .await;
    assert_eq!(out["status"], "completed", "{out}");
    assert_eq!(out["stdout"], "z".repeat(1000));
    assert_eq!(out["stdout_truncated"], true);
    assert_eq!(out["stderr"], "done\n");
    app.stop().await;
}

async fn kill_with(app: &TestApp, shape: &str, id: &str) -> (u16, Value) {
    let request = match shape {
        "post-execute-kill" => app.client.post(app.path(&format!("/execute/kill/{id}"))),
        "delete-query" => app
            .client
            .delete(app.path(&format!("/execute/kill?process_id={id}"))),
        "delete-body" => app
            .client
            .delete(app.path("/execute/kill"))
            .json(&json!({ "process_id": id })),
        "post-processes-kill" => app.client.post(app.path(&format!("/processes/{id}/kill"))),
        _ => unreachable!(),
    };
    let response = request.bearer_auth(TOKEN).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

const SHAPES: [&str; 4] = [
    "post-execute-kill",
    "delete-query",
    "delete-body",
    "post-processes-kill",
];

#[tokio::test]
async fn all_four_kill_shapes_kill_a_running_process() {
    let app = spawn_app().await;
    for shape in SHAPES {
        let id = app
            .background(json!({ "code": "echo up; sleep 60", "language": "bash" }))
            .await;
        app.wait_for(&id, Duration::from_secs(10), |p| p["stdout"] == "up\n")
            .await;
        let (status, out) = kill_with(&app, shape, &id).await;
        assert_eq!(status, 200, "{shape}: {out}");
        assert_eq!(out["status"], "killed", "{shape}");
        assert_eq!(out["process_id"], id.as_str());
        assert!(out["execution_id"].as_str().unwrap().starts_with("exec_"));
        let p = app.process(&id).await;
        assert_eq!(p["status"], "killed");
        assert!(
            !alive(p["pid"].as_i64().unwrap()),
            "{shape}: the program is gone"
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn killing_an_unknown_process_is_404_and_a_finished_one_changes_nothing() {
    let app = spawn_app().await;
    for shape in SHAPES {
        let (status, out) = kill_with(&app, shape, "proc_unknown").await;
        assert_eq!(status, 404, "{shape}");
        assert_eq!(out["code"], "PROCESS_NOT_FOUND");
    }
    let (_, done) = app
        .post_json("/execute", json!({ "code": "echo ok", "language": "bash" }))
        .await;
    let id = done["process_id"].as_str().unwrap();
    let (status, out) = kill_with(&app, "post-execute-kill", id).await;
    assert_eq!(status, 200);
    assert_eq!(out["status"], "completed");
    assert!(
        out["message"]
            .as_str()
            .unwrap()
            .contains("already finished"),
        "{out}"
    );
    assert_eq!(app.process(id).await["status"], "completed");
    app.stop().await;
}

#[tokio::test]
async fn killing_a_job_kills_the_grandchildren_it_started() {
    let app = spawn_app().await;
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("grandchild.pid");
    let code = format!(
        "import subprocess, time\np = subprocess.Popen(['sleep', '300'])\nopen('{}', 'w').write(str(p.pid))\nprint('started', flush=True)\ntime.sleep(300)",
        pidfile.display()
    );
    let id = app.background(json!({ "code": code })).await;
    let p = app
        .wait_for(&id, Duration::from_secs(10), |p| p["stdout"] == "started\n")
        .await;
    let child: i64 = p["pid"].as_i64().unwrap();
    let grandchild: i64 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(alive(child) && alive(grandchild));
    let (status, _) = kill_with(&app, "post-execute-kill", &id).await;
    assert_eq!(status, 200);
    assert!(
        eventually(Duration::from_secs(5), || !alive(child)
            && !alive(grandchild))
        .await
    );
    app.stop().await;
}

#[tokio::test]
async fn a_grandchild_left_behind_by_a_finished_job_is_cleaned_up() {
    let app = spawn_app().await;
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("orphan.pid");
    let code = format!(
        "sleep 300 > /dev/null 2>&1 & echo $! > {}; echo bye",
        pidfile.display()
    );
    let (status, out) = app
        .post_json("/execute", json!({ "code": code, "language": "bash" }))
        .await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["status"], "completed");
    let orphan: i64 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        eventually(Duration::from_secs(5), || !alive(orphan)).await,
        "orphan {orphan} survived"
    );
    app.stop().await;
}

/// A descendant that left the job's process group goes with the job too,
/// whether the job ends by itself, times out or is killed: `setsid`, a shell
/// with job control (`set -m`), a detached child. They outlived it (only the
/// group was signalled), and one holding the job's stdout held its end for
/// the two-second drain.
#[tokio::test]
async fn a_descendant_that_left_the_jobs_group_goes_with_the_job() {
    let app = spawn_app().await;
    let dir = tempfile::tempdir().unwrap();
    let pid_of = |name: &str| dir.path().join(name);
    let cases = [
        (
            format!(
                "setsid sleep 301 & echo $! > {}; sleep 0.5; echo bye",
                pid_of("setsid").display()
            ),
            json!(null),
            "completed",
            "setsid",
        ),
        (
            format!(
                "set -m; sleep 302 & echo $! > {}; sleep 100",
                pid_of("jobs").display()
            ),
            json!(1),
            "timeout",
            "jobs",
        ),
        (
            format!(
                "import subprocess, time\n\
                 p = subprocess.Popen(['sleep', '303'], start_new_session=True)\n\
                 open('{}', 'w').write(str(p.pid))\n\
                 time.sleep(100)",
                pid_of("killed").display()
            ),
            json!(null),
            "killed",
            "killed",
        ),
    ];
    for (code, timeout, ends, name) in cases {
        let language = if name == "killed" { "python" } else { "bash" };
        let id = app
            .background(json!({ "code": code, "language": language, "timeout": timeout }))
            .await;
        let pidfile = pid_of(name);
        assert!(
            eventually(Duration::from_secs(10), || pidfile.exists()).await,
            "{name}: no pid"
        );
        if ends == "killed" {
            tokio::time::sleep(Duration::from_millis(200)).await;
            app.post_json(&format!("/execute/kill/{id}"), json!({}))
                .await;
        }
        let p = app.wait_terminal(&id, Duration::from_secs(10)).await;
        assert_eq!(p["status"], ends, "{name}: {p}");
        let left: i64 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(
            eventually(Duration::from_secs(3), || !alive(left)).await,
            "{name}: {left} outlived its job"
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn a_queued_job_can_be_killed_before_it_starts() {
    let app = spawn_app_with(|c| c.async_concurrency = 1).await;
    let body = |code: &str| json!({ "code": code, "language": "bash", "callback_url": "http://127.0.0.1:9/x" });
    let (_, first) = app.post_json("/execute/async", body("sleep 60")).await;
    let (_, second) = app.post_json("/execute/async", body("echo never")).await;
    let second_id = second["process_id"].as_str().unwrap();
    app.wait_for(
        first["process_id"].as_str().unwrap(),
        Duration::from_secs(10),
        |p| p["status"] == "running",
    )
    .await;
    assert_eq!(app.process(second_id).await["status"], "queued");
    let (status, out) = kill_with(&app, "delete-query", second_id).await;
    assert_eq!(status, 200);
    assert_eq!(out["status"], "killed");
    let p = app.process(second_id).await;
    assert!(p["pid"].is_null() && p["stdout"] == "", "it never ran: {p}");
    app.stop().await;
}

/// Reads a server-sent event stream to its end: (event, id, data) triples.
async fn read_events(mut response: reqwest::Response) -> Vec<(String, String, Value)> {
    let mut bytes = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Ok(Ok(Some(chunk))) = tokio::time::timeout_at(deadline.into(), response.chunk()).await
    {
        bytes.extend_from_slice(&chunk);
    }
    String::from_utf8(bytes)
        .expect("the event stream is UTF-8")
        .split("\n\n")
        .filter(|block| block.contains("data:"))
        .map(|block| {
            let field = |name: &str| {
                block
                    .lines()
                    .filter_map(|l| l.strip_prefix(name))
                    .map(|v| v.trim_start().to_string())
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            (
                field("event:"),
                field("id:"),
                serde_json::from_str(&field("data:")).unwrap(),
            )
        })
        .collect()
}

/// A process's whole output comes back as stored, in one process and in a
/// sync run's result alike: the answer is sent a piece at a time, a large
/// output read a page at a time, and no escape or character is broken
/// where one piece or page meets the next.
#[tokio::test]
async fn the_whole_output_comes_back_as_stored_past_many_pieces_of_the_answer() {
    let app = spawn_app().await;
    // About 1.4 MB on stdout (past the 1 MiB read at once) and 0.5 MB on
    // stderr: quotes, backslashes, control characters, two-, three- and
    // four-byte characters, and invalid bytes.
    let code = "import sys\n\
                unit = 'a\"b\\\\c\\n\\t\\x01\u{e9}\u{20ac}\u{1f600}'.encode()\n\
                sys.stdout.buffer.write(unit * 80000)\n\
                sys.stderr.buffer.write((b'x\\xff' + unit) * 25000)";
    let unit = "a\"b\\c\n\t\u{1}\u{e9}\u{20ac}\u{1f600}";
    let stdout = unit.repeat(80_000);
    let stderr = format!("x\u{fffd}{unit}").repeat(25_000);

    let id = app
        .background(json!({ "code": code, "language": "python" }))
        .await;
    let process = app.wait_terminal(&id, Duration::from_secs(30)).await;
    assert_eq!(process["status"], "completed", "{}", process["error"]);
    assert!(process["stdout"] == stdout.as_str(), "stdout differs");
    assert!(process["stderr"] == stderr.as_str(), "stderr differs");
    assert_eq!(process["process_id"], id.as_str());

    let (status, run) = app
        .post_json("/execute", json!({ "code": code, "language": "python" }))
        .await;
    assert_eq!(status, 200, "{}", run["error"]);
    assert!(
        run["stdout"] == stdout.as_str(),
        "a sync run's stdout differs"
    );
    assert!(
        run["stderr"] == stderr.as_str(),
        "a sync run's stderr differs"
    );
    assert_eq!(run["success"], true);
    app.stop().await;
}

/// A large output is read while it is sent: when the execution is deleted
/// meanwhile (an operator's `sqlite3`, say), the answer breaks off rather
/// than end as whole JSON with a hole in the output.
#[tokio::test]
async fn an_output_deleted_while_it_is_sent_breaks_the_answer_off() {
    let app = spawn_app().await;
    let code = "import sys\nsys.stdout.write('x' * (8 << 20))";
    let id = app
        .background(json!({ "code": code, "language": "python" }))
        .await;
    let process = app.wait_terminal(&id, Duration::from_secs(30)).await;
    assert_eq!(process["status"], "completed", "{}", process["error"]);
    let execution_id = process["execution_id"].as_str().unwrap().to_string();

    // Read a little, and stop reading: the rest waits in the agent.
    let mut response = app.get(&format!("/execute/processes/{id}")).await;
    assert_eq!(response.status(), 200);
    let mut body = response
        .chunk()
        .await
        .expect("a first piece")
        .expect("a first piece")
        .to_vec();
    sqlite3(
        &app.data_dir.path().join("execd.db"),
        &format!("PRAGMA foreign_keys = ON; DELETE FROM executions WHERE id = '{execution_id}';"),
    );
    let ended = loop {
        match response.chunk().await {
            Ok(Some(piece)) => body.extend_from_slice(&piece),
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    assert!(ended.is_err(), "the answer ended as if whole");
    assert!(
        body.len() < (8 << 20),
        "all the output was sent: {} bytes",
        body.len()
    );
    assert!(
        serde_json::from_slice::<Value>(&body).is_err(),
        "whole JSON"
    );
    let (status, _) = app.get_json(&format!("/execute/processes/{id}")).await;
    assert_eq!(status, 404);
    app.stop().await;
}

/// Each event's text is whole: a character the program writes in two parts,
/// or one on the boundary of two stored chunks, is never split in two.
#[tokio::test]
async fn logs_never_split_a_character() {
    let app = spawn_app().await;
    let code = "import sys, time\n\
                out = sys.stdout.buffer\n\
                out.write(b'caf\\xc3'); out.flush(); time.sleep(0.3)\n\
                out.write(b'\\xa9 ok\\n'); out.flush()\n\
                out.write(('x' + '\u{20ac}' * 1000000 + '\\n').encode())";
    let id = app
        .background(json!({ "code": code, "language": "python" }))
        .await;
    let response = app
        .get(&format!("/execute/processes/{id}/logs?follow=true"))
        .await;
    let events = read_events(response).await;
    let pieces: Vec<&str> = events
        .iter()
        .filter(|e| e.0 == "stdout")
        .map(|e| e.2["data"].as_str().unwrap())
        .collect();
    assert!(pieces.len() > 2, "{} events", pieces.len());
    assert!(
        pieces.iter().all(|p| !p.contains('\u{fffd}')),
        "a character was split"
    );
    let expected = format!("caf\u{e9} ok\nx{}\n", "\u{20ac}".repeat(1_000_000));
    assert!(pieces.concat() == expected, "the text differs");
    app.stop().await;
}

/// The logs give each stream in the order it was written even when the
/// chunks' times do not follow it. A job's last chunk is stored with its
/// end; when the agent stored output after the program had ended (a busy
/// machine), that last chunk's time was the earlier one, and a follower
/// read it first and then the chunks before it again (CI saw the text
/// differ). Here the times are set out of order as that race left them.
#[tokio::test]
async fn logs_keep_each_streams_order_when_chunk_times_do_not() {
    let app = spawn_app().await;
    let code = "for i in 1 2 3; do echo out-$i; echo err-$i >&2; sleep 0.3; done";
    let id = app
        .background(json!({ "code": code, "language": "bash" }))
        .await;
    let done = app.wait_terminal(&id, Duration::from_secs(10)).await;
    let exec = done["execution_id"].as_str().unwrap();
    let chunks = |stream: &str| {
        sqlite3(
            &app.db_path(),
            &format!(
                "SELECT count(*) FROM output_chunks WHERE execution_id = '{exec}' AND stream = '{stream}'"
            ),
        )
        .trim()
        .parse::<u32>()
        .unwrap()
    };
    // A line a chunk, unless the machine held the agent for 0.3 s.
    assert!(chunks("stdout") >= 2 && chunks("stderr") >= 2);
    // Each stream's last chunk stamped before its first, as the race left it.
    sqlite3(
        &app.db_path(),
        &format!(
            "UPDATE output_chunks SET created_at = '2000-01-01T00:00:00.000000Z'
              WHERE execution_id = '{exec}' AND seq = (SELECT max(seq) FROM output_chunks o
                    WHERE o.execution_id = output_chunks.execution_id AND o.stream = output_chunks.stream)"
        ),
    );
    for query in ["", "?follow=true"] {
        let events = read_events(
            app.get(&format!("/execute/processes/{id}/logs{query}"))
                .await,
        )
        .await;
        let text = |stream: &str| {
            events
                .iter()
                .filter(|e| e.0 == stream)
                .map(|e| e.2["data"].as_str().unwrap())
                .collect::<String>()
        };
        assert_eq!(text("stdout"), "out-1\nout-2\nout-3\n", "logs{query}");
        assert_eq!(text("stderr"), "err-1\nerr-2\nerr-3\n", "logs{query}");
        assert_eq!(events.last().unwrap().0, "end");
    }
    app.stop().await;
}

#[tokio::test]
async fn logs_follow_a_running_job_as_server_sent_events_and_resume_from_an_event_id() {
    let app = spawn_app().await;
    let id = app
        .background(json!({ "code": "for i in 1 2 3 4 5; do echo out-$i; echo err-$i >&2; sleep 0.1; done; exit 3", "language": "bash" }))
        .await;
    let response = app
        .get(&format!("/execute/processes/{id}/logs?follow=true"))
        .await;
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let events = read_events(response).await;
    let text = |stream: &str, events: &[(String, String, Value)]| -> String {
        events
            .iter()
            .filter(|e| e.0 == stream)
            .map(|e| e.2["data"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        text("stdout", &events),
        "out-1\nout-2\nout-3\nout-4\nout-5\n"
    );
    assert_eq!(
        text("stderr", &events),
        "err-1\nerr-2\nerr-3\nerr-4\nerr-5\n"
    );
    let (kind, _, end) = events.last().unwrap();
    assert_eq!(kind, "end");
    assert_eq!(
        (end["status"].as_str(), end["exit_code"].as_i64()),
        (Some("failed"), Some(3))
    );

    // Reconnecting with the id of the first event replays only what followed it.
    let first_id = events[0].1.clone();
    let resumed = app
        .client
        .get(app.path(&format!("/execute/processes/{id}/logs?follow=true")))
        .bearer_auth(TOKEN)
        .header("Last-Event-ID", &first_id)
        .send()
        .await
        .unwrap();
    let rest = read_events(resumed).await;
    assert_eq!(rest.len(), events.len() - 1);
    assert_eq!(rest.last().unwrap().0, "end");
    app.stop().await;
}

/// The logs of a run retried after a lost attempt: a follower sees the
/// first attempt's output, an `attempt` event, then the second's; a client
/// resuming with an event id of the first attempt gets the same `attempt`
/// event and the second from its start. The id used to carry no attempt: a
/// first attempt's position was applied to the second, whose first lines
/// were skipped.
#[tokio::test]
async fn logs_of_a_retried_run_mark_the_new_attempt_and_resume_into_it() {
    let app = spawn_app().await;
    let marker = app.data_dir.path().join("attempts");
    let code = format!(
        "echo x >> {m}; n=$(wc -l < {m}); for i in 1 2 3; do echo a$n-$i; sleep 0.1; done; \
         if [ $n -lt 2 ]; then sleep 300; fi",
        m = marker.display()
    );
    let id = app
        .background(json!({ "code": code, "language": "bash", "max_attempts": 2 }))
        .await;
    let p = app
        .wait_for(&id, Duration::from_secs(10), |p| {
            p["stdout"] == "a1-1\na1-2\na1-3\n"
        })
        .await;
    let exec = p["execution_id"].as_str().unwrap().to_string();
    let first = read_events(app.get(&format!("/execute/processes/{id}/logs")).await).await;
    let last_of_first = first
        .iter()
        .rev()
        .find(|e| e.0 == "stdout")
        .unwrap()
        .1
        .clone();
    assert!(last_of_first.starts_with("1."), "{last_of_first}");
    let follower = app
        .get(&format!("/execute/processes/{id}/logs?follow=true"))
        .await;
    let started: Value = serde_json::from_slice(
        &std::fs::read(
            app.data_dir
                .path()
                .join("runs")
                .join(&exec)
                .join("supervisor.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let supervisor = started["supervisor_pid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(supervisor),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let followed = read_events(follower).await;
    let kinds: Vec<&str> = followed.iter().map(|e| e.0.as_str()).collect();
    let turn = kinds
        .iter()
        .position(|k| *k == "attempt")
        .expect("an attempt event");
    assert_eq!(followed[turn].2["attempt"], 2);
    assert!(followed[turn].1.starts_with("2."), "{:?}", followed[turn]);
    let text = |events: &[(String, String, Value)]| -> String {
        events
            .iter()
            .filter(|e| e.0 == "stdout")
            .map(|e| e.2["data"].as_str().unwrap())
            .collect()
    };
    assert_eq!(text(&followed[..turn]), "a1-1\na1-2\na1-3\n");
    assert_eq!(text(&followed[turn..]), "a2-1\na2-2\na2-3\n");
    assert_eq!(kinds.last(), Some(&"end"));

    let resumed = app
        .client
        .get(app.path(&format!("/execute/processes/{id}/logs?follow=true")))
        .bearer_auth(TOKEN)
        .header("Last-Event-ID", &last_of_first)
        .send()
        .await
        .unwrap();
    let resumed = read_events(resumed).await;
    assert_eq!(resumed[0].0, "attempt", "{resumed:?}");
    assert_eq!(text(&resumed), "a2-1\na2-2\na2-3\n");
    app.stop().await;
}

/// The list shows the last 64 KiB of each stream; where that cut splits a
/// character, the list starts after it, as a callback's tail does, instead
/// of with U+FFFD.
#[tokio::test]
async fn the_lists_output_tail_never_starts_with_half_a_character() {
    let app = spawn_app().await;
    // 90,000 bytes of a 3-byte character: 65,536 is no multiple of 3.
    let code = "import sys; sys.stdout.write('\u{65e5}' * 30000)";
    let id = app
        .background(json!({ "code": code, "language": "python" }))
        .await;
    app.wait_terminal(&id, Duration::from_secs(10)).await;
    let (_, list) = app.get_json("/execute/processes").await;
    let p = list["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["process_id"] == id.as_str())
        .unwrap();
    let tail = p["stdout"].as_str().unwrap();
    assert!(!tail.contains('\u{fffd}'), "a split character shown");
    assert_eq!(tail.chars().count(), 65_536 / 3);
    assert_eq!(p["stdout_truncated"], true);
    app.stop().await;
}

/// A list page shows at most `--list-page-output-bytes` of output in all:
/// 1,000 rows of 64 KiB tails would be a response of 128 MiB. The rows
/// share it, each tail cut shorter is flagged, and one process still
/// shows all its output.
#[tokio::test]
async fn a_list_page_shares_its_output_budget_among_its_rows() {
    let app = spawn_app_with(|c| {
        c.list_output_bytes = 1000;
        c.list_page_output_bytes = 3000;
    })
    .await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        let id = app
            .background(json!({ "code": "print('x' * 1999)", "language": "python" }))
            .await;
        ids.push(id);
    }
    for id in &ids {
        app.wait_terminal(id, Duration::from_secs(20)).await;
    }
    let (_, list) = app.get_json("/execute/processes").await;
    let rows = list["processes"].as_array().unwrap();
    assert_eq!(rows.len(), 5);
    let shown: usize = rows
        .iter()
        .map(|p| p["stdout"].as_str().unwrap().len())
        .sum();
    assert!(shown <= 3000, "{shown} bytes of output in a page of 3000");
    for p in rows {
        assert!(!p["stdout"].as_str().unwrap().is_empty(), "{p}");
        assert_eq!(p["stdout_truncated"], true, "{p}");
    }
    let one = app.process(&ids[0]).await;
    assert_eq!(one["stdout"].as_str().unwrap().len(), 2000);
    assert_eq!(one["stdout_truncated"], false);
    let (_, info) = app.get_json("/info").await;
    assert_eq!(info["limits"]["list_page_output_bytes"], 3000, "{info}");
    app.stop().await;
}

/// The page's budget is counted as sent: a control character takes six
/// bytes escaped, and a 16 MiB page of them was a 100 MB response.
#[tokio::test]
async fn a_list_pages_output_budget_counts_escaped_control_characters_as_sent() {
    let app = spawn_app_with(|c| c.list_page_output_bytes = 30_000).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let code = "import sys; sys.stdout.write(chr(1) * 40000)";
        ids.push(
            app.background(json!({ "code": code, "language": "python" }))
                .await,
        );
    }
    for id in &ids {
        app.wait_terminal(id, Duration::from_secs(20)).await;
    }
    let response = app.get("/execute/processes").await;
    let body = response.text().await.unwrap();
    assert!(
        body.len() < 30_000 + 5_000,
        "a response of {} bytes for a page of 30000",
        body.len()
    );
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    for p in list["processes"].as_array().unwrap() {
        assert!(!p["stdout"].as_str().unwrap().is_empty(), "{p}");
        assert_eq!(p["stdout_truncated"], true, "{p}");
    }
    app.stop().await;
}

/// An operator's `sqlite3` holds the write lock past the busy timeout
/// while jobs end, a kill comes and a client submits. The submission gets
/// 503 `DATABASE_UNAVAILABLE` (it was a 500); the kill signals the running
/// job at once (its write failed first, with a 500, and the job ran on);
/// and the ends are written once the lock is gone (the rows stayed
/// `running` until a restart).
#[tokio::test]
async fn a_locked_database_delays_ends_and_kills_but_loses_neither() {
    let app = spawn_app().await;
    let ending = app
        .background(json!({ "code": "sleep 2; echo done", "language": "bash" }))
        .await;
    let killed = app
        .background(json!({ "code": "sleep 100", "language": "bash" }))
        .await;
    let pid = poll_until(
        Duration::from_secs(10),
        || app.process(&killed),
        |p| p["pid"].is_i64(),
    )
    .await["pid"]
        .as_i64()
        .unwrap();
    let mut lock = hold_write_lock(&app.db_path(), 12);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let kill_path = format!("/execute/kill/{killed}");
    let (kill, submitted) = tokio::join!(
        app.post_json(&kill_path, json!({})),
        app.client
            .post(app.path("/execute/background"))
            .bearer_auth(TOKEN)
            .json(&json!({ "code": "echo late", "language": "bash" }))
            .send(),
    );
    assert_eq!(kill.0, 200, "{}", kill.1);
    assert!(
        eventually(Duration::from_secs(3), || !alive(pid)).await,
        "the killed job runs on"
    );
    let submitted = submitted.unwrap();
    assert_eq!(submitted.status(), 503);
    assert_eq!(submitted.headers()["retry-after"], "1");
    let body: Value = submitted.json().await.unwrap();
    assert_eq!(body["code"], "DATABASE_UNAVAILABLE", "{body}");
    tokio::task::spawn_blocking(move || lock.wait().unwrap())
        .await
        .unwrap();
    let p = app.wait_terminal(&ending, Duration::from_secs(20)).await;
    assert_eq!(
        (p["status"].as_str(), p["stdout"].as_str()),
        (Some("completed"), Some("done\n")),
        "{p}"
    );
    let p = app.wait_terminal(&killed, Duration::from_secs(20)).await;
    assert_eq!(p["status"], "killed", "{p}");
    app.stop().await;
}

/// A queued row an operator edited by hand so that its `code` is no longer
/// UTF-8. The job ending before it is recorded (its end's transaction, which
/// claims the next job, failed on reading it back, and the end was never
/// written); the row fails saying why (a failed claim was committed, leaving
/// it `running` with no program; then every claim of its lane failed); and
/// the lane goes on with the jobs after it.
#[tokio::test]
async fn rows_edited_by_hand_do_not_hold_up_the_jobs_before_them() {
    let app = spawn_app_with(|c| c.background_concurrency = 1).await;
    let first = app
        .background(json!({ "code": "sleep 1; echo first", "language": "bash" }))
        .await;
    let unreadable = app
        .background(json!({ "code": "echo u", "language": "bash" }))
        .await;
    let db = app.db_path();
    let edit = format!(
        "UPDATE executions SET code = CAST(x'6563686f20e9' AS TEXT) WHERE process_id = '{unreadable}'"
    );
    tokio::task::spawn_blocking(move || sqlite3(&db, &edit))
        .await
        .unwrap();
    let p = app.wait_terminal(&first, Duration::from_secs(20)).await;
    assert_eq!(
        (p["status"].as_str(), p["stdout"].as_str()),
        (Some("completed"), Some("first\n")),
        "{p}"
    );
    let p = app
        .wait_terminal(&unreadable, Duration::from_secs(20))
        .await;
    assert_eq!(p["status"], "failed", "{p}");
    assert!(p["error"].as_str().unwrap().contains("not UTF-8"), "{p}");
    let after = app
        .background(json!({ "code": "echo after", "language": "bash" }))
        .await;
    let p = app.wait_terminal(&after, Duration::from_secs(20)).await;
    assert_eq!(p["stdout"], "after\n", "{p}");
    app.stop().await;
}

/// A queued row whose `env` was edited by hand into something that is not
/// a JSON object of strings fails, saying so, instead of running without
/// its environment.
#[tokio::test]
async fn a_stored_env_that_is_not_an_object_fails_the_job_saying_so() {
    let app = spawn_app_with(|c| c.background_concurrency = 1).await;
    let first = app
        .background(json!({ "code": "sleep 1", "language": "bash" }))
        .await;
    let bad_env = app
        .background(json!({ "code": "echo \"$K\"", "language": "bash", "env": { "K": "v" } }))
        .await;
    let db = app.db_path();
    let edit = format!("UPDATE executions SET env = '{{not json' WHERE process_id = '{bad_env}'");
    tokio::task::spawn_blocking(move || sqlite3(&db, &edit))
        .await
        .unwrap();
    app.wait_terminal(&first, Duration::from_secs(20)).await;
    let p = app.wait_terminal(&bad_env, Duration::from_secs(20)).await;
    assert_eq!(p["status"], "failed", "{p}");
    assert!(
        p["error"]
            .as_str()
            .unwrap()
            .contains("env is not a JSON object"),
        "{p}"
    );
    app.stop().await;
}

/// Readers of a job's live log that read nothing do not make the agent
/// hold the whole output for each of them: a look reads a page of at most
/// 256 KiB (or one chunk). With 10 idle readers of a job's 20 MB of
/// output the agent grew from 87 MiB to 413 MiB.
#[tokio::test]
async fn idle_log_readers_do_not_each_hold_the_whole_output() {
    use std::io::Write;

    let dir = tempfile::tempdir().unwrap();
    let port = crate::crash::free_port();
    let agent = crate::crash::Agent::start(dir.path(), port, &[]).await;
    let out = agent
        .post(
            "/execute",
            json!({ "code": "import sys; sys.stdout.write('a' * 10_000_000); sys.stderr.write('b' * 10_000_000)", "timeout": 60 }),
        )
        .await;
    assert_eq!(out["status"], "completed", "{}", out["error"]);
    let id = out["execution_id"].as_str().unwrap().to_string();
    let rss = || agent.rss_kb();
    let before = rss();
    let readers: Vec<std::net::TcpStream> = (0..10)
        .map(|_| {
            let mut socket = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            write!(
                socket,
                "GET /execute/processes/{id}/logs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
            )
            .unwrap();
            socket
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let grown = rss().saturating_sub(before);
    assert!(
        grown < 100 * 1024,
        "10 idle readers grew the agent by {grown} kB"
    );
    drop(readers);
    agent.terminate();
}
