//! JSON answers that carry a process's whole output: its two streams are
//! escaped a piece at a time as the body is sent, a large one read from the
//! database a page at a time too, instead of the whole body being built
//! first beside the output it is made of: one GET of a process's 10 MiB
//! took the agent's peak from 23 to 53 MB so (BENCHMARKS.md, scenario 4).

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tokio::sync::mpsc;

use super::ApiError;
use crate::db::output::Pages;

/// The text escaped per piece of the body.
const PIECE_BYTES: usize = 64 << 10;

/// Output up to this, both streams together, is answered in one body made
/// at once: a task and its pieces cost a small answer more than they save.
const SMALL_BYTES: usize = 256 << 10;

/// One stream's whole output, as an answer sends it.
pub enum Text {
    /// Read already: a small output.
    Whole(String),
    /// Read a page at a time while it is sent: a large one.
    Pages(Pages),
}

impl Text {
    /// All of it, read now.
    pub async fn into_string(self) -> Result<String, sqlx::Error> {
        match self {
            Text::Whole(text) => Ok(text),
            Text::Pages(mut pages) => {
                let mut lossy = Lossy::default();
                let mut text = String::new();
                while let Some(page) = pages.next().await? {
                    text.push_str(&lossy.push(&page));
                }
                if pages.gone {
                    return Err(sqlx::Error::RowNotFound);
                }
                text.push_str(&lossy.finish());
                Ok(text)
            }
        }
    }
}

/// The JSON object `object` (a process, or a run's result) with `stdout`
/// and `stderr` as its first fields, sent a piece at a time. Fields of those
/// names in `object` are left out.
pub fn with_output(mut object: Value, [stdout, stderr]: [Text; 2]) -> Result<Response, ApiError> {
    if let Some(fields) = object.as_object_mut() {
        fields.remove("stdout");
        fields.remove("stderr");
    }
    let rest = serde_json::to_vec(&object).map_err(ApiError::internal)?;
    let json = [(header::CONTENT_TYPE, "application/json")];
    // Small (the most common): one body, made at once, with no task.
    if let [Text::Whole(stdout), Text::Whole(stderr)] = [&stdout, &stderr] {
        if stdout.len() + stderr.len() <= SMALL_BYTES {
            let mut body = Vec::with_capacity(stdout.len() + stderr.len() + rest.len() + 64);
            body.extend_from_slice(b"{\"stdout\":\"");
            escaped(stdout).for_each(|piece| body.extend_from_slice(&piece));
            body.extend_from_slice(b"\",\"stderr\":\"");
            escaped(stderr).for_each(|piece| body.extend_from_slice(&piece));
            body.extend_from_slice(&tail(&rest));
            return Ok((json, body).into_response());
        }
    }
    // A page waits here while the one before it is sent: at most a few
    // pieces are held, whatever the output's size.
    let (pieces, body) = mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    tokio::spawn(async move {
        // Its end (or the client's) drops the receiver: sending fails, and
        // the rest is not read.
        let _ = send(&pieces, [("stdout", stdout), ("stderr", stderr)], rest).await;
    });
    let body = futures::stream::unfold(body, |mut body| async move {
        body.recv().await.map(|piece| (piece, body))
    });
    Ok((json, Body::from_stream(body)).into_response())
}

