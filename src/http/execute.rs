//! The submitting routes: `/execute`, `/execute/background`, `/execute/async`,
//! `/commands/run`, `/commands/background`. Each stores the submission as a
//! queued row (the 200 means it is on disk), wakes its lane, and answers; the
//! sync ones then wait for the run to end.

use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::OwnedSemaphorePermit;

use super::processes::whole_output;
use super::{timestamp_now, ApiError, AppState, JsonBody};
use crate::db::executions::{self, Idempotency, Inserted, Queued, Run};
use crate::db::{self};
use crate::domain::{
    new_ids, seconds_between, CommandIn, ExecuteIn, Lane, Program, Status, Submission,
};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/execute", post(execute_sync))
        .route("/execute/background", post(execute_background))
        .route("/execute/async", post(execute_async))
        .route("/commands/run", post(command_sync))
        .route("/commands/background", post(command_background))
}

/// Extra time a sync request waits past the run's timeout and kill grace
/// (for a queued start and the final writes), or past its wait for a slot
/// if that is longer. The SDK gives up at timeout + 30 s.
const SYNC_SLACK: Duration = Duration::from_secs(20);

#[utoipa::path(post, path = "/execute", tag = "execd", request_body = crate::domain::ExecuteIn, responses((status = 200, description = "The run ended; `success` says how", body = crate::http::openapi::RunOut), (status = 408, description = "EXECUTION_TIMEOUT, partial output in details", body = crate::http::openapi::ErrorOut), (status = 409, description = "IDEMPOTENCY_KEY_REUSED; or SHUTTING_DOWN: the agent stopped while the run went on (it goes on)", body = crate::http::openapi::ErrorOut), crate::http::openapi::Errors))]
pub(super) async fn execute_sync(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: JsonBody<ExecuteIn>,
) -> Result<axum::response::Response, ApiError> {
    let submission = Submission::parse(body.value, Lane::Sync, &state.limits)?;
    run_to_end(&state, submission, idempotency(&headers, &body.hash)?).await
}

#[utoipa::path(post, path = "/commands/run", tag = "execd", request_body = crate::domain::CommandIn, responses((status = 200, description = "The command ended", body = crate::http::openapi::RunOut), (status = 408, description = "EXECUTION_TIMEOUT", body = crate::http::openapi::ErrorOut), (status = 409, description = "IDEMPOTENCY_KEY_REUSED; or SHUTTING_DOWN: the agent stopped while the run went on (it goes on)", body = crate::http::openapi::ErrorOut), crate::http::openapi::Errors))]
pub(super) async fn command_sync(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: JsonBody<CommandIn>,
) -> Result<axum::response::Response, ApiError> {
    let submission = Submission::parse_command(body.value, Lane::Sync, &state.limits)?;
    run_to_end(&state, submission, idempotency(&headers, &body.hash)?).await
}

#[utoipa::path(post, path = "/execute/background", tag = "execd", request_body = crate::domain::ExecuteIn, responses((status = 200, description = "Stored and queued", body = crate::http::openapi::BackgroundOut), (status = 409, description = "IDEMPOTENCY_KEY_REUSED", body = crate::http::openapi::ErrorOut), crate::http::openapi::Errors))]
pub(super) async fn execute_background(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: JsonBody<ExecuteIn>,
) -> Result<Json<Value>, ApiError> {
    let submission = Submission::parse(body.value, Lane::Background, &state.limits)?;
    let submitted = submit(&state, submission, idempotency(&headers, &body.hash)?).await?;
    Ok(Json(background_out(&submitted)))
}

#[utoipa::path(post, path = "/commands/background", tag = "execd", request_body = crate::domain::CommandIn, responses((status = 200, description = "Stored and queued", body = crate::http::openapi::BackgroundOut), (status = 409, description = "IDEMPOTENCY_KEY_REUSED", body = crate::http::openapi::ErrorOut), crate::http::openapi::Errors))]
pub(super) async fn command_background(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: JsonBody<CommandIn>,
) -> Result<Json<Value>, ApiError> {
    let submission = Submission::parse_command(body.value, Lane::Background, &state.limits)?;
    let submitted = submit(&state, submission, idempotency(&headers, &body.hash)?).await?;
    let mut out = background_out(&submitted);
    out["command"] = json!(submitted.command);
    // The contract's `pid`: none yet, as the answer comes once the row is
    // stored; the process object shows it once the program runs.
    out["pid"] = Value::Null;
    Ok(Json(out))
}

