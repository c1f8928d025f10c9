//! Live output: `GET /execute/processes/{id}/logs` as server-sent events
//! (resumable with `Last-Event-ID`), and the WebSocket `GET /execute/stream`
//! that the hopx-ai SDK's `run_code_stream` speaks. Both read the stored
//! chunks from a cursor, so a reader that comes late or reconnects misses
//! nothing, and neither holds the job: a reader that leaves changes nothing.

use std::convert::Infallible;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use futures::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::json;

use super::execute::{run_goes_on, start_within, submit, Started};
use super::{parse_json, ApiError, AppState};
use crate::db::executions::{self, ExecutionRow};
use crate::db::output::{self, Piece};
use crate::domain::{seconds_between, ExecuteIn, Lane, Status, Submission};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/execute/processes/{id}/logs", get(logs))
        .route("/execute/stream", get(stream))
}

/// How often a follower looks for new output of a job this agent does not
/// follow (queued, or being recovered).
const POLL: Duration = Duration::from_millis(50);
/// How often a follower of a running job looks without being woken: a look
/// of last resort, so a silent job's readers cost next to nothing. It is
/// woken when output is stored, and when the agent lets the job go (at its
/// end, or at a stop of the agent).
const IDLE_POLL: Duration = Duration::from_secs(10);
/// Chunks read per look, and their bytes at most (past the first chunk;
/// chunks stored before chunks were cut at 64 KiB may hold up to 1 MiB): a
/// reader that reads slowly, or not at all, holds about this much, whatever
/// the output.
const PAGE: i64 = 256;
const PAGE_BYTES: usize = 256 << 10;

/// A reading position: an attempt, and the next chunk of each of its
/// streams. Shown as `<attempt>.<stdout>.<stderr>` (the SSE event id).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cursor {
    attempt: i64,
    stdout: i64,
    stderr: i64,
}

impl Cursor {
    /// The start of `attempt`.
    fn start(attempt: i64) -> Cursor {
        Cursor {
            attempt,
            ..Cursor::default()
        }
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.attempt, self.stdout, self.stderr)
    }
}

/// A cursor as a client gives it: `<attempt>.<stdout>.<stderr>`, or
/// `<stdout>.<stderr>` (the ids before attempts were in them: the current
/// attempt's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Given {
    attempt: Option<i64>,
    stdout: i64,
    stderr: i64,
}

impl Given {
    /// Where to go on from, the execution being at attempt `current`. (A
    /// cursor of an earlier attempt goes on with the `attempt` event and
    /// the current one from its start: the follower moves on to it.)
    fn resolve(self, current: i64) -> Cursor {
        Cursor {
            attempt: self.attempt.unwrap_or(current),
            stdout: self.stdout,
            stderr: self.stderr,
        }
    }
}

impl FromStr for Given {
    type Err = ApiError;

    fn from_str(s: &str) -> Result<Self, ApiError> {
        let bad = || {
            ApiError::bad_request(
                "INVALID_REQUEST",
                format!("cursor {s:?} is not <attempt>.<stdout seq>.<stderr seq>"),
            )
        };
        let numbers = s
            .split('.')
            .map(|n| n.parse::<i64>().ok().filter(|n| *n >= 0))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(bad)?;
        match numbers[..] {
            [attempt, stdout, stderr] => Ok(Given {
                attempt: Some(attempt),
                stdout,
                stderr,
            }),
            [stdout, stderr] => Ok(Given {
                attempt: None,
                stdout,
                stderr,
            }),
            _ => Err(bad()),
        }
    }
}

/// One step of following an execution.
enum Step {
    Pieces(Vec<(Piece, Cursor)>),
    /// A new attempt began (the last was lost): its output follows.
    Attempt(Cursor),
    End(Box<ExecutionRow>),
    /// The agent is stopping before the execution ended: the run goes on,
    /// to be followed again (from the last cursor) once the agent is back.
    Stopping,
}

/// Follows the output of one execution from a cursor until it ends.
struct Follower {
    state: AppState,
    id: String,
    cursor: Cursor,
    /// Wait for more while it runs; otherwise end at what is stored now.
    follow: bool,
}

