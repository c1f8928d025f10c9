//! The OpenAPI document, generated from the handlers' annotations and the
//! wire types (`GET /openapi.json`), and the error responses every route shares.

use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoResponses, Modify, OpenApi, ToSchema};

use super::AppState;

/// The error body of every non-2xx response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorOut {
    /// A human sentence.
    pub error: String,
    /// UPPER_SNAKE: INVALID_JSON, MISSING_PARAMETER, INVALID_REQUEST, DIRECTORY_NOT_FOUND,
    /// EXECUTION_TIMEOUT, PROCESS_NOT_FOUND, METHOD_NOT_ALLOWED, INTERNAL_ERROR, …
    pub code: String,
    /// The same sentence as `error` (one client family reads this one).
    pub message: String,
    pub request_id: String,
    pub timestamp: String,
    pub path: String,
    pub details: serde_json::Value,
}

// What the routes answer, for the document (and for schemathesis, which
// checks every response against it). The handlers build their JSON as
// values; these say its shape.

/// `POST /execute` and `POST /commands/run`: how the run ended.
#[allow(dead_code)]
#[derive(Serialize, ToSchema)]
pub struct RunOut {
    /// True exactly when `status` is `completed`.
    success: bool,
    #[schema(value_type = crate::domain::Status)]
    status: String,
    stdout: String,
    stderr: String,
    stdout_truncated: bool,
    stderr_truncated: bool,
    exit_code: Option<i64>,
    execution_time: f64,
    language: String,
    error: Option<String>,
    execution_id: String,
    process_id: String,
    timestamp: String,
    /// `/commands/run` only.
    command: Option<String>,
    /// `/commands/run` only.
    pid: Option<i64>,
}

/// `POST /execute/background` and `POST /commands/background`.
#[allow(dead_code)]
#[derive(Serialize, ToSchema)]
pub struct BackgroundOut {
    process_id: String,
    execution_id: String,
    name: Option<String>,
    /// `queued`, or `running` when it took a free slot.
    #[schema(value_type = crate::domain::Status)]
    status: String,
    /// When it was claimed; null while queued.
    start_time: Option<String>,
    message: String,
    timestamp: String,
    /// `/commands/background` only.
    command: Option<String>,
    /// `/commands/background` only: null (the process object has it once the program runs).
    pid: Option<i64>,
}

/// `POST /execute/async`.
#[allow(dead_code)]
#[derive(Serialize, ToSchema)]
pub struct AsyncOut {
    execution_id: String,
    process_id: String,
    #[schema(value_type = crate::domain::Status)]
    status: String,
    callback_url: String,
    message: String,
    timestamp: String,
}

/// `GET /execute/processes` (and `GET /processes`), newest first.
#[allow(dead_code)]
#[derive(Serialize, ToSchema)]
pub struct ListOut {
    processes: Vec<super::processes::ProcessOut>,
    count: i64,
    /// Give it as `cursor` for the next page; null on the last.
    next_cursor: Option<String>,
    timestamp: String,
}

/// The kill routes.
#[allow(dead_code)]
#[derive(Serialize, ToSchema)]
pub struct KillOut {
    success: bool,
    process_id: String,
    execution_id: String,
    /// `killed`; or, for a process that had finished already, how it ended.
    #[schema(value_type = crate::domain::Status)]
    status: String,
    message: String,
    timestamp: String,
}

/// One server-sent event of `GET /execute/processes/{id}/logs`.
#[allow(dead_code)]
#[derive(Serialize, ToSchema)]
pub struct LogEventOut {
    /// `stdout`, `stderr`, `attempt`, `end` or `error`.
    event: Option<String>,
    /// JSON: `{stream, data, seq, timestamp}` for output, `{attempt}`, or
    /// `{status, exit_code, error, execution_time}` for `end`.
    data: String,
    /// The cursor after this event, `<attempt>.<stdout seq>.<stderr seq>`:
    /// send it back as `Last-Event-ID` to resume.
    id: Option<String>,
}

/// `GET /health`.
#[allow(dead_code)]
#[derive(Serialize, ToSchema)]
pub struct HealthOut {
    /// `healthy`.
    status: String,
    version: String,
    uptime_seconds: f64,
    timestamp: String,
}

