//! The `execd` binary: parse the configuration, set up logging, serve until
//! SIGINT or SIGTERM. `execd supervise` (the agent's supervisor zygote, and the
//! per-job supervisors it forks)
//! runs without an async runtime; the client commands (`run`, `ps`, …) on a
//! small one.

use clap::Parser;
use execd::config::{Cli, Config, LogFormat, Mode};
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    match Cli::parse().mode() {
        Mode::Supervise(runs_dir) => execd::supervisor::main(&runs_dir),
        Mode::Client(command) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime")
            .block_on(execd::cli::main(command)),
        Mode::Serve(config) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime")
            .block_on(serve(*config)),
    }
}

async fn serve(config: Config) -> std::process::ExitCode {
    let filter = EnvFilter::try_from_env("EXECD_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info"))
        // At trace level the WebSocket library logs whole frames, a job's
        // env values among them: secrets are never logged.
        .add_directive("tungstenite=debug".parse().expect("a valid directive"));
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour for people at a terminal, not for log files and `docker logs`.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match config.log_format {
        LogFormat::Json => subscriber.json().init(),
        LogFormat::Text => subscriber.init(),
    }
    if let Err(e) = config.validate() {
        eprintln!("execd: {e}");
        return std::process::ExitCode::from(2);
    }
    let listener = match tokio::net::TcpListener::bind(config.listen).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("execd: cannot listen on {}: {e}", config.listen);
            return std::process::ExitCode::from(2);
        }
    };
    match execd::app::serve(config, listener, shutdown_signal()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("execd: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
