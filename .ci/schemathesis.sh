#!/usr/bin/env bash
# Bad input: schemathesis against the service's own OpenAPI document, a bounded number of
# cases. No 5xx, no response outside the schema, no undocumented status, content type or
# header; invalid input must be refused.
#
# `positive_data_acceptance` is excluded on purpose: some schema-valid requests are refused
# by rules a schema cannot express (an Idempotency-Key header that differs from the body's
# key; a key already used for another request: 422 IDEMPOTENCY_KEY_REUSED).
#
# Usage: .ci/schemathesis.sh PATH_TO_BINARY [MAX_EXAMPLES]
set -euo pipefail
bin="$1"
examples="${2:-50}"
port="${SCHEMATHESIS_PORT:-18655}"

command -v st >/dev/null 2>&1 || pip install --quiet --disable-pip-version-check 'schemathesis==4.32.5'

SEED_USERS=20 "$bin" --bind-addr "127.0.0.1:$port" --log-level warn >/tmp/schemathesis-service.log 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.1
done

st run "http://127.0.0.1:$port/api-docs/openapi.json" \
  --checks all --exclude-checks positive_data_acceptance \
  --max-examples "$examples" --workers 2 --no-color --seed 20261123
