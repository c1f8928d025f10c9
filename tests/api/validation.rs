//! Bad input: every rule of API.md gets its status and code in the error
//! body, and the agent goes on serving.

use serde_json::{json, Value};

use crate::helpers::*;

/// Checks the error body of API.md on a response, and gives it.
async fn assert_error(response: reqwest::Response, status: u16, code: &str, what: &str) -> Value {
    assert_eq!(response.status().as_u16(), status, "{what}");
    assert!(response.headers().contains_key("x-request-id"), "{what}");
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "application/json",
        "{what}"
    );
    let path = response.url().path().to_string();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], code, "{what}: {body}");
    assert_eq!(body["error"], body["message"], "{what}");
    assert!(!body["error"].as_str().unwrap().is_empty(), "{what}");
    assert_eq!(body["path"], path.as_str(), "{what}");
    assert!(
        body["request_id"].is_string() && body["timestamp"].is_string(),
        "{what}"
    );
    assert!(body["details"].is_object(), "{what}");
    body
}

#[tokio::test]
async fn each_submission_rule_has_its_status_and_code() {
    let app = spawn_app_with(|c| {
        c.max_code_bytes = 1000;
        c.max_env_bytes = 1000;
        c.max_callback_headers_bytes = 1000;
    })
    .await;
    let cb = "http://127.0.0.1:9/hook";
    let cases: Vec<(&str, Value, u16, &str)> = vec![
        // Headers no receiver would take (431): accepted, the callback
        // could never have been delivered.
        (
            "/execute/async",
            json!({ "code": "x", "callback_url": cb, "callback_headers": { "X-Big": "a".repeat(1000) } }),
            413,
            "PAYLOAD_TOO_LARGE",
        ),
        ("/execute", json!({}), 400, "MISSING_PARAMETER"),
        (
            "/execute",
            json!({ "code": null }),
            400,
            "MISSING_PARAMETER",
        ),
        ("/execute", json!({ "code": "" }), 400, "INVALID_REQUEST"),
        ("/execute", json!({ "code": 42 }), 400, "INVALID_REQUEST"),
        (
            "/execute",
            json!({ "code": "x".repeat(1001) }),
            413,
            "PAYLOAD_TOO_LARGE",
        ),
        (
            "/execute",
            json!({ "code": "x", "language": "cobol" }),
            400,
            "INVALID_REQUEST",
        ),
        (
            "/execute",
            json!({ "code": "x", "timeout": 0 }),
            400,
            "INVALID_REQUEST",
        ),
        (
            "/execute",
            json!({ "code": "x", "timeout": -5 }),
            400,
            "INVALID_REQUEST",
        ),
        (
            "/execute",
            json!({ "code": "x", "timeout": 10_000_000 }),
            400,
            "INVALID_REQUEST",
        ),
        (
            "/execute",
            json!({ "code": "x", "timeout": "soon" }),
            400,
            "INVALID_REQUEST",
        ),
        (
            "/execute",
            json!({ "code": "x", "working_dir": "/no/such/dir" }),
            400,
            "DIRECTORY_NOT_FOUND",
        ),
        (
            "/execute",
            json!({ "code": "x", "workdir": "/no/such/dir" }),
            400,
            "DIRECTORY_NOT_FOUND",
        ),
        (
            "/execute",
            json!({ "code": "x", "env": { "": "v" } }),
            400,
            "INVALID_REQUEST",
        ),
        (
            "/execute",
            json!({ "code": "x", "env": { "A=B": "v" } }),
            400,
            "INVALID_REQUEST",
        ),
        (
            "/execute",
            json!({ "code": "x", "env": { "A\u{0}": "v" } }),
            400,
            "INVALID_REQUEST",
        ),
        (
            "/execute",
            json!({ "code": "x", "env": { "A": 1 } }),
            400,
            "INVALID_REQUEST",
        ),
        (
            "/execute",
            json!({ "code": "x", "env": ["A"] }),
            400,
            "INVALID_REQUEST",
        ),
        (
            "/execute",
            json!({ "code": "x", "name": "n".repeat(300) }),
            400,
            "INVALID_REQUEST",
        ),
        (
            "/execute",
            json!(["not", "an", "object"]),
            400,
            "INVALID_REQUEST",
        ),
        (
            "/execute/background",
            json!({ "language": "python" }),
            400,
            "MISSING_PARAMETER",
        ),
        (
            "/execute/async",
            json!({ "code": "x" }),
            400,
            "MISSING_PARAMETER",
        ),
        (
            "/execute/async",
            json!({ "code": "x", "callback_url": "not a url" }),
            400,
            "INVALID_REQUEST",
        ),
        (
            "/execute/async",
            json!({ "code": "x", "callback_url": "/relative/path" }),
            400,
            "INVALID_REQUEST",
        ),
        (
            "/execute/async",
            json!({ "code": "x", "callback_url": "ftp://127.0.0.1/x" }),
            400,
            "INVALID_REQUEST",
        ),
        // What the URL parser would drop or keep silently: the URL posted
        // to would differ from the one shown, or show a password.
        (
            "/execute/async",
            json!({ "code": "x", "callback_url": "http://127.0.0.1:7/x\r\nX-Evil: 1" }),
            400,
            "INVALID_REQUEST",
        ),
        (
            "/execute/async",
            json!({ "code": "x", "callback_url": " http://127.0.0.1:7/x" }),
            400,
            "INVALID_REQUEST",
        ),
        (
            "/execute/async",
            json!({ "code": "x", "callback_url": "http://127.0.0.1:0/x" }),
            400,
            "INVALID_REQUEST",
        ),
        (
            "/execute/async",
            json!({ "code": "x", "callback_url": "http://user:pw@127.0.0.1:7/x" }),
            400,
            "INVALID_REQUEST",
        ),
        (
            "/execute/async",
            json!({ "code": "x", "callback_url": cb, "callback_headers": { "Content-Type": "text/plain" } }),
            400,
            "INVALID_REQUEST",
        ),
        (
            "/execute/async",
            json!({ "code": "x", "callback_url": cb, "callback_headers": { "x-hopx-signature": "forged" } }),
            400,
            "INVALID_REQUEST",
        ),
        (
            "/execute/async",
            json!({ "code": "x", "callback_url": cb, "callback_headers": { "Host": "evil" } }),
            400,
            "INVALID_REQUEST",
        ),
        (
            "/execute/async",
            json!({ "code": "x", "callback_url": cb, "callback_headers": { "bad header": "v" } }),
            400,
            "INVALID_REQUEST",
        ),
        (
            "/commands/run",
            json!({ "args": ["x"] }),
            400,
            "MISSING_PARAMETER",
        ),
        (
            "/commands/run",
            json!({ "command": "  " }),
            400,
            "INVALID_REQUEST",
        ),
        (
            "/commands/background",
            json!({ "command": "true", "timeout": 0 }),
            400,
            "INVALID_REQUEST",
        ),
        // `--max-env-bytes`, and what `exec` would refuse (E2BIG): these
        // used to be accepted and fail to start.
        (
            "/execute",
            json!({ "code": "x", "env": { "A": "v".repeat(1000) } }),
            413,
            "PAYLOAD_TOO_LARGE",
        ),
        (
            "/commands/run",
            json!({ "command": "true", "args": ["a".repeat(140_000)] }),
            413,
            "PAYLOAD_TOO_LARGE",
        ),
    ];
    for (path, body, status, code) in cases {
        let what = format!("POST {path} {body}");
        assert_error(app.post(path, body).await, status, code, &what).await;
    }
    // Nothing was stored by any of them.
    let (_, list) = app.get_json("/execute/processes").await;
    assert_eq!(list["count"], 0, "{list}");
    // And the agent still serves.
    let (status, out) = app
        .post_json(
            "/execute",
            json!({ "code": "echo fine", "language": "bash" }),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(out["stdout"], "fine\n");
    app.stop().await;
}

#[tokio::test]
async fn a_language_that_is_not_installed_is_a_400() {
    // An agent whose PATH holds bash alone.
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::os::unix::fs::symlink(which::which("bash").unwrap(), bin.join("bash")).unwrap();
    let port = crate::crash::free_port();
    let agent = crate::crash::Agent::start_with(&dir.path().join("data"), port, &[], |c| {
        c.env("PATH", &bin);
    })
    .await;
    let info = agent.get("/info").await;
    let installed: Vec<&str> = info["languages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert_eq!(installed, ["bash"], "{info}");
    let client = reqwest::Client::new();
    for language in ["python", "node", "golang", "bash"] {
        let response = client
            .post(format!("{}/execute", agent.url))
            .bearer_auth(TOKEN)
            .json(&json!({ "code": "echo hi", "language": language }))
            .send()
            .await
            .unwrap();
        if language == "bash" {
            assert_eq!(response.status(), 200, "the installed one runs");
            let out: Value = response.json().await.unwrap();
            assert_eq!(out["stdout"], "hi\n", "{out}");
            continue;
        }
        let body = assert_error(response, 400, "INVALID_REQUEST", language).await;
        assert!(
            body["error"].as_str().unwrap().contains("not installed"),
            "{language}: {body}"
        );
    }
    agent.terminate();
}

/// An agent (its data under `dir`) with `first` first on its PATH, and its
/// Python interpreter as `/info` shows it.
async fn with_first_on_path(
    dir: &std::path::Path,
    first: &std::path::Path,
) -> (crate::crash::Agent, Value) {
    let path = format!("{}:{}", first.display(), std::env::var("PATH").unwrap());
    let port = crate::crash::free_port();
    let agent = crate::crash::Agent::start_with(&dir.join("data"), port, &[], |c| {
        c.env("PATH", &path);
    })
    .await;
    let info = agent.get("/info").await;
    let python = info["languages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "python")
        .unwrap()
        .clone();
    (agent, python)
}

#[tokio::test]
async fn a_virtualenv_first_on_path_is_the_python_jobs_run() {
    // A venv's python3 is a link to its base interpreter: run through that
    // link's real path, it is the base Python, without the venv's packages.
    let dir = tempfile::tempdir().unwrap();
    let venv = dir.path().join("venv");
    let made = std::process::Command::new("python3")
        .args(["-m", "venv", "--without-pip"])
        .arg(&venv)
        .status()
        .unwrap();
    assert!(made.success());
    let lib = std::fs::read_dir(venv.join("lib")).unwrap().next().unwrap();
    let site = lib.unwrap().path().join("site-packages");
    std::fs::write(site.join("venvonly.py"), "X = 42\n").unwrap();
    let (agent, python) = with_first_on_path(dir.path(), &venv.join("bin")).await;
    assert!(
        python["path"]
            .as_str()
            .unwrap()
            .starts_with(venv.to_str().unwrap()),
        "{python}"
    );
    let out = agent
        .post(
            "/execute",
            json!({ "code": "import venvonly, sys; print(venvonly.X, sys.prefix)" }),
        )
        .await;
    assert_eq!(out["stdout"], format!("42 {}\n", venv.display()), "{out}");
    agent.terminate();
}

/// A shim first on PATH (a script, as pyenv's and asdf's are) is run once
/// at start to say where the interpreter behind it is; jobs run that
/// interpreter, not the shim.
#[tokio::test]
async fn a_shim_first_on_path_is_resolved_to_the_interpreter_behind_it() {
    let dir = tempfile::tempdir().unwrap();
    let real = std::process::Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .unwrap();
    let real = String::from_utf8(real.stdout).unwrap().trim().to_string();
    let shims = dir.path().join("shims");
    std::fs::create_dir(&shims).unwrap();
    let runs = dir.path().join("runs");
    let shim = shims.join("python3");
    std::fs::write(
        &shim,
        format!(
            "#!/bin/sh\necho run >> '{}'\nexec '{real}' \"$@\"\n",
            runs.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&shim, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let (agent, python) = with_first_on_path(dir.path(), &shims).await;
    assert_eq!(python["path"], real, "{python}");
    let at_start = std::fs::read_to_string(&runs).unwrap().lines().count();
    assert!(at_start >= 1, "the shim was asked at start");
    for _ in 0..2 {
        let out = agent
            .post(
                "/execute",
                json!({ "code": "import sys; print(sys.executable)" }),
            )
            .await;
        assert_eq!(out["stdout"], format!("{real}\n"), "{out}");
    }
    let after = std::fs::read_to_string(&runs).unwrap().lines().count();
    assert_eq!(after, at_start, "jobs ran through the shim");
    agent.terminate();
}

#[tokio::test]
async fn malformed_bodies_and_unknown_routes_get_the_json_error_body() {
    let app = spawn_app_with(|c| {
        c.max_body_bytes = 4096;
        c.max_code_bytes = 4096;
    })
    .await;
    let raw = |method: reqwest::Method, path: &str| {
        app.client
            .request(method, app.path(path))
            .bearer_auth(TOKEN)
    };
    let json_post = |body: &'static str| {
        raw(reqwest::Method::POST, "/execute")
            .header("content-type", "application/json")
            .body(body)
    };
    assert_error(
        json_post("{not json").send().await.unwrap(),
        400,
        "INVALID_JSON",
        "syntax",
    )
    .await;
    assert_error(
        json_post("").send().await.unwrap(),
        400,
        "INVALID_JSON",
        "empty",
    )
    .await;
    assert_error(
        json_post("{\"code\": \"x\"").send().await.unwrap(),
        400,
        "INVALID_JSON",
        "eof",
    )
    .await;
    let wrong_type = raw(reqwest::Method::POST, "/execute")
        .header("content-type", "text/plain")
        .body("{\"code\":\"x\"}");
    assert_error(
        wrong_type.send().await.unwrap(),
        415,
        "INVALID_REQUEST",
        "content type",
    )
    .await;
    let no_type = raw(reqwest::Method::POST, "/execute").body("{\"code\":\"x\"}");
    assert_error(
        no_type.send().await.unwrap(),
        415,
        "INVALID_REQUEST",
        "no content type",
    )
    .await;
    let big = raw(reqwest::Method::POST, "/execute").json(&json!({ "code": "x".repeat(10_000) }));
    assert_error(
        big.send().await.unwrap(),
        413,
        "PAYLOAD_TOO_LARGE",
        "body limit",
    )
    .await;
    let big = raw(reqwest::Method::POST, "/execute").json(&json!({ "code": "x".repeat(10_000) }));
    let body: Value = big.send().await.unwrap().json().await.unwrap();
    assert_eq!(
        (body["message"].as_str(), &body["details"]["limit"]),
        (
            Some("the request body is larger than the limit of 4096 bytes"),
            &json!(4096)
        ),
        "the limit is named: {body}"
    );
    assert_error(
        raw(reqwest::Method::GET, "/nope").send().await.unwrap(),
        404,
        "NOT_FOUND",
        "404",
    )
    .await;
    assert_error(
        raw(reqwest::Method::GET, "/execute").send().await.unwrap(),
        405,
        "METHOD_NOT_ALLOWED",
        "405",
    )
    .await;
    assert_error(
        raw(reqwest::Method::DELETE, "/execute/kill")
            .send()
            .await
            .unwrap(),
        400,
        "MISSING_PARAMETER",
        "kill without id",
    )
    .await;
    // A body of the wrong shape is refused even when the query has the id
    // (it was ignored: schemathesis found it).
    assert_error(
        raw(
            reqwest::Method::DELETE,
            "/execute/kill?process_id=proc_nope",
        )
        .header("content-type", "application/json")
        .body(r#"{"process_id": {}}"#)
        .send()
        .await
        .unwrap(),
        400,
        "INVALID_REQUEST",
        "kill with a bad body",
    )
    .await;
    for query in [
        "status=done",
        "limit=0",
        "limit=abc",
        "limit=100000",
        "cursor=-1",
        "offset=x",
    ] {
        let response = raw(reqwest::Method::GET, &format!("/execute/processes?{query}"))
            .send()
            .await
            .unwrap();
        assert_error(response, 400, "INVALID_REQUEST", query).await;
    }
    // An empty value is not given, for every parameter alike.
    let (status, list) = app
        .get_json("/execute/processes?status=&name=&limit=&offset=&cursor=")
        .await;
    assert_eq!(status, 200, "{list}");
    let (status, ran) = app
        .post_json("/execute", json!({ "code": "echo ok", "language": "bash" }))
        .await;
    assert_eq!(status, 200, "still serving");
    // A logs cursor is <attempt>.<stdout seq>.<stderr seq>, or the older
    // <stdout seq>.<stderr seq>; none of its numbers is negative.
    let logs = format!(
        "/execute/processes/{}/logs",
        ran["process_id"].as_str().unwrap()
    );
    for cursor in ["-5.-5", "1.-1.0", "1.2.3.4", "x.0"] {
        let response = raw(reqwest::Method::GET, &format!("{logs}?cursor={cursor}"))
            .send()
            .await
            .unwrap();
        assert_error(response, 400, "INVALID_REQUEST", cursor).await;
    }
    let response = raw(reqwest::Method::GET, "/execute/stream")
        .send()
        .await
        .unwrap();
    assert_error(response, 400, "INVALID_REQUEST", "stream without upgrade").await;
    for cursor in ["0.0", "1.0.0"] {
        let response = app.get(&format!("{logs}?cursor={cursor}")).await;
        assert_eq!(response.status(), 200, "{cursor}");
    }
    app.stop().await;
}

#[tokio::test]
async fn every_response_carries_a_request_id_and_a_given_one_is_echoed() {
    let app = spawn_app().await;
    let response = app.client.get(app.path("/health")).send().await.unwrap();
    assert!(response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .starts_with("req_"));
    let response = app
        .client
        .get(app.path("/health"))
        .header("x-request-id", "abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "abc-123");
    app.stop().await;
}

#[tokio::test]
async fn the_openapi_document_covers_every_route_and_the_error_body() {
    let app = spawn_app().await;
    let response = app
        .client
        .get(app.path("/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "served without a token");
    let doc: Value = response.json().await.unwrap();
    for (path, method) in [
        ("/execute", "post"),
        ("/execute/background", "post"),
        ("/execute/async", "post"),
        ("/execute/processes", "get"),
        ("/execute/processes/{id}", "get"),
        ("/execute/processes/{id}/logs", "get"),
        ("/execute/processes/{id}/callback", "get"),
        ("/execute/processes/{id}/callback/redeliver", "post"),
        ("/execute/kill/{id}", "post"),
        ("/execute/kill", "delete"),
        ("/processes/{id}/kill", "post"),
        ("/processes", "get"),
        ("/commands/run", "post"),
        ("/commands/background", "post"),
        ("/execute/stream", "get"),
        ("/health", "get"),
        ("/info", "get"),
        ("/metrics", "get"),
    ] {
        let operation = &doc["paths"][path][method];
        assert!(operation.is_object(), "{method} {path} missing");
        // Its 200 has a shape (schemathesis checks every answer against
        // it); 16 of 17 were `{}`, which any body fits.
        let ok = &operation["responses"]["200"]["content"];
        let shaped = ok
            .as_object()
            .is_some_and(|types| types.values().all(|t| t["schema"] != json!({})));
        if !matches!(
            path,
            "/execute/stream"
                | "/metrics"
                | "/execute/processes/{id}/callback"
                | "/execute/processes/{id}/callback/redeliver"
        ) {
            assert!(shaped, "{method} {path}: {ok}");
        }
        if path != "/health" {
            assert!(
                operation["responses"]["401"].is_object(),
                "{method} {path} documents 401"
            );
        }
    }
    let error = &doc["components"]["schemas"]["ErrorOut"]["properties"];
    for field in [
        "error",
        "code",
        "message",
        "request_id",
        "timestamp",
        "path",
        "details",
    ] {
        assert!(error[field].is_object(), "ErrorOut.{field}");
    }
    // The kill's JSON body is documented, and optional (the query may hold the id).
    let kill_body = &doc["paths"]["/execute/kill"]["delete"]["requestBody"];
    assert_eq!(kill_body["required"], false, "{kill_body}");
    assert!(doc["components"]["schemas"]["KillIn"]["properties"]["process_id"].is_object());
    // The documented bounds of `max_attempts` are the ones the agent enforces.
    for schema in ["ExecuteIn", "CommandIn"] {
        let field = &doc["components"]["schemas"][schema]["properties"]["max_attempts"];
        assert_eq!(
            (field["minimum"].as_i64(), field["maximum"].as_i64()),
            (Some(1), Some(10)),
            "{schema}"
        );
    }
    for (attempts, accepted) in [(0, false), (1, true), (10, true), (11, false)] {
        let body = json!({ "code": "true", "language": "bash", "max_attempts": attempts });
        let (status, out) = app.post_json("/execute/background", body).await;
        assert_eq!(
            status == 200,
            accepted,
            "max_attempts {attempts}: {status} {out}"
        );
    }
    app.stop().await;
}

/// Sends one frame to `GET /execute/stream` and returns the text frames the
/// agent answers with, until it closes (bounded).
async fn stream_frames(app: &TestApp, frame: Value) -> Vec<Value> {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;

    let url = app.url.replace("http://", "ws://") + "/execute/stream";
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    socket
        .send(Message::Text(frame.to_string().into()))
        .await
        .unwrap();
    let mut frames = Vec::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while let Ok(Some(Ok(message))) = tokio::time::timeout_at(deadline, socket.next()).await {
        match message {
            Message::Text(text) => frames.push(serde_json::from_str(&text).unwrap()),
            Message::Close(_) => break,
            _ => {}
        }
    }
    frames
}

/// An execute frame is a request body: past `--max-body-bytes` it is
/// refused, and nothing is stored; within it, it runs.
#[tokio::test]
async fn a_stream_frame_past_the_body_limit_is_refused_and_nothing_is_stored() {
    let app = spawn_app_with(|c| {
        c.max_body_bytes = 2_000;
        c.max_code_bytes = 1_000;
    })
    .await;
    let frame = |pad: usize| {
        json!({ "type": "execute", "code": "echo ${#PAD}", "language": "bash",
                "env": { "PAD": "x".repeat(pad) } })
    };
    let refused = stream_frames(&app, frame(50_000)).await;
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0]["type"], "error");
    assert_eq!(refused[0]["code"], "PAYLOAD_TOO_LARGE", "{refused:?}");
    let (_, list) = app.get_json("/execute/processes").await;
    assert_eq!(list["count"], 0, "stored: {list}");

    let ran = stream_frames(&app, frame(1_000)).await;
    let stdout: String = ran
        .iter()
        .filter(|f| f["type"] == "stdout")
        .map(|f| f["data"].as_str().unwrap())
        .collect();
    assert_eq!(stdout, "1000\n", "{ran:?}");
    app.stop().await;
}

/// A body that is not an object, or has a field of the wrong type, gets a
/// 400 that names the field in `details` and never repeats its value (an
/// env value or a secret). An array body used to fill the fields by
/// position, and ran.
#[tokio::test]
async fn a_body_of_the_wrong_shape_names_the_field_and_never_its_value() {
    let app = spawn_app().await;
    let array = app
        .client
        .post(app.path("/execute"))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body(r#"["print(42)","python",null,null,null,null,null,null,null,null,null,null]"#);
    let body = assert_error(array.send().await.unwrap(), 400, "INVALID_REQUEST", "array").await;
    assert!(
        body["error"].as_str().unwrap().contains("JSON object"),
        "{body}"
    );
    let cb = "http://127.0.0.1:9/hook";
    let cases = [
        (
            "/execute",
            json!({ "code": "x", "env": "A=SECRET_1" }),
            "env",
            "SECRET_1",
        ),
        (
            "/execute",
            json!({ "code": "x", "env": { "A": 5551234 } }),
            "env.A",
            "5551234",
        ),
        (
            "/execute",
            json!({ "code": "x", "timeout": "10" }),
            "timeout",
            "\"10\"",
        ),
        (
            "/execute/async",
            json!({ "code": "x", "callback_url": cb, "callback_signature_secret": 987654321 }),
            "callback_signature_secret",
            "987654321",
        ),
        (
            "/execute/async",
            json!({ "code": "x", "callback_url": cb, "callback_headers": { "X-A": 123456789 } }),
            "callback_headers.X-A",
            "123456789",
        ),
    ];
    for (path, input, field, value) in cases {
        let what = format!("POST {path} {input}");
        let body = assert_error(app.post(path, input).await, 400, "INVALID_REQUEST", &what).await;
        assert_eq!(body["details"]["field"], field, "{what}: {body}");
        assert!(
            body["error"].as_str().unwrap().contains(field),
            "{what}: {body}"
        );
        assert!(!body.to_string().contains(value), "{what}: {body}");
    }
    // A key given twice in `env` or `callback_headers` is refused, as a
    // field of the body given twice is (the last one was kept silently).
    for (path, raw) in [
        ("/execute", r#"{"code": "x", "env": {"A": "1", "A": "2"}}"#),
        (
            "/execute/async",
            r#"{"code": "x", "callback_url": "http://127.0.0.1:9/h", "callback_headers": {"X-A": "1", "X-A": "2"}}"#,
        ),
    ] {
        let request = app
            .client
            .post(app.path(path))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(raw);
        let body = assert_error(request.send().await.unwrap(), 400, "INVALID_REQUEST", raw).await;
        assert!(body["error"].as_str().unwrap().contains("twice"), "{body}");
    }
    // The stream's execute frame is parsed the same way.
    let frames = stream_frames(
        &app,
        json!({ "type": "execute", "code": "x", "env": "A=SECRET_WS" }),
    )
    .await;
    assert!(!frames.is_empty());
    assert!(
        !Value::from(frames.clone())
            .to_string()
            .contains("SECRET_WS"),
        "{frames:?}"
    );
    let (_, list) = app.get_json("/execute/processes").await;
    assert_eq!(list["count"], 0, "nothing ran: {list}");
    app.stop().await;
}

/// The kill's id and the list's paging: an empty id is a missing one (400,
/// not 404), and `cursor` with `offset` is refused, not both applied.
#[tokio::test]
async fn an_empty_kill_id_and_a_cursor_with_an_offset_are_400s() {
    let app = spawn_app().await;
    let delete = |query: &str, body: Option<&'static str>| {
        let request = app
            .client
            .delete(app.path(&format!("/execute/kill{query}")))
            .bearer_auth(TOKEN);
        match body {
            Some(body) => request
                .header("content-type", "application/json")
                .body(body),
            None => request,
        }
    };
    for (query, body) in [("?process_id=", None), ("", Some(r#"{"process_id": ""}"#))] {
        let what = format!("DELETE /execute/kill{query} {body:?}");
        let response = delete(query, body).send().await.unwrap();
        assert_error(response, 400, "MISSING_PARAMETER", &what).await;
    }
    let both = app
        .get("/execute/processes?limit=10&cursor=5&offset=3")
        .await;
    let body = assert_error(both, 400, "INVALID_REQUEST", "cursor and offset").await;
    assert_eq!(body["details"]["field"], "offset");
    app.stop().await;
}
