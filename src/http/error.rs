//! The one API error type and the error body of API.md.
//!
//! Handlers return `ApiError`; its `IntoResponse` sets the status and attaches
//! an `ErrorInfo` extension. The `envelope` middleware then renders every
//! non-2xx response — ours and axum's own rejections (unknown route, wrong
//! method, body too large) alike — as the JSON error body, with the request
//! id, the path and a timestamp, which only the middleware knows.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use crate::domain::SubmissionError;

/// What an error response says; rendered by `envelope`.
#[derive(Clone, Debug)]
pub struct ErrorInfo {
    pub code: &'static str,
    pub message: String,
    pub details: Value,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A client error with its status, API.md code and details.
    #[error("{message}")]
    Client {
        status: StatusCode,
        code: &'static str,
        message: String,
        details: Value,
    },
    /// Anything unexpected: logged in full, shown as a bare 500.
    #[error("internal error: {0}")]
    Internal(String),
    /// A write the database refused (locked past the busy timeout by
    /// another process, the disk full): nothing of it was stored. Logged in
    /// full, shown as a 503 to retry.
    #[error("database write failed: {0}")]
    Unavailable(String),
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::Client {
            status,
            code,
            message: message.into(),
            details: Value::Null,
        }
    }

    pub fn with_details(self, details: Value) -> ApiError {
        match self {
            ApiError::Client {
                status,
                code,
                message,
                ..
            } => ApiError::Client {
                status,
                code,
                message,
                details,
            },
            other => other,
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn process_not_found(id: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "PROCESS_NOT_FOUND",
            format!("no process with id {id:?}"),
        )
        .with_details(json!({ "process_id": id }))
    }

    pub fn internal(e: impl std::fmt::Display) -> ApiError {
        ApiError::Internal(e.to_string())
    }
}

impl From<SubmissionError> for ApiError {
    fn from(e: SubmissionError) -> Self {
        let status = if e.too_large {
            StatusCode::PAYLOAD_TOO_LARGE
        } else {
            StatusCode::BAD_REQUEST
        };
        ApiError::Client {
            status,
            code: e.code,
            message: e.message,
            details: e.details,
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        ApiError::internal(e)
    }
}

impl From<crate::db::WriteError> for ApiError {
    fn from(e: crate::db::WriteError) -> Self {
        ApiError::Unavailable(e.to_string())
    }
}

impl From<crate::runner::RunnerError> for ApiError {
    fn from(e: crate::runner::RunnerError) -> Self {
        ApiError::internal(e)
    }
}

impl ApiError {
    /// What the client is told: status and error body (a server-side
    /// failure is logged in full here, and shown without its detail).
    pub fn public(self) -> (StatusCode, ErrorInfo) {
        match self {
            ApiError::Client {
                status,
                code,
                message,
                details,
            } => (
                status,
                ErrorInfo {
                    code,
                    message,
                    details,
                },
            ),
            ApiError::Internal(detail) => {
                tracing::error!(error = %detail, "internal error");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    ErrorInfo {
                        code: "INTERNAL_ERROR",
                        message: "internal error; see the agent's log".into(),
                        details: Value::Null,
                    },
                )
            }
            ApiError::Unavailable(detail) => {
                tracing::error!(error = %detail, "database write failed");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorInfo {
                        code: "DATABASE_UNAVAILABLE",
                        message: "the database could not be written (locked by another process, or the disk full); nothing was stored: try again".into(),
                        details: Value::Null,
                    },
                )
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, info) = self.public();
        let mut response = status.into_response();
        if info.code == "DATABASE_UNAVAILABLE" {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response.extensions_mut().insert(info);
        response
    }
}

/// A request's id: the client's `X-Request-ID` when it sent a sane one.
#[derive(Clone, Debug)]
pub struct RequestId(pub String);

fn request_id_of(request: &Request) -> String {
    request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| format!("req_{}", ulid::Ulid::new().to_string().to_lowercase()))
}

/// Gives every response an `X-Request-ID` and every error the JSON body.
pub async fn envelope(mut request: Request, next: Next) -> Response {
    let request_id = request_id_of(&request);
    let path = request.uri().path().to_string();
    let method = request.method().clone();
    request
        .extensions_mut()
        .insert(RequestId(request_id.clone()));
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    let status = response.status();
    let metrics = crate::metrics::get();
    metrics
        .http_requests
        .get_or_create(&crate::metrics::HttpLabels {
            method: method_label(&method).to_string(),
            status: status.as_u16().to_string(),
        })
        .inc();
    metrics
        .http_request_seconds
        .observe(started.elapsed().as_secs_f64());
    tracing::info!(
        %method, %path, status = status.as_u16(), request_id = %request_id,
        elapsed_ms = started.elapsed().as_secs_f64() * 1e3, "request"
    );
    let mut response = if status.is_client_error() || status.is_server_error() {
        render_error(response, &method, &path, &request_id).await
    } else {
        response
    };
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}

async fn render_error(
    response: Response,
    method: &Method,
    path: &str,
    request_id: &str,
) -> Response {
    let (mut parts, body) = response.into_parts();
    let info = match parts.extensions.remove::<ErrorInfo>() {
        Some(info) => info,
        None => {
            // One of axum's own rejections: keep its sentence, give it our shape.
            let text = axum::body::to_bytes(body, 16 << 10)
                .await
                .unwrap_or_default();
            synthesize(
                parts.status,
                method,
                path,
                String::from_utf8_lossy(&text).trim(),
            )
        }
    };
    let body = super::openapi::ErrorOut {
        error: info.message.clone(),
        code: info.code.to_string(),
        message: info.message,
        request_id: request_id.to_string(),
        timestamp: crate::http::timestamp_now(),
        path: path.to_string(),
        details: if info.details.is_null() {
            json!({})
        } else {
            info.details
        },
    };
    let body = serde_json::to_string(&body).expect("the error body serializes");
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, Body::from(body))
}

fn synthesize(status: StatusCode, method: &Method, path: &str, text: &str) -> ErrorInfo {
    let (code, fallback) = match status {
        StatusCode::NOT_FOUND => ("NOT_FOUND", format!("no route for {method} {path}")),
        StatusCode::METHOD_NOT_ALLOWED => (
            "METHOD_NOT_ALLOWED",
            format!("{method} is not allowed on {path}"),
        ),
        StatusCode::PAYLOAD_TOO_LARGE => {
            ("PAYLOAD_TOO_LARGE", "the request body is too large".into())
        }
        StatusCode::UNSUPPORTED_MEDIA_TYPE => (
            "INVALID_REQUEST",
            "the request body must be JSON with Content-Type: application/json".into(),
        ),
        StatusCode::UNAUTHORIZED => ("AUTHENTICATION_REQUIRED", "authentication required".into()),
        s if s.is_server_error() => ("INTERNAL_ERROR", "internal error".into()),
        _ => ("INVALID_REQUEST", "the request is not valid".into()),
    };
    let message = match status {
        // axum's texts for these are less clear than ours.
        StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED => fallback,
        _ if text.is_empty() => fallback,
        _ => text.to_string(),
    };
    ErrorInfo {
        code,
        message,
        details: Value::Null,
    }
}

/// The method as a metrics label: the standard ones by name, any other as
/// `other`. A client may send any token as a method, before any auth, and
/// each label value is a series kept for good.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}
