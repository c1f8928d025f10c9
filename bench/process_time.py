"""Python's own CPU per `print(...)` job, through the agent and spawned
directly, in turns (by hand, not in the harness).

Start an agent, e.g.
    target/release/execd serve --data-dir /tmp/pt --listen 127.0.0.1:18777 --token tok
then run
    python3 bench/process_time.py http://127.0.0.1:18777 tok PYTHON
with PYTHON the interpreter the agent resolved (its start-up log names it).
Each job prints `time.process_time()`: the CPU its process used since it
started, interpreter start-up included. Three rounds of 200 jobs each way,
two at a time (sync `POST /execute` against `subprocess.run`).
"""
import json
import statistics
import subprocess
import sys
import threading
import urllib.request

base, token, python = sys.argv[1], sys.argv[2], sys.argv[3]
CODE = "import time; print(time.process_time())"
HEADERS = {"Authorization": "Bearer " + token, "Content-Type": "application/json"}


def through_agent():
    request = urllib.request.Request(
        base + "/execute",
        data=json.dumps({"code": CODE, "language": "python"}).encode(),
        headers=HEADERS,
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return float(json.load(response)["stdout"])


def direct():
    done = subprocess.run(
        [python, "-c", CODE], capture_output=True, stdin=subprocess.DEVNULL, check=True
    )
    return float(done.stdout)


def round_of(job, n=200):
    seconds, lock = [], threading.Lock()

    def worker():
        for _ in range(n // 2):
            value = job()
            with lock:
                seconds.append(value)

    workers = [threading.Thread(target=worker) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return statistics.median(seconds) * 1e3


for _ in range(3):
    agent_ms, direct_ms = round_of(through_agent), round_of(direct)
    print(f"process_time median: agent {agent_ms:.2f} ms, direct {direct_ms:.2f} ms")
