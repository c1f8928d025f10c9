//! execd: a durable execution agent with a HopX-compatible REST API.
//!
//! A tour, following one submission:
//! - [`http`] parses the request into a [`domain::Submission`] at the edge and
//!   stores it as a `queued` row through the [`db`] writer (one connection,
//!   group commits); the 200 is sent only once the row is on disk.
//! - [`runner`] has a claim loop per lane (sync, background, async), each with
//!   its own concurrency limit. A loop is woken in-process by the submission,
//!   claims queued rows in one statement, and runs each program as a child in
//!   its own process group, streaming its output into `output_chunks`.
//! - The terminal status is written fenced by owner (this boot) and attempt,
//!   so a stale runner can never overwrite a newer state.
//! - The terminal status of an async execution and its callback row (the
//!   outbox, payload frozen) are one transaction; [`delivery`] claims due
//!   callbacks with a lease, signs and POSTs them, and retries on a schedule.
//! - [`app`] wires it together: [`app::serve`] takes a listener and a shutdown
//!   future, which is how `main` and the integration tests start the agent.

pub mod app;
pub mod cli;
pub mod config;
pub mod db;
pub mod delivery;
pub mod domain;
pub mod http;
pub mod metrics;
pub mod retention;
pub mod runner;
pub mod supervisor;

/// This build: the package version, and the commit when built from a git
/// checkout (`0.1.0 (3f2a…)`; see `build.rs`).
pub const VERSION: &str = match option_env!("EXECD_VERSION") {
    Some(version) => version,
    None => env!("CARGO_PKG_VERSION"),
};
