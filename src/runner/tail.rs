//! Output capture from the run directory: the supervisor appends a job's
//! output to `stdout`/`stderr` files; the agent moves what is new into the
//! database in batches. The byte offset stored with the output (`*_bytes`)
//! says where to resume, so an agent restart loses and doubles nothing.
//! Memory stays bounded: one read buffer per stream.

use std::io::SeekFrom;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::db::executions::Fence;
use crate::db::output::{self, Chunk};
use crate::db::{self, Writer};
use crate::domain::Stream;
use crate::supervisor::files::RunDir;

/// How often a running job's new output is moved into the database: the
/// API shows it within about this delay.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(50);
/// The largest chunk (one row).
const CHUNK_BYTES: usize = 1 << 20;
/// The most output moved in one write (one commit).
const BATCH_BYTES: u64 = 4 << 20;

/// One stream's progress from its file into the database.
pub struct Tail {
    stream: Stream,
    run: RunDir,
    file: Option<tokio::fs::File>,
    /// Bytes of the file already in the database.
    offset: u64,
    /// The next chunk number.
    seq: i64,
    /// The truncation flag is in the database.
    flagged: bool,
    /// The fence no longer holds: stop writing.
    fenced_out: bool,
}

impl Tail {
    pub fn new(run: &RunDir, stream: Stream, offset: u64, seq: i64) -> Tail {
        Tail {
            stream,
            run: run.clone(),
            file: None,
            offset,
            seq,
            flagged: false,
            fenced_out: false,
        }
    }

    /// Moves everything new in the file into the database.
    pub async fn pump(&mut self, fence: &Fence, writer: &Writer) {
        if self.fenced_out {
            return;
        }
        if self.file.is_none() {
            match tokio::fs::File::open(self.run.output(self.stream)).await {
                Ok(file) => self.file = Some(file),
                Err(_) => return,
            }
        }
        let file = self.file.as_mut().expect("opened above");
        loop {
            // Only what is there: an idle job costs a stat, not a buffer.
            let size = match file.metadata().await {
                Ok(meta) => meta.len(),
                Err(_) => return,
            };
            let waiting = size.saturating_sub(self.offset);
            let truncated = !self.flagged && self.run.truncated_marker(self.stream).exists();
            if waiting == 0 && !truncated {
                return;
            }
            if file.seek(SeekFrom::Start(self.offset)).await.is_err() {
                return;
            }
            // Up to BATCH_BYTES in one write, as chunks of at most CHUNK_BYTES.
            let mut chunks = Vec::new();
            let mut taken = 0u64;
            while taken < waiting.min(BATCH_BYTES) {
                let want = (waiting - taken).min(CHUNK_BYTES as u64) as usize;
                let mut data = vec![0u8; want];
                if file.read_exact(&mut data).await.is_err() {
                    break;
                }
                taken += want as u64;
                chunks.push(Chunk {
                    stream: self.stream,
                    seq: self.seq + chunks.len() as i64,
                    data,
                    truncated: false,
                });
            }
            // The flag goes with the last of the output (or alone, once the rest is in).
            let flag_now = truncated && taken == waiting;
            match chunks.last_mut() {
                Some(last) => last.truncated = flag_now,
                None if flag_now => chunks.push(Chunk {
                    stream: self.stream,
                    seq: self.seq,
                    data: Vec::new(),
                    truncated: true,
                }),
                None => return,
            }
            let count = chunks.iter().filter(|c| !c.data.is_empty()).count() as i64;
            let fence = fence.clone();
            let written = writer
                .write(move |c| {
                    Box::pin(async move { output::append(c, &fence, &chunks, &db::now()).await })
                })
                .await;
            match written {
                Ok(true) => {
                    self.offset += taken;
                    self.seq += count;
                    self.flagged |= flag_now;
                }
                Ok(false) => {
                    tracing::warn!(
                        stream = self.stream.as_str(),
                        "output not stored: the execution is no longer ours"
                    );
                    self.fenced_out = true;
                    return;
                }
                Err(e) => {
                    // Left in the file: the next pump tries again from the same offset.
                    tracing::error!(error = %e, "output not stored");
                    return;
                }
            }
            if taken == waiting {
                return;
            }
        }
    }
}
