//! A submission: the wire shapes clients send (`ExecuteIn`, `CommandIn`) and
//! the validated `Submission` they become. Every rule of API.md's submission
//! table is checked here, once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;

use super::{Language, Languages};

/// Which runner lane a submission waits in; each lane has its own concurrency
/// limit, so sync runs never queue behind long async jobs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Lane {
    Sync,
    Background,
    Async,
}

impl Lane {
    pub const ALL: [Lane; 3] = [Lane::Sync, Lane::Background, Lane::Async];

    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Sync => "sync",
            Lane::Background => "background",
            Lane::Async => "async",
        }
    }

    /// Whether its executions may have a callback (only `/execute/async`
    /// takes a `callback_url`).
    pub fn has_callbacks(self) -> bool {
        self == Lane::Async
    }

    /// The timeout a route applies when the client gives none (API.md).
    pub fn default_timeout(self) -> Duration {
        Duration::from_secs(match self {
            Lane::Sync => 60,
            Lane::Background => 300,
            Lane::Async => 3600,
        })
    }
}

/// What runs: code in a language, or a command line.
#[derive(Clone, Debug, PartialEq)]
pub enum Program {
    Code {
        language: Language,
        code: String,
    },
    /// With `args`, `command` is executed directly; without, under `/bin/sh -c`.
    Command {
        command: String,
        args: Option<Vec<String>>,
    },
}

impl Program {
    /// The language column: the language's name, or `command`.
    pub fn language_name(&self) -> &'static str {
        match self {
            Program::Code { language, .. } => language.as_str(),
            Program::Command { .. } => "command",
        }
    }
}

/// Where and how an async execution's result is delivered.
#[derive(Clone, Debug, PartialEq)]
pub struct Callback {
    pub url: String,
    pub headers: BTreeMap<String, String>,
    /// Never returned by the API nor logged.
    pub secret: Option<String>,
}

/// A validated submission, ready to be stored.
#[derive(Clone, Debug, PartialEq)]
pub struct Submission {
    pub lane: Lane,
    pub program: Program,
    pub name: Option<String>,
    pub working_dir: PathBuf,
    pub env: BTreeMap<String, String>,
    pub timeout: Duration,
    pub callback: Option<Callback>,
    /// Attempts allowed when the process is lost (the agent's machine
    /// rebooted, its supervisor was killed); 1 never re-runs code silently.
    pub max_attempts: u32,
}

/// The limits and facts a submission is checked against.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_code_bytes: usize,
    /// The `env` strings (`NAME=value`) together.
    pub max_env_bytes: usize,
    /// `callback_headers` names and values together.
    pub max_callback_headers_bytes: usize,
    pub max_timeout: Duration,
    pub default_workdir: PathBuf,
    pub languages: Languages,
}

/// A rule a submission broke: a code of API.md, a sentence, and details.
#[derive(Debug, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct SubmissionError {
    pub code: &'static str,
    pub message: String,
    pub details: serde_json::Value,
    /// 413 for size limits, 400 for everything else.
    pub too_large: bool,
}