#[utoipa::path(post, path = "/execute/async", tag = "execd", request_body = crate::domain::ExecuteIn, responses((status = 200, description = "Stored and queued; the result is POSTed to callback_url", body = crate::http::openapi::AsyncOut), (status = 409, description = "IDEMPOTENCY_KEY_REUSED", body = crate::http::openapi::ErrorOut), crate::http::openapi::Errors))]
pub(super) async fn execute_async(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: JsonBody<ExecuteIn>,
) -> Result<Json<Value>, ApiError> {
    let submission = Submission::parse(body.value, Lane::Async, &state.limits)?;
    let submitted = submit(&state, submission, idempotency(&headers, &body.hash)?).await?;
    Ok(Json(json!({
        "execution_id": submitted.execution_id,
        "process_id": submitted.process_id,
        "status": submitted.status,
        "callback_url": submitted.callback_url,
        "message": "execution queued; the result will be POSTed to callback_url",
        "timestamp": timestamp_now(),
    })))
}

fn background_out(submitted: &Submitted) -> Value {
    // Claimed in its insert's transaction: it runs as the answer goes out.
    let status = match (&submitted.started_at, submitted.status.as_str()) {
        (Some(_), "queued") => "running",
        (_, status) => status,
    };
    let message = match status {
        "queued" => "process queued; see GET /execute/processes/{id}",
        _ => "process started; see GET /execute/processes/{id}",
    };
    json!({
        "process_id": submitted.process_id,
        "execution_id": submitted.execution_id,
        "name": submitted.name,
        "status": status,
        "start_time": submitted.started_at,
        "message": message,
        "timestamp": timestamp_now(),
    })
}

/// The `Idempotency-Key` header, if any, with the hash of the request body.
fn idempotency(headers: &HeaderMap, hash: &str) -> Result<Option<Idempotency>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= 255)
        .ok_or_else(|| {
            ApiError::bad_request(
                "INVALID_REQUEST",
                "the Idempotency-Key header must be 1 to 255 visible ASCII characters",
            )
        })?;
    Ok(Some(Idempotency {
        key: key.to_string(),
        request_hash: hash.to_string(),
    }))
}

/// What a submitting route answers with.
pub(super) struct Submitted {
    pub execution_id: String,
    pub process_id: String,
    pub status: String,
    pub name: Option<String>,
    /// When it was claimed: in the insert's own transaction, or (a replay)
    /// whenever that was; `None` while queued.
    pub started_at: Option<String>,
    pub callback_url: Option<String>,
    pub command: Option<String>,
}

/// Stores the submission as queued and wakes its lane; with an idempotency
/// key seen before, returns the execution that key created instead.
pub(super) async fn submit(
    state: &AppState,
    submission: Submission,
    idempotency: Option<Idempotency>,
) -> Result<Submitted, ApiError> {
    let (id, process_id) = new_ids();
    let lane = submission.lane;
    let created_at = db::now();
    let mut fresh = Submitted {
        execution_id: id.to_string(),
        process_id: process_id.to_string(),
        status: Status::Queued.to_string(),
        name: submission.name.clone(),
        started_at: None,
        callback_url: submission.callback.as_ref().map(|c| c.url.clone()),
        command: match &submission.program {
            Program::Command { command, .. } => Some(command.clone()),
            Program::Code { .. } => None,
        },
    };
    // With a free slot, the claim is in the insert's transaction: one
    // commit, and the job starts as soon as it is committed, while the
    // commit is synced. Its run directory and supervisor are made meanwhile,
    // from the moment it has a slot.
    let permit = state.runner.try_permit(lane);
    let claiming = permit.is_some();
    let queued = Queued {
        id,
        process_id,
        submission,
        idempotency,
        created_at,
    };
    let inserted = match permit {
        // Without a slot the insert is the only write, and shares its
        // statement with the other submissions arriving meanwhile.
        None => state
            .db
            .writer
            .write_merged(&state.db.queued, queued)
            .await
            .map(|inserted| (inserted, None)),
        Some(permit) => store_claiming(state, queued, permit).await,
    };
    if claiming && !matches!(inserted, Ok((Inserted::New(_), _))) {
        // Not stored, or a replay of another execution: this id never runs.
        state.runner.launcher().abandon(&fresh.execution_id);
    }
    let (inserted, started_at) = inserted?;
    let id = match inserted {
        Inserted::New(_) => {
            fresh.started_at = started_at;
            if !claiming {
                state.runner.wake(lane);
            }
            tracing::info!(execution_id = %fresh.execution_id, lane = lane.as_str(), "execution queued");
            return Ok(fresh);
        }
        Inserted::Existing {
            id,
            same_request: true,
        } => id,
        Inserted::Existing {
            id,
            same_request: false,
        } => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "IDEMPOTENCY_KEY_REUSED",
                "this Idempotency-Key was used with a different request",
            )
            .with_details(json!({ "execution_id": id })));
        }
    };
    let row = executions::get(&state.db.readers, &id)
        .await?
        .ok_or_else(|| ApiError::internal(format!("execution {id} vanished")))?;
    Ok(Submitted {
        execution_id: row.id,
        process_id: row.process_id,
        status: row.status,
        name: row.name,
        started_at: row.started_at,
        callback_url: row.callback_url,
        command: row.command,
    })
}

