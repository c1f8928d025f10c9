//! Integration tests: the real agent on port 0, a fresh SQLite file per test,
//! real child processes.

mod auth;
mod cli;
mod execute;
mod helpers;
mod processes;
mod runner;
mod validation;
