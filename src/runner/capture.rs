//! Output capture: read one stream as it comes and append it to the database
//! in batches, up to the per-stream cap. Memory stays bounded whatever the
//! program prints: one read buffer and one pending batch per stream.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;

use crate::db::executions::Fence;
use crate::db::output::{self, Chunk};
use crate::db::{self, Writer};
use crate::domain::Stream;

/// How long output may wait before it is written: the API shows a running
/// program's output within about this delay.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(50);
/// A batch this large is written at once.
const FLUSH_BYTES: usize = 1 << 20;
const READ_BUFFER: usize = 64 << 10;

/// Reads `pipe` to its end, storing at most `cap` bytes.
#[tracing::instrument(skip_all, fields(execution_id = %fence.id, stream = stream.as_str()))]
pub async fn capture(
    mut pipe: impl AsyncRead + Unpin,
    stream: Stream,
    fence: Fence,
    writer: Writer,
    cap: u64,
) {
    let mut buf = vec![0u8; READ_BUFFER];
    let mut batch = Batch {
        stream,
        fence,
        writer,
        pending: Vec::new(),
        seq: 0,
        truncated: false,
        dropped: false,
        stored: 0,
        cap,
    };
    let mut deadline: Option<Instant> = None;
    loop {
        let flush_due = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            read = pipe.read(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    batch.take(&buf[..n]);
                    if batch.pending.len() >= FLUSH_BYTES {
                        batch.flush().await;
                        deadline = None;
                    } else if deadline.is_none() && batch.has_news() {
                        deadline = Some(Instant::now() + FLUSH_INTERVAL);
                    }
                }
            },
            () = flush_due => {
                batch.flush().await;
                deadline = None;
            }
        }
    }
    batch.flush().await;
}

struct Batch {
    stream: Stream,
    fence: Fence,
    writer: Writer,
    /// Bytes read but not yet written.
    pending: Vec<u8>,
    seq: i64,
    /// Output was dropped at the cap and the flag is not yet written.
    truncated: bool,
    /// Output was dropped at the cap (the flag is written once).
    dropped: bool,
    /// Bytes accepted so far (written or pending).
    stored: u64,
    cap: u64,
}

impl Batch {
    fn take(&mut self, data: &[u8]) {
        let room = self.cap.saturating_sub(self.stored) as usize;
        let kept = &data[..data.len().min(room)];
        self.pending.extend_from_slice(kept);
        self.stored += kept.len() as u64;
        if kept.len() < data.len() && !self.dropped {
            self.dropped = true;
            self.truncated = true;
        }
    }

    fn has_news(&self) -> bool {
        !self.pending.is_empty() || self.truncated
    }

    async fn flush(&mut self) {
        if !self.has_news() {
            return;
        }
        let chunk = Chunk {
            stream: self.stream,
            seq: self.seq,
            data: std::mem::take(&mut self.pending),
            truncated: self.truncated,
        };
        self.seq += 1;
        self.truncated = false;
        let fence = self.fence.clone();
        let written = self
            .writer
            .write(move |conn| {
                Box::pin(async move {
                    output::append(conn, &fence, std::slice::from_ref(&chunk), &db::now()).await
                })
            })
            .await;
        match written {
            Ok(true) => {}
            Ok(false) => tracing::warn!("output not stored: the execution is no longer ours"),
            Err(e) => tracing::error!(error = %e, "output not stored"),
        }
    }
}