/// Stores `queued` with its lane's free slot: claimed in the insert's
/// transaction (this one, or the lane's oldest queued row when one waits),
/// its program started once that commits. Also returns when this one was
/// claimed, if it was.
async fn store_claiming(
    state: &AppState,
    queued: Queued,
    permit: OwnedSemaphorePermit,
) -> Result<(Inserted, Option<String>), db::WriteError> {
    let ours = queued.id.to_string();
    let lane = queued.submission.lane;
    let runner = state.runner.clone();
    runner
        .launcher()
        .prepare_ahead(&ours, Run::of(&queued.submission));
    let writer = state.db.writer.clone();
    state
        .db
        .writer
        .write(move |c| {
            Box::pin(async move {
                let now = db::now();
                let claim_as = executions::ClaimAs {
                    owner: runner.owner(),
                    now: &now,
                };
                let q = &queued;
                let mut inserted = executions::insert(
                    c,
                    &q.id,
                    &q.process_id,
                    &q.submission,
                    q.idempotency.as_ref(),
                    &q.created_at,
                    Some(claim_as),
                )
                .await?;
                let Inserted::New(claimed) = &mut inserted else {
                    return Ok((inserted, None));
                };
                // Stored claimed (its lane had no queued row), or else the
                // lane's oldest queued row is claimed.
                let jobs = match claimed.take() {
                    Some(job) => vec![*job],
                    None => executions::claim(c, lane, 1, runner.owner(), &now).await?,
                };
                let launcher = runner.launcher();
                launcher.prelaunch(&jobs, &writer);
                // The claim takes the lane's oldest queued row: when that
                // was not this one, this one waits for the claim loop.
                let mine = jobs.first().is_some_and(|j| j.id == ours);
                if !mine {
                    launcher.forget(&ours);
                }
                let started = jobs.first().filter(|_| mine).map(|j| j.started_at.clone());
                writer.after_commit(move || {
                    if let Some(job) = jobs.into_iter().next() {
                        runner.launch(lane, job, permit);
                    }
                    if !mine {
                        runner.wake(lane);
                    }
                });
                Ok((inserted, started))
            })
        })
        .await
}

/// Whether a sync run started within `--sync-start-within`.
pub(super) enum Started {
    /// Started, or ended already: the row as it was then.
    Yes(executions::ExecutionRow),
    /// Not started: every slot was busy all along, or the agent stopped
    /// first. It was killed unrun, so that a 503 is safe to retry (clients
    /// retry a 5xx) without the code running twice.
    No {
        code: &'static str,
        why: String,
        row: executions::ExecutionRow,
    },
}

