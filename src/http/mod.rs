//! The HTTP surface: one `AppState`, one router per resource, the error
//! envelope and auth as middleware, and the JSON body extractor.

mod auth;
mod callbacks;
mod error;
mod execute;
mod live;
pub mod openapi;
mod processes;
mod streamed;
mod system;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, FromRequest, Request};
use axum::http::{header, HeaderMap};
use axum::{middleware, Router};
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use crate::db::Db;
use crate::domain::Limits;
use crate::runner::Runner;

pub use auth::Auth;
pub use error::{ApiError, RequestId};

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

pub struct Inner {
    pub db: Db,
    pub runner: Arc<Runner>,
    pub deliverer: Arc<crate::delivery::Deliverer>,
    /// Output per stream in a callback payload.
    pub callback_output_bytes: usize,
    pub limits: Limits,
    pub auth: Auth,
    /// Bytes of each stream shown per process in lists.
    pub list_output_bytes: usize,
    /// Bytes of output shown in one list page, all its rows together.
    pub list_page_output_bytes: usize,
    /// Added to a sync run's timeout while its request waits for it.
    pub kill_grace: std::time::Duration,
    /// Longest a sync run waits for a slot before it is killed unrun.
    pub sync_start_within: std::time::Duration,
    pub max_body_bytes: usize,
    /// Client connections open at once.
    pub max_connections: usize,
    /// For a request's headers, and between requests.
    pub header_timeout: std::time::Duration,
    /// For a request's body, once its headers are in.
    pub body_timeout: std::time::Duration,
    pub max_output_bytes: u64,
    /// `--warm-python`, shown in `/info`.
    pub warm_python: bool,
    pub started: Instant,
    /// The WebSocket streams: hyper's graceful shutdown does not wait for
    /// an upgraded connection, and the stop waits for each to say that its
    /// run goes on.
    pub streams: tokio_util::task::TaskTracker,
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl AppState {
    pub fn new(inner: Inner) -> AppState {
        AppState(Arc::new(inner))
    }
}

/// The whole API.
pub fn router(state: AppState) -> Router {
    let protected = Router::new()
        .merge(execute::router())
        .merge(processes::router())
        .merge(callbacks::router())
        .merge(live::router())
        .merge(system::protected_router())
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::require));
    Router::new()
        .merge(system::public_router())
        .merge(openapi::router())
        .merge(protected)
        .layer(DefaultBodyLimit::max(state.max_body_bytes))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            refuse_while_stopping,
        ))
        // A panicking handler becomes a 500 with the error body, not a dropped connection.
        .layer(tower_http::catch_panic::CatchPanicLayer::new())
        .layer(middleware::from_fn(error::envelope))
        .with_state(state)
}

/// Serves `router` on `listener` until `stop` is cancelled, then lets each
/// connection finish its request and returns once all have closed. At most
/// `max_connections` are open at once (the rest wait in the listen backlog:
/// connections must not take the descriptors jobs and the database need),
/// and a client has `header_timeout` to send a request's headers, which
/// also closes a connection idle between requests.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    max_connections: usize,
    header_timeout: std::time::Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let connections = tokio_util::task::TaskTracker::new();
    let closed = tokio_util::sync::CancellationToken::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
            () = stop.cancelled() => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors, say: the moment passes; a
                    // connection's own error is the client's.
                    if !is_connection_error(&e) {
                        tracing::warn!(error = %e, "cannot accept a connection");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                    continue;
                }
            },
            () = stop.cancelled() => break,
        };
        // Each request carries the connection's slot: a WebSocket keeps it
        // for as long as its upgraded connection lives.
        let slot = ConnectionSlot {
            _held: Arc::new(slot),
        };
        let (router, request_slot) = (router.clone(), slot.clone());
        let service =
            hyper::service::service_fn(move |mut request: Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(request_slot.clone());
                tower::ServiceExt::oneshot(router.clone(), request)
            });
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades();
        let (stop, closed) = (stop.clone(), closed.clone());
        connections.spawn(async move {
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                () = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    tokio::select! {
                        _ = connection => {}
                        () = closed.cancelled() => {}
                    }
                }
            }
            drop(slot);
        });
    }
    drop(listener);
    // A request whose client stalls (a body never sent) does not hold the
    // stop up: past the grace its connection is closed.
    if !all_ended_within(&connections, STOP_GRACE).await {
        tracing::warn!(
            open = connections.len(),
            "connections still open at the stop: closed"
        );
        closed.cancel();
        connections.wait().await;
    }
}

/// Closes `tasks` to new ones and waits up to `grace` for the rest to end:
/// whether they all did.
pub async fn all_ended_within(
    tasks: &tokio_util::task::TaskTracker,
    grace: std::time::Duration,
) -> bool {
    tasks.close();
    tokio::time::timeout(grace, tasks.wait()).await.is_ok()
}

/// How long a stop waits for connections to finish their requests.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// A connection's place among `--max-connections`, carried by each of its
/// requests: the WebSocket keeps it while its upgraded connection lives.
#[derive(Clone)]
pub struct ConnectionSlot {
    _held: Arc<tokio::sync::OwnedSemaphorePermit>,
}

fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}