/// The body's pieces: `{"stdout":"`, its text escaped, `","stderr":"`, …,
/// then `rest`'s fields. A page that cannot be read, or output gone
/// meanwhile (its execution deleted), ends the body with an error: the
/// client sees a broken answer, never output with a hole in it.
async fn send(
    pieces: &mpsc::Sender<Result<Bytes, std::io::Error>>,
    texts: [(&'static str, Text); 2],
    rest: Vec<u8>,
) -> Result<(), ()> {
    let put = |piece: Result<Bytes, std::io::Error>| async move {
        pieces.send(piece).await.map_err(|_| ())
    };
    for (i, (name, text)) in texts.into_iter().enumerate() {
        let opening = if i == 0 { "{" } else { "\"," };
        put(Ok(Bytes::from(format!("{opening}\"{name}\":\"")))).await?;
        match text {
            Text::Whole(text) => {
                for piece in escaped(&text) {
                    put(Ok(piece)).await?;
                }
            }
            Text::Pages(mut pages) => {
                let mut lossy = Lossy::default();
                loop {
                    match pages.next().await {
                        Ok(Some(page)) => {
                            for piece in escaped(&lossy.push(&page)) {
                                put(Ok(piece)).await?;
                            }
                        }
                        Ok(None) if pages.gone => {
                            let why = format!("{name}: the output is gone (deleted meanwhile)");
                            tracing::warn!(error = %why, "an answer with output broken off");
                            return put(Err(std::io::Error::other(why))).await;
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tracing::error!(error = %e, "an answer with output broken off");
                            return put(Err(std::io::Error::other(e))).await;
                        }
                    }
                }
                for piece in escaped(&lossy.finish()) {
                    put(Ok(piece)).await?;
                }
            }
        }
    }
    put(Ok(tail(&rest))).await
}

/// What follows the last string's text: its closing quote and `rest`'s
/// fields (`rest` is `{…}`, or `{}`).
fn tail(rest: &[u8]) -> Bytes {
    match rest {
        [b'{', b'}'] | [] => Bytes::from_static(b"\"}"),
        [b'{', fields @ ..] => Bytes::from([b"\",".as_slice(), fields].concat()),
        _ => Bytes::from_static(b"\"}"),
    }
}

/// `text`'s JSON escaping (without its quotes), a piece at a time.
fn escaped(text: &str) -> impl Iterator<Item = Bytes> + '_ {
    let mut at = 0;
    std::iter::from_fn(move || {
        if at >= text.len() {
            return None;
        }
        let mut end = (at + PIECE_BYTES).min(text.len());
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let quoted = serde_json::to_vec(&text[at..end]).expect("a string serializes");
        at = end;
        let inner = quoted.len() - 1;
        Some(Bytes::from(quoted).slice(1..inner))
    })
}

/// Bytes into text a page at a time, as `String::from_utf8_lossy` makes
/// text of all of them at once: a character split between two pages is
/// whole, and each invalid sequence is one U+FFFD.
#[derive(Default)]
struct Lossy {
    /// The start of a character the last page ended in.
    carry: Vec<u8>,
}

impl Lossy {
    fn push(&mut self, page: &[u8]) -> String {
        let mut input = std::mem::take(&mut self.carry);
        input.extend_from_slice(page);
        let mut text = String::with_capacity(input.len());
        let mut rest = input.as_slice();
        loop {
            match std::str::from_utf8(rest) {
                Ok(valid) => {
                    text.push_str(valid);
                    return text;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    text.push_str(std::str::from_utf8(valid).expect("valid up to here"));
                    match e.error_len() {
                        Some(bad) => {
                            text.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[bad..];
                        }
                        // Cut short by the page's end: the next may finish it.
                        None => {
                            self.carry = after.to_vec();
                            return text;
                        }
                    }
                }
            }
        }
    }

    /// What is left once the last page is in: a character never finished.
    fn finish(self) -> String {
        match self.carry.is_empty() {
            true => String::new(),
            false => char::REPLACEMENT_CHARACTER.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn joined(text: &str, rest: Value) -> Vec<u8> {
        let mut body = b"{\"stdout\":\"".to_vec();
        body.extend(escaped(text).flat_map(|b| b.to_vec()));
        body.extend(b"\",\"stderr\":\"");
        body.extend(tail(&serde_json::to_vec(&rest).unwrap()));
        body
    }

    #[test]
    fn the_pieces_make_the_object_serde_json_would() {
        // Longer than a piece, with escapes and multi-byte characters
        // across the pieces' bounds.
        let text: String = "a\"b\\c\nd\u{1}é€😀".repeat(20_000);
        let made = joined(&text, serde_json::json!({ "exit_code": 0, "name": "x" }));
        let value: Value = serde_json::from_slice(&made).unwrap();
        assert_eq!(
            value,
            serde_json::json!({ "stdout": text, "stderr": "", "exit_code": 0, "name": "x" })
        );
        let made = joined("1\n", serde_json::json!({}));
        assert_eq!(made, br#"{"stdout":"1\n","stderr":""}"#);
    }

    #[test]
    fn text_made_page_by_page_is_the_text_of_all_the_bytes_at_once() {
        // Valid and invalid sequences of every length, cut at every place.
        let bytes: Vec<u8> = [
            "aé€😀".as_bytes(),
            b"\xff\xc3",
            b"x\xe2\x82",
            b"\xf0\x9f\x98",
            "é".as_bytes(),
            b"\xed\xa0\x80\xc0\xaf\x80",
        ]
        .concat()
        .repeat(3);
        let whole = String::from_utf8_lossy(&bytes).into_owned();
        for size in 1..=bytes.len() {
            let mut lossy = Lossy::default();
            let mut text: String = bytes.chunks(size).map(|page| lossy.push(page)).collect();
            text.push_str(&lossy.finish());
            assert_eq!(text, whole, "pages of {size}");
        }
        // A character never finished at the very end.
        let mut lossy = Lossy::default();
        let text = lossy.push(b"ab\xe2\x82") + &lossy.finish();
        assert_eq!(text, String::from_utf8_lossy(b"ab\xe2\x82"));
    }
}
