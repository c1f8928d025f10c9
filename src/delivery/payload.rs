//! The callback body, as a pure function of the execution it reports.

use serde_json::json;

use crate::db::callbacks::Source;
use crate::domain::{fit_json, seconds_between};

/// One stream's text for the payload: the tail that was kept, and whether
/// anything before it (or past the agent's storage cap) is missing.
#[derive(Default)]
pub struct StreamTail {
    pub bytes: Vec<u8>,
    pub cut: bool,
}

/// Text from a byte tail, skipping a UTF-8 sequence the cut split in two.
fn tail_text(tail: &StreamTail) -> String {
    crate::db::output::tail_text(&tail.bytes, tail.cut)
}

/// The JSON body of API.md's callback, frozen at `timestamp`; each stream
/// at most `cap` bytes as sent (its tail).
pub fn build(
    source: &Source,
    stdout: &StreamTail,
    stderr: &StreamTail,
    cap: usize,
    timestamp: &str,
) -> String {
    let (out, out_cut) = fit_json(tail_text(stdout), cap);
    let (err, err_cut) = fit_json(tail_text(stderr), cap);
    json!({
        "execution_id": source.id,
        "process_id": source.process_id,
        "status": source.status,
        "success": source.status == "completed",
        "stdout": out,
        "stderr": err,
        "stdout_truncated": stdout.cut || out_cut || source.stdout_truncated,
        "stderr_truncated": stderr.cut || err_cut || source.stderr_truncated,
        "exit_code": source.exit_code,
        "execution_time": seconds_between(source.started_at.as_deref(), source.completed_at.as_deref()),
        "started_at": source.started_at,
        "completed_at": source.completed_at,
        "timestamp": timestamp,
        "error": source.error,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(status: &str) -> Source {
        Source {
            id: "exec_1".into(),
            process_id: "proc_1".into(),
            attempt: 1,
            status: status.into(),
            exit_code: Some(0),
            error: None,
            started_at: Some("2025-01-28T00:00:00Z".into()),
            completed_at: Some("2025-01-28T00:00:01.5Z".into()),
            stdout_truncated: false,
            stderr_truncated: false,
            stdout_bytes: 0,
            stderr_bytes: 0,
            callback_url: "http://127.0.0.1/x".into(),
            callback_headers: None,
            callback_secret: None,
        }
    }

    fn tail(text: &[u8], cut: bool) -> StreamTail {
        StreamTail {
            bytes: text.to_vec(),
            cut,
        }
    }

    #[test]
    fn the_payload_has_every_field_of_the_contract() {
        let body = build(
            &source("completed"),
            &tail(b"out\n", false),
            &tail(b"", false),
            1 << 20,
            "2025-01-28T00:00:02Z",
        );
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        for field in [
            "execution_id",
            "process_id",
            "status",
            "success",
            "stdout",
            "stderr",
            "exit_code",
            "execution_time",
            "started_at",
            "completed_at",
            "timestamp",
            "error",
        ] {
            assert!(v.get(field).is_some(), "{field} missing");
        }
        assert_eq!(v["success"], true);
        assert_eq!(v["execution_time"], 1.5);
        assert_eq!(v["stdout"], "out\n");
    }

    #[test]
    fn success_is_true_exactly_when_completed() {
        for status in ["failed", "killed", "timeout"] {
            let body = build(
                &source(status),
                &tail(b"", false),
                &tail(b"", false),
                10,
                "t",
            );
            assert!(body.contains(r#""success":false"#), "{status}");
        }
    }

    #[test]
    fn a_tail_cut_inside_a_character_drops_the_broken_bytes() {
        // "é" is C3 A9: a cut after C3 leaves a lone continuation byte.
        let body = build(
            &source("completed"),
            &tail(b"\xa9abc", true),
            &tail(b"", false),
            10,
            "t",
        );
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["stdout"], "abc");
        assert_eq!(v["stdout_truncated"], true);
    }

    /// Output of control characters takes six bytes each in JSON: the cap
    /// is on what is sent (1 MiB of NUL was a 6 MiB stream in the body).
    #[test]
    fn each_stream_is_capped_as_sent() {
        let body = build(
            &source("completed"),
            &tail(b"ab\0\0\0\0", false),
            &tail("a\"é".as_bytes(), false),
            13,
            "t",
        );
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["stdout"], "\0\0", "two NULs are 12 bytes as sent");
        assert_eq!(v["stdout_truncated"], true);
        assert_eq!(v["stderr"], "a\"é", "5 bytes as sent: whole");
        assert_eq!(v["stderr_truncated"], false);
        assert!(body.len() < 400, "{body}");
    }
}
