#!/usr/bin/env bash
# Bad input: schemathesis against the service's own OpenAPI document, a bounded number of
# cases. No 5xx, no response outside the schema, no undocumented status, content type or
# header; invalid input must be refused.
#
# `positive_data_acceptance` is excluded on purpose: some schema-valid requests are refused
# by rules a schema cannot express (an Idempotency-Key header that differs from the body's
# key; a key already used for another request: 422 IDEMPOTENCY_KEY_REUSED).
#
# Deterministic on purpose, so a run fails only for a finding and every run finds the same:
# - schemathesis and every package it pulls in are pinned (schemathesis-requirements.txt)
#   and installed into a venv outside the tree, under ${XDG_CACHE_HOME:-~/.cache}, one per
#   requirements file and Python version;
# - a fixed seed, a bounded number of examples, and no example database: Hypothesis would
#   otherwise replay an earlier run's findings (it kept them under .hypothesis/ in the tree);
#   st runs in a scratch directory, so nothing it writes lands in the checkout;
# - one worker: with two, Hypothesis describes filter lambdas by `ast.parse`-ing their
#   source from both threads at once, which CPython 3.11 (Debian 12's and pyenv's 3.11.7
#   alike) does not survive: "SystemError: AST constructor recursion depth mismatch"
#   (3 runs out of 5 here; CPython issue 106905, the AST builder's recursion count is
#   shared by threads). One worker also keeps the order of requests, and so the
#   stateful phase's server state, the same from run to run.
#
# Usage: .ci/schemathesis.sh PATH_TO_BINARY [MAX_EXAMPLES]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bin="$1"
examples="${2:-50}"
port="${SCHEMATHESIS_PORT:-18655}"
seed=20261123

if [ ! -x "$bin" ]; then
  echo "schemathesis: no service binary at $bin" >&2
  exit 1
fi

# shellcheck source=venv.sh
. "$here/venv.sh"
pinned_venv schemathesis "$here/schemathesis-requirements.txt" "${SCHEMATHESIS_PYTHON:-python3}"
st=("$venv/bin/python" -m schemathesis.cli)
echo "== $("${st[@]}" --version 2>&1 | head -1) on Python $py_version"

scratch="$(mktemp -d)"
log="$scratch/service.log"
SEED_USERS=20 "$bin" --bind-addr "127.0.0.1:$port" --log-level warn >"$log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$scratch"' EXIT

# shellcheck source=service.sh
. "$here/service.sh"
wait_for_service "$pid" "$port" "$log" 30

rc=0
(
  cd "$scratch"
  HYPOTHESIS_STORAGE_DIRECTORY="$scratch/hypothesis" "${st[@]}" run \
    "http://127.0.0.1:$port/api-docs/openapi.json" \
    --checks all --exclude-checks positive_data_acceptance \
    --max-examples "$examples" --workers 1 --seed "$seed" \
    --generation-database none --no-color
) || rc=$?
# A 5xx or a dropped connection may be a crash: say so, with its log.
service_alive "$pid" "$log"
if [ "$rc" -ne 0 ]; then
  echo "schemathesis: failed (exit $rc); reproduce with: .ci/schemathesis.sh $bin $examples" >&2
  echo "the service's log:" >&2
  tail -n 50 "$log" >&2
fi
exit "$rc"
