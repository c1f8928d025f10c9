//! What one round trip to sqlx's SQLite thread costs, against the statement
//! itself (by hand, not a test):
//!
//!     cargo run --release --example sqlx_round_trip
//!
//! 20,000 one-row `UPDATE`s on an in-memory database, each awaited on its
//! own (a round trip each, as the agent's writer makes them), then the same
//! statements ten to a query (one round trip per ten). Prints this
//! process's CPU and the wall time per statement of each.

use sqlx::{Connection, Executor, SqliteConnection};

const STATEMENTS: usize = 20_000;

/// This process's CPU seconds (user + system), from `/proc`.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<f64> = stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            rest.split_whitespace()
                .filter_map(|f| f.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    // utime and stime are fields 14 and 15: 11 and 12 after the state.
    let ticks = fields.get(10).unwrap_or(&0.0) + fields.get(11).unwrap_or(&0.0);
    ticks / 100.0
}

fn main() -> Result<(), sqlx::Error> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut conn = SqliteConnection::connect("sqlite::memory:").await?;
        conn.execute("CREATE TABLE t (x INTEGER); INSERT INTO t VALUES (0)")
            .await?;
        let ten = ["UPDATE t SET x = ?1"; 10].join("; ");
        for (name, per_query) in [
            ("one statement per round trip", 1),
            ("ten per round trip", 10),
        ] {
            let (cpu, wall) = (cpu_seconds(), std::time::Instant::now());
            for i in 0..STATEMENTS / per_query {
                let sql = if per_query == 1 {
                    "UPDATE t SET x = ?1"
                } else {
                    &ten
                };
                sqlx::query(sql).bind(i as i64).execute(&mut conn).await?;
            }
            let per = |secs: f64| secs * 1e6 / STATEMENTS as f64;
            println!(
                "{name}: {:.1} µs of CPU and {:.1} µs of wall per statement",
                per(cpu_seconds() - cpu),
                per(wall.elapsed().as_secs_f64())
            );
        }
        Ok(())
    })
}
