"""A fresh agent's cold start, by hand: from exec to `/health` answering
(polled every 2 ms), then its first job (`print(1)`, a sync /execute)
request to answer, and exec to that first result. Each binary given is
started FRESH times (default 5), in turns, so that they share the hour.

    python3 bench/cold_start.py BIN [BIN ...] [--path DIR_PUT_FIRST_ON_PATH]

A directory with a `python3` link to /usr/bin/python3 first on PATH picks
Debian's; `--path /root/.pyenv/shims` puts pyenv's shim first, as a login
shell here has it. Without `--path`, `python3` is whatever this script's
PATH finds: run through pyenv's shim, that is pyenv's interpreter itself
(pyenv puts its directory first), not the shim.
"""
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request

from byhand import TOKEN, start_agent

FRESH = int(os.environ.get("FRESH", "5"))


def cold_start(binary, path):
    data = tempfile.mkdtemp(prefix="execd-cold-")
    if path:
        path = path + ":" + os.environ["PATH"]
    started = time.perf_counter()
    agent, base = start_agent(binary, data, [], path, poll=0.002)
    try:
        healthy = time.perf_counter()
        request = urllib.request.Request(
            base + "/execute",
            data=json.dumps({"code": "print(1)", "language": "python"}).encode(),
            headers={"Authorization": "Bearer " + TOKEN, "Content-Type": "application/json"})
        out = json.load(urllib.request.urlopen(request))
        answered = time.perf_counter()
        if out.get("stdout") != "1\n":
            raise SystemExit(f"the first job did not print 1: {out}")
    finally:
        agent.terminate()
        agent.wait()
        shutil.rmtree(data, ignore_errors=True)
    return healthy - started, answered - healthy, answered - started


def main():
    args = sys.argv[1:]
    path = None
    if "--path" in args:
        at = args.index("--path")
        path = args[at + 1]
        del args[at:at + 2]
    binaries = args or ["target/release/execd"]
    samples = {binary: [] for binary in binaries}
    for _ in range(FRESH):
        for binary in binaries:
            samples[binary].append(cold_start(binary, path))
    for binary, runs in samples.items():
        median = [statistics.median(run[i] for run in runs) * 1e3 for i in range(3)]
        print(f"{binary}: exec -> /health {median[0]:.0f} ms, first job request -> answer "
              f"{median[1]:.0f} ms, exec -> first result {median[2]:.0f} ms (medians of {len(runs)}; "
              f"exec -> first result each: {' '.join(f'{run[2] * 1e3:.0f}' for run in runs)})")


if __name__ == "__main__":
    main()
