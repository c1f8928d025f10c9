//! `/health` (no auth) and `/info`.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::{timestamp_now, ApiError, AppState};
use crate::db::{callbacks, executions};
use crate::domain::Lane;

pub fn public_router() -> Router<AppState> {
    Router::new().route("/health", get(health))
}

pub fn protected_router() -> Router<AppState> {
    Router::new()
        .route("/info", get(info))
        .route("/metrics", get(metrics))
}

#[utoipa::path(get, path = "/health", tag = "execd", security(()), responses((status = 200, description = "{status: healthy, version, uptime_seconds}", body = crate::http::openapi::HealthOut), crate::http::openapi::Unavailable))]
pub(super) async fn health(State(state): State<AppState>) -> Json<Value> {
    Json(json!({
        "status": "healthy",
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": state.started.elapsed().as_secs_f64(),
        "timestamp": timestamp_now(),
    }))
}

#[utoipa::path(get, path = "/info", tag = "execd", responses((status = 200, description = "Version, languages with interpreter versions, limits", body = crate::http::openapi::InfoOut), crate::http::openapi::Errors))]
pub(super) async fn info(State(state): State<AppState>) -> Json<Value> {
    let languages: Vec<Value> = state
        .limits
        .languages
        .iter()
        .map(|i| json!({ "name": i.language.as_str(), "version": i.version, "path": i.path }))
        .collect();
    Json(json!({
        "name": "execd",
        "version": env!("CARGO_PKG_VERSION"),
        "commit": option_env!("EXECD_COMMIT"),
        "languages": languages,
        "limits": {
            "max_body_bytes": state.max_body_bytes,
            "max_connections": state.max_connections,
            "header_timeout": state.header_timeout.as_secs_f64(),
            "body_timeout": state.body_timeout.as_secs_f64(),
            "max_code_bytes": state.limits.max_code_bytes,
            "max_env_bytes": state.limits.max_env_bytes,
            "max_callback_headers_bytes": state.limits.max_callback_headers_bytes,
            "max_output_bytes": state.max_output_bytes,
            "max_timeout": state.limits.max_timeout.as_secs_f64(),
            "list_output_bytes": state.list_output_bytes,
            "list_page_output_bytes": state.list_page_output_bytes,
        },
        "default_working_dir": state.limits.default_workdir,
        "warm_python": state.warm_python,
        "uptime_seconds": state.started.elapsed().as_secs_f64(),
        "timestamp": timestamp_now(),
    }))
}

/// `GET /metrics`: Prometheus text, with the database's state read now.
#[utoipa::path(get, path = "/metrics", tag = "execd", responses((status = 200, description = "Prometheus text", content_type = "application/openmetrics-text", body = String), crate::http::openapi::Errors))]
pub(super) async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    use crate::metrics::{LaneLabels, RunLabels, StatusLabels};
    let m = crate::metrics::get();
    let counts = executions::counts(&state.db.readers).await?;
    let deliveries = callbacks::counts(&state.db.readers).await?;
    let text = m.encode_with(|m| {
        m.executions.clear();
        m.queue_depth.clear();
        m.running.clear();
        m.callbacks.clear();
        for lane in Lane::ALL {
            let labels = LaneLabels {
                lane: lane.as_str().into(),
            };
            m.queue_depth.get_or_create(&labels).set(0);
            m.running.get_or_create(&labels).set(0);
        }
        for c in counts {
            let labels = RunLabels {
                language: c.language,
                status: c.status.clone(),
            };
            m.executions.get_or_create(&labels).inc_by(c.n);
            let lane = LaneLabels { lane: c.lane };
            match c.status.as_str() {
                "queued" => m.queue_depth.get_or_create(&lane).inc_by(c.n),
                "running" => m.running.get_or_create(&lane).inc_by(c.n),
                _ => 0,
            };
        }
        for (status, n) in deliveries {
            m.callbacks.get_or_create(&StatusLabels { status }).set(n);
        }
    });
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}
