#!/usr/bin/env bash
# Set everything up (dev tools included), then run every check: lint, format, types, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh --dev
echo "== ruff" && .venv/bin/ruff check src tests scripts examples
echo "== ruff format" && .venv/bin/ruff format --check src tests scripts examples
echo "== mypy" && .venv/bin/mypy
if [ "$#" -gt 0 ]; then exec .venv/bin/python -m pytest "$@"; fi
echo "== pytest" && .venv/bin/python -m pytest
# The Ray app's own stage (a Ray head and two engines, about a minute): tests/rayapp.
echo "== pytest (Ray app)" && start=$(date +%s)
MARS_RAY=1 .venv/bin/python -m pytest -q tests/rayapp
echo "== Ray app stage: $(($(date +%s) - start)) s"
