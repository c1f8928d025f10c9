//! SQL of the `executions` table: insert, claim, fenced updates, reads.
//!
//! Writes take a `&mut SqliteConnection` and are run by the writer inside its
//! group commit; reads take the read-only pool.

use futures::future::BoxFuture;
use sqlx::{SqliteConnection, SqlitePool};

use super::output::{self, Chunk, Counts};
use crate::domain::{ExecutionId, Lane, ProcessId, Program, Status, Submission};

/// How a submission was stored.
#[derive(Debug)]
pub enum Inserted {
    /// Stored; already claimed when the insert was asked to claim it and
    /// its lane had no queued row (it was then the lane's oldest).
    New(Option<Box<Claimed>>),
    /// A row with the same idempotency key exists: its id, and whether the
    /// request that created it was the same one.
    Existing { id: String, same_request: bool },
}

/// The idempotency key of a request and a hash of what was asked.
#[derive(Clone, Debug)]
pub struct Idempotency {
    pub key: String,
    pub request_hash: String,
}

/// What a submission runs, as its row stores it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Run {
    pub language: String,
    pub code: String,
    pub args: Option<String>,
    pub working_dir: String,
    pub env: String,
    pub timeout_ms: i64,
    /// Why the stored row cannot be run as it is (text edited by hand that
    /// is no longer UTF-8): the job fails with it instead of starting.
    pub unreadable: Option<String>,
}

impl Run {
    pub fn of(submission: &Submission) -> Run {
        let (code, args) = match &submission.program {
            Program::Code { code, .. } => (code.clone(), None),
            Program::Command { command, args } => (
                command.clone(),
                args.as_ref()
                    .map(|a| serde_json::to_string(a).expect("strings serialize")),
            ),
        };
        Run {
            language: submission.program.language_name().to_string(),
            code,
            args,
            working_dir: submission.working_dir.to_string_lossy().into_owned(),
            env: serde_json::to_string(&submission.env).expect("strings serialize"),
            timeout_ms: i64::try_from(submission.timeout.as_millis())
                .unwrap_or(i64::MAX)
                .max(1),
            unreadable: None,
        }
    }
}

/// Who claims a row as it is inserted, and when.
#[derive(Clone, Copy, Debug)]
pub struct ClaimAs<'a> {
    pub owner: &'a str,
    pub now: &'a str,
}

/// What a submission's row stores, ready to bind.
struct Values<'a> {
    id: &'a str,
    process_id: &'a str,
    lane: &'a str,
    name: Option<&'a str>,
    run: Run,
    created_at: &'a str,
    callback_url: Option<&'a str>,
    callback_headers: Option<String>,
    callback_secret: Option<&'a str>,
    key: Option<&'a str>,
    hash: Option<&'a str>,
    max_attempts: i64,
}

impl<'a> Values<'a> {
    fn of(
        id: &'a ExecutionId,
        process_id: &'a ProcessId,
        submission: &'a Submission,
        idempotency: Option<&'a Idempotency>,
        created_at: &'a str,
    ) -> Self {
        let callback = submission.callback.as_ref();
        Values {
            id: id.as_str(),
            process_id: process_id.as_str(),
            lane: submission.lane.as_str(),
            name: submission.name.as_deref(),
            run: Run::of(submission),
            created_at,
            callback_url: callback.map(|c| c.url.as_str()),
            callback_headers: callback
                .map(|c| serde_json::to_string(&c.headers).expect("strings serialize")),
            callback_secret: callback.and_then(|c| c.secret.as_deref()),
            key: idempotency.map(|i| i.key.as_str()),
            hash: idempotency.map(|i| i.request_hash.as_str()),
            max_attempts: i64::from(submission.max_attempts),
        }
    }
}

/// Rows in one statement of `insert_queued` at most: a statement is
/// prepared, and kept, for each number of rows up to this (a burst of 64
/// connections' submissions, scenario 1 of BENCHMARKS.md, gives a group
/// commit 20–60).
const ROWS_PER_STATEMENT: usize = 64;

