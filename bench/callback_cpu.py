"""What a callback costs the agent: bash `true` jobs with a callback to a
loopback receiver, or without one, and the agent's CPU per job (by hand,
not in the harness).

    python3 bench/callback_cpu.py AGENT_BIN cb|none [JOBS]

e.g. `python3 bench/callback_cpu.py target/release/execd cb 2000`, then the
same with `none`. It starts the agent on a fresh temp data dir with 8 async
and 8 background runners; `cb` submits async jobs whose `callback_url` is a
minimal HTTP/1.1 receiver in this process, `none` background jobs (no
callback). After 20 jobs to warm up, JOBS from 8 client threads; it waits
until none is queued or running and (with `cb`) every callback is
delivered, and prints jobs/s, the agent's CPU per job and the writer's
commits, writes and syncs per job (from `/metrics`). Run the two modes in
turns: this machine's speed drifts by more than 10% within minutes.
"""
import asyncio
import json
import os
import sqlite3
import sys
import tempfile
import threading
import time
import urllib.request

from byhand import TOKEN, start_agent

binary, mode = sys.argv[1], sys.argv[2]
jobs = int(sys.argv[3]) if len(sys.argv) > 3 else 2000
clients = 8
received = [0]


def receiver(port):
    """Answers every POST 200 (keep-alive), counting them."""
    async def handle(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                received[0] += 1
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass

    async def serve():
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port.append(server.sockets[0].getsockname()[1])
        await server.serve_forever()

    asyncio.run(serve())


def cpu_ticks(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


port = []
threading.Thread(target=receiver, args=(port,), daemon=True).start()
while not port:
    time.sleep(0.01)

with tempfile.TemporaryDirectory() as data:
    flags = ["--async-concurrency", "8", "--background-concurrency", "8",
             "--callback-concurrency", "64", "--callback-retry-schedule", "1s"]
    agent, base = start_agent(binary, data, flags)
    try:
        body = {"code": "true", "language": "bash"}
        route = "/execute/background"
        if mode == "cb":
            body["callback_url"] = f"http://127.0.0.1:{port[0]}/hook"
            route = "/execute/async"
        headers = {"Content-Type": "application/json", "Authorization": "Bearer " + TOKEN}
        payload = json.dumps(body).encode()

        def submit(n):
            for _ in range(n):
                request = urllib.request.Request(base + route, data=payload, headers=headers)
                urllib.request.urlopen(request).read()

        def metrics():
            request = urllib.request.Request(base + "/metrics", headers=headers)
            values = {}
            for line in urllib.request.urlopen(request).read().decode().splitlines():
                if line and not line.startswith("#"):
                    name, _, value = line.rpartition(" ")
                    values[name] = float(value)
            return values

        submit(20)
        time.sleep(2)
        metrics0, agent0, t0 = metrics(), cpu_ticks(agent.pid), time.time()
        threads = [threading.Thread(target=submit, args=(jobs // clients,)) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        n = jobs // clients * clients
        db = sqlite3.connect(f"file:{data}/execd.db?mode=ro", uri=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            unfinished = db.execute(
                "SELECT count(*) FROM executions WHERE status IN ('queued', 'running')"
            ).fetchone()[0]
            undelivered = db.execute(
                "SELECT count(*) FROM callbacks WHERE status != 'delivered'"
            ).fetchone()[0]
            if unfinished == 0 and undelivered == 0:
                break
            time.sleep(0.05)
        wall = time.time() - t0
        agent1, metrics1 = cpu_ticks(agent.pid), metrics()
        tick_ms = 1000 / os.sysconf("SC_CLK_TCK")

        def per_job(name):
            return (metrics1.get(name, 0) - metrics0.get(name, 0)) / n

        print(f"{mode}: {n} jobs in {wall:.2f} s: {n / wall:.0f} jobs/s; agent CPU "
              f"{(agent1 - agent0) * tick_ms / n:.2f} ms/job; callbacks received {received[0]}; "
              f"per job: commits {per_job('execd_db_commit_seconds_count'):.2f}, "
              f"writes {per_job('execd_db_write_batch_size_sum'):.2f}, "
              f"syncs {per_job('execd_db_wal_sync_seconds_count'):.2f}")
    finally:
        agent.terminate()
        agent.wait()
