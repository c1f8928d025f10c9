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
/// The largest chunk written at once.
const CHUNK_BYTES: usize = 1 << 20;

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
        if file.seek(SeekFrom::Start(self.offset)).await.is_err() {
            return;
        }
        let mut buf = vec![0u8; CHUNK_BYTES];
        loop {
            let mut filled = 0;
            while filled < buf.len() {
                match file.read(&mut buf[filled..]).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => filled += n,
                }
            }
            let truncated = !self.flagged
                && filled < buf.len()
                && self.run.truncated_marker(self.stream).exists();
            if filled == 0 && !truncated {
                return;
            }
            let chunk = Chunk {
                stream: self.stream,
                seq: self.seq,
                data: buf[..filled].to_vec(),
                truncated,
            };
            let fence = fence.clone();
            let written = writer
                .write(move |c| {
                    Box::pin(async move {
                        output::append(c, &fence, std::slice::from_ref(&chunk), &db::now()).await
                    })
                })
                .await;
            match written {
                Ok(true) => {
                    self.offset += filled as u64;
                    self.seq += 1;
                    self.flagged |= truncated;
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
            if filled < buf.len() {
                return;
            }
        }
    }
}