/// Stores `rows` as queued in one `INSERT` (the ids of the rows it stored),
/// leaving out a row whose idempotency key is stored already.
async fn insert_rows(
    conn: &mut SqliteConnection,
    rows: &[Values<'_>],
) -> Result<Vec<String>, sqlx::Error> {
    let mut insert = sqlx::QueryBuilder::new(
        "INSERT INTO executions
           (id, process_id, lane, name, language, code, args, working_dir, env, timeout_ms,
            created_at, callback_url, callback_headers, callback_secret, idempotency_key, request_hash,
            max_attempts) ",
    );
    insert.push_values(rows, |mut row, v| {
        row.push_bind(v.id)
            .push_bind(v.process_id)
            .push_bind(v.lane)
            .push_bind(v.name)
            .push_bind(v.run.language.as_str())
            .push_bind(v.run.code.as_str())
            .push_bind(v.run.args.as_deref())
            .push_bind(v.run.working_dir.as_str())
            .push_bind(v.run.env.as_str())
            .push_bind(v.run.timeout_ms)
            .push_bind(v.created_at)
            .push_bind(v.callback_url)
            .push_bind(v.callback_headers.as_deref())
            .push_bind(v.callback_secret)
            .push_bind(v.key)
            .push_bind(v.hash)
            .push_bind(v.max_attempts);
    });
    insert.push(" ON CONFLICT (idempotency_key) DO NOTHING RETURNING id");
    insert
        .build_query_scalar::<String>()
        .fetch_all(&mut *conn)
        .await
}

/// How `row` was stored, given whether `insert_rows` stored it.
async fn inserted(
    conn: &mut SqliteConnection,
    row: &Values<'_>,
    stored: bool,
) -> Result<Inserted, sqlx::Error> {
    if stored {
        return Ok(Inserted::New(None));
    }
    let existing = sqlx::query!(
        r#"SELECT id AS "id!", request_hash FROM executions WHERE idempotency_key = ?"#,
        row.key
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(Inserted::Existing {
        id: existing.id,
        same_request: existing.request_hash.as_deref() == row.hash,
    })
}

/// Stores one row as queued (`insert_rows` for one), and says how.
async fn insert_one(
    conn: &mut SqliteConnection,
    row: &Values<'_>,
) -> Result<Inserted, sqlx::Error> {
    let stored = insert_rows(conn, std::slice::from_ref(row)).await?;
    inserted(conn, row, !stored.is_empty()).await
}

/// A submission to store as queued with others (`insert_queued`).
pub struct Queued {
    pub id: ExecutionId,
    pub process_id: ProcessId,
    pub submission: Submission,
    pub idempotency: Option<Idempotency>,
    pub created_at: String,
}

/// Stores submissions as queued, one statement for up to
/// `ROWS_PER_STATEMENT` of them, and says how each was stored, in order:
/// for many submissions arriving at once, where each statement is a round
/// trip to SQLite's thread. A statement that fails is undone by SQLite;
/// its rows are then tried one by one, so a row fails alone.
pub fn insert_queued(
    conn: &mut SqliteConnection,
    queued: Vec<Queued>,
) -> BoxFuture<'_, Vec<Result<Inserted, sqlx::Error>>> {
    Box::pin(async move {
        let rows: Vec<Values> = queued
            .iter()
            .map(|q| {
                Values::of(
                    &q.id,
                    &q.process_id,
                    &q.submission,
                    q.idempotency.as_ref(),
                    &q.created_at,
                )
            })
            .collect();
        let mut outcomes = Vec::with_capacity(rows.len());
        let mut rest = &rows[..];
        while !rest.is_empty() {
            let size = rest.len().min(ROWS_PER_STATEMENT);
            let (chunk, after) = rest.split_at(size);
            rest = after;
            match insert_rows(conn, chunk).await {
                Ok(stored) => {
                    for row in chunk {
                        let new = stored.iter().any(|id| id == row.id);
                        outcomes.push(inserted(conn, row, new).await);
                    }
                }
                Err(e) if size == 1 => outcomes.push(Err(e)),
                Err(_) => {
                    for row in chunk {
                        outcomes.push(insert_one(conn, row).await);
                    }
                }
            }
        }
        outcomes
    })
}

/// Stores a submission as queued, in one statement. With `claim_as`, and
/// no queued row in its lane (so that this one is the oldest, and the
/// claim takes it), it is stored claimed instead, as `claim` would leave it:
/// a pickup one round trip shorter, and no entry in the queue index that
/// the claim would remove at once.
///
/// Two statements with the same row: the one that may claim returns what
/// it did, and costs a submission without a free slot about a tenth of the
/// durable submission rate (scenario 1 of BENCHMARKS.md), so that one has
/// the plain insert (`insert_queued`'s, for one row).
#[tracing::instrument(skip_all, fields(execution_id = %id))]
pub async fn insert(
    conn: &mut SqliteConnection,
    id: &ExecutionId,
    process_id: &ProcessId,
    submission: &Submission,
    idempotency: Option<&Idempotency>,
    created_at: &str,
    claim_as: Option<ClaimAs<'_>>,
) -> Result<Inserted, sqlx::Error> {
    let v = Values::of(id, process_id, submission, idempotency, created_at);
    let Some(ClaimAs { owner, now }) = claim_as else {
        return insert_one(conn, &v).await;
    };
    // A VALUES insert, not `INSERT … SELECT`: one that reads the table
    // it writes has SQLite copy what it selects into a temporary table.
    // `INDEXED BY` the queue's partial index: the bundled SQLite picks
    // it by itself, but SQLite 3.40's planner (the `sqlite3` CLI here)
    // takes `(status, seq)` and reads every queued row of every lane
    // (43 ms a look with 200,000 queued in another lane, against under
    // a millisecond). Named, no version's planner can choose otherwise.
    let stored = sqlx::query!(
        r#"INSERT INTO executions
                 (id, process_id, lane, name, language, code, args, working_dir, env, timeout_ms,
                  created_at, callback_url, callback_headers, callback_secret, idempotency_key, request_hash,
                  max_attempts, status, owner, attempt, started_at)
               VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17,
                 CASE WHEN NOT EXISTS (SELECT 1 FROM executions INDEXED BY executions_queue WHERE status = 'queued' AND lane = ?3)
                      THEN 'running' ELSE 'queued' END,
                 CASE WHEN NOT EXISTS (SELECT 1 FROM executions INDEXED BY executions_queue WHERE status = 'queued' AND lane = ?3)
                      THEN ?18 END,
                 CASE WHEN NOT EXISTS (SELECT 1 FROM executions INDEXED BY executions_queue WHERE status = 'queued' AND lane = ?3)
                      THEN 1 ELSE 0 END,
                 CASE WHEN NOT EXISTS (SELECT 1 FROM executions INDEXED BY executions_queue WHERE status = 'queued' AND lane = ?3)
                      THEN ?19 END)
               ON CONFLICT (idempotency_key) DO NOTHING
               RETURNING seq AS "seq!", status AS "status!", attempt AS "attempt!""#,
        v.id,
        v.process_id,
        v.lane,
        v.name,
        v.run.language,
        v.run.code,
        v.run.args,
        v.run.working_dir,
        v.run.env,
        v.run.timeout_ms,
        v.created_at,
        v.callback_url,
        v.callback_headers,
        v.callback_secret,
        v.key,
        v.hash,
        v.max_attempts,
        owner,
        now,
    )
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = stored else {
        return inserted(conn, &v, false).await;
    };
    let claimed = (row.status == "running").then(|| {
        Box::new(Claimed {
            seq: row.seq,
            id: v.id.to_string(),
            lane: v.lane.to_string(),
            process_id: v.process_id.to_string(),
            run: v.run,
            attempt: row.attempt,
            max_attempts: v.max_attempts,
            started_at: now.to_string(),
        })
    });
    Ok(Inserted::New(claimed))
}

