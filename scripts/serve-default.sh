#!/usr/bin/env bash
# Set up what serving needs (scripts/setup.sh serve: no test or benchmark tools) and serve the
# embedded default model (SmolLM2-135M-Instruct) on port 8080 with the default strategy (paged). The first start converts the model once (~30 s).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh serve
# shellcheck disable=SC1091
. .venv/bin/activate
export HF_HUB_OFFLINE=1
model_dir=.cache/default-model-dir  # holds no model: serve falls back to the embedded one
mkdir -p "$model_dir"
exec serve --model-dir "$model_dir" "$@"
