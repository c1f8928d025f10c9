"""What the by-hand scripts of bench/ share: an agent on a temp data dir,
and a client that submits to it."""
import json
import os
import socket
import subprocess
import time
import urllib.request

TOKEN = "tok"


def start_agent(binary, data_dir, flags, path=None, log="warn", stderr=None, poll=0.02):
    """Starts `binary serve` on a free loopback port with `flags` (and PATH
    `path`, if given; its log filtered by `log`, into `stderr` if given);
    returns the process and its base URL once healthy (asked every `poll`
    seconds, 4 s at most)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, EXECD_LOG=log)
    if path is not None:
        env["PATH"] = path
    agent = subprocess.Popen(
        [binary, "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", data_dir,
         "--token", TOKEN, *flags],
        env=env,
        stderr=stderr,
    )
    base = f"http://127.0.0.1:{port}"
    for _ in range(int(4 / poll)):
        try:
            urllib.request.urlopen(base + "/health")
            break
        except OSError:
            time.sleep(poll)
    return agent, base


def submitter(base, body):
    """A function that POSTs `body` to /execute/background `n` times."""
    data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json", "Authorization": "Bearer " + TOKEN}

    def submit(n):
        for _ in range(n):
            request = urllib.request.Request(base + "/execute/background", data=data, headers=headers)
            urllib.request.urlopen(request).read()

    return submit
