#!/usr/bin/env python3
"""Drive a running execd agent through the official `hopx-ai` Python SDK.

Environment:
  EXECD_URL              agent base URL, e.g. http://127.0.0.1:7777 (required)
  EXECD_TOKEN            bearer token the agent accepts (required)
  EXECD_EXPECT_CALLBACK  "1" to also wait for and check the async callback POST
  EXECD_EXPECT_STREAM    "1" to also check WebSocket /execute/stream (run_code_stream)

No call ever goes to the HopX cloud API: the Sandbox is built offline and its
cloud client is replaced by a stub that fails loudly if touched. Every wait is
a polling loop with a deadline. Prints one line per check and ends with
"N passed, M failed"; exits non-zero if any check failed.
"""

import asyncio
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

URL = os.environ.get("EXECD_URL", "").rstrip("/")
TOKEN = os.environ.get("EXECD_TOKEN", "")
EXPECT_CALLBACK = os.environ.get("EXECD_EXPECT_CALLBACK") == "1"
EXPECT_STREAM = os.environ.get("EXECD_EXPECT_STREAM") == "1"

PASSED = 0
FAILED = 0


def check(name, fn):
    """Run one check; print PASS/FAIL; never raise."""
    global PASSED, FAILED
    try:
        fn()
    except AssertionError as e:
        FAILED += 1
        print(f"FAIL {name}: {e}", flush=True)
    except Exception as e:  # an unexpected exception is a failure too
        FAILED += 1
        print(f"FAIL {name}: unexpected {type(e).__name__}: {e}", flush=True)
        traceback.print_exc(limit=3, chain=False, file=sys.stdout)
    else:
        PASSED += 1
        print(f"PASS {name}", flush=True)


def finish():
    print(f"{PASSED} passed, {FAILED} failed", flush=True)
    sys.exit(1 if FAILED else 0)


