//! The process list, one process, and the four shapes of kill.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sqlx::SqliteConnection;

use super::streamed::Text;
use super::{parse_json, timestamp_now, ApiError, AppState, BoundedBody};
use crate::db::executions::{self, ExecutionRow, ListFilter};
use crate::db::output;
use crate::domain::{fit_json, json_size, seconds_between, Status, Stream};
use crate::runner::KillOutcome;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/execute/processes", get(list))
        .route("/processes", get(list_alias))
        .route("/execute/processes/{id}", get(one))
        .route("/execute/kill/{id}", post(kill_path))
        .route("/processes/{id}/kill", post(kill_processes_path))
        .route("/execute/kill", delete(kill_query_or_body))
}

/// A process as the API shows it (API.md, "The process object").
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ProcessOut {
    pub process_id: String,
    pub execution_id: String,
    pub name: Option<String>,
    #[schema(value_type = crate::domain::Status)]
    pub status: String,
    /// The attempt shown (1 unless a lost process was re-queued), of `max_attempts`.
    pub attempt: i64,
    pub max_attempts: i64,
    pub language: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    pub pid: Option<i64>,
    pub created_at: String,
    pub started_at: Option<String>,
    /// When the program itself started (its pid became known).
    pub spawned_at: Option<String>,
    pub completed_at: Option<String>,
    pub start_time: Option<String>,
    pub end_time: Option<String>,
    pub stdout: String,
    pub stderr: String,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub exit_code: Option<i64>,
    pub execution_time: Option<f64>,
    pub duration: Option<f64>,
    pub timeout: f64,
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
    /// The latest callback delivery of an async execution (null until it ends).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub callback: Option<super::callbacks::CallbackOut>,
}

/// How much output to show.
#[derive(Clone, Copy)]
pub enum OutputView {
    /// The last bytes of each stream.
    Tail(usize),
    /// None here: it is sent on its own (`whole_output`).
    Apart,
}

/// Output larger than this, per stream, is read a page at a time as the
/// answer is sent, not all at once before.
const WHOLE_AT_MOST: u64 = 1 << 20;

/// The two streams of `row`, whole, as an answer sends them (`streamed`):
/// a small one read now, a large one's chunks as they are now, to be read
/// while the answer is sent. On `conn`, in the transaction `row` was read in.
pub async fn whole_output(
    conn: &mut SqliteConnection,
    pool: &sqlx::SqlitePool,
    row: &ExecutionRow,
) -> Result<[Text; 2], ApiError> {
    let stdout = whole_stream(conn, pool, row, Stream::Stdout, row.stdout_bytes).await?;
    let stderr = whole_stream(conn, pool, row, Stream::Stderr, row.stderr_bytes).await?;
    Ok([stdout, stderr])
}

/// One stream of `whole_output`, of which the row counts `counted` bytes.
async fn whole_stream(
    conn: &mut SqliteConnection,
    pool: &sqlx::SqlitePool,
    row: &ExecutionRow,
    stream: Stream,
    counted: i64,
) -> Result<Text, ApiError> {
    let counted = u64::try_from(counted).unwrap_or(0);
    Ok(match counted > WHOLE_AT_MOST {
        true => Text::Pages(output::Pages::of(conn, pool, &row.id, row.attempt, stream).await?),
        false => Text::Whole(output::into_text(
            output::read(&mut *conn, &row.id, row.attempt, stream, counted).await?,
        )),
    })
}

/// The two streams of an execution as text (invalid UTF-8 replaced), with
/// their truncation flags. Read on `conn`: inside the transaction `row` was
/// read in, the output is the row's (a running job's pid, byte counts and
/// flags match what is shown).
pub async fn read_output(
    conn: &mut SqliteConnection,
    row: &ExecutionRow,
    view: OutputView,
) -> Result<[(String, bool); 2], ApiError> {
    Ok([
        read_stream(conn, row, Stream::Stdout, view).await?,
        read_stream(conn, row, Stream::Stderr, view).await?,
    ])
}

