//! The status state machine of an execution.

use std::fmt;
use std::str::FromStr;

/// `queued → running → completed | failed | killed | timeout`; a queued row may
/// also be killed without running, and a lost one queued again. The moves
/// are enforced where they are written: each UPDATE names the status it
/// moves from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, utoipa::ToSchema)]
#[schema(rename_all = "lowercase")]
pub enum Status {
    Queued,
    Running,
    Completed,
    Failed,
    Killed,
    Timeout,
}

impl Status {
    pub const ALL: [Status; 6] = [
        Status::Queued,
        Status::Running,
        Status::Completed,
        Status::Failed,
        Status::Killed,
        Status::Timeout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Running => "running",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Killed => "killed",
            Status::Timeout => "timeout",
        }
    }

    pub fn is_terminal(self) -> bool {
        !matches!(self, Status::Queued | Status::Running)
    }

    /// The terminal status of a program that exited on its own.
    pub fn from_exit_code(code: i32) -> Status {
        if code == 0 {
            Status::Completed
        } else {
            Status::Failed
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error(
    "unknown status {0:?}: expected one of queued, running, completed, failed, killed, timeout"
)]
pub struct UnknownStatus(String);

impl FromStr for Status {
    type Err = UnknownStatus;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Status::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_round_trip_through_text() {
        for status in Status::ALL {
            assert_eq!(status.as_str().parse::<Status>().unwrap(), status);
        }
        assert!("done".parse::<Status>().is_err());
    }

    #[test]
    fn only_queued_and_running_are_not_terminal() {
        let open: Vec<_> = Status::ALL
            .into_iter()
            .filter(|s| !s.is_terminal())
            .collect();
        assert_eq!(open, vec![Status::Queued, Status::Running]);
    }

    #[test]
    fn exit_code_zero_is_completed_and_anything_else_failed() {
        assert_eq!(Status::from_exit_code(0), Status::Completed);
        assert_eq!(Status::from_exit_code(1), Status::Failed);
        assert_eq!(Status::from_exit_code(-1), Status::Failed);
    }
}
