#!/usr/bin/env bash
# The OpenAPI document against the OpenAPI specification: openapi-spec-validator (pinned,
# with everything it pulls in, in openapi-requirements.txt) from a venv outside the tree,
# under ${XDG_CACHE_HOME:-~/.cache}, one per requirements file and Python version.
#
# Usage: .ci/openapi.sh SOURCE
#   SOURCE is the document's URL (http://127.0.0.1:8080/api-docs/openapi.json), a file
#   holding it, or the service binary (its `openapi` subcommand prints the document).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source="${1:?usage: .ci/openapi.sh URL|FILE|BINARY}"

requirements="$here/openapi-requirements.txt"
python="${OPENAPI_PYTHON:-python3}"
py_version="$("$python" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')"
key="$( { cat "$requirements"; echo "$py_version"; } | sha256sum | cut -c1-12)"
venv="${XDG_CACHE_HOME:-$HOME/.cache}/balance-service-ci/openapi-$key"
if [ ! -f "$venv/.complete" ]; then
  echo "== installing the pinned openapi-spec-validator into $venv (Python $py_version)"
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  if ! "$python" -m venv "$venv" 2>/dev/null; then
    # Debian's python3 ships venv separately.
    rm -rf "$venv"
    apt-get install -y -qq python3-venv >/dev/null
    "$python" -m venv "$venv"
  fi
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
    -r "$requirements"
  "$venv/bin/python" -m pip check --disable-pip-version-check
  # Written last: a venv without it (an install that broke off) is made again.
  touch "$venv/.complete"
fi

document="$(mktemp --suffix=.json)"
trap 'rm -f "$document"' EXIT
case "$source" in
  http://* | https://*)
    "$venv/bin/python" - "$source" "$document" <<'PY'
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=30) as answer, open(sys.argv[2], "wb") as out:
    out.write(answer.read())
PY
    ;;
  *)
    if [ -f "$source" ] && [ -x "$source" ]; then
      "$source" openapi >"$document"
    elif [ -f "$source" ]; then
      cp "$source" "$document"
    else
      echo "openapi: $source is neither a URL nor a file" >&2
      exit 2
    fi
    ;;
esac

echo "== openapi-spec-validator $("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("openapi-spec-validator"))') on $source"
"$venv/bin/python" -m openapi_spec_validator --validation-errors all "$document"
