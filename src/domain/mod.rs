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

/// The bytes `c` takes in a JSON string: control characters are escaped,
/// most as `\u00XX` (six bytes for one).
fn json_len(c: char) -> usize {
    match c {
        '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
        c if (c as u32) < 0x20 => 6,
        c => c.len_utf8(),
    }
}

/// The bytes `text` takes as a JSON string's contents.
pub fn json_size(text: &str) -> usize {
    text.chars().map(json_len).sum()
}

/// The end of `text` that takes at most `cap` bytes in a JSON body, and
/// whether that cut anything: output is capped as sent, so that output of
/// control characters cannot make a body six times its cap.
pub fn fit_json(text: String, cap: usize) -> (String, bool) {
    let (mut size, mut start) = (0, text.len());
    for (at, c) in text.char_indices().rev() {
        size += json_len(c);
        if size > cap {
            return (text[start..].to_string(), true);
        }
        start = at;
    }
    (text, false)
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
