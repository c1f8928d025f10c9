"""Background bash `true` jobs through an agent binary: jobs/s, and the CPU
per job of the agent and of the whole machine (by hand, not in the harness).

    python3 bench/trivial_jobs.py AGENT_BIN [JOBS] [CONCURRENCY]

e.g. `python3 bench/trivial_jobs.py target/release/execd 2000 4`. It starts
the agent on a fresh temp data dir with `--background-concurrency
CONCURRENCY`, submits 20 jobs to warm it up, then JOBS from 8 client
threads, waits until none is queued or running (a database poll every
50 ms), and prints one line. To compare builds, copy them aside and run
them in turns: this machine's speed drifts by more than 10% within minutes.
"""
import os
import sqlite3
import sys
import tempfile
import threading
import time

from byhand import start_agent, submitter

binary = sys.argv[1]
jobs = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
concurrency = int(sys.argv[3]) if len(sys.argv) > 3 else 4
clients = 8


def cpu_ticks(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def machine_ticks():
    fields = open("/proc/stat").readline().split()
    return sum(map(int, fields[1:4])) + sum(map(int, fields[6:9]))


with tempfile.TemporaryDirectory() as data:
    flags = ["--background-concurrency", str(concurrency)]
    agent, base = start_agent(binary, data, flags)
    submit = submitter(base, {"code": "true", "language": "bash"})

    submit(20)
    time.sleep(2)
    agent0, machine0, t0 = cpu_ticks(agent.pid), machine_ticks(), time.time()
    threads = [threading.Thread(target=submit, args=(jobs // clients,)) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    db = sqlite3.connect(f"file:{data}/execd.db?mode=ro", uri=True)
    deadline = time.time() + 120
    while db.execute(
        "SELECT count(*) FROM executions WHERE status IN ('queued', 'running')"
    ).fetchone()[0] and time.time() < deadline:
        time.sleep(0.05)
    wall = time.time() - t0
    agent1, machine1 = cpu_ticks(agent.pid), machine_ticks()
    n = jobs // clients * clients
    tick_ms = 1000 / os.sysconf("SC_CLK_TCK")
    print(f"{n} jobs in {wall:.2f} s: {n / wall:.0f} jobs/s; CPU per job: "
          f"agent {(agent1 - agent0) * tick_ms / n:.2f} ms, machine {(machine1 - machine0) * tick_ms / n:.2f} ms")
    agent.terminate()
    agent.wait()
