"""Scenario 4's job run back to back, by hand, with what the database
writer did during each run: one fresh agent, RUNS (default 8) jobs each
writing 200 MB to stdout, one after the other as the harness runs them.

    python3 bench/output_runs.py [AGENT_BIN] [SETTLE_SECONDS]

Per run: the wall (request to the terminal status seen in the database,
polled every 2 ms), created -> spawned, the program, how long after the
program's end its end was seen, and the checkpoints logged while it ran
(beside the writer, or the writer's own fold: WAL frames, ms). With
SETTLE_SECONDS (default 0.3) the first run waits for the agent's
interpreter started ahead; 0 measures it as the harness does.
"""
import datetime
import json
import os
import re
import shutil
import sqlite3
import sys
import tempfile
import time
import urllib.request

from byhand import TOKEN, start_agent

BIN = sys.argv[1] if len(sys.argv) > 1 else "target/release/execd"
SETTLE = float(sys.argv[2]) if len(sys.argv) > 2 else 0.3
RUNS = int(os.environ.get("RUNS", "8"))
BIG = "import sys\nb = b'x'*65536\nfor _ in range(3200): sys.stdout.buffer.write(b)"
CHECKPOINT = re.compile(
    r'^(\S+)Z .*checkpoint by="([^"]+)" busy=(\d+) wal=(-?\d+) copied=-?\d+ elapsed_us=(\d+)')


def stamp(text):
    return datetime.datetime.fromisoformat(text.rstrip("Z")).timestamp()


def main():
    data = tempfile.mkdtemp(prefix="execd-output-")
    log_path = os.path.join(data, "agent.log")
    with open(log_path, "w") as log:
        agent, base = start_agent(BIN, data, [], log="execd::db=trace,warn", stderr=log)
    try:
        time.sleep(SETTLE)
        db = sqlite3.connect(os.path.join(data, "execd.db"))
        body = json.dumps({"code": BIG, "language": "python", "timeout": 120}).encode()
        headers = {"Authorization": "Bearer " + TOKEN, "Content-Type": "application/json"}
        runs = []
        for _ in range(RUNS):
            t = time.perf_counter()
            request = urllib.request.Request(base + "/execute/background", data=body, headers=headers)
            job = json.load(urllib.request.urlopen(request))["execution_id"]
            while True:
                # fetchall: a cursor left open would hold a read snapshot.
                status = db.execute("SELECT status FROM executions WHERE id = ?", (job,)).fetchall()[0][0]
                if status not in ("queued", "running"):
                    break
                time.sleep(0.002)
            wall = time.perf_counter() - t
            seen = time.time()
            created, spawned, completed = db.execute(
                "SELECT created_at, spawned_at, completed_at FROM executions WHERE id = ?",
                (job,)).fetchall()[0]
            runs.append((wall, stamp(created), stamp(spawned), stamp(completed), seen))
        db.close()
    finally:
        agent.terminate()
        agent.wait()
    checkpoints = []
    with open(log_path) as log:
        for line in log:
            m = CHECKPOINT.match(re.sub(r"\x1b\[[0-9;]*m", "", line))
            if m:
                at, by, busy, frames, us = m.groups()
                checkpoints.append((stamp(at), by, int(busy), int(frames), int(us) / 1e3))
    for n, (wall, created, spawned, completed, seen) in enumerate(runs):
        during = [f"{'fold' if 'rest' in by else 'beside'} {frames} frames {ms:.0f} ms"
                  for at, by, busy, frames, ms in checkpoints
                  if created <= at <= seen and not busy and frames > 0]
        print(f"run {n}: wall {wall * 1e3:.0f} ms = created->spawned {(spawned - created) * 1e3:.1f}"
              f" + program {(completed - spawned) * 1e3:.0f} + end seen {(seen - completed) * 1e3:.1f} ms later;"
              f" checkpoints: {', '.join(during) or 'none'}")
    shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
