#!/usr/bin/env bash
# Starts the execd binary on a free loopback port with a fresh data dir (the
# default ./execd-data, as a newcomer would), runs COMMAND with EXECD_URL and
# EXECD_TOKEN set, stops the agent with SIGTERM, and fails if the command
# failed, the agent did not stop cleanly, or any program of a job is left.
#
#   EXECD_BIN=target/debug/execd tests/with-agent.sh COMMAND [ARGS…]
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
bin="$(realpath "${EXECD_BIN:-$repo/target/debug/execd}")"
(($#)) || { echo "usage: tests/with-agent.sh COMMAND [ARGS…]" >&2; exit 2; }
[[ -x "$bin" ]] || { echo "no execd binary at $bin (run cargo build first)" >&2; exit 2; }

data="$(mktemp -d)"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
token="sdk-check-$(date +%s%N)"
log="$data/agent.log"

# The default data dir (./execd-data, relative), as a newcomer would start it.
(cd "$data" && exec env EXECD_TOKEN="$token" "$bin" serve --listen "127.0.0.1:$port") >"$log" 2>&1 &
agent=$!
cleanup() {
  kill -TERM "$agent" 2>/dev/null || true
  wait "$agent" 2>/dev/null || true
  rm -rf "$data"
}
trap cleanup EXIT

for _ in $(seq 1 100); do
  curl -fsS "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
  kill -0 "$agent" 2>/dev/null || { cat "$log" >&2; exit 1; }
  sleep 0.1
done

status=0
EXECD_URL="http://127.0.0.1:$port" EXECD_TOKEN="$token" "$@" || status=$?

kill -TERM "$agent"
wait "$agent" || { echo "the agent did not stop cleanly:" >&2; tail -20 "$log" >&2; status=1; }
# Every job's program runs in its own session under the data dir's runs/ or
# workspace/; none may outlive the agent.
if pgrep -f "$data" >/dev/null; then
  echo "programs left running after the agent stopped:" >&2
  pgrep -af "$data" >&2
  status=1
fi
exit "$status"
