//! The command-line client, in the same binary: `execd run`, `submit`, `ps`,
//! `logs`, `kill`, `token`. It talks to a running agent over HTTP (the local
//! one and its token file by default) and says clearly when none is there.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{json, Value};

/// Where the agent is and how to authenticate.
#[derive(Clone, Debug, Args)]
pub struct ClientArgs {
    /// The agent's base URL.
    #[arg(long, env = "EXECD_URL", default_value = "http://127.0.0.1:7070")]
    pub url: String,
    /// Bearer token; default: the token file in the data dir.
    #[arg(long, env = "EXECD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The local agent's data dir, for its token file.
    #[arg(long, env = "EXECD_DATA_DIR", default_value = "./execd-data")]
    pub data_dir: PathBuf,
}

/// The program a `run` or `submit` sends.
#[derive(Clone, Debug, Args)]
pub struct CodeArgs {
    /// A file, or `-` for stdin.
    file: PathBuf,
    /// python, javascript, bash or go; default: from the file's extension (py, js/mjs/cjs, sh/bash, go; python for stdin or a file without one).
    #[arg(long, short)]
    language: Option<String>,
    /// Seconds.
    #[arg(long)]
    timeout: Option<f64>,
}

#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Run a file (or `-` for stdin) and wait: prints its output, exits with its exit code.
    Run {
        #[command(flatten)]
        conn: ClientArgs,
        #[command(flatten)]
        code: CodeArgs,
    },
    /// Submit a file (or `-`) as a background process, or with --callback-url as an async execution; prints the ids.
    Submit {
        #[command(flatten)]
        conn: ClientArgs,
        #[command(flatten)]
        code: CodeArgs,
        #[arg(long)]
        name: Option<String>,
        /// Run it as an async execution that POSTs its result here.
        #[arg(long)]
        callback_url: Option<String>,
        /// Signs the callback (`callback_signature_secret`).
        #[arg(long, requires = "callback_url")]
        callback_secret: Option<String>,
    },
    /// List executions, newest first.
    Ps {
        #[command(flatten)]
        conn: ClientArgs,
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// The API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print an execution's output; with --follow, as it comes until it ends.
    Logs {
        #[command(flatten)]
        conn: ClientArgs,
        id: String,
        #[arg(long, short)]
        follow: bool,
    },
    /// Kill an execution.
    Kill {
        id: String,
        #[command(flatten)]
        conn: ClientArgs,
    },
    /// Print the local agent's token, or mint a JWT when a secret is given.
    Token {
        /// The local agent's data dir, for its token file.
        #[arg(long, env = "EXECD_DATA_DIR", default_value = "./execd-data")]
        data_dir: PathBuf,
        /// Mint an HS256 JWT signed with this secret instead (at least 16 bytes, as the agent requires).
        #[arg(long, env = "EXECD_JWT_SECRET", hide_env_values = true)]
        jwt_secret: Option<String>,
        /// Lifetime of a minted JWT (more than zero).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
}

/// A failure of the client, said in one line.
#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("cannot reach the agent at {0}: is it running? (start it with `execd serve`)")]
    Unreachable(String),
    #[error("{0}")]
    Usage(String),
    #[error("the agent answered {status}: {message}")]
    Api { status: u16, message: String },
    #[error("{0}")]
    Other(String),
}

struct Client {
    base: String,
    token: Option<String>,
    /// Where the token was looked for when none was given.
    token_file: PathBuf,
    http: reqwest::Client,
}

impl ClientCommand {
    /// Where the agent is, for the commands that talk to one.
    fn conn(&self) -> Option<&ClientArgs> {
        match self {
            ClientCommand::Run { conn, .. }
            | ClientCommand::Submit { conn, .. }
            | ClientCommand::Ps { conn, .. }
            | ClientCommand::Logs { conn, .. }
            | ClientCommand::Kill { conn, .. } => Some(conn),
            ClientCommand::Token { .. } => None,
        }
    }
}

