#!/usr/bin/env python3
"""A tiny receiver for execd callbacks: verifies, dedupes and prints them.

Stdlib only. Environment: CALLBACK_SECRET (the `callback_signature_secret` of
the submissions; empty: accept unsigned callbacks), PORT (default 8080).

Each POST is checked against both signatures the agent sends (see the README,
"Callbacks"): `X-HopX-Signature` and the Standard Webhooks `webhook-*` headers.
Verified: 200. Rejected: 401, so the agent retries it (useful while fixing a
wrong secret). A repeat of a verified `webhook-id` (delivery is at least once)
is printed as `duplicate` and answered 200, so the agent stops retrying.
"""

import base64
import binascii
import collections
import hashlib
import hmac
import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOLERANCE = 300  # seconds either side of now; older or newer is a replay
MAX_BODY = 16 << 20  # payload streams are at most 1 MiB each, before JSON escaping
SEEN_MAX = 100_000  # webhook-ids remembered for dedupe (oldest forgotten first)


def verify_hopx(secret: str, body: bytes, headers) -> bool:
    sig = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(sig, headers.get("X-HopX-Signature", ""))


def standard_key(secret: str) -> bytes:
    # As the agent does: a `whsec_` secret is base64 after the prefix; any other
    # (or one that is not valid base64) is its UTF-8 bytes.
    if secret.startswith("whsec_"):
        try:
            return base64.b64decode(secret[6:], validate=True)
        except binascii.Error:
            pass
    return secret.encode()


def verify_standard(secret: str, body: bytes, headers, tolerance=TOLERANCE, now=None) -> bool:
    return check_standard(secret, body, headers, tolerance, now) is None


def check_standard(secret, body, headers, tolerance=TOLERANCE, now=None):
    """None if the Standard Webhooks signature holds, else why not."""
    msg_id, ts = headers.get("webhook-id"), headers.get("webhook-timestamp")
    sigs = headers.get("webhook-signature")
    if not (msg_id and ts and sigs):
        return "missing webhook-id/webhook-timestamp/webhook-signature"
    try:
        ts_int = int(ts)
    except ValueError:
        return "webhook-timestamp is not an integer"
    if abs((time.time() if now is None else now) - ts_int) > tolerance:
        return "webhook-timestamp outside the tolerance (replay?)"
    mac = hmac.new(standard_key(secret), f"{msg_id}.{ts}.".encode() + body, hashlib.sha256)
    expected = "v1," + base64.b64encode(mac.digest()).decode()
    if not any(hmac.compare_digest(expected, s) for s in sigs.split()):
        return "bad webhook-signature"
    return None


def check(secret: str, body: bytes, headers, tolerance=TOLERANCE):
    """None if both signatures hold, else why not."""
    if "X-HopX-Signature" not in headers:
        return "missing X-HopX-Signature"
    if not verify_hopx(secret, body, headers):
        return "bad X-HopX-Signature"
    return check_standard(secret, body, headers, tolerance)


class Handler(BaseHTTPRequestHandler):
    server_version = "execd-receiver"

    def do_POST(self):
        srv = self.server
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit() or int(length) > MAX_BODY:
            return self.answer(411 if length is None else 413)
        body = self.rfile.read(int(length))
        if srv.secret:
            why = check(srv.secret, body, self.headers, srv.tolerance)
        else:
            why = None
        msg_id = self.headers.get("webhook-id", "-")
        if why is not None:
            srv.emit(f"REJECTED: {why}", msg_id, body)
            return self.answer(401)
        with srv.lock:  # ThreadingHTTPServer: one thread per request
            repeat = msg_id in srv.seen
            if msg_id != "-" and not repeat:
                srv.seen[msg_id] = None
                if len(srv.seen) > SEEN_MAX:
                    srv.seen.popitem(last=False)
        word = "verified" if srv.secret else "unsigned (CALLBACK_SECRET empty, not verified)"
        srv.emit("duplicate" if repeat else word, msg_id, body)
        self.answer(200)

    def answer(self, status):
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):  # no access log: one line per callback is printed instead
        pass


class Receiver(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host, port, secret, out=None, tolerance=TOLERANCE):
        super().__init__((host, port), Handler)
        self.secret, self.tolerance = secret, tolerance
        self.out = out or sys.stdout
        self.lock = threading.Lock()
        self.seen = collections.OrderedDict()

    def emit(self, word, msg_id, body):
        try:
            p = json.loads(body)
            p = p if isinstance(p, dict) else {}
        except ValueError:
            p = {}
        line = (f"{word} webhook-id={msg_id} execution_id={p.get('execution_id', '-')} "
                f"status={p.get('status', '-')} exit_code={p.get('exit_code', '-')}")
        with self.lock:
            print(line, file=self.out, flush=True)


def make_server(port=8080, secret="", host="0.0.0.0", out=None, tolerance=TOLERANCE):
    return Receiver(host, port, secret, out, tolerance)


def main():
    secret = os.environ.get("CALLBACK_SECRET", "")
    server = make_server(int(os.environ.get("PORT", "8080")), secret)
    # As PID 1 in a container, SIGTERM has no default action: exit on it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    mode = "verifying signatures" if secret else "CALLBACK_SECRET empty: accepting unsigned callbacks"
    print(f"receiver listening on {server.server_address[0]}:{server.server_address[1]}, {mode}",
          flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
