"""A fresh agent's first Python job, by hand: request to answer and
created -> spawned (from the database), with the warm interpreter started
ahead (the first job is Python) and started for it (a bash job first takes
the one started ahead, as it did before the interpreter was started ahead).

    python3 bench/first_job.py [AGENT_BIN] [DIR_PUT_FIRST_ON_PATH]

Five fresh agents each way; the agent resolves `python3` on PATH (a
directory with a `python3` link to /usr/bin/python3 picks Debian's).
"""
import json
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import urllib.request

from byhand import TOKEN, start_agent

BIN = sys.argv[1] if len(sys.argv) > 1 else "target/release/execd"
PATH_FIRST = sys.argv[2] if len(sys.argv) > 2 else None


def first_job(python_first):
    data = tempfile.mkdtemp(prefix="execd-first-")
    path = PATH_FIRST + ":" + os.environ["PATH"] if PATH_FIRST else None
    agent, base = start_agent(BIN, data, [], path)
    try:
        def run(code, language):
            request = urllib.request.Request(
                base + "/execute",
                data=json.dumps({"code": code, "language": language}).encode(),
                headers={"Authorization": "Bearer " + TOKEN,
                         "Content-Type": "application/json"})
            t = time.perf_counter()
            out = json.load(urllib.request.urlopen(request))
            return out, time.perf_counter() - t

        # A while after the start, as a first job comes to a fresh sandbox.
        time.sleep(1.5)
        if not python_first:
            run("true", "bash")
            time.sleep(0.3)
        out, wall = run("print(1)", "python")
        assert out["stdout"] == "1\n", out
        db = sqlite3.connect(os.path.join(data, "execd.db"))
        spawned = db.execute(
            "SELECT (julianday(spawned_at) - julianday(created_at)) * 86400000 "
            "FROM executions WHERE language = 'python'").fetchone()[0]
        db.close()
        return wall * 1e3, spawned
    finally:
        agent.terminate()
        agent.wait()
        shutil.rmtree(data, ignore_errors=True)


for label, python_first in [("started ahead", True), ("started for it", False)]:
    runs = [first_job(python_first) for _ in range(5)]
    walls = " ".join(f"{w:.1f}" for w, _ in runs)
    print(f"{label}: request -> answer median {statistics.median(w for w, _ in runs):.1f} ms "
          f"({walls}); created -> spawned median {statistics.median(s for _, s in runs):.1f} ms")
