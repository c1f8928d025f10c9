//! SQL of the `output_chunks` table: fenced appends and reads.

use futures::TryStreamExt;
use sqlx::{SqliteConnection, SqlitePool};

use super::executions::Fence;
use crate::domain::Stream;

/// A piece of one stream's output, numbered in order within its stream.
#[derive(Clone, Debug)]
pub struct Chunk {
    pub stream: Stream,
    pub seq: i64,
    pub data: Vec<u8>,
    /// Output after this chunk was dropped at the cap.
    pub truncated: bool,
}

/// What a set of chunks adds to its row: bytes and truncation flags per stream.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counts {
    pub stdout_bytes: i64,
    pub stdout_truncated: bool,
    pub stderr_bytes: i64,
    pub stderr_truncated: bool,
}

impl Counts {
    pub fn of(chunks: &[Chunk]) -> Counts {
        let total = |s: Stream| -> (i64, bool) {
            chunks
                .iter()
                .filter(|c| c.stream == s)
                .fold((0, false), |(n, t), c| {
                    (n + c.data.len() as i64, t || c.truncated)
                })
        };
        let (stdout_bytes, stdout_truncated) = total(Stream::Stdout);
        let (stderr_bytes, stderr_truncated) = total(Stream::Stderr);
        Counts {
            stdout_bytes,
            stdout_truncated,
            stderr_bytes,
            stderr_truncated,
        }
    }
}

