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