impl SubmissionError {
    fn new(code: &'static str, message: impl Into<String>) -> Self {
        SubmissionError {
            code,
            message: message.into(),
            details: serde_json::Value::Null,
            too_large: false,
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::new("INVALID_REQUEST", message)
    }

    fn missing(field: &str) -> Self {
        let mut e = Self::new("MISSING_PARAMETER", format!("`{field}` is required"));
        e.details = json!({ "field": field });
        e
    }

    fn with_details(mut self, details: serde_json::Value) -> Self {
        self.details = details;
        self
    }
}

/// The body of `/execute`, `/execute/background` and `/execute/async`.
/// Every field is optional here so a missing one gets `MISSING_PARAMETER`.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
pub struct ExecuteIn {
    /// The program text (required; optional here so a missing one is MISSING_PARAMETER).
    #[schema(required = true, min_length = 1)]
    pub code: Option<String>,
    pub language: Option<String>,
    pub timeout: Option<f64>,
    pub working_dir: Option<String>,
    pub workdir: Option<String>,
    #[serde(default, deserialize_with = "unique_keys")]
    pub env: Option<BTreeMap<String, String>>,
    pub name: Option<String>,
    pub callback_url: Option<String>,
    #[serde(default, deserialize_with = "unique_keys")]
    pub callback_headers: Option<BTreeMap<String, String>>,
    pub callback_signature_secret: Option<String>,
    /// Runs in all: one lost with its supervisor is re-queued until this many (default 1).
    #[schema(minimum = 1, maximum = 10)]
    pub max_attempts: Option<u32>,
}

/// An object of strings whose keys are each given once. A map of serde's
/// would keep the last of two silently, where the body's own fields given
/// twice are refused.
fn unique_keys<'de, D>(de: D) -> Result<Option<BTreeMap<String, String>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    struct Unique;
    impl<'de> serde::de::Visitor<'de> for Unique {
        type Value = BTreeMap<String, String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object of strings")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some((key, value)) = map.next_entry::<String, String>()? {
                if out.contains_key(&key) {
                    let twice = format!("has the key {key:?} twice");
                    return Err(serde::de::Error::custom(twice));
                }
                out.insert(key, value);
            }
            Ok(out)
        }
    }
    struct UniqueMap(BTreeMap<String, String>);
    impl<'de> Deserialize<'de> for UniqueMap {
        fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
            de.deserialize_map(Unique).map(UniqueMap)
        }
    }
    Ok(Option::<UniqueMap>::deserialize(de)?.map(|map| map.0))
}

/// The body of `/commands/run` and `/commands/background`.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
pub struct CommandIn {
    /// The command line (required); without `args` it runs under `/bin/sh -c`.
    #[schema(required = true, min_length = 1)]
    pub command: Option<String>,
    pub args: Option<Vec<String>>,
    pub timeout: Option<f64>,
    pub working_dir: Option<String>,
    pub workdir: Option<String>,
    #[serde(default, deserialize_with = "unique_keys")]
    pub env: Option<BTreeMap<String, String>>,
    pub name: Option<String>,
    /// Runs in all: one lost with its supervisor is re-queued until this many (default 1).
    #[schema(minimum = 1, maximum = 10)]
    pub max_attempts: Option<u32>,
}

/// Headers a caller may not set on its callback: they are ours to compute.
/// Callback headers a caller may not give: those execd sets, and those that
/// govern how the request travels (hop-by-hop).
const RESERVED_CALLBACK_HEADERS: [&str; 14] = [
    "content-type",
    "content-length",
    "host",
    "x-hopx-signature",
    "x-hopx-timestamp",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
];

const MAX_NAME_BYTES: usize = 256;

/// The hopx-ai SDK sends `workdir: "/workspace"` (its sandboxes' home) unless
/// told otherwise. Where this machine has no such directory, it means the
/// agent's default working directory, so SDK code runs unchanged.
const SDK_DEFAULT_WORKDIR: &str = "/workspace";

impl Submission {
    /// Validates an execute body for `lane`; `/execute/async` also needs a callback.
    pub fn parse(
        input: ExecuteIn,
        lane: Lane,
        limits: &Limits,
    ) -> Result<Submission, SubmissionError> {
        let code = input.code.ok_or_else(|| SubmissionError::missing("code"))?;
        check_program_text("code", &code, limits)?;
        let env = parse_env(input.env, limits)?;
        check_exec_size(&[], &env)?;
        let language = parse_language(input.language.as_deref(), &limits.languages)?;
        let callback = match lane {
            Lane::Async => Some(parse_callback(
                input.callback_url,
                input.callback_headers,
                input.callback_signature_secret,
                limits,
            )?),
            _ => None,
        };
        Ok(Submission {
            lane,
            program: Program::Code { language, code },
            name: parse_name(input.name)?,
            working_dir: parse_working_dir(input.working_dir, input.workdir, limits)?,
            env,
            timeout: parse_timeout(input.timeout, lane, limits)?,
            callback,
            max_attempts: parse_max_attempts(input.max_attempts)?,
        })
    }

