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

# shellcheck source=venv.sh
. "$here/venv.sh"
pinned_venv openapi "$here/openapi-requirements.txt" "${OPENAPI_PYTHON:-python3}"

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
