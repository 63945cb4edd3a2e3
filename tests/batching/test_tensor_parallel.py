"""Tensor parallelism on CPU: 2 ranks over gloo, each holding half of every layer (transformers'
tensor-parallel plan) and the KV heads of its half. Every strategy's greedy output equals the
unsharded model's (``model.generate``) for staggered requests on two grouped-query-attention
architectures, preemption and prefix caching included."""

from __future__ import annotations

import pytest

from batching.model_check import UnsupportedModelError
from batching.runner import ModelRunner
from djl_like.config import ServingConfig, Strategy
from batching.offline import create_engine
from tests.batching.test_correctness import assert_matches_generate, random_prompts, run_staggered
from tests.tiny_models import build_model

ARCHITECTURES = ["llama", "qwen2"]  # 4 query / 2 KV heads; 6 query / 2 KV heads


@pytest.fixture(scope="module", params=ARCHITECTURES)
def sharded(request, tmp_path_factory):
    """(model folder, a TP=2 runner, the unsharded runner) per architecture; the group is stopped
    at the end of the module."""
    folder = build_model(tmp_path_factory.mktemp(request.param), request.param)
    runner = ModelRunner(str(folder), dtype="fp32", device="cpu", tensor_parallel_degree=2)
    yield folder, runner, ModelRunner(str(folder), dtype="fp32", device="cpu")
    runner.close()
    assert all(process.poll() is not None for process in runner.group.processes)


def _engine(sharded, strategy: str, **settings):
    folder, runner, _ = sharded
    config = ServingConfig(strategy=Strategy(strategy), dtype="fp32", device="cpu", tensor_parallel_degree=2,
                           **settings)
    return create_engine(config, str(folder), runner=runner)


@pytest.mark.parametrize("strategy", ["dynamic", "rolling", "paged"])
def test_every_strategy_matches_the_unsharded_model(sharded, strategy):
    engine = _engine(sharded, strategy, batch_size=3, max_batch_delay_ms=0, max_rolling_batch_size=4,
                     max_rolling_batch_prefill_tokens=16, max_model_len=160, max_kv_cache_tokens=640, block_size=4)
    prompts = random_prompts(engine.tokenizer, 5, seed=21, min_words=4, max_words=20)
    max_new = [12, 4, 20, 8, 15]
    outputs = run_staggered(engine, prompts, max_new, arrivals=[0, 0, 1, 4, 7])
    assert_matches_generate(sharded[0], prompts, max_new, outputs)


def test_preemption_and_prefix_cache_under_tensor_parallelism(sharded):
    engine = _engine(sharded, "paged", max_rolling_batch_size=4, max_rolling_batch_prefill_tokens=32,
                     max_model_len=96, max_kv_cache_tokens=96, block_size=4, enable_prefix_caching=True)
    system = engine.tokenizer.encode("You are a helpful assistant about paged attention. " * 2)[:24]
    prompts = [system + q for q in random_prompts(engine.tokenizer, 4, seed=22, min_words=2, max_words=6)]
    max_new = [30, 25, 30, 20]
    outputs = run_staggered(engine, prompts, max_new, arrivals=[0, 0, 1, 8])
    assert_matches_generate(sharded[0], prompts, max_new, outputs)
    assert engine.batcher.num_preemptions > 0
    assert engine.stats()["blocks"]["prefix_hits"] > 0


def test_each_rank_caches_half_the_kv_heads(sharded):
    _, runner, unsharded = sharded
    assert runner.layout.bytes_per_token * 2 == unsharded.layout.bytes_per_token
    for layer, whole in zip(runner.layout.layers, unsharded.layout.layers):
        assert (layer.num_kv_heads * 2, layer.head_dim) == (whole.num_kv_heads, whole.head_dim)
    _engine(sharded, "paged", max_model_len=64, max_kv_cache_tokens=256, block_size=4)
    assert runner.kv_caches[0][0].shape[:2] == (64, 4)  # the same token capacity ...
    assert runner.kv_caches[0][0].shape[2] * 2 == unsharded.layout.layers[0].num_kv_heads  # ... half the heads


def test_a_model_without_a_tensor_parallel_plan_is_refused(tmp_path):
    folder = build_model(tmp_path / "gpt2", "gpt2")
    with pytest.raises(UnsupportedModelError, match="model type 'gpt2' has no tensor-parallel plan"):
        ModelRunner(str(folder), dtype="fp32", device="cpu", tensor_parallel_degree=2)


def test_heads_that_do_not_divide_among_the_ranks_are_refused(tmp_path):
    folder = build_model(tmp_path / "llama", "llama", num_attention_heads=4, num_key_value_heads=1)
    with pytest.raises(UnsupportedModelError, match="has 1 KV heads, which do not divide among 2 ranks"):
        ModelRunner(str(folder), dtype="fp32", device="cpu", tensor_parallel_degree=2)
