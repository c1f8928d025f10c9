//! JSON answers that carry a process's output: the output's strings are
//! escaped a piece at a time as the body is sent, instead of the whole body
//! being built first beside the output it is made of. A process's 20 MiB of
//! output (the default cap on each stream) took 40 MB more to answer so.

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::ApiError;

/// The text escaped per piece of the body.
const PIECE_BYTES: usize = 64 << 10;

/// The JSON object `object` (a process, or a run's result), its `stdout`
/// and `stderr` strings sent a piece at a time, first.
pub fn with_output(mut object: serde_json::Value) -> Result<Response, ApiError> {
    let mut take = |name: &'static str| {
        let text = match object.as_object_mut().and_then(|o| o.remove(name)) {
            Some(serde_json::Value::String(text)) => text,
            _ => String::new(),
        };
        (name, text)
    };
    let long = [take("stdout"), take("stderr")];
    object_with_long_strings(long, &object)
}

/// A JSON object whose first fields are `long` (name and text each), sent a
/// piece at a time, followed by the fields of `rest`, which must serialize
/// to an object (without fields of `long`'s names).
fn object_with_long_strings(
    long: [(&'static str, String); 2],
    rest: &impl Serialize,
) -> Result<Response, ApiError> {
    let rest = serde_json::to_vec(rest).map_err(ApiError::internal)?;
    let pieces = pieces(long, rest).map(Ok::<_, std::convert::Infallible>);
    let body = Body::from_stream(futures::stream::iter(pieces));
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// The body's pieces, made as they are asked for: `{"name":"`, the text
/// escaped a piece at a time, `","next":"`, …, then `rest`'s fields.
fn pieces(long: [(&'static str, String); 2], rest: Vec<u8>) -> impl Iterator<Item = Bytes> + Send {
    // `rest` is `{…}` or `{}`: its fields follow the last string's quote.
    let tail = match rest.as_slice() {
        [b'{', b'}'] => Bytes::from_static(b"\"}"),
        [b'{', fields @ ..] => Bytes::from([b"\",".as_slice(), fields].concat()),
        _ => Bytes::from_static(b"\"}"),
    };
    long.into_iter()
        .enumerate()
        .flat_map(|(i, (name, text))| {
            let opening = if i == 0 { "{" } else { "\"," };
            let key = serde_json::to_string(name).expect("a string serializes");
            std::iter::once(Bytes::from(format!("{opening}{key}:\"")))
                .chain(Escaped { text, at: 0 })
        })
        .chain(std::iter::once(tail))
}

/// A string's JSON escaping (without its quotes), a piece at a time.
struct Escaped {
    text: String,
    at: usize,
}

impl Iterator for Escaped {
    type Item = Bytes;

    fn next(&mut self) -> Option<Bytes> {
        if self.at >= self.text.len() {
            return None;
        }
        let mut end = (self.at + PIECE_BYTES).min(self.text.len());
        while !self.text.is_char_boundary(end) {
            end -= 1;
        }
        let quoted = serde_json::to_vec(&self.text[self.at..end]).expect("a string serializes");
        self.at = end;
        let inner = quoted.len() - 1;
        Some(Bytes::from(quoted).slice(1..inner))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(long: [(&'static str, String); 2], rest: serde_json::Value) -> Vec<u8> {
        let rest = serde_json::to_vec(&rest).unwrap();
        pieces(long, rest).flat_map(|b| b.to_vec()).collect()
    }

    #[test]
    fn the_pieces_make_the_object_serde_json_would() {
        // Longer than a piece, with escapes and multi-byte characters
        // across the pieces' bounds.
        let text: String = "a\"b\\c\nd\u{1}é€😀".repeat(20_000);
        let made = body(
            [("stdout", text.clone()), ("stderr", String::new())],
            serde_json::json!({ "exit_code": 0, "name": "x" }),
        );
        let value: serde_json::Value = serde_json::from_slice(&made).unwrap();
        assert_eq!(
            value,
            serde_json::json!({ "stdout": text, "stderr": "", "exit_code": 0, "name": "x" })
        );
    }

    #[test]
    fn an_empty_rest_still_makes_an_object() {
        let made = body(
            [("stdout", "1\n".to_string()), ("stderr", String::new())],
            serde_json::json!({}),
        );
        assert_eq!(made, br#"{"stdout":"1\n","stderr":""}"#);
    }
}
