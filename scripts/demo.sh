#!/usr/bin/env bash
# Set everything up, then run the main job: `mars serve`, an OpenAI-compatible server on the
# embedded llama.cpp engine with the default model (SmolLM2-135M-Instruct), on 127.0.0.1:8000,
# scheduled by the `mars` policy. Extra arguments go to `mars serve` (e.g. --port 9000
# --policy fcfs --kv-tokens 16384; a later --policy wins).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/mars serve --policy mars "$@"