/// While the agent stops, new requests get a 503 with the error body; jobs
/// run on under their supervisors.
async fn refuse_while_stopping(
    axum::extract::State(state): axum::extract::State<AppState>,
    request: Request,
    next: middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    if state.runner.is_stopping() {
        return ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "SHUTTING_DOWN",
            "the agent is shutting down; running jobs go on and it will be back",
        )
        .into_response();
    }
    next.run(request).await
}

/// Now, as the API shows times: RFC 3339 UTC.
pub fn timestamp_now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// A JSON body, parsed into `T`, with a hash of its bytes (for idempotency).
/// Its rejections are our `ApiError`s, so a bad body gets the API's error body.
pub struct JsonBody<T> {
    pub value: T,
    pub hash: String,
}

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, ApiError> {
        if !is_json(request.headers()) {
            return Err(ApiError::new(
                axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "INVALID_REQUEST",
                "the request body must be JSON with Content-Type: application/json",
            ));
        }
        let path = request.uri().path().to_string();
        let BoundedBody(bytes) = BoundedBody::from_request(request, state).await?;
        let value = parse_json(&bytes)?;
        let hash = hex::encode(
            Sha256::new()
                .chain_update(path)
                .chain_update([0])
                .chain_update(&bytes)
                .finalize(),
        );
        Ok(JsonBody { value, hash })
    }
}

/// A request body of at most `--max-body-bytes`: a larger one is a 413
/// with the error body, at once when its `Content-Length` says so (before
/// a byte of it is waited for). One not all in within `--body-timeout` is
/// a 408, and its connection is closed (hyper keeps no connection whose
/// request body was left unread).
pub struct BoundedBody(pub axum::body::Bytes);

impl FromRequest<AppState> for BoundedBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, ApiError> {
        let limit = state.max_body_bytes;
        let too_large = || {
            ApiError::new(
                axum::http::StatusCode::PAYLOAD_TOO_LARGE,
                "PAYLOAD_TOO_LARGE",
                format!("the request body is larger than the limit of {limit} bytes"),
            )
            .with_details(serde_json::json!({ "limit": limit }))
        };
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|length| length > limit as u64) {
            return Err(too_large());
        }
        let timeout = state.body_timeout;
        let read = axum::body::Bytes::from_request(request, state);
        let Ok(read) = tokio::time::timeout(timeout, read).await else {
            return Err(ApiError::new(
                axum::http::StatusCode::REQUEST_TIMEOUT,
                "REQUEST_TIMEOUT",
                format!(
                    "the request body did not all arrive within {} s",
                    timeout.as_secs_f64()
                ),
            )
            .with_details(serde_json::json!({ "timeout": timeout.as_secs_f64() })));
        };
        read.map(BoundedBody).map_err(|rejection| {
            if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                return too_large();
            }
            ApiError::new(rejection.status(), "INVALID_REQUEST", rejection.body_text())
        })
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let mime = value
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

/// Parses a JSON body: malformed JSON is `INVALID_JSON`; a well-formed body
/// that is not an object, or of the wrong shape, `INVALID_REQUEST`, naming
/// the field (`details.field`) where one is at fault.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let invalid_json = |e: serde_json::Error| {
        ApiError::bad_request(
            "INVALID_JSON",
            format!("the request body is not valid JSON: {e}"),
        )
    };
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        // Well-formed but not an object (an array would fill the fields by
        // position): the shape is wrong. Else the JSON itself is.
        serde_json::from_slice::<serde::de::IgnoredAny>(bytes).map_err(invalid_json)?;
        return Err(ApiError::bad_request(
            "INVALID_REQUEST",
            "the request body must be a JSON object",
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let field = e.path().to_string();
        let e = e.into_inner();
        if e.classify() != serde_json::error::Category::Data {
            return invalid_json(e);
        }
        let why = value_free_text(&e);
        match field.as_str() {
            "." | "" => ApiError::bad_request(
                "INVALID_REQUEST",
                format!("the request body is not valid: {why}"),
            ),
            _ => ApiError::bad_request("INVALID_REQUEST", format!("`{field}` {why}"))
                .with_details(serde_json::json!({ "field": field })),
        }
    })?;
    // Trailing characters after the object.
    de.end().map_err(invalid_json)?;
    Ok(value)
}

/// A data error's text for a client, without serde's position suffix.
fn data_error_text(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.rfind(" at line ") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

/// What is wrong, in JSON's terms, and without the value at fault: it may
/// be an env value or a secret, which no response may show. serde words a
/// wrong value as "invalid type: string \"…\", expected a map".
fn value_free_text(e: &serde_json::Error) -> String {
    let text = data_error_text(e);
    let Some((got, expected)) = text.rsplit_once(", expected ") else {
        return text;
    };
    let Some(unexpected) = got
        .strip_prefix("invalid type: ")
        .or_else(|| got.strip_prefix("invalid value: "))
    else {
        return text;
    };
    let expected = match expected {
        "f64" => "a number",
        "u32" => "a whole number, 0 or more",
        "a map" => "an object",
        "a sequence" => "an array",
        other if other.starts_with("struct ") || other.contains("enum ") => "an object",
        other => other,
    };
    let kind = match unexpected.split([' ', '`', '"']).next().unwrap_or_default() {
        "floating" => "a number",
        "integer" => "an integer",
        "string" => "a string",
        "boolean" => "a boolean",
        "null" => "null",
        "map" => "an object",
        "sequence" => "an array",
        _ => "another value",
    };
    format!("must be {expected}, not {kind}")
}