/// A row claimed by a runner: what it needs to run the program.
#[derive(Clone, Debug)]
pub struct Claimed {
    pub seq: i64,
    pub id: String,
    pub lane: String,
    pub process_id: String,
    /// What it runs.
    pub run: Run,
    pub attempt: i64,
    pub max_attempts: i64,
    pub started_at: String,
}

/// Whether `lane` has a queued row (the queue's index only).
pub async fn has_queued(pool: &SqlitePool, lane: Lane) -> Result<bool, sqlx::Error> {
    let lane = lane.as_str();
    sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM executions INDEXED BY executions_queue
                          WHERE status = 'queued' AND lane = ?) AS "queued!: bool""#,
        lane
    )
    .fetch_one(pool)
    .await
}

/// Claims up to `limit` of the oldest queued rows of `lane` for `owner`, in
/// one statement: they become `running` with a new attempt number. (The
/// queue's index is named, as in `insert`.)
#[tracing::instrument(skip_all, fields(lane = lane.as_str(), limit))]
pub async fn claim(
    conn: &mut SqliteConnection,
    lane: Lane,
    limit: i64,
    owner: &str,
    now: &str,
) -> Result<Vec<Claimed>, sqlx::Error> {
    let lane = lane.as_str();
    let rows = sqlx::query!(
        r#"UPDATE executions
              SET status = 'running', owner = ?1, attempt = attempt + 1, started_at = ?2, error = NULL
            WHERE seq IN (SELECT seq FROM executions INDEXED BY executions_queue
                           WHERE status = 'queued' AND lane = ?3
                           ORDER BY seq LIMIT ?4)
        RETURNING seq AS "seq!", id AS "id!", lane AS "lane!", process_id AS "process_id!",
                  CAST(language AS BLOB) AS "language!: Vec<u8>",
                  CAST(code AS BLOB) AS "code!: Vec<u8>", CAST(args AS BLOB) AS "args: Vec<u8>",
                  CAST(working_dir AS BLOB) AS "working_dir!: Vec<u8>",
                  CAST(env AS BLOB) AS "env!: Vec<u8>",
                  timeout_ms AS "timeout_ms!", attempt AS "attempt!", max_attempts AS "max_attempts!",
                  started_at AS "started_at!""#,
        owner,
        now,
        lane,
        limit,
    )
    .fetch_all(&mut *conn)
    .await?;
    // Read as bytes: a row whose text was edited by hand into something
    // that is not UTF-8 fails as its job, instead of failing every claim of
    // its lane.
    let mut rows: Vec<Claimed> = rows
        .into_iter()
        .map(|r| {
            let mut unreadable = None;
            let mut text = |field: &str, bytes: Vec<u8>| {
                String::from_utf8(bytes).unwrap_or_else(|e| {
                    unreadable.get_or_insert(format!(
                        "the stored `{field}` is not UTF-8 (edited by hand?): it cannot run"
                    ));
                    String::from_utf8_lossy(e.as_bytes()).into_owned()
                })
            };
            let (language, code) = (text("language", r.language), text("code", r.code));
            let args = r.args.map(|a| text("args", a));
            let (working_dir, env) = (text("working_dir", r.working_dir), text("env", r.env));
            Claimed {
                seq: r.seq,
                id: r.id,
                lane: r.lane,
                process_id: r.process_id,
                run: Run {
                    language,
                    code,
                    args,
                    working_dir,
                    env,
                    timeout_ms: r.timeout_ms,
                    unreadable,
                },
                attempt: r.attempt,
                max_attempts: r.max_attempts,
                started_at: r.started_at,
            }
        })
        .collect();
    rows.sort_by_key(|r| r.seq);
    Ok(rows)
}