/// An installed language, in `GET /info`.
#[allow(dead_code)]
#[derive(Serialize, ToSchema)]
pub struct LanguageOut {
    name: String,
    path: String,
    version: String,
}

/// `GET /info`.
#[allow(dead_code)]
#[derive(Serialize, ToSchema)]
pub struct InfoOut {
    name: String,
    version: String,
    /// The commit built, when built from a git checkout.
    commit: Option<String>,
    languages: Vec<LanguageOut>,
    /// Each configured limit, by name (bytes, or seconds for `max_timeout`).
    limits: std::collections::BTreeMap<String, f64>,
    default_working_dir: String,
    /// Whether Python jobs are forked from a warm interpreter (`--warm-python`).
    warm_python: bool,
    uptime_seconds: f64,
    timestamp: String,
}

/// The errors any authenticated route may answer with.
#[allow(dead_code)]
#[derive(IntoResponses)]
pub enum Errors {
    #[response(
        status = 400,
        description = "Bad input: INVALID_JSON, MISSING_PARAMETER, INVALID_REQUEST, DIRECTORY_NOT_FOUND"
    )]
    BadRequest(ErrorOut),
    #[response(status = 401, description = "AUTHENTICATION_REQUIRED or INVALID_TOKEN")]
    Unauthorized(ErrorOut),
    #[response(status = 405, description = "METHOD_NOT_ALLOWED")]
    MethodNotAllowed(ErrorOut),
    #[response(
        status = 408,
        description = "REQUEST_TIMEOUT: the body did not all arrive within `--body-timeout`; the connection is closed"
    )]
    TimedOut(ErrorOut),
    #[response(
        status = 413,
        description = "PAYLOAD_TOO_LARGE: the body or the code is over its limit"
    )]
    TooLarge(ErrorOut),
    #[response(status = 415, description = "The body is not JSON")]
    NotJson(ErrorOut),
    #[response(status = 500, description = "INTERNAL_ERROR")]
    Internal(ErrorOut),
    #[response(
        status = 503,
        description = "SHUTTING_DOWN: the agent is stopping; DATABASE_UNAVAILABLE: a write failed (locked by another process, disk full), nothing stored, retry"
    )]
    Unavailable(ErrorOut),
}

/// The errors `/health` may answer with.
#[allow(dead_code)]
#[derive(IntoResponses)]
pub enum Unavailable {
    #[response(status = 503, description = "SHUTTING_DOWN: the agent is stopping")]
    Unavailable(ErrorOut),
}

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The JSON body of `DELETE /execute/kill` is optional (the id may come in
/// the query instead), which `request_body` has no way to say for a body
/// that is not `null` when given.
struct OptionalKillBody;

impl Modify for OptionalKillBody {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let body = openapi
            .paths
            .paths
            .get_mut("/execute/kill")
            .and_then(|item| item.delete.as_mut())
            .and_then(|op| op.request_body.as_mut());
        if let Some(body) = body {
            body.required = Some(utoipa::openapi::Required::False);
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "execd",
        description = "A durable execution agent with a HopX-compatible REST API. Every route but /health and /openapi.json needs `Authorization: Bearer <token>`."
    ),
    paths(
        super::execute::execute_sync,
        super::execute::execute_background,
        super::execute::execute_async,
        super::execute::command_sync,
        super::execute::command_background,
        super::processes::list,
        super::processes::list_alias,
        super::processes::one,
        super::processes::kill_path,
        super::processes::kill_processes_path,
        super::processes::kill_query_or_body,
        super::callbacks::list_attempts,
        super::callbacks::redeliver,
        super::live::logs,
        super::live::stream,
        super::system::health,
        super::system::info,
        super::system::metrics,
    ),
    components(schemas(ErrorOut, super::processes::ProcessOut, super::callbacks::CallbackOut)),
    modifiers(&BearerAuth, &OptionalKillBody),
    security(("bearer" = []))
)]
pub struct ApiDoc;

/// `GET /openapi.json` (no auth: it holds no secret).
pub fn router() -> Router<AppState> {
    Router::new().route("/openapi.json", get(|| async { Json(ApiDoc::openapi()) }))
}
