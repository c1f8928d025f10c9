//! The stop switches of the jobs this agent follows, so a kill can reach them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use crate::db::executions::Claimed;
use crate::db::Writer;

/// Why a running job is being stopped from outside.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum StopReason {
    /// Killed through the API: the supervisor ends the program.
    Killed,
    /// The agent is stopping: let go, the supervisor carries on.
    Shutdown,
}

/// The stop switches of the jobs this agent follows, by execution id, so a
/// kill can reach them. A claimed job's is registered as its claim commits
/// (its program may start then).
#[derive(Clone, Default)]
pub(super) struct Registry(Arc<Mutex<HashMap<String, Arc<Running>>>>);

impl Registry {
    /// The stop switch of `id`, registered if it was not.
    pub(super) fn handle(&self, id: &str) -> Arc<Running> {
        let mut running = self.0.lock().unwrap();
        running
            .entry(id.to_string())
            .or_insert_with(Running::new)
            .clone()
    }

    pub(super) fn get(&self, id: &str) -> Option<Arc<Running>> {
        self.0.lock().unwrap().get(id).cloned()
    }

    /// Drops `id`'s switch, waking whoever waits for its output: its end
    /// is written.
    pub(super) fn remove(&self, id: &str) {
        if let Some(running) = self.0.lock().unwrap().remove(id) {
            running.stored.notify_waiters();
        }
    }

    pub(super) fn all(&self) -> Vec<Arc<Running>> {
        self.0.lock().unwrap().values().cloned().collect()
    }

    /// Registers `jobs`, claimed in a write job of `writer`, once it commits.
    pub(super) fn register_on_commit(&self, jobs: &[Claimed], writer: &Writer) {
        if jobs.is_empty() {
            return;
        }
        let ids: Vec<String> = jobs.iter().map(|j| j.id.clone()).collect();
        let this = self.clone();
        writer.after_commit(move || {
            let mut running = this.0.lock().unwrap();
            for id in ids {
                running.insert(id, Running::new());
            }
        });
    }
}

/// A running job's stop switch.
pub(super) struct Running {
    /// Cancelled to stop following the job; `reason` says why.
    pub(super) stop: CancellationToken,
    pub(super) reason: Mutex<StopReason>,
    /// Notified when output of the job is stored, and at its end: live
    /// readers wait on it instead of asking the database every 50 ms.
    pub(super) stored: Arc<tokio::sync::Notify>,
}

impl Running {
    fn new() -> Arc<Running> {
        Arc::new(Running {
            stop: CancellationToken::new(),
            reason: Mutex::new(StopReason::Killed),
            stored: Arc::new(tokio::sync::Notify::new()),
        })
    }
}