/// Appends chunks of a running execution and counts their bytes. Nothing is
/// written when the fence does not hold (returns false).
#[tracing::instrument(skip_all, fields(execution_id = %fence.id, chunks = chunks.len()))]
pub async fn append(
    conn: &mut SqliteConnection,
    fence: &Fence,
    chunks: &[Chunk],
    now: &str,
) -> Result<bool, sqlx::Error> {
    let counts = Counts::of(chunks);
    let done = sqlx::query!(
        r#"UPDATE executions
              SET stdout_bytes = stdout_bytes + ?, stdout_truncated = MAX(stdout_truncated, ?),
                  stderr_bytes = stderr_bytes + ?, stderr_truncated = MAX(stderr_truncated, ?)
            WHERE id = ? AND owner = ? AND attempt = ? AND status = 'running'"#,
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
    insert(conn, fence, chunks, now).await?;
    Ok(true)
}

/// Inserts the chunks that hold data, once the caller has counted them in
/// their row (which the fence allowed).
pub(super) async fn insert(
    conn: &mut SqliteConnection,
    fence: &Fence,
    chunks: &[Chunk],
    now: &str,
) -> Result<(), sqlx::Error> {
    for chunk in chunks.iter().filter(|c| !c.data.is_empty()) {
        let stream = chunk.stream.as_str();
        sqlx::query!(
            r#"INSERT INTO output_chunks (execution_id, attempt, stream, seq, data, created_at)
               VALUES (?, ?, ?, ?, ?, ?)"#,
            fence.id,
            fence.attempt,
            stream,
            chunk.seq,
            chunk.data,
            now,
        )
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// All stored output of one stream of one attempt, in order.
pub async fn read<'c, E>(
    executor: E,
    execution_id: &str,
    attempt: i64,
    stream: Stream,
    expected: u64,
) -> Result<Vec<u8>, sqlx::Error>
where
    E: sqlx::Executor<'c, Database = sqlx::Sqlite>,
{
    let stream = stream.as_str();
    let mut rows = sqlx::query_scalar!(
        r#"SELECT data AS "data!: Vec<u8>" FROM output_chunks
            WHERE execution_id = ? AND attempt = ? AND stream = ? ORDER BY seq"#,
        execution_id,
        attempt,
        stream
    )
    .fetch(executor);
    // Room for what the row counts, at once: grown a chunk at a time, the
    // buffer would pass through sizes up to twice the output, each copied
    // into the next. (Bounded: a count edited by hand reserves no more.)
    let mut out = Vec::with_capacity(expected.min(EXPECTED_AT_MOST) as usize);
    while let Some(data) = rows.try_next().await? {
        out.extend_from_slice(&data);
    }
    Ok(out)
}

/// One stream's output as it was when `Pages::of` was called (its chunks up
/// to then), read a page at a time: an answer that sends a large output
/// reads it as it goes, instead of holding all of it at once.
#[derive(Debug)]
pub struct Pages {
    pool: SqlitePool,
    execution_id: String,
    attempt: i64,
    stream: Stream,
    /// The last chunk then (`None`: there was none), and the last one read.
    last: Option<i64>,
    read_to: Option<i64>,
    /// The chunks not read yet were gone when looked for: the execution was
    /// deleted meanwhile (all its output goes in one statement).
    pub gone: bool,
}

/// Chunks in one page of `Pages` (each at most 64 KiB).
const PAGE_CHUNKS: i64 = 16;

impl Pages {
    /// The chunks of one stream of `execution_id`'s `attempt` up to now
    /// (on `conn`, in the transaction its row was read in), to be read
    /// later from `pool`.
    pub async fn of(
        conn: &mut SqliteConnection,
        pool: &SqlitePool,
        execution_id: &str,
        attempt: i64,
        stream: Stream,
    ) -> Result<Pages, sqlx::Error> {
        let next = next_seq(&mut *conn, execution_id, attempt, stream).await?;
        Ok(Pages {
            pool: pool.clone(),
            execution_id: execution_id.to_string(),
            attempt,
            stream,
            last: (next > 0).then(|| next - 1),
            read_to: None,
            gone: false,
        })
    }

    /// The next page's bytes; `None` once past the last chunk, or when the
    /// rest is `gone`.
    pub async fn next(&mut self) -> Result<Option<Vec<u8>>, sqlx::Error> {
        let Some(last) = self.last.filter(|last| self.read_to < Some(*last)) else {
            return Ok(None);
        };
        let (stream, after) = (self.stream.as_str(), self.read_to.unwrap_or(i64::MIN));
        let chunks = sqlx::query!(
            r#"SELECT seq AS "seq!", data AS "data!: Vec<u8>" FROM output_chunks
                WHERE execution_id = ? AND attempt = ? AND stream = ? AND seq > ? AND seq <= ?
                ORDER BY seq LIMIT ?"#,
            self.execution_id,
            self.attempt,
            stream,
            after,
            last,
            PAGE_CHUNKS
        )
        .fetch_all(&self.pool)
        .await?;
        let Some(end) = chunks.last().map(|c| c.seq) else {
            self.read_to = Some(last);
            self.gone = true;
            return Ok(None);
        };
        self.read_to = Some(end);
        Ok(Some(
            chunks
                .into_iter()
                .map(|c| c.data)
                .collect::<Vec<_>>()
                .concat(),
        ))
    }
}

/// The most `read` reserves ahead for what a row says it stored.
const EXPECTED_AT_MOST: u64 = 1 << 30;

/// Output as text, invalid UTF-8 replaced; valid output is not copied.
pub fn into_text(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// A tail (`read_tail`) as text. Where the cut (`cut`) split a character,
/// the rest of it at the start is skipped rather than shown as U+FFFD.
pub fn tail_text(bytes: &[u8], cut: bool) -> String {
    let skip = if cut {
        bytes
            .iter()
            .take(3)
            .take_while(|b| (**b & 0b1100_0000) == 0b1000_0000)
            .count()
    } else {
        0
    };
    String::from_utf8_lossy(&bytes[skip..]).into_owned()
}

/// The last `max` bytes of one stream, and whether earlier output was left
/// out. On the read pool, or on the writer connection inside a transaction.
pub async fn read_tail<'c, E>(
    executor: E,
    execution_id: &str,
    attempt: i64,
    stream: Stream,
    max: usize,
) -> Result<(Vec<u8>, bool), sqlx::Error>
where
    E: sqlx::Executor<'c, Database = sqlx::Sqlite>,
{
    let stream = stream.as_str();
    let mut rows = sqlx::query_scalar!(
        r#"SELECT data AS "data!: Vec<u8>" FROM output_chunks
            WHERE execution_id = ? AND attempt = ? AND stream = ? ORDER BY seq DESC"#,
        execution_id,
        attempt,
        stream
    )
    .fetch(executor);
    let mut pieces = Vec::new();
    let mut size = 0;
    let mut cut = false;
    while let Some(data) = rows.try_next().await? {
        if size >= max {
            cut = true;
            break;
        }
        size += data.len();
        pieces.push(data);
    }
    let mut out: Vec<u8> = pieces.into_iter().rev().flatten().collect();
    if out.len() > max {
        out.drain(..out.len() - max);
        cut = true;
    }
    Ok((out, cut))
}

/// Where capture of one stream resumes after an agent restart: the next
/// chunk number of the attempt. (The byte offset is the row's `*_bytes`.)
pub async fn next_seq<'c, E>(
    executor: E,
    execution_id: &str,
    attempt: i64,
    stream: Stream,
) -> Result<i64, sqlx::Error>
where
    E: sqlx::Executor<'c, Database = sqlx::Sqlite>,
{
    let stream = stream.as_str();
    let next = sqlx::query_scalar!(
        r#"SELECT COALESCE(MAX(seq) + 1, 0) AS "next!: i64" FROM output_chunks
            WHERE execution_id = ? AND attempt = ? AND stream = ?"#,
        execution_id,
        attempt,
        stream
    )
    .fetch_one(executor)
    .await?;
    Ok(next)
}

/// A stored chunk as a live reader sees it.
#[derive(Clone, Debug)]
pub struct Piece {
    pub stream: String,
    pub seq: i64,
    pub data: Vec<u8>,
    pub created_at: String,
}

/// Chunks of one attempt from the given next-sequence numbers on, both
/// streams interleaved in the order they were stored (at most `limit`).
/// That order is the rowid's, never the chunks' times: a job's last chunk,
/// stored with its end, carries the program's end time, which can come
/// before the time of output the agent stored after the program ended, and
/// a reader's cursor moves on by each stream's `seq`.
pub async fn since(
    pool: &SqlitePool,
    execution_id: &str,
    attempt: i64,
    stdout_from: i64,
    stderr_from: i64,
    limit: i64,
    max_bytes: usize,
) -> Result<Vec<Piece>, sqlx::Error> {
    let mut rows = sqlx::query_as!(
        Piece,
        r#"SELECT stream, seq, data AS "data!: Vec<u8>", created_at FROM output_chunks
            WHERE execution_id = ?1 AND attempt = ?2
              AND ((stream = 'stdout' AND seq >= ?3) OR (stream = 'stderr' AND seq >= ?4))
            ORDER BY id LIMIT ?5"#,
        execution_id,
        attempt,
        stdout_from,
        stderr_from,
        limit,
    )
    .fetch(pool);
    // Up to `max_bytes` (one piece at least): what a reader holds at once
    // does not grow with the output.
    let (mut pieces, mut bytes) = (Vec::new(), 0);
    while bytes < max_bytes {
        let Some(piece) = rows.try_next().await? else {
            break;
        };
        bytes += piece.data.len();
        pieces.push(piece);
    }
    Ok(pieces)
}
