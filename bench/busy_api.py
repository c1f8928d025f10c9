"""The API's latency while CPU-bound jobs run (by hand, not in the harness).

Start an agent with room for the jobs, e.g.
    target/release/execd serve --data-dir /tmp/busy --listen 127.0.0.1:18779 \
        --token tok --background-concurrency 16
then run
    python3 bench/busy_api.py http://127.0.0.1:18779 tok
It starts 16 background Python jobs that spin for up to 20 s, and after 2 s
times 100 sequential `GET /execute/processes?limit=10` (20 ms apart) and one
sync `print(1)`; then kills the jobs.
"""
import json
import sys
import time
import urllib.request

base, token = sys.argv[1], sys.argv[2]
HEADERS = {"Authorization": "Bearer " + token, "Content-Type": "application/json"}


def call(method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, data=data, headers=HEADERS, method=method)
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


spin = {"code": "while True: pass", "language": "python", "timeout": 20}
ids = [call("POST", "/execute/background", spin)["process_id"] for _ in range(16)]
time.sleep(2)
took = []
for _ in range(100):
    start = time.perf_counter()
    call("GET", "/execute/processes?limit=10")
    took.append((time.perf_counter() - start) * 1e3)
    time.sleep(0.02)
start = time.perf_counter()
call("POST", "/execute", {"code": "print(1)", "language": "python"})
sync_ms = (time.perf_counter() - start) * 1e3
took.sort()
print(
    f"16 busy jobs: GET list p50 {took[50]:.2f} ms, p90 {took[90]:.2f} ms, "
    f"max {took[-1]:.2f} ms; a sync print(1) took {sync_ms:.0f} ms"
)
for process_id in ids:
    try:
        call("POST", f"/execute/kill/{process_id}", {})
    except OSError:
        pass
