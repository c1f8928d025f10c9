"""By hand: how long an interpreter takes to give a running copy of itself
by one fork and by two (the warm interpreter's copy is a grandchild, so
that it comes to the supervisor as its child), from the fork to the
copy's first write, with the interpreter's own start-up modules loaded.

    PYTHON bench/fork_cost.py

e.g. `/root/.pyenv/versions/3.11.7/bin/python3 bench/fork_cost.py` and
`/usr/bin/python3 bench/fork_cost.py`. Medians and 90th percentiles of 200
of each, twice in turns.
"""
import gc
import os
import time

gc.freeze()


def once(double):
    r, w = os.pipe()
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        if double and os.fork() != 0:
            os._exit(0)
        os.write(w, b"%d\n" % os.getpid())
        os._exit(0)
    os.read(r, 32)
    took = time.perf_counter() - started
    os.waitpid(pid, 0)
    try:
        os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        pass
    os.close(r)
    os.close(w)
    return took * 1e3


for double in (False, True, False, True):
    xs = sorted(once(double) for _ in range(200))
    print(f"{'two forks' if double else 'one fork'}: p50 {xs[100]:.3f} ms, p90 {xs[180]:.3f} ms")
