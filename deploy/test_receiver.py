"""Tests of deploy/receiver.py: `python3 -m unittest deploy/test_receiver.py`.

The receiver runs in a thread on 127.0.0.1, port 0; signatures are computed
here independently of the receiver's code.
"""

import base64
import hashlib
import hmac
import http.client
import io
import json
import os
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import receiver  # noqa: E402

SECRET = "s3cret"


def signed_headers(secret, body, msg_id, ts=None):
    ts = str(int(time.time()) if ts is None else ts)
    key = base64.b64decode(secret[6:]) if secret.startswith("whsec_") else secret.encode()
    std = hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()
    return {
        "Content-Type": "application/json",
        "X-HopX-Timestamp": ts,
        "X-HopX-Signature": "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest(),
        "webhook-id": msg_id,
        "webhook-timestamp": ts,
        "webhook-signature": "v1," + base64.b64encode(std).decode(),
    }


def payload(execution_id="exec_01TEST", status="completed", exit_code=0):
    return json.dumps({"execution_id": execution_id, "status": status,
                       "exit_code": exit_code, "success": exit_code == 0}).encode()


class Running:
    """A receiver serving in a thread; its printed lines in `lines()`."""

    def __init__(self, secret):
        self.out = io.StringIO()
        self.server = receiver.make_server(0, secret, host="127.0.0.1", out=self.out)
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def post(self, body, headers):
        conn = http.client.HTTPConnection("127.0.0.1", self.server.server_address[1], timeout=5)
        try:
            conn.request("POST", "/callback", body=body, headers=headers)
            return conn.getresponse().status
        finally:
            conn.close()

    def lines(self):
        return self.out.getvalue().splitlines()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


class SignedReceiver(unittest.TestCase):
    def setUp(self):
        self.r = Running(SECRET)
        self.addCleanup(self.r.stop)

    def test_a_correctly_signed_callback_is_verified(self):
        body = payload()
        self.assertEqual(self.r.post(body, signed_headers(SECRET, body, "msg_ok")), 200)
        self.assertEqual(self.r.lines(), [
            "verified webhook-id=msg_ok execution_id=exec_01TEST status=completed exit_code=0"])

    def test_a_wrong_hopx_signature_is_rejected(self):
        body = payload()
        h = signed_headers(SECRET, body, "msg_badhopx")
        h["X-HopX-Signature"] = "sha256=" + "0" * 64
        self.assertEqual(self.r.post(body, h), 401)
        self.assertTrue(self.r.lines()[0].startswith("REJECTED: bad X-HopX-Signature"))

    def test_a_wrong_secret_or_a_changed_body_is_rejected(self):
        body = payload()
        self.assertEqual(self.r.post(body, signed_headers("other", body, "msg_w")), 401)
        h = signed_headers(SECRET, body, "msg_changed")
        self.assertEqual(self.r.post(payload(status="failed"), h), 401)

    def test_a_wrong_standard_signature_is_rejected(self):
        body = payload()
        h = signed_headers(SECRET, body, "msg_badstd")
        h["webhook-signature"] = "v1," + base64.b64encode(b"\0" * 32).decode()
        self.assertEqual(self.r.post(body, h), 401)
        self.assertIn("bad webhook-signature", self.r.lines()[0])

    def test_missing_signatures_are_rejected(self):
        self.assertEqual(self.r.post(payload(), {"Content-Type": "application/json"}), 401)
        self.assertIn("REJECTED: missing", self.r.lines()[0])

    def test_a_stale_or_future_timestamp_is_rejected(self):
        body = payload()
        for ts in (int(time.time()) - 301 - 5, int(time.time()) + 301 + 5):
            self.assertEqual(self.r.post(body, signed_headers(SECRET, body, "msg_t", ts)), 401)
        self.assertEqual(len(self.r.lines()), 2)
        for line in self.r.lines():
            self.assertIn("outside the tolerance", line)

    def test_a_repeated_webhook_id_is_a_duplicate_answered_200(self):
        body = payload()
        for _ in range(3):
            self.assertEqual(self.r.post(body, signed_headers(SECRET, body, "msg_rep")), 200)
        words = [line.split()[0] for line in self.r.lines()]
        self.assertEqual(words, ["verified", "duplicate", "duplicate"])

    def test_a_rejected_attempt_does_not_mark_its_id_seen(self):
        body = payload()
        bad = signed_headers(SECRET, body, "msg_retry")
        bad["X-HopX-Signature"] = "sha256=00"
        self.assertEqual(self.r.post(body, bad), 401)
        self.assertEqual(self.r.post(body, signed_headers(SECRET, body, "msg_retry")), 200)
        self.assertEqual(self.r.lines()[1].split()[0], "verified")

    def test_a_whsec_secret_is_base64_for_the_standard_signature(self):
        secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
        r = Running(secret)
        self.addCleanup(r.stop)
        body = payload()
        self.assertEqual(r.post(body, signed_headers(secret, body, "msg_whsec")), 200)
        self.assertTrue(r.lines()[0].startswith("verified"))


class UnsignedReceiver(unittest.TestCase):
    def test_with_an_empty_secret_unsigned_callbacks_are_accepted(self):
        r = Running("")
        self.addCleanup(r.stop)
        self.assertEqual(r.post(payload(), {"Content-Type": "application/json"}), 200)
        self.assertTrue(r.lines()[0].startswith("unsigned"))


class StandardWebhooksReferenceVector(unittest.TestCase):
    SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    BODY = b'{"test": 2432232314}'
    HEADERS = {"webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek", "webhook-timestamp": "1614265330",
               "webhook-signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="}

    def test_the_reference_signature_verifies(self):
        self.assertTrue(receiver.verify_standard(self.SECRET, self.BODY, self.HEADERS, tolerance=10**12))

    def test_it_is_stale_with_the_normal_tolerance(self):
        self.assertFalse(receiver.verify_standard(self.SECRET, self.BODY, self.HEADERS))

    def test_one_of_several_signatures_is_enough_and_a_changed_body_fails(self):
        h = dict(self.HEADERS, **{"webhook-signature": "v1,bm9wZQ== " + self.HEADERS["webhook-signature"]})
        self.assertTrue(receiver.verify_standard(self.SECRET, self.BODY, h, tolerance=10**12))
        self.assertFalse(receiver.verify_standard(self.SECRET, b'{"test": 2432232315}', h, tolerance=10**12))


if __name__ == "__main__":
    unittest.main()