impl Follower {
    async fn next(&mut self) -> Result<Step, ApiError> {
        match self.look().await {
            // The stop closes the database under a reader.
            Err(_) if self.state.runner.is_stopping() => Ok(Step::Stopping),
            step => step,
        }
    }

    async fn look(&mut self) -> Result<Step, ApiError> {
        loop {
            // Listening before looking: output stored while we look wakes
            // the wait below.
            let signal = self.state.runner.stored_signal(&self.id);
            let stored = signal.as_ref().map(|s| s.notified());
            let mut stored = std::pin::pin!(stored);
            if let Some(stored) = stored.as_mut().as_pin_mut() {
                stored.enable();
            }
            // The status first: output stored before a terminal status is
            // all the output there is.
            let row = executions::get(&self.state.db.readers, &self.id)
                .await?
                .ok_or_else(|| ApiError::process_not_found(&self.id))?;
            // Queued again after a lost attempt: the new one from its start.
            // (Never back: a claim given back lowers `attempt` while the
            // attempt it took never ran.)
            if row.attempt > self.cursor.attempt {
                let first = self.cursor.attempt == 0;
                self.cursor = Cursor::start(row.attempt);
                if !first {
                    return Ok(Step::Attempt(self.cursor));
                }
            }
            let c = self.cursor;
            let pieces = output::since(
                &self.state.db.readers,
                &self.id,
                c.attempt,
                c.stdout,
                c.stderr,
                PAGE,
                PAGE_BYTES,
            )
            .await?;
            if !pieces.is_empty() {
                let mut out = Vec::with_capacity(pieces.len());
                for piece in pieces {
                    match piece.stream.as_str() {
                        "stdout" => self.cursor.stdout = piece.seq + 1,
                        _ => self.cursor.stderr = piece.seq + 1,
                    }
                    out.push((piece, self.cursor));
                }
                return Ok(Step::Pieces(out));
            }
            let terminal = row.status.parse::<Status>().is_ok_and(Status::is_terminal);
            if terminal || !self.follow {
                return Ok(Step::End(Box::new(row)));
            }
            if self.state.runner.is_stopping() {
                return Ok(Step::Stopping);
            }
            match stored.as_mut().as_pin_mut() {
                Some(stored) => {
                    let _ = tokio::time::timeout(IDLE_POLL, stored).await;
                }
                None => tokio::time::sleep(POLL).await,
            }
        }
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct LogsQuery {
    follow: Option<bool>,
    cursor: Option<String>,
}

/// `GET /execute/processes/{id}/logs?follow=true`: `stdout` and `stderr`
/// events (`{stream, data, seq, timestamp}`, id = the cursor after it), an
/// `attempt` event where a retried run's next attempt begins, then one `end`
/// event with the status, exit code and error. A stop of the agent closes
/// the stream without `end`: the run goes on.
#[utoipa::path(get, path = "/execute/processes/{id}/logs", tag = "execd", params(("id" = String, Path, description = "The process_id or execution_id"), ("follow" = Option<bool>, Query), ("cursor" = Option<String>, Query, description = "<attempt>.<stdout seq>.<stderr seq>, as Last-Event-ID")), responses((status = 200, description = "Server-sent events: stdout, stderr, end", content_type = "text/event-stream", body = crate::http::openapi::LogEventOut), (status = 404, description = "PROCESS_NOT_FOUND", body = crate::http::openapi::ErrorOut), crate::http::openapi::Errors))]
pub(super) async fn logs(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(query): Query<LogsQuery>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let row = executions::get(&state.db.readers, &id)
        .await?
        .ok_or_else(|| ApiError::process_not_found(&id))?;
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let cursor = match resume.or(query.cursor) {
        Some(text) => text.parse::<Given>()?.resolve(row.attempt),
        None => Cursor::start(row.attempt),
    };
    let follower = Follower {
        state,
        id: row.id,
        cursor,
        follow: query.follow.unwrap_or(false),
    };
    let events = futures::stream::unfold(Some(follower), |follower| async move {
        let mut follower = follower?;
        let (events, rest) = match follower.next().await {
            Ok(Step::Pieces(pieces)) => (
                pieces
                    .into_iter()
                    .map(|(p, c)| piece_event(&p, c))
                    .collect(),
                Some(follower),
            ),
            Ok(Step::Attempt(at)) => (
                vec![Event::default()
                    .event("attempt")
                    .id(at.to_string())
                    .data(json!({ "attempt": at.attempt }).to_string())],
                Some(follower),
            ),
            Ok(Step::End(row)) => (vec![end_event(&row)], None),
            // No `end`: the stream closes, and a client resumes from its
            // last event id once the agent is back (as EventSource does).
            Ok(Step::Stopping) => (Vec::new(), None),
            Err(e) => (
                vec![Event::default().event("error").data(e.to_string())],
                None,
            ),
        };
        Some((futures::stream::iter(events), rest))
    })
    .flatten()
    .map(Ok);
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

fn piece_event(piece: &Piece, after: Cursor) -> Event {
    Event::default()
        .event(piece.stream.clone())
        .id(after.to_string())
        .data(
            json!({
                "stream": piece.stream,
                "data": String::from_utf8_lossy(&piece.data),
                "seq": piece.seq,
                "timestamp": piece.created_at,
            })
            .to_string(),
        )
}

fn end_event(row: &ExecutionRow) -> Event {
    Event::default().event("end").data(
        json!({
            "status": row.status,
            "exit_code": row.exit_code,
            "error": row.error,
            "execution_time": seconds_between(row.started_at.as_deref(), row.completed_at.as_deref()),
        })
        .to_string(),
    )
}

/// The first frame of `/execute/stream`.
#[derive(Debug, Deserialize)]
struct StreamIn {
    #[serde(rename = "type")]
    kind: Option<String>,
    #[serde(flatten)]
    execute: ExecuteIn,
}

/// `GET /execute/stream` (WebSocket): the client sends
/// `{"type":"execute", code, language, timeout, workdir, env}`; the agent runs
/// it in the sync lane and sends `stdout`/`stderr` frames `{data, timestamp}`,
/// then `result {exit_code, execution_time}` and `complete {success}`, or
/// `error {error, code}`. A GET that is no upgrade is 400 `INVALID_REQUEST`.
#[utoipa::path(get, path = "/execute/stream", tag = "execd", responses((status = 101, description = "WebSocket: send {type: execute, code, language, timeout, workdir, env}"), crate::http::openapi::Errors))]
pub(super) async fn stream(
    State(state): State<AppState>,
    slot: Option<axum::Extension<super::ConnectionSlot>>,
    ws: WebSocketUpgrade,
) -> Response {
    // A frame is a request body: `--max-body-bytes` holds here too.
    let limit = state.max_body_bytes;
    ws.max_message_size(limit)
        .max_frame_size(limit)
        .on_upgrade(move |socket| {
            let streams = state.streams.clone();
            streams.track_future(async move {
                run_stream(state, socket).await;
                // Its connection counts against `--max-connections` until here.
                drop(slot);
            })
        })
}

/// Whether a WebSocket read failed on a frame over the size limit.
fn is_too_large(e: &axum::Error) -> bool {
    std::error::Error::source(e)
        .and_then(|inner| inner.downcast_ref::<tungstenite::Error>())
        .is_some_and(|e| matches!(e, tungstenite::Error::Capacity(_)))
}

async fn run_stream(state: AppState, mut socket: WebSocket) {
    if let Err(e) = stream_one(&state, &mut socket).await {
        let (_, info) = e.public();
        let frame = json!({ "type": "error", "error": info.message, "code": info.code });
        let _ = socket.send(Message::Text(frame.to_string().into())).await;
    }
    let _ = socket.send(Message::Close(None)).await;
}

/// The first frame that is not a ping or a pong (those the socket answers itself).
async fn first_frame(socket: &mut WebSocket) -> Option<Result<Message, axum::Error>> {
    loop {
        match socket.recv().await {
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => return other,
        }
    }
}

async fn stream_one(state: &AppState, socket: &mut WebSocket) -> Result<(), ApiError> {
    let first = tokio::time::timeout(Duration::from_secs(30), first_frame(socket)).await;
    let text = match first {
        Ok(Some(Ok(Message::Text(text)))) => text,
        Ok(Some(Ok(Message::Binary(bytes)))) => String::from_utf8_lossy(&bytes).into_owned().into(),
        Ok(Some(Err(e))) if is_too_large(&e) => {
            return Err(ApiError::new(
                axum::http::StatusCode::PAYLOAD_TOO_LARGE,
                "PAYLOAD_TOO_LARGE",
                format!(
                    "the execute frame is larger than the limit of {} bytes",
                    state.max_body_bytes
                ),
            ))
        }
        Err(_) => {
            return Err(ApiError::bad_request(
                "INVALID_REQUEST",
                "no execute frame within 30 s",
            ))
        }
        _ => return Ok(()),
    };
    let input: StreamIn = parse_json(text.as_bytes())?;
    if input.kind.as_deref().is_some_and(|k| k != "execute") {
        return Err(ApiError::bad_request(
            "INVALID_REQUEST",
            "the first frame must have type \"execute\"",
        ));
    }
    let submission = Submission::parse(input.execute, Lane::Sync, &state.limits)?;
    let submitted = submit(state, submission, None).await?;
    // As for `/execute`: a run with no slot within `--sync-start-within` is
    // killed unrun (whether or not the client stays).
    let mut start = start_within(state, &submitted.execution_id);
    let mut follower = Follower {
        state: state.clone(),
        id: submitted.execution_id.clone(),
        cursor: Cursor::start(1),
        follow: true,
    };
    loop {
        let step = tokio::select! {
            step = follower.next() => step?,
            message = socket.recv() => match message {
                // The client left: the run goes on, recorded as usual.
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return Ok(()),
                Some(Ok(_)) => continue,
            },
        };
        match step {
            Step::Pieces(pieces) => {
                for (piece, _) in pieces {
                    let frame = json!({
                        "type": piece.stream,
                        "data": String::from_utf8_lossy(&piece.data),
                        "timestamp": piece.created_at,
                    });
                    if socket
                        .send(Message::Text(frame.to_string().into()))
                        .await
                        .is_err()
                    {
                        return Ok(());
                    }
                }
            }
            Step::Attempt(_) => {}
            Step::Stopping => {
                // As a sync request waiting then is answered: the run goes on.
                let frame = json!({
                    "type": "error",
                    "code": "SHUTTING_DOWN",
                    "error": run_goes_on(&submitted.execution_id),
                    "execution_id": submitted.execution_id,
                    "process_id": submitted.process_id,
                });
                let _ = socket.send(Message::Text(frame.to_string().into())).await;
                return Ok(());
            }
            Step::End(row) => {
                if row.status == "killed" && row.started_at.is_none() {
                    let started = tokio::time::timeout(Duration::from_secs(2), &mut start).await;
                    if let Ok(Ok(Ok(Started::No { code, why, .. }))) = started {
                        let frame = json!({
                            "type": "error",
                            "code": code,
                            "error": format!("{why}; it will not run: retry later"),
                            "execution_id": row.id,
                            "process_id": row.process_id,
                        });
                        let _ = socket.send(Message::Text(frame.to_string().into())).await;
                        return Ok(());
                    }
                }
                let execution_time =
                    seconds_between(row.started_at.as_deref(), row.completed_at.as_deref())
                        .unwrap_or(0.0);
                let frames = [
                    json!({ "type": "result", "exit_code": row.exit_code, "execution_time": execution_time,
                            "status": row.status, "execution_id": row.id }),
                    json!({ "type": "complete", "success": row.status == "completed" }),
                ];
                for frame in frames {
                    let _ = socket.send(Message::Text(frame.to_string().into())).await;
                }
                return Ok(());
            }
        }
    }
}
