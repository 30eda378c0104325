#!/usr/bin/env bash
# The vLLM stage: set up vLLM's CPU build in its own venv (scripts/setup_vllm.sh), convert the
# default model once to a checkpoint vLLM loads, then run tests/vllm with that venv's python:
# MarsScheduler's decisions against vLLM's real scheduler, and a served end-to-end run.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MARS_VLLM_VENV:-$HOME/.cache/mars/vllm-venv}
export MARS_VLLM_MODEL=${MARS_VLLM_MODEL:-$HOME/.cache/mars/smollm2-135m-hf}
export HF_HUB_OFFLINE=1
./scripts/setup_vllm.sh
"$VENV/bin/python" scripts/convert_smollm2.py "$MARS_VLLM_MODEL"
"$VENV/bin/python" -m pytest tests/vllm -p no:cacheprovider "$@"
# Optional, MARS_VLLM_BENCH=1 (~2 min 40 s on 2 cores): trace sessions replayed through the gateway
# on vLLM with the plug-in, fcfs against mars (scripts/bench_vllm_gateway.py, the main venv).
if [ "${MARS_VLLM_BENCH:-0}" = 1 ]; then
  .venv/bin/python scripts/bench_vllm_gateway.py --vllm-venv "$VENV" --model "$MARS_VLLM_MODEL" \
    --out out/vllm_gateway.json
fi