    /// Validates a command body for the sync or background lane.
    pub fn parse_command(
        input: CommandIn,
        lane: Lane,
        limits: &Limits,
    ) -> Result<Submission, SubmissionError> {
        let command = input
            .command
            .ok_or_else(|| SubmissionError::missing("command"))?;
        check_program_text("command", &command, limits)?;
        let args = input.args.filter(|a| !a.is_empty());
        if let Some(args) = &args {
            if args.iter().any(|a| a.contains('\0')) {
                return Err(SubmissionError::invalid(
                    "`args` must not contain NUL bytes",
                ));
            }
        }
        let env = parse_env(input.env, limits)?;
        // Without args the command is one argument of `/bin/sh -c`.
        let argv: Vec<(&str, &str)> = match &args {
            None => vec![("command", command.as_str())],
            Some(args) => std::iter::once(("command", command.as_str()))
                .chain(args.iter().map(|a| ("args", a.as_str())))
                .collect(),
        };
        check_exec_size(&argv, &env)?;
        Ok(Submission {
            lane,
            program: Program::Command { command, args },
            name: parse_name(input.name)?,
            working_dir: parse_working_dir(input.working_dir, input.workdir, limits)?,
            env,
            timeout: parse_timeout(input.timeout, lane, limits)?,
            callback: None,
            max_attempts: parse_max_attempts(input.max_attempts)?,
        })
    }
}

fn check_program_text(field: &str, text: &str, limits: &Limits) -> Result<(), SubmissionError> {
    if text.trim().is_empty() {
        return Err(SubmissionError::invalid(format!(
            "`{field}` must not be empty"
        )));
    }
    if text.contains('\0') {
        return Err(SubmissionError::invalid(format!(
            "`{field}` must not contain NUL bytes"
        )));
    }
    if text.len() > limits.max_code_bytes {
        return Err(too_large(
            format!(
                "`{field}` is {} bytes; the limit is {} bytes",
                text.len(),
                limits.max_code_bytes
            ),
            json!({ "field": field, "size": text.len(), "limit": limits.max_code_bytes }),
        ));
    }
    Ok(())
}

fn parse_language(name: Option<&str>, languages: &Languages) -> Result<Language, SubmissionError> {
    let available: Vec<&str> = languages.iter().map(|i| i.language.as_str()).collect();
    let name = name.unwrap_or("python");
    let language = Language::from_alias(name).ok_or_else(|| {
        SubmissionError::invalid(format!("unknown language {name:?}"))
            .with_details(json!({ "language": name, "available": available }))
    })?;
    if languages.get(language).is_none() {
        return Err(SubmissionError::invalid(format!(
            "language {} is not installed on this agent",
            language.as_str()
        ))
        .with_details(json!({ "language": name, "available": available })));
    }
    Ok(language)
}

