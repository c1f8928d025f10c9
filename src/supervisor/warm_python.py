# execd's warm Python (see src/supervisor/warm.rs): an interpreter started
# once per supervisor, that forks a started copy of itself for each job
# instead of starting the interpreter again. The copy is forked ahead, a
# spare waiting for the next job, so that a job's start waits for no fork.
# The spare is a grandchild: its parent exits at once, so it (and the job it
# becomes) comes to the supervisor (a child subreaper) as the cold program
# would be, its child; the parent first tells the supervisor its pid on fd 3
# (a SOCK_SEQPACKET socket), since the spare is no part of any job. The
# supervisor sends a job on fd 3, which the spare alone reads: NUL-separated
# fields (its pid, the working directory, the code's file, the pid report's
# prefix, then the job's environment as NAME=value), and six descriptors
# (stdin, stdout, stderr, the pid report, the gate, the start report). The
# spare says on a pipe of its own that it took one, and this server forks
# the next.
import os, sys, gc, _socket, ctypes


def serve():
    libc = ctypes.CDLL(None, use_errno=True)
    jobs = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET, 0, 3)
    supervisor = os.getppid()
    # What each fork would otherwise set up for itself, in pages of its own:
    # the compiler's first use, and a foreign call.
    compile(b"print(1)\n", "warm.py", "exec", dont_inherit=True)
    libc.prctl(2, ctypes.byref(ctypes.c_int()))  # PR_GET_PDEATHSIG
    gc.freeze()
    while True:
        taken, took = os.pipe()
        if os.fork() == 0:
            os.close(taken)
            pid = os.fork()
            if pid != 0:
                try:
                    jobs.send(b"%d" % pid)
                except OSError:
                    pass
                os._exit(0)
            spare(libc, jobs, supervisor, took)
        os.close(took)
        try:
            os.wait()
        except ChildProcessError:
            pass
        said = os.read(taken, 1)
        os.close(taken)
        # A spare that went without a job: the supervisor closed the socket
        # (it has no more use for this server), or something killed it.
        # Either way this server ends; the supervisor starts another if it
        # needs one.
        if not said:
            os._exit(0)


def spare(libc, jobs, supervisor, took):
    """The copy forked ahead: the supervisor's child once its forking parent
    is gone (a few microseconds), it waits for a job and becomes it."""
    for _ in range(100000):
        if os.getppid() == supervisor:
            break
        os.sched_yield()
    # Killed with the supervisor, as the cold program is.
    libc.prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    if os.getppid() != supervisor:
        os._exit(127)
    while True:
        msg, ancillary, _, _ = jobs.recvmsg(1 << 20, _socket.CMSG_SPACE(6 * 4))
        if not msg:
            os._exit(0)
        fds = []
        for level, kind, data in ancillary:
            if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
                fds += [int.from_bytes(data[i:i + 4], sys.byteorder)
                        for i in range(0, len(data) - len(data) % 4, 4)]
        if len(fds) == 6:
            break
        for fd in fds:
            os.close(fd)
    os.write(took, b"t")
    os.close(took)
    jobs.close()
    job(msg.split(b"\0"), fds)


def job(fields, fds):
    supervisor, cwd, script, prefix, env = int(fields[0]), fields[1], fields[2], fields[3], fields[4:]
    null, out, err, report, gate, started = fds
    if os.getppid() != supervisor:
        os._exit(127)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(err, 2)
    for fd in (null, out, err):
        if fd > 2:
            os.close(fd)
    try:
        os.chdir(cwd)
    except OSError as e:
        os.write(started, b"e%d" % e.errno)
        os._exit(127)
    os.setpgid(0, 0)
    try:
        os.write(report, prefix + b"%d\n" % os.getpid())
    except BrokenPipeError:
        os.write(started, b"a")
        os._exit(127)
    except OSError:
        pass
    while True:
        try:
            go = os.read(gate, 1)
            break
        except InterruptedError:
            continue
    if go != b"g":
        os.write(started, b"c" if go else b"a")
        os._exit(127)
    os.close(report)
    os.close(gate)
    os.environb.clear()
    for pair in env:
        name, _, value = pair.partition(b"=")
        os.environb[name] = value
    script = os.fsdecode(script)
    pythonpath = os.environ.get("PYTHONPATH")
    path = [os.path.abspath(p) for p in pythonpath.split(os.pathsep)] if pythonpath else []
    sys.path[0:1] = [os.path.dirname(script)] + path
    sys.argv = [script]
    sys.orig_argv = sys.orig_argv[:-2] + [script]  # as started: its flags, its file
    main = type(sys)("__main__")
    main.__file__ = script
    main.__cached__ = None
    main.__loader__ = sys.modules["_frozen_importlib_external"].SourceFileLoader("__main__", script)
    main.__annotations__ = {}
    main.__builtins__ = sys.modules["builtins"]  # the module, as in a started __main__
    sys.modules["__main__"] = main
    os.write(started, b"r%d" % os.getpid())
    os.close(started)
    try:
        with open(script, "rb") as f:
            source = f.read()
        exec(compile(source, script, "exec", dont_inherit=True), main.__dict__)
        code = 0
    except SystemExit as e:
        code = exit_code(e.code)
    except BaseException as e:
        # The traceback from the job's own frames, as the cold interpreter prints it.
        tb = e.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != script:
            tb = tb.tb_next
        e.__traceback__ = tb
        sys.excepthook(type(e), e, tb)
        if isinstance(e, KeyboardInterrupt):
            import _signal
            sys.stdout.flush()
            _signal.signal(_signal.SIGINT, _signal.SIG_DFL)
            os.kill(os.getpid(), _signal.SIGINT)
        code = 1
        del e, tb
    end(code, main)


def exit_code(code):
    """The exit status of `sys.exit(code)`, as the interpreter takes it."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code if -(1 << 31) <= code < (1 << 31) else -1
    try:
        sys.stderr.write(str(code) + "\n")
    except Exception:
        pass
    return 1


def end(code, main):
    """Ends the job as the interpreter's exit does, in its order: threads
    joined, `atexit`, the standard streams flushed, then the modules the job
    imported and `__main__` cleared (their objects' `__del__` and `close`
    run: a file written and never closed is flushed) and the garbage
    collected. Only the modules the warm interpreter had before the job are
    not torn down (the bulk of the exit's cost in a fork: their pages would
    be copied only to be freed)."""
    threading = sys.modules.get("threading")
    if threading is not None:
        try:
            threading._shutdown()
        except BaseException:
            pass
    import atexit
    atexit._run_exitfuncs()
    if not flushed():
        code = 120
    for name in reversed(list(sys.modules)):
        if name not in PRELOADED:
            clear(sys.modules.get(name))
    clear(main)
    gc.collect()
    if not flushed():
        code = 120
    os._exit(code)


def flushed():
    ok = True
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except Exception:
            ok = False
    return ok


def clear(module):
    """As the interpreter clears a module at its exit: names with one
    leading underscore first, then the rest, each set to None."""
    d = getattr(module, "__dict__", None)
    if not isinstance(d, dict):
        return
    for first in (True, False):
        for name in list(d):
            if name != "__builtins__" and (name.startswith("_") and not name.startswith("__")) == first:
                try:
                    d[name] = None
                except Exception:
                    pass


PRELOADED = set(sys.modules) | {"__main__"}
serve()
