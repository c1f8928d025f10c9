//! Output capture from the run directory: the supervisor appends a job's
//! output to `stdout`/`stderr` files; the agent moves what is new into the
//! database in batches. The byte offset stored with the output (`*_bytes`)
//! says where to resume, so an agent restart loses and doubles nothing.
//! Memory stays bounded: one read buffer per stream.
//!
//! The files are read with plain `std::fs` calls on the runtime's thread:
//! they are local files the supervisor has just written (in the page
//! cache), a read takes at most `BATCH_BYTES`, and a trip to tokio's
//! blocking pool per call (open, stat, seek, read) cost more than the read.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::time::Duration;

use super::job::Spawned;
use crate::db::executions::{self, Fence};
use crate::db::output::{self, Chunk};
use crate::db::{self, Writer};
use crate::domain::Stream;
use crate::supervisor::files::RunDir;

/// How often a running job's new output is moved into the database: the
/// API shows it within about this delay.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(50);
/// The largest chunk (one row). Each chunk is one live-log event (SSE or
/// WebSocket frame), and the HTTP layer may queue 16 frames per connection
/// for a client that reads slowly: with 1 MiB chunks, 10 idle readers of a
/// job's 20 MB held 127 MB.
const CHUNK_BYTES: usize = 64 << 10;
/// The most output moved in one write (one commit).
const BATCH_BYTES: u64 = 4 << 20;

/// One stream's progress from its file into the database.
pub struct Tail {
    stream: Stream,
    run: RunDir,
    file: Option<File>,
    /// Bytes of the file already in the database.
    offset: u64,
    /// The next chunk number.
    seq: i64,
    /// The truncation flag is in the database.
    flagged: bool,
    /// The fence no longer holds: stop writing.
    fenced_out: bool,
    /// The program's pid, to store in this stream's next write, before its output.
    pub along: Option<Spawned>,
    /// After a failed write (the database locked or full), no pump before
    /// this: the next tries back off, and the log has a line per try.
    retry_at: Option<std::time::Instant>,
    /// Failed writes in a row.
    failures: u32,
}

impl Tail {
    /// How many chunks of the stream are stored (or handed to a write).
    pub fn stored(&self) -> i64 {
        self.seq
    }

    pub fn new(run: &RunDir, stream: Stream, offset: u64, seq: i64) -> Tail {
        Tail {
            stream,
            run: run.clone(),
            file: None,
            offset,
            seq,
            flagged: false,
            fenced_out: false,
            along: None,
            retry_at: None,
            failures: 0,
        }
    }

    /// Moves everything new in the file into the database. With `gone`
    /// (the program will write no more: it was lost) the start of a
    /// character not written whole is stored too, as at a job's end;
    /// otherwise it waits for the rest.
    pub async fn pump(&mut self, fence: &Fence, writer: &Writer, gone: bool) {
        if self
            .retry_at
            .is_some_and(|at| !gone && std::time::Instant::now() < at)
        {
            return;
        }
        while let Some(batch) = self.read(!gone) {
            let more = batch.more;
            if !self.store(fence, writer, batch).await || !more {
                return;
            }
        }
    }

    /// Everything new in the file, for the caller to store in a write of
    /// its own (a job's end): all but the last batch are stored here. The
    /// offsets move on as if the write landed; after a failed one the
    /// restart's recovery resumes from what the database says.
    pub async fn rest(&mut self, fence: &Fence, writer: &Writer) -> Vec<Chunk> {
        while let Some(batch) = self.read(false) {
            if !batch.more {
                self.advance(batch.progress);
                return batch.chunks;
            }
            if !self.store(fence, writer, batch).await {
                break;
            }
        }
        Vec::new()
    }

    /// The file's size so far (0 before it exists); `None` if it cannot be read.
    fn size(&mut self) -> Option<u64> {
        // The supervisor makes the file with the stream's first byte.
        if self.file.is_none() {
            self.file = File::open(self.run.output(self.stream)).ok();
        }
        match &self.file {
            Some(file) => file.metadata().ok().map(|m| m.len()),
            None => Some(0),
        }
    }