fn parse_timeout(
    timeout: Option<f64>,
    lane: Lane,
    limits: &Limits,
) -> Result<Duration, SubmissionError> {
    let Some(secs) = timeout else {
        return Ok(lane.default_timeout().min(limits.max_timeout));
    };
    let max = limits.max_timeout.as_secs_f64();
    if !(secs.is_finite() && secs > 0.0 && secs <= max) {
        return Err(SubmissionError::invalid(format!(
            "`timeout` must be more than 0 and at most {max} seconds"
        ))
        .with_details(json!({ "field": "timeout", "max": max })));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn parse_working_dir(
    working_dir: Option<String>,
    workdir: Option<String>,
    limits: &Limits,
) -> Result<PathBuf, SubmissionError> {
    // An empty spelling is not given: it does not hide the other one.
    let given = working_dir
        .filter(|d| !d.is_empty())
        .or(workdir.filter(|d| !d.is_empty()));
    let Some(dir) = given else {
        return Ok(limits.default_workdir.clone());
    };
    let path = limits.default_workdir.join(Path::new(&dir));
    // Any spelling of it: `/workspace/`, `//workspace`, `/workspace/.`.
    let sdk_default = Path::new(&dir)
        .components()
        .eq(Path::new(SDK_DEFAULT_WORKDIR).components());
    if sdk_default && !path.is_dir() {
        return Ok(limits.default_workdir.clone());
    }
    if !path.is_dir() {
        let why = if path.exists() {
            "is not a directory"
        } else {
            "does not exist"
        };
        return Err(SubmissionError::new(
            "DIRECTORY_NOT_FOUND",
            format!("working directory {dir:?} {why}"),
        )
        .with_details(json!({ "working_dir": dir })));
    }
    Ok(path)
}

/// The kernel's limit on one argument or environment string at `exec`,
/// its NUL included (`MAX_ARG_STRLEN`).
const MAX_EXEC_STRING: usize = 32 * 4096;

/// What the kernel allows a program's arguments and environment together
/// (`ARG_MAX`), less the agent's own environment, which jobs inherit, and
/// room for the interpreter's arguments.
fn exec_budget() -> usize {
    static BUDGET: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *BUDGET.get_or_init(|| {
        let arg_max = nix::unistd::sysconf(nix::unistd::SysconfVar::ARG_MAX)
            .ok()
            .flatten()
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(128 << 10);
        let inherited: usize = std::env::vars_os()
            .map(|(k, v)| k.len() + v.len() + 2 + std::mem::size_of::<usize>())
            .sum();
        arg_max.saturating_sub(inherited + (16 << 10))
    })
}

fn too_large(message: String, details: serde_json::Value) -> SubmissionError {
    let mut e = SubmissionError::new("PAYLOAD_TOO_LARGE", message).with_details(details);
    e.too_large = true;
    e
}

/// Refuses what `exec` would refuse (`E2BIG`): a program that could never
/// start. `argv`: each argument with the field it came from.
fn check_exec_size(
    argv: &[(&str, &str)],
    env: &BTreeMap<String, String>,
) -> Result<(), SubmissionError> {
    for (field, arg) in argv {
        if arg.len() + 1 > MAX_EXEC_STRING {
            return Err(too_large(
                format!(
                    "an argument in `{field}` is {} bytes; a program's start takes at most {} per argument (for a long script, use /execute with language bash)",
                    arg.len(),
                    MAX_EXEC_STRING - 1
                ),
                json!({ "field": field, "size": arg.len(), "limit": MAX_EXEC_STRING - 1 }),
            ));
        }
    }
    if let Some((name, value)) = env
        .iter()
        .find(|(k, v)| k.len() + v.len() + 2 > MAX_EXEC_STRING)
    {
        return Err(too_large(
            format!(
                "environment variable {name:?} is {} bytes; a program's start takes at most {} per variable",
                name.len() + value.len() + 1,
                MAX_EXEC_STRING - 1
            ),
            json!({ "field": "env", "name": name, "limit": MAX_EXEC_STRING - 1 }),
        ));
    }
    let pointer = std::mem::size_of::<usize>();
    let size: usize = argv
        .iter()
        .map(|(_, a)| a.len() + 1 + pointer)
        .sum::<usize>()
        + env
            .iter()
            .map(|(k, v)| k.len() + v.len() + 2 + pointer)
            .sum::<usize>();
    let budget = exec_budget();
    if size > budget {
        return Err(too_large(
            format!(
                "the arguments and environment come to {size} bytes; a program's start takes at most {budget} here"
            ),
            json!({ "field": "args", "size": size, "limit": budget }),
        ));
    }
    Ok(())
}

fn parse_env(
    env: Option<BTreeMap<String, String>>,
    limits: &Limits,
) -> Result<BTreeMap<String, String>, SubmissionError> {
    let env = env.unwrap_or_default();
    let size: usize = env.iter().map(|(k, v)| k.len() + v.len() + 1).sum();
    if size > limits.max_env_bytes {
        return Err(too_large(
            format!(
                "`env` is {size} bytes (as NAME=value strings); the limit is {} bytes",
                limits.max_env_bytes
            ),
            json!({ "field": "env", "size": size, "limit": limits.max_env_bytes }),
        ));
    }
    for (name, value) in &env {
        if name.is_empty() || name.contains('=') || name.contains('\0') {
            return Err(SubmissionError::invalid(format!(
                "environment variable name {name:?} is not valid (non-empty, no '=', no NUL)"
            ))
            .with_details(json!({ "field": "env", "name": name })));
        }
        if value.contains('\0') {
            return Err(SubmissionError::invalid(format!(
                "the value of environment variable {name:?} contains a NUL byte"
            ))
            .with_details(json!({ "field": "env", "name": name })));
        }
    }
    Ok(env)
}

/// The most attempts a submission may ask for.
const MAX_ATTEMPTS: u32 = 10;

fn parse_max_attempts(value: Option<u32>) -> Result<u32, SubmissionError> {
    match value.unwrap_or(1) {
        n @ 1..=MAX_ATTEMPTS => Ok(n),
        _ => Err(SubmissionError::invalid(format!(
            "`max_attempts` must be from 1 to {MAX_ATTEMPTS}"
        ))
        .with_details(json!({ "field": "max_attempts" }))),
    }
}

fn parse_name(name: Option<String>) -> Result<Option<String>, SubmissionError> {
    match name {
        Some(n) if n.len() > MAX_NAME_BYTES => Err(SubmissionError::invalid(format!(
            "`name` must be at most {MAX_NAME_BYTES} bytes"
        ))),
        Some(n) if n.is_empty() => Ok(None),
        // SQLite's text functions (and `sqlite3`) stop at a NUL.
        Some(n) if n.contains('\0') => Err(SubmissionError::invalid(
            "`name` must not contain NUL bytes",
        )
        .with_details(json!({ "field": "name" }))),
        other => Ok(other),
    }
}

fn parse_callback(
    url: Option<String>,
    headers: Option<BTreeMap<String, String>>,
    secret: Option<String>,
    limits: &Limits,
) -> Result<Callback, SubmissionError> {
    let url = url.ok_or_else(|| SubmissionError::missing("callback_url"))?;
    let wrong = |why: &str| {
        SubmissionError::invalid(format!("`callback_url` {why}"))
            .with_details(json!({ "field": "callback_url" }))
    };
    // The URL parser drops these silently; what is stored and shown is
    // what is posted to.
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(wrong("must not contain spaces or control characters"));
    }
    let parsed =
        reqwest::Url::parse(&url).map_err(|e| wrong(&format!("is not an absolute URL: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(wrong("must be an http or https URL with a host"));
    }
    if parsed.port() == Some(0) {
        return Err(wrong("has port 0, which nothing listens on"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        // Every process object shows the URL: no credentials in it.
        return Err(wrong(
            "must not carry credentials (user:password@): send them in `callback_headers`, as Authorization",
        ));
    }
    let url = parsed.to_string();
    let headers = headers.unwrap_or_default();
    // As sent: `name: value\r\n` each.
    let size: usize = headers.iter().map(|(n, v)| n.len() + v.len() + 4).sum();
    if size > limits.max_callback_headers_bytes {
        return Err(too_large(
            format!(
                "`callback_headers` are {size} bytes as sent; the limit is {} (--max-callback-headers-bytes)",
                limits.max_callback_headers_bytes
            ),
            json!({ "field": "callback_headers", "limit": limits.max_callback_headers_bytes }),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for (name, value) in &headers {
        // Names ignore case: two that differ only in it would be sent as one.
        if !seen.insert(name.to_ascii_lowercase()) {
            return Err(SubmissionError::invalid(format!(
                "callback header {name:?} is given twice (header names ignore case)"
            ))
            .with_details(json!({ "field": "callback_headers", "header": name })));
        }
        if RESERVED_CALLBACK_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
            return Err(SubmissionError::invalid(format!(
                "callback header {name:?} is set by execd (or governs the connection) and cannot be given"
            ))
            .with_details(json!({ "field": "callback_headers", "header": name })));
        }
        let valid = axum::http::HeaderName::from_bytes(name.as_bytes()).is_ok()
            && axum::http::HeaderValue::from_str(value).is_ok();
        if !valid {
            return Err(SubmissionError::invalid(format!(
                "callback header {name:?} is not a valid HTTP header"
            ))
            .with_details(json!({ "field": "callback_headers", "header": name })));
        }
    }
    if secret.as_deref() == Some("") {
        return Err(SubmissionError::invalid(
            "`callback_signature_secret` must not be empty",
        ));
    }
    if secret
        .as_deref()
        .is_some_and(|s| !crate::delivery::sign::is_valid_secret(s))
    {
        return Err(SubmissionError::invalid(
            "`callback_signature_secret` starts with `whsec_` but the rest is not a key in base64",
        )
        .with_details(json!({ "field": "callback_signature_secret" })));
    }
    Ok(Callback {
        url,
        headers,
        secret,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_code_bytes: 100,
            max_env_bytes: 1 << 20,
            max_callback_headers_bytes: 1000,
            max_timeout: Duration::from_secs(600),
            default_workdir: std::env::temp_dir(),
            languages: Languages::detect(),
        }
    }

    fn bash(code: &str) -> ExecuteIn {
        ExecuteIn {
            code: Some(code.into()),
            language: Some("sh".into()),
            ..Default::default()
        }
    }

    #[test]
    fn a_minimal_submission_gets_the_route_defaults() {
        let s = Submission::parse(bash("echo hi"), Lane::Background, &limits()).unwrap();
        assert_eq!(s.timeout, Duration::from_secs(300));
        assert_eq!(s.working_dir, std::env::temp_dir());
        assert_eq!(s.program.language_name(), "bash");
    }

    #[test]
    fn each_rule_names_its_code() {
        let l = limits();
        let code = |input: ExecuteIn, lane| Submission::parse(input, lane, &l).unwrap_err().code;
        assert_eq!(code(ExecuteIn::default(), Lane::Sync), "MISSING_PARAMETER");
        assert_eq!(code(bash("  "), Lane::Sync), "INVALID_REQUEST");
        assert_eq!(
            code(bash(&"x".repeat(101)), Lane::Sync),
            "PAYLOAD_TOO_LARGE"
        );
        let unknown = ExecuteIn {
            language: Some("cobol".into()),
            ..bash("x")
        };
        assert_eq!(code(unknown, Lane::Sync), "INVALID_REQUEST");
        for t in [0.0, -1.0, 601.0, f64::NAN] {
            assert_eq!(
                code(
                    ExecuteIn {
                        timeout: Some(t),
                        ..bash("x")
                    },
                    Lane::Sync
                ),
                "INVALID_REQUEST"
            );
        }
        let dir = ExecuteIn {
            workdir: Some("/no/such/dir".into()),
            ..bash("x")
        };
        assert_eq!(code(dir, Lane::Sync), "DIRECTORY_NOT_FOUND");
        for name in ["", "A=B", "A\0"] {
            let env = ExecuteIn {
                env: Some([(name.to_string(), "v".to_string())].into()),
                ..bash("x")
            };
            assert_eq!(code(env, Lane::Sync), "INVALID_REQUEST", "{name:?}");
        }
        assert_eq!(code(bash("x"), Lane::Async), "MISSING_PARAMETER");
        for url in ["not a url", "ftp://example.com/x", "/relative"] {
            let cb = ExecuteIn {
                callback_url: Some(url.into()),
                ..bash("x")
            };
            assert_eq!(code(cb, Lane::Async), "INVALID_REQUEST", "{url}");
        }
        let reserved = ExecuteIn {
            callback_url: Some("http://127.0.0.1:1/cb".into()),
            callback_headers: Some([("X-HopX-Signature".to_string(), "x".to_string())].into()),
            ..bash("x")
        };
        assert_eq!(code(reserved, Lane::Async), "INVALID_REQUEST");
        let twice = ExecuteIn {
            callback_url: Some("http://127.0.0.1:1/cb".into()),
            callback_headers: Some(
                [("X-Dup", "a"), ("x-dup", "b")]
                    .map(|(n, v)| (n.to_string(), v.to_string()))
                    .into(),
            ),
            ..bash("x")
        };
        assert_eq!(code(twice, Lane::Async), "INVALID_REQUEST");
        for hop in ["Transfer-Encoding", "connection", "Upgrade"] {
            let headers = ExecuteIn {
                callback_url: Some("http://127.0.0.1:1/cb".into()),
                callback_headers: Some([(hop.to_string(), "x".to_string())].into()),
                ..bash("x")
            };
            assert_eq!(code(headers, Lane::Async), "INVALID_REQUEST", "{hop}");
        }
        let secret = |s: &str| ExecuteIn {
            callback_url: Some("http://127.0.0.1:1/cb".into()),
            callback_signature_secret: Some(s.into()),
            ..bash("x")
        };
        assert_eq!(
            code(secret("whsec_!!!notbase64"), Lane::Async),
            "INVALID_REQUEST"
        );
        assert!(Submission::parse(secret("whsec_c2VjcmV0"), Lane::Async, &l).is_ok());
        assert!(Submission::parse(secret("plain!!!"), Lane::Async, &l).is_ok());
        let named = ExecuteIn {
            name: Some("a\0b".into()),
            ..bash("x")
        };
        assert_eq!(code(named, Lane::Sync), "INVALID_REQUEST");
        let file = ExecuteIn {
            workdir: Some("/etc/passwd".into()),
            ..bash("x")
        };
        let e = Submission::parse(file, Lane::Sync, &l).unwrap_err();
        assert_eq!(e.code, "DIRECTORY_NOT_FOUND");
        assert!(e.message.contains("is not a directory"), "{}", e.message);
    }

    #[test]
    fn both_spellings_of_the_working_dir_are_accepted() {
        let l = limits();
        let tmp = std::env::temp_dir().to_string_lossy().to_string();
        for input in [
            ExecuteIn {
                working_dir: Some(tmp.clone()),
                ..bash("x")
            },
            ExecuteIn {
                workdir: Some(tmp.clone()),
                ..bash("x")
            },
            // An empty spelling does not hide the other.
            ExecuteIn {
                working_dir: Some(String::new()),
                workdir: Some(tmp.clone()),
                ..bash("x")
            },
        ] {
            assert_eq!(
                Submission::parse(input, Lane::Sync, &l)
                    .unwrap()
                    .working_dir,
                PathBuf::from(&tmp)
            );
        }
    }

    #[test]
    fn the_sdk_default_workdir_falls_back_to_ours_where_it_does_not_exist() {
        if Path::new(SDK_DEFAULT_WORKDIR).exists() {
            return;
        }
        for spelling in ["/workspace", "/workspace/", "//workspace", "/workspace/."] {
            let input = ExecuteIn {
                workdir: Some(spelling.into()),
                ..bash("x")
            };
            let s = Submission::parse(input, Lane::Sync, &limits()).unwrap();
            assert_eq!(s.working_dir, std::env::temp_dir(), "{spelling}");
        }
    }

    /// What `exec` would refuse (E2BIG) is a 413 up front, not a job that
    /// always fails to start: a command run under `sh -c` is one argument.
    #[test]
    fn what_exec_would_refuse_is_refused_at_once() {
        let limits = Limits {
            max_code_bytes: 1 << 20,
            ..limits()
        };
        let long = "x".repeat(MAX_EXEC_STRING);
        let command = CommandIn {
            command: Some(format!("true {long}")),
            ..Default::default()
        };
        let e = Submission::parse_command(command, Lane::Sync, &limits).unwrap_err();
        assert!(e.too_large && e.details["field"] == "command", "{e:?}");
        let env = ExecuteIn {
            env: Some(BTreeMap::from([("A".to_string(), long)])),
            ..bash("x")
        };
        let e = Submission::parse(env, Lane::Sync, &limits).unwrap_err();
        assert!(e.too_large && e.details["field"] == "env", "{e:?}");
        let fits = CommandIn {
            command: Some(format!("true {}", "x".repeat(MAX_EXEC_STRING - 10))),
            ..Default::default()
        };
        assert!(Submission::parse_command(fits, Lane::Sync, &limits).is_ok());
    }

    #[test]
    fn a_command_without_args_keeps_args_empty() {
        let input = CommandIn {
            command: Some("echo hi".into()),
            args: Some(vec![]),
            ..Default::default()
        };
        let s = Submission::parse_command(input, Lane::Sync, &limits()).unwrap();
        assert_eq!(
            s.program,
            Program::Command {
                command: "echo hi".into(),
                args: None
            }
        );
    }
}
