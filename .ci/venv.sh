# Sourced by the CI scripts: a venv of pinned Python tools outside the tree.
#
#   pinned_venv NAME REQUIREMENTS [PYTHON]   sets $venv (and $py_version)
#
# One venv per requirements file and Python version, under ${XDG_CACHE_HOME:-~/.cache},
# made whole or not at all: `.complete` is written last, so an install that broke off is
# made again on the next run.
pinned_venv() {
  local name="$1" requirements="$2" python="${3:-python3}" key
  py_version="$("$python" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')"
  key="$( { cat "$requirements"; echo "$py_version"; } | sha256sum | cut -c1-12)"
  venv="${XDG_CACHE_HOME:-$HOME/.cache}/balance-service-ci/$name-$key"
  if [ -f "$venv/.complete" ]; then
    return 0
  fi
  echo "== installing the pinned $name into $venv (Python $py_version)"
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
  touch "$venv/.complete"
}
