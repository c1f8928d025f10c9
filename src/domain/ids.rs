//! Prefixed, time-ordered ids. An execution and its process share one ULID,
//! so `exec_X` and `proc_X` name the same run.

use std::fmt;

use ulid::Ulid;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ExecutionId(String);

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ProcessId(String);

/// A fresh pair of ids for one submission.
pub fn new_ids() -> (ExecutionId, ProcessId) {
    let ulid = Ulid::new().to_string().to_lowercase();
    (
        ExecutionId(format!("exec_{ulid}")),
        ProcessId(format!("proc_{ulid}")),
    )
}

impl ExecutionId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl ProcessId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ExecutionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for ProcessId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_two_ids_of_a_submission_share_their_ulid() {
        let (e, p) = new_ids();
        assert_eq!(
            e.as_str().strip_prefix("exec_"),
            p.as_str().strip_prefix("proc_")
        );
        assert_ne!(new_ids().0, e);
    }
}