def wait_for(pred, timeout, interval=0.2):
    """Poll pred() until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = pred()
        if last:
            return last
        if time.monotonic() >= deadline:
            return last
        time.sleep(interval)


class _NoCloud:
    """Stands in for Sandbox._client (the HopX cloud API client)."""

    def __getattr__(self, attr):
        raise AssertionError(f"SDK tried to use the HopX cloud API client (.{attr})")


if not URL or not TOKEN:
    print("EXECD_URL and EXECD_TOKEN must be set", file=sys.stderr)
    FAILED += 1
    finish()

# --------------------------------------------------------------------------
# Build the Sandbox offline
# --------------------------------------------------------------------------
try:
    import hopx_ai
    from hopx_ai import Sandbox
    from hopx_ai._agent_client import AgentHTTPClient
    from hopx_ai._ws_client import WebSocketClient
    from hopx_ai.errors import AgentError, CodeExecutionError, FileOperationError
except Exception as e:
    FAILED += 1
    print(f"FAIL import hopx_ai: {type(e).__name__}: {e}")
    finish()

try:
    from importlib.metadata import version as _dist_version

    _SDK_VERSION = _dist_version("hopx-ai")  # hopx_ai.__version__ is stale (0.3.8 in 0.5.0)
except Exception:
    _SDK_VERSION = getattr(hopx_ai, "__version__", "?")
print(f"hopx-ai {_SDK_VERSION} against {URL}", flush=True)

sandbox = None


def _construct():
    global sandbox
    # Sandbox.__init__ only builds an httpx client for the cloud API; no I/O.
    sb = Sandbox("local", api_key="x")
    sb._client = _NoCloud()
    # Every agent call goes through sb._agent_client; _ensure_agent_client()
    # (which would call the cloud API for the agent URL and a token, then poll
    # /health) is a no-op once this is set. Same for _ensure_ws_client().
    sb._agent_client = AgentHTTPClient(URL, jwt_token=TOKEN)
    sb._ws_client = WebSocketClient(URL, TOKEN)
    sandbox = sb


check("construct Sandbox offline with AgentHTTPClient", _construct)
if sandbox is None:
    finish()

WORKDIR = os.path.realpath(tempfile.mkdtemp(prefix="execd-sdk-"))
os.chmod(WORKDIR, 0o755)
STARTED = []  # process ids this script started, killed best-effort at the end


# --------------------------------------------------------------------------
# Health / info / auth
# --------------------------------------------------------------------------
def _health():
    assert sandbox.is_healthy() is True, "Sandbox.is_healthy() is not True (GET /health must give {\"status\": \"healthy\"})"
    anon = AgentHTTPClient(URL, max_retries=1)
    try:
        r = anon.get("/health", operation="health check", timeout=5)
        assert r.status_code == 200, f"GET /health without a token gave {r.status_code}"
        assert r.json().get("status") == "healthy", f"GET /health body: {r.text[:200]}"
    finally:
        anon.close()


def _info():
    info = sandbox.get_agent_info()
    assert isinstance(info, dict) and info, f"GET /info gave {info!r}"


def _bad_token():
    bad = AgentHTTPClient(URL, jwt_token=TOKEN + "-wrong", max_retries=1)
    try:
        try:
            bad.get("/execute/processes", operation="list processes")
        except AgentError as e:
            assert e.status_code == 401, f"expected HTTP 401, got {e.status_code} ({e})"
            assert e.code in ("AUTHENTICATION_REQUIRED", "INVALID_TOKEN"), f"unexpected code {e.code!r}"
        else:
            raise AssertionError("a wrong token was accepted")
    finally:
        bad.close()


check("health: is_healthy() and GET /health without auth", _health)
check("get_agent_info (GET /info)", _info)
check("wrong token -> AgentError 401", _bad_token)


# --------------------------------------------------------------------------
# run_code (POST /execute)
# --------------------------------------------------------------------------
def _run_hello():
    r = sandbox.run_code('print("hello")', working_dir=WORKDIR, timeout=30)
    assert r.success is True, f"success={r.success!r} stderr={r.stderr!r}"
    assert r.stdout.strip() == "hello", f"stdout={r.stdout!r}"
    assert r.exit_code == 0, f"exit_code={r.exit_code!r}"
    assert isinstance(r.execution_time, float) and r.execution_time >= 0, f"execution_time={r.execution_time!r}"


def _run_env():
    r = sandbox.run_code('import os; print(os.environ["FOO"])', env={"FOO": "bar"}, working_dir=WORKDIR, timeout=30)
    assert r.success is True, f"success={r.success!r} stderr={r.stderr!r}"
    assert r.stdout.strip() == "bar", f"stdout={r.stdout!r}"


def _run_workdir():
    r = sandbox.run_code("import os; print(os.getcwd())", working_dir=WORKDIR, timeout=30)
    assert r.success is True, f"success={r.success!r} stderr={r.stderr!r}"
    got = os.path.realpath(r.stdout.strip())
    assert got == WORKDIR, f"cwd {got!r} != working_dir {WORKDIR!r}"


def _run_exit3():
    r = sandbox.run_code("import sys; sys.exit(3)", working_dir=WORKDIR, timeout=30)
    assert r.success is False, f"success={r.success!r} for exit 3"
    assert r.exit_code == 3, f"exit_code={r.exit_code!r}, expected 3"


def _run_raise():
    r = sandbox.run_code('raise ValueError("boom")', working_dir=WORKDIR, timeout=30)
    assert r.success is False, f"success={r.success!r} for an uncaught exception"
    assert r.exit_code not in (0, None), f"exit_code={r.exit_code!r}"
    assert "ValueError" in r.stderr, f"stderr={r.stderr!r}"


def _run_bash():
    r = sandbox.run_code("echo $((1+2))", language="bash", working_dir=WORKDIR, timeout=30)
    assert r.success is True, f"success={r.success!r} stderr={r.stderr!r}"
    assert r.stdout.strip() == "3", f"stdout={r.stdout!r}"


def _run_timeout():
    t0 = time.monotonic()
    try:
        sandbox.run_code("import time; time.sleep(20)", working_dir=WORKDIR, timeout=2)
    except CodeExecutionError as e:
        assert e.status_code == 408, f"status_code={e.status_code!r}"
        assert e.code == "EXECUTION_TIMEOUT", f"code={e.code!r}"
    else:
        raise AssertionError("a run past its timeout did not raise CodeExecutionError")
    took = time.monotonic() - t0
    assert took < 15, f"timeout=2 run took {took:.1f}s"


def _run_bad_dir():
    try:
        sandbox.run_code('print("x")', working_dir=os.path.join(WORKDIR, "does-not-exist"), timeout=10)
    except FileOperationError as e:
        assert e.status_code == 400, f"status_code={e.status_code!r}"
        assert e.code == "DIRECTORY_NOT_FOUND", f"code={e.code!r}"
    else:
        raise AssertionError("a missing working_dir did not raise FileOperationError")


def _run_default_workdir():
    # The SDK always sends workdir="/workspace" unless told otherwise. Where
    # this machine has no /workspace, execd runs the code in its own default
    # working directory instead (see README), so SDK code runs unchanged.
    r = sandbox.run_code('import os; print(os.getcwd())', timeout=30)
    assert r.success is True, f"result={r!r}"
    if os.path.isdir("/workspace"):
        assert r.stdout.strip() == "/workspace", f"stdout={r.stdout!r}"
    else:
        assert r.stdout.strip() and r.stdout.strip() != "/workspace", f"stdout={r.stdout!r}"


check("run_code prints hello", _run_hello)
check("run_code env var visible", _run_env)
check("run_code working_dir respected", _run_workdir)
check("run_code exit 3 -> success False, exit_code 3, no exception", _run_exit3)
check("run_code raise -> success False, no exception", _run_raise)
check("run_code language=bash", _run_bash)
check("run_code past timeout -> CodeExecutionError 408 EXECUTION_TIMEOUT", _run_timeout)
check("run_code missing working_dir -> FileOperationError DIRECTORY_NOT_FOUND", _run_bad_dir)
check("run_code default working_dir /workspace", _run_default_workdir)


# --------------------------------------------------------------------------
# Background processes
# --------------------------------------------------------------------------
def _find(pid):
    for p in sandbox.list_processes():
        if p.get("process_id") == pid or p.get("execution_id") == pid:
            return p
    return None


BG = {}


def _background():
    r = sandbox.run_code_background('import time; time.sleep(1); print("bg done")', name="sdk-bg", timeout=60)
    assert isinstance(r, dict), f"response {r!r}"
    pid = r.get("process_id")
    assert isinstance(pid, str) and pid, f"no process_id in {r!r}"
    STARTED.append(pid)
    assert r.get("execution_id"), f"no execution_id in {r!r}"
    assert r.get("status") in ("queued", "running"), f"status={r.get('status')!r}"
    BG["pid"] = pid


def _background_listed():
    assert "pid" in BG, "no background process was started"
    p = _find(BG["pid"])
    assert p is not None, f"{BG['pid']} not in list_processes()"
    assert p.get("name") == "sdk-bg", f"name={p.get('name')!r}"


def _background_completes():
    assert "pid" in BG, "no background process was started"
    p = wait_for(lambda: (lambda q: q if q and q.get("status") not in ("queued", "running") else None)(_find(BG["pid"])), 30)
    last = _find(BG["pid"])
    assert p, f"not finished within 30 s: {last!r}"
    assert p.get("status") == "completed", f"status={p.get('status')!r} process={p!r}"
    assert p.get("exit_code") == 0, f"exit_code={p.get('exit_code')!r}"
    assert "bg done" in (p.get("stdout") or ""), f"stdout={p.get('stdout')!r}"


def _list_processes():
    ps = sandbox.list_processes()
    assert isinstance(ps, list), f"list_processes() gave {type(ps).__name__}"
    for p in ps:
        assert isinstance(p, dict) and p.get("process_id") and p.get("status"), f"bad process entry {p!r}"
    raw = sandbox._agent_client.get("/execute/processes", operation="list processes").json()
    assert raw.get("count") == len(raw.get("processes", [])), f"count={raw.get('count')!r} vs {len(raw.get('processes', []))}"


def _kill_long():
    r = sandbox.run_code_background("import time; time.sleep(30)", name="sdk-sleep", timeout=120)
    pid = r.get("process_id")
    assert pid, f"no process_id in {r!r}"
    STARTED.append(pid)
    running = wait_for(lambda: (_find(pid) or {}).get("status") == "running", 10)
    assert running, f"never reached running: {_find(pid)!r}"
    k = sandbox.kill_process(pid)
    assert isinstance(k, dict), f"kill response {k!r}"
    assert k.get("status") == "killed", f"kill response status={k.get('status')!r} ({k!r})"
    done = wait_for(lambda: (_find(pid) or {}).get("status") == "killed", 10)
    assert done, f"process not killed within 10 s: {_find(pid)!r}"


def _kill_unknown():
    try:
        sandbox.kill_process("proc_does_not_exist_0000")
    except AgentError as e:
        assert e.status_code == 404, f"status_code={e.status_code!r} ({type(e).__name__}: {e})"
        assert e.code == "PROCESS_NOT_FOUND", f"code={e.code!r}"
    else:
        raise AssertionError("killing an unknown id did not raise")


check("run_code_background returns a process id", _background)
check("list_processes shows the background process", _background_listed)
check("background process completes", _background_completes)
check("list_processes entries and count", _list_processes)
check("kill_process on sleep 30 -> killed", _kill_long)
check("kill_process unknown id -> AgentError 404 PROCESS_NOT_FOUND", _kill_unknown)


# --------------------------------------------------------------------------
# run_code_async (POST /execute/async) + callback receiver
# --------------------------------------------------------------------------
CALLBACKS = []
CB_LOCK = threading.Lock()


class _Receiver(BaseHTTPRequestHandler):
    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        with CB_LOCK:
            CALLBACKS.append({"path": self.path, "headers": dict(self.headers), "body": raw})
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


receiver = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
threading.Thread(target=receiver.serve_forever, daemon=True).start()
CALLBACK_URL = f"http://127.0.0.1:{receiver.server_address[1]}/hook"
ASYNC = {}


def _async_submit():
    r = sandbox.run_code_async('print("async done")', CALLBACK_URL, working_dir=WORKDIR, timeout=60)
    assert isinstance(r, dict), f"response {r!r}"
    assert isinstance(r.get("execution_id"), str) and r["execution_id"], f"no execution_id in {r!r}"
    assert r.get("status") == "queued", f"status={r.get('status')!r}"
    ASYNC["id"] = r["execution_id"]
    if r.get("process_id"):
        STARTED.append(r["process_id"])


def _async_callback():
    assert "id" in ASYNC, "no async execution was submitted"

    def got():
        with CB_LOCK:
            for c in CALLBACKS:
                try:
                    body = json.loads(c["body"])
                except ValueError:
                    continue
                if body.get("execution_id") == ASYNC["id"]:
                    return body
        return None

    body = wait_for(got, 20)
    assert body, f"no callback for {ASYNC['id']} within 20 s ({len(CALLBACKS)} other POSTs)"
    assert body.get("status") == "completed", f"callback status={body.get('status')!r} body={body!r}"
    assert "async done" in (body.get("stdout") or ""), f"callback stdout={body.get('stdout')!r}"


check("run_code_async returns execution_id, status queued", _async_submit)
if EXPECT_CALLBACK:
    check("run_code_async callback delivered with status completed", _async_callback)


# --------------------------------------------------------------------------
# commands (POST /commands/run, /commands/background)
# --------------------------------------------------------------------------
def _cmd_run():
    r = sandbox.commands.run("echo hi", working_dir=WORKDIR, timeout=30)
    assert "hi" in (r.stdout or ""), f"stdout={r.stdout!r} stderr={r.stderr!r}"
    assert r.exit_code == 0, f"exit_code={r.exit_code!r}"


def _cmd_run_fail():
    r = sandbox.commands.run("echo oops >&2; exit 4", working_dir=WORKDIR, timeout=30)
    assert r.exit_code == 4, f"exit_code={r.exit_code!r}"
    assert "oops" in (r.stderr or ""), f"stderr={r.stderr!r}"


def _cmd_background():
    r = sandbox.commands.run("sleep 1", background=True, working_dir=WORKDIR, timeout=30)
    # The SDK only reports "Background process started: <process_id>".
    assert r.stdout.startswith("Background process started: "), f"stdout={r.stdout!r}"
    pid = r.stdout.split(": ", 1)[1]
    assert pid and pid != "unknown", f"no process_id in /commands/background response ({r.stdout!r})"
    STARTED.append(pid)


check('commands.run("echo hi")', _cmd_run)
check("commands.run non-zero exit is a result, not an exception", _cmd_run_fail)
check("commands.run(background=True) returns a process id", _cmd_background)


# --------------------------------------------------------------------------
# run_code_stream (WebSocket /execute/stream), optional
# --------------------------------------------------------------------------
def _stream():
    async def go():
        frames = []

        async def collect():
            async for m in sandbox.run_code_stream(
                'import sys; print("s1"); print("e1", file=sys.stderr); sys.exit(2)',
                working_dir=WORKDIR, timeout=30,
            ):
                frames.append(m)

        await asyncio.wait_for(collect(), 30)
        return frames

    frames = asyncio.run(go())
    types = [f.get("type") for f in frames]
    out = "".join(f.get("data", "") for f in frames if f.get("type") == "stdout")
    err = "".join(f.get("data", "") for f in frames if f.get("type") == "stderr")
    assert "s1" in out, f"stdout frames {out!r} (types {types})"
    assert "e1" in err, f"stderr frames {err!r} (types {types})"
    assert types and types[-1] == "complete", f"last frame is not complete: {types}"
    results = [f for f in frames if f.get("type") == "result"]
    assert results and results[-1].get("exit_code") == 2, f"result frames {results!r}"


if EXPECT_STREAM:
    check("run_code_stream over WebSocket /execute/stream", _stream)


# --------------------------------------------------------------------------
# cleanup (best effort, not counted)
# --------------------------------------------------------------------------
for pid in STARTED:
    try:
        p = _find(pid)
        if p and p.get("status") in ("queued", "running"):
            sandbox.kill_process(pid)
    except Exception:
        pass
receiver.shutdown()
shutil.rmtree(WORKDIR, ignore_errors=True)
finish()
