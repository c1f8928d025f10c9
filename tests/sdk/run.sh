#!/usr/bin/env bash
# Drive a running execd through the official hopx-ai Python SDK.
#
#   EXECD_URL=http://127.0.0.1:7777 EXECD_TOKEN=... tests/sdk/run.sh
#
# Env: EXECD_URL, EXECD_TOKEN (required); SDK_VENV (default <repo>/target/sdk-venv);
#      SDK_PYTHON (interpreter used to create the venv; default /usr/bin/python3 if present);
#      EXECD_EXPECT_CALLBACK=1 / EXECD_EXPECT_STREAM=1 enable the optional checks.
# Does not start the agent.
set -euo pipefail

HOPX_VERSION="0.5.0"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${SDK_VENV:-$repo/target/sdk-venv}"

: "${EXECD_URL:?EXECD_URL must be set (e.g. http://127.0.0.1:7777)}"
: "${EXECD_TOKEN:?EXECD_TOKEN must be set}"

if [[ -z "${SDK_PYTHON:-}" ]]; then
  if [[ -x /usr/bin/python3 ]]; then SDK_PYTHON=/usr/bin/python3; else SDK_PYTHON=python3; fi
fi

if [[ ! -x "$venv/bin/python" ]]; then
  mkdir -p "$(dirname "$venv")"
  "$SDK_PYTHON" -m venv "$venv"
fi

installed="$("$venv/bin/python" -c 'from importlib.metadata import version; print(version("hopx-ai"))' 2>/dev/null || true)"
if [[ "$installed" != "$HOPX_VERSION" ]]; then
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "hopx-ai==$HOPX_VERSION"
fi

export EXECD_URL EXECD_TOKEN
exec "$venv/bin/python" "$here/hopx_sdk_check.py"
