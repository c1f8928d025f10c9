//! SQL of the callback outbox: `callbacks` (one row per delivery) and
//! `callback_attempts` (one row per POST).

use sqlx::{SqliteConnection, SqlitePool};

/// What a callback payload is made of, read in the transaction that froze it.
#[derive(Clone, Debug)]
pub struct Source {
    pub id: String,
    pub process_id: String,
    pub attempt: i64,
    pub status: String,
    pub exit_code: Option<i64>,
    pub error: Option<String>,
    pub started_at: Option<String>,
    pub completed_at: Option<String>,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    /// Bytes stored per stream: a stream with none has no tail to read.
    pub stdout_bytes: i64,
    pub stderr_bytes: i64,
    pub callback_url: String,
    pub callback_headers: Option<String>,
    pub callback_secret: Option<String>,
}

/// The payload source of `execution_id`, if it is an async execution.
pub async fn source(
    conn: &mut SqliteConnection,
    execution_id: &str,
) -> Result<Option<Source>, sqlx::Error> {
    sqlx::query_as!(
        Source,
        r#"SELECT id AS "id!", process_id, attempt, status, exit_code, error, started_at, completed_at,
                  stdout_truncated AS "stdout_truncated: bool",
                  stderr_truncated AS "stderr_truncated: bool",
                  stdout_bytes, stderr_bytes,
                  callback_url AS "callback_url!", callback_headers, callback_secret
             FROM executions WHERE id = ? AND callback_url IS NOT NULL"#,
        execution_id
    )
    .fetch_optional(&mut *conn)
    .await
}

/// A delivery to queue.
#[derive(Clone, Debug)]
pub struct NewCallback {
    pub id: String,
    pub execution_id: String,
    pub url: String,
    pub headers: String,
    pub payload: String,
    pub now: String,
    /// Leased at once to this owner until then: its first attempt needs no claim.
    pub lease: Option<(String, String)>,
}

