#!/usr/bin/env bash
# Idempotent set-up of the OpenHands software-agent SDK (openhands-sdk and openhands-tools
# 1.58.2) in a CPython 3.12 venv of its own ($MARS_OPENHANDS_VENV, default ./.venv-openhands):
# the SDK needs Python 3.12 and pins its own litellm, mars's .venv is 3.11. Every package is
# pinned by scripts/openhands-constraints.txt (~190 packages, no torch, ~600 MB). Used by
# examples/openhands_hello.py and docs/agents.md; nothing in mars imports it.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=1.58.2
VENV=${MARS_OPENHANDS_VENV:-.venv-openhands}
stamp="$VENV/.mars-openhands"
pip_() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }

# The stamp holds a hash of what the set-up depends on: a fresh clone (new mtimes) still skips.
want=$(cat scripts/setup_openhands.sh scripts/openhands-constraints.txt | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  PY=${PYTHON:-}
  if [ -z "$PY" ]; then
    for c in python3.12 "$(pyenv root 2>/dev/null)/versions/3.12"*/bin/python3.12; do
      if "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
        PY=$c
        break
      fi
    done
  fi
  [ -n "$PY" ] || { echo "setup_openhands: needs Python 3.12 (set PYTHON=/path/to/python3.12)" >&2; exit 1; }
  echo "setup_openhands: creating $VENV with $("$PY" --version)" >&2
  "$PY" -m venv "$VENV"
fi
echo "setup_openhands: installing openhands-sdk and openhands-tools $VERSION (once, ~3 min)" >&2
pip_ install --quiet -c scripts/openhands-constraints.txt \
  "openhands-sdk==$VERSION" "openhands-tools==$VERSION"
echo "$want" > "$stamp"
