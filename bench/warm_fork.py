"""By hand: what a Python job costs forked from the warm interpreter
(src/supervisor/warm_python.py) against its interpreter started anew.

    python3 bench/warm_fork.py [JOBS] [PYTHON]

Drives the server as a supervisor does (this process is the child
subreaper the forks come to), one `print(1)` job at a time, then runs
`PYTHON -u main.py` as many times; prints, for each, jobs/s and the CPU of
the jobs' processes (reaped here) per job. The server's own CPU, with that
of the forking parents it reaps, is read from its /proc/<pid>/stat (in
clock ticks).
"""
import ctypes, os, socket, subprocess, sys, tempfile, time

jobs = int(sys.argv[1]) if len(sys.argv) > 1 else 300
python = sys.argv[2] if len(sys.argv) > 2 else "/usr/bin/python3"
server = os.path.join(os.path.dirname(__file__), "..", "src", "supervisor", "warm_python.py")
ctypes.CDLL(None).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER
work = tempfile.mkdtemp()
script = os.path.join(work, "main.py")
with open(script, "w") as f:
    f.write("print(1)\n")


def server_cpu(pid):
    """The server's CPU and that of the forking parents it reaped, in s."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def children_cpu():
    t = os.times()
    return t.children_user + t.children_system


ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
pid = os.fork()
if pid == 0:
    os.dup2(theirs.fileno(), 3)
    os.execv(python, [python, "-u", "-c", open(server).read()])
theirs.close()
time.sleep(1)
null = os.open("/dev/null", os.O_RDONLY)
env = [b"PATH=/usr/bin:/bin", b"LANG=" + os.environ.get("LANG", "C.UTF-8").encode()]
start, cpu, served = time.perf_counter(), children_cpu(), server_cpu(pid)
for _ in range(jobs):
    pipes = [os.pipe() for _ in range(5)]  # stdout, stderr, pid report, gate, start report
    (out_r, out_w), (err_r, err_w), (rep_r, rep_w), (gate_r, gate_w), (said_r, said_w) = pipes
    message = b"\0".join([str(os.getpid()).encode(), work.encode(), script.encode(), b"1 pid "] + env)
    socket.send_fds(ours, [message], [null, out_w, err_w, rep_w, gate_r, said_w])
    for fd in (out_w, err_w, rep_w, gate_r, said_w):
        os.close(fd)
    os.write(gate_w, b"g")
    said = os.read(said_r, 64)
    assert said.startswith(b"r"), said
    os.waitpid(int(said[1:]), 0)
    assert os.read(out_r, 64) == b"1\n"
    for fd in (out_r, err_r, rep_r, gate_w, said_r):
        os.close(fd)
took, used, served = time.perf_counter() - start, children_cpu() - cpu, server_cpu(pid) - served
print(
    f"forked: {jobs / took:.0f} jobs/s one at a time, the forks' CPU {used / jobs * 1e3:.2f} ms/job, "
    f"the server's and its forking parents' {served / jobs * 1e3:.2f} ms/job"
)
ours.close()
os.waitpid(pid, 0)

start, cpu = time.perf_counter(), children_cpu()
for _ in range(jobs):
    subprocess.run([python, "-u", script], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, check=True, cwd=work)
took, used = time.perf_counter() - start, children_cpu() - cpu
print(f"started anew: {jobs / took:.0f} jobs/s one at a time, the interpreters' CPU {used / jobs * 1e3:.2f} ms/job")
