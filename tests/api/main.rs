//! Integration tests: the real agent on port 0, a fresh SQLite file per test,
//! real child processes.

mod auth;
mod callbacks;
mod cli;
mod connections;
mod crash;
mod execute;
mod fencing;
mod helpers;
mod processes;
mod queue;
mod receiver;
mod restart;
mod retention;
mod runner;
mod upgrade;
mod validation;
mod warm;
mod writer;
mod zygote;
