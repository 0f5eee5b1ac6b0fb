#!/usr/bin/env bash
# The README's test command: `cargo test --workspace` (extra arguments are passed on), then
# a closing summary that counts the tests that skipped for want of a server apart from the
# ones that passed. libtest counts a skipped test as passed; every skip also appends a line
# to a tally file (testkit's TESTKIT_SKIP_LOG), which this script points into the target
# directory and sums.
#
#   scripts/test.sh [CARGO TEST ARGS...]     e.g. scripts/test.sh --locked
#
# The last line is `tests: N passed, N failed, N skipped` (passed excludes the skipped);
# the exit status is cargo's.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Wherever cargo builds (CARGO_TARGET_DIR, a config file, or ./target).
target_dir="$(cargo metadata --format-version 1 --no-deps 2>/dev/null |
  sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
target_dir="${target_dir:-target}"
mkdir -p "$target_dir"
tally="$target_dir/testkit-skips.log"
: >"$tally"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT

# libtest's result lines are on stdout; cargo's progress and the SKIPPED lines on stderr,
# left as they are.
TESTKIT_SKIP_LOG="$tally" cargo test --workspace "$@" | tee "$log"
rc=${PIPESTATUS[0]}

read -r passed failed ignored < <(awk '
  /^test result:/ {
    for (i = 1; i < NF; i++) {
      if ($(i + 1) ~ /^passed/) p += $i
      if ($(i + 1) ~ /^failed/) f += $i
      if ($(i + 1) ~ /^ignored/) g += $i
    }
  }
  END { printf "%d %d %d\n", p, f, g }' "$log")
skipped="$(grep -c '^SKIPPED ' "$tally" || true)"

echo
if [ "$skipped" -gt 0 ]; then
  # Why, by reason: the text after "]: " up to its first " (".
  reasons="$(sed -n 's/^SKIPPED .*\]: //p' "$tally" | sed 's/ (.*//' | sort | uniq -c |
    sort -rn | awk '{ n = $1; $1 = ""; sub(/^ /, ""); printf "%s%d %s", (NR > 1 ? ", " : ""), n, $0 }')"
  echo "skipped: $reasons"
  echo "  set TEST_DATABASE_URL=mysql://root@127.0.0.1:3306/test and TEST_REDIS_URL=redis://127.0.0.1:6379,"
  echo "  or start Docker, and have redis-server on the PATH (README, \"Test it\"); each test's SKIPPED line is above"
fi
if [ "$ignored" -gt 0 ]; then
  echo "ignored: $ignored opt-in tests (#[ignore]: they need a Galera cluster, see docs/scaling.md; just galera up, just test-galera), counted as skipped"
fi
echo "tests: $((passed - skipped)) passed, $failed failed, $((skipped + ignored)) skipped"
exit "$rc"
