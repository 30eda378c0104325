#!/usr/bin/env bash
# Set everything up, then run the main job: the simulated vLLM-FCFS capacity curve on the shared
# SWE-bench agent traces (H100, Qwen3-Coder-30B-A3B, 200 sessions, closed loop 8..128).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
TRACES=${TRACES:-../shared/traces/traces.jsonl}
mkdir -p out
exec .venv/bin/mars capacity --traces "$TRACES" --sessions "${SESSIONS:-200}" \
  --json out/capacity_fcfs.json "$@"
