//! An execution's callback deliveries: their attempts, and redelivery.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use serde_json::{json, Value};
use sqlx::SqliteConnection;

use super::{timestamp_now, ApiError, AppState};
use crate::db::callbacks::{self, Hurried, Summary};
use crate::db::executions::{self, ExecutionRow};
use crate::delivery;
use crate::domain::Status;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/execute/processes/{id}/callback", get(list_attempts))
        .route(
            "/execute/processes/{id}/callback/redeliver",
            post(redeliver),
        )
}

/// A delivery as the API shows it; the process object carries the latest.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CallbackOut {
    pub webhook_id: String,
    pub url: String,
    /// pending | failed (retrying) | delivered | dead
    pub status: String,
    pub attempts: i64,
    pub next_attempt_at: Option<String>,
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    pub created_at: String,
    pub delivered_at: Option<String>,
}

impl From<Summary> for CallbackOut {
    fn from(s: Summary) -> Self {
        CallbackOut {
            webhook_id: s.id,
            url: s.url,
            status: s.status,
            attempts: s.attempts,
            next_attempt_at: s.next_attempt_at,
            last_status: s.last_status,
            last_error: s.last_error,
            created_at: s.created_at,
            delivered_at: s.delivered_at,
        }
    }
}

/// The latest delivery of an async execution, if one was queued.
pub async fn latest(
    conn: &mut SqliteConnection,
    row: &ExecutionRow,
) -> Result<Option<CallbackOut>, ApiError> {
    if row.callback_url.is_none() {
        return Ok(None);
    }
    let mut all = callbacks::deliveries(conn, &row.id).await?;
    Ok((!all.is_empty()).then(|| all.swap_remove(0).into()))
}

async fn find_async(state: &AppState, id: &str) -> Result<ExecutionRow, ApiError> {
    let row = executions::get(&state.db.readers, id)
        .await?
        .ok_or_else(|| ApiError::process_not_found(id))?;
    if row.callback_url.is_none() {
        return Err(ApiError::bad_request(
            "INVALID_REQUEST",
            format!("{id} has no callback: only /execute/async submissions do"),
        ));
    }
    Ok(row)
}

#[utoipa::path(get, path = "/execute/processes/{id}/callback", tag = "execd", params(("id" = String, Path, description = "The process_id or execution_id")), responses((status = 200, description = "Every delivery and attempt", body = serde_json::Value), (status = 404, description = "PROCESS_NOT_FOUND", body = crate::http::openapi::ErrorOut), crate::http::openapi::Errors))]
pub(super) async fn list_attempts(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let row = find_async(&state, &id).await?;
    // One read transaction: an attempt recorded between two reads showed
    // beside its delivery as it was before (`pending`, no attempts).
    let mut tx = state.db.readers.begin().await?;
    let deliveries: Vec<CallbackOut> = callbacks::deliveries(&mut *tx, &row.id)
        .await?
        .into_iter()
        .map(Into::into)
        .collect();
    let attempts: Vec<Value> = callbacks::attempts(&mut *tx, &row.id)
        .await?
        .into_iter()
        .map(|a| {
            json!({
                "webhook_id": a.callback_id,
                "attempt": a.attempt,
                "started_at": a.started_at,
                "duration_ms": a.duration_ms,
                "http_status": a.http_status,
                "outcome": a.outcome,
                "error": a.error,
                "response_body": a.response_body,
            })
        })
        .collect();
    Ok(Json(json!({
        "execution_id": row.id,
        "process_id": row.process_id,
        "callback_url": row.callback_url,
        "callback": deliveries.first(),
        "deliveries": deliveries,
        "attempts": attempts,
        "timestamp": timestamp_now(),
    })))
}

/// Queues a new delivery of a finished async execution's callback, or makes
/// a waiting one due now.
#[utoipa::path(post, path = "/execute/processes/{id}/callback/redeliver", tag = "execd", params(("id" = String, Path, description = "The process_id or execution_id")), responses((status = 200, description = "A delivery is due now", body = serde_json::Value), (status = 404, description = "PROCESS_NOT_FOUND", body = crate::http::openapi::ErrorOut), (status = 409, description = "EXECUTION_NOT_FINISHED", body = crate::http::openapi::ErrorOut), crate::http::openapi::Errors))]
pub(super) async fn redeliver(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let row = find_async(&state, &id).await?;
    if !row.status.parse::<Status>().is_ok_and(Status::is_terminal) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "EXECUTION_NOT_FINISHED",
            format!(
                "{id} is still {}; its callback is sent when it ends",
                row.status
            ),
        ));
    }
    let execution_id = row.id.clone();
    let cap = state.callback_output_bytes;
    let hurried = state
        .db
        .writer
        .write(move |c| {
            Box::pin(async move {
                let now = crate::db::now();
                let hurried = callbacks::hurry(c, &execution_id, &now).await?;
                if hurried == Hurried::Nothing {
                    delivery::enqueue(c, &execution_id, cap, None).await?;
                }
                Ok(hurried)
            })
        })
        .await?;
    state.deliverer.wake();
    let message = match hurried {
        Hurried::DueNow => "a delivery was already waiting; it is due now",
        Hurried::InFlight => {
            "an attempt of the waiting delivery is under way; should it fail, the next is due at once"
        }
        Hurried::Nothing => "a new delivery is queued",
    };
    Ok(Json(json!({
        "execution_id": row.id,
        "process_id": row.process_id,
        "callback": latest(&mut *state.db.readers.acquire().await?, &row).await?,
        "message": message,
        "timestamp": timestamp_now(),
    })))
}
