"""The compatibility matrix: every architecture the server accepts serves exactly the greedy
tokens of ``model.generate``, and the ones it cannot serve exactly are refused at load.

Tiny random models built from stock transformers configs (tests/tiny_models.py, no download),
with sliding windows of 8 tokens under prompts of 20 to 90 tokens and a step budget of 16
tokens, so prefill chunks start inside a window and attend across its boundary into the cache.
Gemma 2's softcap is small enough to bend these random scores; gpt-oss brings attention sinks.
A mutation check when this was written: dropping the window, the softcap or the sinks in
``kernels.attention.layer_params`` makes the load-time check refuse these models.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from batching.model_check import SERVED_EXACTLY, UnsupportedModelError
from batching.runner import ModelRunner
from tests.batching.engine_helpers import make_engine
from tests.batching.test_correctness import assert_matches_generate, random_prompts, run_staggered
from tests.tiny_models import TEST_WINDOW, build_model

REPO_ROOT = Path(__file__).resolve().parents[2]

# architecture -> (README name, what its tiny model exercises)
MATRIX = {
    "llama": ("Llama", "grouped-query attention"),
    "mistral": ("Mistral", f"sliding window ({TEST_WINDOW}) on every layer"),
    "qwen2": ("Qwen2", "grouped-query attention, bias in q/k/v"),
    "qwen2-sliding": ("Qwen2 (use_sliding_window)", "full layers below max_window_layers, windows above"),
    "qwen3": ("Qwen3", "q/k norms"),
    "gemma2": ("Gemma 2", "alternating window/full layers, attention logit softcapping, query_pre_attn_scalar"),
    "gemma3": ("Gemma 3", "alternating window/full layers with their own RoPE, query_pre_attn_scalar"),
    "phi3": ("Phi-3", "fused qkv, sliding window"),
    "gpt2": ("GPT-2", "learned positions, multi-head attention"),
    "mixtral": ("Mixtral", "mixture of experts"),
    "gpt_oss": ("gpt-oss", "attention sinks, alternating window/full layers, mixture of experts"),
}
REFUSED = {
    "bloom": ("BLOOM", "ALiBi bias computed in its own attention code"),
    "falcon": ("Falcon", "attention dispatched by the model itself"),
}
STRATEGIES = ["dynamic", "rolling", "paged"]
# Served by the engine's own forward (batching.lean_forward); the others by transformers' forward.
LEAN = {"llama", "mistral", "qwen2", "qwen2-sliding", "qwen3", "phi3"}


@pytest.fixture(scope="module", params=list(MATRIX))
def matrix_model(request, tmp_path_factory) -> Path:
    return build_model(tmp_path_factory.mktemp(request.param), request.param)


def _long_prompts(tokenizer, count: int, seed: int) -> list[list[int]]:
    prompts = random_prompts(tokenizer, count, seed, min_words=10, max_words=30)
    assert min(len(p) for p in prompts) > 2 * TEST_WINDOW, "prompts must be longer than the window"
    return prompts


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_architecture_matches_generate(matrix_model, strategy):
    engine = make_engine(matrix_model, strategy, batch_size=3, max_batch_delay_ms=0, max_rolling_batch_size=4,
                         max_rolling_batch_prefill_tokens=16, max_model_len=192, max_kv_cache_tokens=192 * 4,
                         block_size=4)
    prompts = _long_prompts(engine.tokenizer, 6, seed=11)
    max_new = [5, 30, 12, 20, 3, 25]
    outputs = run_staggered(engine, prompts, max_new, arrivals=[0, 0, 1, 4, 9, 15])
    assert_matches_generate(matrix_model, prompts, max_new, outputs)
    assert engine.stats()["max_batch_size"] > 1


def test_forward_that_serves_each_architecture(matrix_model, request):
    # The matrix above then proves the lean forward exact on every architecture it serves.
    architecture = request.node.callspec.params["matrix_model"]
    runner = ModelRunner(str(matrix_model), dtype="fp32", device="cpu")
    assert (runner.lean is not None) == (architecture in LEAN)


def test_architecture_under_preemption_and_prefix_cache(matrix_model):
    # 28 blocks of 4 tokens for sequences that grow to ~60-110 tokens: some must be preempted;
    # they share a 24-token system prompt, so later ones hit the prefix cache.
    engine = make_engine(matrix_model, "paged", max_rolling_batch_size=4, max_rolling_batch_prefill_tokens=32,
                         max_model_len=112, max_kv_cache_tokens=112, block_size=4, enable_prefix_caching=True)
    system = engine.tokenizer.encode("You are a helpful assistant about paged attention. " * 2)[:24]
    questions = random_prompts(engine.tokenizer, 5, seed=12, min_words=3, max_words=8)
    prompts = [system + q for q in questions]
    max_new = [30, 25, 35, 20, 30]
    outputs = run_staggered(engine, prompts, max_new, arrivals=[0, 0, 1, 6, 12])
    assert_matches_generate(matrix_model, prompts, max_new, outputs)
    assert engine.batcher.num_preemptions > 0
    assert engine.stats()["blocks"]["prefix_hits"] > 0


@pytest.mark.parametrize("architecture", list(REFUSED))
def test_unservable_architecture_is_refused_at_load(architecture, tmp_path):
    folder = build_model(tmp_path / architecture, architecture)
    with pytest.raises(UnsupportedModelError) as refused:
        ModelRunner(str(folder), dtype="fp32", device="cpu")
    message = str(refused.value)
    assert f"model type {architecture!r}" in message
    assert "attention interface" in message  # what is unsupported
    assert SERVED_EXACTLY in message  # what is served instead


def test_readme_supported_models_table_is_the_matrix():
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## Supported models", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1:-1] for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    table = {cells[0].strip(): cells[1].strip() for cells in rows[1:]}
    expected = {name: "served exactly" for name, _ in MATRIX.values()}
    expected.update({name: f"refused at start: {why}" for name, why in REFUSED.values()})
    assert table == expected


# ---- position-dependent rotary embeddings ------------------------------------------------------

LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 64,
            "short_factor": [1.0] * 8, "long_factor": [4.0] * 8}


@pytest.fixture(scope="module")
def longrope_phi3(tmp_path_factory) -> Path:
    return build_model(tmp_path_factory.mktemp("phi3-longrope"), "phi3", rope_parameters=LONGROPE,
                       original_max_position_embeddings=64)


def test_longrope_beyond_its_fixed_range_is_refused(longrope_phi3):
    from djl_like.errors import ConfigError

    with pytest.raises(ConfigError, match=r"option.max_model_len=128: beyond 64 tokens .* LongRoPE"):
        make_engine(longrope_phi3, "paged", max_model_len=128, max_kv_cache_tokens=512, block_size=4)


def test_longrope_is_served_exactly_within_its_fixed_range(longrope_phi3, caplog):
    engine = make_engine(longrope_phi3, "paged", max_rolling_batch_size=4, max_rolling_batch_prefill_tokens=16,
                         max_kv_cache_tokens=512, block_size=4)  # max_model_len unset: capped at 64
    assert engine.batcher.config.max_model_len == 64
    assert "serving at most 64 tokens per sequence" in caplog.text
    prompts = random_prompts(engine.tokenizer, 4, seed=13, min_words=8, max_words=14)
    max_new = [64 - len(p) for p in prompts]
    outputs = run_staggered(engine, prompts, max_new, arrivals=[0, 0, 2, 5])
    assert_matches_generate(longrope_phi3, prompts, max_new, outputs)


# ---- the CUDA path (Triton decode) with windows, softcapping and sinks --------------------------


@pytest.mark.parametrize("architecture", ["gemma2", "gpt_oss"])
def test_triton_backend_serves_layer_parameters_exactly(architecture, tmp_path):
    """Triton K/V write + split-K decode wired into the engine, under the CPU interpreter."""
    import os

    from kernels.attention import TritonBackend

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs the Triton interpreter (no GPU here) or a GPU run of the kernel tests")
    folder = build_model(tmp_path / architecture, architecture)
    engine = make_engine(folder, "paged", max_rolling_batch_size=2, max_rolling_batch_prefill_tokens=16,
                         max_model_len=128, max_kv_cache_tokens=256, block_size=4)
    engine.runner.backend = TritonBackend()
    prompts = _long_prompts(engine.tokenizer, 2, seed=14)
    max_new = [6, 4]
    outputs = run_staggered(engine, prompts, max_new, arrivals=[0, 1])
    assert_matches_generate(folder, prompts, max_new, outputs)


def test_kv_layout_comes_from_the_layers_not_the_config(tmp_path):
    # GPT-2 has no grouped-query attention: a num_key_value_heads in its config is ignored by the
    # model, and a cache shaped from it would be too small.
    folder = build_model(tmp_path / "gpt2", "gpt2", num_key_value_heads=1, head_dim=8)
    engine = make_engine(folder, "paged", max_model_len=128, max_kv_cache_tokens=256, block_size=4)
    assert {(layer.num_kv_heads, layer.head_dim) for layer in engine.runner.layout.layers} == {(4, 16)}
    assert engine.runner.kv_caches[0][0].shape[-2:] == (4, 16)
    prompts = _long_prompts(engine.tokenizer, 2, seed=15)
    outputs = run_staggered(engine, prompts, [8, 8], arrivals=[0, 1])
    assert_matches_generate(folder, prompts, [8, 8], outputs)
