#!/usr/bin/env bash
# Set everything up (dev tools included), then run every check: lint, format, types, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh --dev
echo "== ruff" && .venv/bin/ruff check src tests scripts examples
echo "== ruff format" && .venv/bin/ruff format --check src tests scripts examples
echo "== mypy" && .venv/bin/mypy
echo "== pytest" && exec .venv/bin/python -m pytest "$@"
