"""The agent's context switches and CPU per job, by thread name, over
background `print(1)` jobs (by hand, not in the harness).

    python3 bench/thread_switches.py AGENT_BIN [JOBS] [CONCURRENCY]

e.g. `python3 bench/thread_switches.py target/release/execd 600 2`. It
starts the agent on a fresh temp data dir with `--background-concurrency
CONCURRENCY` and PATH=/usr/bin:/bin (so `python3` is Debian's), submits 20
jobs to warm it up, then JOBS from 4 client threads, waits until none is
queued or running (a database poll every 50 ms), and prints jobs/s and,
per thread name, the voluntary and involuntary context switches and the
CPU per job (from /proc/<pid>/task). The zygote and supervisors are
processes of their own and not counted. To compare builds, copy them aside
and run them in turns: this machine's speed drifts within minutes.
"""
import collections
import os
import sqlite3
import sys
import tempfile
import threading
import time

from byhand import start_agent, submitter

binary = sys.argv[1]
jobs = int(sys.argv[2]) if len(sys.argv) > 2 else 600
concurrency = int(sys.argv[3]) if len(sys.argv) > 3 else 2


def threads(pid):
    """Per thread name: voluntary, involuntary switches, CPU ticks, count."""
    out = collections.defaultdict(lambda: [0, 0, 0, 0])
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            comm = open(f"/proc/{pid}/task/{tid}/comm").read().strip()
            status = open(f"/proc/{pid}/task/{tid}/status").read()
            stat = open(f"/proc/{pid}/task/{tid}/stat").read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        row = out[comm]
        row[0] += int(status.split("\nvoluntary_ctxt_switches:")[1].split()[0])
        row[1] += int(status.split("nonvoluntary_ctxt_switches:")[1].split()[0])
        row[2] += int(stat[11]) + int(stat[12])
        row[3] += 1
    return out


with tempfile.TemporaryDirectory() as data:
    flags = ["--background-concurrency", str(concurrency)]
    agent, base = start_agent(binary, data + "/d", flags, path="/usr/bin:/bin")
    submit = submitter(base, {"code": "print(1)", "language": "python"})

    db = sqlite3.connect(f"file:{data}/d/execd.db?mode=ro", uri=True)

    def wait():
        query = "SELECT count(*) FROM executions WHERE status IN ('queued', 'running')"
        while db.execute(query).fetchone()[0]:
            time.sleep(0.05)

    submit(20)
    wait()
    before, started = threads(agent.pid), time.time()
    clients = [threading.Thread(target=submit, args=(jobs // 4,)) for _ in range(4)]
    for c in clients:
        c.start()
    for c in clients:
        c.join()
    wait()
    wall, after = time.time() - started, threads(agent.pid)
    print(f"{jobs / wall:.1f} jobs/s")
    total = [0.0, 0.0, 0.0]
    for name in sorted(after):
        now, then = after[name], before.get(name, [0, 0, 0, 0])
        per_job = [(now[i] - then[i]) / jobs for i in range(3)]
        total = [t + d for t, d in zip(total, per_job)]
        print(f"{name:20s} threads {now[3]:2d}  voluntary/job {per_job[0]:6.2f}  "
              f"involuntary/job {per_job[1]:6.2f}  CPU ms/job {per_job[2] * 10:6.3f}")
    print(f"{'total':20s}             voluntary/job {total[0]:6.2f}  "
          f"involuntary/job {total[1]:6.2f}  CPU ms/job {total[2] * 10:6.3f}")
    agent.terminate()
    agent.wait()
