//! `/health` (no auth) and `/info`.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::{timestamp_now, AppState};

pub fn public_router() -> Router<AppState> {
    Router::new().route("/health", get(health))
}

pub fn protected_router() -> Router<AppState> {
    Router::new().route("/info", get(info))
}

async fn health(State(state): State<AppState>) -> Json<Value> {
    Json(json!({
        "status": "healthy",
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": state.started.elapsed().as_secs_f64(),
        "timestamp": timestamp_now(),
    }))
}

async fn info(State(state): State<AppState>) -> Json<Value> {
    let languages: Vec<Value> = state
        .limits
        .languages
        .iter()
        .map(|i| json!({ "name": i.language.as_str(), "version": i.version, "path": i.path }))
        .collect();
    Json(json!({
        "name": "execd",
        "version": env!("CARGO_PKG_VERSION"),
        "languages": languages,
        "limits": {
            "max_body_bytes": state.max_body_bytes,
            "max_code_bytes": state.limits.max_code_bytes,
            "max_output_bytes": state.max_output_bytes,
            "max_timeout": state.limits.max_timeout.as_secs_f64(),
            "list_output_bytes": state.list_output_bytes,
        },
        "default_working_dir": state.limits.default_workdir,
        "uptime_seconds": state.started.elapsed().as_secs_f64(),
        "timestamp": timestamp_now(),
    }))
}
