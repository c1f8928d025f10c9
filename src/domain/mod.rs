//! Validated domain types: what a request means once it has passed the edge.
//! Past `Submission::parse`, nothing re-checks.

mod ids;
mod language;
mod status;
mod submission;

pub use ids::{new_ids, ExecutionId, ProcessId};
pub use language::{Interpreter, Language, Languages};
pub use status::Status;
pub use submission::{
    Callback, CommandIn, ExecuteIn, Lane, Limits, Program, Submission, SubmissionError,
};

/// One of a program's two output streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// Seconds between two stored timestamps (or from `from` to now).
pub fn seconds_between(from: Option<&str>, to: Option<&str>) -> Option<f64> {
    let parse = |t: &str| {
        chrono::DateTime::parse_from_rfc3339(t)
            .ok()
            .map(|t| t.with_timezone(&chrono::Utc))
    };
    let from = parse(from?)?;
    let to = match to {
        Some(t) => parse(t)?,
        None => chrono::Utc::now(),
    };
    Some(((to - from).num_microseconds().unwrap_or(0) as f64 / 1e6).max(0.0))
}
