#!/usr/bin/env bash
# Fuzzes a running execd from its own OpenAPI document with schemathesis
# (PyPI): no 5xx, and every response fits the document (status, content
# type, headers, body schema). Run it through tests/with-agent.sh.
#
# Left out: positive_data_acceptance — a schema cannot say that a working
# directory must exist or a language be installed, so some schema-valid
# requests are rightly refused with a 4xx.
set -euo pipefail
: "${EXECD_URL:?}" "${EXECD_TOKEN:?}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${SCHEMATHESIS_VENV:-$here/../../target/schemathesis-venv}"
if [[ ! -x "$venv/bin/schemathesis" ]]; then
  /usr/bin/python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==4.32.5"
fi
exec "$venv/bin/schemathesis" run "$EXECD_URL/openapi.json" \
  -H "Authorization: Bearer $EXECD_TOKEN" \
  --checks all --exclude-checks positive_data_acceptance \
  --phases examples,coverage,fuzzing \
  --max-examples "${SCHEMATHESIS_EXAMPLES:-25}" \
  --generation-deterministic \
  --request-timeout 30
