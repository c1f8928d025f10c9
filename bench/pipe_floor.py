"""By hand: what scenario 4's 200 MB cost a program forked from a running
interpreter (as a warm Python job is), by where its stdout goes, with no
agent: /dev/null; a 64 KiB pipe and a 1 MiB pipe (the supervisor's size),
each drained by `splice` into /dev/null, as the supervisor drains output
past the cap; a file on tmpfs (/dev/shm) and one on the data disk (/tmp).

    python3 bench/pipe_floor.py [ROUNDS]

It first says how large a pipe may be made here (`pipe-max-size`, and
whether asking for twice that is refused). Each line after is one round,
in ms from the fork to the child reaped. The
program is scenario 4's: 3,200 writes of 64 KiB. The difference between
/dev/null and the 1 MiB pipe is what any capture through a pipe costs
(the copy into the pipe's pages), whoever reads it.
"""
import fcntl, os, select, sys, time

F_SETPIPE_SZ = 1031
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3


def write_all(fd):
    b = b"x" * 65536
    for _ in range(3200):
        os.write(fd, b)


def to_fd(open_fd):
    """The program writing to the descriptor `open_fd()` gives it."""
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        write_all(open_fd())
        os._exit(0)
    os.waitpid(pid, 0)
    return (time.perf_counter() - started) * 1e3


def to_pipe(size):
    """The program writing to a pipe of `size` bytes drained by splice."""
    r, w = os.pipe()
    fcntl.fcntl(r, F_SETPIPE_SZ, size)
    null = os.open("/dev/null", os.O_WRONLY)
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        write_all(w)
        os._exit(0)
    os.close(w)
    readable = select.poll()
    readable.register(r, select.POLLIN)
    while True:
        readable.poll()
        if os.splice(r, null, 1 << 20) == 0:
            break
    os.waitpid(pid, 0)
    elapsed = (time.perf_counter() - started) * 1e3
    os.close(r)
    os.close(null)
    return elapsed


def to_file(path):
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    elapsed = to_fd(lambda: os.open(path, flags, 0o600))
    os.unlink(path)
    return elapsed


def larger_pipe():
    """Whether a pipe twice `pipe-max-size` can be had, or why not."""
    r, w = os.pipe()
    try:
        fcntl.fcntl(r, F_SETPIPE_SZ, 2 * most)
        return "granted"
    except OSError as e:
        return f"refused ({os.strerror(e.errno)})"
    finally:
        os.close(r)
        os.close(w)


most = int(open("/proc/sys/fs/pipe-max-size").read())
print(f"pipe-max-size {most} B; a pipe of {2 * most} B: {larger_pipe()}", flush=True)
for _ in range(rounds):
    figures = {
        "/dev/null": to_fd(lambda: os.open("/dev/null", os.O_WRONLY)),
        "pipe 64 KiB": to_pipe(1 << 16),
        "pipe 1 MiB": to_pipe(1 << 20),
        "file on /dev/shm": to_file(f"/dev/shm/pipe_floor.{os.getpid()}"),
        "file on /tmp": to_file(f"/tmp/pipe_floor.{os.getpid()}"),
    }
    print("  ".join(f"{k} {v:.1f} ms" for k, v in figures.items()), flush=True)