/// Queues a delivery, due at once.
pub async fn insert(conn: &mut SqliteConnection, new: &NewCallback) -> Result<(), sqlx::Error> {
    let lease_owner = new.lease.as_ref().map(|l| l.0.as_str());
    let lease_until = new.lease.as_ref().map(|l| l.1.as_str());
    sqlx::query!(
        r#"INSERT INTO callbacks (id, execution_id, url, headers, payload, status, next_attempt_at,
                                  created_at, updated_at, lease_owner, lease_until)
           VALUES (?1, ?2, ?3, ?4, ?5, 'pending', ?6, ?6, ?6, ?7, ?8)"#,
        new.id,
        new.execution_id,
        new.url,
        new.headers,
        new.payload,
        new.now,
        lease_owner,
        lease_until,
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// A delivery claimed for one attempt.
#[derive(Clone, Debug)]
pub struct Due {
    pub id: String,
    pub execution_id: String,
    pub url: String,
    pub headers: String,
    pub payload: String,
    /// Attempts made before this one.
    pub attempts: i64,
    pub secret: Option<String>,
    /// When it was queued: the execution's end.
    pub created_at: String,
}

/// Leases up to `limit` due deliveries to `owner` until `lease_until`.
///
/// Only rows no one holds: a lease is this boot's (those of earlier boots
/// are freed at start, `release_foreign_leases`), and the row it holds is
/// in this agent's hands, waiting for a permit or in flight, until its
/// attempt is recorded. `lease_until` is when that attempt should be over,
/// for an operator to read; it does not free the row, for a row still
/// waiting its turn behind a backlog would then be claimed a second time
/// and POSTed twice at once.
///
/// `skip` is a JSON array of URL prefixes (receivers) whose deliveries are
/// left for later: those receivers have their share in flight. One last
/// updated after `now` was scheduled before the wall clock went back (an
/// NTP step, a VM restored from a snapshot), and is due now: its retry in
/// five seconds must not wait for the hour the clock went back.
pub async fn claim_due(
    conn: &mut SqliteConnection,
    owner: &str,
    now: &str,
    lease_until: &str,
    limit: i64,
    skip: &str,
) -> Result<Vec<Due>, sqlx::Error> {
    let claimed = sqlx::query!(
        r#"UPDATE callbacks SET lease_owner = ?1, lease_until = ?2
            WHERE id IN (SELECT id FROM callbacks
                          WHERE status IN ('pending', 'failed')
                            AND (next_attempt_at <= ?3 OR updated_at > ?3)
                            AND lease_owner IS NULL
                            AND NOT EXISTS (SELECT 1 FROM json_each(?5)
                                             WHERE substr(callbacks.url, 1, length(value)) = value)
                          ORDER BY next_attempt_at LIMIT ?4)
        RETURNING id AS "id!""#,
        owner,
        lease_until,
        now,
        limit,
        skip,
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut due = Vec::with_capacity(claimed.len());
    for row in claimed {
        let found = sqlx::query_as!(
            Due,
            r#"SELECT c.id AS "id!", c.execution_id, c.url, c.headers, c.payload, c.attempts,
                      e.callback_secret AS secret, c.created_at
                 FROM callbacks c JOIN executions e ON e.id = c.execution_id
                WHERE c.id = ?"#,
            row.id
        )
        .fetch_one(&mut *conn)
        .await?;
        due.push(found);
    }
    Ok(due)
}

/// One attempt's record and what follows from it.
#[derive(Clone, Debug)]
pub struct Attempt {
    pub callback_id: String,
    pub attempt: i64,
    pub started_at: String,
    pub duration_ms: f64,
    pub http_status: Option<i64>,
    pub outcome: &'static str,
    pub error: Option<String>,
    pub response_body: Option<String>,
    /// `delivered`, `failed` (retry at `next_attempt_at`) or `dead`.
    pub new_status: &'static str,
    pub next_attempt_at: Option<String>,
    pub now: String,
}

/// What recording an attempt did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recorded {
    /// `owner` no longer held the lease: nothing changed.
    NotHeld,
    /// Recorded; the next attempt is due at this time, if there is one (a
    /// redelivery asked for while the attempt was in flight makes it now).
    Next(Option<String>),
}

/// Records an attempt and moves the delivery on, if `owner` still holds its lease.
pub async fn record_attempt(
    conn: &mut SqliteConnection,
    owner: &str,
    a: &Attempt,
) -> Result<Recorded, sqlx::Error> {
    let delivered_at = (a.new_status == "delivered").then_some(a.now.as_str());
    let last_error = a.error.as_deref();
    // A `next_attempt_at` after this attempt's start was set by a
    // redelivery while it was in flight: a retry is due at once.
    let updated = sqlx::query_scalar!(
        r#"UPDATE callbacks
              SET status = ?1, attempts = ?2,
                  next_attempt_at = CASE WHEN ?1 = 'failed' AND next_attempt_at > ?10 THEN ?7 ELSE ?3 END,
                  last_status = ?4, last_error = ?5,
                  delivered_at = COALESCE(?6, delivered_at), updated_at = ?7,
                  lease_owner = NULL, lease_until = NULL
            WHERE id = ?8 AND lease_owner = ?9
        RETURNING next_attempt_at"#,
        a.new_status,
        a.attempt,
        a.next_attempt_at,
        a.http_status,
        last_error,
        delivered_at,
        a.now,
        a.callback_id,
        owner,
        a.started_at,
    )
    .fetch_optional(&mut *conn)
    .await?;
    let Some(next) = updated else {
        return Ok(Recorded::NotHeld);
    };
    sqlx::query!(
        r#"INSERT INTO callback_attempts
             (callback_id, attempt, started_at, duration_ms, http_status, outcome, error, response_body)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?)"#,
        a.callback_id,
        a.attempt,
        a.started_at,
        a.duration_ms,
        a.http_status,
        a.outcome,
        a.error,
        a.response_body,
    )
    .execute(&mut *conn)
    .await?;
    Ok(Recorded::Next(next))
}

/// Frees leases held by other boots of the agent: their POSTs died with them.
pub async fn release_foreign_leases(
    conn: &mut SqliteConnection,
    owner: &str,
) -> Result<u64, sqlx::Error> {
    let done = sqlx::query!(
        r#"UPDATE callbacks SET lease_owner = NULL, lease_until = NULL
            WHERE lease_owner IS NOT NULL AND lease_owner != ?"#,
        owner
    )
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected())
}