pub async fn main(command: ClientCommand) -> ExitCode {
    let result = match command {
        ClientCommand::Token {
            data_dir,
            jwt_secret,
            ttl,
        } => token(&data_dir, jwt_secret.as_deref(), ttl),
        command => run(command).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("execd: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run(command: ClientCommand) -> Result<ExitCode, CliError> {
    let Some(args) = command.conn().cloned() else {
        unreachable!("`token` is handled by `main`")
    };
    let scheme_ok = reqwest::Url::parse(&args.url)
        .is_ok_and(|url| matches!(url.scheme(), "http" | "https") && url.has_host());
    if !scheme_ok {
        return Err(CliError::Usage(format!(
            "--url {:?} is not an http:// or https:// URL (for example http://127.0.0.1:7070)",
            args.url
        )));
    }
    let client = Client {
        base: args.url.trim_end_matches('/').to_string(),
        token: args.token.clone().or_else(|| read_token(&args.data_dir)),
        token_file: args.data_dir.join("token"),
        http: reqwest::Client::new(),
    };
    match command {
        ClientCommand::Run { code, .. } => {
            let body = code_body(code)?;
            let (status, out) = client
                .send(reqwest::Method::POST, "/execute", Some(body))
                .await?;
            let result = if status == 408 { &out["details"] } else { &out };
            if status != 200 && status != 408 {
                return Err(api_error(status, &out));
            }
            print!("{}", result["stdout"].as_str().unwrap_or(""));
            eprint!("{}", result["stderr"].as_str().unwrap_or(""));
            if status == 408 {
                eprintln!("execd: {}", out["error"].as_str().unwrap_or("timed out"));
                return Ok(ExitCode::from(124));
            }
            let code = result["exit_code"].as_i64().unwrap_or(1);
            Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
        }
        ClientCommand::Submit {
            code,
            name,
            callback_url,
            callback_secret,
            ..
        } => {
            let mut body = code_body(code)?;
            body["name"] = json!(name);
            let path = match callback_url {
                Some(url) => {
                    body["callback_url"] = json!(url);
                    body["callback_signature_secret"] = json!(callback_secret);
                    "/execute/async"
                }
                None => "/execute/background",
            };
            let (status, out) = client.send(reqwest::Method::POST, path, Some(body)).await?;
            if status != 200 {
                return Err(api_error(status, &out));
            }
            println!("process_id    {}", out["process_id"].as_str().unwrap_or(""));
            println!(
                "execution_id  {}",
                out["execution_id"].as_str().unwrap_or("")
            );
            println!("status        {}", out["status"].as_str().unwrap_or(""));
            Ok(ExitCode::SUCCESS)
        }
        ClientCommand::Ps {
            status,
            limit,
            json,
            ..
        } => {
            let mut path = format!("/execute/processes?limit={limit}");
            if let Some(status) = status {
                path.push_str(&format!("&status={status}"));
            }
            let (code, out) = client.send(reqwest::Method::GET, &path, None).await?;
            if code != 200 {
                return Err(api_error(code, &out));
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
            } else {
                print_table(
                    out["processes"]
                        .as_array()
                        .map(Vec::as_slice)
                        .unwrap_or_default(),
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        ClientCommand::Logs { id, follow, .. } => client.logs(&id, follow).await,
        ClientCommand::Kill { id, .. } => {
            let (status, out) = client
                .send(reqwest::Method::POST, &format!("/execute/kill/{id}"), None)
                .await?;
            if status != 200 {
                return Err(api_error(status, &out));
            }
            println!(
                "{}: {}",
                out["process_id"].as_str().unwrap_or(&id),
                out["message"].as_str().unwrap_or("")
            );
            Ok(ExitCode::SUCCESS)
        }
        ClientCommand::Token { .. } => unreachable!("`token` is handled by `main`"),
    }
}

fn read_token(data_dir: &Path) -> Option<String> {
    std::fs::read_to_string(data_dir.join("token"))
        .ok()
        .map(|t| t.trim().to_string())
}

/// `execd token`: the token file's token, or a freshly minted JWT.
fn token(data_dir: &Path, jwt_secret: Option<&str>, ttl: Duration) -> Result<ExitCode, CliError> {
    let token = match jwt_secret {
        Some(secret) if secret.len() < 16 => {
            return Err(CliError::Usage(
                "--jwt-secret must be at least 16 bytes: the agent refuses a shorter one".into(),
            ))
        }
        Some(_) if ttl.is_zero() => {
            return Err(CliError::Usage("--ttl must be more than zero".into()))
        }
        Some(secret) => {
            let exp = chrono::Utc::now().timestamp() + ttl.as_secs() as i64;
            jsonwebtoken::encode(
                &jsonwebtoken::Header::default(),
                &json!({ "sub": "execd-cli", "exp": exp }),
                &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
            )
            .map_err(|e| CliError::Other(format!("cannot mint a JWT: {e}")))?
        }
        None => read_token(data_dir).ok_or_else(|| {
            CliError::Usage(format!(
                "no token file at {} (start the agent once, or give --jwt-secret)",
                data_dir.join("token").display()
            ))
        })?,
    };
    println!("{token}");
    Ok(ExitCode::SUCCESS)
}

/// The submission body for a file (or `-`: stdin).
fn code_body(
    CodeArgs {
        file,
        language,
        timeout,
    }: CodeArgs,
) -> Result<Value, CliError> {
    let file = file.as_path();
    let code = if file == Path::new("-") {
        let mut code = String::new();
        std::io::stdin()
            .read_to_string(&mut code)
            .map_err(|e| CliError::Usage(format!("cannot read stdin: {e}")))?;
        code
    } else {
        std::fs::read_to_string(file)
            .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", file.display())))?
    };
    let language = match (language, file.extension()) {
        (Some(language), _) => language,
        // Stdin, or a file without an extension: Python, the API's default.
        (None, None) => "python".into(),
        (None, Some(ext)) => match ext.to_str() {
            Some("py") => "python",
            Some("js" | "mjs" | "cjs") => "javascript",
            Some("sh" | "bash") => "bash",
            Some("go") => "go",
            _ => {
                return Err(CliError::Usage(format!(
                    "cannot tell the language of {} from its extension: give --language",
                    file.display()
                )))
            }
        }
        .into(),
    };
    let mut body = json!({ "code": code, "language": language });
    if let Some(timeout) = timeout {
        body["timeout"] = json!(timeout);
    }
    Ok(body)
}

fn api_error(status: u16, body: &Value) -> CliError {
    let message = body["error"].as_str().unwrap_or("no message").to_string();
    CliError::Api { status, message }
}

impl Client {
    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let request = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value), CliError> {
        let mut request = self.request(method, path);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.map_err(|e| self.transport(e))?;
        let status = response.status().as_u16();
        self.check_token(status)?;
        let text = response.text().await.map_err(|e| self.transport(e))?;
        // Every answer of the agent is JSON: anything else is not the agent.
        let body = serde_json::from_str(&text).map_err(|_| {
            CliError::Other(format!(
                "{} answered {status} with a body that is not JSON: is it an execd agent?",
                self.base
            ))
        })?;
        Ok((status, body))
    }

    /// A 401 to a request sent without a token says why there was none.
    fn check_token(&self, status: u16) -> Result<(), CliError> {
        if status == 401 && self.token.is_none() {
            return Err(CliError::Usage(format!(
                "the agent wants a token: give --token (or EXECD_TOKEN), or --data-dir of an agent with a token file (none at {})",
                self.token_file.display()
            )));
        }
        Ok(())
    }

    fn transport(&self, e: reqwest::Error) -> CliError {
        if e.is_connect() {
            CliError::Unreachable(self.base.clone())
        } else {
            CliError::Other(format!("request to {} failed: {e}", self.base))
        }
    }

    /// Prints stored output, or follows the SSE stream until the `end` event,
    /// reconnecting from the last event id when the stream breaks or the
    /// agent restarts (it closes the stream without `end` when it stops, and
    /// is unreachable or answers 503 for a moment): up to `RECONNECTS` tries
    /// in a row that bring nothing new, half a second apart.
    async fn logs(&self, id: &str, follow: bool) -> Result<ExitCode, CliError> {
        const RECONNECTS: u32 = 60;
        let mut last_id: Option<String> = None;
        let mut fruitless = 0;
        loop {
            let mut request = self.request(
                reqwest::Method::GET,
                &format!("/execute/processes/{id}/logs?follow={follow}"),
            );
            if let Some(last) = &last_id {
                request = request.header("Last-Event-ID", last);
            }
            let retry = |fruitless: u32| follow && fruitless < RECONNECTS;
            let mut response = match request.send().await {
                Ok(response) => response,
                Err(e) if e.is_connect() && retry(fruitless) => {
                    fruitless += 1;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
                Err(e) => return Err(self.transport(e)),
            };
            let status = response.status().as_u16();
            if status == 503 && retry(fruitless) {
                fruitless += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            if status != 200 {
                self.check_token(status)?;
                return Err(api_error(
                    status,
                    &response.json().await.unwrap_or(Value::Null),
                ));
            }
            // Bytes until a whole event is in: a chunk may end inside a character.
            let mut pending = Vec::new();
            // Where to look for the next blank line (before that, none).
            let mut searched = 0;
            let seen = last_id.clone();
            while let Ok(Some(chunk)) = response.chunk().await {
                pending.extend_from_slice(&chunk);
                while let Some(at) = pending[searched..].windows(2).position(|w| w == b"\n\n") {
                    let block: Vec<u8> = pending.drain(..searched + at + 2).collect();
                    searched = 0;
                    if let Some(code) = print_event(&String::from_utf8_lossy(&block), &mut last_id)
                    {
                        return Ok(code);
                    }
                }
                searched = pending.len().saturating_sub(1);
            }
            if !follow {
                return Ok(ExitCode::SUCCESS);
            }
            fruitless = if last_id == seen { fruitless + 1 } else { 0 };
            if fruitless >= RECONNECTS {
                return Err(CliError::Other("the log stream kept breaking".into()));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// Prints one SSE block; returns the exit code once the `end` event came.
fn print_event(block: &str, last_id: &mut Option<String>) -> Option<ExitCode> {
    let field = |name: &str| {
        block
            .lines()
            .filter_map(|l| l.strip_prefix(name))
            .map(|v| v.strip_prefix(' ').unwrap_or(v))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let (event, id, data) = (field("event:"), field("id:"), field("data:"));
    if !id.is_empty() {
        *last_id = Some(id);
    }
    let data: Value = serde_json::from_str(&data).unwrap_or(Value::Null);
    match event.as_str() {
        "stdout" => {
            print!("{}", data["data"].as_str().unwrap_or(""));
            let _ = std::io::stdout().flush();
        }
        "stderr" => eprint!("{}", data["data"].as_str().unwrap_or("")),
        "attempt" => eprintln!(
            "execd: the last attempt was lost; attempt {} follows",
            data["attempt"]
        ),
        "end" => {
            let code = data["exit_code"].as_i64().unwrap_or(1);
            return Some(ExitCode::from(u8::try_from(code).unwrap_or(1)));
        }
        _ => {}
    }
    None
}

/// The process list as a table; status in colour on a terminal.
fn print_table(processes: &[Value]) {
    let colour = std::io::stdout().is_terminal();
    println!(
        "{:<32}  {:<16}  {:<10}  {:<10}  {:>4}  {:>9}  CREATED",
        "PROCESS", "NAME", "STATUS", "LANGUAGE", "EXIT", "SECONDS"
    );
    for p in processes {
        let status = p["status"].as_str().unwrap_or("");
        let shown = if colour {
            let code = match status {
                "completed" => "32",
                "running" | "queued" => "36",
                _ => "31",
            };
            format!("\x1b[{code}m{status:<10}\x1b[0m")
        } else {
            format!("{status:<10}")
        };
        let name: String = p["name"].as_str().unwrap_or("-").chars().take(16).collect();
        println!(
            "{:<32}  {:<16}  {}  {:<10}  {:>4}  {:>9}  {}",
            p["process_id"].as_str().unwrap_or(""),
            name,
            shown,
            p["language"].as_str().unwrap_or(""),
            p["exit_code"]
                .as_i64()
                .map_or("-".to_string(), |c| c.to_string()),
            p["execution_time"]
                .as_f64()
                .map_or("-".to_string(), |t| format!("{t:.2}")),
            p["created_at"].as_str().unwrap_or(""),
        );
    }
}