/// Who may write to a running row: the agent that claimed it, for that attempt.
#[derive(Clone, Debug)]
pub struct Fence {
    pub id: String,
    pub owner: String,
    pub attempt: i64,
}

/// Records the pid of a started program. False when fenced out.
pub async fn set_pid(
    conn: &mut SqliteConnection,
    fence: &Fence,
    pid: i64,
    now: &str,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query!(
        r#"UPDATE executions SET pid = ?, spawned_at = ?
            WHERE id = ? AND owner = ? AND attempt = ? AND status = 'running'"#,
        pid,
        now,
        fence.id,
        fence.owner,
        fence.attempt,
    )
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// How a run ended.
#[derive(Clone, Debug)]
pub struct Finish {
    pub status: Status,
    pub exit_code: Option<i64>,
    pub error: Option<String>,
    pub completed_at: String,
}

/// Moves a running row to its terminal status, with the last of its output
/// (`output`, counted in the same statement) and the program's pid and when
/// it was spawned if they are not stored yet: a short job's start, output
/// and end take one statement and its chunks. False when fenced out
/// (another owner or attempt has the row, or it is no longer running).
#[tracing::instrument(skip_all, fields(execution_id = %fence.id, status = %finish.status))]
pub async fn finish(
    conn: &mut SqliteConnection,
    fence: &Fence,
    finish: &Finish,
    spawned: Option<(i64, &str)>,
    output: &[Chunk],
) -> Result<bool, sqlx::Error> {
    debug_assert!(finish.status.is_terminal());
    let status = finish.status.as_str();
    let (pid, spawned_at) = spawned.unzip();
    let counts = Counts::of(output);
    let done = sqlx::query!(
        r#"UPDATE executions
              SET status = ?, exit_code = ?, error = ?, completed_at = ?,
                  pid = COALESCE(?, pid), spawned_at = COALESCE(?, spawned_at),
                  stdout_bytes = stdout_bytes + ?, stdout_truncated = MAX(stdout_truncated, ?),
                  stderr_bytes = stderr_bytes + ?, stderr_truncated = MAX(stderr_truncated, ?)
            WHERE id = ? AND owner = ? AND attempt = ? AND status = 'running'"#,
        status,
        finish.exit_code,
        finish.error,
        finish.completed_at,
        pid,
        spawned_at,
        counts.stdout_bytes,
        counts.stdout_truncated,
        counts.stderr_bytes,
        counts.stderr_truncated,
        fence.id,
        fence.owner,
        fence.attempt,
    )
    .execute(&mut *conn)
    .await?;
    if done.rows_affected() == 0 {
        return Ok(false);
    }
    // The attempt's record is the `execution_attempt_ended` trigger's. The
    // output is stamped when it is stored, as the rest of it was.
    output::insert(conn, fence, output, &crate::db::now()).await?;
    Ok(true)
}

/// Records the attempt a row just lost, as the row says it ended. (An
/// attempt's own end is recorded by the `execution_attempt_ended` trigger,
/// which keeps this record.)
async fn record_lost(conn: &mut SqliteConnection, id: &str) -> Result<(), sqlx::Error> {
    let now = crate::db::now();
    sqlx::query!(
        r#"INSERT OR REPLACE INTO execution_attempts
             (execution_id, attempt, owner, started_at, ended_at, outcome, exit_code, error)
           SELECT id, attempt, owner, started_at, COALESCE(completed_at, ?2), 'lost', exit_code, error
             FROM executions WHERE id = ?1 AND attempt > 0"#,
        id,
        now,
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Kills a row that has not started, saying why. False when it is not queued.
pub async fn kill_queued(
    conn: &mut SqliteConnection,
    id: &str,
    error: &str,
    now: &str,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query!(
        r#"UPDATE executions
              SET status = 'killed', completed_at = ?, error = ?
            WHERE id = ? AND status = 'queued'"#,
        now,
        error,
        id,
    )
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Kills every queued sync run unrun, saying why: at start, their callers
/// went with the earlier agent. The number killed.
pub async fn kill_queued_sync(
    conn: &mut SqliteConnection,
    error: &str,
    now: &str,
) -> Result<u64, sqlx::Error> {
    let done = sqlx::query!(
        r#"UPDATE executions
              SET status = 'killed', completed_at = ?, error = ?
            WHERE lane = 'sync' AND status = 'queued'"#,
        now,
        error,
    )
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected())
}

/// An execution as the API shows it (no code, env or secret).
#[derive(Clone, Debug)]
pub struct ExecutionRow {
    pub seq: i64,
    pub id: String,
    pub process_id: String,
    pub lane: String,
    pub name: Option<String>,
    pub language: String,
    /// The command line, for `language = 'command'` rows only.
    pub command: Option<String>,
    pub status: String,
    pub attempt: i64,
    pub max_attempts: i64,
    pub pid: Option<i64>,
    pub exit_code: Option<i64>,
    pub error: Option<String>,
    pub timeout_ms: i64,
    pub created_at: String,
    pub started_at: Option<String>,
    pub spawned_at: Option<String>,
    pub completed_at: Option<String>,
    /// Output stored of the attempt shown, per stream.
    pub stdout_bytes: i64,
    pub stderr_bytes: i64,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub callback_url: Option<String>,
}

/// One execution by its `exec_…` or `proc_…` id.
pub async fn get<'c, E>(executor: E, id: &str) -> Result<Option<ExecutionRow>, sqlx::Error>
where
    E: sqlx::Executor<'c, Database = sqlx::Sqlite>,
{
    sqlx::query_as!(
        ExecutionRow,
        r#"SELECT seq AS "seq!", id, process_id, lane, name, language,
                  CASE WHEN language = 'command' THEN code END AS "command?: String",
                  status, attempt, max_attempts, pid, exit_code, error, timeout_ms, created_at, started_at,
                  spawned_at, completed_at,
                  stdout_truncated AS "stdout_truncated: bool",
                  stderr_truncated AS "stderr_truncated: bool", callback_url,
                  stdout_bytes, stderr_bytes
             FROM executions WHERE id = ?1 OR process_id = ?1"#,
        id
    )
    .fetch_optional(executor)
    .await
}

/// What to list.
#[derive(Clone, Debug, Default)]
pub struct ListFilter {
    pub status: Option<Status>,
    pub name: Option<String>,
    /// Only rows older than this `seq` (the previous page's cursor).
    pub before: Option<i64>,
    pub limit: i64,
    pub offset: i64,
}

/// Executions, newest first.
pub async fn list<'c, E>(executor: E, filter: &ListFilter) -> Result<Vec<ExecutionRow>, sqlx::Error>
where
    E: sqlx::Executor<'c, Database = sqlx::Sqlite>,
{
    let before = filter.before.unwrap_or(i64::MAX);
    match filter.status {
        // Separate statements so each uses its index: (status, seq) or the rowid.
        Some(status) => {
            let status = status.as_str();
            sqlx::query_as!(
                ExecutionRow,
                r#"SELECT seq AS "seq!", id, process_id, lane, name, language,
                          CASE WHEN language = 'command' THEN code END AS "command?: String",
                          status, attempt, max_attempts, pid, exit_code, error, timeout_ms, created_at, started_at,
                  spawned_at, completed_at,
                          stdout_truncated AS "stdout_truncated: bool",
                          stderr_truncated AS "stderr_truncated: bool", callback_url,
                  stdout_bytes, stderr_bytes
                     FROM executions
                    WHERE status = ?1 AND seq < ?2 AND (?3 IS NULL OR name = ?3)
                    ORDER BY seq DESC LIMIT ?4 OFFSET ?5"#,
                status,
                before,
                filter.name,
                filter.limit,
                filter.offset,
            )
            .fetch_all(executor)
            .await
        }
        None => {
            sqlx::query_as!(
                ExecutionRow,
                r#"SELECT seq AS "seq!", id, process_id, lane, name, language,
                          CASE WHEN language = 'command' THEN code END AS "command?: String",
                          status, attempt, max_attempts, pid, exit_code, error, timeout_ms, created_at, started_at,
                  spawned_at, completed_at,
                          stdout_truncated AS "stdout_truncated: bool",
                          stderr_truncated AS "stderr_truncated: bool", callback_url,
                  stdout_bytes, stderr_bytes
                     FROM executions
                    WHERE seq < ?1 AND (?2 IS NULL OR name = ?2)
                    ORDER BY seq DESC LIMIT ?3 OFFSET ?4"#,
                before,
                filter.name,
                filter.limit,
                filter.offset,
            )
            .fetch_all(executor)
            .await
        }
    }
}

/// A row some agent was running, as recovery needs it.
#[derive(Clone, Debug)]
pub struct RunningRow {
    pub id: String,
    pub lane: String,
    pub language: String,
    pub started_at: Option<String>,
    pub owner: Option<String>,
    pub attempt: i64,
    pub max_attempts: i64,
    pub stdout_bytes: i64,
    pub stderr_bytes: i64,
    pub timeout_ms: i64,
    /// Null while the program's pid is not stored yet.
    pub pid: Option<i64>,
}

/// Every row in `running`.
pub async fn running(pool: &SqlitePool) -> Result<Vec<RunningRow>, sqlx::Error> {
    sqlx::query_as!(
        RunningRow,
        r#"SELECT id AS "id!", lane, language, started_at, owner, attempt, max_attempts,
                  stdout_bytes, stderr_bytes, timeout_ms, pid
             FROM executions WHERE status = 'running' ORDER BY seq"#
    )
    .fetch_all(pool)
    .await
}

/// Takes over a running row for `owner`, keeping its attempt (the same run
/// goes on). Writes fenced by the old owner no longer land.
pub async fn adopt(
    conn: &mut SqliteConnection,
    id: &str,
    attempt: i64,
    owner: &str,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query!(
        "UPDATE executions SET owner = ? WHERE id = ? AND attempt = ? AND status = 'running'",
        owner,
        id,
        attempt,
    )
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Gives back a claim whose program never started (the agent stopped while
/// it waited at its gate): the row is queued again as it was before the
/// claim, its attempt not counted. False when the fence does not hold.
pub async fn unclaim(conn: &mut SqliteConnection, fence: &Fence) -> Result<bool, sqlx::Error> {
    let done = sqlx::query!(
        r#"UPDATE executions
              SET status = 'queued', owner = NULL, attempt = attempt - 1, pid = NULL,
                  started_at = NULL, spawned_at = NULL
            WHERE id = ? AND owner = ? AND attempt = ? AND status = 'running'"#,
        fence.id,
        fence.owner,
        fence.attempt,
    )
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Resolves a running row whose process is gone: queued again when it has
/// attempts left, else failed with `error`. Returns the new status, or
/// `None` when the fence does not hold.
pub async fn lose(
    conn: &mut SqliteConnection,
    fence: &Fence,
    error: &str,
    now: &str,
) -> Result<Option<Status>, sqlx::Error> {
    let marked = sqlx::query!(
        r#"UPDATE executions SET error = ?, completed_at = ?
            WHERE id = ? AND owner = ? AND attempt = ? AND status = 'running'"#,
        error,
        now,
        fence.id,
        fence.owner,
        fence.attempt,
    )
    .execute(&mut *conn)
    .await?;
    if marked.rows_affected() == 0 {
        return Ok(None);
    }
    record_lost(conn, &fence.id).await?;
    let requeued = sqlx::query!(
        r#"UPDATE executions
              SET status = 'queued', owner = NULL, pid = NULL, started_at = NULL, spawned_at = NULL,
                  completed_at = NULL, exit_code = NULL,
                  stdout_bytes = 0, stderr_bytes = 0, stdout_truncated = 0, stderr_truncated = 0
            WHERE id = ? AND attempt < max_attempts"#,
        fence.id,
    )
    .execute(&mut *conn)
    .await?;
    if requeued.rows_affected() == 1 {
        return Ok(Some(Status::Queued));
    }
    sqlx::query!(
        "UPDATE executions SET status = 'failed' WHERE id = ?",
        fence.id
    )
    .execute(&mut *conn)
    .await?;
    Ok(Some(Status::Failed))
}

/// How many executions there are per status, language and lane.
#[derive(Clone, Debug)]
pub struct Count {
    pub status: String,
    pub language: String,
    pub lane: String,
    pub n: i64,
}

pub async fn counts(pool: &SqlitePool) -> Result<Vec<Count>, sqlx::Error> {
    sqlx::query_as!(
        Count,
        r#"SELECT status, language, lane, COUNT(*) AS "n!: i64"
             FROM executions GROUP BY status, language, lane"#
    )
    .fetch_all(pool)
    .await
}