    /// The next batch of new output (up to BATCH_BYTES, as chunks of at most
    /// CHUNK_BYTES), read but not stored; `None` when there is nothing new.
    /// No chunk ends inside a UTF-8 character, so each one reads as text on
    /// its own (the live logs send them one by one): a chunk boundary moves
    /// back to the character's start, and while the program runs (`hold`)
    /// the last bytes of a character not written whole yet wait for the
    /// rest. At its end (`hold` false) everything is taken.
    fn read(&mut self, hold: bool) -> Option<Batch> {
        if self.fenced_out {
            return None;
        }
        // Only what is there: an idle job costs a stat, not a buffer.
        let size = self.size()?;
        let waiting = size.saturating_sub(self.offset);
        let truncated = !self.flagged && self.run.truncated_marker(self.stream).exists();
        if waiting == 0 && !truncated {
            return None;
        }
        // Past the cap the file grows no more: nothing is held for later.
        let hold = hold && !truncated;
        let mut chunks = Vec::new();
        let mut taken = 0u64;
        if waiting > 0 {
            // A size above zero came from an open file.
            let file = self.file.as_mut()?;
            file.seek(SeekFrom::Start(self.offset)).ok()?;
            while taken < waiting.min(BATCH_BYTES) {
                let want = (waiting - taken).min(CHUNK_BYTES as u64) as usize;
                let mut data = vec![0u8; want];
                if file.read_exact(&mut data).is_err() {
                    break;
                }
                let last = taken + want as u64 == waiting;
                let split = incomplete_tail(&data);
                if split > 0 && (hold || !last) && split < data.len() {
                    // The character's bytes begin the next chunk (or read).
                    data.truncate(data.len() - split);
                    if file.seek(SeekFrom::Current(-(split as i64))).is_err() {
                        break;
                    }
                } else if split == data.len() && hold && last {
                    // Only the start of one character is there: wait for it.
                    break;
                }
                taken += data.len() as u64;
                chunks.push(Chunk {
                    stream: self.stream,
                    seq: self.seq + chunks.len() as i64,
                    data,
                    truncated: false,
                });
                if split > 0 && hold && last {
                    break;
                }
            }
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
            None => return None,
        }
        let progress = Progress {
            taken,
            count: chunks.iter().filter(|c| !c.data.is_empty()).count() as i64,
            flag_now,
        };
        Some(Batch {
            chunks,
            progress,
            more: taken < waiting,
        })
    }

    /// Stores `batch` in a write of its own; whether to go on. Answered
    /// once committed, not synced: the job's end, synced, comes after it
    /// (and nothing else acts on output), so the next batch is stored
    /// while this one's sync runs.
    async fn store(&mut self, fence: &Fence, writer: &Writer, batch: Batch) -> bool {
        let Batch {
            chunks, progress, ..
        } = batch;
        let fence = fence.clone();
        let pid = self.along.clone();
        let written = writer
            .write_committed(move |c| {
                Box::pin(async move {
                    if let Some(Spawned { pid, at }) = &pid {
                        executions::set_pid(c, &fence, *pid, at).await?;
                    }
                    output::append(c, &fence, &chunks, &db::now()).await
                })
            })
            .await;
        if written.is_ok() {
            (self.along, self.retry_at, self.failures) = (None, None, 0);
        }
        match written {
            Ok(true) => {
                self.advance(progress);
                true
            }
            Ok(false) => {
                tracing::warn!(
                    stream = self.stream.as_str(),
                    "output not stored: the execution is no longer ours"
                );
                self.fenced_out = true;
                false
            }
            Err(e) => {
                // Left in the file: a later pump tries again from the same
                // offset (with the pid, if it went along), 0.1 s later and
                // then twice as late each time, up to 5 s.
                self.failures += 1;
                let pause = FLUSH_INTERVAL * 2u32.saturating_pow(self.failures.min(7));
                let pause = pause.min(Duration::from_secs(5));
                self.retry_at = Some(std::time::Instant::now() + pause);
                tracing::error!(error = %e, retry_in_ms = pause.as_millis() as u64, "output not stored");
                false
            }
        }
    }

    fn advance(&mut self, progress: Progress) {
        self.offset += progress.taken;
        self.seq += progress.count;
        self.flagged |= progress.flag_now;
    }
}

/// How many bytes at the end of `data` begin a UTF-8 character that is not
/// there whole (0 to 3). Anything else (ASCII, a whole character, bytes that
/// are not UTF-8) is 0.
fn incomplete_tail(data: &[u8]) -> usize {
    // The last byte that is not a continuation byte (10xxxxxx), within the
    // last four: the start of the last character.
    for back in 1..=data.len().min(4) {
        let byte = data[data.len() - back];
        if byte & 0xC0 != 0x80 {
            let needs = match byte {
                0xC2..=0xDF => 2,
                0xE0..=0xEF => 3,
                0xF0..=0xF4 => 4,
                _ => return 0,
            };
            return if back < needs { back } else { 0 };
        }
    }
    0
}

/// Output read from a stream's file, not yet stored.
struct Batch {
    chunks: Vec<Chunk>,
    progress: Progress,
    /// More is waiting in the file.
    more: bool,
}

/// How far a stored batch moves its tail.
#[derive(Clone, Copy)]
struct Progress {
    /// Bytes of the file.
    taken: u64,
    /// Chunks with data (the next `seq`).
    count: i64,
    /// It carried the truncation flag.
    flag_now: bool,
}

#[cfg(test)]
mod tests {
    use super::incomplete_tail;

    #[test]
    fn only_the_start_of_a_character_not_there_whole_is_held_back() {
        assert_eq!(incomplete_tail(b""), 0);
        assert_eq!(incomplete_tail(b"abc"), 0);
        assert_eq!(incomplete_tail("café".as_bytes()), 0);
        assert_eq!(incomplete_tail(b"caf\xc3"), 1);
        assert_eq!(incomplete_tail(b"x\xe2\x82"), 2);
        assert_eq!(incomplete_tail("x€".as_bytes()), 0);
        assert_eq!(incomplete_tail(b"\xf0\x9f\x98"), 3);
        assert_eq!(incomplete_tail("😀".as_bytes()), 0);
        // Not UTF-8: nothing to wait for.
        assert_eq!(incomplete_tail(b"\x80\x80\x80\x80\x80"), 0);
        assert_eq!(incomplete_tail(b"ab\xff"), 0);
    }
}
