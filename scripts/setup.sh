#!/usr/bin/env bash
# Idempotent set-up: ./.venv with mars and its pinned dependencies (dev tools with --dev).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
extra=""
[ "${1:-}" = "--dev" ] && extra="[dev]"
stamp=".venv/.mars-setup${extra}"
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $("$PY" --version)" >&2
  "$PY" -m venv .venv
fi
# Reinstall only when the project definition changed since the last set-up.
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
  echo "setup: installing mars${extra} into .venv" >&2
  # constraints.txt pins every transitive dependency, so a fresh machine gets the same set.
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt \
    -e ".${extra}"
  touch "$stamp"
fi