async fn read_stream(
    conn: &mut SqliteConnection,
    row: &ExecutionRow,
    stream: Stream,
    view: OutputView,
) -> Result<(String, bool), ApiError> {
    let (text, cut) = match view {
        OutputView::Tail(max) => {
            let (bytes, cut) =
                output::read_tail(&mut *conn, &row.id, row.attempt, stream, max).await?;
            // At most `max` as sent: escaped control characters take six.
            let (text, fitted) = fit_json(output::tail_text(&bytes, cut), max);
            (text, cut || fitted)
        }
        OutputView::Apart => (String::new(), false),
    };
    let flagged = match stream {
        Stream::Stdout => row.stdout_truncated,
        Stream::Stderr => row.stderr_truncated,
    };
    Ok((text, flagged || cut))
}

impl ProcessOut {
    /// The process `row` with its output and callback, read on `conn` (in
    /// the transaction `row` was read in).
    pub async fn load(
        conn: &mut SqliteConnection,
        row: ExecutionRow,
        view: OutputView,
    ) -> Result<ProcessOut, ApiError> {
        let [(stdout, stdout_truncated), (stderr, stderr_truncated)] =
            read_output(conn, &row, view).await?;
        let running = row.completed_at.is_none();
        let callback = super::callbacks::latest(conn, &row).await?;
        let elapsed = seconds_between(row.started_at.as_deref(), row.completed_at.as_deref());
        Ok(ProcessOut {
            execution_time: elapsed,
            duration: elapsed,
            start_time: row.started_at.clone(),
            end_time: row.completed_at.clone(),
            process_id: row.process_id,
            execution_id: row.id,
            name: row.name,
            status: row.status,
            attempt: row.attempt,
            max_attempts: row.max_attempts,
            language: row.language,
            command: row.command,
            pid: row.pid,
            created_at: row.created_at,
            started_at: row.started_at,
            spawned_at: row.spawned_at,
            completed_at: row.completed_at,
            stdout,
            stderr,
            stdout_truncated,
            stderr_truncated,
            exit_code: if running { None } else { row.exit_code },
            timeout: row.timeout_ms as f64 / 1000.0,
            error: row.error,
            callback_url: row.callback_url,
            callback,
        })
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct ListQuery {
    status: Option<String>,
    name: Option<String>,
    limit: Option<String>,
    offset: Option<String>,
    cursor: Option<String>,
}

const DEFAULT_LIMIT: i64 = 100;
const MAX_LIMIT: i64 = 1000;

fn parse_count(
    field: &str,
    value: Option<&str>,
    min: i64,
    max: i64,
) -> Result<Option<i64>, ApiError> {
    // Empty, as `?status=` and `?name=` are: not given.
    let Some(value) = value.filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    match value.parse::<i64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(Some(n)),
        _ => Err(ApiError::bad_request(
            "INVALID_REQUEST",
            format!("`{field}` must be a whole number from {min} to {max}"),
        )
        .with_details(json!({ "field": field, "value": value }))),
    }
}

#[utoipa::path(get, path = "/execute/processes", tag = "execd", params(("status" = Option<String>, Query, description = "queued|running|completed|failed|killed|timeout"), ("name" = Option<String>, Query), ("limit" = Option<String>, Query, pattern = r"^[0-9]*$", description = "1 to 1000, default 100 (empty: not given)"), ("offset" = Option<String>, Query, pattern = r"^[0-9]*$", description = "rows to skip (empty: not given)"), ("cursor" = Option<String>, Query, pattern = r"^[0-9]*$", description = "next_cursor of the previous page (empty: not given)")), responses((status = 200, description = "Newest first: {processes, count, next_cursor, timestamp}", body = crate::http::openapi::ListOut), crate::http::openapi::Errors))]
pub(super) async fn list(
    State(state): State<AppState>,
    Query(query): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let status = match query.status.as_deref().filter(|s| !s.is_empty()) {
        Some(s) => Some(s.parse::<Status>().map_err(|e| {
            ApiError::bad_request("INVALID_REQUEST", e.to_string())
                .with_details(json!({ "field": "status" }))
        })?),
        None => None,
    };
    if query.cursor.as_deref().is_some_and(|c| !c.is_empty())
        && query.offset.as_deref().is_some_and(|o| !o.is_empty())
    {
        return Err(ApiError::bad_request(
            "INVALID_REQUEST",
            "give either `cursor` or `offset`, not both",
        )
        .with_details(json!({ "field": "offset" })));
    }
    let filter = ListFilter {
        status,
        name: query.name.filter(|n| !n.is_empty()),
        before: parse_count("cursor", query.cursor.as_deref(), 1, i64::MAX)?,
        limit: parse_count("limit", query.limit.as_deref(), 1, MAX_LIMIT)?.unwrap_or(DEFAULT_LIMIT),
        offset: parse_count("offset", query.offset.as_deref(), 0, i64::MAX)?.unwrap_or(0),
    };
    // One read transaction: each row shown with its own output.
    let mut tx = state.db.readers.begin().await?;
    let rows = executions::list(&mut *tx, &filter).await?;
    let next_cursor = (rows.len() as i64 == filter.limit)
        .then(|| rows.last().map(|r| r.seq.to_string()))
        .flatten();
    // Each stream's tail is at most `list_output_bytes`, and the page's
    // budget is shared out as the rows come: what a row leaves unused
    // goes to the rows after it.
    let mut budget = state.list_page_output_bytes;
    let mut left = rows.len();
    let mut processes = Vec::with_capacity(rows.len());
    for row in rows {
        let share = budget / (2 * left);
        let view = OutputView::Tail(state.list_output_bytes.min(share));
        let process = ProcessOut::load(&mut tx, row, view).await?;
        budget = budget.saturating_sub(json_size(&process.stdout) + json_size(&process.stderr));
        left -= 1;
        processes.push(process);
    }
    Ok(Json(json!({
        "count": processes.len(),
        "processes": processes,
        "next_cursor": next_cursor,
        "timestamp": timestamp_now(),
    })))
}

#[utoipa::path(get, path = "/execute/processes/{id}", tag = "execd", params(("id" = String, Path, description = "The process_id or execution_id")), responses((status = 200, description = "The process, with all stored output", body = ProcessOut), (status = 404, description = "PROCESS_NOT_FOUND", body = crate::http::openapi::ErrorOut), crate::http::openapi::Errors))]
pub(super) async fn one(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<axum::response::Response, ApiError> {
    // One read transaction: the row shown with its own output.
    let mut tx = state.db.readers.begin().await?;
    let row = executions::get(&mut *tx, &id)
        .await?
        .ok_or_else(|| ApiError::process_not_found(&id))?;
    let output = whole_output(&mut tx, &state.db.readers, &row).await?;
    let process = ProcessOut::load(&mut tx, row, OutputView::Apart).await?;
    drop(tx);
    let object = serde_json::to_value(&process).map_err(ApiError::internal)?;
    super::streamed::with_output(object, output)
}

#[utoipa::path(post, path = "/execute/kill/{id}", tag = "execd", params(("id" = String, Path, description = "The process_id or execution_id")), responses((status = 200, description = "Killed, or already finished (nothing changed)", body = crate::http::openapi::KillOut), (status = 404, description = "PROCESS_NOT_FOUND", body = crate::http::openapi::ErrorOut), crate::http::openapi::Errors))]
pub(super) async fn kill_path(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    kill(&state, &id).await
}

/// `GET /processes`: the list, as another client family spells it.
#[utoipa::path(get, path = "/processes", tag = "execd", params(("status" = Option<String>, Query, description = "queued|running|completed|failed|killed|timeout"), ("name" = Option<String>, Query), ("limit" = Option<String>, Query, pattern = r"^[0-9]*$", description = "1 to 1000, default 100 (empty: not given)"), ("offset" = Option<String>, Query, pattern = r"^[0-9]*$", description = "rows to skip (empty: not given)"), ("cursor" = Option<String>, Query, pattern = r"^[0-9]*$", description = "next_cursor of the previous page (empty: not given)")), responses((status = 200, description = "The same as GET /execute/processes", body = crate::http::openapi::ListOut), crate::http::openapi::Errors))]
pub(super) async fn list_alias(
    state: State<AppState>,
    query: Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    list(state, query).await
}

/// `POST /processes/{id}/kill`: kill, as another client family spells it.
#[utoipa::path(post, path = "/processes/{id}/kill", tag = "execd", params(("id" = String, Path, description = "The process_id or execution_id")), responses((status = 200, description = "Killed, or already finished", body = crate::http::openapi::KillOut), (status = 404, description = "PROCESS_NOT_FOUND", body = crate::http::openapi::ErrorOut), crate::http::openapi::Errors))]
pub(super) async fn kill_processes_path(
    state: State<AppState>,
    id: Path<String>,
) -> Result<Json<Value>, ApiError> {
    kill_path(state, id).await
}

/// The body `DELETE /execute/kill` may carry instead of the query.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub(super) struct KillIn {
    /// The process_id or the execution_id.
    process_id: Option<String>,
    /// The same, spelled as the other id.
    execution_id: Option<String>,
}

#[utoipa::path(delete, path = "/execute/kill", tag = "execd", request_body(content = KillIn, description = "optional: the id in a JSON body, when the query has none"), params(("process_id" = Option<String>, Query, description = "or a JSON body {process_id}")), responses((status = 200, description = "Killed, or already finished", body = crate::http::openapi::KillOut), (status = 404, description = "PROCESS_NOT_FOUND", body = crate::http::openapi::ErrorOut), crate::http::openapi::Errors))]
pub(super) async fn kill_query_or_body(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
    BoundedBody(body): BoundedBody,
) -> Result<Json<Value>, ApiError> {
    // An empty id is no id.
    let given = |id: Option<&String>| id.filter(|id| !id.is_empty()).cloned();
    let from_query = given(query.get("process_id")).or_else(|| given(query.get("execution_id")));
    // A body given is a body checked, even when the query names the id.
    let from_body = match body.iter().all(u8::is_ascii_whitespace) {
        true => None,
        false => {
            let input: KillIn = parse_json(&body)?;
            given(input.process_id.as_ref()).or_else(|| given(input.execution_id.as_ref()))
        }
    };
    let id = from_query.or(from_body).ok_or_else(missing_process_id)?;
    kill(&state, &id).await
}

fn missing_process_id() -> ApiError {
    ApiError::bad_request(
        "MISSING_PARAMETER",
        "`process_id` is required, as a query parameter or in a JSON body",
    )
    .with_details(json!({ "field": "process_id" }))
}

async fn kill(state: &AppState, id: &str) -> Result<Json<Value>, ApiError> {
    let (row, message) = match state.runner.kill(id).await? {
        KillOutcome::NotFound => return Err(ApiError::process_not_found(id)),
        KillOutcome::AlreadyFinished(row) => {
            let message = format!(
                "the process had already finished ({}); nothing changed",
                row.status
            );
            (row, message)
        }
        KillOutcome::Done(row) if row.status == "killed" => (row, "process killed".to_string()),
        // The stop came first, or meanwhile: the kill may not be carried out.
        KillOutcome::Done(row)
            if matches!(row.status.as_str(), "queued" | "running")
                && state.runner.is_stopping() =>
        {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "SHUTTING_DOWN",
                "the agent is shutting down and the process has not ended: send the kill again once the agent is back",
            )
            .with_details(json!({
                "process_id": row.process_id,
                "execution_id": row.id,
                "status": row.status,
            })));
        }
        KillOutcome::Done(row) if matches!(row.status.as_str(), "queued" | "running") => (
            row,
            "kill requested; the process has not ended yet".to_string(),
        ),
        KillOutcome::Done(row) => {
            let message = format!(
                "the process finished ({}) before it could be killed",
                row.status
            );
            (row, message)
        }
    };
    Ok(Json(json!({
        "success": true,
        "process_id": row.process_id,
        "execution_id": row.id,
        "status": row.status,
        "message": message,
        "timestamp": timestamp_now(),
    })))
}
