"""A warm agent's Python `print(1)`, one job at a time, by hand: request to
answer of `POST /execute`, and created -> spawned (pid known) from the
database, for agent binaries in turns.

    python3 bench/python_round_trip.py [--path DIR] BIN [BIN ...]

Each binary in turn, ROUNDS (3) times: a fresh agent on a temp data dir,
10 jobs to warm it, then 100 jobs; one line each with the medians and the
90th percentiles, then the memory of the warm interpreter and its spare
copy as they wait (resident, and private: not shared with the other).
`--path DIR` puts DIR first on the agent's PATH (a
directory with a `python3` link to /usr/bin/python3 picks Debian's).
Copy the builds aside to compare them: this machine's speed drifts by
more than 10% within minutes, hence the turns.
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

ROUNDS = 3
JOBS = 100

args = sys.argv[1:]
path = None
if args[:1] == ["--path"]:
    path = args[1] + ":" + os.environ["PATH"]
    args = args[2:]
binaries = args or ["target/release/execd"]


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def warm_memory(agent_pid):
    """The waiting warm interpreters below `agent_pid` and their spares:
    (which, resident kB, private kB) each."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parent[int(entry)] = int(stat[1])
    below, grew = {agent_pid}, True
    while grew:
        more = {pid for pid, ppid in parent.items() if ppid in below} - below
        below |= more
        grew = bool(more)
    found = []
    for pid in sorted(below - {agent_pid}):
        try:
            if b"execd's warm Python" not in open(f"/proc/{pid}/cmdline", "rb").read():
                continue
            fields = dict(
                (line.split()[0].rstrip(":"), int(line.split()[1]))
                for line in open(f"/proc/{pid}/smaps_rollup").read().splitlines()[1:]
            )
        except OSError:
            continue
        which = "interpreter" if os.getpgid(pid) == pid else "spare"
        found.append((which, fields["Rss"], fields["Private_Clean"] + fields["Private_Dirty"]))
    return found


def one_agent(binary):
    data = tempfile.mkdtemp(prefix="execd-roundtrip-")
    agent, base = start_agent(binary, data, [], path)
    body = json.dumps({"code": "print(1)", "language": "python"}).encode()
    headers = {"Content-Type": "application/json", "Authorization": "Bearer " + TOKEN}

    def run():
        request = urllib.request.Request(base + "/execute", data=body, headers=headers)
        started = time.perf_counter()
        out = json.loads(urllib.request.urlopen(request).read())
        took = (time.perf_counter() - started) * 1e3
        assert out["stdout"] == "1\n", out
        return took

    try:
        for _ in range(10):
            run()
        walls = [run() for _ in range(JOBS)]
        db = sqlite3.connect(os.path.join(data, "execd.db"))
        spawned = [
            row[0]
            for row in db.execute(
                "SELECT (julianday(spawned_at) - julianday(created_at)) * 86400000 "
                "FROM executions ORDER BY seq DESC LIMIT ?",
                (JOBS,),
            )
        ]
        db.close()
        time.sleep(0.5)
        memory = warm_memory(agent.pid)
    finally:
        agent.terminate()
        agent.wait()
        shutil.rmtree(data, ignore_errors=True)
    return walls, spawned, memory


for round_ in range(ROUNDS):
    for binary in binaries:
        walls, spawned, memory = one_agent(binary)
        print(
            f"round {round_ + 1} {binary}: request to answer p50 {statistics.median(walls):.2f} ms, "
            f"p90 {percentile(walls, 0.9):.2f} ms; created -> spawned p50 "
            f"{statistics.median(spawned):.2f} ms, p90 {percentile(spawned, 0.9):.2f} ms; waiting: "
            + ", ".join(f"{w} {rss / 1024:.1f} MB resident, {own / 1024:.1f} MB private" for w, rss, own in memory),
            flush=True,
        )