/// Waits up to `--sync-start-within` for sync run `id` to start, and kills
/// it unrun if it has not. On a task of its own: a client that leaves (its
/// request dropped) must not leave a run to start later, whose retry would
/// run the code a second time.
pub(super) fn start_within(
    state: &AppState,
    id: &str,
) -> tokio::task::JoinHandle<Result<Started, ApiError>> {
    let (state, id) = (state.clone(), id.to_string());
    tokio::spawn(async move {
        let runner = &state.runner;
        let row = runner
            .wait_terminal(&id, state.sync_start_within)
            .await?
            .ok_or_else(|| ApiError::internal(format!("execution {id} vanished")))?;
        if row.status != "queued" {
            return Ok(Started::Yes(row));
        }
        let (code, why) = if runner.is_stopping() {
            (
                "SHUTTING_DOWN",
                "not started: the agent stopped first".to_string(),
            )
        } else {
            let within = state.sync_start_within.as_secs_f64();
            let why = format!(
                "not started within {within} s (--sync-start-within): every slot of the sync lane was busy"
            );
            ("EXECUTION_NOT_STARTED", why)
        };
        // Written whatever it takes (a locked database): a 503 for a run
        // that later starts would have its retry run the code twice. Given
        // up only at a stop: then it may run after the restart, and the
        // caller is told the run goes on, not to retry.
        let killed = runner
            .until_written(|| runner.kill_queued(&row, why.clone()))
            .await;
        match killed {
            Ok(true) => Ok(Started::No { code, why, row }),
            // Claimed just now, or the agent stops with it queued.
            Ok(false) | Err(_) => Ok(Started::Yes(row)),
        }
    })
}

/// What a caller whose run outlives the agent's stop is told.
pub(super) fn run_goes_on(execution_id: &str) -> String {
    format!(
        "the agent is shutting down; the run goes on (do not send it again): follow it with GET /execute/processes/{execution_id}"
    )
}

/// Submits, waits for the run to end, and answers with its result: 200 for
/// any ending of the program (`success` says how), 408 for a timeout.
async fn run_to_end(
    state: &AppState,
    submission: Submission,
    idempotency: Option<Idempotency>,
) -> Result<axum::response::Response, ApiError> {
    let wait = submission.timeout + state.kill_grace + SYNC_SLACK.max(state.sync_start_within);
    let deadline = tokio::time::Instant::now() + wait;
    let submitted = submit(state, submission, idempotency).await?;
    let id = &submitted.execution_id;
    let vanished = || ApiError::internal(format!("execution {id} vanished"));
    let runner = &state.runner;
    let mut row = match start_within(state, id)
        .await
        .map_err(ApiError::internal)??
    {
        Started::Yes(row) => row,
        Started::No { code, why, row } => {
            let message = format!("{why}; it will not run: retry later");
            return Err(
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, code, message).with_details(json!({
                    "status": "killed",
                    "execution_id": row.id,
                    "process_id": row.process_id,
                })),
            );
        }
    };
    // Started (or claimed just now): its end, or at a stop the row as it
    // is then.
    if !row.status.parse::<Status>().is_ok_and(Status::is_terminal) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        row = runner.wait_terminal(id, left).await?.ok_or_else(vanished)?;
    }
    let output = whole_output(
        &mut *state.db.readers.acquire().await?,
        &state.db.readers,
        &row,
    )
    .await?;
    let execution_time =
        seconds_between(row.started_at.as_deref(), row.completed_at.as_deref()).unwrap_or(0.0);
    let mut out = json!({
        "success": row.status == "completed",
        "status": row.status,
        "stdout_truncated": row.stdout_truncated,
        "stderr_truncated": row.stderr_truncated,
        "exit_code": row.exit_code,
        "execution_time": execution_time,
        "language": row.language,
        "error": row.error,
        "execution_id": row.id,
        "process_id": row.process_id,
        "timestamp": timestamp_now(),
    });
    if row.language == "command" {
        out["command"] = json!(row.command);
        out["pid"] = json!(row.pid);
    }
    let error = match row.status.as_str() {
        // Not a 5xx: a client would retry it and run the code a second time.
        "queued" | "running" if state.runner.is_stopping() => ApiError::new(
            StatusCode::CONFLICT,
            "SHUTTING_DOWN",
            run_goes_on(&row.id),
        ),
        "timeout" => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "EXECUTION_TIMEOUT",
            format!("execution timed out after {} s", row.timeout_ms as f64 / 1000.0),
        ),
        "queued" | "running" => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "EXECUTION_TIMEOUT",
            format!(
                "execution is still {} after waiting {} s; follow it with GET /execute/processes/{}",
                row.status,
                wait.as_secs(),
                row.id
            ),
        ),
        _ => return super::streamed::with_output(out, output),
    };
    // An error's details carry the output so far, whole.
    let [stdout, stderr] = output;
    out["stdout"] = Value::String(stdout.into_string().await?);
    out["stderr"] = Value::String(stderr.into_string().await?);
    Err(error.with_details(out))
}
