//! Auth: static token, JWTs, the generated token file, and --no-auth.

use std::os::unix::fs::PermissionsExt;

use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::{json, Value};

use crate::helpers::*;

const PROTECTED: [(&str, &str); 9] = [
    ("GET", "/info"),
    ("GET", "/execute/processes"),
    ("GET", "/execute/processes/proc_x"),
    ("POST", "/execute"),
    ("POST", "/execute/background"),
    ("POST", "/execute/async"),
    ("POST", "/commands/run"),
    ("POST", "/execute/kill/proc_x"),
    ("DELETE", "/execute/kill?process_id=proc_x"),
];

async fn status_with(app: &TestApp, method: &str, path: &str, token: Option<&str>) -> (u16, Value) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut request = app.client.request(method, app.path(path)).json(&json!({}));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn every_route_but_health_needs_a_valid_token() {
    let app = spawn_app().await;
    let (status, health) = status_with(&app, "GET", "/health", None).await;
    assert_eq!(status, 200);
    assert_eq!(health["status"], "healthy");
    for (method, path) in PROTECTED {
        let (status, body) = status_with(&app, method, path, None).await;
        assert_eq!(status, 401, "{method} {path}");
        assert_eq!(body["code"], "AUTHENTICATION_REQUIRED");
        let (status, body) = status_with(&app, method, path, Some("wrong-token")).await;
        assert_eq!(status, 401, "{method} {path}");
        assert_eq!(body["code"], "INVALID_TOKEN");
        let (status, _) = status_with(&app, method, path, Some(TOKEN)).await;
        assert_ne!(status, 401, "{method} {path}");
    }
    app.stop().await;
}

#[tokio::test]
async fn jwts_signed_with_the_secret_and_not_expired_are_accepted() {
    let secret = "jwt-secret-for-tests-0123456789";
    let app = spawn_app_with(|c| {
        c.token = None;
        c.jwt_secret = Some(secret.into());
    })
    .await;
    let now = chrono::Utc::now().timestamp();
    let token = |key: &str, exp: i64| {
        encode(
            &Header::default(),
            &json!({ "sub": "client", "exp": exp }),
            &EncodingKey::from_secret(key.as_bytes()),
        )
        .unwrap()
    };
    let (ok, _) = status_with(&app, "GET", "/info", Some(&token(secret, now + 300))).await;
    assert_eq!(ok, 200);
    // An issuer's `aud` is no reason to refuse (it was: 401).
    let with_audience = encode(
        &Header::default(),
        &json!({ "sub": "client", "exp": now + 300, "aud": "sandbox" }),
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap();
    let (ok, _) = status_with(&app, "GET", "/info", Some(&with_audience)).await;
    assert_eq!(ok, 200, "a token with aud");
    let (expired, body) = status_with(&app, "GET", "/info", Some(&token(secret, now - 300))).await;
    assert_eq!(
        (expired, body["code"].as_str()),
        (401, Some("INVALID_TOKEN"))
    );
    let (forged, _) = status_with(
        &app,
        "GET",
        "/info",
        Some(&token("another-secret-entirely", now + 300)),
    )
    .await;
    assert_eq!(forged, 401);
    // Not valid before its `nbf` (it was accepted).
    let not_yet = encode(
        &Header::default(),
        &json!({ "sub": "client", "exp": now + 600, "nbf": now + 300 }),
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap();
    let (early, _) = status_with(&app, "GET", "/info", Some(&not_yet)).await;
    assert_eq!(early, 401, "a token before its nbf");
    app.stop().await;
}

/// The database holds env values and signature secrets: a data dir the
/// agent makes is its user's alone.
#[tokio::test]
async fn a_data_dir_the_agent_makes_is_private() {
    let parent = tempfile::tempdir().unwrap();
    let made = parent.path().join("new").join("data");
    let app = spawn_app_with(|c| c.data_dir = made.clone()).await;
    let (status, _) = app
        .post_json(
            "/execute",
            serde_json::json!({"code": "true", "language": "bash"}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        std::fs::metadata(&made).unwrap().permissions().mode() & 0o777,
        0o700
    );
    app.stop().await;
}

/// A data dir made by hand (or by an image's `mkdir`) is often 0755: the
/// database files in it are made private all the same, and an existing
/// one readable by others is made private at the start. They were 0644.
#[tokio::test]
async fn the_database_files_are_private_in_a_data_dir_made_by_hand() {
    let data = tempfile::tempdir().unwrap();
    std::fs::set_permissions(data.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mode = |name: &str| {
        std::fs::metadata(data.path().join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    let mut config = execd::config::Config::for_data_dir(data.path());
    config.token = Some(TOKEN.into());
    config.supervisor_bin = Some(env!("CARGO_BIN_EXE_execd").into());
    let app = start(config.clone(), tempfile::tempdir().unwrap()).await;
    let body = serde_json::json!({"code": "true", "language": "bash", "env": {"A": "secret"}});
    assert_eq!(app.post_json("/execute", body).await.0, 200);
    for name in ["execd.db", "execd.db-wal", "execd.db-shm"] {
        assert_eq!(mode(name), 0o600, "{name}");
    }
    app.stop().await;
    std::fs::set_permissions(
        data.path().join("execd.db"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let app = start(config, tempfile::tempdir().unwrap()).await;
    assert_eq!(mode("execd.db"), 0o600, "made private again");
    app.stop().await;
}

#[tokio::test]
async fn without_a_token_one_is_generated_kept_private_and_reused() {
    let app = spawn_app_with(|c| c.token = None).await;
    let path = app.data_dir.path().join("token");
    let token = std::fs::read_to_string(&path).unwrap();
    assert!(token.len() >= 32);
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let (status, _) = status_with(&app, "GET", "/info", Some(&token)).await;
    assert_eq!(status, 200);
    let (status, _) = status_with(&app, "GET", "/info", Some(TOKEN)).await;
    assert_eq!(status, 401);
    let data_dir = app.stop().await;
    let mut config = execd::config::Config::for_data_dir(data_dir.path());
    config.supervisor_bin = Some(env!("CARGO_BIN_EXE_execd").into());
    let app = start(config, data_dir).await;
    let (status, _) = status_with(&app, "GET", "/info", Some(&token)).await;
    assert_eq!(status, 200, "the same token after a restart");
    app.stop().await;
}

#[tokio::test]
async fn no_auth_serves_without_a_token_when_asked_for() {
    let app = spawn_app_with(|c| {
        c.token = None;
        c.no_auth = true;
    })
    .await;
    let (status, _) = status_with(&app, "GET", "/info", None).await;
    assert_eq!(status, 200);
    app.stop().await;
}