/// When the next delivery can be claimed, if any is waiting: the earliest
/// due time of those no one holds (a held one's attempt, when recorded,
/// says when its next is due). Deliveries to the receivers in `skip` (as
/// for `claim_due`) are left out, and one last updated after `now` is due
/// now (as for `claim_due`).
pub async fn next_due(
    pool: &SqlitePool,
    skip: &str,
    now: &str,
) -> Result<Option<String>, sqlx::Error> {
    let row = sqlx::query_scalar!(
        r#"SELECT MIN(CASE WHEN updated_at > ?2 THEN ?2 ELSE next_attempt_at END) AS "at?: String"
             FROM callbacks WHERE status IN ('pending', 'failed') AND lease_owner IS NULL
              AND NOT EXISTS (SELECT 1 FROM json_each(?1)
                               WHERE substr(callbacks.url, 1, length(value)) = value)"#,
        skip,
        now,
    )
    .fetch_one(pool)
    .await?;
    Ok(row)
}

/// The latest delivery of an execution, as the process object shows it.
#[derive(Clone, Debug)]
pub struct Summary {
    pub id: String,
    pub url: String,
    pub status: String,
    pub attempts: i64,
    pub next_attempt_at: Option<String>,
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    pub created_at: String,
    pub delivered_at: Option<String>,
}

/// Every delivery of an execution, newest first.
pub async fn deliveries<'c, E>(executor: E, execution_id: &str) -> Result<Vec<Summary>, sqlx::Error>
where
    E: sqlx::Executor<'c, Database = sqlx::Sqlite>,
{
    sqlx::query_as!(
        Summary,
        r#"SELECT id AS "id!", url, status, attempts, next_attempt_at, last_status, last_error,
                  created_at, delivered_at
             FROM callbacks WHERE execution_id = ? ORDER BY created_at DESC, id DESC"#,
        execution_id
    )
    .fetch_all(executor)
    .await
}

/// A recorded attempt, as the API lists it.
#[derive(Clone, Debug)]
pub struct AttemptRow {
    pub callback_id: String,
    pub attempt: i64,
    pub started_at: String,
    pub duration_ms: f64,
    pub http_status: Option<i64>,
    pub outcome: String,
    pub error: Option<String>,
    pub response_body: Option<String>,
}

/// Every attempt of every delivery of an execution, in order.
pub async fn attempts<'c, E>(
    executor: E,
    execution_id: &str,
) -> Result<Vec<AttemptRow>, sqlx::Error>
where
    E: sqlx::Executor<'c, Database = sqlx::Sqlite>,
{
    sqlx::query_as!(
        AttemptRow,
        r#"SELECT a.callback_id, a.attempt, a.started_at, a.duration_ms, a.http_status, a.outcome,
                  a.error, a.response_body
             FROM callback_attempts a JOIN callbacks c ON c.id = a.callback_id
            WHERE c.execution_id = ? ORDER BY a.started_at, a.attempt"#,
        execution_id
    )
    .fetch_all(executor)
    .await
}

/// What a redelivery found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hurried {
    /// No delivery of the execution is waiting.
    Nothing,
    /// A waiting delivery is due now.
    DueNow,
    /// Its attempt is under way (or about to be): should it fail, the next
    /// is due at once (`record_attempt`).
    InFlight,
}

/// Makes an execution's waiting delivery due now.
pub async fn hurry(
    conn: &mut SqliteConnection,
    execution_id: &str,
    now: &str,
) -> Result<Hurried, sqlx::Error> {
    let held = sqlx::query_scalar!(
        r#"UPDATE callbacks SET next_attempt_at = ?1, updated_at = ?1
            WHERE execution_id = ?2 AND status IN ('pending', 'failed')
        RETURNING lease_owner IS NOT NULL AS "held!: bool""#,
        now,
        execution_id
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(match held.as_slice() {
        [] => Hurried::Nothing,
        rows if rows.iter().all(|&held| held) => Hurried::InFlight,
        _ => Hurried::DueNow,
    })
}

/// How many deliveries there are per status.
pub async fn counts(pool: &SqlitePool) -> Result<Vec<(String, i64)>, sqlx::Error> {
    let rows =
        sqlx::query!(r#"SELECT status, COUNT(*) AS "n!: i64" FROM callbacks GROUP BY status"#)
            .fetch_all(pool)
            .await?;
    Ok(rows.into_iter().map(|r| (r.status, r.n)).collect())
}
