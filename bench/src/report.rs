//! The result table, and the small measuring helpers every scenario shares.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use hdrhistogram::Histogram;

/// One line of the table: a figure of a scenario against its target.
pub struct Row {
    pub id: String,
    pub scenario: String,
    pub figure: String,
    pub target: String,
    pub baseline: String,
    /// None: no target (context only) or not measurable in this run.
    pub pass: Option<bool>,
}

impl Row {
    pub fn new(
        id: &str,
        scenario: &str,
        figure: String,
        target: &str,
        baseline: String,
        pass: Option<bool>,
    ) -> Row {
        Row {
            id: id.into(),
            scenario: scenario.into(),
            figure,
            target: target.into(),
            baseline,
            pass,
        }
    }
}

/// What one scenario produced: table rows and notes (evidence, caveats).
#[derive(Default)]
pub struct Outcome {
    pub rows: Vec<Row>,
    pub notes: Vec<String>,
}

impl Outcome {
    pub fn note(&mut self, text: impl Into<String>) {
        let text = text.into();
        println!("    {text}");
        self.notes.push(text);
    }
}

pub fn print_table(rows: &[Row]) {
    println!("| # | scenario | figure | target | baseline | verdict |");
    println!("|---|---|---|---|---|---|");
    for r in rows {
        let verdict = match r.pass {
            Some(true) => "PASS",
            Some(false) => "FAIL",
            None => "–",
        };
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            r.id, r.scenario, r.figure, r.target, r.baseline, verdict
        );
    }
}

/// Microsecond histogram, 1 µs to 10 min, 3 significant figures.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds")
}

pub fn record(h: &mut Histogram<u64>, d: Duration) {
    let us = (d.as_micros() as u64).clamp(1, 600_000_000);
    h.saturating_record(us);
}

/// Milliseconds at quantile `q`.
pub fn ms_at(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

/// Microseconds between two stored timestamps (RFC 3339), `b − a`.
pub fn micros_between(a: &str, b: &str) -> Option<i64> {
    let a = chrono::DateTime::parse_from_rfc3339(a).ok()?;
    let b = chrono::DateTime::parse_from_rfc3339(b).ok()?;
    (b - a).num_microseconds()
}

/// Seconds since the Unix epoch of a stored timestamp.
pub fn epoch_secs(t: &str) -> Option<f64> {
    let t = chrono::DateTime::parse_from_rfc3339(t).ok()?;
    Some(t.timestamp_micros() as f64 / 1e6)
}

/// Opens the agent's database for reading (WAL: works while the agent runs).
pub fn open_db_read(path: &Path) -> Result<rusqlite::Connection> {
    let conn = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("open {}", path.display()))?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn)
}

/// Polls execution `id` until it is terminal; false when `deadline` came first.
pub async fn wait_one_terminal(
    db: &rusqlite::Connection,
    id: &str,
    deadline: std::time::Instant,
    poll: Duration,
) -> Result<bool> {
    loop {
        let status: String =
            db.query_row("SELECT status FROM executions WHERE id = ?1", [id], |r| {
                r.get(0)
            })?;
        if !matches!(status.as_str(), "queued" | "running") {
            return Ok(true);
        }
        if std::time::Instant::now() > deadline {
            return Ok(false);
        }
        tokio::time::sleep(poll).await;
    }
}

/// Whether `table` has `column` (the schema changes while this is written).
pub fn has_column(conn: &rusqlite::Connection, table: &str, column: &str) -> bool {
    let sql = format!("SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1");
    conn.query_row(&sql, [column], |_| Ok(())).is_ok()
}

/// `n` formatted with thousands separators.
pub fn thousands(n: f64) -> String {
    let s = format!("{:.0}", n);
    let (sign, digits) = s.strip_prefix('-').map_or(("", s.as_str()), |d| ("-", d));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    format!("{sign}{out}")
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

/// Quantile `q` of a list of values (nearest rank).
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}
